"""AWQ vs awq+gptq vs GPTQ vs RTN vs fp16 on the bundled model, and vs llm-compressor's AWQ.

    python benchmarks/awq.py [--calib-samples 128] [--calib-seqlen 512] [--eval-tokens 16384]
                             [--peer-python /tmp/peer-venv/bin/python] [--settings w4g128,w3g128]

One run, side by side: every method on the same calibration windows, every checkpoint
scored by the same perplexity harness; each quantisation is a timed child process (peak
RSS from wait4). The peers (llm-compressor's AWQModifier then RTN, and its GPTQModifier,
see benchmarks/peer_llmcompressor.py) get the same token ids and per-layer scheme. Writes
benchmarks/results/awq.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _quantbench import HERE, PEER_PYTHON, calibration_ids, peer, quantize, write_report

from compress import assets, evaluation
from compress.progress import set_quiet

SETTINGS = {"w4g128": (4, 128), "w3g128": (3, 128)}  # symmetric, as every method defaults
METHODS = ("rtn", "gptq", "awq", "awq+gptq")  # gptq: static act-order, our default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    parser.add_argument("--peer-settings", default="w4g128",
                        help="settings at which llm-compressor's AWQ (and GPTQ) also run")
    parser.add_argument("--peer-methods", default="awq,gptq")
    parser.add_argument("--peer-calib-samples", type=int, default=None,
                        help="fewer calibration windows for the peer comparison (its AWQ "
                        "re-runs each block per grid point); ours runs again on the same")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "awq.json")
    args = parser.parse_args()
    set_quiet(True)

    fp16 = evaluation.evaluate_perplexity(assets.bundled_model_dir(), max_tokens=args.eval_tokens)
    work = Path(tempfile.mkdtemp(prefix="compress-awq-bench-"))
    rows: dict = {}
    calib = (args.calib_samples, args.calib_seqlen, args.eval_tokens)
    ids = calibration_ids(work, args.calib_samples, args.calib_seqlen)
    have_peer = args.peer_python.is_file()

    def save() -> None:  # after every measurement, so an interrupted run keeps its numbers
        write_report(args.json, "awq", args, fp16, settings=rows)

    for name in args.settings.split(","):
        bits, group = SETTINGS[name]
        row = rows[name] = {}
        for method in args.methods.split(","):
            out = work / f"{method.replace('+', '-')}-{name}"
            row[method] = quantize(method, bits, group, [], out, *calib)
            print(f"{name} {method:9s} ppl {row[method]['ppl']:8.3f}  "
                  f"{row[method]['seconds']:6.0f} s  peak RSS "
                  f"{row[method]['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
            save()
        if not have_peer or name not in args.peer_settings.split(","):
            continue
        peer_ids, peer_row = ids, row
        if args.peer_calib_samples:  # ours again, on exactly the peer's windows
            n = args.peer_calib_samples
            peer_ids = calibration_ids(work / f"n{n}", n, args.calib_seqlen)
            peer_row = row[f"peer_comparison_{n}x{args.calib_seqlen}"] = {}
            for method in args.peer_methods.split(","):
                out = work / f"{method}-{name}-n{n}"
                peer_row[method] = quantize(method, bits, group, [], out, n, args.calib_seqlen,
                                            args.eval_tokens)
                print(f"{name} {method:9s} ppl {peer_row[method]['ppl']:8.3f}  "
                      f"{peer_row[method]['seconds']:6.0f} s  ({n} calibration windows)",
                      flush=True)
        # act-order "weight" is static groups, our GPTQ default
        for method in args.peer_methods.split(","):
            actorder = "weight" if method == "gptq" else "none"
            theirs = peer(method, bits, actorder, peer_ids, work, name, args.eval_tokens,
                          args.peer_python)
            peer_row[f"peer_{method}"] = theirs
            if method in peer_row:
                peer_row[f"ours_over_peer_{method}"] = {
                    "ppl": peer_row[method]["ppl"] / theirs["ppl"],
                    "seconds": peer_row[method]["seconds"] / theirs["process_seconds"]}
            print(f"{name} peer {method:4s} ppl {theirs['ppl']:8.3f}  "
                  f"{theirs['process_seconds']:6.0f} s  (llm-compressor "
                  f"{theirs['versions']['llmcompressor']})", flush=True)
            save()
    if not have_peer:
        print(f"peer skipped: {args.peer_python} not found (see "
              "benchmarks/peer_llmcompressor.py)")
    print(f"fp16 ppl {fp16.ppl:.3f}; wrote {args.json}")


if __name__ == "__main__":
    main()
