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

import contextlib
import dataclasses
import posixpath
from collections.abc import Callable, Sequence

import torch
from torch import nn

from compress.distributed import Context
from compress.models import Architecture, Fold, RMSNorm
from compress.quant import QuantScheme, awq, gptq, rtn
from compress.quant.gptq import GPTQConfig, HessianAccumulator

from . import capture


@torch.no_grad()
def transform(layer: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
              chunks: Sequence[torch.Tensor], arch: Architecture,
              groups: Sequence[tuple[str, ...]], folds: Sequence[Fold], prefix: str,
              schemes: dict[str, QuantScheme], cfg: awq.AWQConfig, scale_dtype: torch.dtype,
              min_expert_tokens: int, ctx: Context | None = None,
              then_gptq: GPTQConfig | None = None) -> dict[str, dict]:
    """Scale-search and fold every foldable group of `layer`, then clip; returns the log.

    `then_gptq`: GPTQ rounds the layer next, with these settings. No weight is clipped:
    GPTQ minimises the output error against the weights it is given; clipped ones would
    hide the clipping's own error from it (measured: awq+gptq W3 g128 with clipping had KL
    0.687 against GPTQ's 0.581 alone), and it chooses each group's range itself. And the
    candidate scalings are rescored with GPTQ rounding them, a single Linear's too: the
    search's proxy prices RTN, whose errors a scaling evens out but GPTQ already
    compensates, so the RTN choice over-scales for GPTQ (measured at W3 g128: KL 0.373
    rescored under RTN, 0.354 under GPTQ, GPTQ alone 0.361). With s = 1 among the
    candidates, each block then scores no worse than GPTQ alone would leave it.

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
    rescorer: _BlockOutput | None = None  # made at the first fold that needs it
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
                       fold_schemes: list = fold_schemes) -> list[awq.ScaleSearch]:
                ranked = awq.rank_scales(
                    [linears[i].weight for i in scored], [fold_schemes[i] for i in scored],
                    [hessians[reader[names[i]]] * (tokens[reader[names[i]]] / most)
                     for i in scored],
                    stats[widest][1].mean(), cfg, scale_dtype)
                # the best few, and s = 1 always: the block's output then never scores
                # worse than the rounding alone leaves it; the scales go to the other
                # ranks pickled
                kept = (ranked[:max(1, cfg.rescore)] if then_gptq is None
                        else _milder(ranked, max(1, cfg.rescore)))
                if not any(c.unscaled for c in kept):
                    kept.append(next(c for c in ranked if c.unscaled))
                return [dataclasses.replace(c, scales=c.scales.cpu()) for c in kept]

            # on one rank, so that every rank folds the same scales
            candidates = ctx.decide(search, owner=k % ctx.world)
            found = candidates[0]
            # one Linear's own output error is what the proxy measured, unless GPTQ rounds
            if cfg.rescore and len(candidates) > 1 and (len(scored) > 1 or then_gptq):
                if rescorer is None:
                    rescorer = _BlockOutput(layer, forward, chunks, cfg.rescore_samples, ctx)
                rounding = _rtn_rounding(scale_dtype) if then_gptq is None else _gptq_rounding(
                    then_gptq, [reader[names[i]] for i in scored], hessians, scale_dtype)
                losses = rescorer.losses(
                    [names[i] for i in scored], [fold_schemes[i] for i in scored],
                    [c.scales.to(linears[0].weight.device) for c in candidates], rounding)
                best = min(range(len(candidates)), key=lambda j: (losses[j], j))
                found = candidates[best]
                unscaled = next(j for j, c in enumerate(candidates) if c.unscaled)
                entry.update(block_loss=losses[best], block_loss_unscaled=losses[unscaled],
                             rescored=len(candidates))
            s = found.scales.to(linears[0].weight.device)
            if rescorer is not None:
                rescorer.folding(fold.producer)
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
            if then_gptq is not None and cfg.clip and covered(name):
                info["clip_skipped"] = "GPTQ rounds next and sets each group's range itself"
            elif covered(name) and cfg.clip and name not in arch.clip_exempt:
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


class _StopForward(Exception):
    pass


class _BlockOutput:
    """Scores candidate scalings of one group as the reference AWQ does: by the output of
    the block holding the group's Linears (the attention, the MLP: their closest common
    parent) with those Linears rounded at each candidate and every other weight exact,
    against the untransformed block's output. The block runs on the inputs it received
    from the layer's own forward on the first `samples` calibration samples (over all
    ranks: the same samples as one process); each block's inputs are captured once."""

    def __init__(self, layer: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                 chunks: Sequence[torch.Tensor], samples: int, ctx: Context):
        counts = ctx.each(lambda: sum(len(c) for c in chunks))
        left = max(0, samples - sum(counts[:ctx.rank]))  # ranks before hold earlier samples
        self.inputs: list[torch.Tensor] = []
        for chunk in chunks:
            if left <= 0:
                break
            self.inputs.append(chunk[:left])
            left -= len(self.inputs[-1])
        self.layer, self.forward, self.ctx = layer, forward, ctx
        self.blocks: dict[str, tuple[list, list[torch.Tensor]]] = {}  # calls and outputs

    def _block(self, parent: str) -> tuple[list, list[torch.Tensor]]:
        if parent not in self.blocks:
            module = self.layer.get_submodule(parent)
            calls: list[tuple[tuple, dict]] = []

            def stop(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                calls.append((args, kwargs))
                raise _StopForward  # the rest of the layer is not needed

            handle = module.register_forward_pre_hook(stop, with_kwargs=True)
            try:
                for x in self.inputs:
                    with contextlib.suppress(_StopForward):
                        self.forward(x)
            finally:
                handle.remove()
            self.blocks[parent] = (calls, [module(*a, **k) for a, k in calls])
        return self.blocks[parent]

    def folding(self, producer: str) -> None:
        """`producer`'s output is about to be rescaled: a block outside it holds inputs
        that the folded Linears no longer read (inside, the block's function is unchanged)."""
        for parent in [p for p in self.blocks if not producer.startswith(p + ".")]:
            del self.blocks[parent]

    def losses(self, names: Sequence[str], schemes: Sequence[QuantScheme],
               candidates: Sequence[torch.Tensor], rounding: Rounding) -> list[float]:
        """Mean squared error of the block's output for each candidate scaling s (each
        Linear's columns times s, rounded by `rounding`, divided by s: the folded model's
        function)."""
        parent = posixpath.commonpath(
            [posixpath.dirname(n.replace(".", "/")) for n in names]).replace("/", ".")
        calls, targets = self._block(parent) if parent else (
            [((x,), {}) for x in self.inputs], [self.forward(x) for x in self.inputs])
        run = self.layer.get_submodule(parent) if parent else self.forward
        linears = [self.layer.get_submodule(n) for n in names]
        weights = [m.weight.data for m in linears]
        total = torch.zeros(len(candidates) + 1, dtype=torch.float64)
        total[-1] = sum(t.numel() for t in targets)
        try:
            for j, s in enumerate(candidates):
                rounded = rounding([w * s for w in weights], s, schemes)
                for m, w_hat in zip(linears, rounded, strict=True):
                    m.weight.data = w_hat / s
                for (args, kwargs), target in zip(calls, targets, strict=True):
                    total[j] += float((run(*args, **kwargs) - target).pow(2).sum(
                        dtype=torch.float64))
        finally:
            for m, w in zip(linears, weights, strict=True):
                m.weight.data = w
        self.ctx.all_reduce(total)
        return (total[:-1] / total[-1].clamp(min=1)).tolist()


def _milder(ranked: Sequence[awq.ScaleSearch], count: int) -> list[awq.ScaleSearch]:
    """The proxy's best scaling and `count - 1` milder ones for GPTQ to be scored with:
    plain mean|x|^alpha at fractions of the best's alpha. The proxy's runners-up sit next
    to its best, and its best is too strong for GPTQ (the rescoring then mostly chose
    s = 1, measured at W3)."""
    best = ranked[0]
    kept = [best]
    plain = [c for c in ranked if not c.duo and not c.unscaled]
    if not plain or best.alpha == 0:
        return kept
    for k in range(count - 1, 0, -1):
        near = min(plain, key=lambda c: abs(c.alpha - best.alpha * k / count))
        if all(near is not c for c in kept):
            kept.append(near)
    return kept


# (a group's weights with columns times s, s, their schemes) -> the weights rounded and
# dequantised
Rounding = Callable[[list[torch.Tensor], torch.Tensor, Sequence[QuantScheme]],
                    list[torch.Tensor]]


def _rtn_rounding(scale_dtype: torch.dtype) -> Rounding:
    return lambda weights, _s, schemes: [rtn.fake_quantize(w, scheme, scale_dtype)
                                         for w, scheme in zip(weights, schemes, strict=True)]


def _gptq_rounding(cfg: GPTQConfig, readers: Sequence[str], hessians: dict[str, torch.Tensor],
                   scale_dtype: torch.dtype) -> Rounding:
    """GPTQ as the pipeline runs it next, on each Linear's input Hessian (that of
    `readers[i]`) as scaled by s (x / s), against the Linear's own output: the unquantised
    model's inputs, which the model target needs, are not at hand here. Linears reading one
    input at one scheme (q/k/v) share a GPTQ pass, as in the pipeline."""
    plain = dataclasses.replace(cfg, target="layer")

    def rounding(weights: list[torch.Tensor], s: torch.Tensor,
                 schemes: Sequence[QuantScheme]) -> list[torch.Tensor]:
        together: dict[tuple[str, QuantScheme], list[int]] = {}
        for i, key in enumerate(zip(readers, schemes, strict=True)):
            together.setdefault(key, []).append(i)
        rounded: list[torch.Tensor] = [torch.empty(0)] * len(weights)
        for (name, scheme), members in together.items():
            hessian = hessians[name] / s[:, None] / s[None, :]
            results = gptq.quantize_shared_input([weights[i] for i in members], hessian,
                                                 scheme, plain, scale_dtype)
            for i, result in zip(members, results, strict=True):
                rounded[i] = result.weight.dequantize()
        return rounded

    return rounding


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
