"""End-to-end scale tuning of a model (the math: compress.quant.scale_tuning): Adam on
every packed Linear's scale factors and the norm weights, against the unquantised model's
next-token distribution on the calibration windows."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from compress.quant.scale_tuning import ScaleTuningConfig, TunableScalesLinear, next_token_kl


@dataclass
class ScaleTuningResult:
    """Calibration KL before and after, and what was trained."""

    kl_start: float
    kl_tuned: float
    steps: int
    scales: int
    norm_weights: int

    def to_dict(self) -> dict:
        return asdict(self)


def tune(model: nn.Module, linears: dict[str, TunableScalesLinear],
         norms: dict[str, nn.Parameter], tokens: torch.Tensor,
         teacher_logprobs: Callable[[torch.Tensor], torch.Tensor], cfg: ScaleTuningConfig,
         seed: int = 0, progress: Callable[[torch.Tensor], Iterable[torch.Tensor]] = iter,
         micro: int | None = None) -> ScaleTuningResult:
    """Train `linears`' scales (and `norms`, when cfg.norms) of `model` (tokens (B, S) ->
    logits) on the windows `tokens` (N, S) to match `teacher_logprobs(indices)` (the
    unquantised model's log-probabilities on those windows). `progress` wraps the
    (steps, batch) window indices (a progress bar). `micro`: windows per forward, the
    step's gradient summed over them (the same step in less memory: a large vocabulary's
    logits are gigabytes per window batch); None: the whole batch. Keeps the better of the tuned and
    the starting parameters on the whole calibration set."""
    for p in model.parameters():
        p.requires_grad_(False)
    scale_params = [lin.log_factor for lin in linears.values()]
    norm_params = list(norms.values()) if cfg.norms else []
    for p in (*scale_params, *norm_params):
        p.requires_grad_(True)
    groups = [{"params": scale_params, "lr": cfg.lr}]
    if norm_params:
        groups.append({"params": norm_params, "lr": cfg.lr / 10})
    optimizer = torch.optim.Adam(groups)
    n = tokens.shape[0]
    batch = min(cfg.batch, n)
    per_epoch = n // batch
    steps = cfg.epochs * per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    params = [*scale_params, *norm_params]
    start = [p.detach().clone() for p in params]
    micro = min(micro or batch, batch)
    kl_start = calibration_kl(model, tokens, teacher_logprobs, micro)
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=gen)[:per_epoch * batch]
                       for _ in range(cfg.epochs)]).view(steps, batch)
    for pick in progress(order):
        optimizer.zero_grad(set_to_none=True)
        for part in pick.split(micro):  # equal-length windows: weights make the batch mean
            with torch.enable_grad():
                loss = next_token_kl(model(tokens[part]), teacher_logprobs(part))
                (loss * (len(part) / len(pick))).backward()
        optimizer.step()
        schedule.step()
        for lin in linears.values():
            lin.clamp_()
    for p in params:
        p.requires_grad_(False)
    kl_tuned = calibration_kl(model, tokens, teacher_logprobs, micro)
    if not kl_tuned < kl_start:  # never leave the model worse than it came
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
        kl_tuned = kl_start
    return ScaleTuningResult(kl_start, kl_tuned, steps,
                             sum(p.numel() for p in scale_params),
                             sum(p.numel() for p in norm_params))


@torch.no_grad()
def calibration_kl(model: nn.Module, tokens: torch.Tensor,
                   teacher_logprobs: Callable[[torch.Tensor], torch.Tensor],
                   batch: int) -> float:
    """The mean next-token KL over every window of `tokens`."""
    total = 0.0
    for first in range(0, tokens.shape[0], batch):
        pick = torch.arange(first, min(first + batch, tokens.shape[0]))
        total += float(next_token_kl(model(tokens[pick]), teacher_logprobs(pick))) * len(pick)
    return total / tokens.shape[0]
