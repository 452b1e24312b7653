"""Quantisation algorithms: pure functions from tensors (+ statistics) to `QuantizedWeight`."""

from compress.kernels import QuantizedWeight, num_groups

from .scheme import QuantScheme

__all__ = ["QuantScheme", "QuantizedWeight", "num_groups"]
