"""Round-to-nearest: the baseline every calibrated method must beat.

Conventions (shared with GPTQ/AWQ, which call `qparams` and `quantize_codes`):
- symmetric: scale = amax / 2**(b-1), codes in [-2**(b-1), 2**(b-1) - 1], no zero point;
- asymmetric: the range [min(w, 0), max(w, 0)] maps onto 0 .. 2**b - 1 with an integer
  zero point, stored signed (unsigned - 2**(b-1)) as compressed-tensors expects.
Scales are rounded to the checkpoint dtype *before* the codes are chosen, so the stored
scales reproduce exactly the weights the algorithm evaluated.
"""

from __future__ import annotations

import torch

from compress.kernels import QuantizedWeight, num_groups

from .scheme import QuantScheme


def qparams(
    w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype,
    mse_clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and unsigned zero point over the last dim of `w` (float32 in, float32 out).

    With `mse_clip`, the range is shrunk by the factor (1, 0.99, ... 0.2) that minimises
    sum |w - dequant(quant(w))|^2.4 per row, as GPTQ's reference search does.
    """
    w = w.to(torch.float32)
    lo = w.amin(dim=-1).clamp(max=0)
    hi = w.amax(dim=-1).clamp(min=0)
    scale, zero = range_qparams(lo, hi, bits, symmetric, scale_dtype)
    if not mse_clip:
        return scale, zero
    best = _clip_error(w, scale, zero, bits)
    for shrink in torch.arange(0.99, 0.19, -0.01).tolist():
        s, z = range_qparams(lo * shrink, hi * shrink, bits, symmetric, scale_dtype)
        err = _clip_error(w, s, z, bits)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        if zero is not None:
            zero = torch.where(better, z, zero)
    return scale, zero


def range_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                   scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    if symmetric:
        return signed_symmetric_scale(lo, hi, bits, scale_dtype), None
    span = hi - lo
    scale = round_scale(span / ((1 << bits) - 1), span, scale_dtype)
    return scale, torch.round(-lo / scale).clamp(0, (1 << bits) - 1)


def signed_symmetric_scale(lo: torch.Tensor, hi: torch.Tensor, bits: int,
                           dtype: torch.dtype | None = None) -> torch.Tensor:
    """The symmetric scale that maps the group's larger-magnitude end (lo <= 0 <= hi) exactly
    to code -2^(b-1): negative where that end is positive. All 2^b codes are used and
    neither end is clipped, where amax / 2^(b-1) clips a positive maximum to 2^(b-1) - 1
    (llama.cpp's Q4_0 and auto-round round this way). `dtype`: rounded as stored (all-zero
    groups get scale 1); None: unrounded, kept off zero, for differentiable use."""
    extreme = torch.where(-lo > hi, lo, hi)
    magnitude = extreme.abs() / (1 << (bits - 1))
    if dtype is None:
        magnitude = magnitude.clamp(min=1e-12)
    else:
        magnitude = round_scale(magnitude, extreme.abs(), dtype)
    return torch.where(extreme > 0, -magnitude, magnitude)


def _clip_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                bits: int) -> torch.Tensor:
    s = scale.unsqueeze(-1)
    z = None if zero is None else zero.unsqueeze(-1)
    deq = dequantize_codes(quantize_codes(w, s, z, bits), s, z, bits)
    return (w - deq).abs().pow(2.4).sum(-1)


def round_scale(scale: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scale as the checkpoint stores it; an all-zero group gets scale 1 (codes are 0)."""
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))
    scale = scale.clamp(min=torch.finfo(dtype).tiny)
    return scale.to(dtype).to(torch.float32)


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Signed integer codes of `w` given broadcastable scale and unsigned zero point."""
    offset = 1 << (bits - 1)
    if zero is None:
        return torch.clamp(torch.round(w / scale), -offset, offset - 1)
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1) - offset


def dequantize_codes(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Inverse of `quantize_codes` (same broadcasting): (q - z_signed) * scale."""
    return (q if zero is None else q + (1 << (bits - 1)) - zero) * scale


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, G, group], zero-padding a partial last group."""
    out_features, in_features = w.shape
    if group_size <= 0:
        return w.unsqueeze(1)
    pad = num_groups(in_features, group_size) * group_size - in_features
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.view(out_features, -1, group_size)


def quantize(
    weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype = torch.float16
) -> QuantizedWeight:
    """Round-to-nearest quantisation of a Linear weight [out, in]."""
    groups = grouped(weight.to(torch.float32), scheme.group_size)  # [out, G, gs]
    scale, zero = qparams(groups, scheme.bits, scheme.symmetric, scale_dtype)  # [out, G]
    return pack_grouped(groups, scale, zero, scheme, weight.shape[1], scale_dtype)


def pack_grouped(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 scheme: QuantScheme, in_features: int,
                 scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """Grouped weights [out, G, gs] rounded on the given (stored) scales [out, G] and
    unsigned zero points, packed; the padding of a partial last group dropped."""
    out_features = groups.shape[0]
    codes = quantize_codes(groups, scale.unsqueeze(-1),
                           None if zero is None else zero.unsqueeze(-1), scheme.bits)
    codes = codes.reshape(out_features, -1)[:, :in_features].to(torch.int8)
    offset = 1 << (scheme.bits - 1)
    return QuantizedWeight.from_codes(
        codes,
        scale.to(scale_dtype),
        None if zero is None else (zero - offset).to(torch.int8),
        bits=scheme.bits,
        group_size=scheme.group_size,
    )


def fake_quantize_grouped(groups: torch.Tensor, scheme: QuantScheme,
                          scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """RTN then dequantise, on grouped weights [..., group]: a search's inner step."""
    scale, zero = qparams(groups, scheme.bits, scheme.symmetric, scale_dtype)
    s = scale.unsqueeze(-1)
    z = None if zero is None else zero.unsqueeze(-1)
    return dequantize_codes(quantize_codes(groups, s, z, scheme.bits), s, z, scheme.bits)


def fake_quantize(weight: torch.Tensor, scheme: QuantScheme,
                  scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """`quantize(weight, scheme).dequantize()` without packing: float32 [out, in]."""
    out_features, in_features = weight.shape
    groups = grouped(weight.to(torch.float32), scheme.group_size)
    deq = fake_quantize_grouped(groups, scheme, scale_dtype)
    return deq.reshape(out_features, -1)[:, :in_features]
