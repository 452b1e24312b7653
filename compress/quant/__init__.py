"""Quantisation algorithms: pure functions from tensors (+ statistics) to `QuantizedWeight`."""

from .qweight import QuantizedWeight, num_groups
from .scheme import QuantScheme

__all__ = ["QuantScheme", "QuantizedWeight", "num_groups"]
