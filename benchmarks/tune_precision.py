"""`compress tune`'s step time in float32 and in bfloat16 (`compress tune --precision`),
timed on the whole bundled model in interleaved rounds (results/tune_precision.json).

    python benchmarks/tune_precision.py [--bits 2] [--group 64] [--steps 2] [--rounds 3]

The bundled model quantised by RTN (the step's cost does not depend on the codes), its
Linears made tunable as `compress tune` makes them, against the float32 model's
log-probabilities on seed-0 calibration windows of 512 tokens, 4 per step (the W2 and W3
recipes' tuning). Each round runs --steps steps in each precision, the order swapped
every round so that a neighbour's load falls on both; only the steps are timed (the
calibration KL measured before and after is float32 in both). Prints the median seconds
per step of each and their ratio; the quality side is a whole tuning's held-out KL
(docs/figures.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator

import torch
from _quantbench import HERE
from signround_precision import time_precisions, timing_report

from compress import api, assets, data, models
from compress.calibrate.scale_tuning import tune
from compress.progress import set_quiet
from compress.quant.scale_tuning import ScaleTuningConfig
from compress.quant.scheme import QuantScheme
from compress.recipe import Recipe
from compress.tune import _norm_weights, _tunable_linears

SEQLEN, BATCH = 512, 4


def timed_steps(order: torch.Tensor, seconds: list[float]) -> Iterator[torch.Tensor]:
    """`order`'s rows, appending each step's seconds (from handing out its windows to
    being asked for the next) to `seconds`."""
    for pick in order:
        began = time.perf_counter()
        yield pick
        seconds.append(time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=str(HERE / "results" / "tune_precision.json"))
    args = parser.parse_args()
    set_quiet(True)
    torch.set_num_threads(1)
    scheme = QuantScheme(args.bits, args.group, True)
    windows = args.steps * BATCH
    with tempfile.TemporaryDirectory() as work:
        packed = f"{work}/rtn"
        api.quantize(assets.DEFAULT_MODEL, Recipe("rtn", scheme), packed, evaluate=False)
        files = models.open_model(packed)
        teacher, base = models.load(assets.DEFAULT_MODEL, dtype=torch.float32)
        tokens = data.calibration_set(data.load_tokenizer(base.path), None, windows, SEQLEN,
                                      0).samples
        with torch.no_grad():
            targets = torch.log_softmax(teacher(tokens), dim=-1).to(torch.bfloat16)
        del teacher

        def seconds_per_step(precision: str) -> float:
            student, _ = models.load(files, dtype=torch.float32, head_dtype=torch.float32)
            linears, norms = _tunable_linears(student), _norm_weights(student, files)
            seconds: list[float] = []
            tune(student, linears, norms, tokens, lambda pick: targets[pick],
                 ScaleTuningConfig(epochs=1, batch=BATCH, precision=precision),
                 progress=lambda order: timed_steps(order, seconds))
            return statistics.mean(seconds)

        timing = timing_report(time_precisions(args.rounds, seconds_per_step))
    medians = timing["median_seconds_per_step"]
    for p, v in timing["seconds_per_step"].items():
        print(f"{p:>9}: {medians[p]:.2f} s per step of {BATCH} x {SEQLEN} tokens (median of "
              f"{', '.join(f'{s:.2f}' for s in v)})")
    print(f"bfloat16 steps are {timing['speedup_bfloat16']:.2f}x as fast as float32's")
    report = {"benchmark": "tune_precision", "model": assets.DEFAULT_MODEL,
              "scheme": scheme.label, "steps": args.steps, "rounds": args.rounds,
              "batch": BATCH, "seqlen": SEQLEN, **timing}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
