"""Disk full, a file size limit and a read-only output during `compress quantize`.

Each must end in one `error: ...` line (exit code 2) that names the output path and the
problem, leave a checkpoint that `--overwrite` was replacing intact, and, once the fault is
gone, let the same command finish with the checkpoint an undisturbed run writes.

- disk full: ENOSPC injected at the Nth write of an in-process `compress.api.quantize`, for
  every N (safetensors' writer, fsync of the JSON files, the copied tokenizer files);
- file size limit: a real one, RLIMIT_FSIZE on the CLI subprocess with SIGXFSZ ignored
  (so writes fail with EFBIG; limits apply to root too); by default on this process around
  an in-process `compress.api.quantize`, the CLI subprocesses in the slow set;
- read-only: mode 0o555; as root, whom permission bits do not stop, a read-only bind mount
  where `mount` is permitted, else EROFS injected in-process.

COMPRESS_FAULT_REPORT=1 writes the counts to benchmarks/results/faults.json.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_cases import (
    Tally,
    cli_env,
    debris,
    fingerprint,
    loads,
    one_line_error,
    run_cli,
    tensor_digests,
)
from safetensors import SafetensorError

from compress import api, pipeline
from compress.errors import CompressError
from compress.formats import checkpoint
from compress.quant import QuantScheme
from compress.recipe import Recipe

LAYERS = 4
RECIPE = Recipe("rtn", QuantScheme(4, 128, True))
CLI_ARGS = ("--no-eval", "-q", "--overwrite")
# Runs the CLI under a file size limit (argv[1], bytes); SIGXFSZ ignored so writes fail
# with EFBIG instead of killing the process.
LIMITED_CLI = (
    "import resource, runpy, signal, sys; "
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "limit = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
    "runpy.run_module('compress.cli', run_name='__main__', alter_sys=True)"
)


class Disk:
    """The tiny model, an older good checkpoint, and references from undisturbed runs."""

    def __init__(self, model: Path, root: Path):
        self.model, self.root = model, root
        self.older = root / "older"
        pipeline.quantize(model, Recipe("rtn", QuantScheme(8, -1, True)), self.older)
        self.older_files = fingerprint(self.older)
        self.older_tensors = tensor_digests(self.older)
        api.quantize(model, RECIPE, root / "reference-api", evaluate=False)
        self.api_reference = fingerprint(root / "reference-api")
        self._cli_reference: dict[str, str] | None = None
        self._n = 0

    def cli_reference(self) -> dict[str, str]:
        if self._cli_reference is None:
            proc = run_cli("quantize", self.model, "--out", self.root / "reference-cli",
                           *CLI_ARGS)
            assert proc.returncode == 0, proc.stderr
            self._cli_reference = fingerprint(self.root / "reference-cli")
        return self._cli_reference

    def out(self, with_older: bool, parent: Path | None = None) -> Path:
        """A fresh --out path, holding a copy of the older checkpoint if asked."""
        self._n += 1
        parent = parent or self.root / f"case-{self._n}"
        parent.mkdir(exist_ok=True)
        out = parent / f"q{self._n}"
        if with_older:
            shutil.copytree(self.older, out)
        return out

    def intact(self, out: Path, with_older: bool) -> str:
        """'' if `out` is as it was before the failed run, else what is wrong."""
        if not with_older:
            return f"{out} appeared" if out.exists() else ""
        if not loads(out) or tensor_digests(out) != self.older_tensors:
            return f"the previous checkpoint at {out} no longer loads with its tensors"
        if fingerprint(out) != self.older_files:
            return f"the previous checkpoint at {out} was changed"
        return ""

    def finished(self, out: Path, reference: dict[str, str]) -> str:
        """'' if `out` is the undisturbed run's checkpoint with no debris, else what not."""
        if fingerprint(out) != reference:
            return f"{out} differs from an undisturbed run"
        return f"debris beside {out}: {debris(out)}" if debris(out) else ""


@pytest.fixture(scope="module")
def disk(tiny_factory, tmp_path_factory) -> Disk:
    return Disk(tiny_factory("llama", num_hidden_layers=LAYERS), tmp_path_factory.mktemp("disk"))


# --- disk full: ENOSPC at the Nth write ------------------------------------------------


