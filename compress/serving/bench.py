"""`compress bench`: throughput against latency over batch sizes, and the batch size to run.

For each batch size B (engine slots) the same seeded request mix is served, all requests
arriving at once: prompts are slices of the bundled held-out text (lengths uniform in
±50% of `prompt_len`), each generating exactly `output_len` tokens (no early stop, so
every batch size does the same work). Per batch size: time to first token (from
submission, so queueing counts) and inter-token latency at p50/p95, tokens/s per
request (its output over its decode time) and in total (all output over wall time),
peak process memory and the KV cache's bytes. The sweep stops at the first batch size
whose KV cache does not fit the budget.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from compress.errors import CompressError
from compress.models import CausalLM
from compress.progress import track
from compress.serving.generation import SamplingParams

from .engine import Completion, Engine, Request, slots_for_budget

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Workload:
    requests: int = 32
    prompt_len: int = 128
    output_len: int = 64
    seed: int = 0

    def make(self, text_tokens: torch.Tensor) -> list[Request]:
        rng = random.Random(self.seed)
        params = SamplingParams(max_new_tokens=self.output_len)  # greedy, no stop tokens
        out = []
        for _ in range(self.requests):
            n = rng.randint(max(1, self.prompt_len // 2), max(1, self.prompt_len * 3 // 2))
            if n >= text_tokens.numel():
                raise CompressError(f"prompts of {n} tokens need more text than the "
                                    f"{text_tokens.numel()} tokens given")
            at = rng.randrange(0, text_tokens.numel() - n)
            out.append(Request(text_tokens[at:at + n].tolist(), params))
        return out

    @property
    def max_len(self) -> int:
        return self.prompt_len * 3 // 2 + self.output_len


@dataclass(frozen=True)
class BatchResult:
    batch_size: int
    ttft_p50: float
    ttft_p95: float
    itl_p50: float
    itl_p95: float
    request_tokens_per_s: float  # median over requests
    total_tokens_per_s: float
    wall_seconds: float
    peak_rss_bytes: int
    kv_cache_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def measure(model: CausalLM, batch_size: int, requests: list[Request], max_len: int,
            kv_int8: bool = False) -> BatchResult:
    engine = Engine(model, batch_size, max_len, kv_int8=kv_int8)
    process = psutil.Process()
    peak = process.memory_info().rss
    start = time.perf_counter()
    for r in requests:
        engine.submit(Request(r.prompt, r.params))
    for _ in engine.steps():
        peak = max(peak, process.memory_info().rss)
    wall = time.perf_counter() - start
    done: list[Completion] = engine.finished
    ttft = [c.ttft for c in done]
    itl = [d for c in done for d in c.inter_token]
    per_request = [(len(c.tokens) - 1) / (c.token_times[-1] - c.token_times[0])
                   for c in done if len(c.tokens) > 1 and c.token_times[-1] > c.token_times[0]]
    return BatchResult(batch_size, percentile(ttft, 50), percentile(ttft, 95),
                       percentile(itl, 50), percentile(itl, 95),
                       statistics.median(per_request) if per_request else 0.0,
                       sum(len(c.tokens) for c in done) / wall, wall, peak,
                       engine.cache.nbytes)


def sweep(model: CausalLM, workload: Workload, text_tokens: torch.Tensor,
          batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES, kv_budget_bytes: int = 1 << 30,
          kv_int8: bool = False) -> list[BatchResult]:
    requests = workload.make(text_tokens)
    fits = slots_for_budget(model, workload.max_len, kv_budget_bytes, kv_int8)
    sizes = [b for b in batch_sizes if b <= fits]
    if not sizes:
        raise CompressError(f"a KV budget of {kv_budget_bytes / 2**20:.0f} MiB holds no slot of "
                            f"{workload.max_len} positions; raise --kv-budget-mb")
    results = []
    for b in track(sizes, desc="batch sizes", unit="size"):
        results.append(measure(model, b, requests, workload.max_len, kv_int8))
    return results


def recommend(results: list[BatchResult], sla_ttft_p95: float | None = None,
              sla_tokens_per_s: float | None = None) -> BatchResult | None:
    """The highest-throughput batch size meeting the SLA (None: none does)."""
    ok = [r for r in results
          if (sla_ttft_p95 is None or r.ttft_p95 <= sla_ttft_p95)
          and (sla_tokens_per_s is None or r.request_tokens_per_s >= sla_tokens_per_s)]
    return max(ok, key=lambda r: r.total_tokens_per_s, default=None)


def plot(results: list[BatchResult], path: Path, title: str,
         chosen: BatchResult | None = None) -> None:
    """Throughput against per-request speed and against TTFT, one point per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    total = [r.total_tokens_per_s for r in results]
    for ax, xs, label in (
            (left, [r.request_tokens_per_s for r in results],
             "tokens/s per request (median)"),
            (right, [r.ttft_p95 for r in results], "time to first token, p95 (s)")):
        ax.plot(xs, total, "o-", color="tab:blue", label="batch sizes")
        for r, x, y in zip(results, xs, total, strict=True):
            ax.annotate(f"B={r.batch_size}", (x, y), textcoords="offset points",
                        xytext=(5, 5), fontsize=9)
        if chosen is not None:
            x = (chosen.request_tokens_per_s if ax is left else chosen.ttft_p95)
            ax.plot([x], [chosen.total_tokens_per_s], "*", color="tab:red", markersize=16,
                    label=f"recommended (B={chosen.batch_size})")
        ax.margins(0.15)
        ax.set_xlabel(label)
        ax.set_ylabel("total throughput (tokens/s)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
