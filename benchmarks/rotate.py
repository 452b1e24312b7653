"""RTN and GPTQ (and learned rounding) with and without `--rotate` on the bundled model:
perplexity, KL and top-1 agreement against the unquantised model, quantisation wall time.

    python benchmarks/rotate.py [--calib-samples 128] [--calib-seqlen 512]
                                [--eval-tokens 16384] [--settings w4g128,w3g128,w2g64]
                                [--methods rtn,gptq,signround] [--variants plain,rotate]
                                [--signround-iters 200] [--signround-batch 8]

One run, side by side: each quantisation is a timed child process (`compress quantize
... --no-eval`, peak RSS from wait4), every calibrated run uses the same calibration
windows (seed 0: the same token ids, whose hash each checkpoint's manifest records), and
every checkpoint is scored by `compress eval`'s harness against the fp16 model on the
same held-out tokens. Writes benchmarks/results/rotate.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _quantbench import HERE, SETTINGS, quantize_command, run_child, score, write_report

from compress import assets, evaluation
from compress.progress import set_quiet

METHODS = ("rtn", "gptq", "signround")  # gptq: static act-order, our default
VARIANTS = ("plain", "rotate")


def quantize(method: str, bits: int, group: int, rotated: bool, out: Path, args) -> dict:
    extra = ["--rotate", "--rotate-seed", str(args.rotate_seed)] if rotated else []
    if method == "signround":
        extra += ["--signround-iters", str(args.signround_iters),
                  "--signround-batch", str(args.signround_batch)]
    seconds, rss = run_child(quantize_command(method, bits, group, extra, out,
                                              args.calib_samples, args.calib_seqlen))
    manifest = json.loads((out / "compress_manifest.json").read_text())
    return {"seconds": seconds, "peak_rss_bytes": rss, **score(out, args.eval_tokens),
            "calibration_sha256": (manifest.get("calibration") or {}).get("tokens_sha256"),
            "rotation": manifest.get("rotation")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default="rtn,gptq", help=f"among {','.join(METHODS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--signround-iters", type=int, default=200)
    parser.add_argument("--signround-batch", type=int, default=8)
    parser.add_argument("--rotate-seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "rotate.json")
    args = parser.parse_args()
    set_quiet(True)

    fp16 = evaluation.evaluate_perplexity(assets.bundled_model_dir(), max_tokens=args.eval_tokens)
    work = Path(tempfile.mkdtemp(prefix="compress-rotate-bench-"))
    rows: dict = {}

    def save() -> None:  # after every measurement, so an interrupted run keeps its numbers
        write_report(args.json, "rotate", args, fp16, rotate_seed=args.rotate_seed,
                     signround={"iters": args.signround_iters, "batch": args.signround_batch},
                     settings=rows)

    for name in args.settings.split(","):
        bits, group = SETTINGS[name]
        row = rows[name] = {}
        for method in args.methods.split(","):
            for rotated in [v == "rotate" for v in args.variants.split(",")]:
                label = method + ("+rotate" if rotated else "")
                out = work / f"{method}-{'rot-' if rotated else ''}{name}"
                r = row[label] = quantize(method, bits, group, rotated, out, args)
                print(f"{name} {label:12s} ppl {r['ppl']:9.3f}  KL {r['kl_mean']:.4f} "
                      f"(p99 {r['kl_p99']:.3f})  top-1 {r['top1_agreement']:.2%}  "
                      f"{r['seconds']:5.0f} s", flush=True)
                save()
    print(f"fp16 ppl {fp16.ppl:.3f}; wrote {args.json}")


if __name__ == "__main__":
    main()
