"""GPTQ: the blocked algorithm equals a plain column-by-column oracle, and beats RTN."""

import pytest
import torch

from compress.errors import CompressError
from compress.quant import QuantScheme, gptq, rtn


def correlated_inputs(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Tokens x features with strongly correlated, unevenly scaled features (like activations)."""
    mix = torch.randn(k, k, generator=gen) / k**0.5
    scale = torch.logspace(-1, 1, k)[torch.randperm(k, generator=gen)]
    return (torch.randn(n, k, generator=gen) @ mix + 0.3 * torch.randn(n, k, generator=gen)) * scale


def oracle_gptq(w, h, scheme, damp=0.01, act_order=False):
    """Column by column with immediate updates of every later column: the paper's loop."""
    w, h = w.clone().double(), h.clone().double()
    k = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    group = k if scheme.group_size == -1 else scheme.group_size
    q_all = torch.zeros_like(w)
    for j in range(k):
        if j % group == 0:
            s, z = rtn.qparams(w[:, j:j + group].float(), scheme.bits, scheme.symmetric,
                               torch.float16)
        q = rtn.quantize_codes(w[:, j].float(), s, z, scheme.bits)
        deq = rtn.dequantize_codes(q, s, z, scheme.bits).double()
        q_all[:, j] = deq
        err = (w[:, j] - deq) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
    return q_all[:, torch.argsort(perm)].float()


def problem(seed, out=48, k=256, n=2048):
    gen = torch.Generator().manual_seed(seed)
    x = correlated_inputs(n, k, gen)
    acc = gptq.HessianAccumulator(k)
    for chunk in x.split(300):  # streaming in uneven chunks
        acc.add(chunk)
    return torch.randn(out, k, generator=gen) * 0.05, acc.hessian(), x


def test_streaming_hessian_equals_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 64, generator=gen)
    acc = gptq.HessianAccumulator(64)
    for chunk in x.split(137):
        acc.add(chunk)
    torch.testing.assert_close(acc.hessian(), 2 * x.T @ x / 1000, rtol=1e-5, atol=1e-5)
    assert acc.n == 1000


@pytest.mark.parametrize("bits,group_size,symmetric,act_order", [
    (4, 32, True, False), (4, 64, False, False), (3, 128, True, False), (8, -1, True, False),
    (4, 64, True, True), (2, -1, False, False),
])
def test_blocked_equals_column_by_column_oracle(bits, group_size, symmetric, act_order):
    w, h, _ = problem(bits * 7 + group_size)
    scheme = QuantScheme(bits, group_size, symmetric)
    # blocks != groups on purpose; the oracle lets groups follow the act-order permutation
    cfg = gptq.GPTQConfig(block_size=48, act_order=act_order, static_groups=False)
    got = gptq.quantize_layer(w, h, scheme, cfg).weight.dequantize()
    expected = oracle_gptq(w, h, scheme, act_order=act_order)
    # Same algorithm, different float32 summation order (lazy block updates): a code may
    # flip on a near-tie, and the error feedback then carries the flip along the rest of
    # that row. Tolerance: at most 2 of the 48 rows differ, each weight by one step at most.
    differ = (got - expected).abs() > 1e-6
    assert differ.any(dim=1).sum() <= 2
    step = got.abs().max() / (1 << (bits - 1))
    assert (got - expected).abs().max() <= step * 1.01


@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 128), (4, -1), (8, -1)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_output_error_beats_rtn(bits, group_size, symmetric):
    w, h, x = problem(100 + bits + group_size)
    scheme = QuantScheme(bits, group_size, symmetric)
    ours = gptq.quantize_layer(w, h, scheme).weight.dequantize()
    base = rtn.quantize(w, scheme).dequantize()
    err_gptq = ((w - ours) @ x.T).norm()
    err_rtn = ((w - base) @ x.T).norm()
    assert err_gptq < 0.9 * err_rtn


