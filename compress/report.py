"""`compress report`: the grid of quantise -> eval -> bench, as one table, one plot and one
recommendation.

Every cell (method x bits x group size x rotation, mixed-precision cells at average bit
budgets, and the unquantised baseline) is quantised into
`<out>/checkpoints/<label>`, evaluated against the baseline (compress.evaluation, whose
results cache also serves here) and timed in a fresh process (prefill and batch-1 decode
tokens/s, peak memory). A finished cell is written to `<out>/cells/<label>.json` with
the settings that produced it; a later run with the same settings reuses it, so a killed
report resumes and a report with one more method runs only the new cells.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import compress
from compress import data, evaluation, model_card, models, pipeline, quant
from compress.errors import CompressError
from compress.formats import checkpoint
from compress.nn import kernel_backends
from compress.progress import raise_if_interrupted, status
from compress.quant import QuantScheme
from compress.quant.rotate import ROTATIONS, RotationConfig
from compress.quant.scale_tuning import ScaleTuningConfig
from compress.quant.signround import SignRoundConfig
from compress.recipe import CALIBRATED_METHODS, METHODS, CalibrationConfig, Recipe
from compress.serving import generation

BASELINE = "baseline"


@dataclass(frozen=True)
class Cell:
    """One variant: a uniform scheme (bits, group size), or with `target_bits` a mixed
    allocation (`quantize --target-bits`) among the default options; `rotate`: rotations
    folded in first (`quantize --rotate`). `signround` and `calibration`: the settings of
    the methods that use them (learned rounding; the calibrated methods)."""

    method: str
    bits: int | None = None
    group_size: int | None = None
    target_bits: float | None = None
    rotate: RotationConfig = field(default_factory=RotationConfig)
    signround: SignRoundConfig = field(default_factory=SignRoundConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    # the finished checkpoint's scales tuned end to end (`quantize --tune`); None: not
    tune: ScaleTuningConfig | None = None

    @property
    def label(self) -> str:
        """`gptq-w4g128`, `gptq-mixed3.5b`; rotated: `gptq-w4g128-hadamard`, the suffix
        `quantize --rotate` gives its output directory (Recipe.label)."""
        if self.target_bits is not None:
            base = f"{self.method}-mixed{self.target_bits:g}b"
        else:
            base = f"{self.method}-w{self.bits}" + (
                "-channel" if self.group_size == -1 else f"g{self.group_size}")
        return (base + (f"-{self.rotate.kind}" if self.rotate.enabled else "")
                + ("-tuned" if self.tune is not None else ""))

    def _base_recipe(self) -> Recipe:
        return Recipe(self.method, rotate=self.rotate, signround=self.signround,
                      calibration=self.calibration, tune=self.tune)

    def key(self) -> dict:
        """What the cell's result depends on: its place in the grid and, of the recipe
        sections it uses, those not at their defaults (a rotation; signround's settings
        for signround; the calibration size for the calibrated methods). A setting a cell
        does not use leaves its cached result valid, and a cell at the defaults keeps the
        key it had before the report could change them (a change of what the defaults
        compute is `compress.quant.REVISION`, in every cell's cache key)."""
        sections = self._base_recipe().to_dict()
        defaults = Recipe(self.method).to_dict()
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                "target_bits": self.target_bits,
                **{k: sections[k] for k in KEYED_SECTIONS
                   if k in sections and sections[k] != defaults.get(k)}}

    def recipe(self, base: models.ModelFiles) -> tuple[Recipe, dict | None]:
        """The recipe to quantise with, and (mixed) the allocation record to keep with it."""
        if self.target_bits is None:
            return replace(self._base_recipe(),
                           scheme=QuantScheme(self.bits, self.group_size, True)), None
        from compress import api  # api drives report's CLI peers; import on use

        recipe, allocation = api.allocated_recipe(base, self._base_recipe(), self.target_bits)
        return recipe, {"allocation.json": allocation}


KEYED_SECTIONS = ("rotate", "signround", "calibration", "tune")  # the recipe sections a Cell sets


@dataclass(frozen=True)
class Settings:
    """What every cell is measured with (part of each cell's cache key)."""

    eval_tokens: int = 16384
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    prompt_tokens: int = 256
    decode_tokens: int = 64


@dataclass
class Budget:
    max_kl: float | None = None
    max_dppl: float | None = None
    price_per_hour: float | None = None

    def allows(self, row: dict) -> bool:
        return ((self.max_kl is None or row["kl_mean"] <= self.max_kl)
                and (self.max_dppl is None or row["delta_ppl"] <= self.max_dppl))


