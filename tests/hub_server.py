"""A small fake Hugging Face Hub on 127.0.0.1 for offline round trips (push, ``load_dataset``, ``from_pretrained``).

It implements only what ``huggingface_hub`` 2.x, ``datasets`` and ``transformers`` call for create / settings /
upload (preupload + NDJSON commit + LFS batch/PUT, Xet disabled) / whoami / repo info / tree / paths-info /
resolve, for models and datasets, kept in memory. One user (``USER``) with one token (``TOKEN``): any other
token gets 401, and writing to a repo of another namespace gets 403. Every request is recorded in
``FakeHub.requests`` so that tests can assert that none was made.

Example:
    >>> def test_push(fake_hub):  # doctest: +SKIP
    ...     HfApi().create_repo("user/x", repo_type="dataset", private=True)
    ...     assert fake_hub.repo("dataset", "user/x")["private"]
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

USER = "user"
TOKEN = "hf_fake_token_for_tests_0123456789"
# Like the Hub's .gitattributes rules: binary content (a NUL byte in the sample) or a big file goes to LFS.
LFS_MIN_SIZE = 10 * 1024 * 1024
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The server's state: repos (with one file snapshot per commit), LFS objects, and a request log."""

    def __init__(self):
        self.repos: dict[tuple[str, str], dict] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unrouted: list[tuple[str, str]] = []  # requests the fake does not implement: a test should see none
        self.lock = threading.Lock()
        self.endpoint = ""

    def repo(self, repo_type: str, repo_id: str) -> dict | None:
        return self.repos.get((repo_type, repo_id))

    def files(self, repo_type: str, repo_id: str, revision: str = "main") -> dict[str, dict]:
        """``{path: {"data": bytes, "lfs": bool}}`` at ``revision``."""
        repo = self.repos[(repo_type, repo_id)]
        return repo["commits"][repo["sha"] if revision == "main" else revision]


