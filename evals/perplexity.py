"""Token perplexity over non-overlapping windows of held-out text.

Protocol (state it next to every number): windows of `ctx` tokens from the start of the
text, no overlap; every token after the first of a window is scored given the tokens
before it in that window; ppl = exp(mean NLL) over all scored tokens. This is *token*
perplexity, not lm-eval's word perplexity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

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

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def window_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1,
               desc: str = "perplexity") -> tuple[float, int]:
    """Summed NLL (nats) and scored-token count of `model` over windows (N, ctx)."""
    total, count = 0.0, 0
    batches = windows.split(batch_size)
    device = next(model.parameters()).device
    for batch in track(batches, desc=desc, total=len(batches), unit="window"):
        batch = batch.to(device)
        logits = model(batch)  # (B, ctx, vocab)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                              batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return total, count


def perplexity(model: torch.nn.Module, windows: torch.Tensor, text_sha256: str = "",
               batch_size: int = 1) -> PerplexityResult:
    total, count = window_nll(model, windows, batch_size)
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, windows.shape[0], windows.shape[1],
                            text_sha256)
