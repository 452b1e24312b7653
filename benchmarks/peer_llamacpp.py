"""Peer baseline: llama.cpp (via llama-cpp-python) CPU decode speed on SmolLM2-135M.

Needs its own virtual environment (never install llama-cpp-python into the system
Python). It was created with:

    python -m venv --system-site-packages /tmp/llama-venv   # reuses system torch/transformers
    CMAKE_BUILD_PARALLEL_LEVEL=1 nice -n 19 /tmp/llama-venv/bin/pip install -v \
        llama-cpp-python==0.3.36                            # builds llama.cpp from the sdist
    /tmp/llama-venv/bin/pip install sentencepiece           # imported by the HF->GGUF converter

llama-cpp-python 0.3.36 builds with the system cmake (3.25) and gcc (12.2), default CMake
flags (CPU backend, GGML_NATIVE, OpenMP). The `gguf` package is not needed: the converter
and this script use the gguf-py vendored next to convert_hf_to_gguf.py.

The converter is llama.cpp's own convert_hf_to_gguf.py, taken from the llama-cpp-python
sdist of the installed version (which vendors llama.cpp). If --llama-src does not hold it,
the script fetches and unpacks that sdist itself, equivalent to:

    /tmp/llama-venv/bin/pip download --no-deps --no-binary :all: \
        llama-cpp-python==0.3.36 -d /tmp/llsdist
    mkdir -p /tmp/llsrc && tar xzf /tmp/llsdist/llama_cpp_python-0.3.36.tar.gz -C /tmp/llsrc

Run (no Hugging Face hub access; does not import the `compress` package):

    nice -n 19 /tmp/llama-venv/bin/python benchmarks/peer_llamacpp.py --json /tmp/peer-llamacpp.json

What it does:
  1. Converts the HF model to GGUF F16 with convert_hf_to_gguf.py --outtype f16, then
     quantises that to Q8_0 and Q4_0 with the bindings' llama_cpp.llama_model_quantize
     (llama.cpp's standard recipe for those ftypes, i.e. what `llama-quantize` does; no
     imatrix). Files are cached in --cache-dir and reused when present. Note: SmolLM2 ties
     lm_head to token_embd, and llama.cpp's recipe keeps that tensor at higher precision
     (in the Q4_0 file it is Q8_0; the JSON lists each file's tensor types). The
     converter's "Unknown RoPE type: default" warning is harmless (rope theta is kept).
  2. For each GGUF: Llama(model_path, n_threads, n_threads_batch=n_threads, n_ctx=512),
     one short warm-up generation, then the fixed PROMPT (no BOS: the SmolLM2 GGUF has
     add_bos_token false, like the HF tokenizer) and exactly --new-tokens greedy tokens
     (temp 0, no repetition penalty; EOS is ignored, generation never stops early).
     decode_tok_s = (new_tokens - 1) / (time of last token - time of first token), i.e.
     prefill and first-token sampling are excluded; this wall-clock figure includes the
     Python binding's per-token overhead. engine_decode_tok_s is llama.cpp's own counter
     (llama_perf_context: n_eval / t_eval_ms) over the same single-token decodes.
  3. Prints a table and writes --json.

Run it on an otherwise idle machine: with --n-threads equal to the core count, any competing
process stalls llama.cpp's OpenMP thread barriers, and decode speed then swings wildly (on
the 2-core dev box with one core busy, single runs ranged from 0.3 to 150 tok/s). Use
--repeats N (median reported) for a steadier figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import llama_cpp

DEFAULT_MODEL = Path("/root/.cache/compress/models/smollm2-135m-0.1.2-fp16")
DEFAULT_CACHE = Path("/tmp/llamacpp-models")
DEFAULT_SDIST_DIR = Path("/tmp/llsdist")
DEFAULT_SRC_ROOT = Path("/tmp/llsrc")
PROMPT = "The history of the printing press begins in"
WARMUP_TOKENS = 8
# quant name -> llama_ftype (None: the converter's F16 output itself)
FTYPES: dict[str, int | None] = {
    "F16": None,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
}
SRC_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def default_llama_src() -> Path:
    version = llama_cpp.__version__
    return DEFAULT_SRC_ROOT / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def fetch_llama_src(dest: Path) -> None:
    """Unpack the converter (and its vendored gguf-py) from this version's sdist."""
    version = llama_cpp.__version__
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    expected = DEFAULT_SRC_ROOT / prefix
    if dest.resolve() != expected.resolve():
        raise SystemExit(f"{dest} has no convert_hf_to_gguf.py (auto-fetch only fills {expected})")
    sdist = DEFAULT_SDIST_DIR / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        print(f"fetching llama-cpp-python=={version} sdist into {DEFAULT_SDIST_DIR}", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={version}",
                "-d",
                str(DEFAULT_SDIST_DIR),
            ],
            check=True,
        )
    with tarfile.open(sdist) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(SRC_MEMBERS)
        ]
        tar.extractall(DEFAULT_SRC_ROOT, members=members, filter="data")


