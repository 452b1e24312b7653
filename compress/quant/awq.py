"""AWQ (Lin et al., 2023): protect the input channels that carry large activations.

Scaling input channel j of a Linear by s_j (and its input by 1/s_j, folded into the op that
produces it) leaves the function unchanged but shrinks channel j's relative rounding error.
`search_scales` picks s = mean|x|^alpha over a grid of alpha; `search_clip` then shrinks each
group's range where that lowers the output error.

Both searches score candidates by the exact output error over every calibration token,
||(W - W_hat) X||^2 = n/2 * tr(dW H dW^T) with H = 2 X^T X / n (the statistic GPTQ uses),
instead of re-running the Linears on a token sample per candidate as the reference code
does: all tokens count, and a candidate costs O(out * in^2) however many tokens there are.
Pure tensor math: the caller folds the scales into the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from compress.errors import CompressError

from . import rtn
from .scheme import QuantScheme


@dataclass(frozen=True)
class AWQConfig:
    """grid: alphas 0, 1/grid, ..., (grid-1)/grid for s = mean|x|^alpha. duo_scaling: also
    try s = mean|x|^alpha / mean|w|^(1-alpha) (AutoAWQ's and llm-compressor's default) and
    keep whichever candidate scores best. clip: after scaling, search per-group range
    shrinks 1, 1 - (1 - max_shrink)/clip_grid, ..., down to max_shrink.

    rescore: how many of the best candidates by each Linear's own output error are scored
    again by the decoder layer's output (the group's Linears rounded, the rest exact), on
    up to rescore_samples calibration samples; plain RTN (s = 1) always among them. 0 keeps
    the per-Linear choice."""

    grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    rescore: int = 4
    rescore_samples: int = 16

    def __post_init__(self) -> None:
        for name in ("grid", "clip_grid", "rescore_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CompressError(f"AWQ {name} must be a positive integer, got {value!r}")
        if isinstance(self.rescore, bool) or not isinstance(self.rescore, int) or self.rescore < 0:
            raise CompressError(f"AWQ rescore must be an integer >= 0, got {self.rescore!r}")
        if not isinstance(self.max_shrink, (int, float)) or not 0 < self.max_shrink <= 1:
            raise CompressError(f"AWQ max_shrink must be in (0, 1], got {self.max_shrink!r}")
        for flag in ("duo_scaling", "clip"):
            if not isinstance(getattr(self, flag), bool):
                raise CompressError(f"AWQ {flag} must be true or false")

    def to_dict(self) -> dict:
        return asdict(self)


class InputMagnitude:
    """Running mean of |x| per input channel."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.total = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.total.device)
        self.total += x.abs().sum(dim=0, dtype=torch.float64)
        self.n += x.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.total / max(self.n, 1)).to(torch.float32)


@dataclass(frozen=True)
class ScaleSearch:
    scales: torch.Tensor  # [in] float32: multiply the Linears' columns, divide their input
    alpha: float
    duo: bool  # whether the chosen candidate used the weight magnitude too
    error: float  # relative output error of the group after scaling and RTN
    error_unscaled: float  # the same without scaling (plain RTN): what AWQ improves on

    @property
    def unscaled(self) -> bool:
        """Whether this is the s = 1 candidate (plain RTN)."""
        return self.alpha == 0 and not self.duo


