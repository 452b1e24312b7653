"""Rotations folded into the weights (compress/calibrate/rotate.py) and through the pipeline.

The oracle is the unrotated model: folded exactly, the rotated model computes the same
logits in float32, in our decoder and in transformers; quantised, its checkpoint loads in
transformers with our logits and resumes to identical bytes.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    ARCH_CASES,
    assert_resumes_to_identical_files,
    cli_in_process,
    exact_load,
    interrupt_on_save,
    kill_after_layers,
)
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from compress import models, pipeline
from compress.calibrate import rotate
from compress.formats import checkpoint
from compress.quant import QuantScheme
from compress.quant.rotate import RotationConfig
from compress.recipe import CalibrationConfig, Recipe

TOKENS = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
HADAMARD = RotationConfig("hadamard", seed=0)
POST_NORMS = {"gemma2", "gemma3_text", "olmo2"}  # the residual rotation cannot be exact


def rotated_dense_copy(src, dst, config=HADAMARD):
    """`src` with the rotations folded in, unquantised, as a float32 HF directory (the
    pipeline's own fold functions, per layer and outside the layers)."""
    files = models.open_model(src)
    plan = rotate.plan(files, config)
    tensors = rotate.rotated_tensors(files, plan)
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config_json = dict(files.config)
    if plan.residual is not None:
        config_json["tie_word_embeddings"] = False  # the head has the final norm folded in
    (dst / "config.json").write_text(json.dumps(config_json))
    return plan, files, tensors


def logits(path):
    with torch.no_grad():
        return models.load(path, dtype=torch.float32)[0](TOKENS)


def hf_logits(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def test_rotated_model_computes_the_same_function(tiny_arch, tmp_path):
    model_type, path = tiny_arch
    plan, files, rotated = rotated_dense_copy(path, tmp_path / "rotated")
    assert (plan.residual is None) == (model_type in POST_NORMS), plan.skipped
    before = logits(path)
    # float32 rounding of the same function, computed through rotated weights: seen 4e-6
    # on logits of magnitude ~3
    torch.testing.assert_close(logits(tmp_path / "rotated"), before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hf_logits(tmp_path / "rotated"), before, rtol=1e-4, atol=1e-4)
    # not vacuous: the values and (where allowed) the stream really were rotated
    p = files.arch.layer_prefix(0)
    o_proj = f"{p}{files.arch.o_proj}.weight"
    assert not torch.allclose(rotated[o_proj], files.tensors.get(o_proj), atol=1e-3)
    embed = f"{files.arch.embed}.weight"
    assert torch.equal(rotated[embed], files.tensors.get(embed)) == (plan.residual is None)
    if plan.residual is not None:
        norm = f"{p}{files.arch.attn_norm}.weight"
        assert torch.equal(rotated[norm], torch.full_like(rotated[norm],
                                                          1 - files.decoder_config.norm_offset))


def test_sizes_without_a_power_of_two_hadamard(tiny_factory, tmp_path):
    """Hidden 72 = Paley 36 ⊗ Sylvester 2; head_dim 18 has no Hadamard here (random
    orthogonal 9 ⊗ Sylvester 2)."""
    path = tiny_factory("llama", hidden_size=72, num_attention_heads=4, num_key_value_heads=2,
                        norm_noise=0.1)
    plan, _, _ = rotated_dense_copy(path, tmp_path / "rotated")
    assert "Paley 36 ⊗ Sylvester 2" in plan.residual.construction
    assert "random orthogonal 9" in plan.heads.construction
    torch.testing.assert_close(logits(tmp_path / "rotated"), logits(path), rtol=1e-4, atol=1e-4)


def test_post_norm_families_rotate_only_the_values(tiny_factory):
    files = models.open_model(tiny_factory("gemma3_text", **ARCH_CASES["gemma3_text"]))
    plan = rotate.plan(files, HADAMARD)
    assert plan.residual is None and "\n" not in plan.skipped
    assert "post_attention_layernorm" in plan.skipped and "diag(w)·Q ≠ Q·diag(w)" in plan.skipped
    assert plan.describe()["residual"] == {"skipped": plan.skipped}
    assert rotate.plan(files, RotationConfig()) is None


def kl_to(reference, got):
    log_p, log_q = reference.log_softmax(-1), got.log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_rotated_rtn_checkpoint_loads_in_transformers_with_our_logits(tiny_arch, tmp_path,
                                                                      exact_kernels):
    model_type, path = tiny_arch
    out = tmp_path / "q"
    recipe = Recipe("rtn", QuantScheme(8, -1, True), rotate=HADAMARD)
    result = pipeline.quantize(path, recipe, out)
    ours = exact_load(out)
    with torch.no_grad():
        got = ours(TOKENS)
    torch.testing.assert_close(got, hf_logits(out), rtol=1e-4, atol=1e-4)
    # W8 of the rotated model is still the model (seen: KL ~5e-5); a fold missed anywhere
    # (a norm, the head, one expert's down) gives a different function, KL far above this
    assert kl_to(logits(path), got) < 2e-3
    manifest = json.loads((out / checkpoint.MANIFEST).read_text())
    assert manifest["rotation"] == result.rotation
    assert manifest["recipe"]["rotate"] == {"kind": "hadamard", "seed": 0}
    assert ("skipped" in result.rotation["residual"]) == (model_type in POST_NORMS)
    config = json.loads((out / "config.json").read_text())
    source = models.open_model(path)
    if source.tied_embeddings:  # the head carries the final norm now: untied
        assert config["tie_word_embeddings"] == (model_type in POST_NORMS)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_rotate_and_untie_a_tied_head(tiny_factory, tmp_path, method,
                                                         exact_kernels):
    """Calibration gathers layer 0's inputs from the rotated table and computes with the
    rotated layer: the checkpoint stays the model (W8) and transformers reads it."""
    path = tiny_factory("llama", tie_word_embeddings=True, norm_noise=0.1)
    out = tmp_path / "q"
    recipe = Recipe(method, QuantScheme(8, -1, True), rotate=HADAMARD,
                    calibration=CalibrationConfig(8, 64, 0))
    pipeline.quantize(path, recipe, out)
    files = models.open_model(out)
    assert not files.tied_embeddings and "lm_head.weight" in files.tensors
    ours = exact_load(out)
    with torch.no_grad():
        got = ours(TOKENS)
    torch.testing.assert_close(got, hf_logits(out), rtol=1e-4, atol=1e-4)
    assert kl_to(logits(path), got) < 2e-3
    log = json.loads((out / pipeline.QUANT_LOG).read_text())
    assert log["rotation"]["residual"]["size"] == 64


def test_a_quantised_tied_head_is_packed_from_the_rotated_head(tiny_factory, tmp_path,
                                                                 exact_kernels):
    path = tiny_factory("llama", tie_word_embeddings=True, norm_noise=0.1)
    out = tmp_path / "q"
    recipe = Recipe("rtn", QuantScheme(8, -1, True), ignore=(), rotate=HADAMARD)
    assert pipeline.quantize(path, recipe, out).head_quantized
    files = models.open_model(out)
    assert "lm_head" in files.schemes and not files.tied_embeddings
    ours = exact_load(out)
    with torch.no_grad():
        got = ours(TOKENS)
    torch.testing.assert_close(got, hf_logits(out), rtol=1e-4, atol=1e-4)
    assert kl_to(logits(path), got) < 2e-3


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_interrupted_rotated_run_resumes_to_identical_files(tiny_factory, tmp_path,
                                                            monkeypatch, method):
    path = tiny_factory("llama", num_hidden_layers=4, tie_word_embeddings=True,
                        norm_noise=0.1)
    recipe = Recipe(method, QuantScheme(4, 32, True), rotate=HADAMARD,
                    calibration=CalibrationConfig(8, 64, 0))
    assert_resumes_to_identical_files(path, recipe, tmp_path, monkeypatch)


def test_resume_refuses_another_rotation(tiny_llama, tmp_path, monkeypatch):
    from compress.errors import CompressError

    out = tmp_path / "q"
    _, restore = interrupt_on_save(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        pipeline.quantize(tiny_llama, Recipe(rotate=HADAMARD), out)
    restore()
    with pytest.raises(CompressError, match=r"recipe\.rotate\.seed: 0 -> 1"):
        pipeline.quantize(tiny_llama, Recipe(rotate=RotationConfig("hadamard", 1)), out)


def test_rotate_flag_and_recipe_key(tiny_llama, tmp_path):
    out = tmp_path / "flag"
    done = cli_in_process("quantize", tiny_llama, "--rotate", "--rotate-seed", "3",
                          "--group-size", "32", "--no-eval", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "rotation: residual stream by Hadamard 64" in done.stdout
    assert "note: --rotate with rtn" in done.stderr  # measured worse: the user is told
    recipe = Recipe.from_yaml(out / "recipe.yaml")
    assert recipe.rotate == RotationConfig("hadamard", 3)
    assert recipe.label == "rtn-w4g32-sym-hadamard"
    assert Recipe.from_dict({"rotate": "hadamard"}).rotate == RotationConfig("hadamard", 0)
    assert "rotate" not in Recipe().to_dict()  # recipes (and runs) without it are unchanged
    yaml_file = tmp_path / "r.yaml"
    yaml_file.write_text("method: rtn\nrotate: {kind: hadamard, seed: 2}\n")
    assert Recipe.from_yaml(yaml_file).rotate.seed == 2
    yaml_file.write_text("method: rtn\nrotate: {kind: spin}\n")
    bad = cli_in_process("quantize", tiny_llama, "--recipe", yaml_file, "--no-eval",
                         "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "rotate kind must be one of none, hadamard" in bad.stderr


@pytest.mark.slow
def test_kill_9_mid_rotated_run_then_resume_is_bit_identical(tiny_factory, tmp_path):
    model = tiny_factory("llama", num_hidden_layers=8, hidden_size=192, intermediate_size=512,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    args = ["quantize", str(model), "--method", "gptq", "--rotate", "--calib-samples", "16",
            "--calib-seqlen", "128", "--group-size", "64", "--no-eval", "-q"]
    env = {**os.environ, "COMPRESS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}

    def cli(*extra):
        return subprocess.run([sys.executable, "-m", "compress.cli", *args, *extra], env=env,
                              capture_output=True, text=True, timeout=600)

    clean = cli("--out", str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "killed"
    kill_after_layers([sys.executable, "-m", "compress.cli", *args, "--out", str(out)], out, 3,
                      env)
    resumed = cli("--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "clean" / checkpoint.MANIFEST).read_text())["files"]
    b = json.loads((out / checkpoint.MANIFEST).read_text())["files"]
    assert a == b
