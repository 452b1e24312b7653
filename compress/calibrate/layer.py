"""Calibrated quantisation of one decoder layer: transforms (AWQ), then rounding group by
group in the architecture's true-sequential order (GPTQ, or nearest after AWQ).

The layer is our own decoder layer, run through its own forward: `capture` gives each
group's inputs, computed with every earlier group already quantised.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from compress.distributed import Context
from compress.memory import release_freed
from compress.models import Architecture, Fold
from compress.models.layers import SparseMLP
from compress.quant import QuantizedWeight, QuantScheme, gptq, rtn
from compress.quant.signround import grid_bounds
from compress.recipe import Recipe

from . import awq, capture, signround
from .capture import GroupInputs

CALIB_BATCH = 8  # calibration samples per forward chunk
# An expert routed fewer calibration tokens than this is rounded to nearest instead of by
# GPTQ: a Hessian from a handful of tokens fits them and nothing else.
MIN_EXPERT_TOKENS = 128


class _Group:
    """The quantisable Linears of one group and where their results go."""

    def __init__(self, layer: nn.Module, prefix: str, names: list[str],
                 schemes: dict[str, QuantScheme], scale_dtype: torch.dtype,
                 quantized: dict[str, QuantizedWeight], log: dict[str, dict], ctx: Context):
        self.prefix, self.names, self.ctx = prefix, names, ctx
        self.routed = False  # an expert's: it sees only the tokens routed to it
        # chunk index -> the unquantised model's input of this group on that chunk (GPTQ's
        # "model" target); None: GPTQ's own target
        self.reference: Callable[[int], torch.Tensor] | None = None
        # name -> GPTQ's error-compensated weights (`GPTQResult.continuous`), when wanted
        self.continuous: dict[str, torch.Tensor] | None = None
        self.schemes = [schemes[prefix + n] for n in names]
        self.modules = [layer.get_submodule(n) for n in names]
        self.scale_dtype, self.quantized, self.log = scale_dtype, quantized, log

    @property
    def device(self) -> torch.device:
        return self.modules[0].weight.device

    def replace(self, i: int, weight: QuantizedWeight, **info: object) -> None:
        """Linear i is now `weight`: recorded (on the CPU, for packing and writing), and
        what every later group computes with (on the layer's device)."""
        name = self.prefix + self.names[i]
        self.quantized[name] = weight.to("cpu")
        kept = info.pop("continuous", None)
        if self.continuous is not None and kept is not None:
            self.continuous[name] = kept
        self.modules[i].weight.data = weight.to(self.device).dequantize()
        if info:
            self.log.setdefault(name, {}).update(info)

    def solve(self, jobs: list[list[int]],
              fn: Callable[[list[int]], list[tuple[QuantizedWeight, dict]]]) -> None:
        """Run `fn(linears)` for each job (a list of this group's Linear indices) on the
        rank `Context.deal` gives it, then replace every Linear, on every rank, with the
        result its owner sent. One process owns every job: nothing is sent."""
        self.solve_on(jobs, self.ctx.deal([sum(self.modules[i].out_features for i in job)
                                           for job in jobs]), fn)

    def solve_on(self, jobs: list[list[int]], owners: list[int],
                 fn: Callable[[list[int]], list[tuple[QuantizedWeight, dict]]]) -> None:

        def mine() -> dict[int, tuple[QuantizedWeight, dict]]:
            done = {}
            for job, owner in zip(jobs, owners, strict=True):
                if owner == self.ctx.rank:
                    for i, (weight, info) in zip(job, fn(job), strict=True):
                        done[i] = (weight.to("cpu"), info)  # sent pickled: CPU tensors
            return done

        results: dict[int, tuple[QuantizedWeight, dict]] = {}
        for part in self.ctx.each(mine):
            results.update(part)
        for i in sorted(results):
            weight, info = results[i]
            self.replace(i, weight, **info)


def round_to_nearest(group: _Group, inputs: GroupInputs, recipe: Recipe) -> None:
    """RTN of the (transformed) weights: the inputs are not needed."""
    info = {"rounding": "rtn"} if group.routed else {}

    def rounded(job: list[int]) -> list[tuple[QuantizedWeight, dict]]:
        return [(rtn.quantize(group.modules[i].weight, group.schemes[i], group.scale_dtype),
                 info) for i in job]

    group.solve([[i] for i in range(len(group.modules))], rounded)


def round_gptq(group: _Group, inputs: GroupInputs, recipe: Recipe) -> None:
    """GPTQ on the group's shared input Hessian (summed over ranks); Linears with the same
    scheme in one pass. With several processes the Linears are dealt to ranks, each rank
    solving its own in one pass; one process solves them all in one pass, as always."""
    acc = gptq.HessianAccumulator(group.modules[0].in_features, group.device)
    cross = (None if group.reference is None else
             gptq.CrossAccumulator(group.modules[0].in_features, group.device))
    for x in inputs:
        acc.add(x)
        if cross is not None:
            cross.add(group.reference(inputs.chunk), x)
    acc.h, acc.n = group.ctx.reduce_mean(acc.h, acc.n)
    if cross is not None:
        cross.c, cross.n = group.ctx.reduce_mean(cross.c, cross.n)
    if group.routed and acc.n < MIN_EXPERT_TOKENS:
        _round_uncovered(group, acc)
        return
    hessian = acc.hessian()
    for scheme in dict.fromkeys(group.schemes):
        same = [i for i, s in enumerate(group.schemes) if s == scheme]
        # Linears dealt to ranks by rows; each rank stacks its own into one pass (one
        # process: all of them, the pass it always made)
        dealt = group.ctx.deal([group.modules[i].out_features for i in same])
        owners = sorted(set(dealt))
        jobs = [[i for i, r in zip(same, dealt, strict=True) if r == owner]
                for owner in owners]

        def solved(job: list[int], scheme: QuantScheme = scheme,
                   ) -> list[tuple[QuantizedWeight, dict]]:
            name = group.prefix + "+".join(group.names[i] for i in job)
            weights = [group.modules[i].weight for i in job]
            extra: list[dict] = [{} for _ in job]
            if cross is not None:  # rounded toward the unquantised model's outputs
                targets = gptq.target_weight(torch.cat(weights), hessian, cross.c,
                                             recipe.gptq.damp, name,
                                             recipe.gptq.target_strength).split(
                                                 [w.shape[0] for w in weights])
                extra = [{"target": "model", "target_shift": gptq.relative_output_error(
                    w, t, hessian)} for w, t in zip(weights, targets, strict=True)]
                weights = list(targets)
            results = gptq.quantize_shared_input(weights, hessian, scheme, recipe.gptq,
                                                 group.scale_dtype, name=name,
                                                 continuous=group.continuous is not None)
            return [(r.weight, {"relative_error": r.relative_error, "damp": r.damp,
                                "dead_columns": r.dead_columns, "tokens": acc.n, **more,
                                **({} if r.continuous is None else
                                   {"continuous": r.continuous.cpu()})})
                    for r, more in zip(results, extra, strict=True)]

        group.solve_on(jobs, owners, solved)


def _round_uncovered(group: _Group, acc: gptq.HessianAccumulator) -> None:
    """The coverage rule: a group that saw too few tokens (only an expert can: every
    token reaches the others) is rounded to nearest, its error measured on what it saw."""
    for i, (module, scheme) in enumerate(zip(group.modules, group.schemes, strict=True)):
        weight = rtn.quantize(module.weight, scheme, group.scale_dtype)
        error = (gptq.relative_output_error(module.weight, weight.dequantize(), acc.hessian())
                 if acc.n else None)
        group.replace(i, weight, relative_error=error, tokens=acc.n, rounding="rtn",
                      reason=f"routed {acc.n} calibration tokens, under the minimum of "
                             f"{MIN_EXPERT_TOKENS} for GPTQ")


def _placing(learned: dict[str, QuantizedWeight], losses: dict[str, float]
             ) -> Callable[[_Group, GroupInputs, Recipe], None]:
    """The rounding step of learned rounding: the group's weights were learned with the
    whole layer beforehand; each is put in place and its output error measured, like
    GPTQ's, on the inputs it now sees. An expert under the token minimum is rounded to
    nearest instead (offsets learned from a handful of tokens fit only those)."""

    def place(group: _Group, inputs: GroupInputs, recipe: Recipe) -> None:
        acc = gptq.HessianAccumulator(group.modules[0].in_features, group.device)
        for x in inputs:
            acc.add(x)
        if group.routed and acc.n < MIN_EXPERT_TOKENS:
            _round_uncovered(group, acc)
            return
        hessian = acc.hessian()
        extra = {"rounding": "signround"} if group.routed else {}
        if "retry_lr" in losses:
            extra["layer_retry_lr"] = losses["retry_lr"]
        for i, module in enumerate(group.modules):
            weight = learned[group.names[i]]
            error = gptq.relative_output_error(module.weight,
                                               weight.to(group.device).dequantize(), hessian)
            group.replace(i, weight, relative_error=error, tokens=acc.n,
                          layer_loss_start=losses["start"], layer_loss=losses["learned"], **extra)

    return place


ROUNDINGS: dict[str, Callable[[_Group, GroupInputs, Recipe], None]] = {
    "rtn": round_to_nearest,
    "gptq": round_gptq,
}


@torch.no_grad()
def quantize_layer(layer: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                   x: torch.Tensor, arch: Architecture, groups: tuple[tuple[str, ...], ...],
                   folds: tuple[Fold, ...], prefix: str,
                   schemes: dict[str, QuantScheme], recipe: Recipe, scale_dtype: torch.dtype,
                   memory_budget: int, ctx: Context | None = None,
                   reference: torch.Tensor | None = None,
                   gain: torch.Tensor | None = None,
                   ) -> tuple[dict[str, QuantizedWeight], dict[str, dict]]:
    """Quantise `layer` (its Linear `groups` in true-sequential order and its AWQ `folds`,
    named as in the table; full names under `prefix`) on the calibration activations x (N, S, D)
    entering it, which are overwritten in place with the activations leaving it.
    `forward(chunk)` runs the layer. Returns the packed weights and the per-Linear log
    (for each Linear the tokens it saw: an expert sees only those routed to it).

    `reference` (learned rounding with target "model"): the unquantised model's
    activations entering the layer, beside x: the target is the unquantised layer's output
    on them, and they are overwritten in place with it.

    `gain`: learned rounding's loss is the error as the stream's norms read it, with
    these gains per channel (`signround.reader_gains`); None: the output's plain error.

    `ctx`: with several processes, x is this rank's share of the samples; statistics are
    summed over ranks and each result is every rank's (`compress.distributed`)."""
    ctx = ctx or Context()
    chunks = list(x.split(CALIB_BATCH))
    for module in layer.modules():
        if isinstance(module, SparseMLP):
            module.all_tokens = recipe.calibration.expert_tokens == "all"
    log: dict[str, dict] = {}
    if recipe.uses_awq:
        log = awq.transform(layer, forward, chunks, arch, groups, folds, prefix, schemes,
                            recipe.awq, scale_dtype, MIN_EXPERT_TOKENS, ctx,
                            then_gptq=recipe.gptq if recipe.rounding == "gptq" else None)
    quantized: dict[str, QuantizedWeight] = {}
    reference_of, reference_out = None, None
    if reference is not None:
        # the unquantised layer's outputs, before anything is rounded: the next layer's
        # reference inputs, and learned rounding's target
        reference_out = signround.layer_outputs(forward, reference, CALIB_BATCH)
        if recipe.rounds_gptq:  # the old reference is read group by group below
            reference_of = _reference_inputs(layer, forward, reference.split(CALIB_BATCH),
                                             [n for g in groups for n in g])
        else:  # nothing reads it again: advance it now, one copy fewer held
            reference.copy_(reference_out)
            reference_out = None

    def rounding_pass(round_group: Callable[[_Group, GroupInputs, Recipe], None],
                      to: dict[str, QuantizedWeight],
                      continuous: dict[str, torch.Tensor] | None = None) -> None:
        def on_group(names: tuple[str, ...], inputs: GroupInputs) -> None:
            todo = [n for n in names if prefix + n in schemes]
            if todo:
                group = _Group(layer, prefix, todo, schemes, scale_dtype, to, log, ctx)
                group.routed = arch.is_expert(todo[0])
                group.continuous = continuous
                if reference_of is not None and not group.routed:  # routes differ
                    group.reference = lambda i: reference_of(todo[0], i)
                round_group(group, inputs, recipe)
                release_freed()  # each group's temporaries, else kept by the heap (memory.py)

        capture.true_sequential(layer, forward, chunks, groups, on_group, memory_budget)

    if recipe.rounding == "signround":
        mine = {n: s for n, s in ((n, schemes.get(prefix + n)) for g in groups for n in g)
                if s is not None}
        targets = (reference_out if reference_out is not None else
                   reference if reference is not None else
                   signround.layer_outputs(forward, x, CALIB_BATCH))
        start = (_start_from_gptq(layer, x, prefix, mine, rounding_pass)
                 if recipe.signround.start == "gptq" else None)
        learned, losses = signround.learn_layer(
            layer, forward, x, targets, mine, recipe.signround, scale_dtype,
            recipe.calibration.seed, CALIB_BATCH, None if start is None else start.bounds,
            gain=None if gain is None else gain.to(x.device))
        del targets
        if start is not None:
            start.put_back(layer)
        rounding_pass(_placing(learned, losses), quantized)
    else:
        rounding_pass(ROUNDINGS[recipe.rounding], quantized)
    if reference_out is not None:
        reference.copy_(reference_out)
    return quantized, log


class _GPTQStart:
    """Where learned rounding starts from GPTQ (`SignRoundConfig.start`): each Linear holds
    GPTQ's error-compensated weights and `bounds` is GPTQ's grid, so zero offsets give
    GPTQ's codes; `original` keeps the unquantised weights for `put_back`."""

    def __init__(self, original: dict[str, torch.Tensor],
                 bounds: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.original, self.bounds = original, bounds

    def put_back(self, layer: nn.Module) -> None:
        for name, weight in self.original.items():
            layer.get_submodule(name).weight.data = weight


def _start_from_gptq(layer: nn.Module, x: torch.Tensor, prefix: str,
                     schemes: dict[str, QuantScheme], rounding_pass: Callable) -> _GPTQStart:
    """One GPTQ pass over the layer (x, which it advances, is put back after it)."""
    entering = x.clone()
    rounded: dict[str, QuantizedWeight] = {}
    continuous: dict[str, torch.Tensor] = {}
    original = {n: layer.get_submodule(n).weight.data for n in schemes}
    rounding_pass(round_gptq, rounded, continuous)
    x.copy_(entering)
    del entering
    bounds = {}
    for name, weight in original.items():
        if prefix + name in continuous:
            layer.get_submodule(name).weight.data = continuous[prefix + name].to(weight)
            bounds[name] = tuple(b.to(weight.device)
                                 for b in grid_bounds(rounded[prefix + name]))
        else:  # an expert GPTQ left to RTN (too few tokens): learning starts from RTN
            layer.get_submodule(name).weight.data = weight
    return _GPTQStart(original, bounds)


class _Reached(Exception):
    """Raised by a pre-hook to stop a forward at the Linear whose input it carries."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x = x


def _reference_inputs(layer: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                      chunks: tuple[torch.Tensor, ...], names: list[str],
                      ) -> Callable[[str, int], torch.Tensor]:
    """A function (Linear name, chunk index) -> that Linear's input in the unquantised
    model on that reference chunk. It runs the layer's own forward on the chunk, with the
    unquantised weights of the Linears rounded so far put back for the call, and stops at
    the Linear: no copy of the layer, no cache of every group's inputs. Calibration's
    suspended forwards have passed those Linears and never see the swap."""
    original = {n: layer.get_submodule(n).weight.data for n in names}

    def reference_input(name: str, i: int) -> torch.Tensor:
        modules = {n: layer.get_submodule(n) for n in names}
        current = {n: m.weight.data for n, m in modules.items()}

        def stop(_module: nn.Module, args: tuple) -> None:
            raise _Reached(args[0])

        handle = modules[name].register_forward_pre_hook(stop)
        try:
            for n, m in modules.items():
                m.weight.data = original[n]
            forward(chunks[i])
        except _Reached as reached:
            return reached.x
        finally:
            handle.remove()
            for n, m in modules.items():
                m.weight.data = current[n]
        raise RuntimeError(f"{name} never ran on reference chunk {i}")

    return reference_input
