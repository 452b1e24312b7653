"""`compress tune` against the base model's whole next-token distribution and against its
top K tokens (`--teacher-top K`), on one checkpoint (results/teacher_top.json).

    python benchmarks/teacher_top.py [--setting w2g64] [--method gptq] [--tops 0,256,64]

Quantises the bundled model once (`compress quantize`, the seed-0 calibration windows of
benchmarks/lowbit.py, 32 x 512), then tunes that checkpoint once per K (0: the whole
distribution) in child processes, timed, with their peak RSS. Every result is scored by
the harness of benchmarks/lowbit.py: KL (mean, p99) against the fp16 model, top-1
agreement and perplexity on the same held-out tokens; the untuned checkpoint too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _quantbench import HERE, quantize_command, run_child, score, write_report

from compress import assets, evaluation
from compress.progress import set_quiet

SETTINGS = {"w4g128": (4, 128), "w3g128": (3, 128), "w2g64": (2, 64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=assets.DEFAULT_MODEL,
                        help="a bundled model (gemma3-270m: a 262k vocabulary)")
    parser.add_argument("--setting", default="w2g64", choices=sorted(SETTINGS))
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--tops", default="0,256,64", help="0: the whole distribution")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--tune-epochs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="default: results/teacher_top[-MODEL].json")
    args = parser.parse_args()
    if args.json is None:
        name = "" if args.model == assets.DEFAULT_MODEL else f"-{args.model}"
        args.json = HERE / "results" / f"teacher_top{name}.json"
    set_quiet(True)
    bits, group = SETTINGS[args.setting]
    work = Path(tempfile.mkdtemp(prefix="compress-teacher-top-"))
    packed = work / "packed"
    seconds, rss = run_child(quantize_command(args.method, bits, group, ["--threads", "1"], packed,
                                              args.calib_samples, args.calib_seqlen,
                                              args.model))
    rows = {"untuned": {"seconds": seconds, "peak_rss_bytes": rss,
                        **score(packed, args.eval_tokens, args.model)}}
    for top in (int(k) for k in args.tops.split(",")):
        out = work / f"tuned-{top}"
        seconds, rss = run_child([
            sys.executable, "-m", "compress.cli", "tune", str(packed), "--out", str(out),
            "--epochs", str(args.tune_epochs), "--teacher-top", str(top), "--threads", "1",
            "--overwrite",
            "-q"])
        note = json.loads((out / "scale_tuning.json").read_text())
        rows[f"top {top}" if top else "whole"] = {
            "seconds": seconds, "peak_rss_bytes": rss, "calibration_kl":
            [note["kl_start"], note["kl_tuned"]], **score(out, args.eval_tokens, args.model)}
    fp16 = evaluation.evaluate_perplexity(assets.bundled_model_dir(args.model),
                                          max_tokens=args.eval_tokens)
    for name, r in rows.items():
        print(f"{args.setting} {args.method} {name:8s} KL {r['kl_mean']:.4f} "
              f"(p99 {r['kl_p99']:.3f})  top-1 {r['top1_agreement']:.2%}  ppl {r['ppl']:8.3f}"
              f"  {r['seconds']:5.0f} s  peak {r['peak_rss_bytes'] / 2**30:.1f} GiB", flush=True)
    write_report(args.json, "teacher_top", args, fp16, args.model, setting=args.setting,
                 method=args.method, rows=rows)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
