"""Triton kernels under TRITON_INTERPRET=1 against the float32 reference.

Bounds (Frobenius-relative): float32 activations 1e-5 (IEEE dot), float16 2e-3 and
bfloat16 1e-2: the fused kernel multiplies the integer codes exactly and the dense
path rounds the dequantised weight once, so the output's own rounding dominates
(measured ~2.5e-4 float16, ~3.7e-3 bfloat16, ~2.5e-7 float32). Outputs and split-K partials are
poisoned with NaN first, so an element the kernel fails to write fails the test.
The interpreter variable must be set before triton is imported, hence the subprocess-
free setup at the top and the module-level import below it.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import dataclasses

import pytest
import torch
from packed_cases import random_weights, reference_output, relative_error

triton_qmm = pytest.importorskip("compress.kernels.triton_qmm")
BOUNDS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def run_poisoned(x2, w, config=None, dense=None):
    """The kernel's output, with every buffer it writes poisoned with NaN beforehand."""
    m, n = x2.shape[0], w.out_features
    prepared = triton_qmm.prepare(w)
    out = torch.full((m, n), float("nan"), dtype=x2.dtype)
    partials = None
    if not dense and prepared.fused and m <= triton_qmm.FUSED_MAX_M:
        config = config or triton_qmm.fused_config(n, w.in_features, m, prepared.packed,
                                                    x2.device)
        if config.splits > 1:
            partials = torch.full((config.splits, m, n), float("nan"))
    return triton_qmm.qmm(x2, prepared, out=out, partials=partials, config=config,
                          dense=dense)


def _layout_cases() -> list:
    """Every bits x group size x symmetry x act-order layout (ids as stacked parametrize
    gives them). By default a covering eighth, about a second each in the interpreter:
    every bit width with two group sizes, both symmetries and both act orders, every group
    size twice; the other 56 are slow."""
    bit_widths, group_sizes = [2, 3, 4, 8], [-1, 32, 64, 128]
    fast = {(bits, group_sizes[(i + 2 * j) % 4], j == 0, i % 2 == j)
            for i, bits in enumerate(bit_widths) for j in (0, 1)}
    return [pytest.param(bits, g, sym, order, id=f"{order}-{sym}-{g}-{bits}",
                         marks=() if (bits, g, sym, order) in fast else pytest.mark.slow)
            for order in (False, True) for sym in (True, False) for g in group_sizes
            for bits in bit_widths]


@pytest.mark.parametrize("bits,group_size,symmetric,act_order", _layout_cases())
def test_layouts_match_reference(bits, group_size, symmetric, act_order):
    # N = 72 and K = 200 are multiples of neither the tiles nor the groups nor 32 codes.
    seed = hash((bits, group_size, symmetric, act_order)) % 2**31
    w = random_weights(72, 200, bits, group_size, symmetric, act_order, seed)
    # Every layout but 3-bit takes the fused kernel; act-order is repacked into it.
    fused = triton_qmm.prepare(w).fused
    assert fused == (bits != 3)
    gen = torch.Generator().manual_seed(seed)
    # 16-row tensor-core tiles (1 and 5 rows), 64-row tiles, then dequantise + GEMM
    # (2- and 4-bit through the whole-word dequantiser, 3- and 8-bit the general one).
    for m, dense in ((1, None), (5, None), (40, None), (40, True)):
        x = torch.randn(m, 200, generator=gen).to(torch.float16)
        y = run_poisoned(x, w, dense=dense)
        assert y.dtype == torch.float16 and not y.isnan().any()
        assert relative_error(y, reference_output(x, w)) < BOUNDS[torch.float16]


@pytest.mark.parametrize("m", [1, 3, 16, 128, 129])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dense", [None, True])
def test_shapes_and_dtypes_match_reference(m, dtype, dense):
    w = random_weights(97, 131, 4, 32, False, True, seed=m)
    x = torch.randn(m, 131, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = run_poisoned(x, w, dense=dense)
    assert y.shape == (m, 97) and y.dtype == dtype and not y.isnan().any()
    assert relative_error(y, reference_output(x, w)) < BOUNDS[dtype]


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("splits", [1, 3, 7])
def test_split_k_partials_cover_every_column(m, splits):
    # 7 splits of 333 columns in 64-column blocks leave some splits empty: they must
    # still write their (zero) partials.
    w = random_weights(40, 333, 4, 64, True, False, seed=splits)
    x = torch.randn(m, 333, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    y = run_poisoned(x, w, triton_qmm.FusedConfig(bn=32, bk=64, splits=splits))
    assert relative_error(y, reference_output(x, w)) < BOUNDS[torch.float16]


def test_hand_made_group_index_keeps_the_general_path():
    # Sorted, these groups are runs of 16, 48, ... columns, not of group_size: the fused
    # kernel cannot take them, so every M dequantises with the g_idx as stored.
    w = random_weights(40, 128, 4, 32, False, False, seed=9)
    g_idx = torch.randint(0, 4, (128,), generator=torch.Generator().manual_seed(1))
    w = dataclasses.replace(w, g_idx=g_idx.to(torch.int32))
    assert not triton_qmm.prepare(w).fused
    with pytest.raises(ValueError, match="no fused kernel"):
        triton_qmm.qmm(torch.ones(1, 128, dtype=torch.float16), triton_qmm.prepare(w),
                       dense=False)
    for m in (1, 20):
        x = torch.randn(m, 128).to(torch.float16)
        assert relative_error(run_poisoned(x, w), reference_output(x, w)) < BOUNDS[x.dtype]


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


def test_wrong_feature_count_is_refused():
    w = random_weights(16, 32, 4, 32, True, False, seed=6)
    with pytest.raises(ValueError, match="features"):
        triton_qmm.qmm(torch.ones(1, 48, dtype=torch.float16), triton_qmm.prepare(w))


def test_a_decode_block_straddling_groups_is_refused():
    # One scale per block is only right when the block lies inside one group.
    w = random_weights(16, 128, 4, 32, True, False, seed=6)
    x = torch.ones(1, 128, dtype=torch.float16)
    with pytest.raises(ValueError, match="groups of 32"):
        triton_qmm.qmm(x, triton_qmm.prepare(w), config=triton_qmm.FusedConfig(16, 64, 1))
