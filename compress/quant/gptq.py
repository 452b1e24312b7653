"""GPTQ (Frantar et al., 2022): quantise W column by column, pushing each column's rounding
error onto the columns not yet quantised, weighted by the inverse Hessian of the layer's
inputs, H = 2 X^T X / n.

Pure tensor math: `HessianAccumulator` streams inputs into H; `quantize_layer(W, H, scheme,
cfg)` returns the packed weight plus diagnostics. The blocked "lazy batch" update below is
mathematically the column-by-column algorithm (tests hold it to an unblocked oracle).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from compress.errors import CompressError
from compress.kernels import QuantizedWeight
from compress.progress import status

from . import rtn
from .scheme import QuantScheme

TARGETS = ("layer", "model")  # GPTQConfig.target


@dataclass(frozen=True)
class GPTQConfig:
    """damp: fraction of mean(diag H) added to the diagonal (raised x10 while Cholesky fails).
    act_order (default on): quantise columns by descending H diagonal; on the bundled model it
    takes W4 perplexity from 56.2 to 52.2 and W3 from 112 to 79. static_groups (default) fixes
    group scales from the original weights before reordering, so the checkpoint needs no
    g_idx and every engine reads it; without it groups follow the new order and g_idx
    maps columns to groups (slightly more accurate, fewer readers). mse_clip: search a
    per-group range shrink minimising the quantisation error instead of using min/max.
    target: what the rounded Linear's output should match: "model" (default), the
    unquantised model's output of that Linear (GPTAQ, Li et al. 2025: each Linear also
    undoes the error earlier ones left in its input; `target_weight`), or "layer", the
    unquantised Linear on the inputs the quantised model gives (plain GPTQ).
    target_strength: with "model", the fraction of the way from W to that fit GPTQ rounds
    (the full fit to one calibration set over-corrects: docs/algorithms.md)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    mse_clip: bool = False
    target: str = "model"
    target_strength: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.damp, bool) or not isinstance(self.damp, int | float) or not (
                0 < self.damp < 1):
            raise CompressError(f"GPTQ damp must be in (0, 1), got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or (
                self.block_size < 1):
            raise CompressError(f"GPTQ block_size must be a positive integer, got "
                                f"{self.block_size!r}")
        for flag in ("act_order", "static_groups", "mse_clip"):
            if not isinstance(getattr(self, flag), bool):
                raise CompressError(f"GPTQ {flag} must be true or false")
        if isinstance(self.target_strength, bool) or not isinstance(
                self.target_strength, int | float) or not 0 < self.target_strength <= 1:
            raise CompressError(f"GPTQ target_strength must be in (0, 1], got "
                                f"{self.target_strength!r}")
        if self.target not in TARGETS:
            raise CompressError(f"GPTQ target must be one of {', '.join(TARGETS)}, got "
                                f"{self.target!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class HessianAccumulator:
    """H = 2/n * sum_t x_t x_t^T over every input row seen, without keeping the inputs.

    H is symmetric, so only its upper block triangle is accumulated (about 2/3 of the
    multiply-adds for wide inputs); `hessian()` mirrors it.
    """

    BLOCK = 256  # narrower blocks waste less of the triangle but run matmuls less efficiently

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        # inputs may live in host memory while H sits on the calibration device
        x = x.reshape(-1, x.shape[-1]).to(self.h.device, torch.float32)  # (tokens, in)
        m = x.shape[0]
        if m == 0:
            return
        # Running mean keeps H's magnitude independent of the token count (no fp32 overflow).
        self.h *= self.n / (self.n + m)
        self.n += m
        for i in range(0, x.shape[1], self.BLOCK):
            j = i + self.BLOCK
            self.h[i:j, i:].addmm_(x[:, i:j].T, x[:, i:], alpha=2.0 / self.n)

    def hessian(self) -> torch.Tensor:
        upper = self.h.triu()
        return upper + upper.triu(1).T


class CrossAccumulator:
    """C = 2/n * sum_t r_t x_t^T: the unquantised model's inputs r against the quantised
    model's x at the same tokens (`target_weight`), scaled as `HessianAccumulator`'s H."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.c = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, reference: torch.Tensor, x: torch.Tensor) -> None:
        r = reference.reshape(-1, reference.shape[-1]).to(self.c.device, torch.float32)
        x = x.reshape(-1, x.shape[-1]).to(self.c.device, torch.float32)
        if r.shape != x.shape:
            raise ValueError(f"reference inputs {tuple(r.shape)} do not pair with the "
                             f"inputs {tuple(x.shape)}")
        m = x.shape[0]
        if m == 0:
            return
        self.c *= self.n / (self.n + m)
        self.n += m
        self.c.addmm_(r.T, x, alpha=2.0 / self.n)


def target_weight(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor,
                  damp: float, name: str = "layer", strength: float = 1.0) -> torch.Tensor:
    """W C (H + damp)^-1: the weight whose output on the quantised model's inputs X best
    matches (least squares) the unquantised model's W R, from H = 2 X X^T / n and
    C = 2 R X^T / n. GPTQ of it on H minimises ||W R - Q X||^2, GPTAQ's objective: the
    fit's residual is orthogonal to X's rows, so the two differ by a constant. Damped as
    GPTQ damps H (a ridge fit: columns X barely spans stay near W's). `strength` < 1
    moves only that fraction of the way from W to the fit (`GPTQConfig.target_strength`)."""
    _require_finite_hessian(hessian, name)
    _require_finite_hessian(cross, name)
    h = hessian.to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = float(torch.diag(h).mean())
    upper, used = _inverse_cholesky(h, damp, name)  # (H + λ)^-1 = U^T U
    del h
    # argmin_V ||W R - V X||^2 + λ ||V - W||^2 = (W C + λ W)(H + λ)^-1: with R = X (no
    # error upstream) exactly W, so this target then gives plain GPTQ's result
    w = weight.to(torch.float32)
    rhs = w @ cross.to(torch.float32) + (used * mean_diag) * w
    fit = (rhs @ upper.T) @ upper
    return fit if strength == 1.0 else w + strength * (fit - w)


@dataclass(frozen=True)
class GPTQResult:
    weight: QuantizedWeight
    relative_error: float  # tr(dW H dW^T) / tr(W H W^T): output error relative to the output
    damp: float  # the damping that made H positive definite
    dead_columns: int  # inputs that were always zero
    # each weight as it stood, error-compensated, when it was rounded (round(it / scale)
    # gives the code): where learned rounding starts from GPTQ; only when asked for
    continuous: torch.Tensor | None = None


def quantize_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    cfg: GPTQConfig = GPTQConfig(),
    scale_dtype: torch.dtype = torch.float16,
    name: str = "layer",
    continuous: bool = False,
) -> GPTQResult:
    """GPTQ-quantise `weight` [out, in] given the input Hessian [in, in]."""
    return quantize_shared_input([weight], hessian, scheme, cfg, scale_dtype, name,
                                 continuous)[0]


def quantize_shared_input(
    weights: Sequence[torch.Tensor],
    hessian: torch.Tensor,
    scheme: QuantScheme,
    cfg: GPTQConfig = GPTQConfig(),
    scale_dtype: torch.dtype = torch.float16,
    name: str = "layer",
    continuous: bool = False,
) -> list[GPTQResult]:
    """GPTQ for several Linears that read the same input (q/k/v, gate/up), in one pass.

    GPTQ treats output rows independently given H, so stacking the weights gives each
    Linear exactly its own result while the column loop, the inverse Hessian and its
    act-order permutation are paid for once.
    """
    _require_finite_hessian(hessian, name)
    if not all(bool(torch.isfinite(w).all()) for w in weights):
        raise CompressError(f"the weights of {name} contain NaN/Inf; the source model is "
                            "corrupt or overflowed its dtype")
    sizes = [w.shape[0] for w in weights]
    stacked = _quantize_rows(torch.cat([w.to(torch.float32) for w in weights]), hessian,
                             scheme, cfg, scale_dtype, name, continuous)
    results, start = [], 0
    for w, size in zip(weights, sizes, strict=True):
        part = stacked.weight.rows(start, start + size)
        kept = None if stacked.continuous is None else stacked.continuous[start:start + size]
        start += size
        results.append(GPTQResult(part, relative_output_error(w, part.dequantize(), hessian),
                                  stacked.damp, stacked.dead_columns, kept))
    return results


def _require_finite_hessian(statistic: torch.Tensor, name: str) -> None:
    if not torch.isfinite(statistic).all():
        raise CompressError(f"the calibration Hessian of {name} contains NaN/Inf (activations "
                            "overflowed?); check the model's dtype and calibration data")


def _quantize_rows(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    cfg: GPTQConfig,
    scale_dtype: torch.dtype,
    name: str,
    continuous: bool = False,
) -> GPTQResult:
    out_features, in_features = weight.shape
    w = weight.to(torch.float32).clone()
    h = hessian.to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    group = in_features if scheme.group_size == -1 else scheme.group_size
    static = None
    if scheme.group_size == -1 or (cfg.static_groups and cfg.act_order):
        # Scales fixed up front from the original weights, indexed by original column.
        static = _group_qparams(w, group, scheme, cfg, scale_dtype)

    perm = None
    if cfg.act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm[:, None], perm]  # one gather: H is the big tensor here
    hinv, damp = _inverse_cholesky(h, cfg.damp, name)
    del h

    codes = torch.zeros(out_features, in_features, dtype=torch.int8, device=w.device)
    kept = torch.zeros_like(w) if continuous else None
    if static is not None:
        scales, zeros = static
    else:
        n_groups = -(-in_features // group)
        scales = torch.zeros(out_features, n_groups, device=w.device)
        zeros = None if scheme.symmetric else torch.zeros(out_features, n_groups,
                                                          device=w.device)
    # Original column of each position; static groups are indexed by it.
    original = perm if perm is not None else torch.arange(in_features, device=w.device)
    order = original.tolist()  # read per column: one transfer, not one per column on a GPU
    # Blocks hold whole groups, so a group's scales see every earlier column's update.
    block = cfg.block_size if static is not None else -(-cfg.block_size // group) * group
    for i1 in range(0, in_features, block):
        i2 = min(i1 + block, in_features)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                g = order[col] // group
            else:
                g = col // group
                if col % group == 0:  # a new group: scales from the error-updated weights
                    s_new, z_new = rtn.qparams(w1[:, i:i + group], scheme.bits,
                                               scheme.symmetric, scale_dtype, cfg.mse_clip)
                    scales[:, g] = s_new
                    if zeros is not None:
                        zeros[:, g] = z_new
            s, z = scales[:, g], None if zeros is None else zeros[:, g]
            if kept is not None:
                kept[:, col] = w1[:, i]
            q = rtn.quantize_codes(w1[:, i], s, z, scheme.bits)
            codes[:, col] = q.to(torch.int8)
            deq = rtn.dequantize_codes(q, s, z, scheme.bits)
            err = (w1[:, i] - deq) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        if kept is not None:
            kept = kept[:, inverse]
        if static is None:
            g_idx = (inverse // group).to(torch.int32)
    offset = 1 << (scheme.bits - 1)
    qw = QuantizedWeight.from_codes(
        codes, scales.to(scale_dtype),
        None if zeros is None else (zeros - offset).to(torch.int8),
        bits=scheme.bits, group_size=scheme.group_size, g_idx=g_idx)
    return GPTQResult(qw, float("nan"), damp, int(dead.sum()), kept)  # error: per caller's part


def _group_qparams(w: torch.Tensor, group: int, scheme: QuantScheme, cfg: GPTQConfig,
                   scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales [out, G] (and unsigned zeros) of every group of the unmodified weight."""
    return rtn.qparams(rtn.grouped(w, group), scheme.bits, scheme.symmetric, scale_dtype,
                       cfg.mse_clip)


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damp until it exists.

    Damps `h` in place (it is the caller's private copy) and keeps at most two [in, in]
    matrices alive besides it: for wide layers these dominate the quantiser's memory.
    """
    mean_diag = float(torch.diag(h).mean())
    tried, added = damp, 0.0
    while tried < 1e6:
        h.diagonal().add_(tried * mean_diag - added)
        added = tried * mean_diag
        try:
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
            upper = torch.linalg.cholesky(hinv, upper=True)
            del hinv
            if tried != damp:
                status(f"warning: {name}: Hessian not positive definite at damp={damp}; "
                       f"used damp={tried:g}")
            return upper, tried
        except torch.linalg.LinAlgError:
            tried *= 10
    raise CompressError(f"the calibration Hessian of {name} is degenerate even with heavy "
                        "damping; check the calibration data")


def relative_output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - W_hat) X||^2 / ||W X||^2, computed from H = 2 X^T X / n."""
    w = w.to(torch.float32)
    dw = w - w_hat.to(torch.float32)
    num = float(((dw @ hessian) * dw).sum())
    den = float(((w @ hessian) * w).sum())
    return num / den if den > 0 else 0.0
