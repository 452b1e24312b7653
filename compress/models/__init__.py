"""Models as data: the architecture table, opened model directories, our decoder modules.

    arch.py    the only place that knows families (names and layer structure)
    config.py  a decoder's numbers from config.json, as transformers reads them
    files.py   ModelFiles: a model directory opened once, tensors read on demand
    layers.py  norms, attention, MLP, decoder layer, KV cache, CausalLM
    load.py    ModelFiles -> CausalLM (dense or packed), shapes checked first

Only the architecture table loads with the package; the rest (which needs torch) loads
on first use of one of its names, so that a command can check a model's config.json
before spending seconds importing torch. (`load` names both a module and its function:
`models.load` is the function; import the module only through this package.)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .arch import ARCHITECTURES, Architecture, Fold, architecture_for, supported_model_types

_LAZY = {
    "DecoderConfig": "config",
    "ModelFiles": "files", "open_model": "files", "require_finite": "files",
    "CausalLM": "layers", "DecoderLayer": "layers", "KVCache": "layers", "RMSNorm": "layers",
    **dict.fromkeys(("build", "build_layer", "check_shapes", "default_dtype", "embedding",
                     "load", "prepare_cpu_kernel", "rotary"), "load"),
}
_SUBMODULES = ("config", "files", "layers")  # `load` is the function (see above)


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name]}", __name__)
    # importing a submodule binds its name here: `load` goes back to being the function
    globals().update({n: getattr(module, n) for n, m in _LAZY.items() if m == _LAZY[name]})
    return globals()[name]


if TYPE_CHECKING:
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
