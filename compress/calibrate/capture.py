"""One generic way to see what each Linear group reads, during the model's own forward.

Calibration never re-implements a layer: it runs the decoder's own modules and watches
the inputs of Linears named by the architecture table, through forward pre-hooks.

- `observe`: every named Linear's input passes to a callback while a block of forwards
  runs (AWQ's statistics pass, the sensitivity measure).
- `true_sequential`: runs calibration chunks through a layer so that each group of
  Linears (in the table's order) is seen by the caller on every chunk *before* it is
  used, and may be replaced (quantised) then; everything after it, on every chunk, then
  computes with the replaced weights. Each chunk's forward is a greenlet that stops at
  each group's pre-hook until all chunks have reached that group, so every Linear runs
  once per chunk on its final weights. When the suspended forwards would hold more than
  a memory budget, chunks beyond it are stopped after their input is used and run again
  from the layer's input later: slower, never different (the same ops on the same
  weights give the same bits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import greenlet
import torch
from torch import nn

Group = tuple[str, ...]


@contextlib.contextmanager
def observe(module: nn.Module, names: Iterable[str],
            record: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, every call of `module`'s submodule `name` first passes its input
    to `record(name, x)`."""
    handles = []
    try:
        for name in names:
            def hook(_module, args, name=name):
                record(name, args[0])
            handles.append(module.get_submodule(name).register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class GroupOrderError(RuntimeError):
    """The forward used a group before one the table lists ahead of it."""


class _Forward(greenlet.greenlet):
    """One chunk's forward, run as a greenlet that switches back to the caller at each
    group's hook with (group index, the group's input)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
        super().__init__(lambda: forward(x))
        self.group = -1  # the last group whose hook it reached
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def advance(self, finished: int) -> None:
        """Run until the next group's hook, or to the end (group = `finished`)."""
        result = self.switch()
        if self.dead:
            self.group, self.input, self.output = finished, None, result
        else:
            self.group, self.input = result

    def stop(self) -> None:
        self.input = None
        if not self.dead:
            self.throw(greenlet.GreenletExit)


class GroupInputs:
    """A group's inputs, chunk by chunk (an iterator); `chunk` is the index of the
    calibration chunk the last one came from, to pair it with other per-chunk data."""

    def __init__(self, items: Iterator[tuple[int, torch.Tensor]]):
        self._items, self.chunk = items, -1

    def __iter__(self) -> GroupInputs:
        return self

    def __next__(self) -> torch.Tensor:
        self.chunk, x = next(self._items)
        return x


@torch.no_grad()
def true_sequential(layer: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                    chunks: Sequence[torch.Tensor], groups: Sequence[Group],
                    on_group: Callable[[Group, GroupInputs], None],
                    memory_budget: int) -> None:
    """Each group's inputs, on every chunk, passed to `on_group(group, inputs)` in order;
    then each chunk overwritten in place with its output, `forward` having run through
    the replaced groups.

    `inputs` (`GroupInputs`) iterates over the chunks' inputs of the group's Linears (a
    chunk that never reaches the group, e.g. an expert no token of it is routed to, gives
    none).
    `on_group` may replace the group's weights; the chunks' forwards continue with them.
    `memory_budget` bounds the bytes of suspended forwards (estimated as each one's
    group input plus three times its chunk: the residual stream, the normed input and a
    mixture of experts' output accumulator; counted from the live tensors of a Mixtral
    layer paused at each expert).
    """
    index = {name: i for i, group in enumerate(groups) for name in group}
    finished = len(groups)
    runs: list[_Forward | None] = [None] * len(chunks)

    def hook(name: str, x: torch.Tensor) -> None:
        run = greenlet.getcurrent()
        if not isinstance(run, _Forward):
            return  # a forward outside this calibration
        group = index[name]
        if group < run.group:
            raise GroupOrderError(
                f"{name} ran after {', '.join(groups[run.group])}: the architecture table "
                "lists this layer's groups out of execution order")
        if group > run.group:  # the first Linear of a later group: wait there
            run.parent.switch((group, x))

    def reach(i: int, k: int) -> _Forward:
        """Chunk i at group k or beyond (resumed, or restarted from its input)."""
        if runs[i] is None:
            runs[i] = _Forward(forward, chunks[i])
        run = runs[i]
        while run.group < k:
            run.advance(finished)
        return run

    def resident_bytes() -> int:
        return sum(r.input.nbytes + 3 * chunks[i].nbytes for i, r in enumerate(runs)
                   if r is not None and r.input is not None)

    def inputs_of(k: int) -> Iterator[tuple[int, torch.Tensor]]:
        for i in range(len(chunks)):
            run = reach(i, k)
            if run.group != k:
                continue
            yield i, run.input
            if resident_bytes() > memory_budget:
                run.stop()  # its input is used; it runs again from the start if needed
                runs[i] = None

    handles = []
    try:
        for name in index:
            handles.append(layer.get_submodule(name).register_forward_pre_hook(
                lambda _module, args, name=name: hook(name, args[0])))
        for k, group in enumerate(groups):
            on_group(group, GroupInputs(inputs_of(k)))
        for i in range(len(chunks)):
            chunks[i].copy_(reach(i, finished).output)  # its input is needed no more
            runs[i] = None
    finally:
        for handle in handles:
            handle.remove()
        for run in runs:
            if run is not None:
                run.stop()
