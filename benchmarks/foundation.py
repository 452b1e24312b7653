"""Figures for the end-to-end path: checkpoint size, perplexity per setting, decode speed.

    python benchmarks/foundation.py [--eval-tokens 16384] [--new-tokens 128]

Everything runs in one process on the bundled model and text, so the ratios compare
like with like. Prints a table and writes benchmarks/results/foundation.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import compress
from compress import assets, data, evaluation, models, pipeline
from compress.progress import set_quiet
from compress.quant import QuantScheme
from compress.recipe import Recipe
from compress.serving import generation

SETTINGS = [  # (label, bits, group size, symmetric)
    ("W8 per-channel sym", 8, -1, True),
    ("W4 g128 sym", 4, 128, True),
    ("W4 g128 asym", 4, 128, False),
    ("W4 per-channel sym", 4, -1, True),
    ("W3 g128 sym", 3, 128, True),
    ("W3 g128 asym", 3, 128, False),
]
PROMPT = "The old lighthouse keeper climbed the stairs one last time and"


def decode_speed_ours(model_dir: Path, prompt: list[int], new_tokens: int,
                      compile: bool = False) -> float:
    """Decode tokens/s of our KV-cache decoder (prefill excluded), best of two runs; with
    `compile`, after a warm-up run that compiles the step (its time is not counted)."""
    model, _ = models.load(model_dir)
    params = generation.SamplingParams(max_new_tokens=new_tokens)
    if compile:
        list(generation.generate(model, prompt, params, compile=True))
    best = 0.0
    for _ in range(2):
        gen = generation.generate(model, prompt, params, compile=compile)
        next(gen)  # the prefill produces the first token
        start = time.perf_counter()
        steps = sum(1 for _ in gen)
        best = max(best, steps / (time.perf_counter() - start))
    return best


def decode_speed_transformers(model_dir: Path, prompt: list[int], new_tokens: int) -> float:
    """Decode tokens/s of transformers' generate (fp32, greedy), prefill subtracted."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    best = 0.0
    with torch.inference_mode():
        for _ in range(2):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 **kwargs)
            elapsed = time.perf_counter() - start - prefill
            best = max(best, (out.shape[1] - len(prompt) - 1) / elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path,
                        default=Path(__file__).parent / "results" / "foundation.json")
    args = parser.parse_args()
    set_quiet(True)

    base = assets.bundled_model_dir()
    tokenizer = data.load_tokenizer(base)
    prompt = tokenizer(PROMPT).input_ids
    baseline = evaluation.evaluate_perplexity(base, max_tokens=args.eval_tokens)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="compress-bench-"))
    dirs = {}
    for label, bits, group, sym in SETTINGS:
        out = work / label.replace(" ", "_")
        result = pipeline.quantize(base, Recipe("rtn", QuantScheme(bits, group, sym)), out)
        ppl = evaluation.evaluate_perplexity(out, max_tokens=args.eval_tokens)
        dirs[label] = out
        rows.append({
            "setting": label, "bits": bits, "group_size": group, "symmetric": sym,
            "checkpoint_bytes": result.packed_bytes,
            "checkpoint_over_fp16": result.packed_bytes / result.fp16_bytes,
            "linears_over_fp16": result.linear_packed_bytes / result.linear_fp16_bytes,
            "quantize_seconds": result.seconds,
            "ppl": ppl.ppl, "ppl_over_fp16": ppl.ppl / baseline.ppl,
        })
        print(f"{label:20s} size {rows[-1]['checkpoint_over_fp16']:.3f}× of fp16 "
              f"(Linears {rows[-1]['linears_over_fp16']:.3f}×)  ppl {ppl.ppl:8.3f} "
              f"({ppl.ppl / baseline.ppl - 1:+.1%})", flush=True)

    speeds = {
        "transformers_generate_fp32": decode_speed_transformers(base, prompt, args.new_tokens),
        "compress_fp32_dense": decode_speed_ours(base, prompt, args.new_tokens),
        "compress_int8_reference_kernel": decode_speed_ours(dirs["W8 per-channel sym"], prompt,
                                                            args.new_tokens),
        "compress_int4_reference_kernel": decode_speed_ours(dirs["W4 g128 sym"], prompt,
                                                            args.new_tokens),
    }
    hf = speeds["transformers_generate_fp32"]
    for name, tps in speeds.items():
        print(f"decode {name:32s} {tps:7.1f} tokens/s  ({tps / hf:.2f}× transformers)")

    report = {
        "benchmark": "foundation",
        "compress_version": compress.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "model": "smollm2-135m (bundled, fp16 safetensors)",
        "perplexity_protocol": {"text": "bundled held-out LAMBADA passages",
                                "ctx": baseline.ctx, "windows": baseline.windows,
                                "tokens_scored": baseline.tokens, "kind": "token perplexity"},
        "fp16_ppl": baseline.ppl,
        "settings": rows,
        "decode": {"new_tokens": args.new_tokens, "batch": 1, "tokens_per_second": speeds,
                   "int4_over_transformers_fp32":
                       speeds["compress_int4_reference_kernel"] / hf,
                   "int8_over_transformers_fp32":
                       speeds["compress_int8_reference_kernel"] / hf,
                   "dense_over_transformers_fp32": speeds["compress_fp32_dense"] / hf},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"fp16 ppl {baseline.ppl:.3f} over {baseline.tokens} tokens "
          f"({baseline.windows}×{baseline.ctx}); wrote {args.json}")


if __name__ == "__main__":
    main()
