"""Intel's auto-round beside our low-bit figures, on the bundled model and our calibration
ids: perplexity, KL (mean, p99) and top-1 agreement against the unquantised model, wall time.

    python benchmarks/lowbit_peers.py [--runs w4g128:0,w4g128:25,w3g128:25,w2g64:25]
                                      [--batch-size 4] [--calib-samples 32]
                                      [--calib-seqlen 512] [--eval-tokens 8192] [--merge]

The shortened protocol of benchmarks/rotate.py (results/rotate.json, signround.json):
our seed-0 calibration windows (`_quantbench.calibration_ids`, the same token ids our
`compress quantize` uses) go to benchmarks/peer_autoround.py, run in the peer venv
(/tmp/peer-venv) as a timed child process (peak RSS from its own getrusage); it writes a
dense fp16 folder of auto-round's dequantised weights, which `compress eval`'s harness
(`_quantbench.score`) scores against the fp16 model on the same held-out tokens as ours.
A run is SETTING:ITERS (symmetric; w4g128, w3g128, w2g64); ITERS 0 is auto-round's plain
RTN. --merge keeps the rows already in --json (same protocol) and adds these.
Writes benchmarks/results/autoround.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from _quantbench import HERE, PEER_PYTHON, calibration_ids, run_child, score, write_report

from compress import assets, evaluation
from compress.progress import set_quiet

SETTINGS = {"w4g128": (4, 128), "w3g128": (3, 128), "w2g64": (2, 64)}  # symmetric


def autoround(bits: int, group: int, iters: int, calib_ids: Path, work: Path, label: str,
              args) -> dict:
    """auto-round on the bundled model and our ids, scored by our harness."""
    out, report = work / f"autoround-{label}", work / f"autoround-{label}.json"
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    seconds, rss = run_child([str(args.peer_python), str(HERE / "peer_autoround.py"),
                              "--model", str(assets.bundled_model_dir()),
                              "--calib-ids", str(calib_ids), "--bits", str(bits),
                              "--group-size", str(group), "--iters", str(iters),
                              "--batch-size", str(args.batch_size), "--threads", threads,
                              "--out", str(out), "--json", str(report)])
    info = json.loads(report.read_text())
    for key in ("quantised_modules", "group_checks_sample", "out", "calib_ids"):
        info.pop(key, None)
    return {"seconds": seconds, "peak_rss_bytes": rss, **score(out, args.eval_tokens),
            "peer": info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="w4g128:0,w4g128:25,w3g128:25,w2g64:25",
                        help="SETTING:ITERS,... (ITERS 0 = auto-round's RTN)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows already in --json and add these")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "autoround.json")
    args = parser.parse_args()
    set_quiet(True)

    fp16 = evaluation.evaluate_perplexity(assets.bundled_model_dir(), max_tokens=args.eval_tokens)
    work = Path(tempfile.mkdtemp(prefix="compress-lowbit-peers-"))
    calib = calibration_ids(work, args.calib_samples, args.calib_seqlen)
    ids = torch.load(calib)
    rows: dict = {}
    if args.merge and args.json.exists():
        old = json.loads(args.json.read_text())
        if (old["calibration"]["samples"], old["calibration"]["seqlen"],
                old["perplexity_protocol"]["tokens_scored"]) != (
                args.calib_samples, args.calib_seqlen, fp16.tokens):
            raise SystemExit(f"{args.json} was measured under another protocol")
        rows = old["settings"]

    def save() -> None:  # after every measurement, so an interrupted run keeps its numbers
        write_report(args.json, "lowbit_peers", args, fp16, settings=rows,
                     calibration_ids_shape=list(ids.shape))

    for run in args.runs.split(","):
        name, iters = run.split(":")
        bits, group = SETTINGS[name]
        label = "autoround-rtn" if int(iters) == 0 else f"autoround-{iters}it-b{args.batch_size}"
        r = rows.setdefault(name, {})[label] = autoround(bits, group, int(iters), calib, work,
                                                          f"{name}-{label}", args)
        print(f"{name} {label:22s} ppl {r['ppl']:9.3f}  KL {r['kl_mean']:.4f} "
              f"(p99 {r['kl_p99']:.3f})  top-1 {r['top1_agreement']:.2%}  "
              f"{r['seconds']:5.0f} s", flush=True)
        save()
    print(f"fp16 ppl {fp16.ppl:.3f}; wrote {args.json}")


if __name__ == "__main__":
    main()
