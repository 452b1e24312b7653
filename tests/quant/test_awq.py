"""AWQ math: scale search, clipping search and the RTN helpers they use, on random inputs."""

import pytest
import torch

from compress.errors import CompressError
from compress.quant import QuantScheme, awq, rtn
from compress.quant.gptq import HessianAccumulator


def outlier_problem(seed: int, out: int = 64, k: int = 256, n: int = 4096):
    """Inputs where a few channels carry most of the magnitude, as in real LLM activations."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=gen)
    x[:, torch.randperm(k, generator=gen)[:8]] *= 20.0
    w = torch.randn(out, k, generator=gen) * 0.05
    acc, mag = HessianAccumulator(k), awq.InputMagnitude(k)
    for chunk in x.split(1000):
        acc.add(chunk)
        mag.add(chunk)
    return w, x, acc.hessian(), mag.mean()


def direct_error(w, w_hat, x):
    return float(((w - w_hat) @ x.T).pow(2).sum() / (w @ x.T).pow(2).sum())


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 128, True), (3, 64, False),
                                                       (4, -1, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_quantize_equals_packed_round_trip(bits, group_size, symmetric, dtype):
    w = torch.randn(24, 200, generator=torch.Generator().manual_seed(bits + group_size))
    scheme = QuantScheme(bits, group_size, symmetric)
    expected = rtn.quantize(w, scheme, dtype).dequantize()
    torch.testing.assert_close(rtn.fake_quantize(w, scheme, dtype), expected, rtol=0, atol=0)


def test_input_magnitude_streams_the_mean():
    x = torch.randn(1000, 32, generator=torch.Generator().manual_seed(1))
    mag = awq.InputMagnitude(32)
    for chunk in x.split(333):
        mag.add(chunk)
    torch.testing.assert_close(mag.mean(), x.abs().mean(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 64), (4, -1)])
def test_scales_lower_the_output_error_and_score_it_exactly(bits, group_size):
    w, x, h, mag = outlier_problem(bits * 10 + group_size)
    scheme = QuantScheme(bits, group_size, True)
    found = awq.search_scales([w], [scheme], h, mag)
    s = found.scales
    # The score is the true output error over every token (H-based), not an estimate.
    w_hat = rtn.fake_quantize(w * s, scheme) / s
    assert found.error == pytest.approx(direct_error(w, w_hat, x), rel=1e-3)
    assert found.error_unscaled == pytest.approx(
        direct_error(w, rtn.fake_quantize(w, scheme), x), rel=1e-3)
    # Outlier channels: scaling must help clearly, and protect the outliers.
    assert found.error < 0.9 * found.error_unscaled  # seen: 0.65 to 0.87 (W3 g64)
    assert found.alpha > 0 and s[mag.argsort()[-8:]].min() > s.median()


def test_scales_never_worse_than_plain_rtn_on_isotropic_inputs():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2048, 128, generator=gen)
    w = torch.randn(32, 128, generator=gen)
    h = 2 * x.T @ x / x.shape[0]
    found = awq.search_scales([w], [QuantScheme(4, 32, True)], h, x.abs().mean(0))
    assert found.error <= found.error_unscaled


def test_group_search_covers_every_member_and_skips_dense_ones():
    w, x, h, mag = outlier_problem(7)
    gen = torch.Generator().manual_seed(8)
    other = torch.randn(16, w.shape[1], generator=gen) * 0.3
    scheme = QuantScheme(4, 64, False)
    both = awq.search_scales([w, other], [scheme, scheme], h, mag, awq.AWQConfig(grid=10))
    s = both.scales
    err = sum(float(((m - rtn.fake_quantize(m * s, scheme) / s) @ x.T).pow(2).sum())
              for m in (w, other))
    total = sum(float((m @ x.T).pow(2).sum()) for m in (w, other))
    assert both.error == pytest.approx(err / total, rel=1e-3)
    dense = awq.search_scales([w, other], [scheme, None], h, mag, awq.AWQConfig(grid=10))
    assert dense.error <= dense.error_unscaled  # only w is rounded; other is exact


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 64, True), (3, 32, False),
                                                       (4, -1, True)])
def test_clip_search_lowers_each_groups_output_error(bits, group_size, symmetric):
    w, x, h, _ = outlier_problem(bits + group_size)
    w[:, 5] *= 8  # a weight outlier: its group gains from a narrower range
    scheme = QuantScheme(bits, group_size, symmetric)
    clipped, mean_shrink = awq.search_clip(w, scheme, h)
    size = w.shape[1] if group_size == -1 else group_size
    assert clipped.shape == w.shape and 0.5 <= mean_shrink < 1
    assert (clipped.abs() <= w.abs() + 1e-7).all()  # clamping only
    for g in range(0, w.shape[1], size):
        block = h[g:g + size, g:g + size]
        before = awq.output_error(
            (w - rtn.fake_quantize(w, scheme))[:, g:g + size], block)
        after = awq.output_error(
            (w - rtn.fake_quantize(clipped, scheme))[:, g:g + size], block)
        assert (after <= before * (1 + 1e-5) + 1e-9).all()
    # and overall, on the real inputs
    assert direct_error(w, rtn.fake_quantize(clipped, scheme), x) < direct_error(
        w, rtn.fake_quantize(w, scheme), x)


def test_ranked_candidates_are_scored_best_first_with_plain_rtn_among_them():
    w, x, h, mag = outlier_problem(5)
    scheme = QuantScheme(3, 64, True)
    ranked = awq.rank_scales([w], [scheme], h, mag, awq.AWQConfig(grid=8))
    errors = [c.error for c in ranked]
    assert errors == sorted(errors) and len(ranked) == 2 * 8  # alphas x {plain, duo}
    assert ranked[0].error == awq.search_scales([w], [scheme], h, mag,
                                                awq.AWQConfig(grid=8)).error
    plain = [c for c in ranked if c.unscaled]
    assert len(plain) == 1 and torch.equal(plain[0].scales, torch.ones_like(mag))
    assert plain[0].error == plain[0].error_unscaled
    for c in ranked[:3]:  # each error is that candidate's true output error
        w_hat = rtn.fake_quantize(w * c.scales, scheme) / c.scales
        assert c.error == pytest.approx(direct_error(w, w_hat, x), rel=1e-3)


@pytest.mark.parametrize("kwargs,message", [
    ({"grid": 0}, "AWQ grid must be a positive integer"),
    ({"rescore": -1}, "AWQ rescore must be an integer >= 0"),
    ({"rescore_samples": 0}, "AWQ rescore_samples must be a positive integer"),
    ({"max_shrink": 1.5}, r"AWQ max_shrink must be in \(0, 1\]"),
    ({"clip": "yes"}, "AWQ clip must be true or false"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(CompressError, match=message):
        awq.AWQConfig(**kwargs)
