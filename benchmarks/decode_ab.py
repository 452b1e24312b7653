"""Decode speed of one packed checkpoint under two source trees, as a ratio, in one run.

    python benchmarks/decode_ab.py --tree before=/path/to/old/checkout --tree after=.
        [--rounds 5] [--tokens 128] [--mode aot|compile|eager]

For a change that must not slow decoding (a refactor of the decoder, say): the bundled
model's W4 g128 RTN checkpoint is made once (by the first tree), then every round runs
`compress generate --ignore-eos` once per tree, in alternating order, each in a fresh
process with that tree first on PYTHONPATH, and reads the steady decode tokens/s the CLI
reports (the compiling steps are timed apart). A tree must hold `compress/kernels` and
`compress/evals` as links to its `kernels/` and `evals/` folders when it is not the
installed one. Reports each tree's median and the ratio of medians, and writes
benchmarks/results/decode_ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
PROMPT = "The history of the city begins with a small settlement on the river, where"


def cli(tree: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "COMPRESS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "compress.cli", *args], capture_output=True,
                          text=True, env=env, cwd=tempfile.gettempdir(), check=False)


def decode_speed(tree: Path, checkpoint: Path, tokens: int, mode: list[str]) -> float:
    proc = cli(tree, "generate", str(checkpoint), "-p", PROMPT, "-n", str(tokens),
               "--ignore-eos", *mode)
    found = re.search(r"decode ([\d.]+) tokens/s", proc.stderr)
    if proc.returncode or not found:
        raise SystemExit(f"{tree}: generate failed\n{proc.stderr[-2000:]}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True,
                        help="NAME=PATH of a source checkout (give two)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--mode", choices=["aot", "compile", "eager"], default="aot")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "decode_ab.json")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    trees = {name: Path(path) for name, path in trees.items()}
    if len(trees) != 2:
        raise SystemExit("give exactly two --tree NAME=PATH")
    mode = [] if args.mode == "eager" else [f"--{args.mode}"]
    work = Path(tempfile.mkdtemp(prefix="compress-decode-ab-"))
    checkpoint = work / "w4g128"
    first = next(iter(trees.values()))
    made = cli(first, "quantize", "--bits", "4", "--group-size", "128", "--out",
               str(checkpoint), "--no-eval", "-q")
    if made.returncode:
        raise SystemExit(made.stderr[-2000:])
    speeds: dict[str, list[float]] = {name: [] for name in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            speeds[name].append(decode_speed(trees[name], checkpoint, args.tokens, mode))
        print(f"round {r + 1}: " + ", ".join(f"{n} {speeds[n][-1]:.1f}" for n in trees),
              flush=True)
    medians = {name: statistics.median(v) for name, v in speeds.items()}
    a, b = list(trees)
    report = {
        "benchmark": "decode_ab", "mode": args.mode, "tokens": args.tokens,
        "checkpoint": "bundled smollm2-135m, RTN W4 g128 symmetric", "rounds": args.rounds,
        "trees": {n: str(p.resolve()) for n, p in trees.items()},
        "tokens_per_s": speeds, "median_tokens_per_s": medians,
        f"{b}_over_{a}": medians[b] / medians[a],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"median tokens/s: {a} {medians[a]:.1f}, {b} {medians[b]:.1f}; "
          f"{b}/{a} = {medians[b] / medians[a]:.3f}; wrote {args.json}")


if __name__ == "__main__":
    main()
