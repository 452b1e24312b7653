"""Compute on packed weights (installed as `compress.kernels`).

Imports torch (and triton, for GPU kernels) only: it knows packed tensors and
shapes, nothing of models or quantisation algorithms.
"""

from .dispatch import backend_name, linear
from .packing import SUPPORTED_BITS, pack, packed_width, unpack
from .reference import dequantize, group_index

__all__ = [
    "SUPPORTED_BITS",
    "backend_name",
    "dequantize",
    "group_index",
    "linear",
    "pack",
    "packed_width",
    "unpack",
]
