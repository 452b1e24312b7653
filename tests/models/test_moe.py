"""Mixture-of-experts layers: routing as transformers does it, every expert calibrated on
the tokens routed to it, and the coverage rule for experts too few tokens reach.

The tiny Mixtral and Qwen3-MoE checkpoints themselves are in `conftest.ARCH_CASES`, so
`test_architectures.py` runs every dense-model check on them too (logits, KV cache,
greedy tokens, each method, transformers' load of the packed checkpoint)."""

import json

import pytest
import torch
from conftest import ARCH_CASES, exact_load
from transformers import AutoModelForCausalLM

from compress import data, models, pipeline
from compress.calibrate.layer import MIN_EXPERT_TOKENS
from compress.models.layers import SparseMLP
from compress.quant import QuantScheme
from compress.quant.signround import SignRoundConfig
from compress.recipe import CalibrationConfig, Recipe

CALIB = CalibrationConfig(samples=8, seqlen=64, seed=0)
GPTQ = Recipe("gptq", QuantScheme(4, 32, True), calibration=CALIB)
SIGNROUND = Recipe("signround", QuantScheme(4, 32, True), calibration=CALIB,
                   signround=SignRoundConfig(iters=5, batch=4))
EXPERTS = ARCH_CASES["mixtral"]["num_local_experts"]


@pytest.fixture(scope="module")
def tiny_mixtral(tiny_factory):
    return tiny_factory("mixtral", **ARCH_CASES["mixtral"])


def test_routed_token_counts_equal_a_count_by_hand(tiny_mixtral, tmp_path, exact_kernels):
    out = tmp_path / "q"
    result = pipeline.quantize(tiny_mixtral, GPTQ, out)
    coverage = json.loads((out / pipeline.QUANT_LOG).read_text())["experts"]
    assert result.experts == coverage
    assert len(coverage) == 2 * EXPERTS and all(c["rounding"] == "gptq"
                                                 for c in coverage.values())
    # By hand: layer 0's router logits, from transformers' load of the packed checkpoint
    # (calibration quantised layer 0's attention before its MLP saw a token, as this does),
    # on the calibration token ids, top 2 per token.
    files = models.open_model(tiny_mixtral)
    ids = data.calibration_set(data.load_tokenizer(files.path), None, CALIB.samples,
                               CALIB.seqlen, CALIB.seed).samples
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(ids, output_router_logits=True).router_logits[0]
    chosen = logits.float().softmax(-1).topk(2, dim=-1).indices
    by_hand = torch.bincount(chosen.flatten(), minlength=EXPERTS).tolist()
    ours = [coverage[f"model.layers.0.block_sparse_moe.experts.{e}"]["tokens"]
            for e in range(EXPERTS)]
    assert ours == by_hand and sum(ours) == 2 * ids.numel()


@pytest.fixture
def never_expert_3(monkeypatch):
    """Routers that never select expert 3 (its logit is -inf); calling the fixture's value
    restores them."""
    original = SparseMLP.route

    def route(self, x):
        router = getattr(self, self._router)

        class NeverThree(torch.nn.Module):
            def forward(self, h):
                return router(h).index_fill(-1, torch.tensor([3]), float("-inf"))

        setattr(self, self._router, NeverThree())
        try:
            return original(self, x)
        finally:
            setattr(self, self._router, router)

    monkeypatch.setattr(SparseMLP, "route", route)
    return lambda: monkeypatch.setattr(SparseMLP, "route", original)


@pytest.mark.parametrize("recipe", [GPTQ, SIGNROUND], ids=["gptq", "signround"])
def test_an_expert_no_token_reaches_is_rounded_to_nearest_and_reported(
        tiny_mixtral, tmp_path, never_expert_3, recipe):
    out = tmp_path / "q"
    result = pipeline.quantize(tiny_mixtral, recipe, out)
    log = json.loads((out / pipeline.QUANT_LOG).read_text())
    for layer in range(2):
        expert = f"model.layers.{layer}.block_sparse_moe.experts.3"
        assert log["experts"][expert] == {"tokens": 0, "relative_error": None,
                                          "rounding": "rtn"}
        for linear in ("w1", "w2", "w3"):
            entry = log["modules"][f"{expert}.{linear}"]
            assert entry["rounding"] == "rtn" and "under the minimum" in entry["reason"]
        others = [log["experts"][f"model.layers.{layer}.block_sparse_moe.experts.{e}"]
                  for e in range(3)]
        assert all(c["rounding"] == recipe.rounding and c["tokens"] >= MIN_EXPERT_TOKENS
                   for c in others)
    assert log["expert_min_tokens"] == MIN_EXPERT_TOKENS
    assert result.experts["model.layers.0.block_sparse_moe.experts.3"]["rounding"] == "rtn"
    # ... and the checkpoint still holds every expert, packed
    assert sorted(models.open_model(out).schemes) == sorted(
        models.open_model(out).linear_names())


def test_decode_runs_only_the_chosen_experts(tiny_mixtral):
    model, _ = models.load(tiny_mixtral)
    calls = []
    for layer in model.model.layers:
        for e, expert in enumerate(layer.block_sparse_moe.experts):
            expert.register_forward_pre_hook(lambda _m, args, e=e: calls.append(e))
    with torch.no_grad():
        model(torch.tensor([[5]]))
    assert len(calls) == 2 * 2  # top-2 experts in each of 2 layers, no others