@contextlib.contextmanager
def writes_fail_at(n: int | None, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Count the writes of files (and fail the nth with ENOSPC, as a full disk does)."""
    seen: list[str] = []
    real_save, real_fsync, real_copy = checkpoint.save_file, os.fsync, shutil.copyfile
    full = os.strerror(errno.ENOSPC)

    def hit(what: str) -> bool:
        seen.append(re.sub(r"\.([^ ]+)\.\w+\.tmp$", r"\1", what))  # the file, not its temp
        return len(seen) == n

    def save_file(tensors, filename, metadata=None):
        if hit(f"safetensors {Path(filename).name}"):
            Path(filename).write_bytes(b"\0" * 100)  # what got written before space ran out
            # safetensors' own wording for an OS error while serializing
            raise SafetensorError(f"Error while serializing: I/O error: {full} (os error "
                                  f"{errno.ENOSPC})")
        return real_save(tensors, filename, metadata=metadata)

    def fsync(fd):
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name if sys.platform == "linux" else fd
        if hit(f"fsync {name}"):
            raise OSError(errno.ENOSPC, full)
        return real_fsync(fd)

    def copyfile(src, dst, **kwargs):
        if hit(f"copy {Path(dst).name}"):
            raise OSError(errno.ENOSPC, full, str(dst))
        return real_copy(src, dst, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_file", save_file)
        m.setattr(os, "fsync", fsync)
        m.setattr(shutil, "copyfile", copyfile)
        yield seen


def _disk_full_trial(disk: Disk, n: int, with_older: bool, tally: Tally,
                     monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    out = disk.out(with_older)
    point = f"write {n}" + (" --overwrite" if with_older else "")
    with writes_fail_at(n, monkeypatch) as seen, pytest.raises(CompressError) as failed:
        api.quantize(disk.model, RECIPE, out, overwrite=with_older, evaluate=False)
    message = str(failed.value)
    point += f" ({seen[-1]})"
    if "\n" in message or not ("no space left" in message and str(out) in message):
        tally.add(fault, point, "bad", f"unclear message {message!r}")
        return
    problem = disk.intact(out, with_older)
    if problem:
        tally.add(fault, point, "bad", problem)
        return
    try:  # space freed: the same call continues from the partial run
        api.quantize(disk.model, RECIPE, out, overwrite=with_older, evaluate=False)
        problem = disk.finished(out, disk.api_reference)
    except CompressError as e:
        problem = f"the same call, with space, failed: {e}"
    tally.add(fault, point, "bad" if problem else "clean_error", problem,
              resumed_after_fix=not problem)


def _total_writes(disk: Disk, monkeypatch: pytest.MonkeyPatch) -> int:
    with writes_fail_at(None, monkeypatch) as seen:
        api.quantize(disk.model, RECIPE, disk.out(False), evaluate=False)
    return len(seen)


def _check(tally: Tally) -> None:
    tally.write_report(layers=LAYERS)
    for fault, c in tally.summary().items():
        print(f"{fault}: {c['trials']} trials, {c['clean_error']} clean errors "
              f"({c.get('resumed_after_fix', 0)} then resumed identical), {c['bad']} bad")
        print("  " + "\n  ".join(c["points"]))
    assert not tally.bad, "\n".join(tally.bad)


def test_disk_full_smoke(disk, monkeypatch):
    """The first write (progress.json), the first shard, and the last write (manifest)."""
    total = _total_writes(disk, monkeypatch)
    tally = Tally()
    for n, with_older in [(1, False), (2, True), (total, True)]:
        _disk_full_trial(disk, n, with_older, tally, monkeypatch, "disk-full-smoke")
    _check(tally)


@pytest.mark.slow
def test_disk_full_at_every_write(disk, monkeypatch):
    total = _total_writes(disk, monkeypatch)
    assert total > 2 * LAYERS  # a shard and a progress.json per layer, and the rest
    tally = Tally()
    for n in range(1, total + 1):
        _disk_full_trial(disk, n, n % 2 == 0, tally, monkeypatch, "disk-full")
    _check(tally)


# --- file size limit: a real EFBIG -------------------------------------------------------


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE on this process (the soft limit, so that it can be lifted again) with
    SIGXFSZ ignored: a write past `limit` bytes fails with EFBIG."""
    import resource

    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.skipif(sys.platform == "win32", reason="needs RLIMIT_FSIZE and SIGXFSZ")
def test_file_size_limit_in_process(disk):
    """test_file_size_limit's limits on this process around `api.quantize` (no subprocess):
    16 KiB stops the first layer's shard; 4 MiB the last shard (the embedding table)."""
    tally = Tally()
    for limit in (16 << 10, 4 << 20):
        out = disk.out(with_older=True)
        point = f"limit {limit >> 10} KiB --overwrite, in process"
        try:
            with _file_size_limit(limit):
                api.quantize(disk.model, RECIPE, out, overwrite=True, evaluate=False)
            message = "no error"
        except CompressError as e:
            message = str(e)
        if "\n" in message or not ("file too large" in message and str(out) in message):
            tally.add("file-size-limit-in-process", point, "bad", f"unclear message {message!r}")
            continue
        problem = disk.intact(out, with_older=True)
        if problem:
            tally.add("file-size-limit-in-process", point, "bad", problem)
            continue
        try:  # the limit lifted: the same call finishes the job
            api.quantize(disk.model, RECIPE, out, overwrite=True, evaluate=False)
            problem = disk.finished(out, disk.api_reference)
        except CompressError as e:
            problem = f"the same call, without the limit, failed: {e}"
        tally.add("file-size-limit-in-process", point, "bad" if problem else "clean_error", problem,
                  resumed_after_fix=not problem)
    _check(tally)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs RLIMIT_FSIZE and SIGXFSZ")
def test_file_size_limit(disk):
    """16 KiB stops the first layer's shard; 4 MiB the last shard (the embedding table)."""
    tally = Tally()
    for limit in (16 << 10, 4 << 20):
        out = disk.out(with_older=True)
        point = f"limit {limit >> 10} KiB --overwrite"
        proc = subprocess.run(
            [sys.executable, "-c", LIMITED_CLI, str(limit), "quantize", str(disk.model),
             "--out", str(out), *CLI_ARGS],
            capture_output=True, text=True, timeout=300, env=cli_env())
        line = one_line_error(proc)
        if line is None or not ("file too large" in line and str(out) in line):
            tally.add("file-size-limit", point, "bad",
                      f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}")
            continue
        problem = disk.intact(out, with_older=True)
        if problem:
            tally.add("file-size-limit", point, "bad", problem)
            continue
        rerun = run_cli("quantize", disk.model, "--out", out, *CLI_ARGS)
        problem = (f"re-run without the limit: {rerun.stderr.strip()[-600:]}"
                   if rerun.returncode else disk.finished(out, disk.cli_reference()))
        tally.add("file-size-limit", point, "bad" if problem else "clean_error", problem,
                  resumed_after_fix=not problem)
    _check(tally)


# --- read-only output ----------------------------------------------------------------------


def _run(*cmd: object) -> bool:
    return subprocess.run(list(map(str, cmd)), capture_output=True).returncode == 0


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[tuple[Path, str | None]]:
    """(dir, seal): fill dir, then seal() makes it read-only and says how, or returns None
    where nothing keeps this process out (root without `mount`)."""
    d = tmp_path / "ro"
    d.mkdir()
    mounted = []

    def seal() -> str | None:
        d.chmod(0o555)
        try:
            (d / "probe").touch()
        except PermissionError:
            return "mode 0o555"
        (d / "probe").unlink()  # root: permission bits do not apply
        d.chmod(0o755)
        if shutil.which("mount") and _run("mount", "--bind", d, d):
            mounted.append(d)
            if _run("mount", "-o", "remount,ro,bind", d):
                return "read-only bind mount"
        return None

    yield d, seal
    if mounted:
        _run("umount", d)
    d.chmod(0o755)


def _read_only_mkdir(d: Path, real=os.mkdir):
    def mkdir(path, *args, **kwargs):
        if Path(path).parent == d:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *args, **kwargs)

    return mkdir


