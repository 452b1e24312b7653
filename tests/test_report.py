"""`compress report`: cells are measured once and reused; the recommendation honours the
quality budget; the outputs are files a person can open."""

import json

import pytest

from compress import report


def test_pareto_front_keeps_only_undominated_points():
    points = [(100, 1.0), (110, 0.5), (120, 0.8), (200, 0.01), (90, 2.0)]
    assert sorted(report.pareto_front(points, smaller_x_better=True)) == [0, 1, 3, 4]
    speeds = [(130, 0.4), (100, 0.002), (120, 1.6), (27, 0.0001)]
    assert sorted(report.pareto_front(speeds, smaller_x_better=False)) == [0, 1, 3]


def test_grid_refuses_unknown_methods():
    from compress.errors import CompressError

    with pytest.raises(CompressError, match="unknown method 'hqq'"):
        report.grid(["rtn", "hqq"], [4], [128])


def test_rotations_are_an_axis_of_the_grid_with_keys_of_their_own():
    from compress.errors import CompressError
    from compress.quant.signround import SignRoundConfig
    from compress.recipe import CalibrationConfig

    axis = report.rotations(["none", "hadamard"], seed=2)
    small = CalibrationConfig(samples=16, seqlen=64)
    cells = report.grid(["rtn", "signround"], [4], [128], axis,
                        signround=SignRoundConfig(iters=5), calibration=small)
    assert [c.label for c in cells] == ["rtn-w4g128", "rtn-w4g128-hadamard",
                                        "signround-w4g128", "signround-w4g128-hadamard"]
    plain, rotated, learned, _ = cells
    assert plain.recipe(None)[0].rotate.enabled is False
    assert rotated.recipe(None)[0].to_dict()["rotate"] == {"kind": "hadamard", "seed": 2}
    assert learned.recipe(None)[0].signround == SignRoundConfig(iters=5)
    assert learned.recipe(None)[0].calibration == small
    # a plain cell's key is what it was before rotations existed (finished cells stay
    # reused), and settings a cell does not use leave it alone
    assert plain.key() == {"method": "rtn", "bits": 4, "group_size": 128, "target_bits": None}
    assert rotated.key()["rotate"] == {"kind": "hadamard", "seed": 2}
    assert report.grid(["rtn"], [4], [128], report.rotations(["hadamard"], 3))[0].key() \
        != rotated.key()
    assert learned.key()["signround"] == {"iters": 5, "lr": None, "batch": 8,
                                          "target": "model", "start": "rtn"}
    assert learned.key()["calibration"] == {"samples": 16, "seqlen": 64, "seed": 0}
    assert "signround" not in report.grid(["signround"], [4], [128])[0].key()
    assert [c.label for c in report.mixed_cells(["gptq"], [3.5], axis)] == [
        "gptq-mixed3.5b", "gptq-mixed3.5b-hadamard"]
    with pytest.raises(CompressError, match=r"unknown rotation 'quarot'; available: none, "
                                            r"hadamard"):
        report.rotations(["none", "quarot"])


