"""What one weight is quantised to: bits, grouping, symmetry."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from compress.errors import CompressError
from compress.kernels import SUPPORTED_BITS

MIN_GROUP = 32
# far wider than any Linear; the kernels index groups in 64-bit integers, which 2**63 overflows
MAX_GROUP = 1 << 24


@dataclass(frozen=True)
class QuantScheme:
    """Integer weight-only quantisation of one Linear.

    group_size -1 means one scale per output channel; see `fit` for layers whose input
    features the group size does not divide.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or (
                self.bits not in SUPPORTED_BITS):  # 4.0 == 4, but is no bit count
            raise CompressError(
                f"bits={self.bits!r} is not supported; choose one of "
                f"{', '.join(map(str, SUPPORTED_BITS))}"
            )
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
            self.group_size != -1 and not 0 < self.group_size <= MAX_GROUP
        ):
            raise CompressError(
                f"group size {self.group_size!r:.40} is invalid; use -1 (per-channel) or a "
                "positive size such as 32, 64 or 128"
            )
        if not isinstance(self.symmetric, bool):
            raise CompressError(f"symmetric must be true or false, got {self.symmetric!r}")

    def fit(self, module: str, in_features: int) -> QuantScheme:
        """The scheme `module` actually gets, given its input features.

        compressed-tensors (and the kernels of vLLM and ours) need the group size to divide
        the input features. A power-of-two size that does not divide them shrinks to the
        largest power of two that does (hidden size 576 takes groups of 64 when 128 is
        asked), never below MIN_GROUP; any other size that does not divide is an error.
        """
        g = self.group_size
        if g == -1 or in_features % g == 0:
            return self
        if g & (g - 1) == 0:
            fitted = g
            while in_features % fitted:
                fitted //= 2
            if fitted >= MIN_GROUP:
                return replace(self, group_size=fitted)
        sizes = [str(s) for s in (32, 64, 128, 256) if in_features % s == 0]
        raise CompressError(
            f"group size {g} does not divide the {in_features} input features of {module}; "
            "use -1 (per-channel) or a size that divides it"
            + (f", such as {', '.join(sizes)}" if sizes else "")
        )

    @property
    def label(self) -> str:
        group = "pc" if self.group_size == -1 else f"g{self.group_size}"
        return f"w{self.bits}{group}-{'sym' if self.symmetric else 'asym'}"

    def to_dict(self) -> dict:
        return asdict(self)