@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_variants(static_groups):
    w, h, x = problem(5)
    scheme = QuantScheme(4, 32, True)
    cfg = gptq.GPTQConfig(act_order=True, static_groups=static_groups)
    result = gptq.quantize_layer(w, h, scheme, cfg)
    qw = result.weight
    if static_groups:
        assert qw.g_idx is None  # groups by original column: kernels need no g_idx
    else:
        assert qw.g_idx is not None and sorted(qw.g_idx.bincount().tolist()) == [32] * 8
    plain = gptq.quantize_layer(w, h, scheme).relative_error
    assert result.relative_error < 1.5 * plain  # same league; act-order usually helps
    assert ((w - qw.dequantize()) @ x.T).norm() < ((w - rtn.quantize(w, scheme).dequantize())
                                                    @ x.T).norm()


def test_relative_error_matches_direct_computation():
    w, h, x = problem(9)
    result = gptq.quantize_layer(w, h, QuantScheme(4, 64, True))
    dw = w - result.weight.dequantize()
    direct = float((dw @ x.T).pow(2).sum() / (w @ x.T).pow(2).sum())
    assert abs(result.relative_error / direct - 1) < 1e-3


def test_dead_inputs_are_zeroed_and_reported():
    w, h, _ = problem(11, k=128)
    h[5, :] = 0
    h[:, 5] = 0
    result = gptq.quantize_layer(w, h, QuantScheme(4, 32, True))
    assert result.dead_columns == 1
    assert torch.all(result.weight.dequantize()[:, 5] == 0)


def test_rank_deficient_hessian_raises_damping(capsys):
    from compress.progress import set_quiet

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 64, generator=gen)  # 3 tokens: H has rank 3 of 64
    acc = gptq.HessianAccumulator(64)
    acc.add(x)
    set_quiet(False)
    try:
        result = gptq.quantize_layer(torch.randn(8, 64, generator=gen), acc.hessian(),
                                     QuantScheme(4, 32, True), gptq.GPTQConfig(damp=1e-9),
                                     name="model.layers.3.mlp.up_proj")
    finally:
        set_quiet(True)
    assert result.damp > 1e-9
    assert "model.layers.3.mlp.up_proj" in capsys.readouterr().err


def test_non_finite_hessian_names_the_layer():
    h = torch.eye(16)
    h[2, 2] = float("inf")
    with pytest.raises(CompressError, match=r"Hessian of model.layers.7.mlp.down_proj contains"):
        gptq.quantize_layer(torch.randn(4, 16), h, QuantScheme(4, -1, True),
                            name="model.layers.7.mlp.down_proj")


def test_mse_clip_lowers_weight_error():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 512, generator=gen)
    w[:, ::97] *= 8  # outliers make min/max ranges wasteful
    plain = rtn.qparams(rtn.grouped(w, 128), 3, True, torch.float32)
    clipped = rtn.qparams(rtn.grouped(w, 128), 3, True, torch.float32, mse_clip=True)
    plain, clipped = plain[0].abs(), clipped[0].abs()  # signed scales: compare magnitudes
    assert torch.all(clipped <= plain) and torch.any(clipped < plain)


@pytest.mark.parametrize("kwargs,message", [({"damp": 0}, "damp"), ({"block_size": 0},
                                            "block_size"), ({"act_order": "yes"}, "act_order")])
def test_config_validation(kwargs, message):
    with pytest.raises(CompressError, match=message):
        gptq.GPTQConfig(**kwargs)


@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, True),
                                                     (True, False)])
def test_shared_input_pass_equals_one_pass_per_linear(act_order, static_groups):
    """Stacking Linears that share an input (q/k/v) must not change any of them."""
    w, h, _ = problem(21)
    gen = torch.Generator().manual_seed(22)
    parts = [w, torch.randn(16, w.shape[1], generator=gen) * 0.05,
             torch.randn(8, w.shape[1], generator=gen) * 0.2]
    scheme = QuantScheme(4, 64, False)
    cfg = gptq.GPTQConfig(act_order=act_order, static_groups=static_groups)
    shared = gptq.quantize_shared_input(parts, h, scheme, cfg)
    for part, got in zip(parts, shared, strict=True):
        alone = gptq.quantize_layer(part, h, scheme, cfg)
        assert got.weight.shape == tuple(part.shape)
        differ = (got.weight.dequantize() - alone.weight.dequantize()).abs() > 1e-6
        assert differ.any(dim=1).sum() <= 1  # a near-tie may flip in one row, as above
        assert got.relative_error == pytest.approx(alone.relative_error, rel=1e-3)
        assert (got.weight.g_idx is None) == (alone.weight.g_idx is None)


