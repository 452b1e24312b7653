"""Generic capture: true-sequential group inputs from a layer's own forward."""

import pytest
import torch
from torch import nn

from compress import models
from compress.calibrate import capture


class Toy(nn.Module):
    """a -> b -> (c on rows whose first input is positive: a routed 'expert')."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a, self.b, self.c = (nn.Linear(4, 4, bias=False) for _ in range(3))
        for m in (self.a, self.b, self.c):
            m.weight.data = torch.randn(4, 4, generator=gen)

    def forward(self, x):
        h = self.b(torch.tanh(self.a(x)))
        routed = x[:, 0] > 0
        if routed.any():
            h = h.clone()
            h[routed] = h[routed] + self.c(h[routed])
        return h


def run(toy, chunks, budget, replace=True):
    seen = []

    def on_group(group, inputs):
        count = sum(1 for _ in inputs)
        seen.append((group, count))
        if replace:  # stands in for quantisation: everything later must compute with it
            toy.get_submodule(group[0]).weight.data.mul_(0.5).round_(decimals=1)

    capture.true_sequential(toy, toy, chunks, [("a",), ("b",), ("c",)], on_group, budget)
    return seen


@pytest.mark.parametrize("budget", [0, 10**9])  # every chunk recomputed / all kept
def test_outputs_equal_the_forward_of_the_replaced_module(budget):
    toy = Toy()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    x[:2, 0], x[2:, 0] = -1.0, 1.0  # rows 0-1 (chunk 0) route nothing to c
    chunks = list(x.clone().split(2))
    seen = run(toy, chunks, budget)
    assert seen == [(("a",), 3), (("b",), 3), (("c",), 2)]  # chunk 0 never reaches c
    # chunk by chunk, as calibration ran it (a batch of 6 may take another matmul kernel
    # than batches of 2, and differ in the last bit)
    expected = torch.cat([toy(part) for part in x.split(2)])
    torch.testing.assert_close(torch.cat(chunks), expected, rtol=0, atol=0)


def test_group_inputs_are_computed_with_earlier_groups_replaced():
    toy = Toy()
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(2)).abs()
    inputs_b = []

    def on_group(group, inputs):
        if group == ("b",):
            inputs_b.extend(t.clone() for t in inputs)
        toy.get_submodule(group[0]).weight.data.zero_() if group == ("a",) else None

    capture.true_sequential(toy, toy, list(x.clone().split(2)), [("a",), ("b",), ("c",)],
                            on_group, 10**9)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in inputs_b)  # tanh(0 @ x)


def test_groups_out_of_execution_order_are_refused():
    toy = Toy()
    x = torch.randn(2, 4).abs()
    with pytest.raises(capture.GroupOrderError, match="out of execution order"):
        capture.true_sequential(toy, toy, [x], [("b",), ("a",)],
                                lambda g, inputs: list(inputs), 10**9)


def test_observe_sees_every_call_and_leaves_no_hooks():
    toy = Toy()
    seen = []
    with capture.observe(toy, ["a", "c"], lambda name, x: seen.append((name, x.shape))):
        toy(torch.ones(3, 4))
    toy(torch.ones(3, 4))
    assert seen == [("a", (3, 4)), ("c", (3, 4))]


@pytest.mark.parametrize("budget", [0, 10**9])
def test_real_layer_walks_the_table_groups_and_equals_its_forward(tiny_factory, budget):
    files = models.open_model(tiny_factory("llama"))
    layer = models.build_layer(files, 1, torch.float32)
    rope = models.rotary(files)(0, 16)
    x = torch.randn(5, 16, 64, generator=torch.Generator().manual_seed(0))
    seen = []

    def on_group(names, inputs):
        chunks = list(inputs)
        seen.append(names)
        assert sum(t.shape[0] for t in chunks) == 5
        assert chunks[0].shape[-1] == layer.get_submodule(names[0]).in_features
        for name in names:
            layer.get_submodule(name).weight.data.mul_(0.5).round_(decimals=2)

    got = x.clone()
    with torch.no_grad():
        capture.true_sequential(layer, lambda c: layer(c, rope), list(got.split(2)),
                                files.arch.linear_groups, on_group, budget)
        expected = layer(x, rope)
    assert tuple(seen) == files.arch.linear_groups
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
