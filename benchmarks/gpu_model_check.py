"""Whole packed checkpoints through the Triton backend on a GPU against the reference.

    python benchmarks/gpu_model_check.py --make DIR     # here, on CPU: build checkpoints
    python benchmarks/gpu_model_check.py DIR [--json FILE]   # on the CUDA machine

`--make` writes a random Llama (hidden 512, 4 layers, vocabulary 4096: small enough to
travel to a lent GPU machine) quantised with RTN at W4 g128 asymmetric, W8 per-channel
and W3 g128 into DIR. The check loads each on CUDA twice, through the reference backend
in float32 and through the Triton backend in float16, and compares the logits of a
40-token prefill (dequantise + cuBLAS), of an 8-token prefill (tensor-core decode
kernel), and the greedy tokens and per-step logits of 16 cached decode steps (the
one-row kernel). What kernel served each Linear is recorded, so a silent fallback to the
reference would show.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
SCHEMES = {"w4g128-asym": (4, 128, False), "w8-sym": (8, -1, True), "w3g128-sym": (3, 128, True)}


def make(root: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress import pipeline
    from compress.quant import QuantScheme
    from compress.recipe import Recipe

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # wider than HF's init so the logits are not flat
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    source = root / "fp16"
    model.half().save_pretrained(source)
    for name, (bits, group, sym) in SCHEMES.items():
        pipeline.quantize(source, Recipe("rtn", QuantScheme(bits, group, sym)), root / name,
                          overwrite=True)
    shutil.rmtree(source)  # the checks need only the packed checkpoints


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run_backend(path: Path, backend: str, dtype: torch.dtype, device: str) -> dict:
    from compress import models
    from compress.nn import kernel_backends

    os.environ["COMPRESS_KERNEL"] = backend
    model, _ = models.load(path, device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(0, 4096, (1, 40), generator=gen).to(device)
    short_prompt = long_prompt[:, :8]
    with torch.inference_mode():
        out = {"prefill40": model(long_prompt).float(), "prefill8": model(short_prompt).float()}
        cache = model.new_cache(1, 64)
        logits = model(short_prompt, 0, cache)[:, -1]
        steps, tokens = [], []
        for pos in range(8, 24):
            token = logits.argmax(-1)
            tokens.append(int(token))
            logits = model(token.view(1, 1), pos, cache)[:, -1]
            steps.append(logits.float())
    out["steps"] = torch.cat(steps)
    out["tokens"] = tokens
    out["kernels"] = sorted(set(kernel_backends(model)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--make", action="store_true")
    parser.add_argument("--device", default="cuda",
                        help="cpu runs the same check under TRITON_INTERPRET=1 (slow)")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--json", type=Path, default=HERE / "results" / "gpu_model_check.json")
    args = parser.parse_args()
    if args.make:
        make(args.root)
        return
    results, failed = {}, False
    for name in args.schemes:
        ref = run_backend(args.root / name, "reference", torch.float32, args.device)
        got = run_backend(args.root / name, "triton", torch.float16, args.device)
        row = {"prefill40_rel": rel(got["prefill40"], ref["prefill40"]),
               "prefill8_rel": rel(got["prefill8"], ref["prefill8"]),
               "decode_steps_rel": rel(got["steps"], ref["steps"]),
               "greedy_tokens_equal": sum(a == b for a, b in zip(got["tokens"], ref["tokens"],
                                                                 strict=True)),
               "greedy_tokens": len(ref["tokens"]), "kernels": got["kernels"]}
        # float16 activations through 4 layers: the CPU whole-model test's bound.
        ok = (max(row["prefill40_rel"], row["prefill8_rel"], row["decode_steps_rel"]) < 2e-2
              and got["kernels"] == ["triton"])
        row["ok"] = ok
        failed |= not ok
        results[name] = row
        print(name, json.dumps(row), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "whole model, triton vs reference on GPU",
                                     "device": torch.cuda.get_device_name()
                                     if args.device == "cuda" else "cpu (interpreter)",
                                     "results": results}, indent=2) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
