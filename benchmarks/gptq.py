"""GPTQ vs RTN vs fp16 perplexity on the bundled model, and vs a PyPI peer (llm-compressor).

    python benchmarks/gptq.py [--calib-samples 128] [--calib-seqlen 512] [--eval-tokens 16384]
                              [--peer-python /tmp/peer-venv/bin/python] [--settings w4,w3]

Each quantisation runs as a child process (`compress quantize ... --no-eval`), timed and
with its peak RSS read from wait4. The peer, when its interpreter exists (see
benchmarks/peer_gptq.py for the venv), gets the very same calibration token ids and the
same per-layer scheme, and its checkpoint is evaluated by the same harness. Writes
benchmarks/results/gptq.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from _child import run_measured

from compress import api, assets, data
from compress.progress import set_quiet

SETTINGS = {  # name -> (bits, group size, extra gptq flags); act-order (static) is default
    "w4g128": (4, 128, ["--no-act-order"]),
    "w4g128-actorder": (4, 128, ["--act-order"]),
    "w3g128": (3, 128, ["--no-act-order"]),
    "w3g128-actorder": (3, 128, ["--act-order"]),
    "w8": (8, -1, ["--no-act-order"]),
}
HERE = Path(__file__).parent


def run_child(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process; exits on failure."""
    code, seconds, rss, tail = run_measured(cmd)
    if code:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{tail}")
    return seconds, rss


def quantize(method: str, bits: int, group: int, extra: list[str], out: Path,
             args) -> dict:
    cmd = [sys.executable, "-m", "compress.cli", "quantize", "--method", method,
           "--bits", str(bits), "--group-size", str(group), "--out", str(out), "--overwrite",
           "--no-eval", "-q", *extra]
    if method == "gptq":
        cmd += ["--calib-samples", str(args.calib_samples),
                "--calib-seqlen", str(args.calib_seqlen)]
    seconds, rss = run_child(cmd)
    ppl = api.evaluate_perplexity(out, max_tokens=args.eval_tokens)
    return {"seconds": seconds, "peak_rss_bytes": rss, "ppl": ppl.ppl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--peer-python", type=Path, default=Path("/tmp/peer-venv/bin/python"))
    parser.add_argument("--peer-settings", default="w4g128-actorder,w3g128-actorder")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "gptq.json")
    args = parser.parse_args()
    set_quiet(True)

    base = assets.bundled_model_dir()
    fp16 = api.evaluate_perplexity(base, max_tokens=args.eval_tokens)
    work = Path(tempfile.mkdtemp(prefix="compress-gptq-bench-"))
    rows: dict = {}
    peer: dict = {}

    def save() -> None:  # after every measurement, so an interrupted run keeps its numbers
        report = {
            "benchmark": "gptq",
            "model": "smollm2-135m (bundled)",
            "threads": torch.get_num_threads(),
            "calibration": {"samples": args.calib_samples, "seqlen": args.calib_seqlen,
                            "source": "bundled calibration split, seed 0"},
            "perplexity_protocol": {"ctx": fp16.ctx, "windows": fp16.windows,
                                    "tokens_scored": fp16.tokens},
            "fp16_ppl": fp16.ppl,
            "settings": rows,
            "peer": peer,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")

    for name in args.settings.split(","):
        bits, group, extra = SETTINGS[name]
        rows[name] = {
            "rtn": quantize("rtn", bits, group, [], work / f"rtn-{name}", args),
            "gptq": quantize("gptq", bits, group, extra, work / f"gptq-{name}", args),
        }
        r = rows[name]
        print(f"{name:16s} fp16 {fp16.ppl:7.3f}  RTN {r['rtn']['ppl']:8.3f}  GPTQ "
              f"{r['gptq']['ppl']:8.3f} ({r['gptq']['seconds']:.0f} s, peak RSS "
              f"{r['gptq']['peak_rss_bytes'] / 1e9:.2f} GB)", flush=True)
        save()

    if args.peer_python.is_file():
        tokenizer = data.load_tokenizer(base)
        calib = data.calibration_set(tokenizer, None, args.calib_samples, args.calib_seqlen, 0)
        ids = work / "calib_ids.pt"
        torch.save(calib.samples, ids)
        for name in args.peer_settings.split(","):
            bits, _, extra = SETTINGS[name]
            out, report = work / f"peer-{name}", work / f"peer-{name}.json"
            wall, rss = run_child([str(args.peer_python), str(HERE / "peer_gptq.py"),
                                   "--model", str(base), "--calib-ids", str(ids),
                                   "--scheme", f"w{bits}", "--out", str(out),
                                   "--actorder", "weight" if "--act-order" in extra else "none",
                                   "--json", str(report)])
            info = json.loads(report.read_text())
            ppl = api.evaluate_perplexity(out, max_tokens=args.eval_tokens).ppl
            ours = rows[name]["gptq"]
            peer[name] = {**info, "process_seconds": wall, "process_peak_rss_bytes": rss,
                          "ppl": ppl, "ours_over_peer_ppl": ours["ppl"] / ppl,
                          "ours_over_peer_seconds": ours["seconds"] / wall}
            print(f"peer {name:11s} llm-compressor GPTQ ppl {ppl:8.3f} in {wall:.0f} s -> "
                  f"ours/peer: ppl {ours['ppl'] / ppl:.3f}, time {ours['seconds'] / wall:.2f}",
                  flush=True)
            save()
    else:
        print(f"peer skipped: {args.peer_python} not found (see benchmarks/peer_gptq.py)")

    save()
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
