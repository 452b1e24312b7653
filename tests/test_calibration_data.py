"""Calibration samples: seeded, from bundled text or the user's file/dataset, clear errors."""

import hashlib
import json

import pytest
import torch

from compress import data
from compress.errors import CompressError


@pytest.fixture(scope="module")
def tokenizer(bundled_dir):
    return data.load_tokenizer(bundled_dir)


def test_bundled_samples_are_seeded(tokenizer):
    a = data.calibration_set(tokenizer, None, 4, 64, seed=1)
    b = data.calibration_set(tokenizer, None, 4, 64, seed=1)
    c = data.calibration_set(tokenizer, None, 4, 64, seed=2)
    assert a.samples.shape == (4, 64) and a.samples.dtype == torch.int64
    assert torch.equal(a.samples, b.samples) and a.sha256 == b.sha256
    assert not torch.equal(a.samples, c.samples)
    assert a.describe()["source"].startswith("bundled: CoQA")


def test_text_jsonl_and_dataset_dir_give_the_same_samples(tokenizer, tmp_path):
    records = [f"Record number {i} talks about rivers, hills and the weather." for i in range(80)]
    (tmp_path / "c.txt").write_text("\n\n".join(records))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": r, "id": i})
                                                for i, r in enumerate(records)))
    import datasets

    datasets.Dataset.from_dict({"text": records}).save_to_disk(str(tmp_path / "ds"))
    sets = [data.calibration_set(tokenizer, tmp_path / name, 3, 32, seed=0)
            for name in ("c.txt", "c.jsonl", "ds")]
    assert torch.equal(sets[0].samples, sets[1].samples)
    assert torch.equal(sets[0].samples, sets[2].samples)
    assert sets[0].text_sha256 == sets[2].text_sha256


def test_too_short_text_says_how_much_is_needed(tokenizer, tmp_path):
    (tmp_path / "short.txt").write_text("Only a few words here.")
    with pytest.raises(CompressError, match=r"has \d+ tokens, fewer than one sample of 512; "
                       r"give at least 65536 tokens"):
        data.calibration_set(tokenizer, tmp_path / "short.txt", 128, 512, 0)


def test_dataset_without_text_column(tokenizer, tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CompressError, match=r"no 'text' column \(columns: body\)"):
        data.calibration_set(tokenizer, tmp_path / "c.jsonl", 1, 8, 0)


def test_missing_and_binary_sources(tokenizer, tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        data.calibration_set(tokenizer, tmp_path / "nope.txt", 1, 8, 0)
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(CompressError, match="not UTF-8"):
        data.calibration_set(tokenizer, tmp_path / "b.txt", 1, 8, 0)


def test_token_windows_file_is_used_verbatim(tokenizer, tmp_path):
    """--calib WINDOWS.safetensors: another run's exact windows, the first N in order."""
    from safetensors.torch import save_file

    bundled = data.calibration_set(tokenizer, None, 6, 64, 3)
    path = tmp_path / "windows.safetensors"
    save_file({"windows": bundled.samples}, str(path))
    four = data.calibration_set(tokenizer, path, 4, 64, seed=99)  # no seed applies
    assert torch.equal(four.samples, bundled.samples[:4])
    assert four.text_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "token windows" in four.source
    with pytest.raises(CompressError, match="pass --calib-seqlen 64"):
        data.calibration_set(tokenizer, path, 4, 128, 0)
    with pytest.raises(CompressError, match="holds 6 windows, fewer than the 7"):
        data.calibration_set(tokenizer, path, 7, 64, 0)
    save_file({"windows": bundled.samples + len(tokenizer)}, str(path))
    with pytest.raises(CompressError, match="outside this tokenizer's vocabulary"):
        data.calibration_set(tokenizer, path, 4, 64, 0)
    save_file({"ids": bundled.samples}, str(path))
    with pytest.raises(CompressError, match=r"no int64 .* named 'windows'"):
        data.calibration_set(tokenizer, path, 4, 64, 0)
    path.write_bytes(b"not safetensors")
    with pytest.raises(CompressError, match="cannot read token windows"):
        data.calibration_set(tokenizer, path, 4, 64, 0)
