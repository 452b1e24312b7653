"""One AWQ (or GPTQ) recipe variant on the bundled model, scored like benchmarks/lowbit.py:
the exploration behind issue 21's AWQ changes (results/awq_variants.json).

    python benchmarks/awq_variants.py NAME [--method awq] [--bits 4] [--group 128]
                                      [--clip 1] [--duo 1] [--rescore 4] [--samples 32]

Runs `compress.api.quantize` in this process with the recipe the flags describe (seed-0
calibration windows of 512 tokens, as `compress quantize` takes them), then KL, top-1
agreement and perplexity against the fp16 model on 8,192 held-out tokens; appends one
JSON line to benchmarks/results/awq_variants.jsonl. The committed awq_variants.json
gathers the runs, each labelled with the code it ran (some predate the final code).
"""

from __future__ import annotations

# Before torch loads OpenMP: idle threads sleep instead of spinning (compress/threads.py).
import compress  # noqa: F401

# isort: split
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _quantbench import HERE, score

from compress import api
from compress.progress import set_quiet
from compress.quant.awq import AWQConfig
from compress.quant.scheme import QuantScheme
from compress.recipe import CalibrationConfig, Recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--method", default="awq")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--clip", type=int, default=1)
    parser.add_argument("--duo", type=int, default=1)
    parser.add_argument("--rescore", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()
    set_quiet(True)
    torch.set_num_threads(1)
    recipe = Recipe(method=args.method, scheme=QuantScheme(bits=args.bits, group_size=args.group),
                    calibration=CalibrationConfig(samples=args.samples, seqlen=512),
                    awq=AWQConfig(clip=bool(args.clip), duo_scaling=bool(args.duo),
                                  rescore=args.rescore))
    out = Path(tempfile.mkdtemp(prefix="compress-awq-variant-")) / args.name
    start = time.perf_counter()
    api.quantize(None, recipe, out=out, overwrite=True, evaluate=False)
    row = {"name": args.name, "args": vars(args), "seconds": time.perf_counter() - start,
           **score(out, args.eval_tokens)}
    print(json.dumps(row))
    with open(HERE / "results" / "awq_variants.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
