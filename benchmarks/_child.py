"""Run a child process and read its wall time and peak RSS (shared by the benchmark scripts)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time


def run_measured(cmd: list[str]) -> tuple[int, float, int, str]:
    """(exit code, wall seconds, peak RSS bytes, last 4 kB of stderr) of `cmd`."""
    start = time.perf_counter()
    # stderr goes to a file, not a pipe: a chatty child would block on a full pipe buffer.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        log.seek(0)
        tail = log.read().decode(errors="replace")[-4000:]
    return os.waitstatus_to_exitcode(status), seconds, usage.ru_maxrss * 1024, tail
