"""Triton matmuls on packed weights: y = x @ W.T for x [M, K] and packed W [N, K].

Two paths, because small and large M are bound by different things:

* Fused, M <= 128 (`_fused_kernel`): read each weight word once. A [BN, BK] tile of
  packed words is loaded with K contiguous (coalesced), unpacked in registers by bit
  arithmetic (`_codes`: no integer-to-float conversions), and multiplied as exact
  integer codes: with one scale group per BK block,
  sum_k x_k (q_k - z) s = s (sum_k x_k q_k - z sum_k x_k), so scales and zero points are
  loaded once per row and block, and `tl.dot` multiplies on 16..128-row tiles, one row
  included (codes are exact in fp16/bf16; on an H200 this beat a one-row multiply-add
  path by 1.4-1.7×, so that path was removed). For small
  M, K is split over programs so one token still fills the GPU; the splits write float32
  partials that one small kernel sums and casts (deterministic, unlike atomics).
* Dense, M > 128: a dequantising kernel writes W in the activation dtype (memory-bound,
  N*K*2 bytes) and cuBLAS multiplies; at these M the GEMM is compute-bound and cuBLAS's
  tiles beat ours, and the dequantisation is amortised over the rows.

Act-order (`g_idx`) weights are repacked once at `prepare` so every group is a
contiguous run of columns; the activations are gathered into that column order per
call (M*K elements, cheap next to the weight). Layouts the fused kernel cannot take
(3-bit codes straddle words; a hand-made g_idx whose sorted groups are not runs of
group_size columns) go through the general dequantiser + cuBLAS at every M.

Configs are fixed by a heuristic, not autotuned: autotuning compiles and times every
candidate on the first call of each shape, seconds that a server pays as latency.
`benchmarks/kernels_gpu.py --sweep` times the candidates; the heuristic is read off it.

Runs under TRITON_INTERPRET=1 on CPU tensors (how CI tests it). The interpreter
multiplies bfloat16 tiles wrongly (numpy has no bfloat16), so under it a bfloat16 dot is
done in float32 on the same rounded values, which is what the tensor cores compute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .packing import pack, unpack
from .weights import QuantizedWeight

FUSED_MAX_M = 128  # up to here the fused kernel; above, dequantise + cuBLAS (see module doc)


@triton.jit
def _codes(words, BITS: tl.constexpr, dtype: tl.constexpr):
    """int32 words [R, W] -> the signed codes they hold, [R, W, 32 // BITS] in dtype, exact.

    Integer-to-float conversions run at a quarter of the ALU rate and bound a 4-bit
    matmul at ~1.5e12 codes/s on an H200 (measured), so the float is built by bit
    arithmetic instead: OR-ing a code u < 1024 into the mantissa of 1024.0 (fp16 0x6400)
    gives 1024 + u exactly, and one subtraction leaves the signed code; likewise with
    2**23 (0x4B000000) in float32.
    """
    shifts = tl.arange(0, 32 // BITS) * BITS
    # The arithmetic shift drags sign bits along; the mask drops them.
    u = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    if dtype == tl.float16:
        f = (u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        q = f - tl.full((1, 1, 1), 1024 + (1 << (BITS - 1)), tl.float16)
    else:
        f = (u | 0x4B000000).to(tl.float32, bitcast=True)
        q = (f - tl.full((1, 1, 1), 8388608 + (1 << (BITS - 1)), tl.float32)).to(dtype)
    return q


@triton.jit
def _fused_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, qw_stride, n_words, n_groups, x_stride, out_stride, k_per_split,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // PER_WORD
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    rm = tl.arange(0, BM)
    m_ok = rm < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_start, k_end, BK):
        rw = k0 // PER_WORD + tl.arange(0, BKW)
        words = tl.load(qw_ptr + rn[:, None] * qw_stride + rw[None, :],
                        mask=n_ok[:, None] & (rw < n_words)[None, :], other=0)
        if GROUP_SIZE > 0:  # noqa: SIM108  (a block lies inside one group: one scale per row)
            sg = rn * n_groups + k0 // GROUP_SIZE
        else:
            sg = rn * n_groups
        s = tl.load(s_ptr + sg, mask=n_ok, other=0.0).to(tl.float32)
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * x_stride + rk[None, :],
                    mask=m_ok[:, None] & (rk < k_end)[None, :], other=0.0)
        q = tl.reshape(_codes(words, BITS, DOT_DTYPE), (BN, BK))  # column k0 + j is j
        if IEEE:
            part = tl.dot(x.to(DOT_DTYPE), tl.trans(q), input_precision="ieee")
        else:  # |q| <= 128: exact in fp16 and bf16
            part = tl.dot(x, tl.trans(q))
        if HAS_ZEROS:
            z = tl.load(z_ptr + sg, mask=n_ok, other=0).to(tl.float32)
            part -= tl.sum(x.to(tl.float32), axis=1)[:, None] * z[None, :]
        acc += part * s[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    # One split writes the output itself; several write float32 partials [splits, M, N].
    tl.store(out_ptr + pid_k * M * N + rm[:, None] * out_stride + rn[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sum_splits_kernel(p_ptr, out_ptr, MN, SPLIT_K, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(p_ptr + s * MN + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequant_words_kernel(
    qw_ptr, s_ptr, z_ptr, w_ptr, N, K, qw_stride, n_words, n_groups,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr,
):
    """Dense W for the layouts the fused kernel takes: whole words, one scale per block."""
    PER_WORD: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // PER_WORD
    out_dtype: tl.constexpr = w_ptr.dtype.element_ty
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    rw = k0 // PER_WORD + tl.arange(0, BKW)
    n_ok = rn < N
    words = tl.load(qw_ptr + rn[:, None] * qw_stride + rw[None, :],
                    mask=n_ok[:, None] & (rw < n_words)[None, :], other=0)
    if GROUP_SIZE > 0:  # noqa: SIM108
        sg = rn * n_groups + k0 // GROUP_SIZE
    else:
        sg = rn * n_groups
    # fp16 out: (q - z) * s rounded once, as in float32, without conversions
    math: tl.constexpr = tl.float16 if out_dtype == tl.float16 else tl.float32
    w = _codes(words, BITS, math)
    if HAS_ZEROS:
        w -= tl.load(z_ptr + sg, mask=n_ok, other=0).to(math)[:, None, None]
    w *= tl.load(s_ptr + sg, mask=n_ok, other=0.0).to(math)[:, None, None]
    rk = k0 + tl.arange(0, BKW)[:, None] * PER_WORD + tl.arange(0, PER_WORD)[None, :]
    tl.store(w_ptr + rn[:, None, None] * K + rk[None, :, :], w.to(out_dtype),
             mask=n_ok[:, None, None] & (rk < K)[None, :, :])


@triton.jit
def _dequant_kernel(
    qw_ptr, s_ptr, z_ptr, g_ptr, w_ptr, N, K, qw_stride, n_groups,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    HAS_GIDX: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    ok = (rn < N)[:, None] & (rk < K)[None, :]
    # Column k's code sits at bit k * BITS of its row's stream (packing.py), so any width
    # works, 3-bit codes straddling two words included; neighbours share words (L1 hits).
    bit = rk * BITS
    shift = (bit & 31)[None, :].to(tl.uint32)
    word = qw_ptr + rn[:, None] * qw_stride + (bit >> 5)[None, :]
    u = tl.load(word, mask=ok, other=0).to(tl.uint32, bitcast=True) >> shift
    if 32 % BITS != 0:
        spill = ((bit & 31) + BITS > 32)[None, :]
        hi = tl.load(word + 1, mask=ok & spill, other=0).to(tl.uint32, bitcast=True)
        u = u | tl.where(spill, hi << ((32 - shift) & 31), 0)
    w = ((u & ((1 << BITS) - 1)).to(tl.int32) - (1 << (BITS - 1))).to(tl.float32)
    if HAS_GIDX:
        g = tl.load(g_ptr + rk, mask=rk < K, other=0)
    elif GROUP_SIZE > 0:
        g = rk // GROUP_SIZE
    else:
        g = rk * 0
    sg = rn[:, None] * n_groups + g[None, :]
    if HAS_ZEROS:
        w -= tl.load(z_ptr + sg, mask=ok, other=0).to(tl.float32)
    w *= tl.load(s_ptr + sg, mask=ok, other=0.0).to(tl.float32)
    tl.store(w_ptr + rn[:, None] * K + rk[None, :], w.to(w_ptr.dtype.element_ty), mask=ok)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@dataclass(frozen=True)
class FusedConfig:
    """Launch shape of `_fused_kernel`: output tile, K block, K splits, warps, stages."""

    bn: int
    bk: int
    splits: int
    warps: int = 4
    stages: int = 4


@dataclass(frozen=True, eq=False)
class TritonWeights:
    """A packed weight prepared for these kernels.

    `perm` is the column order the weight was repacked in (act-order), which the
    activations must be gathered into; `fused` says whether `_fused_kernel` takes this
    layout (else every M goes through the general dequantise + cuBLAS).
    """

    packed: QuantizedWeight
    perm: torch.Tensor | None
    fused: bool

    @property
    def in_features(self) -> int:
        return self.packed.in_features

    @property
    def out_features(self) -> int:
        return self.packed.out_features


def unsupported(w: QuantizedWeight, device: torch.device) -> str | None:
    if device.type != "cuda" and not interpreting():
        return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1), got {device}"
    if w.bits > 8:
        return f"{w.bits}-bit codes are not supported"
    return None


def _group_block(w: QuantizedWeight) -> int:
    """Columns per scale group the fused kernel sees (0: one group spans K)."""
    return w.group_size if 0 < w.group_size < w.in_features else 0


def _contiguous_groups(w: QuantizedWeight) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """The weight with its columns sorted by group and that column order (None: already
    sorted). Unchanged when there is no act-order, or when sorting does not give runs of
    `group_size` columns (a hand-made g_idx), which then keeps its g_idx."""
    if w.g_idx is None:
        return w, None
    if w.scales.shape[1] == 1:  # one group: the column order does not matter
        return QuantizedWeight(w.qweight, w.scales, w.zeros, None, w.bits, w.group_size,
                               w.shape), None
    if _group_block(w) == 0:
        return w, None
    perm, groups = w.column_order()
    standard = torch.arange(w.in_features, device=groups.device) // w.group_size
    if not torch.equal(groups, standard):
        return w, None
    codes = unpack(w.qweight, w.bits, w.in_features)
    if perm is not None:
        codes = codes[:, perm]
    qweight = pack(codes.cpu(), w.bits).to(w.qweight.device)
    return QuantizedWeight(qweight, w.scales, w.zeros, None, w.bits, w.group_size,
                           w.shape), perm


def prepare(w: QuantizedWeight) -> TritonWeights:
    contiguous, perm = _contiguous_groups(w)
    packed = QuantizedWeight(
        contiguous.qweight.contiguous(), contiguous.scales.contiguous(),
        None if contiguous.zeros is None else contiguous.zeros.to(torch.int8).contiguous(),
        None if contiguous.g_idx is None else contiguous.g_idx.to(torch.int32).contiguous(),
        contiguous.bits, contiguous.group_size, contiguous.shape)
    group = _group_block(packed)
    fast = (32 % packed.bits == 0 and packed.g_idx is None
            and (group == 0 or (group >= 32 and group & (group - 1) == 0)))
    return TritonWeights(packed, perm, fast)


def _block_columns(w: QuantizedWeight) -> int:
    """Columns per K block: 128, or the group when smaller (a block must lie in one group)."""
    return min(128, _group_block(w) or 128)


def fused_config(n: int, k: int, m: int, w: QuantizedWeight,
                 device: torch.device) -> FusedConfig:
    """Heuristic launch shape for `_fused_kernel`, read off `kernels_gpu.py --sweep` on an
    H200 (benchmarks/README.md): 64-wide tiles, 128-column blocks, and K split until the
    grid holds about two programs per SM."""
    bk = _block_columns(w)
    if interpreting():  # one program per output tile: the interpreter pays per program
        return FusedConfig(bn=32, bk=bk, splits=2 if k >= 2 * bk else 1)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = -(-n // 64)
    splits = 1 << max(0, (2 * sms // tiles).bit_length() - 1)  # a power of two <= 2*SMs/tiles
    splits = max(1 if m > 16 else 2, min(splits, 16, max(1, k // bk)))
    return FusedConfig(bn=64, bk=bk, splits=splits, stages=4 if m <= 16 else 3)


def _check_activations(x2: torch.Tensor, k: int) -> None:
    if x2.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"activations must be float16, bfloat16 or float32, got {x2.dtype}")
    if x2.shape[-1] != k:
        raise ValueError(f"activations have {x2.shape[-1]} features, the weight takes {k}")


def dequantize(prepared: TritonWeights, dtype: torch.dtype) -> torch.Tensor:
    """Dense W [N, K] in `dtype` on the weight's device (values as the float32 reference
    computes them, rounded once)."""
    w = prepared.packed
    n, k = w.out_features, w.in_features
    dense = torch.empty(n, k, dtype=dtype, device=w.device)
    zeros = w.scales if w.zeros is None else w.zeros  # placeholder pointer, never read
    # Whole words pay off where a word holds many codes: on an H200 at M = 2048 the
    # whole-word kernel made W4 g128 1.2-1.4x faster than the general one, but W8
    # per-channel 1.5-1.7x slower (benchmarks/README.md).
    if prepared.fused and w.bits <= 4:
        bn, bk = 32 if interpreting() else 64, _block_columns(w)
        _dequant_words_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
            w.qweight, w.scales, zeros, dense, n, k, w.qweight.stride(0), w.qweight.shape[1],
            w.scales.shape[1], BITS=w.bits, GROUP_SIZE=_group_block(w),
            HAS_ZEROS=w.zeros is not None, BN=bn, BK=bk)
        return dense
    bn, bk = (32, 32) if interpreting() else (32, 128)
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        w.qweight, w.scales, zeros, w.scales if w.g_idx is None else w.g_idx, dense, n, k,
        w.qweight.stride(0), w.scales.shape[1], BITS=w.bits, GROUP_SIZE=_group_block(w),
        HAS_ZEROS=w.zeros is not None, HAS_GIDX=w.g_idx is not None, BN=bn, BK=bk)
    return dense


def fused(x2: torch.Tensor, w: QuantizedWeight, config: FusedConfig,
          out: torch.Tensor | None = None, partials: torch.Tensor | None = None
          ) -> torch.Tensor:
    """The fused launch for M <= FUSED_MAX_M; `partials` [splits, M, N] float32 may be
    given (tests poison it)."""
    m, k = x2.shape
    n = w.out_features
    group = _group_block(w)
    if config.bk & (config.bk - 1) or config.bk * w.bits < 32 or (group and group % config.bk):
        # A block straddling two groups would use one scale for both: wrong, silently.
        raise ValueError(f"block of {config.bk} columns does not fit {w.bits}-bit "
                         f"codes in groups of {group or k}")
    if m > FUSED_MAX_M:
        raise ValueError(f"the fused kernel takes at most {FUSED_MAX_M} rows, got {m}")
    splits = config.splits if partials is None else partials.shape[0]
    k_per_split = triton.cdiv(triton.cdiv(k, splits), config.bk) * config.bk  # whole blocks
    y = out if out is not None else torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if splits > 1 and partials is None:
        partials = torch.empty(splits, m, n, dtype=torch.float32, device=x2.device)
    # float32 activations multiply in IEEE float32; bfloat16 ones too under the
    # interpreter, whose numpy has no bfloat16 (it returned garbage for bf16 dots).
    ieee = x2.dtype == torch.float32 or (interpreting() and x2.dtype == torch.bfloat16)
    dot_dtype = tl.float32 if ieee else {torch.float16: tl.float16,
                                         torch.bfloat16: tl.bfloat16}[x2.dtype]
    _fused_kernel[(triton.cdiv(n, config.bn), splits)](
        x2, w.qweight, w.scales, w.scales if w.zeros is None else w.zeros,
        y if splits == 1 else partials, m, n, k, w.qweight.stride(0), w.qweight.shape[1],
        w.scales.shape[1], x2.stride(0), n, k_per_split,
        BITS=w.bits, GROUP_SIZE=group, HAS_ZEROS=w.zeros is not None,
        DOT_DTYPE=dot_dtype, IEEE=ieee,
        BM=max(16, triton.next_power_of_2(m)), BN=config.bn, BK=config.bk,
        num_warps=config.warps, num_stages=config.stages)
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](partials, y, m * n, SPLIT_K=splits,
                                                          BLOCK=block)
    return y


def qmm(x2: torch.Tensor, prepared: TritonWeights, out: torch.Tensor | None = None,
        partials: torch.Tensor | None = None, config: FusedConfig | None = None,
        dense: bool | None = None) -> torch.Tensor:
    """y [M, N] = x2 [M, K] @ W.T. `out` and (fused) `partials` may be given
    preallocated, which is how tests poison them with NaN; `config` overrides the fused
    heuristic and `dense` forces (True) or forbids (False) dequantise + cuBLAS, for the
    sweep and benchmarks."""
    w = prepared.packed
    _check_activations(x2, w.in_features)
    m, k = x2.shape
    if prepared.perm is not None:
        x2 = x2.index_select(1, prepared.perm)
    x2 = x2.contiguous()
    if dense is None:
        dense = not (prepared.fused and m <= FUSED_MAX_M)
    if not dense:
        if not prepared.fused:
            raise ValueError("this layout has no fused kernel (3-bit codes, or a g_idx whose "
                             "groups are not runs of group_size columns)")
        config = config or fused_config(w.out_features, k, m, w, x2.device)
        return fused(x2, w, config, out=out, partials=partials)
    y = torch.matmul(x2, dequantize(prepared, x2.dtype).t())
    if out is not None:
        out.copy_(y)
        return out
    return y


def linear(x: torch.Tensor, prepared: TritonWeights,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    lead = x.shape[:-1]
    y = qmm(x.reshape(-1, prepared.in_features), prepared)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, prepared.out_features)
