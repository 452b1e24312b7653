"""compress.memory: freed heap pages go back to the OS between calibration steps."""

from __future__ import annotations

import sys

import pytest
import torch

from compress import memory


def _anon_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(memory._malloc_trim() is None, reason="glibc's malloc_trim is absent")
def test_release_freed_returns_the_pages_the_heap_kept():
    # Freeing a 16 MB (mmapped) block raises glibc's mmap threshold to 16 MB: the 1 MB
    # tensors that follow come from the heap, and a live one above them stops the heap's
    # top from shrinking, so freeing them leaves their pages resident until a trim.
    torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
    blocks = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(96)]
    keep = torch.ones(1 << 20, dtype=torch.uint8)
    del blocks
    before = _anon_bytes()
    memory.release_freed()
    after = _anon_bytes()
    assert before - after >= 48 << 20, (before, after)
    assert keep.sum() == 1 << 20


def test_release_freed_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    memory.release_freed()  # nothing to call: no error


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc is Linux's")
def test_the_trim_is_found_on_this_linux():
    assert memory._malloc_trim() is not None
