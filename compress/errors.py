"""The one error type users see.

Everything that is the user's input's fault (a bad flag, a missing file, a corrupt
checkpoint) raises `CompressError` with a one-line message that names the problem and
the fix; the CLI prints it without a traceback and exits non-zero.
"""


class CompressError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ("" if it has none), for one-line errors
    that quote a failure from deep inside a library."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying what the interrupted work left behind and how to continue (one
    line, see `compress.progress.on_interrupt`)."""

    def __init__(self, note: str):
        super().__init__(note)
        self.note = note
