"""`compress eval`: how much quality a checkpoint lost against its baseline, with cached
intermediate results so that evaluating many variants of one model costs one baseline run.

Three kinds of evidence, all on the same held-out windows or tasks for both models:
perplexity, the next-token distribution match (KL, top-1 agreement; see
compress.evals.distribution) and lm-eval task scores. With a baseline, each model runs
once over the windows: the baseline's pass records its reference distributions and its
perplexity, the checkpoint's pass gives the KL and its own perplexity. Results are cached
on disk under `cache_root()/results/` by the model's bytes (`model_identity`), the text's
hash, the window settings, the kernels that would serve, and the library version.

Models arrive opened (`ModelFiles`): a command opens each once and hands it on.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import compress
from compress import assets, data, kernels, models
from compress.errors import CompressError
from compress.evals import (
    DEFAULT_CTX,
    DEFAULT_MAX_TOKENS,
    DistributionMatch,
    PerplexityResult,
    Reference,
    distribution,
    perplexity,
)
from compress.evals.perplexity import result_from_nll
from compress.formats import checkpoint
from compress.progress import status

SCHEMA_VERSION = 1


def model_identity(files: models.ModelFiles) -> str:
    """A key that changes whenever the model's bytes may have changed."""
    if files.manifest is not None:  # our checkpoints: the verified sha256 of every file
        payload = json.dumps(files.manifest["files"], sort_keys=True)
    else:
        stats = {}
        for name in ["config.json", *files.tensors.files()]:
            st = (files.path / name).stat()
            stats[name] = (st.st_size, st.st_mtime_ns)
        payload = json.dumps([str(files.path.resolve()), stats], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _kernels_key() -> dict:
    # the fast kernels round activations: their numbers differ in the 4th digit, so which
    # kernels would serve is part of every key
    return {"kernel": kernels.dispatch.requested() or "auto",
            "native_cpu": kernels.native.unavailable() is None,
            "dense_dtype": str(kernels.cpu.dense_dtype())}


def _cache_file(kind: str, key: dict, suffix: str = ".json") -> Path:
    digest = hashlib.sha256(json.dumps({**key, "version": compress.__version__},
                                       sort_keys=True).encode()).hexdigest()
    return assets.cache_root() / "results" / kind / f"{digest}{suffix}"


def _cached_json(kind: str, key: dict, compute: Callable[[], dict], use_cache: bool) -> dict:
    path = _cache_file(kind, key)
    if use_cache and path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_json(path, value)
    return value


@dataclass(frozen=True)
class HeldOut:
    """The evaluation windows of one text under one tokenizer."""

    windows: data.EvalWindows
    text_sha256: str
    bos: int | None

    def key(self) -> dict:
        return {"text": self.text_sha256, "ctx": self.windows.ctx,
                "stride": self.windows.stride, "windows": len(self.windows), "bos": self.bos}


def held_out(files: models.ModelFiles, text_file: str | Path | None, ctx: int,
             max_tokens: int | None, stride: int | None = None) -> HeldOut:
    tokenizer = data.load_tokenizer(files.path)
    text = data.text_tokens(tokenizer, text_file)
    bos = tokenizer.bos_token_id if data.adds_bos(tokenizer) else None
    return HeldOut(data.eval_windows(text.tokens, ctx, max_tokens, bos, stride), text.sha256,
                   bos)


def evaluate_perplexity(
    model: models.ModelFiles | str | Path | None,
    text_file: str | Path | None = None,
    ctx: int = DEFAULT_CTX,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    use_cache: bool = True,
    stride: int | None = None,
) -> PerplexityResult:
    """Token perplexity of `model` on held-out text (bundled LAMBADA unless `text_file`),
    cached by model bytes, text hash, window settings, kernels and library version."""
    files = models.open_model(model)
    return perplexity_on(files, held_out(files, text_file, ctx, max_tokens, stride), use_cache)


class _ThroughKVCache(torch.nn.Module):
    """The model reading every window's keys and values back from a KV cache of the given
    kind, as decoding would: how the eval harness prices an INT8 cache."""

    def __init__(self, model: models.CausalLM, quantized: bool):
        super().__init__()
        self.model, self.quantized = model, quantized

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self.model.new_cache(tokens.shape[0], tokens.shape[1], self.quantized)
        return self.model(tokens, 0, cache)


def _served(files: models.ModelFiles, kv_cache: str) -> torch.nn.Module:
    model = models.build(files)
    return model if kv_cache == "model" else _ThroughKVCache(model, kv_cache == "int8")


def perplexity_on(files: models.ModelFiles, text: HeldOut, use_cache: bool = True,
                  kv_cache: str = "model") -> PerplexityResult:
    def compute() -> dict:
        status(f"Perplexity of {files.name}: {len(text.windows)} windows of "
               f"{text.windows.ctx} tokens")
        return perplexity(_served(files, kv_cache), text.windows, text.text_sha256).to_dict()

    key = {"model": model_identity(files), **text.key(), **_kernels_key(),
           **({} if kv_cache == "model" else {"kv_cache": kv_cache})}
    return PerplexityResult(**_cached_json("ppl", key, compute, use_cache))


def baseline_reference(files: models.ModelFiles, text: HeldOut,
                       use_cache: bool = True) -> Reference:
    """The baseline's top-k next-token distributions on `text` (computed once, cached)."""
    key = {"model": model_identity(files), **text.key(), **_kernels_key(),
           "topk": distribution.REFERENCE_TOPK, "tail": distribution.TAIL_SAMPLES}
    path = _cache_file("reference", key, ".safetensors")
    if use_cache and path.is_file():
        from safetensors.torch import load_file
        return Reference.from_tensors(load_file(path))
    status(f"Baseline {files.name}: next-token distributions over {len(text.windows)} "
           f"windows of {text.windows.ctx} tokens (cached for later runs)")
    ref = distribution.reference(models.build(files), text.windows)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_save_safetensors(path, ref.tensors())
    return ref


def task_scores(files: models.ModelFiles, tasks: list[str], limit: int | None,
                num_fewshot: int | None, batch_size: int,
                use_cache: bool = True) -> dict[str, dict[str, float]]:
    """lm-eval task -> metric -> value for one model, each task cached on its own."""
    from compress.evals import harness

    scores = {}
    for task in harness.resolve_tasks(tasks):
        key = {"model": model_identity(files), "task": task, "limit": limit,
               "num_fewshot": num_fewshot, **_kernels_key()}

        def compute(task=task) -> dict:
            status(f"lm-eval {task} on {files.name}"
                   + (f" (first {limit} documents)" if limit else ""))
            return harness.run_tasks(files.path, [task], limit, batch_size, num_fewshot)[task]
        scores[task] = _cached_json("tasks", key, compute, use_cache)
    return scores


@dataclass(frozen=True)
class EvalReport:
    model: str
    baseline: str | None
    ppl: PerplexityResult
    baseline_ppl: PerplexityResult | None = None
    match: DistributionMatch | None = None
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    baseline_tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """The `--json` document (schema versioned; keys documented in docs/evaluation.md)."""
        m = self.match
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "baseline": self.baseline,
            "ppl": self.ppl.ppl,
            "baseline_ppl": None if self.baseline_ppl is None else self.baseline_ppl.ppl,
            "delta_ppl": (None if self.baseline_ppl is None
                          else self.ppl.ppl - self.baseline_ppl.ppl),
            "kl_mean": None if m is None else m.kl_mean,
            "kl_p99": None if m is None else m.kl_p99,
            "kl_max": None if m is None else m.kl_max,
            "top1_agreement": None if m is None else m.top1_agreement,
            "tokens": self.ppl.tokens,
            "windows": self.ppl.windows,
            "ctx": self.ppl.ctx,
            "stride": self.ppl.stride,
            "text_sha256": self.ppl.text_sha256,
            "kl_topk": None if m is None else m.topk,
            "kl_tail_samples": None if m is None else m.tail_samples,
            "tasks": {task: {"quantised": scores, "baseline": self.baseline_tasks.get(task)}
                      for task, scores in self.tasks.items()},
            "seconds": self.seconds,
            "compress_version": compress.__version__,
        }


