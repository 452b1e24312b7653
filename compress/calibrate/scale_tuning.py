"""End-to-end scale tuning of a model (the math: compress.quant.scale_tuning): Adam on
every packed Linear's scale factors and the norm weights, against the unquantised model's
next-token distribution on the calibration windows."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from compress.errors import CompressError
from compress.progress import status
from compress.quant import precision
from compress.quant.scale_tuning import ScaleTuningConfig, TunableScalesLinear, next_token_kl


@dataclass
class TrainingState:
    """A tuning run after `step` steps: the trained parameters, their starting values,
    Adam's moments and the schedule, enough to go on exactly as if never stopped."""

    step: int
    kl_start: float
    tensors: dict[str, torch.Tensor]
    schedule: dict
    # windows per forward: another split sums the step's gradient in another order
    micro: int = 0

    @classmethod
    def capture(cls, step: int, kl_start: float, params: list[nn.Parameter],
                start: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                schedule: torch.optim.lr_scheduler.LRScheduler,
                micro: int = 0) -> TrainingState:
        tensors = {}
        for i, (p, s) in enumerate(zip(params, start, strict=True)):
            tensors[f"param.{i}"], tensors[f"start.{i}"] = p.detach().clone(), s
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"adam.{i}.{key}"] = value.detach().clone()
        return cls(step, kl_start, tensors, schedule.state_dict(), micro)

    @torch.no_grad()
    def restore(self, params: list[nn.Parameter], start: list[torch.Tensor],
                optimizer: torch.optim.Optimizer,
                schedule: torch.optim.lr_scheduler.LRScheduler) -> None:
        for i, p in enumerate(params):
            if self.tensors[f"param.{i}"].shape != p.shape:
                raise CompressError("the saved tuning progress does not fit this checkpoint; "
                                    "delete the .state directory beside the output to "
                                    "start over")
            p.copy_(self.tensors[f"param.{i}"])
            start[i] = self.tensors[f"start.{i}"]
            prefix = f"adam.{i}."
            moments = {k[len(prefix):]: v.clone() for k, v in self.tensors.items()
                       if k.startswith(prefix)}
            if moments:
                optimizer.state[p] = moments
        schedule.load_state_dict(self.schedule)
        # the scheduler computes each step's rate from the last one the groups hold
        for group, lr in zip(optimizer.param_groups, schedule.get_last_lr(), strict=True):
            group["lr"] = lr


@dataclass
class ScaleTuningResult:
    """Calibration KL before and after, and what was trained."""

    kl_start: float
    kl_tuned: float
    steps: int
    scales: int
    norm_weights: int
    windows_per_forward: int = 0
    recomputed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def tune(model: nn.Module, linears: dict[str, TunableScalesLinear],
         norms: dict[str, nn.Parameter], tokens: torch.Tensor,
         teacher_logprobs: Callable[[torch.Tensor], torch.Tensor], cfg: ScaleTuningConfig,
         seed: int = 0, progress: Callable[[torch.Tensor], Iterable[torch.Tensor]] = iter,
         micro: int | None = None, layers: nn.ModuleList | None = None,
         memory: int | None = None, resume: TrainingState | None = None,
         save: Callable[[TrainingState], None] | None = None,
         save_every: float = 300.0,
         measuring: Callable[[range], Iterable[int]] = iter) -> ScaleTuningResult:
    """Train `linears`' scales (and `norms`, when cfg.norms) of `model` (tokens (B, S) ->
    logits) on the windows `tokens` (N, S) to match `teacher_logprobs(indices)` (the
    unquantised model's log-probabilities on those windows). `progress` wraps the
    (steps, batch) window indices (a progress bar). `micro`: windows per forward, the
    step's gradient summed over them (the same step in less memory: a large vocabulary's
    logits are gigabytes per window batch); None: the whole batch. `memory`: bytes the
    activations kept for backward may take (None: no limit); fewer windows per forward,
    then recomputing each of `layers` (the decoder layers) in the backward pass, keep
    them under it (`activation_plan`). `save` receives the run's `TrainingState` every
    `save_every` seconds; `resume` (one it received) goes on from there, giving what an
    unbroken run gives. Keeps the better of the tuned and the starting parameters on the
    whole calibration set (`measuring` wraps the window batches of that measure, before
    and after: a progress bar; minutes on a CPU)."""
    for p in model.parameters():
        p.requires_grad_(False)
    scale_params = [lin.log_factor for lin in linears.values()]
    norm_params = list(norms.values()) if cfg.norms else []
    for p in (*scale_params, *norm_params):
        p.requires_grad_(True)
    batch = min(cfg.batch, tokens.shape[0])
    micro = min(micro or batch, batch)
    recompute = False
    if memory is not None and layers is not None:
        def loss_on(k: int) -> torch.Tensor:  # the first k windows (as many as there are)
            pick = torch.arange(min(k, tokens.shape[0]))
            return next_token_kl(model(tokens[pick]), teacher_logprobs(pick))

        asked = micro
        micro, recompute = activation_plan(model, layers, loss_on, micro, memory)
        if recompute or micro < asked:
            status(f"scale tuning: {micro} window{'s' if micro > 1 else ''} per forward"
                   f"{', each layer recomputed in the backward pass' if recompute else ''}"
                   f", to fit the free memory ({_gb(memory)})")
    if resume is not None and resume.micro and resume.micro != micro:
        if resume.micro < micro:  # fits too: the saved run's split gives its exact steps
            micro = resume.micro
        else:
            status(f"note: the resumed run took {resume.micro} windows per forward and "
                   f"this one fits {micro}: its steps match the saved run's only to float "
                   "rounding")
    with recomputed(layers if recompute else None):
        result = _train(model, linears, scale_params, norm_params, tokens, teacher_logprobs,
                        cfg, seed, progress, batch, micro, resume, save, save_every,
                        measuring)
    result.windows_per_forward, result.recomputed = micro, recompute
    return result


