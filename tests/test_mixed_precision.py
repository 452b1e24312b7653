"""`quantize --target-bits`: per-Linear sensitivities are measured as stated, the choice
stays within the budget, and the recipe written with the checkpoint reproduces it."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import checkpoint_tensors

from compress import api, data, models
from compress.calibrate import sensitivity
from compress.errors import CompressError
from compress.quant import QuantScheme, rtn
from compress.recipe import Recipe

OPTIONS = tuple(sensitivity.Option.parse(o) for o in ("w3g32", "w4g32", "w8"))


def test_rerunning_from_a_layer_equals_the_full_forward(tiny_llama):
    model = models.load(tiny_llama, dtype=torch.float32, head_dtype=torch.float32)[0]
    tokens = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        inputs = model.layer_inputs(tokens)
        for i, x in enumerate(inputs):
            torch.testing.assert_close(model.logits_from(i, x), full, rtol=1e-5, atol=1e-5)


def test_option_labels_round_trip_and_bad_ones_are_refused():
    assert [o.label for o in OPTIONS] == ["w3g32", "w4g32", "w8"]
    assert sensitivity.Option.parse("w4g128") == sensitivity.Option(4, 128)
    with pytest.raises(CompressError, match="bits=5 is not supported"):
        sensitivity.Option.parse("w5g64")


@pytest.fixture(scope="module")
def table(tiny_llama):
    files = models.open_model(tiny_llama)
    calib = data.calibration_set(data.load_tokenizer(files.path), None, 4, 64, 0)
    return files, calib, sensitivity.measure(files, calib, OPTIONS, kl_samples=2)


def test_sensitivity_matches_a_direct_measurement(table):
    files, calib, t = table
    assert set(t.losses) == set(files.linear_names())
    for name, losses in t.losses.items():
        assert losses["w3g32"] > losses["w4g32"] > losses["w8"] > 0, name
        out_f, in_f = files.linear_shape(name)
        # codes + one scale per group in the model's dtype (float32 here)
        assert t.bits[name]["w4g32"] == out_f * (in_f * 4 + in_f // 32 * 32)
    # The reference option's loss is the KL of the whole model with only that Linear
    # rounded, measured here independently with full forwards.
    model = models.build(files, dtype=torch.float32, head_dtype=torch.float32)
    name = "model.layers.1.self_attn.o_proj"
    linear = dict(model.named_modules())[name]
    tokens = calib.samples[:2]
    weight = linear.weight.detach().clone()
    hessian = sensitivity._input_hessians(model, [name], calib.samples, 4)[name]
    reference = QuantScheme(4, 128).fit(name, linear.in_features)  # 64 inputs: groups of 64
    with torch.no_grad():
        p = F.log_softmax(model(tokens), -1)
        linear.weight.copy_(rtn.fake_quantize(weight, reference, files.dtype))
        q = F.log_softmax(model(tokens), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    ratio = (sensitivity._output_error(weight, hessian, QuantScheme(4, 32), files.dtype)
             / sensitivity._output_error(weight, hessian, reference, files.dtype))
    assert ratio < 1  # smaller groups, smaller error
    assert t.losses[name]["w4g32"] == pytest.approx(kl * ratio, rel=1e-3)


def test_target_bits_checkpoint_follows_the_allocation_and_reproduces(tiny_llama, tmp_path):
    out = tmp_path / "mixed"
    summary = api.quantize(tiny_llama, Recipe(), out, evaluate=False, target_bits=5.0,
                           options=OPTIONS)
    allocation = json.loads((out / "allocation.json").read_text())
    assert allocation["bits_per_weight"] <= 5.0
    assert len(set(allocation["choice"].values())) > 1  # a budget between options mixes
    files = models.open_model(out)
    for name, label in allocation["choice"].items():
        option = sensitivity.Option.parse(label)
        assert (files.schemes[name].bits, files.schemes[name].group_size) == \
            (option.bits, option.group_size), name
    # the budget counts what the files hold: codes and scales (not the shape tensors)
    stored = sum(8 * files.tensors.nbytes(f"{n}.{t}") for n in allocation["choice"]
                 for t in ("weight_packed", "weight_scale"))
    weights = sum(o * i for o, i in map(files.linear_shape, allocation["choice"]))
    assert stored / weights == pytest.approx(allocation["bits_per_weight"])
    assert "allocation.json" in json.loads((out / "compress_manifest.json").read_text())[
        "files"]
    assert summary.result.out == out
    again = tmp_path / "again"
    api.quantize(tiny_llama, Recipe.from_yaml(out / "recipe.yaml"), again, evaluate=False)
    first, second = checkpoint_tensors(out), checkpoint_tensors(again)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_target_bits_below_every_option_is_a_clear_error(tiny_llama, tmp_path):
    with pytest.raises(CompressError, match=r"--target-bits 2 is below the cheapest option "
                                            r"set \(4\.0\d* bits/weight with w3g32"):
        api.quantize(tiny_llama, Recipe(), tmp_path / "o", evaluate=False, target_bits=2,
                     options=OPTIONS)
    assert not (tmp_path / "o").exists()
