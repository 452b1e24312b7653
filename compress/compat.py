"""Will it load there? Which of a serving engine's kernels can run each quantised Linear.

`check(path, target, tp)` reads a checkpoint's config.json (`quantization_config`) and
each Linear's `weight_shape` (16 bytes; no weights are loaded) and applies the engine's
own acceptance rules, transcribed from its source (file paths and versions in
docs/compatibility.md):

- vLLM, commit 055e47c28003156421365af985d676fc921cb075 of vllm-project/vllm (main,
  after the Marlin tile-padding PRs #45295 and #45703 of June 2026):
  `model_executor/kernels/linear/__init__.py` (`_POSSIBLE_KERNELS[CUDA]`, the order vLLM
  tries), `kernels/linear/mixed_precision/{machete,allspark,marlin,conch,exllama,
  triton_w4a16}.py` (`can_implement`), `layers/quantization/utils/marlin_utils.py`
  (`MARLIN_SUPPORTED_GROUP_SIZES`, `GPTQ_MARLIN_MIN_THREAD_N/K`, `marlin_padded_nk`,
  `check_moe_marlin_supports_config`), `utils/allspark_utils.py`,
  `compressed_tensors/schemes/compressed_tensors_wNa16.py` (`CompressedTensorsWNA16`:
  the bit widths, and the group-straddles-a-shard check), `compressed_tensors/
  compressed_tensors.py` + `utils.py` (`find_matched_target`: how a fused qkv_proj or
  gate_up_proj finds its scheme) and `compressed_tensors_moe/compressed_tensors_moe.py`.
  Machete's group sizes come from `utils/machete_utils.py` as docs.vllm.ai shows it
  (`query_machete_supported_group_sizes`); Humming's rule from `mixed_precision/
  humming.py` at 029e202b; the WNA16 MoE method's asserts from
  `compressed_tensors_moe_wna16.py` at 0072125a.
- transformers 5.24.0 with compressed-tensors 0.20.0 (what `pip install -e .` gets
  here): `transformers/quantizers/quantizer_compressed_tensors.py`,
  `compressed_tensors/compressors/pack_quantized/base.py` (`can_compress`: 1-8 bits),
  `compressed_tensors/quantization/quant_args.py` (`validate_actorder` refuses "group")
  and `quantization/lifecycle/initialize.py` (the zero point sized unpacked).

The rules are plain functions of (bits, group, symmetric, act-order, dtype, shape per
tensor-parallel rank), so they are tested on made-up shapes without any checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from compress.errors import CompressError

TARGETS = ("vllm", "transformers")
VLLM_SOURCE = "vLLM main at 055e47c (2026, after Marlin tile padding: PR #45295)"
TRANSFORMERS_SOURCE = "transformers 5.24.0 + compressed-tensors 0.20.0"

# GPU families by the compute capability vLLM compares against (Volta, sm70, is below
# CompressedTensorsWNA16.get_min_capability() = 75 and serves nothing here).
GPUS = (("Turing", 75), ("Ampere/Ada", 80), ("Hopper", 90), ("Blackwell", 100))

# Marlin's thread tile (marlin_utils: GPTQ_MARLIN_MIN_THREAD_N / _K) and group sizes.
MARLIN_MIN_N, MARLIN_MIN_K = 64, 128
MARLIN_GROUPS = (-1, 32, 64, 128)
# Machete's prepacked block is 64 inputs x 128 outputs; its groups depend on the
# activation type (a tile of 128 * 8 / 16 = 64 inputs for 16-bit activations).
MACHETE_BLOCK_K, MACHETE_BLOCK_N = 64, 128
CONCH_GROUPS = (-1, 128)
TRITON_W4A16_GROUPS = (-1, 32, 64, 128, 256)
# CompressedTensorsWNA16: every width 2-8 is a scheme; zero points only at 4 and 8 bits.
WNA16_BITS = range(2, 9)
WNA16_ZP_BITS = (4, 8)
HALF = ("float16", "bfloat16")


@dataclass(frozen=True)
class Quant:
    """How one Linear is stored, as a kernel sees it."""

    bits: int
    group_size: int  # -1: one scale per output channel
    symmetric: bool = True
    g_idx: bool = False  # act-order with dynamic groups (compressed-tensors actorder "group")
    dtype: str = "bfloat16"  # activations: the checkpoint's dtype, vLLM's --dtype auto

    @property
    def label(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        order = " act-order (g_idx)" if self.g_idx else ""
        return f"W{self.bits} {group} {'sym' if self.symmetric else 'asym'}{order}"

    @property
    def vllm_type(self) -> str:
        """vLLM's scalar type name: uint4b8 = 4-bit codes with a fixed bias of 8 (ours,
        symmetric), uint4 = 4-bit codes with a stored zero point (asymmetric)."""
        return f"uint{self.bits}" + (f"b{1 << (self.bits - 1)}" if self.symmetric else "")


@dataclass(frozen=True)
class Shape:
    """A Linear's weight on one tensor-parallel rank: k inputs, n outputs, and the whole
    layer's k_full x n_full (vLLM's MPLinearLayerConfig partition/full weight shapes)."""

    k: int
    n: int
    k_full: int
    n_full: int

    @classmethod
    def whole(cls, k: int, n: int) -> Shape:
        return cls(k, n, k, n)


@dataclass(frozen=True)
class Kernel:
    """One kernel's answer for one Linear: `ok`, and why not (or a note when it pads)."""

    name: str
    ok: bool
    reason: str = ""
    # the compute capabilities it runs on; None for a library that dequantises on any device
    runs_on: Callable[[int], bool] | None = field(default=None, compare=False)
    package: str | None = None  # an optional pip package the engine needs for it

    def text(self) -> str:
        mark = "✓" if self.ok else "✗"
        if self.ok and self.package:
            mark = f"✓ if {self.package} is installed"
        return f"{self.name} {mark}" + (f" ({self.reason})" if self.reason else "")

    def serves(self, capability: int) -> bool:
        """Whether it serves the Linear on a GPU of `capability` with a stock install."""
        return self.ok and self.package is None and (
            self.runs_on is None or self.runs_on(capability))


