"""RTN: codes in range, fake-quant == packed round trip, error bounds, SQNR floors."""

import pytest
import torch

from compress.quant import QuantScheme, rtn


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(10 * torch.log10(w.pow(2).sum() / (w - w_hat).pow(2).sum()))


def expand(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    if group_size == -1:
        return t.expand(-1, in_features)
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_is_at_most_half_a_step(bits, group_size, symmetric):
    gen = torch.Generator().manual_seed(hash((bits, group_size, symmetric)) % 2**31)
    w = torch.randn(48, 256, generator=gen) * 0.05
    # float32 scales: fp16 rounding would move the range ends by up to 2**(b-1) * 2**-11 steps.
    qw = rtn.quantize(w, QuantScheme(bits, group_size, symmetric), torch.float32)
    codes = qw.codes()
    assert int(codes.min()) >= -(1 << (bits - 1)) and int(codes.max()) < 1 << (bits - 1)
    w_hat = qw.dequantize()
    signed = expand(qw.scales.float(), group_size, 256)
    step = signed.abs()
    err = (w - w_hat).abs()
    if symmetric:
        # The signed grid: each group's larger-magnitude end is code -2**(b-1) exactly; the
        # other end may clip one step, where it lies past code 2**(b-1) - 1
        assert torch.all(err <= step * 1.0001)
        inside = w / signed < (1 << (bits - 1)) - 1
        assert torch.all(err[inside] <= step[inside] * 0.5001)
        width = 256 if group_size == -1 else group_size
        groups, errors = w.reshape(48, -1, width), err.reshape(48, -1, width)
        at = groups.abs().argmax(-1, keepdim=True)
        assert torch.all(errors.gather(-1, at) <= 1e-6 * groups.abs().gather(-1, at))
        assert (qw.scales < 0).any() and (qw.scales > 0).any()
    else:
        assert torch.all(err <= step * 0.5001)


def test_fake_quant_equals_stored_weight_bit_exactly():
    # The algorithm's own arithmetic (with fp16-rounded scales) is what the packed form holds.
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(64, 192, generator=gen)
    scheme = QuantScheme(4, 64, False)
    qw = rtn.quantize(w, scheme, torch.float16)
    groups = rtn.grouped(w, 64)
    scale, zero = rtn.qparams(groups, 4, False, torch.float16)
    codes = rtn.quantize_codes(groups, scale[..., None], zero[..., None], 4)
    fake = ((codes - (zero[..., None] - 8)) * scale[..., None]).reshape(64, 192)
    assert torch.equal(qw.dequantize(), fake)
    assert torch.equal(qw.scales.float(), scale)


@pytest.mark.parametrize("bits,group_size,floor_db", [(8, -1, 38.0), (4, 128, 17.0),
                                                       (4, 32, 19.0), (3, 128, 11.0)])
def test_sqnr_floor_on_gaussian_weights(bits, group_size, floor_db):
    # Uniform quantisation of a Gaussian gains ~6 dB per bit; floors sit ~2 dB under measured.
    gen = torch.Generator().manual_seed(bits * 1000 + group_size)
    w = torch.randn(256, 1024, generator=gen)
    qw = rtn.quantize(w, QuantScheme(bits, group_size, True), torch.float32)
    assert sqnr_db(w, qw.dequantize()) > floor_db


def test_asymmetric_beats_symmetric_on_skewed_weights():
    gen = torch.Generator().manual_seed(3)
    w = torch.rand(64, 256, generator=gen) + 0.2  # all positive
    sym = rtn.quantize(w, QuantScheme(4, 64, True)).dequantize()
    asym = rtn.quantize(w, QuantScheme(4, 64, False)).dequantize()
    assert sqnr_db(w, asym) > sqnr_db(w, sym) + 3


def test_zero_group_dequantises_to_exact_zeros():
    w = torch.randn(8, 128)
    w[:, :64] = 0
    for symmetric in (True, False):
        qw = rtn.quantize(w, QuantScheme(4, 64, symmetric))
        assert torch.equal(qw.dequantize()[:, :64], torch.zeros(8, 64))
        assert torch.all(qw.scales[:, 0] == 1)


def test_tiny_scales_do_not_underflow_fp16():
    w = torch.full((4, 64), 1e-9)
    qw = rtn.quantize(w, QuantScheme(4, 64, True), torch.float16)
    # all-positive groups: negative scales on the signed grid, never zero
    assert torch.all(qw.scales.abs() > 0) and torch.isfinite(qw.dequantize()).all()


def test_codes_roundtrip_through_packing():
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(33, 96, generator=gen)
    qw = rtn.quantize(w, QuantScheme(3, 32, False))
    again = type(qw).from_codes(qw.codes(), qw.scales, qw.zeros, bits=3, group_size=32)
    assert torch.equal(again.qweight, qw.qweight)
