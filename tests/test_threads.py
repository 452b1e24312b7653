"""The thread policy: explicit requests win, then OMP_NUM_THREADS, then the free cores."""

import itertools
import os
import subprocess
import sys

import pytest

from compress import threads
from compress.errors import CompressError


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "SAMPLE_GAP_S", 0.0)


@pytest.mark.parametrize(("running", "expected"), [
    ([1, 1, 1, 1, 1], 4),  # only our sampler runs: every core is free
    ([3, 3, 2, 3, 9], 2),  # two busy neighbours (one spike ignored by the median)
    ([8, 8, 8, 8, 8], 1),  # more work than cores: still one thread
])
def test_free_cores_from_runnable_threads(clean_env, monkeypatch, running, expected):
    samples = itertools.cycle(running)
    monkeypatch.setattr(threads, "_runnable", lambda: next(samples))
    assert threads.free_cores() == expected
    assert threads.choose()[0] == expected


def test_requests_win_over_the_sampled_cores(clean_env, monkeypatch):
    monkeypatch.setattr(threads, "_runnable", lambda: 9.0)  # busy: auto would pick 1
    assert threads.choose(3) == (3, "requested")
    monkeypatch.setenv(threads.ENV, "2")
    assert threads.choose() == (2, "requested")
    assert threads.choose("auto")[0] == 1  # the argument beats the environment
    monkeypatch.delenv(threads.ENV)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose() == (3, "OMP_NUM_THREADS")


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5", 0])
def test_a_bad_thread_count_is_one_line(bad):
    with pytest.raises(CompressError, match="threads must be a positive number or 'auto'"):
        threads.parse(bad)


def test_importing_compress_makes_openmp_wait_passively_unless_told_otherwise():
    code = "import os, compress; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "ACTIVE"


def test_apply_sets_torchs_threads(clean_env):
    import torch

    before = torch.get_num_threads()
    try:
        assert threads.apply(1)[0] == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_before_torch_loads_the_choice_is_what_torch_starts_with():
    code = ("import sys; from compress import threads; threads.apply(1); "
            "assert 'torch' not in sys.modules; import torch; print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", threads.ENV)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "1"
