"""Give freed memory back to the operating system between calibration steps.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MB),
so the mid-sized tensors of a calibration step (per-chunk activations, GPTQ's blocks,
per-expert inputs) then come from the heap, and the heap keeps the pages of whatever it
freed. Over a layer of many groups (a mixture of experts has two per expert) the process
then holds, as resident memory nobody uses, about as much again as what is live:
measured on a synthetic 8-expert Mixtral layer, peak RSS 2.07 GB against 1.60 GB with a
trim after each group, at the same speed (benchmarks/moe.py, docs/figures.md). A trim
after each group and each layer returns those pages; elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only: musl and others lack it
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed() -> None:
    """Return the heap's free pages to the OS (glibc `malloc_trim(0)`: the top of the heap
    and every whole free page inside it); a no-op where that call does not exist."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
