"""Dense int32 packing of b-bit integer codes (compressed-tensors "pack-quantized").

Layout, for a [rows, cols] matrix of signed b-bit codes q packed along dim 1::

    stored value u = q + 2**(b-1)          (0 .. 2**b - 1)
    row r is one bit stream: element j occupies bits [j*b, (j+1)*b)
    bit p of the stream lives in word p // 32 at bit p % 32 (LSB first)
    packed: int32 [rows, ceil(cols * b / 32)]

      word 0 (b=4):  | u7 | u6 | u5 | u4 | u3 | u2 | u1 | u0 |   <- u0 in bits 0..3
      b=3:           u10 straddles words 0 and 1 (bits 30..32): dense, no padding bits

Packing along dim 0 is the same on the transposed matrix (zero points use it).
Only 2, 4 and 8 bits avoid straddling; they take a shift-and-mask fast path.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_width(n: int, bits: int) -> int:
    """Number of int32 words holding `n` b-bit values."""
    return -(-n * bits // 32)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def pack(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed b-bit codes (any integer dtype, 2-D) into int32 words along `dim`."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"expected a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    if dim == 0:
        return pack(codes.t(), bits, 1).t().contiguous()
    rows, cols = codes.shape
    offset = 1 << (bits - 1)
    u = (codes.to(torch.int64) + offset).contiguous()
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    pad = (-cols) % 32
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    blocks = u.view(rows, -1, 32)  # 32 values = exactly `bits` words
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(per_word, dtype=torch.int64, device=u.device) * bits
        words = (blocks.view(rows, -1, bits, per_word) << shifts).sum(-1)
    else:
        # Expand to single bits, regroup the stream into 32-bit words.
        bit_pos = torch.arange(bits, dtype=torch.int64, device=u.device)
        stream = ((blocks.unsqueeze(-1) >> bit_pos) & 1).view(rows, -1, bits, 32)
        words = (stream << torch.arange(32, dtype=torch.int64, device=u.device)).sum(-1)
    words = words.view(rows, -1)[:, : packed_width(cols, bits)]
    # Values >= 2**31 wrap to the negative int32 with the same bits.
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32).contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of `pack`: int32 words -> signed int8 codes, `n` values along `dim`."""
    _check_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(
            f"expected 2-D int32 packed words, got {packed.dtype} {tuple(packed.shape)}")
    if dim == 0:
        return unpack(packed.t(), bits, n, 1).t().contiguous()
    packed = packed.contiguous()
    rows, width = packed.shape
    if width != packed_width(n, bits):
        raise ValueError(
            f"{width} packed words cannot hold {n} {bits}-bit values "
            f"(expected {packed_width(n, bits)})"
        )
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        # Arithmetic right shift sign-extends; the mask discards those bits.
        u = (packed.unsqueeze(-1) >> shifts) & mask
        u = u.view(rows, -1)[:, :n]
    else:
        pad = (-width) % bits
        words = torch.nn.functional.pad(packed, (0, pad)).view(rows, -1, bits)
        bit_idx = torch.arange(32, dtype=torch.int32, device=packed.device)
        stream = ((words.unsqueeze(-1) >> bit_idx) & 1).view(rows, -1, 32, bits)
        u = (stream << torch.arange(bits, dtype=torch.int32, device=packed.device)).sum(-1)
        u = u.view(rows, -1)[:, :n]
    return (u - (1 << (bits - 1))).to(torch.int8)