def test_awq_scales_every_expert_through_the_norm_and_the_router(tiny_mixtral, tmp_path,
                                                                never_expert_3, exact_kernels):
    """One set of scales for the MLP norm's readers (the router absorbs it, unquantised);
    each expert's up -> down on its own; the expert no token reaches takes part in no
    search but is still scaled with the others and rounded to nearest."""
    out = tmp_path / "q"
    recipe = Recipe("awq", QuantScheme(4, 32, True), calibration=CALIB)
    result = pipeline.quantize(tiny_mixtral, recipe, out)
    log = json.loads((out / pipeline.QUANT_LOG).read_text())
    source, packed = models.open_model(tiny_mixtral), models.open_model(out)
    for layer in range(2):
        moe = f"model.layers.{layer}.block_sparse_moe"
        router = f"{moe}.gate.weight"
        assert router not in packed.schemes  # stays dense ...
        assert not torch.equal(packed.tensors.get(router), source.tensors.get(router))
        for e in range(EXPERTS):
            for linear in ("w1", "w3"):
                entry = log["modules"][f"{moe}.experts.{e}.{linear}"]["awq"]
                assert entry["producer"] == "post_attention_layernorm" and "alpha" in entry
                assert entry["relative_error"] <= entry["relative_error_unscaled"]
            down = log["modules"][f"{moe}.experts.{e}.w2"]
            if e == 3:
                assert "under the minimum" in down["awq"]["skipped"]
                assert down["tokens"] == 0 and down["relative_error"] is None
            else:
                assert down["awq"]["producer"] == f"block_sparse_moe.experts.{e}.w3"
                assert down["tokens"] >= MIN_EXPERT_TOKENS and "clip_mean_shrink" in down
        assert result.experts[f"{moe}.experts.3"] == {"tokens": 0, "relative_error": None,
                                                     "rounding": "rtn"}
    assert sorted(packed.schemes) == sorted(packed.linear_names())  # ... every expert packed
    # the folded, rounded router and norm load in transformers as they run in ours
    never_expert_3()  # transformers' routers may select it
    ours = exact_load(out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.tensor([[5, 17, 923, 4021, 77]])
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)


def test_all_token_calibration_gives_every_expert_every_token(tiny_mixtral, tmp_path):
    recipe = Recipe("gptq", QuantScheme(4, 32, True), calibration=CalibrationConfig(
        samples=8, seqlen=64, seed=0, expert_tokens="all"))
    out = tmp_path / "q"
    result = pipeline.quantize(tiny_mixtral, recipe, out)
    assert {c["tokens"] for c in result.experts.values()} == {8 * 64}
    assert "expert_tokens: all" in (out / "recipe.yaml").read_text()
    # the same routing picks the outputs; only the experts' Hessians, so roundings, differ
    routed = pipeline.quantize(tiny_mixtral, GPTQ, tmp_path / "r")
    assert {c["rounding"] for c in routed.experts.values()} == {"gptq"}
    a, b = models.load(out)[0], models.load(tmp_path / "r")[0]
    tokens = torch.tensor([[5, 17, 923, 4021, 77]])
    with torch.no_grad():
        assert not torch.equal(a(tokens), b(tokens))  # different Hessians, other roundings
    assert (out / "recipe.yaml").read_text() != (tmp_path / "r/recipe.yaml").read_text()


def test_expert_tokens_in_a_recipe(tmp_path):
    from compress.errors import CompressError

    spec = {"method": "gptq", "calibration": {"samples": 8, "expert_tokens": "all"}}
    recipe = Recipe.from_dict(spec)
    assert recipe.calibration.expert_tokens == "all"
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    # the default is not written: dense models' recipes stay as they were
    assert "expert_tokens" not in Recipe("gptq").to_dict()["calibration"]
    with pytest.raises(CompressError, match=r"expert_tokens must be one of routed, all, "
                                            r"got 'some'") as raised:
        Recipe.from_dict({"method": "gptq", "calibration": {"expert_tokens": "some"}})
    assert "\n" not in str(raised.value)


def test_a_shared_expert_sees_every_token_and_is_not_a_routed_expert(tiny_factory, tmp_path):
    """Qwen2-MoE: the shared expert is calibrated on every token, its sigmoid gate stays
    dense like the router, and the coverage report lists only the routed experts."""
    path = tiny_factory("qwen2_moe", **ARCH_CASES["qwen2_moe"])
    result = pipeline.quantize(path, GPTQ, tmp_path / "q")
    log = json.loads((tmp_path / "q" / pipeline.QUANT_LOG).read_text())["modules"]
    shared = "model.layers.0.mlp.shared_expert."
    assert {log[shared + n]["tokens"] for n in ("gate_proj", "up_proj", "down_proj")} == {
        CALIB.samples * CALIB.seqlen}
    assert sorted(result.experts) == [f"model.layers.0.mlp.experts.{e}" for e in range(4)]
    packed = models.open_model(tmp_path / "q")
    assert "model.layers.0.mlp.shared_expert_gate" not in packed.schemes
    assert "model.layers.0.mlp.shared_expert_gate" in json.dumps(
        packed.config["quantization_config"]["ignore"])
