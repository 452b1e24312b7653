"""Learned rounding (SignRound, Cheng et al. 2023, the method behind Intel's auto-round).

Each weight rounds as round(w / s + v) instead of round(w / s): a learned offset v in
[-0.5, 0.5] per weight may flip it to the other neighbouring grid point, and learned
factors in [0.5, 1] shrink each end of each group's range (clipping). Both are trained by
signed gradient descent (or Adam, with wider limits: `OPTIMIZERS`), with a step that
decays linearly to zero, to make a whole decoder layer's output, computed with every
Linear fake-quantised, match the unquantised model's on the calibration tokens; rounding
goes through a straight-through estimator. Scales are RTN's (the signed symmetric grid,
`rtn.signed_symmetric_scale`) of the shrunk range.
The layer loop is `compress.calibrate.signround`; this module holds the per-Linear math.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from compress.errors import CompressError
from compress.kernels import QuantizedWeight

from . import rtn
from .precision import check
from .scheme import QuantScheme

# The smallest range factor. auto-round 0.15 clamps at 0, but at the default step (1/iters
# decaying linearly to 0, about 0.5 in all) a factor starting at 1 cannot pass 0.5 there.
MIN_RANGE = 0.5
# What a layer's output is trained to match: "model", the unquantised model's output of
# this layer (its inputs carried beside the quantised ones, so each layer also undoes the
# error the earlier layers left: auto-round's target), or "layer", the unquantised layer's
# output on the quantised inputs (half the activation memory).
TARGETS = ("model", "layer")
# Where the rounding starts: "rtn", each weight's nearest grid point on its own range, or
# "gptq", GPTQ's result for the layer: its grid, and its error-compensated weights, so
# that zero offsets give GPTQ's codes and learning moves on from there.
STARTS = ("rtn", "gptq")
# How the offsets and range factors move: "sign", a signed step (SignRound's update, the
# step decaying linearly from 1/iters); "adam", Adam at `ADAM_LR` decaying linearly to 0,
# with each offset free within one grid step either side and each range end within
# [0.5, 1.25] of its start (a weight may then move two grid points, and a group's range
# widen, which the signed step's half-step budget never reaches). On the bundled model's
# W2 g64 layers 1-3 Adam's 100 steps left 0.74x GPTQ's held-out layer error on average,
# 25 signed steps 0.89x (benchmarks/signround_steps.py; benchmarks/lowbit.py "+adam" for
# the whole model).
OPTIMIZERS = ("sign", "adam")
ADAM_LR = 5e-3
# What a step's loss measures: "output", the squared error of the layer's output (the
# residual stream) as it is; "normed", that error as the norms that read the stream see
# it: each token divided by the target's root mean square, each channel times the readers'
# gain (`squared_error`). Gemma-3-270M keeps 84-99% of its stream's energy in 1% of its
# channels, layer by layer, but weighed by its norms' gains 26-89%: the plain loss is
# almost all error in channels the next layers read at a tenth of the rest's weight or less.
# On the bundled Llama the norms weigh those channels about as the rest (51-95% raw,
# 32-91% read), but from layer 11 on 63-85% of its energy is in the first position, an
# attention sink that each norm scales down with the rest of its token
# (benchmarks/stream_energy.py). "auto" is "normed" for the families that norm each
# branch's output before the residual add (Gemma-2/3; `loss_for`), "output" for the rest:
# on Gemma-3-270M the normed loss lowered the recipes' layers' KL by 9% at W4 and 12% at
# W3, on the bundled Llama it gained nothing (docs/figures.md#gemma-normed-loss).
LOSSES = ("auto", "output", "normed")

# More left out would no longer be outliers: the loss would ignore what the layer is for.
MAX_TRIM = 0.1


# settings added after recipes were first written: left out of a recipe at their default
_LEFT_OUT_AT_DEFAULT = {"optimizer": "sign", "learn_ranges": True, "precision": "float32",
                        "warmup": 0, "retry_lr": None, "trim": 0.0, "loss": "auto"}


@dataclass(frozen=True)
class SignRoundConfig:
    """iters: steps per decoder layer; lr: the first step's size, decaying linearly to 0 (None:
    1/iters for "sign", `ADAM_LR` for "adam"); batch: calibration samples per step; target:
    `TARGETS`; start: `STARTS`; optimizer: `OPTIMIZERS`; learn_ranges: whether each group's
    range factors (the clipping) are learned beside the offsets, or each group keeps the
    range it starts with (with start "gptq": GPTQ's grid, which already fits the layer's
    Hessian: at W3 g128, Adam at lr 0.01 with it fixed left 0.79x / 0.88x GPTQ's held-out
    error on layers 0 / 1, with it learned 0.91x / 0.90x; benchmarks/signround_steps.py);
    precision: the learning steps' matmuls' dtype (`compress.quant.precision`; the
    candidates are judged and packed in float32 either way); warmup: steps over which the
    step rises to its full size (from GPTQ's start, Adam's first full steps move every
    offset at once: at W3 on the bundled model's layer 2 the batch loss went from 0.19 to
    11.4 and the layer kept GPTQ's start; with 20 steps of warm-up it learned, 0.196 ->
    0.171 on the whole set; benchmarks/signround_trace.py); retry_lr: a layer where no
    learned candidate beats the start on the whole calibration set learns once more from the
    start with this first step (None: never; the layer's loss is too noisy for the step
    there: the W3 recipe's layer 0 keeps GPTQ's start at 1e-2 and 3e-3, gains 0.4% at 2e-3,
    and at 1e-3 learns 0.0448 -> 0.0434); trim: the fraction of each step's largest squared
    output errors left out of its loss (auto-round's 2-bit extension leaves out 0.001: at 2
    bits a few outputs' errors dominate the mean and its gradient). The candidates are
    judged on the whole set's untrimmed error either way; loss: `LOSSES` (the steps and
    the judging alike)."""

    iters: int = 200
    lr: float | None = None
    batch: int = 8
    target: str = "model"
    start: str = "rtn"
    optimizer: str = "sign"
    learn_ranges: bool = True
    precision: str = "float32"
    warmup: int = 0
    retry_lr: float | None = None
    trim: float = 0.0
    loss: str = "auto"

    def __post_init__(self) -> None:
        for name in ("iters", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CompressError(f"signround {name} must be a positive integer, "
                                    f"got {value!r}")
        for name in ("lr", "retry_lr"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, float))
                                      or not 0 < value <= 1):
                raise CompressError(f"signround {name} must be in (0, 1], got {value!r}")
        if self.target not in TARGETS:
            raise CompressError(f"signround target must be one of {', '.join(TARGETS)}, "
                                f"got {self.target!r}")
        if self.start not in STARTS:
            raise CompressError(f"signround start must be one of {', '.join(STARTS)}, "
                                f"got {self.start!r}")
        if self.loss not in LOSSES:
            raise CompressError(f"signround loss must be one of {', '.join(LOSSES)}, "
                                f"got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise CompressError(f"signround optimizer must be one of "
                                f"{', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) \
                or not 0 <= self.warmup < self.iters:
            raise CompressError(f"signround warmup must be a whole number of steps from 0 "
                                f"to iters - 1 ({self.iters - 1}), got {self.warmup!r}")
        check(self.precision, "signround precision")
        if isinstance(self.trim, bool) or not isinstance(self.trim, (int, float)) \
                or not 0 <= self.trim < MAX_TRIM:
            raise CompressError(f"signround trim must be a fraction from 0 to below "
                                f"{MAX_TRIM}, got {self.trim!r}")
        if not isinstance(self.learn_ranges, bool):
            raise CompressError(f"signround learn_ranges must be true or false, "
                                f"got {self.learn_ranges!r}")

    @property
    def step(self) -> float:
        """The full step's size (the first step's, without warm-up)."""
        if self.lr is not None:
            return float(self.lr)
        return ADAM_LR if self.optimizer == "adam" else 1.0 / self.iters

    @property
    def limits(self) -> tuple[float, float]:
        """(largest |offset|, largest range factor) the learned parameters are kept in."""
        return (1.0, 1.25) if self.optimizer == "adam" else (0.5, 1.0)

    def step_at(self, i: int) -> float:
        """Step i's size: linear decay to 0 over `iters` (auto-round's schedule), so the
        last steps settle instead of flipping offsets back and forth; over the first
        `warmup` steps it also rises linearly from step / warmup."""
        size = self.step * (1.0 - i / self.iters)
        return size * min(1.0, (i + 1) / self.warmup) if self.warmup else size

    def to_dict(self) -> dict:
        data = asdict(self)
        # recipes written before these choices existed stay as they were (and hash alike)
        for name, default in _LEFT_OUT_AT_DEFAULT.items():
            if data[name] == default:
                del data[name]
        return data


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


class LearnedRounding(nn.Module):
    """A weight parametrization (torch.nn.utils.parametrize): the weight it receives comes
    out fake-quantised under the learned offsets and range factors, differentiably."""

    def __init__(self, weight: torch.Tensor, scheme: QuantScheme,
                 scale_dtype: torch.dtype = torch.float16,
                 bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
                 limits: tuple[float, float] = (0.5, 1.0), learn_ranges: bool = True):
        """`bounds`: each group's (lo, hi) [out, groups] the range factors scale, fixed
        (another method's grid, e.g. GPTQ's); None: the weight's own min and max.
        `limits`: `SignRoundConfig.limits`. `learn_ranges` off: the range factors stay
        at 1 (`SignRoundConfig.learn_ranges`)."""
        super().__init__()
        self.scheme, self.scale_dtype = scheme, scale_dtype
        self.max_offset, self.max_range = limits
        self.in_features = weight.shape[1]
        groups = rtn.grouped(weight.detach().to(torch.float32), scheme.group_size)
        self.offsets = nn.Parameter(torch.zeros_like(groups))
        self.max_factor = nn.Parameter(torch.ones(groups.shape[:2], device=weight.device))
        self.min_factor = nn.Parameter(torch.ones(groups.shape[:2], device=weight.device))
        for factor in (self.max_factor, self.min_factor):
            factor.requires_grad_(learn_ranges)
        self.bounds = bounds

    def params(self) -> list[nn.Parameter]:
        """The learned parameters: the offsets, and the range factors unless frozen."""
        return [p for p in (self.offsets, self.max_factor, self.min_factor) if p.requires_grad]

    @torch.no_grad()
    def clamp_(self) -> None:
        self.offsets.clamp_(-self.max_offset, self.max_offset)
        for factor in (self.max_factor, self.min_factor):
            factor.clamp_(MIN_RANGE, self.max_range)

    def _range(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group's (lo, hi), both ends shrunk by their learned factors (symmetric
        grids too: the signed scale follows whichever end stays the larger)."""
        if self.bounds is None:
            lo, hi = groups.amin(dim=-1).clamp(max=0), groups.amax(dim=-1).clamp(min=0)
        else:
            lo, hi = self.bounds
        return lo * self.min_factor, hi * self.max_factor

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        bits = self.scheme.bits
        groups = rtn.grouped(weight.to(torch.float32), self.scheme.group_size)
        lo, hi = self._range(groups)
        if self.scheme.symmetric:
            scale = rtn.signed_symmetric_scale(lo, hi, bits).unsqueeze(-1)
            q = torch.clamp(_round_ste(groups / scale + self.offsets),
                            -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
            deq = q * scale
        else:
            scale = ((hi - lo) / ((1 << bits) - 1)).clamp(min=1e-12).unsqueeze(-1)
            zero = torch.clamp(_round_ste(-lo.unsqueeze(-1) / scale), 0, (1 << bits) - 1)
            q = torch.clamp(_round_ste(groups / scale + self.offsets) + zero, 0, (1 << bits) - 1)
            deq = (q - zero) * scale
        return deq.reshape(weight.shape[0], -1)[:, :self.in_features].to(weight.dtype)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """The packed weight: scales rounded to the checkpoint dtype first (as RTN does),
        then each weight rounded with its offset on them."""
        groups = rtn.grouped(weight.to(torch.float32), self.scheme.group_size)
        lo, hi = self._range(groups)
        scale, zero = rtn.range_qparams(lo, hi, self.scheme.bits, self.scheme.symmetric,
                                        self.scale_dtype)
        shifted = groups + self.offsets * scale.unsqueeze(-1)  # round(w/s + v) = round((w + v s)/s)
        return rtn.pack_grouped(shifted, scale, zero, self.scheme, self.in_features,
                                self.scale_dtype)


def grid_bounds(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's (lo, hi) [out, groups] that give back `weight`'s scales (and zeros)
    through `rtn.range_qparams`: the grid a learned rounding starting from it keeps."""
    if weight.g_idx is not None:
        raise CompressError("learned rounding can only start from contiguous groups "
                            "(GPTQ with static groups), not from a g_idx weight")
    scale = weight.scales.to(torch.float32)
    if weight.zeros is None:  # signed symmetric: the extreme -2^(b-1) * scale, 0 the other end
        extreme = -scale * (1 << (weight.bits - 1))
        zero = torch.zeros_like(extreme)
        return torch.minimum(extreme, zero), torch.maximum(extreme, zero)
    unsigned = weight.zeros.to(torch.float32) + (1 << (weight.bits - 1))
    return -unsigned * scale, ((1 << weight.bits) - 1 - unsigned) * scale


def signed_step(params: list[nn.Parameter], lr: float) -> None:
    """p -= lr * sign(grad): every parameter moves by the same amount, whatever the scale
    of its gradient (the update SignRound is named for)."""
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(lr * torch.sign(p.grad))
                p.grad = None


def squared_error(output: torch.Tensor, target: torch.Tensor,
                  gain: torch.Tensor | None = None) -> torch.Tensor:
    """(output - target)^2 elementwise over (..., D); with `gain` (D,), the error as an
    RMSNorm with that gain reads it: each token's error divided by the target token's
    root mean square, each channel's times its gain (the norm's first-order response to a
    small error, with the target's scale held fixed so the loss stays a weighted MSE)."""
    error = output.float() - target.float()
    if gain is not None:
        rms = target.float().square().mean(-1, keepdim=True).add(1e-12).sqrt()
        error = error / rms * gain.float()
    return error.square()


def step_loss(output: torch.Tensor, target: torch.Tensor, trim: float = 0.0,
              gain: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of `squared_error` of `output` against `target`, with the `trim` fraction
    of the largest counted as zero (still in the mean's count, as auto-round's 2-bit loss
    does): a step then follows the bulk of the outputs, not a few outliers."""
    left_out = int(output.numel() * trim)
    if left_out == 0 and gain is None:
        return torch.nn.functional.mse_loss(output, target)
    errors = squared_error(output, target, gain).flatten()
    if left_out == 0:
        return errors.mean()
    keep = torch.ones_like(errors)
    keep[errors.detach().topk(left_out).indices] = 0.0
    return (errors * keep).mean()