def convert_f16(model_dir: Path, out: Path, llama_src: Path) -> None:
    converter = llama_src / "convert_hf_to_gguf.py"
    tmp = out.with_suffix(".tmp")
    cmd = [
        sys.executable,
        str(converter),
        str(model_dir),
        "--outtype",
        "f16",
        "--outfile",
        str(tmp),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"convert_hf_to_gguf.py failed (rc={proc.returncode})")
    tmp.rename(out)


def quantize(src: Path, out: Path, ftype: int, n_threads: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {out}, ftype={ftype}) returned {rc}")
    tmp.rename(out)


def prepare_ggufs(
    model_dir: Path, cache: Path, quants: list[str], llama_src: Path, n_threads: int
) -> dict[str, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    f16 = cache / f"{model_dir.name}.F16.gguf"
    if not f16.exists():
        print(f"converting {model_dir} -> {f16}", flush=True)
        convert_f16(model_dir, f16, llama_src)
    paths: dict[str, Path] = {}
    for name in quants:
        ftype = FTYPES[name]
        if ftype is None:
            paths[name] = f16
            continue
        path = cache / f"{model_dir.name}.{name}.gguf"
        if not path.exists():
            print(f"quantising {f16.name} -> {path.name}", flush=True)
            quantize(f16, path, ftype, n_threads)
        paths[name] = path
    return paths


def tensor_types(path: Path, llama_src: Path) -> dict[str, int]:
    """Count of tensors per ggml type in a GGUF, read with the vendored gguf-py."""
    gguf_py = str(llama_src / "gguf-py")
    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    import gguf

    reader = gguf.GGUFReader(path)
    return dict(Counter(t.tensor_type.name for t in reader.tensors).most_common())


def generate(
    llm: llama_cpp.Llama, prompt_ids: list[int], n_new: int
) -> tuple[list[int], list[float], float]:
    """Greedy-generate exactly n_new tokens (EOS ignored); returns tokens, per-token
    timestamps and the start time (before prefill)."""
    llm.reset()
    tokens: list[int] = []
    stamps: list[float] = []
    gen = llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0, reset=True)
    t0 = time.perf_counter()
    try:
        for tok in gen:
            stamps.append(time.perf_counter())
            tokens.append(tok)
            if len(tokens) == n_new:
                break
    finally:
        gen.close()
    if len(tokens) != n_new:
        raise RuntimeError(f"generated {len(tokens)} tokens, expected {n_new}")
    return tokens, stamps, t0


