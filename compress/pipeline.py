"""Layer-by-layer quantisation of a checkpoint, resumable from the last finished layer.

For each decoder layer: read only that layer's tensors, quantise its Linears with the
recipe's method, write the layer as its own safetensors shard, free it. Calibrated
methods (GPTQ) also carry the calibration activations from layer to layer:

    tokens ─► embedding ─► X0 ─► layer 0 ─► X1 ─► layer 1 ─► ...
    per layer, group by group in true-sequential order (q,k,v | o | gate,up | down):
      run the layer on X until the group's input (the forward stops there), accumulate
      H = 2XᵀX/n, quantise the group, put the quantised weights back in the layer;
    then run the whole quantised layer to get the next layer's inputs.

Only one layer's weights and one copy of the activations are held at a time. After each
layer, its shard and `progress.json` are committed atomically in `<out>.partial/`, with
the next layer's inputs every `save_activations` layers (every layer by default);
re-running the same command continues from the last saved inputs (calibrating the
finished layers after them again) and produces the same bytes as an uninterrupted run.
The finished directory appears at `<out>` with one rename.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

import compress
from compress import data, distributed, models
from compress import tune as tuning
from compress.calibrate import layer as calibrate_layer
from compress.calibrate import rotate, signround
from compress.errors import CompressError
from compress.formats import checkpoint, manifest, pack_quantized
from compress.memory import release_freed
from compress.models import layers
from compress.progress import on_interrupt, raise_if_interrupted, status, track
from compress.quant import QuantScheme, rtn
from compress.recipe import Recipe

PROGRESS = "progress.json"
QUANT_LOG = "quantization_log.json"
# Test hook (tests/faults): a stage name here stops the process (SIGSTOP) when it gets there,
# so a test can kill it at exactly that point. See `_pause_point` for the stage names.
FAULT_PAUSE_ENV = "COMPRESS_FAULT_PAUSE_AT"
# `save_activations`: save the next layer's inputs after every layer (the default), or never
SAVE_EVERY_LAYER, SAVE_NEVER = 1, 0


@dataclass(frozen=True)
class QuantizeResult:
    out: Path
    recipe: Recipe
    seconds: float
    fp16_bytes: int  # the source model's tensors at 2 bytes per element
    packed_bytes: int  # our safetensors shards on disk
    quantized_modules: int
    layers_resumed: int
    linear_fp16_bytes: int  # the quantised Linears at 2 bytes per weight
    linear_packed_bytes: int  # the same Linears packed: codes, scales, zeros, shapes
    calibration: dict | None = None
    errors: dict | None = None  # module -> relative output error (calibrated methods)
    head_quantized: bool = False  # the output head is among the quantised Linears
    experts: dict | None = None  # expert -> its calibration coverage (`expert_coverage`)
    rotation: dict | None = None  # the rotations folded into the weights (`RotationPlan`)

    @property
    def size_ratio(self) -> float:
        return self.packed_bytes / self.fp16_bytes


def plan(files: models.ModelFiles, recipe: Recipe) -> dict[str, QuantScheme]:
    """Module -> scheme for every Linear the recipe quantises, validated against shapes."""
    candidates = files.linear_names()
    head = files.arch.lm_head
    if files.tied_embeddings or f"{head}.weight" in files.tensors:
        candidates.append(head)  # tied: quantising it unties it (the embedding stays)
    schemes = {}
    for name in candidates:
        scheme = recipe.scheme_for(name)
        if scheme is not None:
            schemes[name] = scheme.fit(name, files.linear_shape(name)[1])
    if not schemes:
        raise CompressError("the recipe leaves every Linear dense; nothing to quantise "
                            "(check its ignore patterns)")
    if recipe.calibrated and head in schemes:
        status(f"{head} is rounded to nearest: {recipe.method} calibrates the decoder "
               "layers' Linears only")
    return schemes


def signround_loss(files: models.ModelFiles, recipe: Recipe) -> str | None:
    """What learned rounding's loss measures on this model (None: no learned rounding)."""
    if recipe.rounding != "signround":
        return None
    return signround.loss_for(recipe.signround.loss, files.arch)


def _auto_chose_normed(files: models.ModelFiles, recipe: Recipe) -> bool:
    return (signround_loss(files, recipe) == "normed" and recipe.signround.loss == "auto")


def identity(files: models.ModelFiles, recipe: Recipe, calib: data.CalibrationSet | None) -> dict:
    """What makes two runs the same run (shown field by field when they differ)."""
    return {
        "model": str(files.path.resolve()),
        "model_config_sha256": hashlib.sha256((files.path / "config.json").read_bytes())
        .hexdigest(),
        "model_weight_files": {f: (files.path / f).stat().st_size for f in files.tensors.files()},
        # sizes match for another model of the same shapes (the same path, re-downloaded
        # or replaced): resuming on its weights would mix two models' layers
        "model_weights_sample_sha256": files.tensors.sample_sha256(),
        "recipe": recipe.to_dict(),
        "calibration": None if calib is None else calib.describe(),
        "compress_version": compress.__version__,
        # a recipe written before "auto" existed meant the plain loss: where "auto" means
        # another, a run started then must not be resumed under it
        **({"signround_loss": "normed"} if _auto_chose_normed(files, recipe) else {}),
    }


