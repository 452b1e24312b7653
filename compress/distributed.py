"""Where calibration runs: one device, and optionally several processes on torch.distributed.

A `Context` is what the pipeline needs to know about it: the device a layer calibrates
on, this process's rank and the number of processes. With one process every collective
is a no-op, so the single-process run is the same code with nothing exchanged.

Processes are started by torchrun (its environment contract: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or by `launch` (`--workers N`: torch's elastic
launcher, which is what torchrun runs). The process group is gloo on the CPU, and
gloo for CPU tensors plus NCCL for CUDA tensors with a GPU. Every collective has the
group's timeout (`COMPRESS_DIST_TIMEOUT` seconds), so a worker that died or hangs ends
the others with one `error:` line instead of a wait without end.

What is split, reduced and spread (docs/scale.md):
- calibration samples: each rank takes a contiguous share of whole chunks (`share`);
- statistics (GPTQ Hessians, AWQ's Hessians and mean |x|, token counts): summed;
- GPTQ solves: a group's Linears are dealt to ranks (`deal`); every rank receives every
  result (`each`), so every rank computes the next layer's inputs on its samples;
- files: rank 0 alone writes (`decide`), the others wait for it and share its errors.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch

from compress.errors import CompressError, WorkerError, WorkerLost, first_line

TIMEOUT_ENV = "COMPRESS_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800  # a 405B layer's slowest GPTQ solve on a CPU rank stays well under
T = TypeVar("T")


def resolve_device(name: str = "auto") -> torch.device:
    """cpu, cuda[:i], or auto (cuda when torch sees one, else cpu)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CompressError(f"--device {name}: no CUDA device is available here (torch "
                                f"{torch.__version__}); use --device cpu or auto")
        return torch.device(name)
    raise CompressError(f"--device {name!r} is not supported; use cpu, cuda or auto")


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise CompressError(f"${TIMEOUT_ENV}={raw!r}: give a positive number of seconds")
    return value


