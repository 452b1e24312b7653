"""The operations the CLI exposes, one public function each (the CLI only parses and prints)."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import compress
from compress import assets, data, distributed, evaluation, models, pipeline, quant, sources
from compress.calibrate import sensitivity
from compress.errors import CompressError
from compress.evals import DEFAULT_CTX, DEFAULT_MAX_TOKENS
from compress.evaluation import model_identity
from compress.formats import checkpoint, pickle_import
from compress.nn import kernel_backends
from compress.progress import on_interrupt, status
from compress.quant import QuantScheme, allocate
from compress.recipe import Override, Recipe
from compress.serving import bench, generation
from compress.serving.speculative import SpeculativeDecoder


@dataclass(frozen=True)
class QuantizeSummary:
    result: pipeline.QuantizeResult
    source_name: str
    evaluation: evaluation.EvalReport | None  # the checkpoint against its source
    eval_seconds: float
    group_fallbacks: dict[str, int]  # "128->64" -> number of Linears


def quantize(
    model: str | Path | None,
    recipe: Recipe,
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    calibration_data: str | Path | None = None,
    evaluate: bool = True,
    eval_tokens: int = DEFAULT_MAX_TOKENS,
    ctx: int = DEFAULT_CTX,
    target_bits: float | None = None,
    options: tuple[sensitivity.Option, ...] = sensitivity.DEFAULT_OPTIONS,
    allow_pickle: bool = False,
    device: str = "auto",
    save_activations: int = 1,
) -> QuantizeSummary:
    """Quantise, then (optionally) measure perplexity before and after on held-out text.

    `device`: where each layer calibrates (cpu, cuda[:i], auto). Under torchrun (or
    `compress quantize --workers N`) every process calls this: they calibrate together,
    rank 0 writes and evaluates; the others return a summary without evaluation.

    `target_bits`: choose each Linear's setting among `options` (mixed precision) so the
    average stored bits per weight stay within it; the recipe's scheme and overrides are
    replaced by that choice, which is written to the checkpoint as its recipe.yaml (plus
    allocation.json: the sensitivity table and the choice).

    `allow_pickle`: a model with only `pytorch_model.bin` weights is first converted to a
    safetensors copy in the cache with torch's weights-only loader.

    `save_activations`: save the inputs of every Nth layer for resuming (1: every layer,
    the default; 0: never), `pipeline.quantize`'s setting."""
    workers = distributed.init(device)
    try:
        return _quantize(model, recipe, out, overwrite, resume, calibration_data, evaluate,
                         eval_tokens, ctx, target_bits, options, allow_pickle, workers,
                         save_activations)
    finally:
        workers.close(together=False)  # no-op after the close that ends a run