def check_inputs(files: models.ModelFiles, out: Path, overwrite: bool) -> None:
    """The checks worth failing on before any long work: a dense source whose every
    tensor fits its config.json (a damaged later layer would otherwise fail deep inside
    calibration), a usable `out`."""
    if files.is_quantized:
        raise CompressError(f"{files.path} is already quantised; start from the original "
                            "model directory")
    models.check_shapes(files)
    checkpoint.check_output_dir(out, overwrite)


def quantize(model: models.ModelFiles | str | Path | None, recipe: Recipe, out: str | Path,
             overwrite: bool = False, resume: bool = False,
             calibration_data: str | Path | None = None,
             notes: dict[str, object] | None = None,
             announce: str | None = None,
             ctx: distributed.Context | None = None,
             save_activations: int = SAVE_EVERY_LAYER) -> QuantizeResult:
    """Quantise `model` (opened, or a directory or bundled name) with `recipe` into
    directory `out`.

    `notes`: extra JSON files (name -> content) written into the checkpoint and its
    manifest, such as how a mixed-precision recipe was chosen. `announce`: a status line
    saying what the run will do, shown once the inputs passed their checks (bad input
    gets its error line alone).

    `ctx`: the device and, under torchrun or `--workers`, this process's rank
    (`compress.distributed`); default: one process on cuda when there is one, else cpu.
    Every rank calls this; rank 0 alone writes, and its result is every rank's.

    `save_activations` (calibrated methods): save the inputs of every layer whose index is
    a multiple of it for resuming (1: every layer; 0, SAVE_NEVER: none, they stay in
    memory only). It does not change the checkpoint, nor what makes two runs the same: a
    resumed run goes on from the last saved inputs, calibrating the finished layers
    after them again (the same inputs and ops give the same bytes)."""
    if isinstance(save_activations, bool) or not isinstance(save_activations, int) \
            or save_activations < 0:
        raise CompressError("save_activations must be a number of layers (0: never), "
                            f"got {save_activations!r}")
    started = time.perf_counter()
    ctx = ctx or distributed.Context(distributed.resolve_device("auto"))
    out = Path(out)
    files = models.open_model(model)
    ctx.decide(lambda: check_inputs(files, out, overwrite))
    schemes = plan(files, recipe)
    if not recipe.calibrated and recipe.tune is None and calibration_data is not None:
        raise CompressError(f"method {recipe.method!r} uses no calibration data; drop --calib")
    calib = tune_calib = None  # RTN's rounding needs no windows, tuning does
    if recipe.calibrated:
        calib = ctx.decide(lambda: _calibration(files, recipe, calibration_data, ctx.device))
    if recipe.tune is not None:
        sampled = recipe.tune.sampled  # None: the calibration's
        if calib is not None and sampled in (None, recipe.calibration.sampled):
            tune_calib = calib
        else:
            tune_calib = ctx.decide(lambda: _calibration(files, recipe, calibration_data,
                                                         ctx.device, sampled))

    rotations = rotate.plan(files, recipe.rotate)
    partial = out.with_name(out.name + ".partial")
    run_id = identity(files, recipe, calib)

    def open_partial() -> dict:
        _pause_point("prepared")
        state = _open_partial(partial, run_id, resume, overwrite)
        _pause_point("opened")
        if announce:
            status(announce)
        if rotations is not None and rotations.skipped:
            status(f"rotation: {rotations.skipped}; only each head's values are rotated")
        slow = (signround.precision_note(recipe.signround, ctx.device)
                 if recipe.rounding == "signround" else None)
        if slow:
            status(slow)
        if _auto_chose_normed(files, recipe):
            status(f"learned rounding: the normed loss ({files.arch.name} norms each branch's "
                   "output before the residual add; signround loss 'output' for the plain "
                   "one)")
        if rotations is not None and recipe.method in ("rtn", "awq"):
            # measured on the bundled model: rotation doubled RTN's KL at W4 and collapsed
            # W3, while it lowered GPTQ's (docs/figures.md, benchmarks/results/rotate.json)
            status(f"note: --rotate with {recipe.method} rounds without seeing the "
                   "activations and was worse than no rotation in our measurements; "
                   "use --method gptq or awq+gptq with it")
        return state

    state = ctx.decide(open_partial)

    def kept() -> str:
        again = ("" if calib is None or save_activations == SAVE_EVERY_LAYER else
                 " (the layers after the last saved activations are calibrated again)")
        tuning_note = (" (and the tuning's progress, saved every 5 minutes)"
                       if recipe.tune is not None else "")
        return (f"{len(state['done'])} of {files.num_layers} layers are kept in {partial}"
                f"{tuning_note}; re-run the same command to resume{again}")

    with on_interrupt(kept):
        weight_map, resumed = _quantize_layers(files, recipe, schemes, calib, partial, state,
                                               ctx, rotations, save_activations)

        def finish() -> dict[str, dict]:
            logs = _finish(files, recipe, schemes, calib, partial, state, weight_map,
                           notes or {}, rotations)
            ready = partial
            if recipe.tune is not None:  # the finished layers stay in `partial` meanwhile
                ready = out.with_name(out.name + ".tuning")
                # written and hashed a moment ago: not read back to check the hashes
                tuning.tune_into(models.open_model(partial, verify=False), files, tune_calib,
                                 recipe.tune, ready)
            _pause_point("publish")
            checkpoint.publish(ready, out, overwrite)
            if ready != partial:
                shutil.rmtree(partial, ignore_errors=True)
            return logs

        logs = ctx.decide(finish)

    def published() -> QuantizeResult:
        _pause_point("published")
        # progress.json goes only now: a run killed before the rename resumes instead of
        # finding a finished `.partial` it cannot read. Killed just before this line, `out`
        # is complete.
        (out / PROGRESS).unlink(missing_ok=True)
        return _result(files, recipe, schemes, calib, out, weight_map, logs, resumed,
                       time.perf_counter() - started, rotations)

    return ctx.decide(published)


