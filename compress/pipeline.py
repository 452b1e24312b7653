"""Layer-by-layer quantisation of a checkpoint, resumable from the last finished layer.

For each decoder layer: read only that layer's tensors, quantise its Linears with the
recipe's method, write the layer as its own safetensors shard, free it. Progress is
recorded in `<out>.partial/progress.json` after every shard, keyed by a fingerprint of
the source and recipe, so re-running the same command after a crash skips finished
layers and a changed command starts over. The finished directory appears at `<out>`
with one rename.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import compress
from compress import models
from compress.errors import CompressError
from compress.formats import checkpoint, pack_quantized
from compress.progress import status, track
from compress.quant import QuantizedWeight, QuantScheme, rtn
from compress.recipe import Recipe

PROGRESS = "progress.json"

# method name -> pure function (weight [out, in], scheme, scale dtype) -> QuantizedWeight
QuantizeFn = Callable[[torch.Tensor, QuantScheme, torch.dtype], QuantizedWeight]
METHODS: dict[str, QuantizeFn] = {"rtn": rtn.quantize}


@dataclass(frozen=True)
class QuantizeResult:
    out: Path
    recipe: Recipe
    seconds: float
    fp16_bytes: int  # the source model's tensors at 2 bytes per element
    packed_bytes: int  # our safetensors shards on disk
    quantized_modules: int
    layers_resumed: int
    linear_fp16_bytes: int  # the quantised Linears at 2 bytes per weight
    linear_packed_bytes: int  # the same Linears packed: codes, scales, zeros, shapes

    @property
    def size_ratio(self) -> float:
        return self.packed_bytes / self.fp16_bytes


def plan(files: models.ModelFiles, recipe: Recipe) -> dict[str, QuantScheme]:
    """Module -> scheme for every Linear the recipe quantises, validated against shapes."""
    candidates = files.linear_names()
    if not files.tied_embeddings and f"{files.arch.lm_head}.weight" in files.tensors:
        candidates.append(files.arch.lm_head)
    schemes = {}
    for name in candidates:
        scheme = recipe.scheme_for(name)
        if scheme is not None:
            schemes[name] = scheme.fit(name, files.linear_shape(name)[1])
    if not schemes:
        raise CompressError("the recipe leaves every Linear dense; nothing to quantise "
                            "(check its ignore patterns)")
    return schemes


def fingerprint(files: models.ModelFiles, recipe: Recipe) -> str:
    """Identity of a run: source config and weight files, recipe, library version."""
    src = {
        "config": hashlib.sha256((files.path / "config.json").read_bytes()).hexdigest(),
        "weights": {f: (files.path / f).stat().st_size for f in files.tensors.files()},
        "recipe": recipe.to_dict(),
        "version": compress.__version__,
    }
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()


def quantize(model: str | Path | None, recipe: Recipe, out: str | Path,
             overwrite: bool = False) -> QuantizeResult:
    """Quantise `model` (directory or bundled name) with `recipe` into directory `out`."""
    started = time.perf_counter()
    out = Path(out)
    files = models.open_model(model)
    if files.is_quantized:
        raise CompressError(f"{files.path} is already quantised; start from the original "
                            "model directory")
    method = METHODS[recipe.method]
    checkpoint.check_output_dir(out, overwrite)
    schemes = plan(files, recipe)
    scale_dtype = files.dtype

    partial = out.with_name(out.name + ".partial")
    key = fingerprint(files, recipe)
    state = _load_progress(partial, key)
    partial.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_json(partial / PROGRESS, state)
    if state["done"]:
        status(f"Resuming {partial}: {len(state['done'])} layer shard(s) already written")

    n_layers = files.num_layers
    n_shards = n_layers + 1
    weight_map: dict[str, str] = {}
    resumed = 0
    for i in track(range(n_layers), desc=f"quantize {recipe.method}", total=n_layers,
                   unit="layer"):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        prefix = files.arch.layer_prefix(i)
        names = sorted(files.tensors.with_prefix(prefix))
        recorded = state["done"].get(shard)
        if recorded is not None and recorded == _shard_record(partial / shard):
            weight_map.update(_shard_names(partial / shard))
            resumed += 1
            continue
        tensors = _convert(files, names, schemes, method, scale_dtype)
        checkpoint.atomic_save_safetensors(partial / shard, tensors)
        weight_map.update(dict.fromkeys(tensors, shard))
        state["done"][shard] = _shard_record(partial / shard)
        checkpoint.atomic_write_json(partial / PROGRESS, state)
        del tensors

    layer_names = {n for i in range(n_layers)
                   for n in files.tensors.with_prefix(files.arch.layer_prefix(i))}
    rest = sorted(n for n in files.tensors.names() if n not in layer_names)
    last = f"model-{n_shards:05d}-of-{n_shards:05d}.safetensors"
    tensors = _convert(files, rest, schemes, method, scale_dtype)
    checkpoint.atomic_save_safetensors(partial / last, tensors)
    weight_map.update(dict.fromkeys(tensors, last))

    _write_metadata(files, recipe, schemes, partial, weight_map)
    (partial / PROGRESS).unlink()
    checkpoint.publish(partial, out, overwrite)

    fp16_bytes = sum(2 * math.prod(files.tensors.shape(n)) for n in files.tensors.names())
    packed_bytes = sum((out / f).stat().st_size for f in set(weight_map.values()))
    written = checkpoint.SafetensorsDir(out)
    linear_fp16 = sum(2 * math.prod(files.linear_shape(m)) for m in schemes)
    linear_packed = sum(written.nbytes(f"{m}.{suffix}") for m in schemes
                        for suffix in pack_quantized.SUFFIXES if f"{m}.{suffix}" in written)
    return QuantizeResult(out, recipe, time.perf_counter() - started, fp16_bytes, packed_bytes,
                          len(schemes), resumed, linear_fp16, linear_packed)


def _convert(files: models.ModelFiles, names: list[str], schemes: dict[str, QuantScheme],
             method: QuantizeFn, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors of one shard: quantised Linears packed, everything else copied."""
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        if module in schemes and leaf == "weight":
            qw = method(files.tensors.get(name), schemes[module], scale_dtype)
            tensors.update(pack_quantized.to_tensors(module, qw))
        else:
            tensors[name] = files.tensors.get(name)
    return tensors


