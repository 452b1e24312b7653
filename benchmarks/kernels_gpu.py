"""Triton packed matmuls on a CUDA GPU vs torch.matmul in float16, against the roofline.

    python benchmarks/kernels_gpu.py [--json benchmarks/results/kernels_gpu.json]
    python benchmarks/kernels_gpu.py --predict        # the roofline table, no GPU needed

Shapes are Llama-3-8B's Linears (fused q/k/v and gate/up as served) at M = 1, 16, 128
and 2048 rows. For each shape and path it prints time, achieved GB/s and TFLOP/s, and
the % of the roofline time max(bytes / bandwidth, FLOPs / peak) that the run reached.
Peaks default to an H100 SXM (3.35 TB/s HBM3, 989 dense fp16 TFLOP/s); pass --bandwidth
and --tflops for another part. benchmarks/README.md holds the prediction this checks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

HERE = Path(__file__).parent
SHAPES = {  # name: (N, K)
    "qkv fused": (6144, 4096), "o_proj": (4096, 4096), "gate_up fused": (28672, 4096),
    "down_proj": (4096, 14336),
}
ROWS = (1, 16, 128, 2048)
SETTINGS = {"fp16 dense": (16, None), "W4 g128": (4, 128), "W8 per-channel": (8, -1)}


def traffic(n: int, k: int, m: int, bits: int, group: int | None) -> tuple[int, int]:
    """(bytes moved, FLOPs) of y[m, n] = x[m, k] @ W.T with W stored at `bits`."""
    weight = n * k * bits // 8
    if group is not None:
        weight += n * (1 if group == -1 else -(-k // group)) * 2  # fp16 scales
    return weight + 2 * m * k + 2 * m * n, 2 * m * n * k


def roofline_us(n, k, m, bits, group, bandwidth, tflops) -> float:
    moved, flops = traffic(n, k, m, bits, group)
    return max(moved / bandwidth, flops / (tflops * 1e12)) * 1e6


def predict(bandwidth: float, tflops: float) -> None:
    print(f"| shape (N x K) | M | {' | '.join(f'{s} µs' for s in SETTINGS)} | W4 speed-up |")
    print("|---|---|" + "---|" * (len(SETTINGS) + 1))
    for name, (n, k) in SHAPES.items():
        for m in ROWS:
            t = {s: roofline_us(n, k, m, b, g, bandwidth, tflops) for s, (b, g) in
                 SETTINGS.items()}
            cells = " | ".join(f"{v:.1f}" for v in t.values())
            print(f"| {name} ({n} x {k}) | {m} | {cells} | "
                  f"{t['fp16 dense'] / t['W4 g128']:.2f}x |")


def measure(bandwidth: float, tflops: float, out: Path) -> None:
    import triton.testing
    from compress.kernels import triton_qmm

    from compress import kernels

    dev = torch.device("cuda")
    results = {}
    print(f"{'shape':<16}{'M':>6}{'path':>16}{'us':>10}{'GB/s':>9}{'TFLOP/s':>9}{'roofline':>10}")
    for name, (n, k) in SHAPES.items():
        for m in ROWS:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            for setting, (bits, group) in SETTINGS.items():
                if group is None:
                    w = torch.randn(k, n, device=dev, dtype=torch.float16)
                    fn = lambda x=x, w=w: torch.matmul(x, w)  # noqa: E731
                else:
                    half = 1 << (bits - 1)
                    codes = torch.randint(-half, half, (n, k), dtype=torch.int8)
                    groups = 1 if group == -1 else k // group
                    pw = kernels.PackedWeights(
                        kernels.pack(codes, bits).to(dev),
                        (torch.rand(n, groups) * 0.01).to(dev, torch.float16),
                        None, None, bits, group, k)
                    prepared = triton_qmm.prepare(pw)
                    fn = lambda x=x, p=prepared: triton_qmm.qmm(x, p)  # noqa: E731
                ms = triton.testing.do_bench(fn, warmup=25, rep=100)
                moved, flops = traffic(n, k, m, bits, group)
                best = roofline_us(n, k, m, bits, group, bandwidth, tflops)
                us = ms * 1e3
                row = {"us": us, "gb_s": moved / us / 1e3, "tflop_s": flops / us / 1e6,
                       "roofline_us": best, "of_roofline": best / us}
                results[f"{name} N={n} K={k} M={m} {setting}"] = row
                print(f"{name:<16}{m:>6}{setting:>16}{us:>10.1f}{row['gb_s']:>9.0f}"
                      f"{row['tflop_s']:>9.1f}{row['of_roofline']:>10.0%}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "kernels (GPU)",
                               "device": torch.cuda.get_device_name(dev),
                               "peak_bandwidth": bandwidth, "peak_tflops": tflops,
                               "results": results}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predict", action="store_true")
    parser.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s")
    parser.add_argument("--tflops", type=float, default=989.0, help="dense fp16 TFLOP/s")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "kernels_gpu.json")
    args = parser.parse_args()
    if args.predict:
        predict(args.bandwidth, args.tflops)
        return
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --predict for the roofline table")
    measure(args.bandwidth, args.tflops, args.json)


if __name__ == "__main__":
    main()
