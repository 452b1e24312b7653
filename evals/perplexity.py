"""Token perplexity over windows of held-out text.

Protocol (state it next to every number): windows of `ctx` tokens from the start of the
text, non-overlapping unless a stride is given; every scored token is predicted from
the tokens before it in its window; ppl = exp(mean NLL) over all scored tokens. This is
*token* perplexity, not lm-eval's word perplexity. See `compress.data.eval_windows`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from compress.data import EvalWindows
from compress.progress import track

DEFAULT_CTX = 512
DEFAULT_MAX_TOKENS = 16384


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int
    ctx: int
    text_sha256: str = ""
    stride: int | None = None  # None: non-overlapping windows

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def scored_logits(model: torch.nn.Module, windows: EvalWindows, batch_size: int = 1,
                  desc: str = "perplexity") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits [T, vocab] float32, targets [T]) for each window's scored tokens, in order."""
    device = next(model.parameters()).device
    starts = range(0, len(windows), batch_size)
    for at in track(starts, desc=desc, total=len(starts), unit="batch"):
        batch = windows.tokens[at:at + batch_size].to(device)
        logits = model(batch)  # (B, ctx, vocab)
        for row, first in zip(range(batch.shape[0]), windows.first_target[at:at + batch_size],
                              strict=True):
            # logits at position t predict the token at t + 1
            yield logits[row, first - 1:-1].float(), batch[row, first:]


def perplexity(model: torch.nn.Module, windows: EvalWindows, text_sha256: str = "",
               batch_size: int = 1) -> PerplexityResult:
    total, count = 0.0, 0
    for logits, targets in scored_logits(model, windows, batch_size):
        total += float(F.cross_entropy(logits, targets, reduction="sum"))
        count += targets.numel()
    return result_from_nll(total / count, count, windows, text_sha256)


def result_from_nll(nll: float, tokens: int, windows: EvalWindows,
                    text_sha256: str = "") -> PerplexityResult:
    return PerplexityResult(math.exp(nll), nll, tokens, len(windows), windows.ctx, text_sha256,
                            windows.stride)
