"""Learned rounding (SignRound): the per-Linear math, one layer's learning, the pipeline."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import assert_resumes_to_identical_files, cli_in_process
from torch import nn

from compress import models, pipeline, progress
from compress.calibrate import signround as learn
from compress.errors import CompressError
from compress.quant import QuantScheme, gptq, rtn
from compress.quant.gptq import GPTQConfig
from compress.quant.signround import (
    LearnedRounding,
    SignRoundConfig,
    grid_bounds,
    signed_step,
    squared_error,
    step_loss,
)
from compress.recipe import CalibrationConfig, Recipe

SCHEMES = [QuantScheme(4, 32, True), QuantScheme(3, 32, False), QuantScheme(4, -1, True),
           QuantScheme(2, 64, False)]


def _weight(out=48, inp=96, seed=0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def _signed_rtn(w: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype = torch.float16,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest on the signed symmetric grid, written out: each group's
    larger-magnitude weight w_e gets scale w_e / -2^(b-1) (in `dtype`, as stored), so it
    lands on code -2^(b-1). Returns (dequantised weights, scales [out, groups])."""
    half = 1 << (scheme.bits - 1)
    gs = scheme.group_size if scheme.group_size > 0 else w.shape[1]
    groups = w.reshape(w.shape[0], -1, gs)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))
    scale = (extreme / -half).to(dtype).float()
    codes = torch.clamp(torch.round(groups / scale), -half, half - 1)
    return (codes * scale).reshape(w.shape), scale.squeeze(-1)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
def test_untrained_rounding_from_gptq_is_gptqs_result(scheme):
    """Started from GPTQ (its error-compensated weights on its grid), zero offsets and
    full ranges pack exactly GPTQ's codes, scales and zeros, and fake-quantise to them."""
    w = _weight(inp=128)
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(1))
    x[:, :8] *= 10  # act-order reorders: the compensated weights must come back in place
    hessian = 2 * x.T @ x / x.shape[0]
    result = gptq.quantize_layer(w, hessian, scheme, GPTQConfig(target="layer"),
                                 name="w", continuous=True)
    assert not torch.equal(result.continuous, w)  # GPTQ moved the weights it had not rounded
    rounding = LearnedRounding(result.continuous, scheme, torch.float16,
                               grid_bounds(result.weight))
    packed = rounding.quantize(result.continuous)
    assert torch.equal(packed.qweight, result.weight.qweight)
    assert torch.equal(packed.scales, result.weight.scales)
    assert (packed.zeros is None) == scheme.symmetric
    assert scheme.symmetric or torch.equal(packed.zeros, result.weight.zeros)
    torch.testing.assert_close(rounding(result.continuous), result.weight.dequantize(),
                               rtol=1e-3, atol=1e-6)


def test_start_from_gptq_needs_contiguous_groups():
    cfg = GPTQConfig(target="layer", static_groups=False)
    result = gptq.quantize_layer(_weight(inp=128), torch.eye(128) + 0.1, QuantScheme(4, 32, True),
                                 cfg, continuous=True)
    with pytest.raises(CompressError, match="static groups"):
        grid_bounds(result.weight)
    with pytest.raises(CompressError, match="static groups"):
        Recipe("signround", QuantScheme(4, 32, True), gptq=cfg,
               signround=SignRoundConfig(start="gptq"))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
def test_untrained_rounding_is_round_to_nearest(scheme):
    w = _weight()
    rounding = LearnedRounding(w, scheme, torch.float16)
    ours = rounding.quantize(w)
    if scheme.symmetric:  # the signed grid: every group's extreme exactly representable
        deq, scale = _signed_rtn(w, scheme)
        torch.testing.assert_close(ours.dequantize(), deq, rtol=0, atol=0)
        torch.testing.assert_close(ours.scales.float(), scale, rtol=0, atol=0)
        # each group's larger-magnitude end is kept (to the scale's float16 rounding)
        gs = w.shape[1] // scale.shape[1]
        groups, kept = (t.reshape(w.shape[0], -1, gs) for t in (w, ours.dequantize()))
        at = groups.abs().argmax(-1, keepdim=True)
        torch.testing.assert_close(kept.gather(-1, at), groups.gather(-1, at), rtol=1e-3,
                                   atol=0)
        assert (scale < 0).any() and (scale > 0).any()
    else:  # the very codes and scales RTN stores
        ref = rtn.quantize(w, scheme, torch.float16)
        assert torch.equal(ours.qweight, ref.qweight) and torch.equal(ours.scales, ref.scales)
    # fake-quantised forward: the same rounding on unrounded (float32) scales
    unrounded = (_signed_rtn(w, scheme, torch.float32)[0] if scheme.symmetric else
                 rtn.fake_quantize(w, scheme, torch.float32))
    torch.testing.assert_close(rounding(w), unrounded, rtol=0, atol=1e-5)


