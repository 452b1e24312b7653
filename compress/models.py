"""The only module that knows architectures: where layers, Linears and norms live.

Adding an architecture is one `Architecture` entry in `ARCHITECTURES`. Everything else
(pipeline, quantisers, formats, decoder) asks this module by role, never by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress import assets
from compress.errors import CompressError
from compress.formats import checkpoint, pack_quantized
from compress.quant import QuantizedWeight, QuantScheme


@dataclass(frozen=True)
class Architecture:
    """Tensor-name layout of one family of decoder-only checkpoints (HF names).

    `linear_groups` lists a decoder layer's Linears in execution order, grouped by the
    input they share: the true-sequential order calibrated quantisers follow.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    linear_groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # For AWQ: the op producing each group's input, which absorbs the inverse of the group's
    # input-channel scales (a norm in its weight, a Linear in its output rows). A fold whose
    # shapes do not line up (v_proj -> o_proj under grouped-query attention) is skipped.
    scale_folds: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    )
    # Linears whose outputs become attention scores: output error is a poor proxy for them,
    # so AWQ's clipping search leaves them alone (as the reference implementation does).
    clip_exempt: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")

    @property
    def layer_linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers}.{index}."


# Llama, Mistral and Qwen2 share one layout; biases (Qwen2's q/k/v) are found from the
# tensors present, not from the name.
LLAMA_FAMILY = Architecture("llama-family", ("llama", "mistral", "qwen2"))
ARCHITECTURES = (LLAMA_FAMILY,)


def require_finite(name: str, tensor: torch.Tensor, holder: str = "model") -> None:
    """Rounding or multiplying a NaN or Inf gives garbage silently: refuse, naming the
    tensor (`holder` says whose: "source model" when quantising, else "model")."""
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise CompressError(f"{name} holds {bad} NaN/Inf value{'s' * (bad > 1)}: the {holder} "
                            "is corrupt or overflowed its dtype; re-download or re-export it")


def supported_model_types() -> list[str]:
    return sorted(t for arch in ARCHITECTURES for t in arch.model_types)


def architecture_for(model_type: str | None) -> Architecture:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise CompressError(
        f"unsupported architecture {model_type!r}; supported model types: "
        f"{', '.join(supported_model_types())}"
    )


@dataclass
class ModelFiles:
    """A model directory opened lazily: config now, tensors when asked."""

    path: Path
    name: str
    config: dict
    arch: Architecture
    tensors: checkpoint.SafetensorsDir
    manifest: dict | None = None
    schemes: dict[str, QuantScheme] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def dtype(self) -> torch.dtype:
        name = self.config.get("dtype") or self.config.get("torch_dtype") or "float32"
        dtype = getattr(torch, str(name), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise CompressError(f"config.json of {self.path} has an unsupported dtype {name!r}")
        return dtype

    @property
    def is_quantized(self) -> bool:
        return bool(self.schemes)

    @property
    def tied_embeddings(self) -> bool:
        stored = any(self.tensors.with_prefix(self.arch.lm_head + "."))
        return bool(self.config.get("tie_word_embeddings", False)) and not stored

    def linear_names(self) -> list[str]:
        """Every Linear inside the decoder layers, layer by layer, in execution order."""
        return [self.arch.layer_prefix(i) + n for i in range(self.num_layers)
                for n in self.arch.layer_linears]

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(out_features, in_features) of a Linear, dense or packed, without loading it.
        A tied output head has the embedding table's shape."""
        if name in self.schemes:
            return pack_quantized.read_shape(name, self.tensors.get)
        if name == self.arch.lm_head and self.tied_embeddings:
            name = self.arch.embed
        shape = self.tensors.shape(f"{name}.weight")
        if len(shape) != 2:
            raise CompressError(f"{name}.weight has shape {shape}; expected a 2-D Linear weight")
        return shape

    def linear_weight(self, name: str) -> torch.Tensor | QuantizedWeight:
        """A Linear's weight: a dense tensor, or the packed weight if quantised."""
        if name in self.schemes:
            return pack_quantized.from_tensors(name, self.tensors.get, self.tensors.__contains__,
                                               self.schemes[name])
        weight = self.tensors.get(f"{name}.weight")
        if weight.dim() != 2:
            raise CompressError(f"{name}.weight has shape {tuple(weight.shape)}; expected a 2-D "
                                "Linear weight: the checkpoint is corrupt")
        return weight

    def optional(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name) if name in self.tensors else None


def resolve(name_or_path: str | Path | None) -> tuple[Path, str]:
    """Directory and display name for a model argument (None: the bundled default)."""
    if name_or_path is None or str(name_or_path) in assets.BUNDLED_MODELS:
        name = assets.DEFAULT_MODEL if name_or_path is None else str(name_or_path)
        return assets.bundled_model_dir(name), name
    path = Path(name_or_path).expanduser()
    from compress import hub  # only when a Hub id is given does the client load

    if not path.exists() and hub.is_repo_id(str(name_or_path)):
        return hub.download(str(name_or_path)), str(name_or_path).split("/")[-1]
    if not path.exists():
        raise CompressError(
            f"model {str(name_or_path)!r} is neither a directory nor a bundled model "
            f"(bundled: {', '.join(assets.BUNDLED_MODELS)})"
        )
    if not path.is_dir():
        raise CompressError(f"{path} is a file; pass the model's directory")
    return path, path.resolve().name


def open_model(name_or_path: str | Path | None, verify: bool = True) -> ModelFiles:
    """Open a model directory (HF or ours) or a bundled model, reading only config and headers."""
    path, name = resolve(name_or_path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CompressError(f"{path} has no config.json; is it a Hugging Face model directory?")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, RecursionError) as e:
        raise CompressError(f"{config_file} is not valid JSON ({e}); re-download the model or "
                            "re-quantise it") from None
    if not isinstance(config, dict):
        raise CompressError(f"{config_file} does not hold a JSON object")
    arch = architecture_for(config.get("model_type"))
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CompressError(f"{config_file} lacks a positive integer {key!r} (it has "
                                f"{value!r}); re-download the model or re-quantise it")
    manifest = checkpoint.read_manifest(path)
    if manifest is not None and verify:
        checkpoint.verify(path, manifest)
    model = ModelFiles(path, name, config, arch, checkpoint.SafetensorsDir(path), manifest)
    # Checked against the weights before anything counts on it (1e18 layers would be as
    # many module names).
    last = arch.layer_prefix(model.num_layers - 1)
    if not any(model.tensors.with_prefix(last)):
        raise CompressError(f"{config_file} says {model.num_layers} layers, but the weights "
                            f"have no {last}*; the config does not belong to these weights")
    if config.get("quantization_config"):
        candidates = [*model.linear_names(), arch.lm_head]
        model.schemes = pack_quantized.parse_quantization_config(
            config["quantization_config"], candidates)
    return model
