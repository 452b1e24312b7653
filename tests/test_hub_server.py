"""The real huggingface_hub client against tests/hub_server.py: pushes, listings, downloads, auth
and fault injection behave as on the Hub, so push tests built on FakeHub mean something."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hub_server import FakeHub
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

REPO = "test-user/tiny"
# The client itself PUTs LFS objects with httpx2's deprecated `data=<file>`.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def model_files() -> dict[str, bytes]:
    return {"model.safetensors": os.urandom(12 * 1024 * 1024),
            "config.json": b'{"model_type": "llama", "hidden_size": 64}\n',
            "sub/x.txt": b"nested\n"}


def puts(hub: FakeHub, since: int = 0) -> list[str]:
    """sha256 of each LFS upload request (failed ones included) after request #since."""
    return [p.rsplit("/", 1)[1] for m, p in hub.requests[since:] if m == "PUT"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_push_list_and_download_round_trip(hub, api, tmp_path, monkeypatch):
    files = model_files()
    folder = write_files(tmp_path / "model", files)
    api.create_repo(REPO)
    info = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="push")
    assert len(info.oid) == 40 and info.commit_url.startswith(hub.endpoint)

    # A Hub repo starts with .gitattributes; everything else is exactly what was pushed.
    assert set(api.list_repo_files(REPO)) == set(files) | {".gitattributes"}
    remote = hub.remote_files(REPO)
    assert b"*.safetensors filter=lfs" in remote.pop(".gitattributes") and remote == files
    assert puts(hub) == [sha256(files["model.safetensors"])]  # only the LFS file went by PUT
    assert not any("xet" in path for _, path in hub.requests)

    tree = {f.path: f for f in api.list_repo_tree(REPO, recursive=True)}
    assert set(tree) == set(files) | {".gitattributes", "sub"}
    weights = tree["model.safetensors"]
    assert weights.lfs.sha256 == sha256(files["model.safetensors"])
    assert weights.lfs.size == weights.size == len(files["model.safetensors"])
    assert tree["config.json"].lfs is None
    git_blob = b"blob %d\0" % len(files["config.json"]) + files["config.json"]
    assert tree["config.json"].blob_id == hashlib.sha1(git_blob).hexdigest()
    assert [f.path for f in api.list_repo_tree(REPO, path_in_repo="sub")] == ["sub/x.txt"]
    paths = api.get_paths_info(REPO, ["model.safetensors", "sub", "missing.bin"])
    assert [p.path for p in paths] == ["model.safetensors", "sub"]
    assert paths[0].lfs.sha256 == weights.lfs.sha256 and paths[0].blob_id == weights.blob_id

    model = api.model_info(REPO, files_metadata=True)
    assert model.sha == info.oid and model.private is False
    siblings = {s.rfilename: s for s in model.siblings}
    assert siblings["model.safetensors"].lfs.sha256 == weights.lfs.sha256

    # Pushing the same folder again is a no-op: preupload reports the remote oids.
    before = len(hub.requests)
    assert api.upload_folder(repo_id=REPO, folder_path=folder).oid == info.oid
    assert puts(hub, before) == [] and not any("/commit/" in p for _, p in hub.requests[before:])

    cache = tmp_path / "fresh-cache"
    local = Path(snapshot_download(REPO, endpoint=hub.endpoint, cache_dir=cache))
    assert local.name == info.oid
    for name, data in files.items():
        assert (local / name).read_bytes() == data
    single = hf_hub_download(REPO, "sub/x.txt", endpoint=hub.endpoint, cache_dir=tmp_path / "c2")
    assert Path(single).read_bytes() == files["sub/x.txt"]

    # Offline: the cache answers and the server hears nothing.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.requests)
    again = Path(snapshot_download(REPO, endpoint=hub.endpoint, cache_dir=cache))
    assert again == local and (again / "model.safetensors").read_bytes() == files[
        "model.safetensors"]
    assert len(hub.requests) == before


