"""QuantizedWeight <-> compressed-tensors "pack-quantized" tensors and config.

Per quantised Linear `name`, the safetensors hold::

    name.weight_packed      int32 [out, ceil(in*b/32)]   codes + 2**(b-1), LSB-first, dense
    name.weight_scale       dtype [out, G]               G = ceil(in/group_size), 1 per-channel
    name.weight_zero_point  int32 [ceil(out*b/32), G]    asymmetric only; signed zp, packed on dim 0
    name.weight_shape       int64 [2]                    (out, in)
    name.weight_g_idx       int32 [in]                   act-order without static groups only

and config.json carries a `quantization_config` block that transformers (with the
compressed-tensors package) and vLLM read. Dequantisation is (q - zp) * scale.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from compress import kernels
from compress.errors import CompressError
from compress.quant import QuantizedWeight, QuantScheme, num_groups

COMPRESSED_TENSORS_VERSION = "0.20.0"
FORMAT = "pack-quantized"
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def to_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The safetensors entries that store `qw` for module `name`."""
    tensors = {
        f"{name}.weight_packed": qw.qweight.contiguous(),
        f"{name}.weight_scale": qw.scales.contiguous(),
        f"{name}.weight_shape": torch.tensor(qw.shape, dtype=torch.int64),
    }
    if qw.zeros is not None:
        tensors[f"{name}.weight_zero_point"] = kernels.pack(qw.zeros, qw.bits, dim=0)
    if qw.g_idx is not None:
        tensors[f"{name}.weight_g_idx"] = qw.g_idx.to(torch.int32).contiguous()
    return tensors


def from_tensors(
    name: str, get: Callable[[str], torch.Tensor], has: Callable[[str], bool], scheme: QuantScheme
) -> QuantizedWeight:
    """Read module `name`'s packed weight back, checking every shape against the scheme."""
    out_features, in_features = read_shape(name, get)
    groups = num_groups(in_features, scheme.group_size)
    packed = get(f"{name}.weight_packed")
    scales = get(f"{name}.weight_scale")
    zeros = None
    if not scheme.symmetric:
        packed_zeros = get(f"{name}.weight_zero_point")
        expected = (kernels.packed_width(out_features, scheme.bits), groups)
        _check_shape(name, "weight_zero_point", packed_zeros, expected, torch.int32)
        zeros = kernels.unpack(packed_zeros, scheme.bits, out_features, dim=0)
    g_idx = get(f"{name}.weight_g_idx") if has(f"{name}.weight_g_idx") else None
    _check_shape(name, "weight_packed", packed,
                 (out_features, kernels.packed_width(in_features, scheme.bits)), torch.int32)
    _check_shape(name, "weight_scale", scales, (out_features, groups), None)
    if g_idx is not None:
        _check_shape(name, "weight_g_idx", g_idx, (in_features,), torch.int32)
        # each entry indexes a column of weight_scale: out of range, the kernels fail at
        # the first forward (or read another row's memory on a GPU)
        if not 0 <= int(g_idx.min()) <= int(g_idx.max()) < groups:
            raise CompressError(f"{name}.weight_g_idx holds groups outside 0..{groups - 1}: "
                                "the checkpoint is corrupt; re-download or re-quantise it")
    _check_scale_range(name, scales, scheme.bits)
    return QuantizedWeight(packed, scales, zeros, g_idx, scheme.bits, scheme.group_size,
                           (out_features, in_features))


FLOAT16_MAX = 65504.0


def _check_scale_range(name: str, scales: torch.Tensor, bits: int) -> None:
    """Every dequantised weight (q - z) * s, |q - z| <= 2**bits - 1, must fit float16, the
    dtype GPU inference computes in. Round-to-nearest scales are about (max - min) /
    (2**bits - 1), so this refuses only rows whose weights would span more than float16's
    range (beyond about ±32,752, far outside any trained model's weights); such a scale,
    or a NaN/Inf one, is a damaged file that would compute Inf/NaN logits (found by the
    fuzz's forward pass: scales of 3e38 loaded and gave Inf)."""
    if not bool(torch.isfinite(scales).all()):
        raise CompressError(f"{name}.weight_scale holds NaN/Inf values: the checkpoint is "
                            "corrupt; re-download or re-quantise it")
    largest = float(scales.float().abs().max()) if scales.numel() else 0.0
    if largest * ((1 << bits) - 1) > FLOAT16_MAX:
        raise CompressError(f"{name}.weight_scale holds {largest:.3g}: its dequantised weights "
                            f"would exceed float16's range ({FLOAT16_MAX:g}); the checkpoint "
                            "is corrupt: re-download or re-quantise it")


