"""The Triton packed matmuls on a real GPU against the float32 reference.

    python benchmarks/triton_gpu_check.py [--device cuda] [--quick]
                                          [--json benchmarks/results/triton_gpu_check.json]

CI checks these kernels only in Triton's interpreter on CPU; this runs the compiled
ones. Every code path is covered: the fused kernel's tensor-core tiles of 16 and 64
rows (one row included), with and without split-K (bits 2/4/8, groups 32/128
and per-channel, symmetric and asymmetric, act-order repacked), both dequantise +
cuBLAS paths (whole words for M > 128; general for 3-bit), and float16, bfloat16 and
float32 activations.
Shapes include N and K that are multiples of no block. Every output (and every split-K
partial) is NaN-poisoned first. Bounds are the CPU tests' own (Frobenius-relative):
2e-3 float16, 1e-2 bfloat16, 1e-5 float32.

Each distinct layout compiles its own kernel (~0.5 s each), so the grid is the full
layout grid in float16 on the small shape, and subsets elsewhere; `--budget-s` stops it
early (the JSON then says how many of the planned weights were checked).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests" / "kernels"))

BOUND = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def cases(quick: bool) -> list[tuple]:
    """(N, K, bits, group, symmetric, act_order, rows, dtypes) to check: every layout on
    a small ragged shape, the common layouts on a Llama-sized one."""
    grid = []
    for bits, group, sym, act in itertools.product(
            (2, 3, 4, 8), (32, 128, -1), (True, False), (False, True)):
        dtypes = [torch.float16]
        if bits == 4 and group in (128, -1) and not act:
            dtypes += [torch.bfloat16, torch.float32]
        grid.append((200, 328, bits, group, sym, act, (1, 3, 16, 40), dtypes))
        if bits in (4, 8) and group in (128, -1) and not quick:
            grid.append((4096, 4096, bits, group, sym, act, (1, 16, 129), dtypes))
    return grid[::7] if quick else grid


def main() -> None:
    from compress.kernels import triton_qmm
    from packed_cases import random_weights, reference_output, relative_error

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a few cases (interpreter runs)")
    parser.add_argument("--budget-s", type=float, default=1e9,
                        help="stop after this long and report the cases checked so far")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "triton_gpu_check.json")
    args = parser.parse_args()
    dev = torch.device(args.device)
    started = time.perf_counter()
    worst: dict[str, float] = {}
    paths: dict[str, int] = {}
    failures = []
    checked = 0
    grid = cases(args.quick)
    done_weights = 0
    for seed, (n, k, bits, group, sym, act, rows, dtypes) in enumerate(grid):
        if time.perf_counter() - started > args.budget_s:
            break
        done_weights += 1
        w = random_weights(n, k, bits, group, sym, act, seed)
        on_dev = dataclasses.replace(
            w, qweight=w.qweight.to(dev), scales=w.scales.to(dev),
            zeros=None if w.zeros is None else w.zeros.to(dev),
            g_idx=None if w.g_idx is None else w.g_idx.to(dev))
        prepared = triton_qmm.prepare(on_dev)
        for m, dtype in itertools.product(rows, dtypes):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + m)).to(dtype)
            ref = reference_output(x, w)
            out = torch.full((m, n), float("nan"), dtype=dtype, device=dev)
            partials = None
            path = ("dequantise words + cuBLAS" if prepared.fused and bits <= 4
                    else "dequantise + cuBLAS")
            if prepared.fused and m <= triton_qmm.FUSED_MAX_M:
                config = triton_qmm.fused_config(n, k, m, prepared.packed, dev)
                path = f"fused split={config.splits > 1}"
                if config.splits > 1:
                    partials = torch.full((config.splits, m, n), float("nan"), device=dev)
            y = triton_qmm.qmm(x.to(dev), prepared, out=out, partials=partials)
            y = y.float().cpu()
            err = relative_error(y, ref) if torch.isfinite(y).all() else float("inf")
            key = str(dtype).removeprefix("torch.")
            worst[key] = max(worst.get(key, 0.0), err)
            paths[path] = paths.get(path, 0) + 1
            checked += 1
            if not err <= BOUND[dtype]:
                failures.append(f"N={n} K={k} W{bits} g{group} sym={sym} act={act} M={m} "
                                f"{key} ({path}): rel err {err:.3g}")
    elapsed = time.perf_counter() - started
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    print(f"{device}: {done_weights}/{len(grid)} weights, {checked} cases in {elapsed:.0f} s, "
          "worst relative error by dtype "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
          + f"; {len(failures)} over the bound")
    print("cases per path: " + ", ".join(f"{k} {v}" for k, v in sorted(paths.items())))
    for f in failures[:20]:
        print("  FAIL", f)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "triton on GPU vs reference",
                                     "device": device, "cases": checked,
                                     "weights_checked": done_weights,
                                     "weights_planned": len(grid),
                                     "seconds": elapsed, "cases_per_path": paths,
                                     "worst_relative_error": worst,
                                     "bounds": {str(k).removeprefix("torch."): v
                                                for k, v in BOUND.items()},
                                     "failures": failures}, indent=2) + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
