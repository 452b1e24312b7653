"""Fuzzing everything we read from disk (issue 10): bad input ends in CompressError, or loads.

Four parsers, each fed mutated copies of real files:

- safetensors shards and their index, through `models.load(dir)` (which is
  `open_model(dir)`: config, manifest, headers; then `build`: every tensor) and a
  3-token forward whose logits must be finite;
- config.json with its quantization_config, the same way;
- recipe YAML, through `Recipe.from_yaml` (plus what a recipe is used for right after);
- compress_manifest.json, through `open_model(dir)` (`read_manifest` + `verify`) and what
  reads its other fields (the model card, `compress eval`'s baseline, the caches' key).

The files come from quantising the tiny test model (a 512-token vocabulary, so that the
embedding shard stays small: every input rewrites a file, and open_model hashes every
file the manifest lists). Mutations are byte-level (bit flips, truncation, length fields,
inserted syntax) and structural (fields replaced by other types, offsets, shapes, dtypes,
missing keys, path-traversal file names). A changed file's manifest entry is usually
updated too, so that the input reaches the parser instead of stopping at the sha256 check.

Every input must end in `CompressError` with a one-line message, or succeed. Anything
else (another exception type, a hang past `PER_INPUT_S`, a file outside the checkpoint
opened) is tallied and fails the test, listing the first inputs that did it. Inputs come
from hypothesis, seeded (`derandomize=True`); the 10,000-input runs are `slow`, a smoke
run of each is not. With COMPRESS_FUZZ_REPORT=1 the tallies are also written to
benchmarks/results/fuzz.json. Optionally (when `atheris` is installed) a coverage-guided
run of each parser goes through libFuzzer in a subprocess.
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import functools
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_model
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from compress import api, evaluation, hub, model_card, models
from compress.errors import CompressError
from compress.formats import checkpoint
from compress.quant import QuantScheme
from compress.recipe import Override, Recipe

FULL = 10_000
SMOKE = 200
PER_INPUT_S = 5.0  # an input running longer than this is a hang
EXAMPLES = 8  # "other" outcomes listed when a run fails
ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "benchmarks" / "results" / "fuzz.json"
SENTINEL_DIR = "outside-sentinel"  # beside the checkpoint: no input may make us open it
# What each parser's inputs go through (recorded in the report).
TARGETS = {
    "safetensors": "a shard or the index mutated; models.load(dir) and a 3-token forward "
                   "(finite logits), SafetensorsDir "
                   "names/shape/nbytes, safetensors_keys and load_tensors of the shard",
    "config.json": "config.json (with quantization_config) mutated; models.load(dir) and "
                   "a 3-token forward (finite logits)",
    "manifest": "compress_manifest.json mutated; models.open_model(dir) (read_manifest, verify), "
                "then its readers: model_card.render, evaluation.resolve_baseline and "
                "model_identity",
    "recipe": "a YAML document, or a shipped recipe mutated; Recipe.from_yaml, scheme_for, "
              "label, to_yaml and back",
}

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"),
                                reason="the per-input time limit needs signal.setitimer (POSIX)")


# ------------------------------------------------------------------------------ harness


class _Hang(BaseException):
    """Raised by SIGALRM in the input that ran too long (not an Exception: nothing in the
    product code may swallow it)."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(signum, frame):
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _memory_cap(headroom: int = 4 << 30) -> Iterator[None]:
    """This process's address space capped at its current size plus `headroom` (Linux): an
    allocation sized from a bad header (1e18 layers, a 1e18-wide RoPE table) then fails as
    MemoryError in the input that asked for it, a tallied defect, instead of the kernel's
    OOM killer ending the run, or whatever else shares the machine."""
    statm = Path("/proc/self/statm")
    if not statm.is_file():
        yield
        return
    import resource

    size = int(statm.read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    old = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + headroom if old[0] == resource.RLIM_INFINITY else min(old[0], size + headroom)
    resource.setrlimit(resource.RLIMIT_AS, (cap, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


# Files opened outside the checkpoint while an input runs (path-traversal names): Python
# opens via an audit hook, safetensors' own (Rust) opens via a wrapper of safe_open.
_OPENED_OUTSIDE: list[str] = []
_WATCHING = [False]


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCHING[0] and isinstance(args[0], str | bytes | os.PathLike):
        path = os.fsdecode(args[0])
        if SENTINEL_DIR in path or path.endswith("/etc/passwd"):
            _OPENED_OUTSIDE.append(path)


sys.addaudithook(_audit)


def _watched(real: Callable) -> Callable:
    def watched(path, *args, **kwargs):
        _audit("open", (path,))
        return real(path, *args, **kwargs)

    return watched


@pytest.fixture(autouse=True)
def _watch_safe_open(monkeypatch):
    monkeypatch.setattr(checkpoint, "safe_open", _watched(checkpoint.safe_open))


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/compress/" in f.filename or "/kernels/" in f.filename]
    f = (ours or frames or [None])[-1]
    return f" at {Path(f.filename).name}:{f.lineno}" if f else ""


@dataclass
class Tally:
    """Outcomes of one parser's run: every input is a CompressError, a success or other."""

    parser: str
    engine: str
    inputs: int = 0
    compress_error: int = 0
    success: int = 0
    other: int = 0
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)  # the first few "other" outcomes
    started: float = field(default_factory=time.perf_counter)
    time_limit: bool = True  # False under libFuzzer, whose -timeout uses SIGALRM itself

    def run(self, target: Callable[[], object], describe: Callable[[], str]) -> None:
        self.inputs += 1
        outcome = self._outcome(target, self.time_limit)
        if _OPENED_OUTSIDE:
            outcome = f"opened {_OPENED_OUTSIDE[0]} outside the checkpoint ({outcome})"
        if outcome == "compress_error":
            self.compress_error += 1
        elif outcome == "success":
            self.success += 1
        else:
            self.other += 1
            if len(self.examples) < EXAMPLES:
                self.examples.append(f"{outcome}\n      input: {describe()[:600]}")

    @staticmethod
    def _outcome(target: Callable[[], object], time_limit: bool = True) -> str:
        _OPENED_OUTSIDE.clear()
        _WATCHING[0] = True
        try:
            with _time_limit(PER_INPUT_S) if time_limit else contextlib.nullcontext():
                target()
        except CompressError as e:
            message = str(e)
            if message and "\n" not in message:
                return "compress_error"
            return f"CompressError without a one-line message: {message!r}"
        except _Hang:
            return f"hang: no result after {PER_INPUT_S:.0f} s"
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # the point: anything but CompressError is a defect
            return f"{type(e).__name__}: {str(e)[:300]}{_where(e)}"
        finally:
            _WATCHING[0] = False
        return "success"

    def summary(self) -> dict:
        return {"inputs": self.inputs, "compress_error": self.compress_error,
                "success": self.success, "other": self.other,
                "seconds": round(self.seconds, 1)}

    def finish(self, expected: int) -> None:
        self.seconds = self.seconds or time.perf_counter() - self.started
        s = self.summary()
        print(f"\nfuzz {self.parser} ({self.engine}): {s['inputs']} inputs, "
              f"{s['compress_error']} CompressError, {s['success']} success, "
              f"{s['other']} other, {s['seconds']} s")
        if os.environ.get("COMPRESS_FUZZ_REPORT") == "1":
            _write_report(self.parser, self.engine, s)
        assert self.other == 0, (f"{self.parser}: {self.other} of {self.inputs} inputs ended "
                                 "otherwise than in CompressError or success:\n  "
                                 + "\n  ".join(self.examples))
        assert self.inputs >= expected, f"only {self.inputs} of {expected} inputs were tried"


def _write_report(parser: str, engine: str, summary: dict) -> None:
    import hypothesis

    report = json.loads(REPORT.read_text()) if REPORT.is_file() else {}
    report.setdefault("benchmark", "fuzz: mutated inputs to every parser of files on disk")
    report["regenerate"] = ("COMPRESS_FUZZ_REPORT=1 python -m pytest tests/faults/test_fuzz.py "
                            "-k fuzz_")
    report["per_input_limit_s"] = PER_INPUT_S
    report["outcomes"] = ("compress_error: clean one-line CompressError; success: parsed or "
                          "loaded; other: anything else (must be 0)")
    report["targets"] = TARGETS
    report["hypothesis"] = hypothesis.__version__
    report["cpus"] = os.cpu_count()
    if engine == "atheris":
        from importlib.metadata import version

        report["atheris"] = version("atheris")
    report.setdefault("results", {}).setdefault(parser, {})[engine] = summary
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_json(REPORT, report)


def _fuzz(tally: Tally, strategy: st.SearchStrategy, n: int,
          run_one: Callable[[object], None]) -> None:
    """Feed `n` inputs drawn from `strategy` (seeded) to `run_one`, then check the tally.

    SIGALRM ends an input stuck in Python after PER_INPUT_S; a hang inside C code, which
    never returns to Python to take the signal, ends the process with a traceback once the
    whole run overstays (re-arming that watchdog per input would cost ~1 ms each)."""
    @settings(max_examples=n, derandomize=True, deadline=None, database=None,
              phases=[Phase.generate], print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example,
                                     HealthCheck.filter_too_much])
    @given(strategy)
    def each(value):
        run_one(value)

    faulthandler.dump_traceback_later(120 + n * 0.05, exit=True)
    try:
        with _memory_cap():
            each()
    finally:
        faulthandler.cancel_dump_traceback_later()
    tally.finish(n)


def test_the_harness_tallies_what_it_must(monkeypatch):
    """A hang, another exception type, a multi-line CompressError and a file opened outside
    the checkpoint each count as "other"; a clean CompressError and a success do not."""
    monkeypatch.setitem(globals(), "PER_INPUT_S", 0.2)

    def raise_(e: BaseException) -> None:
        raise e

    def peek_outside() -> None:
        with contextlib.suppress(OSError):
            open(f"/nonexistent/{SENTINEL_DIR}/secret").close()
        raise CompressError("clean, but after opening a file outside")

    tally = Tally("harness", "self-test")
    for target in (lambda: None, lambda: raise_(CompressError("x is bad; fix x")),
                   lambda: time.sleep(5), lambda: raise_(KeyError("k")),
                   lambda: raise_(CompressError("two\nlines")), peek_outside):
        tally.run(target, lambda: "input")
    assert (tally.success, tally.compress_error, tally.other) == (1, 1, 4)
    found = "\n".join(tally.examples)
    for what in ("hang", "KeyError", "without a one-line message", "outside the checkpoint"):
        assert what in found

# ------------------------------------------------------------------- generic mutations

_INTS = (-2**63, -(10**9), -2, -1, 0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 33, 63, 64, 65, 127, 128,
         160, 255, 256, 511, 512, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64,
         10**18, 10**30)
_FLOATS = (float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 0.5, 1.0, 1e-300, 1e308, -1.0,
           4.0, 64.0, 1e-5)
_WORDS = ("", " ", "a", "Linear", "re:.*", "re:(", "re:[", "re:^model\\.layers\\.0\\..*$",
          "re:(a+)+$", "lm_head", "*", "*.down_proj", "int", "float", "channel", "group",
          "tensor", "block", "token", "static", "weight", "pack-quantized", "naive-quantized",
          "int-quantized", "float-quantized", "compressed-tensors", "gptq", "awq", "rtn",
          "awq+gptq", "llama", "mistral", "qwen2", "gpt2", "float32", "float16", "bfloat16",
          "int8", "bool", "complex64", "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8",
          "U8", "U16", "U32", "U64", "BOOL", "F8_E4M3", "F8_E5M2", "F4", "C64", "F8_E8M0",
          "F6_E2M3", "E8M0", "i32", "default", "linear", "dynamic", "yarn", "llama3",
          "longrope", "pt", "tf", "np", "../../etc/passwd", "/etc/passwd", "\x00", "NaN",
          "1e309", "-1", "4", "true", "model.safetensors", "ü\u2028\ud7ff", "a\nb",
          "re:" + "(" * 1200 + ")" * 1200, "re:a{99999999999999999999}", "re:(?P<a>x)(?P<a>y)")
_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
         "num_key_value_heads", "head_dim", "vocab_size", "intermediate_size", "rms_norm_eps",
         "max_position_embeddings", "rope_parameters", "rope_theta", "rope_type", "factor",
         "rope_scaling", "tie_word_embeddings", "dtype", "torch_dtype", "sliding_window",
         "use_sliding_window", "quantization_config", "quant_method", "format",
         "config_groups", "weights", "num_bits", "group_size", "strategy", "symmetric", "type",
         "dynamic", "actorder", "targets", "ignore", "input_activations", "files", "bytes",
         "sha256", "weight_map", "metadata", "__metadata__", "dtype", "shape", "data_offsets",
         "version", "method", "scheme", "bits", "overrides", "pattern", "gptq", "awq",
         "calibration", "damp", "block_size", "act_order", "samples", "seqlen", "seed",
         "grid", "max_shrink", "")