def _quantize(model: str | Path | None, recipe: Recipe, out: str | Path | None, overwrite: bool,
              resume: bool, calibration_data: str | Path | None, evaluate: bool,
              eval_tokens: int, ctx_len: int, target_bits: float | None,
              options: tuple[sensitivity.Option, ...], allow_pickle: bool,
              workers: distributed.Context, save_activations: int = 1) -> QuantizeSummary:
    if allow_pickle:
        model = workers.decide(lambda: pickle_import.safetensors_copy(
            sources.resolve(model)[0], assets.cache_root()))
    files = models.open_model(model)
    out = Path(out) if out is not None else default_out_dir(files.name, recipe, target_bits)
    if evaluate:  # checked now: a checkpoint that cannot be evaluated is found out at the end
        data.load_tokenizer(files.path, "evaluating the checkpoint",
                            "pass --no-eval to quantise without evaluating")
    notes = None
    if recipe.rounding == "signround" and workers.world > 1:
        raise CompressError("--method signround learns each layer in one process; drop "
                            "--workers (or run without torchrun)")
    if recipe.tune is not None and workers.world > 1:
        # rank 0 would tune alone while the others wait in a collective with a timeout
        raise CompressError("--tune trains the finished checkpoint in one process; drop "
                            "--workers (or run without torchrun), then run compress tune "
                            "on the result")
    if target_bits is not None and workers.world > 1:
        raise CompressError("--target-bits measures sensitivity in one process; drop "
                            "--workers (or run without torchrun)")
    if target_bits is not None:
        pipeline.check_inputs(files, out, overwrite)  # before minutes of measuring
        recipe, allocation = allocated_recipe(files, recipe, target_bits, options,
                                              calibration_data)
        notes = {"allocation.json": allocation}
    plan = _plan(files.name, recipe, out, target_bits, eval_tokens if evaluate else None)
    result = pipeline.quantize(files, recipe, out, overwrite=overwrite, resume=resume,
                               calibration_data=calibration_data, notes=notes, announce=plan,
                               ctx=workers, save_activations=save_activations)
    workers.close()  # rank 0 evaluates alone; the others are done
    if not workers.leader:
        return QuantizeSummary(result, files.name, None, 0.0, {})
    packed = models.open_model(out)
    fallbacks: dict[str, int] = {}
    for name, scheme in packed.schemes.items():
        asked = recipe.scheme_for(name)
        if asked is not None and asked.group_size != scheme.group_size:
            key = f"{asked.group_size}->{scheme.group_size}"
            fallbacks[key] = fallbacks.get(key, 0) + 1
    report = None
    started = time.perf_counter()
    if evaluate:  # one pass of each model: both perplexities and the KL between them
        with on_interrupt(f"the checkpoint {out} is complete; its evaluation was cut short "
                          f"(`compress eval {out}` runs it)"):
            try:
                report = evaluation.evaluate(packed, files, ctx=ctx_len,
                                             max_tokens=eval_tokens)
            except CompressError as e:  # the user must know the checkpoint is there
                raise CompressError(f"the checkpoint {out} is complete, but evaluating it "
                                    f"failed: {e} (`compress eval {out}` runs it again)") \
                    from None
    return QuantizeSummary(result, files.name, report, time.perf_counter() - started,
                           fallbacks)


def _plan(name: str, recipe: Recipe, out: Path, target_bits: float | None,
          eval_tokens: int | None) -> str:
    """What `quantize` is about to do, said before it starts: a default run also evaluates
    the original and the quantised model, which takes most of its time."""
    setting = (f"{recipe.method}, mixed precision at {target_bits:g} bits/weight"
               if target_bits is not None else recipe.label)
    line = f"Quantising {name} ({setting}) into {out}"
    if eval_tokens is None:
        return line
    tokens = f"{eval_tokens:,}" if eval_tokens else "all"
    return (f"{line}, then evaluating the original and the quantised model on {tokens} "
            "held-out tokens (most of the run's time; --no-eval skips it)")


def default_out_dir(model_name: str, recipe: Recipe, target_bits: float | None = None) -> Path:
    if target_bits is not None:
        return Path("out") / f"{model_name}-{recipe.method}-mixed-{target_bits:g}b"
    return Path("out") / f"{model_name}-{recipe.label}"


