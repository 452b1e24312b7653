"""A small Hugging Face Hub on 127.0.0.1 for tests: the real `huggingface_hub` client (2.4.0)
pushes to it and downloads from it, and nothing leaves the machine.

    with FakeHub(tmp_path / "hub") as hub:
        hub.configure_client(monkeypatch, tmp_path / "cache")
        api = HfApi(endpoint=hub.endpoint, token=HUB_TOKEN)
        api.create_repo("test-user/m")
        api.upload_folder(repo_id="test-user/m", folder_path=model_dir)
        snapshot_download("test-user/m", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")

What a test must set (`configure_client(monkeypatch, cache_dir)` does all of it):
- `huggingface_hub.constants.HF_HUB_DISABLE_XET = True` (and env `HF_HUB_DISABLE_XET=1`). The
  client picks Xet vs LFS for uploads from `is_xet_available()` alone, never from the server's
  answer: with `hf_xet` installed it would talk to a Xet CAS this server does not have. With Xet
  off, `upload_folder` also takes the single-commit `create_commit` path.
- `huggingface_hub.constants.HF_HUB_OFFLINE = False`: tests/conftest.py exports HF_HUB_OFFLINE=1
  before the client is imported, and the constant is read at import time.
- `ENDPOINT` / `HUGGINGFACE_CO_URL_TEMPLATE` (and env `HF_ENDPOINT`): also read at import; they
  matter only where `endpoint=` is not passed (`HfApi(endpoint=...)`, `hf_hub_download(...,
  endpoint=...)`, `snapshot_download(..., endpoint=...)` all take it explicitly).
- `HF_HUB_CACHE` to a tmp dir (or pass `cache_dir=`), and no ambient token: `HF_TOKEN` and the
  token file are hidden, so a developer's real token is never sent (it would be a 401 here).
- `NO_PROXY=127.0.0.1`, in case a proxy is configured (it only reaches a client session created
  after the call; `huggingface_hub.close_session()` forces a new one).

Behaviour mimicked from the Hub: a new repo holds one commit with `.gitattributes`; preupload
says "lfs" for files >= 10 MiB, binary samples or LFS suffixes (`LFS_SUFFIXES`); the LFS batch
API offers only the "basic" transfer and returns no `actions` for objects the repo already
stores (uploaded, committed or not), so a re-run uploads only what is missing; anonymous reads
of public repos are allowed, writes need a token in `tokens`, a bad token is 401 "Invalid
credentials in Authorization header"; errors carry `X-Error-Code` (RepoNotFound,
RevisionNotFound, EntryNotFound) as the client expects. Not supported: Xet, pull requests
(`create_pr`), tags, commit listing, multipart LFS, pagination (one page), datasets/spaces beyond
basic model-like routes. Unknown routes answer 404 "FakeHub: no route ..." so gaps are loud.

Storage: `root/<models|datasets>/<ns>/<name>/{lfs,blobs}/<sha256>`; refs and trees are in memory.
`requests` logs `(method, path)` for every request, path as sent (percent-encoded, no query); an
LFS upload is `("PUT", "/_lfs/<models|datasets>/<ns>/<name>/<sha256>")`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

HUB_TOKEN = "hf_test_token"
LFS_THRESHOLD = 10 * 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".gguf",
                ".msgpack", ".npy", ".npz", ".pkl", ".zip", ".tar", ".gz", ".model", ".arrow",
                ".parquet")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
_KINDS = {"models": "model", "datasets": "dataset"}


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, [""])[0].lower() in ("1", "true")


def _upload_mode(path: str, size: int, sample: bytes) -> str:
    binary = b"\0" in sample
    return "lfs" if size >= LFS_THRESHOLD or path.endswith(LFS_SUFFIXES) or binary else "regular"


class FakeHub:
    """Context manager serving the Hub API on `endpoint` (127.0.0.1, random port)."""

    def __init__(self, root: Path | str, tokens: Iterable[str] = (HUB_TOKEN,),
                 user: str = "test-user") -> None:
        self.root = Path(root)
        self.tokens: set[str] = set(tokens)
        self.user = user
        self.requests: list[tuple[str, str]] = []
        self.server_errors: list[str] = []  # tracebacks of handler bugs (answered as 500)
        self.endpoint = ""
        self._repos: dict[str, dict[str, Any]] = {}  # "models/ns/name" -> state
        self._faults: list[dict[str, Any]] = []
        self._lock = threading.RLock()
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None

    def __enter__(self) -> FakeHub:
        self.root.mkdir(parents=True, exist_ok=True)
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        assert host == "127.0.0.1", host  # never serve (or point a client) off loopback
        self.endpoint = f"http://{host}:{port}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        # Kept-alive client connections would otherwise hold handler threads (and stale pooled
        # sockets in the client) past the test.
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    # -- test helpers -------------------------------------------------------------------

    def fail_next(self, method: str, path_regex: str, times: int = 1, status: int = 500,
                  drop_connection: bool = False) -> None:
        """The next `times` requests matching (method, re.search on path) fail: the body is
        read, then `status` with a JSON error is sent, or the socket is closed unanswered."""
        with self._lock:
            self._faults.append(dict(method=method.upper(), regex=re.compile(path_regex),
                                     left=times, status=status, drop=drop_connection))

    def remote_files(self, repo_id: str, revision: str = "main",
                     repo_type: str = "model") -> dict[str, bytes]:
        key = self._key(repo_type, repo_id)
        with self._lock:
            tree = self._tree(key, revision)
        return {p: self._blob(key, e).read_bytes() for p, e in tree.items()}

    def lfs_objects(self, repo_id: str, repo_type: str = "model") -> set[str]:
        """sha256 of every LFS object stored for the repo, committed or not."""
        lfs = self.root / self._key(repo_type, repo_id) / "lfs"
        return {p.name for p in lfs.iterdir() if len(p.name) == 64} if lfs.is_dir() else set()

    def configure_client(self, monkeypatch: Any, cache_dir: Path | str) -> None:
        """Point the installed client at this hub for one test (see the module docstring)."""
        from huggingface_hub import constants

        assert urlsplit(self.endpoint).hostname == "127.0.0.1"
        cache_dir = str(cache_dir)
        for name, value in (("HF_ENDPOINT", self.endpoint), ("HF_HUB_OFFLINE", "0"),
                            ("HF_HUB_DISABLE_XET", "1"), ("HF_HUB_CACHE", cache_dir),
                            ("HF_HUB_DISABLE_TELEMETRY", "1"), ("NO_PROXY", "127.0.0.1")):
            monkeypatch.setenv(name, value)
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(name, raising=False)
        template = self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        for name, value in (("ENDPOINT", self.endpoint), ("HUGGINGFACE_CO_URL_TEMPLATE", template),
                            ("HF_HUB_OFFLINE", False), ("HF_HUB_DISABLE_XET", True),
                            ("HF_HUB_CACHE", cache_dir),
                            ("HF_TOKEN_PATH", os.path.join(cache_dir, ".no-token"))):
            monkeypatch.setattr(constants, name, value)

    # -- state (callers hold self._lock) -----------------------------------------------

    @staticmethod
    def _key(repo_type: str, repo_id: str) -> str:
        return f"{repo_type}s/{repo_id}"

    def _blob(self, key: str, entry: dict[str, Any]) -> Path:
        return self.root / key / ("lfs" if entry["lfs"] else "blobs") / entry["sha256"]

    def _repo(self, key: str, authed: bool) -> dict[str, Any]:
        repo = self._repos.get(key)
        if repo is None or (repo["private"] and not authed):
            # The Hub hides private repos from anonymous callers behind the same error.
            raise _HttpError(401 if repo else 404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: dict[str, Any], revision: str) -> str:
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if revision in repo["commits"]:
            return revision
        raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _tree(self, key: str, revision: str) -> dict[str, dict[str, Any]]:
        repo = self._repos[key]
        return repo["commits"][self._resolve(repo, revision)]["tree"]

    def _store(self, key: str, lfs: bool, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Streams chunks to the content-addressed store; returns (sha256, size)."""
        folder = self.root / key / ("lfs" if lfs else "blobs")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".tmp-{threading.get_ident()}-{time.monotonic_ns()}"
        digest, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
        except BaseException:  # a half-received object must never look stored
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, folder / digest.hexdigest())
        return digest.hexdigest(), size

    def _commit(self, repo: dict[str, Any], branch: str, tree: dict[str, dict[str, Any]],
                title: str) -> str:
        parent = repo["branches"].get(branch, "")
        sha = hashlib.sha1(f"{parent}{title}{time.time_ns()}{len(tree)}".encode()).hexdigest()
        for entry in tree.values():
            entry.setdefault("commit", sha)  # the commit that last wrote each file
        repo["commits"][sha] = {"tree": tree, "title": title, "date": _now()}
        repo["branches"][branch] = sha
        return sha


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's pooled connections expect
    timeout = 60

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._conns.add(self.request)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._conns.discard(self.request)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # -- plumbing -----------------------------------------------------------------------

    def _body_chunks(self) -> Iterator[bytes]:
        self._consumed = True
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                yield from self._read_exact(size)
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
        else:
            yield from self._read_exact(int(self.headers.get("Content-Length") or 0))

    def _read_exact(self, n: int) -> Iterator[bytes]:
        while n > 0:
            data = self.rfile.read(min(n, 1 << 20))
            if not data:
                raise ConnectionError("client closed the connection mid-body")
            n -= len(data)
            yield data

    def _body(self) -> bytes:
        return b"".join(self._body_chunks())

    def _json_body(self) -> Any:
        return json.loads(self._body() or b"{}")

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", length: int | None = None) -> None:
        if not self._consumed:  # answering mid-upload would desync the kept-alive connection
            for _ in self._body_chunks():
                pass
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _auth(self) -> bool:
        header = self.headers.get("Authorization")
        if header is None:
            return False
        if header.removeprefix("Bearer ").strip() not in self.hub.tokens:
            msg = "Invalid credentials in Authorization header"
            raise _HttpError(401, msg, headers={"X-Error-Message": msg})
        return True

    def _write_auth(self) -> None:
        if not self._auth():
            raise _HttpError(401, "You must be authenticated to write to the Hub")

    def _dispatch(self) -> None:
        self._consumed = False
        hub, path = self.hub, urlsplit(self.path).path
        with hub._lock:
            hub.requests.append((self.command, path))
            fault = next((f for f in hub._faults if f["left"] > 0 and f["method"] == self.command
                          and f["regex"].search(path)), None)
            if fault:
                fault["left"] -= 1
        try:
            if fault and fault["drop"]:
                for _ in self._body_chunks():
                    pass
                self.close_connection = True  # no response at all: the client sees a dropped link
                return
            if fault:
                raise _HttpError(fault["status"], f"FakeHub injected failure on {path}")
            self._route(path, parse_qs(urlsplit(self.path).query))
        except _HttpError as e:
            headers = {**e.headers, **({"X-Error-Code": e.code} if e.code else {})}
            self._json({"error": e.message}, e.status, headers)
        except OSError:  # the client went away mid-request
            self.close_connection = True
        except Exception as e:  # a FakeHub bug: answer loudly rather than hang the client
            hub.server_errors.append(traceback.format_exc())
            self._json({"error": f"FakeHub internal error: {e!r}"}, 500)

    # -- routes -------------------------------------------------------------------------

    def _route(self, path: str, query: dict[str, list[str]]) -> None:
        segs, method = path.strip("/").split("/"), self.command
        if re.search(r"/xet-(read|write)-token/", path):
            raise _HttpError(501, "FakeHub does not speak Xet: set "
                             "huggingface_hub.constants.HF_HUB_DISABLE_XET = True")
        if segs[:2] == ["api", "whoami-v2"] and method == "GET":
            if not self._auth():
                raise _HttpError(401, "Invalid credentials in Authorization header")
            return self._json({"type": "user", "name": self.hub.user, "fullname": self.hub.user,
                               "orgs": [], "auth": {"type": "access_token", "accessToken": {
                                   "displayName": "test", "role": "write"}}})
        if segs[:2] == ["api", "repos"] and method in ("POST", "DELETE"):
            return self._create_or_delete_repo(segs[2] if len(segs) > 2 else "")
        if segs[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._json({})
        if segs[0] == "api" and len(segs) >= 4 and segs[1] in _KINDS:
            key = "/".join(segs[1:4])
            return self._api(key, segs[4] if len(segs) > 4 else "", segs[5:], query)
        if segs[0] == "_lfs" and len(segs) == 5 and method in ("PUT", "POST"):
            return self._lfs_object("/".join(segs[1:4]), segs[4])
        kind = segs.pop(0) if segs[0] in ("datasets",) else "models"
        if len(segs) >= 2 and segs[1].endswith(".git") and segs[2:] == [
                "info", "lfs", "objects", "batch"] and method == "POST":
            return self._lfs_batch(f"{kind}/{segs[0]}/{segs[1][:-4]}")
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(f"{kind}/{segs[0]}/{segs[1]}", unquote(segs[3]),
                                      unquote("/".join(segs[4:])))
        raise _HttpError(404, f"FakeHub: no route for {method} {path}")

    def _create_or_delete_repo(self, action: str) -> None:
        self._write_auth()
        body = self._json_body()
        kind = (body.get("type") or "model") + "s"
        repo_id = f"{body.get('organization') or self.hub.user}/{body['name']}"
        key, hub = f"{kind}/{repo_id}", self.hub
        prefix = "" if kind == "models" else f"{kind}/"
        url = f"{hub.endpoint}/{prefix}{repo_id}"
        with hub._lock:
            if action == "delete" and self.command == "DELETE":
                if hub._repos.pop(key, None) is None:
                    raise _HttpError(404, "Repository not found", "RepoNotFound")
                return self._json({})
            if action != "create" or self.command != "POST":
                raise _HttpError(404, f"FakeHub: no route for {self.command} {self.path}")
            if key in hub._repos:
                return self._json({"error": f"You already created this {kind[:-1]} repo",
                                   "url": url}, 409)
            repo = hub._repos[key] = {"private": body.get("visibility") == "private",
                                      "branches": {}, "commits": {}, "created": _now()}
            sha, size = hub._store(key, False, [GITATTRIBUTES.encode()])
            tree = {".gitattributes": {"sha256": sha, "size": size, "lfs": False,
                                       "blob_id": _git_sha1(GITATTRIBUTES.encode())}}
            hub._commit(repo, "main", tree, "initial commit")
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _api(self, key: str, action: str, rest: list[str], query: dict[str, list[str]]) -> None:
        hub, method = self.hub, self.command
        authed = self._auth()
        rev = unquote(rest[0]) if rest else "main"
        with hub._lock:
            repo = hub._repo(key, authed)
            if action in ("", "revision") and method == "GET":
                return self._info(key, repo, rev, _flag(query, "blobs"))
            if action == "refs" and method == "GET":
                return self._json({"branches": [
                    {"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha}
                    for b, sha in repo["branches"].items()], "converts": [], "tags": [],
                    "pullRequests": []})
            if action == "tree" and method == "GET":
                return self._list_tree(key, repo, rev, unquote("/".join(rest[1:])),
                                       _flag(query, "recursive"),
                                       _flag(query, "expand"))
            if action == "paths-info" and method == "POST":
                form = parse_qs(self._body().decode())
                tree = hub._tree(key, rev)
                entries = self._entries(key, repo, tree, _flag(form, "expand"))
                wanted = {p.strip("/") for p in form.get("paths", [])}
                return self._json([e for e in entries if e["path"] in wanted])
            if action == "branch" and method in ("POST", "DELETE"):
                self._write_auth()
                if method == "DELETE":
                    if repo["branches"].pop(rev, None) is None:
                        raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                    return self._json({})
                start = self._json_body().get("startingPoint") or "main"
                if rev in repo["branches"]:
                    raise _HttpError(409, f"Reference {rev} already exists")
                repo["branches"][rev] = hub._resolve(repo, start)
                return self._json({})
        # Writes below read (possibly large) bodies outside the lock.
        if action == "preupload" and method == "POST":
            return self._preupload(key, rev)
        if action == "commit" and method == "POST":
            return self._create_commit(key, rev, query)
        raise _HttpError(404, f"FakeHub: no route for {method} {self.path}")

    def _entries(self, key: str, repo: dict[str, Any], tree: dict[str, dict[str, Any]],
                 expand: bool) -> list[dict[str, Any]]:
        """Hub tree entries (files and every folder) for a whole tree, sorted by path."""
        out: dict[str, dict[str, Any]] = {}
        for path, e in tree.items():
            item: dict[str, Any] = {"type": "file", "oid": e["blob_id"], "size": e["size"],
                                    "path": path}
            if e["lfs"]:
                pointer = _lfs_pointer(e["sha256"], e["size"])
                item["lfs"] = {"oid": e["sha256"], "size": e["size"], "pointerSize": len(pointer)}
            if expand:
                c = repo["commits"][e["commit"]]
                item["lastCommit"] = {"id": e["commit"], "title": c["title"], "date": c["date"]}
            out[path] = item
            parts = path.split("/")
            for i in range(1, len(parts)):
                folder = "/".join(parts[:i])
                tree_id = hashlib.sha1(f"{key}:{folder}".encode()).hexdigest()
                out.setdefault(folder, {"type": "directory", "oid": tree_id, "size": 0,
                                        "path": folder})
        return [out[p] for p in sorted(out)]

    def _list_tree(self, key: str, repo: dict[str, Any], rev: str, folder: str,
                   recursive: bool, expand: bool) -> None:
        entries = self._entries(key, repo, self.hub._tree(key, rev), expand)
        if folder and not any(e["path"] == folder and e["type"] == "directory" for e in entries):
            raise _HttpError(404, f"{folder} does not exist on {rev}", "EntryNotFound")
        prefix = f"{folder}/" if folder else ""
        inside = [e for e in entries if e["path"].startswith(prefix)]
        if not recursive:
            inside = [e for e in inside if "/" not in e["path"][len(prefix):]]
        self._json(inside)

    def _info(self, key: str, repo: dict[str, Any], rev: str, blobs: bool) -> None:
        sha = self.hub._resolve(repo, rev)
        tree = repo["commits"][sha]["tree"]
        siblings = []
        for path, e in sorted(tree.items()):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=e["size"], blobId=e["blob_id"])
                if e["lfs"]:
                    sib["lfs"] = {"sha256": e["sha256"], "size": e["size"],
                                  "pointerSize": len(_lfs_pointer(e["sha256"], e["size"]))}
            siblings.append(sib)
        repo_id = key.split("/", 1)[1]
        self._json({"_id": sha[:24], "id": repo_id, "modelId": repo_id,
                    "author": repo_id.split("/")[0], "sha": sha, "private": repo["private"],
                    "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                    "createdAt": repo["created"], "siblings": siblings,
                    "lastModified": repo["commits"][sha]["date"]})

    def _preupload(self, key: str, rev: str) -> None:
        self._write_auth()
        files = self._json_body().get("files", [])
        with self.hub._lock:
            tree = self.hub._tree(key, rev)
            head = self.hub._repos[key]["branches"].get(rev)
        out = []
        for f in files:
            sample = base64.b64decode(f.get("sample", ""))
            existing = tree.get(f["path"])
            oid = None if existing is None else (
                existing["sha256"] if existing["lfs"] else existing["blob_id"])
            out.append({"path": f["path"], "uploadMode": _upload_mode(f["path"], f["size"], sample),
                        "shouldIgnore": False, "oid": oid})
        self._json({"files": out, "commitOid": head})

    def _create_commit(self, key: str, rev: str, query: dict[str, list[str]]) -> None:
        self._write_auth()
        if query.get("create_pr"):
            raise _HttpError(400, "FakeHub does not support pull requests (create_pr)")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        hub = self.hub
        with hub._lock:
            repo = hub._repos[key]
            if rev not in repo["branches"]:
                raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = repo["branches"][rev]
            tree = {p: dict(e) for p, e in repo["commits"][head]["tree"].items()}
            title = "commit"
            for item in lines:
                kind, value = item["key"], item["value"]
                if kind == "header":
                    title = value.get("summary") or title
                    parent = value.get("parentCommit")
                    if parent and not head.startswith(parent):
                        raise _HttpError(412, "A commit has happened since. Please refresh and "
                                         "try again.")
                elif kind == "file":
                    raw = value["content"]
                    data = (base64.b64decode(raw) if value.get("encoding") == "base64"
                            else raw.encode())
                    if len(data) >= LFS_THRESHOLD:
                        raise _HttpError(400, f"{value['path']} is larger than 10 MiB: use LFS")
                    sha, size = hub._store(key, False, [data])
                    tree[value["path"]] = {"sha256": sha, "size": size, "lfs": False,
                                           "blob_id": _git_sha1(data)}
                elif kind == "lfsFile":
                    oid = value["oid"]
                    blob = hub.root / key / "lfs" / oid
                    if not blob.is_file():
                        raise _HttpError(400, f"LFS object {oid} for {value['path']} was never "
                                         "uploaded")
                    size = blob.stat().st_size
                    tree[value["path"]] = {"sha256": oid, "size": size, "lfs": True,
                                           "blob_id": _git_sha1(_lfs_pointer(oid, size))}
                elif kind == "deletedFile":
                    if tree.pop(value["path"], None) is None:
                        raise _HttpError(404, "A file with this name doesn't exist",
                                         "EntryNotFound")
                elif kind == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    tree = {p: e for p, e in tree.items() if not p.startswith(prefix)}
                else:
                    raise _HttpError(400, f"FakeHub: unsupported commit operation {kind}")
            sha = hub._commit(repo, rev, tree, title)
        prefix = "" if key.startswith("models/") else key.split("/")[0] + "/"
        repo_url = f"{hub.endpoint}/{prefix}{key.split('/', 1)[1]}"
        self._json({"success": True, "commitOid": sha, "commitUrl": f"{repo_url}/commit/{sha}",
                    "hookOutput": "", "pullRequestUrl": None})

    def _lfs_batch(self, key: str) -> None:
        self._write_auth()
        body, hub = self._json_body(), self.hub
        with hub._lock:
            hub._repo(key, True)
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise _HttpError(422, "FakeHub offers only the 'basic' upload transfer")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            blob = hub.root / key / "lfs" / oid
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not blob.is_file():  # already stored objects get no actions: the client skips them
                href = f"{hub.endpoint}/_lfs/{key}/{oid}"
                item["actions"] = {"upload": {"href": href},
                                   "verify": {"href": f"{href}?verify=1", "header": {}}}
            objects.append(item)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_object(self, key: str, oid: str) -> None:
        hub = self.hub
        blob = hub.root / key / "lfs" / oid
        if self.command == "POST":  # verify
            body = self._json_body()
            if not blob.is_file() or blob.stat().st_size != body.get("size"):
                raise _HttpError(404, f"LFS object {oid} not found")
            return self._json({})
        # The PUT carries no token (a presigned URL on the real Hub); the oid is the check.
        sha, _ = hub._store(key + "/.incoming", True, self._body_chunks())
        incoming = hub.root / key / ".incoming" / "lfs" / sha
        if sha != oid:
            incoming.unlink()
            raise _HttpError(400, f"sha256 mismatch: expected {oid}, got {sha}")
        blob.parent.mkdir(parents=True, exist_ok=True)
        os.replace(incoming, blob)
        self._send(200, headers={"ETag": f'"{oid}"'})

    def _resolve_file(self, key: str, rev: str, path: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._repo(key, self._auth())
            sha = hub._resolve(repo, rev)
            entry = repo["commits"][sha]["tree"].get(path)
        if entry is None:
            raise _HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["blob_id"]}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"ETag": f'"{entry["sha256"]}"', "X-Linked-Etag": f'"{entry["sha256"]}"',
                            "X-Linked-Size": str(entry["size"])})
        size, start, end, status = entry["size"], 0, entry["size"] - 1, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and size:
            start, end = int(match[1]), min(int(match[2] or size - 1), size - 1)
            if start > end:
                raise _HttpError(416, "Range not satisfiable",
                                 headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(status, headers=headers, content_type="application/octet-stream",
                   length=end - start + 1)
        if self.command == "HEAD":
            return
        with open(hub._blob(key, entry), "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0 and (chunk := f.read(min(left, 1 << 20))):
                self.wfile.write(chunk)
                left -= len(chunk)