_CHARS = "az09 .:-_/\\\"'[]{}\n\t\x00\x7fé€\u2028\U0001f600"


def _garbage(rng: random.Random, depth: int = 0) -> object:
    """A JSON-like value of any type: an edge value, random text or number, or (above
    depth 3) a small list or mapping of such. Seeded: hypothesis draws only the seed, as
    its own recursive strategies cost ~1-5 ms a value here."""
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return rng.choice((None, True, False))
    if kind == 1:
        return rng.choice(_INTS)
    if kind == 2:
        return rng.choice((rng.randint(-(2**70), 2**70), rng.randint(-9, 600)))
    if kind == 3:
        return rng.choice((*_FLOATS, rng.uniform(-1e6, 1e6)))
    if kind in (4, 5):
        return rng.choice(_WORDS)
    if kind == 6:
        return "".join(rng.choice(_CHARS) for _ in range(rng.randrange(12)))
    if kind in (7, 8):
        return [_garbage(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rng.choice(_KEYS) if rng.random() < 0.7 else str(_garbage(rng, 3)):
            _garbage(rng, depth + 1) for _ in range(rng.randrange(5))}


_SEED = st.integers(0, 2**32 - 1)
_JSON = _SEED.map(lambda seed: _garbage(random.Random(seed)))
_SCALARS = _SEED.map(lambda seed: _garbage(random.Random(seed), depth=3))


# True nine times in ten (hypothesis draws the low end of integers(0, 9) far more often).
_USUALLY = st.sampled_from((True,) * 9 + (False,))


def _pick(draw, options: list | tuple) -> object:
    """One of `options` (by index: a strategy built per call would cost ~1 ms)."""
    return options[draw(st.integers(0, len(options) - 1))]


_INT = st.sampled_from(_INTS)
_WORD = st.sampled_from(_WORDS)
_EDGES = st.one_of(_INT, st.sampled_from(_FLOATS), _WORD)
_KEY = st.sampled_from(_KEYS) | st.text(max_size=8)


def _nudge(draw, value: object) -> object:
    """A value near `value`: a close relative of the same or another type, or an edge value."""
    if draw(st.booleans()):
        return draw(_EDGES)
    if isinstance(value, bool):
        near = [not value, int(value), str(value).lower(), None]
    elif isinstance(value, int):
        near = [value - 1, value + 1, -value, value * 2, value * 2**40, float(value),
                str(value), [value], 0]
    elif isinstance(value, float):
        near = [-value, value * 1e300, str(value), [value], None, int(value) if
                abs(value) < 1e18 else 0]
    elif isinstance(value, str):
        near = [value.upper(), value + "x", value[:-1], [value], "../" + value, value * 3, ""]
    elif isinstance(value, list):
        near = [value[::-1], value * 2, [], value[:1], value[0] if value else None, [value],
                [*value, value[-1] if value else 0]]
    elif isinstance(value, dict):
        near = [{}, list(value), list(value.values()), None, [value]]
    else:
        return draw(_JSON)
    return _pick(draw, near)


def _paths(tree: object, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, (*prefix, i))


def _get(tree: object, path: tuple) -> object:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: object, path: tuple, value: object) -> object:
    if not path:
        return value
    _get(tree, path[:-1])[path[-1]] = value
    return tree


_TREE_OPS = st.sampled_from(("replace", "nudge", "nudge", "delete", "insert"))


@st.composite
def _mutated_tree(draw, tree: object, log: list[str], within: tuple = (),
                  names: st.SearchStrategy | None = None) -> object:
    """1-3 structural edits of a JSON-like tree: replace, nudge, delete or insert a node.
    `within`: prefer nodes under this path; `names`: extra values for string slots."""
    tree = copy.deepcopy(tree)
    values = _JSON if names is None else (_JSON | names)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(tree))
        inside = [p for p in paths if p[:len(within)] == within and len(p) > len(within)]
        if within and inside and draw(st.booleans()):
            paths = inside
        path = _pick(draw, paths)
        node = _get(tree, path)
        op = draw(_TREE_OPS)
        if op == "delete" and path:
            parent = _get(tree, path[:-1])
            del parent[path[-1]]
        elif op == "insert" and isinstance(node, dict | list):
            value = draw(values)
            if isinstance(node, dict):
                key = draw(_KEY)
                node[key] = value
                path = (*path, key)
            else:
                node.insert(draw(st.integers(0, len(node))), value)
        else:
            op = "replace" if op in ("delete", "insert") else op
            value = _nudge(draw, node) if op == "nudge" else draw(values)
            tree = _set(tree, path, value)
        log.append(f"{op} {'.'.join(map(str, path)) or '<root>'}"
                   + (f" = {value!r:.120}" if op != "delete" else ""))
    return tree


