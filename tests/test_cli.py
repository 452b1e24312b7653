"""The CLI as a user runs it: exit codes, one-line errors, no debris.

Tests taking the `cli` fixture run each command in this process by default and through a
real subprocess in the slow set (`-m slow`); `run` is always a subprocess.
"""

import json
import sys

import pytest
from conftest import cli_in_process
from conftest import cli_subprocess as run


def assert_one_line_error(proc, pattern):
    import re

    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in proc.stderr


def test_quantize_generate_eval_on_tiny_model(cli, tiny_llama, tmp_path):
    out = tmp_path / "q"
    proc = cli("quantize", tiny_llama, "--bits", "4", "--group-size", "32", "--asym",
               "--out", out, "--no-eval", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "quantised Linears" in proc.stdout and (out / "config.json").is_file()

    proc = cli("generate", out, "--prompt", "Hello there", "--max-new-tokens", "8",
               "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()  # random weights: some text, content irrelevant
    # our CPU kernel served the packed matmuls (the line stays whole for grep)
    assert "kernels: cpu-native" in proc.stderr

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    report = tmp_path / "ppl.json"
    proc = cli("eval", out, "--ppl", "--text", text, "--ctx", "64", "--max-tokens", "256",
               "--json", report, "-q")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    assert result["tokens"] == 4 * 63 and result["ppl"] > 1


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["gemma3_text", "phi3"])
def test_every_command_serves_another_family(tiny_factory, tmp_path, model_type):
    """quantize (GPTQ) -> generate (eager and --aot) -> eval -> bench on a family with
    per-layer windows and RoPE, (1 + w) norms and q/k norms, or fused projections."""
    from conftest import ARCH_CASES

    src, out = tiny_factory(model_type, **ARCH_CASES[model_type]), tmp_path / "q"
    proc = run("quantize", src, "--method", "gptq", "--bits", "4", "--group-size", "32",
               "--calib-samples", "4", "--calib-seqlen", "32", "--out", out, "--no-eval", "-q")
    assert proc.returncode == 0, proc.stderr
    args = ("generate", out, "-p", "Once upon a time", "-n", "12", "--ignore-eos")
    eager, aot = run(*args, "-q"), run(*args, "--aot")
    assert eager.returncode == 0 and aot.returncode == 0, aot.stderr
    assert eager.stdout.strip() and aot.stdout == eager.stdout
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    report = tmp_path / "eval.json"
    proc = run("eval", out, "--text", text, "--ctx", "64", "--max-tokens", "256", "--json",
               report, "-q")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    assert result["kl_mean"] > 0 and result["baseline_ppl"] > 1 and result["ppl"] > 1
    bench = tmp_path / "bench.json"
    proc = run("bench", out, "--batch-sizes", "1,2", "--requests", "4", "--prompt-len", "16",
               "--output-len", "8", "--json", bench, "-q")
    assert proc.returncode == 0, proc.stderr
    assert [r["batch_size"] for r in json.loads(bench.read_text())["results"]] == [1, 2]


@pytest.mark.slow
def test_generate_ahead_of_time_matches_eager_and_is_compiled_once(tiny_llama, tmp_path):
    args = ("generate", tiny_llama, "-p", "Once upon", "-n", "10", "--ignore-eos")
    stored = {"COMPRESS_AOT_CACHE": str(tmp_path / "aot")}
    eager, aot = run(*args, "-q"), run(*args, "--aot", merged=True, env=stored)
    assert aot.returncode == 0, aot.stdout
    # the same text, whole: the compile's status line came before it, on a line of its own
    assert eager.stdout.strip() and eager.stdout in aot.stdout
    status, _, stats = aot.stdout.partition(eager.stdout)
    assert status.startswith("compiling the decode step ahead of time") and status.endswith("\n")
    assert "compiling took" in stats  # the compile is timed apart from decoding
    assert len(list((tmp_path / "aot").glob("step-*.pt2"))) == 1
    # the next process loads the step the first one compiled, and decodes the same text
    again = run(*args, "--aot", merged=True, env=stored)
    assert again.returncode == 0, again.stdout
    status, _, _ = again.stdout.partition(eager.stdout)
    assert status.startswith("loading the decode step compiled ahead of time"), again.stdout
    # a damaged package is compiled again, not an error
    package = next((tmp_path / "aot").glob("step-*.pt2"))
    package.write_bytes(b"not a package")
    damaged = run(*args, "--aot", merged=True, env=stored)
    assert damaged.returncode == 0 and eager.stdout in damaged.stdout, damaged.stdout
    assert "would not load" in damaged.stdout and "compiling the decode step" in damaged.stdout


def test_sampled_generation_is_reproducible_from_cli(cli, tiny_llama):
    args = ("generate", tiny_llama, "-p", "Once", "-n", "10", "--temperature", "0.8",
            "--top-p", "0.9", "--seed", "3", "--ignore-eos", "-q")
    first, second = cli(*args), cli(*args)
    assert first.returncode == 0 and first.stdout == second.stdout


@pytest.mark.parametrize("args,pattern", [
    (["--bits", "5"], r"bits=5 is not supported; choose one of 2, 3, 4, 8"),
    (["--group-size", "-3"], r"group size -3 is invalid"),
    (["--group-size", "100"], r"group size 100 does not divide the 64 input features"),
    (["--method", "smoothquant"], r"unknown method 'smoothquant'; available: rtn, gptq, awq"),
    (["--method", "awq", "--awq-grid", "0"], r"AWQ grid must be a positive integer"),
    (["--method", "gptq", "--calib-samples", "0"], r"calibration samples must be a positive"),
    (["--method", "gptq", "--damp", "2"], r"GPTQ damp must be in \(0, 1\)"),
    (["--target-bits", "2", "--options", "w3g32,w8"], r"--target-bits 2 is below the "
                                                      r"cheapest option set"),
    (["--target-bits", "4", "--options", "w5g32"], r"bits=5 is not supported"),
    (["--target-bits", "4", "--options", "int4"], r"--options 'int4': give labels like"),
    (["--method", "gptq", "--match", "fp"], r"--match 'fp': choose model or layer"),
    (["--method", "signround", "--signround-start", "awq"],
     r"signround start must be one of rtn, gptq, got 'awq'"),
    (["--method", "signround", "--signround-start", "gptq", "--dynamic-groups"],
     r"signround starting from GPTQ needs GPTQ's static groups"),
    (["--method", "gptq", "--match-strength", "0"], r"GPTQ target_strength must be in"),
])
def test_quantize_bad_options(cli, tiny_llama, tmp_path, args, pattern):
    out = tmp_path / "q"
    proc = cli("quantize", tiny_llama, *args, "--out", out, "--no-eval")
    assert_one_line_error(proc, pattern)
    assert not out.exists() and not (tmp_path / "q.partial").exists()


@pytest.mark.parametrize("args,pattern", [
    (["--rotations", "none,quarot"], r"unknown rotation 'quarot'; available: none, hadamard"),
    (["--rotations", "hadamard", "--rotate-seed", "-1"], r"rotate seed must be a non-negative"),
    (["--methods", "signround", "--signround-iters", "0"], r"signround iters must be a "
                                                           r"positive integer, got 0"),
    (["--methods", "gptq", "--calib-samples", "0"], r"calibration samples must be a positive"),
    # before the uniform cells' minutes of work, not after them
    (["--methods", "rtn", "--target-bits", "3.5"], r"--target-bits 3.5 is below the cheapest"),
])
def test_report_bad_options(cli, tiny_llama, tmp_path, args, pattern):
    out = tmp_path / "r"
    assert_one_line_error(cli("report", tiny_llama, *args, "--out", out), pattern)
    assert not out.exists()


def test_report_flags_reach_the_grid(tiny_llama, tmp_path, monkeypatch):
    """--rotations is an axis beside the others; quantize's signround and calibration flags
    reach the cells that use them. In this process only: the stand-in for `report.run`
    cannot reach a subprocess."""
    from compress import report
    from compress.errors import CompressError

    grids = []

    def run(model, cells, *args, **kwargs):
        grids.append(cells)
        raise CompressError("stopped before the work")

    monkeypatch.setattr(report, "run", run)
    proc = cli_in_process("report", tiny_llama, "--methods", "gptq,signround", "--bits", "3",
               "--rotations", "none,hadamard", "--rotate-seed", "4", "--target-bits", "3.5",
               "--signround-iters", "3", "--signround-batch", "2", "--signround-start", "gptq",
               "--signround-lr", "0.01", "--signround-fixed-ranges",
               "--signround-precision", "bfloat16", "--signround-warmup", "2",
               "--signround-retry-lr", "0.001", "--signround-trim", "0.002",
               "--signround-loss", "normed", "--calib-samples", "16", "--calib-seqlen", "64",
               "--out", tmp_path / "r")
    assert_one_line_error(proc, "stopped before the work")
    [cells] = grids
    assert [c.label for c in cells] == [
        "gptq-w3g128", "gptq-w3g128-hadamard", "signround-w3g128", "signround-w3g128-hadamard",
        "gptq-mixed3.5b", "gptq-mixed3.5b-hadamard", "signround-mixed3.5b",
        "signround-mixed3.5b-hadamard"]
    assert {(c.rotate.kind, c.rotate.seed) for c in cells[1::2]} == {("hadamard", 4)}
    assert {(c.signround.iters, c.signround.batch, c.signround.start, c.signround.lr,
             c.signround.learn_ranges, c.signround.precision, c.signround.warmup,
             c.signround.retry_lr, c.signround.trim, c.signround.loss)
            for c in cells} == {(3, 2, "gptq", 0.01, False, "bfloat16", 2, 0.001, 0.002,
                                 "normed")}
    assert {(c.calibration.samples, c.calibration.seqlen) for c in cells} == {(16, 64)}


def test_unknown_flag_is_a_usage_error_not_a_traceback(cli, tiny_llama):
    proc = cli("quantize", tiny_llama, "--no-evaluate")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "No such option: --no-evaluate" in proc.stderr


def test_quantize_missing_and_non_model_dirs(cli, tmp_path):
    assert_one_line_error(cli("quantize", tmp_path / "missing", "--out", tmp_path / "o"),
                          "neither a directory nor a bundled model")
    (tmp_path / "junk").mkdir()
    assert_one_line_error(cli("quantize", tmp_path / "junk", "--out", tmp_path / "o"),
                          "has no config.json")
    assert not (tmp_path / "o").exists()


def test_quantize_refuses_non_empty_out(cli, tiny_llama, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "x").write_text("mine")
    assert_one_line_error(cli("quantize", tiny_llama, "--out", out, "--no-eval"),
                          "already exists and is not empty; pass --overwrite")
    assert (out / "x").read_text() == "mine"


def test_corrupt_checkpoint_is_reported_by_generate(cli, tiny_llama, tmp_path):
    out = tmp_path / "q"
    assert cli("quantize", tiny_llama, "--out", out, "--no-eval", "-q").returncode == 0
    shard = out / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert_one_line_error(cli("generate", out, "-p", "hi"), "truncated or was changed")


def test_gptq_from_cli_with_user_calibration_file(cli, tiny_llama, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("A river runs through the valley, past mills and farms. " * 200)
    out = tmp_path / "q"
    proc = cli("quantize", tiny_llama, "--method", "gptq", "--calib", text, "--calib-samples",
               "4", "--calib-seqlen", "32", "--out", out, "--no-eval")
    assert proc.returncode == 0, proc.stderr
    assert "relative output error per Linear" in proc.stdout
    assert f"calibration: 4 × 32 tokens from {text}" in proc.stdout
    assert (out / "quantization_log.json").is_file()


def test_gptq_calibration_too_short(cli, tiny_llama, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("too short")
    proc = cli("quantize", tiny_llama, "--method", "gptq", "--calib", text, "--out",
               tmp_path / "q", "--no-eval")
    assert_one_line_error(proc, r"fewer than one sample of 512; give at least 65536 tokens")
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_generate_on_a_missing_gpu_is_a_clear_error(cli, tiny_llama):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_one_line_error(cli("generate", tiny_llama, "-p", "hi", "--device", "cuda"),
                          "no CUDA device")


def test_generate_needs_a_prompt(cli, tiny_llama):
    assert_one_line_error(cli("generate", tiny_llama), "give a prompt")


def test_help_lists_commands():
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("quantize", "generate", "eval", "setup"):
        assert command in proc.stdout


def test_version():
    import compress

    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout == f"compress {compress.__version__}\n"


@pytest.mark.parametrize("command", ["quantize", "generate", "eval", "bench", "report", "push",
                                     "setup", None])
def test_help_lines_name_kinds_not_python_types(command):
    from typer.testing import CliRunner

    from compress.cli import app

    args = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"}, prog_name="compress")
    assert result.exit_code == 0, result.output
    for python_type in ("<bool>", "<str>", "<int>", "<float>", "<path>"):
        assert python_type not in result.output
    if command == "quantize":
        lines = result.output.splitlines()
        assert any("--bits" in line and "INTEGER" in line for line in lines)
        assert any("--calib " in line and "PATH" in line for line in lines)
        sym = next(line for line in lines if "--sym" in line)
        assert "--asym" in sym and "Symmetric" in sym and "BOOL" not in sym.upper()


def test_quantize_without_tokenizer_fails_before_the_work(cli, tmp_path):
    from conftest import make_tiny_model

    src = make_tiny_model(tmp_path / "m", tmp_path / "no-tokenizer-here")
    out = tmp_path / "q"
    assert_one_line_error(cli("quantize", src, "--out", out),
                          r"cannot load a tokenizer from .*, which evaluating the checkpoint "
                          r"needs \(it has no tokenizer files: .*\); copy the base model's "
                          r"tokenizer files into it, or pass --no-eval")
    assert not out.exists() and not (tmp_path / "q.partial").exists()
    assert_one_line_error(cli("quantize", src, "--method", "gptq", "--out", out, "--no-eval"),
                          r"which gptq calibration needs .* or use --method rtn")
    proc = cli("quantize", src, "--out", out, "--no-eval", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file()


def test_a_failed_evaluation_says_the_checkpoint_is_there(tiny_llama, tmp_path, monkeypatch,
                                                           capsys):
    from compress import cli
    from compress.errors import CompressError

    def fail(*args, **kwargs):
        raise CompressError("the held-out text is too short")

    monkeypatch.setattr("compress.evaluation.evaluate", fail)
    out = tmp_path / "q"
    monkeypatch.setattr(sys, "argv", ["compress", "quantize", str(tiny_llama), "--out", str(out),
                                      "-q"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: the checkpoint {out} is complete, but evaluating it failed: the held-out "
        f"text is too short (`compress eval {out}` runs it again)")
    assert (out / "config.json").is_file()


def test_quantize_says_what_it_will_do_before_it_starts(cli, tiny_llama, tmp_path):
    out = tmp_path / "q"
    proc = cli("quantize", tiny_llama, "--out", out, "--eval-tokens", "256")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == (
        f"Quantising {tiny_llama.name} (rtn-w4g128-sym) into {out}, then evaluating the "
        "original and the quantised model on 256 held-out tokens (most of the run's time; "
        "--no-eval skips it)")
    proc = cli("quantize", tiny_llama, "--out", tmp_path / "r", "--no-eval")
    assert proc.stderr.splitlines()[0] == (f"Quantising {tiny_llama.name} (rtn-w4g128-sym) "
                                           f"into {tmp_path / 'r'}")


def test_recipe_takes_calibration_flags_and_refuses_the_flags_it_sets(tiny_llama, tmp_path):
    from compress.recipe import Recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: gptq\nscheme: {bits: 4, group_size: 32}\n"
                      "calibration: {samples: 64, seqlen: 256}\n")
    out = tmp_path / "out"
    done = cli_in_process("quantize", tiny_llama, "--recipe", recipe, "--calib-samples", "4",
                          "--calib-seqlen", "16", "--seed", "7", "--no-eval", "-q",
                          "--out", out)
    assert done.returncode == 0, done.stderr
    calibration = Recipe.from_yaml(out / "recipe.yaml").calibration
    assert (calibration.samples, calibration.seqlen, calibration.seed) == (4, 16, 7)
    for flag in (["--bits", "3"], ["--method", "rtn"], ["--asym"], ["--damp", "0.1"],
                 ["--signround-iters", "10"], ["--signround-fixed-ranges"],
                 ["--signround-lr", "0.01"], ["--signround-warmup", "5"],
                 ["--signround-retry-lr", "0.001"], ["--signround-trim", "0.001"],
                 ["--signround-loss", "normed"]):
        refused = cli_in_process("quantize", tiny_llama, "--recipe", recipe, *flag,
                                 "--no-eval", "--out", tmp_path / "no")
        assert refused.returncode == 2, flag
        assert "is set by the recipe" in refused.stderr and flag[0] in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "no").exists()


def test_the_learning_precision_flag_overrides_the_recipes(tiny_llama, tmp_path):
    """--signround-precision is how the machine runs the steps, not the algorithm: it
    overrides a recipe's, and the checkpoint's recipe records what ran."""
    from compress.recipe import Recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: signround\nscheme: {bits: 4, group_size: 32}\n"
                      "calibration: {samples: 4, seqlen: 16}\n"
                      "signround: {iters: 2, batch: 2, optimizer: adam}\n")
    out = tmp_path / "out"
    done = cli_in_process("quantize", tiny_llama, "--recipe", recipe, "--signround-precision",
                          "bfloat16", "--no-eval", "-q", "--out", out)
    assert done.returncode == 0, done.stderr
    assert Recipe.from_yaml(out / "recipe.yaml").signround.precision == "bfloat16"
    bad = cli_in_process("quantize", tiny_llama, "--recipe", recipe, "--signround-precision",
                         "float16", "--no-eval", "--out", tmp_path / "no")
    assert_one_line_error(bad, "signround precision must be one of float32, bfloat16, "
                               "got 'float16'")
    assert not (tmp_path / "no").exists()


def test_every_quantize_flag_is_placed_beside_a_recipe():
    """A new quantize flag must say how it meets --recipe: refused (the recipe sets it),
    overriding the recipe's (calibration windows, the learning steps' precision), or
    independent of the recipe."""
    import typer

    from compress import cli

    # tune_sampled and tune_precision override a recipe's tuning's windows and precision,
    # but only where it has a tuning
    independent = {"model", "rotate", "rotate_seed", "tune", "tune_epochs", "tune_sampled",
                   "tune_precision",
                   "calib", "recipe",
                   "allow_pickle", "target_bits", "options", "out", "overwrite", "resume",
                   "evaluate", "eval_tokens", "device", "workers", "save_activations", "quiet",
                   "threads"}
    command = typer.main.get_command(cli.app).commands["quantize"]
    names = {p.name for p in command.params}
    placed = set(cli._RECIPE_FLAGS) | set(cli._OVERRIDING_FLAGS) | independent
    assert names - placed == set()
    assert set(cli._RECIPE_FLAGS) <= names and set(cli._OVERRIDING_FLAGS) <= names
