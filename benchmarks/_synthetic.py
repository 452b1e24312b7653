"""Random-weight Llama-architecture checkpoints for the scale benchmarks (scale_gptq.py,
scale_layers.py): fp16 safetensors, one shard per layer, written layer by layer so the
writer never holds the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
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
