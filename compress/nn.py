"""`QuantLinear`: a Linear whose weight stays packed; its forward calls the kernels."""

from __future__ import annotations

import torch
from torch import nn

from compress import kernels
from compress.quant import QuantizedWeight


class QuantLinear(nn.Module):
    """Holds a `QuantizedWeight`'s tensors as buffers; forward = kernels.linear(...)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.bits = qw.bits
        self.group_size = qw.group_size
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("zeros", qw.zeros)
        self.register_buffer("g_idx", qw.g_idx)
        self.register_buffer("bias", bias)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.g_idx, self.bits,
                               self.group_size, (self.out_features, self.in_features),
                               self.zeros is None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        return kernels.linear(x, self.qweight, self.scales, self.zeros, self.g_idx,
                              bits=self.bits, group_size=self.group_size,
                              in_features=self.in_features, bias=self.bias)

    def extra_repr(self) -> str:
        kind = "sym" if self.zeros is None else "asym"
        group = "per-channel" if self.group_size == -1 else f"group={self.group_size}"
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"{group}, {kind}")
