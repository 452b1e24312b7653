"""The decode step compiled ahead of time (torch.export + AOTInductor), for `--aot`.

A step compiled this way runs as one C++ function: no Python between its kernels, no
guard checks on the ~1,000 tensors of a packed model, no frame evaluation. On the
bundled model on 2 CPU cores that gave 1.4-1.7x the tokens/s of torch.compile's step
(`benchmarks/decode.py`). The price: a compile of ~25 s per model and cache size in
each process (nothing is cached on disk, since the compiled library holds a copy of the
weights, which is also why the weights take twice their memory while it is loaded), and
a KV cache of a fixed length: the cache is allocated in buckets of `BUCKET` positions,
one compiled step per bucket.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from compress.errors import CompressError, first_line
from compress.progress import status

BUCKET = 256


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


def compiled_step(model: nn.Module, cache) -> Callable[[torch.Tensor, int, object],
                                                        torch.Tensor]:
    """`model`'s decode step for caches shaped like `cache` (batch 1, float KV), compiled
    ahead of time once per model and cache length: step(tokens (1, 1), position, cache)
    -> logits (1, 1, vocab)."""
    if cache.quantized or cache.batch != 1:
        raise ValueError("the ahead-of-time step serves batch 1 with a float KV cache")
    compiled = model.__dict__.get("_aot_steps", {}).get(cache.max_len)
    if compiled is None:
        compiled = _compile(model, cache)
        # stored after compiling: export puts the module's attributes back as they were
        # (with its work directory: the loaded library's files last as long as the model)
        model.__dict__.setdefault("_aot_steps", {})[cache.max_len] = compiled  # not a submodule
    runner = compiled[0]

    def step(tokens: torch.Tensor, position: int, kv) -> torch.Tensor:
        return runner(tokens, torch.tensor(position), kv.k, kv.v)
    return step


def _compile(model: nn.Module, cache) -> tuple[Callable, tempfile.TemporaryDirectory]:
    workdir = tempfile.TemporaryDirectory(prefix="compress-aot-")
    tokens = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    with torch.inference_mode():  # prepares the kernels (on first use) outside the export
        model(tokens, 0, model.new_cache(1, 1))
    example = (tokens, torch.tensor(0), cache.k, cache.v)
    status("compiling the decode step ahead of time (24 s for the bundled 135M model on 2 CPU "
           "threads: benchmarks/results/decode.json)")
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
    return runner, workdir
