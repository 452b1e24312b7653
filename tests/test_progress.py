"""Status lines on stderr start a line of their own, whatever stdout's streamed text and
the progress bars left on the terminal."""

from __future__ import annotations

import sys

import pytest

from compress import progress


@pytest.fixture
def terminal(monkeypatch, capsys):
    """stdout and stderr as one terminal would show them (both report a tty), not quiet.
    Call it in the test: capsys swaps the streams in only for the test's own phase."""
    def patch() -> pytest.CaptureFixture:
        for stream in (sys.stdout, sys.stderr):
            monkeypatch.setattr(stream, "isatty", lambda: True)
        monkeypatch.setattr(progress, "_quiet", False)
        monkeypatch.setattr(progress, "_stdout_line_open", False)
        return capsys
    return patch


def stream(text: str) -> None:
    print(text, end="", flush=True)
    progress.streamed(text)


def test_status_after_an_open_line_of_text_starts_a_new_one(terminal):
    terminal = terminal()
    stream("Once upon")
    progress.status("compiling")
    progress.status("again")
    stream(" a time\n")
    progress.status("done")
    out, err = terminal.readouterr()
    assert out == "Once upon a time\n" and err == "\ncompiling\nagain\ndone\n"


def test_the_last_line_after_an_open_line_of_text_starts_a_new_one(terminal):
    terminal = terminal()
    stream("Once upon")
    progress.end_work()
    assert terminal.readouterr().err == "\n"
    progress.end_work()  # the line is fresh now
    assert terminal.readouterr().err == ""


def test_text_going_elsewhere_gets_no_extra_newline(terminal, monkeypatch):
    terminal = terminal()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)  # `compress generate > file`
    stream("Once upon")
    progress.status("compiling")
    assert terminal.readouterr().err == "compiling\n"


def test_end_work_clears_progress_bars(terminal):
    terminal = terminal()
    bar = progress.track(range(3), desc="quantize", total=3)
    layers = iter(bar)  # held: a dropped iterator closes its bar
    next(layers)
    assert not bar.disable  # drawn on the terminal
    progress.end_work()
    assert bar.disable  # tqdm's mark of a closed bar
    progress.status("after")
    assert terminal.readouterr().err.endswith("after\n")