def output_error(dw: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """tr(dW H dW^T) per row: the squared output error over the calibration tokens (x n/2)."""
    return ((dw @ hessian) * dw).sum(dim=-1)


def search_scales(
    weights: Sequence[torch.Tensor],
    schemes: Sequence[QuantScheme | None],
    hessian: torch.Tensor | Sequence[torch.Tensor],
    magnitude: torch.Tensor,
    cfg: AWQConfig = AWQConfig(),
    scale_dtype: torch.dtype = torch.float16,
) -> ScaleSearch:
    """The best of `rank_scales`' candidates."""
    return rank_scales(weights, schemes, hessian, magnitude, cfg, scale_dtype)[0]


def rank_scales(
    weights: Sequence[torch.Tensor],
    schemes: Sequence[QuantScheme | None],
    hessian: torch.Tensor | Sequence[torch.Tensor],
    magnitude: torch.Tensor,
    cfg: AWQConfig = AWQConfig(),
    scale_dtype: torch.dtype = torch.float16,
) -> list[ScaleSearch]:
    """Every candidate per-input-channel scaling for Linears sharing one input (None
    scheme: stays dense), best first by the Linears' summed output error.

    `hessian` is the input's, or one per weight: experts behind one norm read the same
    channels but each only its routed tokens (each Hessian then weighted by its share of
    the tokens, so that errors add up over tokens). alpha = 0 (s = 1) is always a
    candidate, so the chosen scales never score worse than plain RTN on the calibration
    tokens.
    """
    ws = [w.to(torch.float32) for w in weights]
    hessians = ([hessian] * len(ws) if isinstance(hessian, torch.Tensor) else list(hessian))
    if len(hessians) != len(ws):
        raise ValueError(f"{len(ws)} weights but {len(hessians)} Hessians")
    hessians = [h.to(torch.float32) for h in hessians]
    total = sum(float(output_error(w, h).sum()) for w, h in zip(ws, hessians, strict=True))
    total = total or 1.0
    x_mean = magnitude.to(torch.float32).clamp(min=1e-4)
    w_mean = _weight_magnitude(ws, schemes) if cfg.duo_scaling else None

    def score(s: torch.Tensor) -> float:
        err = 0.0
        for w, scheme, h in zip(ws, schemes, hessians, strict=True):
            if scheme is not None:
                w_hat = rtn.fake_quantize(w * s, scheme, scale_dtype) / s
                err += float(output_error(w - w_hat, h).sum())
        return err / total

    unscaled = score(torch.ones_like(x_mean))
    found = [ScaleSearch(torch.ones_like(x_mean), 0.0, False, unscaled, unscaled)]
    for duo in (False, True) if w_mean is not None else (False,):
        for step in range(cfg.grid):
            alpha = step / cfg.grid
            if alpha == 0 and not duo:
                continue  # s = 1, scored above
            s = x_mean.pow(alpha)
            if duo:
                s = s / (w_mean.pow(1 - alpha) + 1e-4)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()  # centre the range: scales only matter relatively
            if not torch.isfinite(s).all():
                continue
            found.append(ScaleSearch(s, alpha, duo, score(s), unscaled))
    return sorted(found, key=lambda c: c.error)  # stable: ties keep s = 1 first


def _weight_magnitude(ws: Sequence[torch.Tensor], schemes: Sequence[QuantScheme | None]
                      ) -> torch.Tensor:
    """Mean over output rows of |w| relative to its group's max (per input channel)."""
    rows = []
    for w, scheme in zip(ws, schemes, strict=True):
        group = -1 if scheme is None else scheme.group_size
        g = rtn.grouped(w.abs(), group)
        rel = (g / (g.amax(dim=-1, keepdim=True) + 1e-6)).reshape(w.shape[0], -1)
        rows.append(rel[:, :w.shape[1]])
    return torch.cat(rows).mean(dim=0)


def search_clip(
    weight: torch.Tensor,
    scheme: QuantScheme,
    hessian: torch.Tensor,
    cfg: AWQConfig = AWQConfig(),
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, float]:
    """`weight` clamped to the per-(row, group) range that minimises the group's output error.

    Each group is scored with its own diagonal block of H (cross-group terms ignored, as in
    the reference), against the unclipped weight. The returned weight quantises, with plain
    min/max RTN, to exactly the chosen clipped scales. Also returns the mean chosen shrink.
    """
    w = weight.to(torch.float32)
    out_features, in_features = w.shape
    size = in_features if scheme.group_size <= 0 else scheme.group_size
    groups = rtn.grouped(w, size)  # [out, G, gs]
    blocks = _diagonal_blocks(hessian.to(torch.float32), size)  # [G, gs, gs]
    amax = groups.abs().amax(dim=-1, keepdim=True)  # [out, G, 1]

    def errors(limit: torch.Tensor) -> torch.Tensor:
        clipped = torch.maximum(torch.minimum(groups, limit), -limit)
        dw = (groups - rtn.fake_quantize_grouped(clipped, scheme, scale_dtype)).transpose(0, 1)
        return ((dw @ blocks) * dw).sum(dim=-1).transpose(0, 1)  # [out, G]

    best_err = errors(amax)
    best_shrink = torch.ones_like(best_err)
    for step in range(1, cfg.clip_grid + 1):
        shrink = 1 - step * (1 - cfg.max_shrink) / cfg.clip_grid
        err = errors(amax * shrink)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_shrink = torch.where(better, torch.full_like(best_shrink, shrink), best_shrink)
    limit = amax * best_shrink.unsqueeze(-1)
    clipped = torch.maximum(torch.minimum(groups, limit), -limit)
    clipped = clipped.reshape(out_features, -1)[:, :in_features]
    return clipped.contiguous(), float(best_shrink.mean())


def _diagonal_blocks(h: torch.Tensor, size: int) -> torch.Tensor:
    """[G, size, size] diagonal blocks of H, zero-padded like `rtn.grouped` pads columns."""
    n = h.shape[0]
    pad = -n % size
    if pad:
        h = torch.nn.functional.pad(h, (0, pad, 0, pad))
    g = h.shape[0] // size
    return torch.stack([h[i * size:(i + 1) * size, i * size:(i + 1) * size] for i in range(g)])
