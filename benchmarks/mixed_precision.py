"""Automatic mixed precision vs the best uniform setting at the same average bits/weight.

    python benchmarks/mixed_precision.py [--targets 3.5,4.25] [--method rtn]
                                         [--json benchmarks/results/mixed_precision.json]

For each target B: `quantize --target-bits B` (each Linear chooses among w3g128, w3g64,
w3g32, w4g128, w4g64, w4g32, w8), and every uniform setting among those options whose
stored bits/weight (codes + scales, as `sensitivity.stored_bits` counts them) is
within B, closest first. All are scored by `compress eval`'s distribution match against
the fp16 model on the same 16,352 held-out tokens (the bundled LAMBADA text, which the
sensitivity measurement never sees). Prints KL(mixed) / KL(best uniform) per target.
"""

from __future__ import annotations

# Before torch loads OpenMP: idle threads sleep instead of spinning (compress/threads.py).
import compress

# isort: split
import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from _quantbench import report_model

from compress import api, assets, evaluation, models
from compress.calibrate import sensitivity
from compress.progress import set_quiet
from compress.quant import QuantScheme
from compress.recipe import Recipe

HERE = Path(__file__).parent


def uniform_bits(files: models.ModelFiles, option: sensitivity.Option) -> float:
    bits, _, weights = sensitivity.costs(files, (option,), files.linear_names())
    return sum(b[option.label] for b in bits.values()) / sum(weights.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="3.5,4.25")
    parser.add_argument("--method", default="rtn")
    parser.add_argument("--uniform-within", type=float, default=0.3,
                        help="uniform settings this many bits/weight below a target, or "
                             "closer, are compared")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "mixed_precision.json")
    args = parser.parse_args()
    set_quiet(True)
    base = assets.bundled_model_dir()
    files = models.open_model(base)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in map(float, args.targets.split(",")):
            start = time.perf_counter()
            mixed_dir = Path(tmp) / f"mixed-{target:g}"
            api.quantize(base, Recipe(args.method), mixed_dir, evaluate=False,
                         target_bits=target)
            mixed_s = time.perf_counter() - start
            allocation = json.loads((mixed_dir / "allocation.json").read_text())
            mixed = evaluation.evaluate(mixed_dir, base, max_tokens=args.max_tokens).match
            uniform = []
            for option in sensitivity.DEFAULT_OPTIONS:
                bpw = uniform_bits(files, option)
                if not target - args.uniform_within <= bpw <= target:
                    continue
                out = Path(tmp) / option.label
                recipe = Recipe(args.method, QuantScheme(option.bits, option.group_size))
                api.quantize(base, recipe, out, evaluate=False)
                match = evaluation.evaluate(out, base, max_tokens=args.max_tokens).match
                uniform.append({"setting": option.label, "bits_per_weight": bpw,
                                "kl_mean": match.kl_mean, "kl_p99": match.kl_p99,
                                "top1_agreement": match.top1_agreement})
            best = min(uniform, key=lambda u: u["kl_mean"])
            row = {"target_bits": target, "method": args.method,
                   "mixed": {"bits_per_weight": allocation["bits_per_weight"],
                             "kl_mean": mixed.kl_mean, "kl_p99": mixed.kl_p99,
                             "top1_agreement": mixed.top1_agreement,
                             "estimated_kl": allocation["estimated_kl"],
                             "counts": allocation["counts"], "quantise_seconds": mixed_s},
                   "uniform": uniform, "best_uniform": best["setting"],
                   "kl_mixed_over_best_uniform": mixed.kl_mean / best["kl_mean"]}
            rows.append(row)
            print(f"{target:g} bits/weight: mixed KL {mixed.kl_mean:.4f} "
                  f"({allocation['bits_per_weight']:.3f} b/w, top-1 "
                  f"{mixed.top1_agreement:.2%}) vs best uniform {best['setting']} KL "
                  f"{best['kl_mean']:.4f} ({best['bits_per_weight']:.3f} b/w, top-1 "
                  f"{best['top1_agreement']:.2%}): ratio "
                  f"{row['kl_mixed_over_best_uniform']:.3f}  [{mixed_s:.0f} s to allocate "
                  f"and quantise]", flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "benchmark": "mixed_precision", "model": report_model(assets.DEFAULT_MODEL),
                "compress_version": compress.__version__, "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(), "eval_tokens": args.max_tokens,
                "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
