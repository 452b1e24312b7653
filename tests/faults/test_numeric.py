"""Numeric faults: NaN/Inf weights or activations are refused naming the tensor; zero rows
and columns, denormals and rank-deficient Hessians quantise to finite, correct results."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress import api
from compress.errors import CompressError
from compress.quant import QuantScheme, gptq, rtn
from compress.recipe import Recipe

SCHEMES = [QuantScheme(4, 32, True), QuantScheme(4, 32, False), QuantScheme(8, -1, True),
           QuantScheme(3, 32, False)]


def _poisoned_copy(tiny_llama, tmp_path, tensor: str, value: float):
    """The tiny model with one element of `tensor` (every element of a 1-D one) set."""
    import shutil

    model = tmp_path / "poisoned"
    shutil.copytree(tiny_llama, model)
    weights = load_file(model / "model.safetensors")
    weights[tensor] = weights[tensor].clone()
    if weights[tensor].dim() == 1:
        weights[tensor][:] = value
    else:
        weights[tensor][1, 2] = value
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tiny_llama, tmp_path, method,
                                                           value):
    tensor = "model.layers.1.mlp.up_proj.weight"
    model = _poisoned_copy(tiny_llama, tmp_path, tensor, value)
    recipe = Recipe.from_dict({"method": method, "calibration": {"samples": 4, "seqlen": 32}}
                              if method != "rtn" else {"method": "rtn"})
    # RTN reads the weight itself; calibrated methods build the layer first (decoder)
    with pytest.raises(CompressError, match=rf"{tensor} holds 1 NaN/Inf value: the (source )?"
                                            r"model is corrupt"):
        api.quantize(model, recipe, tmp_path / "out", evaluate=False)
    assert not (tmp_path / "out").exists()


def test_non_finite_activations_are_refused(tiny_llama, tmp_path):
    # a huge norm weight overflows the activations of the next Linears, not their weights
    model = _poisoned_copy(tiny_llama, tmp_path,
                           "model.layers.0.post_attention_layernorm.weight", 3e38)
    recipe = Recipe.from_dict({"method": "gptq", "calibration": {"samples": 4, "seqlen": 32}})
    with pytest.raises(CompressError, match=r"model.layers.0.mlp.gate_proj\+mlp.up_proj contains "
                                            r"NaN/Inf \(activations overflowed\?\)"):
        api.quantize(model, recipe, tmp_path / "out", evaluate=False)


def _special_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 128, generator=g)
    zero_rows = w.clone()
    zero_rows[::5] = 0
    zero_cols = w.clone()
    zero_cols[:, ::3] = 0
    return {"zero rows": zero_rows, "zero columns": zero_cols, "all zero": torch.zeros_like(w),
            "denormal": w * 1e-40, "one outlier": w.clone().index_put_(
                (torch.tensor([4]), torch.tensor([9])), torch.tensor(1e4))}


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
@pytest.mark.parametrize("case", list(_special_weights()))
def test_rtn_and_gptq_stay_finite_and_exact_on_zeros(scheme, case):
    w = _special_weights()[case]
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(1))
    hessian = gptq.HessianAccumulator(128)
    hessian.add(x)
    for name, q in [("rtn", rtn.quantize(w, scheme, torch.float32)),
                    ("gptq", gptq.quantize_layer(w, hessian.hessian(), scheme,
                                                 scale_dtype=torch.float32).weight)]:
        dq = q.dequantize()
        assert torch.isfinite(dq).all(), (case, name)
        assert (dq[w.abs().sum(1) == 0] == 0).all(), (case, name)  # zero rows stay zero
        # RTN error within one quantisation step of the row's own range (a loose bound:
        # group scales are at most the row's); scales stop at the smallest normal float,
        # so denormal weights round to zero
        step = (w.abs().amax(1, keepdim=True) / (2 ** (scheme.bits - 1) - 1)).clamp(
            min=torch.finfo(torch.float32).tiny)
        if name == "rtn":
            assert ((dq - w).abs() <= step * 1.01).all(), (case, name)


def test_rank_deficient_hessian_is_damped_until_it_factors():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(256, 16, generator=g)
    x = torch.cat([base, base, base * 2, torch.zeros(256, 16)], dim=1)  # rank 16 of 64
    acc = gptq.HessianAccumulator(64)
    acc.add(x)
    w = torch.randn(32, 64, generator=g)
    result = gptq.quantize_layer(w, acc.hessian(), QuantScheme(4, 32), name="rank-deficient")
    assert torch.isfinite(result.weight.dequantize()).all()
    assert result.dead_columns == 16 and result.damp >= 0.01
    # dead inputs never reach the output: their columns are free to be anything finite,
    # and the live part is still a good fit
    assert result.relative_error < 0.05


def test_hessian_from_too_few_tokens_still_quantises():
    w = torch.randn(16, 64)
    acc = gptq.HessianAccumulator(64)
    acc.add(torch.randn(3, 64))  # rank 3
    result = gptq.quantize_layer(w, acc.hessian(), QuantScheme(4, 32), name="few tokens")
    assert torch.isfinite(result.weight.dequantize()).all()


def test_gptq_refuses_non_finite_weights_by_name():
    w = torch.randn(8, 32)
    w[0, 0] = float("nan")
    with pytest.raises(CompressError, match=r"weights of model.layers.3.q_proj contain NaN"):
        gptq.quantize_layer(w, torch.eye(32), QuantScheme(4, 32), name="model.layers.3.q_proj")
