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
    if isinstance(payload, native.NativePrepared):
        return payload.nbytes
    if isinstance(payload, cpu.Int4Prepared):
        return payload.packed.nbytes + payload.scales_zeros.nbytes
    if isinstance(payload, cpu.Int8Prepared):
        return sum(q.nbytes + s.nbytes for _, _, q, s in payload.segments)
    if isinstance(payload, kernels.PackedWeights):
        return sum(t.nbytes for t in (payload.qweight, payload.scales, payload.zeros,
                                      payload.g_idx) if t is not None)
    raise TypeError(f"unknown prepared weight {type(payload).__name__}")
