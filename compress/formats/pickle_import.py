"""A safetensors copy of a model whose weights are pickle files (`pytorch_model.bin`,
sharded or not), for `--allow-pickle`.

Pickle can run code when loaded, so it is refused unless the user asks; even then it is
read with torch's weights-only unpickler, which accepts tensors and plain containers and
refuses any other object. The copy lives in our cache, keyed by the pickle files' bytes,
so the conversion happens once and later runs read safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import torch

from compress.errors import CompressError
from compress.formats import checkpoint

BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def pickle_files(model_dir: Path) -> list[str]:
    """The pickle weight files of a model directory (empty when it has safetensors)."""
    if (model_dir / checkpoint.SINGLE).is_file() or (model_dir / checkpoint.INDEX).is_file():
        return []
    index = model_dir / BIN_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CompressError(f"{index} is not a valid weight index ({e})") from None
        for shard in shards:
            if not isinstance(shard, str) or "/" in shard or shard in ("", ".", ".."):
                raise CompressError(f"{index} names a shard outside the model directory "
                                    f"({shard!r})")
        return shards
    return [BIN] if (model_dir / BIN).is_file() else []


def safetensors_copy(model_dir: str | Path, cache: Path) -> Path:
    """Directory holding `model_dir`'s config, tokenizer and its weights as safetensors."""
    model_dir = Path(model_dir)
    shards = pickle_files(model_dir)
    if not shards:
        return model_dir
    digest = hashlib.sha256()
    for shard in shards:
        path = model_dir / shard
        if not path.is_file():
            raise CompressError(f"weight file {path} is missing")
        digest.update(shard.encode() + checkpoint.sha256_file(path).encode())
    out = cache / "converted" / f"{model_dir.resolve().name}-{digest.hexdigest()[:16]}"
    if (out / checkpoint.INDEX).is_file():
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for n, shard in enumerate(shards, 1):
        tensors = _load_weights_only(model_dir / shard)
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        # tied or shared tensors are saved as separate copies: safetensors refuses aliases
        checkpoint.atomic_save_safetensors(
            partial / name, {k: v.contiguous().clone() for k, v in tensors.items()})
        weight_map.update(dict.fromkeys(tensors, name))
    checkpoint.atomic_write_json(partial / checkpoint.INDEX,
                                 {"metadata": {"converted_from": shards},
                                  "weight_map": weight_map})
    for item in model_dir.iterdir():
        if item.is_file() and item.name not in (*shards, BIN_INDEX):
            shutil.copyfile(item, partial / item.name)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def _load_weights_only(path: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap only reads the zip format; legacy (plain pickle) files load whole
        state = torch.load(path, map_location="cpu", weights_only=True,
                           mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CompressError(f"{path} holds objects other than tensors, which the weights-only "
                            f"loader refuses ({str(e).splitlines()[0][:120]}); export the "
                            "model as safetensors from trusted code instead") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CompressError(f"{path} is not a readable PyTorch weight file "
                            f"({str(e).splitlines()[0][:120]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"],
                                                                        dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CompressError(f"{path} does not hold a mapping of tensor names to tensors")
    return state
