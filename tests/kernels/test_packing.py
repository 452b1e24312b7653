"""Packing is lossless and bit-exact against two independent implementations."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from compress import kernels


def naive_pack_row(values: list[int], bits: int) -> list[int]:
    """Bit by bit, as the layout is written down: value j at stream bits j*b.., LSB first."""
    n_words = -(-len(values) * bits // 32)
    words = [0] * n_words
    for j, v in enumerate(values):
        u = v + (1 << (bits - 1))
        for i in range(bits):
            p = j * bits + i
            words[p // 32] |= ((u >> i) & 1) << (p % 32)
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def random_codes(rows: int, cols: int, bits: int, gen: torch.Generator) -> torch.Tensor:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    return torch.randint(lo, hi, (rows, cols), generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (5, 33), (7, 100), (830, 545)])
def test_roundtrip_and_matches_compressed_tensors(bits, shape):
    gen = torch.Generator().manual_seed(hash((bits, shape)) % 2**31)
    codes = random_codes(*shape, bits, gen)
    packed = kernels.pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (shape[0], kernels.packed_width(shape[1], bits))
    assert torch.equal(packed, pack_to_int32(codes, bits))
    assert torch.equal(kernels.unpack(packed, bits, shape[1]), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_naive_bit_loop(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = random_codes(4, 45, bits, gen)
    expected = torch.tensor([naive_pack_row(row.tolist(), bits) for row in codes],
                            dtype=torch.int32)
    assert torch.equal(kernels.pack(codes, bits), expected)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_along_dim0_matches_compressed_tensors(bits):
    gen = torch.Generator().manual_seed(100 + bits)
    codes = random_codes(77, 9, bits, gen)
    packed = kernels.pack(codes, bits, dim=0)
    assert torch.equal(packed, pack_to_int32(codes, bits, packed_dim=0))
    assert torch.equal(kernels.unpack(packed, bits, 77, dim=0), codes)


def test_symmetric_4bit_zero_codes_read_0x88888888():
    # q = 0 is stored as 8 in every nibble: a quick visual check of the +2**(b-1) offset.
    packed = kernels.pack(torch.zeros(1, 8, dtype=torch.int8), 4)
    assert packed.item() == 0x88888888 - (1 << 32)


def test_out_of_range_codes_are_rejected():
    with pytest.raises(ValueError, match="out of range"):
        kernels.pack(torch.tensor([[8]], dtype=torch.int8), 4)


def test_unpack_rejects_wrong_width():
    with pytest.raises(ValueError, match="cannot hold"):
        kernels.unpack(torch.zeros(2, 3, dtype=torch.int32), 4, 8)
