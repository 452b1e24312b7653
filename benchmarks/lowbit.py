"""Issue 21's grid: our methods, llm-compressor's and Intel's auto-round at 4, 3 and 2 bits,
scored by KL (mean, p99), top-1 agreement and perplexity against the unquantised model.

    python benchmarks/lowbit.py --cells w4g128:gptq,w3g128:gptq+rotate,w2g64:autoround,...
                                [--model smollm2-135m | gemma3-270m]
                                [--calib-samples 32] [--calib-seqlen 512]
                                [--eval-tokens 8192] [--autoround-iters 25] [--merge]

A cell is SETTING:METHOD. Settings (symmetric): w4g128, w3g128, w2g64; SmolLM2's
576-wide projections take group 64 where 128 is asked (ours falls back, llm-compressor's
"w4"/"w3" layout says so; auto-round zero-pads them to 640 and keeps 128);
Gemma-3-270M's 640 and 1024 take 128 everywhere. Methods: ours, rtn, gptq, awq,
awq+gptq, signround, each optionally with "+model" or "+layer" (`--match`), "+mse"
(`--mse-clip`), "+fromgptq" (`--signround-start gptq`), "+adam" (`--signround-optimizer
adam`), "+rotate" (`--rotate`) and "+sampled96" (`--calib-sampled 96`: 96 windows
sampled from the model beside the 32 of text, the tuning's too), and last "+tune"
(`compress tune` on the result, --tune-epochs; the cell's time is both commands'); the
peers: llmc-gptq (GPTQModifier, act-order "weight" = our static act-order), llmc-awq
(AWQModifier then its RTN), llmc-rtn (its RTN alone), run by
benchmarks/peer_llmcompressor.py, and autoround (SignRound, --autoround-iters steps of
--autoround-batch windows per layer; 0 = its plain RTN) by benchmarks/peer_autoround.py,
both in /tmp/peer-venv; a peer's "+sampled96" feeds it the same 32 + 96 windows as ours
(the 96 drawn as `compress quantize --calib-sampled 96 --threads` draws them); auto-round
at other than 25 x 4 is kept as "autoround (ITERS x BATCH)" beside the 25 x 4 cell. Every
quantisation is a timed child process on the same calibration token ids (seed 0, or
--calib-seed: a second draw of the windows, text and sampled, to see the spread); every
checkpoint (a peer's too) is scored by `compress eval`'s
harness on the same held-out tokens. The shortened protocol of benchmarks/rotate.py (32
x 512 calibration, 8,192 tokens) by default.
--merge keeps the cells (and other sections) already in --json (same protocol, checked)
and adds these: the grid can be filled over several runs, two side by side; each cell's
time is its own run's.
Writes benchmarks/results/lowbit.json (lowbit-gemma3-270m.json for Gemma, -seedN added
for another calibration seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _quantbench import (
    HERE,
    PEER_PYTHON,
    SETTINGS,
    calibration_ids,
    quantize_command,
    run_child,
    score,
    write_report,
)

from compress import assets, evaluation
from compress.progress import set_quiet

OURS = ("rtn", "gptq", "awq", "awq+gptq", "signround")
LLMC = {"llmc-gptq": ("gptq", "weight"), "llmc-awq": ("awq", "none"),
        "llmc-rtn": ("rtn", "none")}
PEERS = (*LLMC, "autoround")
HEADER = ("benchmark", "model", "threads", "calibration", "perplexity_protocol", "fp16_ppl")
PEER_SCHEMES = {"w4g128": "w4", "w3g128": "w3", "w2g64": "w2g64"}


# suffixes of our methods: "gptq+model+rotate" is `--method gptq --match model --rotate`
MODIFIERS = {"rotate": ["--rotate"], "model": ["--match", "model"],
             "layer": ["--match", "layer"], "mse": ["--mse-clip"],
             "fromgptq": ["--signround-start", "gptq"],
             "adam": ["--signround-optimizer", "adam"],
             "s25": ["--match-strength", "0.25"],
             "sampled96": ["--calib-sampled", "96"]}


def split_method(method: str) -> tuple[str, list[str]]:
    """Our method and the flags its suffixes add."""
    base, extra = method, []
    while (suffix := base.rpartition("+")[2]) in MODIFIERS and base != suffix:
        base, extra = base.rpartition("+")[0], MODIFIERS[suffix] + extra
    return base, extra


def split_tune(method: str) -> tuple[str, bool]:
    """A trailing "+tune": `compress tune` (end-to-end scale tuning, --tune-epochs) runs on
    the checkpoint afterwards, its time added to the cell's."""
    tuned = method.endswith("+tune")
    return (method.removesuffix("+tune"), tuned)


