"""Recipes: the full, typed description of one quantisation, loadable from YAML.

A recipe names the method, the default scheme, modules to leave dense and per-module
overrides by name pattern (a glob such as "*.down_proj", or "re:<regex>"). The CLI
flags build the same object, and every checkpoint stores the expanded recipe it was
made with, so the result can be reproduced.

Example (recipes/w4g128-rtn.yaml)::

    method: rtn
    scheme: {bits: 4, group_size: 128, symmetric: false}
    ignore: [lm_head]
    overrides:
      - {pattern: "*.down_proj", bits: 8, group_size: -1}

`rotate: hadamard` (or `rotate: {kind: hadamard, seed: 0}`) folds seeded randomised
Hadamard rotations into the weights first, and `tune: true` (or `tune: {epochs: 2, ...}`)
tunes the finished checkpoint's scales end to end (docs/algorithms.md).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from compress.choices import METHODS
from compress.errors import CompressError
from compress.quant import QuantScheme
from compress.quant.awq import AWQConfig
from compress.quant.gptq import GPTQConfig
from compress.quant.rotate import RotationConfig
from compress.quant.scale_tuning import ScaleTuningConfig
from compress.quant.signround import SignRoundConfig

CALIBRATED_METHODS = ("gptq", "awq", "awq+gptq", "signround")
RECIPE_VERSION = 1


EXPERT_TOKENS = ("routed", "all")


@dataclass(frozen=True)
class CalibrationConfig:
    """How many calibration windows, how long, and the seed that picks them.
    `expert_tokens`: what a mixture-of-experts layer's experts calibrate on, the tokens
    routed to each ("routed") or every token, only the routed outputs going on ("all").
    `sampled`: windows of text sampled from the unquantised model added to the `samples`
    (`data.with_sampled`)."""

    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    expert_tokens: str = "routed"
    sampled: int = 0

    def __post_init__(self) -> None:
        for name in ("samples", "seqlen", "seed", "sampled"):
            value = getattr(self, name)
            positive = name in ("samples", "seqlen")
            if isinstance(value, bool) or not isinstance(value, int) or value < positive:
                raise CompressError(f"calibration {name} must be a "
                                    f"{'positive' if positive else 'non-negative'} "
                                    f"integer, got {value!r}")
        if self.seqlen < 2:
            raise CompressError("calibration seqlen must be at least 2 tokens")
        if self.expert_tokens not in EXPERT_TOKENS:
            raise CompressError(f"calibration expert_tokens must be one of "
                                f"{', '.join(EXPERT_TOKENS)}, got {self.expert_tokens!r}")

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.expert_tokens == "routed":  # the default, and what dense models have
            del data["expert_tokens"]
        if not self.sampled:  # recipes written before the choice existed stay as they were
            del data["sampled"]
        return data


@dataclass(frozen=True)
class Override:
    pattern: str
    scheme: QuantScheme

    def matches(self, name: str) -> bool:
        return name_matches(name, self.pattern)


def name_matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class Recipe:
    method: str = "rtn"
    scheme: QuantScheme = field(default_factory=QuantScheme)
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: tuple[Override, ...] = ()
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    awq: AWQConfig = field(default_factory=AWQConfig)
    # Rotations folded into the weights before any method runs (compress/calibrate/rotate.py)
    rotate: RotationConfig = field(default_factory=RotationConfig)
    signround: SignRoundConfig = field(default_factory=SignRoundConfig)
    # End-to-end scale tuning of the finished checkpoint (compress/tune.py); None: none
    tune: ScaleTuningConfig | None = None

    @property
    def calibrated(self) -> bool:
        return self.method in CALIBRATED_METHODS

    @property
    def uses_awq(self) -> bool:
        return self.method.startswith("awq")

    @property
    def rounding(self) -> str:
        """How weights are finally rounded: "gptq", "signround" or "rtn"."""
        if self.method == "signround":
            return "signround"
        return "gptq" if self.method.endswith("gptq") else "rtn"

    @property
    def rounds_gptq(self) -> bool:
        """Whether GPTQ runs on each layer: as the rounding, or where learned rounding
        starts (`SignRoundConfig.start`), with the `gptq` settings either way."""
        return self.rounding == "gptq" or (self.rounding == "signround"
                                           and self.signround.start == "gptq")

    @property
    def carries_reference(self) -> bool:
        """Whether calibration carries the unquantised model's activations beside the
        quantised ones (learned rounding's and GPTQ's "model" target)."""
        if self.rounding == "signround":
            return self.signround.target == "model"
        return self.rounding == "gptq" and self.gptq.target == "model"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CompressError(f"unknown method {self.method!r}; available: {', '.join(METHODS)}")
        for pattern in (*self.ignore, *(o.pattern for o in self.overrides)):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except (re.error, RecursionError, OverflowError) as e:  # nesting, {huge}
                    raise CompressError(f"bad regex in recipe pattern {pattern!r}: {e}") from None
        if (self.rounding == "signround" and self.signround.start == "gptq"
                and self.gptq.act_order and not self.gptq.static_groups):
            raise CompressError("signround starting from GPTQ needs GPTQ's static groups "
                                "(its grid must be contiguous groups); drop "
                                "--dynamic-groups or start from rtn")

    def scheme_for(self, name: str) -> QuantScheme | None:
        """The scheme for module `name`; None if it stays dense. The last matching override wins."""
        if any(name_matches(name, p) for p in self.ignore):
            return None
        chosen = self.scheme
        for override in self.overrides:
            if override.matches(name):
                chosen = override.scheme
        return chosen

    @property
    def label(self) -> str:
        act = "-noactorder" if self.rounds_gptq and not self.gptq.act_order else ""
        rotated = f"-{self.rotate.kind}" if self.rotate.enabled else ""
        return (f"{self.method}-{self.scheme.label}{act}{rotated}"
                + ("-mixed" if self.overrides else ""))

    def to_dict(self) -> dict:
        """The expanded recipe; method-specific sections only for the methods that use them."""
        data = {
            "version": RECIPE_VERSION,
            "method": self.method,
            "scheme": self.scheme.to_dict(),
            "ignore": list(self.ignore),
            "overrides": [{"pattern": o.pattern, **o.scheme.to_dict()} for o in self.overrides],
        }
        if self.uses_awq:
            data["awq"] = self.awq.to_dict()
        if self.rounds_gptq:
            data["gptq"] = self.gptq.to_dict()
        if self.rounding == "signround":
            data["signround"] = self.signround.to_dict()
        if self.calibrated or self.tune is not None:
            data["calibration"] = self.calibration.to_dict()
        if self.rotate.enabled:  # absent otherwise: earlier recipes (and runs) stay as they were
            data["rotate"] = self.rotate.to_dict()
        if self.tune is not None:  # likewise
            data["tune"] = self.tune.to_dict()
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: object, source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise CompressError(f"{source} must be a mapping with keys method, scheme, ignore, "
                                "overrides")
        allowed = {"version", "method", "scheme", "ignore", "overrides", "gptq", "awq",
                   "calibration", "rotate", "signround", "tune"}
        unknown = set(data) - allowed
        if unknown:  # YAML keys may be numbers or null too: sorted as text
            raise CompressError(f"{source}: unknown keys {sorted(unknown, key=str)}; allowed: "
                                f"{', '.join(sorted(allowed - {'version'}))}")
        version = data.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise CompressError(f"{source}: recipe version {version!r} is not supported "
                                f"(this library reads version {RECIPE_VERSION})")
        scheme = _section(QuantScheme, data.get("scheme", {}), f"{source}: scheme")
        ignore = data.get("ignore", ["lm_head"])
        if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
            raise CompressError(f"{source}: ignore must be a list of name patterns")
        if not isinstance(data.get("overrides") or [], list):
            raise CompressError(f"{source}: overrides must be a list of "
                                "{pattern, bits, group_size, symmetric} mappings")
        overrides = []
        for i, item in enumerate(data.get("overrides") or []):
            if not isinstance(item, dict) or not isinstance(item.get("pattern"), str):
                raise CompressError(f"{source}: overrides[{i}] needs a 'pattern' string")
            rest = {k: v for k, v in item.items() if k != "pattern"}
            overrides.append(Override(item["pattern"],
                                      _section(QuantScheme, {**scheme.to_dict(), **rest},
                                              f"{source}: overrides[{i}]")))
        method = data.get("method", "rtn")
        if not isinstance(method, str):
            raise CompressError(f"{source}: method must be a string")
        gptq = _section(GPTQConfig, data.get("gptq", {}), f"{source}: gptq")
        calibration = _section(CalibrationConfig, data.get("calibration", {}),
                               f"{source}: calibration")
        awq = _section(AWQConfig, data.get("awq", {}), f"{source}: awq")
        rotation = data.get("rotate", {})
        if isinstance(rotation, str):  # `rotate: hadamard`, seed 0
            rotation = {"kind": rotation}
        rotate = _section(RotationConfig, rotation, f"{source}: rotate")
        signround = _section(SignRoundConfig, data.get("signround", {}), f"{source}: signround")
        tune = data.get("tune")
        if tune is True:  # `tune: true`: the default settings
            tune = {}
        tune = None if tune in (None, False) else _section(ScaleTuningConfig, tune,
                                                           f"{source}: tune")
        return cls(method, scheme, tuple(ignore), tuple(overrides), gptq, calibration, awq,
                   rotate, signround, tune)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise CompressError(f"recipe {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        # ValueError: not UTF-8, or an integer of over 4300 digits; RecursionError: nesting
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            raise CompressError(f"recipe {path} is not valid YAML "
                                f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None
        return cls.from_dict(data, str(path))


def _section(cls, data: object, where: str):
    """A dataclass section of the recipe, with unknown keys named."""
    if not isinstance(data, dict):
        raise CompressError(f"{where} must be a mapping")
    allowed = {f.name for f in fields(cls)}
    unknown = set(data) - allowed
    if unknown:
        raise CompressError(f"{where}: unknown keys {sorted(unknown, key=str)}; allowed: "
                            f"{', '.join(sorted(allowed))}")
    try:
        return cls(**data)
    except CompressError as e:
        raise CompressError(f"{where}: {e}") from None
