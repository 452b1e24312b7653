"""`compress tune` under several settings on one checkpoint: the teacher's top K tokens,
epochs, step size, windows per step (results/tune_settings.json).

    python benchmarks/tune_settings.py [--setting w2g64] [--method gptq]
        [--variants "teacher-top=0;teacher-top=256;teacher-top=64"] [--checkpoint DIR]

Quantises the bundled model once (`compress quantize`, the seed-0 calibration windows of
benchmarks/lowbit.py, 32 x 512, one thread), or takes a finished checkpoint of it
(`--checkpoint`, e.g. one a lowbit.py cell left in its work folder), then tunes it once
per variant in child processes, timed, with their peak RSS. A variant is `compress
tune` flags without their dashes, `name=value` joined by commas (`epochs=4,lr=0.004`);
the empty variant is the defaults. Every result is scored by the harness of
benchmarks/lowbit.py: KL (mean, p99) against the fp16 model, top-1 agreement and
perplexity on the same held-out tokens; the untuned checkpoint too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _quantbench import HERE, SETTINGS, quantize_command, run_child, score, write_report

from compress import assets, evaluation
from compress.progress import set_quiet

TUNE_FLAGS = ("epochs", "lr", "batch", "teacher-top", "norms")


def variant_flags(variant: str) -> list[str]:
    """'epochs=4,lr=0.004' -> ['--epochs', '4', '--lr', '0.004'] (norms=no: --no-norms)."""
    flags: list[str] = []
    for item in filter(None, variant.split(",")):
        name, _, value = item.partition("=")
        if name not in TUNE_FLAGS or not value or "=" in value:
            raise SystemExit(f"variant item {item!r}: expected NAME=VALUE with NAME one of "
                             f"{', '.join(TUNE_FLAGS)}")
        if name == "norms":
            flags.append("--norms" if value in ("yes", "true", "1") else "--no-norms")
        else:
            flags += [f"--{name}", value]
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=assets.DEFAULT_MODEL,
                        help="a bundled model (gemma3-270m: a 262k vocabulary)")
    parser.add_argument("--setting", default="w2g64", choices=sorted(SETTINGS))
    parser.add_argument("--method", default="gptq", help="compress quantize's --method")
    parser.add_argument("--checkpoint", type=Path,
                        help="tune this packed checkpoint instead of quantising one "
                             "(--setting and --method then only label the results)")
    parser.add_argument("--variants", default="teacher-top=0;teacher-top=256;teacher-top=64",
                        help="';'-separated; each NAME=VALUE,... of compress tune's flags")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1, help="ours, quantise and tune")
    parser.add_argument("--json", type=Path, help="default: results/tune_settings[-MODEL].json")
    args = parser.parse_args()
    if args.json is None:
        name = "" if args.model == assets.DEFAULT_MODEL else f"-{args.model}"
        args.json = HERE / "results" / f"tune_settings{name}.json"
    variants = [v.strip() for v in args.variants.split(";")]
    flags = {v: variant_flags(v) for v in variants}  # refuse a bad variant before any work
    set_quiet(True)
    work = Path(tempfile.mkdtemp(prefix="compress-tune-settings-"))
    threads = ["--threads", str(args.threads)]
    if args.checkpoint is not None:
        packed, seconds, rss = args.checkpoint, None, None
    else:
        bits, group = SETTINGS[args.setting]
        packed = work / "packed"
        seconds, rss = run_child(quantize_command(args.method, bits, group, threads, packed,
                                                  args.calib_samples, args.calib_seqlen,
                                                  args.model))
    rows = {"untuned": {"seconds": seconds, "peak_rss_bytes": rss,
                        **score(packed, args.eval_tokens, args.model)}}
    for k, variant in enumerate(variants):
        out = work / f"tuned-{k}"
        seconds, rss = run_child([sys.executable, "-m", "compress.cli", "tune", str(packed),
                                  "--out", str(out), *flags[variant], *threads,
                                  "--overwrite", "-q"])
        note = json.loads((out / "scale_tuning.json").read_text())
        rows[variant or "defaults"] = {
            "seconds": seconds, "peak_rss_bytes": rss, "config": note.get("config"),
            "calibration_kl": [note["kl_start"], note["kl_tuned"]],
            **score(out, args.eval_tokens, args.model)}
    fp16 = evaluation.evaluate_perplexity(assets.bundled_model_dir(args.model),
                                          max_tokens=args.eval_tokens)
    for name, r in rows.items():
        took = "" if r["seconds"] is None else (
            f"  {r['seconds']:5.0f} s  peak {r['peak_rss_bytes'] / 2**30:.1f} GiB")
        print(f"{args.setting} {args.method} {name:24s} KL {r['kl_mean']:.4f} "
              f"(p99 {r['kl_p99']:.3f})  top-1 {r['top1_agreement']:.2%}  "
              f"ppl {r['ppl']:8.3f}{took}", flush=True)
    write_report(args.json, "tune_settings", args, fp16, args.model, setting=args.setting,
                 method=args.method, checkpoint=None if args.checkpoint is None
                 else str(args.checkpoint), rows=rows)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
