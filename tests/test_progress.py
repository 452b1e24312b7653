"""Status lines on stderr start a line of their own, whatever stdout's streamed text and
the progress bars left on the terminal."""

from __future__ import annotations

import os
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


@pytest.fixture
def log_file(monkeypatch, capsys):
    """stderr is a file (a CI log, `2> log`), not quiet, and a clock the test moves."""
    clock = [100.0]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setattr(progress, "_quiet", False)
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    return clock


def test_off_a_terminal_long_loops_print_plain_lines_with_an_eta(log_file, capsys):
    bar = progress.track(range(4), desc="quantize gptq", unit="layer")
    for i in bar:
        log_file[0] += 10.0  # every layer takes 10 s
        if i == 1:
            bar.set_postfix_str("max rel. error 0.0312")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "quantize gptq: layer 1/4, 10 s elapsed, ETA 30 s",
        "quantize gptq: layer 2/4, 20 s elapsed, ETA 20 s, max rel. error 0.0312",
        "quantize gptq: layer 3/4, 30 s elapsed, ETA 10 s, max rel. error 0.0312",
        "quantize gptq: layer 4/4, 40 s elapsed, max rel. error 0.0312",
    ]


def test_off_a_terminal_quick_steps_are_summarised_not_listed(log_file, capsys):
    for _ in progress.track(range(100), desc="perplexity", unit="batch"):
        log_file[0] += 0.5  # 50 s in all: a line every 5 s at most, and the last
    lines = capsys.readouterr().err.splitlines()
    assert 9 <= len(lines) <= 11
    assert lines[-1] == "perplexity: batch 100/100, 50 s elapsed"
    assert "1 min" not in lines[0] and "ETA" in lines[0]


def test_off_a_terminal_a_short_loop_says_nothing(log_file, capsys):
    for _ in progress.track(range(3), desc="batch sizes", unit="size"):
        log_file[0] += 0.5
    assert capsys.readouterr().err == ""


def test_off_a_terminal_nothing_when_quiet(log_file, capsys, monkeypatch):
    monkeypatch.setattr(progress, "_quiet", True)
    for _ in progress.track(range(3), desc="quantize", unit="layer"):
        log_file[0] += 60
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("seconds", "text"), [(4.4, "4 s"), (65, "1 min 05 s"),
                                               (7380, "2 h 03 min")])
def test_durations_read_as_a_person_writes_them(seconds, text):
    assert progress._duration(seconds) == text


def test_an_unsized_pseudo_terminal_still_gets_a_bar(terminal, monkeypatch):
    # `script`, `docker exec -t`: a tty of 0 x 0, where tqdm would hide the bar
    terminal = terminal()
    monkeypatch.setattr(progress.os, "get_terminal_size", lambda fd: os.terminal_size((0, 0)))
    bar = progress.track(range(3), desc="quantize rtn", total=3, unit="layer")
    for _ in bar:
        bar.refresh()
    assert "quantize rtn" in terminal.readouterr().err
    monkeypatch.setattr(sys.stderr, "fileno", lambda: 2, raising=False)
    monkeypatch.setattr(progress.os, "get_terminal_size", lambda fd: os.terminal_size((120, 40)))
    assert progress._width() == {"dynamic_ncols": True}  # a sized terminal: follow it
