"""AWQ applied to one decoder layer: statistics, scale search, folding, clipping.

The layer is transformed in place, in float32, before any rounding: every group's
input-channel scales are folded into the op that produces its input (the architecture
table's `scale_folds`), so the model computes the same function, and each Linear's
weight is clamped to its searched per-group range. The pipeline then rounds the
transformed layer with RTN (`--method awq`) or GPTQ (`--method awq+gptq`).

Folds are exact or not made: a norm scales by (offset + w), so w becomes
(offset + w) / s - offset; a Linear's output rows (or the part of a fused projection
that produces the group's input) are divided by s. A group whose input no single op
produces (grouped-query v -> o, OLMo-2's groups reading the residual stream) keeps its
weights unscaled, and the log says why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from compress.models import Architecture, Fold, RMSNorm
from compress.quant import QuantScheme, awq, rtn
from compress.quant.gptq import HessianAccumulator

from . import capture


@torch.no_grad()
def transform(layer: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
              chunks: Sequence[torch.Tensor], arch: Architecture, prefix: str,
              schemes: dict[str, QuantScheme], cfg: awq.AWQConfig,
              scale_dtype: torch.dtype) -> dict[str, dict]:
    """Scale-search and fold every foldable group of `layer`, then clip; returns the log.

    `schemes` maps full Linear names to their schemes (absent: stays dense). Statistics come
    from one pass of the unmodified layer over the chunks (as in the reference AWQ);
    folding changes only each group's own input, whose Hessian is rescaled exactly rather
    than re-measured.
    """
    stats: dict[str, tuple[HessianAccumulator, awq.InputMagnitude]] = {}

    def record(name: str, x: torch.Tensor) -> None:
        if name not in stats:
            stats[name] = (HessianAccumulator(x.shape[-1]), awq.InputMagnitude(x.shape[-1]))
        hessian, magnitude = stats[name]
        hessian.add(x)
        magnitude.add(x)

    firsts = [group[0] for group in arch.linear_groups]
    with capture.observe(layer, firsts, record):
        for chunk in chunks:
            forward(chunk)
    folds = {fold.group: fold for fold in arch.scale_folds}
    log: dict[str, dict] = {}
    for group in arch.linear_groups:
        group_schemes = [schemes.get(prefix + n) for n in group]
        if all(s is None for s in group_schemes) or group[0] not in stats:
            continue
        linears = [layer.get_submodule(n) for n in group]
        accumulator, magnitude = stats[group[0]]
        hessian = accumulator.hessian()
        fold = folds.get(group)
        problem = ("no single op produces its input (it reads the residual stream)"
                   if fold is None else _fold_problem(layer, fold, linears[0].in_features))
        entry: dict = {"producer": None if fold is None else _label(fold)}
        if problem is None:
            found = awq.search_scales([m.weight for m in linears], group_schemes, hessian,
                                      magnitude.mean(), cfg, scale_dtype)
            _fold(layer, fold, linears, found.scales, scale_dtype)
            s = found.scales
            hessian = hessian / s[:, None] / s[None, :]  # the input is now x / s
            entry.update(alpha=found.alpha, duo_scaling=found.duo,
                         relative_error=found.error, relative_error_unscaled=found.error_unscaled)
        else:
            entry["skipped"] = f"{'+'.join(group)}: {problem}"  # rounding still runs
        for name, module, scheme in zip(group, linears, group_schemes, strict=True):
            if scheme is None:
                continue
            info = log.setdefault(prefix + name, {})
            info["awq"] = entry
            scaled = module.weight.clone()
            if cfg.clip and name not in arch.clip_exempt:
                module.weight.data, info["clip_mean_shrink"] = awq.search_clip(
                    scaled, scheme, hessian, cfg, scale_dtype)
            # What RTN of the transformed weight costs, on the statistics pass's inputs.
            rounded = rtn.fake_quantize(module.weight, scheme, scale_dtype)
            info["relative_error"] = float(awq.output_error(scaled - rounded, hessian).sum()
                                           / awq.output_error(scaled, hessian).sum().clamp(
                                               min=1e-30))
    return log


def _label(fold: Fold) -> str:
    return fold.producer if fold.part is None else f"{fold.producer}[{fold.part}]"


def _rows(layer: nn.Module, fold: Fold) -> slice:
    return slice(None) if fold.part is None else layer.part_rows(fold.producer, fold.part)


def _fold_problem(layer: nn.Module, fold: Fold, width: int) -> str | None:
    """Why the scales cannot fold into the fold's producer (None when they can)."""
    producer = layer.get_submodule(fold.producer)
    if isinstance(producer, RMSNorm):
        return None
    if isinstance(producer, nn.Linear):
        rows = _rows(layer, fold).indices(producer.out_features)
        produced = len(range(*rows))
        if produced != width:
            return (f"{_label(fold)} gives {produced} outputs but the group reads {width} "
                    "inputs (grouped-query attention): scales cannot fold")
        return None
    return f"{fold.producer} is a {type(producer).__name__}, which cannot absorb scales"


def _fold(layer: nn.Module, fold: Fold, linears: list[nn.Module], s: torch.Tensor,
          scale_dtype: torch.dtype) -> None:
    """producer's output / s, the Linears' columns * s: the same function, rescaled inside.
    The producer's parameters are then rounded to the checkpoint's dtype, so that
    calibration sees exactly what is exported."""
    producer = layer.get_submodule(fold.producer)
    if isinstance(producer, RMSNorm):
        offset = producer.offset
        producer.weight.data = (producer.weight.data + offset) / s - offset
    else:
        rows = _rows(layer, fold)
        producer.weight.data[rows] /= s[:, None]
        if producer.bias is not None:
            producer.bias.data[rows] /= s
    for param in producer.parameters():
        param.data = param.data.to(scale_dtype).to(param.dtype)
    for module in linears:
        module.weight.data.mul_(s[None, :])
