"""Our decoder: RoPE variants against transformers, sampling, limits, compiled decode steps.
(Every model type's logits, cache and greedy tokens: test_architectures.py.)"""

import pytest
import torch
from conftest import ARCH_CASES
from transformers import AutoModelForCausalLM

from compress import models
from compress.errors import CompressError
from compress.serving import generation

ARCHS = [
    ("llama", {"tie_word_embeddings": True, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
]


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type,overrides", ARCHS)
def test_logits_match_transformers(tiny_factory, model_type, overrides):
    path = tiny_factory(model_type, **overrides)
    ours, _ = models.load(path)
    ref = hf_model(path)
    tokens = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(tokens).logits
    got = ours(tokens)
    # Same float32 math in a different order (SDPA with GQA vs repeated KV heads).
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type,overrides", ARCHS)
def test_kv_cache_steps_equal_full_forward(tiny_factory, model_type, overrides):
    ours, _ = models.load(tiny_factory(model_type, **overrides))
    tokens = torch.randint(0, 49152, (1, 37), generator=torch.Generator().manual_seed(1))
    full = ours(tokens)
    cache = ours.new_cache(1, 37)
    pieces = [ours(tokens[:, :20], 0, cache), ours(tokens[:, 20:29], 20, cache)]
    pieces += [ours(tokens[:, i:i + 1], i, cache) for i in range(29, 37)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # every tiny model type's greedy tokens: test_architectures.py (fast)
def test_bundled_model_greedy_equals_transformers(bundled_dir):
    from compress.data import load_tokenizer

    tok = load_tokenizer(bundled_dir)
    ours, _ = models.load(bundled_dir)
    ref = hf_model(bundled_dir)
    for text in ["The capital of France is", "Once upon a time, a small robot"]:
        prompt = tok(text).input_ids
        got = list(generation.generate(ours, prompt, generation.SamplingParams(max_new_tokens=24)))
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
        assert got == expected[0, len(prompt):].tolist()


def test_sampling_is_seeded_and_filters_work(tiny_llama):
    ours, _ = models.load(tiny_llama)
    prompt = [3, 4, 5]

    def run(**kw):
        params = generation.SamplingParams(max_new_tokens=12, **kw)
        return list(generation.generate(ours, prompt, params))

    a, b = run(temperature=1.0, seed=5), run(temperature=1.0, seed=5)
    assert a == b
    assert run(temperature=1.0, seed=6) != a
    assert run(temperature=0.7, top_k=1, seed=1) == run()  # top-1 is greedy
    assert run(temperature=0.7, top_p=1e-6, seed=2) == run()  # tiny nucleus is greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = generation.SamplingParams(temperature=1.0, top_p=0.75)
    seen = {int(generation.sample(logits, params, torch.Generator().manual_seed(s)))
            for s in range(200)}
    assert seen == {0, 1}


def test_stops_at_stop_token(tiny_llama):
    ours, _ = models.load(tiny_llama)
    first = list(generation.generate(ours, [3, 4], generation.SamplingParams(max_new_tokens=5)))
    stopped = list(generation.generate(ours, [3, 4], generation.SamplingParams(
        max_new_tokens=5, stop_token_ids=(first[1],))))
    assert stopped == first[:2]


def test_too_long_request_is_a_clear_error(tiny_llama):
    from compress.errors import CompressError

    ours, _ = models.load(tiny_llama)
    with pytest.raises(CompressError, match="exceeds the model's 512 positions"):
        list(generation.generate(ours, [1] * 500, generation.SamplingParams(max_new_tokens=20)))


@pytest.fixture(params=["tiny", pytest.param("bundled", marks=pytest.mark.slow)])
def half_precision_dir(request, tmp_path):
    """A checkpoint stored in float16: the tiny Llama saved in half precision, or the real
    SmolLM2-135M (slow)."""
    if request.param == "bundled":
        return request.getfixturevalue("bundled_dir")
    import shutil

    from conftest import TOKENIZER_FILES

    tiny = request.getfixturevalue("tiny_llama")
    out = tmp_path / "tiny-fp16"
    AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float16).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tiny / name).is_file():
            shutil.copyfile(tiny / name, out / name)
    return out


def test_packed_model_on_cpu_keeps_a_half_precision_head(half_precision_dir, tmp_path):
    from compress import pipeline
    from compress.quant import QuantScheme
    from compress.recipe import Recipe

    model_dir = half_precision_dir
    out = tmp_path / "w8"
    pipeline.quantize(model_dir, Recipe("rtn", QuantScheme(8, -1, True)), out)
    fast, _ = models.load(out)
    exact, _ = models.load(out, head_dtype=torch.float32)
    assert fast.model.embed_tokens.weight.dtype == torch.float16 and fast.dtype == torch.float32
    tokens = torch.arange(200, 216)[None]
    with torch.inference_mode():
        a, b = fast(tokens), exact(tokens)
    assert a.dtype == torch.float32
    assert float((a - b).norm() / b.norm()) < 1e-2
    dense, _ = models.load(model_dir)  # dense checkpoints stay float32 throughout
    assert dense.model.embed_tokens.weight.dtype == torch.float32


# torch.compile of a tiny Llama's decode step by default; other families in the slow set.
@pytest.mark.parametrize("model_type", ["llama", *(pytest.param(t, marks=pytest.mark.slow)
                                                   for t in ("gemma2", "phi3"))])
def test_compiled_decode_gives_the_eager_tokens(tiny_factory, tmp_path, model_type):
    from compress import pipeline
    from compress.quant import QuantScheme
    from compress.recipe import Recipe

    out = tmp_path / "w4"
    overrides = ARCH_CASES.get(model_type, {})
    pipeline.quantize(tiny_factory(model_type, **overrides),
                      Recipe("rtn", QuantScheme(4, 32, True)), out)
    model, _ = models.load(out)
    params = generation.SamplingParams(max_new_tokens=12)
    eager = list(generation.generate(model, [1, 17, 400, 9], params))
    compiled = list(generation.generate(model, [1, 17, 400, 9], params, compile=True))
    assert compiled == eager
    again = list(generation.generate(model, [1, 17, 400, 9, 3], params, compile=True))
    assert again == list(generation.generate(model, [1, 17, 400, 9, 3], params))


@pytest.mark.slow
@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {}), ("qwen2", {}),  # qwen2: q/k/v biases
    ("mistral", {"sliding_window": 8}),  # decode past the window: a masked step
    # soft-capped attention, per-layer windows and RoPE, fused projections, q/k norms
    *((t, ARCH_CASES[t]) for t in ("gemma2", "gemma3_text", "phi3", "olmo2", "qwen3")),
])
def test_ahead_of_time_decode_gives_the_eager_tokens(tiny_factory, tmp_path, model_type,
                                                      overrides):
    from compress import pipeline
    from compress.quant import QuantScheme
    from compress.recipe import Recipe

    out = tmp_path / "w4"
    pipeline.quantize(tiny_factory(model_type, **overrides),
                      Recipe("rtn", QuantScheme(4, 32, False)), out)
    model, _ = models.load(out)
    params = generation.SamplingParams(max_new_tokens=12)
    for prompt in ([1, 17, 400, 9], [5, 6, 7]):
        eager = list(generation.generate(model, prompt, params))
        assert list(generation.generate(model, prompt, params, aot=True)) == eager
    assert len(model.__dict__["_aot_steps"]) == 1  # both runs fit one cache bucket


def test_ahead_of_time_decode_refuses_what_it_cannot_serve(tiny_llama):
    model, _ = models.load(tiny_llama)
    params = generation.SamplingParams(max_new_tokens=2)
    with pytest.raises(CompressError, match="choose one of --compile and --aot"):
        next(generation.generate(model, [1, 2], params, compile=True, aot=True))
    with pytest.raises(CompressError, match="drop --kv-cache int8"):
        next(generation.generate(model, [1, 2], params, kv_int8=True, aot=True))


def test_ahead_of_time_cache_lengths_come_in_buckets():
    from compress.serving import aot

    assert aot.cache_length(1, 8192) == aot.cache_length(aot.BUCKET, 8192) == aot.BUCKET
    assert aot.cache_length(aot.BUCKET + 1, 8192) == 2 * aot.BUCKET
    assert aot.cache_length(300, 299) == 300  # never past the model's positions + 1 spare
