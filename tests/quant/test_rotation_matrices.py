"""The rotation matrices (compress/quant/rotate.py): Hadamard constructions, orthogonality,
determinism, and the products that fold a rotation into a weight."""

import math

import pytest
import torch

from compress.errors import CompressError
from compress.quant import rotate
from compress.quant.rotate import RotationConfig


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 60, 64, 72, 96, 576, 640, 896])
def test_hadamard_matrices_are_hadamard(n):
    """±1 entries and H Hᵀ = n I exactly (integer arithmetic in float64), for Sylvester
    orders, Paley I (12, 20, 60, 72) and II (28, 36) and their Kronecker products
    (576 = 36·16: SmolLM2's hidden size; 640 = 20·32: Gemma-3-270M's)."""
    h = rotate.hadamard(n)
    assert h is not None and h.shape == (n, n)
    assert bool((h.abs() == 1).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_orders_without_a_construction_are_said_so():
    # 52 = 4·13 (51 = 3·17, 25 = 5²: neither Paley construction with a prime), 6 (not 4k)
    for n in (6, 52, 100):
        assert rotate.hadamard_factors(n) is None and rotate.hadamard(n) is None


@pytest.mark.parametrize("n", [1, 2, 6, 24, 64, 100, 576, 4096])
def test_randomized_rotations_are_orthogonal(n):
    """Qᵀ Q = I to float64 rounding, including the random-orthogonal fallback (6, 100)."""
    q = rotate.randomized_hadamard(n, seed=3).matrix()
    torch.testing.assert_close(q.T @ q, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


def test_randomized_hadamard_has_flat_entries_and_is_seeded():
    q = rotate.randomized_hadamard(576, seed=0)
    m = q.matrix()
    # every input channel spread evenly over all outputs (what a block-diagonal would not do)
    torch.testing.assert_close(m.abs(), torch.full_like(m, 1 / math.sqrt(576)))
    assert "Paley 36 ⊗ Sylvester 16" in q.construction
    assert torch.equal(m, rotate.randomized_hadamard(576, seed=0).matrix())
    assert not torch.equal(m, rotate.randomized_hadamard(576, seed=1).matrix())


def test_apply_is_the_matrix_product_and_repeatable():
    q = rotate.randomized_hadamard(72, seed=5)  # Paley 36 ⊗ Sylvester 2
    x = torch.randn(20_000, 72, generator=torch.Generator().manual_seed(0))  # > one chunk
    full = q.apply(x)
    torch.testing.assert_close(full, x.double() @ q.matrix(), rtol=0, atol=1e-12)
    assert torch.equal(q.apply(x), full)  # bit for bit: a resumed run rotates the same
    scale = torch.rand(72, generator=torch.Generator().manual_seed(1)) + 0.5
    torch.testing.assert_close(q.apply(x[:5], scale=scale),
                               (x[:5].double() * scale.double()) @ q.matrix(), rtol=0,
                               atol=1e-12)
    assert q.apply(x[:3], torch.float16).dtype == torch.float16


def test_folds_leave_each_product_unchanged():
    """A reader W Q on x Q, a writer Qᵀ W (bias b Q) read back through Qᵀ, and a head
    rotation of v's rows undone by o_proj's columns, under grouped-query attention."""
    gen = torch.Generator().manual_seed(0)
    q = rotate.randomized_hadamard(48, seed=1)
    qm = q.matrix().float()
    x = torch.randn(7, 48, generator=gen)
    w, b = torch.randn(30, 48, generator=gen), torch.randn(48, generator=gen)
    torch.testing.assert_close((x @ qm) @ rotate.rotate_input(w, q).float().T, x @ w.T)
    w_out = torch.randn(48, 30, generator=gen)
    h_in = torch.randn(7, 30, generator=gen)
    y = h_in @ rotate.rotate_output(w_out, q).float().T + rotate.rotate_output(b, q).float()
    torch.testing.assert_close(y @ qm.T, h_in @ w_out.T + b, rtol=1e-5, atol=1e-5)

    heads, kv_heads, hd = 4, 2, 12
    h = rotate.randomized_hadamard(hd, seed=2)
    w_v, b_v = torch.randn(kv_heads * hd, 48, generator=gen), torch.randn(kv_heads * hd,
                                                                          generator=gen)
    w_o = torch.randn(48, heads * hd, generator=gen)
    v = (x @ w_v.T + b_v).view(7, kv_heads, hd)
    v_rot = (x @ rotate.rotate_head_outputs(w_v, h).float().T
             + rotate.rotate_head_outputs(b_v, h).float()).view(7, kv_heads, hd)
    per_head = v.repeat_interleave(heads // kv_heads, dim=1).reshape(7, -1)  # query heads
    per_head_rot = v_rot.repeat_interleave(heads // kv_heads, dim=1).reshape(7, -1)
    torch.testing.assert_close(per_head_rot @ rotate.rotate_head_inputs(w_o, h).float().T,
                               per_head @ w_o.T, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(v_rot, v, atol=1e-2)  # the values really are rotated


def test_rotation_config_is_validated():
    assert not RotationConfig().enabled and RotationConfig("hadamard").enabled
    with pytest.raises(CompressError, match="rotate kind"):
        RotationConfig("spin")
    with pytest.raises(CompressError, match="rotate seed"):
        RotationConfig("hadamard", -1)
