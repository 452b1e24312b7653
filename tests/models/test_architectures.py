"""Every supported model type against transformers' own implementation of it.

Each case is a tiny random checkpoint made with transformers' config and model classes
(`conftest.ARCH_CASES`): our dense forward gives its logits, our KV cache its greedy
tokens, every method quantises it, and transformers' load of our packed checkpoint gives
our packed logits. Sequences run past every sliding window.
"""

import json

import pytest
import torch
from conftest import ARCH_CASES, exact_load
from transformers import AutoModelForCausalLM

from compress import models, pipeline
from compress.calibrate import awq
from compress.errors import CompressError
from compress.quant import QuantScheme
from compress.recipe import CalibrationConfig, Recipe
from compress.serving import generation

TOKENS = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
CALIB = CalibrationConfig(samples=8, seqlen=64, seed=0)


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_every_model_type_has_a_tiny_case():
    assert sorted(ARCH_CASES) == models.supported_model_types()


def test_dense_logits_match_transformers(tiny_arch):
    _, path = tiny_arch
    ours, _ = models.load(path)
    with torch.no_grad():
        expected = hf_model(path)(TOKENS).logits
        got = ours(TOKENS)
    # Same float32 math in a different order (SDPA with GQA vs repeated KV heads).
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_kv_cache_steps_equal_the_full_forward(tiny_arch):
    ours, _ = models.load(tiny_arch[1])
    tokens = TOKENS[:1, :37]
    with torch.no_grad():
        full = ours(tokens)
        cache = ours.new_cache(1, 37)
        pieces = [ours(tokens[:, :20], 0, cache), ours(tokens[:, 20:29], 20, cache)]
        pieces += [ours(tokens[:, i:i + 1], i, cache) for i in range(29, 37)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_equal_transformers_generate(tiny_arch):
    _, path = tiny_arch
    ours, _ = models.load(path)
    prompt = [5, 17, 923, 4021, 77]
    got = list(generation.generate(ours, prompt, generation.SamplingParams(max_new_tokens=32)))
    expected = hf_model(path).generate(torch.tensor([prompt]), max_new_tokens=32,
                                       do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got == expected[0, len(prompt):].tolist()




@pytest.mark.parametrize("model_type", ARCH_CASES)
def test_folding_random_scales_leaves_the_function_unchanged(tiny_factory, model_type):
    """AWQ folds into every producer the table names, (1 + w) norms, fused rows and a
    sparse MLP's router included; a fold that cannot be exact is refused, never
    approximated."""
    path = tiny_factory(model_type, **ARCH_CASES[model_type])
    model, files = models.load(path, dtype=torch.float32)
    with torch.no_grad():
        before = model(TOKENS)
    gen = torch.Generator().manual_seed(2)
    folded, refused, folds = 0, 0, 0
    for i, layer in enumerate(model.model.layers):
        for fold in files.layer_folds(i):
            folds += 1
            linears = [layer.get_submodule(n) for n in fold.group]
            if awq._fold_problem(layer, fold, linears[0].in_features):
                refused += 1
                continue
            s = torch.rand(linears[0].in_features, generator=gen) * 4 + 0.25
            awq._fold(layer, fold, linears, s, torch.float32)
            folded += 1
    # grouped-query attention (2 of 4 heads) is the only refusal: v -> o
    assert refused == len(model.model.layers) and folded == folds - refused
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", [
    "rtn", "gptq", pytest.param("awq", marks=pytest.mark.slow),
    pytest.param("awq+gptq", marks=pytest.mark.slow)])
def test_each_method_quantises_and_transformers_loads_it(tiny_arch, tmp_path, method,
                                                         exact_kernels):
    _, path = tiny_arch
    out = tmp_path / "q"
    recipe = Recipe(method, QuantScheme(4, 32, True), calibration=CALIB)
    result = pipeline.quantize(path, recipe, out)
    files = models.open_model(out)
    assert sorted(files.schemes) == sorted(files.linear_names())  # every layer Linear
    assert result.quantized_modules == len(files.linear_names())
    if method != "rtn":
        log = json.loads((out / pipeline.QUANT_LOG).read_text())["modules"]
        assert sorted(log) == sorted(files.linear_names())
    ours = exact_load(out)
    with torch.no_grad():
        got = ours(TOKENS)
        theirs = hf_model(out)(TOKENS).logits
    # Both dequantise (q - z) * s exactly in float32 and run the same float32 graph.
    torch.testing.assert_close(got, theirs, rtol=1e-4, atol=1e-4)


def test_unknown_architecture_names_the_supported_ones_and_the_guide(tiny_llama, tmp_path):
    import shutil

    other = tmp_path / "gpt"
    shutil.copytree(tiny_llama, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(CompressError) as raised:
        models.open_model(other)
    message = str(raised.value)
    assert "unsupported architecture 'gpt_neox'" in message and "\n" not in message
    assert "gemma3_text" in message and "docs/architectures.md" in message


def test_table_groups_cover_every_linear_once():
    for arch in models.ARCHITECTURES:
        names = arch.layer_linears
        assert len(names) == len(set(names))
        for fold in arch.scale_folds:
            assert fold.group in arch.linear_groups
            assert fold.part is None or fold.producer in (*arch.qkv, *arch.gate_up)


def test_fused_value_rows_fold_without_grouped_query_attention(tiny_factory):
    """Phi-3's v rows of qkv_proj take the o_proj fold when every head has its own KV."""
    from conftest import ARCH_CASES

    model, files = models.load(tiny_factory("phi3", **{**ARCH_CASES["phi3"],
                                                       "num_key_value_heads": 4}))
    with torch.no_grad():
        before = model(TOKENS)
    layer = model.model.layers[0]
    fold = next(f for f in files.arch.scale_folds if f.part == "v")
    o_proj = layer.get_submodule(fold.group[0])
    assert awq._fold_problem(layer, fold, o_proj.in_features) is None
    s = torch.rand(o_proj.in_features, generator=torch.Generator().manual_seed(3)) * 4 + 0.25
    awq._fold(layer, fold, [o_proj], s, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), before, rtol=1e-4, atol=1e-4)
