"""Learned rounding of one decoder layer (SignRound; the math is compress.quant.signround).

The target is the unquantised model's output of the layer (its inputs carried beside the
quantised ones by the pipeline; `SignRoundConfig.target`). Every quantised Linear of the
layer gets a `LearnedRounding` parametrization, so the layer's own forward runs on
fake-quantised weights and quantised inputs; each step takes the next batch of a shuffled
pass over the samples, measures the mean squared error against the target (its largest
errors left out: `SignRoundConfig.trim`; with `SignRoundConfig.loss` "normed", the error
as the stream's norms read it, `reader_gains`), and moves
every offset and range factor (the offsets alone: `SignRoundConfig.learn_ranges`) by a
signed step (or Adam's: `SignRoundConfig.optimizer`).
Of the last step's parameters, those of the step with the lowest batch loss (what
auto-round keeps) and the start, the one with the lowest loss on the whole calibration
set is kept, and each Linear is packed with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.kernels import QuantizedWeight
from compress.models import Architecture, ModelFiles
from compress.progress import track
from compress.quant import QuantScheme, precision
from compress.quant.signround import (
    LearnedRounding,
    SignRoundConfig,
    signed_step,
    squared_error,
    step_loss,
)


@torch.no_grad()
def layer_outputs(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  chunk: int = 8) -> torch.Tensor:
    """The layer's outputs on x, chunk by chunk (the target, from unquantised weights)."""
    return torch.cat([forward(part) for part in x.split(chunk)])


def learn_layer(layer: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                x: torch.Tensor, targets: torch.Tensor, schemes: dict[str, QuantScheme],
                cfg: SignRoundConfig, scale_dtype: torch.dtype, seed: int, chunk: int = 8,
                bounds: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                gain: torch.Tensor | None = None,
                ) -> tuple[dict[str, QuantizedWeight], dict[str, float]]:
    """Packed weights for the Linears named in `schemes` (names within `layer`), learned on
    the activations x (N, S, D) entering the layer to give `targets` (N, S, D). Returns
    them with the layer-output losses (mean squared error on every sample) where learning
    started ("start": zero offsets, full ranges) and with the learned rounding, and the
    step it learned again with ("retry_lr", `SignRoundConfig.retry_lr`). `bounds`:
    fixed group ranges per Linear (`LearnedRounding`). `gain`: the stream readers' gain
    per channel (`reader_gains`), with which every loss is the normed error
    (`compress.quant.signround.squared_error`); None: the output's plain squared error.
    The layer's weights are left as they were."""
    roundings = _attach(layer, schemes, scale_dtype, bounds or {}, cfg)
    try:
        params = [p for r in roundings.values() for p in r.params()]
        start_loss = _loss(forward, x, targets, chunk, gain)
        initial = _snapshot(params)
        losses = {"start": start_loss}
        learned_loss, chosen = _learn(forward, x, targets, roundings, params, cfg, seed,
                                      chunk, initial, start_loss, gain)
        if learned_loss >= start_loss and cfg.retry_lr is not None:
            _restore(params, initial)
            losses["retry_lr"] = cfg.retry_lr
            learned_loss, chosen = _learn(forward, x, targets, roundings, params,
                                          dataclasses.replace(cfg, lr=cfg.retry_lr), seed,
                                          chunk, initial, start_loss, gain)
        losses["learned"] = learned_loss
        _restore(params, chosen)
        packed = {name: r.quantize(_original(layer, name)) for name, r in roundings.items()}
    finally:
        for name in roundings:
            parametrize.remove_parametrizations(layer.get_submodule(name), "weight",
                                                leave_parametrized=False)
    return packed, losses


def _learn(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
           targets: torch.Tensor, roundings: dict[str, LearnedRounding],
           params: list[nn.Parameter], cfg: SignRoundConfig, seed: int, chunk: int,
           initial: list[torch.Tensor], start_loss: float, gain: torch.Tensor | None,
           ) -> tuple[float, list[torch.Tensor]]:
    """`cfg.iters` steps from where `params` are; returns the whole-set loss and the
    parameters of the candidate kept (the start's when none beats `start_loss`: the first
    batch's are the start's too)."""
    best_loss, best = float("inf"), initial
    batches = _batches(x.shape[0], cfg.batch, seed)
    step = _stepper(params, cfg)
    for i in track(range(cfg.iters), desc="signround steps", unit="step"):
        pick = next(batches).to(x.device)
        with torch.enable_grad():
            with precision.autocast(cfg.precision, x.device):
                loss = step_loss(forward(x[pick]), targets[pick], cfg.trim, gain)
            loss.backward()
        value = loss.detach().item()
        if value < best_loss:  # the parameters that made this loss: keep them
            best_loss, best = value, _snapshot(params)
        step(i)
        for r in roundings.values():
            r.clamp_()
    # judged on the whole calibration set: the last step's parameters, the best
    # batch's (which may have been an easy batch) and the start
    learned_loss, chosen = _loss(forward, x, targets, chunk, gain), _snapshot(params)
    for candidate, known in ((best, None), (initial, start_loss)):
        _restore(params, candidate)
        loss = known if known is not None else _loss(forward, x, targets, chunk, gain)
        if loss < learned_loss:
            learned_loss, chosen = loss, candidate
    return learned_loss, chosen