def _calibration(files: models.ModelFiles, recipe: Recipe,
                 calibration_data: str | Path | None,
                 device: torch.device | str = "cpu",
                 sampled: int | None = None) -> data.CalibrationSet:
    """The recipe's calibration windows, with `sampled` windows sampled from the model in
    place of the recipe's count where given (the tuning's own)."""
    c = recipe.calibration
    tokenizer = data.load_tokenizer(files.path, f"{recipe.method} calibration",
                                    "use --method rtn, which needs no data")
    calib = data.calibration_set(tokenizer, calibration_data, c.samples, c.seqlen, c.seed)
    return data.with_sampled(calib, files, c.sampled if sampled is None else sampled, c.seed,
                             device)


def _result(files: models.ModelFiles, recipe: Recipe, schemes: dict[str, QuantScheme],
            calib: data.CalibrationSet | None, out: Path, weight_map: dict[str, str],
            logs: dict[str, dict], resumed: int, seconds: float,
            rotations: rotate.RotationPlan | None) -> QuantizeResult:
    fp16_bytes = sum(2 * math.prod(files.tensors.shape(n)) for n in files.tensors.names())
    packed_bytes = sum((out / f).stat().st_size for f in set(weight_map.values()))
    written = checkpoint.SafetensorsDir(out)
    linear_fp16 = sum(2 * math.prod(files.linear_shape(m)) for m in schemes)
    linear_packed = sum(written.nbytes(f"{m}.{suffix}") for m in schemes
                        for suffix in pack_quantized.SUFFIXES if f"{m}.{suffix}" in written)
    return QuantizeResult(out, recipe, seconds, fp16_bytes, packed_bytes,
                          len(schemes), resumed, linear_fp16, linear_packed,
                          None if calib is None else calib.describe(),
                          {k: v["relative_error"] for k, v in logs.items()
                           if v.get("relative_error") is not None} or None,
                          files.arch.lm_head in schemes, expert_coverage(files, logs) or None,
                          None if rotations is None else rotations.describe())


