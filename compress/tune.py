"""`compress tune`: end-to-end scale tuning of a finished packed checkpoint
(compress.quant.scale_tuning holds the math), written as a new checkpoint.

The unquantised base model the checkpoint records is the teacher; the calibration
windows are the ones the checkpoint was quantised on (its recipe's samples, length and
seed) unless told otherwise. Nothing in the input checkpoint changes: the result goes to
`<out>.partial` and is renamed into place once complete, so a killed run leaves the old
state and the same command starts again.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from compress import data, models
from compress.calibrate.scale_tuning import ScaleTuningResult, TrainingState, tune
from compress.errors import CompressError
from compress.formats import checkpoint
from compress.models.layers import RMSNorm
from compress.nn import QuantLinear
from compress.progress import status, track
from compress.quant import precision
from compress.quant.scale_tuning import ScaleTuningConfig, TopLogprobs, TunableScalesLinear
from compress.recipe import CalibrationConfig

NOTE = "scale_tuning.json"
# The teacher's whole log-probabilities up to this size are computed once and kept
# (bfloat16); beyond it, by default, only its `TEACHER_TOP` most likely tokens per position
# and the rest's total (`TopLogprobs`: 2 KB a token, against 512 KB for all of Gemma's
# 262k), and with teacher_top 0 the teacher runs again on every step's windows.
TEACHER_CACHE_BYTES = 2 << 30
TEACHER_TOP = 256
# A forward's float32 logits stay under this: a step's windows go through in smaller
# groups where they would not (Gemma's 262k vocabulary: 0.5 GB per 512-token window).
LOGITS_BYTES = 1 << 30
# The share of the memory free once both models are loaded that the activations kept for
# backward may take. On the bundled model 4 windows keep 3.7 GiB (measured by
# `measure_activations`) and the run peaked at 11 GB, 2.7 GB of it models and the teacher's cache:
# backward's temporaries and the allocator's slack took about as much again as the saved
# tensors, hence half of 70%.
ACTIVATION_SHARE = 0.35
# How often a run's progress is saved beside its output (`<dest>.state/`): a killed run
# goes on from the last save, to the same result.
SAVE_EVERY_SECONDS = 300.0


@dataclass
class TuneSummary:
    out: Path
    base: str
    calibration: dict
    result: ScaleTuningResult
    seconds: float


def default_out(checkpoint_dir: Path) -> Path:
    return checkpoint_dir.with_name(checkpoint_dir.name + "-tuned")


def tune_checkpoint(checkpoint_dir: str | Path, out: str | Path | None = None,
                    cfg: ScaleTuningConfig | None = None,
                    baseline: str | Path = "auto", calibration_data: str | Path | None = None,
                    samples: int | None = None, seqlen: int | None = None,
                    overwrite: bool = False, seed: int = 0,
                    sampled: int | None = None) -> TuneSummary:
    """Tune `checkpoint_dir`'s scales (and norms) against its base model; write `out`.
    The calibration windows (`samples` of `seqlen` tokens, and `sampled` more sampled
    from the base model, else `cfg.sampled`) are the checkpoint's where not given."""
    from compress import evaluation

    cfg = cfg or ScaleTuningConfig()
    started = time.perf_counter()
    files = models.open_model(checkpoint_dir)
    if not files.is_quantized:
        raise CompressError(f"{files.path} is not a packed checkpoint; quantise it first "
                            "(compress quantize), then tune the result")
    out = Path(out) if out is not None else default_out(files.path)
    if out.resolve() == files.path.resolve():
        raise CompressError("--out must differ from the checkpoint being tuned")
    checkpoint.check_output_dir(out, overwrite)
    base = evaluation.resolve_baseline(files, baseline)
    if base is None:
        raise CompressError(f"{files.path} records no base model; pass --baseline DIR (the "
                            "unquantised model it was made from)")
    calib = _calibration(files, base, calibration_data, samples, seqlen,
                         cfg.sampled if sampled is None else sampled)
    partial = out.with_name(out.name + ".partial")
    result = tune_into(files, base, calib, cfg, partial, seed)
    checkpoint.publish(partial, out, overwrite)
    return TuneSummary(out, base.name, calib.describe(), result,
                       time.perf_counter() - started)


