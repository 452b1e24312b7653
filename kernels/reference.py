"""Reference dequantise-then-matmul in float32: the oracle every fast kernel is tested against.

Arguments shared by every kernel (shapes for a Linear with weight [N, K])::

    x        float [..., K]                      activations
    qweight  int32 [N, ceil(K * bits / 32)]      codes packed along K (see packing.py)
    scales   float [N, G]                        G = ceil(K / group_size), 1 if per-channel
    zeros    int8  [N, G] or None                signed zero points; None means symmetric
    g_idx    int32 [K] or None                   group of each input column (act-order);
                                                 None means column k is in group k // group_size
    W[n, k] = (q[n, k] - zeros[n, g(k)]) * scales[n, g(k)]
"""

from __future__ import annotations

import torch

from .packing import unpack


def group_index(
    in_features: int, group_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """Group of each input column when no act-order permutation is stored."""
    cols = torch.arange(in_features, device=device)
    if group_size <= 0:
        return torch.zeros_like(cols)
    return cols // group_size


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense [N, K] weight from packed codes; the arithmetic is float32 whatever `dtype` is."""
    w = unpack(qweight, bits, in_features).to(torch.float32)
    groups = (g_idx.long() if g_idx is not None
              else group_index(in_features, group_size, qweight.device))
    if zeros is not None:
        w -= zeros.to(torch.float32)[:, groups]
    w *= scales.to(torch.float32)[:, groups]
    return w.to(dtype)


def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W.T (+ bias), computed in float32 and returned in x's dtype."""
    w = dequantize(qweight, scales, zeros, g_idx, bits=bits, group_size=group_size,
                   in_features=in_features)
    y = torch.nn.functional.linear(x.to(torch.float32), w,
                                   None if bias is None else bias.to(torch.float32))
    return y.to(x.dtype)
