"""Choose the matmul implementation for packed weights.

`COMPRESS_KERNEL=reference` forces one backend; with it unset the best available
backend for the device is used. Only the reference backend exists so far; the fast
CPU and Triton paths register here when they land.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from . import reference

LinearFn = Callable[..., torch.Tensor]

BACKENDS: dict[str, LinearFn] = {"reference": reference.linear}


def backend_name(device: torch.device) -> str:
    """The backend `linear` uses on `device` (honours COMPRESS_KERNEL)."""
    forced = os.environ.get("COMPRESS_KERNEL", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(
                f"COMPRESS_KERNEL={forced!r} is not available; choose one of: "
                f"{', '.join(sorted(BACKENDS))}"
            )
        return forced
    return "reference"


def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) straight from packed weights (arguments: see reference.py)."""
    fn = BACKENDS[backend_name(x.device)]
    return fn(x, qweight, scales, zeros, g_idx, bits=bits, group_size=group_size,
              in_features=in_features, bias=bias)