def test_signed_scale_maps_the_larger_end_to_the_lowest_code():
    lo = torch.tensor([-3.0, -1.0, 0.0, -2.0])
    hi = torch.tensor([1.0, 4.0, 0.0, 2.0])
    scale = rtn.signed_symmetric_scale(lo, hi, 3, torch.float16)
    # -3 -> -4 codes of 0.75; 4 -> -4 codes of -1; an all-zero group: scale 1; a tie: hi
    assert scale.tolist() == [0.75, -1.0, 1.0, -0.5]
    unrounded = rtn.signed_symmetric_scale(lo, hi, 3)
    assert unrounded[2] > 0 and torch.equal(unrounded[[0, 1, 3]], scale[[0, 1, 3]])


@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=lambda s: s.label)
def test_offsets_choose_the_other_grid_point(scheme):
    w = _weight()
    rounding = LearnedRounding(w, scheme, torch.float16)
    base = rounding.quantize(w)  # untrained: round to nearest (signed scales if symmetric)
    scale = base.scales.float().repeat_interleave(scheme.group_size, dim=1)
    frac = (w / scale) - torch.floor(w / scale)
    with torch.no_grad():  # push every weight whose fraction is under 0.4 up a step
        rounding.offsets.copy_(rtn.grouped(torch.where(frac < 0.4, 0.49, 0.0),
                                           scheme.group_size))
    moved = rounding.quantize(w).dequantize() - base.dequantize()
    step = (moved / scale).round()
    # a weight moves up one step only where it was pushed (at the top code it cannot)
    assert set(step.unique().tolist()) <= {0.0, 1.0}
    assert (step == 1).sum() > 0.3 * w.numel()
    assert not ((frac >= 0.4) & (step != 0)).any()


def test_gradients_reach_offsets_and_ranges_and_the_step_is_signed():
    w = _weight()
    rounding = LearnedRounding(w, QuantScheme(4, 32, False), torch.float16)
    x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(1))
    loss = ((x @ rounding(w).T - x @ w.T) ** 2).mean()
    loss.backward()
    params = rounding.params()
    assert len(params) == 3 and all(p.grad is not None and p.grad.abs().sum() > 0
                                    for p in params)
    before = [p.detach().clone() for p in params]
    signed_step(params, 0.01)
    for p, b in zip(params, before, strict=True):
        moved = (p - b).abs()
        assert torch.all((moved < 1e-6) | ((moved - 0.01).abs() < 1e-6))
        assert p.grad is None


def _toy_layer() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128, bias=False), nn.GELU(),
                         nn.Linear(128, 64, bias=False))


TOY_SCHEMES = {"0": QuantScheme(3, 32, True), "2": QuantScheme(3, 32, True)}