def read_shape(name: str, get: Callable[[str], torch.Tensor]) -> tuple[int, int]:
    """(out_features, in_features) of packed module `name`, from its weight_shape tensor."""
    stored = get(f"{name}.weight_shape")
    # Any dtype or shape reads from a file: only two positive integers are a shape.
    if stored.dtype not in (torch.int64, torch.int32) or tuple(stored.shape) != (2,):
        raise CompressError(f"{name}.weight_shape is {stored.dtype} {tuple(stored.shape)}, "
                            "expected int64 (2,): the checkpoint is corrupt")
    shape = tuple(int(v) for v in stored.tolist())
    if min(shape) <= 0:
        raise CompressError(f"{name}.weight_shape is {shape}: the checkpoint is corrupt")
    return shape


def _check_shape(name: str, what: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype | None):
    """`dtype` None: any floating type (scales). An integer scale, such as float16 bytes
    relabelled int16, would load and compute garbage without any error."""
    wrong_type = not t.is_floating_point() if dtype is None else t.dtype != dtype
    if tuple(t.shape) != tuple(shape) or wrong_type:
        raise CompressError(
            f"{name}.{what} is {t.dtype} {tuple(t.shape)}, expected "
            f"{dtype or 'float'} {tuple(shape)}: the checkpoint is corrupt or was written "
            "for a different quantization_config"
        )


