"""Publishing checkpoints to a Hugging Face Hub and loading them back, through
`huggingface_hub` and its conventions (`HF_ENDPOINT`, `HF_TOKEN` / `hf auth login`, the
client's cache, `HF_HUB_OFFLINE`).

A push is one commit of every file the checkpoint's manifest lists plus a generated model
card; LFS objects the remote already holds are not sent again, so re-running an
interrupted push uploads only what is missing. Afterwards the remote file list and
hashes (sha256 for LFS files, git blob ids for the rest) must equal the local ones.
The token is never printed: errors name the problem, not the credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from compress.errors import CompressError
from compress.progress import status as status_line

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# compress.cli sets HF_HUB_OFFLINE=1 unless the user set it, so that nothing reaches the
# network by accident; it marks that here. A hub command is the user asking for the
# network, so it goes online again unless offline mode was the user's own choice.
OFFLINE_DEFAULT_MARK = "COMPRESS_DEFAULT_HF_OFFLINE"
CARD = "README.md"
EXTRAS = ("eval.json",)  # `compress eval --json` output the card cites, when present
ATTEMPTS = 3
RETRY_DELAY_S = 2.0


def is_repo_id(name: str) -> bool:
    return well_formed_repo_id(name) and not Path(name).exists()


def well_formed_repo_id(name: str) -> bool:
    """ORG/NAME as the Hub allows it. REPO_ID alone lets through names the client refuses
    with its own ValueError (`a/b..c`, `a/b-`, over 96 characters), which reached users as
    a traceback."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if REPO_ID.fullmatch(name) is None:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


@contextlib.contextmanager
def online() -> Iterator[None]:
    """Allow the client's network calls in this block unless the user chose offline mode."""
    from huggingface_hub import constants

    if os.environ.get(OFFLINE_DEFAULT_MARK) != "1":
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot of a Hub model (the client's cache; offline once cached)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    with contextlib.suppress(LocalEntryNotFoundError):
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and os.environ.get(OFFLINE_DEFAULT_MARK) != "1":
        raise CompressError(f"{repo_id} is not a local directory, nor in the Hugging Face "
                            "cache (HF_HUB_OFFLINE is set, so it was not downloaded)")
    try:
        with online():
            from huggingface_hub import HfApi

            unsafe = [f for f in HfApi().list_repo_files(repo_id, revision=revision)
                      if not is_safe_relative(f)]
            if unsafe:  # the listing names where files land: never outside the snapshot
                raise CompressError(f"{repo_id} lists file names that escape the download "
                                    f"folder ({', '.join(map(repr, unsafe[:3]))}); refusing "
                                    "to download it")
            return Path(snapshot_download(repo_id, revision=revision))
    except HfHubHTTPError as e:
        if getattr(e.response, "status_code", None) in (401, 404):
            raise CompressError(f"{repo_id} is not a local directory, nor a model on the Hub "
                                "you can read (log in with `hf auth login` if it is "
                                "private)") from None
        raise CompressError(f"{repo_id} is not a local directory, and downloading it from "
                            f"the Hub failed: {_http_reason(e)}") from None
    except Exception as e:
        if not _network_error(e):
            raise
        raise CompressError(f"{repo_id} is not a local directory, and the Hub could not be "
                            f"reached ({type(e).__name__}: {e})") from None


def is_safe_relative(name: str) -> bool:
    """A relative POSIX path that stays below its root (no '..', absolute or drive parts)."""
    parts = name.split("/")
    return (bool(name) and not name.startswith("/") and "\\" not in name and ":" not in name
            and all(p not in ("", ".", "..") for p in parts))


@dataclass(frozen=True)
class LocalFile:
    path: str
    size: int
    sha256: str


@dataclass
class PushResult:
    repo_id: str
    revision: str
    files: list[LocalFile]
    url: str | None = None
    commit: str | None = None
    dry_run: bool = False
    card: str | None = None  # a dry run's model card, which it does not write
    compatibility: str | None = None  # `compress check`'s verdict (vLLM, tp 1), in the card


def local_files(directory: Path, card: bytes | None = None) -> list[LocalFile]:
    """What a push sends: the files the manifest lists (verified) plus the model card
    (`card`: its content, when it is not written into `directory`)."""
    from compress import models

    files = models.open_model(directory)  # verifies every listed file's size and sha256
    if files.manifest is None:
        raise CompressError(f"{directory} has no compress_manifest.json; push checkpoints "
                            "written by `compress quantize`")
    from compress.formats import checkpoint

    listed = [LocalFile(name, meta["bytes"], meta["sha256"])
              for name, meta in sorted(files.manifest["files"].items())]
    extra = [checkpoint.MANIFEST, *([CARD] if card is None else []),
             *[n for n in EXTRAS if (directory / n).is_file()]]
    for name, meta in checkpoint.file_entries(directory, extra).items():
        listed.append(LocalFile(name, meta["bytes"], meta["sha256"]))
    if card is not None:
        listed.append(LocalFile(CARD, len(card), hashlib.sha256(card).hexdigest()))
    return listed


def push(directory: str | Path, repo_id: str, *, private: bool = False,
         revision: str | None = None, exist_ok: bool = False, dry_run: bool = False,
         token: str | None = None, endpoint: str | None = None,
         card_extras: dict | None = None) -> PushResult:
    """Upload a checkpoint as one commit, then check the remote matches it."""
    from compress import model_card

    directory = Path(directory)
    if not well_formed_repo_id(repo_id):
        raise CompressError(f"--repo {repo_id!r} is not of the form ORG/NAME")
    revision = revision or "main"
    section, verdict = serving_check(directory)
    extras = {**(card_extras or {}), "compatibility": section}
    if dry_run:  # the checkpoint stays as it is: the card is shown, not written
        card = model_card.render(directory, **extras)
        return PushResult(repo_id, revision, local_files(directory, card.encode()),
                          dry_run=True, card=card, compatibility=verdict)
    model_card.write(directory, **extras)
    files = local_files(directory)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    with online():
        url = _call(lambda: api.create_repo(repo_id, private=private, exist_ok=exist_ok,
                                            repo_type="model"), repo_id, "create")
        if revision != "main":
            _call(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True),
                  repo_id, "create branch")
        commit = _call(lambda: api.upload_folder(
            repo_id=repo_id, folder_path=directory, revision=revision,
            allow_patterns=[f.path for f in files],
            commit_message=f"Upload {directory.name} with compress"), repo_id, "upload")
        verify_remote(api, repo_id, revision, directory, files)
    return PushResult(repo_id, revision, files, str(url), getattr(commit, "oid", None),
                      compatibility=verdict)