@dataclass
class Report:
    model: str
    rows: list[dict]  # baseline first, then the cells in grid order
    recommended: dict | None
    budget: Budget
    settings: Settings
    seconds: float
    reused: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"schema_version": 1, "model": self.model, "settings": asdict(self.settings),
                "budget": asdict(self.budget), "rows": self.rows,
                "recommended": None if self.recommended is None else self.recommended["label"],
                "seconds": self.seconds, "reused_cells": self.reused,
                "compress_version": compress.__version__}


def grid(methods: list[str], bits: list[int], group_sizes: list[int],
         rotations: list[RotationConfig] | None = None, *,
         signround: SignRoundConfig | None = None,
         calibration: CalibrationConfig | None = None,
         tunings: list[ScaleTuningConfig | None] | None = None) -> list[Cell]:
    """Every method x bits x group size x rotation x tuning, the variants of one setting
    side by side (`rtn-w4g128`, `rtn-w4g128-hadamard`, `rtn-w4g128-tuned`)."""
    _check_methods(methods)
    extra = _method_settings(signround, calibration)
    return [Cell(m, b, g, rotate=r, tune=t, **extra)
            for m in methods for b in bits for g in group_sizes
            for r in rotations or [RotationConfig()] for t in tunings or [None]]


def mixed_cells(methods: list[str], target_bits: list[float],
                rotations: list[RotationConfig] | None = None, *,
                signround: SignRoundConfig | None = None,
                calibration: CalibrationConfig | None = None,
                tunings: list[ScaleTuningConfig | None] | None = None) -> list[Cell]:
    """Mixed-precision cells: each method at each average bits/weight (and rotation and
    tuning)."""
    _check_methods(methods)
    extra = _method_settings(signround, calibration)
    return [Cell(m, target_bits=t, rotate=r, tune=tuned, **extra)
            for m in methods for t in target_bits for r in rotations or [RotationConfig()]
            for tuned in tunings or [None]]


def _method_settings(signround: SignRoundConfig | None,
                     calibration: CalibrationConfig | None) -> dict:
    return {"signround": signround or SignRoundConfig(),
            "calibration": calibration or CalibrationConfig()}


def tunings(kinds: list[str], epochs: int = 2) -> list[ScaleTuningConfig | None]:
    """The tuning axis: `none` (as quantised) and `tuned` (`quantize --tune`)."""
    axis = {"none": None, "tuned": ScaleTuningConfig(epochs=epochs)}
    for kind in kinds:
        if kind not in axis:
            raise CompressError(f"unknown tuning {kind!r}; available: none, tuned")
    return [axis[kind] for kind in dict.fromkeys(kinds)]


def rotations(kinds: list[str], seed: int = 0) -> list[RotationConfig]:
    """The rotation axis from its kinds (`none`: not rotated), every one with `seed`."""
    for kind in kinds:
        if kind not in ROTATIONS:
            raise CompressError(f"unknown rotation {kind!r}; available: {', '.join(ROTATIONS)}")
    return [RotationConfig(kind, seed) for kind in dict.fromkeys(kinds)]


def _check_methods(methods: list[str]) -> None:
    for m in methods:
        if m not in METHODS:
            raise CompressError(f"unknown method {m!r}; available: {', '.join(METHODS)}")


def run(model: str | Path | None, cells: list[Cell], out: str | Path,
        settings: Settings = Settings(), budget: Budget | None = None) -> Report:
    budget = budget or Budget()
    started = time.perf_counter()
    out = Path(out)
    base = models.open_model(model)
    if base.is_quantized:
        raise CompressError(f"{base.path} is already quantised; report on the original model")
    data.load_tokenizer(base.path, "evaluating each cell")  # before the first cell's work
    if any(c.target_bits is not None for c in cells):
        from compress import api  # as in Cell.recipe

        for target in sorted({c.target_bits for c in cells if c.target_bits is not None}):
            api.check_target_bits(base, target)
    rows, reused = [], []
    for label, cell in [(BASELINE, None), *((c.label, c) for c in cells)]:
        raise_if_interrupted()  # see progress.catch_ctrl_c
        key = _cell_key(base, cell, settings)
        cached = out / "cells" / f"{label}.json"
        if cached.is_file():
            previous = json.loads(cached.read_text())
            if previous.get("key") == key:
                rows.append(previous["row"])
                reused.append(label)
                continue
        status(f"report: {label}")
        row = _measure(base, cell, out, settings)
        cached.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_json(cached, {"key": key, "row": row})
        rows.append(row)
    for row in rows:
        row["cost_per_1m_tokens"] = (None if budget.price_per_hour is None or
                                     not row["decode_tok_s"] else
                                     budget.price_per_hour / 3600 / row["decode_tok_s"] * 1e6)
    candidates = [r for r in rows[1:] if budget.allows(r)]
    # cheapest to serve: the most decode tokens per second (cost per token is price / speed),
    # then the smallest checkpoint
    recommended = max(candidates, key=lambda r: (r["decode_tok_s"], -r["checkpoint_bytes"]),
                      default=None)
    report = Report(base.name, rows, recommended, budget, settings,
                    time.perf_counter() - started, reused)
    write(report, out)
    return report


