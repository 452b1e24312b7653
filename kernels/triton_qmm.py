"""Triton fused dequantise-matmul on packed weights: y = x @ W.T with W dequantised in registers.

One kernel body serves both regimes; what differs is the launch:

* GEMM (prefill, M > 16): tiles BM x BN over the output, the K loop inside, autotuned
  over tile shapes keyed by (N, K, M bucket).
* split-K GEMV (decode, M <= 16): BM = 16 (the smallest tile `tl.dot` takes), and the
  K range split over SPLIT_K programs per output tile so a single token still fills the
  GPU; each split writes float32 partials [SPLIT_K, M, N] that one `sum` reduces
  (deterministic, unlike atomics).

The weight tile is read straight from the int32 words: column k's code sits at bit
k * bits of its row's bit stream (packing.py), so any bit width works, including 3-bit
codes that straddle two words. Scales and zero points are gathered per column through
its group (g_idx under act-order, k // group_size otherwise), so act-order costs an
index load, not a separate kernel.

Runs under TRITON_INTERPRET=1 on CPU tensors (how CI tests it); autotuning is skipped
there because it times on a GPU. The interpreter multiplies bfloat16 tiles wrongly
(numpy has no bfloat16: `tl.dot` on them returned garbage in triton 3.9), so under the
interpreter a bfloat16 tile is rounded to bfloat16 and multiplied in float32, which is
what the tensor cores compute; loads, unpacking and stores stay on the real path.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .weights import PackedWeights

DECODE_MAX_M = 16


@triton.jit
def _qmm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr,
    M, N, K, qw_stride, n_groups, x_stride, out_stride, k_per_split, M_BUCKET,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    HAS_GIDX: tl.constexpr, SPLIT_K: tl.constexpr, FP32: tl.constexpr,
    EMULATE_DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_start, k_end, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < k_end
        x = tl.load(x_ptr + rm[:, None] * x_stride + rk[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = k_ok[:, None] & n_ok[None, :]
        bit = rk * BITS
        word = bit >> 5
        shift = (bit & 31)[:, None].to(tl.uint32)
        w_ptr = qw_ptr + rn[None, :] * qw_stride + word[:, None]        # [BK, BN]
        u = tl.load(w_ptr, mask=w_ok, other=0).to(tl.uint32, bitcast=True) >> shift
        if 32 % BITS != 0:  # codes straddling two words take their high bits from the next
            spill = ((bit & 31) + BITS > 32)[:, None]
            hi = tl.load(w_ptr + 1, mask=w_ok & spill, other=0).to(tl.uint32, bitcast=True)
            u = u | tl.where(spill, hi << ((32 - shift) & 31), 0)
        q = (u & ((1 << BITS) - 1)).to(tl.int32) - (1 << (BITS - 1))
        if HAS_GIDX:
            g = tl.load(g_ptr + rk, mask=k_ok, other=0)
        elif GROUP_SIZE > 0:
            g = rk // GROUP_SIZE
        else:
            g = rk * 0
        sg = rn[None, :] * n_groups + g[:, None]
        w = q.to(tl.float32)
        if HAS_ZEROS:
            w = w - tl.load(z_ptr + sg, mask=w_ok, other=0).to(tl.float32)
        w = w * tl.load(s_ptr + sg, mask=w_ok, other=0.0).to(tl.float32)
        if FP32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        elif EMULATE_DOT:  # interpreter: round w as the GPU would, multiply in float32
            acc += tl.dot(x.to(tl.float32), w.to(x.dtype).to(tl.float32),
                          input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    out_ok = m_ok[:, None] & n_ok[None, :]
    offs = rm[:, None] * out_stride + rn[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.store(out_ptr + pid_k * M * N + offs, acc, mask=out_ok)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


_GEMM_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3), (64, 256, 32, 8, 3), (128, 256, 64, 8, 3), (32, 64, 64, 4, 4),
    ]
]
_GEMV_CONFIGS = [
    triton.Config({"BM": 16, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (32, 128, 2, 4), (64, 64, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3),
        (128, 64, 4, 4), (128, 128, 4, 3), (256, 64, 8, 3),
    ]
]
_TUNE_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "HAS_ZEROS", "HAS_GIDX", "SPLIT_K"]
_gemm_tuned = triton.autotune(_GEMM_CONFIGS, key=_TUNE_KEY)(_qmm_kernel)
_gemv_tuned = triton.autotune(_GEMV_CONFIGS, key=_TUNE_KEY)(_qmm_kernel)
# Under the interpreter: one fixed, small tile per regime (no GPU to time configs on).
_INTERPRET_GEMM = {"BM": 32, "BN": 32, "BK": 32}
_INTERPRET_GEMV = {"BM": 16, "BN": 32, "BK": 64}


def split_k(n: int, k: int, device: torch.device) -> int:
    """Splits of K for decode: enough programs for ~2 waves of the GPU, 256+ columns each."""
    if device.type != "cuda":
        return 2 if k >= 128 else 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = -(-n // 64)
    return max(1, min(k // 256, -(-2 * sms // tiles), 16))


def unsupported(w: PackedWeights, device: torch.device) -> str | None:
    if device.type != "cuda" and not interpreting():
        return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1), got {device}"
    if w.bits > 8:
        return f"{w.bits}-bit codes are not supported"
    return None


def prepare(w: PackedWeights) -> PackedWeights:
    return PackedWeights(
        w.qweight.contiguous(), w.scales.contiguous(),
        None if w.zeros is None else w.zeros.to(torch.int8).contiguous(),
        None if w.g_idx is None else w.g_idx.to(torch.int32).contiguous(),
        w.bits, w.group_size, w.in_features)


def qmm(x2: torch.Tensor, w: PackedWeights, out: torch.Tensor | None = None,
        partials: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x2 [M, K] @ W.T. `out` (GEMM) or `partials` [SPLIT_K, M, N] float32
    (decode) may be given preallocated, which is how tests poison them with NaN."""
    m, k = x2.shape
    n = w.out_features
    if x2.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"activations must be float16, bfloat16 or float32, got {x2.dtype}")
    x2 = x2.contiguous()
    decode = m <= DECODE_MAX_M
    splits = 1
    if decode:
        splits = split_k(n, k, x2.device) if partials is None else partials.shape[0]
    if splits == 1:
        target = out if out is not None else torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    else:
        target = partials if partials is not None else torch.empty(
            splits, m, n, dtype=torch.float32, device=x2.device)
    zeros = w.zeros if w.zeros is not None else w.scales  # placeholder pointer, never read
    g_idx = w.g_idx if w.g_idx is not None else w.scales
    group = w.group_size if 0 < w.group_size < k else 0
    args = (x2, w.qweight, w.scales, zeros, g_idx, target, m, n, k, w.qweight.stride(0),
            w.scales.shape[1], x2.stride(0), n, -(-k // splits), triton.next_power_of_2(m))
    flags = dict(BITS=w.bits, GROUP_SIZE=group, HAS_ZEROS=w.zeros is not None,
                 HAS_GIDX=w.g_idx is not None, SPLIT_K=splits,
                 FP32=x2.dtype == torch.float32,
                 EMULATE_DOT=interpreting() and x2.dtype == torch.bfloat16)

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"]), splits)

    if interpreting():
        _qmm_kernel[grid](*args, **flags, **(_INTERPRET_GEMV if decode else _INTERPRET_GEMM))
    else:
        (_gemv_tuned if decode else _gemm_tuned)[grid](*args, **flags)
    if splits == 1:
        return target
    y = target.sum(0).to(x2.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def linear(x: torch.Tensor, prepared: PackedWeights,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    lead = x.shape[:-1]
    y = qmm(x.reshape(-1, prepared.in_features), prepared)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, prepared.out_features)
