"""The one error type users see.

Everything that is the user's input's fault (a bad flag, a missing file, a corrupt
checkpoint) raises `CompressError` with a one-line message that names the problem and
the fix; the CLI prints it without a traceback and exits non-zero.
"""


class CompressError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class WorkerLost(CompressError):
    """Another process of a torch.distributed group stopped (killed, crashed) or stopped
    answering (`compress.distributed`)."""


class WorkerError(CompressError):
    """An error another process of the group prints: this one stops without a second line."""


def prints(e: CompressError) -> bool:
    """Whether this process prints `e`. Rank 0 (and a process outside any group) prints
    every error but a `WorkerError` (another rank's error reaches it through the
    collective that found it); the other ranks print only a lost worker, since rank 0 may
    be the one that died. So a group stops with one `error:` line."""
    import os

    if isinstance(e, WorkerError):
        return False
    return os.environ.get("RANK", "0") == "0" or isinstance(e, WorkerLost)


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
