"""A decoder's numbers, from config.json as transformers reads it.

The integers every shape depends on are checked on the raw JSON first, with our own
one-line errors. Everything transformers normalises (per-layer attention types, RoPE
parameters per layer type, the defaults a family's config class fills in) is then read
from transformers' own config object for the family, so a field means here exactly what
it means to transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import CompressError

from .arch import Architecture

FULL, SLIDING = "full_attention", "sliding_attention"
DEFAULT_ROPE = "default"
# RoPE variants whose frequencies depend on the current sequence length are not static.
_DYNAMIC_ROPE = ("dynamic", "longrope")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")


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
    layer_types: tuple[str, ...] = ()  # per layer: FULL or SLIDING; () means all FULL
    sliding_window: int | None = None
    rope_keys: tuple[str, ...] = ()  # per layer: its RoPE table (a layer type, or default)
    activation: str = "silu"
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float | None = None
    norm_offset: float = 0.0
    qk_norm: str | None = None
    # Mixture of experts: per layer, its number of experts (0: a dense MLP)
    layer_experts: tuple[int, ...] = ()
    experts_per_token: int = 0
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to 1
    expert_intermediate: int = 0
    shared_expert_intermediate: int = 0  # 0: no shared expert

    def experts(self, layer: int) -> int:
        """How many experts layer `layer` routes between (0: a dense MLP)."""
        return self.layer_experts[layer] if self.layer_experts else 0

    @property
    def has_experts(self) -> bool:
        """Whether any layer is a mixture of experts."""
        return any(self.layer_experts)

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: it attends to every earlier position)."""
        sliding = self.layer_types and self.layer_types[layer] == SLIDING
        return self.sliding_window if sliding else None

    def rope_key(self, layer: int) -> str:
        return self.rope_keys[layer] if self.rope_keys else DEFAULT_ROPE


def config_int(c: dict, key: str, default: int | None = None) -> int:
    """config.json's `key` as a positive integer; `default` when it is absent or null."""
    value = c.get(key)
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CompressError(f"config.json has {key}={value!r}; expected a positive integer: "
                            "fix or re-download it")
    return value


def _optional_number(hf, key: str) -> float | None:
    value = getattr(hf, key, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0 < value < math.inf):
        raise CompressError(f"config.json has {key}={value!r}; expected a positive number "
                            "or null: fix or re-download it")
    return float(value)


def decoder_config(raw: dict, arch: Architecture, parsed: Callable[[], object]
                   ) -> DecoderConfig:
    """`raw`: config.json as parsed JSON; `parsed()`: transformers' config object for it,
    asked for only once the integers every shape depends on have passed our checks."""
    heads = config_int(raw, "num_attention_heads")
    hidden = config_int(raw, "hidden_size")
    layers = config_int(raw, "num_hidden_layers")
    eps = raw.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 <= eps < math.inf:
        raise CompressError(f"config.json has rms_norm_eps={eps!r}; expected a small "
                            "non-negative number such as 1e-6: fix or re-download it")
    head_dim = config_int(raw, "head_dim", hidden // heads or None)
    kv_heads = config_int(raw, "num_key_value_heads", heads)
    vocab = config_int(raw, "vocab_size")
    positions = config_int(raw, "max_position_embeddings", 2048)
    hf = parsed()
    window = getattr(hf, "sliding_window", None)
    if window == 0 and not isinstance(window, bool):  # Qwen2-MoE's config: no window
        window = None
    if window is not None:
        window = config_int({"sliding_window": window}, "sliding_window")
    types = _layer_types(hf, layers, window)
    activation = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu")
    if activation == "swish":
        activation = "silu"
    if activation not in ACTIVATIONS:
        raise CompressError(f"config.json's activation {activation!r} is not supported by the "
                            f"decoder; supported: {', '.join(ACTIVATIONS)}")
    if getattr(hf, "clip_qkv", None) is not None:
        raise CompressError(f"config.json sets clip_qkv={hf.clip_qkv!r}: the decoder does not "
                            "clamp q/k/v, so it would compute another function; not supported")
    scalar = _optional_number(hf, "query_pre_attn_scalar") if arch.query_pre_attn_scalar else None
    moe = _experts(raw, hf, layers) if arch.moe else {}
    return DecoderConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        norm_eps=float(eps),
        max_positions=positions,
        layer_types=types,
        sliding_window=window if SLIDING in types else None,
        rope_keys=types if _rope_by_layer_type(hf) else (),
        activation=activation,
        attn_scale=None if scalar is None else scalar ** -0.5,
        attn_softcap=_optional_number(hf, "attn_logit_softcapping") if arch.attn_softcap else None,
        final_softcap=(_optional_number(hf, "final_logit_softcapping") if arch.final_softcap
                       else None),
        embed_scale=math.sqrt(hidden) if arch.embed_scale else None,
        norm_offset=arch.norm_offset,
        qk_norm=arch.qk_norm,
        **moe,
    )