def env_rank() -> int:
    """This process's rank as torchrun or `launch` set it (0 outside a group)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@dataclass
class Context:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1
    timeout: float = DEFAULT_TIMEOUT_S

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # -- splitting ---------------------------------------------------------------------

    def shares(self, n: int, chunk: int) -> list[slice]:
        """Each rank's contiguous share of n samples, in whole chunks of `chunk` so that
        every chunk's forward is the one a single process runs (same shapes, same ops)."""
        chunks = -(-n // chunk)
        if chunks < self.world:
            raise CompressError(f"{n} calibration samples make {chunks} chunk(s) of {chunk}, "
                                f"fewer than the {self.world} workers; use more samples "
                                "or fewer workers")
        bounds = [min(n, (r * chunks // self.world) * chunk) for r in range(self.world + 1)]
        return [slice(bounds[r], bounds[r + 1]) for r in range(self.world)]

    def deal(self, sizes: list[int]) -> list[int]:
        """The rank owning each job (largest first, to the least loaded rank; ties to the
        lowest rank): the same answer on every rank, all rank 0's with one process."""
        load = [0] * self.world
        owner = [0] * len(sizes)
        for j in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[j] = r
            load[r] += sizes[j]
        return owner

    # -- collectives ---------------------------------------------------------------------

    def _lost(self, e: BaseException) -> WorkerLost:
        # gloo starts its messages with its source location: "[/.../pair.cc:553] ..."
        reason = re.sub(r"^\[[^\]]*\]\s*", "", first_line(e)).split(". ")[0][:160]
        return WorkerLost(f"worker {self.rank} of {self.world}: another worker stopped or did "
                          f"not answer within {self.timeout:g} s ({reason}); "
                          "re-run the same command to resume")

    def _call(self, fn: Callable[..., object], *args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # DistBackendError, gloo's "Connection closed by peer"
            raise self._lost(e) from None

    def all_reduce(self, t: torch.Tensor) -> None:
        """In place: the sum over ranks."""
        if self.world > 1:
            from torch import distributed as dist
            self._call(dist.all_reduce, t)

    def sum_counts(self, counts: list[int]) -> list[int]:
        if self.world == 1:
            return counts
        t = torch.tensor(counts, dtype=torch.int64)
        self.all_reduce(t)
        return t.tolist()

    def reduce_mean(self, mean: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
        """Each rank's mean over its n samples -> the mean over all ranks' samples:
        sum_r mean_r * n_r / N. Equal to one process's mean up to float summation order."""
        if self.world == 1:
            return mean, n
        (total,) = self.sum_counts([n])
        mean = mean * (n / total) if total else mean.zero_()
        self.all_reduce(mean)
        return mean, total

    def decide(self, fn: Callable[[], T], owner: int = 0) -> T:
        """fn() run on `owner` only, its result (or its CompressError) on every rank.
        Results travel pickled: keep tensors in them on the CPU."""
        if self.world == 1:
            return fn()
        from torch import distributed as dist
        error = None
        box: list[object] = [None]
        if self.rank == owner:
            try:
                box[0] = ("ok", fn())
            except CompressError as e:
                error, box[0] = e, ("error", str(e))
        self._call(dist.broadcast_object_list, box, src=owner)
        kind, value = box[0]
        if kind == "error":
            if error is not None:
                raise error
            # rank 0 prints every error but another rank's; so it says the owner's
            raise CompressError(f"worker {owner}: {value}") if self.leader else WorkerError(value)
        return value

    def each(self, fn: Callable[[], T]) -> list[T]:
        """fn() on every rank; every rank gets the list of results in rank order. A
        CompressError on any rank stops all; rank 0 says which (tensors: on the CPU)."""
        if self.world == 1:
            return [fn()]
        from torch import distributed as dist
        error = None
        try:
            mine: object = ("ok", fn())
        except CompressError as e:
            error, mine = e, ("error", str(e))
        every: list[object] = [None] * self.world
        self._call(dist.all_gather_object, every, mine)
        failed = [(r, v) for r, (kind, v) in enumerate(every) if kind == "error"]
        if failed:
            if error is not None and (self.leader or failed[0][0] == self.rank):
                raise error
            r, message = failed[0]
            raise (CompressError(f"worker {r}: {message}") if self.leader
                   else WorkerError(message))
        return [v for _, v in every]

    def gather_rows(self, t: torch.Tensor, shares: list[slice]) -> torch.Tensor | None:
        """Rank 0: every rank's rows (its share of dim 0) in rank order, on the CPU; the
        others: None. Point to point over the CPU (gloo) wherever `t` lives."""
        if self.world == 1:
            return t.cpu()
        from torch import distributed as dist
        if not self.leader:
            self._call(dist.send, t.cpu().contiguous(), dst=0)
            return None
        parts = [t.cpu()]
        for r in range(1, self.world):
            buf = torch.empty((shares[r].stop - shares[r].start, *t.shape[1:]), dtype=t.dtype)
            self._call(dist.recv, buf, src=r)
            parts.append(buf)
        return torch.cat(parts)

    def close(self, together: bool = True) -> None:
        """Leave the group: together (a barrier first: a rank that tears its connections
        down while another still uses them can make gloo abort that process), or at once
        after an error, when the others may be waiting in another collective."""
        if self.world > 1:
            from torch import distributed as dist
            if dist.is_initialized():
                if together:
                    self._call(dist.barrier)
                dist.destroy_process_group()


def init(device: str = "auto") -> Context:
    """This process's context: one process, or a rank of the group torchrun (or `launch`)
    started, joined here."""
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(dev)
    from torch import distributed as dist

    rank, local = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if dev.index is None:  # one GPU per local rank, as torchrun sets them out
            dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    seconds = timeout_s()
    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as e:
        raise CompressError(f"worker {rank} of {world} could not join the others "
                            f"({first_line(e)[:160]})") from None
    return Context(dev, rank, world, seconds)


def launch(workers: int, argv: list[str]) -> None:
    """Run `python argv...` as `workers` ranks with torch's elastic launcher (torchrun's
    engine: a c10d rendezvous on a free local port, no restarts). Returns when all
    succeeded; a worker's failure is one `error:` line here (or none, when the worker
    printed its own)."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=workers,
                          run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    # The agent logs each failure as a multi-line report; what failed is said below.
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)(*argv)
    except SignalException as e:
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise CompressError(f"stopped by {e.sigval.name}; re-run the same command to "
                            "resume") from None
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if 130 in codes:  # Ctrl-C reached the workers: they said what was kept
            raise KeyboardInterrupt from None
        if 2 in codes:  # a worker printed its own error line
            raise WorkerError("a worker failed") from None
        rank, failure = e.get_first_failure()
        how = (f"killed by {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0
               else f"exit status {failure.exitcode}")
        raise WorkerLost(f"worker {rank} of {workers} stopped ({how}); re-run the same "
                         "command to resume") from None