class _InlinePool:
    """`ProcessPoolExecutor` that runs the submitted call here, at once: the decode timing
    without a fresh interpreter (its imports take most of a cell's time on a tiny model)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        from concurrent.futures import Future

        done = Future()
        done.set_result(fn(*args))
        return done


def test_report_measures_a_cell_once(tiny_llama, tmp_path, monkeypatch):
    """The cheap counterpart of the grid tests below (slow, each cell's speed measured in a
    fresh process as `compress report` does): one cell measured, the files written, the
    recommendation made; the same grid again runs nothing."""
    monkeypatch.setattr(report, "ProcessPoolExecutor", _InlinePool)
    settings = report.Settings(eval_tokens=512, decode_tokens=8, prompt_tokens=32)
    out = tmp_path / "report"
    budget = report.Budget(max_kl=1e9, price_per_hour=0.5)
    first = report.run(tiny_llama, report.grid(["rtn"], [8], [32]), out, settings, budget)
    assert [r["label"] for r in first.rows] == ["baseline", "rtn-w8g32"]
    assert first.reused == []
    for name in ("report.md", "pareto.png", "results.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    w8 = first.rows[1]
    # 8-bit codes + an fp16 scale per 32 weights (+0.5) + shape tensors of tiny Linears
    assert 8.5 < w8["bits_per_weight"] < 9.1 and w8["kl_mean"] > 0 and w8["decode_tok_s"] > 0
    assert w8["cost_per_1m_tokens"] == pytest.approx(0.5 / 3600 / w8["decode_tok_s"] * 1e6)
    assert first.recommended["label"] == "rtn-w8g32"
    again = report.run(tiny_llama, report.grid(["rtn"], [8], [32]), out, settings, budget)
    assert again.reused == ["baseline", "rtn-w8g32"] and again.rows == first.rows
    saved = json.loads((out / "results.json").read_text())
    assert saved["recommended"] == "rtn-w8g32" and len(saved["rows"]) == 2


@pytest.mark.slow
def test_report_runs_the_grid_once_and_resumes_with_new_cells(tiny_llama, tmp_path):
    settings = report.Settings(eval_tokens=512, decode_tokens=8, prompt_tokens=32)
    out = tmp_path / "report"
    budget = report.Budget(max_kl=1e9, price_per_hour=0.5)
    first = report.run(tiny_llama, report.grid(["rtn"], [8], [32]), out, settings, budget)
    assert [r["label"] for r in first.rows] == ["baseline", "rtn-w8g32"]
    assert first.reused == []
    for name in ("report.md", "pareto.png", "results.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    w8 = first.rows[1]
    # 8-bit codes + an fp16 scale per 32 weights (+0.5) + shape tensors of tiny Linears
    assert 8.5 < w8["bits_per_weight"] < 9.1 and w8["kl_mean"] > 0 and w8["decode_tok_s"] > 0
    assert w8["cost_per_1m_tokens"] == pytest.approx(0.5 / 3600 / w8["decode_tok_s"] * 1e6)

    second = report.run(tiny_llama, report.grid(["rtn"], [8, 4], [32]), out, settings,
                        report.Budget(max_kl=w8["kl_mean"] * 1.01))
    assert second.reused == ["baseline", "rtn-w8g32"]  # only the new cell ran
    assert second.rows[1] == {**first.rows[1], "cost_per_1m_tokens": None}
    w4 = second.rows[2]
    assert w4["kl_mean"] > w8["kl_mean"] and w4["bits_per_weight"] < 5.1
    assert second.recommended["label"] == "rtn-w8g32"  # w4 is over the KL budget
    saved = json.loads((out / "results.json").read_text())
    assert saved["recommended"] == "rtn-w8g32" and len(saved["rows"]) == 3
    assert "**Recommended:** `rtn-w8g32`" in (out / "report.md").read_text()


@pytest.mark.slow
def test_report_includes_mixed_precision_cells(tiny_llama, tmp_path):
    settings = report.Settings(eval_tokens=512, decode_tokens=8, prompt_tokens=32)
    cells = report.mixed_cells(["rtn"], [6.0])
    assert [c.label for c in cells] == ["rtn-mixed6b"]
    result = report.run(tiny_llama, cells, tmp_path / "r", settings)
    mixed = result.rows[1]
    assert mixed["target_bits"] == 6.0 and mixed["bits"] is None
    # measured from the stored tensors: within the budget (+ shape tensors of tiny Linears)
    assert 4 < mixed["bits_per_weight"] < 6.1 and mixed["kl_mean"] > 0
    checkpoint = tmp_path / "r" / "checkpoints" / "rtn-mixed6b"
    assert json.loads((checkpoint / "allocation.json").read_text())["target_bits_per_weight"] \
        == 6.0
    again = report.run(tiny_llama, cells, tmp_path / "r", settings)
    assert again.reused == ["baseline", "rtn-mixed6b"]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["gemma3_text", "qwen3_moe"])
def test_report_serves_other_families(tiny_factory, tmp_path, model_type):
    """Per-layer windows and (1 + w) norms; experts beside a dense layer."""
    from conftest import ARCH_CASES

    src = tiny_factory(model_type, **ARCH_CASES[model_type])
    settings = report.Settings(eval_tokens=512, decode_tokens=8, prompt_tokens=32)
    result = report.run(src, report.grid(["rtn", "gptq"], [4], [32]), tmp_path / "r",
                        settings)
    assert [r["label"] for r in result.rows] == ["baseline", "rtn-w4g32", "gptq-w4g32"]
    rtn, gptq = result.rows[1], result.rows[2]
    assert rtn["kl_mean"] > 0 and gptq["kl_mean"] > 0 and gptq["decode_tok_s"] > 0


def test_report_puts_rotated_and_learned_rounding_cells_beside_plain_ones(tiny_llama,
                                                                         tmp_path,
                                                                         monkeypatch):
    """Plain and rotated RTN side by side, and learned rounding at 2 steps: distinct rows,
    distinct checkpoints, each manifest's rotation in its row and the report's notes; a
    re-run with another seed measures only the rotated cell again."""
    import hashlib

    from compress.formats import checkpoint
    from compress.quant.signround import SignRoundConfig
    from compress.recipe import CalibrationConfig

    monkeypatch.setattr(report, "ProcessPoolExecutor", _InlinePool)
    settings = report.Settings(eval_tokens=512, decode_tokens=8, prompt_tokens=32)
    out = tmp_path / "report"
    learned = SignRoundConfig(iters=2, batch=2)

    def cells(seed):
        return [*report.grid(["rtn"], [8], [32], report.rotations(["none", "hadamard"], seed)),
                *report.grid(["signround"], [4], [32], signround=learned,
                             calibration=CalibrationConfig(samples=8, seqlen=64))]

    first = report.run(tiny_llama, cells(1), out, settings)
    labels = ["baseline", "rtn-w8g32", "rtn-w8g32-hadamard", "signround-w4g32"]
    assert [r["label"] for r in first.rows] == labels
    plain, rotated, signround = first.rows[1:]

    def read(label):
        path = out / "checkpoints" / label
        weights = hashlib.sha256(b"".join(p.read_bytes()
                                          for p in sorted(path.glob("*.safetensors"))))
        return checkpoint.read_manifest(path), weights.hexdigest()

    (plain_manifest, plain_weights), (rotated_manifest, rotated_weights) = (
        read("rtn-w8g32"), read("rtn-w8g32-hadamard"))
    assert plain_weights != rotated_weights
    assert "rotation" not in plain_manifest and plain["rotation"] is None
    assert rotated_manifest["recipe"]["rotate"] == {"kind": "hadamard", "seed": 1}
    assert rotated["rotation"] == rotated_manifest["rotation"]
    assert rotated["rotation"]["residual"]["size"] == 64  # the tiny model's hidden size
    assert rotated["kl_mean"] > 0 and rotated["kl_mean"] != plain["kl_mean"]
    signround_manifest, _ = read("signround-w4g32")
    assert signround_manifest["recipe"]["signround"] == learned.to_dict() \
        == signround["signround"]
    assert plain["signround"] is None and "rotation" not in signround_manifest
    assert signround["calibration"] == {"samples": 8, "seqlen": 64, "seed": 0}
    assert signround_manifest["calibration"]["samples"] == 8
    saved = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in saved["rows"]] == labels
    assert saved["rows"][2]["rotation"]["seed"] == 1
    md = (out / "report.md").read_text()
    assert "| rtn-w8g32-hadamard |" in md and "| rtn-w8g32 |" in md
    assert "`-hadamard`: seeded randomised Hadamard rotations" in md and "seed 1" in md
    assert "`signround`: learned rounding, 2 signed-gradient steps" in md
    assert report._series(rotated) == "rtn + hadamard" != report._series(plain)  # plot colour

    again = report.run(tiny_llama, cells(2), out, settings)
    assert again.reused == ["baseline", "rtn-w8g32", "signround-w4g32"]
    assert again.rows[2]["rotation"]["seed"] == 2
    assert read("rtn-w8g32-hadamard")[0]["recipe"]["rotate"]["seed"] == 2


def test_a_new_rounding_revision_measures_cached_cells_again(tiny_llama, monkeypatch):
    from compress import models, quant

    base, cell = models.open_model(tiny_llama), report.grid(["gptq"], [4], [128])[0]
    before = report._cell_key(base, cell, report.Settings())
    monkeypatch.setattr(quant, "REVISION", quant.REVISION + 1)
    assert report._cell_key(base, cell, report.Settings()) != before


def test_tuning_is_an_axis_of_the_grid_with_keys_of_its_own():
    """`--tunings none,tuned`: each setting as quantised and tuned side by side; an untuned
    cell keeps its old key (its cached result stays valid), a tuned one has its own. (The
    tuned row carries the calibration KL the manifest records, and a note says what ran:
    the slow test below.)"""
    from compress.errors import CompressError
    from compress.recipe import CalibrationConfig

    axis = report.tunings(["none", "tuned"], epochs=1)
    small = CalibrationConfig(samples=4, seqlen=32)
    cells = report.grid(["rtn"], [4], [32], tunings=axis, calibration=small)
    plain, tuned = cells
    assert [c.label for c in cells] == ["rtn-w4g32", "rtn-w4g32-tuned"]
    assert plain.key() == {"method": "rtn", "bits": 4, "group_size": 32, "target_bits": None}
    assert tuned.key()["tune"]["epochs"] == 1
    assert tuned.recipe(None)[0].tune.epochs == 1
    with pytest.raises(CompressError, match="unknown tuning 'qat'; available: none, tuned"):
        report.tunings(["qat"])


@pytest.mark.slow
def test_a_tuned_row_records_its_tuning(tiny_llama, tmp_path, monkeypatch):
    from compress.recipe import CalibrationConfig

    cells = report.grid(["rtn"], [4], [32], tunings=report.tunings(["none", "tuned"], 1),
                        calibration=CalibrationConfig(samples=4, seqlen=32))
    monkeypatch.setattr(report, "ProcessPoolExecutor", _InlinePool)
    settings = report.Settings(eval_tokens=512, decode_tokens=8, prompt_tokens=32)
    result = report.run(tiny_llama, cells, tmp_path / "report", settings)
    plain_row, tuned_row = result.rows[1:]
    assert plain_row["tuning"] is None
    assert tuned_row["tuning"]["kl_tuned"] < tuned_row["tuning"]["kl_start"]
    assert tuned_row["calibration"] == {"samples": 4, "seqlen": 32, "seed": 0}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| rtn-w4g32-tuned |" in md and "`-tuned`: the finished checkpoint's scales" in md
