"""The reference dequantise-matmul against a direct, loop-free restatement of the formula."""

import pytest
import torch
from packed_cases import expected_weight, make_packed

from compress import kernels


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_matches_formula(bits, group_size, symmetric, act_order):
    gen = torch.Generator().manual_seed(hash((bits, group_size, symmetric, act_order)) % 2**31)
    n, k = 67, 256
    codes, scales, zeros, g_idx = make_packed(n, k, bits, group_size, symmetric, act_order, gen)
    w = kernels.dequantize(kernels.pack(codes, bits), scales, zeros, g_idx, bits=bits,
                           group_size=group_size, in_features=k)
    # float32 arithmetic on exactly representable inputs: one rounding of (q - z) * s.
    torch.testing.assert_close(w.double(), expected_weight(codes, scales, zeros, g_idx,
                                                           group_size), rtol=1e-6, atol=0)


@pytest.mark.parametrize("m", [1, 3, 16, 118])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2),
                                         (torch.float16, 1e-2)])
def test_linear_matches_dense_matmul(m, dtype, rtol):
    gen = torch.Generator().manual_seed(m)
    n, k, bits, group_size = 96, 320, 4, 64
    codes, scales, zeros, g_idx = make_packed(n, k, bits, group_size, False, False, gen)
    bias = torch.randn(n, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = kernels.reference.linear(x, kernels.pack(codes, bits), scales, zeros, g_idx,
                                 bits=bits, group_size=group_size, in_features=k, bias=bias)
    assert y.dtype == dtype and y.shape == (m, n)
    w = expected_weight(codes, scales, zeros, g_idx, group_size)
    ref = x.double() @ w.T + bias.double()
    # Relative to the output scale: fp32 accumulates exactly enough for 1e-5; half-precision
    # inputs/outputs round to ~3 significant digits.
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < rtol
