"""Column bookkeeping shared by the CPU backends: groups as contiguous runs of columns,
padded to what a kernel's blocks need."""

from __future__ import annotations

import torch

from .weights import QuantizedWeight


def boundaries(sorted_groups: torch.Tensor) -> torch.Tensor:
    """Positions where a new group starts (excluding 0), in sorted column order."""
    return torch.nonzero(sorted_groups[1:] != sorted_groups[:-1]).flatten() + 1


def column_runs(w: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """(order, sorted groups, run starts, run ends): the columns in an order where every
    group is one contiguous run [start, end), and the group of each position."""
    perm, groups = w.column_order()
    starts = [0, *boundaries(groups).tolist()]
    ends = [*starts[1:], w.in_features]
    order = perm if perm is not None else torch.arange(w.in_features)
    return order, groups, starts, ends


def padded_columns(order: torch.Tensor, starts: list[int], ends: list[int],
                   multiple: int, k: int) -> tuple[torch.Tensor, list[int]]:
    """Columns in `order`, each run [start, end) padded to `multiple` with index k (which
    the kernels read as a zero input); returns the index and the padded runs' starts."""
    pieces, padded_starts, at = [], [], 0
    for a, b in zip(starts, ends, strict=True):
        width = -(-(b - a) // multiple) * multiple
        pieces += [order[a:b], torch.full((width - (b - a),), k, dtype=torch.long)]
        padded_starts.append(at)
        at += width
    return torch.cat(pieces), padded_starts


def gather_index(columns: torch.Tensor, k: int) -> torch.Tensor | None:
    """`columns` as an input gather, None when it is the identity over k columns."""
    if columns.numel() == k and bool((columns == torch.arange(k)).all()):
        return None
    return columns.contiguous()