def sensitivity_table(files: models.ModelFiles, options: tuple[sensitivity.Option, ...],
                      calibration_data: str | Path | None = None,
                      seed: int = 0) -> sensitivity.Sensitivity:
    """`sensitivity.measure` of a model on 16 x 256 calibration tokens, cached by the
    model's bytes, those tokens and the options."""
    calib = data.calibration_set(data.load_tokenizer(files.path), calibration_data,
                                 samples=16, seqlen=256, seed=seed)
    key = {"model": model_identity(files), "options": [o.label for o in options],
           "tokens": calib.sha256, "method": sensitivity.METHOD,
           "version": compress.__version__, "rounding_revision": quant.REVISION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    path = assets.cache_root() / "results" / "sensitivity" / f"{digest}.json"
    try:
        return sensitivity.Sensitivity(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        pass  # not measured yet, or a damaged cache entry: measure again
    status(f"Measuring each Linear's sensitivity to {len(options)} settings "
           "(one calibration pass; cached for later runs)")
    table = sensitivity.measure(files, calib, options)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_json(path, table.to_dict())
    return table


def check_target_bits(files: models.ModelFiles, target_bits: float,
                      options: tuple[sensitivity.Option, ...] = sensitivity.DEFAULT_OPTIONS
                      ) -> int:
    """Raises unless `options` can reach `target_bits` on this model (a check from shapes
    alone, so callers make it before any work); returns the decoder-layer weight count."""
    bits, _, weights_per = sensitivity.costs(files, options, files.linear_names())
    weights = sum(weights_per.values())
    cheapest = sum(min(b.values()) for b in bits.values()) / weights
    if cheapest > target_bits:
        raise CompressError(f"--target-bits {target_bits:g} is below the cheapest option "
                            f"set ({cheapest:.3f} bits/weight with "
                            f"{', '.join(o.label for o in options)})")
    return weights


def allocated_recipe(files: models.ModelFiles, base: Recipe, target_bits: float,
                     options: tuple[sensitivity.Option, ...] = sensitivity.DEFAULT_OPTIONS,
                     calibration_data: str | Path | None = None) -> tuple[Recipe, dict]:
    """`base` with every decoder-layer Linear's setting chosen for `target_bits` average
    stored bits per weight (codes and scales), and a record of how."""
    weights = check_target_bits(files, target_bits, options)
    table = sensitivity_table(files, options, calibration_data, base.calibration.seed)
    choice = allocate.allocate(table.losses, table.bits, target_bits * weights)
    counts = Counter(choice.values())
    common = sensitivity.Option.parse(counts.most_common(1)[0][0])
    scheme = QuantScheme(common.bits, common.group_size, base.scheme.symmetric)
    overrides = tuple(
        Override(name, QuantScheme(opt.bits, opt.group_size, base.scheme.symmetric))
        for name, label in choice.items() if label != common.label
        for opt in [sensitivity.Option.parse(label)])
    recipe = replace(base, scheme=scheme, overrides=overrides)
    achieved = sum(table.bits[n][label] for n, label in choice.items()) / weights
    return recipe, {
        "target_bits_per_weight": target_bits, "bits_per_weight": achieved,
        "estimated_kl": sum(table.losses[n][label] for n, label in choice.items()),
        "counts": dict(counts.most_common()), "choice": choice,
        "sensitivity": f"{sensitivity.METHOD} (compress/calibrate/sensitivity.py), KL on "
                       f"{table.tokens} calibration tokens; RTN rounding",
        "losses": table.losses,
    }


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    kernels: tuple[str, ...] = ()
    compile_seconds: float = 0.0  # compiling (--compile, --aot), not in prefill or decode_*
    compile_steps: int = 0  # decode steps that compiled (--compile), not in decode_*
    acceptance_rate: float | None = None  # speculative decoding: accepted / proposed

    @property
    def decode_tokens_per_second(self) -> float:
        # the first new token comes from the prefill
        steps = self.new_tokens - 1 - self.compile_steps
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


class Generation:
    """Streams new token ids from a packed (or dense) checkpoint and times the run."""

    def __init__(self, model: str | Path | None, prompt: str, params: generation.SamplingParams,
                 chat: bool = False, stop_at_eos: bool = True, device: str = "cpu",
                 compile: bool = False, draft: str | Path | None = None,
                 draft_tokens: int = 4, kv_int8: bool = False, aot: bool = False):
        self.model, files = models.load(model, device=device)
        self.compile, self.kv_int8, self.aot = compile, kv_int8, aot
        self.identity = files.identity() if aot else None
        self.speculative = None
        if draft is not None:
            if compile or kv_int8 or aot:
                raise CompressError("--draft runs eager with a float KV cache; drop --compile, "
                                    "--aot and --kv-cache int8")
            self.speculative = SpeculativeDecoder(self.model, models.load(draft, device)[0],
                                                  draft_tokens)
        self.tokenizer = data.load_tokenizer(files.path)
        self.prompt_ids = encode_prompt(self.tokenizer, prompt, chat)
        stops = eos_ids(self.tokenizer, files.path) if stop_at_eos else ()
        self.params = generation.SamplingParams(**{**params.__dict__, "stop_token_ids": stops})
        self.stats: GenerationStats | None = None

    def __iter__(self) -> Iterator[int]:
        compile_seconds = 0.0
        if self.aot:  # compiled before the first token, timed apart from prefill and decode
            started = time.perf_counter()
            generation.compile_ahead(self.model, len(self.prompt_ids),
                                     self.params.max_new_tokens, self.identity)
            compile_seconds = time.perf_counter() - started
        start = time.perf_counter()
        arrivals: list[float] = []
        if self.speculative is not None:
            tokens = self.speculative.generate(self.prompt_ids, self.params)
        else:
            tokens = generation.generate(self.model, self.prompt_ids, self.params, self.compile,
                                      kv_int8=self.kv_int8, aot=self.aot)
        for token in tokens:
            arrivals.append(time.perf_counter())
            if token in self.params.stop_token_ids:
                break
            yield token
        end = time.perf_counter()
        first_at = arrivals[0] if arrivals else end
        # with --compile, the 2 steps after the prefill compile: timed apart
        compiling = generation.COMPILING_STEPS if self.compile else 0
        compile_steps = max(min(compiling, len(arrivals) - 1), 0)
        steady_at = arrivals[compile_steps] if arrivals else end
        self.stats = GenerationStats(len(self.prompt_ids), len(arrivals), first_at - start,
                                     end - steady_at, tuple(kernel_backends(self.model)),
                                     compile_seconds + steady_at - first_at, compile_steps,
                                     None if self.speculative is None
                                     else self.speculative.stats.acceptance_rate)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise CompressError("this model's tokenizer has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return tokenizer(prompt).input_ids


def eos_ids(tokenizer, path: Path) -> tuple[int, ...]:
    """End-of-sequence ids from the tokenizer and generation_config.json."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = path / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(int(v) for v in (value if isinstance(value, list) else [value])
                   if v is not None)
    return tuple(sorted(ids))


@dataclass(frozen=True)
class BenchReport:
    model: str
    workload: bench.Workload
    results: list[bench.BatchResult]
    recommended: bench.BatchResult | None
    sla: dict
    kv_cache: str
    kernels: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"schema_version": 1, "model": self.model, "workload": asdict(self.workload),
                "kv_cache": self.kv_cache, "kernels": list(self.kernels), "sla": self.sla,
                "results": [r.to_dict() for r in self.results],
                "recommended_batch_size": (None if self.recommended is None
                                           else self.recommended.batch_size)}


def benchmark_serving(model: str | Path | None, workload: bench.Workload,
                      batch_sizes: tuple[int, ...] = bench.DEFAULT_BATCH_SIZES,
                      kv_budget_mb: float = 1024, kv_int8: bool = False,
                      sla_ttft_p95: float | None = None,
                      sla_tokens_per_s: float | None = None,
                      device: str = "cpu") -> BenchReport:
    """`compress bench`: serve the same request mix at each batch size (bench.py)."""
    net, files = models.load(model, device=device)
    text = data.text_tokens(data.load_tokenizer(files.path)).tokens
    results = bench.sweep(net, workload, text, batch_sizes, int(kv_budget_mb * 2**20), kv_int8)
    chosen = bench.recommend(results, sla_ttft_p95, sla_tokens_per_s)
    return BenchReport(str(files.path), workload, results, chosen,
                       {"ttft_p95_s": sla_ttft_p95, "tokens_per_s": sla_tokens_per_s},
                       "int8" if kv_int8 else "model", tuple(kernel_backends(net)))