def _toy_inputs(outliers: bool = True) -> torch.Tensor:
    """Correlated inputs (16, 32, 64) for `_toy_layer`; `outliers`: the first 4 channels
    8x larger, where rounding choices matter."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 32, 64, generator=gen) @ torch.randn(64, 64, generator=gen)
    if outliers:
        x[..., :4] *= 8
    return x


def test_learning_a_layer_beats_rtn_and_leaves_its_weights_alone():
    layer = _toy_layer()
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    x, schemes = _toy_inputs(), dict(TOY_SCHEMES)
    cfg = SignRoundConfig(iters=60, batch=4)
    packed, losses = learn.learn_layer(layer, layer, x, learn.layer_outputs(layer, x), schemes,
                                       cfg, torch.float16, seed=0)
    assert losses["learned"] < 0.8 * losses["start"]
    assert set(packed) == {"0", "2"}
    for n, p in layer.named_parameters():  # parametrizations gone, weights untouched
        assert torch.equal(p, before[n])
    assert not any(hasattr(m, "parametrizations") for m in layer.modules())
    # the packed weights give the loss reported
    with torch.no_grad():
        target = layer(x)
        for name, weight in packed.items():
            layer.get_submodule(name).weight.copy_(weight.dequantize())
        measured = float(((layer(x) - target) ** 2).mean())
    assert measured == pytest.approx(losses["learned"], rel=0.05)
    fresh = _toy_layer()  # the same seed: the same run
    again, _ = learn.learn_layer(fresh, fresh, x, learn.layer_outputs(fresh, x), schemes, cfg,
                                 torch.float16, seed=0)
    assert all(torch.equal(again[n].qweight, packed[n].qweight) for n in packed)


def test_what_is_kept_is_judged_on_the_whole_set(monkeypatch):
    """Of the last step, the best batch and the start, the lowest whole-set loss is kept
    and reported (three whole-set losses measured, the kept one the least); steps so large
    they wreck the layer leave it where it started."""
    layer = _toy_layer()
    x, schemes = _toy_inputs(), dict(TOY_SCHEMES)
    targets = learn.layer_outputs(layer, x)
    wild = SignRoundConfig(iters=6, batch=2, lr=1.0)
    rtn_only = {n: rtn.quantize(layer.get_submodule(n).weight, s) for n, s in schemes.items()}
    packed, losses = learn.learn_layer(layer, layer, x, targets, schemes, wild, torch.float16,
                                       seed=0)
    assert losses["learned"] == losses["start"]
    assert all(torch.equal(packed[n].qweight, rtn_only[n].qweight) for n in schemes)
    seen = []  # the whole-set losses compared at the end
    real = learn._loss
    monkeypatch.setattr(learn, "_loss", lambda *a: seen.append(real(*a)) or seen[-1])
    _, losses = learn.learn_layer(layer, layer, x, targets, schemes,
                                  SignRoundConfig(iters=30, batch=2), torch.float16, seed=0)
    assert len(seen) == 3 and losses["learned"] == min(seen) < seen[0]


def test_a_layer_that_keeps_its_start_learns_again_at_the_retry_step(monkeypatch):
    """Steps so large they wreck the layer keep its start; with retry_lr the layer learns
    once more from the start at that step (and says so), while a layer that learned the
    first time is not learned again."""
    layer = _toy_layer()
    x, schemes = _toy_inputs(), dict(TOY_SCHEMES)
    targets = learn.layer_outputs(layer, x)
    steps = []
    real = learn._stepper
    monkeypatch.setattr(learn, "_stepper", lambda params, cfg: steps.append(cfg.step)
                        or real(params, cfg))
    wild = SignRoundConfig(iters=6, batch=2, lr=1.0, retry_lr=0.02)
    _, losses = learn.learn_layer(layer, layer, x, targets, schemes, wild, torch.float16,
                                  seed=0)
    assert steps == [1.0, 0.02] and losses["retry_lr"] == 0.02
    assert losses["learned"] < 0.9 * losses["start"]
    steps.clear()
    tame = SignRoundConfig(iters=30, batch=2, retry_lr=0.001)
    _, losses = learn.learn_layer(layer, layer, x, targets, schemes, tame, torch.float16,
                                  seed=0)
    assert steps == [tame.step] and "retry_lr" not in losses
    assert losses["learned"] < losses["start"]


def test_adam_learns_within_its_wider_limits():
    """Adam lowers the layer loss as the signed step does, and what it learns stays within
    one grid step either side and a range at most 1.25 times the start's."""
    layer = _toy_layer()
    x, schemes = _toy_inputs(), dict(TOY_SCHEMES)
    seen = {}
    real = learn.LearnedRounding.quantize

    def record(self, weight):  # the learned parameters at packing time
        seen[id(self)] = (self.offsets.detach().clone(), self.max_factor.detach().clone(),
                          self.min_factor.detach().clone())
        return real(self, weight)

    cfg = SignRoundConfig(iters=60, batch=4, optimizer="adam", lr=0.05)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(learn.LearnedRounding, "quantize", record)
        _, losses = learn.learn_layer(layer, layer, x, learn.layer_outputs(layer, x), schemes,
                                      cfg, torch.float16, seed=0)
    assert losses["learned"] < 0.8 * losses["start"]
    offsets = torch.cat([o.flatten() for o, _, _ in seen.values()])
    factors = torch.cat([torch.cat([a.flatten(), b.flatten()]) for _, a, b in seen.values()])
    assert offsets.abs().max() <= 1.0 and offsets.abs().max() > 0.5  # past the signed limit
    assert factors.max() <= 1.25 and factors.min() >= 0.5


