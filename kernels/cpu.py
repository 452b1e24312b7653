"""Fast CPU path: our own integer-dot kernel (native.py) where it builds, else torch's own
weight-only ops, with the weights repacked once at load time.

* Our kernel (preferred): activations scaled per block of 32 to 15-bit integers, integer
  dot products against the 4- or 8-bit codes (AVX512-VNNI or AVX2 where available). 1.5-2.2x
  faster than torch's int4 op at M = 1 on SmolLM2's shapes, at par from M = 16; see
  native.py. Relative error ~1e-5 against the float32 reference for float32 inputs.
* torch's ops (fallback where no C++ compiler is available, or `COMPRESS_NATIVE=0`):
  - 2, 3 and 4 bits -> `aten._weight_int4pack_mm_for_cpu`. Codes of 2 and 3 bits are
    exact 4-bit codes too, so they take the same op (memory is then 4 bits per weight).
    The op computes `(u - 8) * scale + zero` per group with u in 0..15, so a signed code
    q is stored as u = q + 8 and an asymmetric zero point z folds into `zero = -z * scale`.
  - 8 bits -> `aten._weight_int8pack_mm` (y = x @ q.T * scale, one scale per row).
    Groups become one call per group, summed; zero points fold into a rank-G correction
    `-(per-group sums of x) @ (z * scale).T`.
  Both ops are fast only for bfloat16 activations (float32 and float16 inputs take a
  scalar path ~20x slower, measured in benchmarks/kernel_speed.py), so they compute in
  bfloat16 whatever the input dtype: W4A16 semantics, relative error around 1e-2 (scales
  rounded to bfloat16).
* Many rows at once (prefill, evaluation: M >= dense_min_rows): the weight is dequantised
  to bfloat16 for that call and multiplied densely, since a GEMM amortises the weight over
  the rows while the weight-only kernels cost time linear in M.

`COMPRESS_KERNEL=reference` gives float32 exactness when that matters more than speed.

Shape rules of torch's int4 op and how we meet them: N a multiple of 16 (pad rows), K a
multiple of the group size (pad columns with zero weights and the input with zeros),
group size 32/64/128/256 (a group of 128 over K=576 is served as groups of 64 sharing
a scale; per-channel as the largest such size dividing K). Act-order (`g_idx`) is
served by sorting the columns into their groups once and gathering the input columns
with the same permutation on every call.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import native
from .layout import boundaries, column_runs, gather_index, padded_columns
from .packing import unpack
from .weights import QuantizedWeight

_OPS = torch.ops.aten
INT4_GROUP_SIZES = (256, 128, 64, 32)
_ROW_MULTIPLE = 16
_INT8_COLUMN_MULTIPLE = 32
# Rows from which dequantise + bf16 GEMM beats the weight-only kernels. Below 512 rows
# ours won on every SmolLM2 shape (4-bit q/k/v, gate/up, down; 8-bit gate/up and the
# 49152-row head; benchmarks/kernel_speed.py, 2026-11-26); torch's ops lose from 256.
DENSE_MIN_ROWS = 512
TORCH_OPS_DENSE_MIN_ROWS = 256
COMPUTE_DTYPE = torch.bfloat16


def available() -> bool:
    return hasattr(_OPS, "_weight_int4pack_mm_for_cpu") and hasattr(_OPS, "_weight_int8pack_mm")


@dataclass(frozen=True, eq=False)
class Int4Prepared:
    packed: torch.Tensor          # uint8, torch's int4 layout for [N_pad, K_pad]
    scales_zeros: torch.Tensor    # bf16 [K_pad / group, N_pad, 2]
    group: int
    gather: torch.Tensor | None   # op column -> input column (K: a zero), see _gather
    in_features: int
    out_features: int
    source: QuantizedWeight         # for the dense path of large M


@dataclass(frozen=True, eq=False)
class Int8Prepared:
    segments: tuple[tuple[int, int, torch.Tensor, torch.Tensor], ...]  # (start, end, q, scale)
    zero_scale: torch.Tensor | None   # float32 [N, G]: z * s, asymmetric only
    gather: torch.Tensor | None
    in_features: int
    out_features: int
    source: QuantizedWeight


def _int4_group(k: int, group_starts: torch.Tensor) -> int | None:
    """The op group size that serves these groups with the least column padding."""
    best = None
    for size in INT4_GROUP_SIZES:
        if group_starts.numel() and bool((group_starts % size).any()):
            continue
        padded = -(-k // size) * size
        if best is None or padded < best[0]:
            best = (padded, size)
    return None if best is None else best[1]


def unsupported(w: QuantizedWeight, device: torch.device) -> str | None:
    """Why this backend cannot serve `w` on `device`, or None if it can."""
    if device.type != "cpu":
        return f"the CPU kernels need CPU tensors, got {device}"
    if native.unsupported(w) is None:
        return None
    return torch_ops_unsupported(w)


def torch_ops_unsupported(w: QuantizedWeight) -> str | None:
    """Why torch's int4/int8 ops cannot serve `w`, or None if they can."""
    if not available():
        return "this torch build lacks the int4/int8 weight-only CPU ops"
    if w.bits > 4 and w.bits != 8:
        return f"{w.bits}-bit weights have no CPU op (supported: 2, 3, 4, 8)"
    if w.bits <= 4:
        _, groups = w.column_order()
        if _int4_group(w.in_features, boundaries(groups)) is None:
            return ("act-order groups are not runs of a multiple of 32 columns, which the "
                    "int4 CPU op needs")
    return None