_SYNTAX = (b'"', b"{", b"}", b"[", b"]", b":", b",", b"\\", b"\x00", b"\xff", b"\xc3", b"NaN",
           b"1e999", b"-", b"9" * 30, b"9" * 5000, b"\n", b"\t", b"&a ", b"*a", b"!!", b"? ",
           b"- ", b"|", b">", b"%", b"@", b"'", b"#", b"---\n", b"...\n", b"\xef\xbb\xbf")


@st.composite
def _mutated_bytes(draw, data: bytes, log: list[str], hot: int | None = None) -> bytes:
    """1-4 byte-level edits: bit flips, byte sets, deletions, insertions, truncation.
    `hot`: positions below it (a header) are picked half the time."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        size = len(out)
        limit = size if hot is None or draw(st.booleans()) else min(hot, size)
        pos = draw(st.integers(0, max(limit - 1, 0)))
        op = draw(st.sampled_from(("flip", "set", "delete", "insert", "truncate", "dup")))
        if op == "flip" and size:
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and size:
            out[pos] = draw(st.integers(0, 255))
        elif op == "delete":
            del out[pos:pos + draw(st.integers(1, 16))]
        elif op == "insert":
            out[pos:pos] = draw(st.sampled_from(_SYNTAX) | st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del out[pos:]
        else:
            out[pos:pos] = out[pos:pos + draw(st.integers(1, 64))]
        log.append(f"{op}@{pos}")
    return bytes(out)


def _deeply_nested(opener: bytes, closer: bytes, depth: int) -> bytes:
    return opener * depth + closer * depth


# ----------------------------------------------------------------- checkpoints on disk


class Workspace:
    """A copy of a quantised checkpoint that each input mutates, starting from pristine
    files; the manifest entries of changed files can be updated to match them."""

    def __init__(self, src: Path, dst: Path):
        shutil.copytree(src, dst)
        self.source, self.path = src, dst
        self.pristine = {p.name: p.read_bytes() for p in dst.iterdir() if p.is_file()}
        self.manifest = json.loads(self.pristine[checkpoint.MANIFEST])
        self.touched: set[str] = set()
        # A valid shard and a secret outside the checkpoint: traversal names point at them.
        self.sentinel = dst.parent / SENTINEL_DIR
        self.sentinel.mkdir()
        (self.sentinel / self.shards()[0]).write_bytes(self.pristine[self.shards()[0]])
        (self.sentinel / "secret").write_text("not for the loader")

    def apply(self, files: dict[str, bytes | None], rehash: bool = False) -> None:
        self.reset(keep=files if not rehash else {**files, checkpoint.MANIFEST: b""})
        manifest = copy.deepcopy(self.manifest)
        for name, data in files.items():
            self._put(name, data)
            if rehash and name in manifest["files"] and data is not None:
                manifest["files"][name] = {"bytes": len(data),
                                           "sha256": hashlib.sha256(data).hexdigest()}
        if rehash and checkpoint.MANIFEST not in files:
            self._put(checkpoint.MANIFEST, json.dumps(manifest).encode())

    def _put(self, name: str, data: bytes | None) -> None:
        self.touched.add(name)
        path = self.path / name
        if data is None:
            path.unlink(missing_ok=True)
        else:  # a new inode: never rewrite a file a previous input may still have mapped
            tmp = path.with_name(f".{name}.fuzz")
            tmp.write_bytes(data)
            os.replace(tmp, path)

    def reset(self, keep: dict | None = None) -> None:
        """Every file back as it was, except those in `keep` (about to be rewritten)."""
        for name in self.touched - set(keep or ()):
            if name in self.pristine:
                self._put(name, self.pristine[name])
            else:
                (self.path / name).unlink(missing_ok=True)
        self.touched.clear()

    def shards(self) -> list[str]:
        return sorted(n for n in self.pristine if n.endswith(".safetensors"))

    @functools.cached_property
    def pristine_secret(self) -> dict:
        """The manifest entry that the secret outside the checkpoint would match."""
        secret = self.sentinel / "secret"
        return {"bytes": secret.stat().st_size, "sha256": checkpoint.sha256_file(secret)}

    @functools.cached_property
    def evil_names(self) -> st.SearchStrategy[str]:
        return st.sampled_from(_evil_names(self))

    @functools.cached_property
    def tensor_names(self) -> list[str]:
        return sorted({k for s in self.shards() for k in _split(self.pristine[s])[0]})


def _quantized(tmp: Path, name: str, recipe: Recipe) -> Path:
    no_tokenizer = tmp / "no-tokenizer"
    no_tokenizer.mkdir(exist_ok=True)
    tiny = tmp / "tiny"
    if not tiny.exists():  # no tokenizer files: loading does not read them
        make_tiny_model(tiny, no_tokenizer, vocab_size=512)
    out = tmp / name
    api.quantize(tiny, recipe, out, evaluate=False)
    return out


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory) -> Iterator[dict[str, Workspace]]:
    """Two quantised checkpoints: the default recipe (symmetric INT4, lm_head dense), and
    an asymmetric mix (zero points, INT8 per-channel down_proj, quantised lm_head)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    # Loading a packed checkpoint builds the CPU kernel the first time (10-60 s): done here,
    # as inside an input the time limit would cut the compile short and leave torch's build
    # lock behind, on which every later build then waits for ever.
    models.prepare_cpu_kernel()
    recipes = {
        "sym": Recipe(),
        "asym": Recipe("rtn", QuantScheme(4, 32, False), ignore=(),
                       overrides=(Override("*.down_proj", QuantScheme(8, -1, False)),)),
    }
    # Every input rewrites files: in memory that is ~50x faster than on a disk's file system.
    work = Path(tempfile.mkdtemp(prefix="compress-fuzz-", dir=_memory_dir()))
    try:
        yield {name: Workspace(_quantized(tmp, name, recipe), work / name / "ckpt")
               for name, recipe in recipes.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _memory_dir() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _evil_names(ws: Workspace) -> tuple[str, ...]:
    shard = ws.shards()[0]
    return (f"../{SENTINEL_DIR}/{shard}", str(ws.sentinel / shard), f"../{SENTINEL_DIR}/secret",
            str(ws.sentinel / "secret"), f"..\\{SENTINEL_DIR}\\secret",
            f"./../{SENTINEL_DIR}/secret", f"{ws.path.name}/../../{SENTINEL_DIR}/secret",
            "../../../../../../../../etc/passwd", "/etc/passwd", "..", ".", "", "/", "sub/x",
            "~/.ssh/id_rsa", "\x00", "a" * 300, f"{shard}\x00.txt", "%2e%2e/secret", ".hidden",
            "config.json", checkpoint.INDEX, "recipe.yaml", "missing.safetensors", "CON",
            f"{shard}/", "C:\\Windows\\win.ini")


def _load(path: Path) -> None:
    """open_model(path) (config, manifest, headers), then every tensor, then a forward:
    a file that loads must also compute (scales relabelled I32 once loaded "fine" and
    produced outputs ~1e6), and compute finite logits."""
    model, _ = models.load(path)
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]]))
    if not torch.isfinite(logits).all():
        raise FloatingPointError("a checkpoint that loaded computed NaN/Inf logits")


# ------------------------------------------------------------------ safetensors shards

_SAME_SIZE = ({"F64", "I64", "U64"}, {"F32", "I32", "U32"}, {"F16", "BF16", "I16", "U16"},
              {"I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"})
_ITEMSIZE = checkpoint._DTYPE_BYTES


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: object, body: bytes, pad: int = 0, compact: bool = True) -> bytes:
    text = json.dumps(header, separators=(",", ":") if compact else None).encode()
    text += b" " * pad
    return struct.pack("<Q", len(text)) + text + body


def _tensors(header: dict, body: bytes) -> list[list]:
    """[name, dtype, shape, data] in file order."""
    entries = sorted((v["data_offsets"][0], k, v) for k, v in header.items()
                     if k != "__metadata__")
    return [[k, v["dtype"], v["shape"], body[v["data_offsets"][0]:v["data_offsets"][1]]]
            for _, k, v in entries]


def _relayout(tensors: list[list], metadata: object) -> tuple[dict, bytes]:
    """A header and body that safetensors itself accepts (contiguous offsets)."""
    header = {} if metadata is None else {"__metadata__": metadata}
    body = bytearray()
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(body), len(body) + len(data)]}
        body += data
    return header, bytes(body)