# ----------------------------------------------------------------------------- vLLM rules


def _type_ok(q: Quant, symmetric_types: Iterable[int], zp_types: Iterable[int]) -> bool:
    return q.bits in (symmetric_types if q.symmetric else zp_types)


def _types(symmetric_types: Iterable[int], zp_types: Iterable[int]) -> str:
    names = [f"uint{b}b{1 << (b - 1)}" for b in symmetric_types] + [f"uint{b}" for b in zp_types]
    return ", ".join(names)


def marlin_padded_nk(n: int, k: int, group_size: int = -1) -> tuple[int, int]:
    """The (n, k) Marlin zero-pads a misaligned weight to (marlin_utils.marlin_padded_nk):
    tiles are n % 64 with k % 128, or n % 128 with k % 64; the cheaper padding wins (fewer
    elements, then the smaller sum), and k stays a multiple of the group size."""
    group = max(group_size, 1)
    options = [(math.ceil(n / 64) * 64, _round_up(k, math.lcm(128, group))),
               (math.ceil(n / 128) * 128, _round_up(k, math.lcm(64, group)))]
    return min(options, key=lambda nk: (nk[0] * nk[1], nk[0] + nk[1]))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _straddles(q: Quant, s: Shape) -> bool:
    """A quantisation group cut by the tensor-parallel split of the inputs: no kernel
    can pad that away (the scales of one group would live on two ranks)."""
    return q.group_size != -1 and q.group_size < s.k_full and s.k % q.group_size != 0