Prepared = native.NativePrepared | Int4Prepared | Int8Prepared


def prepare(w: QuantizedWeight) -> Prepared:
    """`w` repacked for our kernel where it is available, else for torch's ops."""
    if native.unsupported(w) is None:
        return native.prepare(w)
    return prepare_for_torch_ops(w)


def prepare_for_torch_ops(w: QuantizedWeight) -> Int4Prepared | Int8Prepared:
    reason = torch_ops_unsupported(w)
    if reason:
        raise ValueError(reason)
    return _prepare_int4(w) if w.bits <= 4 else _prepare_int8(w)


NATIVE_NAMES = {"avx512-vnni": "cpu-native-vnni", "avx2": "cpu-native-avx2"}


def implementation(prepared: Prepared) -> str:
    """Which kernel a prepared weight runs on, for reports."""
    if isinstance(prepared, native.NativePrepared):
        return NATIVE_NAMES.get(native.isa(), "cpu-native")
    return "cpu-torch-ops"


def _prepare_int4(w: QuantizedWeight) -> Int4Prepared:
    n, k = w.out_features, w.in_features
    perm, groups = w.column_order()
    group = _int4_group(k, boundaries(groups))
    padded_k = -(-k // group) * group
    padded_n = -(-n // _ROW_MULTIPLE) * _ROW_MULTIPLE
    order = perm if perm is not None else torch.arange(k)
    columns, _ = padded_columns(order, [0], [k], group, k)
    # Padding gets code 8, i.e. (8 - 8) * s + zero: it meets zero inputs (columns) or is
    # sliced away (rows), so its value never reaches the output.
    codes = F.pad(unpack(w.qweight, w.bits, k).to(torch.int32) + 8, (0, 1), value=8)
    codes = F.pad(codes[:, columns], (0, 0, 0, padded_n - n), value=8)
    packed = _OPS._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
    # One scale/zero per op group: the group of its first column (tail: the last group).
    first_cols = torch.arange(0, padded_k, group).clamp(max=k - 1)
    chunk_groups = groups[first_cols]
    scales = w.scales.to(torch.float32)[:, chunk_groups]
    zero = (torch.zeros_like(scales) if w.zeros is None
            else -w.zeros.to(torch.float32)[:, chunk_groups] * scales)
    scales_zeros = torch.stack([scales, zero], dim=-1)                 # [N, G', 2]
    scales_zeros = F.pad(scales_zeros, (0, 0, 0, 0, 0, padded_n - n))  # rows -> N_pad
    return Int4Prepared(packed, scales_zeros.transpose(0, 1).contiguous().to(COMPUTE_DTYPE),
                        group, gather_index(columns, k), k, n, w)


def _prepare_int8(w: QuantizedWeight) -> Int8Prepared:
    n, k = w.out_features, w.in_features
    order, groups, starts, ends = column_runs(w)
    # The int8 op reads past the end of rows whose length is not a multiple of 16
    # (segfaults seen at K = 200 in torch 2.13): pad every group's run to 32 columns.
    columns, padded_starts = padded_columns(order, starts, ends, _INT8_COLUMN_MULTIPLE, k)
    codes = F.pad(unpack(w.qweight, w.bits, k), (0, 1))[:, columns]
    padded_ends = [*padded_starts[1:], columns.numel()]
    segments = tuple(
        (a, b, codes[:, a:b].contiguous(),
         w.scales[:, int(groups[start])].to(COMPUTE_DTYPE).contiguous())
        for a, b, start in zip(padded_starts, padded_ends, starts, strict=True))
    zero_scale = None
    if w.zeros is not None:
        seg_groups = groups[torch.tensor(starts)]
        zero_scale = (w.zeros.to(torch.float32)[:, seg_groups]
                      * w.scales.to(torch.float32)[:, seg_groups])
    return Int8Prepared(segments, zero_scale, gather_index(columns, k), k, n, w)


def linear(x: torch.Tensor, prepared: Prepared,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) for x [..., K] of any float dtype; returns x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, prepared.in_features)
    many_rows = x2.shape[0] >= dense_min_rows(prepared)
    y = dense(x2, prepared.source) if many_rows else weight_only(x2, prepared)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*lead, prepared.out_features)


