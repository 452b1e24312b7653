"""Orthogonal rotations for quantisation: seeded randomised Hadamard matrices, and the
few products that fold one into a Linear's weight (QuaRot, SpinQuant's R1/R2).

A rotation Q (d x d, QᵀQ = I) of a Linear's input changes nothing in full precision when
the weight absorbs it (W x = (W Q)(Qᵀ x)), but it spreads each input channel over all d
channels: an outlier column of W is shared out, and every group of a rotated weight
holds values of similar size, which is what rounding to a few levels per group wants.

Construction. Q = diag(s) K with random signs s (seeded) and K a Hadamard matrix scaled
to be orthogonal (entries ±1/√d). A Hadamard matrix of order d exists for d = 1, 2 and
multiples of 4 that we can build: Sylvester's for powers of two, Paley's (I: q + 1 for a
prime q ≡ 3 mod 4; II: 2(q + 1) for a prime q ≡ 1 mod 4) for others, and Kronecker
products of those. SmolLM2's hidden size 576 = 36·16 is Paley II (q = 17) ⊗ Sylvester 16;
Gemma-3-270M's 640 = 20·32 is Paley I (q = 19) ⊗ Sylvester 32. A Kronecker product of
Hadamard matrices is itself a Hadamard matrix, so every input channel is spread evenly
over all d (a block-diagonal choice, 9 blocks of 64 for 576, would spread each channel
over its block of 64 only). A size with no constructible Hadamard (say d = 100) falls
back to Sylvester on its largest power-of-two factor ⊗ a seeded random orthogonal matrix
on the rest: still exactly orthogonal, with entries no longer all of one magnitude.

K is kept as its Kronecker factors (no factor above 64 for the power-of-two part), so
applying Q to n rows costs n·d·(sum of factor sizes) instead of n·d²: an embedding table
of 150k rows x 4096 rotates in seconds. All products are computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cache

import torch

from compress.errors import CompressError

ROTATIONS = ("none", "hadamard")
_MAX_FACTOR = 64  # Sylvester factors are applied as matrices of at most this order
_ROW_CHUNK = 8192  # rows rotated at once: bounds the float64 copy of a large table


@dataclass(frozen=True)
class RotationConfig:
    """kind: "hadamard" rotates (the residual stream where the architecture allows it,
    and each attention head's values); "none" does not. seed: the random signs."""

    kind: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ROTATIONS:
            raise CompressError(f"rotate kind must be one of {', '.join(ROTATIONS)}, got "
                                f"{self.kind!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise CompressError(f"rotate seed must be a non-negative integer, got "
                                f"{self.seed!r}")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def to_dict(self) -> dict:
        return asdict(self)


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, math.isqrt(n) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j - i) for the quadratic character χ of GF(q), q prime."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)],
                       dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order n by Paley's constructions, or None."""
    if n % 4:
        return None
    q = n - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: I + S with S skew (a conference matrix)
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(n, dtype=torch.float64) + s
    q = n // 2 - 1
    if _is_prime(q) and q % 4 == 1:  # Paley II: a symmetric conference matrix, doubled
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        minus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), minus)
    return None


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def _power_of_two_part(n: int) -> int:
    return n & -n


@cache
def hadamard_factors(n: int) -> tuple[int, ...] | None:
    """The orders of the Hadamard factors whose Kronecker product has order n (a Paley
    order first, if any, then powers of two of at most `_MAX_FACTOR`), or None when no
    construction here reaches n. The smallest Paley factor is chosen: it is applied as a
    dense matrix."""
    two = _power_of_two_part(n)
    odd = n // two
    paley = None
    if odd > 1:
        m = odd
        while m <= n and paley is None:
            if _paley(m) is not None:
                paley = m
            m *= 2
        if paley is None:
            return None
    rest = n // (paley or 1)
    factors = [paley] if paley else []
    while rest > 1:
        f = min(rest, _MAX_FACTOR)
        factors.append(f)
        rest //= f
    return tuple(factors)


