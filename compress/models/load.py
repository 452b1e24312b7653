"""Opened model directory -> our decoder modules (dense or packed), shapes checked first."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import torch
from torch import nn

from compress.errors import CompressError
from compress.nn import QuantLinear
from compress.progress import status
from compress.quant import QuantizedWeight

from .config import DecoderConfig, config_int, rope_frequencies
from .files import ModelFiles, open_model, require_finite
from .layers import (
    MLP,
    Attention,
    Backbone,
    CausalLM,
    DecoderLayer,
    RMSNorm,
    Rotary,
    SparseMLP,
)


def default_dtype(device: torch.device | str) -> torch.dtype:
    """float32 on CPU (half-precision matmuls are slow there); float16 on GPUs."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


def default_head_dtype(files: ModelFiles, device: torch.device | str,
                       dtype: torch.dtype) -> torch.dtype:
    """Dtype of the embedding and a dense output head.

    A packed checkpoint on CPU keeps them as stored when that is half precision: its
    matmuls already take 16-bit activations (W4A16), and the head, read in full for every
    token, is then often the largest tensor of a small model, read at half the bytes.
    Dense checkpoints compute in `dtype` throughout, to stay exact against transformers.
    """
    stored = files.dtype
    if (files.is_quantized and torch.device(device).type == "cpu"
            and stored in (torch.float16, torch.bfloat16) and dtype == torch.float32):
        return stored
    return dtype


def _linear(files: ModelFiles, name: str, dtype: torch.dtype, device) -> nn.Module:
    weight = files.linear_weight(name)
    bias = files.optional(f"{name}.bias")
    if bias is not None:
        require_finite(f"{name}.bias", bias)
        bias = bias.to(device=device, dtype=dtype)
    # The float tensors a forward multiplies by: a NaN or Inf there (a bit flip that
    # kept the file's structure) would come out as NaN text, not as an error. (Packed
    # scales are range-checked when read.)
    if isinstance(weight, QuantizedWeight):
        return QuantLinear(weight.to(device), bias)
    require_finite(f"{name}.weight", weight)
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def _norm(files: ModelFiles, name: str, cfg: DecoderConfig, dtype: torch.dtype,
          device) -> RMSNorm:
    weight = files.tensors.get(f"{name}.weight")
    require_finite(f"{name}.weight", weight)
    return RMSNorm(weight.to(device=device, dtype=dtype), cfg.norm_eps, cfg.norm_offset)


def _leaves(names: tuple[str, ...] | list[str]) -> list[str]:
    return [n.partition(".")[2] for n in names]


