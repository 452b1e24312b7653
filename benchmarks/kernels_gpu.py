"""Triton packed matmuls on a CUDA GPU vs torch.matmul in float16, against the roofline.

    python benchmarks/kernels_gpu.py [--sweep] [--budget-s 600] [--json FILE]
    python benchmarks/kernels_gpu.py --predict        # the roofline table, no GPU needed

Shapes are Llama-3-8B's Linears (fused q/k/v and gate/up as served) at M = 1, 16, 128
and 2048 rows. For each shape and path it prints time, achieved GB/s and TFLOP/s, and
the % of the roofline time max(bytes / bandwidth, FLOPs / peak) that the run reached,
and the speed-up over fp16 dense. Times are medians of CUDA-graph replays (what a
decode step captured in a graph pays) with the eager Python-launch time beside them.
`--sweep` first times every candidate decode launch shape on three shapes (the table
`triton_qmm.fused_config`'s heuristic is read from).
Peaks default to an H100 SXM (3.35 TB/s HBM3, 989 dense fp16 TFLOP/s); pass --bandwidth
and --tflops for another part. benchmarks/README.md holds the prediction this checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
SHAPES = {  # name: (N, K)
    "qkv fused": (6144, 4096), "o_proj": (4096, 4096), "gate_up fused": (28672, 4096),
    "down_proj": (4096, 14336),
}
ROWS = (1, 16, 128, 2048)  # 128: the fused kernel's last M, timed on both paths
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


def _time_us(fn, graphs: bool) -> float:
    """Median µs per call: replayed from a CUDA graph (the kernel's own time, as a served
    decode step captured in a graph sees it) or launched eagerly from Python."""
    import triton.testing

    if graphs:
        return triton.testing.do_bench_cudagraph(fn, rep=10, return_mode="median") * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def _packed(n: int, k: int, bits: int, group: int, dev: torch.device):
    from compress.kernels import triton_qmm

    from compress import kernels

    half = 1 << (bits - 1)
    codes = torch.randint(-half, half, (n, k), dtype=torch.int8)
    groups = 1 if group == -1 else k // group
    return triton_qmm.prepare(kernels.QuantizedWeight(
        kernels.pack(codes, bits).to(dev), (torch.rand(n, groups) * 0.01).to(dev, torch.float16),
        None, None, bits, group, (n, k)))


def sweep_candidates(k: int, group: int, m: int):
    """The fused launch shapes the sweep times (blocks must lie inside one group). The
    first H200 sweep (3 shapes x M 1/16, 80 shapes each) never picked 16-wide tiles,
    more than 8 splits, or 3 stages at M <= 16, so those are no longer timed."""
    from compress.kernels.triton_qmm import FusedConfig

    blocks = [b for b in (64, 128, 256) if group == -1 or group % b == 0]
    for bn, bk, splits in itertools.product(
            (32, 64, 128), blocks[-2:], (1, 2, 4, 8) if m <= 16 else (1, 2)):
        if splits * bk <= k:
            yield FusedConfig(bn, bk, splits, 4, 4 if m <= 16 else 3)


def sweep(dev: torch.device, deadline: float) -> dict:
    """Time every candidate fused config on two shapes; the heuristic in
    triton_qmm.fused_config is read off this table."""
    from compress.kernels import triton_qmm

    found = {}
    for (name, (n, k)), m, (setting, (bits, group)) in itertools.product(
            [(s, SHAPES[s]) for s in ("o_proj", "gate_up fused")], (1, 16, 128),
            [(s, v) for s, v in SETTINGS.items() if v[1] is not None]):
        prepared = _packed(n, k, bits, group, dev)
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        heuristic = triton_qmm.fused_config(n, k, m, prepared.packed, dev)
        timed = []
        for cfg in sweep_candidates(k, group, m):
            if time.monotonic() > deadline:
                break
            try:
                us = _time_us(lambda c=cfg, x=x, p=prepared: triton_qmm.qmm(x, p, config=c),
                              graphs=True)
            except Exception as e:  # e.g. a tile that needs more shared memory than there is
                print(f"sweep skip {cfg}: {type(e).__name__}", flush=True)
                continue
            timed.append((us, cfg))
        if not timed:
            break
        timed.sort(key=lambda t: t[0])
        h_us = _time_us(lambda x=x, p=prepared, c=heuristic: triton_qmm.qmm(x, p, config=c),
                        graphs=True)
        key = f"{name} N={n} K={k} M={m} {setting}"
        found[key] = {"best_us": timed[0][0], "best": dataclasses.asdict(timed[0][1]),
                      "top5": [[us, dataclasses.asdict(c)] for us, c in timed[:5]],
                      "heuristic_us": h_us, "heuristic": dataclasses.asdict(heuristic),
                      "candidates": len(timed)}
        print(f"sweep {key}: best {timed[0][0]:.1f} us {timed[0][1]}; heuristic "
              f"{h_us:.1f} us {heuristic}", flush=True)
    return found


def measure(bandwidth: float, tflops: float, out: Path, budget_s: float,
            do_sweep: bool) -> None:
    from compress.kernels import triton_qmm

    dev = torch.device("cuda")
    deadline = time.monotonic() + budget_s
    report = {"benchmark": "kernels (GPU)", "device": torch.cuda.get_device_name(dev),
              "peak_bandwidth": bandwidth, "peak_tflops": tflops,
              "timing": "us: median of CUDA-graph replays; us_eager: median of Python "
                        "launches (triton.testing.do_bench)", "results": {}}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")

    if do_sweep:
        report["sweep"] = sweep(dev, time.monotonic() + budget_s / 2)
        save()
    print(f"{'shape':<16}{'M':>6}{'path':>22}{'us':>9}{'eager':>9}{'GB/s':>8}{'TFLOP/s':>9}"
          f"{'roofline':>10}{'vs fp16':>9}", flush=True)
    for name, (n, k) in SHAPES.items():
        for m in ROWS:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            dense_us = None
            variants = [(s, b, g, None) for s, (b, g) in SETTINGS.items()]
            if m == triton_qmm.FUSED_MAX_M:  # where the two paths meet: time the other one
                variants += [(f"{s} dense", b, g, True) for s, (b, g) in SETTINGS.items()
                             if g is not None]
            for setting, bits, group, dense in variants:
                if time.monotonic() > deadline:
                    report["truncated"] = "stopped at --budget-s"
                    save()
                    return
                if group is None:
                    w = torch.randn(k, n, device=dev, dtype=torch.float16)
                    fn = lambda x=x, w=w: torch.matmul(x, w)  # noqa: E731
                else:
                    prepared = _packed(n, k, bits, group, dev)
                    fn = lambda x=x, p=prepared, d=dense: triton_qmm.qmm(  # noqa: E731
                        x, p, dense=d)
                us, eager = _time_us(fn, graphs=True), _time_us(fn, graphs=False)
                dense_us = dense_us or us
                moved, flops = traffic(n, k, m, bits, group)
                best = roofline_us(n, k, m, bits, group, bandwidth, tflops)
                row = {"us": us, "us_eager": eager, "gb_s": moved / us / 1e3,
                       "tflop_s": flops / us / 1e6, "roofline_us": best,
                       "of_roofline": best / us, "speedup_vs_fp16": dense_us / us}
                report["results"][f"{name} N={n} K={k} M={m} {setting}"] = row
                print(f"{name:<16}{m:>6}{setting:>22}{us:>9.1f}{eager:>9.1f}"
                      f"{row['gb_s']:>8.0f}{row['tflop_s']:>9.1f}{row['of_roofline']:>10.0%}"
                      f"{row['speedup_vs_fp16']:>8.2f}x", flush=True)
            save()
    save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predict", action="store_true")
    parser.add_argument("--sweep", action="store_true",
                        help="first time every candidate decode config on three shapes")
    parser.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s")
    parser.add_argument("--tflops", type=float, default=989.0, help="dense fp16 TFLOP/s")
    parser.add_argument("--budget-s", type=float, default=600.0,
                        help="stop and write what was measured after this long")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "kernels_gpu.json")
    args = parser.parse_args()
    if args.predict:
        predict(args.bandwidth, args.tflops)
        return
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --predict for the roofline table")
    measure(args.bandwidth, args.tflops, args.json, args.budget_s, args.sweep)


if __name__ == "__main__":
    main()
