"""`compress push` and loading from a Hub id, with the real huggingface_hub client against a
real HTTP server on loopback (tests/hub_server.py): round trip to identical logits,
verification, auth and conflict errors, retries and resumable pushes, offline loading."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from hub_server import HUB_TOKEN
from huggingface_hub import constants, snapshot_download

from compress import api as compress_api
from compress import hub as compress_hub
from compress import model_card, models, sources
from compress.errors import CompressError
from compress.quant import QuantScheme
from compress.recipe import Override, Recipe

REPO = "test-user/tiny-w4"
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture(scope="module")
def checkpoint(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("push") / "tiny-w4"
    compress_api.quantize(tiny_llama, Recipe("rtn", QuantScheme(4, 32)), out, evaluate=False)
    return out


def _push(directory, hub_server, **kwargs):
    return compress_hub.push(directory, REPO, token=HUB_TOKEN, endpoint=hub_server.endpoint,
                             **kwargs)


def _logits(path):
    model = models.load(path, dtype=torch.float32, head_dtype=torch.float32)[0]
    with torch.no_grad():
        return model(torch.arange(1, 33).unsqueeze(0))


def _lfs_puts(hub_server):
    return [p for m, p in hub_server.requests if m == "PUT" and "/_lfs/" in p]


def test_push_download_and_load_give_identical_logits(checkpoint, hub, tmp_path):
    result = _push(checkpoint, hub)
    assert result.commit and re.fullmatch(r"[0-9a-f]{40}", result.commit)
    remote = hub.remote_files(REPO)
    assert set(remote) == {f.path for f in result.files} | {".gitattributes"}
    assert "model.safetensors.index.json" in remote and "README.md" in remote
    local = snapshot_download(REPO, endpoint=hub.endpoint, cache_dir=tmp_path / "dl")
    torch.testing.assert_close(_logits(local), _logits(checkpoint), rtol=0, atol=0)
    # the same through a Hub id, then offline from the client's cache
    by_id = sources.resolve(REPO)[0]
    assert by_id.is_dir() and (by_id / "model.safetensors.index.json").is_file()
    before = len(hub.requests)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        assert sources.resolve(REPO)[0] == by_id
    assert len(hub.requests) == before
    torch.testing.assert_close(_logits(by_id), _logits(checkpoint), rtol=0, atol=0)


def test_model_card_follows_hub_conventions(checkpoint, tmp_path):
    evals = {"schema_version": 1, "ppl": 51.2, "baseline_ppl": 50.0, "kl_mean": 0.0123,
             "top1_agreement": 0.91, "tokens": 4096, "ctx": 512, "text_sha256": "ab" * 32,
             "tasks": {"compress_arc_easy": {"quantised": {"acc": 0.41},
                                             "baseline": {"acc": 0.43}}}}
    (tmp_path / "eval.json").write_text(json.dumps(evals))
    card = model_card.render(checkpoint, REPO, eval_json=tmp_path / "eval.json",
                             base_model="org/base-model")
    front, body = re.match(r"---\n(.*?)\n---\n(.*)", card, re.S).groups()
    meta = yaml.safe_load(front)
    assert meta["base_model"] == "org/base-model" and meta["pipeline_tag"] == "text-generation"
    assert {"compressed-tensors", "rtn", "4-bit"} <= set(meta["tags"])
    [entry] = meta["model-index"]
    metrics = {m["type"]: m["value"] for r in entry["results"] for m in r["metrics"]}
    assert metrics["perplexity"] == 51.2 and metrics["kl_divergence"] == 0.0123
    assert metrics["acc"] == 0.41
    assert f'from_pretrained("{REPO}")' in body and f"vllm serve {REPO}" in body
    assert "| arc_easy acc | 0.43 | 0.41 | -0.02 |" in body
    assert "group_size: 32" in body  # the recipe
    report = tmp_path / "report"
    report.mkdir()
    (report / "results.json").write_text(json.dumps({"recommended": "rtn-w4g32", "rows": [
        {"label": "rtn-w4g32", "bits_per_weight": 4.5, "checkpoint_bytes": 2_000_000,
         "delta_ppl": 1.2, "kl_mean": 0.0123, "decode_tok_s": 99.0}]}))
    with_report = model_card.render(checkpoint, REPO, report_dir=report)
    assert "| rtn-w4g32 | 4.50 | 2.0 | +1.200 | 0.0123 | 99.0 |" in with_report
    assert "model-index" not in with_report  # no eval JSON: no results claimed


def test_model_card_states_rotation_and_learned_rounding(checkpoint, tiny_llama, tmp_path):
    from compress.quant.rotate import RotationConfig
    from compress.quant.signround import SignRoundConfig
    from compress.recipe import CalibrationConfig

    plain = model_card.render(checkpoint, REPO)
    assert "Rotation" not in plain and "Learned rounding" not in plain
    assert "hadamard-rotation" not in plain
    out = tmp_path / "rotated-signround"
    recipe = Recipe("signround", QuantScheme(4, 32), rotate=RotationConfig("hadamard", 5),
                    calibration=CalibrationConfig(samples=8, seqlen=64),
                    signround=SignRoundConfig(iters=2, batch=4))
    compress_api.quantize(tiny_llama, recipe, out, evaluate=False)
    card = model_card.render(out, REPO)
    meta = yaml.safe_load(card.split("---")[1])
    assert {"signround", "hadamard-rotation", "4-bit"} <= set(meta["tags"])
    assert "SignRound (learned rounding), W4 g32" in card and "after Hadamard rotations" in card
    rotation = json.loads((out / "compress_manifest.json").read_text())["rotation"]
    assert (f"- Rotation (`compress quantize --rotate`): seeded randomised Hadamard rotations "
            f"folded into the weights before quantising, seed 5: the residual stream by a "
            f"64 × 64 matrix ({rotation['residual']['construction']}) and each attention "
            f"head's values by a 16 × 16 one ({rotation['heads']['construction']}).") in card
    assert ("- Learned rounding (SignRound): each weight's rounding direction and each "
            "group's range learned per decoder layer by signed gradient descent against the "
            "unquantised model's output of that layer on the calibration data: 2 steps of 4 "
            "samples, step size 1/2 decaying to 0.") in card


def test_model_card_says_when_the_residual_stream_was_not_rotated(tiny_factory, tmp_path):
    from conftest import ARCH_CASES

    from compress.quant.rotate import RotationConfig

    src = tiny_factory("gemma3_text", **ARCH_CASES["gemma3_text"])
    out = tmp_path / "rotated"
    compress_api.quantize(src, Recipe("rtn", QuantScheme(8, 16),
                                      rotate=RotationConfig("hadamard")), out, evaluate=False)
    card = model_card.render(out, REPO)
    assert re.search(r"seed 0: each attention head's values by a 16 × 16 matrix \(Hadamard "
                     r"16 = [^)]*\); residual stream not rotated: gemma3's", card), card


@pytest.mark.parametrize("model", ["tiny-stand-in",
                                   pytest.param("bundled", marks=pytest.mark.slow)])
def test_bundled_base_model_and_license_reach_the_card(model, bundled_dir, tiny_llama, tmp_path,
                                                       monkeypatch):
    if model == "tiny-stand-in":  # the tiny model in the bundled one's place, with its record
        import shutil

        from compress import assets

        stand_in = tmp_path / "stand-in"
        shutil.copytree(tiny_llama, stand_in)
        shutil.copyfile(bundled_dir / "compress_source.json", stand_in / "compress_source.json")
        monkeypatch.setattr(assets, "bundled_model_dir", lambda *a, **k: stand_in)
    out = tmp_path / "w8"
    compress_api.quantize(None, Recipe("rtn", QuantScheme(8, -1)), out, evaluate=False)
    meta = yaml.safe_load(model_card.render(out).split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0" and "8-bit" in meta["tags"]


def test_wrong_token_is_one_line_and_never_shown(checkpoint, hub):
    with pytest.raises(CompressError, match=r"refused the token \(HTTP 401\)") as e:
        compress_hub.push(checkpoint, REPO, token="hf_wrong_secret", endpoint=hub.endpoint)
    assert "hf_wrong_secret" not in str(e.value) and "\n" not in str(e.value)


def test_existing_repo_needs_exist_ok(checkpoint, hub, api):
    api.create_repo(REPO)
    with pytest.raises(CompressError, match=r"already exists; pass --exist-ok"):
        _push(checkpoint, hub)
    _push(checkpoint, hub, exist_ok=True)


def test_push_to_a_branch(checkpoint, hub):
    result = _push(checkpoint, hub, revision="w4-variant")
    assert result.revision == "w4-variant"
    assert "model.safetensors.index.json" in hub.remote_files(REPO, "w4-variant")
    assert set(hub.remote_files(REPO, "main")) == {".gitattributes"}


def test_server_errors_are_retried(checkpoint, hub, no_backoff_sleep):
    # more failures than the client's own retries: our retry runs the upload again
    hub.fail_next("PUT", r"/_lfs/", times=6)
    _push(checkpoint, hub)
    assert "model.safetensors.index.json" in hub.remote_files(REPO)


def test_interrupted_push_resumes_uploading_only_what_is_missing(checkpoint, hub,
                                                                 no_backoff_sleep):
    hub.fail_next("POST", r"/api/models/.*/commit/", times=compress_hub.ATTEMPTS,
                  drop_connection=True)
    with pytest.raises(CompressError, match=r"failed after 3 attempts.*re-run the same"):
        _push(checkpoint, hub)
    stored = len(_lfs_puts(hub))
    assert stored >= 1 and "model.safetensors" not in hub.remote_files(REPO)
    _push(checkpoint, hub, exist_ok=True)
    assert len(_lfs_puts(hub)) == stored  # the LFS objects were not sent again
    assert "model.safetensors.index.json" in hub.remote_files(REPO)


def test_verification_catches_a_remote_that_differs(checkpoint, hub, api):
    result = _push(checkpoint, hub)
    api.upload_file(path_or_fileobj=b'{"changed": true}', path_in_repo="config.json",
                    repo_id=REPO)
    with pytest.raises(CompressError, match=r"does not match the local checkpoint: "
                                            r"config.json content differs"):
        compress_hub.verify_remote(api, REPO, "main", checkpoint, result.files)
    api.upload_file(path_or_fileobj=b"stray", path_in_repo="notes.txt", repo_id=REPO)
    with pytest.raises(CompressError, match=r"notes.txt is on the remote but not in"):
        compress_hub.verify_remote(api, REPO, "main", checkpoint,
                                   [f for f in result.files if f.path != "config.json"])


def _cli(*args, env=None):
    full = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # CLI default
    full.update({"COMPRESS_OFFLINE": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "compress.cli", *map(str, args)],
                          capture_output=True, text=True, env=full, timeout=300)


def _cli_in_process(*args, env=None):
    """`_cli` through compress.cli.main in this process, where the `hub` fixture has pointed
    the client at the test server already (HF_HUB_OFFLINE unset, as the CLI's default)."""
    from conftest import cli_in_process

    return cli_in_process(*args, env={"HF_HUB_OFFLINE": None, **(env or {})})


HUB_CLI_MODES = [pytest.param(_cli_in_process, id="in-process"),
                 pytest.param(_cli, id="subprocess", marks=pytest.mark.slow)]


@pytest.mark.parametrize("cli", HUB_CLI_MODES)
def test_cli_dry_run_lists_files_and_sends_nothing(cli, checkpoint, hub):
    proc = cli("push", checkpoint, "--repo", REPO, "--dry-run",
                env={"HF_ENDPOINT": hub.endpoint})
    assert proc.returncode == 0, proc.stderr
    shard = sorted(checkpoint.glob("*.safetensors"))[-1]
    assert shard.name in proc.stdout and f"{shard.stat().st_size:,}" in proc.stdout
    assert "nothing sent" in proc.stdout and hub.requests == []
    assert "## How to load it" in proc.stdout  # the card it would send, shown


def test_dry_run_writes_nothing_into_the_checkpoint(tiny_llama, tmp_path):
    out = tmp_path / "w4"
    compress_api.quantize(tiny_llama, Recipe("rtn", QuantScheme(4, 32)), out, evaluate=False)
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    result = compress_hub.push(out, REPO, dry_run=True)
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before
    [card] = [f for f in result.files if f.path == "README.md"]
    assert card.size == len(result.card.encode()) and "# w4" in result.card


@pytest.mark.parametrize("recipe,schemes,fitted", [
    # hidden size 64 and intermediate 160: groups of 128 shrink to 64 and 32
    (Recipe("rtn", QuantScheme(4, 128)), "W4 g64 × 12 Linears, W4 g32 × 2 Linears",
     "- The recipe asks for groups of 128; 12 Linears whose input size it does not divide "
     "use 64; 2 Linears whose input size it does not divide use 32."),
    (Recipe("rtn", QuantScheme(4, 32)), "W4 g32 (all 14 quantised Linears)", None),
    (Recipe("rtn", QuantScheme(4, 32), overrides=(
        Override("model.layers.0.mlp.down_proj", QuantScheme(8, -1, False)),)),
     "W4 g32 × 13 Linears, W8 per-channel asym × 1 Linear", None),
])
def test_model_card_names_the_schemes_the_linears_got(tiny_llama, tmp_path, recipe, schemes,
                                                      fitted):
    out = tmp_path / "q"
    compress_api.quantize(tiny_llama, recipe, out, evaluate=False)
    card = model_card.render(out)
    assert f"RTN, {schemes}" in card and f"- Method: `rtn`; {schemes};" in card
    assert (fitted in card) if fitted else "The recipe asks for groups" not in card


@pytest.mark.parametrize("cli", HUB_CLI_MODES)
def test_cli_push_with_a_bad_token(cli, checkpoint, hub, tmp_path):
    env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_cli_secret", "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_CACHE": str(tmp_path / "c"), "NO_PROXY": "127.0.0.1"}
    proc = cli("push", checkpoint, "--repo", REPO, env=env)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "HTTP 401" in lines[0]
    assert "hf_cli_secret" not in proc.stdout + proc.stderr


# Four CLI subprocesses: slow. By default the API round trip (push, load by id, offline
# from the cache) above and the two in-process CLI tests before cover it.
@pytest.mark.slow
def test_cli_push_and_generate_from_the_hub_id(checkpoint, hub, tmp_path):
    env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": HUB_TOKEN, "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_CACHE": str(tmp_path / "c"), "NO_PROXY": "127.0.0.1"}
    proc = _cli("push", checkpoint, "--repo", REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "remote hashes verified" in proc.stdout and HUB_TOKEN not in proc.stdout
    args = ("generate", REPO, "--prompt", "Hello", "--max-new-tokens", "4")
    online = _cli(*args, env=env)
    assert online.returncode == 0, online.stderr
    served = len(hub.requests)
    offline = _cli(*args, env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == online.stdout and len(hub.requests) == served
    missing = _cli("generate", "test-user/never-pushed", "--prompt", "x",
                   env={**env, "HF_HUB_OFFLINE": "1"})
    assert missing.returncode == 2 and "nor in the Hugging Face cache" in missing.stderr


def test_a_listing_with_escaping_file_names_is_refused(checkpoint, hub):
    _push(checkpoint, hub)
    # a hostile server: the tree of main gains an entry pointing outside the snapshot
    repo = hub._repos["models/" + REPO]
    tree = repo["commits"][repo["branches"]["main"]]["tree"]
    tree["../../escaped.json"] = dict(tree["config.json"])
    with pytest.raises(CompressError, match=r"escape the download folder \('\.\./\.\./"):
        sources.resolve(REPO)
    assert not any(p.name == "escaped.json" for p in hub.root.parent.rglob("escaped.json"))


@pytest.mark.parametrize("name,safe", [
    ("model.safetensors", True), ("sub/dir/x.json", True), ("../x", False),
    ("a/../../x", False), ("/etc/passwd", False), ("C:x", False), ("a\\..\\x", False),
    ("", False), ("a//b", False)])
def test_safe_relative_names(name, safe):
    assert compress_hub.is_safe_relative(name) is safe


def test_bundled_gemma_terms_map_to_the_hub_license_id(tmp_path):
    base = {"source": {"license": "Gemma Terms of Use"}, "path": str(tmp_path)}
    assert model_card._license(base, tmp_path) == "gemma"
