"""kill -9 trials of `compress quantize` on the real bundled model (30 layers), not the
tiny test model: the fault suite's harness (tests/faults/test_kill.py), run at
the size users run.

    python benchmarks/kill_bundled.py [--rtn 10] [--gptq 10]

Each trial kills a quantisation of SmolLM2-135M at a seeded random time (RTN: --rtn
times anywhere before it published and --rtn times after its layer work began; GPTQ:
after its layer work began), re-runs the same command, and
classifies the outcome as the suite does: resumed to a checkpoint identical to an
uninterrupted run, a one-line error, or bad (anything else). Named stage points are the
suite's job (they do not depend on the model's size). Counts go to
benchmarks/results/faults.json under kill-*-bundled.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests" / "faults"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtn", type=int, default=10, help="random kills of an RTN run, "
                        "from its start and again from its first layer")
    parser.add_argument("--gptq", type=int, default=10, help="random kills of a GPTQ run")
    args = parser.parse_args()
    os.environ["COMPRESS_FAULT_REPORT"] = "1"
    from fault_cases import Tally
    from test_kill import Bench

    from compress import assets

    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="kill-bundled-") as root:
        bench = Bench(assets.bundled_model_dir(), Path(root))
        for method, n, after_partial in (("rtn", args.rtn, False), ("rtn", args.rtn, True),
                                         ("gptq", args.gptq, True)):
            ref = bench.reference(method)
            print(f"{method}: uninterrupted run published after {ref.published_at:.1f} s",
                  flush=True)
            for trial in bench.random_kills(method, n, "bundled", after_partial):
                bench.run(trial, tally, f"kill-{method}-bundled")
                print(f"  {tally.points[f'kill-{method}-bundled'][-1]}", flush=True)
    tally.write_report(bundled_model="SmolLM2-135M (30 layers)")
    for fault, row in tally.summary().items():
        print(f"{fault}: {row['trials']} trials, {row['survived']} resumed identical, "
              f"{row['clean_error']} clean errors, {row['bad']} bad")
    if tally.bad:
        raise SystemExit("bad outcomes:\n  " + "\n  ".join(tally.bad))


if __name__ == "__main__":
    main()
