"""How many threads our compute uses, chosen so that a busy machine slows us down instead
of stopping us.

Two failure modes on a shared machine: (1) OpenMP threads that finish their share of a
parallel region spin at the barrier, burning the core the straggler needs; (2) a region
split over more threads than there are free cores waits, at every barrier, for a thread
the scheduler has not run yet: hundreds of regions per decoded token each wait a time
slice. So OpenMP waits passively (set before torch loads OpenMP; an explicit
OMP_WAIT_POLICY wins), and the default thread count is the cores nobody else is running
on, sampled when a command starts.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from compress.errors import CompressError

ENV = "COMPRESS_THREADS"  # a thread count, or "auto"
SAMPLES, SAMPLE_GAP_S = 5, 0.02


def prefer_passive_waiting() -> None:
    """Threads that finish early sleep instead of spinning. Effective only before OpenMP
    starts (before torch is imported); the user's own setting wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's CPU set)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _runnable() -> float | None:
    """Threads running or ready to run right now, machine-wide (ours included)."""
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                if line.startswith("procs_running"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def busy_cores() -> float:
    """Cores other processes are using now: the median of a few samples of the runnable
    threads (less our own sampling thread), or the 1-minute load where /proc has none."""
    samples = []
    for i in range(SAMPLES):
        running = _runnable()
        if running is None:
            return max(0.0, os.getloadavg()[0] - 1) if hasattr(os, "getloadavg") else 0.0
        samples.append(running - 1)
        if i + 1 < SAMPLES:
            time.sleep(SAMPLE_GAP_S)
    return max(0.0, statistics.median(samples))


def free_cores() -> int:
    """The usable cores nobody else is running on; at least one."""
    return max(1, usable_cores() - round(busy_cores()))


def parse(value: str | int | None) -> int | None:
    """A thread request: a positive count, or None/"auto" for the free cores."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(value, bool):
        raise CompressError(f"threads must be a positive number or 'auto', got {value!r}")
    return n


def choose(requested: str | int | None = None) -> tuple[int, str]:
    """The thread count to use and why: an explicit request (argument, then
    $COMPRESS_THREADS), then the user's OMP_NUM_THREADS, then the free cores."""
    explicit = parse(requested) if requested is not None else parse(os.environ.get(ENV))
    if explicit is not None:
        return explicit, "requested"
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    cores, free = usable_cores(), free_cores()
    if free == cores:
        return cores, f"{cores} cores, all free"
    return free, f"{cores - free} of {cores} cores busy with other work"


def apply(requested: str | int | None = None) -> tuple[int, str]:
    """Use the chosen thread count for torch's intra-op work (our CPU kernel parallelises
    through it too). Before torch is imported this is the environment torch starts its
    thread pool from, so that a command that fails on its input never pays for torch."""
    n, why = choose(requested)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    else:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    return n, why
