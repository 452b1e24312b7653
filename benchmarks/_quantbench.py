"""Shared by the quantiser benchmarks: ours and the peer run as child processes (timed, peak
RSS from wait4), on the same calibration token ids, and one harness scores every checkpoint."""

from __future__ import annotations

# Before torch loads OpenMP: idle threads sleep instead of spinning (compress/threads.py).
# Spinning made scoring beside a two-thread run 20x slower (13 min against 40 s).
import compress  # noqa: F401

# isort: split
import json
import sys
from pathlib import Path

import torch
from _child import run_measured

from compress import assets, data, evaluation, models

HERE = Path(__file__).parent
PEER_PYTHON = Path("/tmp/peer-venv/bin/python")  # see benchmarks/peer_llmcompressor.py
# The low-bit grid's settings (symmetric): name -> (bits, group size)
SETTINGS = {"w4g128": (4, 128), "w3g128": (3, 128), "w2g64": (2, 64)}


def run_child(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process; exits on failure."""
    code, seconds, rss, tail = run_measured(cmd)
    if code:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{tail}")
    return seconds, rss


def quantize_command(method: str, bits: int, group: int, extra: list[str], out: Path,
                     calib_samples: int, calib_seqlen: int,
                     model: str = assets.DEFAULT_MODEL) -> list[str]:
    """The `compress quantize` command line the benchmarks run (calibration flags only for
    the methods that calibrate)."""
    cmd = [sys.executable, "-m", "compress.cli", "quantize", model, "--method", method,
           "--bits", str(bits), "--group-size", str(group), "--out", str(out), "--overwrite",
           "--no-eval", "-q", *extra]
    if method != "rtn":
        cmd += ["--calib-samples", str(calib_samples), "--calib-seqlen", str(calib_seqlen)]
    return cmd


def quantize(method: str, bits: int, group: int, extra: list[str], out: Path,
             calib_samples: int, calib_seqlen: int, eval_tokens: int,
             model: str = assets.DEFAULT_MODEL) -> dict:
    """`compress quantize` in a child process, then perplexity of what it wrote."""
    seconds, rss = run_child(quantize_command(method, bits, group, extra, out, calib_samples,
                                              calib_seqlen, model))
    ppl = evaluation.evaluate_perplexity(out, max_tokens=eval_tokens)
    return {"seconds": seconds, "peak_rss_bytes": rss, "ppl": ppl.ppl}


def score(out: Path, eval_tokens: int, model: str = assets.DEFAULT_MODEL) -> dict:
    """`compress eval`'s harness on `out` against the bundled fp16 `model`: perplexity, KL
    (mean, p99) and top-1 agreement on the same held-out tokens."""
    report = evaluation.evaluate(out, assets.bundled_model_dir(model), max_tokens=eval_tokens)
    m = report.match
    return {"ppl": report.ppl.ppl, "kl_mean": m.kl_mean, "kl_p99": m.kl_p99,
            "top1_agreement": m.top1_agreement}


def calibration_ids(work: Path, samples: int, seqlen: int,
                    model: str = assets.DEFAULT_MODEL, sampled: int = 0,
                    threads: int = 1, seed: int = 0) -> Path:
    """Our calibration windows as token ids, for the peer to consume verbatim; with
    `sampled`, the windows `--calib-sampled` adds too, drawn as `compress quantize
    --threads` would draw them (their bytes depend on the thread count)."""
    base = assets.bundled_model_dir(model)
    calib = data.calibration_set(data.load_tokenizer(base), None, samples, seqlen, seed)
    if sampled:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            calib = data.with_sampled(calib, models.open_model(base), sampled, seed)
        finally:
            torch.set_num_threads(before)
    work.mkdir(parents=True, exist_ok=True)
    path = work / (f"calib_ids-seed{seed}" + (f"-sampled{sampled}" if sampled else "") + ".pt")
    torch.save(calib.samples, path)
    path.with_suffix(".sha256").write_text(calib.sha256)
    return path


def peer(method: str, bits: int, actorder: str, calib_ids: Path, work: Path, name: str,
         eval_tokens: int, peer_python: Path = PEER_PYTHON, model: str = assets.DEFAULT_MODEL,
         scheme: str | None = None) -> dict:
    """llm-compressor's modifier on the same model and ids, scored by our harness."""
    out, report = work / f"peer-{method}-{name}", work / f"peer-{method}-{name}.json"
    wall, rss = run_child([str(peer_python), str(HERE / "peer_llmcompressor.py"),
                           "--method", method, "--model", str(assets.bundled_model_dir(model)),
                           "--calib-ids", str(calib_ids), "--scheme", scheme or f"w{bits}",
                           "--out", str(out), "--actorder", actorder, "--json", str(report)])
    info = json.loads(report.read_text())
    ppl = evaluation.evaluate_perplexity(out, max_tokens=eval_tokens).ppl
    return {**info, "process_seconds": wall, "process_peak_rss_bytes": rss, "ppl": ppl}


def report_model(model: str) -> str:
    """How a report's header names the bundled model its figures were measured against."""
    return f"{model} (bundled)"


def write_report(path: Path, benchmark: str, args, fp16, model: str = assets.DEFAULT_MODEL,
                 **sections) -> None:
    """The benchmark's JSON: the shared protocol header, then its own sections."""
    report = {
        "benchmark": benchmark,
        "model": report_model(model),
        "threads": torch.get_num_threads(),
        "calibration": {"samples": args.calib_samples, "seqlen": args.calib_seqlen,
                        "seed": getattr(args, "calib_seed", 0),
                        "source": "bundled calibration split"},
        "perplexity_protocol": {"ctx": fp16.ctx, "windows": fp16.windows,
                                "tokens_scored": fp16.tokens},
        "fp16_ppl": fp16.ppl,
        **sections,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