def test_fixed_ranges_keep_each_groups_grid():
    """With learn_ranges off only the offsets move: every group's scale is the one it
    started with, while the loss still falls (the offsets alone learn)."""
    layer = _toy_layer()
    x = _toy_inputs(outliers=False)
    schemes = {"0": QuantScheme(3, 32, True), "2": QuantScheme(3, 32, False)}
    targets = learn.layer_outputs(layer, x)
    untrained = SignRoundConfig(iters=1, lr=1e-9, batch=4, optimizer="adam")
    start, _ = learn.learn_layer(layer, layer, x, targets, schemes, untrained,
                                 torch.float16, seed=0)
    cfg = SignRoundConfig(iters=60, batch=4, optimizer="adam", lr=0.05, learn_ranges=False)
    packed, losses = learn.learn_layer(layer, layer, x, targets, schemes, cfg,
                                       torch.float16, seed=0)
    assert losses["learned"] < 0.9 * losses["start"]
    for name, weight in packed.items():
        assert torch.equal(weight.scales, start[name].scales)
        assert (weight.zeros is None) == (start[name].zeros is None)
        if weight.zeros is not None:
            assert torch.equal(weight.zeros, start[name].zeros)
        assert not torch.equal(weight.qweight, start[name].qweight)  # the offsets moved
    learned, _ = learn.learn_layer(layer, layer, x, targets, schemes,
                                   dataclasses.replace(cfg, learn_ranges=True),
                                   torch.float16, seed=0)
    assert any(not torch.equal(learned[n].scales, start[n].scales) for n in schemes)


def test_bfloat16_steps_learn_as_float32_steps_do():
    """precision bfloat16: the steps' matmuls run in bfloat16 (seen inside the layer), the
    loss still falls about as far as float32's, and the reported losses are float32's
    (the start's equal to the last digit)."""
    layer = _toy_layer()
    x = _toy_inputs(outliers=False)
    schemes = {"0": QuantScheme(3, 32, True), "2": QuantScheme(3, 32, False)}
    targets = learn.layer_outputs(layer, x)
    cfg = SignRoundConfig(iters=60, batch=4, optimizer="adam", lr=0.05)
    seen = []
    hook = layer[0].register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    try:
        _, full = learn.learn_layer(layer, layer, x, targets, schemes, cfg, torch.float16,
                                    seed=0)
        steps = len(seen)
        packed, half = learn.learn_layer(layer, layer, x, targets, schemes,
                                         dataclasses.replace(cfg, precision="bfloat16"),
                                         torch.float16, seed=0)
    finally:
        hook.remove()
    assert set(seen[:steps]) == {torch.float32}
    assert torch.bfloat16 in seen[steps:] and torch.float32 in seen[steps:]  # judged in fp32
    assert half["start"] == full["start"]
    assert half["learned"] < 0.8 * half["start"]
    assert half["learned"] < 1.1 * full["learned"]
    assert {w.scales.dtype for w in packed.values()} == {torch.float16}


def test_bfloat16_on_a_cpu_without_bf16_instructions_says_it_will_be_slow(
        monkeypatch, tiny_llama, tmp_path):
    cfg = SignRoundConfig(precision="bfloat16")
    cpu = torch.device("cpu")
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False)
    note = learn.precision_note(cfg, cpu)
    assert note.startswith("note: this CPU has no bfloat16 instructions")
    assert learn.precision_note(SignRoundConfig(), cpu) is None
    assert learn.precision_note(cfg, torch.device("cuda")) is None
    proc = cli_in_process("quantize", tiny_llama, "--method", "signround", "--bits", "4",
                          "--group-size", "32", "--signround-iters", "1",
                          "--signround-batch", "2", "--signround-precision", "bfloat16",
                          "--calib-samples", "2", "--calib-seqlen", "8", "--no-eval",
                          "--out", tmp_path / "q")
    assert proc.returncode == 0, proc.stderr
    assert note in proc.stderr
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert learn.precision_note(cfg, cpu) is None


def test_the_optimizer_setting():
    adam = SignRoundConfig(optimizer="adam", iters=100)
    assert adam.step == 5e-3 and adam.step_at(50) == 2.5e-3 and adam.limits == (1.0, 1.25)
    assert SignRoundConfig(iters=100).step == 0.01 and SignRoundConfig().limits == (0.5, 1.0)
    assert adam.to_dict()["optimizer"] == "adam"
    assert "optimizer" not in SignRoundConfig().to_dict()  # earlier recipes read the same
    assert "learn_ranges" not in SignRoundConfig().to_dict()
    assert "precision" not in SignRoundConfig().to_dict()
    fixed = SignRoundConfig(optimizer="adam", lr=0.01, learn_ranges=False, precision="bfloat16")
    assert fixed.to_dict()["learn_ranges"] is False
    assert fixed.to_dict()["precision"] == "bfloat16"
    assert Recipe.from_dict(Recipe("signround", signround=fixed).to_dict()).signround == fixed
    recipe = Recipe("signround", signround=adam)
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_an_unknown_optimizer_is_a_one_line_error_on_the_command_line(tmp_path):
    result = cli_in_process("quantize", "--method", "signround", "--signround-optimizer",
                            "sgd", "--out", tmp_path / "out")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "signround optimizer must be one of sign, adam, got 'sgd'" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [{"iters": 0}, {"batch": -1}, {"lr": 2.0}, {"iters": True},
                                 {"target": "teacher"}, {"optimizer": "sgd"},
                                 {"learn_ranges": "no"}, {"precision": "float16"},
                                 {"warmup": -1}, {"warmup": 200}, {"warmup": 2.5},
                                 {"retry_lr": 0.0}, {"retry_lr": "small"}, {"trim": -0.01},
                                 {"trim": 0.1}, {"trim": True}, {"trim": "some"},
                                 {"loss": "kl"}, {"loss": None}])