class _Error(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub  # set on the subclass made by ``serve``

    def log_message(self, *args):  # quiet: pytest shows failures, not access logs
        pass

    # -- plumbing ---------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _auth(self) -> None:
        header = self.headers.get("Authorization", "")
        if header and header != f"Bearer {TOKEN}":
            # The Hub's message: the client then reports bad credentials, not a missing repo.
            raise _Error(401, "Invalid credentials in Authorization header")
        if not header:
            # Anonymous: like the Hub, a repo is then indistinguishable from a missing one.
            repo_route = self.path.startswith(("/api/models/", "/api/datasets/")) or "/resolve/" in self.path
            raise _Error(401, "Unauthorized", "RepoNotFound" if repo_route else None)

    def _dispatch(self):
        url = urlsplit(self.path)
        body = self._body() if self.command in ("POST", "PUT") else b""
        with self.hub.lock:
            self.hub.requests.append((self.command, url.path))
        try:
            if self.command == "PUT" and url.path.startswith("/_lfs/"):
                return self._lfs_put(url.path[len("/_lfs/") :], body)
            self._auth()
            return self._route(url.path, parse_qs(url.query), body)
        except _Error as e:
            headers = {"X-Error-Code": e.code} if e.code else {}
            headers["X-Error-Message"] = e.message
            self._json({"error": e.message}, e.status, headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # -- routing ----------------------------------------------------------------------------------------
    def _route(self, path: str, query: dict, body: bytes):
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if path == "/api/whoami-v2":
            return self._json({"type": "user", "name": USER, "fullname": USER, "orgs": [],
                               "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}}})  # fmt: skip
        if path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        if path == "/api/repos/create" and self.command == "POST":
            return self._create(json.loads(body or b"{}"))
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in TYPES:
            repo_type, repo_id, rest = TYPES[parts[1]], f"{parts[2]}/{parts[3]}", parts[4:]
            if not rest:
                return self._info(repo_type, repo_id, "main")
            action, args = rest[0], rest[1:]
            if action == "revision" and self.command == "GET":
                return self._info(repo_type, repo_id, "/".join(args))
            if action == "settings" and self.command == "PUT":
                return self._settings(repo_type, repo_id, json.loads(body))
            if action == "preupload":
                return self._preupload(repo_type, repo_id, json.loads(body))
            if action == "commit":
                return self._commit(repo_type, repo_id, "/".join(args), body)
            if action == "tree" and args:
                return self._tree(repo_type, repo_id, args[0], "/".join(args[1:]), query)
            if action == "paths-info" and args:
                return self._paths_info(repo_type, repo_id, "/".join(args), parse_qs(body.decode()))
        repo_type, offset = ("dataset", 1) if parts[0] == "datasets" else ("model", 0)
        if len(parts) >= offset + 3 and parts[offset + 1].endswith(".git") and parts[offset + 2 :] == [
            "info", "lfs", "objects", "batch",
        ]:  # fmt: skip
            return self._lfs_batch(repo_type, f"{parts[offset]}/{parts[offset + 1][:-4]}", json.loads(body))
        if len(parts) >= offset + 5 and parts[offset + 2] == "resolve":
            repo_id = f"{parts[offset]}/{parts[offset + 1]}"
            return self._resolve(repo_type, repo_id, parts[offset + 3], "/".join(parts[offset + 4 :]))
        with self.hub.lock:
            self.hub.unrouted.append((self.command, path))
        raise _Error(404, f"fake hub: no route for {self.command} {path}")

    # -- repos ------------------------------------------------------------------------------------------
    def _readable(self, repo_type: str, repo_id: str) -> dict:
        repo = self.hub.repo(repo_type, repo_id)
        if repo is None:
            raise _Error(404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_type: str, repo_id: str) -> dict:
        if repo_id.split("/")[0] != USER:
            raise _Error(403, f"You don't have the rights to write to {repo_id}")
        return self._readable(repo_type, repo_id)

    def _snapshot(self, repo: dict, revision: str) -> tuple[str, dict]:
        sha = repo["sha"] if revision in ("main", "refs/heads/main") else revision
        if sha not in repo["commits"]:
            raise _Error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha, repo["commits"][sha]

    def _url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.hub.endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"

    def _create(self, payload: dict):
        namespace = payload.get("organization") or USER
        repo_type = payload.get("type") or "model"
        repo_id = f"{namespace}/{payload['name']}"
        if namespace != USER:
            raise _Error(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"')
        with self.hub.lock:
            if (repo_type, repo_id) in self.hub.repos:  # the Hub's 409 carries the url: create_repo(exist_ok) reads it
                return self._json({"error": "You already created this repo", "url": self._url(repo_type, repo_id)}, 409)
            sha = hashlib.sha1(f"{repo_type}/{repo_id}/init".encode()).hexdigest()
            self.hub.repos[(repo_type, repo_id)] = {
                "private": payload.get("visibility", "public") != "public", "gated": False,
                "sha": sha, "commits": {sha: {}}, "messages": [],
            }  # fmt: skip
        self._json({"url": self._url(repo_type, repo_id), "name": repo_id, "id": repo_id})

    def _settings(self, repo_type: str, repo_id: str, payload: dict):
        repo = self._writable(repo_type, repo_id)
        if "gated" in payload:
            repo["gated"] = payload["gated"]
        if "visibility" in payload:
            repo["private"] = payload["visibility"] != "public"
        self._json({})

    def _info(self, repo_type: str, repo_id: str, revision: str):
        repo = self._readable(repo_type, repo_id)
        sha, files = self._snapshot(repo, revision)
        siblings = [{"rfilename": p, "size": len(f["data"])} for p, f in sorted(files.items())]
        self._json({"id": repo_id, "_id": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                    "private": repo["private"], "gated": repo["gated"], "disabled": False, "downloads": 0,
                    "likes": 0, "tags": [], "siblings": siblings, "lastModified": "2026-01-01T00:00:00.000Z",
                    "createdAt": "2026-01-01T00:00:00.000Z"})  # fmt: skip

    # -- upload -----------------------------------------------------------------------------------------
    def _preupload(self, repo_type: str, repo_id: str, payload: dict):
        repo = self._writable(repo_type, repo_id)
        current = repo["commits"][repo["sha"]]
        out = []
        for f in payload["files"]:
            binary = b"\0" in base64.b64decode(f["sample"])
            existing = current.get(f["path"])
            out.append({"path": f["path"], "uploadMode": "lfs" if binary or f["size"] >= LFS_MIN_SIZE else "regular",
                        "shouldIgnore": False, "oid": git_blob_sha1(existing["data"]) if existing else None})  # fmt: skip
        self._json({"files": out, "commitOid": repo["sha"]})

    def _lfs_batch(self, repo_type: str, repo_id: str, payload: dict):
        self._writable(repo_type, repo_id)
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs:  # no "actions": already stored, the client skips the upload
                entry["actions"] = {"upload": {"href": f"{self.hub.endpoint}/_lfs/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")  # fmt: skip

    def _lfs_put(self, oid: str, body: bytes):
        # Like a pre-signed storage URL: no Authorization, but the content must match its oid.
        if hashlib.sha256(body).hexdigest() != oid:
            raise _Error(400, "sha256 of the uploaded content does not match the oid")
        with self.hub.lock:
            self.hub.lfs[oid] = body
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes):
        repo = self._writable(repo_type, repo_id)
        with self.hub.lock:
            _, files = self._snapshot(repo, revision)
            files = dict(files)
            message = ""
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    message = value.get("summary", "")
                elif key == "file":
                    files[value["path"]] = {"data": base64.b64decode(value["content"]), "lfs": False}
                elif key == "lfsFile":
                    if value["oid"] not in self.hub.lfs:
                        raise _Error(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    files[value["path"]] = {"data": self.hub.lfs[value["oid"]], "lfs": True}
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise _Error(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(prefix)}
                else:
                    raise _Error(400, f"fake hub: unsupported commit operation {key}")
            sha = hashlib.sha1(f"{repo['sha']}{time.time_ns()}{message}".encode()).hexdigest()
            repo["commits"][sha] = files
            repo["sha"] = sha
            repo["messages"].append(message)
        self._json({"commitUrl": f"{self._url(repo_type, repo_id)}/commit/{sha}", "commitOid": sha,
                    "pullRequestUrl": None, "success": True})  # fmt: skip

    # -- listing and download ---------------------------------------------------------------------------
    @staticmethod
    def _entry(path: str, files: dict) -> dict | None:
        if path in files:
            f = files[path]
            entry = {"type": "file", "path": path, "size": len(f["data"]), "oid": git_blob_sha1(f["data"])}
            if f["lfs"]:
                entry["lfs"] = {
                    "oid": hashlib.sha256(f["data"]).hexdigest(),
                    "size": len(f["data"]),
                    "pointerSize": 134,
                }
            return entry
        if any(p.startswith(path.rstrip("/") + "/") for p in files):
            return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}
        return None

    def _tree(self, repo_type: str, repo_id: str, revision: str, folder: str, query: dict):
        _, files = self._snapshot(self._readable(repo_type, repo_id), unquote(revision))
        folder = folder.strip("/")
        recursive = query.get("recursive", ["False"])[0].lower() in ("true", "1")
        if folder and self._entry(folder, files) is None:
            raise _Error(404, f"{folder} does not exist on main", "EntryNotFound")
        prefix = folder + "/" if folder else ""
        names = set()
        for path in files:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            names.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
        entries = [self._entry(n, files) for n in sorted(names)]
        self._json(sorted(entries, key=lambda e: (e["type"] != "directory", e["path"])))

    def _paths_info(self, repo_type: str, repo_id: str, revision: str, form: dict):
        _, files = self._snapshot(self._readable(repo_type, repo_id), revision)
        entries = [self._entry(p.strip("/"), files) for p in form.get("paths", [])]
        self._json([e for e in entries if e is not None])

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str):
        sha, files = self._snapshot(self._readable(repo_type, repo_id), revision)
        if path not in files:
            raise _Error(404, f"{path} does not exist on {revision}", "EntryNotFound")
        f = files[path]
        data = f["data"]
        etag = hashlib.sha256(data).hexdigest() if f["lfs"] else git_blob_sha1(data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if f["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        status, body = 200, data
        spec = self.headers.get("Range")
        if spec and spec.startswith("bytes="):
            start_s, _, end_s = spec[len("bytes=") :].partition("-")
            start = int(start_s) if start_s else max(len(data) - int(end_s), 0)
            end = int(end_s) if start_s and end_s else len(data) - 1
            if start >= len(data) and len(data) > 0:
                raise _Error(416, "Range Not Satisfiable")
            end = min(end, len(data) - 1)
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(status, body, headers, content_type="application/octet-stream")


def serve() -> tuple[FakeHub, ThreadingHTTPServer]:
    """Starts a fake Hub on a free loopback port (a daemon thread); returns its state and the server."""
    hub = FakeHub()
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return hub, server


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A running fake Hub, with huggingface_hub / datasets / transformers pointed at it and online.

    The hub constants are read at import, so the modules' copies are patched as well as the environment.
    The caches go to ``tmp_path``, so a test never reads a file that another test downloaded.
    """
    import datasets.config
    from huggingface_hub import constants

    hub, server = serve()
    home = tmp_path / "hf_home"
    env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
           "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0", "HF_DATASETS_CACHE": str(home / "datasets"),
           "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_ETAG_TIMEOUT": "30", "HF_HUB_DOWNLOAD_TIMEOUT": "30"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_ENABLE_HF_TRANSFER"):
        monkeypatch.delenv(key, raising=False)
    patches = {
        constants: {
            "ENDPOINT": hub.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True, "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
            "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        },
        datasets.config: {
            "HF_ENDPOINT": hub.endpoint,
            "HUB_DATASETS_URL": hub.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
            "HF_HUB_OFFLINE": False, "HF_DATASETS_OFFLINE": False, "HF_UPDATE_DOWNLOAD_COUNTS": False,
            "HF_DATASETS_CACHE": home / "datasets",
        },
    }  # fmt: skip
    for module, values in patches.items():
        for name, value in values.items():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, value)
    _patch_transformers(monkeypatch, home)
    _reset_clients()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        _reset_clients()
    # A request the fake does not know means a client changed: fail loudly rather than test less.
    assert not hub.unrouted, f"requests the fake Hub does not implement: {hub.unrouted}"


def _patch_transformers(monkeypatch, home) -> None:
    """transformers keeps a lazily made ``HfApi`` (with the endpoint of its first use): start afresh."""
    try:
        import transformers.utils.hub as thub
    except ImportError:
        return
    if hasattr(thub, "_hf_api"):
        monkeypatch.setattr(thub, "_hf_api", None)


def _reset_clients() -> None:
    """Forget fsspec's cached ``HfFileSystem`` instances (they hold the endpoint and a listing cache)."""
    from huggingface_hub import HfFileSystem

    HfFileSystem.clear_instance_cache()
