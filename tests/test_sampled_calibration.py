"""Calibration windows sampled from the unquantised model (`--calib-sampled`)."""

import json

import pytest
import torch
from conftest import checkpoint_tensors, chi_square_p_value
from safetensors.torch import load_file

from compress import data, models
from compress.errors import CompressError
from compress.formats import checkpoint
from compress.recipe import CalibrationConfig
from compress.serving.generation import sample_windows


def test_sampled_windows_keep_their_prompts_and_follow_the_seed(tiny_llama):
    model, _ = models.load(tiny_llama, dtype=torch.float32)
    prompts = torch.randint(0, model.cfg.vocab_size, (5, 3))
    a = sample_windows(model, prompts, 12, seed=0, batch=2)
    assert a.shape == (5, 12) and a.dtype == torch.int64
    assert torch.equal(a[:, :3], prompts)
    assert torch.equal(a, sample_windows(model, prompts, 12, seed=0, batch=2))
    assert not torch.equal(a, sample_windows(model, prompts, 12, seed=1, batch=2))
    with pytest.raises(CompressError, match="prompt of 1 to 2 tokens"):
        sample_windows(model, prompts, 3, seed=0)


def test_sampled_windows_follow_the_models_distribution(tiny_factory):
    """Chi-square test on a 16-token vocabulary: the two tokens sampled after a prompt,
    jointly, against the model's exact distribution (made peaked, so that a sampler at
    another temperature fails: random weights give nearly uniform logits)."""
    model = models.load(tiny_factory("llama", seed=3, vocab_size=16), dtype=torch.float32)[0]
    prompt = [3, 9, 4]
    with torch.inference_mode():
        model.lm_head.weight *= 8
        first = model(torch.tensor([prompt])).softmax(-1)[0, -1]
        seconds = model(torch.tensor([[*prompt, t] for t in range(16)])).softmax(-1)[:, -1]
    exact = (first[:, None] * seconds).flatten().double()  # P(t1, t2)
    n = 600
    windows = sample_windows(model, torch.tensor([prompt] * n), 5, seed=0, batch=64)
    counts = torch.bincount(windows[:, 3] * 16 + windows[:, 4], minlength=256).double()
    assert chi_square_p_value(counts, exact) > 1e-3


def test_sampled_setting_round_trips_and_is_omitted_when_off():
    assert "sampled" not in CalibrationConfig().to_dict()
    assert CalibrationConfig(sampled=8).to_dict()["sampled"] == 8
    with pytest.raises(CompressError, match="sampled must be a non-negative integer"):
        CalibrationConfig(sampled=-1)


