"""Untrusted input: pickle weights only with --allow-pickle and then through torch's
weights-only loader (a malicious pickle never runs); remote code is never trusted."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from compress import api, models
from compress.errors import CompressError
from compress.recipe import Recipe


def _pickle_model(tiny_llama, path, shards: int = 1):
    """The tiny model with its weights as pytorch_model.bin (sharded when shards > 1)."""
    import json

    path.mkdir()
    for item in tiny_llama.iterdir():
        if item.name != "model.safetensors":
            shutil.copyfile(item, path / item.name)
    weights = load_file(tiny_llama / "model.safetensors")
    if shards == 1:
        torch.save(weights, path / "pytorch_model.bin")
        return path
    names = sorted(weights)
    weight_map = {}
    for i in range(shards):
        part = {k: weights[k] for k in names[i::shards]}
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save(part, path / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


class _Payload:
    """Unpickling this runs `touch` on a marker file: what a malicious .bin would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_is_refused_by_default_and_converted_when_allowed(tiny_llama, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home"))
    source = _pickle_model(tiny_llama, tmp_path / "bin", shards=2)
    with pytest.raises(CompressError, match=r"only pickle weights.*--allow-pickle"):
        api.quantize(source, Recipe(), tmp_path / "refused", evaluate=False)
    api.quantize(source, Recipe(), tmp_path / "from-bin", evaluate=False, allow_pickle=True)
    api.quantize(tiny_llama, Recipe(), tmp_path / "from-st", evaluate=False)
    a = models.open_model(tmp_path / "from-bin").tensors
    b = models.open_model(tmp_path / "from-st").tensors
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name
    converted = list((tmp_path / "home" / "converted").iterdir())
    assert len(converted) == 1 and not any(converted[0].glob("*.bin"))


@pytest.mark.parametrize("fmt", ["torch.save", "plain pickle"])
def test_a_malicious_pickle_never_runs(tiny_llama, tmp_path, monkeypatch, fmt):
    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home"))
    source = _pickle_model(tiny_llama, tmp_path / "bin")
    marker = tmp_path / "pwned"
    payload = {"model.embed_tokens.weight": _Payload(marker)}
    if fmt == "torch.save":
        torch.save(payload, source / "pytorch_model.bin")
    else:
        with open(source / "pytorch_model.bin", "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CompressError, match=r"holds objects other than tensors, which the "
                                            r"weights-only loader refuses"):
        api.quantize(source, Recipe(), tmp_path / "out", evaluate=False, allow_pickle=True)
    assert not marker.exists()


def test_cli_allow_pickle_flag(cli, tiny_llama, tmp_path):
    source = _pickle_model(tiny_llama, tmp_path / "bin")

    def run(*extra):
        return cli("quantize", source, "--no-eval", *extra,
                   env={"COMPRESS_HOME": str(tmp_path / "home")})

    refused = run("--out", str(tmp_path / "a"))
    assert refused.returncode == 2 and "--allow-pickle" in refused.stderr
    assert "Traceback" not in refused.stderr
    allowed = run("--out", str(tmp_path / "b"), "--allow-pickle")
    assert allowed.returncode == 0, allowed.stderr


def test_remote_code_is_never_trusted(tiny_llama, tmp_path):
    # a config asking for custom code (auto_map) is read as a plain config: nothing from
    # the directory is imported, and an unknown model_type is refused by name
    model = tmp_path / "custom"
    shutil.copytree(tiny_llama, model)
    (model / "evil_modeling.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    config = (model / "config.json").read_text().replace(
        '"model_type": "llama"', '"model_type": "evilnet", "auto_map": {"AutoModelForCausalLM":'
        ' "evil_modeling.EvilForCausalLM"}')
    (model / "config.json").write_text(config)
    with pytest.raises(CompressError, match=r"evilnet"):
        api.quantize(model, Recipe(), tmp_path / "out", evaluate=False)
    assert not (tmp_path / "ran").exists()