def bench_one(
    path: Path, n_threads: int, n_ctx: int, n_new: int, repeats: int, flash_attn: bool
) -> dict[str, Any]:
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_threads=n_threads,
        n_threads_batch=n_threads,
        n_ctx=n_ctx,
        flash_attn=flash_attn,
        verbose=False,
    )
    prompt_ids = llm.tokenize(PROMPT.encode(), add_bos=True)  # BOS only if the GGUF asks
    if len(prompt_ids) + n_new > n_ctx:
        raise SystemExit(f"prompt ({len(prompt_ids)}) + new tokens ({n_new}) > n_ctx ({n_ctx})")
    generate(llm, prompt_ids, min(WARMUP_TOKENS, n_new))  # warm-up

    runs: list[dict[str, float]] = []
    tokens: list[int] = []
    for _ in range(repeats):
        llama_cpp.llama_perf_context_reset(llm.ctx)
        tokens, stamps, t0 = generate(llm, prompt_ids, n_new)
        perf = llama_cpp.llama_perf_context(llm.ctx)
        decode_s = stamps[-1] - stamps[0]
        runs.append(
            {
                "decode_tok_s": (n_new - 1) / decode_s,
                "prefill_ms": (stamps[0] - t0) * 1e3,
                "engine_decode_tok_s": (
                    perf.n_eval / perf.t_eval_ms * 1e3 if perf.t_eval_ms > 0 else float("nan")
                ),
                "engine_n_eval": perf.n_eval,
            }
        )
    text = llm.detokenize(tokens).decode("utf-8", errors="replace")
    eos = llm.token_eos()
    del llm
    return {
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
        "engine_decode_tok_s": statistics.median(r["engine_decode_tok_s"] for r in runs),
        "prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
        "file_bytes": path.stat().st_size,
        "prompt_tokens": len(prompt_ids),
        "eos_in_output": tokens.count(eos),
        "runs": runs,
        "sample_text": text[:200],
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="llama.cpp decode-speed peer benchmark")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF model directory")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="GGUF cache")
    p.add_argument(
        "--llama-src",
        type=Path,
        default=None,
        help="llama.cpp tree holding convert_hf_to_gguf.py "
        "(default: unpacked sdist of the installed llama-cpp-python)",
    )
    p.add_argument(
        "--quants", default="Q4_0,Q8_0,F16", help=f"comma-separated subset of {','.join(FTYPES)}"
    )
    p.add_argument("--n-threads", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per GGUF (median reported)")
    p.add_argument(
        "--flash-attn",
        action="store_true",
        help="enable flash attention (llama-cpp-python's default is off)",
    )
    p.add_argument("--json", type=Path, default=None, help="write results here")
    args = p.parse_args()
    args.quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    unknown = [q for q in args.quants if q not in FTYPES]
    if unknown:
        p.error(f"unknown quant(s) {unknown}; choose from {list(FTYPES)}")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode time spans first to last token)")
    return args


def main() -> None:
    args = parse_args()
    llama_src: Path = args.llama_src or default_llama_src()
    if not (llama_src / "convert_hf_to_gguf.py").exists():
        fetch_llama_src(llama_src)
    if not (args.model / "config.json").exists():
        raise SystemExit(f"no HF model at {args.model}")

    paths = prepare_ggufs(args.model, args.cache_dir, args.quants, llama_src, args.n_threads)
    results: dict[str, dict[str, Any]] = {}
    for name, path in paths.items():
        print(f"benchmarking {name} ({path.name})", flush=True)
        res = bench_one(
            path, args.n_threads, args.n_ctx, args.new_tokens, args.repeats, args.flash_attn
        )
        res["tensor_types"] = tensor_types(path, llama_src)
        res["path"] = str(path)
        results[name] = res

    print(
        f"\nllama-cpp-python {llama_cpp.__version__}, n_threads={args.n_threads}, "
        f"new_tokens={args.new_tokens}, repeats={args.repeats}"
    )
    print(f"{'quant':<6} {'MiB':>8} {'prefill ms':>11} {'decode tok/s':>13} {'engine tok/s':>13}")
    for name, r in results.items():
        print(
            f"{name:<6} {r['file_bytes'] / 2**20:>8.1f} {r['prefill_ms']:>11.1f} "
            f"{r['decode_tok_s']:>13.1f} {r['engine_decode_tok_s']:>13.1f}"
        )

    if args.json is not None:
        out = {
            "llama_cpp_version": llama_cpp.__version__,
            "n_threads": args.n_threads,
            "new_tokens": args.new_tokens,
            "n_ctx": args.n_ctx,
            "repeats": args.repeats,
            "flash_attn": args.flash_attn,
            "prompt": PROMPT,
            "model": str(args.model),
            "converter": str(llama_src / "convert_hf_to_gguf.py") + " --outtype f16",
            "quantizer": "llama_cpp.llama_model_quantize (default params, no imatrix)",
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
