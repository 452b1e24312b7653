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
import ctypes
import errno
import glob
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from compress.errors import CompressError
from compress.formats.manifest import check as check_manifest

MANIFEST = "compress_manifest.json"
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2,
                "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1,
                "F8_E5M2": 1}
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16}
# sample_sha256: tensors up to _SAMPLE_WHOLE bytes are read whole, of others two samples
# of at least _SAMPLE_BYTES each
_SAMPLE_WHOLE, _SAMPLE_BYTES = 64 << 10, 4 << 10
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


# OS errors while writing that the user can fix: the problem, and what to do.
_WRITE_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space, then re-run the same "
                   "command to continue"),
    errno.EDQUOT: ("disk quota exceeded", "free some space, then re-run the same command to "
                   "continue"),
    errno.EFBIG: ("file too large for the file size limit (ulimit -f) or the file system",
                  "raise the limit or write to another file system"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
    errno.EACCES: ("permission denied", "choose a writable location or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a writable location or fix its "
                  "permissions"),
}


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Within this block, an OS error the user can fix (disk full, read-only, permissions,
    file size limit) becomes one CompressError naming `path`, not a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_ERRORS:
            raise
        problem, fix = _WRITE_ERRORS[e.errno]
        raise CompressError(f"cannot write {path}: {problem}; {fix}") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory and a rename."""
    with writing(path):
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
    with writing(path):
        tmp = _temp_beside(path)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                      metadata={"format": "pt"})
            # safetensors writes its own 0600 temp file and renames it over `tmp`: the mode
            # set by _temp_beside is gone, so set it again (else shards end up 0600)
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            # safetensors' writer reports an OS error as text: "... (os error 28)"
            code = re.search(r"\(os error (\d+)\)", str(e))
            if isinstance(e, SafetensorError) and code is not None:
                raise OSError(int(code[1]), str(e)) from None
            raise


def _reason(e: BaseException) -> str:
    """A library's error text, fit for a one-line message: safetensors quotes a corrupt
    header's bytes, which may hold newlines (or megabytes)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:300] + "..."


def _check_file_name(name: object, listed_in: str) -> None:
    """A file that an index or manifest lists must be a plain name in the checkpoint's own
    directory: `../x` or `/etc/x` would make us read (or hash) a file outside it."""
    if (not isinstance(name, str) or not name or name.startswith(".") or not name.isprintable()
            or any(c in name for c in "/\\") or len(name.encode()) > 255):
        raise CompressError(f"{listed_in} names an unsafe file {name!r} (only plain file names "
                            "inside the checkpoint are allowed); re-download or re-quantise it")


