"""The decoder's modules, dense or packed, for every family in the architecture table.

Why our own model code rather than transformers' modules: serving (continuous batching,
prefix reuse, speculative decoding, INT8 KV, compiled steps) needs control of the cache
layout and of every Linear. Module names mirror the HF state dict
(`model.layers.3.mlp.up_proj`), so a checkpoint loads by name and calibration finds a
Linear by the name the architecture table gives it. Nothing here knows calibration:
`compress.calibrate` drives these modules through hooks on their Linears.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError
from compress.kernels import cpu as cpu_kernels
from compress.nn import SharedInputLinears

from .arch import Architecture
from .config import DecoderConfig

RopeTables = dict[str, tuple[torch.Tensor, torch.Tensor]]  # RoPE key -> (cos, sin)

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight): offset 0 for Llama's norms, 1 for Gemma's, which
    store weight - 1 and compute in float32 before casting back."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset:
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return (h * (self.offset + self.weight.to(torch.float32))).to(x.dtype)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused op instead of eight: a decode step runs two or more per layer
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset:g}"


class KVCache:
    """Preallocated keys/values, one pair of [B, kv_heads, max_len, head_dim] per layer.

    Separate per-layer tensors, written in place, so a compiled step updates the few new
    positions instead of copying a whole multi-layer buffer. `row(r)` and `rows(n)` are
    caches over a slice of the rows, sharing storage (a serving slot, the active slots).

    `quantized`: int8 storage with one float32 scale per position and head (amax / 127),
    a quarter of float32's bytes and half of float16's; reads dequantise.
    """

    def __init__(self, cfg: DecoderConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", quantized: bool = False):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        store = torch.int8 if quantized else dtype

        def buffers(dims, kind):
            return [torch.zeros(dims, dtype=kind, device=device) for _ in range(cfg.num_layers)]
        self.k, self.v = buffers(shape, store), buffers(shape, store)
        scales = (*shape[:3], 1)
        self.k_scale = buffers(scales, torch.float32) if quantized else None
        self.v_scale = buffers(scales, torch.float32) if quantized else None
        self.max_len, self.dtype, self.quantized = max_len, dtype, quantized

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def nbytes(self) -> int:
        tensors = [*self.k, *self.v, *(self.k_scale or []), *(self.v_scale or [])]
        return sum(t.nbytes for t in tensors)

    def _view(self, index: slice) -> KVCache:
        view = copy.copy(self)
        for name in ("k", "v", "k_scale", "v_scale"):
            tensors = getattr(self, name)
            if tensors is not None:
                setattr(view, name, [t[index] for t in tensors])
        return view

    def row(self, r: int) -> KVCache:
        """A batch-1 cache over row r (writes land in this cache)."""
        return self._view(slice(r, r + 1))

    def rows(self, n: int) -> KVCache:
        """A cache over rows 0..n-1."""
        return self._view(slice(0, n))

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Positions 0..length-1 of row src copied into row dst (compacting slots)."""
        for tensors in (self.k, self.v, self.k_scale, self.v_scale):
            for t in tensors or ():
                t[dst, :, :length] = t[src, :, :length]

    def update(self, layer: int, start: int | torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, kv_heads, S, hd] at positions start.. and return the keys and
        values to attend over: positions 0..start+S-1 for an int start; for per-row starts
        ((B,) tensor) the whole buffer, the caller masking each row."""
        if isinstance(start, torch.Tensor):
            b, s = k.shape[0], k.shape[2]
            pos = start[:, None] + torch.arange(s, device=k.device)  # (B, S)
            rows = torch.arange(b, device=k.device)[:, None].expand(b, s)
            self._write(layer, lambda t, x: t.__setitem__((rows, slice(None), pos),
                                                          x.transpose(1, 2)), k, v)
            return self._read(layer, self.max_len)
        end = start + k.shape[2]
        positions = torch.arange(start, end, device=k.device)
        self._write(layer, lambda t, x: t.index_copy_(2, positions, x), k, v)
        return self._read(layer, end)

    def _write(self, layer: int, put: Callable, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.quantized:
            put(self.k[layer], k)
            put(self.v[layer], v)
            return
        for x, codes, scales in ((k, self.k, self.k_scale), (v, self.v, self.v_scale)):
            q, scale = quantize_kv(x)
            put(codes[layer], q)
            put(scales[layer], scale)

    def _read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.quantized:
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        return tuple((codes[layer][:, :, :end].to(torch.float32) * scales[layer][:, :, :end])
                     .to(self.dtype)
                     for codes, scales in ((self.k, self.k_scale), (self.v, self.v_scale)))


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and float32 scales [..., 1] per position and head of keys or values."""
    x32 = x.to(torch.float32)
    scale = x32.abs().amax(-1, keepdim=True) / 127.0
    codes = torch.where(scale > 0, x32 / scale, torch.zeros_like(x32)).round().clamp(-127, 127)
    return codes.to(torch.int8), scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., head_dim) rotated by position; with partial rotary (cos narrower than the
    head) only the first cos.shape[-1] dimensions turn."""
    width = cos.shape[-1]
    if width == x.shape[-1]:
        return (x * cos + rotate_half(x) * sin).to(x.dtype)
    turned, kept = x[..., :width], x[..., width:]
    return torch.cat(((turned * cos + rotate_half(turned) * sin).to(x.dtype), kept), dim=-1)


def attention_mask(start: int | torch.Tensor, q_len: int, k_len: int, window: int | None,
                   device: torch.device, explicit: bool = False) -> torch.Tensor | None:
    """Boolean mask (True = attend): [q_len, k_len] for an int start, None when plain
    causal suffices (unless `explicit`); [B, 1, q_len, k_len] over the whole cache for
    per-row starts (B,)."""
    if isinstance(start, torch.Tensor):
        q_pos = start[:, None, None, None] + torch.arange(q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        return allowed
    # A compiled or exported step is one program for every position: it keeps the window
    # mask throughout instead of guarding on k_len > window (a recompile mid-generation).
    windowed = window is not None and (torch.compiler.is_compiling() or k_len > window)
    if not (windowed or explicit) and (q_len == 1 or q_len == k_len):
        return None
    end = start + q_len  # keys cover positions end - k_len .. end - 1 (cache or not)
    q_pos = torch.arange(start, end, device=device)[:, None]
    k_pos = torch.arange(end - k_len, end, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def _project(shared: SharedInputLinears, x: torch.Tensor, linears: list[nn.Module],
             sizes: list[int]) -> list[torch.Tensor]:
    """The outputs of Linears reading one input, split into `sizes` parts (a fused
    projection is one Linear whose output rows are the parts)."""
    if len(linears) == 1:
        return list(linears[0](x).split(sizes, dim=-1))
    return shared(x, *linears)


class Attention(nn.Module):
    """Grouped-query attention with RoPE; optional q/k norms, softcapping and a sliding
    window, as the layer's config says. Projections are registered under their HF names."""

    def __init__(self, cfg: DecoderConfig, index: int, projections: dict[str, nn.Module],
                 qkv: list[str], o_proj: str, q_norm: tuple[str, RMSNorm] | None = None,
                 k_norm: tuple[str, RMSNorm] | None = None):
        super().__init__()
        self.cfg, self.index = cfg, index
        for name, module in projections.items():
            self.add_module(name, module)
        self._qkv, self._o = qkv, o_proj
        self._norms = None
        if q_norm is not None and k_norm is not None:
            self.add_module(*q_norm)
            self.add_module(*k_norm)
            self._norms = (q_norm[0], k_norm[0])
        self.window = cfg.window(index)
        self.rope_key = cfg.rope_key(index)
        self.shared = SharedInputLinears()

    def forward(self, x: torch.Tensor, rope: RopeTables, start: int | torch.Tensor = 0,
                cache: KVCache | None = None) -> torch.Tensor:
        return getattr(self, self._o)(self.core(x, rope, start, cache))

    def core(self, x: torch.Tensor, rope: RopeTables, start: int | torch.Tensor = 0,
             cache: KVCache | None = None) -> torch.Tensor:
        """Attention up to (not including) the output projection:
        (B, S, D) -> (B, S, heads * head_dim)."""
        b, s, _ = x.shape  # (B, S, D)
        c = self.cfg
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q, k, v = _project(self.shared, x, [getattr(self, n) for n in self._qkv],
                           [q_out, kv_out, kv_out])
        if self._norms and c.qk_norm == "projection":
            q, k = getattr(self, self._norms[0])(q), getattr(self, self._norms[1])(k)
        q = q.view(b, s, c.num_heads, c.head_dim)
        k = k.view(b, s, c.num_kv_heads, c.head_dim)
        if self._norms and c.qk_norm == "head":
            q, k = getattr(self, self._norms[0])(q), getattr(self, self._norms[1])(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, S, hd)
        v = v.view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        cos, sin = rope[self.rope_key]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.index, start, k, v)
        if c.attn_softcap is None:
            mask = attention_mask(start, s, k.shape[2], self.window, x.device)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and s > 1, scale=c.attn_scale,
                enable_gqa=True)
        else:
            mask = attention_mask(start, s, k.shape[2], self.window, x.device, explicit=True)
            out = _softcapped_attention(q, k, v, mask, c.attn_scale or c.head_dim ** -0.5,
                                        c.attn_softcap)
        return out.transpose(1, 2).reshape(b, s, q_out)

    def part_rows(self, linear: str, part: str) -> slice:
        """Rows of fused projection `linear` that hold `part` (q, k or v)."""
        c = self.cfg
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        bounds = {"q": (0, q_out), "k": (q_out, q_out + kv_out),
                  "v": (q_out + kv_out, q_out + 2 * kv_out)}
        if linear not in self._qkv or part not in bounds:
            raise KeyError(f"{linear} has no part {part!r}")
        return slice(*bounds[part])


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None, scale: float, cap: float) -> torch.Tensor:
    """Attention whose scores pass through cap * tanh(score / cap) before the softmax
    (Gemma-2), which SDPA cannot express."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)); gate and up separate or one fused projection."""

    def __init__(self, cfg: DecoderConfig, projections: dict[str, nn.Module],
                 gate_up: list[str], down_proj: str):
        super().__init__()
        for name, module in projections.items():
            self.add_module(name, module)
        self._gate_up, self._down = gate_up, down_proj
        self.act = _ACTIVATIONS[cfg.activation]
        self.shared = SharedInputLinears()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self._down)(self.hidden(x))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the down projection: (B, S, D) -> (B, S, intermediate)."""
        linears = [getattr(self, n) for n in self._gate_up]
        width = linears[0].out_features // (2 if len(linears) == 1 else 1)
        gate, up = _project(self.shared, x, linears, [width, width])
        return self.act(gate) * up

    def part_rows(self, linear: str, part: str) -> slice:
        """Rows of fused projection `linear` that hold `part` (gate or up)."""
        width = getattr(self, linear).out_features // 2
        bounds = {"gate": (0, width), "up": (width, 2 * width)}
        if linear not in self._gate_up or part not in bounds:
            raise KeyError(f"{linear} has no part {part!r}")
        return slice(*bounds[part])


class SparseMLP(nn.Module):
    """A mixture of experts: the router scores every expert per token, the top k are
    chosen (their softmax weights renormalised when the config says so), and each chosen
    expert's output, times its weight, is summed. An expert runs only on the tokens
    routed to it, and not at all when none are: a decode step reads k experts' weights.
    A shared expert (Qwen-MoE) runs on every token, first, its output scaled by
    sigmoid(shared gate) when there is one, and added last."""

    def __init__(self, cfg: DecoderConfig, router: tuple[str, nn.Module], experts: list[MLP],
                 experts_name: str, shared: tuple[str, MLP] | None = None,
                 shared_gate: tuple[str, nn.Module] | None = None):
        super().__init__()
        self.add_module(*router)
        self.add_module(experts_name, nn.ModuleList(experts))
        self._router, self._experts = router[0], experts_name
        self._shared = self._shared_gate = None
        if shared is not None:
            self.add_module(*shared)
            self._shared = shared[0]
        if shared_gate is not None:
            self.add_module(*shared_gate)
            self._shared_gate = shared_gate[0]
        self.top_k, self.renormalise = cfg.experts_per_token, cfg.norm_topk_prob
        # Calibration may run every expert on every token (each still adds only its
        # routed tokens' outputs): its Linears then see the whole input distribution.
        self.all_tokens = False
        _experts_outside_compile()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, D) -> per token, the chosen experts' weights (T, k) and indices (T, k)."""
        probs = getattr(self, self._router)(x).float().softmax(-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(x.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        shared = None if self._shared is None else getattr(self, self._shared)(x)
        if shared is not None and self._shared_gate is not None:
            shared = torch.sigmoid(getattr(self, self._shared_gate)(x)) * shared
        weights, chosen = self.route(x)
        out = self._run_experts(x, weights, chosen)
        return (out if shared is None else out + shared).view(shape)

    # Left out of torch.compile's graph (see _experts_outside_compile).
    def _run_experts(self, x: torch.Tensor, weights: torch.Tensor,
                     chosen: torch.Tensor) -> torch.Tensor:
        experts = getattr(self, self._experts)
        out = torch.zeros_like(x)
        # experts in index order, as transformers sums them: the same float additions
        for e in range(len(experts)) if self.all_tokens else torch.unique(chosen).tolist():
            tokens, slot = torch.where(chosen == e)
            y = experts[e](x)[tokens] if self.all_tokens else experts[e](x[tokens])
            out.index_add_(0, tokens, (y * weights[tokens, slot, None]).to(out.dtype))
        return out


@functools.cache
def _experts_outside_compile() -> None:
    """Which experts run depends on the data: torch.compile traces around
    `SparseMLP._run_experts` (the rest of the step stays compiled) instead of recompiling
    for every new choice of experts. Applied when the first mixture of experts is built,
    not at import: torch.compiler.disable imports torch._dynamo, seconds that every
    command paid before it did anything."""
    SparseMLP._run_experts = torch.compiler.disable(SparseMLP._run_experts)


class DecoderLayer(nn.Module):
    """x = x + attn_out_norm(attention(attn_norm(x))); x = x + mlp_out_norm(mlp(mlp_norm(x))),
    with the norms the architecture places (an absent one is the identity)."""

    def __init__(self, arch: Architecture, attention: Attention, mlp: MLP | SparseMLP,
                 norms: dict[str, RMSNorm]):
        super().__init__()
        self._attn = _parent(arch.o_proj)
        self._mlp = arch.moe.block if isinstance(mlp, SparseMLP) else _parent(arch.down_proj)
        self.add_module(self._attn, attention)
        self.add_module(self._mlp, mlp)
        for name, norm in norms.items():
            self.add_module(name, norm)
        self._places = (arch.attn_norm, arch.attn_out_norm, arch.mlp_norm, arch.mlp_out_norm)

    def _norm(self, name: str | None, x: torch.Tensor) -> torch.Tensor:
        return x if name is None else getattr(self, name)(x)

    def forward(self, x: torch.Tensor, rope: RopeTables, start: int | torch.Tensor = 0,
                cache: KVCache | None = None) -> torch.Tensor:
        attn_norm, attn_out, mlp_norm, mlp_out = self._places
        # no local keeps the attention's output alive through the MLP: calibration pauses
        # this forward at every MLP group (each expert), per chunk of samples
        x = x + self._norm(attn_out, getattr(self, self._attn)(self._norm(attn_norm, x), rope,
                                                               start, cache))
        return x + self._norm(mlp_out, getattr(self, self._mlp)(self._norm(mlp_norm, x)))

    def part_rows(self, linear: str, part: str) -> slice:
        """Rows of a fused projection (named from the layer) that hold `part`."""
        parent, _, leaf = linear.partition(".")
        return self.get_submodule(parent).part_rows(leaf, part)


def _parent(name: str) -> str:
    parent, _, leaf = name.partition(".")
    if not leaf:
        raise CompressError(f"architecture names {name!r} without its parent module")
    return parent


def embed(table: torch.Tensor, tokens: torch.Tensor, dtype: torch.dtype,
          cfg: DecoderConfig) -> torch.Tensor:
    """Rows of the embedding table for `tokens`, in `dtype`, scaled as the family does
    (Gemma by sqrt(hidden_size)). Rows are gathered in the table's dtype: a large table
    is never converted whole."""
    x = F.embedding(tokens, table).to(dtype)
    return x if cfg.embed_scale is None else x * cfg.embed_scale


class Backbone(nn.Module):
    """Holds the embedding, layers and final norm so that parameter names carry HF's
    `model.` prefix."""

    def __init__(self, embed_tokens: nn.Embedding, layers: list[DecoderLayer], norm: RMSNorm):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class Rotary(nn.Module):
    """cos/sin tables per RoPE key: (S, rotary_dim) for positions start..start+S-1;
    (B, 1, S, rotary_dim) for per-row starts (B,)."""

    def __init__(self, frequencies: dict[str, tuple[torch.Tensor, float]]):
        super().__init__()
        self.keys = sorted(frequencies)
        self.scales = {key: scale for key, (_, scale) in frequencies.items()}
        for key, (inv_freq, _) in frequencies.items():
            self.register_buffer(f"inv_freq_{key}", inv_freq, persistent=False)

    def forward(self, start: int | torch.Tensor, length: int) -> RopeTables:
        return {key: self.table(key, start, length) for key in self.keys}

    def table(self, key: str, start: int | torch.Tensor,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scale = getattr(self, f"inv_freq_{key}"), self.scales[key]
        if isinstance(start, torch.Tensor):
            pos = (start[:, None, None] + torch.arange(length, device=start.device)[:, None]
                   ).to(torch.float32)  # (B, S, 1)
            freqs = (pos * inv_freq).unsqueeze(1)  # (B, 1, S, hd/2)
        else:
            pos = torch.arange(start, start + length, device=inv_freq.device,
                               dtype=torch.float32)
            freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * scale, emb.sin() * scale


def _dense_head(x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., D) @ weight.T (+ bias) for a dense output head (or the tied embedding table).
    A half-precision head on CPU goes through `half_linear` (float32 logits; it widens the
    head to float32 for many rows where the CPU has no native half GEMM)."""
    if weight.device.type == "cpu" and weight.dtype in (torch.float16, torch.bfloat16):
        rows = x.reshape(-1, x.shape[-1])
        y = cpu_kernels.half_linear(rows, weight).view(*x.shape[:-1], weight.shape[0])
    else:
        y = F.linear(x.to(weight.dtype), weight)
    return y if bias is None else y + bias


class CausalLM(nn.Module):
    """tokens (B, S) at positions start..start+S-1 -> logits (B, S, vocab).

    `dtype` is the compute dtype of the residual stream and KV cache. The embedding (and
    the tied output head) may be stored in another dtype: see `load.build`.
    """

    def __init__(self, cfg: DecoderConfig, model: Backbone, lm_head: nn.Module | None,
                 rotary: Rotary, dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.lm_head = lm_head  # None: tied to the embedding
        self.rotary = rotary
        self._dtype = dtype or model.embed_tokens.weight.dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream entering layer 0: (B, S) -> (B, S, D) in the compute dtype."""
        return embed(self.model.embed_tokens.weight, tokens, self.dtype, self.cfg)

    def forward(self, tokens: torch.Tensor, start: int | torch.Tensor = 0,
                cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """`start`: the position of tokens[:, 0], or per row as a (B,) tensor (then a cache
        holding each row's earlier positions is required)."""
        if isinstance(start, torch.Tensor):
            if cache is None:
                raise ValueError("per-row start positions need a cache")
            furthest = int(start.max()) + tokens.shape[1]
        else:
            furthest = start + tokens.shape[1]
        if furthest > self.cfg.max_positions:
            raise CompressError(f"sequence of {furthest} tokens exceeds the "
                                f"model's {self.cfg.max_positions} positions")
        return self.logits_from(0, self.embed(tokens), start, cache, last_only)

    def logits_from(self, first_layer: int, x: torch.Tensor, start: int | torch.Tensor = 0,
                    cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits from the residual stream x (B, S, D) entering layer `first_layer`:
        re-running only the layers after a change (sensitivity measurements)."""
        rope = self.rotary(start, x.shape[1])
        for i in range(first_layer, len(self.model.layers)):
            x = self.model.layers[i](x, rope, start, cache)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        if self.lm_head is None:
            logits = _dense_head(x, self.model.embed_tokens.weight, None).to(self.dtype)
        elif isinstance(self.lm_head, nn.Linear):
            logits = _dense_head(x, self.lm_head.weight, self.lm_head.bias).to(self.dtype)
        else:  # packed: the kernels choose
            logits = self.lm_head(x.to(self.head_dtype)).to(self.dtype)
        cap = self.cfg.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def layer_inputs(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream entering each layer (no cache, positions from 0)."""
        x = self.embed(tokens)
        rope = self.rotary(0, tokens.shape[1])
        inputs = []
        for layer in self.model.layers:
            inputs.append(x)
            x = layer(x, rope)
        return inputs

    @property
    def head_dtype(self) -> torch.dtype:
        if isinstance(self.lm_head, nn.Linear):
            return self.lm_head.weight.dtype
        return self.dtype

    def new_cache(self, batch: int, max_len: int, quantized: bool = False) -> KVCache:
        return KVCache(self.cfg, batch, max_len, self.dtype, self.device, quantized)
