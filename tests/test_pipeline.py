"""Layer-by-layer quantisation: output layout, manifest, resume after a kill, output-dir safety."""

import json

import pytest
import torch
from conftest import exact_load

from compress import models, pipeline
from compress.errors import CompressError
from compress.formats import checkpoint
from compress.quant import QuantScheme, rtn
from compress.recipe import Recipe

W4 = Recipe("rtn", QuantScheme(4, 128, True))


def test_quantized_checkpoint_layout_and_contents(tiny_llama, tmp_path):
    out = tmp_path / "q"
    result = pipeline.quantize(tiny_llama, W4, out)
    files = models.open_model(out)
    assert result.quantized_modules == 14 and files.is_quantized
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors"]
    assert not (out.parent / "q.partial").exists()
    manifest = json.loads((out / checkpoint.MANIFEST).read_text())
    assert manifest["recipe"] == W4.to_dict()
    assert set(manifest["files"]) >= {"config.json", "recipe.yaml", "tokenizer.json",
                                      checkpoint.INDEX}
    assert Recipe.from_yaml(out / "recipe.yaml") == W4
    # hidden 64 divides 128? no: q/k/v/o/gate/up take groups of 64, down (160 inputs) of 32
    assert files.schemes["model.layers.0.self_attn.q_proj"].group_size == 64
    assert files.schemes["model.layers.0.mlp.down_proj"].group_size == 32
    # every packed weight is exactly RTN of the source weight
    source = models.open_model(tiny_llama)
    for name, scheme in files.schemes.items():
        expected = rtn.quantize(source.linear_weight(name), scheme, torch.float32)
        got = files.linear_weight(name)
        assert torch.equal(got.qweight, expected.qweight), name
        assert torch.equal(got.scales, expected.scales), name


def test_dense_tensors_are_copied_unchanged(tiny_llama, tmp_path):
    out = tmp_path / "q"
    pipeline.quantize(tiny_llama, W4, out)
    src, dst = models.open_model(tiny_llama).tensors, models.open_model(out).tensors
    for name in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.1.input_layernorm.weight"]:
        assert torch.equal(src.get(name), dst.get(name))


def test_size_accounting(tiny_llama, tmp_path):
    result = pipeline.quantize(tiny_llama, W4, tmp_path / "q")
    # 4-bit codes are 0.25 of fp16; fp16 scales per 32-64 weights and shapes add the rest.
    assert 0.25 < result.linear_packed_bytes / result.linear_fp16_bytes < 0.30
    shards = (tmp_path / "q").glob("*.safetensors")
    assert result.packed_bytes == sum(f.stat().st_size for f in shards)


