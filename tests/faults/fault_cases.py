"""Shared by the fault-injection tests: running the CLI, stopping and killing it, comparing
checkpoints, and the counts written to benchmarks/results/faults.json.

A checkpoint is compared by what matters: every file byte for byte (sha256), except that
the manifest's `created` timestamp is left out; `tensor_digests` compares the tensors alone
(the test for a checkpoint that loads but holds different weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

from compress import models
from compress.errors import CompressError
from compress.formats import checkpoint

REPORT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "faults.json"
PAUSE_ENV = "COMPRESS_FAULT_PAUSE_AT"  # compress/pipeline.py: _pause_point
OUTCOMES = ("resumed_identical", "clean_error", "bad")


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "COMPRESS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop(PAUSE_ENV, None)  # only the run a test means to stop gets it
    env.update(extra)
    return env


def cli_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "compress.cli", *map(str, args)]


def run_cli(*args: object, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout,
                          env=popen.pop("env", cli_env()), **popen)


def one_line_error(proc: subprocess.CompletedProcess) -> str | None:
    """The message of a clean failure (exit 2, a single `error: ...` line), else None."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "):
        return lines[0]
    return None


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]  # the field after "(comm)"


def wait_stopped(proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Wait until `proc` stops itself at its pause point (True) or exits (False)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if _state(proc.pid) in ("T", "t"):
            return True
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {proc.pid} neither stopped nor exited in {timeout} s")
        time.sleep(0.01)
    return False


def kill9(proc: subprocess.Popen) -> bool:
    """SIGKILL `proc` if it is still there; True if it was."""
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return alive


def fingerprint(directory: Path) -> dict[str, str]:
    """sha256 of every file in a checkpoint directory, hidden ones included; the manifest
    without its `created` timestamp (the only thing two identical runs write differently)."""
    prints = {}
    for f in sorted(Path(directory).iterdir()):
        if f.name == checkpoint.MANIFEST:
            manifest = json.loads(f.read_text())
            manifest.pop("created", None)
            data = json.dumps(manifest, sort_keys=True).encode()
        else:
            data = f.read_bytes() if f.is_file() else b"<not a file>"
        prints[f.name] = hashlib.sha256(data).hexdigest()
    return prints


def tensor_digests(directory: Path) -> dict[str, str]:
    """Every tensor of a checkpoint: dtype, shape and a sha256 of its bytes."""
    digests = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = f.get_tensor(name)
                raw = t.contiguous().view(-1).view(dtype=torch.uint8)
                digests[name] = (f"{t.dtype}{tuple(t.shape)}:"
                                 + hashlib.sha256(raw.numpy().tobytes()).hexdigest())
    return digests


def loads(directory: Path) -> bool:
    """Whether `compress.models.open_model` accepts `directory` (manifest verified)."""
    try:
        models.open_model(directory)
    except CompressError:
        return False
    return True


def debris(out: Path) -> list[str]:
    """What a finished run must not leave beside `out`: its .partial or hidden copies."""
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name != out.name and (p.name.startswith(f".{out.name}")
                                             or p.name.startswith(f"{out.name}.")))


class Tally:
    """Outcome counts per fault class, and the details of anything bad."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = {}
        self.bad: list[str] = []
        self.points: dict[str, list[str]] = {}

    def add(self, fault: str, point: str, outcome: str, detail: str = "",
            resumed_after_fix: bool = False) -> None:
        """`resumed_after_fix`: a fault that fails the run (disk full) was removed and the
        same command then finished with the uninterrupted run's checkpoint."""
        assert outcome in OUTCOMES, outcome
        counts = self.counts.setdefault(fault, Counter())
        counts[outcome] += 1
        counts["resumed_after_fix"] += resumed_after_fix
        self.points.setdefault(fault, []).append(
            f"{point}: {outcome}" + (", then resumed identical" if resumed_after_fix else "")
            + (f" ({detail})" if detail and outcome == "clean_error" else ""))
        if outcome == "bad":
            self.bad.append(f"{fault} @ {point}: {detail}")

    def summary(self) -> dict[str, dict]:
        return {fault: {"trials": sum(c[o] for o in OUTCOMES),
                        "survived": c["resumed_identical"],
                        "clean_error": c["clean_error"],
                        "bad": c["bad"],
                        **({"resumed_after_fix": c["resumed_after_fix"]}
                           if c["resumed_after_fix"] else {}),
                        "points": self.points[fault]}
                for fault, c in self.counts.items()}

    def write_report(self, **notes: object) -> None:
        """Merge these counts into benchmarks/results/faults.json (COMPRESS_FAULT_REPORT=1)."""
        if os.environ.get("COMPRESS_FAULT_REPORT") != "1":
            return
        try:
            report = json.loads(REPORT.read_text())
        except (OSError, ValueError):
            report = {}
        report.setdefault("benchmark", "faults")
        report.setdefault("meaning", {
            "survived": "the same command, re-run, finished with a checkpoint identical to "
                        "an uninterrupted run (every file's sha256; the manifest without "
                        "its 'created' timestamp)",
            "clean_error": "it failed with one 'error: ...' line and exit code 2, leaving "
                           "no loadable checkpoint with other tensors",
            "bad": "a traceback, another exit code, a loadable checkpoint with other "
                   "tensors, a missing previous checkpoint, or debris after success",
            "resumed_after_fix": "disk faults: once the fault was gone, the same command "
                                 "finished with the uninterrupted run's checkpoint",
        })
        report.setdefault("classes", {}).update(self.summary())
        report.setdefault("notes", {}).update(notes)
        checkpoint.atomic_write_json(REPORT, report)
