"""`QuantizedWeight`: the one packed-weight type, shared by algorithms, formats and kernels.

It lives here, with the kernels, because the kernels may import nothing of `compress`;
`compress.quant` re-exports it, and packing (`packing.py`) sits beside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .packing import pack, packed_width, unpack
from .reference import dequantize, group_index


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A Linear weight W [out, in] as packed b-bit codes with per-group scales.

    ::

        qweight  int32 [out, ceil(in*bits/32)]  codes packed along `in` (packing.py)
        scales   float [out, G]                 G = ceil(in/group_size); 1 if group_size == -1
        zeros    int8  [out, G] | None          signed zero points; None when symmetric
        g_idx    int32 [in] | None              group of each column, act-order only
        W_hat[o, j] = (q[o, j] - zeros[o, g(j)]) * scales[o, g(j)]

    `scales` are already in the checkpoint's dtype: algorithms round them before
    choosing codes, so what is stored is exactly what the algorithm evaluated.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        out_features, in_features = self.shape
        expected = (out_features, packed_width(in_features, self.bits))
        if tuple(self.qweight.shape) != expected or self.qweight.dtype != torch.int32:
            raise ValueError(f"qweight must be int32 {expected}, got "
                             f"{self.qweight.dtype} {tuple(self.qweight.shape)}")
        groups = num_groups(in_features, self.group_size)
        if tuple(self.scales.shape) != (out_features, groups):
            raise ValueError(f"scales must be [{out_features}, {groups}], got "
                             f"{tuple(self.scales.shape)}")
        if self.zeros is not None and tuple(self.zeros.shape) != (out_features, groups):
            raise ValueError(f"zeros must be [{out_features}, {groups}], got "
                             f"{tuple(self.zeros.shape)}")

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None, *, bits: int, group_size: int,
                   g_idx: torch.Tensor | None = None) -> QuantizedWeight:
        """Pack signed integer codes [out, in] (the lossless step after an algorithm)."""
        return cls(
            qweight=pack(codes, bits),
            scales=scales,
            zeros=None if zeros is None else zeros.to(torch.int8),
            g_idx=None if g_idx is None else g_idx.to(torch.int32),
            bits=bits,
            group_size=group_size,
            shape=(int(codes.shape[0]), int(codes.shape[1])),
        )

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def codes(self) -> torch.Tensor:
        """Signed int8 codes [out, in]."""
        return unpack(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense [out, in] weight (float32 arithmetic)."""
        return dequantize(self.qweight, self.scales, self.zeros, self.g_idx, bits=self.bits,
                          group_size=self.group_size, in_features=self.in_features, dtype=dtype)

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Output rows start..stop-1 as their own weight (codes are packed along `in`)."""
        return dataclasses.replace(
            self, qweight=self.qweight[start:stop].clone(),
            scales=self.scales[start:stop].clone(),
            zeros=None if self.zeros is None else self.zeros[start:stop].clone(),
            g_idx=None if self.g_idx is None else self.g_idx.clone(),
            shape=(stop - start, self.in_features))

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same weight with its tensors on `device`."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)
        return dataclasses.replace(self, qweight=self.qweight.to(device),
                                   scales=self.scales.to(device), zeros=move(self.zeros),
                                   g_idx=move(self.g_idx))

    def nbytes(self) -> int:
        """Bytes of every tensor this weight stores."""
        tensors = [self.qweight, self.scales, self.zeros, self.g_idx]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

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


def num_groups(in_features: int, group_size: int) -> int:
    """G = ceil(in / group_size): the last group is partial when the size does not divide."""
    return 1 if group_size <= 0 else -(-in_features // group_size)


def concat_outputs(parts: list[QuantizedWeight]) -> QuantizedWeight | None:
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
    return QuantizedWeight(
        torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
        None if first.zeros is None else torch.cat([p.zeros for p in parts]),
        first.g_idx, first.bits, first.group_size,
        (sum(p.out_features for p in parts), first.in_features))