def resolve_baseline(files: models.ModelFiles, baseline: models.ModelFiles | str | Path | None
                     ) -> models.ModelFiles | None:
    """The baseline to compare against, opened: `auto` is the base model the checkpoint
    records (none for a model that is not one of our checkpoints), `none` skips it."""
    if baseline is None or str(baseline) == "none":
        return None
    if isinstance(baseline, models.ModelFiles) or str(baseline) != "auto":
        return models.open_model(baseline)
    base = (files.manifest or {}).get("base_model")
    if not base:
        return None
    if Path(base["path"]).is_dir():
        return models.open_model(base["path"])
    try:
        return models.open_model(base["name"])  # a bundled model, re-prepared
    except CompressError:
        # repr: the path comes from the manifest and may hold a newline (one-line errors)
        raise CompressError(f"the checkpoint's base model {base['path']!r} is gone; pass "
                            "--baseline DIR, or --baseline none") from None


def evaluate(model: models.ModelFiles | str | Path | None,
             baseline: models.ModelFiles | str | Path | None = "auto",
             text_file: str | Path | None = None, ctx: int = DEFAULT_CTX,
             max_tokens: int | None = DEFAULT_MAX_TOKENS, stride: int | None = None,
             ppl_only: bool = False, tasks: list[str] | None = None,
             limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
             use_cache: bool = True, kv_cache: str = "model") -> EvalReport:
    """Everything `compress eval` reports for `model` against `baseline` (opened models,
    or what `models.open_model` takes; `baseline` also "auto" or "none").

    `kv_cache="int8"` evaluates `model` reading its keys and values back from an INT8
    cache (the baseline keeps the float cache): with `baseline=model`, the KL is the
    cost of the INT8 cache alone. Tasks always run with the float cache."""
    if kv_cache not in ("model", "int8"):
        raise CompressError(f"KV cache {kv_cache!r} is not supported; use model or int8")
    from compress.evals import harness

    started = time.perf_counter()
    files = models.open_model(model)
    if tasks and not ppl_only:  # refuse a bad task list before any long work
        tasks = harness.resolve_tasks(tasks)
        harness.check_task_data()
    base_files = None if ppl_only else resolve_baseline(files, baseline)
    text = held_out(files, text_file, ctx, max_tokens, stride)
    if base_files is None:
        ppl, base_ppl, match = perplexity_on(files, text, use_cache, kv_cache), None, None
    else:
        base_text = held_out(base_files, text_file, ctx, max_tokens, stride)
        if not (base_text.windows.tokens.shape == text.windows.tokens.shape
                and bool((base_text.windows.tokens == text.windows.tokens).all())):
            raise CompressError(f"{files.name} and its baseline {base_files.name} tokenise the "
                                "text differently; compare models that share a tokenizer")
        match = distribution_match(files, base_files, text, use_cache, kv_cache)
        ppl = result_from_nll(match.nll, match.tokens, text.windows, text.text_sha256)
        base_ppl = result_from_nll(math.log(match.baseline_ppl), match.tokens, text.windows,
                                   text.text_sha256)
    scores, base_scores = {}, {}
    if tasks and not ppl_only:
        scores = task_scores(files, tasks, limit, num_fewshot, batch_size, use_cache)
        if base_files is not None:
            base_scores = task_scores(base_files, tasks, limit, num_fewshot, batch_size,
                                      use_cache)
    return EvalReport(files.name if model is None else str(getattr(model, "path", model)),
                      None if base_files is None else str(base_files.path), ppl, base_ppl,
                      match, scores, base_scores, time.perf_counter() - started)


def distribution_match(files: models.ModelFiles, base_files: models.ModelFiles, text: HeldOut,
                       use_cache: bool = True, kv_cache: str = "model") -> DistributionMatch:
    """KL, top-1 agreement and both perplexities: one pass of the baseline (its reference,
    cached) and one of the model."""
    key = {"model": model_identity(files), "baseline": model_identity(base_files),
           **text.key(), **_kernels_key(), "topk": distribution.REFERENCE_TOPK,
           "tail": distribution.TAIL_SAMPLES,
           **({} if kv_cache == "model" else {"kv_cache": kv_cache})}

    def compare() -> dict:
        ref = baseline_reference(base_files, text, use_cache)
        status(f"Distribution match of {files.name} against {base_files.name}: "
               f"{len(text.windows)} windows of {text.windows.ctx} tokens")
        return distribution.compare(_served(files, kv_cache), text.windows, ref).to_dict()
    return DistributionMatch(**_cached_json("match", key, compare, use_cache))
