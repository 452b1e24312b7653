"""Ctrl-C: every command exits 130 with one line saying what was kept and how to go on
(a shell's `compress ... && next` must stop; issue 22)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from compress import cli

PAUSE_ENV = "COMPRESS_FAULT_PAUSE_AT"  # compress/pipeline.py: _pause_point
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="stops and signals a process")


def _sigint_default() -> None:
    """In the child: Ctrl-C as a shell's foreground job gets it. A background job of a
    non-interactive shell (`pytest ... &`) ignores SIGINT, and its children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "COMPRESS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop(PAUSE_ENV, None)
    return {**env, **extra}


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.slow  # two interpreters; in-process below: the stop between layers, the resume
def test_ctrl_c_in_gptq_layers_exits_130_and_the_rerun_resumes(tiny_llama, tmp_path):
    out = tmp_path / "q"
    args = [sys.executable, "-m", "compress.cli", "quantize", str(tiny_llama), "--method",
            "gptq", "--calib-samples", "4", "--calib-seqlen", "32", "--out", str(out),
            "--no-eval", "-q"]  # -q: no status lines, so the interruption's is the only one
    # The run stops itself once layer 0 is recorded, inside the layer loop; SIGINT waits
    # there as a pending signal and lands when it continues, as a Ctrl-C between layers.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(**{PAUSE_ENV: "layer-0-done"}),
                            preexec_fn=_sigint_default)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), proc.communicate()
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate()

    assert proc.returncode == 130, stderr
    partial = tmp_path / "q.partial"
    assert lines(stderr) == [f"interrupted; 1 of 2 layers are kept in {partial}; re-run the "
                             "same command to resume"]
    assert "Traceback" not in stderr and not out.exists() and partial.is_dir()

    rerun = subprocess.run(args, capture_output=True, text=True, env=cli_env())
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed: 1 layers came from an interrupted run." in rerun.stdout
    assert (out / "config.json").is_file() and not partial.exists()


class _SwallowsCtrlC:
    """Ctrl-C arrives while this object's finalizer runs: Python raises KeyboardInterrupt
    there, prints it and drops it."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # bytecode, so the handler runs here, inside the finalizer
            pass


def test_a_ctrl_c_a_finalizer_swallowed_still_stops_between_layers(tiny_llama, tmp_path,
                                                                   monkeypatch):
    from compress import pipeline, progress
    from compress.quant import QuantScheme
    from compress.recipe import CalibrationConfig, Recipe

    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a foreground job
    progress.catch_ctrl_c()
    calls = []

    def release_freed():  # the layer loop's last step: the finalizer runs in layer 0
        calls.append(1)
        if len(calls) == 1:
            _SwallowsCtrlC()

    monkeypatch.setattr(pipeline, "release_freed", release_freed)
    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_type))
    recipe = Recipe("gptq", QuantScheme(4, 32, True),
                    calibration=CalibrationConfig(samples=4, seqlen=32))
    try:
        with pytest.raises(KeyboardInterrupt):
            pipeline.quantize(tiny_llama, recipe, tmp_path / "q")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert swallowed == [KeyboardInterrupt]  # dropped by the finalizer, raised by the loop
    assert len(calls) == 1 and not (tmp_path / "q").exists()
    assert pipeline.quantize(tiny_llama, recipe, tmp_path / "q").layers_resumed == 1
    progress.raise_if_interrupted()  # nothing left pending


def _raise_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _run_main(monkeypatch, capsys, *args: object) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["compress", *map(str, args)])
    monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize("target,args,note", [
    ("compress.api.Generation", ("generate", "-p", "hi", "-q"), "nothing was written"),
    ("compress.evaluation.evaluate", ("eval", "-q"),
     "nothing was written; a model's pass that finished is cached, and the same command "
     "reuses it"),
    ("compress.api.benchmark_serving", ("bench", "-q"), "nothing was written"),
    ("compress.report.run", ("report", "--out", "{tmp}/r", "-q"),
     "finished cells are kept in {tmp}/r/cells; re-run the same command to continue"),
    ("compress.hub.push", ("push", "{tmp}", "--repo", "me/m", "--dry-run", "-q"),
     "nothing was sent"),
    ("compress.hub.push", ("push", "{tmp}", "--repo", "me/m", "-q"),
     "re-run the same command with --exist-ok to finish the push (files the Hub already "
     "holds are not sent again)"),
    ("compress.assets.setup", ("setup", "-q"),
     "finished steps are kept, a half-done one is not; re-run the same command to finish"),
    ("compress.api.quantize", ("quantize", "-q"),
     "nothing was written; re-run the same command to start again"),
])
def test_ctrl_c_says_what_each_command_kept(monkeypatch, capsys, tmp_path, target, args,
                                            note):
    module, _, name = target.rpartition(".")
    monkeypatch.setattr(f"{module}.{name}", _raise_interrupt)
    code, err = _run_main(monkeypatch, capsys, *(a.format(tmp=tmp_path) for a in args))
    assert code == 130
    assert lines(err) == [f"interrupted; {note.format(tmp=tmp_path)}"]


def test_ctrl_c_in_quantize_evaluation_keeps_the_checkpoint(monkeypatch, capsys, tiny_llama,
                                                            tmp_path):
    monkeypatch.setattr("compress.evaluation.evaluate", _raise_interrupt)
    out = tmp_path / "q"
    code, err = _run_main(monkeypatch, capsys, "quantize", tiny_llama, "--out", out, "-q")
    assert code == 130
    assert lines(err) == [f"interrupted; the checkpoint {out} is complete; its evaluation "
                          f"was cut short (`compress eval {out}` runs it)"]
    assert (out / "config.json").is_file()
