"""The dtype a training loop's matmuls run in (torch.autocast). "bfloat16" is about 2x
faster on a CPU with bf16 instructions (avx512_bf16, AMX) and on any recent GPU; what is
learned, its optimiser's state and the loss stay float32, so only each step's gradient
carries bfloat16's rounding."""

from __future__ import annotations

import contextlib

import torch

from compress.errors import CompressError

PRECISIONS = ("float32", "bfloat16")


def check(precision: object, what: str) -> None:
    """A one-line error naming `what` (e.g. "signround precision") where `precision` is
    not one of `PRECISIONS`."""
    if precision not in PRECISIONS:
        raise CompressError(f"{what} must be one of {', '.join(PRECISIONS)}, "
                            f"got {precision!r}")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The matmuls within it in `precision` (float32: no autocast at all)."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, precision))


def slow_note(precision: str, device: torch.device, what: str) -> str | None:
    """A line for the user where `precision` will be slow on `device`: bfloat16 on a CPU
    without bf16 instructions, where torch emulates it. `what` names the setting."""
    if precision != "bfloat16" or device.type != "cpu":
        return None
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return None
    return (f"note: this CPU has no bfloat16 instructions (avx512_bf16, AMX), so {what} "
            "bfloat16 runs slower than float32 here; use float32")
