"""QuantLinear and SharedInputLinears: packed Linears sharing an input run as one kernel."""

import torch
from torch import nn

from compress.nn import QuantLinear, SharedInputLinears
from compress.quant import QuantScheme, rtn


def quant_linear(out_features, in_features, scheme, seed, bias=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if bias else None
    return QuantLinear(rtn.quantize(w, scheme, torch.float16), b)


W4 = QuantScheme(4, 32, False)


def test_fused_members_equal_separate_calls():
    members = [quant_linear(n, 64, W4, seed=n, bias=n == 32) for n in (48, 16, 32)]
    shared = SharedInputLinears()
    x = torch.randn(2, 5, 64)
    fused = shared(x, *members)
    assert shared._kernel is not None and shared._sizes == [48, 16, 32]
    for got, member in zip(fused, members, strict=True):
        torch.testing.assert_close(got, member(x), rtol=1e-2, atol=1e-2)


def test_mixed_layouts_and_dense_members_run_apart():
    x = torch.randn(3, 64)
    mixed = [quant_linear(16, 64, W4, 0), quant_linear(16, 64, QuantScheme(8, -1, True), 1)]
    dense = [nn.Linear(64, 16), nn.Linear(64, 8)]
    for members in (mixed, dense):
        shared = SharedInputLinears()
        outs = shared(x, *members)
        assert shared._kernel is None
        for got, member in zip(outs, members, strict=True):
            torch.testing.assert_close(got, member(x))


def test_new_members_are_noticed():
    shared = SharedInputLinears()
    x = torch.randn(1, 64)
    first = [quant_linear(16, 64, W4, 0), quant_linear(16, 64, W4, 1)]
    second = [quant_linear(16, 64, W4, 2), quant_linear(16, 64, W4, 3)]
    shared(x, *first)
    outs = shared(x, *second)
    torch.testing.assert_close(outs[0], second[0](x), rtol=1e-2, atol=1e-2)
