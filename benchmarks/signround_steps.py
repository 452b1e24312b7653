"""Learned rounding's optimizer, one decoder layer at a time, on held-out windows: the
comparison behind `--signround-optimizer adam` and its step size (results/signround_steps.json).

    python benchmarks/signround_steps.py [--layers 1,2,3] [--bits 2] [--group 64]
                                         [--variants sign:25,adam:100,adam:100:0.02,adam:200]
                                         [--rotate] [--sampled 96]

The bundled model in float32; seed-0 calibration windows (32 x 512 tokens, as
`compress quantize` takes them), the first 28 to learn on and the last 4 held out
(`--sampled N`: the N windows `--calib-sampled N` adds are learned on too; `--rotate`:
the recipes' Hadamard rotations are folded in first). For each layer: every Linear's
GPTQ (its Hessian from the layer's unquantised inputs on the windows learned on, GPTQ's
defaults), then `compress.calibrate.signround.learn_layer` from GPTQ's error-compensated
weights and grid (`--signround-start gptq`), once per variant
(OPTIMIZER:STEPS[:LR[:BATCH[:FLAGS]]], batch 4 by default; flag "fixed" keeps GPTQ's
group ranges, "bf16" runs the steps' matmuls in bfloat16, "trim" leaves each step's
largest 0.1% of squared errors out of its loss). Scored on the held-out
windows: the layer's output error (mean squared, against the unquantised layer on the
same inputs), also as a ratio to GPTQ's. The whole pipeline differs in two ways: its
GPTQ runs true-sequentially on inputs that earlier quantised layers produced; its target
is the unquantised model's output. Here each layer is alone, so the variants are
compared on equal footing.
"""

from __future__ import annotations

# Before torch loads OpenMP: idle threads sleep instead of spinning (compress/threads.py).
import compress  # noqa: F401

# isort: split
import argparse
import copy
import json
import time
from collections.abc import Callable

import torch
from _quantbench import HERE
from torch import nn

from compress import assets, data, models
from compress.calibrate import rotate, signround
from compress.progress import set_quiet
from compress.quant import gptq
from compress.quant.rotate import RotationConfig
from compress.quant.scheme import QuantScheme
from compress.quant.signround import SignRoundConfig, grid_bounds

LEARN, WINDOWS, SEQLEN, BATCH = 28, 32, 512, 4


def layer_inputs(model: nn.Module, tokens: torch.Tensor, layers: list[int]
                 ) -> tuple[dict[int, torch.Tensor], Callable[[nn.Module, torch.Tensor],
                                                            torch.Tensor]]:
    """Each of `layers`' inputs on every window, and run(layer, x): a layer's forward with
    the other arguments the model gives it (the rotary tables)."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    extra: list[tuple[tuple, dict]] = []

    def keep(i: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen[i].append(args[0].detach().clone())
            if not extra:
                extra.append((args[1:], kwargs))
        return hook

    handles = [model.model.layers[i].register_forward_pre_hook(keep(i), with_kwargs=True)
               for i in layers]
    with torch.no_grad():
        for part in tokens.split(BATCH):
            model(part)
    for handle in handles:
        handle.remove()
    args, kwargs = extra[0]
    return ({i: torch.cat(xs) for i, xs in seen.items()},
            lambda layer, x: layer(x, *args, **kwargs))


def linear_inputs(layer: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                  x: torch.Tensor) -> dict[str, gptq.HessianAccumulator]:
    """Each Linear's Hessian from its inputs while the unquantised layer runs on x."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    hessians = {n: gptq.HessianAccumulator(m.in_features) for n, m in linears.items()}
    handles = [m.register_forward_pre_hook(
        lambda _m, args, n=n: hessians[n].add(args[0].detach())) for n, m in linears.items()]
    with torch.no_grad():
        for part in x.split(BATCH):
            forward(part)
    for handle in handles:
        handle.remove()
    return hessians


@torch.no_grad()
def held_out_error(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   target: torch.Tensor) -> float:
    return float(torch.cat([forward(part) for part in x.split(BATCH)]).sub(target).pow(2).mean())


