"""Compute on packed weights (installed as `compress.kernels`).

Imports torch (and triton, for GPU kernels) only: it knows packed tensors and
shapes, nothing of models or quantisation algorithms.
"""

from .dispatch import Kernel, backend_name, linear, prepare, run
from .packing import SUPPORTED_BITS, pack, packed_width, unpack
from .reference import dequantize, group_index
from .weights import QuantizedWeight, concat_outputs, num_groups

__all__ = [
    "SUPPORTED_BITS",
    "Kernel",
    "QuantizedWeight",
    "backend_name",
    "concat_outputs",
    "dequantize",
    "group_index",
    "linear",
    "num_groups",
    "pack",
    "packed_width",
    "prepare",
    "run",
    "unpack",
]
