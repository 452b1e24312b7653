"""A model directory opened once: config now, tensors when asked."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from compress import sources
from compress.errors import CompressError
from compress.formats import checkpoint, pack_quantized
from compress.quant import QuantizedWeight, QuantScheme

from .arch import Architecture, Fold
from .config import DecoderConfig, decoder_config


def require_finite(name: str, tensor: torch.Tensor, holder: str = "model") -> None:
    """Rounding or multiplying a NaN or Inf gives garbage silently: refuse, naming the
    tensor (`holder` says whose: "source model" when quantising, else "model")."""
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise CompressError(f"{name} holds {bad} NaN/Inf value{'s' * (bad > 1)}: the {holder} "
                            "is corrupt or overflowed its dtype; re-download or re-export it")


@dataclass
class ModelFiles:
    """A model directory opened lazily: config now, tensors when asked. Open it once per
    command (`open_model`) and hand the object on."""

    path: Path
    name: str
    config: dict
    arch: Architecture
    tensors: checkpoint.SafetensorsDir
    manifest: dict | None = None
    schemes: dict[str, QuantScheme] = field(default_factory=dict)

    def identity(self) -> str:
        """A sha256 naming these weights and this config, for caches of things derived from
        them (the --aot step): the manifest's file hashes where there is one, else each
        file's name, size and modification time."""
        digest = hashlib.sha256()
        if self.manifest is not None:
            digest.update(json.dumps(self.manifest["files"], sort_keys=True).encode())
        else:
            for name in sorted(["config.json", *self.tensors.files()]):
                stat = (self.path / name).stat()
                digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        return digest.hexdigest()

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

    @cached_property
    def hf_config(self):
        """transformers' config object for config.json (never remote code)."""
        from huggingface_hub.errors import StrictDataclassError
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path, trust_remote_code=False)
        # transformers checks every field of config.json (strict dataclasses, ValueError for
        # bad values); garbage in the fields it does not type-check fails inside it as
        # TypeError, LookupError or AttributeError (dtype [] is indexed, dtype "" is
        # getattr(torch, "")).
        except (StrictDataclassError, ValueError, TypeError, LookupError, AttributeError) as e:
            detail = " ".join(str(e).split())[:300]
            raise CompressError(f"config.json of {self.path} is rejected by transformers "
                                f"({type(e).__name__}: {detail}); fix or re-download it"
                                ) from None

    @cached_property
    def decoder_config(self) -> DecoderConfig:
        # the raw integers are checked before transformers parses the config
        return decoder_config(self.config, self.arch, lambda: self.hf_config)

    def linear_names(self) -> list[str]:
        """Every Linear inside the decoder layers, layer by layer, in execution order."""
        return [self.arch.layer_prefix(i) + n for i in range(self.num_layers)
                for n in self.layer_linears(i)]

    def gate_linears(self) -> list[str]:
        """Linears outside every group, which stay dense: shared experts' sigmoid gates
        (routers are not Linears in transformers' modelling code)."""
        gate = self.arch.moe.shared_gate_name if self.arch.moe else None
        return [self.arch.layer_prefix(i) + gate for i in range(self.num_layers)
                if gate and self._experts(i)]

    def layer_groups(self, index: int) -> tuple[tuple[str, ...], ...]:
        """Layer `index`'s Linear groups in true-sequential order (layer-relative names):
        a sparse layer's depend on its number of experts."""
        return self.arch.groups(self._experts(index))

    def layer_folds(self, index: int) -> tuple[Fold, ...]:
        """Layer `index`'s AWQ folds (`Architecture.folds`)."""
        return self.arch.folds(self._experts(index))

    def layer_writers(self, index: int) -> tuple[str, ...]:
        """Layer `index`'s Linears writing the residual stream (`Architecture.stream_writers`)."""
        return self.arch.stream_writers(self._experts(index))

    def _experts(self, index: int) -> int:
        return self.decoder_config.experts(index) if self.arch.moe else 0

    def layer_linears(self, index: int) -> tuple[str, ...]:
        return tuple(n for group in self.layer_groups(index) for n in group)

    def layer_of(self, name: str) -> int:
        """The decoder layer a module name belongs to."""
        head = self.arch.layers + "."
        index = name.removeprefix(head).split(".", 1)[0] if name.startswith(head) else ""
        if not index.isdigit() or int(index) >= self.num_layers:
            raise CompressError(f"{name} is not inside a decoder layer")
        return int(index)

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


def open_model(name_or_path: ModelFiles | str | Path | None, verify: bool = True) -> ModelFiles:
    """Open a model directory (HF or ours) or a bundled model, reading only config and
    headers (and checking a checkpoint's manifest hashes). An already opened model is
    returned as it is: a command opens each model once and passes the object on."""
    if isinstance(name_or_path, ModelFiles):
        return name_or_path
    path, name, config, arch = sources.identify(name_or_path)
    config_file = path / "config.json"
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