def tune_into(files: models.ModelFiles, base: models.ModelFiles,
              calib: data.CalibrationSet, cfg: ScaleTuningConfig, dest: Path,
              seed: int = 0) -> ScaleTuningResult:
    """Tune the packed checkpoint `files` against `base` on `calib`'s windows and write
    the tuned copy as a complete checkpoint directory `dest` (replaced if there; removed
    again if the write fails). `files` itself is only read."""
    tokens = calib.samples
    status(f"tuning the scales{' and norms' if cfg.norms else ''} end to end against "
           f"{base.name} on {tokens.shape[0]} × {tokens.shape[1]} calibration tokens, "
           f"{cfg.epochs} epoch{'s' if cfg.epochs > 1 else ''}")
    student, _ = models.load(files, dtype=torch.float32, head_dtype=torch.float32)
    slow = precision.slow_note(cfg.precision, next(student.parameters()).device,
                               "scale tuning precision")
    if slow:
        status(slow)
    linears = _tunable_linears(student)
    norms = _norm_weights(student, files)
    teacher, _ = models.load(base, dtype=torch.float32)
    # windows per forward, the teacher's too
    micro = min(cfg.batch, max(1, LOGITS_BYTES // (tokens.shape[1] * teacher.cfg.vocab_size * 4)))
    teacher_logprobs = _teacher(teacher, tokens, micro, cfg.teacher_top)
    del teacher  # a cached teacher is its log-probabilities alone; else the closure holds it
    saved = SavedState(dest, {"checkpoint": files.identity(), "base": base.identity(),
                              "calibration": calib.sha256, "config": cfg.to_dict(),
                              "seed": seed})
    resume = saved.load()
    if resume is not None:
        where = f"after step {resume.step}" if resume.step else "at its first step"
        status(f"resuming the tuning {where}, its starting KL kept (saved in {saved.dir})")
    result = tune(student, linears, norms, tokens, teacher_logprobs, cfg, seed,
                  progress=lambda order: track(order, desc="tuning steps", unit="step",
                                               total=len(order)),
                  micro=micro, layers=student.model.layers,
                  memory=int(psutil.virtual_memory().available * ACTIVATION_SHARE),
                  resume=resume, save=saved.save, save_every=SAVE_EVERY_SECONDS,
                  measuring=lambda batches: track(batches, desc="calibration KL",
                                                  unit="batch"))
    status(f"scale tuning: calibration KL {result.kl_start:.4f} -> {result.kl_tuned:.4f}")
    tuned = {f"{name}.weight_scale": lin.stored_scales() for name, lin in linears.items()}
    if cfg.norms:
        tuned.update({name: w.detach() for name, w in norms.items()})
    _write(files, dest, tuned, {"config": cfg.to_dict(), "base_model": base.name,
                                "calibration": calib.describe(), **result.to_dict()})
    saved.clear()
    return result


def state_dir(dest: Path) -> Path:
    """Where a tuning run writing `dest` keeps its progress."""
    return dest.with_name(dest.name + ".state")


class SavedState:
    """A tuning run's progress in `state_dir(dest)`: a safetensors file of its tensors and
    a JSON note naming it, written in that order, each atomically, so a kill at any
    moment leaves the previous save or this one. `identity` (what was tuned, against
    what, on which windows, how) must match for a save to be used."""

    NOTE = "state.json"

    def __init__(self, dest: Path, identity: dict):
        self.dir, self.identity = state_dir(dest), identity

    def load(self) -> TrainingState | None:
        from safetensors.torch import load_file

        try:
            note = json.loads((self.dir / self.NOTE).read_text())
        except (OSError, ValueError):
            return None
        if note.get("identity") != self.identity:
            status(f"note: the tuning progress saved in {self.dir} is for other settings; "
                   "starting over")
            return None
        try:
            tensors = load_file(self.dir / note["tensors"])
        except Exception:
            status(f"note: the tuning progress saved in {self.dir} is unreadable; "
                   "starting over")
            return None
        return TrainingState(note["step"], note["kl_start"], tensors, note["schedule"],
                             note.get("windows_per_forward", 0))

    def save(self, state: TrainingState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"state-{state.step:06d}.safetensors"
        checkpoint.atomic_save_safetensors(self.dir / name, state.tensors)
        checkpoint.atomic_write_json(self.dir / self.NOTE, {
            "identity": self.identity, "step": state.step, "kl_start": state.kl_start,
            "schedule": state.schedule, "windows_per_forward": state.micro,
            "tensors": name})
        for old in self.dir.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _calibration(files: models.ModelFiles, base: models.ModelFiles, path: str | Path | None,
                 samples: int | None, seqlen: int | None,
                 sampled: int | None) -> data.CalibrationSet:
    """The checkpoint's own calibration windows (its recipe's), as far as not overridden;
    sampled ones from `base`."""
    recorded = ((files.manifest or {}).get("recipe") or {}).get("calibration") or {}
    default = CalibrationConfig()
    c = CalibrationConfig(samples=samples or recorded.get("samples", default.samples),
                          seqlen=seqlen or recorded.get("seqlen", default.seqlen),
                          seed=recorded.get("seed", default.seed),
                          sampled=recorded.get("sampled", 0) if sampled is None else sampled)
    tokenizer = data.load_tokenizer(files.path, "scale tuning")
    calib = data.with_sampled(data.calibration_set(tokenizer, path, c.samples, c.seqlen,
                                                   c.seed), base, c.sampled, c.seed)
    used = ((files.manifest or {}).get("calibration") or {}).get("tokens_sha256")
    if used and used != calib.sha256 and path is None and samples is None and seqlen is None \
            and sampled is None:
        status("note: these calibration windows differ from the ones the checkpoint was "
               "quantised on (pass --calib FILE with the text it used)")
    return calib


def _tunable_linears(model: torch.nn.Module) -> dict[str, TunableScalesLinear]:
    """Swap every packed Linear of `model` for its trainable-scales form."""
    linears = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            parent, _, child = name.rpartition(".")
            tunable = TunableScalesLinear(module.quantized_weight, module.bias)
            setattr(model.get_submodule(parent) if parent else model, child, tunable)
            linears[name] = tunable
    return linears


def _norm_weights(model: torch.nn.Module, files: models.ModelFiles,
                  ) -> dict[str, torch.nn.Parameter]:
    """The RMSNorm weights, by the checkpoint tensor each is stored as."""
    stored = set(files.tensors.names())
    return {f"{name}.weight": module.weight for name, module in model.named_modules()
            if isinstance(module, RMSNorm) and f"{name}.weight" in stored}


def _teacher(teacher: torch.nn.Module, tokens: torch.Tensor, batch: int, top: int | None):
    """indices -> the teacher's targets on those windows (`ScaleTuningConfig.teacher_top`):
    its `top` most likely tokens per position, cached (`TopLogprobs`); or with top 0 its
    whole log-probabilities, cached where they fit `TEACHER_CACHE_BYTES`, else recomputed
    each time; None: the whole where it fits, else the `TEACHER_TOP` most likely."""
    whole = tokens.numel() * teacher.cfg.vocab_size * 2
    if top is None and whole > TEACHER_CACHE_BYTES:
        top = TEACHER_TOP
        status(f"teacher: its {top} most likely tokens per position (and the rest's total) "
               f"are kept, where its whole distribution would take {whole / 2**30:.1f} GiB "
               "(--teacher-top 0 keeps the whole, recomputed every step)")
    if top:
        with torch.no_grad():
            kept = TopLogprobs.cat([
                TopLogprobs.of(torch.log_softmax(teacher(part).float(), dim=-1), top)
                for part in track(tokens.split(batch), desc="teacher", unit="batch")])
        return lambda pick: kept[pick]
    if whole <= TEACHER_CACHE_BYTES:
        with torch.no_grad():
            cached = torch.cat([
                torch.log_softmax(teacher(part).float(), dim=-1).to(torch.bfloat16)
                for part in track(tokens.split(batch), desc="teacher", unit="batch")])
        return lambda pick: cached[pick]

    @torch.no_grad()
    def on_the_fly(pick: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(teacher(tokens[pick]).float(), dim=-1)

    return on_the_fly


def _write(files: models.ModelFiles, dest: Path, tuned: dict[str, torch.Tensor],
           note: dict) -> None:
    """The input checkpoint with `tuned`'s tensors replaced, its manifest updated and the
    note added, as directory `dest`."""
    shutil.rmtree(dest, ignore_errors=True)  # a killed run's
    dest.mkdir(parents=True)
    try:
        _fill(files, dest, tuned, note)
    except BaseException:  # Ctrl-C or a full disk: leave no half-written copy
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _fill(files: models.ModelFiles, partial: Path, tuned: dict[str, torch.Tensor],
          note: dict) -> None:
    from safetensors.torch import load_file

    manifest = json.loads((files.path / checkpoint.MANIFEST).read_text())
    listed = [n for n in manifest["files"] if n != NOTE]
    left = dict(tuned)
    for name in listed:
        source = files.path / name
        if name.endswith(".safetensors"):
            tensors = load_file(source)
            hits = [k for k in tensors if k in left]
            if hits:
                for k in hits:
                    tensors[k] = left.pop(k).to(tensors[k].dtype).contiguous()
                checkpoint.atomic_save_safetensors(partial / name, tensors)
                continue
        with checkpoint.writing(partial / name):
            shutil.copyfile(source, partial / name)
    if left:
        raise CompressError(f"{len(left)} tuned tensors (e.g. {next(iter(left))}) are in no "
                            f"shard of {files.path}; the checkpoint's index is inconsistent")
    checkpoint.atomic_write_json(partial / NOTE, note)
    manifest["scale_tuning"] = {k: note[k] for k in ("config", "kl_start", "kl_tuned")}
    manifest["files"] = checkpoint.file_entries(partial, [*listed, NOTE])
    checkpoint.atomic_write_json(partial / checkpoint.MANIFEST, manifest)
