"""How much each Linear's quantisation would cost the model, for mixed precision.

Per Linear l and candidate setting s, the estimated KL increase of the model's
next-token distribution when only l is rounded to s:

    loss(l, s) = KL_l(s_ref) * E_l(s) / E_l(s_ref)

- KL_l(s_ref) is measured: l alone rounded to a reference setting (W4 g128), the layers
  from l's onwards re-run from cached inputs, KL(unquantised || that) averaged over
  calibration tokens. This carries how much l matters to the output, which no local
  statistic captures well: a second-order estimate from one backward pass (diagonal
  Fisher x Hessian-weighted error) ranked the Linears badly here, and its allocation
  at 4.25 bits lost to uniform W4.
- E_l(s) = tr((W_q - W) H (W_q - W)^T), H = sum of x x^T over calibration inputs: the
  output error each setting causes, whose ratio between settings of one Linear is a
  reliable scale for its KL (small perturbations: KL is quadratic in the output error).

One measured forward per Linear (~0.5 s each on the bundled model) plus matrix products
per setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compress import data, models
from compress.choices import MIXED_OPTIONS
from compress.progress import track
from compress.quant import QuantScheme, rtn
from compress.quant.gptq import HessianAccumulator

from . import capture


@dataclass(frozen=True)
class Option:
    """One candidate setting: bits and group size (symmetric), and its short label."""

    bits: int
    group_size: int

    def __post_init__(self) -> None:
        QuantScheme(self.bits, self.group_size)  # unsupported bits or group: one-line error

    def scheme(self, name: str, in_features: int) -> QuantScheme:
        """The symmetric scheme this option gives Linear `name` (group shrunk to fit)."""
        return QuantScheme(self.bits, self.group_size, True).fit(name, in_features)

    @property
    def label(self) -> str:
        return f"w{self.bits}" + ("" if self.group_size == -1 else f"g{self.group_size}")

    @classmethod
    def parse(cls, label: str) -> Option:
        bits, _, group = label.removeprefix("w").partition("g")
        return cls(int(bits), int(group) if group else -1)


DEFAULT_OPTIONS = tuple(Option.parse(o) for o in MIXED_OPTIONS)


@dataclass
class Sensitivity:
    """Per module and option label: estimated KL increase (nats/token), stored bits and
    the group size actually used (a group that does not divide the input shrinks)."""

    losses: dict[str, dict[str, float]]
    bits: dict[str, dict[str, float]]
    groups: dict[str, dict[str, int]]
    weights: dict[str, int]  # weights per module
    tokens: int

    def to_dict(self) -> dict:
        return {"losses": self.losses, "bits": self.bits, "groups": self.groups,
                "weights": self.weights, "tokens": self.tokens}


def stored_bits(out_features: int, in_features: int, scheme: QuantScheme,
                scale_bits: int = 16) -> float:
    """Bits a packed Linear takes: codes, one scale per group in the model's dtype
    (`scale_bits`), and a packed zero point per group when asymmetric."""
    groups = 1 if scheme.group_size == -1 else -(-in_features // scheme.group_size)
    per_group = scale_bits + (0 if scheme.symmetric else scheme.bits)
    return out_features * (in_features * scheme.bits + groups * per_group)


@torch.no_grad()
def _input_hessians(model: models.CausalLM, names: list[str], tokens: torch.Tensor,
                    batch: int) -> dict[str, torch.Tensor]:
    hessians: dict[str, HessianAccumulator] = {}

    def record(name: str, x: torch.Tensor) -> None:
        if name not in hessians:
            hessians[name] = HessianAccumulator(x.shape[-1])
        hessians[name].add(x)

    with capture.observe(model, names, record):
        for chunk in track(tokens.split(batch), desc="sensitivity: inputs", unit="batch"):
            model(chunk)
    return {name: acc.hessian() for name, acc in hessians.items()}


def _output_error(w: torch.Tensor, h: torch.Tensor, scheme: QuantScheme,
                  scale_dtype: torch.dtype) -> float:
    delta = (rtn.fake_quantize(w, scheme, scale_dtype) - w).double()
    return float(((delta @ h.double()) * delta).sum())


REFERENCE = Option(4, 128)
METHOD = "measured KL at w4g128, scaled by Hessian-weighted error"  # in the cache key


def measure(files: models.ModelFiles, calib: data.CalibrationSet,
            options: tuple[Option, ...] = DEFAULT_OPTIONS, kl_samples: int = 2,
            batch: int = 4, names: list[str] | None = None) -> Sensitivity:
    """Estimated KL cost (module doc) of every decoder-layer Linear (or `names`) at every
    option: H from all of `calib`'s windows, the measured KL from its first
    `kl_samples`."""
    model = models.build(files, dtype=torch.float32, head_dtype=torch.float32)
    names = names or files.linear_names()
    hessians = _input_hessians(model, names, calib.samples, batch)
    modules = dict(model.named_modules())
    kl_tokens = calib.samples[:kl_samples]
    with torch.no_grad():
        inputs = model.layer_inputs(kl_tokens)
        reference = F.log_softmax(model.logits_from(0, inputs[0]).float(), dim=-1)
    losses = {}
    for name in track(names, desc="sensitivity: Linears", unit="linear"):
        linear = modules[name]
        w = linear.weight.detach().clone()
        in_f = w.shape[1]
        ref_scheme = REFERENCE.scheme(name, in_f)
        with torch.no_grad():
            linear.weight.copy_(rtn.fake_quantize(w, ref_scheme, files.dtype))
            i = files.layer_of(name)
            logq = F.log_softmax(model.logits_from(i, inputs[i]).float(), dim=-1)
            linear.weight.copy_(w)
        kl_ref = float((reference.exp() * (reference - logq)).sum(-1).mean())
        e_ref = _output_error(w.float(), hessians[name], ref_scheme, files.dtype)
        losses[name] = {}
        for option in options:
            scheme = option.scheme(name, in_f)
            e = _output_error(w.float(), hessians[name], scheme, files.dtype)
            losses[name][option.label] = kl_ref * e / e_ref if e_ref > 0 else 0.0
    bits, groups, weights = costs(files, options, names)
    return Sensitivity(losses, bits, groups, weights, kl_tokens.numel())


def costs(files: models.ModelFiles, options: tuple[Option, ...], names: list[str]
          ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]], dict[str, int]]:
    """Per Linear and option: stored bits and the group size used; weights per Linear.
    From shapes alone, so a budget can be checked before anything is measured."""
    bits, groups, weights = {}, {}, {}
    for name in names:
        out_f, in_f = files.linear_shape(name)
        schemes = {o.label: o.scheme(name, in_f) for o in options}
        bits[name] = {label: stored_bits(out_f, in_f, s, 8 * files.dtype.itemsize)
                      for label, s in schemes.items()}
        groups[name] = {label: s.group_size for label, s in schemes.items()}
        weights[name] = out_f * in_f
    return bits, groups, weights
