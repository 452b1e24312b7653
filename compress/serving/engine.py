"""Continuous batching over a slot-based KV cache.

The cache is preallocated as `slots` rows of `max_len` positions (the memory bound:
`slots_for_budget` sizes it from a byte budget). Each running request owns one row; the
rows in use are kept contiguous (0..n-1), so a decode step runs every running request
at once on `cache.rows(n)` with per-row positions, and nothing is padded: each row
attends over its own length only. A finished request frees its row at once (the last
row's entries move into it), and a waiting request is admitted into a free row between
decode steps: prefilled alone (after copying any cached prompt prefix, see
prefix_cache.py), it joins the next decode step.

Why slots rather than pages: on CPU the attention over a contiguous row is one dense
call, and a request never outgrows a row sized for prompt + max new tokens, which the
engine checks at submission; paging would only pay off with many short requests
sharing a large pool, which the budget here does not see.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from compress.errors import CompressError
from compress.models import CausalLM, KVCache
from compress.serving.generation import SamplingParams, sample

from .prefix_cache import PrefixCache

_ids = itertools.count()


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    id: int = field(default_factory=lambda: next(_ids))


@dataclass
class Completion:
    """A finished request, with the timestamps (time.perf_counter) serving metrics use."""

    id: int
    prompt_tokens: int
    tokens: list[int]
    finish_reason: str  # "stop" (a stop token, included in `tokens`) or "length"
    submitted_at: float
    token_times: list[float]  # when each token of `tokens` was sampled
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.submitted_at

    @property
    def inter_token(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass
class _Running:
    request: Request
    submitted_at: float
    generator: torch.Generator | None
    position: int  # where the last sampled token goes in the cache
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    cached: int = 0

    def finish_reason(self) -> str | None:
        if self.tokens[-1] in self.request.params.stop_token_ids:
            return "stop"
        if len(self.tokens) >= self.request.params.max_new_tokens:
            return "length"
        return None

    def completion(self, reason: str) -> Completion:
        r = self.request
        return Completion(r.id, len(r.prompt), self.tokens, reason, self.submitted_at,
                          self.token_times, self.cached)


def slots_for_budget(model: CausalLM, max_len: int, budget_bytes: int,
                     quantized: bool = False) -> int:
    """How many rows of `max_len` positions a KV budget holds."""
    per_row = KVCache(model.cfg, 1, 1, model.dtype, "meta", quantized).nbytes * max_len
    return budget_bytes // per_row


class Engine:
    """Serves many requests on one model, `slots` at a time (see the module doc)."""

    def __init__(self, model: CausalLM, slots: int, max_len: int,
                 prefix_cache: PrefixCache | None = None, kv_int8: bool = False):
        if slots < 1:
            raise CompressError("the engine needs at least one slot (raise the KV budget)")
        if max_len > model.cfg.max_positions:
            raise CompressError(f"max length {max_len} exceeds the model's "
                                f"{model.cfg.max_positions} positions")
        self.model, self.slots, self.max_len = model, slots, max_len
        self.cache = model.new_cache(slots, max_len, quantized=kv_int8)
        self.prefix_cache = prefix_cache
        self.waiting: deque[tuple[Request, float]] = deque()
        self.running: list[_Running] = []  # row i of the cache is running[i]
        self.finished: list[Completion] = []

    def submit(self, request: Request) -> None:
        if not request.prompt:
            raise CompressError(f"request {request.id}: the prompt is empty")
        need = len(request.prompt) + request.params.max_new_tokens
        if need > self.max_len:
            raise CompressError(f"request {request.id}: prompt ({len(request.prompt)}) + max "
                                f"new tokens ({request.params.max_new_tokens}) exceeds the "
                                f"engine's {self.max_len} positions per slot")
        self.waiting.append((request, time.perf_counter()))

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def run(self) -> list[Completion]:
        """Serve until nothing is waiting or running; completions in finishing order."""
        for _ in self.steps():
            pass
        return self.finished

    def steps(self) -> Iterator[list[tuple[int, int]]]:
        """One scheduler step at a time: the (request id, token) pairs it produced."""
        while not self.idle:
            yield self.step()

    @torch.inference_mode()
    def step(self) -> list[tuple[int, int]]:
        """Admit waiting requests into free rows (prefill, first token), then one decode
        step for every running request; retire the finished ones."""
        emitted = []
        while self.waiting and len(self.running) < self.slots:
            emitted.append(self._admit(*self.waiting.popleft()))
        if self.running:
            emitted += self._decode()
        self._retire()
        return emitted

    def _admit(self, request: Request, submitted_at: float) -> tuple[int, int]:
        row = len(self.running)
        view = self.cache.row(row)
        cached, entry = (0, None) if self.prefix_cache is None else \
            self.prefix_cache.lookup(request.prompt)
        if entry is not None:
            self.prefix_cache.load(entry, cached, view)
        tokens = torch.tensor([request.prompt[cached:]], device=self.model.device)
        logits = self.model(tokens, cached, view, last_only=True)[:, -1]
        if self.prefix_cache is not None:
            self.prefix_cache.store(request.prompt, view)
        seed = request.params.seed
        generator = None if seed is None else \
            torch.Generator(device=self.model.device).manual_seed(seed)
        state = _Running(request, submitted_at, generator, len(request.prompt), cached=cached)
        self.running.append(state)
        return self._append(state, logits)

    def _decode(self) -> list[tuple[int, int]]:
        n = len(self.running)
        tokens = torch.tensor([[s.tokens[-1]] for s in self.running], device=self.model.device)
        start = torch.tensor([s.position for s in self.running], device=self.model.device)
        logits = self.model(tokens, start, self.cache.rows(n))[:, -1]
        emitted = []
        for i, state in enumerate(self.running):
            if state.finish_reason() is None:
                state.position += 1
                emitted.append(self._append(state, logits[i:i + 1]))
        return emitted

    def _append(self, state: _Running, logits: torch.Tensor) -> tuple[int, int]:
        token = int(sample(logits, state.request.params, state.generator))
        state.tokens.append(token)
        state.token_times.append(time.perf_counter())
        return state.request.id, token

    def _retire(self) -> None:
        row = 0
        while row < len(self.running):
            reason = self.running[row].finish_reason()
            if reason is None:
                row += 1
                continue
            self.finished.append(self.running[row].completion(reason))
            last = len(self.running) - 1
            if row != last:  # keep the running rows contiguous
                self.cache.copy_row(last, row, self.running[last].position)
                self.running[row] = self.running[last]
            self.running.pop()