def _quantize_layers(files: models.ModelFiles, recipe: Recipe, schemes: dict[str, QuantScheme],
                     calib: data.CalibrationSet | None, partial: Path, state: dict,
                     ctx: distributed.Context, rotations: rotate.RotationPlan | None,
                     save_activations: int = SAVE_EVERY_LAYER) -> tuple[dict[str, str], int]:
    """Each decoder layer into its shard in `partial` (a layer an interrupted run finished
    is kept); returns the tensor -> shard map and the number of layers kept.

    With several processes, every rank calibrates each layer on its share of the samples
    and rank 0 alone writes; the others wait for it layer by layer. RTN needs no data, so
    rank 0 rounds every layer itself and the others only wait."""
    layer_fn = (_CalibratedLayers(files, recipe, schemes, calib, partial, state, ctx, rotations,
                                  save_activations)
                if calib is not None else _RTNLayers(files, schemes, rotations))
    n_layers = files.num_layers
    n_shards = n_layers + 1

    def kept_layers() -> list[int]:
        kept = []
        for i in range(n_layers):
            record = state["done"].get(_shard_name(i, n_shards))
            if record is not None and record["file"] == _file_record(
                    partial / _shard_name(i, n_shards)):
                kept.append(i)
        return kept

    kept = set(ctx.decide(lambda: layer_fn.resumable(kept_layers())))
    weight_map: dict[str, str] = {}
    resumed = 0
    bar = track(range(n_layers), desc=f"quantize {recipe.method}", total=n_layers,
                unit="layer")
    for i in bar:
        raise_if_interrupted()  # between layers: a Ctrl-C a finalizer swallowed stops here
        shard = _shard_name(i, n_shards)
        if i in kept:
            if ctx.leader:
                weight_map.update(dict.fromkeys(checkpoint.safetensors_keys(partial / shard),
                                                shard))
            resumed += 1
            continue
        computed, following = None, None
        if calib is not None:  # every rank: collectives inside
            computed = layer_fn(i)
            following = layer_fn.gather(i)

        def write(i: int = i, shard: str = shard, computed: tuple | None = computed,
                  following: dict | None = following) -> tuple[dict, list[str]]:
            tensors, log = computed if computed is not None else layer_fn(i)
            checkpoint.atomic_save_safetensors(partial / shard, tensors)
            layer_fn.commit(i, following)
            _pause_point(f"layer-{i}-saved")
            state["done"][shard] = {"file": _file_record(partial / shard), "log": log}
            checkpoint.atomic_write_json(partial / PROGRESS, state)
            _pause_point(f"layer-{i}-done")
            layer_fn.cleanup(i)
            return log, list(tensors)

        log, names = ctx.decide(write)
        weight_map.update(dict.fromkeys(names, shard))
        measured = [v["relative_error"] for v in log.values() if v["relative_error"] is not None]
        if measured:
            bar.set_postfix_str(f"max rel. error {max(measured):.4f}")
        del computed, following
        files.tensors.release()  # else every layer read so far stays mapped, and resident
        release_freed()
    return weight_map, resumed


def _finish(files: models.ModelFiles, recipe: Recipe, schemes: dict[str, QuantScheme],
            calib: data.CalibrationSet | None, partial: Path, state: dict,
            weight_map: dict[str, str], notes: dict[str, object],
            rotations: rotate.RotationPlan | None) -> dict[str, dict]:
    """The tensors outside the decoder layers, the metadata, no leftovers: `partial` is the
    finished checkpoint. Returns the per-module quantisation logs."""
    n_layers = files.num_layers
    layer_names = {n for i in range(n_layers)
                   for n in files.tensors.with_prefix(files.arch.layer_prefix(i))}
    rest = sorted(n for n in files.tensors.names() if n not in layer_names)
    last = _shard_name(n_layers, n_layers + 1)
    source = {n: files.tensors.get(n) for n in rest}
    if rotations is not None:
        source = _stored(rotate.rotate_outer(source, files, rotations), files, schemes)
    tensors = _RTNLayers(files, schemes).convert(source)
    checkpoint.atomic_save_safetensors(partial / last, tensors)
    weight_map.update(dict.fromkeys(tensors, last))

    logs = {k: v for rec in state["done"].values() for k, v in (rec.get("log") or {}).items()}
    for reason in sorted({v["awq"]["skipped"] for v in logs.values()
                          if "skipped" in v.get("awq", {})}):
        status(f"AWQ: {reason}; that group was rounded without scaling")
    _write_metadata(files, recipe, schemes, partial, weight_map, calib, logs, notes, rotations)
    _pause_point("metadata")
    # and the temp files of writes a killed run left (ours `.<name>.*.tmp`, safetensors'
    # own `.tmp*`): no checkpoint file is hidden
    for leftover in [*partial.glob("activations-*"), *partial.glob(".*")]:
        leftover.unlink(missing_ok=True)
    return logs


def expert_coverage(files: models.ModelFiles, logs: dict[str, dict]) -> dict[str, dict]:
    """Per expert (`model.layers.3.mlp.experts.7`): the calibration tokens routed to it,
    its Linears' mean relative output error, and how it was rounded (the coverage rule
    rounds an expert that saw too few tokens to nearest)."""
    experts: dict[str, list[dict]] = {}
    for name, entry in logs.items():
        relative = name.removeprefix(files.arch.layer_prefix(files.layer_of(name)))
        if files.arch.is_expert(relative) and "tokens" in entry:
            experts.setdefault(name.rpartition(".")[0], []).append(entry)
    coverage = {}
    for expert, entries in experts.items():
        errors = [e["relative_error"] for e in entries if e.get("relative_error") is not None]
        coverage[expert] = {
            "tokens": min(e["tokens"] for e in entries),
            "relative_error": sum(errors) / len(errors) if errors else None,
            "rounding": entries[0].get("rounding", "gptq"),
        }
    return dict(sorted(coverage.items(), key=lambda item: files.layer_of(item[0])))