PEER_SUFFIXES = {"": 0, "sampled96": 96}  # a peer's suffix -> sampled windows beside the text


def split_peer(method: str) -> tuple[str, int | None]:
    """A peer and how many sampled windows it gets beside the text ("autoround+sampled96"
    is auto-round on our 32 + 96 windows); None for a suffix peers do not take."""
    name, _, suffix = method.partition("+")
    return name, PEER_SUFFIXES.get(suffix)


def is_peer(method: str) -> bool:
    name, sampled = split_peer(method)
    return name in PEERS and sampled is not None


def cell_name(method: str, args) -> str:
    """The grid's key: auto-round at other than 25 steps of 4 windows names its steps, so
    that it sits beside the 25 x 4 cell instead of replacing it."""
    if split_peer(method)[0] == "autoround" and (args.autoround_iters,
                                                  args.autoround_batch) != (25, 4):
        return f"{method} ({args.autoround_iters} x {args.autoround_batch})"
    return method


def ours(setting: str, method: str, work: Path, args) -> dict:
    bits, group = SETTINGS[setting]
    quantized_method, tuned = split_tune(method)
    base, extra = split_method(quantized_method)
    # a fixed thread count: at 2 bits another one changes the result by up to ~10%
    extra = [*extra, "--threads", str(args.threads), "--seed", str(args.calib_seed)]
    if base == "signround":
        extra += ["--signround-iters", str(args.signround_iters),
                  "--signround-batch", str(args.signround_batch)]
    out = work / f"{method.replace('+', '-')}-{setting}"
    seconds, rss = run_child(quantize_command(base, bits, group, extra, out,
                                              args.calib_samples, args.calib_seqlen,
                                              args.model))
    manifest = json.loads((out / "compress_manifest.json").read_text())
    cell = {"calibration_sha256": (manifest.get("calibration") or {}).get("tokens_sha256"),
            "threads": args.threads}
    if tuned:
        cell["before_tuning"] = {"seconds": seconds, **score(out, args.eval_tokens, args.model)}
        tuned_out = out.with_name(out.name + "-tuned")
        tune_seconds, tune_rss = run_child([
            sys.executable, "-m", "compress.cli", "tune", str(out), "--out", str(tuned_out),
            "--epochs", str(args.tune_epochs), "--threads", str(args.threads), "--overwrite",
            "-q"])
        cell["tuning"] = {"seconds": tune_seconds, "peak_rss_bytes": tune_rss,
                          **json.loads((tuned_out / "scale_tuning.json").read_text())}
        seconds, rss, out = seconds + tune_seconds, max(rss, tune_rss), tuned_out
    return {"seconds": seconds, "peak_rss_bytes": rss,
            **score(out, args.eval_tokens, args.model), **cell}