def machete(q: Quant, s: Shape) -> Kernel:
    def no(reason: str) -> Kernel:
        return Kernel("Machete", False, reason, lambda cc: cc == 90)

    if q.g_idx and s.k != s.k_full:
        return no("no act-order when inputs are split across ranks")
    if not _type_ok(q, (4, 8), (4, 8)):
        return no(f"{q.vllm_type}; takes {_types((4, 8), (4, 8))}")
    groups = (-1, 64, 128) if q.dtype in HALF else (-1, 128)
    if q.group_size not in groups:
        return no(f"group size {q.group_size}; takes {', '.join(map(str, groups))}")
    if s.k % MACHETE_BLOCK_K:
        return no(f"inputs {s.k} not a multiple of {MACHETE_BLOCK_K}")
    if s.n % MACHETE_BLOCK_N:
        return no(f"outputs {s.n} not a multiple of {MACHETE_BLOCK_N}")
    return Kernel("Machete", True, "", lambda cc: cc == 90)


def allspark(q: Quant, s: Shape) -> Kernel:
    def no(reason: str) -> Kernel:
        return Kernel("AllSpark", False, reason, lambda cc: 80 <= cc < 90)

    if q.g_idx:
        return no("no act-order")
    if not q.symmetric:
        return no("no zero points")
    if q.group_size != -1 or q.bits != 8:
        return no("per-channel 8-bit only")
    if s.k % 16 or s.n % 16:
        return no("inputs and outputs must be multiples of 16")
    if q.dtype not in HALF:
        return no(f"{q.dtype} activations; takes float16 or bfloat16")
    return Kernel("AllSpark", True, "", lambda cc: 80 <= cc < 90)


def marlin(q: Quant, s: Shape) -> Kernel:
    def no(reason: str) -> Kernel:
        return Kernel("Marlin", False, reason, lambda cc: cc >= 75)

    if not _type_ok(q, (4, 8), (4,)):
        return no(f"{q.vllm_type}; takes {_types((4, 8), (4,))}")
    if q.group_size not in MARLIN_GROUPS:
        return no(f"group size {q.group_size}; takes {', '.join(map(str, MARLIN_GROUPS))}")
    if q.g_idx:  # act-order keeps the strict tile check: no padding
        if s.n % MARLIN_MIN_N:
            return no(f"act-order: outputs {s.n} not a multiple of {MARLIN_MIN_N}")
        if s.k % MARLIN_MIN_K:
            return no(f"act-order: inputs {s.k} not a multiple of {MARLIN_MIN_K}")
        if _straddles(q, s):
            return no(f"inputs per rank {s.k} not a multiple of group size {q.group_size}")
        return Kernel("Marlin", True, "", lambda cc: cc >= 75)
    if _straddles(q, s):
        return no(f"inputs per rank {s.k} not a multiple of group size {q.group_size}")
    n, k = marlin_padded_nk(s.n, s.k, q.group_size)
    if (n, k) == (s.n, s.k):
        return Kernel("Marlin", True, "", lambda cc: cc >= 75)
    # Before vLLM PR #45295 (June 2026) the strict tile check refused these shapes.
    padded = " and ".join(f"{what} {a}->{b}" for what, a, b in
                          (("outputs", s.n, n), ("inputs", s.k, k)) if a != b)
    return Kernel("Marlin", True, f"pads {padded}; Marlin before vLLM PR #45295 refuses it",
                  lambda cc: cc >= 75)


def conch(q: Quant, s: Shape) -> Kernel:
    def result(ok: bool, reason: str = "") -> Kernel:
        return Kernel("Conch", ok, reason, lambda cc: cc >= 80, "conch-triton-kernels")

    if q.bits not in (4, 8):
        return result(False, f"{q.vllm_type}; takes 4- or 8-bit")
    if q.group_size not in CONCH_GROUPS:
        return result(False, f"group size {q.group_size}; takes -1 or 128")
    if q.g_idx:
        return result(False, "no act-order")
    return result(True)


