"""Serving on packed checkpoints: continuous batching over a slot KV cache (engine.py),
prompt-prefix reuse (prefix_cache.py), speculative decoding with a quantised draft
(speculative.py) and the throughput-vs-latency benchmark behind `compress bench`
(bench.py)."""

from .engine import Completion, Engine, Request, slots_for_budget
from .prefix_cache import PrefixCache

__all__ = ["Completion", "Engine", "PrefixCache", "Request", "slots_for_budget"]
