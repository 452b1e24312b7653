"""End-to-end tuning of a packed model's group scales (and norm weights), the second stage
of EfficientQAT (Chen et al. 2024, "E2E-QP"): the integer codes stay as quantisation left
them, and only the float parameters a checkpoint stores beside them are trained, by
Adam, to make the whole model's next-token distribution match the unquantised model's
(KL divergence) on the calibration windows.

Layer-wise methods (GPTQ, AWQ, learned rounding) each match one layer's output; errors
that only show in the logits, or that later layers could absorb, are what this stage
sees. The result keeps the checkpoint's format: the same codes, scales of the same shape
and dtype, the same norms. The training loop over a model is
`compress.calibrate.scale_tuning`; this module holds the per-Linear math.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError
from compress.kernels import QuantizedWeight, reference

from .precision import check

# A scale may move by at most this factor either way: the codes were chosen for scales
# near the start, and a bound keeps every dequantised weight inside float16's range
# (the checkpoint's scale check) however the training goes.
MAX_FACTOR = 2.0


@dataclass(frozen=True)
class ScaleTuningConfig:
    """epochs: passes over the calibration windows; lr: Adam's step for the scales'
    log-factors (cosine decay to 0), a tenth of it for the norm weights; batch: windows
    per step; norms: also train the RMSNorm weights; sampled: windows sampled from the
    unquantised model that the tuning fits on in place of the calibration's own
    (`CalibrationConfig.sampled`; None: the calibration's). The tuning fits its windows
    far better than held-out text, so more of them pay here even where the layer-wise
    stages before it do not need them. precision: the training steps' matmuls' dtype
    (`compress.quant.precision`); the calibration KL that decides between the tuned and
    the starting parameters is measured in float32 either way."""

    epochs: int = 2
    lr: float = 2e-3
    batch: int = 4
    norms: bool = True
    # the teacher's most likely tokens kept per position (`TopLogprobs`); 0: its whole
    # distribution (recomputed every step where it does not fit the cache); None: the
    # whole distribution where it fits, else `compress.tune.TEACHER_TOP`
    teacher_top: int | None = None
    sampled: int | None = None
    precision: str = "float32"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CompressError(f"scale tuning {name} must be a positive integer, "
                                    f"got {value!r}")
        if (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                or not 0 < self.lr <= 1 or not math.isfinite(self.lr)):
            raise CompressError(f"scale tuning lr must be in (0, 1], got {self.lr!r}")
        for name, meaning in (("teacher_top", "0: the whole distribution"),
                              ("sampled", "windows sampled from the model")):
            n = getattr(self, name)
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
                raise CompressError(f"scale tuning {name} must be a whole number >= 0 "
                                    f"({meaning}), got {n!r}")
        check(self.precision, "scale tuning precision")

    def to_dict(self) -> dict:
        data = asdict(self)
        # recipes (and saved runs) from before these stay as they were
        for later, default in (("teacher_top", None), ("sampled", None),
                               ("precision", "float32")):
            if data[later] == default:
                del data[later]
        return data


@dataclass(frozen=True)
class TopLogprobs:
    """A teacher's next-token distribution cut to its k most likely tokens per position:
    their log-probabilities and ids (..., k), and `rest`, the log of the other tokens'
    total probability (...). A 256-token cut of 512 positions takes 1 MB where the
    whole of a 262k vocabulary takes 268 MB."""

    logprobs: torch.Tensor
    ids: torch.Tensor
    rest: torch.Tensor

    @classmethod
    def of(cls, logprobs: torch.Tensor, k: int) -> TopLogprobs:
        logprobs = logprobs.float()
        top, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        rest = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1)
        return cls(top, ids.to(torch.int32), rest)

    def __getitem__(self, pick: torch.Tensor) -> TopLogprobs:
        return TopLogprobs(self.logprobs[pick], self.ids[pick], self.rest[pick])

    @staticmethod
    def cat(parts: list[TopLogprobs]) -> TopLogprobs:
        return TopLogprobs(*(torch.cat([getattr(p, f) for p in parts])
                             for f in ("logprobs", "ids", "rest")))


class TunableScalesLinear(nn.Module):
    """A packed Linear as fixed codes (q - z, float32) times trainable group scales:
    scale = start * exp(log_factor), the factor bounded by `MAX_FACTOR`."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.scale_dtype = weight.scales.dtype
        ones = torch.ones_like(weight.scales, dtype=torch.float32)
        codes = reference.dequantize(weight.qweight, ones, weight.zeros, weight.g_idx,
                                     bits=weight.bits, group_size=weight.group_size,
                                     in_features=self.in_features)
        groups = (weight.g_idx.long() if weight.g_idx is not None else
                  reference.group_index(self.in_features, weight.group_size, codes.device))
        self.register_buffer("codes", codes)
        self.register_buffer("groups", groups)
        self.register_buffer("start", weight.scales.to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.to(torch.float32))
        self.log_factor = nn.Parameter(torch.zeros_like(self.start))

    def scales(self) -> torch.Tensor:
        return self.start * torch.exp(self.log_factor)

    @torch.no_grad()
    def clamp_(self) -> None:
        bound = math.log(MAX_FACTOR)
        self.log_factor.clamp_(-bound, bound)

    def stored_scales(self) -> torch.Tensor:
        """The tuned scales in the checkpoint's dtype."""
        return self.scales().detach().to(self.scale_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.codes * self.scales()[:, self.groups]
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def next_token_kl(student_logits: torch.Tensor,
                  teacher: torch.Tensor | TopLogprobs) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), computed in float32. Against a
    `TopLogprobs` teacher, both distributions are first merged to its k tokens and one
    bin for the rest: a lower bound of the whole KL, equal to it where the rest carries
    no probability, and with the whole KL's gradient on the k tokens."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    if isinstance(teacher, torch.Tensor):
        logprobs = teacher.float()
        return (logprobs.exp() * (logprobs - student)).sum(-1).mean()
    ids = teacher.ids.long()
    top = teacher.logprobs.float()
    # finite where it is masked: with every token kept, -inf would make logsumexp's
    # gradient nan (and the teacher's rest weighs nothing there)
    lowest = torch.finfo(student.dtype).min
    student_rest = torch.logsumexp(student.scatter(-1, ids, lowest), dim=-1)
    rest = teacher.rest.float()
    # a teacher whose k tokens hold all its probability puts no weight on the rest
    rest_term = torch.where(rest > float("-inf"), rest.exp() * (rest - student_rest),
                            torch.zeros_like(rest))
    return ((top.exp() * (top - student.gather(-1, ids))).sum(-1) + rest_term).mean()