def exllama(q: Quant, s: Shape) -> Kernel:
    def no(reason: str) -> Kernel:
        return Kernel("Exllama", False, reason, lambda cc: cc >= 60)

    if q.g_idx and s.k != s.k_full:
        return no("no act-order when inputs are split across ranks")
    if s.n % (32 // q.bits):
        return no(f"outputs {s.n} not a multiple of {32 // q.bits}")
    if q.dtype != "float16":
        return no(f"float16 activations only; this checkpoint is {q.dtype} "
                  "(vLLM --dtype float16 would allow it)")
    if not _type_ok(q, (4, 8), ()):
        return no(f"{q.vllm_type}; takes {_types((4, 8), ())}")
    if q.group_size <= 0:
        return no("no per-channel scales")
    if s.k_full % q.group_size:
        return no(f"group size {q.group_size} does not divide inputs {s.k_full}")
    return Kernel("Exllama", True, "", lambda cc: cc >= 60)


def triton_w4a16(q: Quant, s: Shape) -> Kernel:
    def no(reason: str) -> Kernel:
        return Kernel("Triton W4A16", False, reason, lambda cc: True)

    if q.bits != 4:
        return no(f"{q.vllm_type}; takes 4-bit")
    if q.dtype not in HALF:
        return no(f"{q.dtype} activations; takes float16 or bfloat16")
    if s.n % 8:
        return no(f"outputs {s.n} not a multiple of 8")
    if q.g_idx:
        return no("no act-order")
    if q.group_size not in TRITON_W4A16_GROUPS and q.group_size != s.k_full:
        return no(f"group size {q.group_size}")
    if q.group_size != -1 and s.k % q.group_size:
        return no(f"inputs per rank {s.k} not a multiple of group size {q.group_size}")
    return Kernel("Triton W4A16", True, "", lambda cc: True)


def humming(q: Quant, s: Shape) -> Kernel:
    # Its can_implement asks only for CUDA, the package and no act-order.
    ok = not q.g_idx
    return Kernel("Humming", ok, "" if ok else "no act-order", lambda cc: cc >= 75, "humming")


# _POSSIBLE_KERNELS[CUDA] in vLLM's order (CutlassW4A8 first; it needs FP8 activations,
# which a weight-only checkpoint never has, so it is left out).
VLLM_KERNELS = (machete, allspark, marlin, conch, exllama, triton_w4a16, humming)


def vllm_linear(q: Quant, s: Shape) -> tuple[Kernel, ...]:
    """Every CUDA kernel's answer for one Linear (rank shape `s`) on vLLM."""
    if q.bits not in WNA16_BITS or (not q.symmetric and q.bits not in WNA16_ZP_BITS):
        reason = (f"vLLM's WNA16 scheme takes {q.bits}-bit weights only symmetric"
                  if q.bits in WNA16_BITS else f"vLLM's WNA16 scheme has no {q.bits}-bit type")
        return (Kernel("any kernel", False, reason),)
    # CompressedTensorsWNA16.create_weights splits each group's scales with the inputs
    # unless scales are repeated on every rank (act-order, or per-channel row-parallel).
    if not q.g_idx and _straddles(q, s):
        return (Kernel("any kernel", False,
                       f"groups of {q.group_size} straddle the tensor-parallel split (inputs "
                       f"per rank {s.k}); vLLM refuses to shard the scales"),)
    return tuple(rule(q, s) for rule in VLLM_KERNELS)


def vllm_experts(q: Quant, hidden: int, intermediate: int) -> tuple[Kernel, ...]:
    """A sparse layer's experts on vLLM: one fused MoE layer. The WNA16 MoE method
    asserts group strategy, symmetric and no act-order; the fused Marlin MoE kernel
    wants 4/8 bits, hidden % 128 and the intermediate size per rank a multiple of the
    group (it pads the intermediate to 64 since PR #45703). vLLM's other MoE backends
    (FlashInfer TRT-LLM, Humming, Triton emulation) are not modelled."""
    def no(reason: str) -> tuple[Kernel, ...]:
        return (Kernel("Marlin MoE", False, reason, lambda cc: cc >= 75),)

    if q.bits not in (4, 8):
        return no(f"{q.bits}-bit; the WNA16 MoE kernels take 4 or 8")
    if not q.symmetric:
        return no("asymmetric; the WNA16 MoE method is symmetric only")
    if q.group_size == -1:
        return no("per-channel; the WNA16 MoE method takes groups only")
    if q.g_idx:
        return no("act-order groups; the WNA16 MoE method refuses them")
    if q.group_size not in MARLIN_GROUPS:
        return no(f"group size {q.group_size}; takes 32, 64 or 128")
    if hidden % 128:
        return no(f"hidden size {hidden} not a multiple of 128")
    if intermediate % q.group_size:
        return no(f"expert width per rank {intermediate} not a multiple of group size "
                  f"{q.group_size}")
    return (Kernel("Marlin MoE", True, "", lambda cc: cc >= 75),)


# --------------------------------------------------------------------- transformers rules


def transformers_linear(q: Quant) -> tuple[Kernel, ...]:
    """transformers' compressed-tensors loader unpacks and dequantises: any width 1-8
    and group or channel scales, but no zero point and no g_idx (compressed-tensors 0.20)."""
    name = "compressed-tensors dequantise"
    if not 1 <= q.bits <= 8:
        return (Kernel(name, False, f"{q.bits}-bit; pack-quantized takes 1-8"),)
    if not q.symmetric:
        return (Kernel(name, False, "asymmetric: compressed-tensors 0.20 sizes the zero point "
                       "unpacked, its own writer packs it; loading fails"),)
    if q.g_idx:
        return (Kernel(name, False, "actorder 'group' (g_idx): compressed-tensors 0.20 refuses "
                       "it when it reads quantization_config"),)
    return (Kernel(name, True),)


# ------------------------------------------------------------------- the checkpoint walk


@dataclass(frozen=True)
class LinearCheck:
    """One quantised Linear of the checkpoint and every kernel's answer for it."""

    name: str
    role: str  # q, k, v, o, gate, up, down, qkv, gate_up, expert, lm_head
    in_features: int
    quant: Quant
    shape: Shape | None  # per rank, as the engine sees it (None: no sharding modelled)
    kernels: tuple[Kernel, ...]

    def serves(self, capability: int) -> bool:
        return any(k.serves(capability) for k in self.kernels)

    def first(self, capability: int) -> str | None:
        """The kernel the engine picks (the first that serves, in its order)."""
        return next((k.name for k in self.kernels if k.serves(capability)), None)


@dataclass
class CompatReport:
    """`compress check`'s answer: per Linear, the target's kernels; `ok` when every
    Linear has one (on vLLM: on at least one GPU family, stock install)."""

    path: Path
    target: str
    tp: int
    dtype: str
    linears: list[LinearCheck]
    notes: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        return VLLM_SOURCE if self.target == "vllm" else TRANSFORMERS_SOURCE

    def gpus(self) -> list[tuple[str, bool, dict[str, int]]]:
        """Per GPU family: whether every Linear has a kernel, and which kernel vLLM picks
        for how many Linears."""
        out = []
        for family, capability in GPUS:
            picks: dict[str, int] = {}
            for linear in self.linears:
                chosen = linear.first(capability)
                if chosen is not None:
                    picks[chosen] = picks.get(chosen, 0) + 1
            out.append((family, all(lin.serves(capability) for lin in self.linears), picks))
        return out

    @property
    def unserved(self) -> list[LinearCheck]:
        if self.target == "transformers":
            return [lin for lin in self.linears if not lin.kernels[0].ok]
        return [lin for lin in self.linears if not any(lin.serves(c) for _, c in GPUS)]

    @property
    def ok(self) -> bool:
        if self.target == "transformers":
            return not self.unserved
        return any(every for _, every, _ in self.gpus())

    def groups(self) -> list[tuple[list[LinearCheck], tuple[Kernel, ...]]]:
        """Linears with the same scheme, input size and answers, in checkpoint order."""
        grouped: dict[tuple, list[LinearCheck]] = {}
        for linear in self.linears:
            key = (linear.quant, linear.in_features, linear.shape and linear.shape.k,
                   linear.kernels, linear.role == "expert")
            grouped.setdefault(key, []).append(linear)
        return [(members, members[0].kernels) for members in grouped.values()]

    def verdict(self) -> str:
        where = f"{'vLLM' if self.target == 'vllm' else 'transformers'}" + (
            f" (tensor parallel {self.tp})" if self.target == "vllm" else "")
        n = len(self.linears)
        if self.target == "transformers":
            bad = len(self.unserved)
            return (f"verdict: loads in {where}: all {n} quantised Linears dequantise" if not bad
                    else f"verdict: does not load in {where}: {bad} of {n} Linears cannot be "
                    "read")
        families = [(f, every) for f, every, _ in self.gpus()]
        fine = [f for f, every in families if every]
        if len(fine) == len(families):
            return f"verdict: every one of the {n} quantised Linears has a kernel on {where}, " \
                   "on every GPU family"
        if fine:
            return (f"verdict: every Linear has a kernel on {where} only on "
                    f"{' and '.join(fine)} GPUs")
        bad = len(self.unserved)
        return (f"verdict: {bad} of {n} Linears have no kernel on {where} on any GPU family"
                if bad else f"verdict: no GPU family serves every Linear on {where}")

    def lines(self) -> list[str]:
        """The report as printed: a header, one line per group, per-GPU picks, verdict."""
        out = [f"{self.path}", f"  target: {self.source}; tensor parallel {self.tp}; "
               f"activations {self.dtype} (config.json's dtype)"]
        for members, kernels in self.groups():
            first = members[0]
            roles = "/".join(dict.fromkeys(m.role for m in members))
            split = first.shape is not None and first.shape.k != first.shape.k_full
            inputs = f"{first.in_features} inputs" + (
                f", {first.shape.k} per rank" if split else "")
            count = f"{len(members)} Linear{'s' if len(members) > 1 else ''}"
            out.append(f"  {count} ({roles}, {inputs}, {first.quant.label}): "
                       + _answers(kernels))
        if self.target == "vllm":
            for family, every, picks in self.gpus():
                chosen = ", ".join(f"{k} {n}" for k, n in picks.items()) or "none"
                out.append(f"  {family} GPUs: {'all' if every else 'NOT all'} Linears served; "
                           f"vLLM picks {chosen}")
        out += [f"  note: {note}" for note in self.notes]
        out.append(self.verdict())
        return out

    def card_lines(self) -> list[str]:
        """A short model-card section (markdown)."""
        lines = [f"`compress check` against {self.source}, tensor parallel {self.tp}:", ""]
        for members, kernels in self.groups():
            first = members[0]
            roles = "/".join(dict.fromkeys(m.role for m in members))
            lines.append(f"- {len(members)} Linears ({roles}, {first.in_features} inputs, "
                         f"{first.quant.label}): " + _answers(kernels))
        if self.target == "vllm":
            picks = [f"{family} {' + '.join(f'{k} {n}' for k, n in chosen.items()) or 'none'}"
                     + ("" if every else " (not every Linear)")
                     for family, every, chosen in self.gpus()]
            lines.append(f"- Kernels vLLM picks: {'; '.join(picks)}")
        lines += [f"- Note: {note}" for note in self.notes]
        verdict = self.verdict().removeprefix("verdict: ")
        return [*lines, "", f"**{verdict[0].upper()}{verdict[1:]}.**"]


def _answers(kernels: tuple[Kernel, ...]) -> str:
    """The kernels that can serve first (in the engine's order), then those that cannot."""
    ok = [k.text() for k in kernels if k.ok]
    no = [k.text() for k in kernels if not k.ok]
    return "; ".join(part for part in (", ".join(ok), ", ".join(no)) if part)


def _role(arch, rel: str) -> tuple[str, str]:
    """(role, parallel style) of a layer-relative Linear name: "column" splits outputs,
    "row" splits inputs, "expert" is part of a fused MoE layer. vLLM fuses q/k/v into
    QKVParallelLinear and gate/up into MergedColumnParallelLinear in every family
    compress supports; the table (models.arch) says which names those are."""
    if arch.is_expert(rel):
        return "expert", "expert"
    if rel in arch.qkv:
        return ("qkv" if arch.fused_qkv else "qkv"[arch.qkv.index(rel)]), "column"
    if rel in arch.gate_up:
        return ("gate_up" if arch.fused_gate_up else ("gate", "up")[arch.gate_up.index(rel)]), \
            "column"
    if rel == arch.o_proj:
        return "o", "row"
    if rel == arch.down_proj:
        return "down", "row"
    moe = arch.moe
    if moe is not None and moe.shared_prefix and rel.startswith(moe.shared_prefix):
        short = rel.removeprefix(moe.shared_prefix)
        if short in moe.gate_up:
            return f"shared {('gate', 'up')[moe.gate_up.index(short)]}", "column"
        return "shared down", "row"
    return rel.rsplit(".", 1)[-1], "column"


def _divide(what: str, value: int, tp: int) -> None:
    if value % tp:
        raise CompressError(f"--tp {tp} does not divide {what} ({value}); vLLM shards it "
                            f"evenly across ranks: choose a tp that divides {value}")


def check(path: str | Path, target: str = "vllm", tp: int = 1) -> CompatReport:
    """Which of `target`'s kernels can serve each quantised Linear of checkpoint `path`
    with tensor parallelism `tp`. Reads config.json and the small `weight_shape`
    tensors only. Raises CompressError for input that cannot be checked."""
    if target not in TARGETS:
        raise CompressError(f"--target {target!r} is not known; choose {' or '.join(TARGETS)}")
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise CompressError(f"--tp must be a positive integer, not {tp!r}")
    if target == "transformers" and tp != 1:
        raise CompressError("--tp applies to --target vllm; transformers loads the whole "
                            "model in one process")
    from compress import models, sources
    from compress.formats import pack_quantized

    directory, _, config, _ = sources.identify(path)
    qc = config.get("quantization_config")
    if not qc:
        raise CompressError(f"{directory} has no quantization_config in config.json: not a "
                            "quantised checkpoint (`compress quantize` writes one)")
    groups = pack_quantized.config_groups(qc)  # one-line errors for other formats
    ignore = pack_quantized.ignored(qc)
    files = models.open_model(directory, verify=False)  # hashing would read every byte
    if not files.schemes:
        raise CompressError(f"{directory}: quantization_config quantises none of the model's "
                            "Linears")
    arch, dc = files.arch, files.decoder_config
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    vllm = target == "vllm"
    if vllm:
        _divide("the attention heads", dc.num_heads, tp)
        if dc.num_kv_heads >= tp:
            _divide("the key/value heads", dc.num_kv_heads, tp)
        elif tp % dc.num_kv_heads:
            raise CompressError(f"--tp {tp} is neither a divisor nor a multiple of the "
                                f"{dc.num_kv_heads} key/value heads; vLLM needs one or the other")
    kv_per_rank = max(1, dc.num_kv_heads // tp)
    qkv_rank = (dc.num_heads // tp + 2 * kv_per_rank) * dc.head_dim
    qkv_full = (dc.num_heads + 2 * dc.num_kv_heads) * dc.head_dim
    # The group config.json gives the class target "Linear": vLLM's fused qkv_proj /
    # gate_up_proj match it by class name before the shards' own names are tried.
    class_group = next((g for g in groups if "Linear" in g.targets), None)

    linears: list[LinearCheck] = []
    notes: list[str] = []
    fused_mismatch = 0
    experts: dict[int, list[str]] = {}
    for name, scheme in files.schemes.items():
        group = pack_quantized.matching_group(name, groups, ignore)
        quant = Quant(scheme.bits, scheme.group_size, scheme.symmetric,
                      group is not None and group.actorder == "group", dtype)
        out_f, in_f = files.linear_shape(name)
        if name == arch.lm_head:
            role, style = "lm_head", "column"
        else:
            role, style = _role(arch, name.removeprefix(arch.layer_prefix(files.layer_of(name))))
        if role == "expert":
            experts.setdefault(files.layer_of(name), []).append(name)
            continue
        if not vllm:
            linears.append(LinearCheck(name, role, in_f, quant, None, transformers_linear(quant)))
            continue
        if style == "row":
            _divide(f"the inputs of {name}", in_f, tp)
            shape = Shape(in_f // tp, out_f, in_f, out_f)
        elif role in ("q", "k", "v", "qkv"):  # vLLM runs q, k and v as one qkv_proj
            shape = Shape(in_f, qkv_rank, in_f, qkv_full)
        elif role in ("gate", "up", "shared gate", "shared up", "gate_up"):
            # vLLM runs gate and up as one gate_up_proj, split per rank
            width = out_f if role == "gate_up" else 2 * out_f
            _divide(f"the MLP width of {name}", width // 2, tp)
            shape = Shape(in_f, width // tp, in_f, width)
        else:
            _divide(f"the outputs of {name}", out_f, tp)
            shape = Shape(in_f, out_f // tp, in_f, out_f)
        kernels = vllm_linear(quant, shape)
        if role == "lm_head" and group is not None and "Linear" in group.targets:
            kernels = (Kernel("any kernel", False, "vLLM's ParallelLMHead matches only a name "
                              "target, and this head falls under the class target 'Linear': "
                              "vLLM builds a dense head and cannot load the packed one"),)
        fused = role in ("q", "k", "v", "gate", "up", "shared gate", "shared up")
        if fused and class_group is not None and group is not class_group:
            fused_mismatch += 1
            kernels = (Kernel("any kernel", False, f"vLLM fuses it with its siblings and looks "
                              f"the fused layer up by class name, which gives the 'Linear' "
                              f"group's {class_group.scheme.label}, not its own "
                              f"{scheme.label}"),)
        linears.append(LinearCheck(name, role, in_f, quant, shape, kernels))

    for layer, names in experts.items():
        schemes = {files.schemes[n] for n in names}
        first = names[0]
        out_f, in_f = files.linear_shape(first)
        group = pack_quantized.matching_group(first, groups, ignore)
        quant = Quant(files.schemes[first].bits, files.schemes[first].group_size,
                      files.schemes[first].symmetric,
                      group is not None and group.actorder == "group", dtype)
        width = dc.expert_intermediate or out_f
        if not vllm:
            kernels = transformers_linear(quant)
        elif len(schemes) > 1:
            kernels = (Kernel("Marlin MoE", False, f"layer {layer}'s experts use "
                              f"{len(schemes)} schemes; vLLM loads one fused MoE layer with "
                              "one scheme"),)
        else:
            _divide(f"the expert width of layer {layer}", width, tp)
            kernels = vllm_experts(quant, dc.hidden_size, width // tp)
        for name in names:
            linears.append(LinearCheck(name, "expert", files.linear_shape(name)[1], quant,
                                       None, kernels))
    if vllm and experts:
        notes.append("experts run as one fused MoE layer per decoder layer; only the fused "
                     "Marlin MoE kernel's rules are checked (vLLM also has FlashInfer "
                     "TRT-LLM, Humming and Triton-emulation MoE backends)")
    if fused_mismatch:
        notes.append(f"{fused_mismatch} q/k/v or gate/up Linears carry their own scheme; vLLM "
                     "needs the Linears it fuses to share the 'Linear' group's scheme")
    if vllm:
        notes.append("kernels by GPU: Machete sm90 only; AllSpark sm80-89; Marlin sm75+; "
                     "Exllama sm60+; Triton W4A16 any; Conch sm80+ and Humming sm75+ only "
                     "with their packages; ROCm, XPU and CPU kernels not checked")
    return CompatReport(directory, target, tp, dtype, linears, notes)
