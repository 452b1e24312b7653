"""Issue 21's grid on the bundled model: our methods and llm-compressor's at 4, 3 and 2 bits,
scored by KL (mean, p99), top-1 agreement and perplexity against the unquantised model.

    python benchmarks/lowbit.py --cells w4g128:awq,w4g128:awq+gptq,w3g128:llmc-gptq,...
                                [--calib-samples 32] [--calib-seqlen 512]
                                [--eval-tokens 8192] [--merge] [--json PATH]

A cell is SETTING:METHOD. Settings (symmetric): w4g128, w3g128, w2g64; SmolLM2's 576-wide
projections take group 64 where 128 is asked, on both sides (ours falls back, the peer's
"w4"/"w3" layout says so). Methods: ours, rtn, gptq, awq, awq+gptq, signround, each
optionally with "+model" or "+layer" (`--match`) and "+rotate" (`--rotate`); the peer's llmc-gptq
(GPTQModifier, act-order "weight" = our static act-order), llmc-awq (AWQModifier then its
RTN) and llmc-rtn (its RTN alone), run in /tmp/peer-venv by
benchmarks/peer_llmcompressor.py. Every quantisation is a timed child process on the
same seed-0 calibration token ids; every checkpoint is scored by `compress eval`'s harness
on the same held-out tokens. The shortened protocol of benchmarks/rotate.py (32 × 512
calibration, 8,192 tokens) by default, so its figures sit beside rotate.json's,
signround.json's and auto-round's (benchmarks/lowbit_peers.py, autoround.json).
--merge keeps the cells already in --json (same protocol, checked) and adds these: the
grid can be filled over several runs; each cell's time is its own run's.
Writes benchmarks/results/lowbit.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _quantbench import (
    HERE,
    PEER_PYTHON,
    calibration_ids,
    quantize_command,
    run_child,
    score,
    write_report,
)

from compress import assets, evaluation
from compress.progress import set_quiet

SETTINGS = {"w4g128": (4, 128), "w3g128": (3, 128), "w2g64": (2, 64)}
OURS = ("rtn", "gptq", "awq", "awq+gptq", "signround")
PEERS = {"llmc-gptq": ("gptq", "weight"), "llmc-awq": ("awq", "none"),
         "llmc-rtn": ("rtn", "none")}
PEER_SCHEMES = {"w4g128": "w4", "w3g128": "w3", "w2g64": "w2g64"}


# suffixes of our methods: "gptq+model+rotate" is `--method gptq --match model --rotate`
MODIFIERS = {"rotate": ["--rotate"], "model": ["--match", "model"],
             "layer": ["--match", "layer"]}


def split_method(method: str) -> tuple[str, list[str]]:
    """Our method and the flags its suffixes add."""
    base, extra = method, []
    while (suffix := base.rpartition("+")[2]) in MODIFIERS and base != suffix:
        base, extra = base.rpartition("+")[0], MODIFIERS[suffix] + extra
    return base, extra


def ours(setting: str, method: str, work: Path, args) -> dict:
    bits, group = SETTINGS[setting]
    base, extra = split_method(method)
    if base == "signround":
        extra += ["--signround-iters", str(args.signround_iters),
                  "--signround-batch", str(args.signround_batch)]
    out = work / f"{method.replace('+', '-')}-{setting}"
    seconds, rss = run_child(quantize_command(base, bits, group, extra, out,
                                              args.calib_samples, args.calib_seqlen))
    manifest = json.loads((out / "compress_manifest.json").read_text())
    return {"seconds": seconds, "peak_rss_bytes": rss, **score(out, args.eval_tokens),
            "calibration_sha256": (manifest.get("calibration") or {}).get("tokens_sha256")}


def peer(setting: str, name: str, ids: Path, work: Path, args) -> dict:
    method, actorder = PEERS[name]
    out, report = work / f"{name}-{setting}", work / f"{name}-{setting}.json"
    seconds, rss = run_child([str(args.peer_python), str(HERE / "peer_llmcompressor.py"),
                              "--method", method, "--model", str(assets.bundled_model_dir()),
                              "--calib-ids", str(ids), "--scheme", PEER_SCHEMES[setting],
                              "--actorder", actorder, "--threads", str(args.threads),
                              "--out", str(out), "--json", str(report)])
    info = json.loads(report.read_text())
    return {"seconds": seconds, "peak_rss_bytes": rss, **score(out, args.eval_tokens),
            "peer": info["peer"], "versions": info["versions"],
            "calib_ids_sha256": info.get("calib_ids_sha256")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", required=True, help="SETTING:METHOD,...")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--signround-iters", type=int, default=200)
    parser.add_argument("--signround-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="the peer's torch threads")
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "lowbit.json")
    args = parser.parse_args()
    set_quiet(True)
    cells = [tuple(c.split(":", 1)) for c in args.cells.split(",")]
    for setting, method in cells:
        known = method in PEERS or split_method(method)[0] in OURS
        if setting not in SETTINGS or not known:
            raise SystemExit(f"unknown cell {setting}:{method}; settings {', '.join(SETTINGS)}"
                             f", methods {', '.join(OURS)} (+{', +'.join(MODIFIERS)}), "
                             f"{', '.join(PEERS)}")

    fp16 = evaluation.evaluate_perplexity(assets.bundled_model_dir(), max_tokens=args.eval_tokens)
    def merged() -> dict:
        """The cells already in --json (re-read before every write: two runs may fill one
        grid side by side)."""
        if not (args.merge and args.json.is_file()):
            return {}
        before = json.loads(args.json.read_text())
        same = (before["calibration"]["samples"], before["calibration"]["seqlen"],
                before["perplexity_protocol"]["tokens_scored"])
        if same != (args.calib_samples, args.calib_seqlen, fp16.tokens):
            raise SystemExit(f"{args.json} was measured on another protocol {same}")
        return before["settings"]

    merged()  # refuse another protocol before any work
    rows: dict = {}
    work = Path(tempfile.mkdtemp(prefix="compress-lowbit-"))
    ids = calibration_ids(work, args.calib_samples, args.calib_seqlen)
    for setting, method in cells:
        r = rows.setdefault(setting, {})[method] = (
            peer(setting, method, ids, work, args) if method in PEERS
            else ours(setting, method, work, args))
        print(f"{setting} {method:14s} KL {r['kl_mean']:.4f} (p99 {r['kl_p99']:.3f})  top-1 "
              f"{r['top1_agreement']:.2%}  ppl {r['ppl']:8.3f}  {r['seconds']:5.0f} s",
              flush=True)
        grid = merged()
        for name, done in rows.items():
            grid.setdefault(name, {}).update(done)
        write_report(args.json, "lowbit", args, fp16, settings=grid)
    print(f"fp16 ppl {fp16.ppl:.3f}; wrote {args.json}")


if __name__ == "__main__":
    main()
