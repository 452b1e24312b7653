"""Bad model directories and damaged checkpoints: one clear CompressError, never a traceback."""

import json
import shutil

import pytest

from compress import models, pipeline
from compress.errors import CompressError
from compress.formats import checkpoint
from compress.quant import QuantScheme
from compress.recipe import Recipe


@pytest.fixture()
def quantized(tiny_llama, tmp_path):
    out = tmp_path / "q"
    pipeline.quantize(tiny_llama, Recipe("rtn", QuantScheme(4, 32, True)), out)
    return out


def test_missing_directory(tmp_path):
    with pytest.raises(CompressError, match=r"neither a directory nor a bundled model"):
        models.open_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CompressError, match=r"has no config.json"):
        models.open_model(tmp_path)


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CompressError, match=r"is a file; pass the model's directory"):
        models.open_model(f)


def test_unsupported_architecture(tiny_llama, tmp_path):
    shutil.copytree(tiny_llama, tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "m/config.json").write_text(json.dumps(config))
    with pytest.raises(CompressError, match=r"unsupported architecture 'gpt2'; supported model "
                       r"types: gemma2, gemma3_text, llama, mistral, mixtral, olmo2, olmoe, phi3, "
                       r"qwen2, qwen2_moe, qwen3, qwen3_moe \(adding one: docs/architectures.md\)"):
        models.open_model(tmp_path / "m")


def test_a_knob_the_decoder_does_not_honour_is_refused(tiny_factory, tmp_path):
    """OLMoE's clip_qkv clamps q/k/v; computing without it would be another model."""
    from conftest import ARCH_CASES

    shutil.copytree(tiny_factory("olmoe", **ARCH_CASES["olmoe"]), tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    (tmp_path / "m/config.json").write_text(json.dumps({**config, "clip_qkv": 8.0}))
    with pytest.raises(CompressError, match=r"clip_qkv=8.0: the decoder does not clamp"):
        models.load(tmp_path / "m")


def test_pickle_weights_are_refused(tiny_llama, tmp_path):
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CompressError, match=r"only pickle weights .* convert it to safetensors"):
        models.open_model(tmp_path)


def test_no_weights(tiny_llama, tmp_path):
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    with pytest.raises(CompressError, match=r"has no safetensors weights"):
        models.open_model(tmp_path)


def test_truncated_plain_safetensors(tiny_llama, tmp_path):
    shutil.copytree(tiny_llama, tmp_path / "m")
    weights = tmp_path / "m/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CompressError, match=r"corrupt or truncated"):
        models.load(tmp_path / "m")


def test_truncated_shard_in_our_checkpoint(quantized):
    shard = quantized / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CompressError, match=r"manifest says .* truncated or was changed"):
        models.open_model(quantized)


def test_missing_shard(quantized):
    (quantized / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CompressError, match=r"is missing .* incomplete"):
        models.open_model(quantized)


def test_manifest_sha_mismatch(quantized):
    shard = quantized / "model-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(CompressError, match=r"does not match its sha256"):
        models.open_model(quantized)


def test_manifest_cannot_point_outside(quantized):
    manifest = json.loads((quantized / checkpoint.MANIFEST).read_text())
    manifest["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0"}
    (quantized / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CompressError, match=r"unsafe file"):
        models.open_model(quantized)


@pytest.mark.parametrize("schemes", [32, ["w4g32-sym"], {"w4g32-sym": 3}, {"w4g32-sym": [1]}])
def test_manifest_schemes_that_are_not_a_label_to_modules_map_are_refused(quantized, schemes):
    manifest = json.loads((quantized / checkpoint.MANIFEST).read_text())
    manifest["schemes"] = schemes
    (quantized / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CompressError, match=r"'schemes' is not a mapping of scheme label"):
        models.open_model(quantized)


def test_missing_tensor_without_manifest(quantized):
    (quantized / checkpoint.MANIFEST).unlink()
    index = json.loads((quantized / checkpoint.INDEX).read_text())
    del index["weight_map"]["model.layers.0.mlp.up_proj.weight_scale"]
    (quantized / checkpoint.INDEX).write_text(json.dumps(index))
    with pytest.raises(CompressError, match=r"model.layers.0.mlp.up_proj.weight_scale is "
                       "missing"):
        models.load(quantized)