def _weights_args(scheme: QuantScheme, actorder: str | None) -> dict:
    return {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "group_size": None if scheme.group_size == -1 else scheme.group_size,
        "strategy": "channel" if scheme.group_size == -1 else "group",
        "block_structure": None,
        "dynamic": False,
        # One group per row: the order changed calibration only, as with static groups.
        "actorder": "weight" if actorder and scheme.group_size == -1 else actorder,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def quantization_config(schemes: Mapping[str, QuantScheme], ignore: Iterable[str],
                        actorder: str | None = None) -> dict:
    """The config.json block for modules `schemes` (name -> scheme); `ignore` stay dense.

    `actorder` is compressed-tensors' name for how GPTQ ordered columns: "group" when the
    checkpoint stores weight_g_idx, "weight" for act-order with static groups, else None.
    compressed-tensors 0.20 refuses "group" outright, which beats ignoring weight_g_idx
    and computing with scrambled groups.

    The most common scheme targets the class "Linear"; modules with another scheme get
    a group of exact-name regexes, which compressed-tensors and vLLM both rank above
    class targets.
    """
    by_scheme: dict[QuantScheme, list[str]] = {}
    for name, scheme in schemes.items():
        by_scheme.setdefault(scheme, []).append(name)
    ordered = sorted(by_scheme.items(), key=lambda kv: -len(kv[1]))
    groups = {}
    for i, (scheme, names) in enumerate(ordered):
        targets = ["Linear"] if i == 0 else [f"re:^{re.escape(n)}$" for n in sorted(names)]
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": _weights_args(scheme, actorder),
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


@dataclass(frozen=True)
class ConfigGroup:
    """One `config_groups` entry: which modules it targets ("Linear", exact names or
    "re:" regexes), their scheme, and compressed-tensors' `actorder` ("group" means the
    checkpoint stores weight_g_idx)."""

    key: str
    targets: tuple[str, ...]
    scheme: QuantScheme
    actorder: str | None = None


def config_groups(config: Mapping) -> list[ConfigGroup]:
    """The groups of a `quantization_config` block, each checked as strictly as a recipe."""
    if not isinstance(config, Mapping):
        raise CompressError(f"quantization_config is a {type(config).__name__}, not a mapping: "
                            "config.json is corrupt; re-download or re-quantise the checkpoint")
    if config.get("quant_method") != "compressed-tensors":
        raise CompressError(
            f"quant_method {config.get('quant_method')!r} is not supported; this loader reads "
            "compressed-tensors checkpoints (quant_method 'compressed-tensors')"
        )
    if config.get("format", FORMAT) != FORMAT:
        raise CompressError(f"compressed-tensors format {config.get('format')!r} is not "
                            f"supported; only {FORMAT!r} is")
    raw_groups = config.get("config_groups") or {}
    if not isinstance(raw_groups, Mapping):
        raise CompressError("quantization_config config_groups is not a mapping of group name "
                            "to group: config.json is corrupt; re-download or re-quantise it")
    groups = []
    for key, group in raw_groups.items():
        w = group.get("weights") if isinstance(group, Mapping) else None
        if not isinstance(w, Mapping):
            raise CompressError(f"quantization_config group {key!r} is malformed (no 'weights' "
                                "mapping); re-download or re-quantise the checkpoint")
        if w.get("type", "int") != "int" or w.get("dynamic"):
            raise CompressError(f"config group {key!r}: only static int weights are supported")
        if group.get("input_activations"):
            raise CompressError(f"config group {key!r}: activation quantisation is not supported")
        strategy = w.get("strategy")
        if strategy not in (None, "group", "channel"):
            raise CompressError(f"config group {key!r}: weight strategy {strategy!r} is not "
                                "supported; this loader reads 'group' and 'channel'")
        group_size = -1 if strategy == "channel" else w.get("group_size")
        try:  # the values are checked as strictly as a recipe's: no 4.0 bits or "true"
            scheme = QuantScheme(w.get("num_bits"), group_size, w.get("symmetric", True))
        except CompressError as e:
            raise CompressError(f"quantization_config group {key!r} is malformed ({e})") from None
        actorder = w.get("actorder")
        groups.append(ConfigGroup(str(key), tuple(_patterns(group.get("targets"),
                                                           f"config group {key!r} targets")),
                                  scheme, actorder if isinstance(actorder, str) else None))
    return groups


def parse_quantization_config(
    config: Mapping, linear_names: Iterable[str]
) -> dict[str, QuantScheme]:
    """Module name -> scheme for every Linear the block quantises (exact > regex > class)."""
    groups = config_groups(config)
    ignore = _patterns(config.get("ignore"), "quantization_config ignore")
    schemes = {}
    for name in linear_names:
        group = matching_group(name, groups, ignore)
        if group is not None:
            schemes[name] = group.scheme
    return schemes


def matching_group(name: str, groups: Iterable[ConfigGroup],
                   ignore: Iterable[str] = ()) -> ConfigGroup | None:
    """The group that quantises module `name` as compressed-tensors ranks targets (exact
    name > regex > class "Linear"), or None when it stays dense."""
    if _rank(name, ignore) is not None:
        return None
    ranked = [(r, g) for g in groups if (r := _rank(name, g.targets)) is not None]
    return min(ranked, default=(None, None), key=lambda rg: rg[0])[1]


def ignored(config: Mapping) -> list[str]:
    """quantization_config's `ignore` list, checked."""
    return _patterns(config.get("ignore"), "quantization_config ignore")


def _patterns(value: object, where: str) -> list[str]:
    """A list of module names, "re:" regexes or "Linear" (None: empty), checked up front."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise CompressError(f"quantization_config: {where} must be a list of module names or "
                            "'re:' patterns; config.json is corrupt")
    for t in value:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except (re.error, RecursionError, OverflowError) as e:  # nesting, {huge}
                raise CompressError(f"quantization_config: {where} has a bad regex {t!r} ({e}); "
                                    "config.json is corrupt") from None
    return value


def _rank(name: str, targets: Iterable[str]) -> int | None:
    """0 exact name, 1 regex, 2 class 'Linear'; None if no target matches."""
    ranks = []
    for t in targets:
        if t == name:
            ranks.append(0)
        elif t.startswith("re:") and re.match(t[3:], name):
            ranks.append(1)
        elif t == "Linear":
            ranks.append(2)
    return min(ranks, default=None)