def test_bad_settings_are_one_line_errors(bad):
    with pytest.raises(CompressError, match="signround"):
        SignRoundConfig(**bad)


def test_the_step_decays_linearly_to_zero():
    cfg = SignRoundConfig(iters=4)
    assert [cfg.step_at(i) for i in range(4)] == [0.25, 0.1875, 0.125, 0.0625]
    assert SignRoundConfig(iters=10, lr=0.5).step_at(5) == 0.25


def test_warmup_raises_the_step_over_its_first_steps_then_decays_as_before():
    cfg = SignRoundConfig(iters=10, lr=0.5, warmup=4)
    plain = SignRoundConfig(iters=10, lr=0.5)
    assert [cfg.step_at(i) for i in range(4)] == pytest.approx(
        [plain.step_at(i) * (i + 1) / 4 for i in range(4)])
    assert [cfg.step_at(i) for i in range(3, 10)] == [plain.step_at(i) for i in range(3, 10)]
    assert "warmup" not in plain.to_dict() and cfg.to_dict()["warmup"] == 4
    assert Recipe.from_dict(Recipe("signround", signround=cfg).to_dict()).signround == cfg


def test_a_trimmed_loss_counts_its_largest_errors_as_zero_and_sends_them_no_gradient():
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(4, 50, 8, generator=gen)
    output = (target + 0.1 * torch.randn(target.shape, generator=gen)).requires_grad_()
    with torch.no_grad():
        output[1, 7, 2] += 5.0  # the outliers: far above every other error
        output[3, 0, 5] -= 4.0
    assert torch.equal(step_loss(output, target), nn.functional.mse_loss(output, target))
    trimmed = step_loss(output, target, trim=2 / output.numel())
    outside = torch.ones_like(target, dtype=torch.bool)
    outside[1, 7, 2] = outside[3, 0, 5] = False
    expected = ((output - target).square() * outside).sum() / output.numel()
    assert trimmed.item() == pytest.approx(expected.item(), rel=1e-6)
    trimmed.backward()
    assert output.grad[1, 7, 2] == 0 and output.grad[3, 0, 5] == 0
    assert (output.grad[outside] != 0).all()
    # a fraction below one element leaves nothing out
    assert step_loss(output, target, trim=0.5 / output.numel()).item() == pytest.approx(
        nn.functional.mse_loss(output, target).item(), rel=1e-6)
    cfg = SignRoundConfig(trim=0.001)
    assert "trim" not in SignRoundConfig().to_dict() and cfg.to_dict()["trim"] == 0.001
    assert Recipe.from_dict(Recipe("signround", signround=cfg).to_dict()).signround == cfg


def test_batches_use_every_sample_once_per_pass():
    batches = learn._batches(10, 3, seed=0)
    passes = [torch.cat([next(batches) for _ in range(3)]) for _ in range(4)]
    for indices in passes:  # 3 batches of 3 from 10 samples: one dropped per pass
        assert len(set(indices.tolist())) == 9
    assert len({tuple(p.tolist()) for p in passes}) > 1  # reshuffled each pass
    assert next(learn._batches(2, 8, seed=0)).numel() == 2  # a batch larger than the set


