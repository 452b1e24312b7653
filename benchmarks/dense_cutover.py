"""Where the CPU backend should stop multiplying from packed codes and dequantise instead.

    python benchmarks/dense_cutover.py [--json benchmarks/results/dense_cutover.json]

For each of the bundled model's Linear shapes (W4 g128, and W8 per-channel for gate/up
and the output head) and M = 128 ... 2048 rows: our kernel on the packed codes
(`cpu.weight_only`) against what the backend runs from `cpu.DENSE_MIN_ROWS` rows on
(`cpu.dense`: dequantise to bf16 for the call, one bf16 GEMM). Times are best of 3 in one
run; the ratio dense / ours > 1 means our kernel is faster. The cut-over
`cpu.DENSE_MIN_ROWS` is read off this table.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from _shapes import SHAPES, random_packed
from _speed import best_seconds
from compress.kernels import cpu, native

HERE = Path(__file__).parent
ROWS = (128, 256, 512, 1024, 2048)
CASES = {  # name: (N, K, bits, group)
    **{f"{name} W4": (n, k, 4, 128) for name, (n, k) in SHAPES.items()
       if name in ("qkv fused", "gate_up fused", "down_proj")},
    "gate_up fused W8": (3072, 576, 8, -1),
    "lm_head W8": (49152, 576, 8, -1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=HERE / "results" / "dense_cutover.json")
    args = parser.parse_args()
    if native.unavailable():
        raise SystemExit(f"our CPU kernel is unavailable: {native.unavailable()}")
    results = {}
    print(f"{'shape':<20}" + "".join(f"{m:>16}" for m in ROWS) + "   (ours / dense ms)")
    for name, (n, k, bits, group) in CASES.items():
        w = random_packed(n, k, bits, group)
        prepared = native.prepare(w)
        cells = []
        for m in ROWS:
            x = torch.randn(m, k)
            ours = best_seconds(lambda x=x, p=prepared: cpu.weight_only(x, p), repeats=3,
                                min_time=0.0)
            dense = best_seconds(lambda x=x, w=w: cpu.dense(x, w), repeats=3, min_time=0.0)
            results[f"{name} M={m}"] = {"shape": name, "n": n, "k": k, "bits": bits, "m": m,
                                        "ours_ms": ours * 1e3, "dense_ms": dense * 1e3,
                                        "dense_over_ours": dense / ours}
            cells.append(f"{ours * 1e3:.2f}/{dense * 1e3:.2f}")
        print(f"{name:<20}" + "".join(f"{c:>16}" for c in cells), flush=True)
    faster = [m for m in ROWS if all(r["dense_over_ours"] > 1 for r in results.values()
                                      if r["m"] == m)]
    print(f"\nour kernel faster on every shape at M = {faster}; "
          f"cpu.DENSE_MIN_ROWS = {cpu.DENSE_MIN_ROWS}")
    report = {"benchmark": "dense cut-over (CPU)", "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(),
              "native_threads": "OpenMP" if native.threaded() else "one",
              "dense_min_rows": cpu.DENSE_MIN_ROWS,
              "rows_where_ours_is_faster_on_every_shape": faster, "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
