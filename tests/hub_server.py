"""A Hugging Face hub for the tests: an HTTP server on 127.0.0.1 that answers downloads as
huggingface.co does, and huggingface_hub's cache folder written by hand.

`FakeHub` serves `HEAD` / `GET /{repo_id}/resolve/{revision}/{filename}` the way the real
`huggingface_hub` client (`hf_hub_download`) expects it: a small file answers 200 with `ETag` (its
git blob sha1), `X-Repo-Commit` and `Content-Length`; a weights file (LFS) answers 302 with
`Location` on another origin (`localhost` instead of `127.0.0.1`, as the hub sends its CDN), with
`X-Linked-Etag` (sha256) and `X-Linked-Size`; a renamed repository answers 307 with a relative
`Location` on the same origin. Failures are 404s with the hub's `X-Error-Code`: `RepoNotFound`,
`RevisionNotFound`, `EntryNotFound` (with `X-Repo-Commit`). Every request is recorded
(`requests`: method, path, Authorization header). The client makes no `/api/` call for these.

`point_hub_at(monkeypatch, endpoint, cache)` makes huggingface_hub, already imported, use an
endpoint and a cache: it reads `HF_ENDPOINT`, `HF_HUB_CACHE` and `HF_HUB_OFFLINE` once, at import,
into `huggingface_hub.constants`, so both the environment and those constants are set (and the
user's token file is hidden, so no real token is ever sent).

`write_hub_cache(cache, repo_id, files, commit=...)` lays files out exactly as huggingface_hub
does: `models--org--name/blobs/<etag>`, `snapshots/<commit>/<file>` -> `../../blobs/<etag>`
(relative symlinks) and `refs/<revision>` holding the commit.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import pathlib
import re
import threading
import urllib.parse
from collections.abc import Mapping

LFS_SUFFIXES = (".safetensors", ".bin", ".pth")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def etag(filename: str, data: bytes) -> str:
    """The etag the hub gives a file: sha256 for LFS files, the git blob sha1 otherwise."""
    if filename.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return git_blob_sha1(data)


def folder_files(folder: str | os.PathLike) -> dict[str, bytes]:
    """{name: content} of the files directly in `folder`."""
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(folder).iterdir()) if p.is_file()}


class FakeHub:
    """The hub's download routes over HTTP; `add` publishes commits. Start with `start()`, stop
    with `stop()` (the serving thread is a daemon)."""

    def __init__(self):
        self.refs: dict[str, dict[str, str]] = {}  # repo_id -> {branch or tag: commit}
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}  # repo_id -> commit -> files
        self.renamed: dict[str, str] = {}  # old repo_id -> new repo_id
        self.blobs: dict[str, bytes] = {}  # sha256 -> content (the "CDN")
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    def add(self, repo_id: str, files: Mapping[str, bytes], *, revision: str = "main") -> str:
        """A new commit holding `files`, which `revision` (a branch or tag) then points to;
        returns its hash."""
        commits = self.commits.setdefault(repo_id, {})
        commit = hashlib.sha1(f"{repo_id}:{len(commits)}".encode()).hexdigest()
        commits[commit] = dict(files)
        self.refs.setdefault(repo_id, {})[revision] = commit
        for name, data in files.items():
            if name.endswith(LFS_SUFFIXES):
                self.blobs[hashlib.sha256(data).hexdigest()] = data
        return commit

    # ------------------------------------------------------------------ serving

    def start(self) -> FakeHub:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

            def log_message(self, *args):  # quiet
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def paths(self, method: str | None = None) -> list[str]:
        with self._lock:
            return [path for m, path, _ in self.requests if method in (None, m)]

    def answer(self, handler: http.server.BaseHTTPRequestHandler, *, body: bool) -> None:
        with self._lock:
            self.requests.append(
                (handler.command, handler.path, handler.headers.get("Authorization"))
            )
        status, headers, data = self._route(urllib.parse.urlsplit(handler.path).path)
        handler.send_response(status)
        headers.setdefault("Content-Length", str(len(data)))
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body and data:
            handler.wfile.write(data)

    def _route(self, path: str) -> tuple[int, dict[str, str], bytes]:
        cdn = _CDN.match(path)
        if cdn:
            data = self.blobs.get(cdn["sha"])
            return (200, {}, data) if data is not None else (404, {}, b"")
        resolve = _RESOLVE.match(path)
        if resolve is None:
            return 404, {}, b"Not Found"
        repo, filename = resolve["repo"], urllib.parse.unquote(resolve["file"])
        revision = urllib.parse.unquote(resolve["rev"])
        if repo in self.renamed:
            new = path.replace(f"/{repo}/", f"/{self.renamed[repo]}/", 1)
            return 307, {"Location": new}, b""
        if repo not in self.commits:
            return _error(404, "RepoNotFound", "Repository not found")
        commit = self.refs[repo].get(revision, revision)
        if commit not in self.commits[repo]:
            return _error(404, "RevisionNotFound", "Invalid rev id")
        files = self.commits[repo][commit]
        if filename not in files:
            status, headers, data = _error(404, "EntryNotFound", "Entry not found")
            headers["X-Repo-Commit"] = commit
            return status, headers, data
        data = files[filename]
        tag = f'"{etag(filename, data)}"'
        headers = {"X-Repo-Commit": commit, "ETag": tag}
        if filename.endswith(LFS_SUFFIXES):
            headers.update(
                {
                    "X-Linked-Etag": tag,
                    "X-Linked-Size": str(len(data)),
                    "Location": f"http://localhost:{self.port}/cdn/{etag(filename, data)}",
                }
            )
            return 302, headers, b""
        return 200, headers, data


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"X-Error-Code": code, "X-Error-Message": message}, message.encode()


def point_hub_at(monkeypatch, endpoint: str, cache: str | os.PathLike, *, offline=False) -> None:
    """huggingface_hub (already imported or not) downloads from `endpoint` into `cache`, online
    or not, with no token unless a test gives one."""
    from huggingface_hub import constants

    endpoint, cache = endpoint.rstrip("/"), os.fspath(cache)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", bool(offline))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", os.path.join(cache, "no-token-file"))


def write_hub_cache(
    cache: str | os.PathLike,
    repo_id: str,
    files: Mapping[str, bytes],
    *,
    commit: str,
    revision: str = "main",
) -> pathlib.Path:
    """Files in huggingface_hub's cache layout; returns the snapshot folder."""
    repo = pathlib.Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for folder in (repo / "blobs", repo / "refs", snapshot):
        folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / etag(name, data)
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.join("..", "..", "blobs", blob.name))
    (repo / "refs" / revision).write_text(commit)
    return snapshot
