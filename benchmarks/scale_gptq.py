"""Memory bound of the layer-by-layer GPTQ pipeline on a model bigger than its memory use.

    python benchmarks/scale_gptq.py [--layers 40] [--hidden 2048] [--intermediate 5632]

Writes a random-weight Llama-architecture checkpoint (fp16 safetensors, one shard per
layer, written layer by layer so this script never holds it either), quantises it with
`compress quantize --method gptq` in a child process, and reports the child's peak RSS
against the checkpoint size and against the bound "2 × (one layer's weights +
calibration activations)". Writes benchmarks/results/scale_gptq.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from _child import run_measured
from safetensors.torch import save_file

from compress import assets

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_synthetic_llama(path: Path, layers: int, hidden: int, intermediate: int,
                          heads: int, kv_heads: int, vocab: int = 49152) -> int:
    """Random fp16 Llama checkpoint, one shard per layer; returns its tensor bytes."""
    path.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.float16)

    weight_map, total = {}, 0
    n_shards = layers + 1
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors = {
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(intermediate, hidden),
            p + "mlp.up_proj.weight": rand(intermediate, hidden),
            p + "mlp.down_proj.weight": rand(hidden, intermediate),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
        }
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * 2 for t in tensors.values())
    rest = {"model.embed_tokens.weight": rand(vocab, hidden),
            "model.norm.weight": torch.ones(hidden, dtype=torch.float16)}
    shard = f"model-{n_shards:05d}-of-{n_shards:05d}.safetensors"
    save_file(rest, str(path / shard), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, shard))
    total += sum(t.numel() * 2 for t in rest.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "float16",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2}))
    bundled = assets.bundled_model_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(bundled / name, path / name)
    return total


def peak_rss_of(cmd: list[str]) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes) of a child process."""
    code, seconds, rss, tail = run_measured(cmd)
    if code:
        sys.stderr.write(tail)
    return code, seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path,
                        default=Path(__file__).parent / "results" / "scale_gptq.json")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="compress-scale-"))
    model = work / "synthetic"
    model_bytes = write_synthetic_llama(model, args.layers, args.hidden, args.intermediate,
                                        args.heads, args.kv_heads)
    layer_bytes = 2 * (args.hidden * args.hidden * 2
                       + 2 * args.hidden * (args.hidden // args.heads) * args.kv_heads
                       + 3 * args.hidden * args.intermediate)
    activation_bytes = 4 * args.calib_samples * args.calib_seqlen * args.hidden
    baseline_code, _, baseline_rss = peak_rss_of(
        [sys.executable, "-c", "import compress.cli, compress.pipeline, transformers"])
    code, seconds, rss = peak_rss_of([
        sys.executable, "-m", "compress.cli", "quantize", str(model), "--method", "gptq",
        "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen),
        "--out", str(work / "out"), "--overwrite", "--no-eval", "-q"])
    if code or baseline_code:
        sys.exit("quantisation failed")
    bound = 2 * (layer_bytes + activation_bytes)
    report = {
        "benchmark": "scale_gptq",
        "model": {"layers": args.layers, "hidden": args.hidden,
                  "intermediate": args.intermediate, "fp16_bytes": model_bytes},
        "calibration": {"samples": args.calib_samples, "seqlen": args.calib_seqlen},
        "one_layer_fp16_bytes": layer_bytes,
        "calibration_activation_bytes": activation_bytes,
        "peak_rss_bytes": rss,
        "import_baseline_rss_bytes": baseline_rss,
        "peak_rss_over_model": rss / model_bytes,
        "peak_rss_over_bound": rss / bound,
        "peak_rss_above_baseline_over_bound": (rss - baseline_rss) / bound,
        "quantize_seconds": seconds,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    gb = 1e9
    print(f"model {model_bytes / gb:.2f} GB fp16; peak RSS {rss / gb:.2f} GB "
          f"({rss / model_bytes:.2f}× the model); bound 2×(layer {layer_bytes / gb:.3f} GB + "
          f"activations {activation_bytes / gb:.3f} GB) = {bound / gb:.2f} GB -> "
          f"{rss / bound:.2f}× the bound ({(rss - baseline_rss) / bound:.2f}× above the "
          f"{baseline_rss / gb:.2f} GB import baseline); {seconds:.0f} s")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
