"""AWQ applied to one decoder layer: statistics, scale search, folding, clipping.

The layer is transformed in place, in float32, before any rounding: every group's
input-channel scales are folded into the op that produces its input (the architecture
table's folds), so the model computes the same function, and each Linear's
weight is clamped to its searched per-group range. The pipeline then rounds the
transformed layer with RTN (`--method awq`) or GPTQ (`--method awq+gptq`).

Folds are exact or not made: a norm scales by (offset + w), so w becomes
(offset + w) / s - offset; a Linear's output rows (or the part of a fused projection
that produces the group's input) are divided by s. A group whose input no single op
produces (grouped-query v -> o, OLMo-2's groups reading the residual stream) keeps its
weights unscaled, and the log says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from compress.distributed import Context
from compress.models import Architecture, Fold, RMSNorm
from compress.quant import QuantScheme, awq, rtn
from compress.quant.gptq import HessianAccumulator

from . import capture


@torch.no_grad()
def transform(layer: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
              chunks: Sequence[torch.Tensor], arch: Architecture,
              groups: Sequence[tuple[str, ...]], folds: Sequence[Fold], prefix: str,
              schemes: dict[str, QuantScheme], cfg: awq.AWQConfig, scale_dtype: torch.dtype,
              min_expert_tokens: int, ctx: Context | None = None) -> dict[str, dict]:
    """Scale-search and fold every foldable group of `layer`, then clip; returns the log.

    `groups` and `folds` are the layer's (`ModelFiles.layer_groups`/`layer_folds`);
    `schemes` maps full Linear names to their schemes (absent: stays dense). Statistics
    come from one pass of the unmodified layer over the chunks (as in the reference AWQ);
    folding changes only each group's own input, whose Hessian is rescaled exactly rather
    than re-measured. An expert routed fewer than `min_expert_tokens` tokens takes no
    part in any search (its statistics fit those tokens only): it is still scaled where
    its input is, but neither its own scales nor its clipping are searched.

    With several processes (`ctx`) the statistics are summed over ranks; each fold's
    search runs on one rank and its scales go to all, and the Linears' clipping searches
    are dealt to ranks, so every rank holds the same transformed layer.
    """
    ctx = ctx or Context()
    # Every Linear reads its group's input; a fold's dense reader outside any group (the
    # router, beside the experts' gate/ups) reads the same channels over all tokens.
    reader = {name: group[0] for group in groups for name in group}
    for fold in folds:
        for name in fold.group:
            reader.setdefault(name, name)
    stats: dict[str, tuple[HessianAccumulator, awq.InputMagnitude]] = {}

    def record(name: str, x: torch.Tensor) -> None:
        if name not in stats:
            stats[name] = (HessianAccumulator(x.shape[-1], x.device),
                           awq.InputMagnitude(x.shape[-1], x.device))
        hessian, magnitude = stats[name]
        hessian.add(x)
        magnitude.add(x)

    with capture.observe(layer, dict.fromkeys(reader.values()), record):
        for chunk in chunks:
            forward(chunk)
    if ctx.world > 1:
        _reduce(layer, stats, dict.fromkeys(reader.values()), ctx)
    hessians = {name: acc.hessian() for name, (acc, _) in stats.items()}
    tokens = {name: acc.n for name, (acc, _) in stats.items()}

    def covered(name: str) -> bool:
        """Whether `name`'s statistics count: every token reaches a dense Linear."""
        return not arch.is_expert(name) or tokens.get(reader[name], 0) >= min_expert_tokens

    entries: dict[str, dict] = {}  # Linear -> the log of the fold that scaled its input
    for k, fold in enumerate(folds):
        names = fold.group
        fold_schemes = [schemes.get(prefix + n) for n in names]
        if all(scheme is None for scheme in fold_schemes):
            continue
        linears = [layer.get_submodule(n) for n in names]
        scored = [i for i, n in enumerate(names)
                  if fold_schemes[i] is not None and reader[n] in stats and covered(n)]
        entry: dict = {"producer": _label(fold)}
        problem = _fold_problem(layer, fold, linears[0].in_features)
        if problem is None and not scored:
            seen = max((tokens.get(reader[n], 0) for n in names), default=0)
            problem = (f"routed {seen} calibration tokens, under the minimum of "
                       f"{min_expert_tokens} for a scale search")
        if problem is None:
            # The widest reader's inputs (the router's: all tokens) give mean |x|.
            widest = max((reader[n] for n in names if reader[n] in stats), key=tokens.get)
            most = max(tokens[reader[names[i]]] for i in scored)

            def search(scored: list[int] = scored, widest: str = widest, most: int = most,
                       names: tuple[str, ...] = names, linears: list = linears,
                       fold_schemes: list = fold_schemes) -> awq.ScaleSearch:
                found = awq.search_scales(
                    [linears[i].weight for i in scored], [fold_schemes[i] for i in scored],
                    [hessians[reader[names[i]]] * (tokens[reader[names[i]]] / most)
                     for i in scored],
                    stats[widest][1].mean(), cfg, scale_dtype)
                return dataclasses.replace(found, scales=found.scales.cpu())  # sent pickled

            # on one rank, so that every rank folds the same scales
            found = ctx.decide(search, owner=k % ctx.world)
            s = found.scales.to(linears[0].weight.device)
            _fold(layer, fold, linears, s, scale_dtype,
                  dense=[m for m, scheme in zip(linears, fold_schemes, strict=True)
                         if scheme is None])
            for r in {reader[n] for n in names if reader[n] in hessians}:
                hessians[r] = hessians[r] / s[:, None] / s[None, :]  # the input is now x / s
            entry.update(alpha=found.alpha, duo_scaling=found.duo,
                         relative_error=found.error, relative_error_unscaled=found.error_unscaled)
        else:
            entry["skipped"] = f"{_names(names)}: {problem}"  # rounding still runs
        entries.update(dict.fromkeys(names, entry))

    log: dict[str, dict] = {}
    clips: list[tuple[str, QuantScheme, str]] = []  # (Linear, scheme, reader) to clip
    for group in groups:
        entry = entries.get(group[0]) or {"producer": None, "skipped": (
            f"{_names(group)}: no single op produces its input (it reads the residual stream)")}
        for name in group:
            scheme = schemes.get(prefix + name)
            if scheme is None:
                continue
            info = log.setdefault(prefix + name, {})
            info["awq"] = entry
            r = reader[name]
            if arch.is_expert(name):
                info["tokens"] = tokens.get(r, 0)
            if r not in hessians:  # an expert no calibration token reached
                info["relative_error"] = None  # nothing to measure it on
                continue
            if not covered(name):
                info["clip_skipped"] = (f"routed {tokens[r]} calibration tokens, under the "
                                        f"minimum of {min_expert_tokens}")
            clips.append((name, scheme, r))

    def clip(jobs: list[int]) -> dict[str, tuple[torch.Tensor | None, dict]]:
        done = {}
        for j in jobs:
            name, scheme, r = clips[j]
            hessian, weight = hessians[r], layer.get_submodule(name).weight
            info: dict = {}
            clipped = None
            if covered(name) and cfg.clip and name not in arch.clip_exempt:
                clipped, info["clip_mean_shrink"] = awq.search_clip(
                    weight.clone(), scheme, hessian, cfg, scale_dtype)
            # What RTN of the transformed weight costs, on the statistics pass's inputs.
            rounded = rtn.fake_quantize(weight if clipped is None else clipped, scheme,
                                        scale_dtype)
            info["relative_error"] = float(awq.output_error(weight - rounded, hessian).sum()
                                           / awq.output_error(weight, hessian).sum().clamp(
                                               min=1e-30))
            done[name] = (None if clipped is None else clipped.cpu(), info)
        return done

    owners = ctx.deal([layer.get_submodule(name).out_features for name, _, _ in clips])
    for part in ctx.each(lambda: clip([j for j, r in enumerate(owners) if r == ctx.rank])):
        for name, (clipped, info) in part.items():
            module = layer.get_submodule(name)
            if clipped is not None:
                module.weight.data = clipped.to(module.weight.device)
            log[prefix + name].update(info)
    return log


