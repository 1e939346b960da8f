"""A local stand-in of the Hugging Face Hub for offline tests: a threaded HTTP server on 127.0.0.1 that
answers just what huggingface_hub (2.x) asks when ``hf_hub_download`` and ``HfApi.model_info`` run.

Endpoints, with the headers and status codes of the real Hub:

* ``GET /api/models/{org}/{name}`` and ``/api/models/{org}/{name}/revision/{rev}``: the repo info JSON
  (``id``, ``sha``, ``private``, ``gated``, ``siblings`` = ``[{"rfilename": ...}]``).
* ``HEAD|GET /{org}/{name}/resolve/{rev}/{path}``: a regular file answers 200 with ``ETag`` (git blob sha1),
  ``X-Repo-Commit`` and ``Content-Length``; an LFS file (``.safetensors``, ``.gguf``, ``.bin``) answers
  302 to a second "CDN" server (another origin, so huggingface_hub drops the Authorization header there)
  with ``X-Linked-Etag`` (sha256), ``X-Linked-Size`` and ``X-Repo-Commit``.
* Errors carry ``X-Error-Code``: ``RepoNotFound`` (401 without a token, 404 with one), ``GatedRepo`` (401
  without a token, 403 with a token of a user not granted access), ``RevisionNotFound`` (404),
  ``EntryNotFound`` (404, with ``X-Repo-Commit``); an unknown token is 401 with ``X-Error-Message: Invalid
  credentials in Authorization header``.

Every request (hub and CDN) is recorded in ``server.requests`` so tests can assert what was (not) fetched.

    with HubServer() as hub:
        hub.add_repo("org/tiny", FIXTURES / "gpt2")
        os.environ["HF_ENDPOINT"] = hub.url
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx")
SOCKET_TIMEOUT = 10.0


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    commits: dict = field(default_factory=dict)     # commit -> {filename: bytes}
    refs: dict = field(default_factory=dict)        # branch or tag -> commit
    gated: bool = False
    private: bool = False
    allowed: set = field(default_factory=set)       # users with access (gated or private)
    hidden: set = field(default_factory=set)        # listed in siblings but 404 EntryNotFound on resolve

    def commit_of(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        if rev in self.commits:
            return rev
        return None


@dataclass
class Request:
    server: str          # "hub" or "cdn"
    method: str
    path: str            # unquoted, without the query string
    auth: str | None     # the Authorization header
    status: int = 0

    @property
    def filename(self) -> str | None:
        """For /{repo}/resolve/{rev}/{file}: the file."""
        parts = self.path.split("/resolve/", 1)
        return parts[1].split("/", 1)[1] if len(parts) == 2 and "/" in parts[1] else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


class HubServer:
    """The stand-in Hub (and its CDN). ``tokens`` maps a Bearer token to a user name."""

    def __init__(self, tokens: dict | None = None):
        self.repos: dict[str, Repo] = {}
        self.tokens = dict(tokens or {})
        self.requests: list[Request] = []
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes, served by the CDN
        self._lock = threading.Lock()
        self._hub = _Server(("127.0.0.1", 0), self._handler("hub"))
        self._cdn = _Server(("127.0.0.1", 0), self._handler("cdn"))
        self.url = f"http://127.0.0.1:{self._hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._cdn.server_address[1]}"
        self._threads = []

    # ---------------------------------------------------------------- setup
    def add_repo(self, repo_id: str, files, *, commit: str | None = None, refs=("main",), gated=False,
                 private=False, allowed=(), hidden=()) -> str:
        """Add a commit of ``repo_id`` holding ``files`` (a directory, whose expected.npz is skipped, or a dict
        name -> bytes) and point ``refs`` (branches/tags) at it. Returns the commit hash."""
        if isinstance(files, (str, Path)):
            files = {p.name: p.read_bytes() for p in sorted(Path(files).iterdir())
                     if p.is_file() and p.name != "expected.npz"}
        files = {k: bytes(v) for k, v in files.items()}
        if commit is None:
            h = hashlib.sha1(repo_id.encode())
            for k in sorted(files):
                h.update(k.encode() + b"\0" + hashlib.sha256(files[k]).digest())
            commit = h.hexdigest()
        repo = self.repos.setdefault(repo_id, Repo(repo_id))
        repo.commits[commit] = files
        for r in refs:
            repo.refs[r] = commit
        repo.gated |= gated
        repo.private |= private
        repo.allowed |= set(allowed)
        repo.hidden |= set(hidden)
        for data in files.values():
            self.blobs[hashlib.sha256(data).hexdigest()] = data
        return commit

    # ---------------------------------------------------------------- queries
    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def fetched(self, method: str | None = None) -> list[str]:
        """Filenames of the resolve requests (HEAD or GET), in order."""
        with self._lock:
            return [r.filename for r in self.requests
                    if r.filename is not None and (method is None or r.method == method)]

    def downloaded(self) -> list[str]:
        """Contents actually transferred: GET on a resolve url (regular files) or on the CDN (LFS files,
        named by the CDN path's filename query)."""
        with self._lock:
            out = []
            for r in self.requests:
                if r.method == "GET" and r.status == 200 and (r.server == "cdn" or r.filename is not None):
                    out.append(r.filename if r.server == "hub" else r.path.rsplit("/", 1)[-1])
            return out

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> HubServer:
        for s in (self._hub, self._cdn):
            t = threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for s in (self._hub, self._cdn):
            s.shutdown()
            s.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---------------------------------------------------------------- HTTP
    def _handler(self, which: str):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = SOCKET_TIMEOUT

            def log_message(self, *a):  # quiet
                pass

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def do_POST(self):
                self._send(405, b'{"error": "not implemented by the stand-in Hub"}')

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False,
                      ctype: str = "application/json"):
                self._rec.status = status
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if not head and body:
                    self.wfile.write(body)

            def _error(self, status: int, code: str | None, message: str, head: bool, extra: dict | None = None):
                h = {"X-Error-Message": message}
                if code:
                    h["X-Error-Code"] = code
                h.update(extra or {})
                self._send(status, json.dumps({"error": message}).encode(), h, head)

            def _serve(self, head: bool):
                raw_path = urlsplit(self.path).path
                self._rec = Request(which, self.command, unquote(raw_path), self.headers.get("Authorization"))
                with hub._lock:
                    hub.requests.append(self._rec)
                if which == "cdn":
                    return self._cdn(raw_path, head)
                user, bad = None, False
                auth = self.headers.get("Authorization") or ""
                if auth.lower().startswith("bearer "):
                    user = hub.tokens.get(auth[7:].strip())
                    bad = user is None
                if bad:
                    return self._error(401, None, "Invalid credentials in Authorization header", head)
                if raw_path.startswith("/api/models/"):
                    return self._model_info(raw_path[len("/api/models/"):], user, head)
                if "/resolve/" in raw_path:
                    return self._resolve(raw_path, user, head)
                return self._error(404, None, "Sorry, we can't find the page you are looking for.", head)

            def _repo(self, repo_id: str, user, head) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None or (repo.private and user not in repo.allowed):
                    self._error(401 if user is None else 404, "RepoNotFound", "Repository not found", head)
                    return None
                return repo

            def _model_info(self, rest: str, user, head):
                parts = rest.split("/")
                if len(parts) < 2:
                    return self._error(404, None, "Not Found", head)
                repo_id = unquote(parts[0]) + "/" + unquote(parts[1])
                rev = "main"
                if len(parts) >= 4 and parts[2] == "revision":
                    rev = unquote("/".join(parts[3:]))
                elif len(parts) != 2:
                    return self._error(404, None, "Not Found", head)
                repo = self._repo(repo_id, user, head)
                if repo is None:
                    return
                commit = repo.commit_of(rev)
                if commit is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                info = {"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                        "author": repo_id.split("/")[0], "sha": commit, "private": repo.private,
                        "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                        "siblings": [{"rfilename": f} for f in sorted(repo.commits[commit])]}
                self._send(200, json.dumps(info).encode(), head=head)

            def _resolve(self, raw_path: str, user, head):
                before, after = raw_path.split("/resolve/", 1)
                repo_id = unquote(before.lstrip("/"))
                if "/" not in after:
                    return self._error(404, None, "Not Found", head)
                rev, filename = after.split("/", 1)
                rev, filename = unquote(rev), unquote(filename)
                repo = self._repo(repo_id, user, head)
                if repo is None:
                    return
                if repo.gated and user not in repo.allowed:
                    if user is None:
                        msg = (f"Access to model {repo_id} is restricted. You must have access to it and be "
                               f"authenticated to access it. Please log in.")
                        return self._error(401, "GatedRepo", msg, head)
                    msg = (f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                           f"Visit https://huggingface.co/{repo_id} to ask for access.")
                    return self._error(403, "GatedRepo", msg, head)
                commit = repo.commit_of(rev)
                if commit is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                files = repo.commits[commit]
                if filename not in files or filename in repo.hidden:
                    return self._error(404, "EntryNotFound", f"{filename} does not exist on \"{rev}\"", head,
                                       {"X-Repo-Commit": commit})
                data = files[filename]
                if filename.endswith(LFS_SUFFIXES):
                    sha = hashlib.sha256(data).hexdigest()
                    loc = f"{hub.cdn_url}/blobs/{sha}/{filename.rsplit('/', 1)[-1]}"
                    h = {"Location": loc, "X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha}"',
                         "X-Linked-Size": str(len(data)), "ETag": f'"{git_blob_sha1(data)}"'}
                    return self._send(302, b"", h, head)
                h = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
                self._send(200, data, h, head, ctype="application/octet-stream")

            def _cdn(self, raw_path: str, head):
                parts = raw_path.split("/")
                data = hub.blobs.get(parts[2]) if len(parts) >= 3 and parts[1] == "blobs" else None
                if data is None:
                    return self._send(404, b"NoSuchKey", ctype="text/plain", head=head)
                if self.headers.get("Authorization"):  # like S3: the Hub's token must never reach the CDN
                    return self._send(400, b"Authorization header must not be sent to the CDN", ctype="text/plain",
                                      head=head)
                self._send(200, data, {"ETag": f'"{parts[2]}"'}, head, ctype="application/octet-stream")

        return Handler
