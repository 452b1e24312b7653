"""`PackedWeights`: the kernels' view of one packed Linear (tensors and layout, no model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import group_index


@dataclass(frozen=True, eq=False)
class PackedWeights:
    """Weight W [N, K] of a Linear as packed codes; fields as documented in reference.py."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def column_groups(self) -> torch.Tensor:
        """int64 [K]: the scale/zero column of each input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return group_index(self.in_features, self.group_size, self.device)

    def column_order(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(perm, sorted groups): the column permutation that makes every group one
        contiguous run (None when the columns already are), and the groups in that order."""
        groups = self.column_groups()
        if groups.numel() < 2 or bool((groups[1:] >= groups[:-1]).all()):
            return None, groups
        perm = torch.sort(groups, stable=True).indices
        return perm, groups[perm]


def concat_outputs(parts: list[PackedWeights]) -> PackedWeights | None:
    """One weight whose output rows are `parts` stacked (Linears sharing an input run as
    one kernel call), or None when their layouts differ and they must run apart."""
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size, p.in_features) != (first.bits, first.group_size,
                                                      first.in_features):
            return None
        if (p.zeros is None) != (first.zeros is None) or p.scales.dtype != first.scales.dtype:
            return None
        if (p.g_idx is None) != (first.g_idx is None) or (
                p.g_idx is not None and not torch.equal(p.g_idx, first.g_idx)):
            return None
    return PackedWeights(
        torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
        None if first.zeros is None else torch.cat([p.zeros for p in parts]),
        first.g_idx, first.bits, first.group_size, first.in_features)