def _experts(raw: dict, hf, layers: int) -> dict:
    """The mixture-of-experts fields: experts per layer as transformers assigns them
    (Mixtral: every layer; Qwen-MoE: not the mlp_only_layers, and only every
    decoder_sparse_step-th), experts chosen per token, whether their weights are
    renormalised (Mixtral always; Qwen's norm_topk_prob), the experts' width."""
    key = "num_local_experts" if "num_local_experts" in raw else "num_experts"
    experts = config_int(raw, key)
    top_k = config_int(raw, "num_experts_per_tok")
    if top_k > experts:
        raise CompressError(f"config.json routes each token to {top_k} of {experts} experts; "
                            "num_experts_per_tok cannot exceed the experts: fix it")
    step = config_int(raw, "decoder_sparse_step", 1)
    dense = getattr(hf, "mlp_only_layers", None) or []
    if not isinstance(dense, list | tuple) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in dense):
        raise CompressError("config.json's mlp_only_layers must be a list of layer numbers; "
                            "fix it")
    width = "moe_intermediate_size" if "moe_intermediate_size" in raw else "intermediate_size"
    norm = getattr(hf, "norm_topk_prob", True)
    if not isinstance(norm, bool):
        raise CompressError(f"config.json has norm_topk_prob={norm!r}; expected true or "
                            "false: fix it")
    return {
        "layer_experts": tuple(0 if i in dense or (i + 1) % step else experts
                               for i in range(layers)),
        "experts_per_token": top_k,
        "norm_topk_prob": norm,
        "expert_intermediate": config_int(raw, width),
        "shared_expert_intermediate": (config_int(raw, "shared_expert_intermediate_size")
                                       if "shared_expert_intermediate_size" in raw else 0),
    }


def _layer_types(hf, layers: int, window: int | None) -> tuple[str, ...]:
    """Per-layer attention types as transformers assigns them: the config's layer_types
    (Gemma's interleaving, Qwen's max_window_layers) where the family has them, else every
    layer sliding when a window is set (Mistral, Phi-3)."""
    types = getattr(hf, "layer_types", None)
    if types is None:
        return (SLIDING if window else FULL,) * layers
    if (not isinstance(types, list | tuple) or len(types) != layers
            or any(t not in (FULL, SLIDING) for t in types)):
        raise CompressError(f"config.json's layer_types must list {FULL!r} or {SLIDING!r} for "
                            f"each of the {layers} layers; fix or re-download it")
    if SLIDING in types and window is None:
        raise CompressError("config.json has sliding-attention layers but no sliding_window; "
                            "fix or re-download it")
    return tuple(types)


def _rope_by_layer_type(hf) -> bool:
    """Gemma-3 keeps one set of RoPE parameters per layer type (local layers at base 1e4,
    global ones at 1e6); other families one set for all layers."""
    params = getattr(hf, "rope_parameters", None)
    types = set(getattr(hf, "layer_types", None) or ())
    return isinstance(params, dict) and bool(params) and set(params) <= {FULL, SLIDING} and (
        types <= set(params))


def rope_frequencies(hf, path: Path, head_dim: int) -> dict[str, tuple[torch.Tensor, float]]:
    """RoPE key -> (inverse frequencies, cos/sin scale), computed as transformers does
    for the config. The inverse frequencies may cover only part of head_dim (Phi-3's
    partial_rotary_factor): the rest of each head is not rotated."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf, "rope_parameters", None) or {
        "rope_type": DEFAULT_ROPE, "rope_theta": getattr(hf, "rope_theta", 10000.0)}
    keyed = _rope_by_layer_type(hf)
    tables = {}
    for key in sorted(params) if keyed else [DEFAULT_ROPE]:
        p = params[key] if keyed else params
        rope_type = p.get("rope_type", DEFAULT_ROPE) if isinstance(p, dict) else None
        if not isinstance(rope_type, str):
            raise CompressError(f"config.json of {path} has rope_parameters that are not a "
                                "mapping with a string rope_type: fix or re-download it")
        if rope_type == DEFAULT_ROPE:
            theta = p.get("rope_theta")
            if isinstance(theta, bool) or not isinstance(theta, int | float) or not (
                    1 < theta < math.inf):
                raise CompressError(f"config.json of {path} has rope_theta={theta!r}; expected "
                                    "a number above 1 such as 10000.0: fix or re-download it")
            factor = p.get("partial_rotary_factor", 1.0)
            if isinstance(factor, bool) or not isinstance(factor, int | float) or not (
                    0 < factor <= 1):
                raise CompressError(f"config.json of {path} has partial_rotary_factor="
                                    f"{factor!r}; expected a number in (0, 1]: fix it")
            dim = int(head_dim * factor)
            exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
            tables[key] = (1.0 / (float(theta) ** exponents), 1.0)
            continue
        if rope_type in _DYNAMIC_ROPE or rope_type not in ROPE_INIT_FUNCTIONS:
            raise CompressError(f"RoPE type {rope_type!r} is not supported by the decoder; "
                                "supported: default, linear, llama3, yarn")
        kwargs = {"layer_type": key} if keyed else {}
        try:
            inv, scale = ROPE_INIT_FUNCTIONS[rope_type](hf, **kwargs)
        except (KeyError, TypeError, ValueError, ArithmeticError) as e:
            raise CompressError(f"config.json of {path} has {rope_type} RoPE parameters "
                                f"transformers cannot use ({type(e).__name__}: {e}): fix "
                                "them") from None
        tables[key] = (inv.to(torch.float32), float(scale))
    return tables
