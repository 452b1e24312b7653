"""Triton kernels under TRITON_INTERPRET=1 against the float32 reference.

Bounds (Frobenius-relative): float32 activations 1e-5 (IEEE dot), float16/bfloat16
1e-2 (weights rounded to the activation dtype). Outputs and split-K partials are
poisoned with NaN first, so an element the kernel fails to write fails the test.
The interpreter variable must be set before triton is imported, hence the subprocess-
free setup at the top and the module-level import below it.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from packed_cases import random_weights, reference_output, relative_error

triton_qmm = pytest.importorskip("compress.kernels.triton_qmm")
BOUNDS = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def run_poisoned(x2, w, splits=None):
    m, n = x2.shape[0], w.out_features
    prepared = triton_qmm.prepare(w)
    if m <= triton_qmm.DECODE_MAX_M:
        splits = splits or triton_qmm.split_k(n, w.in_features, x2.device)
        partials = torch.full((splits, m, n), float("nan"))
        return triton_qmm.qmm(x2, prepared, partials=partials)
    out = torch.full((m, n), float("nan"), dtype=x2.dtype)
    return triton_qmm.qmm(x2, prepared, out=out)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_layouts_match_reference(bits, group_size, symmetric, act_order):
    # N = 72 and K = 200 are multiples of neither the 32-wide tiles nor the groups.
    seed = hash((bits, group_size, symmetric, act_order)) % 2**31
    w = random_weights(72, 200, bits, group_size, symmetric, act_order, seed)
    gen = torch.Generator().manual_seed(seed)
    for m in (1, 40):  # the split-K decode launch and the GEMM launch
        x = torch.randn(m, 200, generator=gen).to(torch.float16)
        y = run_poisoned(x, w)
        assert y.dtype == torch.float16 and not y.isnan().any()
        assert relative_error(y, reference_output(x, w)) < BOUNDS[torch.float16]


@pytest.mark.parametrize("m", [1, 3, 16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shapes_and_dtypes_match_reference(m, dtype):
    w = random_weights(97, 131, 4, 32, False, True, seed=m)
    x = torch.randn(m, 131, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = run_poisoned(x, w)
    assert y.shape == (m, 97) and y.dtype == dtype and not y.isnan().any()
    assert relative_error(y, reference_output(x, w)) < BOUNDS[dtype]


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_split_k_partials_cover_every_column(splits):
    w = random_weights(40, 333, 4, 64, True, False, seed=splits)
    x = torch.randn(2, 333, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    y = run_poisoned(x, w, splits)
    assert relative_error(y, reference_output(x, w)) < BOUNDS[torch.float16]


def test_bias_and_leading_dims():
    w = random_weights(48, 64, 4, 32, True, False, seed=5)
    x = torch.randn(2, 3, 64).to(torch.float16)
    bias = torch.randn(48).to(torch.float16)
    y = triton_qmm.linear(x, triton_qmm.prepare(w), bias)
    ref = reference_output(x, w) + bias.float()
    assert y.shape == (2, 3, 48) and relative_error(y, ref) < 1e-2


def test_integer_activations_are_refused():
    w = random_weights(16, 32, 4, 32, True, False, seed=6)
    with pytest.raises(TypeError, match="activations"):
        triton_qmm.qmm(torch.ones(1, 32, dtype=torch.int32), triton_qmm.prepare(w))
