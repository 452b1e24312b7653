"""Learned rounding's step time in float32 and in bfloat16 (`signround: {precision: ...}`),
timed on one real decoder layer in interleaved rounds (results/signround_precision.json).

    python benchmarks/signround_precision.py [--layer 1] [--bits 3] [--group 128]
                                             [--steps 20] [--rounds 5] [--device cpu]

The bundled model in float32, seed-0 calibration windows (16 x 512 tokens); one layer's
`compress.calibrate.signround.learn_layer` (Adam, batch 4, GPTQ-free: the timing does
not depend on the start) run for --steps steps in each precision per round, the order
swapped every round so that a neighbour's load falls on both. Prints the median seconds
per step of each and their ratio; the quality side is `signround_steps.py`'s
"+bf16" variants.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _quantbench import HERE
from signround_steps import SEQLEN, layer_inputs
from torch import nn

from compress import assets, data, models
from compress.calibrate import signround
from compress.progress import set_quiet
from compress.quant.precision import PRECISIONS
from compress.quant.scheme import QuantScheme
from compress.quant.signround import SignRoundConfig

WINDOWS = 16


def cpu_flags() -> list[str]:
    """The CPU's bf16-relevant instruction sets (Linux), for the JSON."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx") or f == "avx512f")


def time_precisions(rounds: int, seconds_per_step: Callable[[str], float],
                    ) -> dict[str, list[float]]:
    """Each of `PRECISIONS`' seconds per step, one `seconds_per_step(precision)` per
    round, the order swapped every round so that a neighbour's load falls on both."""
    per_step: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for r in range(rounds):
        for precision in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
            per_step[precision].append(seconds_per_step(precision))
    return per_step


def timing_report(per_step: dict[str, list[float]]) -> dict:
    """The JSON fields of a float32-against-bfloat16 timing: the machine, each round's
    seconds per step, their medians and bfloat16's speed-up."""
    medians = {p: statistics.median(v) for p, v in per_step.items()}
    return {"cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "seconds_per_step": per_step, "median_seconds_per_step": medians,
            "speedup_bfloat16": medians["float32"] / medians["bfloat16"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=str(HERE / "results" / "signround_precision.json"))
    args = parser.parse_args()
    set_quiet(True)
    torch.set_num_threads(1)
    model, files = models.load(assets.DEFAULT_MODEL, dtype=torch.float32)
    calib = data.calibration_set(data.load_tokenizer(files.path), None, WINDOWS, SEQLEN, 0)
    inputs, run = layer_inputs(model, calib.samples, [args.layer])
    layer = model.model.layers[args.layer].to(args.device)
    x = inputs[args.layer].to(args.device)

    def forward(part: torch.Tensor) -> torch.Tensor:
        return run(layer, part)

    targets = signround.layer_outputs(forward, x, 4)
    scheme = QuantScheme(args.bits, args.group, True)
    schemes = {n: scheme for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    def seconds_per_step(precision: str) -> float:
        cfg = SignRoundConfig(iters=args.steps, batch=4, optimizer="adam", precision=precision)
        began = time.perf_counter()
        signround.learn_layer(layer, forward, x, targets, schemes, cfg, torch.float16, 0)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - began) / args.steps

    timing = timing_report(time_precisions(args.rounds, seconds_per_step))
    medians = timing["median_seconds_per_step"]
    for p, v in timing["seconds_per_step"].items():
        print(f"{p:>9}: {medians[p] * 1e3:.0f} ms per step (median of "
              f"{', '.join(f'{s * 1e3:.0f}' for s in v)}), the whole-set checks included")
    print(f"bfloat16 is {timing['speedup_bfloat16']:.2f}x as fast as float32")
    report = {"benchmark": "signround_precision", "model": assets.DEFAULT_MODEL,
              "layer": args.layer, "scheme": scheme.label, "steps": args.steps,
              "rounds": args.rounds, "windows": WINDOWS, "batch": 4, "device": args.device,
              **timing}
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