def peer(setting: str, method: str, ids: Path, work: Path, args) -> dict:
    name = split_peer(method)[0]
    out = work / f"{method.replace('+', '-')}-{setting}"
    report = out.with_suffix(".json")
    model = str(assets.bundled_model_dir(args.model))
    if name == "autoround":
        bits, group = SETTINGS[setting]
        cmd = [str(HERE / "peer_autoround.py"), "--bits", str(bits), "--group-size",
               str(group), "--iters", str(args.autoround_iters), "--batch-size",
               str(args.autoround_batch)]
    else:
        method, actorder = LLMC[name]
        scheme = PEER_SCHEMES[setting] if args.model == assets.DEFAULT_MODEL else setting
        cmd = [str(HERE / "peer_llmcompressor.py"), "--method", method, "--scheme", scheme,
               "--actorder", actorder]
    seconds, rss = run_child([str(args.peer_python), *cmd, "--model", model, "--calib-ids",
                              str(ids), "--threads", str(args.threads), "--out", str(out),
                              "--json", str(report)])
    info = json.loads(report.read_text())
    for key in ("quantised_modules", "group_checks_sample", "out", "calib_ids"):
        info.pop(key, None)  # auto-round's long listings: the peer's own JSON has them
    return {"seconds": seconds, "peak_rss_bytes": rss,
            **score(out, args.eval_tokens, args.model), **info,
            "calibration_sha256": ids.with_suffix(".sha256").read_text()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", required=True, help="SETTING:METHOD,...")
    parser.add_argument("--model", default=assets.DEFAULT_MODEL,
                        choices=[assets.DEFAULT_MODEL, assets.GEMMA3_MODEL])
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--calib-seed", type=int, default=0,
                        help="which calibration windows, ours and the peers' alike")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--signround-iters", type=int, default=200)
    parser.add_argument("--signround-batch", type=int, default=8)
    parser.add_argument("--autoround-iters", type=int, default=25)
    parser.add_argument("--autoround-batch", type=int, default=4)
    parser.add_argument("--tune-epochs", type=int, default=2, help="+tune: compress tune's")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, ours (--threads) and the peer's")
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--json", type=Path, help="default: results/lowbit.json, "
                        "lowbit-MODEL.json for a model other than the default, -seedN added "
                        "for a calibration seed other than 0")
    args = parser.parse_args()
    if args.json is None:
        name = "" if args.model == assets.DEFAULT_MODEL else f"-{args.model}"
        name += f"-seed{args.calib_seed}" if args.calib_seed else ""
        args.json = HERE / "results" / f"lowbit{name}.json"
    set_quiet(True)
    cells = [tuple(c.split(":", 1)) for c in args.cells.split(",")]
    for setting, method in cells:
        known = is_peer(method) or split_method(split_tune(method)[0])[0] in OURS
        if setting not in SETTINGS or not known:
            raise SystemExit(f"unknown cell {setting}:{method}; settings {', '.join(SETTINGS)}"
                             f", methods {', '.join(OURS)} (+{', +'.join(MODIFIERS)}), "
                             f"{', '.join(PEERS)} (+sampled96)")

    fp16 = evaluation.evaluate_perplexity(assets.bundled_model_dir(args.model),
                                          max_tokens=args.eval_tokens)

    def merged() -> dict:
        """What --json already holds (re-read before every write: two runs may fill one
        grid side by side)."""
        if not (args.merge and args.json.is_file()):
            return {"settings": {}}
        before = json.loads(args.json.read_text())
        calib = before["calibration"]
        same = (calib["samples"], calib["seqlen"], calib.get("seed", 0),  # older: seed 0
                before["perplexity_protocol"]["tokens_scored"])
        if same != (args.calib_samples, args.calib_seqlen, args.calib_seed, fp16.tokens):
            raise SystemExit(f"{args.json} was measured on another protocol {same}")
        return before

    merged()  # refuse another protocol before any work
    rows: dict = {}
    work = Path(tempfile.mkdtemp(prefix="compress-lowbit-"))
    ids: dict[int, Path] = {}  # sampled windows -> the peers' token ids, made once each

    def peer_ids(method: str) -> Path:
        sampled = split_peer(method)[1]
        if sampled not in ids:
            ids[sampled] = calibration_ids(work, args.calib_samples, args.calib_seqlen,
                                           args.model, sampled, args.threads,
                                           args.calib_seed)
        return ids[sampled]

    for setting, method in cells:
        r = rows.setdefault(setting, {})[cell_name(method, args)] = (
            peer(setting, method, peer_ids(method), work, args) if is_peer(method)
            else ours(setting, method, work, args))
        print(f"{setting} {method:14s} KL {r['kl_mean']:.4f} (p99 {r['kl_p99']:.3f})  top-1 "
              f"{r['top1_agreement']:.2%}  ppl {r['ppl']:8.3f}  {r['seconds']:5.0f} s",
              flush=True)
        before = merged()
        grid = before.pop("settings")
        for name, done in rows.items():
            grid.setdefault(name, {}).update(done)
        kept = {k: v for k, v in before.items() if k not in HEADER}
        kept.update(signround={"iters": args.signround_iters, "batch": args.signround_batch}
                    if any(m.startswith("signround") for _, m in cells)
                    else kept.get("signround", {}))
        write_report(args.json, "lowbit", args, fp16, args.model, settings=grid, **kept)
    print(f"fp16 ppl {fp16.ppl:.3f}; wrote {args.json}")


if __name__ == "__main__":
    main()