def _cell_key(base: models.ModelFiles, cell: Cell | None, settings: Settings) -> str:
    payload = {"model": evaluation.model_identity(base),
               "cell": None if cell is None else cell.key(),
               "settings": asdict(settings), "version": compress.__version__,
               "rounding_revision": quant.REVISION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _measure(base: models.ModelFiles, cell: Cell | None, out: Path,
             settings: Settings) -> dict:
    started = time.perf_counter()
    if cell is None:
        files, quantise_s = base, 0.0
    else:
        path = out / "checkpoints" / cell.label
        recipe, notes = cell.recipe(base)
        files = _complete_checkpoint(path, recipe)
        if files is None:
            pipeline.quantize(base, recipe, path, overwrite=path.exists(), notes=notes)
            files = models.open_model(path)
        quantise_s = time.perf_counter() - started
    path = files.path
    started = time.perf_counter()
    tasks = list(settings.tasks) or None
    ev = evaluation.evaluate(files, base if cell is not None else "none",
                             max_tokens=settings.eval_tokens, tasks=tasks,
                             limit=settings.limit)
    eval_s = time.perf_counter() - started
    started = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        speed = pool.submit(_speed, str(path), settings.prompt_tokens,
                            settings.decode_tokens).result()
    size = sum((path / f).stat().st_size for f in files.tensors.files())
    quantised_bits, quantised_weights = _quantised_bits(files)
    m = ev.match
    return {
        "label": BASELINE if cell is None else cell.label,
        "method": None if cell is None else cell.method,
        "bits": None if cell is None else cell.bits,
        "group_size": None if cell is None else cell.group_size,
        "target_bits": None if cell is None else cell.target_bits,
        # what the manifest records: kind, seed, and per rotation its size and construction
        # (or why the residual stream was not rotated)
        "rotation": (files.manifest or {}).get("rotation") if cell is not None else None,
        "signround": (cell.signround.to_dict() if cell is not None
                      and cell.method == "signround" else None),
        "calibration": (cell.calibration.to_dict() if cell is not None
                        and (cell.method in CALIBRATED_METHODS or cell.tune is not None)
                        else None),
        # the settings and the calibration KL before and after (`quantize --tune`)
        "tuning": (files.manifest or {}).get("scale_tuning") if cell is not None else None,
        "bits_per_weight": (quantised_bits / quantised_weights if quantised_weights
                            else 8 * files.dtype.itemsize),
        "checkpoint_bytes": size,
        "ppl": ev.ppl.ppl,
        "baseline_ppl": ev.baseline_ppl.ppl if ev.baseline_ppl else ev.ppl.ppl,
        "delta_ppl": ev.ppl.ppl - (ev.baseline_ppl.ppl if ev.baseline_ppl else ev.ppl.ppl),
        "kl_mean": m.kl_mean if m else 0.0,
        "kl_p99": m.kl_p99 if m else 0.0,
        "top1_agreement": m.top1_agreement if m else 1.0,
        "tasks": {t.removeprefix("compress_"): s.get("acc", s.get("exact_match"))
                  for t, s in ev.tasks.items()},
        "eval_tokens": ev.ppl.tokens,
        **speed,
        "quantise_seconds": quantise_s, "eval_seconds": eval_s,
        "speed_seconds": time.perf_counter() - started,
    }


def _complete_checkpoint(path: Path, recipe: Recipe) -> models.ModelFiles | None:
    """The finished checkpoint of `recipe` at `path`, opened, or None (a killed
    quantisation leaves only `<path>.partial`, which pipeline.quantize resumes)."""
    try:
        files = models.open_model(path)
    except CompressError:
        return None
    return files if (files.manifest or {}).get("recipe") == recipe.to_dict() else None


def _quantised_bits(files: models.ModelFiles) -> tuple[int, int]:
    """Stored bits of the quantised Linears (codes, scales, zeros, shapes) and their
    weights."""
    bits = weights = 0
    for name in files.schemes:
        out_f, in_f = files.linear_shape(name)
        weights += out_f * in_f
        bits += 8 * sum(files.tensors.nbytes(t) for t in files.tensors.with_prefix(name + "."))
    return bits, weights


class _PeakMemory:
    """This process's peak resident memory from now on. A spawned child starts with its
    parent's high-water mark (Linux copies it at fork, and getrusage keeps it across
    exec), so the mark is reset through /proc/self/clear_refs where allowed; elsewhere
    the peak is the largest of the samples taken."""

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.kernel_mark = True
        except OSError:
            self.kernel_mark = False
        self.sampled = 0
        self.sample()

    def sample(self) -> None:
        import psutil

        self.sampled = max(self.sampled, psutil.Process().memory_info().rss)

    def peak(self) -> int:
        self.sample()
        if self.kernel_mark:
            status_lines = Path("/proc/self/status").read_text().splitlines()
            hwm = next((int(line.split()[1]) * 1024 for line in status_lines
                        if line.startswith("VmHWM:")), 0)
            return max(hwm, self.sampled)
        return self.sampled


def _speed(path: str, prompt_tokens: int, decode_tokens: int) -> dict:
    """Prefill and batch-1 decode tokens/s (best of two), and the peak memory of serving
    it. Runs in a fresh process, so the peak is the model's own."""
    import torch

    from compress.progress import set_quiet

    set_quiet(True)
    memory = _PeakMemory()
    model, files = models.load(path)
    text = data.text_tokens(data.load_tokenizer(files.path)).tokens
    prompt = text[:prompt_tokens].tolist()
    params = generation.SamplingParams(max_new_tokens=decode_tokens)
    prefill = decode = 0.0
    with torch.inference_mode():
        for _ in range(2):
            start = time.perf_counter()
            model(torch.tensor([prompt]), last_only=True)
            prefill = max(prefill, len(prompt) / (time.perf_counter() - start))
            gen = generation.generate(model, prompt[:32], params)
            next(gen)
            start = time.perf_counter()
            steps = sum(1 for _ in gen)
            decode = max(decode, steps / (time.perf_counter() - start))
            memory.sample()
    return {"prefill_tok_s": prefill, "decode_tok_s": decode,
            "peak_rss_bytes": memory.peak(), "kernels": kernel_backends(model)}


def write(report: Report, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_json(out / "results.json", report.to_dict())
    plot(report, out / "pareto.png")
    checkpoint.atomic_write_bytes(out / "report.md", markdown(report).encode())


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(report: Report) -> str:
    s = report.settings
    task_names = sorted({t for r in report.rows for t in r["tasks"]})
    head = ["variant", "bits/weight", "size MB", "Δppl", "KL mean", "top-1",
            *[f"{t} acc" for t in task_names], "decode tok/s", "prefill tok/s", "peak MB",
            "$ / 1M tokens"]
    lines = [f"# Quality vs cost: {report.model}", "",
             f"Perplexity and KL on {report.rows[0]['eval_tokens']:,} held-out tokens "
             f"(512-token windows) against the unquantised model; decode = batch 1, "
             f"{s.decode_tokens} new tokens; prefill = one {s.prompt_tokens}-token prompt; "
             "peak = resident memory of a process serving the model"
             + (f"; tasks on their first {s.limit} documents" if s.limit else "") + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.rows:
        cells = [r["label"], _fmt(r["bits_per_weight"], ".2f"),
                 _fmt(r["checkpoint_bytes"] / 1e6, ".1f"), _fmt(r["delta_ppl"], "+.3f"),
                 _fmt(r["kl_mean"], ".4f"), _fmt(r["top1_agreement"], ".1%"),
                 *[_fmt(r["tasks"].get(t), ".3f") for t in task_names],
                 _fmt(r["decode_tok_s"], ".1f"), _fmt(r["prefill_tok_s"], ".0f"),
                 _fmt(r["peak_rss_bytes"] / 1e6, ".0f"), _fmt(r.get("cost_per_1m_tokens"), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    for note in _variant_notes(report.rows):
        lines += ["", note]
    b = report.budget
    limits = ", ".join(f"{k} ≤ {v}" for k, v in (("KL", b.max_kl), ("Δppl", b.max_dppl))
                       if v is not None) or "no quality budget given"
    rec = report.recommended
    lines += ["", ("**Recommended:** " + (
        f"`{rec['label']}` — the fastest (cheapest) to serve within {limits}: "
        f"{rec['decode_tok_s']:.1f} tok/s, {rec['checkpoint_bytes'] / 1e6:.1f} MB, "
        f"KL {rec['kl_mean']:.4f}, Δppl {rec['delta_ppl']:+.3f}." if rec else
        f"no variant meets {limits}.")), "", "![quality vs cost](pareto.png)", "",
        f"Report time {report.seconds:.0f} s"
        + (f" (reused cells: {', '.join(report.reused)})" if report.reused else "") + "."]
    return "\n".join(lines) + "\n"


def _variant_notes(rows: list[dict]) -> list[str]:
    """What the rotated and learned-rounding rows did beyond their label's method and
    scheme, from the settings each row records."""
    notes = []
    rotated = [r["rotation"] for r in rows if r.get("rotation")]
    for kind in dict.fromkeys(r["kind"] for r in rotated):
        these = [r for r in rotated if r["kind"] == kind]
        seeds = ", ".join(str(s) for s in sorted({r["seed"] for r in these}))
        residual = these[0]["residual"]
        where = ("the residual stream and each attention head's values" if "skipped" not in
                 residual else f"each attention head's values only ({residual['skipped']})")
        notes.append(f"`-{kind}`: seeded randomised {kind.capitalize()} rotations folded into "
                     f"the weights before quantising (`quantize --rotate`, seed {seeds}): "
                     f"{where}.")
    for settings in dict.fromkeys(json.dumps(r["signround"], sort_keys=True) for r in rows
                                  if r.get("signround")):
        s = json.loads(settings)
        lr = "1/iters" if s["lr"] is None else f"{s['lr']:g}"
        notes.append(f"`signround`: learned rounding, {s['iters']} signed-gradient steps per "
                     f"decoder layer on {s['batch']} calibration samples each, step size {lr} "
                     f"decaying to 0, against {model_card.TARGET_WORDS[s.get('target', 'layer')]}"
                     + (", starting from GPTQ's result." if s.get("start") == "gptq" else "."))
    for settings in dict.fromkeys(json.dumps(r["tuning"]["config"], sort_keys=True)
                                  for r in rows if r.get("tuning")):
        s = json.loads(settings)
        what = "scales and norms" if s["norms"] else "scales"
        notes.append(f"`-tuned`: the finished checkpoint's {what} tuned end to end "
                     f"against the unquantised model's next-token distribution "
                     f"(`quantize --tune`): {s['epochs']} epochs of Adam at {s['lr']:g} over "
                     f"the calibration windows, {s['batch']} per step.")
    return notes


def pareto_front(points: list[tuple[float, float]], smaller_x_better: bool) -> list[int]:
    """Indices of points no other point beats in both coordinates (lower y is better)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x if smaller_x_better else x2 >= x) and y2 <= y and (x2, y2) != (x, y)
            for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _series(row: dict) -> str:
    """The plot's colour: the method, and its rotation ("gptq", "gptq + hadamard")."""
    rotation = row.get("rotation")
    return row["method"] + (f" + {rotation['kind']}" if rotation else "")


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.rows
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(sorted(
        {_series(r) for r in rows if r["method"]}))}
    kl = [max(r["kl_mean"], 0.0) for r in rows]
    floor = min([k for k in kl if k > 0] or [1e-4]) / 3
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    panels = ((axes[0], [r["checkpoint_bytes"] / 1e6 for r in rows], "checkpoint size (MB)",
               True), (axes[1], [r["decode_tok_s"] for r in rows],
                       "decode speed, batch 1 (tokens/s)", False))
    for ax, xs, xlabel, smaller_better in panels:
        ys = [k if k > 0 else floor for k in kl]
        front = pareto_front(list(zip(xs, ys, strict=True)), smaller_better)
        order = sorted(front, key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [ys[i] for i in order], "--", color="grey",
                label="Pareto front", zorder=1)
        for i, r in enumerate(rows):
            if r["label"] == BASELINE:
                ax.scatter(xs[i], ys[i], marker="*", s=260, color="black", zorder=3,
                           label=f"unquantised (KL 0, drawn at {floor:.0e})")
                continue
            mixed = r.get("target_bits") is not None
            ax.scatter(xs[i], ys[i], s=70, color=colours[_series(r)], zorder=2,
                       marker="D" if mixed else "o",
                       edgecolors="red" if i in front else "none", linewidths=1.5,
                       label=_series(r) + (" mixed precision" if mixed else ""))
            ax.annotate(r["label"].split("-", 1)[1], (xs[i], ys[i]), fontsize=8,
                        textcoords="offset points", xytext=(5, 4))
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("KL(unquantised ‖ quantised), nats/token (lower is better)")
        ax.grid(alpha=0.3, which="both")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    axes[0].set_title("quality loss vs size")
    axes[1].set_title("quality loss vs speed")
    fig.suptitle(f"{report.model}: quality vs cost (red edge: on the Pareto front)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)

