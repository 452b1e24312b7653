"""Gemma-3-270M end to end from the CLI: fp16, RTN and GPTQ at W4 g128, against
llm-compressor's GPTQ on the same calibration token ids, in one run.

    python benchmarks/gemma3.py [--calib-samples 128] [--calib-seqlen 512]
                                [--eval-tokens 16384] [--peer-python /tmp/peer-venv/bin/python]

Each quantisation runs as a child process (`compress quantize gemma3-270m ... --no-eval`,
or the peer script), timed, with its peak RSS from wait4; run it on an otherwise idle
machine. Every checkpoint (the peer's too) is scored by the same harness against the
unquantised model on the same windows: token perplexity over 512-token windows that each
start with BOS (as Gemma expects), KL(fp16 || quantised) per token and top-1 agreement.
GPTQ settings on both sides: symmetric, group 128, act-order with static groups, damping
0.01, block 128, lm_head and embeddings unquantised. Writes benchmarks/results/gemma3.json.
"""

from __future__ import annotations

# Before torch loads OpenMP: idle threads sleep instead of spinning (compress/threads.py).
import compress  # noqa: F401

# isort: split
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from _quantbench import HERE, PEER_PYTHON, calibration_ids, peer, run_child

from compress import assets, evaluation, models
from compress.progress import set_quiet

MODEL = assets.GEMMA3_MODEL


def scored(path: Path, base: models.ModelFiles, eval_tokens: int) -> dict:
    report = evaluation.evaluate(models.open_model(path), base, max_tokens=eval_tokens)
    m = report.match
    return {"ppl": report.ppl.ppl, "kl_mean": m.kl_mean, "kl_p99": m.kl_p99,
            "top1_agreement": m.top1_agreement}


def ours(method: str, out: Path, args) -> dict:
    cmd = [str(args.python), "-m", "compress.cli", "quantize", MODEL, "--method", method,
           "--bits", "4", "--group-size", "128", "--out", str(out), "--overwrite",
           "--no-eval", "-q"]
    if method != "rtn":
        cmd += ["--calib-samples", str(args.calib_samples), "--calib-seqlen",
                str(args.calib_seqlen)]
    seconds, rss = run_child(cmd)
    return {"seconds": seconds, "peak_rss_bytes": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "gemma3.json")
    parser.add_argument("--python", type=Path, default=Path(sys.executable))
    args = parser.parse_args()
    set_quiet(True)
    work = Path(tempfile.mkdtemp(prefix="compress-gemma3-bench-"))
    base = models.open_model(MODEL)
    report: dict = {
        "benchmark": "gemma3", "model": f"{MODEL} (bundled: {base.path})",
        "threads": torch.get_num_threads(),
        "calibration": {"samples": args.calib_samples, "seqlen": args.calib_seqlen,
                        "source": "bundled calibration split, seed 0, BOS first"},
        "scheme": "W4 g128 symmetric; GPTQ: act-order, static groups, damp 0.01, block 128",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")

    fp16 = evaluation.evaluate_perplexity(base, max_tokens=args.eval_tokens)
    report["perplexity_protocol"] = {"ctx": fp16.ctx, "windows": fp16.windows,
                                     "tokens_scored": fp16.tokens, "bos_per_window": True}
    report["fp16"] = {"ppl": fp16.ppl}
    print(f"fp16 ppl {fp16.ppl:.3f}", flush=True)
    for method in ("rtn", "gptq"):
        out = work / method
        row = ours(method, out, args)
        row.update(scored(out, base, args.eval_tokens))
        report[method] = row
        print(f"{method}: ppl {row['ppl']:.3f}, KL {row['kl_mean']:.4f}, "
              f"{row['seconds']:.0f} s, peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB",
              flush=True)
        save()
    if args.peer_python.is_file():
        ids = calibration_ids(work, args.calib_samples, args.calib_seqlen, MODEL)
        theirs = peer("gptq", 4, "weight", ids, work, "w4g128", args.eval_tokens,
                      args.peer_python, model=MODEL, scheme="w4g128")
        theirs.update(scored(work / "peer-gptq-w4g128", base, args.eval_tokens))
        report["llmcompressor_gptq"] = theirs
        report["ours_over_peer"] = {
            "ppl": report["gptq"]["ppl"] / theirs["ppl"],
            "kl_mean": report["gptq"]["kl_mean"] / theirs["kl_mean"],
            "seconds": report["gptq"]["seconds"] / theirs["process_seconds"]}
        r = report["ours_over_peer"]
        print(f"llm-compressor GPTQ: ppl {theirs['ppl']:.3f}, KL {theirs['kl_mean']:.4f}, "
              f"{theirs['process_seconds']:.0f} s -> ours/peer ppl {r['ppl']:.3f}, KL "
              f"{r['kl_mean']:.3f}, time {r['seconds']:.2f}", flush=True)
    else:
        print(f"peer skipped: {args.peer_python} not found (see benchmarks/peer_llmcompressor.py)")
    save()
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