def test_recipe_round_trips_the_section():
    recipe = Recipe("signround", signround=SignRoundConfig(iters=50, batch=4))
    data = recipe.to_dict()
    assert data["signround"] == {"iters": 50, "lr": None, "batch": 4, "target": "model",
                                 "start": "rtn"}
    assert "gptq" not in data
    assert Recipe.from_dict(data) == recipe
    from_gptq = Recipe("signround", signround=SignRoundConfig(start="gptq"),
                       gptq=GPTQConfig(target_strength=0.25))
    assert from_gptq.rounds_gptq and Recipe.from_dict(from_gptq.to_dict()) == from_gptq
    assert from_gptq.to_dict()["gptq"]["target_strength"] == 0.25
    assert recipe.calibrated and recipe.rounding == "signround" and recipe.carries_reference
    assert not Recipe("signround", signround=SignRoundConfig(target="layer")).carries_reference
    assert Recipe("gptq").carries_reference and not Recipe("awq").carries_reference
    assert not Recipe("gptq", gptq=GPTQConfig(target="layer")).carries_reference
    assert "signround" not in Recipe("gptq").to_dict()
    retried = Recipe("signround", signround=SignRoundConfig(retry_lr=0.001))
    assert retried.to_dict()["signround"]["retry_lr"] == 0.001
    assert Recipe.from_dict(retried.to_dict()) == retried
    with pytest.raises(CompressError, match="signround: unknown keys"):
        Recipe.from_dict({"method": "signround", "signround": {"steps": 3}})


CALIB = CalibrationConfig(samples=8, seqlen=64, seed=0)
QUICK = SignRoundConfig(iters=30, batch=8)


def test_pipeline_checkpoint_beats_rtn_and_logs_the_layer_loss(tiny_llama, tmp_path):
    from compress import data

    # 16 samples: on 8 x 64 tokens of this random model the learned rounding fits the
    # calibration tokens and loses to RTN on held-out ones (seen: 0.128 vs 0.124; 0.093 here)
    calib = CalibrationConfig(samples=16, seqlen=64, seed=0)
    recipe = Recipe("signround", QuantScheme(3, 32, True), calibration=calib, signround=QUICK)
    pipeline.quantize(tiny_llama, recipe, tmp_path / "sr")
    pipeline.quantize(tiny_llama, Recipe("rtn", QuantScheme(3, 32, True)), tmp_path / "rtn")
    dense = models.load(tiny_llama)[0]
    held = data.eval_windows(data.text_tokens(data.load_tokenizer(tiny_llama)).tokens,
                             64, 256).tokens
    with torch.no_grad():
        ref = dense(held)
        errs = {n: float((models.load(tmp_path / n)[0](held) - ref).pow(2).mean())
                for n in ("sr", "rtn")}
    assert errs["sr"] < errs["rtn"]
    log = json.loads((tmp_path / "sr" / pipeline.QUANT_LOG).read_text())["modules"]
    assert set(log) == set(models.open_model(tmp_path / "sr").schemes)
    for entry in log.values():
        assert entry["layer_loss"] < entry["layer_loss_start"]
        assert 0 < entry["relative_error"] < 1 and entry["tokens"] == 16 * 64


def test_the_log_names_the_layers_learned_again(tiny_llama, tmp_path):
    """Every layer's first learning is wrecked by a step of 1; each learns again at
    retry_lr, below its start, and its Linears' log entries say at which step."""
    wild = SignRoundConfig(iters=4, batch=4, lr=1.0, retry_lr=0.05)
    pipeline.quantize(tiny_llama, Recipe("signround", QuantScheme(3, 32, True),
                                         calibration=CALIB, signround=wild), tmp_path / "sr")
    log = json.loads((tmp_path / "sr" / pipeline.QUANT_LOG).read_text())["modules"]
    assert len(log) > 8
    for entry in log.values():
        assert entry["layer_retry_lr"] == 0.05
        assert entry["layer_loss"] < entry["layer_loss_start"]


@pytest.mark.parametrize("target", ["model", "layer"])
def test_a_start_from_gptq_that_learns_nothing_is_gptqs_checkpoint(tiny_llama, tmp_path,
                                                                   target):
    """Learned rounding started from GPTQ, with steps too small to flip a code, writes
    GPTQ's checkpoint bit for bit (its codes, grid, and what every later layer sees);
    with real steps it lowers every layer's loss below GPTQ's."""
    from safetensors.torch import load_file

    scheme, gptq_cfg = QuantScheme(2, 32, True), GPTQConfig(target=target)
    still = SignRoundConfig(iters=1, lr=1e-9, batch=4, target=target, start="gptq")
    pipeline.quantize(tiny_llama, Recipe("gptq", scheme, calibration=CALIB, gptq=gptq_cfg),
                      tmp_path / "gptq")
    pipeline.quantize(tiny_llama, Recipe("signround", scheme, calibration=CALIB,
                                         gptq=gptq_cfg, signround=still), tmp_path / "still")
    ours, theirs = ({k: v for f in sorted((tmp_path / n).glob("*.safetensors"))
                     for k, v in load_file(f).items()} for n in ("still", "gptq"))
    assert len(ours) > 20
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    # Adam's small default step wants more steps (at 0.02 x 30 it kept layer 0's start)
    for optimizer, iters in (("sign", 30), ("adam", 100)):
        learned = dataclasses.replace(still, iters=iters, lr=None, optimizer=optimizer)
        out = tmp_path / optimizer
        pipeline.quantize(tiny_llama, Recipe("signround", scheme, calibration=CALIB,
                                             gptq=gptq_cfg, signround=learned), out)
        log = json.loads((out / pipeline.QUANT_LOG).read_text())["modules"]
        for entry in log.values():
            assert entry["layer_loss"] < entry["layer_loss_start"]
            assert entry["target"] == "model" if target == "model" else "target" not in entry
        recorded = models.open_model(out).manifest["recipe"]["signround"]
        assert recorded.get("optimizer", "sign") == optimizer


