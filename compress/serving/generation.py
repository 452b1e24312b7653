"""Token generation from our decoder: sampling, the cached decode loop, compiled steps."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from compress.errors import CompressError, first_line
from compress.models import CausalLM


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise CompressError("max new tokens must be at least 1")
        if self.temperature < 0:
            raise CompressError("temperature must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise CompressError("top-k must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise CompressError("top-p must be in (0, 1]")


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab)."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = sampling_probs(logits, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution (B, vocab) that sampling with `params` (temperature > 0) draws from:
    temperature, then top-k, then top-p."""
    logits = logits.to(torch.float32) / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop tokens once the mass before them already reaches top_p (always keep one).
        drop = probs.cumsum(-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def compiled_step(model: CausalLM) -> Callable[..., torch.Tensor]:
    """`model` compiled by torch.compile for decode steps, built once per model.

    On CPU a decode step of a small model is mostly the dispatch of ~60 small torch ops
    per layer from Python; compiled, they become a few fused C++ loops around the matmul
    ops. The first step compiles (about a minute on 2 cores; inductor caches it on disk
    for later runs) and the second recompiles once with a symbolic position.
    """
    step = model.__dict__.get("_compiled_step")  # not a submodule: keep it out of modules()
    if step is None:
        step = torch.compile(model, dynamic=None)
        model.__dict__["_compiled_step"] = step
    return step


COMPILING_STEPS = 2  # the first decode step compiles, the second recompiles (symbolic pos)


def _compiled_call(step, *args, steady: bool) -> torch.Tensor:
    """One call of a `compiled_step`.

    `steady` calls (the same cache and shapes as a guarded call just before, only the
    symbolic position moving on) evaluate only the guards that tell compiled entries
    apart: checking every guard over the ~1,000 tensors of a packed model's kernels is a
    noticeable share of a small model's step.
    """
    if steady:
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return step(*args)
        except RuntimeError as e:
            # Entries compiled for another model in this process share the code's cache,
            # and the few guards checked may then match none: check them all (recompile)
            if "Recompilation triggered" not in str(e):
                raise
    try:
        with warnings.catch_warnings():  # inductor's notes on dtype mixing are not for users
            warnings.simplefilter("ignore", UserWarning)
            return step(*args)
    except Exception as e:  # compiler failures surface as many types, deep inside inductor
        raise CompressError(f"torch.compile failed ({type(e).__name__}: "
                            f"{first_line(e)[:200]}); it "
                            "needs a working C++ compiler on CPU; run without --compile") from e


@torch.inference_mode()
def generate(model: CausalLM, prompt: list[int], params: SamplingParams,
             compile: bool = False, kv_int8: bool = False, aot: bool = False
             ) -> Iterator[int]:
    """Yield new tokens one at a time (prefill once, then one cached step per token).

    `compile` runs the decode steps through `compiled_step`, `aot` through a step compiled
    ahead of time (compress.aot; compiled before the first token, so that its status line
    and wait come before any streamed text); the prefill stays eager. `kv_int8` keeps the
    KV cache in int8 (see KVCache)."""
    if compile and aot:
        raise CompressError("choose one of --compile and --aot")
    if aot and kv_int8:
        raise CompressError("--aot serves a float KV cache; drop --kv-cache int8")
    if aot and model.cfg.has_experts:
        raise CompressError("--aot cannot export a mixture-of-experts model's routing (which "
                            "experts run depends on the token); use --compile")
    if not prompt:
        raise CompressError("the prompt is empty; give at least one token of text")
    total = len(prompt) + params.max_new_tokens
    if total > model.cfg.max_positions:
        raise CompressError(f"prompt ({len(prompt)}) + max new tokens "
                            f"({params.max_new_tokens}) exceeds the model's "
                            f"{model.cfg.max_positions} positions")
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(params.seed)
    cache = model.new_cache(1, _cache_length(model, total, aot), quantized=kv_int8)
    if aot:
        from compress.serving import aot as ahead_of_time

        step = ahead_of_time.compiled_step(model, cache)
    else:
        step = compiled_step(model) if compile else model
    tokens = torch.tensor([prompt], device=model.device)
    logits = model(tokens, 0, cache, last_only=True)[:, -1]
    pos = len(prompt)
    for i in range(params.max_new_tokens):
        token = sample(logits, params, generator)
        yield int(token)
        if int(token) in params.stop_token_ids:
            return
        if aot:
            logits = step(token.view(1, 1), pos, cache)[:, -1]
        elif compile:
            logits = _compiled_call(step, token.view(1, 1), pos, cache,
                                    steady=i >= COMPILING_STEPS)[:, -1]
        else:
            logits = step(token.view(1, 1), pos, cache)[:, -1]
        pos += 1


def _cache_length(model: CausalLM, positions: int, aot: bool) -> int:
    # One spare position: the cache is never read in full, which would be a contiguous
    # slice, a new guard, and a third compile on the last step.
    if not aot:
        return positions + 1
    from compress.serving import aot as ahead_of_time

    return ahead_of_time.cache_length(positions + 1, model.cfg.max_positions)


def compile_ahead(model: CausalLM, prompt_tokens: int, max_new_tokens: int,
                  identity: str | None = None) -> None:
    """Compile now (or load from disk, see `aot.compiled_step`'s `identity`) the `--aot`
    decode step that `generate` will use for this many positions (kept on the model), so
    that the compile can be timed apart."""
    from compress.serving import aot as ahead_of_time

    length = _cache_length(model, prompt_tokens + max_new_tokens, aot=True)
    ahead_of_time.compiled_step(model, model.new_cache(1, length), identity)


@torch.inference_mode()
def sample_windows(model: CausalLM, prompts: torch.Tensor, length: int,
                   seed: int | torch.Generator, batch: int = 16) -> torch.Tensor:
    """(n, length) token ids: each row of `prompts` (n, p) continued to `length` tokens by
    sampling from `model`'s own next-token distribution (temperature 1, no filters), so
    that the text is what the model expects, weighted as it weighs it. `batch` rows
    decode together, one cached step per token. `seed` may be a generator on the model's
    device, drawn from and left advanced, so that a caller can go on where an earlier
    call stopped."""
    n, given = prompts.shape
    if not 0 < given < length:
        raise CompressError(f"a sampled window needs a prompt of 1 to {length - 1} tokens, "
                            f"got {given}")
    if length > model.cfg.max_positions:
        raise CompressError(f"sampled windows of {length} tokens exceed the model's "
                            f"{model.cfg.max_positions} positions; lower --calib-seqlen")
    generator = seed if isinstance(seed, torch.Generator) else (
        torch.Generator(device=model.device).manual_seed(seed))
    params = SamplingParams(temperature=1.0)
    rows = []
    for first in range(0, n, batch):
        tokens = prompts[first:first + batch].to(model.device)
        cache = model.new_cache(tokens.shape[0], length)
        logits = model(tokens, 0, cache, last_only=True)[:, -1]
        drawn = [tokens]
        for pos in range(given, length):
            token = sample(logits, params, generator).unsqueeze(-1)
            drawn.append(token)
            if pos + 1 < length:
                logits = model(token, pos, cache)[:, -1]
        rows.append(torch.cat(drawn, 1).cpu())
    return torch.cat(rows)