def test_killed_run_resumes_to_identical_checkpoint(tiny_factory, tmp_path, monkeypatch):
    model = tiny_factory("llama", num_hidden_layers=4)
    clean = tmp_path / "clean"
    pipeline.quantize(model, W4, clean)

    out = tmp_path / "resumed"
    real_save = checkpoint.atomic_save_safetensors
    calls = []

    def dies_on_third_shard(path, tensors):
        calls.append(path.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed while writing layer 2
        real_save(path, tensors)

    monkeypatch.setattr(checkpoint, "atomic_save_safetensors", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        pipeline.quantize(model, W4, out)
    assert not out.exists() and (tmp_path / "resumed.partial").is_dir()

    monkeypatch.setattr(checkpoint, "atomic_save_safetensors", real_save)
    result = pipeline.quantize(model, W4, out)
    assert result.layers_resumed == 2
    a = json.loads((clean / checkpoint.MANIFEST).read_text())["files"]
    b = json.loads((out / checkpoint.MANIFEST).read_text())["files"]
    assert a == b  # every file, byte for byte (sha256)


def test_partial_from_another_recipe_is_kept_until_overwrite(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "q"
    real_save = checkpoint.atomic_save_safetensors

    def dies(path, tensors):
        real_save(path, tensors)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "atomic_save_safetensors", dies)
    with pytest.raises(KeyboardInterrupt):
        pipeline.quantize(tiny_llama, Recipe("rtn", QuantScheme(8, -1, True)), out)
    monkeypatch.setattr(checkpoint, "atomic_save_safetensors", real_save)
    with pytest.raises(CompressError, match=r"cannot be resumed \(it differs in "
                       r"recipe.scheme.bits: 8 -> 4; recipe.scheme.group_size: -1 -> 128\); "
                       r"pass --overwrite"):
        pipeline.quantize(tiny_llama, W4, out, resume=True)
    result = pipeline.quantize(tiny_llama, W4, out, overwrite=True)
    assert result.layers_resumed == 0
    assert models.open_model(out).schemes["model.layers.0.mlp.up_proj"].bits == 4


def test_resume_without_partial_is_an_error(tiny_llama, tmp_path):
    with pytest.raises(CompressError, match="nothing to resume"):
        pipeline.quantize(tiny_llama, W4, tmp_path / "q", resume=True)


def test_existing_output_needs_overwrite(tiny_llama, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CompressError, match="already exists and is not empty; pass --overwrite"):
        pipeline.quantize(tiny_llama, W4, out)
    assert (out / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "q.partial").exists()
    pipeline.quantize(tiny_llama, W4, out, overwrite=True)
    assert not (out / "keep.txt").exists() and models.open_model(out).is_quantized


def test_refuses_to_requantize(tiny_llama, tmp_path):
    pipeline.quantize(tiny_llama, W4, tmp_path / "q")
    with pytest.raises(CompressError, match="already quantised"):
        pipeline.quantize(tmp_path / "q", W4, tmp_path / "qq")


def test_recipe_that_quantizes_nothing(tiny_llama, tmp_path):
    with pytest.raises(CompressError, match="nothing to quantise"):
        pipeline.quantize(tiny_llama, Recipe("rtn", ignore=("*",)), tmp_path / "q")


def test_mixed_recipe_roundtrips_and_runs(tiny_llama, tmp_path):
    recipe = Recipe.from_dict({"scheme": {"bits": 4, "group_size": 32},
                               "overrides": [{"pattern": "*.down_proj", "bits": 8,
                                              "group_size": -1}]})
    out = tmp_path / "q"
    pipeline.quantize(tiny_llama, recipe, out)
    files = models.open_model(out)
    assert files.schemes["model.layers.1.mlp.down_proj"] == QuantScheme(8, -1, True)
    assert files.schemes["model.layers.1.mlp.up_proj"] == QuantScheme(4, 32, True)
    model = models.build(files)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_a_tied_output_head_can_be_quantised(tiny_factory, tmp_path):
    tied = tiny_factory("llama", tie_word_embeddings=True)
    recipe = Recipe.from_dict({"scheme": {"bits": 4, "group_size": 32}, "ignore": [],
                               "overrides": [{"pattern": "lm_head", "bits": 8,
                                              "group_size": -1}]})
    out = tmp_path / "head8"
    result = pipeline.quantize(tied, recipe, out)
    source, files = models.open_model(tied), models.open_model(out)
    assert source.tied_embeddings and not files.tied_embeddings
    assert result.head_quantized and result.quantized_modules == 15
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    table = source.tensors.get("model.embed_tokens.weight")
    assert torch.equal(files.tensors.get("model.embed_tokens.weight"), table)  # lookup stays
    head = files.linear_weight("lm_head")
    expected = rtn.quantize(table, files.schemes["lm_head"], torch.float32)
    assert head.bits == 8 and torch.equal(head.qweight, expected.qweight)
    # Against the same layers with the dense tied head: only the head's 8-bit rounding
    # (~4e-3 per weight) separates the logits.
    pipeline.quantize(tied, Recipe.from_dict({"scheme": {"bits": 4, "group_size": 32}}),
                      tmp_path / "dense-head")
    tokens = torch.arange(5, 21)[None]
    with torch.inference_mode():
        got, want = exact_load(out)(tokens), exact_load(tmp_path / "dense-head")(tokens)
    assert 0 < float((got - want).norm() / want.norm()) < 2e-2


def test_the_head_stays_dense_by_default(tiny_factory, tmp_path):
    tied = tiny_factory("llama", tie_word_embeddings=True)
    result = pipeline.quantize(tied, W4, tmp_path / "q")
    assert not result.head_quantized
    assert models.open_model(tmp_path / "q").tied_embeddings
