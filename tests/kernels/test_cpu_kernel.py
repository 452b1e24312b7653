"""The CPU backend's fallback (torch's int4/int8 weight-only ops, used where our own kernel
cannot be built) and its dense path for many rows, against the float32 reference.

Bound: relative error <= 1e-2 for every input dtype, because the path computes in
bfloat16 (scales rounded to bfloat16, ~3e-3 measured); see kernels/cpu.py for why.
"""

import pytest
import torch
from compress.kernels import cpu, native
from packed_cases import random_weights, reference_output, relative_error

from compress import kernels

CPU = torch.device("cpu")
BOUND = 1e-2
pytestmark = pytest.mark.skipif(not cpu.available(), reason="torch lacks the CPU int ops")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_layouts_match_reference(bits, group_size, symmetric, act_order):
    # N = 67 is not a multiple of the op's 16 rows; K = 200 not a multiple of 32 or 128.
    w = random_weights(67, 200, bits, group_size, symmetric, act_order,
                       seed=hash((bits, group_size, symmetric, act_order)) % 2**31)
    assert cpu.torch_ops_unsupported(w) is None
    x = torch.randn(5, 200, generator=torch.Generator().manual_seed(bits))
    y = cpu.linear(x, cpu.prepare_for_torch_ops(w))
    assert y.shape == (5, 67) and y.dtype == torch.float32
    assert relative_error(y, reference_output(x, w)) < BOUND


@pytest.mark.parametrize("m", [1, 3, 16, 128])
@pytest.mark.parametrize("n,k", [(48, 576), (100, 96), (256, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
def test_shapes_and_dtypes_match_reference(m, n, k, dtype, bits):
    w = random_weights(n, k, bits, 128, False, False, seed=m * 7 + n)
    gen = torch.Generator().manual_seed(m + k)
    x = torch.randn(2, m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    y = cpu.linear(x, cpu.prepare_for_torch_ops(w), bias)
    assert y.shape == (2, m, n) and y.dtype == dtype
    ref = reference_output(x, w) + bias.to(torch.float32)
    assert relative_error(y, ref) < BOUND


def test_group_of_128_over_576_columns_is_served_as_groups_of_64():
    # SmolLM2's hidden size: 576 = 4.5 x 128, which the op refuses as groups of 128.
    p = cpu.prepare_for_torch_ops(random_weights(64, 576, 4, 128, True, False, seed=1))
    assert p.group == 64 and p.gather is None  # no padding, no column gather


def test_act_order_groups_that_are_not_runs_of_32_are_refused():
    w = random_weights(32, 96, 4, 24, True, True, seed=2)  # groups of 24 columns
    reason = cpu.torch_ops_unsupported(w)
    assert reason and "multiple of 32" in reason
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu.prepare_for_torch_ops(w)


def test_non_cpu_device_is_refused():
    w = random_weights(16, 64, 4, 32, True, False, seed=3)
    assert "CPU" in cpu.unsupported(w, torch.device("meta"))


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size,act_order", [(-1, False), (64, False), (128, False),
                                                  (32, True)])
def test_many_rows_take_the_dense_path_and_match_reference(bits, group_size, act_order,
                                                           monkeypatch):
    w = random_weights(67, 200, bits, group_size, False, act_order, seed=bits + group_size)
    prepared = cpu.prepare(w)
    rows = cpu.dense_min_rows(prepared) + 3
    x = torch.randn(rows, 200, generator=torch.Generator().manual_seed(4))
    # Poisoned weight-only kernels: the result can only come from the dense path.
    monkeypatch.setattr(cpu, "weight_only", lambda *a: torch.full((1,), float("nan")))
    y = cpu.linear(x, prepared)
    assert relative_error(y, reference_output(x, w)) < BOUND
    dense = cpu.dequantize_dense(w)
    assert relative_error(dense, kernels.dequantize(
        w.qweight, w.scales, w.zeros, w.g_idx, bits=bits, group_size=group_size,
        in_features=200)) < BOUND


@pytest.mark.parametrize("use_native", ["1", "0"])
def test_rows_below_the_cut_over_stay_on_the_packed_codes(use_native, monkeypatch):
    monkeypatch.setenv("COMPRESS_NATIVE", use_native)
    w = random_weights(40, 128, 4, 32, False, False, seed=11)
    prepared = cpu.prepare(w)
    rows = cpu.dense_min_rows(prepared) - 1
    assert rows == (cpu.DENSE_MIN_ROWS if use_native == "1" and native.unavailable() is None
                    else cpu.TORCH_OPS_DENSE_MIN_ROWS) - 1
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(11))
    # A poisoned dense path: the result can only come from the weight-only kernel.
    monkeypatch.setattr(cpu, "dense", lambda *a: torch.full((1,), float("nan")))
    assert relative_error(cpu.linear(x, prepared), reference_output(x, w)) < BOUND


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 64, False), (3, 32, True),
                                                       (8, -1, False)])
def test_dequantising_by_row_slices_matches_whole(bits, group_size, act_order, monkeypatch):
    w = random_weights(67, 200, bits, group_size, False, act_order, seed=bits * 3)
    whole = cpu.dequantize_dense(w)  # 67 x 200 fits one slice
    monkeypatch.setattr(cpu, "DEQUANTIZE_CHUNK", 8 * 200)  # slices of 8 rows, 3 left over
    sliced = cpu.dequantize_dense(w)
    assert torch.equal(sliced, whole)
    assert relative_error(sliced, kernels.dequantize(
        w.qweight, w.scales, w.zeros, w.g_idx, bits=bits, group_size=group_size,
        in_features=200)) < BOUND


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, cpu.HALF_WIDEN_MIN_ROWS + 3])
@pytest.mark.parametrize("native_half", [True, False])
def test_half_precision_head_matches_float32(dtype, rows, native_half, monkeypatch):
    """A half-precision output head: natively, or widened to float32 slice by slice (3
    slices and a remainder here); float32 logits either way."""
    monkeypatch.setattr(cpu, "native_half", lambda d: native_half)
    monkeypatch.setattr(cpu, "WIDEN_CHUNK", 80 * 64)
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(250, 64, generator=gen).to(dtype)
    x = torch.randn(rows, 64, generator=gen)
    y = cpu.half_linear(x, weight)
    assert y.dtype == torch.float32 and y.shape == (rows, 250)
    if native_half or rows == 1:  # one half-precision call: x rounded to 3 digits or fewer
        expected, bound = x.to(dtype).double() @ weight.double().T, 1e-2
    else:  # widened: exact weights, float32 products
        expected, bound = x.double() @ weight.double().T, 1e-5
    assert relative_error(y, expected.float()) < bound
