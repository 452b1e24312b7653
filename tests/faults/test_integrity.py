"""What a resume trusts and what a finished checkpoint looks like on disk (issue 10).

- Resuming keys on the source model's weights by content (a sample of every tensor), not
  only sizes: another model of the same shapes at the same path is refused, a byte-equal
  copy (new mtime) resumes.
- A damaged progress.json (entries of the wrong shape) is refused cleanly, not a
  TypeError mid-resume.
- Every finished file gets the mode the umask gives (0644 under 022), shards included.
- A name that looks like ORG/NAME but that the Hub client refuses is a clean error.
- A source model whose later layer disagrees with its config.json is refused before
  calibration starts.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from compress import hub, models, pipeline
from compress.errors import CompressError
from compress.formats import checkpoint
from compress.quant import QuantScheme
from compress.recipe import CalibrationConfig, Recipe

W4 = Recipe("rtn", QuantScheme(4, 32, True))


def _killed_after_first_layer(model: Path, out: Path, monkeypatch: pytest.MonkeyPatch,
                              recipe: Recipe = W4) -> None:
    """Leave `out.partial` holding layer 0 done, as a run killed in layer 1 does."""
    real_save = checkpoint.atomic_save_safetensors
    shards = []

    def dies_on_second_shard(path, tensors):
        if path.name.startswith("model-"):  # not GPTQ's saved activations
            shards.append(path.name)
        if len(shards) == 2:
            raise KeyboardInterrupt
        real_save(path, tensors)

    monkeypatch.setattr(checkpoint, "atomic_save_safetensors", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        pipeline.quantize(model, recipe, out)
    monkeypatch.setattr(checkpoint, "atomic_save_safetensors", real_save)


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_resume_refuses_another_model_of_the_same_shapes(tiny_factory, tmp_path, monkeypatch):
    a = _copy_model(tiny_factory("llama", num_hidden_layers=3), tmp_path / "model")
    b = tiny_factory("llama", num_hidden_layers=3, seed=1)  # same config, other weights
    weights = a / "model.safetensors"
    assert weights.stat().st_size == (b / "model.safetensors").stat().st_size
    out = tmp_path / "q"
    _killed_after_first_layer(a, out, monkeypatch)

    shutil.copyfile(b / "model.safetensors", weights)  # replaced in place: same path, sizes
    with pytest.raises(CompressError, match=r"q.partial holds an interrupted run that cannot "
                       r"be resumed \(it differs in model_weights_sample_sha256: '[0-9a-f]{12}"
                       r"\.\.\.' -> '[0-9a-f]{12}\.\.\.'\); pass --overwrite to discard it$"):
        pipeline.quantize(a, W4, out)
    result = pipeline.quantize(a, W4, out, overwrite=True)
    assert result.layers_resumed == 0

    clean = tmp_path / "clean"
    pipeline.quantize(b, W4, clean)
    shards = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    written = json.loads((out / checkpoint.MANIFEST).read_text())["files"]
    expected = json.loads((clean / checkpoint.MANIFEST).read_text())["files"]
    assert {s: written[s] for s in shards} == {s: expected[s] for s in shards}


def test_resume_accepts_a_byte_equal_copy_of_the_model(tiny_factory, tmp_path, monkeypatch):
    """The fingerprint is of content: a re-download or copy (new mtime) still resumes."""
    a = _copy_model(tiny_factory("llama", num_hidden_layers=3), tmp_path / "model")
    out = tmp_path / "q"
    _killed_after_first_layer(a, out, monkeypatch)
    weights = a / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data)
    os.utime(weights, (1, 1))
    assert pipeline.quantize(a, W4, out).layers_resumed == 1


def test_sample_fingerprint_sees_a_change_in_a_large_tensor(tiny_factory, tmp_path):
    """Large tensors are sampled (first and middle rows): a fine-tune-like change of every
    value is seen; the digest is of content, so equal files give equal digests."""
    from safetensors.torch import load_file, save_file

    a = _copy_model(tiny_factory("llama"), tmp_path / "a")
    before = checkpoint.SafetensorsDir(a).sample_sha256()
    assert checkpoint.SafetensorsDir(_copy_model(a, tmp_path / "copy")).sample_sha256() == before
    tensors = load_file(a / "model.safetensors")
    embed = "model.embed_tokens.weight"
    assert tensors[embed].numel() * 4 > 64 << 10  # over the read-whole limit: sampled
    tensors[embed] = tensors[embed] * 1.001
    save_file(tensors, a / "model.safetensors", metadata={"format": "pt"})
    assert checkpoint.SafetensorsDir(a).sample_sha256() != before


def _first_entry(state: dict) -> dict:
    return state["done"][sorted(state["done"])[0]]


GPTQ = Recipe("gptq", QuantScheme(4, 32, True), calibration=CalibrationConfig(4, 32, 0))
# progress.json entries of the wrong shape, and the recipe whose resume reads them; each
# failed as TypeError or AttributeError inside pipeline.quantize before.
DAMAGED_PROGRESS = {
    "layer-entry-string": (W4, lambda s: s["done"].__setitem__(sorted(s["done"])[0], "done")),
    "log-a-list": (W4, lambda s: _first_entry(s).__setitem__("log", [1])),
    "log-entry-a-list": (W4, lambda s: _first_entry(s).__setitem__("log", {"m": [0.1]})),
    "awq-skipped-a-list": (W4, lambda s: _first_entry(s).__setitem__("log", {"m": {
        "relative_error": 0.1, "awq": {"skipped": ["unhashable"]}}})),
    "activations-a-list": (GPTQ, lambda s: s.__setitem__("activations", [])),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_PROGRESS))
def test_damaged_progress_is_refused_cleanly(case, tiny_factory, tmp_path, monkeypatch):
    model = tiny_factory("llama", num_hidden_layers=3)
    out = tmp_path / "q"
    recipe, damage = DAMAGED_PROGRESS[case]
    _killed_after_first_layer(model, out, monkeypatch, recipe)
    progress = tmp_path / "q.partial" / pipeline.PROGRESS
    state = json.loads(progress.read_text())
    damage(state)
    progress.write_text(json.dumps(state))
    with pytest.raises(CompressError, match=r"cannot be resumed \(it is unreadable\); pass "
                       "--overwrite to discard it"):
        pipeline.quantize(model, recipe, out)
    if recipe is W4:  # --overwrite starts over (a second GPTQ run would only cost time)
        assert pipeline.quantize(model, recipe, out, overwrite=True).layers_resumed == 0


def _umask() -> int:
    """This process's umask, read without changing it (os.umask can only set it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    pytest.skip("no /proc/self/status umask on this system")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_finished_checkpoint_files_get_the_umask_mode(tiny_llama, tmp_path):
    out = tmp_path / "q"
    pipeline.quantize(tiny_llama, W4, out)
    want = 0o666 & ~_umask()
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
    assert modes == dict.fromkeys(modes, oct(want))  # shards were 0600 (safetensors' temp)


