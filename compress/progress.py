"""One progress helper for all long work.

Library code never prints; it wraps long loops in `track(...)` and reports status
through `status(...)`. Both go to stderr so stdout stays clean for results and
streamed text, and both are silent when `set_quiet(True)` was called (tests, --quiet).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_quiet = False


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


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> tqdm:
    """`items` wrapped in a progress bar on stderr (none when quiet or not a terminal).

    Iterate it; `.set_postfix_str(...)` adds a short note (a metric, never text).
    """
    return tqdm(
        items, desc=desc, total=total, unit=unit, disable=True if _quiet else None,
        file=sys.stderr,
        dynamic_ncols=True, leave=False,
    )


def status(message: str) -> None:
    """A one-line note about what long work is doing (stderr; never tokens or text)."""
    if not _quiet:
        print(message, file=sys.stderr, flush=True)
