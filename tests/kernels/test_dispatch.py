"""Backend choice: automatic per device and layout, forced by COMPRESS_KERNEL, never silent."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packed_cases import random_weights, reference_output, relative_error

from compress import kernels
from compress.nn import QuantLinear
from compress.quant import QuantizedWeight

CPU = torch.device("cpu")


def test_cpu_tensors_get_the_cpu_ops(monkeypatch):
    monkeypatch.delenv("COMPRESS_KERNEL", raising=False)
    assert kernels.backend_name(random_weights(32, 64, 4, 32, True, False, 0), CPU) == "cpu"


def test_layout_the_cpu_ops_cannot_serve_falls_back_to_reference(monkeypatch):
    monkeypatch.delenv("COMPRESS_KERNEL", raising=False)
    monkeypatch.setenv("COMPRESS_NATIVE", "0")  # our kernel serves every layout
    odd = random_weights(32, 96, 4, 24, True, True, 0)  # act-order groups of 24
    assert kernels.backend_name(odd, CPU) == "reference"
    monkeypatch.setenv("COMPRESS_KERNEL", "cpu")
    with pytest.raises(ValueError, match=r"COMPRESS_KERNEL=cpu cannot serve.*multiple of 32"):
        kernels.backend_name(odd, CPU)


@pytest.mark.parametrize("name", ["reference", "cpu", "triton", "dense"])
def test_forcing_each_backend(monkeypatch, name):
    monkeypatch.setenv("COMPRESS_KERNEL", name)
    w = random_weights(48, 64, 4, 32, False, False, 1)
    x = torch.randn(3, 64)
    kernel = kernels.prepare(w, CPU)
    assert kernel.backend == name
    assert relative_error(kernels.run(kernel, x), reference_output(x, w)) < 1e-2


def test_dense_is_only_forced_and_dequantises_once_per_dtype(monkeypatch):
    w = random_weights(48, 64, 3, 32, False, True, 4)
    monkeypatch.delenv("COMPRESS_KERNEL", raising=False)
    assert kernels.backend_name(w, CPU) != "dense"
    monkeypatch.setenv("COMPRESS_KERNEL", "dense")
    kernel = kernels.prepare(w, CPU)
    x = torch.randn(5, 64)
    torch.testing.assert_close(kernels.run(kernel, x), reference_output(x, w),
                               rtol=1e-5, atol=1e-5)
    first = kernel.payload.dense(torch.float32)
    kernels.run(kernel, x)
    assert kernel.payload.dense(torch.float32) is first  # cached, not rebuilt per call
    half = kernels.run(kernel, x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert relative_error(half, reference_output(x.to(torch.bfloat16), w)) < 1e-2


def test_forced_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("COMPRESS_KERNEL", "warp-drive")
    with pytest.raises(ValueError, match="COMPRESS_KERNEL='warp-drive' is not available"):
        kernels.backend_name(random_weights(16, 32, 4, 32, True, False, 0), CPU)


def test_triton_without_cuda_or_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("COMPRESS_KERNEL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA device"):
        kernels.backend_name(random_weights(16, 32, 4, 32, True, False, 0), CPU)


def test_quant_linear_follows_the_forced_backend(monkeypatch):
    w = random_weights(48, 64, 8, -1, True, False, 2)
    qw = QuantizedWeight(w.qweight, w.scales, None, None, 8, -1, (48, 64))
    layer = QuantLinear(qw)
    x = torch.randn(2, 64)
    monkeypatch.setenv("COMPRESS_KERNEL", "reference")
    exact = layer(x)
    assert layer.kernel(CPU).backend == "reference"
    torch.testing.assert_close(exact, reference_output(x, w), rtol=1e-6, atol=1e-6)
    monkeypatch.setenv("COMPRESS_KERNEL", "cpu")
    fast = layer(x)
    assert layer.kernel(CPU).backend == "cpu"
    assert relative_error(fast, exact) < 1e-2


def test_without_a_compiler_the_cpu_backend_keeps_torch_ops(tmp_path):
    # A fresh process: the kernel build is attempted once per process.
    script = (
        "from compress.kernels import cpu, native\n"
        "from packed_cases import random_weights\n"
        "print(native.unavailable())\n"
        "print(type(cpu.prepare(random_weights(32, 64, 4, 32, True, False, 0))).__name__)\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"),
           "COMPRESS_HOME": str(tmp_path / "cache")}
    env.pop("COMPRESS_NATIVE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, cwd=Path(__file__).parent, check=True).stdout.splitlines()
    assert out == [f"no C++ compiler found ({tmp_path / 'no-such-c++'}); install g++ for the "
                   "fast CPU kernel", "Int4Prepared"]