def _reduce(layer: nn.Module, stats: dict[str, tuple[HessianAccumulator, awq.InputMagnitude]],
            readers: Sequence[str], ctx: Context) -> None:
    """Every reader's statistics summed over ranks, in one order on every rank (a rank
    whose samples route no token to an expert has none of its own: zeros). Readers no
    rank saw are dropped."""
    for name in readers:
        if name not in stats:
            module = layer.get_submodule(name)
            stats[name] = (HessianAccumulator(module.in_features, module.weight.device),
                           awq.InputMagnitude(module.in_features, module.weight.device))
        hessian, magnitude = stats[name]
        hessian.h, hessian.n = ctx.reduce_mean(hessian.h, hessian.n)
        ctx.all_reduce(magnitude.total)
        (magnitude.n,) = ctx.sum_counts([magnitude.n])
        if hessian.n == 0:
            del stats[name]


def _names(names: Sequence[str]) -> str:
    """A group's Linears for a log line (a layer's experts are many)."""
    return "+".join(names) if len(names) <= 4 else (
        f"{names[0]}+...+{names[-1]} ({len(names)} Linears)")


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
          scale_dtype: torch.dtype, dense: Sequence[nn.Module] = ()) -> None:
    """producer's output / s, the Linears' columns * s: the same function, rescaled inside.
    The producer's parameters, and the `dense` Linears' (kept unquantised), are then
    rounded to the checkpoint's dtype, so that calibration sees exactly what is
    exported."""
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
    for module in dense:
        module.weight.data = module.weight.data.to(scale_dtype).to(module.weight.dtype)
