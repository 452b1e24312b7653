"""GPTQ vs RTN vs fp16 perplexity on the bundled model, and vs a PyPI peer (llm-compressor).

    python benchmarks/gptq.py [--calib-samples 128] [--calib-seqlen 512] [--eval-tokens 16384]
                              [--peer-python /tmp/peer-venv/bin/python] [--settings w4,w3]

Each quantisation runs as a child process (`compress quantize ... --no-eval`), timed and
with its peak RSS read from wait4. The peer, when its interpreter exists (see
benchmarks/peer_llmcompressor.py for the venv), gets the very same calibration token ids
and the same per-layer scheme, and its checkpoint is evaluated by the same harness.
Writes benchmarks/results/gptq.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _quantbench import HERE, PEER_PYTHON, calibration_ids, peer, quantize, write_report

from compress import assets, evaluation
from compress.progress import set_quiet

SETTINGS = {  # name -> (bits, group size, extra gptq flags); act-order (static) is default
    "w4g128": (4, 128, ["--no-act-order"]),
    "w4g128-actorder": (4, 128, ["--act-order"]),
    "w3g128": (3, 128, ["--no-act-order"]),
    "w3g128-actorder": (3, 128, ["--act-order"]),
    "w8": (8, -1, ["--no-act-order"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    parser.add_argument("--peer-settings", default="w4g128-actorder,w3g128-actorder")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "gptq.json")
    args = parser.parse_args()
    set_quiet(True)

    fp16 = evaluation.evaluate_perplexity(assets.bundled_model_dir(), max_tokens=args.eval_tokens)
    work = Path(tempfile.mkdtemp(prefix="compress-gptq-bench-"))
    rows: dict = {}
    peers: dict = {}
    calib = (args.calib_samples, args.calib_seqlen, args.eval_tokens)

    def save() -> None:  # after every measurement, so an interrupted run keeps its numbers
        write_report(args.json, "gptq", args, fp16, settings=rows, peer=peers)

    for name in args.settings.split(","):
        bits, group, extra = SETTINGS[name]
        rows[name] = {
            "rtn": quantize("rtn", bits, group, [], work / f"rtn-{name}", *calib),
            "gptq": quantize("gptq", bits, group, extra, work / f"gptq-{name}", *calib),
        }
        r = rows[name]
        print(f"{name:16s} fp16 {fp16.ppl:7.3f}  RTN {r['rtn']['ppl']:8.3f}  GPTQ "
              f"{r['gptq']['ppl']:8.3f} ({r['gptq']['seconds']:.0f} s, peak RSS "
              f"{r['gptq']['peak_rss_bytes'] / 1e9:.2f} GB)", flush=True)
        save()

    if args.peer_python.is_file():
        ids = calibration_ids(work, args.calib_samples, args.calib_seqlen)
        for name in args.peer_settings.split(","):
            bits, _, extra = SETTINGS[name]
            actorder = "weight" if "--act-order" in extra else "none"
            theirs = peer("gptq", bits, actorder, ids, work, name, args.eval_tokens,
                          args.peer_python)
            ours = rows[name]["gptq"]
            peers[name] = {**theirs, "ours_over_peer_ppl": ours["ppl"] / theirs["ppl"],
                           "ours_over_peer_seconds": ours["seconds"] / theirs["process_seconds"]}
            print(f"peer {name:11s} llm-compressor GPTQ ppl {theirs['ppl']:8.3f} in "
                  f"{theirs['process_seconds']:.0f} s -> ours/peer: ppl "
                  f"{peers[name]['ours_over_peer_ppl']:.3f}, time "
                  f"{peers[name]['ours_over_peer_seconds']:.2f}", flush=True)
            save()
    else:
        print(f"peer skipped: {args.peer_python} not found (see benchmarks/peer_llmcompressor.py)")

    save()
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