def _write_metadata(files: models.ModelFiles, recipe: Recipe, schemes: dict[str, QuantScheme],
                    partial: Path, weight_map: dict[str, str]) -> None:
    config = dict(files.config)
    dense_linears = [n for n in [*files.linear_names(), files.arch.lm_head] if n not in schemes]
    config["quantization_config"] = pack_quantized.quantization_config(schemes, dense_linears)
    checkpoint.atomic_write_json(partial / "config.json", config)
    total = sum((partial / f).stat().st_size for f in set(weight_map.values()))
    checkpoint.atomic_write_json(partial / checkpoint.INDEX, {
        "metadata": {"total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    })
    side = checkpoint.copy_side_files(files.path, partial)
    checkpoint.atomic_write_bytes(partial / "recipe.yaml", recipe.to_yaml().encode())
    listed = ["config.json", checkpoint.INDEX, "recipe.yaml", *side, *set(weight_map.values())]
    source_info = files.path / "compress_source.json"
    manifest = {
        "format": "compress-checkpoint",
        "format_version": 1,
        "library": {"compress": compress.__version__, "torch": torch.__version__,
                    "compressed_tensors": pack_quantized.COMPRESSED_TENSORS_VERSION},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_model": {
            "name": files.name,
            "path": str(files.path.resolve()),
            "config_sha256": hashlib.sha256((files.path / "config.json").read_bytes()).hexdigest(),
            "source": json.loads(source_info.read_text()) if source_info.is_file() else None,
        },
        "recipe": recipe.to_dict(),
        "calibration": None,  # RTN uses no data
        "files": checkpoint.file_entries(partial, listed),
    }
    checkpoint.atomic_write_json(partial / checkpoint.MANIFEST, manifest)


def _load_progress(partial: Path, key: str) -> dict:
    fresh = {"fingerprint": key, "done": {}}
    f = partial / PROGRESS
    if not partial.exists():
        return fresh
    try:
        state = json.loads(f.read_text())
        if state.get("fingerprint") == key and isinstance(state.get("done"), dict):
            return state
    except (OSError, ValueError):
        pass
    status(f"{partial} is from a different or unreadable run; starting over")
    shutil.rmtree(partial)
    return fresh


def _shard_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return {"bytes": path.stat().st_size, "sha256": checkpoint.sha256_file(path)}


def _shard_names(path: Path) -> dict[str, str]:
    return dict.fromkeys(checkpoint.safetensors_keys(path), path.name)