def _train(model: nn.Module, linears: dict[str, TunableScalesLinear],
           scale_params: list[nn.Parameter], norm_params: list[nn.Parameter],
           tokens: torch.Tensor, teacher_logprobs: Callable[[torch.Tensor], torch.Tensor],
           cfg: ScaleTuningConfig, seed: int,
           progress: Callable[[torch.Tensor], Iterable[torch.Tensor]], batch: int,
           micro: int, resume: TrainingState | None,
           save: Callable[[TrainingState], None] | None, save_every: float,
           measuring: Callable[[range], Iterable[int]]) -> ScaleTuningResult:
    groups = [{"params": scale_params, "lr": cfg.lr}]
    if norm_params:
        groups.append({"params": norm_params, "lr": cfg.lr / 10})
    optimizer = torch.optim.Adam(groups)
    n = tokens.shape[0]
    per_epoch = n // batch
    steps = cfg.epochs * per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    params = [*scale_params, *norm_params]
    start = [p.detach().clone() for p in params]
    if resume is None:
        done, kl_start = 0, calibration_kl(model, tokens, teacher_logprobs, micro, measuring)
        if save is not None:  # that KL took minutes on a real model: a kill keeps it
            save(TrainingState.capture(0, kl_start, params, start, optimizer, schedule,
                                       micro))
    else:
        done, kl_start = resume.step, resume.kl_start
        resume.restore(params, start, optimizer, schedule)
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=gen)[:per_epoch * batch]
                       for _ in range(cfg.epochs)]).view(steps, batch)
    saved_at = time.monotonic()
    for step, pick in enumerate(progress(order[done:]), start=done + 1):
        optimizer.zero_grad(set_to_none=True)
        for part in pick.split(micro):  # equal-length windows: weights make the batch mean
            with torch.enable_grad():
                with precision.autocast(cfg.precision, tokens.device):
                    logits = model(tokens[part])
                loss = next_token_kl(logits, teacher_logprobs(part))
                (loss * (len(part) / len(pick))).backward()
        optimizer.step()
        schedule.step()
        for lin in linears.values():
            lin.clamp_()
        # after the last step too: a kill in the closing KL then redoes no step
        if save is not None and (step == steps or
                                 time.monotonic() - saved_at >= save_every):
            save(TrainingState.capture(step, kl_start, params, start, optimizer, schedule,
                                       micro))
            saved_at = time.monotonic()
    for p in params:
        p.requires_grad_(False)
    kl_tuned = calibration_kl(model, tokens, teacher_logprobs, micro, measuring)
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
                   batch: int, progress: Callable[[range], Iterable[int]] = iter) -> float:
    """The mean next-token KL over every window of `tokens`, `batch` windows at a time
    (`progress` wraps the batches' first indices)."""
    total = 0.0
    for first in progress(range(0, tokens.shape[0], batch)):
        pick = torch.arange(first, min(first + batch, tokens.shape[0]))
        total += float(next_token_kl(model(tokens[pick]), teacher_logprobs(pick))) * len(pick)
    return total / tokens.shape[0]


