"""A compact KV-cache decoder for Llama-family checkpoints, dense or packed.

Why our own model code rather than transformers' modules: the serving work ahead
(continuous batching, prefix reuse, speculative decoding, INT8 KV) needs control of the
cache layout and of every Linear, and the calibration pipeline runs single decoder
layers in isolation. Module names mirror the HF state dict (`model.layers.3.mlp.up_proj`)
so a checkpoint loads by name; a test holds the greedy tokens equal to transformers'.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from compress import models
from compress.errors import CompressError, first_line
from compress.nn import QuantLinear, SharedInputLinears
from compress.progress import status
from compress.quant import QuantizedWeight

# RoPE variants whose frequencies depend on the current sequence length are not static.
_DYNAMIC_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    max_positions: int
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, c: dict) -> DecoderConfig:
        heads = _config_int(c, "num_attention_heads")
        hidden = _config_int(c, "hidden_size")
        window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
        eps = c.get("rms_norm_eps", 1e-6)
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 <= eps < math.inf:
            raise CompressError(f"config.json has rms_norm_eps={eps!r}; expected a small "
                                "non-negative number such as 1e-6: fix or re-download it")
        return cls(
            vocab_size=_config_int(c, "vocab_size"),
            hidden_size=hidden,
            num_layers=_config_int(c, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=_config_int(c, "num_key_value_heads", heads),
            head_dim=_config_int(c, "head_dim", hidden // heads or None),
            norm_eps=float(eps),
            max_positions=_config_int(c, "max_position_embeddings", 2048),
            sliding_window=_config_int(c, "sliding_window") if window else None,
        )


def _config_int(c: dict, key: str, default: int | None = None) -> int:
    """config.json's `key` as a positive integer; `default` when it is absent or null."""
    value = c.get(key)
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CompressError(f"config.json has {key}={value!r}; expected a positive integer: "
                            "fix or re-download it")
    return value


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused op instead of eight: a decode step runs 61 of these
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


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


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, q_proj: nn.Module, k_proj: nn.Module,
                 v_proj: nn.Module, o_proj: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.qkv = SharedInputLinears()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        return self.o_proj(self.core(x, cos, sin, start, cache, layer))

    def core(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0,
             cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """Attention up to (not including) o_proj: (B, S, D) -> (B, S, heads * head_dim)."""
        b, s, _ = x.shape  # (B, S, D)
        c = self.cfg
        q, k, v = self.qkv(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(b, s, c.num_heads, c.head_dim).transpose(1, 2)  # (B, H, S, hd)
        k = k.view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q = (q * cos + rotate_half(q) * sin).to(x.dtype)
        k = (k * cos + rotate_half(k) * sin).to(x.dtype)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        mask = attention_mask(start, s, k.shape[2], c.sliding_window, x.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and s > 1, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, s, c.num_heads * c.head_dim)


def attention_mask(start: int | torch.Tensor, q_len: int, k_len: int, window: int | None,
                   device: torch.device) -> torch.Tensor | None:
    """Boolean mask (True = attend): [q_len, k_len] for an int start, None when plain
    causal suffices; [B, 1, q_len, k_len] over the whole cache for per-row starts (B,)."""
    if isinstance(start, torch.Tensor):
        q_pos = start[:, None, None, None] + torch.arange(q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        return allowed
    # export (compress.aot) traces one program for every position: it keeps the window
    windowed = window is not None and (torch.compiler.is_exporting() or k_len > window)
    if not windowed and (q_len == 1 or q_len == k_len):
        return None
    end = start + q_len  # keys cover positions end - k_len .. end - 1 (cache or not)
    q_pos = torch.arange(start, end, device=device)[:, None]
    k_pos = torch.arange(end - k_len, end, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


class MLP(nn.Module):
    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.gate_up = SharedInputLinears()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.hidden(x))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The input of down_proj: (B, S, D) -> (B, S, intermediate)."""
        gate, up = self.gate_up(x, self.gate_proj, self.up_proj)
        return F.silu(gate) * up


# The Linear groups of a layer, by the input they share, in execution order (the
# architecture entries in compress.models name the same groups).
ATTENTION_INPUT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
ATTENTION_OUTPUT = ("self_attn.o_proj",)
MLP_INPUT = ("mlp.gate_proj", "mlp.up_proj")
MLP_HIDDEN = ("mlp.down_proj",)


class DecoderLayer(nn.Module):
    def __init__(self, input_layernorm: RMSNorm, self_attn: Attention,
                 post_attention_layernorm: RMSNorm, mlp: MLP):
        super().__init__()
        self.input_layernorm, self.self_attn = input_layernorm, self_attn
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp

    def forward(self, x, cos, sin, start, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  quantize_group: Callable[[tuple[str, ...], Sequence[torch.Tensor]], None],
                  batch: int) -> torch.Tensor:
        """Run calibration samples x (N, S, D) through the layer in true-sequential order.

        Before each group of Linears sharing an input is used, `quantize_group(names,
        inputs)` gets that input (chunk by chunk, as a list) and may replace the group's
        weights; everything after it then sees the new weights. Each Linear runs once on
        its final weights, except gate/up on chunks whose wide output does not fit in the
        memory the attention outputs held (those are recomputed rather than stored).
        Memory: x (rewritten in place into the layer's output) plus as much again.
        Returns x.
        """
        chunks = list(x.split(batch))
        attn_in = _Lazy(self.input_layernorm, chunks)  # cheap to recompute, as wide as x
        quantize_group(ATTENTION_INPUT, attn_in)
        attn = [self.self_attn.core(a, cos, sin) for a in attn_in]
        quantize_group(ATTENTION_OUTPUT, attn)
        for c, a in zip(chunks, attn, strict=True):
            c += self.self_attn.o_proj(a)  # residual stream after attention, in place
        del attn
        quantize_group(MLP_INPUT,
                       _Lazy(lambda c: self.post_attention_layernorm(c), chunks))
        # The wide MLP hidden is needed twice: for down_proj's Hessian, then for the output.
        # Keep as many chunks as fit in what the attention outputs held (x's size) and
        # recompute the rest: about 3/8 of them for Llama shapes, while activations stay
        # within twice x in both phases.
        hidden = _Lazy(lambda c: self.mlp.hidden(self.post_attention_layernorm(c)), chunks,
                       keep_bytes=x.numel() * x.element_size())
        quantize_group(MLP_HIDDEN, hidden)
        for i, c in enumerate(chunks):
            h = hidden.kept.pop(i, None)
            if h is None:
                h = self.mlp.hidden(self.post_attention_layernorm(c))
            c += self.mlp.down_proj(h)
        return x

    @torch.no_grad()
    def observe(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                record: Callable[[tuple[str, ...], torch.Tensor], None], batch: int) -> None:
        """Pass every Linear group's input, chunk by chunk, to `record(names, input)`.

        The layer as it stands (nothing replaced) on samples x (N, S, D), left untouched:
        the statistics pass of methods that transform a layer before rounding it.
        """
        for c in x.split(batch):
            a = self.input_layernorm(c)
            record(ATTENTION_INPUT, a)
            attn = self.self_attn.core(a, cos, sin)
            del a
            record(ATTENTION_OUTPUT, attn)
            m = self.post_attention_layernorm(c + self.self_attn.o_proj(attn))
            del attn
            record(MLP_INPUT, m)
            record(MLP_HIDDEN, self.mlp.hidden(m))


class _Lazy(Sequence):
    """A list whose items are computed when read, so wide activations are never all held.

    Items that fit in `keep_bytes` are also kept in `kept` (index -> item) for a later pass.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], items: list[torch.Tensor],
                 keep_bytes: int = 0):
        self.fn, self.items, self.keep_bytes = fn, items, keep_bytes
        self.kept: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        if i in self.kept:
            return self.kept[i]
        item = self.fn(self.items[i])
        if item.nbytes <= self.keep_bytes:
            self.kept[i] = item
            self.keep_bytes -= item.nbytes
        return item


class Backbone(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding, layers: list[DecoderLayer], norm: RMSNorm):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class Rotary(nn.Module):
    """cos/sin tables (S, head_dim) for positions start..start+S-1; (B, 1, S, head_dim)
    for per-row starts (B,)."""

    def __init__(self, inv_freq: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scale = scale

    def forward(self, start: int | torch.Tensor,
                length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(start, torch.Tensor):
            pos = (start[:, None, None] + torch.arange(length, device=start.device)[:, None]
                   ).to(torch.float32)  # (B, S, 1)
            freqs = (pos * self.inv_freq).unsqueeze(1)  # (B, 1, S, hd/2)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos() * self.scale, emb.sin() * self.scale
        pos = torch.arange(start, start + length, device=self.inv_freq.device,
                           dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scale, emb.sin() * self.scale


class CausalLM(nn.Module):
    """tokens (B, S) at positions start..start+S-1 -> logits (B, S, vocab).

    `dtype` is the compute dtype of the residual stream and KV cache. The embedding (and
    the tied output head) may be stored in another dtype: see `build`.
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
        x = self.model.embed_tokens(tokens).to(self.dtype)
        return self.logits_from(0, x, start, cache, last_only)

    def logits_from(self, first_layer: int, x: torch.Tensor, start: int | torch.Tensor = 0,
                    cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits from the residual stream x (B, S, D) entering layer `first_layer`:
        re-running only the layers after a change (sensitivity measurements)."""
        cos, sin = self.rotary(start, x.shape[1])
        for i in range(first_layer, len(self.model.layers)):
            x = self.model.layers[i](x, cos, sin, start, cache, i)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        if self.lm_head is None:
            head = self.model.embed_tokens.weight
            return F.linear(x.to(head.dtype), head).to(self.dtype)
        return self.lm_head(x.to(self.head_dtype)).to(self.dtype)

    def layer_inputs(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream entering each layer (no cache, positions from 0)."""
        x = self.model.embed_tokens(tokens).to(self.dtype)
        cos, sin = self.rotary(0, tokens.shape[1])
        inputs = []
        for i, layer in enumerate(self.model.layers):
            inputs.append(x)
            x = layer(x, cos, sin, 0, None, i)
        return inputs

    @property
    def head_dtype(self) -> torch.dtype:
        if isinstance(self.lm_head, nn.Linear):
            return self.lm_head.weight.dtype
        return self.dtype

    def new_cache(self, batch: int, max_len: int, quantized: bool = False) -> KVCache:
        return KVCache(self.cfg, batch, max_len, self.dtype, self.device, quantized)


def kernel_backends(model: nn.Module) -> list[str]:
    """Kernel implementations that served the packed matmuls so far (empty for a dense model)."""
    found = set()
    for module in model.modules():
        candidates = [module, *(v for v in vars(module).values()
                                if isinstance(v, SharedInputLinears))]
        found.update(c.implementation for c in candidates
                     if isinstance(c, QuantLinear | SharedInputLinears) and c.implementation)
    return sorted(found)


# ------------------------------------------------------------------------ loading


def default_dtype(device: torch.device | str) -> torch.dtype:
    """float32 on CPU (half-precision matmuls are slow there); float16 on GPUs."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


def _linear(files: models.ModelFiles, name: str, dtype: torch.dtype, device) -> nn.Module:
    weight = files.linear_weight(name)
    bias = files.optional(f"{name}.bias")
    if bias is not None:
        models.require_finite(f"{name}.bias", bias)
        bias = bias.to(device=device, dtype=dtype)
    # The float tensors a forward multiplies by: a NaN or Inf there (a bit flip that
    # kept the file's structure) would come out as NaN text, not as an error. (Packed
    # scales are range-checked when read.)
    if isinstance(weight, QuantizedWeight):
        moved = QuantizedWeight(
            weight.qweight.to(device), weight.scales.to(device),
            None if weight.zeros is None else weight.zeros.to(device),
            None if weight.g_idx is None else weight.g_idx.to(device),
            weight.bits, weight.group_size, weight.shape, weight.symmetric)
        return QuantLinear(moved, bias)
    models.require_finite(f"{name}.weight", weight)
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def rope_frequencies(path: Path, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scale, computed by transformers for the config."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        params = getattr(config, "rope_parameters", None) or {
            "rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            theta = params.get("rope_theta")
            if isinstance(theta, bool) or not isinstance(theta, int | float) or not (
                    1 < theta < math.inf):
                raise CompressError(f"config.json of {path} has rope_theta={theta!r}; expected "
                                    "a number above 1 such as 10000.0: fix or re-download it")
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
            return 1.0 / (float(theta) ** exponents), 1.0
        if rope_type in _DYNAMIC_ROPE or rope_type not in ROPE_INIT_FUNCTIONS:
            raise CompressError(f"RoPE type {rope_type!r} is not supported by the decoder; "
                                "supported: default, linear, llama3, yarn")
        inv, scale = ROPE_INIT_FUNCTIONS[rope_type](config)
        return inv.to(torch.float32), float(scale)
    # transformers checks every field of config.json (strict dataclasses, ValueError for bad
    # values); garbage in the fields it does not type-check fails inside it as TypeError,
    # LookupError or AttributeError (dtype [] is indexed, dtype "" is getattr(torch, "")).
    except (StrictDataclassError, ValueError, TypeError, LookupError, AttributeError) as e:
        detail = " ".join(str(e).split())[:300]
        raise CompressError(f"config.json of {path} is rejected by transformers "
                            f"({type(e).__name__}: {detail}); fix or re-download it") from None


def build_layer(files: models.ModelFiles, index: int, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> DecoderLayer:
    """Decoder layer `index` alone, from its own tensors only."""
    cfg = DecoderConfig.from_hf(files.config)
    arch = files.arch
    p = arch.layer_prefix(index)
    lin = {n: _linear(files, p + n, dtype, device) for n in arch.layer_linears}
    attn = Attention(cfg, lin["self_attn.q_proj"], lin["self_attn.k_proj"],
                     lin["self_attn.v_proj"], lin["self_attn.o_proj"])
    mlp = MLP(lin["mlp.gate_proj"], lin["mlp.up_proj"], lin["mlp.down_proj"])
    return DecoderLayer(_norm(files, p + arch.norms[0], cfg, dtype, device), attn,
                        _norm(files, p + arch.norms[1], cfg, dtype, device), mlp)


def _norm(files: models.ModelFiles, name: str, cfg: DecoderConfig, dtype: torch.dtype,
          device) -> RMSNorm:
    weight = files.tensors.get(f"{name}.weight")
    models.require_finite(f"{name}.weight", weight)
    return RMSNorm(weight.to(device=device, dtype=dtype), cfg.norm_eps)


def embedding(files: models.ModelFiles, dtype: torch.dtype, device="cpu") -> nn.Embedding:
    weight = files.tensors.get(f"{files.arch.embed}.weight")
    models.require_finite(f"{files.arch.embed}.weight", weight)
    weight = weight.to(device=device, dtype=dtype)
    if weight.dim() != 2:
        raise CompressError(f"{files.arch.embed}.weight has shape {tuple(weight.shape)}; "
                            "expected a 2-D embedding table: the checkpoint is corrupt")
    module = nn.Embedding(weight.shape[0], weight.shape[1], device="meta")
    module.weight = nn.Parameter(weight, requires_grad=False)
    return module


def rotary(files: models.ModelFiles, device="cpu") -> Rotary:
    inv_freq, scale = rope_frequencies(files.path, DecoderConfig.from_hf(files.config).head_dim)
    return Rotary(inv_freq.to(device), scale)


def prepare_cpu_kernel() -> str | None:
    """Build our CPU matmul kernel if this machine has not yet (saying so: it takes ~10 s
    once), and say why not when it cannot be used. Returns that reason, or None."""
    from compress.kernels import native

    if not native.disabled() and not native.built():
        status("Building the CPU kernel for packed weights (first use on this machine)…")
    reason = native.unavailable()
    if reason and not native.disabled():
        status(f"CPU kernel unavailable ({reason}); using torch's slower int4/int8 ops")
    return reason


def default_head_dtype(files: models.ModelFiles, device: torch.device | str,
                       dtype: torch.dtype) -> torch.dtype:
    """Dtype of the embedding and a dense output head.

    A packed checkpoint on CPU keeps them as stored when that is half precision: its
    matmuls already take 16-bit activations (W4A16), and the head, read in full for every
    token, is then the largest tensor of a small model: 113 MB in float32 vs 57 MB in
    float16 for SmolLM2's 49152 x 576, a 9.3 ms vs 1.8 ms GEMV here. Dense checkpoints
    compute in `dtype` throughout, to stay exact against transformers.
    """
    stored = files.dtype
    if (files.is_quantized and torch.device(device).type == "cpu"
            and stored in (torch.float16, torch.bfloat16) and dtype == torch.float32):
        return stored
    return dtype


def check_shapes(files: models.ModelFiles, cfg: DecoderConfig) -> None:
    """config.json against the stored shape of every Linear (a packed one's weight_shape,
    which its packed tensors are checked against when read), norm, bias and the embedding,
    before anything is sized from the config (RoPE tables from head_dim) or a mismatch
    (a damaged or swapped tensor in any layer, another model's config) fails mid-forward
    as a torch shape error."""
    arch = files.arch
    q_out, kv_out, hidden = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                             cfg.hidden_size)
    p = arch.layer_prefix(0)
    q = files.linear_shape(p + "self_attn.q_proj")
    k = files.linear_shape(p + "self_attn.k_proj")
    if q != (q_out, hidden) or k != (kv_out, hidden) or cfg.num_heads % cfg.num_kv_heads:
        raise CompressError(
            f"config.json of {files.path} does not match its weights: {cfg.num_heads} heads, "
            f"{cfg.num_kv_heads} key/value heads of {cfg.head_dim} and hidden size "
            f"{hidden} need q_proj {(q_out, hidden)} and k_proj {(kv_out, hidden)}, the "
            f"weights have {q} and {k}; re-download the model or re-quantise it")
    # absent from a config: every layer must agree with layer 0
    inter = _config_int(files.config, "intermediate_size",
                        files.linear_shape(p + "mlp.gate_proj")[0])
    want = {"self_attn.q_proj": (q_out, hidden), "self_attn.k_proj": (kv_out, hidden),
            "self_attn.v_proj": (kv_out, hidden), "self_attn.o_proj": (hidden, q_out),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter)}
    for i in range(cfg.num_layers):
        p = arch.layer_prefix(i)
        for n in arch.layer_linears:
            _check_linear(files, p + n, want[n])
        for n in arch.norms:
            _check_tensor(files, f"{p}{n}.weight", (hidden,))
    _check_tensor(files, f"{arch.final_norm}.weight", (hidden,))
    _check_tensor(files, f"{arch.embed}.weight", (cfg.vocab_size, hidden))
    if not files.tied_embeddings:
        _check_linear(files, arch.lm_head, (cfg.vocab_size, hidden))


def _check_linear(files: models.ModelFiles, name: str, want: tuple[int, int]) -> None:
    packed = name in files.schemes
    stored = f"{name}.weight_shape" if packed else f"{name}.weight"
    have = files.linear_shape(name)
    if have != want:
        _mismatch(files, stored, f"{'says' if packed else 'is'} {have}", want)
    if f"{name}.bias" in files.tensors:
        _check_tensor(files, f"{name}.bias", (want[0],))


def _check_tensor(files: models.ModelFiles, name: str, want: tuple[int, ...]) -> None:
    have = files.tensors.shape(name)
    if have != want:
        _mismatch(files, name, f"is {have}", want)


def _mismatch(files: models.ModelFiles, tensor: str, have: str, want: tuple) -> NoReturn:
    shard = files.tensors.weight_map.get(tensor, "?")
    raise CompressError(f"{tensor} in {files.path / shard} {have}, but config.json implies "
                        f"{want}: the file is damaged or does not belong to this config; "
                        "re-download the model or re-quantise it")


def build(files: models.ModelFiles, device: torch.device | str = "cpu",
          dtype: torch.dtype | None = None, head_dtype: torch.dtype | None = None) -> CausalLM:
    """Instantiate the decoder from an opened model directory (dense or packed).

    `head_dtype` (embedding and output head) defaults to `default_head_dtype`; pass
    `dtype` to compute the head exactly like the rest."""
    dtype = dtype or default_dtype(device)
    outer = head_dtype or default_head_dtype(files, device, dtype)
    if files.is_quantized and torch.device(device).type == "cpu":
        prepare_cpu_kernel()
    cfg = DecoderConfig.from_hf(files.config)
    check_shapes(files, cfg)
    layers = [build_layer(files, i, dtype, device) for i in range(cfg.num_layers)]
    lm_head = None if files.tied_embeddings else _linear(files, files.arch.lm_head, outer,
                                                          device)
    backbone = Backbone(embedding(files, outer, device), layers,
                        _norm(files, files.arch.final_norm, cfg, dtype, device))
    return CausalLM(cfg, backbone, lm_head, rotary(files, device), dtype).eval()


def load(name_or_path: str | Path | None, device: torch.device | str = "cpu",
         dtype: torch.dtype | None = None,
         head_dtype: torch.dtype | None = None) -> tuple[CausalLM, models.ModelFiles]:
    files = models.open_model(name_or_path)
    return build(files, device, dtype, head_dtype), files


# ---------------------------------------------------------------------- generation


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise CompressError("max new tokens must be at least 1")
        if self.temperature < 0:
            raise CompressError("temperature must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise CompressError("top-k must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise CompressError("top-p must be in (0, 1]")


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab)."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = sampling_probs(logits, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution (B, vocab) that sampling with `params` (temperature > 0) draws from:
    temperature, then top-k, then top-p."""
    logits = logits.to(torch.float32) / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop tokens once the mass before them already reaches top_p (always keep one).
        drop = probs.cumsum(-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def compiled_step(model: CausalLM) -> Callable[..., torch.Tensor]:
    """`model` compiled by torch.compile for decode steps, built once per model.

    On CPU a decode step of a small model is mostly the dispatch of ~60 small torch ops
    per layer from Python; compiled, they become a few fused C++ loops around the matmul
    ops. The first step compiles (about a minute on 2 cores; inductor caches it on disk
    for later runs) and the second recompiles once with a symbolic position.
    """
    step = model.__dict__.get("_compiled_step")  # not a submodule: keep it out of modules()
    if step is None:
        step = torch.compile(model, dynamic=None)
        model.__dict__["_compiled_step"] = step
    return step


COMPILING_STEPS = 2  # the first decode step compiles, the second recompiles (symbolic pos)


def _compiled_call(step, *args, steady: bool) -> torch.Tensor:
    """One call of a `compiled_step`.

    `steady` calls (the same cache and shapes as a guarded call just before, only the
    symbolic position moving on) evaluate only the guards that tell compiled entries
    apart: checking every guard over the ~1,000 tensors of a packed model's kernels
    costs ~0.5 ms of a ~5 ms step.
    """
    if steady:
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return step(*args)
    try:
        with warnings.catch_warnings():  # inductor's notes on dtype mixing are not for users
            warnings.simplefilter("ignore", UserWarning)
            return step(*args)
    except Exception as e:  # compiler failures surface as many types, deep inside inductor
        raise CompressError(f"torch.compile failed ({type(e).__name__}: "
                            f"{first_line(e)[:200]}); it "
                            "needs a working C++ compiler on CPU; run without --compile") from e


@torch.inference_mode()
def generate(model: CausalLM, prompt: list[int], params: SamplingParams,
             compile: bool = False, kv_int8: bool = False, aot: bool = False
             ) -> Iterator[int]:
    """Yield new tokens one at a time (prefill once, then one cached step per token).

    `compile` runs the decode steps through `compiled_step`, `aot` through a step compiled
    ahead of time (compress.aot; the first decode step compiles it); the prefill stays
    eager. `kv_int8` keeps the KV cache in int8 (see KVCache)."""
    if compile and aot:
        raise CompressError("choose one of --compile and --aot")
    if aot and kv_int8:
        raise CompressError("--aot serves a float KV cache; drop --kv-cache int8")
    if not prompt:
        raise CompressError("the prompt is empty; give at least one token of text")
    total = len(prompt) + params.max_new_tokens
    if total > model.cfg.max_positions:
        raise CompressError(f"prompt ({len(prompt)}) + max new tokens "
                            f"({params.max_new_tokens}) exceeds the model's "
                            f"{model.cfg.max_positions} positions")
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(params.seed)
    # One spare position: the cache is never read in full, which would be a contiguous
    # slice, a new guard, and a third compile on the last step.
    length = total + 1
    if aot:
        from compress import aot as ahead_of_time  # imports this module

        length = ahead_of_time.cache_length(length, model.cfg.max_positions)
    cache = model.new_cache(1, length, quantized=kv_int8)
    tokens = torch.tensor([prompt], device=model.device)
    logits = model(tokens, 0, cache, last_only=True)[:, -1]
    step = compiled_step(model) if compile else model
    pos = len(prompt)
    for i in range(params.max_new_tokens):
        token = sample(logits, params, generator)
        yield int(token)
        if int(token) in params.stop_token_ids:
            return
        if aot:
            if i == 0:
                step = ahead_of_time.compiled_step(model, cache)
            logits = step(token.view(1, 1), pos, cache)[:, -1]
        elif compile:
            logits = _compiled_call(step, token.view(1, 1), pos, cache,
                                    steady=i >= COMPILING_STEPS)[:, -1]
        else:
            logits = step(token.view(1, 1), pos, cache)[:, -1]
        pos += 1
