"""`QuantLinear`: a Linear whose weight stays packed; its forward calls the kernels."""

from __future__ import annotations

import torch
from torch import nn

from compress import kernels
from compress.quant import QuantizedWeight


class QuantLinear(nn.Module):
    """Holds a `QuantizedWeight`'s tensors as buffers; forward runs `kernels.dispatch`.

    The backend's repacked weight is built on the first forward on a device (and again
    if the device or COMPRESS_KERNEL changes), so loading stays cheap and a model moved
    with `.to()` re-prepares for its new device.
    """

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
        self._kernel: kernels.Kernel | None = None

    @property
    def quantized_weight(self) -> QuantizedWeight:
        """The weight these buffers hold (on whatever device they are)."""
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.g_idx, self.bits,
                               self.group_size, (self.out_features, self.in_features))

    def kernel(self, device: torch.device) -> kernels.Kernel:
        if self._kernel is None or not self._kernel.serves(device):
            self._kernel = kernels.prepare(self.quantized_weight, device)
        return self._kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        return kernels.run(self.kernel(x.device), x, self.bias)

    @property
    def implementation(self) -> str | None:
        """The kernel that served the last forward (None before the first)."""
        return None if self._kernel is None else self._kernel.implementation

    def _apply(self, fn, recurse=True):
        self._kernel = None  # buffers are about to change device or dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        kind = "sym" if self.zeros is None else "asym"
        group = "per-channel" if self.group_size == -1 else f"group={self.group_size}"
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"{group}, {kind}")


class SharedInputLinears:
    """Linears that read the same input (q/k/v, gate/up), run as one kernel call when
    they are all packed with one layout: one launch instead of three on the decode path,
    where per-call overhead is a large share of a small model's step.

    Dense or mixed-layout members run one by one, so calibration hooks on the members
    still fire. The fused weight is rebuilt whenever the members or device change.
    """

    def __init__(self) -> None:
        self._members: tuple[nn.Module, ...] = ()
        self._fusable = False
        self._kernel: kernels.Kernel | None = None
        self._bias: torch.Tensor | None = None
        self._sizes: list[int] = []

    def __call__(self, x: torch.Tensor, *members: nn.Module) -> list[torch.Tensor]:
        if members != self._members:
            self._members, self._kernel = members, None
            self._fusable = (all(isinstance(m, QuantLinear) for m in members)
                             and kernels.concat_outputs([m.quantized_weight for m in members])
                             is not None)
        if not self._fusable:
            return [m(x) for m in members]
        if self._kernel is None or not self._kernel.serves(x.device):
            self._prepare(x.device)
        return list(kernels.run(self._kernel, x, self._bias).split(self._sizes, dim=-1))

    @property
    def implementation(self) -> str | None:
        """The fused kernel's implementation, None when the members run apart (or not
        yet)."""
        return None if self._kernel is None else self._kernel.implementation

    def _prepare(self, device: torch.device) -> None:
        members = self._members
        self._sizes = [m.out_features for m in members]
        self._bias = None
        if any(m.bias is not None for m in members):
            self._bias = torch.cat([
                m.bias if m.bias is not None else torch.zeros(m.out_features, device=device)
                for m in members]).to(device)
        weights = kernels.concat_outputs([m.quantized_weight for m in members])
        self._kernel = kernels.prepare(weights, device)


def kernel_backends(model: nn.Module) -> list[str]:
    """Kernel implementations that served the packed matmuls so far (empty for a dense model)."""
    found = set()
    for module in model.modules():
        candidates = [module, *(v for v in vars(module).values()
                                if isinstance(v, SharedInputLinears))]
        found.update(c.implementation for c in candidates
                     if isinstance(c, QuantLinear | SharedInputLinears) and c.implementation)
    return sorted(found)
