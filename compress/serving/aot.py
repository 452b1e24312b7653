"""The decode step compiled ahead of time (torch.export + AOTInductor), for `--aot`.

A step compiled this way runs as one C++ function: no Python between its kernels, no
guard checks on the ~1,000 tensors of a packed model, no frame evaluation. On the
bundled model on 2 CPU cores that gave 1.4-1.7x the tokens/s of torch.compile's step
(`benchmarks/decode.py`). The price: a compile of a minute or so per checkpoint and cache
size, the weights twice in memory while it is loaded (the compiled library holds a copy),
and a KV cache of a fixed length: the cache is allocated in buckets of `BUCKET` positions,
one compiled step per bucket.

A compiled step is kept on disk (`<cache>/aot/`, see `compress.assets.cache_root`, or
COMPRESS_AOT_CACHE) under
a key naming the checkpoint's bytes, the cache length, the torch and compress versions
and the kernels, so the next process for the same checkpoint loads it in a second or
two instead of compiling. The package holds a copy of the weights, so only the
`KEEP` most recently used packages stay.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from compress.errors import CompressError, first_line
from compress.progress import status

BUCKET = 256
KEEP = 4  # compiled packages kept on disk, most recently used first


def cache_length(positions: int, max_positions: int) -> int:
    """The KV cache length for `positions`: rounded up to a bucket, capped at the model's
    positions plus the one spare the decoder keeps."""
    return min(-(-positions // BUCKET) * BUCKET, max_positions + 1)


class _Step(nn.Module):
    """One decode step with the KV cache's tensors as inputs (written in place)."""

    def __init__(self, model: nn.Module, cache) -> None:
        super().__init__()
        self.model = model
        self.template = cache
        self.limit = min(cache.max_len, model.cfg.max_positions)

    def forward(self, tokens: torch.Tensor, start: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> torch.Tensor:
        position = start.item()
        # the position stays symbolic: these bounds let the slices and checks resolve
        torch._check(position >= 0)
        torch._check(position < self.limit)
        cache = copy.copy(self.template)
        cache.k, cache.v = list(keys), list(values)
        return self.model(tokens, position, cache)


def compiled_step(model: nn.Module, cache, identity: str | None = None
                  ) -> Callable[[torch.Tensor, int, object], torch.Tensor]:
    """`model`'s decode step for caches shaped like `cache` (batch 1, float KV), compiled
    ahead of time once per model and cache length: step(tokens (1, 1), position, cache)
    -> logits (1, 1, vocab). With `identity` (`ModelFiles.identity()` of the checkpoint
    the model was built from) the compiled step is also kept on disk for later processes."""
    if cache.quantized or cache.batch != 1:
        raise ValueError("the ahead-of-time step serves batch 1 with a float KV cache")
    compiled = model.__dict__.get("_aot_steps", {}).get(cache.max_len)
    if compiled is None:
        stored = None if identity is None else _stored_package(model, cache, identity)
        compiled = _load_stored(stored) if stored is not None and stored.exists() else None
        if compiled is None:
            compiled = _compile(model, cache, stored)
        # stored after compiling: export puts the module's attributes back as they were
        # (with its work directory: the loaded library's files last as long as the model)
        model.__dict__.setdefault("_aot_steps", {})[cache.max_len] = compiled  # not a submodule
    runner = compiled[0]

    def step(tokens: torch.Tensor, position: int, kv) -> torch.Tensor:
        return runner(tokens, torch.tensor(position), kv.k, kv.v)
    return step


def cache_dir() -> Path:
    """COMPRESS_AOT_CACHE, else `aot/` in compress's cache."""
    from compress import assets

    return assets.cache_dir("aot", "COMPRESS_AOT_CACHE")


def _stored_package(model: nn.Module, cache, identity: str) -> Path:
    """Where the step for this checkpoint and cache length is kept: the key covers what
    the compiled code depends on besides the weights' bytes."""
    from compress import __version__
    from compress.kernels import native

    parts = [identity, str(cache.max_len), str(cache.k[0].dtype), str(model.device),
             torch.__version__, __version__, os.environ.get("COMPRESS_KERNEL", ""),
             native.isa() if model.device.type == "cpu" else ""]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]
    return cache_dir() / f"step-{key}.pt2"


def _load_stored(package: Path) -> tuple[Callable, None] | None:
    """The step kept at `package`, or None (then it is compiled again) if it will not load:
    a package from a killed write is never there (written under a temporary name), but
    one can still be damaged on disk."""
    status(f"loading the decode step compiled ahead of time from {package.parent}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner = torch._inductor.aoti_load_package(str(package))
    except Exception as e:  # a damaged package fails in many ways, deep inside
        status(f"the stored compiled step would not load ({type(e).__name__}); compiling again")
        with contextlib.suppress(OSError):
            package.unlink()
        return None
    with contextlib.suppress(OSError):
        os.utime(package)  # most recently used: kept longest
    return runner, None


def _keep_recent(directory: Path) -> None:
    packages = sorted(directory.glob("step-*.pt2"), key=lambda p: p.stat().st_mtime,
                      reverse=True)
    for old in packages[KEEP:]:
        with contextlib.suppress(OSError):
            old.unlink()


def _compile(model: nn.Module, cache, stored: Path | None = None
             ) -> tuple[Callable, tempfile.TemporaryDirectory]:
    workdir = tempfile.TemporaryDirectory(prefix="compress-aot-")
    tokens = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    with torch.inference_mode():  # prepares the kernels (on first use) outside the export
        model(tokens, 0, model.new_cache(1, 1))
    example = (tokens, torch.tensor(0), cache.k, cache.v)
    status("compiling the decode step ahead of time, once per checkpoint and cache length "
           "(24-60 s for the bundled 135M model on a 2-core machine: "
           "benchmarks/results/decode.json)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # export's notes on internals are not for users
            program = torch.export.export(_Step(model, cache).eval(), example, strict=False)
            package = torch._inductor.aoti_compile_and_package(
                program, package_path=str(Path(workdir.name) / "step.pt2"))
            runner = torch._inductor.aoti_load_package(package)
    except Exception as e:  # export and inductor fail in many ways, deep inside
        workdir.cleanup()
        raise CompressError(f"compiling the decode step ahead of time failed "
                            f"({type(e).__name__}: {first_line(e)[:200]}); run without "
                            "--aot") from e
    if stored is not None:
        _store(Path(package), stored)
    return runner, workdir


def _store(package: Path, stored: Path) -> None:
    """Copy the compiled package to `stored` (temporary name, then rename): a failure to
    keep it costs the next process a compile, never this one its tokens."""
    try:
        stored.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=stored.parent, prefix=".partial-", suffix=".pt2",
                                         delete=False) as tmp:
            partial = Path(tmp.name)
        shutil.copyfile(package, partial)
        os.replace(partial, stored)
    except OSError as e:
        status(f"could not keep the compiled step in {stored.parent} ({e.strerror or e}); "
               "the next run compiles again")
        with contextlib.suppress(OSError, UnboundLocalError):
            partial.unlink()
        return
    _keep_recent(stored.parent)
