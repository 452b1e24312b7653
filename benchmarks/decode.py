"""Decode speed of packed checkpoints on CPU, against fp32 transformers, the DRAM roofline
and llama.cpp, in one run.

    python benchmarks/decode.py [--new-tokens 128] [--rounds 5]
                                [--json benchmarks/results/decode.json]
                                [--llama-python /tmp/llama-venv/bin/python | --no-llama-cpp]

Batch 1, greedy, prefill excluded. The bundled model is quantised with RTN (the
kernels' speed does not depend on how the codes were chosen) to W4 g128, W4 g128 with
the output head at W8 (llama.cpp Q4_0's split), and W8 per-channel; each runs through
the dispatcher's default CPU path (our kernel), eager, with `--compile` (torch.compile)
and with `--aot` (compiled ahead of time, compress.aot), and INT4 also through torch's
int4 op (the fallback, `COMPRESS_NATIVE=0`).

This VM's speed drifts by up to 2x within minutes (its DRAM bandwidth was seen at 33 to
82 GB/s), so every contender, llama.cpp included, is timed once per round over
`--rounds` interleaved rounds, and the median is reported (all samples are in the JSON).
The roofline is the bytes one decode step must read (every prepared packed weight, the
output head, the KV cache at the run's mean length) over the DRAM read bandwidth, sampled
every round (the highest sample is used, see _speed.BandwidthLog; the "same round" share
divides each round's speed by that round's own sample instead). llama.cpp runs in its
own venv (see peer_llamacpp.py) with the same thread count. Run on an idle machine.

Each round also times a "read-only step" per quantised model: the same tensors a decode
step reads, in the same order and pieces, each read once by a streaming reduction with no
arithmetic. That is the ceiling of any kernel keeping this model's call structure (one
call per Linear, torch's per-call overhead included) on this machine, and it says how
much of the roofline is within reach at all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _quantbench import report_model
from _speed import BandwidthLog, payload_tensors, read_seconds
from compress.kernels import native
from foundation import PROMPT

import compress
from compress import assets, data, models, pipeline
from compress.nn import QuantLinear, SharedInputLinears
from compress.progress import set_quiet
from compress.quant import QuantScheme
from compress.recipe import Recipe
from compress.serving import generation

HERE = Path(__file__).parent
LLAMA_PYTHON = Path("/tmp/llama-venv/bin/python")
RECIPES = {
    "int4": Recipe("rtn", QuantScheme(4, 128, True)),
    # the same INT4 layers with the tied output head at INT8 per channel, as llama.cpp's
    # Q4_0 file stores it (recipes/w4g128-head8-rtn.yaml)
    "int4_head8": Recipe.from_yaml(HERE.parent / "recipes" / "w4g128-head8-rtn.yaml"),
    "int8": Recipe("rtn", QuantScheme(8, -1, True)),
}


def step_tensors(model: models.CausalLM, context: int) -> dict[str, list[torch.Tensor]]:
    """What one decode step reads, by part, in call order (after a forward has prepared the
    kernels): every prepared packed weight (a fused q/k/v or gate/up once) and dense
    Linear, the tied output head, the norms, and a KV cache `context` positions long."""
    fused = {}
    members = set()
    for module in model.modules():
        for shared in vars(module).values():
            if isinstance(shared, SharedInputLinears) and shared._kernel is not None:
                fused[shared._members[0]] = shared._kernel
                members.update(shared._members)
    weights = []
    for module in model.modules():
        if module in fused:
            weights += payload_tensors(fused[module].payload)
        elif isinstance(module, QuantLinear) and module not in members:
            weights += payload_tensors(module.kernel(model.device).payload)
        elif isinstance(module, torch.nn.Linear):
            weights.append(module.weight)
    head = [model.model.embed_tokens.weight] if model.lm_head is None else []
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    cache = model.new_cache(1, context)
    return {"packed_and_dense_linears": weights, "output_head": head, "norms": norms,
            "kv_cache": [*cache.k, *cache.v]}


def step_bytes(parts: dict[str, list[torch.Tensor]]) -> dict:
    """Bytes read by one decode step, by part, and in total."""
    sizes = {part: sum(t.nbytes for t in tensors) for part, tensors in parts.items()}
    return {**sizes, "total": sum(sizes.values())}


def byte_kind(contender: str) -> str:
    """The bytes_per_token entry a contender reads ("int4_compiled" -> "int4")."""
    if contender in ("transformers_fp32", "compress_fp32"):
        return "fp32"
    for suffix in ("_compiled", "_aot", "_read_only"):
        contender = contender.removesuffix(suffix)
    return contender


def read_only(parts: dict[str, list[torch.Tensor]]) -> Callable[[], float]:
    """Steps/s of a "decode step" that only reads what a real one reads, in the same
    order and pieces (one reduction per tensor, no arithmetic, nothing else): the ceiling
    of any kernel that keeps this model's call structure on this machine."""
    tensors = [t for part in parts.values() for t in part]
    return lambda: 1.0 / read_seconds(tensors)


