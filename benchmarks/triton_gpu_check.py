"""The Triton packed matmul on a real GPU against the float32 reference.

    python benchmarks/triton_gpu_check.py [--device cuda] [--quick]
                                          [--json benchmarks/results/triton_gpu_check.json]

CI checks these kernels only in Triton's interpreter on CPU; this runs the compiled
kernels (autotuned GEMM for M > 16, split-K GEMV for M <= 16) over bit widths 2/3/4/8,
group sizes 32/64/128/per-channel, symmetric and asymmetric, act-order, M = 1, 3, 16,
128 and 2048, shapes whose N and K are not multiples of the blocks, and fp16, bf16 and
fp32 activations. Every output is NaN-poisoned first. Bounds are the CPU tests' own:
relative Frobenius error <= 1e-2 for 16-bit activations and 1e-4 for fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests" / "kernels"))

BOUND = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-4}


def main() -> None:
    from compress.kernels import triton_qmm
    from packed_cases import random_weights, reference_output, relative_error

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a few cases (interpreter runs)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "triton_gpu_check.json")
    args = parser.parse_args()
    dev = torch.device(args.device)
    shapes = [(200, 320), (4096, 4096)] if not args.quick else [(40, 96)]
    rows = (1, 3, 16, 128, 2048) if not args.quick else (1, 20)
    cases = list(itertools.product(shapes, (2, 3, 4, 8), (32, 64, 128, -1), (True, False),
                                   (False, True)))
    if args.quick:
        cases = cases[::9]
    worst: dict[str, float] = {}
    failures = []
    checked = 0
    for seed, ((n, k), bits, group, sym, act) in enumerate(cases):
        w = random_weights(n, k, bits, group, sym, act, seed)
        prepared = triton_qmm.prepare(dataclasses.replace(
            w, qweight=w.qweight.to(dev), scales=w.scales.to(dev),
            zeros=None if w.zeros is None else w.zeros.to(dev),
            g_idx=None if w.g_idx is None else w.g_idx.to(dev)))
        for m, dtype in itertools.product(rows, BOUND):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + m))
            x = x.to(dtype)
            ref = reference_output(x, w)
            out = torch.full((m, n), float("nan"), dtype=dtype, device=dev)
            y = triton_qmm.qmm(x.to(dev), prepared, out=out if m > 16 else None)
            err = relative_error(y.float().cpu(), ref) if torch.isfinite(y).all() else \
                float("inf")
            key = str(dtype).removeprefix("torch.")
            worst[key] = max(worst.get(key, 0.0), err)
            checked += 1
            if not err <= BOUND[dtype]:
                failures.append(f"N={n} K={k} W{bits} g{group} sym={sym} act={act} M={m} "
                                f"{key}: rel err {err:.3g}")
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    print(f"{device}: {checked} cases, worst relative error by dtype "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
          + f"; {len(failures)} over the bound")
    for f in failures[:20]:
        print("  FAIL", f)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "triton on GPU vs reference",
                                     "device": device, "cases": checked,
                                     "worst_relative_error": worst,
                                     "bounds": {str(k).removeprefix("torch."): v
                                                for k, v in BOUND.items()},
                                     "failures": failures}, indent=2) + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
