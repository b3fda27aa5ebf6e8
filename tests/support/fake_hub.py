"""A local HTTP server speaking the part of the Hugging Face Hub protocol that huggingface_hub uses.

- GET  /api/models/{org}/{name}[/revision/{rev}][?blobs=true]  -> model info; siblings with size,
  blobId and lfs.sha256 when blobs=true
- HEAD/GET /{org}/{name}/resolve/{rev}/{file}  -> the file; LFS files redirect to
  http://localhost:PORT/cdn/{sha256} (another host name, as the hub's CDN is another host), with
  X-Repo-Commit, ETag, X-Linked-Etag and X-Linked-Size
- Range requests (206 + Content-Range), errors with X-Error-Code (RepoNotFound, RevisionNotFound,
  EntryNotFound) as the hub sends them.

Test controls: `drop_once` names files whose first body is cut off mid-way (the connection closes);
`slow_files` names files whose body stalls half-way until the name is removed; a repo with a `token`
is gated: its files need `Authorization: Bearer TOKEN`, as the hub answers 401 GatedRepo otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


@dataclass
class HubRepo:
    files: dict[str, bytes]
    commit: str = ""
    token: str | None = None

    def __post_init__(self) -> None:
        if not self.commit:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + hashlib.sha256(self.files[name]).digest())
            self.commit = digest.hexdigest()

    @staticmethod
    def is_lfs(name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)

    def sibling(self, name: str, blobs: bool) -> dict[str, object]:
        data = self.files[name]
        if not blobs:
            return {"rfilename": name}
        entry: dict[str, object] = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
        if self.is_lfs(name):
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class FakeHub:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    drop_once: set[str] = field(default_factory=set)
    slow_files: set[str] = field(default_factory=set)
    requests: list[Request] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _connections: list[socket.socket] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        handler = type("Handler", (_HubHandler,), {"hub": self})  # each server its own hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                         name="fake-hub").start()
        return self

    def stop(self) -> None:
        """Stop listening and cut the kept-alive connections too, as a hub that went away would."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for connection in self._connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                connection.shutdown(socket.SHUT_RDWR)

    def file_gets(self, name: str) -> list[Request]:
        """GETs that fetched the bytes of `name` (via its resolve URL or its CDN redirect)."""
        sha = {hashlib.sha256(r.files[name]).hexdigest() for r in self.repos.values() if name in r.files}
        return [r for r in self.requests if r.method == "GET" and
                (r.path.endswith(f"/{name}") or any(r.path == f"/cdn/{s}" for s in sha))]

    def blob(self, sha256: str) -> bytes | None:
        for repo in self.repos.values():
            for data in repo.files.values():
                if hashlib.sha256(data).hexdigest() == sha256:
                    return data
        return None


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


_API = re.compile(r"^/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?/?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_CDN = re.compile(r"^/cdn/([0-9a-f]{64})$")


class _HubHandler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.hub._connections.append(self.connection)

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        return None

    def do_HEAD(self) -> None:
        self._handle(send_body=False)

    def do_GET(self) -> None:
        self._handle(send_body=True)

    def _handle(self, send_body: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        self.hub.requests.append(Request(self.command, path, self.headers.get("Range")))
        if m := _API.match(path):
            return self._model_info(m.group(1), m.group(2) or "main", "blobs" in parse_qs(parts.query))
        if m := _RESOLVE.match(path):
            return self._resolve(m.group(1), m.group(2), m.group(3), send_body)
        if m := _CDN.match(path):
            data = self.hub.blob(m.group(1))
            if data is None:
                return self._error(404, "EntryNotFound", "no such blob")
            return self._content(path.rsplit("/", 1)[-1], data, {"ETag": f'"{m.group(1)}"'}, send_body)
        return self._error(404, None, "not found")

    def _repo(self, repo_id: str, revision: str) -> HubRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def _model_info(self, repo_id: str, revision: str, blobs: bool) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        body = {"_id": repo.commit[:24], "id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                "tags": [], "siblings": [repo.sibling(n, blobs) for n in sorted(repo.files)]}
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _resolve(self, repo_id: str, revision: str, name: str, send_body: bool) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        if name not in repo.files:
            return self._error(404, "EntryNotFound", f"{name} does not exist", {"X-Repo-Commit": repo.commit})
        if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                               "to it and be authenticated to access it.")
        data = repo.files[name]
        headers = {"X-Repo-Commit": repo.commit}
        if repo.is_lfs(name):
            sha = hashlib.sha256(data).hexdigest()
            headers |= {"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)), "ETag": f'"{sha}"',
                        "Location": f"{self._cdn_origin()}/cdn/{sha}", "Content-Length": "0"}
            self.send_response(302)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            return
        headers["ETag"] = f'"{git_blob_sha1(data)}"'
        self._content(name, data, headers, send_body)

    def _cdn_origin(self) -> str:
        # another host name for the same server, as the hub's CDN is another host: clients stop following
        # redirects for metadata there and drop the Authorization header
        return f"http://localhost:{self.server.server_address[1]}"

    def _content(self, name: str, data: bytes, headers: dict[str, str], send_body: bool) -> None:
        start = 0
        status = 200
        if (wanted := self.headers.get("Range")) and (m := re.match(r"bytes=(\d+)-$", wanted)):
            start = int(m.group(1))
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers = headers | {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        body = data[start:]
        headers = headers | {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if not send_body:
            return self._send(status, b"", headers | {"Content-Length": str(len(body))}, body_length=len(body))
        names = {name, hashlib.sha256(data).hexdigest(), *(n for r in self.hub.repos.values()
                                                            for n, d in r.files.items() if d == data)}
        if dropped := names & self.hub.drop_once:
            self.hub.drop_once -= dropped
            return self._drop_midway(status, body, headers)
        if names & self.hub.slow_files:
            return self._stall_midway(status, body, headers, names)
        self._send(status, body, headers)

    def _stall_midway(self, status: int, body: bytes, headers: dict[str, str], names: set[str]) -> None:
        self.send_response(status)
        for key, value in (headers | {"Content-Length": str(len(body))}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        deadline = time.monotonic() + 20  # bounded: a test that forgets to release still ends
        while names & self.hub.slow_files and time.monotonic() < deadline:
            time.sleep(0.02)
        self.wfile.write(body[len(body) // 2:])

    def _drop_midway(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in (headers | {"Content-Length": str(len(body))}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True  # the client sees the body end early

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message} | (extra or {})
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str], body_length: int | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(body) if body_length is None else body_length)} | headers
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