def test_quantize_records_sampled_windows_and_tune_samples_the_same(cli, tiny_llama,
                                                                    tmp_path):
    out = tmp_path / "q"
    proc = cli("quantize", tiny_llama, "--method", "gptq", "--bits", "4", "--group-size",
               "32", "--calib-samples", "4", "--calib-seqlen", "32", "--calib-sampled", "3",
               "--no-eval", "--out", out, "-q")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / checkpoint.MANIFEST).read_text())
    assert manifest["recipe"]["calibration"]["sampled"] == 3
    used = manifest["calibration"]
    assert used["samples"] == 4 and used["sampled"] == 3 and "sampled from the model" in (
        used["source"])
    real = data.calibration_set(data.load_tokenizer(tiny_llama), None, 4, 32, 0)
    assert used["tokens_sha256"] != real.sha256  # 7 windows, not the 4 of text
    tuned = tmp_path / "t"
    proc = cli("tune", out, "--out", tuned, "--epochs", "1", "-q")
    assert proc.returncode == 0, proc.stderr
    note = json.loads((tuned / "scale_tuning.json").read_text())
    assert note["calibration"]["tokens_sha256"] == used["tokens_sha256"]
    assert "differ" not in proc.stderr
    proc = cli("quantize", tiny_llama, "--calib-sampled", "-2", "--out", tmp_path / "x")
    assert proc.returncode != 0
    assert "sampled must be a non-negative integer" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sampled_windows_are_kept_and_read_back_without_the_model(tiny_llama, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("COMPRESS_SAMPLED_CACHE", str(tmp_path))
    files = models.open_model(tiny_llama)
    calib = data.calibration_set(data.load_tokenizer(tiny_llama), None, 4, 32, 0)
    first = data.with_sampled(calib, files, 3, 0)
    [kept] = tmp_path.glob("*.safetensors")
    real_load = models.load

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded to sample windows that are kept")

    monkeypatch.setattr(models, "load", no_model)
    again = data.with_sampled(calib, files, 3, 0)
    assert torch.equal(again.samples, first.samples) and again.sampled == 3
    with pytest.raises(AssertionError, match="loaded"):  # another seed: another key
        data.with_sampled(calib, files, 3, 1)
    monkeypatch.setattr(models, "load", real_load)
    states = load_file(kept)["generator_states"].clone()  # the file is overwritten below
    for damage in (b"not a safetensors file", "prompts", "states"):
        if damage == "prompts":  # a readable file whose windows do not start with the prompts
            windows = first.samples[4:].clone()
            windows[:, 0] += 1
            checkpoint.atomic_save_safetensors(
                kept, {"windows": windows, "generator_states": states})
        elif damage == "states":  # the right windows without their generator's states
            checkpoint.atomic_save_safetensors(kept, {"windows": first.samples[4:]})
        else:
            kept.write_bytes(damage)
        resampled = data.with_sampled(calib, files, 3, 0)
        assert torch.equal(resampled.samples, first.samples)  # sampled again, same bytes
        assert torch.equal(load_file(kept)["windows"], first.samples[4:])


def test_kept_windows_serve_any_count_with_the_bytes_of_one_run(tiny_llama, tmp_path,
                                                                monkeypatch):
    """One kept file per key, whatever the count: fewer windows read back (resampling only
    a last partial batch), more sample only the new ones, from the generator's kept state.
    Every count gives the bytes of sampling it at once, in a fresh cache."""
    from compress.serving import generation

    monkeypatch.setattr(data, "SAMPLED_BATCH", 2)
    files = models.open_model(tiny_llama)
    calib = data.calibration_set(data.load_tokenizer(tiny_llama), None, 4, 32, 0)

    def at_once(count: int) -> torch.Tensor:
        monkeypatch.setenv("COMPRESS_SAMPLED_CACHE", str(tmp_path / f"once-{count}"))
        return data.with_sampled(calib, files, count, 0).samples

    expected = {count: at_once(count) for count in (3, 4, 5, 6)}
    assert torch.equal(expected[4], expected[6][:8])  # a batch boundary: the same draws
    real_sample = generation.sample_windows
    sampled_rows = []

    def counting(model, prompts, *args, **kwargs):
        sampled_rows.append(len(prompts))
        return real_sample(model, prompts, *args, **kwargs)

    monkeypatch.setattr(generation, "sample_windows", counting)
    monkeypatch.setenv("COMPRESS_SAMPLED_CACHE", str(tmp_path / "shared"))
    for count, rows in ((2, 2), (5, 3), (4, 0), (3, 1), (5, 0), (6, 2)):
        sampled_rows.clear()
        got = data.with_sampled(calib, files, count, 0)
        assert torch.equal(got.samples, expected.get(count, expected[6][:4 + count]))
        assert sum(sampled_rows) == rows, (count, sampled_rows)
    [kept] = (tmp_path / "shared").glob("*.safetensors")
    kept = load_file(kept)
    assert torch.equal(kept["windows"], expected[6][4:])  # never shrunk by a smaller ask
    assert kept["generator_states"].shape[0] == 6 // 2 + 1

    def killed_at_the_third_batch(model, prompts, *args, **kwargs):
        if len(sampled_rows) == 2:
            raise KeyboardInterrupt
        return counting(model, prompts, *args, **kwargs)

    monkeypatch.setenv("COMPRESS_SAMPLED_CACHE", str(tmp_path / "killed"))
    monkeypatch.setattr(generation, "sample_windows", killed_at_the_third_batch)
    sampled_rows.clear()
    with pytest.raises(KeyboardInterrupt):
        data.with_sampled(calib, files, 6, 0)
    monkeypatch.setattr(generation, "sample_windows", counting)
    sampled_rows.clear()
    assert torch.equal(data.with_sampled(calib, files, 6, 0).samples, expected[6])
    assert sampled_rows == [2]  # the two batches kept before the kill were read back


def test_the_tuning_fits_on_its_own_sampled_windows(cli, tiny_llama, tmp_path):
    """`--tune-sampled N` (a recipe's `tune: {sampled: N}`): the layers calibrate on the
    calibration's sampled windows, the tuning on N; the same tensors as the untuned run
    and `compress tune --calib-sampled N` on it, or `tune_checkpoint` given the setting."""
    from compress.quant.scale_tuning import ScaleTuningConfig
    from compress.tune import tune_checkpoint

    common = ("--method", "gptq", "--bits", "2", "--group-size", "32", "--calib-samples",
              "4", "--calib-seqlen", "32", "--calib-sampled", "2", "--no-eval", "-q")
    together = tmp_path / "together"
    proc = cli("quantize", tiny_llama, *common, "--tune", "--tune-epochs", "1",
               "--tune-sampled", "5", "--out", together)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((together / checkpoint.MANIFEST).read_text())
    assert manifest["recipe"]["tune"]["sampled"] == 5
    assert manifest["calibration"]["sampled"] == 2  # the layers'
    note = json.loads((together / "scale_tuning.json").read_text())
    assert note["calibration"]["sampled"] == 5 and note["calibration"]["samples"] == 4
    assert note["calibration"]["tokens_sha256"] != manifest["calibration"]["tokens_sha256"]

    untuned = tmp_path / "untuned"
    assert cli("quantize", tiny_llama, *common, "--out", untuned).returncode == 0
    apart = tmp_path / "apart"
    proc = cli("tune", untuned, "--out", apart, "--epochs", "1", "--calib-sampled", "5", "-q")
    assert proc.returncode == 0, proc.stderr
    by_setting = tune_checkpoint(untuned, tmp_path / "by-setting",
                                 ScaleTuningConfig(epochs=1, sampled=5)).out
    expected = checkpoint_tensors(together)
    for other in (checkpoint_tensors(apart), checkpoint_tensors(by_setting)):
        assert other.keys() == expected.keys()
        assert all(torch.equal(other[k], expected[k]) for k in expected)


def test_tune_sampled_sets_a_recipes_tuning_windows(cli, tiny_llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nmethod: gptq\nscheme: {bits: 2, group_size: 32}\n"
                      "calibration: {samples: 4, seqlen: 32, sampled: 2}\n"
                      "tune: {epochs: 1}\n")
    out = tmp_path / "q"
    proc = cli("quantize", tiny_llama, "--recipe", recipe, "--tune-sampled", "3", "--no-eval",
               "--out", out, "-q")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / checkpoint.MANIFEST).read_text())
    assert manifest["recipe"]["tune"] == {"epochs": 1, "lr": 0.002, "batch": 4, "norms": True,
                                          "sampled": 3}
    assert json.loads((out / "scale_tuning.json").read_text())["calibration"]["sampled"] == 3


def test_tune_sampled_needs_a_tuning_and_a_count(cli, tiny_llama, tmp_path):
    for args, message in ((("--tune-sampled", "5"), "--tune-sampled sets the tuning"),
                          (("--tune", "--tune-sampled", "-1"), "scale tuning sampled must")):
        proc = cli("quantize", tiny_llama, *args, "--no-eval", "--out", tmp_path / "x")
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_tune_sampled_setting_round_trips_and_is_omitted_when_unset(tmp_path):
    from compress.quant.scale_tuning import ScaleTuningConfig
    from compress.recipe import Recipe

    assert "sampled" not in ScaleTuningConfig().to_dict()
    assert ScaleTuningConfig(**ScaleTuningConfig(sampled=224).to_dict()).sampled == 224
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nmethod: gptq\nscheme: {bits: 3, group_size: 128}\n"
                    "calibration: {sampled: 96}\ntune: {epochs: 1, sampled: 224}\n")
    recipe = Recipe.from_yaml(path)
    assert recipe.tune.sampled == 224 and recipe.calibration.sampled == 96
    with pytest.raises(CompressError, match="scale tuning sampled must"):
        ScaleTuningConfig(sampled=True)