def _pause_point(stage: str) -> None:
    """Stop here if `COMPRESS_FAULT_PAUSE_AT` names this stage (tests/faults kill the stopped
    process). Stages, in order: prepared (inputs checked, calibration data ready, nothing
    written), opened (`<out>.partial` and its progress.json exist), layer-<i>-saved (layer
    i's shard and the next layer's inputs are written, progress.json not yet), layer-<i>-done
    (progress.json records layer i), metadata (every file written), publish (leftovers
    removed, about to rename), published (`<out>` is the new checkpoint, its progress.json
    not yet removed)."""
    if os.environ.get(FAULT_PAUSE_ENV) == stage:
        os.kill(os.getpid(), signal.SIGSTOP)


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def require_finite(name: str, tensor: torch.Tensor) -> None:
    models.require_finite(name, tensor, "source model")


class _RTNLayers:
    """Per-layer conversion needing no data: quantise each planned Linear, copy the rest
    (rotated first when the recipe rotates)."""

    def __init__(self, files: models.ModelFiles, schemes: dict[str, QuantScheme],
                 rotations: rotate.RotationPlan | None = None):
        self.files, self.schemes, self.rotations = files, schemes, rotations

    def __call__(self, i: int) -> tuple[dict[str, torch.Tensor], dict]:
        prefix = self.files.arch.layer_prefix(i)
        source = {n: self.files.tensors.get(n)
                  for n in sorted(self.files.tensors.with_prefix(prefix))}
        if self.rotations is not None:
            for name, tensor in source.items():
                require_finite(name, tensor)
            relative = rotate.rotate_layer({n.removeprefix(prefix): t for n, t in source.items()},
                                           self.files, i, self.rotations)
            source = _stored({prefix + n: t for n, t in relative.items()}, self.files,
                             self.schemes)
        return self.convert(source), {}

    def convert(self, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`source` (name -> tensor, as stored or rotated) with each planned Linear packed."""
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in source.items():
            module, _, leaf = name.rpartition(".")
            if module in self.schemes and leaf == "weight":
                tensors.update(self._quantized(module, name, tensor))
            else:
                tensors[name] = tensor
        head, embed = self.files.arch.lm_head, f"{self.files.arch.embed}.weight"
        if (head in self.schemes and self.files.tied_embeddings and embed in source
                and f"{head}.weight" not in source):
            # untied: a packed copy of the table
            tensors.update(self._quantized(head, embed, source[embed]))
        return tensors

    def _quantized(self, module: str, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        require_finite(name, w)
        qw = rtn.quantize(w, self.schemes[module], self.files.dtype)
        return pack_quantized.to_tensors(module, qw)

    def resumable(self, done: list[int]) -> list[int]:
        """Every finished layer is kept: each is rounded on its own."""
        return done

    def commit(self, i: int, following: torch.Tensor | None) -> None:
        pass

    def cleanup(self, i: int) -> None:
        pass


def _stored(tensors: dict[str, torch.Tensor], files: models.ModelFiles,
            schemes: dict[str, QuantScheme]) -> dict[str, torch.Tensor]:
    """Rotated tensors that stay dense, rounded to the dtype they are stored in (a tied
    head, new, to the embedding table's): what is exported, and so what calibration
    computes with. The weights to be quantised keep their float32 values."""
    embed = f"{files.arch.embed}.weight"
    out = {}
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        if module in schemes and leaf == "weight":
            out[name] = tensor
        else:
            out[name] = tensor.to(files.tensors.dtype(name if name in files.tensors else embed))
    return out


class _CalibratedLayers:
    """Calibrated methods, layer by layer, carrying the activations from layer to layer.

    The inputs of every `save_every`-th layer are saved in `partial/activations-*` for
    resuming (none when it is 0); only the newest saved file is kept.

    Each layer and its inputs move to `ctx.device` to calibrate (Hessians and solves run
    there); packed results come back to the CPU to be written. The activations between
    layers stay on the device when they fit in a quarter of its free memory, else in host
    memory, whence each chunk moves to the device for its forward. With several
    processes, this rank holds its share of the samples only; the activations saved for
    resume hold every sample in order (rank 0 gathers them), so a resumed run may have
    another number of processes."""

    def __init__(self, files: models.ModelFiles, recipe: Recipe,
                 schemes: dict[str, QuantScheme], calib: data.CalibrationSet, partial: Path,
                 state: dict, ctx: distributed.Context,
                 rotations: rotate.RotationPlan | None = None,
                 save_every: int = SAVE_EVERY_LAYER):
        self.files, self.recipe, self.schemes, self.partial = files, recipe, schemes, partial
        self.calib, self.state, self.ctx, self.rotations = calib, state, ctx, rotations
        self.save_every = save_every
        self.shares = ctx.shares(calib.samples.shape[0], calibrate_layer.CALIB_BATCH)
        self.share = self.shares[ctx.rank]
        self.rope = models.rotary(files, ctx.device)(0, calib.samples.shape[1])
        self.hidden: torch.Tensor | None = None
        # the unquantised model's activations (recipe.carries_reference), saved beside
        # `hidden` in the activations files
        self.reference: torch.Tensor | None = None
        # learned rounding's loss weights per layer (`SignRoundConfig.loss` "normed"), read
        # once here: each layer's are every later norm's
        self.reader_gains = None
        if signround_loss(files, recipe) == "normed":
            rotated = rotations is not None and rotations.residual is not None
            self.reader_gains = signround.reader_gains(files, rotated)

    def _activations_file(self, i: int) -> Path:
        return self.partial / f"activations-{i:05d}.safetensors"

    def _saves(self, i: int) -> bool:
        """Whether layer i's inputs are saved (layer 0's are the embedding's: never)."""
        return (0 < i < self.files.num_layers and self.save_every != SAVE_NEVER
                and i % self.save_every == 0)

    def _intact(self, i: int) -> bool:
        """Layer i's saved inputs are on disk as progress.json records them."""
        saved = self._activations_file(i)
        expected = self.state.get("activations", {}).get(saved.name)
        return (expected is not None and saved.is_file()
                and saved.stat().st_size == expected["bytes"]
                and expected == _file_record(saved))

    def resumable(self, done: list[int]) -> list[int]:
        """The finished layers a resumed run keeps (rank 0 decides): those before the last
        layer whose inputs are saved intact, at most the first unfinished one (layer 0's
        inputs are always at hand). The finished layers from there on are calibrated
        again, which gives the same bytes by the determinism every resume rests on (same
        inputs, same ops), rather than run forward from their shards, which would need a
        second way to build a layer (dense float32 from packed codes) held bit-equal to
        the calibration's forward. The price: up to `save_every` - 1 layers calibrated
        twice on a resume."""
        finished = next((i for i in range(self.files.num_layers) if i not in done),
                        self.files.num_layers)
        if finished == self.files.num_layers:
            return list(range(finished))
        start = next((i for i in range(finished, 0, -1) if self._intact(i)), 0)
        keep = self._activations_file(start).name
        self.state["activations"] = {k: v for k, v in self.state.get("activations", {}).items()
                                     if k == keep}
        if start < finished:
            status(f"calibrating layers {start}-{finished - 1} again: their inputs were not "
                   "saved (--save-activations)")
        return list(range(start))

    def _place(self, x: torch.Tensor) -> torch.Tensor:
        """x on the device if it fits in a quarter of the device's free memory (the
        layer, its Hessians and the paused forwards need the rest), else in host memory."""
        device = self.ctx.device
        if device.type != "cuda":
            return x
        free, _ = torch.cuda.mem_get_info(device)
        return x.to(device) if x.nbytes <= free // 4 else x

    def _streams(self) -> tuple[str, ...]:
        return ("hidden", "reference") if self.recipe.carries_reference else ("hidden",)

    def _inputs(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's calibration activations entering layer i (computed, kept, or
        reloaded), and the unquantised model's beside them where the recipe carries
        them."""
        if self.hidden is None:
            loaded = self._load_inputs(i)
            self.hidden, self.reference = loaded["hidden"], loaded.get("reference")
        if self.recipe.carries_reference and self.reference is None:  # layer 0's: the same
            self.reference = self.hidden.clone()
        return self.hidden, self.reference

    def _load_inputs(self, i: int) -> dict[str, torch.Tensor]:
        if i == 0:
            name = f"{self.files.arch.embed}.weight"
            table = self.files.tensors.get(name)
            if self.rotations is not None:  # the table as exported: rotated, in its dtype
                require_finite(name, table)
                table = rotate.rotate_embedding(table, self.rotations)
            return {"hidden": self._place(layers.embed(table, self.calib.samples[self.share],
                                                       torch.float32,
                                                       self.files.decoder_config))}
        saved = self._activations_file(i)

        def check() -> None:
            expected = self.state.get("activations", {}).get(saved.name)
            if expected is None or expected != _file_record(saved):
                raise CompressError(f"cannot resume at layer {i}: {saved} is missing or "
                                    "damaged; pass --overwrite to start over")

        self.ctx.decide(check)
        return {name: self._place(checkpoint.load_rows(saved, name, self.share.start,
                                                       self.share.stop))
                for name in self._streams()}

    def _budget(self, x: torch.Tensor) -> int:
        """Suspended calibration forwards may hold a quarter of the free memory where they
        run; beyond that, chunks are recomputed (same bits, more time)."""
        if self.ctx.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.ctx.device)[0]
        else:
            free = psutil.virtual_memory().available
        return max(x.nbytes, free // 4)

    @torch.no_grad()
    def __call__(self, i: int) -> tuple[dict[str, torch.Tensor], dict]:
        x, reference = self._inputs(i)
        device = self.ctx.device
        # built on the CPU from the memory-mapped source (refuses NaN/Inf), then moved
        layer = models.build_layer(self.files, i, torch.float32)
        self.files.tensors.release()  # the float32 copy is built: unmap the source's pages
        prefix = self.files.arch.layer_prefix(i)
        if self.rotations is not None:  # on the CPU, before the layer moves
            params = dict(layer.named_parameters())
            rotated = rotate.rotate_layer({n: p.data for n, p in params.items()}, self.files,
                                          i, self.rotations)
            stored = _stored({prefix + n: t for n, t in rotated.items()}, self.files,
                             self.schemes)
            for name, param in params.items():
                param.data = stored[prefix + name].to(param.dtype)
        layer = layer.to(device)
        quantized, log = calibrate_layer.quantize_layer(
            layer, lambda chunk: layer(chunk.to(device), self.rope), x, self.files.arch,
            self.files.layer_groups(i), self.files.layer_folds(i), prefix,
            self.schemes, self.recipe, self.files.dtype, self._budget(x), self.ctx, reference,
            None if self.reader_gains is None else self.reader_gains[i])
        # x and reference were overwritten in place with the layer's outputs
        tensors: dict[str, torch.Tensor] = {}
        for name in sorted(self.files.tensors.with_prefix(prefix)):
            module, _, leaf = name.rpartition(".")
            if module in quantized and leaf == "weight":
                tensors.update(pack_quantized.to_tensors(module, quantized[module]))
            else:  # from the layer: AWQ may have rescaled norms, biases and dense Linears
                stored = self.files.tensors.get(name)
                try:
                    current = layer.get_parameter(name.removeprefix(prefix))
                except AttributeError:  # a buffer the decoder does not use
                    current = stored
                tensors[name] = current.to("cpu", stored.dtype)
        return tensors, log

    def gather(self, i: int) -> dict[str, torch.Tensor] | None:
        """Every sample's inputs to layer i + 1 in order (each stream), on rank 0, when they
        are to be saved (None elsewhere, after the last layer, and between saves)."""
        if not self._saves(i + 1):
            return None
        streams = {"hidden": self.hidden, "reference": self.reference}
        gathered = {name: self.ctx.gather_rows(streams[name], self.shares)
                    for name in self._streams()}
        return gathered if self.ctx.leader else None

    def commit(self, i: int, following: dict[str, torch.Tensor] | None) -> None:
        """Persist the next layer's inputs before the layer is marked done."""
        if following is None:
            return
        saved = self._activations_file(i + 1)
        checkpoint.atomic_save_safetensors(saved, following)
        self.state.setdefault("activations", {})[saved.name] = _file_record(saved)

    def cleanup(self, i: int) -> None:
        """Once layer i is recorded done, every saved activations file but the newest goes
        (a resume starts from the newest), with any a killed run left unrecorded."""
        recorded = self.state.setdefault("activations", {})
        newest = max(recorded, default=None)  # the names sort by layer
        for name in [k for k in recorded if k != newest]:
            del recorded[name]
        for old in self.partial.glob("activations-*.safetensors"):
            if old.name != newest:
                old.unlink(missing_ok=True)


def _write_metadata(files: models.ModelFiles, recipe: Recipe, schemes: dict[str, QuantScheme],
                    partial: Path, weight_map: dict[str, str],
                    calib: data.CalibrationSet | None, logs: dict[str, dict],
                    notes: dict[str, object], rotations: rotate.RotationPlan | None) -> None:
    config = dict(files.config)
    rotated_stream = rotations is not None and rotations.residual is not None
    if (files.arch.lm_head in schemes or rotated_stream) and files.tied_embeddings:
        config["tie_word_embeddings"] = False  # the head is now a tensor of its own
    dense_linears = [n for n in [*files.linear_names(), files.arch.lm_head] if n not in schemes]
    dense_linears += files.gate_linears()
    actorder = None
    if recipe.rounding == "gptq" and recipe.gptq.act_order:
        actorder = "weight" if recipe.gptq.static_groups else "group"
    config["quantization_config"] = pack_quantized.quantization_config(schemes, dense_linears,
                                                                       actorder)
    checkpoint.atomic_write_json(partial / "config.json", config)
    total = sum((partial / f).stat().st_size for f in set(weight_map.values()))
    checkpoint.atomic_write_json(partial / checkpoint.INDEX, {
        "metadata": {"total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    })
    side = checkpoint.copy_side_files(files.path, partial)
    checkpoint.atomic_write_bytes(partial / "recipe.yaml", recipe.to_yaml().encode())
    listed = ["config.json", checkpoint.INDEX, "recipe.yaml", *side, *set(weight_map.values())]
    for name, content in notes.items():
        checkpoint.atomic_write_json(partial / name, content)
        listed.append(name)
    if logs:
        coverage = expert_coverage(files, logs)
        checkpoint.atomic_write_json(partial / QUANT_LOG, {
            "method": recipe.method,
            "metric": "relative output error ||(W - W_q) X||^2 / ||W X||^2 on calibration X",
            "modules": dict(sorted(logs.items())),
            **({"rotation": rotations.describe()} if rotations is not None else {}),
            **({"signround_loss": loss} if (loss := signround_loss(files, recipe)) else {}),
            **({"experts": coverage, "expert_min_tokens": calibrate_layer.MIN_EXPERT_TOKENS}
               if coverage else {}),
        })
        listed.append(QUANT_LOG)
    source_info = files.path / "compress_source.json"
    record = {
        "format": manifest.FORMAT,
        "format_version": manifest.FORMAT_VERSION,
        "library": {"compress": compress.__version__, "torch": torch.__version__,
                    "compressed_tensors": pack_quantized.COMPRESSED_TENSORS_VERSION},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_model": {
            "name": files.name,
            "path": str(files.path.resolve()),
            "config_sha256": hashlib.sha256((files.path / "config.json").read_bytes()).hexdigest(),
            "source": json.loads(source_info.read_text()) if source_info.is_file() else None,
        },
        "recipe": recipe.to_dict(),
        **({"rotation": rotations.describe()} if rotations is not None else {}),
        "calibration": None if calib is None else calib.describe(),
        "schemes": {s.label: sorted(n for n, t in schemes.items() if t == s)
                    for s in set(schemes.values())},
        "files": checkpoint.file_entries(partial, listed),
    }
    checkpoint.atomic_write_json(partial / checkpoint.MANIFEST, record)


def _open_partial(partial: Path, run_id: dict, resume: bool, overwrite: bool) -> dict:
    """The progress of an interrupted identical run, or a fresh one.

    An interrupted run of the same command is continued (with or without --resume); one
    with different settings is never silently discarded: --overwrite does that.
    """
    fresh = {"identity": run_id, "done": {}}
    f = partial / PROGRESS
    if partial.exists():
        try:
            state = json.loads(f.read_text())
        except (OSError, ValueError, RecursionError):
            state = None
        previous = state["identity"] if _valid_progress(state) else None
        if previous == run_id:
            status(f"Resuming {partial}: {len(state['done'])} layer(s) already done")
            return state
        # stopped (killed, disk full) before its first progress.json: nothing in it to keep
        empty = previous is None and partial.is_dir() and all(
            p.name.startswith(".") for p in partial.iterdir())
        if not overwrite and not empty:
            what = ("it is unreadable" if previous is None else
                    "it differs in " + "; ".join(_differences(previous, run_id)))
            raise CompressError(f"{partial} holds an interrupted run that cannot be resumed "
                                f"({what}); pass --overwrite to discard it")
        with checkpoint.writing(partial):
            shutil.rmtree(partial)
    elif resume:
        raise CompressError(f"nothing to resume: {partial} does not exist")
    with checkpoint.writing(partial):
        partial.mkdir(parents=True)
    checkpoint.atomic_write_json(f, fresh)
    return fresh


def _valid_progress(state: object) -> bool:
    """progress.json has the structure resuming indexes: an identity mapping, per layer
    {"file": {"bytes", "sha256"} | None, "log": {module: {"relative_error": number, ...}}}
    and the saved activations' records. Anything else (a damaged or hand-edited file) is
    treated as unreadable, which --overwrite discards, rather than failing mid-resume."""
    if not isinstance(state, dict) or not isinstance(state.get("identity"), dict):
        return False
    done, saved = state.get("done"), state.get("activations", {})
    if not isinstance(done, dict) or not isinstance(saved, dict):
        return False
    records = [*saved.values(), *(e.get("file") if isinstance(e, dict) else 0
                                  for e in done.values())]
    if not all(r is None or (isinstance(r, dict) and set(r) == {"bytes", "sha256"})
               for r in records):
        return False
    logs = [e.get("log") or {} for e in done.values()]
    return all(isinstance(log, dict) and all(_valid_log(v) for v in log.values())
               for log in logs)


def _valid_log(entry: object) -> bool:
    """One module's quantisation log: what the summary and quantization_log.json read."""
    if not isinstance(entry, dict):
        return False
    error = entry.get("relative_error")
    awq = entry.get("awq", {})
    # None: an expert no calibration token reached (rounded to nearest, nothing to measure)
    measured = (error is None and entry.get("tokens") == 0) or (
        isinstance(error, int | float) and not isinstance(error, bool))
    return measured and isinstance(awq, dict) and isinstance(awq.get("skipped", ""), str)


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            diffs += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            diffs.append(f"{prefix}{key}: {_short(x)} -> {_short(y)}")
    return diffs


def _short(value: object) -> str:
    """A value for the one-line message: a sha256 by its first 12 digits."""
    text = repr(value)
    return text[:13] + "...'" if _is_digest(value) else text


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(
        c in "0123456789abcdef" for c in value)


def _file_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return {"bytes": path.stat().st_size, "sha256": checkpoint.sha256_file(path)}