def test_tokens_and_repo_conflicts(hub, api, tmp_path):
    assert api.whoami()["name"] == hub.user
    bad = HfApi(endpoint=hub.endpoint, token="hf_wrong")
    for call in (bad.whoami, lambda: bad.create_repo("test-user/other")):
        with pytest.raises(HfHubHTTPError) as err:
            call()
        assert err.value.response.status_code == 401
        assert not isinstance(err.value, RepositoryNotFoundError)

    api.create_repo(REPO, private=True)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    assert api.model_info(REPO).private is True
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("test-user/missing")
    folder = write_files(tmp_path / "m", {"a.txt": b"a"})
    with pytest.raises(HfHubHTTPError) as err:
        bad.upload_folder(repo_id=REPO, folder_path=folder)
    assert err.value.response.status_code == 401
    assert set(api.list_repo_files(REPO)) == {".gitattributes"}


@pytest.mark.parametrize("fault", [dict(status=500), dict(drop_connection=True)],
                         ids=["500", "dropped"])
def test_transient_lfs_put_failure_is_retried(hub, api, tmp_path, no_backoff_sleep, fault):
    files = {"model.safetensors": os.urandom(1 << 20), "config.json": b"{}"}
    api.create_repo(REPO)
    hub.fail_next("PUT", r"^/_lfs/", **fault)
    api.upload_folder(repo_id=REPO, folder_path=write_files(tmp_path / "m", files))
    assert puts(hub) == [sha256(files["model.safetensors"])] * 2
    assert {k: v for k, v in hub.remote_files(REPO).items() if k in files} == files


def test_interrupted_push_resumes_with_missing_objects_only(hub, api, tmp_path, no_backoff_sleep):
    files = model_files() | {"extra.safetensors": os.urandom(4096)}
    big, extra = sha256(files["model.safetensors"]), sha256(files["extra.safetensors"])
    folder = write_files(tmp_path / "model", files)
    api.create_repo(REPO)
    hub.fail_next("PUT", extra, times=6, status=500)  # the first try and all 5 retries
    with pytest.raises((RuntimeError, HfHubHTTPError)):
        api.upload_folder(repo_id=REPO, folder_path=folder)
    assert puts(hub).count(extra) == 6 and puts(hub).count(big) == 1
    assert hub.lfs_objects(REPO) == {big}  # stored, but never committed
    assert set(api.list_repo_files(REPO)) == {".gitattributes"}

    before = len(hub.requests)
    api.upload_folder(repo_id=REPO, folder_path=folder)
    assert puts(hub, before) == [extra]  # the batch API told the client `big` is already there
    assert {k: v for k, v in hub.remote_files(REPO).items() if k in files} == files


def test_push_to_branch(hub, api, tmp_path):
    api.create_repo(REPO)
    main = api.upload_folder(repo_id=REPO, folder_path=write_files(tmp_path / "a", {
        "config.json": b'{"v": 1}'}))
    folder = write_files(tmp_path / "b", {"config.json": b'{"v": 2}', "w.safetensors": b"\1" * 99})
    with pytest.raises(RevisionNotFoundError):
        api.upload_folder(repo_id=REPO, folder_path=folder, revision="dev")
    api.create_branch(REPO, branch="dev")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch(REPO, branch="dev")
    assert err.value.response.status_code == 409
    dev = api.upload_folder(repo_id=REPO, folder_path=folder, revision="dev")

    assert dev.oid != main.oid
    refs = {b.name: b.target_commit for b in api.list_repo_refs(REPO).branches}
    assert refs == {"main": main.oid, "dev": dev.oid}
    assert hub.remote_files(REPO, "dev")["config.json"] == b'{"v": 2}'
    assert hub.remote_files(REPO)["config.json"] == b'{"v": 1}'
    assert "w.safetensors" not in api.list_repo_files(REPO)
    assert api.model_info(REPO, revision="dev").sha == dev.oid
    path = hf_hub_download(REPO, "w.safetensors", revision="dev", endpoint=hub.endpoint,
                           cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == b"\1" * 99
    assert Path(path).parent.name == dev.oid
