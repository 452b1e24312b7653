"""Perplexity: our harness equals a direct transformers computation; windows follow the protocol."""

import math

import pytest
import torch
from compress.evals import distribution, perplexity
from transformers import AutoModelForCausalLM

from compress import data, evaluation, models, pipeline
from compress.errors import CompressError
from compress.quant import QuantScheme
from compress.recipe import Recipe


def test_windows_are_non_overlapping_from_the_start():
    tokens = torch.arange(1000)
    w = data.eval_windows(tokens, 100, 450)
    assert w.tokens.shape == (4, 100) and torch.equal(w.tokens.flatten(), torch.arange(400))
    assert w.scored == 4 * 99 and w.stride is None
    with_bos = data.eval_windows(tokens, 100, None, bos_id=7).tokens
    assert with_bos.shape == (10, 100) and torch.all(with_bos[:, 0] == 7)
    assert torch.equal(with_bos[1, 1:], torch.arange(99, 198))
    with pytest.raises(CompressError, match="fewer than one"):
        data.eval_windows(torch.arange(10), 100, None)


def test_perplexity_matches_transformers(tiny_or_bundled):
    kind, model_dir = tiny_or_bundled
    tokenizer = data.load_tokenizer(model_dir)
    text = data.text_tokens(tokenizer)
    windows = data.eval_windows(text.tokens, 512, 1024)
    ours = perplexity(models.load(model_dir)[0], windows)

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nlls = []
    with torch.no_grad():
        for window in windows.tokens:
            nlls.append(ref(window[None], labels=window[None]).loss * (window.numel() - 1))
    expected = math.exp(float(sum(nlls)) / (len(windows) * 511))
    assert ours.tokens == 2 * 511
    assert abs(ours.ppl / expected - 1) < 1e-4
    if kind == "bundled":
        assert 30 < ours.ppl < 60  # SmolLM2-135M on LAMBADA passages: 44.8 over 16k tokens


def test_quantisation_costs_quality_in_order_on_the_tiny_model(tiny_llama, tmp_path):
    """The cheap counterpart of the next test: on random weights perplexity sits near the
    vocabulary size whatever the bits (W2 included), so the order is in KL from the base
    model; W8 keeps the perplexity."""
    files = models.open_model(tiny_llama)
    text = evaluation.held_out(files, None, 64, 512)
    reference = distribution.reference(models.load(tiny_llama)[0], text.windows)
    match = {}
    for bits, group_size in [(8, -1), (4, 128), (2, 64)]:
        out = tmp_path / f"w{bits}"
        pipeline.quantize(tiny_llama, Recipe("rtn", QuantScheme(bits, group_size, True)), out)
        match[bits] = distribution.compare(models.load(out)[0], text.windows, reference)
    assert 0 < match[8].kl_mean < match[4].kl_mean < match[2].kl_mean
    assert match[8].top1_agreement > match[4].top1_agreement > match[2].top1_agreement
    assert abs(match[8].ppl / match[8].baseline_ppl - 1) < 0.02


@pytest.mark.slow
def test_quantisation_costs_perplexity_in_order(bundled_dir, tmp_path):
    """W8 is near lossless, W4 costs a little, W2 destroys the model (2 windows each)."""
    results = {}
    for bits, group_size in [(8, -1), (4, 128), (2, 64)]:
        out = tmp_path / f"w{bits}"
        pipeline.quantize(bundled_dir, Recipe("rtn", QuantScheme(bits, group_size, True)), out)
        results[bits] = evaluation.evaluate_perplexity(out, max_tokens=1024, use_cache=False).ppl
    base = evaluation.evaluate_perplexity(bundled_dir, max_tokens=1024, use_cache=False).ppl
    assert abs(results[8] / base - 1) < 0.02
    assert base * 1.05 < results[4] < base * 1.6
    assert results[2] > base * 10


def test_results_are_cached_by_model_bytes(tiny_llama, tmp_path, monkeypatch):
    from compress import assets

    monkeypatch.setattr(assets, "cache_root", lambda: tmp_path / "cache")
    text = tmp_path / "t.txt"
    text.write_text("Some words to score, again and again. " * 40)
    first = evaluation.evaluate_perplexity(tiny_llama, text, ctx=32, max_tokens=128)
    assert len(list((tmp_path / "cache/results/ppl").glob("*.json"))) == 1
    again = evaluation.evaluate_perplexity(tiny_llama, text, ctx=32, max_tokens=128)
    assert again == first
    evaluation.evaluate_perplexity(tiny_llama, text, ctx=16, max_tokens=128)
    assert len(list((tmp_path / "cache/results/ppl").glob("*.json"))) == 2
