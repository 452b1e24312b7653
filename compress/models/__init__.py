"""Models as data: the architecture table, opened model directories, our decoder modules.

    arch.py    the only place that knows families (names and layer structure)
    config.py  a decoder's numbers from config.json, as transformers reads them
    files.py   ModelFiles: a model directory opened once, tensors read on demand
    layers.py  norms, attention, MLP, decoder layer, KV cache, CausalLM
    load.py    ModelFiles -> CausalLM (dense or packed), shapes checked first
"""

from .arch import ARCHITECTURES, Architecture, Fold, architecture_for, supported_model_types
from .config import DecoderConfig
from .files import ModelFiles, open_model, require_finite
from .layers import CausalLM, DecoderLayer, KVCache, RMSNorm
from .load import (
    build,
    build_layer,
    check_shapes,
    default_dtype,
    embedding,
    load,
    prepare_cpu_kernel,
    rotary,
)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "CausalLM",
    "DecoderConfig",
    "DecoderLayer",
    "Fold",
    "KVCache",
    "ModelFiles",
    "RMSNorm",
    "architecture_for",
    "build",
    "build_layer",
    "check_shapes",
    "default_dtype",
    "embedding",
    "load",
    "open_model",
    "prepare_cpu_kernel",
    "require_finite",
    "rotary",
    "supported_model_types",
]