def precision_note(cfg: SignRoundConfig, device: torch.device) -> str | None:
    """A line for the user when `cfg.precision` will be slow on `device`."""
    return precision.slow_note(cfg.precision, device, "signround precision")


def _stepper(params: list[nn.Parameter], cfg: SignRoundConfig) -> Callable[[int], None]:
    """Step i's update of `params` from their gradients (which it clears): a signed step,
    or Adam's, both at `cfg.step_at(i)`."""
    if cfg.optimizer == "sign":
        return lambda i: signed_step(params, cfg.step_at(i))
    adam = torch.optim.Adam(params, lr=cfg.step)

    def adam_step(i: int) -> None:
        for group in adam.param_groups:
            group["lr"] = cfg.step_at(i)
        adam.step()
        adam.zero_grad(set_to_none=True)

    return adam_step


def _batches(n: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Sample indices `batch` at a time, in shuffled passes: every sample is used once per
    pass (a pass's remainder is dropped), rather than drawn with replacement."""
    gen = torch.Generator().manual_seed(seed)
    batch = min(batch, n)
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch + 1, batch):
            yield order[start:start + batch]


def _attach(layer: nn.Module, schemes: dict[str, QuantScheme], scale_dtype: torch.dtype,
            bounds: dict[str, tuple[torch.Tensor, torch.Tensor]],
            cfg: SignRoundConfig) -> dict[str, LearnedRounding]:
    roundings = {}
    for name, scheme in schemes.items():
        linear = layer.get_submodule(name)
        linear.weight.requires_grad_(False)
        rounding = LearnedRounding(linear.weight, scheme, scale_dtype, bounds.get(name),
                                   cfg.limits, cfg.learn_ranges)
        parametrize.register_parametrization(linear, "weight", rounding, unsafe=True)
        roundings[name] = rounding
    return roundings


def _original(layer: nn.Module, name: str) -> torch.Tensor:
    return layer.get_submodule(name).parametrizations.weight.original


@torch.no_grad()
def _loss(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
          targets: torch.Tensor, chunk: int, gain: torch.Tensor | None = None) -> float:
    total = sum(float(squared_error(forward(a), b, gain).sum())
                for a, b in zip(x.split(chunk), targets.split(chunk), strict=True))
    return total / targets.numel()


def _snapshot(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def _restore(params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
    for p, v in zip(params, values, strict=True):
        p.copy_(v)


def loss_for(loss: str, arch: Architecture) -> str:
    """What `SignRoundConfig.loss` measures on `arch`: "auto" is "normed" for the families
    that norm each branch's output before the residual add and read the stream through
    norms (Gemma-2/3: their post-norms' gains, not what the next layers read, set the
    stream's scale per channel), "output" for the rest (OLMo-2 reads its stream raw, so
    there "normed" would be the plain error anyway)."""
    if loss != "auto":
        return loss
    return "normed" if arch.branch_out_norm and arch.reads_stream_normed else "output"


def reader_gains(files: ModelFiles, residual_rotated: bool) -> list[torch.Tensor] | None:
    """Per layer, per channel, the gain with which the norms that read the residual stream
    after that layer (every later layer's attention and MLP input norms, and the final
    norm) scale it: the root mean square of their gains, so a channel every reader shrinks
    counts little. Ones where the stream is rotated (its norms' gains are folded into the
    Linears that follow, so no channel stands apart); None where no norm reads the
    stream (OLMo-2's layers read it raw): the loss is then the plain output error."""
    arch, cfg = files.arch, files.decoder_config
    norms = [n for n in (arch.attn_norm, arch.mlp_norm) if n is not None]
    if not norms:
        return None
    if residual_rotated:
        return [torch.ones(cfg.hidden_size) for _ in range(cfg.num_layers)]

    def squared_gain(name: str) -> torch.Tensor:
        return (cfg.norm_offset + files.tensors.get(f"{name}.weight").float()).square()

    # from the last layer back, each adding the norms of the layer after it to its readers
    total, count = squared_gain(arch.final_norm), 1
    gains = [total.sqrt()]
    for i in range(cfg.num_layers - 1, 0, -1):
        for norm in norms:
            total, count = total + squared_gain(f"{arch.layer_prefix(i)}{norm}"), count + 1
        gains.append((total / count).sqrt())
    return gains[::-1]
