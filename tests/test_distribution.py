"""Distribution match: KL of a model against itself is 0; the stored-reference estimate
agrees with the full-vocabulary KL; references are cached and reused."""

import pytest
import torch
import torch.nn.functional as F
from compress.evals import distribution
from compress.evals.perplexity import scored_logits

from compress import assets, evaluation, models, pipeline
from compress.quant import QuantScheme
from compress.recipe import Recipe


@pytest.fixture(scope="module")
def bundled_text(bundled_dir):
    return evaluation.held_out(models.open_model(bundled_dir), None, 512, 1024)


@pytest.fixture(scope="module")
def bundled_w4(bundled_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "w4"
    pipeline.quantize(bundled_dir, Recipe("rtn", QuantScheme(4, 128, True)), out)
    return out


def test_a_model_against_itself_has_zero_kl(tiny_llama):
    files = models.open_model(tiny_llama)
    text = evaluation.held_out(files, None, 64, 512)
    model = models.load(tiny_llama)[0]
    match = distribution.compare(model, text.windows, distribution.reference(model,
                                                                             text.windows))
    assert match.kl_mean == 0 and match.kl_max == 0 and match.top1_agreement == 1.0
    assert match.ppl == pytest.approx(match.baseline_ppl, rel=1e-9)
    assert match.tokens == text.windows.scored


@pytest.mark.slow
def test_estimate_matches_the_full_vocabulary_kl(bundled_dir, bundled_w4, bundled_text):
    base, quant = models.load(bundled_dir)[0], models.load(bundled_w4)[0]
    full = torch.cat([
        (p.exp() * (p - q)).sum(-1) for (lp, _), (lq, _) in zip(
            scored_logits(base, bundled_text.windows), scored_logits(quant, bundled_text.windows),
            strict=True)
        for p, q in [(F.log_softmax(lp, -1), F.log_softmax(lq, -1))]])
    match = distribution.compare(quant, bundled_text.windows,
                                 distribution.reference(base, bundled_text.windows))
    # measured: mean within 0.2%, 99th percentile within 2% (module doc); a few tenths of
    # a percent of sampling noise either way on 1,022 tokens
    assert match.kl_mean == pytest.approx(float(full.mean()), rel=0.02)
    assert match.kl_p99 == pytest.approx(float(torch.quantile(full, 0.99)), rel=0.05)
    assert 0.5 < match.top1_agreement < 0.95  # W4 g128 RTN on a 135M model: ~60%


def test_references_are_cached_and_reused(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "cache_root", lambda: tmp_path / "cache")
    files = models.open_model(tiny_llama)
    text = evaluation.held_out(files, None, 64, 256)
    first = evaluation.baseline_reference(files, text)
    stored = list((tmp_path / "cache/results/reference").glob("*.safetensors"))
    assert len(stored) == 1
    monkeypatch.setattr(distribution, "reference", lambda *a, **k: pytest.fail("recomputed"))
    again = evaluation.baseline_reference(files, text)
    for name, tensor in first.tensors().items():
        assert torch.equal(tensor, again.tensors()[name]), name
