"""Per-shape CPU matmul speed: packed weights through our kernel and torch's weight-only
ops vs dense float32/bf16.

    python benchmarks/kernel_speed.py [--json benchmarks/results/kernels.json]

Shapes are the bundled model's Linears (q/o, k/v, fused q/k/v, gate/up, fused gate/up,
down) and its output head, at M = 1 (decode), 16, 128 and 512 rows. Weights are random
W4 g128 / W8 per-channel codes; time does not depend on the values. Each packed weight
is timed through the CPU backend's kernels without its dense switch for many rows
(`native`: ours, `torch_ops`: torch's int4/int8 ops, the fallback) and through what the
dispatcher runs (`cpu`: dense bf16 from M >= cpu.DENSE_MIN_ROWS = 512). The weights stay
in cache between calls here; benchmarks/decode.py measures them streamed from DRAM. GB/s
counts the bytes of the weight as each path stores it; the same-run ratios are the
figures to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from _shapes import SHAPES, random_packed
from _speed import best_seconds, memory_bandwidth, payload_bytes, prepared_bytes
from compress.kernels import cpu, native

from compress import kernels

HERE = Path(__file__).parent
ROWS = (1, 16, 128, 512)


def bench_shape(n: int, k: int, m: int, with_reference: bool) -> dict:
    x = torch.randn(m, k)
    dense = torch.randn(n, k) * 0.02
    dense_bf16 = dense.to(torch.bfloat16)
    x_bf16 = x.to(torch.bfloat16)
    row = {}
    t = best_seconds(lambda: F.linear(x, dense))
    row["dense_fp32"] = {"us": t * 1e6, "gb_s": dense.nbytes / t / 1e9}
    t = best_seconds(lambda: F.linear(x_bf16, dense_bf16))
    row["dense_bf16"] = {"us": t * 1e6, "gb_s": dense_bf16.nbytes / t / 1e9}
    for label, bits, group in (("int4_g128", 4, 128), ("int8_channel", 8, -1)):
        w = random_packed(n, k, bits, group)
        for name, prepared in (("native", native.prepare(w)),
                               ("torch_ops", cpu.prepare_for_torch_ops(w))):
            t = best_seconds(lambda p=prepared: cpu.weight_only(x, p))
            row[f"{label}_{name}"] = {"us": t * 1e6, "gb_s": payload_bytes(prepared) / t / 1e9}
        backends = ("cpu", "reference") if with_reference else ("cpu",)
        for backend in backends:
            os.environ["COMPRESS_KERNEL"] = backend
            kernel = kernels.prepare(w, torch.device("cpu"))
            t = best_seconds(lambda kernel=kernel: kernels.run(kernel, x))
            row[f"{label}_{backend}"] = {"us": t * 1e6,
                                         "gb_s": prepared_bytes(kernel) / t / 1e9}
        os.environ.pop("COMPRESS_KERNEL", None)
    for value in row.values():
        value["speedup_vs_fp32"] = row["dense_fp32"]["us"] / value["us"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=HERE / "results" / "kernels.json")
    parser.add_argument("--with-reference", action="store_true")
    args = parser.parse_args()
    results = {}
    shapes = {**SHAPES, "lm_head (tied)": (49152, 576)}
    print(f"{'shape':<16}{'M':>5}" + "".join(f"{c:>17}" for c in (
        "fp32 us", "bf16 us", "int4 ours us", "int4 torch us", "int8 ours us",
        "int8 torch us", "int4 ours/torch", "cpu int4 vs fp32")))
    for name, (n, k) in shapes.items():
        for m in ROWS if name != "lm_head (tied)" else (1,):
            r = bench_shape(n, k, m, args.with_reference)
            results[f"{name} N={n} K={k} M={m}"] = r
            cells = [r[c]["us"] for c in ("dense_fp32", "dense_bf16", "int4_g128_native",
                                          "int4_g128_torch_ops", "int8_channel_native",
                                          "int8_channel_torch_ops")]
            ratio = r["int4_g128_torch_ops"]["us"] / r["int4_g128_native"]["us"]
            print(f"{name:<16}{m:>5}" + "".join(f"{c:>17.1f}" for c in cells)
                  + f"{ratio:>16.2f}x{r['int4_g128_cpu']['speedup_vs_fp32']:>16.2f}x")
    report = {"benchmark": "kernels (CPU)", "torch": torch.__version__,
              "native_kernel": native.isa(),
              "native_threads": "OpenMP" if native.threaded() else "one",
              "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "bandwidth": memory_bandwidth(),
              "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
