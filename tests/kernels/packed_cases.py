"""Random packed weights for kernel tests, and the dequantisation formula restated in float64."""

from __future__ import annotations

import torch

from compress import kernels


def make_packed(n, k, bits, group_size, symmetric, act_order, gen):
    groups = 1 if group_size == -1 else -(-k // group_size)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    codes = torch.randint(lo, hi, (n, k), generator=gen, dtype=torch.int8)
    scales = (torch.rand(n, groups, generator=gen) * 0.1 + 0.01).to(torch.float16)
    zeros = None if symmetric else torch.randint(lo, hi, (n, groups), generator=gen,
                                                 dtype=torch.int8)
    g_idx = None
    if act_order:
        base = torch.arange(k) // (k if group_size == -1 else group_size)
        g_idx = base[torch.randperm(k, generator=gen)].to(torch.int32)
    return codes, scales, zeros, g_idx


def expected_weight(codes, scales, zeros, g_idx, group_size):
    k = codes.shape[1]
    g = g_idx.long() if g_idx is not None else (
        torch.zeros(k, dtype=torch.long) if group_size == -1 else torch.arange(k) // group_size)
    w = codes.double()
    if zeros is not None:
        w = w - zeros.double()[:, g]
    return w * scales.double()[:, g]


def random_weights(n: int, k: int, bits: int, group_size: int, symmetric: bool,
                   act_order: bool, seed: int) -> kernels.QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    codes, scales, zeros, g_idx = make_packed(n, k, bits, group_size, symmetric, act_order, gen)
    return kernels.QuantizedWeight(kernels.pack(codes, bits), scales, zeros, g_idx, bits,
                                   group_size, (n, k))


def reference_output(x: torch.Tensor, w: kernels.QuantizedWeight) -> torch.Tensor:
    """float32 oracle output for x of any float dtype."""
    return kernels.reference.linear(x.to(torch.float32), w.qweight, w.scales, w.zeros,
                                    w.g_idx, bits=w.bits, group_size=w.group_size,
                                    in_features=w.in_features)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Frobenius-relative error, the bound every kernel test states."""
    return float((y.to(torch.float64) - ref.to(torch.float64)).norm()
                 / ref.to(torch.float64).norm())