def test_cross_term_streams_like_the_hessian():
    gen = torch.Generator().manual_seed(30)
    x, r = torch.randn(1000, 48, generator=gen), torch.randn(1000, 48, generator=gen)
    acc = gptq.CrossAccumulator(48)
    for a, b in zip(r.split(137), x.split(137), strict=True):
        acc.add(a, b)
    torch.testing.assert_close(acc.c, 2 * r.T @ x / 1000, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not pair"):
        acc.add(r[:10], x[:11])


def test_target_weight_is_the_least_squares_fit_to_the_unquantised_outputs():
    """W C H^-1 fits W R from X (float64 lstsq as the oracle); with R = X it is W itself,
    so GPTQ's "model" target is plain GPTQ where nothing upstream was rounded."""
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(4000, 64, generator=gen) * torch.logspace(-0.5, 0.5, 64)
    r = x + 0.2 * torch.randn(4000, 64, generator=gen)  # the error earlier layers left
    w = torch.randn(32, 64, generator=gen)
    h, c = gptq.HessianAccumulator(64), gptq.CrossAccumulator(64)
    h.add(x)
    c.add(r, x)
    fit = torch.linalg.lstsq(x.double(), (r @ w.T).double()).solution.T.float()
    got = gptq.target_weight(w, h.hessian(), c.c, damp=1e-6)
    torch.testing.assert_close(got, fit, rtol=0, atol=2e-3 * float(fit.abs().max()))
    assert (fit - w).abs().max() > 0.05  # the fit is not W: the check can fail
    same = gptq.CrossAccumulator(64)
    same.add(x, x)
    torch.testing.assert_close(gptq.target_weight(w, h.hessian(), same.c, damp=0.01), w,
                               rtol=0, atol=1e-4)


def test_rounding_the_target_weight_lowers_the_error_against_the_unquantised_outputs():
    gen = torch.Generator().manual_seed(32)
    x = correlated_inputs(4000, 128, gen)
    # the error earlier rounding left is a function of the inputs, in part a linear one
    # the fit can undo; the rest is noise it cannot
    r = (x @ (torch.eye(128) + 0.05 * torch.randn(128, 128, generator=gen))
         + 0.05 * x.std(0) * torch.randn(4000, 128, generator=gen))
    w = torch.randn(64, 128, generator=gen) * 0.05
    h, c = gptq.HessianAccumulator(128), gptq.CrossAccumulator(128)
    h.add(x)
    c.add(r, x)
    scheme = QuantScheme(3, 64, True)
    plain = gptq.quantize_layer(w, h.hessian(), scheme).weight.dequantize()
    target = gptq.target_weight(w, h.hessian(), c.c, damp=0.01)
    model = gptq.quantize_layer(target, h.hessian(), scheme).weight.dequantize()
    errors = {name: float(((r @ w.T - x @ q.T) ** 2).mean())
              for name, q in (("plain", plain), ("model", model))}
    assert errors["model"] < 0.8 * errors["plain"], errors


def test_target_must_be_named():
    with pytest.raises(CompressError, match="GPTQ target must be one of layer, model"):
        gptq.GPTQConfig(target="fp")
    with pytest.raises(CompressError, match="target_strength must be in"):
        gptq.GPTQConfig(target_strength=0)


def test_target_strength_moves_part_of_the_way():
    gen = torch.Generator().manual_seed(33)
    x = torch.randn(500, 32, generator=gen)
    r = x @ (torch.eye(32) + 0.1 * torch.randn(32, 32, generator=gen))
    w = torch.randn(8, 32, generator=gen)
    h, c = gptq.HessianAccumulator(32), gptq.CrossAccumulator(32)
    h.add(x)
    c.add(r, x)
    full = gptq.target_weight(w, h.hessian(), c.c, 0.01)
    half = gptq.target_weight(w, h.hessian(), c.c, 0.01, strength=0.5)
    torch.testing.assert_close(half, (w + full) / 2, rtol=0, atol=1e-5)