def with_weights(layer: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    copied = copy.deepcopy(layer)
    for name, weight in weights.items():
        copied.get_submodule(name).weight.data = weight.to(torch.float32)
    return copied


def fold_rotations(model: nn.Module, files: models.ModelFiles) -> None:
    """The model with the Hadamard rotations of `rotate: {kind: hadamard, seed: 0}` folded
    into its weights, as the pipeline quantises it (the head, untouched, is not used)."""
    plan = rotate.plan(files, RotationConfig("hadamard", 0))
    head = f"{files.arch.lm_head}.weight"
    tensors = {n: t for n, t in rotate.rotated_tensors(files, plan).items() if n != head}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {head}:
        raise SystemExit(f"rotated tensors do not match the model: {unexpected or missing}")


def parse_variant(text: str) -> tuple[str, SignRoundConfig]:
    """OPTIMIZER:STEPS[:LR[:BATCH[:FLAGS]]], empty fields for their defaults
    ("adam:200::8", "adam:100:0.01::fixed", "adam:100:0.01::fixed+bf16"); flags joined
    by "+": "fixed", each group keeps GPTQ's range (`SignRoundConfig.learn_ranges` off);
    "bf16", the steps' matmuls in bfloat16 (`SignRoundConfig.precision`); "trim", the
    largest 0.1% of each step's squared errors left out (`SignRoundConfig.trim`)."""
    parts = text.split(":") + [""] * 3
    flags = set(filter(None, parts[4].split("+")))
    optimizer, steps = parts[0], int(parts[1])
    lr = float(parts[2]) if parts[2] else None
    batch = int(parts[3]) if parts[3] else BATCH
    if flags - {"fixed", "bf16", "trim"}:
        raise SystemExit(f"variant {text!r}: the fifth field's flags are 'fixed', 'bf16' "
                         "and 'trim'")
    return text, SignRoundConfig(iters=steps, lr=lr, batch=batch, target="layer",
                                 start="gptq", optimizer=optimizer,
                                 learn_ranges="fixed" not in flags,
                                 precision="bfloat16" if "bf16" in flags else "float32",
                                 trim=0.001 if "trim" in flags else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="1,2,3")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--variants", default="sign:25,adam:100,adam:100:0.02,adam:200")
    parser.add_argument("--sampled", type=int, default=0,
                        help="learn on N windows sampled from the model too (--calib-sampled)")
    parser.add_argument("--rotate", action="store_true",
                        help="fold the recipes' Hadamard rotations (seed 0) in first")
    parser.add_argument("--json", default=str(HERE / "results" / "signround_steps.json"))
    args = parser.parse_args()
    set_quiet(True)
    torch.set_num_threads(1)
    layers = [int(i) for i in args.layers.split(",")]
    variants = [parse_variant(v) for v in args.variants.split(",")]
    scheme = QuantScheme(args.bits, args.group, True)
    model, files = models.load(assets.DEFAULT_MODEL, dtype=torch.float32)
    if args.rotate:
        fold_rotations(model, files)
    tokenizer = data.load_tokenizer(files.path)
    calib = data.calibration_set(tokenizer, None, WINDOWS, SEQLEN, 0)
    if args.sampled:  # appended after the 32 text windows, as --calib-sampled adds them
        calib = data.with_sampled(calib, files, args.sampled, 0)
    tokens = calib.samples
    # learn on every window but the held-out text windows LEARN..WINDOWS
    learning = torch.cat([torch.arange(LEARN), torch.arange(WINDOWS, tokens.shape[0])])
    inputs, run = layer_inputs(model, tokens, layers)
    rows = []
    for index in layers:
        layer, x = model.model.layers[index], inputs[index]
        learn, held = x[learning], x[LEARN:WINDOWS]

        def forward(part: torch.Tensor, layer: nn.Module = layer) -> torch.Tensor:
            return run(layer, part)

        targets = signround.layer_outputs(forward, x, BATCH)
        learn_targets, held_targets = targets[learning], targets[LEARN:WINDOWS]
        started = time.perf_counter()
        results = {n: gptq.quantize_layer(layer.get_submodule(n).weight.data, h.hessian(),
                                          scheme, name=n, continuous=True)
                   for n, h in linear_inputs(layer, forward, learn).items()}
        gptq_seconds = time.perf_counter() - started
        gptq_layer = with_weights(layer, {n: r.weight.dequantize() for n, r in results.items()})
        gptq_error = held_out_error(lambda p, s=gptq_layer: run(s, p), held, held_targets)
        row = {"layer": index,
               "gptq": {"held_out_mse": gptq_error, "seconds": gptq_seconds}}
        for label, cfg in variants:
            start = with_weights(layer, {n: r.continuous for n, r in results.items()})
            bounds = {n: grid_bounds(r.weight) for n, r in results.items()}
            began = time.perf_counter()
            packed, losses = signround.learn_layer(
                start, lambda p, s=start: run(s, p), learn, learn_targets,
                {n: scheme for n in results}, cfg, torch.float16, 0, BATCH, bounds)
            seconds = time.perf_counter() - began
            learned = with_weights(layer, {n: w.dequantize() for n, w in packed.items()})
            error = held_out_error(lambda p, s=learned: run(s, p), held, held_targets)
            row[label] = {"held_out_mse": error, "vs_gptq": error / gptq_error,
                          "learn_mse": losses["learned"], "learn_mse_start": losses["start"],
                          "seconds": seconds}
            print(f"layer {index} {label:>14}: held-out MSE {error:.5g} "
                  f"({error / gptq_error:.3f}x GPTQ's {gptq_error:.5g}), {seconds:.0f} s",
                  flush=True)
        rows.append(row)
    report = {"benchmark": "signround_steps", "model": assets.DEFAULT_MODEL,
              "scheme": f"w{args.bits}g{args.group}", "windows": {"learn": LEARN,
              "sampled": args.sampled, "held_out": WINDOWS - LEARN, "seqlen": SEQLEN,
              "seed": 0, "tokens_sha256": calib.sha256},
              "rotate": "hadamard" if args.rotate else None,
              "variants": [v for v, _ in variants], "layers": rows}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