def _factorisations(n: int) -> list[list[int]]:
    shapes = [[n], [1, n], [n, 1], [n, 1, 1]]
    shapes += [[a, n // a] for a in range(2, min(n, 64) + 1) if n % a == 0]
    return shapes + ([[]] if n == 1 else [])


@st.composite
def _shard_structure(draw, ws: Workspace, shard: str, log: list[str]) -> bytes:
    """Edits that safetensors itself accepts (retype, reshape, resize, new values, dropped,
    added, renamed or swapped tensors: the offsets are laid out again), then raw edits of
    the header (fields, metadata, any node) and body that it may not."""
    header, body = _split(ws.pristine[shard])
    tensors = _tensors(header, body)
    names = ws.tensor_names
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(("retype", "reshape", "resize", "values", "values", "drop",
                                   "add", "rename", "swap")))
        i = draw(st.integers(0, len(tensors) - 1))
        name, dtype, _, data = tensors[i]
        if op == "retype":
            group = next(g for g in _SAME_SIZE if dtype in g)
            tensors[i][1] = _pick(draw, sorted(group))
            log.append(f"{shard}: {name} dtype -> {tensors[i][1]}")
        elif op == "reshape":
            tensors[i][2] = _pick(draw, _factorisations(len(data) // _ITEMSIZE[dtype]))
            log.append(f"{shard}: {name} shape -> {tensors[i][2]}")
        elif op == "resize":
            dims = draw(st.lists(st.sampled_from((0, 1, 2, 3, 8, 16, 32, 33, 64, 65, 160, 512)),
                                 max_size=3))
            dtype = _pick(draw, sorted(_ITEMSIZE))
            nbytes = _ITEMSIZE[dtype]
            for d in dims:
                nbytes *= d
            if nbytes <= 1 << 20:
                rng = random.Random(draw(st.integers(0, 2**32)))
                tensors[i][1:] = [dtype, dims, rng.randbytes(nbytes)]
                log.append(f"{shard}: {name} -> {dtype} {dims}")
        elif op == "values" and data:
            new = bytearray(data)
            if len(new) == 16:  # weight_shape (out, in): any two int64s
                values = draw(st.lists(st.sampled_from(_INTS), min_size=2, max_size=2))
                new[:] = b"".join(struct.pack("<Q", v % 2**64) for v in values)
            else:  # NaN, inf, all ones, sign bits, zeros
                at = draw(st.integers(0, len(new) - 1))
                values = draw(st.sampled_from((b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f",
                                               b"\xff" * 8, b"\x80" * 4, b"\x00" * 8)))
                new[at:at + len(values)] = values[:len(new) - at]
            tensors[i][3] = bytes(new)
            log.append(f"{shard}: {name} values {values!r}")
        elif op == "drop" and len(tensors) > 1:
            del tensors[i]
            log.append(f"{shard}: drop {name}")
        elif op == "add":
            new = _pick(draw, names) if draw(st.booleans()) else draw(_WORD)
            if new not in (t[0] for t in tensors):
                tensors.insert(i, [new, "F32", [2], b"\x00" * 8])
                log.append(f"{shard}: add {new!r}")
        elif op == "rename":
            new = _pick(draw, names) if draw(st.booleans()) else draw(_WORD)
            if new not in (t[0] for t in tensors):
                tensors[i][0] = new
                log.append(f"{shard}: rename {name} -> {new!r}")
        elif op == "swap":
            j = draw(st.integers(0, len(tensors) - 1))
            tensors[i][0], tensors[j][0] = tensors[j][0], tensors[i][0]
            log.append(f"{shard}: swap {name} <-> {tensors[i][0]}")
    header, body = _relayout(tensors, header.get("__metadata__"))
    for _ in range(draw(st.integers(0 if len(log) > 1 else 1, 2))):
        op = draw(st.sampled_from(("field", "field", "field", "metadata", "tree", "body")))
        if op == "field":
            name = _pick(draw, [t[0] for t in tensors])
            key = draw(st.sampled_from(("dtype", "shape", "data_offsets")))
            if not draw(_USUALLY):
                header[name].pop(key, None)
                log.append(f"{shard}: del {name}.{key}")
            else:
                how = draw(st.integers(0, 2))
                value = (_nudge(draw, header[name].get(key)) if how == 0 else
                         draw(_JSON) if how == 1 else draw(st.lists(_INT, max_size=4)))
                header[name][key] = value
                log.append(f"{shard}: {name}.{key} = {value!r:.100}")
        elif op == "metadata":
            header["__metadata__"] = value = draw(_JSON)
            log.append(f"{shard}: __metadata__ = {value!r:.100}")
        elif op == "tree":
            header = draw(_mutated_tree(header, log))
            break  # the header may no longer be a mapping of tensors
        else:
            cut = draw(st.integers(0, len(body)))
            body = body[:cut] + draw(st.binary(max_size=16))
            log.append(f"{shard}: body cut at {cut}")
    return _join(header, body, pad=draw(st.integers(0, 9)), compact=draw(st.booleans()))


@st.composite
def _shard_bytes(draw, ws: Workspace, shard: str, log: list[str]) -> bytes:
    data = ws.pristine[shard]
    n = struct.unpack("<Q", data[:8])[0]
    if draw(st.booleans()):
        value = draw(st.sampled_from((0, 1, 2, 7, n - 1, n + 1, n + 8, len(data) - 8,
                                      len(data) - 7, len(data), 100_000_001, 2**31, 2**32 + n,
                                      2**63, 2**64 - 1)) | st.integers(0, 2**64 - 1))
        data = struct.pack("<Q", value) + data[8:]
        log.append(f"{shard}: header length = {value}")
    if draw(st.booleans()) or len(log) == 0:
        data = draw(_mutated_bytes(data, log, hot=8 + n + 16))
        log[-1] = f"{shard}: {log[-1]}"
    return data


@st.composite
def _safetensors_input(draw, spaces: dict[str, Workspace]) -> tuple:
    """(workspace, {file: bytes or None}, rehash, log): one shard or the index mutated."""
    ws = spaces[_pick(draw, sorted(spaces))]
    log: list[str] = [ws.path.parent.name]
    kind = draw(st.sampled_from(("bytes", "structure", "structure", "index")))
    files: dict[str, bytes | None] = {}
    if kind == "index":
        index = json.loads(ws.pristine[checkpoint.INDEX])
        sub = draw(st.sampled_from(("tree", "evil", "bytes", "delete")))
        if sub == "tree":
            files[checkpoint.INDEX] = json.dumps(draw(_mutated_tree(
                index, log, ("weight_map",), ws.evil_names))).encode()
        elif sub == "evil":
            name = _pick(draw, sorted(index["weight_map"]))
            index["weight_map"][name] = evil = draw(ws.evil_names)
            log.append(f"weight_map[{name}] = {evil!r}")
            files[checkpoint.INDEX] = json.dumps(index).encode()
        elif sub == "bytes":
            files[checkpoint.INDEX] = draw(_mutated_bytes(ws.pristine[checkpoint.INDEX], log))
        else:
            shard = _pick(draw, ws.shards())
            files[shard] = None
            log.append(f"delete {shard}")
    else:
        shard = _pick(draw, ws.shards())
        strategy = _shard_bytes if kind == "bytes" else _shard_structure
        files[shard] = draw(strategy(ws, shard, log))
    rehash = draw(_USUALLY)
    return ws, files, rehash, log


def _read_safetensors(path: Path, changed: list[str]) -> None:
    """Every reader of safetensors on one input: the loader; the header-only view (names,
    shapes, sizes); and the single-file readers on each changed shard. The first
    CompressError is the outcome; any other exception escapes at once."""
    errors = []
    for read in (lambda: _load(path), lambda: _headers(path),
                 *[(lambda f=f: checkpoint.safetensors_keys(path / f)) for f in changed],
                 *[(lambda f=f: checkpoint.load_tensors(path / f)) for f in changed]):
        try:
            read()
        except CompressError as e:
            errors.append(e)
    if errors:
        raise next((e for e in errors if "\n" in str(e)), errors[0])


def _headers(path: Path) -> None:
    tensors = checkpoint.SafetensorsDir(path)
    for name in tensors.names():
        tensors.shape(name)
        tensors.nbytes(name)


def _run_safetensors(n: int, spaces: dict[str, Workspace]) -> None:
    tally = Tally("safetensors", "hypothesis" if n >= FULL else "hypothesis_smoke")

    def one(value):
        ws, files, rehash, log = value
        ws.apply(files, rehash)
        changed = [f for f, data in files.items() if data is not None and f in ws.shards()]
        tally.run(lambda: _read_safetensors(ws.path, changed), lambda: "; ".join(log))

    _fuzz(tally, _safetensors_input(spaces), n, one)


def test_fuzz_safetensors_smoke(workspaces):
    _run_safetensors(SMOKE, workspaces)


@pytest.mark.slow
def test_fuzz_safetensors(workspaces):
    _run_safetensors(FULL, workspaces)


# ----------------------------------------------------------------------- config.json


@st.composite
def _config_input(draw, spaces: dict[str, Workspace]) -> tuple:
    ws = spaces[_pick(draw, sorted(spaces))]
    log: list[str] = [ws.path.parent.name]
    raw = ws.pristine["config.json"]
    kind = draw(st.sampled_from(("tree", "tree", "tree", "bytes", "deep")))
    if kind == "tree":
        config = json.loads(raw)
        within = draw(st.sampled_from(((), ("quantization_config",))))
        data = json.dumps(draw(_mutated_tree(config, log, within))).encode()
    elif kind == "bytes":
        data = draw(_mutated_bytes(raw, log))
    else:
        depth = draw(st.sampled_from((100, 1_000, 100_000)))
        nested = _deeply_nested(b"[", b"]", depth)
        data = raw.replace(b'"ignore": [', b'"ignore": [' + nested + b",", 1)
        log.append(f"ignore nested {depth} deep")
    return ws, data, draw(_USUALLY), log


def _run_config(n: int, spaces: dict[str, Workspace]) -> None:
    tally = Tally("config.json", "hypothesis" if n >= FULL else "hypothesis_smoke")

    def one(value):
        ws, data, rehash, log = value
        ws.apply({"config.json": data}, rehash)
        tally.run(lambda: _load(ws.path), lambda: "; ".join(log))

    _fuzz(tally, _config_input(spaces), n, one)


def test_fuzz_config_smoke(workspaces):
    _run_config(SMOKE, workspaces)


@pytest.mark.slow
def test_fuzz_config(workspaces):
    _run_config(FULL, workspaces)


# ------------------------------------------------------------------------- manifest


# The fields besides `files` that readers index; an RTN checkpoint has no calibration, so
# inputs that mutate it start from this one (what a GPTQ run records).
_MANIFEST_FIELDS = ("recipe", "base_model", "library", "calibration", "format",
                    "format_version")
_CALIBRATION = {"source": "bundled calibration split", "text_sha256": "0" * 64,
                "tokens_sha256": "1" * 64, "samples": 8, "seqlen": 32}


@st.composite
def _manifest_input(draw, spaces: dict[str, Workspace]) -> tuple:
    ws = spaces[_pick(draw, sorted(spaces))]
    log: list[str] = [ws.path.parent.name]
    raw = ws.pristine[checkpoint.MANIFEST]
    manifest = json.loads(raw)
    kind = draw(st.sampled_from(("tree", "tree", "fields", "fields", "evil", "evil", "bytes",
                                 "deep")))
    evil = ws.evil_names
    if kind == "tree":
        data = json.dumps(draw(_mutated_tree(manifest, log, ("files",), evil))).encode()
    elif kind == "fields":  # one of the other fields: its inside, or the field itself
        name = _pick(draw, _MANIFEST_FIELDS)
        if name == "calibration":
            manifest[name] = copy.deepcopy(_CALIBRATION)
        if isinstance(manifest.get(name), dict | list) and draw(st.booleans()):
            manifest = draw(_mutated_tree(manifest, log, (name,)))
        elif draw(_USUALLY):
            manifest[name] = _nudge(draw, manifest.get(name))
            log.append(f"nudge {name} = {manifest[name]!r:.120}")
        else:
            manifest.pop(name, None)
            log.append(f"delete {name}")
        data = json.dumps(manifest).encode()
    elif kind == "evil":
        name = draw(evil)
        secret = ws.pristine_secret  # the right size and sha256: only opening it could tell
        options = [secret, {"bytes": 1, "sha256": "0"}, {}, None, [name], 0]
        entry = _pick(draw, options) if draw(st.booleans()) else draw(_JSON)
        if draw(st.booleans()):  # replace a real entry, or add one
            manifest["files"].pop(_pick(draw, sorted(manifest["files"])))
        manifest["files"][name] = entry
        log.append(f"files[{name!r}] = {entry!r:.100}")
        data = json.dumps(manifest).encode()
    elif kind == "bytes":
        data = draw(_mutated_bytes(raw, log))
    else:
        depth = draw(st.sampled_from((100, 1_000, 100_000)))
        data = _deeply_nested(b'{"files":', b"}", depth)
        log.append(f"files nested {depth} deep")
    return ws, data, log


def _offline_download(repo_id: str, revision: str | None = None):
    """hub.download in the fuzz: a base model name may look like a Hub id, and no input may
    reach the network (offline, the real one raises this CompressError too)."""
    raise CompressError(f"{repo_id} is not a local directory (fuzz: offline)")


def _use_manifest(path: Path) -> None:
    """open_model (read_manifest, verify), then every reader of the manifest's other fields."""
    files = models.open_model(path)
    evaluation.model_identity(files)
    evaluation.resolve_baseline(files, "auto")
    model_card.render(path)


def _run_manifest(n: int, spaces: dict[str, Workspace], monkeypatch) -> None:
    tally = Tally("manifest", "hypothesis" if n >= FULL else "hypothesis_smoke")
    monkeypatch.setattr(hub, "download", _offline_download)

    def one(value):
        ws, data, log = value
        ws.apply({checkpoint.MANIFEST: data})
        tally.run(lambda: _use_manifest(ws.path), lambda: "; ".join(log))

    _fuzz(tally, _manifest_input(spaces), n, one)


def test_fuzz_manifest_smoke(workspaces, monkeypatch):
    _run_manifest(SMOKE, workspaces, monkeypatch)


@pytest.mark.slow
def test_fuzz_manifest(workspaces, monkeypatch):
    _run_manifest(FULL, workspaces, monkeypatch)


# --------------------------------------------------------------------------- recipes

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
_MODULES = [f"model.layers.{i}.{n}" for i in range(2) for n in
            ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")] + ["lm_head"]
_YAML_SPECIAL = (
    b"method: rtn\nscheme: &s {bits: 4}\noverrides: [{pattern: a, <<: *s}]\n",
    b"a: &a [*a]\n", b"scheme: !!python/object/apply:os.system [echo]\n",
    b"scheme: !!binary aGVsbG8=\n", b"version: 2001-12-14\n", b"scheme: !!set {bits}\n",
    b"scheme: !!omap [bits: 4]\n", b"method: rtn\n---\nmethod: gptq\n", b"method: !!float nan\n",
    b"scheme: {bits: 1" + b"0" * 5000 + b"}\n", b"scheme: {bits: 0x4, group_size: 0o200}\n",
    b"scheme: {bits: 4.0, group_size: 1_28}\n", b"ignore: [*x]\n", b"? [a]\n: b\n",
    b"\xff\xfe m\x00e\x00", b"method: rtn\x00\n", b"\tmethod: rtn\n", b"{" * 200,
    b"gptq: {damp: .nan}\n", b"gptq: {damp: '0.1'}\n", b"awq: {max_shrink: .inf}\n",
    b"calibration: {samples: 1e3}\n", b"overrides: 5\n", b"overrides: {pattern: a}\n",
    b"ignore: [re:(]\n", b"ignore: ['re:" + b"(" * 1200 + b")" * 1200 + b"']\n",
    b"overrides: [{pattern: 're:a{99999999999999999999}', bits: 8}]\n",
    b"ignore: ['re:(?P<a>x)(?P<a>y)']\n", b"scheme: {1: 2, a: 3}\n",
    b"{1: 2, null: 3, true: 4}\n", b"", b"~\n", b"[]\n", b"'just a string'\n",
)


# The slots of a recipe with values that are valid, so that combinations get past the
# first check; a slot holds garbage instead 40% of the time.
_RECIPE_SLOTS = {
    "version": (1,), "method": ("rtn", "gptq", "awq", "awq+gptq"), "ignore": (["lm_head"], []),
    "scheme": {"bits": (2, 3, 4, 8), "group_size": (-1, 32, 64, 128), "symmetric": (True,
                                                                                  False)},
    "gptq": {"damp": (0.01, 0.1), "block_size": (64, 128), "act_order": (True, False),
             "static_groups": (True, False), "mse_clip": (True, False)},
    "awq": {"grid": (2, 20), "duo_scaling": (True, False), "clip": (True, False),
            "clip_grid": (2, 20), "max_shrink": (0.5, 1.0)},
    "calibration": {"samples": (1, 128), "seqlen": (2, 512), "seed": (0, 7)},
    "overrides": {"pattern": ("*.down_proj", "lm_head", "re:.*v_proj", "re:("), "bits": (4, 8),
                  "group_size": (-1, 32)},
}


def _recipe_document(rng: random.Random) -> dict:
    """A recipe-shaped mapping: sections present or not, each slot valid or garbage."""
    def slot(options: tuple) -> object:
        return rng.choice(options) if rng.random() < 0.6 else _garbage(rng, 2)

    def section(slots: dict) -> dict:
        return {k: slot(v) for k, v in slots.items() if rng.random() < 0.6}

    doc: dict = {}
    for key, slots in _RECIPE_SLOTS.items():
        if rng.random() < 0.5:
            continue
        if key == "overrides":
            doc[key] = [section(slots) for _ in range(rng.randrange(3))]
        elif isinstance(slots, dict):
            doc[key] = section(slots) if rng.random() < 0.8 else _garbage(rng)
        else:
            doc[key] = slot(slots)
    if rng.random() < 0.1:  # keys of any type
        doc[_garbage(rng, 3)] = _garbage(rng)
    return doc


_RECIPE_DOCUMENT = _SEED.map(lambda seed: _recipe_document(random.Random(seed)))


@st.composite
def _recipe_input(draw) -> tuple[bytes, list[str]]:
    log: list[str] = []
    kind = draw(st.sampled_from(("document", "any", "text", "special", "shipped-tree",
                                 "shipped-bytes")))
    if kind in ("document", "any"):
        doc = draw(_RECIPE_DOCUMENT if kind == "document" else _JSON)
        data = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()),
                              sort_keys=False).encode()
        log.append(f"{kind}: {doc!r:.300}")
    elif kind == "text":
        alphabet = [*"abmethodschemebits: -[]{},&*!|>'\"#?\n\t 0123456789.%@`re", "\u2028"]
        data = draw(st.text(alphabet=st.sampled_from(alphabet), max_size=120)).encode()
        log.append(f"text: {data!r}")
    elif kind == "special":
        data = draw(st.sampled_from(_YAML_SPECIAL))
        log.append(f"special: {data[:200]!r}")
    else:
        path = _pick(draw, RECIPES)
        log.append(path.name)
        raw = path.read_bytes()
        if kind == "shipped-tree":
            tree = draw(_mutated_tree(yaml.safe_load(raw), log))
            data = yaml.safe_dump(tree, sort_keys=False).encode()
        else:
            data = draw(_mutated_bytes(raw, log))
    return data, log


def _use_recipe(path: Path) -> None:
    """Parse, then what the CLI does with a recipe next: name modules, label, store it."""
    recipe = Recipe.from_yaml(path)
    for name in _MODULES:
        recipe.scheme_for(name)
    assert recipe.label
    again = path.with_name("again.yaml")
    again.write_text(recipe.to_yaml())  # what a checkpoint stores: the sections its method uses
    stored = recipe.to_dict()
    assert Recipe.from_yaml(again).to_dict() == stored, "the stored recipe reads back otherwise"


def _run_recipe(n: int) -> None:
    tally = Tally("recipe", "hypothesis" if n >= FULL else "hypothesis_smoke")
    tmp = Path(tempfile.mkdtemp(prefix="compress-fuzz-", dir=_memory_dir()))
    path = tmp / "recipe.yaml"

    def one(value):
        data, log = value
        path.write_bytes(data)
        tally.run(lambda: _use_recipe(path), lambda: "; ".join(log))

    try:
        _fuzz(tally, _recipe_input(), n, one)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_fuzz_recipe_smoke():
    _run_recipe(SMOKE)


@pytest.mark.slow
def test_fuzz_recipe():
    _run_recipe(FULL)


# ------------------------------------------------------------- the defects found, pinned


def _edit_json(name: str, edit: Callable[[object], object],
               replace: bool = False) -> Callable[[Workspace], dict]:
    """`name` edited in place by `edit`, or (`replace`) swapped for what `edit` returns."""
    def files(ws: Workspace) -> dict[str, bytes]:
        data = json.loads(ws.pristine[name])
        result = edit(data)
        return {name: json.dumps(result if replace else data).encode()}

    return files


def _edit_tensor(name: str, dtype: str | None = None, shape: list | None = None,
                 drop: bool = False, data: bytes | None = None) -> Callable[[Workspace], dict]:
    """A shard that safetensors accepts, with tensor `name` retyped, reshaped (new `data`)
    or dropped."""
    def files(ws: Workspace) -> dict[str, bytes]:
        shard = json.loads(ws.pristine[checkpoint.INDEX])["weight_map"][name]
        header, body = _split(ws.pristine[shard])
        tensors = [t for t in _tensors(header, body) if not (drop and t[0] == name)]
        for t in tensors:
            if t[0] == name:
                t[1], t[2] = dtype or t[1], t[2] if shape is None else shape
                t[3] = t[3] if data is None else data
        return {shard: _join(*_relayout(tensors, header.get("__metadata__")))}

    return files


def _edit_shard(tensor: str, edit: Callable[[dict], object]) -> Callable[[Workspace], dict]:
    """The shard holding `tensor`, its tensors (name -> torch.Tensor) edited by `edit`: a
    well-formed file whose tensors disagree with config.json."""
    def files(ws: Workspace) -> dict[str, bytes]:
        index = json.loads(ws.pristine[checkpoint.INDEX])
        shard = index["weight_map"][tensor]
        tensors = safetensors_load(ws.pristine[shard])
        edit(tensors)
        index["weight_map"].update(dict.fromkeys(tensors, shard))  # an added tensor listed
        return {shard: safetensors_save(tensors, metadata={"format": "pt"}),
                checkpoint.INDEX: json.dumps(index).encode()}

    return files


def _swap(a: str, b: str) -> Callable[[dict], None]:
    """Every packed tensor of module `a` swapped with `b`'s (each module self-consistent)."""
    def edit(tensors: dict) -> None:
        for suffix in ("weight_packed", "weight_scale", "weight_shape"):
            tensors[f"{a}.{suffix}"], tensors[f"{b}.{suffix}"] = (tensors[f"{b}.{suffix}"],
                                                                  tensors[f"{a}.{suffix}"])
    return edit


def _drop_last_row(module: str) -> Callable[[dict], None]:
    """Module's output truncated by a row, its weight_shape saying so (self-consistent)."""
    def edit(tensors: dict) -> None:
        for suffix in ("weight_packed", "weight_scale"):
            tensors[f"{module}.{suffix}"] = tensors[f"{module}.{suffix}"][:-1].clone()
        tensors[f"{module}.weight_shape"] = tensors[f"{module}.weight_shape"] - torch.tensor(
            [1, 0])
    return edit


def _bad_g_idx(module: str, in_features: int) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        g_idx = torch.zeros(in_features, dtype=torch.int32)
        g_idx[-1] = 1000
        tensors[f"{module}.weight_g_idx"] = g_idx
    return edit


def _weight_map(edit: Callable[[dict], object]) -> Callable[[Workspace], dict]:
    return _edit_json(checkpoint.INDEX, lambda index: edit(index["weight_map"]))


def _config(key: str, value: object) -> Callable[[Workspace], dict]:
    return _edit_json("config.json", lambda c: c.__setitem__(key, value))


def _quant(edit: Callable[[dict], object]) -> Callable[[Workspace], dict]:
    return _edit_json("config.json", lambda c: edit(c["quantization_config"]))


def _weights(key: str, value: object) -> Callable[[Workspace], dict]:
    return _quant(lambda q: q["config_groups"]["group_0"]["weights"].__setitem__(key, value))


def _manifest(edit: Callable[[dict], object]) -> Callable[[Workspace], dict]:
    return _edit_json(checkpoint.MANIFEST, edit)


def _deep(name: str) -> Callable[[Workspace], dict]:
    return lambda ws: {name: _deeply_nested(b"[", b"]", 100_000)}


_L0, _L1 = "model.layers.0.", "model.layers.1."
# (checkpoint, files to write (manifest entries then updated), what the CompressError says).
# Each of these ended in another exception (or a file opened outside the checkpoint) before.
FOUND = {
    "index-traversal": ("sym", _weight_map(lambda m: m.__setitem__(
        "lm_head.weight", f"../{SENTINEL_DIR}/secret")), r"names an unsafe file '\.\./"),
    "index-absolute": ("sym", _weight_map(lambda m: m.__setitem__(
        "lm_head.weight", "/etc/passwd")), r"unsafe file '/etc/passwd'"),
    "index-newline-name": ("sym", _weight_map(lambda m: m.__setitem__(
        "lm_head.weight", "a\nb")), r"unsafe file 'a\\nb'"),
    "index-not-a-map": ("sym", _edit_json(checkpoint.INDEX, lambda i: i.__setitem__(
        "weight_map", [1])), r"weight_map is not a mapping"),
    "index-value-not-str": ("sym", _weight_map(lambda m: m.__setitem__("lm_head.weight", 7)),
                            r"unsafe file 7"),
    "index-deep": ("sym", _deep(checkpoint.INDEX), r"not a valid safetensors index"),
    "index-names-absent-tensor": ("sym", _edit_tensor("lm_head.weight", drop=True),
                                  r"lm_head.weight .* does not contain|lm_head.weight.* could "
                                  "not be read"),
    "weight-shape-float": ("sym", _edit_tensor(_L0 + "mlp.up_proj.weight_shape", "F64"),
                           r"weight_shape is torch.float64 \(2,\), expected int64"),
    "weight-shape-2d": ("sym", _edit_tensor(_L0 + "mlp.up_proj.weight_shape", shape=[2, 1]),
                        r"weight_shape is torch.int64 \(2, 1\)"),
    "weight-shape-scalar": ("sym", _edit_tensor(_L0 + "mlp.up_proj.weight_shape", "BF16", [],
                                                data=b"\x00\x40"),
                            r"weight_shape is torch.bfloat16 \(\)"),
    "scale-int32": ("sym", _edit_tensor(_L1 + "mlp.up_proj.weight_scale", "I32"),
                    r"up_proj.weight_scale is torch.int32 \(160, 1\), expected float"),
    "header-text-newline": ("sym", _edit_tensor(_L0 + "mlp.up_proj.weight_shape", "X\nY"),
                            r"corrupt or truncated \(.*unknown variant `X Y`"),
    "dense-head-1d": ("sym", _edit_tensor("lm_head.weight", shape=[512 * 64]),
                      r"lm_head.weight has shape \(32768,\); expected a 2-D"),
    "embedding-1d": ("sym", _edit_tensor("model.embed_tokens.weight", shape=[512 * 64]),
                     r"embed_tokens.weight in .* is \(32768,\), but config.json implies "
                     r"\(512, 64\)"),
    "manifest-not-object": ("sym", _edit_json(checkpoint.MANIFEST, lambda m: [m], replace=True),
                            r"malformed \(not a JSON object"),
    "manifest-files-list": ("sym", _manifest(lambda m: m.__setitem__("files", [])),
                            r"'files' is not a mapping"),
    "manifest-entry-no-bytes": ("sym", _manifest(lambda m: m["files"]["config.json"].pop(
        "bytes")), r"entry of 'config.json' lacks an integer 'bytes'"),
    "manifest-entry-str": ("sym", _manifest(lambda m: m["files"].__setitem__(
        "config.json", "x")), r"entry of 'config.json' lacks"),
    "manifest-long-name": ("sym", _manifest(lambda m: m["files"].__setitem__(
        "a" * 300, {"bytes": 1, "sha256": "0"})), r"unsafe file 'aaaa"),
    "manifest-recipe-list": ("sym", _manifest(lambda m: m.__setitem__("recipe", [])),
                             r"malformed \(recipe must be a mapping"),
    "manifest-recipe-no-scheme": ("sym", _manifest(lambda m: m["recipe"].pop("scheme")),
                                  r"recipe lacks its method, or its scheme's bits"),
    "manifest-recipe-bits-str": ("sym", _manifest(lambda m: m["recipe"]["scheme"].__setitem__(
        "bits", "4")), r"malformed \(recipe: scheme: bits='4' is not supported"),
    "manifest-base-model-str": ("sym", _manifest(lambda m: m.__setitem__("base_model", "x")),
                                r"'base_model' lacks string name, path"),
    "manifest-base-path-null": ("sym", _manifest(lambda m: m["base_model"].__setitem__(
        "path", None)), r"'base_model' lacks string name, path"),
    "manifest-source-list": ("sym", _manifest(lambda m: m["base_model"].__setitem__(
        "source", [1])), r"'base_model.source' is not a mapping"),
    "manifest-no-library": ("sym", _manifest(lambda m: m.pop("library")),
                            r"'library' lacks the compress version"),
    "manifest-calibration-list": ("sym", _manifest(lambda m: m.__setitem__("calibration", [1])),
                                  r"'calibration' lacks string source"),
    "manifest-format-other": ("sym", _manifest(lambda m: m.__setitem__("format", "gguf")),
                              r"'format' is 'gguf', not 'compress-checkpoint'"),
    "manifest-format-version-str": ("sym", _manifest(lambda m: m.__setitem__(
        "format_version", "1")), r"'format_version' is '1', not a positive integer"),
    "manifest-format-version-newer": ("sym", _manifest(lambda m: m.__setitem__(
        "format_version", 2)), r"format_version 2, newer than this compress reads \(1\); "
        "upgrade compress"),
    "manifest-deep": ("sym", _deep(checkpoint.MANIFEST), r"compress_manifest.json is not valid "
                      "JSON"),
    "layer-1-swapped": ("sym", _edit_shard(_L1 + "mlp.down_proj.weight_packed", _swap(
        _L1 + "self_attn.k_proj", _L1 + "mlp.down_proj")), r"model.layers.1.self_attn.k_proj."
        r"weight_shape in .*model-00002-of-00003.safetensors says \(64, 160\), but config.json "
        r"implies \(32, 64\)"),
    "layer-1-truncated": ("sym", _edit_shard(_L1 + "mlp.up_proj.weight_packed", _drop_last_row(
        _L1 + "mlp.up_proj")), r"layers.1.mlp.up_proj.weight_shape .* says \(159, 64\), but "
        r"config.json implies \(160, 64\)"),
    "layer-1-norm-truncated": ("sym", _edit_shard(_L1 + "input_layernorm.weight", lambda t: (
        t.__setitem__(_L1 + "input_layernorm.weight", t[_L1 + "input_layernorm.weight"][:-1]
                      .clone()))), r"layers.1.input_layernorm.weight .* is \(63,\), but "
        r"config.json implies \(64,\)"),
    "g-idx-out-of-range": ("sym", _edit_shard(_L1 + "mlp.up_proj.weight_packed", _bad_g_idx(
        _L1 + "mlp.up_proj", 64)), r"layers.1.mlp.up_proj.weight_g_idx holds groups outside "
        r"0\.\.0"),
    # Bit flips that keep the file well-formed but put NaN/Inf where a forward multiplies:
    # these loaded and produced NaN logits (found by the forward added to the fuzz).
    "scale-nan": ("sym", _edit_shard(_L1 + "mlp.up_proj.weight_scale", lambda t: t[
        _L1 + "mlp.up_proj.weight_scale"].view(-1)[3:4].fill_(float("nan"))),
        r"layers.1.mlp.up_proj.weight_scale holds NaN/Inf values: the checkpoint is corrupt"),
    "scale-huge": ("sym", _edit_shard(_L1 + "mlp.up_proj.weight_scale", lambda t: t[
        _L1 + "mlp.up_proj.weight_scale"].view(-1)[:1].fill_(3e4)),
        r"up_proj.weight_scale holds 3e\+04: its dequantised weights would exceed float16"),
    "norm-inf": ("sym", _edit_shard(_L1 + "input_layernorm.weight", lambda t: t[
        _L1 + "input_layernorm.weight"][:2].fill_(float("inf"))),
        r"layers.1.input_layernorm.weight holds 2 NaN/Inf values: the model is corrupt"),
    "config-deep": ("sym", _deep("config.json"), r"config.json is not valid JSON"),
    "layers-huge": ("sym", _config("num_hidden_layers", 10**18),
                    r"says 1000000000000000000 layers, but the weights have no"),
    "layers-bool": ("sym", _config("num_hidden_layers", True), r"positive integer "
                    r"'num_hidden_layers' \(it has True\)"),
    "head-dim-negative": ("sym", _config("head_dim", -2), r"head_dim=-2; expected a positive"),
    "head-dim-huge": ("sym", _config("head_dim", 10**18), r"does not match its weights"),
    "kv-heads-list": ("sym", _config("num_key_value_heads", [2]), r"num_key_value_heads=\[2\]"),
    "eps-string": ("sym", _config("rms_norm_eps", "1e-05"), r"rms_norm_eps='1e-05'"),
    "rope-theta-null": ("sym", _edit_json("config.json", lambda c: c["rope_parameters"].update(
        rope_theta=None)), r"rope_theta=None; expected a number above 1"),
    "rope-type-list": ("asym", _edit_json("config.json", lambda c: c["rope_parameters"].update(
        rope_type=["default"])), r"rope_parameters that are not a mapping with a string"),
    "rope-llama3-no-factor": ("sym", _edit_json("config.json", lambda c: c.__setitem__(
        "rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5})),
        r"rejected by transformers \(KeyError: .Missing required keys"),
    "transformers-strict-field": ("sym", _config("tie_word_embeddings", []),
                                  r"rejected by transformers \(StrictDataclass"),
    "transformers-dtype-list": ("sym", _config("dtype", []), r"rejected by transformers"),
    "quantization-config-list": ("sym", _config("quantization_config", [1]),
                                 r"quantization_config is a list, not a mapping"),
    "groups-list": ("sym", _quant(lambda q: q.__setitem__("config_groups", [1])),
                    r"config_groups is not a mapping"),
    "weights-list": ("sym", _quant(lambda q: q["config_groups"]["group_0"].__setitem__(
        "weights", [])), r"group 'group_0' is malformed \(no 'weights' mapping"),
    "targets-not-str": ("asym", _quant(lambda q: q["config_groups"]["group_1"].__setitem__(
        "targets", [[True, 1]])), r"targets must be a list of module names"),
    "ignore-bad-regex": ("sym", _quant(lambda q: q.__setitem__("ignore", ["re:("])),
                         r"ignore has a bad regex 're:\('"),
    "ignore-deep-regex": ("sym", _quant(lambda q: q.__setitem__(
        "ignore", ["re:" + "(" * 1200 + ")" * 1200])), r"ignore has a bad regex"),
    "bits-float": ("sym", _weights("num_bits", 4.0), r"malformed \(bits=4.0 is not supported"),
    "symmetric-string": ("sym", _weights("symmetric", "false"), r"symmetric must be true or "
                         "false, got 'false'"),
    "strategy-unknown": ("sym", _weights("strategy", "tensor"), r"weight strategy 'tensor' is "
                         "not supported"),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_found_defects_in_checkpoints(case, workspaces):
    space, files, message = FOUND[case]
    ws = workspaces[space]
    ws.apply(files(ws), rehash=checkpoint.MANIFEST not in files(ws))
    try:
        _OPENED_OUTSIDE.clear()
        _WATCHING[0] = True
        with _memory_cap(), pytest.raises(CompressError, match=message) as raised:
            _read_safetensors(ws.path, [])
        assert "\n" not in str(raised.value)
        assert not _OPENED_OUTSIDE, f"opened {_OPENED_OUTSIDE[0]}"
    finally:
        _WATCHING[0] = False
        ws.reset()


RECIPE_FOUND = {
    "not-utf8": (b"\xff\xfe m\x00e\x00", r"is not valid YAML \('utf-8' codec"),
    "deep": (b"[" * 10_000, r"is not valid YAML"),
    "huge-int": (b"scheme: {bits: 1" + b"0" * 5000 + b"}", r"is not valid YAML \(Exceeds"),
    "mixed-type-keys": (b"{1: 2, null: 3, a: 4}", r"unknown keys \[1, None, 'a'\]"),
    "section-mixed-keys": (b"scheme: {1: 2, a: 3}", r"scheme: unknown keys \[1, 'a'\]"),
    "overrides-int": (b"overrides: 5", r"overrides must be a list"),
    "damp-string": (b"method: gptq\ngptq: {damp: '0.1'}", r"GPTQ damp must be in \(0, 1\), "
                    "got '0.1'"),
    "bits-float": (b"scheme: {bits: 4.0}", r"bits=4.0 is not supported"),
    "deep-regex": (b"ignore: ['re:" + b"(" * 1200 + b")" * 1200 + b"']", r"bad regex"),
    "huge-repeat-regex": (b"ignore: ['re:a{99999999999999999999}']", r"bad regex"),
}


@pytest.mark.parametrize("case", sorted(RECIPE_FOUND))
def test_found_defects_in_recipes(case, tmp_path):
    data, message = RECIPE_FOUND[case]
    (tmp_path / "r.yaml").write_bytes(data)
    with _memory_cap(), pytest.raises(CompressError, match=message) as raised:
        Recipe.from_yaml(tmp_path / "r.yaml")
    assert "\n" not in str(raised.value)


# --------------------------------------------------------------------------- atheris

ATHERIS_RUNS = 5_000  # per parser, on top of hypothesis' 10,000
PARSERS = ("safetensors", "config.json", "manifest", "recipe")
# The child imports compress with coverage instrumentation (atheris needs it at import),
# then runs `atheris_main` from this file.
_ATHERIS_BOOT = """
import sys
import atheris
with atheris.instrument_imports(include=["compress", "yaml"]):
    import compress.models, compress.recipe
sys.path[:0] = sys.argv[1:3]
del sys.argv[1:3]
import test_fuzz
test_fuzz.atheris_main(sys.argv[1:])
"""


def atheris_main(argv: list[str]) -> None:
    """The child process of `test_fuzz_atheris`: libFuzzer mutates bytes (coverage-guided,
    from a corpus of the real files) and feeds them to one parser. The tally is rewritten
    after every input, as libFuzzer ends the process without Python's clean-up."""
    import atheris

    parser, out, sources, flags = argv[0], Path(argv[1]), json.loads(argv[2]), argv[3:]
    checkpoint.safe_open = _watched(checkpoint.safe_open)
    hub.download = _offline_download
    spaces = {name: Workspace(Path(src), out / "work" / name / "ckpt")
              for name, src in sources.items()}
    ws = spaces["sym" if parser in ("safetensors", "manifest") else "asym"]
    shard, recipe = ws.shards()[0], out / "recipe.yaml"
    tally = Tally(parser, "atheris", time_limit=False)

    def one(data: bytes) -> None:
        if parser == "safetensors":
            ws.apply({shard: data}, rehash=True)
            tally.run(lambda: _read_safetensors(ws.path, [shard]), lambda: repr(data[:300]))
        elif parser == "config.json":
            ws.apply({"config.json": data}, rehash=True)
            tally.run(lambda: _load(ws.path), lambda: repr(data[:300]))
        elif parser == "manifest":
            ws.apply({checkpoint.MANIFEST: data})
            tally.run(lambda: _use_manifest(ws.path), lambda: repr(data[:300]))
        else:
            recipe.write_bytes(data)
            tally.run(lambda: _use_recipe(recipe), lambda: repr(data[:300]))
        tally.seconds = time.perf_counter() - tally.started
        report = out / "tally.json"
        report.with_suffix(".tmp").write_text(json.dumps({**tally.summary(),
                                                          "examples": tally.examples}))
        os.replace(report.with_suffix(".tmp"), report)

    atheris.Setup([sys.argv[0], *flags], one)
    with _memory_cap():  # libFuzzer's -rss_limit_mb looks once a second: too late for 1e18
        atheris.Fuzz()


def _seeds(parser: str, spaces: dict[str, Workspace]) -> list[bytes]:
    if parser == "safetensors":
        return [spaces["sym"].pristine[spaces["sym"].shards()[0]]]
    if parser == "recipe":
        return [path.read_bytes() for path in RECIPES]
    name = "config.json" if parser == "config.json" else checkpoint.MANIFEST
    return [ws.pristine[name] for ws in spaces.values()]


@pytest.mark.slow
@pytest.mark.parametrize("parser", PARSERS)
def test_fuzz_atheris(parser, workspaces):
    pytest.importorskip("atheris", reason="atheris is optional (pip install atheris); "
                        "the coverage-guided runs are skipped, hypothesis' are not")
    out = Path(tempfile.mkdtemp(prefix="compress-atheris-", dir=_memory_dir()))
    try:
        corpus = out / "corpus"
        corpus.mkdir()
        seeds = _seeds(parser, workspaces)
        for i, seed in enumerate(seeds):
            (corpus / f"seed-{i}").write_bytes(seed)
        sources = json.dumps({name: str(ws.source) for name, ws in workspaces.items()})
        here = Path(__file__).resolve().parent
        command = [sys.executable, "-c", _ATHERIS_BOOT, str(here.parent), str(here), parser,
                   str(out), sources, f"-runs={ATHERIS_RUNS}", "-seed=1",
                   f"-timeout={PER_INPUT_S:.0f}", "-rss_limit_mb=4096",
                   f"-max_len={max(map(len, seeds)) + 4096}", f"-artifact_prefix={out}/",
                   str(corpus)]
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
        done = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=120 + ATHERIS_RUNS * 0.1)
        report = out / "tally.json"
        assert done.returncode == 0 and report.is_file(), (
            f"atheris run of {parser} failed (rc {done.returncode}; a timeout, crash or "
            f"out-of-memory in libFuzzer's words):\n{done.stderr[-3000:]}")
        counts = json.loads(report.read_text())
        tally = Tally(parser, "atheris", examples=counts.pop("examples"),
                      **{k: v for k, v in counts.items() if k != "seconds"})
        tally.seconds = counts["seconds"]
        tally.finish(ATHERIS_RUNS)
    finally:
        shutil.rmtree(out, ignore_errors=True)