@pytest.mark.parametrize("via", ["api", pytest.param("cli", marks=pytest.mark.slow)])
def test_read_only_output(disk, readonly_dir, monkeypatch, via):
    """Through the CLI subprocess (slow), or `api.quantize` in this process (by default),
    against the sealed directory; where nothing keeps root out, EROFS injected in process."""
    d, seal = readonly_dir
    old_out = disk.out(with_older=True, parent=d)
    new_out = disk.out(with_older=False, parent=d)
    how = seal()
    tally = Tally()
    for out, with_older in [(old_out, True), (new_out, False)]:
        point = f"{how or 'EROFS injected'}" + (" --overwrite" if with_older else "")
        if how is not None and via == "cli":
            proc = run_cli("quantize", disk.model, "--out", out, "--no-eval", "-q",
                           *(["--overwrite"] if with_older else []))
            line = one_line_error(proc) or f"exit {proc.returncode}: {proc.stderr[-600:]}"
        else:  # in process; where nothing keeps root out, the file system's answer injected
            if how is None:
                monkeypatch.setattr(os, "mkdir", _read_only_mkdir(d))
            try:
                api.quantize(disk.model, RECIPE, out, overwrite=with_older, evaluate=False)
                line = "no error"
            except CompressError as e:
                line = f"error: {e}"
            monkeypatch.undo()
        if not (line.startswith("error: cannot write") and str(out) in line
                and ("read-only" in line or "permission denied" in line)):
            tally.add("read-only", point, "bad", line)
            continue
        problem = disk.intact(out, with_older)
        tally.add("read-only", point, "bad" if problem else "clean_error", problem)
    _check(tally)