@dataclass(frozen=True)
class ActivationBytes:
    """What autograd keeps for the backward pass of one forward: `outside` the decoder
    layers (embedding, final norm, head, loss), `layer` the most any one layer keeps
    inside it, `inputs` the layers' inputs together, over `layers` layers."""

    outside: int
    layer: int
    inputs: int
    layers: int

    def kept(self, recompute: bool) -> int:
        """Every layer's internals kept; or, recomputing, only the layers' inputs, plus one
        layer's internals while its backward runs."""
        if recompute:
            return self.outside + self.inputs + self.layer
        return self.outside + self.layers * self.layer


def measure_activations(model: nn.Module, layers: nn.ModuleList,
                        forward: Callable[[], torch.Tensor]) -> ActivationBytes:
    """`ActivationBytes` of `forward()` (which builds a graph it does not run backward),
    counted by saved-tensor hooks: each storage once, `model`'s own parameters and buffers
    (held anyway) not. A layer's saved tensors are let go as the layer ends, so measuring
    holds at most one layer's internals, never the whole graph a plan may not afford."""
    held = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    outside: dict[int, int] = {}
    inside: dict[int, int] = {}  # the current layer's
    boxes: list[list[torch.Tensor]] = []
    state = {"in_layer": False, "layer": 0, "inputs": 0}

    def pack(t: torch.Tensor) -> object:
        ptr = t.untyped_storage().data_ptr()
        if ptr in held:
            return t
        if not state["in_layer"]:
            outside[ptr] = t.untyped_storage().nbytes()
            return t
        inside[ptr] = t.untyped_storage().nbytes()
        box = [t]  # emptied when the layer ends: never unpacked, as backward never runs
        boxes.append(box)
        return box

    def enter(_module: nn.Module, args: tuple) -> None:
        state["in_layer"] = True
        state["inputs"] += args[0].untyped_storage().nbytes()
        inside.clear()

    def leave(_module: nn.Module, _args: tuple, _out: object) -> None:
        state["in_layer"] = False
        state["layer"] = max(state["layer"], sum(inside.values()))
        for box in boxes:
            box.clear()
        boxes.clear()

    hooks = [h for layer in layers for h in (layer.register_forward_pre_hook(enter),
                                             layer.register_forward_hook(leave))]
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        for h in hooks:
            h.remove()
    return ActivationBytes(sum(outside.values()), state["layer"], state["inputs"], len(layers))


def activation_plan(model: nn.Module, layers: nn.ModuleList,
                    loss_on: Callable[[int], torch.Tensor], micro: int,
                    memory: int) -> tuple[int, bool]:
    """(windows per forward, recompute the layers?) whose saved activations fit `memory`
    bytes, measured on the loss of the first one and two windows (`loss_on(k)`): `micro`
    windows as they are where they fit; else fewer windows (the same step, summed: only
    slower per window); else each decoder layer recomputed in the backward pass (about a
    third more time), with as many windows as fit that."""
    one, two = (measure_activations(model, layers, lambda k=k: loss_on(k)) for k in (1, 2))
    fixed, per_window = _fit(one.kept(False), two.kept(False))
    if fixed + micro * per_window <= memory:
        return micro, False
    if fixed + per_window <= memory:
        return int((memory - fixed) // per_window), False
    fixed, per_window = _fit(one.kept(True), two.kept(True))
    fits = (memory - fixed) // per_window
    if fits < 1:
        raise CompressError(
            f"scale tuning needs about {_gb(fixed + per_window)} for one calibration "
            f"window's activations, even recomputing each layer, and {_gb(memory)} are "
            "free: use shorter windows (--calib-seqlen) or a machine with more memory")
    return int(min(micro, fits)), True


def _fit(one: int, two: int) -> tuple[int, int]:
    """(fixed bytes, bytes per window) from what one and two windows keep: a forward's own
    tensors (each Linear's dense weight) do not grow with the windows."""
    per_window = max(two - one, 1)
    return max(one - per_window, 0), per_window


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class _Recomputed(nn.Module):
    """A decoder layer whose activations are recomputed in the backward pass instead of
    kept (torch.utils.checkpoint)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)


@contextmanager
def recomputed(layers: nn.ModuleList | None) -> Iterator[None]:
    """Within it, each of `layers` recomputes its activations in the backward pass (None:
    nothing changes); the layers are put back after."""
    if layers is None:
        yield
        return
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Recomputed(layer)
    try:
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