_WRITE_EVERY_KIND = textwrap.dedent("""
    import json, stat, sys
    from pathlib import Path
    import torch
    from compress.formats import checkpoint
    out = Path(sys.argv[1])
    checkpoint.atomic_save_safetensors(out / "a.safetensors", {"x": torch.zeros(2)})
    checkpoint.atomic_write_json(out / "a.json", {})
    checkpoint.atomic_write_bytes(out / "a.bin", b"x")
    print(json.dumps({p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}))
""")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["022", "027"])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    """The mode is fixed when compress.formats.checkpoint is imported: a fresh process."""
    done = subprocess.run([sys.executable, "-c", _WRITE_EVERY_KIND, str(tmp_path)],
                          capture_output=True, text=True, umask=umask, timeout=120, check=True)
    modes = json.loads(done.stdout.splitlines()[-1])
    assert modes == {"a.safetensors": mode, "a.json": mode, "a.bin": mode}


@pytest.mark.parametrize("name", ["a/b..c", "a/b--c", "a/b-", "org/" + "x" * 100])
def test_a_malformed_hub_id_is_a_clean_error(name):
    """These match ORG/NAME, but the Hub client refuses them with its own ValueError
    (HFValidationError), which reached users as a traceback."""
    assert not hub.is_repo_id(name)
    with pytest.raises(CompressError, match=r"is neither a directory nor a bundled model"):
        models.open_model(name)


def test_a_gone_base_model_path_is_named_on_one_line(tiny_llama, tmp_path):
    """Found by the manifest fuzz: the path comes from the manifest and may hold a newline,
    which made the error two lines."""
    from compress import evaluation

    out = tmp_path / "q"
    pipeline.quantize(tiny_llama, W4, out)
    manifest = json.loads((out / checkpoint.MANIFEST).read_text())
    manifest["base_model"].update(path="gone\nhere", name="gone\nhere")
    (out / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CompressError, match=r"base model 'gone\\nhere' is gone; pass "
                       "--baseline DIR") as raised:
        evaluation.resolve_baseline(models.open_model(out), "auto")
    assert "\n" not in str(raised.value)


def test_a_source_with_a_damaged_later_layer_is_refused_before_calibration(
        tiny_factory, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    model = _copy_model(tiny_factory("llama", num_hidden_layers=3), tmp_path / "model")
    shard = next(model.glob("*.safetensors"))
    tensors = load_file(shard)
    name = "model.layers.2.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1].contiguous()  # one output row short
    save_file(tensors, shard, metadata={"format": "pt"})

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started on a model that cannot load")

    monkeypatch.setattr(pipeline.data, "calibration_set", no_calibration)
    gptq = Recipe("gptq", QuantScheme(4, 32, True), calibration=CalibrationConfig(4, 64))
    with pytest.raises(CompressError, match=name.replace(".", r"\.")):
        pipeline.quantize(model, gptq, tmp_path / "out")
