"""GPTQ's "model" target (GPTAQ): each group is paired with the unquantised model's input
at the same tokens, taken from the model's own forward, and rounded toward its outputs."""

from __future__ import annotations

import json

import pytest
import torch

from compress import data, models, pipeline
from compress.quant import QuantScheme, gptq
from compress.recipe import CalibrationConfig, Recipe

CALIB = CalibrationConfig(samples=8, seqlen=64, seed=0)  # one calibration chunk
GROUPS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def _transformers_inputs(path, samples) -> list[list[torch.Tensor]]:
    """Per decoder layer, the input of each group's first Linear in transformers' float32
    forward of the unquantised model."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    seen: list[list[torch.Tensor]] = [[] for _ in hf.model.layers]
    handles = [hf.model.layers[i].get_submodule(name).register_forward_pre_hook(
        lambda _m, args, i=i: seen[i].append(args[0].detach().clone()))
        for i in range(len(hf.model.layers)) for name in GROUPS]
    with torch.no_grad():
        hf(samples)
    for h in handles:
        h.remove()
    return seen


def test_each_group_meets_the_unquantised_models_input(tiny_llama, tmp_path, monkeypatch):
    pairs = []
    real = gptq.CrossAccumulator.add

    def spy(self, reference, x):
        pairs.append((reference.detach().clone(), x.detach().clone()))
        return real(self, reference, x)

    monkeypatch.setattr(gptq.CrossAccumulator, "add", spy)
    recipe = Recipe("gptq", QuantScheme(2, 32, True), calibration=CALIB,
                    gptq=gptq.GPTQConfig(target="model"))
    pipeline.quantize(tiny_llama, recipe, tmp_path / "q")
    calib = data.calibration_set(data.load_tokenizer(tiny_llama), None, CALIB.samples,
                                 CALIB.seqlen, CALIB.seed)
    expected = [x for layer in _transformers_inputs(tiny_llama, calib.samples) for x in layer]
    assert len(pairs) == len(expected)
    for k, ((reference, x), want) in enumerate(zip(pairs, expected, strict=True)):
        torch.testing.assert_close(reference, want, rtol=1e-4, atol=1e-4)
        if k > 0:  # after the first group something was rounded: the inputs differ
            assert not torch.allclose(x, want, rtol=1e-2, atol=1e-2), k
    log = json.loads((tmp_path / "q" / pipeline.QUANT_LOG).read_text())["modules"]
    first = models.open_model(tiny_llama).arch.layer_prefix(0) + "self_attn.q_proj"
    assert log[first]["target"] == "model"
    assert log[first]["target_shift"] < 1e-8  # nothing upstream rounded: plain GPTQ's W
    assert all(v["target_shift"] > 1e-6 for n, v in log.items() if n != first
               and "k_proj" not in n and "v_proj" not in n)


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_model_target_runs_and_resumes_like_gptq(tiny_factory, tmp_path, monkeypatch, method):
    from conftest import assert_resumes_to_identical_files

    path = tiny_factory("llama", num_hidden_layers=3)
    recipe = Recipe(method, QuantScheme(4, 32, True), calibration=CALIB,
                    gptq=gptq.GPTQConfig(target="model"))
    assert recipe.carries_reference
    assert_resumes_to_identical_files(path, recipe, tmp_path, monkeypatch)
