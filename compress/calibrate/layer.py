"""Calibrated quantisation of one decoder layer: transforms (AWQ), then rounding group by
group in the architecture's true-sequential order (GPTQ, or nearest after AWQ).

The layer is our own decoder layer, run through its own forward: `capture` gives each
group's inputs, computed with every earlier group already quantised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from compress.models import Architecture, Fold
from compress.models.layers import SparseMLP
from compress.quant import QuantizedWeight, QuantScheme, gptq, rtn
from compress.recipe import Recipe

from . import awq, capture

CALIB_BATCH = 8  # calibration samples per forward chunk
# An expert routed fewer calibration tokens than this is rounded to nearest instead of by
# GPTQ: a Hessian from a handful of tokens fits them and nothing else.
MIN_EXPERT_TOKENS = 128


class _Group:
    """The quantisable Linears of one group and where their results go."""

    def __init__(self, layer: nn.Module, prefix: str, names: list[str],
                 schemes: dict[str, QuantScheme], scale_dtype: torch.dtype,
                 quantized: dict[str, QuantizedWeight], log: dict[str, dict]):
        self.prefix, self.names = prefix, names
        self.routed = False  # an expert's: it sees only the tokens routed to it
        self.schemes = [schemes[prefix + n] for n in names]
        self.modules = [layer.get_submodule(n) for n in names]
        self.scale_dtype, self.quantized, self.log = scale_dtype, quantized, log

    def replace(self, i: int, weight: QuantizedWeight, **info: object) -> None:
        """Linear i is now `weight`: recorded, and what every later group computes with."""
        name = self.prefix + self.names[i]
        self.quantized[name] = weight
        self.modules[i].weight.data = weight.dequantize()
        if info:
            self.log.setdefault(name, {}).update(info)


def round_to_nearest(group: _Group, inputs: Iterator[torch.Tensor], recipe: Recipe) -> None:
    """RTN of the (transformed) weights: the inputs are not needed."""
    info = {"rounding": "rtn"} if group.routed else {}
    for i, (module, scheme) in enumerate(zip(group.modules, group.schemes, strict=True)):
        group.replace(i, rtn.quantize(module.weight, scheme, group.scale_dtype), **info)


def round_gptq(group: _Group, inputs: Iterator[torch.Tensor], recipe: Recipe) -> None:
    """GPTQ on the group's shared input Hessian; Linears with the same scheme in one pass."""
    acc = gptq.HessianAccumulator(group.modules[0].in_features)
    for x in inputs:
        acc.add(x)
    if group.routed and acc.n < MIN_EXPERT_TOKENS:
        _round_uncovered(group, acc)
        return
    hessian = acc.hessian()
    for scheme in dict.fromkeys(group.schemes):
        same = [i for i, s in enumerate(group.schemes) if s == scheme]
        results = gptq.quantize_shared_input(
            [group.modules[i].weight for i in same], hessian, scheme, recipe.gptq,
            group.scale_dtype, name=group.prefix + "+".join(group.names[i] for i in same))
        for i, result in zip(same, results, strict=True):
            group.replace(i, result.weight, relative_error=result.relative_error,
                          damp=result.damp, dead_columns=result.dead_columns, tokens=acc.n)


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


ROUNDINGS: dict[str, Callable[[_Group, Iterator[torch.Tensor], Recipe], None]] = {
    "rtn": round_to_nearest,
    "gptq": round_gptq,
}


@torch.no_grad()
def quantize_layer(layer: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                   x: torch.Tensor, arch: Architecture, groups: tuple[tuple[str, ...], ...],
                   folds: tuple[Fold, ...], prefix: str,
                   schemes: dict[str, QuantScheme], recipe: Recipe, scale_dtype: torch.dtype,
                   memory_budget: int) -> tuple[dict[str, QuantizedWeight], dict[str, dict]]:
    """Quantise `layer` (its Linear `groups` in true-sequential order and its AWQ `folds`,
    named as in the table; full names under `prefix`) on the calibration activations x (N, S, D)
    entering it, which are overwritten in place with the activations leaving it.
    `forward(chunk)` runs the layer. Returns the packed weights and the per-Linear log
    (for each Linear the tokens it saw: an expert sees only those routed to it)."""
    chunks = list(x.split(CALIB_BATCH))
    for module in layer.modules():
        if isinstance(module, SparseMLP):
            module.all_tokens = recipe.calibration.expert_tokens == "all"
    log: dict[str, dict] = {}
    if recipe.uses_awq:
        log = awq.transform(layer, forward, chunks, arch, groups, folds, prefix, schemes,
                            recipe.awq, scale_dtype, MIN_EXPERT_TOKENS)
    quantized: dict[str, QuantizedWeight] = {}
    round_group = ROUNDINGS[recipe.rounding]

    def on_group(names: tuple[str, ...], inputs: Iterator[torch.Tensor]) -> None:
        todo = [n for n in names if prefix + n in schemes]
        if todo:
            group = _Group(layer, prefix, todo, schemes, scale_dtype, quantized, log)
            group.routed = arch.is_expert(todo[0])
            round_group(group, inputs, recipe)

    capture.true_sequential(layer, forward, chunks, groups, on_group, memory_budget)
    return quantized, log