@pytest.mark.parametrize("target", ["model", "layer"])
def test_the_target_is_the_unquantised_models_activations(tiny_llama, tmp_path, monkeypatch,
                                                          target):
    """Target "model": each layer learns to give what the unquantised model's layer gives
    (transformers' hidden states on the calibration ids), from the quantised inputs;
    "layer": the unquantised layer on the quantised inputs, which is not that."""
    import transformers

    from compress import data

    seen = []
    real = learn.learn_layer

    def spy(layer, forward, x, targets, *args, **kwargs):
        seen.append((x.clone(), targets.clone()))
        return real(layer, forward, x, targets, *args, **kwargs)

    monkeypatch.setattr(learn, "learn_layer", spy)
    recipe = Recipe("signround", QuantScheme(2, 32, True), calibration=CALIB,
                    signround=SignRoundConfig(iters=2, batch=4, target=target))
    pipeline.quantize(tiny_llama, recipe, tmp_path / "q")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    calib = data.calibration_set(data.load_tokenizer(tiny_llama), None, CALIB.samples,
                                 CALIB.seqlen, CALIB.seed)
    with torch.no_grad():
        hidden = hf(calib.samples, output_hidden_states=True).hidden_states
    layers = hf.config.num_hidden_layers
    assert len(seen) == layers
    for i, (x, targets) in enumerate(seen[:-1]):  # the last hidden state is normed
        close = torch.allclose(targets, hidden[i + 1], rtol=1e-4, atol=1e-4)
        assert close == (target == "model" or i == 0), i
        if i > 0:  # the inputs are the quantised model's
            assert not torch.allclose(x, hidden[i], rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_files(tiny_factory, tmp_path, monkeypatch):
    path = tiny_factory("llama", num_hidden_layers=3)
    recipe = Recipe("signround", QuantScheme(4, 32, True), calibration=CALIB, signround=QUICK)
    assert_resumes_to_identical_files(path, recipe, tmp_path, monkeypatch)


def test_the_normed_error_is_the_change_the_next_norm_reads():
    """With a gain, the loss is what an RMSNorm with that gain makes of a small error
    (one orthogonal to the token, whose change of the token's size is second order); the
    tokens and channels the norm shrinks count for little."""
    gen = torch.Generator().manual_seed(5)
    target = torch.randn(3, 20, 16, generator=gen) * torch.logspace(0, 2, 16)  # huge channels
    target[:, 0] *= 50.0  # and a huge first token, as attention sinks are
    error = torch.randn(target.shape, generator=gen)
    error -= (error * target).sum(-1, keepdim=True) / target.square().sum(-1, keepdim=True) \
        * target  # orthogonal to each token
    error *= 1e-4 * target.norm(dim=-1, keepdim=True)
    gain = torch.rand(16, generator=gen) + 0.5
    norm = nn.RMSNorm(16, eps=0.0, dtype=torch.float64)
    norm.weight.data = gain.double()
    seen = norm((target + error).double()) - norm(target.double())
    normed = squared_error(target + error, target, gain)
    assert torch.allclose(normed.double(), seen.square(), rtol=1e-3)
    assert torch.equal(squared_error(target + error, target), (target + error - target).square())
    output = (target + error).requires_grad_()
    assert step_loss(output, target, gain=gain).item() == pytest.approx(normed.mean().item())
    trimmed = step_loss(output, target, trim=0.01, gain=gain)
    assert trimmed.item() < normed.mean().item()
    cfg = SignRoundConfig(loss="normed")
    assert "loss" not in SignRoundConfig().to_dict() and cfg.to_dict()["loss"] == "normed"
    assert Recipe.from_dict(Recipe("signround", signround=cfg).to_dict()).signround == cfg


@pytest.mark.parametrize(("model_type", "readers", "offset"), [
    ("llama", ("input_layernorm", "post_attention_layernorm"), 0.0),
    ("gemma3_text", ("input_layernorm", "pre_feedforward_layernorm"), 1.0)])
def test_reader_gains_are_the_rms_of_every_later_norm_that_reads_the_stream(
        tiny_factory, model_type, readers, offset):
    from conftest import ARCH_CASES

    files = models.open_model(tiny_factory(model_type, **{**ARCH_CASES[model_type],
                                                           "norm_noise": 0.3}))
    weight = {name: offset + files.tensors.get(f"{name}.weight").float()
              for name in (*(f"model.layers.{i}.{r}" for i in range(2) for r in readers),
                           "model.norm")}
    for index in range(2):
        later = [w for name, w in weight.items()
                 if name == "model.norm" or int(name.split(".")[2]) > index]
        assert len(later) == 2 * (1 - index) + 1
        want = torch.stack(later).square().mean(0).sqrt()
        assert torch.allclose(learn.reader_gains(files, residual_rotated=False)[index], want)
        assert torch.equal(learn.reader_gains(files, residual_rotated=True)[index],
                           torch.ones(files.decoder_config.hidden_size))
    assert not torch.allclose(learn.reader_gains(files, False)[0], torch.ones(64), atol=0.05)


def test_olmo2_reads_its_stream_raw_so_the_normed_loss_is_the_plain_one(tiny_factory):
    from conftest import ARCH_CASES

    files = models.open_model(tiny_factory("olmo2", **ARCH_CASES["olmo2"]))
    assert learn.reader_gains(files, residual_rotated=False) is None


def test_auto_is_the_normed_loss_for_the_families_that_norm_each_branchs_output():
    chosen = {arch.name: learn.loss_for("auto", arch) for arch in models.ARCHITECTURES}
    assert {name for name, loss in chosen.items() if loss == "normed"} == {"gemma2", "gemma3"}
    assert chosen["llama"] == chosen["olmo2"] == "output"  # OLMo-2 reads its stream raw
    gemma = models.architecture_for("gemma3_text")
    assert learn.loss_for("output", gemma) == "output"
    assert learn.loss_for("normed", models.architecture_for("llama")) == "normed"
    assert SignRoundConfig().loss == "auto"
    with pytest.raises(CompressError, match="signround loss must be one of auto, output"):
        SignRoundConfig(loss="kl")


@pytest.mark.parametrize(("model_type", "rotate", "loss", "normed"), [
    ("gemma3_text", False, "normed", True), ("llama", True, "normed", True),
    ("gemma3_text", True, "auto", True), ("llama", False, "auto", False)])
def test_the_pipeline_learns_each_layer_on_the_error_its_readers_see(
        tiny_factory, tmp_path, monkeypatch, capsys, model_type, rotate, loss, normed):
    from conftest import ARCH_CASES

    from compress.quant.rotate import RotationConfig

    path = tiny_factory(model_type, **ARCH_CASES[model_type])
    gains = []
    real = learn.learn_layer

    def spy(*args, **kwargs):
        gains.append(kwargs["gain"])
        return real(*args, **kwargs)

    monkeypatch.setattr(learn, "learn_layer", spy)
    cfg = SignRoundConfig(iters=20, batch=4, loss=loss)
    recipe = Recipe("signround", QuantScheme(3, 32, True), calibration=CALIB, signround=cfg,
                    rotate=RotationConfig("hadamard" if rotate else "none"))
    monkeypatch.setattr(progress, "_quiet", False)
    pipeline.quantize(path, recipe, tmp_path / "q")
    said = "learned rounding: the normed loss (gemma3 norms each branch's output"
    assert (said in capsys.readouterr().err) == (loss == "auto" and normed)
    files = models.open_model(path)
    # Gemma's residual stream is never rotated (its post-norms refuse it), Llama's is
    rotated = rotate and model_type == "llama"
    assert len(gains) == files.decoder_config.num_layers
    for index, gain in enumerate(gains):
        if normed:
            assert torch.equal(gain, learn.reader_gains(files, residual_rotated=rotated)[index])
        else:
            assert gain is None
    written = json.loads((tmp_path / "q" / pipeline.QUANT_LOG).read_text())
    assert written["signround_loss"] == ("normed" if normed else "output")
    log = written["modules"]
    assert all(entry["layer_loss"] < entry["layer_loss_start"] for entry in log.values())
    recipe_written = models.open_model(tmp_path / "q").manifest["recipe"]["signround"]
    assert recipe_written.get("loss", "auto") == loss
    run = pipeline.identity(files, recipe, None)
    assert ("signround_loss" in run) == (loss == "auto" and normed)
