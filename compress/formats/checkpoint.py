"""Checkpoint directories: lazy safetensors reading, atomic writing, sha256 manifests.

A checkpoint we write is a plain Hugging Face model directory::

    config.json                      (+ quantization_config)
    model-0000i-of-0000n.safetensors one shard per decoder layer, one for the rest
    model.safetensors.index.json
    tokenizer files, generation_config.json   (copied from the source model)
    recipe.yaml                      the expanded recipe that produced it
    compress_manifest.json           library version, recipe, data hashes, sha256 of every file

It is assembled in a sibling `<out>.partial/` directory (every file written to a temp
name, then renamed) and becomes `<out>` with one rename, so a killed run never
leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from compress.errors import CompressError

MANIFEST = "compress_manifest.json"
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2,
                "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1,
                "F8_E5M2": 1}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")
# Files copied verbatim from a source model: tokenizer, chat template, generation defaults.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def _temp_beside(path: Path) -> str:
    """A temp file next to `path` (same filesystem, so the final rename is atomic)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; finished files get normal permissions
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory and a rename."""
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """safetensors file written to a temp name and renamed into place."""
    tmp = _temp_beside(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class SafetensorsDir:
    """Lazy, read-only view of the tensors of a model directory (one or many shards)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CompressError(f"{index} is not a valid safetensors index ({e})") from None
        elif (self.path / SINGLE).is_file():
            weight_map = None
        else:
            if any((self.path / p).exists() for p in PICKLE_WEIGHTS):
                raise CompressError(
                    f"{self.path} holds only pickle weights (pytorch_model.bin), which can run "
                    "code when loaded; convert it to safetensors first "
                    "(transformers: model.save_pretrained(dir, safe_serialization=True))"
                )
            raise CompressError(f"{self.path} has no safetensors weights "
                                f"({SINGLE} or {INDEX}); is it a model directory?")
        self._handles: dict[str, object] = {}
        if weight_map is None:
            weight_map = {k: SINGLE for k in self._open(SINGLE).keys()}  # noqa: SIM118
        self.weight_map: dict[str, str] = dict(weight_map)

    def _open(self, file: str):
        if file not in self._handles:
            path = self.path / file
            if not path.is_file():
                raise CompressError(f"weight file {path} is missing; the checkpoint is "
                                    "incomplete (re-download or re-quantise it)")
            try:
                self._handles[file] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CompressError(f"weight file {path} is corrupt or truncated ({e}); "
                                    "re-download or re-quantise it") from None
        return self._handles[file]

    def release(self) -> None:
        """Close the open files. Their memory maps keep every page read so far resident
        (and counted in RSS), so layer-by-layer readers call this after each layer."""
        self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CompressError(f"tensor {name} is missing from {self.path}; the checkpoint "
                                "is incomplete or not for this architecture")
        handle = self._open(self.weight_map[name])
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CompressError(f"tensor {name} in {self.path / self.weight_map[name]} could "
                                f"not be read ({e}); the file is corrupt") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor, read from the header without loading it."""
        if name not in self.weight_map:
            raise CompressError(f"tensor {name} is missing from {self.path}")
        return tuple(self._open(self.weight_map[name]).get_slice(name).get_shape())

    def nbytes(self, name: str) -> int:
        """Stored size of a tensor, from the header."""
        tensor_slice = self._open(self.weight_map[name]).get_slice(name)
        itemsize = _DTYPE_BYTES[tensor_slice.get_dtype()]
        return itemsize * math.prod(tensor_slice.get_shape())

    def with_prefix(self, prefix: str) -> Iterator[str]:
        return (k for k in self.weight_map if k.startswith(prefix))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (small internal files, e.g. saved activations)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CompressError(f"{path} is corrupt or truncated ({e})") from None


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names in one safetensors file (header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CompressError(f"{path} is corrupt or truncated ({e})") from None


def read_manifest(path: Path) -> dict | None:
    """The manifest of a checkpoint we wrote, or None for a plain HF directory."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise CompressError(f"{f} is not valid JSON ({e}); the checkpoint is corrupt") from None


def verify(path: Path, manifest: Mapping) -> None:
    """Check every file the manifest lists: present, same size, same sha256."""
    for name, entry in manifest.get("files", {}).items():
        if "/" in name or "\\" in name or name.startswith("."):
            raise CompressError(f"manifest of {path} names an unsafe file {name!r}")
        f = Path(path) / name
        if not f.is_file():
            raise CompressError(f"{f} is missing (listed in {MANIFEST}); the checkpoint is "
                                "incomplete: re-run compress quantize")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise CompressError(f"{f} is {size} bytes, the manifest says {entry['bytes']}: the "
                                "file is truncated or was changed; re-run compress quantize")
        if sha256_file(f) != entry["sha256"]:
            raise CompressError(f"{f} does not match its sha256 in {MANIFEST}: the file is "
                                "corrupt or was changed; re-run compress quantize")


def file_entries(path: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"bytes": (Path(path) / n).stat().st_size, "sha256": sha256_file(Path(path) / n)}
            for n in sorted(names)}


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer/generation files that exist in `src`; returns their names."""
    copied = []
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def publish(partial: Path, out: Path, overwrite: bool) -> None:
    """Move a finished `partial` directory to `out` in one rename (replacing it if allowed)."""
    out = Path(out)
    old = None
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        if not overwrite:
            raise CompressError(f"{out} already exists; pass --overwrite or choose another --out")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(partial, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail early (before any work) when `out` is taken."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompressError(f"--out {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CompressError(f"{out} already exists and is not empty; pass --overwrite or "
                            "choose another --out")
