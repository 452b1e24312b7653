"""Run a child process and read its wall time and peak RSS (shared by the benchmark scripts)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

PEAK = Path(__file__).with_name("_peak.py")


def run_measured(cmd: list[str]) -> tuple[int, float, int, str]:
    """(exit code, wall seconds, peak RSS bytes, last 4 kB of stderr) of `cmd`.

    A Python child (`python -m module ...` or `python script.py ...`) runs under _peak.py,
    which reports its own peak; wait4's figure would include this process's (see there)."""
    start = time.perf_counter()
    python = len(cmd) > 1 and (cmd[1] == "-m" or cmd[1].endswith(".py"))
    # stderr goes to a file, not a pipe: a chatty child would block on a full pipe buffer.
    with tempfile.TemporaryFile() as log, tempfile.NamedTemporaryFile() as peak:
        if python:
            cmd = [cmd[0], str(PEAK), peak.name, *cmd[1:]]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        log.seek(0)
        tail = log.read().decode(errors="replace")[-4000:]
        reported = Path(peak.name).read_text().strip()
    rss = int(reported) if reported else usage.ru_maxrss * 1024
    return os.waitstatus_to_exitcode(status), seconds, rss, tail
