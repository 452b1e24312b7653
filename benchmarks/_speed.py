"""Timing helpers shared by the kernel and decode benchmarks (CPU)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from compress.kernels import cpu, native

from compress import kernels


def best_seconds(fn: Callable[[], object], repeats: int = 5, min_time: float = 0.2) -> float:
    """Best per-call time over `repeats` batches, each at least `min_time` long."""
    fn()
    calls = 1
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, int(min_time / once))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def memory_bandwidth(gib: float = 1.0) -> dict:
    """Measured DRAM bandwidth: a streaming sum (read) and a copy (read + write) of a
    buffer far larger than the caches, best of 5 each."""
    x = torch.ones(int(gib * (1 << 30)) // 4)
    y = torch.empty_like(x)
    read = x.nbytes / best_seconds(lambda: x.sum(), repeats=5, min_time=0.0)
    copy = 2 * x.nbytes / best_seconds(lambda: y.copy_(x), repeats=5, min_time=0.0)
    return {"read_gb_s": read / 1e9, "copy_gb_s": copy / 1e9, "buffer_gib": gib}


class BandwidthLog:
    """DRAM read bandwidth sampled between measurements: on a shared VM it has swung 2x
    within minutes here (33 to 82 GB/s), so one sample says little. The roofline uses
    the highest sample, which makes the "% of roofline" figures conservative."""

    def __init__(self) -> None:
        self.samples: list[dict] = []

    def sample(self) -> dict:
        self.samples.append(memory_bandwidth())
        return self.samples[-1]

    @property
    def peak_read_gb_s(self) -> float:
        return max(s["read_gb_s"] for s in self.samples)

    def to_dict(self) -> dict:
        reads = [s["read_gb_s"] for s in self.samples]
        return {"read_gb_s": self.peak_read_gb_s, "read_gb_s_samples": reads,
                "copy_gb_s": max(s["copy_gb_s"] for s in self.samples),
                "buffer_gib": self.samples[0]["buffer_gib"],
                "roofline_uses": "the highest read sample"}


def prepared_bytes(kernel: kernels.Kernel) -> int:
    """Bytes a backend reads per matmul from its prepared weight (weights + scales)."""
    return payload_bytes(kernel.payload)


def payload_bytes(payload: object) -> int:
    """Bytes one matmul reads from a prepared weight of any backend."""
    return sum(t.nbytes for t in payload_tensors(payload))


def payload_tensors(payload: object) -> list[torch.Tensor]:
    """The tensors one matmul reads from a prepared weight of any backend."""
    if isinstance(payload, native.NativePrepared):
        parts = [payload.weight, payload.scales, payload.offsets]
    elif isinstance(payload, cpu.Int4Prepared):
        parts = [payload.packed, payload.scales_zeros]
    elif isinstance(payload, cpu.Int8Prepared):
        parts = [t for _, _, q, s in payload.segments for t in (q, s)]
    elif isinstance(payload, kernels.QuantizedWeight):
        parts = [payload.qweight, payload.scales, payload.zeros, payload.g_idx]
    else:
        raise TypeError(f"unknown prepared weight {type(payload).__name__}")
    return [t for t in parts if t is not None]


def read_seconds(tensors: list[torch.Tensor]) -> float:
    """Best time of reading `tensors` once each, in order, with one streaming reduction per
    tensor and nothing else: what a step built of these calls costs if its kernels did no
    arithmetic at all (reductions over int64 views, which run at the DRAM read speed of
    the float sum in memory_bandwidth; an odd tail of under 8 bytes is skipped)."""
    words = []
    for t in tensors:
        flat = t.detach().reshape(-1).view(torch.uint8)
        whole = flat.numel() // 8 * 8
        if whole:
            words.append(flat[:whole].view(torch.int64))

    def read() -> None:
        for w in words:
            w.sum()
    return best_seconds(read, repeats=5, min_time=0.1)