def hadamard(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order n (H Hᵀ = n I) from Paley and Sylvester, or None."""
    factors = hadamard_factors(n)
    if factors is None:
        return None
    h = torch.ones(1, 1, dtype=torch.float64)
    for f in factors:
        h = torch.kron(h, _factor(f))
    return h


def _factor(n: int) -> torch.Tensor:
    return _sylvester(n) if n == _power_of_two_part(n) else _paley(n)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal matrix (Haar: QR of a Gaussian matrix, signs fixed by R)."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


@dataclass(frozen=True, eq=False)
class Rotation:
    """Q = diag(signs) · kron(*factors), each factor orthogonal; `construction` says how
    it was built (logged in the checkpoint)."""

    signs: torch.Tensor  # (d,) ±1, float64
    factors: tuple[torch.Tensor, ...]  # orthogonal, float64
    construction: str

    @property
    def dim(self) -> int:
        return self.signs.numel()

    def apply(self, x: torch.Tensor, dtype: torch.dtype = torch.float64,
              scale: torch.Tensor | None = None) -> torch.Tensor:
        """x Q along the last dimension (every row a vector of the rotated space), or
        x diag(scale) Q, computed in float64 and returned in `dtype`. Rows are rotated
        in chunks, so a large table is never held whole in float64. The same tensor
        gives the same bits on every run (what resuming relies on); a row rotated alone
        may differ from the same row rotated among others in the last bit (BLAS blocks
        by shape), so callers rotate a tensor whole, as it is exported."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"rotation of size {self.dim} applied to {tuple(x.shape)}")
        rows = x.reshape(-1, self.dim)
        out = torch.empty(rows.shape, dtype=dtype)
        signs = self.signs if scale is None else self.signs * scale.to(torch.float64)
        sizes = [f.shape[0] for f in self.factors]
        for start in range(0, rows.shape[0], _ROW_CHUNK):
            y = rows[start:start + _ROW_CHUNK].to(torch.float64) * signs
            y = y.reshape(-1, *sizes)
            # Contracting axis 1 with each factor in turn appends the result axis last:
            # after every factor the axes are back in order (kron's row-major indexing).
            for f in self.factors:
                y = torch.tensordot(y, f, dims=([1], [0]))
            out[start:start + _ROW_CHUNK] = y.reshape(-1, self.dim).to(dtype)
        return out.reshape(x.shape)

    def matrix(self) -> torch.Tensor:
        """Q as a dense (d, d) float64 matrix."""
        return self.apply(torch.eye(self.dim, dtype=torch.float64))


def randomized_hadamard(n: int, seed: int) -> Rotation:
    """diag(s) · H / √n with seeded random signs s: the same matrix for the same (n, seed)
    on every run, which a resumed run relies on."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    orders = hadamard_factors(n)
    if orders is not None:
        factors = tuple(_factor(f) / math.sqrt(f) for f in orders)
        parts = [f"Paley {f}" if f != _power_of_two_part(f) else f"Sylvester {f}"
                 for f in orders]
        return Rotation(signs, factors or (torch.ones(1, 1, dtype=torch.float64),),
                        f"Hadamard {n} = {' ⊗ '.join(parts) or 'identity'}, random signs")
    two = _power_of_two_part(n)
    rest = n // two
    factors = [random_orthogonal(rest, generator)]
    while two > 1:
        f = min(two, _MAX_FACTOR)
        factors.append(_sylvester(f) / math.sqrt(f))
        two //= f
    return Rotation(signs, tuple(factors),
                    f"random orthogonal {rest} ⊗ Sylvester {n // rest} (no Hadamard of order "
                    f"{n} is built here), random signs")


# The folds, as products with a weight. Conventions: a Linear computes y = x Wᵀ (+ b)
# with x a row vector; the rotated stream carries x Q instead of x.

def rotate_input(weight: torch.Tensor, q: Rotation, scale: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W Q: the Linear reads the rotated stream x Q and computes what W did on x; with
    `scale`, W diag(scale) Q: it also applies the norm weight its input had (x is then
    the unit-weight norm's output)."""
    return q.apply(weight, dtype, scale)


def rotate_output(weight: torch.Tensor, q: Rotation) -> torch.Tensor:
    """Qᵀ W for a weight (out, in), b Q for a bias (out,): the Linear writes y Q."""
    if weight.dim() == 1:
        return q.apply(weight)
    return q.apply(weight.T).T


def rotate_head_outputs(weight: torch.Tensor, h: Rotation) -> torch.Tensor:
    """Each head's block of output rows (a weight's, or a bias's entries) rotated by h:
    head g writes v_g h. (heads · hd, in) or (heads · hd,)."""
    hd = h.dim
    if weight.dim() == 1:
        return h.apply(weight.reshape(-1, hd)).reshape(weight.shape)
    blocks = weight.reshape(-1, hd, weight.shape[-1])  # (heads, hd, in)
    return h.apply(blocks.transpose(1, 2)).transpose(1, 2).reshape(weight.shape)


def rotate_head_inputs(weight: torch.Tensor, h: Rotation) -> torch.Tensor:
    """Each head's block of input columns rotated by h: (out, heads · hd) reads every
    head's v_g h and computes what it did on v_g."""
    hd = h.dim
    return h.apply(weight.reshape(weight.shape[0], -1, hd)).reshape(weight.shape)
