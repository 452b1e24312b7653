"""The bundled model's Linear shapes and random packed weights of them, for the CPU kernel
benchmarks (time does not depend on the code values)."""

from __future__ import annotations

import torch

from compress import kernels

SHAPES = {  # name: (N, K)
    "q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "qkv fused": (960, 576),
    "gate/up": (1536, 576), "gate_up fused": (3072, 576), "down_proj": (576, 1536),
}


def random_packed(n: int, k: int, bits: int, group: int) -> kernels.QuantizedWeight:
    """Random codes; a group size that does not divide K shrinks as the pipeline does
    (128 over K = 576 becomes 64)."""
    while group > 32 and k % group:
        group //= 2
    gen = torch.Generator().manual_seed(n * k + bits)
    half = 1 << (bits - 1)
    codes = torch.randint(-half, half, (n, k), generator=gen, dtype=torch.int8)
    groups = 1 if group == -1 else -(-k // group)
    scales = (torch.rand(n, groups, generator=gen) * 0.01).to(torch.float16)
    return kernels.QuantizedWeight(kernels.pack(codes, bits), scales, None, None, bits, group,
                                   (n, k))