def llama_cpp_round(python: Path, new_tokens: int, work: Path) -> dict | None:
    """One timed llama.cpp generation per quant (its GGUF files are cached after the
    first round)."""
    out = work / "llama.json"
    cmd = [str(python), str(HERE / "peer_llamacpp.py"), "--json", str(out),
           "--new-tokens", str(new_tokens), "--n-threads", str(torch.get_num_threads()),
           "--repeats", "1", "--quants", "Q4_0,Q8_0"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"llama.cpp failed: {result.stderr[-2000:]}")
        return None
    return json.loads(out.read_text())


def ours(model: models.CausalLM, prompt: list[int], new_tokens: int,
         compile: bool = False, aot: bool = False) -> Callable[[], float]:
    """One timed generation: decode tokens/s after the prefill's first token."""
    params = generation.SamplingParams(max_new_tokens=new_tokens)

    def run() -> float:
        gen = generation.generate(model, prompt, params, compile=compile, aot=aot)
        next(gen)
        start = time.perf_counter()
        steps = sum(1 for _ in gen)
        return steps / (time.perf_counter() - start)
    return run


def transformers_fp32(path: Path, prompt: list[int], new_tokens: int) -> Callable[[], float]:
    """One timed `generate`, fp32, greedy, with a one-token generate's time subtracted."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    @torch.inference_mode()
    def run() -> float:
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             **kwargs)
        return (out.shape[1] - len(prompt) - 1) / (time.perf_counter() - start - prefill)
    return run


def prepared(path: Path, prompt: list[int], use_native: bool = True) -> models.CausalLM:
    """A loaded model whose kernels are prepared (for `use_native=False`, on torch's ops:
    a kernel keeps the implementation it was prepared with)."""
    model, _ = models.load(path)
    if not use_native:
        os.environ[native.ENV] = "0"
    try:
        with torch.inference_mode():
            model(torch.tensor([prompt]))
    finally:
        os.environ.pop(native.ENV, None)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "decode.json")
    parser.add_argument("--llama-python", type=Path, default=LLAMA_PYTHON)
    parser.add_argument("--no-llama-cpp", action="store_true")
    args = parser.parse_args()
    set_quiet(True)
    os.environ.pop("COMPRESS_KERNEL", None)
    os.environ.pop(native.ENV, None)

    base = assets.bundled_model_dir()
    prompt = data.load_tokenizer(base)(PROMPT).input_ids
    context = len(prompt) + args.new_tokens // 2
    bandwidth = BandwidthLog()
    with_llama = not args.no_llama_cpp and args.llama_python.exists()
    if not args.no_llama_cpp and not with_llama:
        print(f"llama.cpp skipped: {args.llama_python} not found (see peer_llamacpp.py)")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, recipe in RECIPES.items():
            pipeline.quantize(base, recipe, work / name)
        models.prepare_cpu_kernel()
        dense = prepared(base, prompt)
        packed = {name: prepared(work / name, prompt) for name in RECIPES}
        torch_ops = prepared(work / "int4", prompt, use_native=False)
        parts = {"fp32": step_tensors(dense, context),
                 "int4_torch_ops": step_tensors(torch_ops, context),
                 **{n: step_tensors(m, context) for n, m in packed.items()}}
        bytes_per_token = {name: step_bytes(p) for name, p in parts.items()}
        contenders = {"transformers_fp32": transformers_fp32(base, prompt, args.new_tokens),
                      "compress_fp32": ours(dense, prompt, args.new_tokens),
                      "int4_torch_ops": ours(torch_ops, prompt, args.new_tokens)}
        compile_seconds = {}
        for name, model in packed.items():
            contenders[name] = ours(model, prompt, args.new_tokens)
            compiled = ours(model, prompt, args.new_tokens, compile=True)
            start = time.perf_counter()
            compiled()  # compiles (inductor's disk cache makes later runs of this quicker)
            compile_seconds[name] = time.perf_counter() - start
            contenders[f"{name}_compiled"] = compiled
            ahead = ours(model, prompt, args.new_tokens, aot=True)
            start = time.perf_counter()
            ahead()  # compiles (once per process and cache length)
            compile_seconds[f"{name}_aot"] = time.perf_counter() - start
            contenders[f"{name}_aot"] = ahead
        for name in ("int4", "int4_head8", "int8"):
            contenders[f"{name}_read_only"] = read_only(parts[name])

        samples: dict[str, list[float]] = {name: [] for name in contenders}
        peer_rounds = []
        round_reads = []
        for r in range(args.rounds):
            read = bandwidth.sample()["read_gb_s"]
            round_reads.append(read)
            for name, run in contenders.items():
                samples[name].append(run())
            if with_llama:
                peer = llama_cpp_round(args.llama_python, args.new_tokens, work)
                if peer:
                    peer_rounds.append(peer)
                    for quant, res in peer["results"].items():
                        samples.setdefault(f"llama_cpp_{quant}", []).append(
                            res["decode_tok_s"])
            print(f"round {r + 1}/{args.rounds} (DRAM read {read:.1f} GB/s): "
                  + ", ".join(f"{n} {v[-1]:.1f}" for n, v in samples.items()), flush=True)
        bandwidth.sample()

    speeds = {name: statistics.median(v) for name, v in samples.items()}
    read = bandwidth.peak_read_gb_s * 1e9
    roofline = {k: read / v["total"] for k, v in bytes_per_token.items()}
    # The same share against each round's own bandwidth sample (median over rounds): the
    # peak sample above is what the VM can do at its best, this is what it did then.
    same_round = {name: statistics.median(
        tok_s * bytes_per_token[byte_kind(name)]["total"] / (gb_s * 1e9)
        for tok_s, gb_s in zip(v, round_reads, strict=True))
        for name, v in samples.items() if byte_kind(name) in bytes_per_token}
    hf = speeds["transformers_fp32"]
    report = {
        "benchmark": "decode", "model": report_model(assets.DEFAULT_MODEL),
        "compress_version": compress.__version__, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "batch": 1, "new_tokens": args.new_tokens,
        "prompt_tokens": len(prompt), "bandwidth": bandwidth.to_dict(),
        "cpu_kernel": ("ours, " + native.isa()
                       + (", OpenMP threads" if native.threaded() else ", one thread")),
        "rounds": args.rounds, "statistic": "median over interleaved rounds",
        "decode_tok_s": speeds, "decode_tok_s_samples": samples,
        "bytes_per_token": bytes_per_token, "roofline_tok_s": roofline,
        "round_read_gb_s": round_reads, "of_roofline_same_round": same_round,
        "compile_seconds": compile_seconds,  # the first compiled generation, compile included
        "int4_over_fp32": speeds["int4"] / hf,
        "int8_over_fp32": speeds["int8"] / hf,
        "int4_head8_over_fp32": speeds["int4_head8"] / hf,
        "int4_compiled_over_fp32": speeds["int4_compiled"] / hf,
        "int4_aot_over_fp32": speeds["int4_aot"] / hf,
        "int8_compiled_over_fp32": speeds["int8_compiled"] / hf,
        "int4_of_roofline": speeds["int4"] / roofline["int4"],
        "int8_of_roofline": speeds["int8"] / roofline["int8"],
        "int4_compiled_of_roofline": speeds["int4_compiled"] / roofline["int4"],
        "int8_compiled_of_roofline": speeds["int8_compiled"] / roofline["int8"],
        **{f"{k}_aot_of_roofline": speeds[f"{k}_aot"] / roofline[k]
           for k in ("int4", "int4_head8", "int8")},
        "int4_aot_of_read_only": speeds["int4_aot"] / speeds["int4_read_only"],
        "int4_torch_ops_of_roofline": speeds["int4_torch_ops"] / roofline["int4_torch_ops"],
        "int4_head8_of_roofline": speeds["int4_head8"] / roofline["int4_head8"],
        "int4_head8_compiled_of_roofline": (speeds["int4_head8_compiled"]
                                            / roofline["int4_head8"]),
        "int4_over_int4_torch_ops": speeds["int4"] / speeds["int4_torch_ops"],
        "fp32_of_roofline": speeds["compress_fp32"] / roofline["fp32"],
        # the ceiling of this call structure: reading the step's bytes, nothing else
        **{f"{k}_read_only_of_roofline": speeds[f"{k}_read_only"] / roofline[k]
           for k in ("int4", "int4_head8", "int8")},
        "int4_of_read_only": speeds["int4"] / speeds["int4_read_only"],
        "int4_compiled_of_read_only": speeds["int4_compiled"] / speeds["int4_read_only"],
        "int4_head8_compiled_of_read_only": (speeds["int4_head8_compiled"]
                                             / speeds["int4_head8_read_only"]),
        "int8_compiled_of_read_only": speeds["int8_compiled"] / speeds["int8_read_only"],
    }
    peer = peer_rounds[-1] if peer_rounds else None
    if peer:
        q4, q8 = speeds["llama_cpp_Q4_0"], speeds["llama_cpp_Q8_0"]
        report["llama_cpp"] = {k: v for k, v in peer.items() if k != "results"}
        report["llama_cpp"]["files"] = {q: {"file_bytes": r["file_bytes"],
                                            "sample_text": r["sample_text"]}
                                        for q, r in peer["results"].items()}
        report["int4_over_llama_cpp_q4_0"] = speeds["int4"] / q4
        report["int4_compiled_over_llama_cpp_q4_0"] = speeds["int4_compiled"] / q4
        report["int4_head8_over_llama_cpp_q4_0"] = speeds["int4_head8"] / q4
        report["int4_head8_compiled_over_llama_cpp_q4_0"] = speeds["int4_head8_compiled"] / q4
        report["int8_over_llama_cpp_q8_0"] = speeds["int8"] / q8
        report["int8_compiled_over_llama_cpp_q8_0"] = speeds["int8_compiled"] / q8
        report["int4_aot_over_llama_cpp_q4_0"] = speeds["int4_aot"] / q4
        report["int4_head8_aot_over_llama_cpp_q4_0"] = speeds["int4_head8_aot"] / q4
        report["int8_aot_over_llama_cpp_q8_0"] = speeds["int8_aot"] / q8
        for quant, r in peer["results"].items():  # its file's bytes as the bytes per token
            v = samples[f"llama_cpp_{quant}"]
            if len(v) == len(round_reads):
                same_round[f"llama_cpp_{quant}"] = statistics.median(
                    t * r["file_bytes"] / (g * 1e9) for t, g in zip(v, round_reads, strict=True))
    print(f"\n{'path':<24}{'tok/s':>8}{'MB/token':>10}{'roofline':>10}{'of roofline':>13}"
          f"{'same round':>12}")
    for key, label, kind in [
            ("transformers_fp32", "transformers fp32", "fp32"),
            ("compress_fp32", "ours fp32", "fp32"),
            ("int4", "ours INT4", "int4"), ("int4_compiled", "  + --compile", "int4"),
            ("int4_aot", "  + --aot", "int4"),
            ("int4_torch_ops", "ours INT4, torch's op", "int4_torch_ops"),
            ("int4_head8", "ours INT4 + INT8 head", "int4_head8"),
            ("int4_head8_compiled", "  + --compile", "int4_head8"),
            ("int4_head8_aot", "  + --aot", "int4_head8"),
            ("int8", "ours INT8", "int8"), ("int8_compiled", "  + --compile", "int8"),
            ("int8_aot", "  + --aot", "int8"),
            ("int4_read_only", "INT4 bytes, read only", "int4"),
            ("int4_head8_read_only", "INT4+8 bytes, read only", "int4_head8"),
            ("int8_read_only", "INT8 bytes, read only", "int8")]:
        mb = bytes_per_token[kind]["total"] / 1e6
        print(f"{label:<24}{speeds[key]:>8.1f}{mb:>10.1f}{roofline[kind]:>10.1f}"
              f"{speeds[key] / roofline[kind]:>12.0%}{same_round[key]:>12.0%}")
    if peer:
        for quant, r in peer["results"].items():
            share = same_round.get(f"llama_cpp_{quant}")
            print(f"{'llama.cpp ' + quant:<24}{speeds['llama_cpp_' + quant]:>8.1f}"
                  f"{r['file_bytes'] / 1e6:>10.1f} (file)"
                  + (f"{share:>23.0%}" if share is not None else ""))
    print("\nDRAM read samples (GB/s): "
          + ", ".join(f"{b:.1f}" for b in bandwidth.to_dict()["read_gb_s_samples"]))
    print(f"INT4 ours / torch's int4 op: {report['int4_over_int4_torch_ops']:.2f}x eager")
    print(f"INT4 / transformers fp32: {report['int4_over_fp32']:.2f}x eager, "
          f"{report['int4_compiled_over_fp32']:.2f}x compiled, "
          f"{report['int4_aot_over_fp32']:.2f}x --aot (goal >= 3)")
    print(f"INT4 of DRAM roofline: {report['int4_of_roofline']:.0%} eager, "
          f"{report['int4_compiled_of_roofline']:.0%} compiled, "
          f"{report['int4_aot_of_roofline']:.0%} --aot (goal >= 60%); against each round's "
          f"own bandwidth {same_round['int4']:.0%}, {same_round['int4_compiled']:.0%} and "
          f"{same_round['int4_aot']:.0%}")
    print("A step that only reads its bytes (same pieces, no arithmetic) reaches "
          f"{report['int4_read_only_of_roofline']:.0%} (INT4), "
          f"{report['int4_head8_read_only_of_roofline']:.0%} (INT4 + INT8 head), "
          f"{report['int8_read_only_of_roofline']:.0%} (INT8) of the roofline; compiled "
          f"INT4 is {report['int4_compiled_of_read_only']:.0%} of that ceiling")
    if peer:
        print(f"INT4 / llama.cpp Q4_0: {report['int4_over_llama_cpp_q4_0']:.2f}x eager, "
              f"{report['int4_compiled_over_llama_cpp_q4_0']:.2f}x compiled, "
              f"{report['int4_aot_over_llama_cpp_q4_0']:.2f}x --aot (goal >= 0.8)")
        print("INT4 + INT8 head (Q4_0's split) / llama.cpp Q4_0: "
              f"{report['int4_head8_over_llama_cpp_q4_0']:.2f}x eager, "
              f"{report['int4_head8_compiled_over_llama_cpp_q4_0']:.2f}x compiled, "
              f"{report['int4_head8_aot_over_llama_cpp_q4_0']:.2f}x --aot")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