class SafetensorsDir:
    """Lazy, read-only view of the tensors of a model directory (one or many shards)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise CompressError(f"{index} is not a valid safetensors index ({e}); "
                                    "re-download or re-quantise it") from None
            if not isinstance(weight_map, dict):
                raise CompressError(f"{index} is not a valid safetensors index (weight_map is "
                                    "not a mapping); re-download or re-quantise it")
            for file in weight_map.values():
                _check_file_name(file, str(index))
        elif (self.path / SINGLE).is_file():
            weight_map = None
        else:
            if any((self.path / p).exists() for p in PICKLE_WEIGHTS):
                raise CompressError(
                    f"{self.path} holds only pickle weights (pytorch_model.bin), which can run "
                    "code when loaded; convert it to safetensors first "
                    "(transformers: model.save_pretrained(dir, safe_serialization=True)), or "
                    "pass --allow-pickle to `compress quantize`"
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
                raise CompressError(f"weight file {path} is corrupt or truncated "
                                    f"({_reason(e)}); "
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
                                f"not be read ({_reason(e)}); the file is corrupt") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor, read from the header without loading it."""
        return tuple(self._slice(name).get_shape())

    def nbytes(self, name: str) -> int:
        """Stored size of a tensor, from the header."""
        tensor_slice = self._slice(name)
        dtype = tensor_slice.get_dtype()
        if dtype not in _DTYPE_BYTES:  # safetensors knows more (F4, C64, ...) than we write
            raise CompressError(f"tensor {name!r} in {self.path / self.weight_map[name]} has "
                                f"dtype {dtype}, which compress does not store; the file is "
                                "corrupt or not from compress quantize")
        return _DTYPE_BYTES[dtype] * math.prod(tensor_slice.get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of a floating-point tensor, from the header."""
        stored = self._slice(name).get_dtype()
        if stored not in _FLOAT_DTYPES:
            raise CompressError(f"tensor {name!r} in {self.path / self.weight_map[name]} has "
                                f"dtype {stored}; a floating-point tensor was expected")
        return _FLOAT_DTYPES[stored]

    def _slice(self, name: str):
        if name not in self.weight_map:
            raise CompressError(f"tensor {name} is missing from {self.path}")
        handle = self._open(self.weight_map[name])
        try:  # the index may name a tensor that its file lacks
            return handle.get_slice(name)
        except SafetensorError as e:
            raise CompressError(f"tensor {name!r} in {self.path / self.weight_map[name]} could "
                                f"not be read ({_reason(e)}); the file is corrupt") from None

    def with_prefix(self, prefix: str) -> Iterator[str]:
        return (k for k in self.weight_map if k.startswith(prefix))

    def sample_sha256(self) -> str:
        """sha256 of every tensor's name, dtype, shape and a sample of its values: all of a
        small tensor, else its first and middle rows (a few KB each).

        Sizes and headers are the same for another model of the same shapes (a fine-tune,
        another seed); its values are not, and a fine-tune or merged adapter changes nearly
        every value of a tensor it touches, so two rows of each tell them apart. Hashing
        every byte would read the whole model on each run; this reads a few KB a tensor."""
        h = hashlib.sha256()
        for name in sorted(self.weight_map):
            part = self._slice(name)
            shape, dtype = part.get_shape(), part.get_dtype()
            h.update(f"{name}\0{dtype}\0{shape}\0".encode())
            # a source model may hold dtypes we never write: sized at 8 bytes, not refused
            size = _DTYPE_BYTES.get(dtype, 8) * math.prod(shape)
            try:
                if size <= _SAMPLE_WHOLE:
                    samples = [self.get(name)]
                else:  # whole rows of at least _SAMPLE_BYTES (many elements of a 1-D one)
                    rows, mid = max(1, _SAMPLE_BYTES * shape[0] // size), shape[0] // 2
                    samples = [part[0:rows], part[mid:mid + rows]]
            except (SafetensorError, OSError) as e:
                raise CompressError(f"tensor {name} in {self.path / self.weight_map[name]} "
                                    f"could not be read ({_reason(e)}); the file is "
                                    "corrupt") from None
            for t in samples:
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.release()  # the pages read stay resident otherwise (see `release`)
        return h.hexdigest()


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (small internal files, e.g. saved activations)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CompressError(f"{path} is corrupt or truncated ({_reason(e)}); re-download or "
                            "re-create it") from None


def load_rows(path: Path, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop-1 of one tensor of a safetensors file, reading only those (a
    process's share of saved activations)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice(name)[start:stop].contiguous()
    except (SafetensorError, OSError) as e:
        raise CompressError(f"{path} is corrupt or truncated ({_reason(e)}); re-download or "
                            "re-create it") from None


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names in one safetensors file (header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CompressError(f"{path} is corrupt or truncated ({_reason(e)}); re-download or "
                            "re-create it") from None


def read_manifest(path: Path) -> dict | None:
    """The manifest of a checkpoint we wrote, with the fields its readers use checked, or
    None for a plain HF directory."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except (ValueError, RecursionError) as e:
        raise CompressError(f"{f} is not valid JSON ({e}); the checkpoint is corrupt") from None
    return check_manifest(data, str(f))


def verify(path: Path, manifest: Mapping) -> None:
    """Check every file the manifest lists: present, same size, same sha256."""
    for name, entry in manifest.get("files", {}).items():
        _check_file_name(name, f"manifest of {path}")
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
            with writing(Path(dst) / name):
                shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def publish(partial: Path, out: Path, overwrite: bool) -> None:
    """Move a finished `partial` directory to `out` in one rename (replacing it if allowed).

    A replaced `out` is swapped with `partial` in one step where the system can, so that a
    run killed meanwhile leaves `out` holding the old or the new checkpoint, never neither."""
    out = Path(out)
    with writing(out):
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            os.replace(partial, out)
        elif not overwrite:
            raise CompressError(f"{out} already exists; pass --overwrite or choose another --out")
        elif _exchange(partial, out):
            shutil.rmtree(partial, ignore_errors=True)  # now the old checkpoint
        else:  # two renames: killed between them, the old checkpoint is left at `old`
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(partial, out)
        # the old checkpoint, and any that a run killed in the fallback above left behind
        for stale in out.parent.glob(f".{glob.escape(out.name)}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the
    C library, kernel or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not glibc, or not Linux
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail early (before any work) when `out` is taken."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompressError(f"--out {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CompressError(f"{out} already exists and is not empty; pass --overwrite or "
                            "choose another --out")