def dense_min_rows(prepared: Prepared) -> int:
    """Rows from which `linear` multiplies densely rather than from the packed codes."""
    if isinstance(prepared, native.NativePrepared):
        return DENSE_MIN_ROWS
    return TORCH_OPS_DENSE_MIN_ROWS


@functools.cache
def native_half(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` (bfloat16, float16) matrices natively (AVX512-BF16,
    AVX512-FP16, AMX). Without, oneDNN emulates them: a 512-row bfloat16 GEMM ran ~6x
    slower than the float32 one on an AVX2-only EPYC."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def dense_dtype() -> torch.dtype:
    """The GEMM dtype of the dense path: bfloat16 where it is native, else float32."""
    return COMPUTE_DTYPE if native_half(COMPUTE_DTYPE) else torch.float32


def dense(x2: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x2 [M, K] @ W.T through one GEMM on the dequantised weight (`dense_dtype`), in x2's
    dtype."""
    dtype = dense_dtype()
    return F.linear(x2.to(dtype), dequantize_dense(w, dtype)).to(x2.dtype)


HALF_WIDEN_MIN_ROWS = 64  # below, a half GEMV/GEMM beats widening the weight (AVX2 EPYC)
WIDEN_CHUNK = 1 << 24  # weights widened to float32 at a time


def half_linear(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] @ weight.T in float32 for a dense half-precision weight (an embedding table
    used as the output head). Where the CPU lacks native half GEMMs and M is large enough
    to pay for it, the weight is widened to float32 a slice of rows at a time (whole, a
    262144 x 640 table would be a 0.7 GB temporary); else one half-precision call, which
    reads half the bytes of float32 (what decoding one row at a time is bound by)."""
    if native_half(weight.dtype) or x2.shape[0] < HALF_WIDEN_MIN_ROWS:
        return F.linear(x2.to(weight.dtype), weight).to(torch.float32)
    x32 = x2.to(torch.float32)
    out = torch.empty(x2.shape[0], weight.shape[0], dtype=torch.float32, device=x2.device)
    rows = max(1, WIDEN_CHUNK // weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        end = min(weight.shape[0], start + rows)
        out[:, start:end] = F.linear(x32, weight[start:end].to(torch.float32))
    return out


def weight_only(x2: torch.Tensor, prepared: Prepared) -> torch.Tensor:
    """x2 [M, K] @ W.T straight from the prepared codes, in x2's dtype."""
    if isinstance(prepared, native.NativePrepared):
        return native.matmul(x2, prepared)  # gathers columns itself
    if prepared.gather is not None:
        x2 = F.pad(x2, (0, 1)).index_select(1, prepared.gather)
    y = _int4(x2, prepared) if isinstance(prepared, Int4Prepared) else _int8(x2, prepared)
    return y.to(x2.dtype)


def _int4(x2: torch.Tensor, p: Int4Prepared) -> torch.Tensor:
    xb = x2.to(COMPUTE_DTYPE).contiguous()
    y = _OPS._weight_int4pack_mm_for_cpu(xb, p.packed, p.group, p.scales_zeros)
    return y[:, :p.out_features] if y.shape[1] != p.out_features else y


def _int8(x2: torch.Tensor, p: Int8Prepared) -> torch.Tensor:
    xb = x2.to(COMPUTE_DTYPE)
    if len(p.segments) == 1:
        _, _, q, s = p.segments[0]
        y = _OPS._weight_int8pack_mm(xb.contiguous(), q, s).to(torch.float32)
    else:
        y = sum(_OPS._weight_int8pack_mm(xb[:, a:b].contiguous(), q, s).to(torch.float32)
                for a, b, q, s in p.segments)
    if p.zero_scale is not None:
        x32 = x2.to(torch.float32)
        sums = torch.stack([x32[:, a:b].sum(-1) for a, b, _, _ in p.segments], dim=-1)
        y = y - sums @ p.zero_scale.T
    return y


DEQUANTIZE_CHUNK = 1 << 18  # weights per slice of rows: its temporaries stay in cache


def dequantize_dense(w: QuantizedWeight, dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
    """Dense [N, K] weight in `dtype`: float32 arithmetic per group (no [N, K] index
    gathers unless act-order needs them), rounded once.

    Done a slice of rows at a time: whole, a 49152 x 576 head made ~0.5 GB of [N, K]
    int32/float32 temporaries and took ~6 ns a weight against ~1 ns for small Linears."""
    n, k = w.out_features, w.in_features
    rows = max(1, DEQUANTIZE_CHUNK // k)
    if n <= rows:
        return _dequantize_rows(w, dtype)
    out = torch.empty(n, k, dtype=dtype, device=w.device)
    for start in range(0, n, rows):
        end = min(n, start + rows)
        part = dataclasses.replace(  # views: no copy of the rows
            w, qweight=w.qweight[start:end], scales=w.scales[start:end],
            zeros=None if w.zeros is None else w.zeros[start:end], shape=(end - start, k))
        out[start:end] = _dequantize_rows(part, dtype)
    return out


def _dequantize_rows(w: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    n, k = w.out_features, w.in_features
    codes = unpack(w.qweight, w.bits, k).to(torch.float32)
    scales = w.scales.to(torch.float32)
    zeros = None if w.zeros is None else w.zeros.to(torch.float32)
    if w.g_idx is not None:
        groups = w.column_groups()
        if zeros is not None:
            codes -= zeros[:, groups]
        codes *= scales[:, groups]
        return codes.to(dtype)
    size = k if w.group_size <= 0 else w.group_size
    padded = scales.shape[1] * size  # a last, shorter group is padded, then cut off
    grouped = F.pad(codes, (0, padded - k)).view(n, -1, size)
    if zeros is not None:
        grouped -= zeros.unsqueeze(-1)
    grouped *= scales.unsqueeze(-1)
    return grouped.view(n, padded)[:, :k].to(dtype)
