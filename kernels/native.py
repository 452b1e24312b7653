"""Our own CPU matmul on packed weights (csrc/qlinear_cpu.cpp), built on first use.

Why our own: torch's int4 CPU op dequantises to bfloat16 and multiplies in floating point,
which is compute-bound at decode sizes (M = 1) on a 2-core machine. This kernel scales
each block of 32 activations to 15-bit integers held as two int8 digits and multiplies
them with the integer codes using AVX512-VNNI byte dot products (AVX2's `vpmaddubsw` on
CPUs without VNNI), 1.5-2.2x faster than torch's op at M = 1. (One digit, llama.cpp's
Q8_0, was 20% faster still but doubled the
KL a W8 model loses on real text.) It serves 2/3/4-bit codes (as 4-bit) and 8-bit codes,
any group size (runs of a group's columns are padded to blocks of 32), symmetric or
asymmetric, act-order by gathering input columns.

Its tiles are split over torch's threads (OpenMP, sharing torch's runtime; see OPENMP).

The extension is compiled with the machine's C++ compiler (-O3 -march=native) into
~/.cache/compress/kernels/<hash>/ (COMPRESS_HOME moves it) the first time it is needed
(about 10 s), and reused after. Without a compiler, or where the build fails,
`unavailable()` says why and the dispatcher keeps torch's own ops; `COMPRESS_NATIVE=0`
turns it off.

Prepared layout, as the C++ reads it (16 output rows per tile, 32 input columns per block):

    weight  uint8 [tiles, blocks, chunks, 16, 4]   4-bit: byte j of row r, chunk c holds
                                                     column 8c+j (low nibble), 8c+4+j (high)
    scales  fp16|fp32 [tiles, G, 16]               the checkpoint's scales, rows interleaved
    offsets uint8 [tiles, G, 16] | None            2^(b-1) + zero point (asymmetric only)
    block_group int32 [blocks]                     scale column of each block
    columns int64 [blocks * 32] | None             input column per position (K: a zero)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .layout import column_runs, gather_index, padded_columns
from .packing import unpack
from .weights import QuantizedWeight

SOURCE = Path(__file__).parent / "csrc" / "qlinear_cpu.cpp"
ENV = "COMPRESS_NATIVE"
ROWS, BLOCK = 16, 32
FLAGS = ["-O3", "-march=native", "-std=c++17"]
# at::parallel_for is a header template: built without OpenMP it runs on one thread, as
# this kernel did until 2026-11 (one of two cores idle during decode). Linked with
# -fopenmp it shares torch's own libgomp (same soname, already loaded), so one thread
# pool serves both. Where the compiler cannot, the kernel is built single-threaded.
OPENMP = ["-fopenmp"]


def _build_dir(openmp: bool = True) -> Path:
    # compress's cache (COMPRESS_HOME, as compress.assets.cache_root reads it)
    home = os.environ.get("COMPRESS_HOME")
    root = Path(home) if home else Path.home() / ".cache" / "compress"
    # -march=native code is only valid on this CPU: the key covers the CPU's features too.
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(("flags", "Features"))), "")
    flags = FLAGS + (OPENMP if openmp else [])
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(flags).encode(),
                                     torch.__version__.encode(), cpu.encode()])).hexdigest()
    return root / "kernels" / f"qlinear_cpu-{key[:16]}"


def disabled() -> bool:
    return os.environ.get(ENV, "1").strip() == "0"


def _load() -> str | None:
    """The reason the kernel is unavailable, or None (building it the first time)."""
    if disabled():
        return f"{ENV}=0"
    return _build()


_threaded: list[bool] = []  # set by _build: whether the loaded kernel uses OpenMP


@functools.cache
def _build() -> str | None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler}); install g++ for the fast CPU kernel"
    scripts = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and shutil.which("ninja", path=scripts):
        # the `ninja` wheel's launcher sits beside the interpreter, which is not on PATH
        # when its venv is not activated
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its compiler-version notes are not for our users
    try:
        from torch.utils.cpp_extension import load
        failure = None
        for openmp in (True, False):
            build = _build_dir(openmp)
            build.mkdir(parents=True, exist_ok=True)
            refused = build / "failed"  # not retried by every later process
            if openmp and refused.exists():
                continue
            extra = OPENMP if openmp else []
            try:
                load("compress_qlinear_cpu" + ("_omp" if openmp else ""), [str(SOURCE)],
                     extra_cflags=FLAGS + extra, extra_ldflags=extra,
                     build_directory=str(build), is_python_module=False, verbose=False)
            except Exception as e:  # the compiler failing surfaces as several types
                failure = e
                if openmp:
                    with contextlib.suppress(OSError):
                        refused.write_text(str(e)[-2000:])
                continue
            _threaded.append(openmp)
            break
        else:
            first = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
            return f"compiling the CPU kernel failed: {first[:200]}"
    finally:
        quiet.setLevel(level)
    torch.library.register_fake("compress_cpu::qlinear")(_qlinear_shape)
    return None


def _qlinear_shape(x, weight, scales, offsets, block_group, columns, bits, out_features,
                   portable=False, poison=False):
    return x.new_empty((x.shape[0], out_features))


def built() -> bool:
    """Whether the extension is loaded or already compiled for this machine (so the next
    `unavailable()` will not spend ~10 s compiling it)."""
    return _build.cache_info().currsize > 0 or any(
        any(_build_dir(openmp).glob("*.so")) for openmp in (True, False))


def unavailable() -> str | None:
    """Why the native kernel cannot be used here (None: it can). Builds it on first call."""
    return _load()


def threaded() -> bool:
    """Whether the loaded kernel splits its work over torch's threads (built with OpenMP)."""
    return _load() is None and _threaded[-1]