def serving_check(directory: Path) -> tuple[list[str], str]:
    """`compress check` on vLLM with tensor parallel 1, for the card: its markdown lines
    and its verdict. A checkpoint without a kernel is still pushed; the card says so."""
    from compress import compat

    try:
        report = compat.check(directory, "vllm", 1)
    except CompressError as e:  # the card says why there is no answer; the push goes on
        return [f"Not checked: {e}", ""], f"serving check: not run ({e})"
    verdict = report.verdict().removeprefix("verdict: ")
    return report.card_lines(), f"serving check (vLLM, tp 1): {verdict}" + (
        "" if report.ok else f"; details: compress check {directory}")


def verify_remote(api, repo_id: str, revision: str, directory: Path,
                  files: list[LocalFile]) -> None:
    """The remote revision holds exactly these files, byte for byte (by hash)."""
    remote = {}
    for entry in _call(lambda: list(api.list_repo_tree(repo_id, revision=revision,
                                                       recursive=True)), repo_id, "list"):
        if hasattr(entry, "blob_id"):  # files, not folders
            remote[entry.path] = entry
    problems = []
    for f in files:
        entry = remote.get(f.path)
        if entry is None:
            problems.append(f"{f.path} missing")
        elif entry.lfs is not None and entry.lfs.sha256 != f.sha256:
            problems.append(f"{f.path} sha256 differs")
        elif entry.lfs is None and entry.blob_id != git_blob_id(directory / f.path):
            problems.append(f"{f.path} content differs")
    unexpected = set(remote) - {f.path for f in files} - {".gitattributes"}
    problems += [f"{p} is on the remote but not in the checkpoint" for p in sorted(unexpected)]
    if problems:
        raise CompressError(f"{repo_id}@{revision} does not match the local checkpoint: "
                            + "; ".join(problems[:5])
                            + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))


def git_blob_id(path: Path) -> str:
    """The id git (and the Hub, for files not in LFS) gives a file's content."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _network_error(e: Exception) -> bool:
    """Connection refused or reset, timeouts: worth another attempt. (The client's HTTP
    library raises its own TransportError family, not OSError.)"""
    return isinstance(e, OSError) or any(c.__name__ == "TransportError"
                                         for c in type(e).__mro__)


def _call(fn, repo_id: str, what: str):
    """`fn()` with the client's errors as one line, and server or network failures
    retried (after the client's own retries)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    for attempt in range(1, ATTEMPTS + 1):
        try:
            return fn()
        except Exception as raised:
            e = _cause(raised, HfHubHTTPError)
            if isinstance(e, OfflineModeIsEnabled):
                raise CompressError("HF_HUB_OFFLINE is set; unset it to reach the Hub") \
                    from None
            http = isinstance(e, HfHubHTTPError)
            status = getattr(e.response, "status_code", None) if http else None
            if http and status in (401, 403):
                raise CompressError(
                    f"{what} {repo_id}: the Hub refused the token (HTTP {status}); run "
                    "`hf auth login` or set HF_TOKEN to a token with write access"
                ) from None
            if http and status == 409 and what == "create":
                raise CompressError(f"{repo_id} already exists; pass --exist-ok to push "
                                    "into it") from None
            transient = (status is None or status >= 500) if http else _network_error(e)
            if not transient:
                if http:
                    raise CompressError(f"{what} {repo_id} failed: {_http_reason(e)}") \
                        from None
                raise
            if attempt == ATTEMPTS:
                raise CompressError(f"{what} {repo_id} failed after {ATTEMPTS} attempts "
                                    f"({_http_reason(e)}); re-run the same command: what "
                                    "was uploaded is kept") from None
        status_line(f"{what} {repo_id}: attempt {attempt} failed; retrying")
        time.sleep(RETRY_DELAY_S * attempt)
    raise AssertionError("unreachable")


def _cause(e: BaseException, http_error: type) -> BaseException:
    """The HTTP or network error behind `e` (upload_folder wraps a failed LFS upload in a
    RuntimeError), else `e`."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, http_error) or _network_error(seen):
            return seen
        seen = seen.__cause__ or seen.__context__
    return e


def _http_reason(e: Exception) -> str:
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"HTTP {status}: {first}" if status else first
