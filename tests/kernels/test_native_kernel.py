"""Our CPU kernel (15-bit integer activations x packed codes, kernels/native.py) against
two oracles.

1. Exact arithmetic: the reference weight times the activations after the same integer
   rounding the kernel applies (per block of 32). Only float32 accumulation separates
   the two: bound 1e-5, float32 output.
2. The float32 reference on the raw activations: the rounding to 15 bits costs ~1e-5
   relative (per-element error ~ amax/16256/sqrt(12)), bound 1e-4 for float32; 16-bit
   inputs and outputs add their own rounding (~2e-3): bound 1e-2, as for every kernel.
Every call runs with the output poisoned with NaN, so an element the tiles miss fails.
Both the fast loops (AVX512-VNNI or AVX2, whichever the build has) and the portable loops
are tested.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compress.kernels import cpu, native
from packed_cases import random_weights, reference_output, relative_error

from compress import kernels

pytestmark = pytest.mark.skipif(native.unavailable() is not None,
                                reason=f"native CPU kernel unavailable: {native.unavailable()}")
IMPLEMENTATIONS = [pytest.param(False, id="fast"), pytest.param(True, id="portable")]
EXACT_BOUND, FLOAT32_BOUND, BOUND = 1e-5, 1e-4, 1e-2
LEVELS = 127.0 * 128.0


def rounded_activations(x: torch.Tensor, w: kernels.QuantizedWeight) -> torch.Tensor:
    """x [M, K] as the kernel sees it: columns in the prepared order, each block of 32
    rounded to integers in [-16256, 16256] with scale amax / 16256 (float32 arithmetic, as
    in the C++), back in the original column order (padding dropped)."""
    p = native.prepare(w)
    k = w.in_features
    cols = p.columns if p.columns is not None else torch.arange(k)
    xf = torch.nn.functional.pad(x.to(torch.float32), (0, 1))[:, cols]   # [M, K_pad]
    blocks = xf.view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, LEVELS / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)
    deq = (q.double() * (amax / LEVELS).double()).view(x.shape[0], -1)
    out = torch.zeros(x.shape[0], k + 1, dtype=torch.float64)
    out[:, cols] = deq  # padding positions all land in the dropped column k
    return out[:, :k]


@pytest.mark.parametrize("portable", IMPLEMENTATIONS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_integer_arithmetic_is_exact(portable, bits, group_size, symmetric, act_order):
    # N = 67: not a multiple of the 16-row tiles; K = 200: not a multiple of 32 or 128.
    seed = hash((bits, group_size, symmetric, act_order)) % 2**31
    w = random_weights(67, 200, bits, group_size, symmetric, act_order, seed=seed)
    x = torch.randn(5, 200, generator=torch.Generator().manual_seed(seed))
    y = native.matmul(x, native.prepare(w), portable=portable, poison=True)
    assert y.shape == (5, 67) and y.dtype == torch.float32
    expected = reference_output(rounded_activations(x, w).float(), w)
    assert relative_error(y, expected) < EXACT_BOUND


@pytest.mark.parametrize("portable", IMPLEMENTATIONS)
@pytest.mark.parametrize("m", [1, 3, 16, 128])
@pytest.mark.parametrize("n,k", [(48, 576), (100, 96), (256, 1536), (33, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
def test_shapes_and_dtypes_match_reference(portable, m, n, k, dtype, bits):
    w = random_weights(n, k, bits, 128, False, False, seed=m * 7 + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(dtype)
    y = native.matmul(x, native.prepare(w), portable=portable, poison=True)
    assert y.shape == (m, n) and y.dtype == dtype
    bound = FLOAT32_BOUND if dtype == torch.float32 else BOUND
    assert relative_error(y, reference_output(x, w)) < bound


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("code", ["largest", "smallest"])
@pytest.mark.parametrize("digits", ["high", "low"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_codes_and_activation_digits_do_not_overflow(bits, code, digits, sign):
    # AVX2 keeps partial sums in saturating int16 as long as they provably fit: every code
    # at its extreme times every activation digit at its extreme is the case that would
    # saturate if the bound were wrong. "high": all |v| = 16256 (high digit 127, low 0);
    # "low": v = 128 h - 64 (low digit -64) with one 16256 setting the block's scale.
    n, k = 32, 256
    q = (1 << (bits - 1)) - 1 if code == "largest" else -(1 << (bits - 1))
    codes = torch.full((n, k), q, dtype=torch.int8)
    scales = torch.full((n, 1), 0.01, dtype=torch.float16)
    w = kernels.QuantizedWeight(kernels.pack(codes, bits), scales, None, None, bits, -1,
                                (n, k))
    if digits == "high":
        v = torch.full((1, k), LEVELS)
    else:
        v = torch.full((1, k), 128.0 * 126 - 64)
        v[0, ::32] = LEVELS
    x = sign * v / LEVELS  # the block's scale is exactly 1 / LEVELS: v comes back exact
    for portable in (False, True):
        y = native.matmul(x, native.prepare(w), portable=portable, poison=True)
        expected = reference_output(rounded_activations(x, w).float(), w)
        assert relative_error(y, expected) < EXACT_BOUND, portable


def test_fast_and_portable_loops_agree():
    w = random_weights(160, 640, 4, 64, False, True, seed=5)
    x = torch.randn(7, 640, generator=torch.Generator().manual_seed(5))
    p = native.prepare(w)
    torch.testing.assert_close(native.matmul(x, p), native.matmul(x, p, portable=True),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(sys.platform != "linux", reason="GCC's OpenMP is the Linux default")
def test_kernel_is_built_with_threads():
    # Without OpenMP at::parallel_for runs on one thread: the kernel was built that way
    # and left half of a 2-core machine idle during decode until this was caught.
    assert native.threaded()


def test_threads_split_tiles_without_changing_results():
    w = random_weights(520, 576, 4, 128, False, False, seed=9)  # 33 tiles: uneven split
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(9))
    p = native.prepare(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.matmul(x, p, poison=True)
        torch.set_num_threads(max(2, threads))
        many = native.matmul(x, p, poison=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)  # each output row is one thread's, whatever the split
    assert relative_error(many, reference_output(x, w)) < FLOAT32_BOUND


@pytest.mark.slow  # compiles the kernel in a fresh process and cache
def test_without_openmp_the_kernel_builds_single_threaded(tmp_path):
    # A fresh process and cache: a compiler refusing the OpenMP flag still gets our
    # kernel, on one thread, and later processes do not retry the OpenMP build.
    script = (
        "from compress.kernels import native\n"
        "from packed_cases import random_weights, reference_output, relative_error\n"
        "import torch\n"
        "native.OPENMP = ['-fno-such-openmp-flag']\n"
        "print(native.unavailable(), native.threaded())\n"
        "w = random_weights(40, 96, 4, 32, False, False, 3)\n"
        "x = torch.randn(2, 96)\n"
        "print(relative_error(native.matmul(x, native.prepare(w)), reference_output(x, w))"
        " < 1e-4)\n")
    env = {**os.environ, "COMPRESS_HOME": str(tmp_path / "cache")}
    env.pop("COMPRESS_NATIVE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, cwd=Path(__file__).parent, check=True).stdout.splitlines()
    assert out == ["None False", "True"]
    assert len(list((tmp_path / "cache" / "kernels").glob("*/failed"))) == 1


def test_zero_and_sparse_activations():
    # An all-zero block has scale 0 (no division by zero); a lone spike keeps its sign.
    w = random_weights(32, 128, 4, 32, True, False, seed=6)
    x = torch.zeros(2, 128)
    x[1, 77] = -3.0
    y = native.matmul(x, native.prepare(w), poison=True)
    assert torch.equal(y[0], torch.zeros(32))
    assert relative_error(y, reference_output(x, w)) < EXACT_BOUND


def test_cpu_backend_prefers_the_native_kernel(monkeypatch):
    w = random_weights(32, 96, 4, 24, True, True, 0)  # act-order groups of 24 columns
    assert isinstance(cpu.prepare(w), native.NativePrepared)
    monkeypatch.setenv("COMPRESS_NATIVE", "0")
    assert native.unavailable() == "COMPRESS_NATIVE=0"
    assert "multiple of 32" in cpu.unsupported(w, torch.device("cpu"))


def test_compiled_call_matches_eager():
    w = random_weights(64, 128, 4, 32, True, False, seed=7)
    p = native.prepare(w)
    x = torch.randn(3, 128)
    compiled = torch.compile(lambda t: native.matmul(t, p) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), native.matmul(x, p) * 2)


def test_bad_arguments_raise_clear_errors():
    p = native.prepare(random_weights(32, 64, 4, 32, True, False, seed=8))
    with pytest.raises(RuntimeError, match="x has 63 columns, expected 64"):
        native.matmul(torch.randn(1, 63), p)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        native.matmul(torch.ones(1, 64, dtype=torch.float64), p)
