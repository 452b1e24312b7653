"""AWQ applied to one decoder layer: statistics, scale search, folding, clipping.

The layer is transformed in place, in float32, before any rounding: every group's
input-channel scales are folded into the op that produces its input (named by the
architecture entry in `compress.models`), so the model computes the same function, and
each Linear's weight is clamped to its searched per-group range. The pipeline then rounds
the transformed layer with RTN (`--method awq`) or GPTQ (`--method awq+gptq`).
"""

from __future__ import annotations

import torch

from compress import decoder, models
from compress.quant import QuantScheme, awq, rtn
from compress.quant.gptq import HessianAccumulator


@torch.no_grad()
def transform(layer: decoder.DecoderLayer, arch: models.Architecture, prefix: str,
              x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              schemes: dict[str, QuantScheme], cfg: awq.AWQConfig,
              scale_dtype: torch.dtype, batch: int) -> dict[str, dict]:
    """Scale-search and fold every foldable group of `layer`, then clip; returns the log.

    `schemes` maps full Linear names to their schemes (absent: stays dense). Statistics come
    from one pass of the unmodified layer over x (as in the reference AWQ); folding changes
    only each group's own input, whose Hessian is rescaled exactly rather than re-measured.
    """
    stats: dict[tuple[str, ...], tuple[HessianAccumulator, awq.InputMagnitude]] = {}

    def record(names: tuple[str, ...], inputs: torch.Tensor) -> None:
        if names not in stats:
            width = inputs.shape[-1]
            stats[names] = (HessianAccumulator(width), awq.InputMagnitude(width))
        hessian, magnitude = stats[names]
        hessian.add(inputs)
        magnitude.add(inputs)

    layer.observe(x, cos, sin, record, batch)
    log: dict[str, dict] = {}
    for producer_name, group in arch.scale_folds:
        group_schemes = [schemes.get(prefix + n) for n in group]
        if all(s is None for s in group_schemes) or group not in stats:
            continue
        linears = [layer.get_submodule(n) for n in group]
        accumulator, magnitude = stats[group]
        hessian = accumulator.hessian()
        producer = layer.get_submodule(producer_name)
        problem = _fold_problem(producer, producer_name, linears[0].in_features)
        entry: dict = {"producer": producer_name}
        if problem is None:
            found = awq.search_scales([m.weight for m in linears], group_schemes, hessian,
                                      magnitude.mean(), cfg, scale_dtype)
            _fold(producer, linears, found.scales)
            for param in producer.parameters():  # as stored, so calibration sees the export
                param.data = param.data.to(scale_dtype).to(param.dtype)
            s = found.scales
            hessian = hessian / s[:, None] / s[None, :]  # the input is now x / s
            entry.update(alpha=found.alpha, duo_scaling=found.duo,
                         relative_error=found.error, relative_error_unscaled=found.error_unscaled)
        else:
            entry["skipped"] = problem  # rounding still runs: only the scaling is skipped
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


def _fold_problem(producer: torch.nn.Module, name: str, width: int) -> str | None:
    """Why the scales cannot fold into `producer` (None when they can)."""
    if isinstance(producer, decoder.RMSNorm):
        return None
    if isinstance(producer, torch.nn.Linear):
        if producer.out_features != width:
            return (f"{name} has {producer.out_features} outputs but the group reads {width} "
                    "inputs (grouped-query attention): scales cannot fold")
        return None
    return f"{name} is a {type(producer).__name__}, which cannot absorb scales"


def _fold(producer: torch.nn.Module, linears: list[torch.nn.Module], s: torch.Tensor) -> None:
    """producer's output / s, the Linears' columns * s: the same function, rescaled inside."""
    if isinstance(producer, decoder.RMSNorm):
        producer.weight.data.div_(s)
    else:
        producer.weight.data.div_(s[:, None])
        if producer.bias is not None:
            producer.bias.data.div_(s)
    for module in linears:
        module.weight.data.mul_(s[None, :])
