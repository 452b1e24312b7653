"""Trace learned rounding inside the real pipeline on one layer: every step's batch loss
and the whole-set losses of the candidates it keeps from, for a recipe as
`compress quantize` runs it (its calibration windows, rotation, GPTQ start).

    python benchmarks/signround_trace.py RECIPE.yaml [--layer 0] [--lr 0.005] [--warmup 20]
        [--retry-lr 0.001]

Stops after that layer's learning (nothing is written but the pipeline's partial folder,
in a temporary directory). `--lr`, `--warmup N` and `--retry-lr` replace the recipe's
`signround: {lr, warmup, retry_lr}` (a retry's steps are printed after the first
learning's). Prints; writes nothing under results/.
"""

from __future__ import annotations

# Before torch loads OpenMP: idle threads sleep instead of spinning (compress/threads.py).
import compress  # noqa: F401

# isort: split
import argparse
import contextlib
import dataclasses
import tempfile

import torch

from compress import api, assets
from compress.calibrate import signround
from compress.progress import set_quiet
from compress.recipe import Recipe


class _Done(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--retry-lr", type=float, default=None)
    args = parser.parse_args()
    set_quiet(True)
    torch.set_num_threads(1)
    recipe = Recipe.from_yaml(args.recipe)
    changed = {k: v for k, v in (("lr", args.lr), ("warmup", args.warmup),
                                 ("retry_lr", args.retry_lr)) if v is not None}
    recipe = dataclasses.replace(recipe, signround=dataclasses.replace(recipe.signround,
                                                                       **changed))
    learn, whole_set, mse = signround.learn_layer, signround._loss, torch.nn.functional.mse_loss
    seen = {"layer": -1, "batch": [], "whole": []}

    def traced_mse(a: torch.Tensor, b: torch.Tensor, *rest, **kw) -> torch.Tensor:
        value = mse(a, b, *rest, **kw)
        seen["batch"].append(value.item())
        return value

    def traced_whole(*a, **kw) -> float:
        value = whole_set(*a, **kw)
        seen["whole"].append(value)
        return value

    def traced_learn(*a, **kw):
        seen["layer"] += 1
        if seen["layer"] < args.layer:
            return learn(*a, **kw)
        torch.nn.functional.mse_loss, signround._loss = traced_mse, traced_whole
        try:
            _, losses = learn(*a, **kw)
        finally:
            torch.nn.functional.mse_loss, signround._loss = mse, whole_set
        batch = seen["batch"]
        print(f"layer {args.layer}, {recipe.signround}")
        print("batch losses, every 10th step:", " ".join(f"{v:.4f}" for v in batch[::10]))
        print(f"first 5: {' '.join(f'{v:.4f}' for v in batch[:5])}; last 5: "
              f"{' '.join(f'{v:.4f}' for v in batch[-5:])}; lowest {min(batch):.4f}")
        print("whole set: start {:.5f}, last step {:.5f}, then the candidates {}".format(
            seen["whole"][0], seen["whole"][1],
            " ".join(f"{v:.5f}" for v in seen["whole"][2:])))
        print(f"kept: {losses}")
        raise _Done

    signround.learn_layer = traced_learn
    with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(_Done):
        api.quantize(assets.DEFAULT_MODEL, recipe, f"{tmp}/out", overwrite=True,
                     evaluate=False)


if __name__ == "__main__":
    main()
