"""One progress helper for all long work.

Library code never prints; it wraps long loops in `track(...)` and reports status
through `status(...)`. Both go to stderr so stdout stays clean for results and
streamed text, and both are silent when `set_quiet(True)` was called (tests, --quiet).
On a terminal a loop is a progress bar with an ETA; anywhere else (a log file, CI, a
pipe) it is a plain line now and then ("quantize gptq: layer 3/30, 41 s elapsed, ETA
6 min 10 s"), since a bar's carriage returns make a log unreadable and no bar at all
leaves a long run silent.
A status line always starts a line of its own: above any progress bar, and after a
newline when streamed text has left the terminal's line open.

Long work also says what an interruption would leave behind (`on_interrupt`), so that
Ctrl-C ends with one line telling the user what was kept and how to continue.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

from compress.errors import Interrupted

T = TypeVar("T")

_quiet = False
_bars: weakref.WeakSet[tqdm] = weakref.WeakSet()
# What an interruption outside any `on_interrupt` block leaves (a command sets it).
_note = "nothing was kept"
# Text streamed to stdout (generated tokens) ended mid-line: on a terminal, the next
# line on stderr would continue that line.
_stdout_line_open = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


@contextlib.contextmanager
def libraries_quiet() -> Iterator[None]:
    """Within this block, other libraries' tqdm bars follow our quiet setting too
    (tqdm reads TQDM_DISABLE when a bar is made)."""
    if not _quiet:
        yield
        return
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def track(items: Iterable[T], desc: str, total: int | None = None,
          unit: str = "it") -> tqdm | PlainProgress:
    """`items` wrapped in a progress bar on stderr when it is a terminal, in plain progress
    lines when it is not, in nothing when quiet.

    Iterate it; `.set_postfix_str(...)` adds a short note (a metric, never text).
    """
    if not _quiet and not _is_terminal(sys.stderr):
        return PlainProgress(items, desc, total, unit)
    bar = tqdm(
        items, desc=desc, total=total, unit=unit, disable=True if _quiet else None,
        file=sys.stderr, leave=False, **_width(),
    )
    _bars.add(bar)
    return bar


def _width() -> dict:
    """Follow the terminal's size, unless it reports none: a pseudo-terminal that was
    never sized (`script`, `docker exec -t`, some CI runners) says 0 columns and 0 rows,
    and tqdm then hides every bar (no row left to draw it on)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    return {"ncols": size.columns or 100, "nrows": size.lines or 24}


def _is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class PlainProgress:
    """A progress bar's plain-text stand-in: one line per step, at most one every
    `every` seconds (the last step always), once the loop has run `after` seconds;
    a loop quicker than that says nothing."""

    def __init__(self, items: Iterable[T], desc: str, total: int | None, unit: str,
                 every: float = 5.0, after: float = 2.0) -> None:
        self.items, self.desc, self.unit = items, desc, unit
        self.total = total if total is not None else _length(items)
        self.every, self.after = every, after
        self.n = 0
        self.postfix = ""
        self.disable = False
        self._started = self._said = time.monotonic()
        self._step = None  # seconds per step, smoothed as tqdm's ETA is

    def __iter__(self) -> Iterator[T]:
        self._started = self._said = last = time.monotonic()
        for item in self.items:
            yield item
            now = time.monotonic()
            took, last = now - last, now
            self._step = took if self._step is None else 0.3 * took + 0.7 * self._step
            self.n += 1
            self._maybe_say(now)

    def set_postfix_str(self, note: str) -> None:
        self.postfix = note

    def close(self) -> None:
        self.disable = True

    def _maybe_say(self, now: float) -> None:
        elapsed = now - self._started
        last = self.total is not None and self.n >= self.total
        if self.disable or elapsed < self.after or (now - self._said < self.every and not last):
            return
        self._said = now
        status(self.line(elapsed))

    def line(self, elapsed: float) -> str:
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        parts = [f"{self.desc}: {self.unit} {count}", f"{_duration(elapsed)} elapsed"]
        if self.total and self.n < self.total and self._step is not None:
            parts.append(f"ETA {_duration(self._step * (self.total - self.n))}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)


def _length(items: object) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def _duration(seconds: float) -> str:
    """4 s, 1 min 05 s, 2 h 03 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def status(message: str) -> None:
    """A one-line note about what long work is doing (stderr; never tokens or text)."""
    if not _quiet:
        _break_stdout_line()
        tqdm.write(message, file=sys.stderr)  # clears and redraws bars around it
        sys.stderr.flush()


def streamed(text: str) -> None:
    """Record text just written to stdout, so that status lines start on a fresh line."""
    global _stdout_line_open
    if text:
        _stdout_line_open = not text.endswith("\n")


def end_work() -> None:
    """Before a command's last line (an error, an interruption): progress bars are gone
    and the terminal's line is fresh."""
    for bar in list(_bars):
        bar.close()
    _break_stdout_line()


def _break_stdout_line() -> None:
    global _stdout_line_open
    if _stdout_line_open and sys.stdout.isatty() and sys.stderr.isatty():
        sys.stdout.flush()
        sys.stderr.write("\n")
        _stdout_line_open = False


def interrupt_note(note: str | None = None) -> str:
    """Set (with `note`) and return what an interruption outside any `on_interrupt` block
    leaves behind: a command's own note, from its start."""
    global _note
    if note is not None:
        _note = note
    return _note


_ctrl_c_pending = False  # a Ctrl-C whose KeyboardInterrupt may have been swallowed


def _on_sigint(signum: int, frame: object) -> None:
    global _ctrl_c_pending
    _ctrl_c_pending = True
    raise KeyboardInterrupt


def catch_ctrl_c() -> None:
    """Ctrl-C raises KeyboardInterrupt, as by default, and is remembered too: Python raises
    it wherever the main thread is, and one raised inside a finalizer (a `__del__` run by
    a collection) is printed and dropped. Long loops call `raise_if_interrupted` at their
    safe points so such a Ctrl-C still stops them. A no-op off the main thread or where
    someone else handles SIGINT."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _on_sigint)


def raise_if_interrupted() -> None:
    """KeyboardInterrupt if a Ctrl-C came and was not delivered (see `catch_ctrl_c`)."""
    global _ctrl_c_pending
    if _ctrl_c_pending:
        _ctrl_c_pending = False
        raise KeyboardInterrupt


def interrupt_delivered() -> None:
    """The pending Ctrl-C reached its handler: no later safe point raises it again."""
    global _ctrl_c_pending
    _ctrl_c_pending = False


@contextlib.contextmanager
def on_interrupt(note: str | Callable[[], str]) -> Iterator[None]:
    """Ctrl-C within this block raises `Interrupted(note)`: what the work so far left
    behind and how to continue ("3 of 30 layers are kept in ...; re-run the same command
    to resume"). A callable note is read when the interruption comes. The innermost
    block's note wins; outer blocks pass it on."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt as e:
        interrupt_delivered()
        raise Interrupted(note() if callable(note) else note) from e
