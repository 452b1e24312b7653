"""What quantisation costs the bundled model, measured by `compress eval`'s three kinds of
evidence, for RTN and GPTQ at W8, W4 g128 and W3 g128.

    python benchmarks/quality_evals.py [--tasks arc_easy,piqa,winogrande,hellaswag] [--limit 300]
                               [--json benchmarks/results/evals.json]

Perplexity and the distribution match (KL(baseline || quantised) per token, top-1
agreement) on 16,352 held-out tokens (32 non-overlapping 512-token windows of the
bundled LAMBADA text); lm-eval accuracy on the local tasks' first `--limit` documents,
baseline and quantised on the same documents. GPTQ uses the CLI defaults (128 x 512
calibration tokens from the bundled calibration split, static act-order). Each eval is
timed; the baseline's reference pass and task scores are computed once (by the first
variant) and cached, as `compress eval` does for a user comparing many variants.
"""

from __future__ import annotations

# Before torch loads OpenMP: idle threads sleep instead of spinning (compress/threads.py).
import compress

# isort: split
import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from _quantbench import report_model

from compress import assets, evaluation, pipeline
from compress.progress import set_quiet
from compress.quant import QuantScheme
from compress.recipe import Recipe

HERE = Path(__file__).parent
SETTINGS = [(method, bits, group) for method in ("rtn", "gptq")
            for bits, group in ((8, -1), (4, 128), (3, 128))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="arc_easy,piqa,winogrande,hellaswag")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "evals.json")
    args = parser.parse_args()
    set_quiet(True)
    tasks = args.tasks.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # a fresh results cache, so every time below is a first computation (the bundled
        # model is re-converted into it, a few seconds)
        os.environ["COMPRESS_HOME"] = str(Path(tmp) / "cache")
        base = assets.bundled_model_dir()
        for method, bits, group in SETTINGS:
            out = Path(tmp) / f"{method}-w{bits}g{group}"
            start = time.perf_counter()
            pipeline.quantize(base, Recipe(method, QuantScheme(bits, group, True)), out)
            quantise_s = time.perf_counter() - start
            start = time.perf_counter()
            quality = evaluation.evaluate(out, base, max_tokens=args.max_tokens)
            eval_s = time.perf_counter() - start
            start = time.perf_counter()
            scored = evaluation.evaluate(out, base, max_tokens=args.max_tokens, tasks=tasks,
                                         limit=args.limit)  # ppl/KL now cached: tasks only
            tasks_s = time.perf_counter() - start
            m = quality.match
            row = {"method": method, "bits": bits, "group_size": group,
                   "quantise_seconds": quantise_s, "ppl_kl_eval_seconds": eval_s,
                   "tasks_eval_seconds": tasks_s, **quality.to_dict(),
                   "tasks": scored.to_dict()["tasks"]}
            rows.append(row)
            accs = "  ".join(f"{t.removeprefix('compress_')} {v['quantised']['acc']:.3f} "
                             f"(base {v['baseline']['acc']:.3f})"
                             for t, v in row["tasks"].items())
            print(f"{method:>4} W{bits} g{group:<4} ppl {quality.ppl.ppl:7.3f} "
                  f"(base {quality.baseline_ppl.ppl:.3f}, {row['delta_ppl']:+.3f})  "
                  f"KL {m.kl_mean:.4f} (p99 {m.kl_p99:.3f})  top-1 {m.top1_agreement:.2%}  "
                  f"{accs}  eval {eval_s:.0f} s + tasks {tasks_s:.0f} s", flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "benchmark": "evals", "model": report_model(assets.DEFAULT_MODEL),
                "compress_version": compress.__version__, "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(), "task_limit": args.limit,
                "notes": "the first row's eval times include the baseline's reference pass "
                         "and its task scores, computed once and cached for the others",
                "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
