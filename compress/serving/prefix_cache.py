"""Reuse of the keys and values of prompt prefixes that earlier requests already computed.

A request whose prompt starts with a cached prefix (a fixed system prompt, a few-shot
header) gets that prefix's KV entries copied into its slot and prefills only the rest.
Prefixes are matched in whole blocks of `block` tokens (so one stored prompt serves
every later prompt sharing any number of its leading blocks), on the exact token ids.
Entries are evicted least-recently-used beyond `budget_bytes`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from compress.models import KVCache

KV_FIELDS = ("k", "v", "k_scale", "v_scale")


@dataclass
class _Entry:
    length: int
    tensors: dict[str, list[torch.Tensor]]  # field -> per layer [kv_heads, length, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for ts in self.tensors.values() for t in ts)


class PrefixCache:
    def __init__(self, block: int = 16, budget_bytes: int = 256 << 20):
        if block < 1:
            raise ValueError("block must be at least 1 token")
        self.block, self.budget_bytes = block, budget_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # id -> entry, LRU order
        self._index: dict[tuple[int, ...], int] = {}  # block-aligned prefix -> entry id
        self._next_id = 0
        self.hits = self.reused_tokens = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def lookup(self, prompt: list[int]) -> tuple[int, int | None]:
        """(tokens reusable, entry) for the longest cached block-aligned prefix that leaves
        at least one prompt token to prefill (its logits give the first new token)."""
        n = (len(prompt) - 1) // self.block * self.block
        while n > 0:
            entry = self._index.get(tuple(prompt[:n]))
            if entry is not None:
                return n, entry
            n -= self.block
        return 0, None

    def load(self, entry: int, length: int, row: KVCache) -> None:
        """Copy the first `length` cached positions into a batch-1 cache row."""
        stored = self._entries[entry]
        self._entries.move_to_end(entry)
        for field in KV_FIELDS:
            for dst, src in zip(getattr(row, field) or (), stored.tensors.get(field, ()),
                                strict=True):
                dst[0, :, :length] = src[:, :length]
        self.hits += 1
        self.reused_tokens += length

    def store(self, prompt: list[int], row: KVCache) -> None:
        """Keep the whole blocks of `prompt` from a batch-1 cache row that holds its
        prefill, unless an entry already covers them."""
        n = len(prompt) // self.block * self.block
        if n == 0 or tuple(prompt[:n]) in self._index:
            return
        entry = _Entry(n, {field: [t[0, :, :n].clone() for t in getattr(row, field)]
                           for field in KV_FIELDS if getattr(row, field) is not None})
        if entry.nbytes > self.budget_bytes:
            return
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._entries[entry_id] = entry
        for m in range(self.block, n + 1, self.block):
            self._index[tuple(prompt[:m])] = entry_id  # newest wins on shared blocks
        while self.nbytes > self.budget_bytes:
            self._evict()

    def _evict(self) -> None:
        oldest, _ = self._entries.popitem(last=False)
        self._index = {k: v for k, v in self._index.items() if v != oldest}