def has_vnni() -> bool:
    """Whether the build uses AVX512-VNNI."""
    return _load() is None and bool(torch.ops.compress_cpu.has_vnni())


def isa() -> str:
    """The vector instructions the build's fast path uses: "avx512-vnni", "avx2", or
    "portable" (plain C++ loops, ~20x slower); "" when the kernel is unavailable."""
    return str(torch.ops.compress_cpu.isa()) if _load() is None else ""


@dataclass(frozen=True, eq=False)
class NativePrepared:
    weight: torch.Tensor            # uint8, layout above
    scales: torch.Tensor            # fp16 | fp32 [tiles, G, 16]
    offsets: torch.Tensor | None    # uint8 [tiles, G, 16]
    block_group: torch.Tensor       # int32 [blocks]
    columns: torch.Tensor | None    # int64 [blocks * 32]
    bits: int                       # 4 (serving 2, 3, 4) or 8
    in_features: int
    out_features: int
    source: QuantizedWeight           # for the dense path of large M


def unsupported(w: QuantizedWeight) -> str | None:
    if w.bits > 4 and w.bits != 8:
        return f"{w.bits}-bit weights have no native CPU kernel (supported: 2, 3, 4, 8)"
    return unavailable()


def _interleave(rows: torch.Tensor, tiles: int) -> torch.Tensor:
    """[N, G] per-row values -> [tiles, G, 16] with padded rows."""
    padded = F.pad(rows, (0, 0, 0, tiles * ROWS - rows.shape[0]))
    return padded.view(tiles, ROWS, -1).transpose(1, 2).contiguous()


def prepare(w: QuantizedWeight) -> NativePrepared:
    reason = unsupported(w)
    if reason:
        raise ValueError(reason)
    n, k = w.out_features, w.in_features
    bits = 4 if w.bits <= 4 else 8
    centre = 1 << (bits - 1)
    order, groups, starts, ends = column_runs(w)
    columns, _ = padded_columns(order, starts, ends, BLOCK, k)
    blocks = columns.numel() // BLOCK
    # Every block lies inside one run of a single group (runs are padded to 32 columns).
    run_of_block = torch.repeat_interleave(
        torch.arange(len(starts)),
        torch.tensor([-(-(b - a) // BLOCK) for a, b in zip(starts, ends, strict=True)]))
    block_group = groups[torch.tensor(starts)[run_of_block]].to(torch.int32)
    tiles = -(-n // ROWS)

    # Padding columns meet zero activations and padding rows are cut off: any code works.
    codes = F.pad(unpack(w.qweight, w.bits, k).to(torch.int32) + centre, (0, 1),
                  value=centre)[:, columns]
    codes = F.pad(codes, (0, 0, 0, tiles * ROWS - n), value=centre).to(torch.uint8)
    if bits == 4:
        # [tiles, 16, blocks, chunk, half, j] -> byte (low | high << 4) -> [t, b, c, 16, j]
        c = codes.view(tiles, ROWS, blocks, 4, 2, 4)
        packed = c[..., 0, :] | (c[..., 1, :] << 4)
    else:
        packed = codes.view(tiles, ROWS, blocks, 8, 4)
    weight = packed.permute(0, 2, 3, 1, 4).contiguous().view(-1)

    # fp16 scales are used as stored (exact); any other dtype becomes float32 (exact too).
    scale_dtype = torch.float16 if w.scales.dtype == torch.float16 else torch.float32
    scales = _interleave(w.scales.to(scale_dtype), tiles)
    offsets = None
    if w.zeros is not None:
        offsets = _interleave((w.zeros.to(torch.int32) + centre).to(torch.uint8), tiles)
    return NativePrepared(weight, scales, offsets, block_group.contiguous(),
                          gather_index(columns, k), bits, k, n, w)


def matmul(x2: torch.Tensor, p: NativePrepared, *, portable: bool = False,
           poison: bool = False) -> torch.Tensor:
    """x2 [M, K] (float32, bfloat16 or float16) @ W.T -> [M, N] in x2's dtype.

    `portable` forces the plain C++ loops; `poison` fills the output with NaN before the
    kernel writes it (both for tests)."""
    return torch.ops.compress_cpu.qlinear(x2.contiguous(), p.weight, p.scales, p.offsets,
                                          p.block_group, p.columns, p.bits, p.out_features,
                                          portable, poison)