def build_layer(files: ModelFiles, index: int, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> DecoderLayer:
    """Decoder layer `index` alone, from its own tensors only, as the architecture table
    lays it out."""
    cfg, arch = files.decoder_config, files.arch
    p = arch.layer_prefix(index)

    def linears(names) -> dict[str, nn.Module]:
        return {leaf: _linear(files, p + n, dtype, device)
                for n, leaf in zip(names, _leaves(names), strict=True)}

    qk_norms = [None, None]
    if arch.qk_norm:
        qk_norms = [(leaf, _norm(files, p + n, cfg, dtype, device))
                    for n, leaf in zip((arch.q_norm, arch.k_norm),
                                       _leaves((arch.q_norm, arch.k_norm)), strict=True)]
    attention = Attention(cfg, index, linears((*arch.qkv, arch.o_proj)), _leaves(arch.qkv),
                          _leaves((arch.o_proj,))[0], *qk_norms)
    if cfg.experts(index):
        mlp = _sparse_mlp(files, index, dtype, device)
    else:
        mlp = MLP(cfg, linears((*arch.gate_up, arch.down_proj)), _leaves(arch.gate_up),
                  _leaves((arch.down_proj,))[0])
    places = (arch.attn_norm, arch.attn_out_norm, arch.mlp_norm, arch.mlp_out_norm)
    norms = {n: _norm(files, p + n, cfg, dtype, device) for n in places if n is not None}
    return DecoderLayer(arch, attention, mlp, norms)


def _sparse_mlp(files: ModelFiles, index: int, dtype: torch.dtype, device) -> SparseMLP:
    cfg, moe = files.decoder_config, files.arch.moe
    p = files.arch.layer_prefix(index)

    def mlp(prefix: str) -> MLP:
        return MLP(cfg, {n: _linear(files, p + prefix + n, dtype, device)
                         for n in (*moe.gate_up, moe.down)}, list(moe.gate_up), moe.down)

    experts = [mlp(moe.expert(e)) for e in range(cfg.experts(index))]
    router = (moe.router, _linear(files, p + moe.router_name, dtype, device))
    shared = None if moe.shared is None else (moe.shared, mlp(moe.shared_prefix))
    gate = None if moe.shared_gate is None else (
        moe.shared_gate, _linear(files, p + moe.shared_gate_name, dtype, device))
    return SparseMLP(cfg, router, experts, moe.experts, shared, gate)


def embedding(files: ModelFiles, dtype: torch.dtype, device="cpu") -> nn.Embedding:
    name = f"{files.arch.embed}.weight"
    weight = files.tensors.get(name)
    require_finite(name, weight)
    weight = weight.to(device=device, dtype=dtype)
    if weight.dim() != 2:
        raise CompressError(f"{name} has shape {tuple(weight.shape)}; "
                            "expected a 2-D embedding table: the checkpoint is corrupt")
    # not nn.Embedding(..., device="meta"): its initialisation on meta imports
    # torch._dynamo, seconds every command paid before it generated anything
    return nn.Embedding.from_pretrained(weight, freeze=True)


def rotary(files: ModelFiles, device="cpu") -> Rotary:
    tables = rope_frequencies(files.hf_config, files.path, files.decoder_config.head_dim)
    return Rotary({k: (inv.to(device), scale) for k, (inv, scale) in tables.items()})


def prepare_cpu_kernel() -> str | None:
    """Build our CPU matmul kernel if this machine has not yet (saying so: it takes a
    while, once), and say why not when it cannot be used. Returns that reason, or None."""
    from compress.kernels import native

    if not native.disabled() and not native.built():
        status("Building the CPU kernel for packed weights (first use on this machine)…")
    reason = native.unavailable()
    if reason and not native.disabled():
        status(f"CPU kernel unavailable ({reason}); using torch's slower int4/int8 ops")
    return reason


def expected_shapes(files: ModelFiles, index: int = 0) -> dict[str, tuple[int, ...]]:
    """Layer-relative name -> the shape config.json implies, for every Linear and norm of
    a decoder layer."""
    cfg, arch = files.decoder_config, files.arch
    d, hd = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    want: dict[str, tuple[int, ...]] = {arch.o_proj: (d, q_out)}
    experts = cfg.experts(index)
    if experts:
        moe, inter = arch.moe, cfg.expert_intermediate
        want[moe.router_name] = (experts, d)
        for prefix in moe.mlps(experts):
            width = (cfg.shared_expert_intermediate if prefix == moe.shared_prefix
                     else inter)
            want.update({prefix + n: (width, d) for n in moe.gate_up})
            want[prefix + moe.down] = (d, width)
        if moe.shared_gate_name:
            want[moe.shared_gate_name] = (1, d)
    else:
        # absent from a config: every dense layer must agree with this one
        p = arch.layer_prefix(index)
        width = files.linear_shape(p + arch.gate_up[0])[0] // (2 if arch.fused_gate_up else 1)
        inter = config_int(files.config, "intermediate_size", width)
        want[arch.down_proj] = (d, inter)
        if arch.fused_gate_up:
            want[arch.gate_up[0]] = (2 * inter, d)
        else:
            want.update(dict.fromkeys(arch.gate_up, (inter, d)))
    if arch.fused_qkv:
        want[arch.qkv[0]] = (q_out + 2 * kv_out, d)
    else:
        want.update(zip(arch.qkv, [(q_out, d), (kv_out, d), (kv_out, d)], strict=True))
    for n in arch.layer_norms:
        want[n] = (d,)
    if arch.qk_norm == "head":
        want[arch.q_norm] = want[arch.k_norm] = (hd,)
    elif arch.qk_norm == "projection":
        want[arch.q_norm], want[arch.k_norm] = (q_out,), (kv_out,)
    return want


def check_shapes(files: ModelFiles) -> None:
    """config.json against the stored shape of every Linear (a packed one's weight_shape,
    which its packed tensors are checked against when read), norm, bias and the embedding,
    before anything is sized from the config (RoPE tables from head_dim) or a mismatch
    (a damaged or swapped tensor in any layer, another model's config) fails mid-forward
    as a torch shape error."""
    cfg, arch = files.decoder_config, files.arch
    p = arch.layer_prefix(0)
    want = expected_shapes(files)
    attention_in = {n: files.linear_shape(p + n) for n in arch.qkv}
    if any(attention_in[n] != want[n] for n in arch.qkv) or cfg.num_heads % cfg.num_kv_heads:
        have = ", ".join(f"{n} {s}" for n, s in attention_in.items())
        need = ", ".join(f"{n} {want[n]}" for n in arch.qkv)
        raise CompressError(
            f"config.json of {files.path} does not match its weights: {cfg.num_heads} heads, "
            f"{cfg.num_kv_heads} key/value heads of {cfg.head_dim} and hidden size "
            f"{cfg.hidden_size} need {need}, the weights have {have}; re-download the model "
            "or re-quantise it")
    for i in range(cfg.num_layers):
        p = arch.layer_prefix(i)
        want = expected_shapes(files, i) if i else want
        for n in (*files.layer_linears(i), *([arch.moe.router_name] if cfg.experts(i) else ())):
            _check_linear(files, p + n, want[n])
        for n in arch.layer_norms:
            _check_tensor(files, f"{p}{n}.weight", want[n])
    _check_tensor(files, f"{arch.final_norm}.weight", (cfg.hidden_size,))
    _check_tensor(files, f"{arch.embed}.weight", (cfg.vocab_size, cfg.hidden_size))
    if not files.tied_embeddings:
        _check_linear(files, arch.lm_head, (cfg.vocab_size, cfg.hidden_size))


def _check_linear(files: ModelFiles, name: str, want: tuple[int, ...]) -> None:
    packed = name in files.schemes
    stored = f"{name}.weight_shape" if packed else f"{name}.weight"
    have = files.linear_shape(name)
    if have != want:
        _mismatch(files, stored, f"{'says' if packed else 'is'} {have}", want)
    if f"{name}.bias" in files.tensors:
        _check_tensor(files, f"{name}.bias", (want[0],))


def _check_tensor(files: ModelFiles, name: str, want: tuple[int, ...]) -> None:
    have = files.tensors.shape(name)
    if have != want:
        _mismatch(files, name, f"is {have}", want)


def _mismatch(files: ModelFiles, tensor: str, have: str, want: tuple) -> NoReturn:
    shard = files.tensors.weight_map.get(tensor, "?")
    raise CompressError(f"{tensor} in {files.path / shard} {have}, but config.json implies "
                        f"{want}: the file is damaged or does not belong to this config; "
                        "re-download the model or re-quantise it")


def build(files: ModelFiles, device: torch.device | str = "cpu",
          dtype: torch.dtype | None = None, head_dtype: torch.dtype | None = None) -> CausalLM:
    """Instantiate the decoder from an opened model directory (dense or packed).

    `head_dtype` (embedding and output head) defaults to `default_head_dtype`; pass
    `dtype` to compute the head exactly like the rest."""
    dtype = dtype or default_dtype(device)
    outer = head_dtype or default_head_dtype(files, device, dtype)
    if files.is_quantized and torch.device(device).type == "cpu":
        prepare_cpu_kernel()
    check_shapes(files)
    cfg = files.decoder_config
    layers = [build_layer(files, i, dtype, device) for i in range(cfg.num_layers)]
    lm_head = None if files.tied_embeddings else _linear(files, files.arch.lm_head, outer,
                                                          device)
    backbone = Backbone(embedding(files, outer, device), layers,
                        _norm(files, files.arch.final_norm, cfg, dtype, device))
    return CausalLM(cfg, backbone, lm_head, rotary(files, device), dtype).eval()


def load(name_or_path: str | Path | None, device: torch.device | str = "cpu",
         dtype: torch.dtype | None = None,
         head_dtype: torch.dtype | None = None) -> tuple[CausalLM, ModelFiles]:
    files = open_model(name_or_path)
    return build(files, device, dtype, head_dtype), files
