"""Choose and run the matmul implementation for packed weights.

Automatic choice: Triton on CUDA, torch's weight-only ops on CPU (cpu.py), the float32
reference otherwise or where the chosen backend cannot serve a weight's layout.
`COMPRESS_KERNEL=reference|cpu|triton|dense` forces one; a forced backend that cannot
serve a weight is an error naming why, never a silent fallback. `dense` is never chosen
automatically: it gives up the packed weights' memory saving for dense matmul speed.

Backends repack once (`prepare`) and then run many times (`run`); callers that keep
a Linear around (QuantLinear) hold the `Kernel` that `prepare` returns.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import cpu, reference
from .weights import QuantizedWeight

ENV = "COMPRESS_KERNEL"


class _Reference:
    """The oracle as a backend: dequantise in float32 on every call, multiply."""

    @staticmethod
    def unsupported(w: QuantizedWeight, device: torch.device) -> str | None:
        return None

    @staticmethod
    def prepare(w: QuantizedWeight) -> QuantizedWeight:
        return w

    @staticmethod
    def linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        return reference.linear(x, w.qweight, w.scales, w.zeros, w.g_idx, bits=w.bits,
                                group_size=w.group_size, in_features=w.in_features, bias=bias)


class _Dense:
    """Dequantise once per activation dtype, then plain `F.linear`: the speed of the
    unquantised model's matmuls (faster than our Triton kernels on a GPU today, see
    benchmarks/README.md) at the unquantised model's memory, held beside the packed
    weights. For users who quantised for quality or for a later deployment, not for
    memory."""

    @staticmethod
    def unsupported(w: QuantizedWeight, device: torch.device) -> str | None:
        return None

    @staticmethod
    def prepare(w: QuantizedWeight) -> _DenseWeights:
        return _DenseWeights(w)

    @staticmethod
    def linear(x: torch.Tensor, w: _DenseWeights, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w.dense(x.dtype), None if bias is None else bias.to(x.dtype))


class _DenseWeights:
    def __init__(self, packed: QuantizedWeight) -> None:
        self.packed = packed
        self._by_dtype: dict[torch.dtype, torch.Tensor] = {}

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._by_dtype:
            w = self.packed
            self._by_dtype[dtype] = reference.dequantize(
                w.qweight, w.scales, w.zeros, w.g_idx, bits=w.bits, group_size=w.group_size,
                in_features=w.in_features, dtype=dtype)
        return self._by_dtype[dtype]


def _triton() -> Any:
    try:
        from . import triton_qmm
    except ImportError:  # triton not installed: the backend is simply absent
        return None
    return triton_qmm


@functools.cache
def backends() -> dict[str, Any]:
    found: dict[str, Any] = {"reference": _Reference, "cpu": cpu, "dense": _Dense}
    triton_backend = _triton()
    if triton_backend is not None:
        found["triton"] = triton_backend
    return found


def requested() -> str:
    """The backend forced through COMPRESS_KERNEL ('' when unset)."""
    return os.environ.get(ENV, "").strip().lower()


def choose(w: QuantizedWeight, device: torch.device) -> str:
    """The backend that serves `w` on `device` (honours COMPRESS_KERNEL)."""
    available = backends()
    forced = requested()
    if forced:
        if forced not in available:
            raise ValueError(f"{ENV}={forced!r} is not available; choose one of: "
                             f"{', '.join(sorted(available))}")
        reason = available[forced].unsupported(w, device)
        if reason:
            raise ValueError(f"{ENV}={forced} cannot serve this weight: {reason}; unset "
                             f"{ENV} to let the dispatcher choose")
        return forced
    preferred = "triton" if device.type == "cuda" else "cpu"
    if preferred in available and available[preferred].unsupported(w, device) is None:
        return preferred
    return "reference"


@dataclass(frozen=True, eq=False)
class Kernel:
    """A weight prepared for one backend on one device."""

    backend: str
    device: torch.device
    forced: str
    payload: Any
    fn: Callable[..., torch.Tensor]

    @property
    def implementation(self) -> str:
        """The backend, and for the CPU backend which kernel serves it (for reports)."""
        return cpu.implementation(self.payload) if self.backend == "cpu" else self.backend

    def serves(self, device: torch.device) -> bool:
        return device == self.device and requested() == self.forced


def prepare(w: QuantizedWeight, device: torch.device | None = None) -> Kernel:
    device = torch.device(device) if device is not None else w.device
    name = choose(w, device)
    backend = backends()[name]
    return Kernel(name, device, requested(), backend.prepare(w), backend.linear)


def run(kernel: Kernel, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) through the prepared kernel."""
    return kernel.fn(x, kernel.payload, bias)


def backend_name(w: QuantizedWeight, device: torch.device | None = None) -> str:
    return choose(w, torch.device(device) if device is not None else w.device)


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
    """One-shot y = x @ W.T (+ bias): prepares on every call, so hold a `Kernel` instead
    wherever the same weight is used twice."""
    w = QuantizedWeight(qweight, scales, zeros, g_idx, bits, group_size,
                        (qweight.shape[0], in_features))
    return run(prepare(w, x.device), x, bias)
