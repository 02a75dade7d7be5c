"""A loopback Hugging Face Hub-compatible HTTP server for offline tests.

Implements the part of the Hub HTTP API that an unmodified `huggingface_hub` 2.4 client (and transformers /
diffusers on top of it) uses to create a repo, push files and load them back, when it is pointed here with
`HF_ENDPOINT=http://127.0.0.1:PORT`, `HF_HUB_DISABLE_XET=1` and any `HF_TOKEN`:

- `POST /api/repos/create`, `POST /api/repos/delete`, `GET /api/whoami-v2`, `POST /api/validate-yaml`,
  `GET /api/agent-harnesses` (empty registry)
- `GET /api/{type}s/{repo_id}[/revision/{rev}]`                  (`model_info` / `repo_info`, `siblings`, `sha`)
- `GET /api/{type}s/{repo_id}/tree/{rev}[/{path}]`               (`list_repo_tree`, `list_repo_files`; cursor pages)
- `POST /api/{type}s/{repo_id}/paths-info/{rev}`                 (`get_paths_info`)
- `GET /api/{type}s/{repo_id}/refs`, `GET .../commits/{rev}`     (`list_repo_refs`, `list_repo_commits`)
- `POST /api/{type}s/{repo_id}/branch/{branch}`                  (`create_branch`)
- `POST /api/{type}s/{repo_id}/preupload/{rev}`                  (upload mode per file: "regular" or "lfs")
- `POST /api/{type}s/{repo_id}/commit/{rev}`                     (NDJSON: `file` base64, `lfsFile`, deletions)
- `POST /{prefix}{repo_id}.git/info/lfs/objects/batch`          (LFS batch API, "basic" transfer)
- `PUT /_lfs/upload/{oid}`, `POST /_lfs/verify`                  (upload target named in the batch answer)
- `GET|HEAD /{prefix}{repo_id}/resolve/{rev}/{path}`             (`hf_hub_download`: `X-Repo-Commit`, `ETag`,
  `Content-Length`, `X-Linked-Etag`/`X-Linked-Size` for LFS files, byte ranges)

Storage (under `root`): `blobs/{sha256}` holds every file content once; each repo has
`repos/{type}s/{namespace}/{name}/{repo.json, refs.json, commits/{sha}.json}`; a commit lists every file of the
tree with its sha256, size, git oid and whether it is an LFS file. Writes hold one lock.

Run standalone: `python tests/hub_server.py --port 0 --root DIR` prints the port, then serves until interrupted.
Import: `start_hub_server(root) -> (url, stop)` serves from a background thread on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as _dt
import fnmatch
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml


USER = "latentheat-test"
REPO_TYPES = ("model", "dataset", "space")
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files of 10 MiB and more in LFS
TREE_PAGE_SIZE = 1000  # the Hub's page size for tree listings (50 with expand=True)
TREE_PAGE_SIZE_EXPAND = 50
MAX_BODY = 2 * 1024**3  # refuse request bodies larger than this
READ_CHUNK = 1024 * 1024
REPO_ID_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")

# The `.gitattributes` the Hub puts in the first commit of a new model repo.
DEFAULT_GITATTRIBUTES = """\
*.7z filter=lfs diff=lfs merge=lfs -text
*.arrow filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.bz2 filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.ftz filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.joblib filter=lfs diff=lfs merge=lfs -text
*.lfs.* filter=lfs diff=lfs merge=lfs -text
*.mlmodel filter=lfs diff=lfs merge=lfs -text
*.model filter=lfs diff=lfs merge=lfs -text
*.msgpack filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.ot filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*.pb filter=lfs diff=lfs merge=lfs -text
*.pickle filter=lfs diff=lfs merge=lfs -text
*.pkl filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.rar filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
saved_model/**/* filter=lfs diff=lfs merge=lfs -text
*.tar.* filter=lfs diff=lfs merge=lfs -text
*.tar filter=lfs diff=lfs merge=lfs -text
*.tflite filter=lfs diff=lfs merge=lfs -text
*.tgz filter=lfs diff=lfs merge=lfs -text
*.wasm filter=lfs diff=lfs merge=lfs -text
*.xz filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
*.zst filter=lfs diff=lfs merge=lfs -text
*tfevents* filter=lfs diff=lfs merge=lfs -text
"""


class HubError(Exception):
    """An error answered to the client: status, message and the `X-Error-Code` the client maps to an exception."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, as the Hub reports for regular files (and `sha.git_hash` computes)."""
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _lfs_patterns(gitattributes: bytes | None) -> list[str]:
    patterns = []
    for line in (gitattributes or b"").decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def _matches_lfs(path: str, patterns: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        if "/" in pattern:
            if fnmatch.fnmatch(path, pattern.replace("**/", "*")):
                return True
        elif fnmatch.fnmatch(name, pattern):
            return True
    return False


def _looks_binary(sample: bytes) -> bool:
    if b"\0" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as err:
        # a multi-byte character cut at the end of the 512-byte sample is still text
        return err.start < len(sample) - 4
    return False


def _front_matter(readme: bytes) -> dict:
    text = readme.decode("utf-8", "replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


class HubStore:
    """Repos, commits and blobs on disk under `root`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(exist_ok=True)
        self.lock = threading.RLock()

    # -- repos ---------------------------------------------------------------------------------------------------
    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_type}s" / repo_id

    def repo_exists(self, repo_type: str, repo_id: str) -> bool:
        return (self.repo_dir(repo_type, repo_id) / "repo.json").is_file()

    def repo_meta(self, repo_type: str, repo_id: str) -> dict:
        path = self.repo_dir(repo_type, repo_id) / "repo.json"
        if not path.is_file():
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return json.loads(path.read_text())

    def refs(self, repo_type: str, repo_id: str) -> dict[str, str]:
        return json.loads((self.repo_dir(repo_type, repo_id) / "refs.json").read_text())

    def _write_json(self, path: Path, data) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> None:
        with self.lock:
            if self.repo_exists(repo_type, repo_id):
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}")
            d = self.repo_dir(repo_type, repo_id)
            (d / "commits").mkdir(parents=True, exist_ok=True)
            self._write_json(d / "refs.json", {})
            self._write_json(d / "repo.json", {"id": repo_id, "type": repo_type, "private": private, "createdAt": _now()})
            files = {".gitattributes": self.put_blob(DEFAULT_GITATTRIBUTES.encode(), lfs=False)}
            self._new_commit(repo_type, repo_id, "main", None, files, "initial commit", "")

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            self.repo_meta(repo_type, repo_id)
            shutil.rmtree(self.repo_dir(repo_type, repo_id))

    # -- blobs ---------------------------------------------------------------------------------------------------
    def put_blob(self, data: bytes, lfs: bool) -> dict:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blobs / sha256
        if not path.exists():
            tmp = path.with_name(f"{sha256}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return self.file_entry(sha256, len(data), lfs, data)

    def file_entry(self, sha256: str, size: int, lfs: bool, data: bytes | None = None) -> dict:
        if lfs:
            oid = git_blob_sha1(lfs_pointer(sha256, size))
        else:
            oid = git_blob_sha1(data if data is not None else self.blob_path(sha256).read_bytes())
        return {"sha256": sha256, "size": size, "lfs": lfs, "oid": oid}

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    # -- commits -------------------------------------------------------------------------------------------------
    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str:
        """Branch name or full commit sha -> commit sha."""
        self.repo_meta(repo_type, repo_id)
        refs = self.refs(repo_type, repo_id)
        if revision in refs:
            return refs[revision]
        if COMMIT_SHA.match(revision) and (self.repo_dir(repo_type, repo_id) / "commits" / f"{revision}.json").is_file():
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit(self, repo_type: str, repo_id: str, sha: str) -> dict:
        return json.loads((self.repo_dir(repo_type, repo_id) / "commits" / f"{sha}.json").read_text())

    def history(self, repo_type: str, repo_id: str, sha: str, limit: int = 100_000) -> list[dict]:
        out = []
        while sha is not None and len(out) < limit:
            c = self.commit(repo_type, repo_id, sha)
            out.append(c)
            sha = c["parents"][0] if c["parents"] else None
        return out

    def _new_commit(self, repo_type, repo_id, branch, parent, files, title, description) -> str:
        date = _now()
        digest = hashlib.sha1(
            json.dumps([parent, sorted((p, f["oid"]) for p, f in files.items()), title, description, date, time.time_ns()]).encode()
        ).hexdigest()
        c = {"id": digest, "parents": [parent] if parent else [], "title": title, "message": description,
             "date": date, "authors": [{"user": USER}], "files": files}
        d = self.repo_dir(repo_type, repo_id)
        self._write_json(d / "commits" / f"{digest}.json", c)
        refs = self.refs(repo_type, repo_id)
        refs[branch] = digest
        self._write_json(d / "refs.json", refs)
        return digest

    def apply_commit(self, repo_type, repo_id, branch, header: dict, ops: list[tuple[str, dict]]) -> str:
        with self.lock:
            self.repo_meta(repo_type, repo_id)
            refs = self.refs(repo_type, repo_id)
            if branch not in refs:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = refs[branch]
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != head:
                raise HubError(412, f"A commit has happened since. Please refresh and try again. (head is {head})")
            files = dict(self.commit(repo_type, repo_id, head)["files"])
            for key, value in ops:
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")
                    try:
                        data = base64.b64decode(value["content"], validate=True)
                    except (binascii.Error, KeyError) as err:
                        raise HubError(400, f"Invalid base64 content for {path}: {err}") from None
                    files[path] = self.put_blob(data, lfs=False)
                elif key == "lfsFile":
                    oid = value.get("oid", "")
                    if value.get("algo", "sha256") != "sha256" or not SHA256.match(oid):
                        raise HubError(400, f"Invalid LFS oid for {path}")
                    if not self.has_blob(oid, value.get("size")):
                        raise HubError(422, f"LFS object {oid} for {path} was not uploaded")
                    files[path] = self.file_entry(oid, self.blob_path(oid).stat().st_size, lfs=True)
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            for p in files:
                _check_path(p)
            title = header.get("summary") or "Commit"
            return self._new_commit(repo_type, repo_id, branch, head, files, title, header.get("description", ""))

    def create_branch(self, repo_type, repo_id, branch, starting_point: str | None) -> None:
        with self.lock:
            refs = self.refs(repo_type, repo_id) if self.repo_exists(repo_type, repo_id) else None
            if refs is None:
                raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
            if branch in refs:
                raise HubError(409, f"Reference already exists: {branch}")
            refs[branch] = self.resolve(repo_type, repo_id, starting_point or "main")
            self._write_json(self.repo_dir(repo_type, repo_id) / "refs.json", refs)


def _check_path(path: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries Content-Length
    server_version = "latentheat-hub/0.1"
    timeout = 60  # idle keep-alive connections are closed after this many seconds

    # ---------------------------------------------------------------------------------------------------- plumbing
    @property
    def store(self) -> HubStore:
        return self.server.store  # type: ignore[attr-defined]

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        if self.server.verbose:  # type: ignore[attr-defined]
            sys.stderr.write("hub_server: " + format % args + "\n")

    def base_url(self) -> str:
        return f"http://{self.headers.get('Host') or '%s:%d' % self.server.server_address[:2]}"

    def _record(self, status: int) -> None:
        log = self.server.request_log  # type: ignore[attr-defined]
        log.append((self.command, self.path, status))
        if len(log) > 10_000:
            del log[:5_000]

    def send_body(self, status: int, body: bytes, content_type: str, headers: dict | None = None, head: bool = False):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self._record(status)

    def send_json(self, data, status: int = 200, headers: dict | None = None) -> None:
        self.send_body(status, json.dumps(data).encode(), "application/json; charset=utf-8", headers)

    def send_error_json(self, err: HubError, extra_headers: dict | None = None) -> None:
        headers = {"X-Error-Message": err.message.encode("ascii", "replace").decode()[:500]}
        if err.code:
            headers["X-Error-Code"] = err.code
        headers.update(extra_headers or {})
        self.send_body(err.status, json.dumps({"error": err.message}).encode(), "application/json; charset=utf-8",
                       headers, head=self.command == "HEAD")

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise HubError(400, "Truncated chunked body")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    for _ in range(100):  # trailers, up to the blank line
                        if self.rfile.readline(8192) in (b"\r\n", b"\n", b""):
                            break
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    raise HubError(413, "Request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(8)  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise HubError(413, "Request body too large")
        return self.rfile.read(length) if length else b""

    def read_json(self):
        body = self.read_body()
        try:
            return json.loads(body or b"{}")
        except ValueError:
            raise HubError(400, "Invalid JSON body") from None

    def token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:].strip() or None if auth.lower().startswith("bearer ") else None

    def require_token(self) -> None:
        if not self.token():
            raise HubError(401, "Invalid credentials in Authorization header")

    def check_read(self, repo_type: str, repo_id: str) -> None:
        meta = self.store.repo_meta(repo_type, repo_id)
        if meta.get("private") and not self.token():
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")

    # ---------------------------------------------------------------------------------------------------- dispatch
    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def _dispatch(self):
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        raw_parts = [p for p in split.path.split("/") if p != ""]
        try:
            self._route(raw_parts)
        except HubError as err:
            extra = getattr(err, "headers", None)
            self.send_error_json(err, extra)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - a server bug must answer 500, not hang the client
            import traceback

            traceback.print_exc()
            self.send_error_json(HubError(500, f"Internal error: {type(err).__name__}: {err}"))

    def _route(self, parts: list[str]):
        m = self.command
        if parts[:1] == ["api"]:
            rest = parts[1:]
            if rest == ["whoami-v2"] and m == "GET":
                return self.whoami()
            if rest == ["agent-harnesses"] and m == "GET":  # the client's user-agent registry: an empty one
                return self.send_json({"standardEnvVars": [], "harnesses": {}})
            if rest == ["validate-yaml"] and m == "POST":
                return self.validate_yaml()
            if rest == ["repos", "create"] and m == "POST":
                return self.create_repo()
            if rest == ["repos", "delete"] and m in ("POST", "DELETE"):
                return self.delete_repo()
            if rest and rest[0] in ("models", "datasets", "spaces"):
                return self.repo_api(rest[0][:-1], [unquote(p) for p in rest[1:]])
            raise HubError(404, f"Unknown API route {self.path}")
        if parts[:2] == ["_lfs", "upload"] and len(parts) == 3 and m == "PUT":
            return self.lfs_put(parts[2])
        if parts == ["_lfs", "verify"] and m == "POST":
            return self.lfs_verify()
        # /{prefix}{repo_id}.git/info/lfs/objects/batch
        if len(parts) >= 4 and parts[-4:] == ["info", "lfs", "objects", "batch"] and m == "POST":
            repo_type, repo_parts = self._split_type(parts[:-4])
            if not repo_parts or not repo_parts[-1].endswith(".git"):
                raise HubError(404, "Not a git LFS endpoint")
            repo_parts[-1] = repo_parts[-1][: -len(".git")]
            return self.lfs_batch(repo_type, "/".join(unquote(p) for p in repo_parts))
        # /{prefix}{repo_id}/resolve/{rev}/{path}
        if m in ("GET", "HEAD"):
            repo_type, rest = self._split_type(parts)
            for n in (2, 1):
                if len(rest) > n + 2 and rest[n] == "resolve":
                    repo_id = "/".join(unquote(p) for p in rest[:n])
                    revision = unquote(rest[n + 1])
                    path = "/".join(unquote(p) for p in rest[n + 2:])
                    return self.resolve_file(repo_type, repo_id, revision, path)
        raise HubError(404, f"Not found: {self.path}")

    @staticmethod
    def _split_type(parts: list[str]) -> tuple[str, list[str]]:
        if parts and parts[0] in ("datasets", "spaces"):
            return parts[0][:-1], list(parts[1:])
        return "model", list(parts)

    # ---------------------------------------------------------------------------------------------------- account
    def whoami(self):
        self.require_token()
        self.send_json({
            "type": "user", "id": "0" * 24, "name": USER, "fullname": "latentheat test user", "email": None,
            "emailVerified": False, "canPay": False, "isPro": False, "periodEnd": None, "avatarUrl": "", "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "dummy", "role": "write",
                                                              "createdAt": _now()}},
        })

    def validate_yaml(self):
        payload = self.read_json()
        try:
            _front_matter_strict(payload.get("content", ""))
        except ValueError as err:
            return self.send_json({"errors": [{"message": str(err)}], "warnings": []}, status=400)
        self.send_json({"errors": [], "warnings": []})

    # ---------------------------------------------------------------------------------------------------- repos
    def create_repo(self):
        self.require_token()
        payload = self.read_json()
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        name, org = payload.get("name") or "", payload.get("organization") or USER
        for part in (name, org):
            if not REPO_ID_PART.match(part) or "--" in part or ".." in part or part.endswith((".git", ".")):
                raise HubError(400, f"Invalid repo name part {part!r}")
        repo_id = f"{org}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.base_url()}/{URL_PREFIX[repo_type]}{repo_id}"
        try:
            self.store.create_repo(repo_type, repo_id, private)
        except HubError as err:
            if err.status == 409:
                return self.send_json({"error": err.message, "url": url}, status=409)
            raise
        self.send_json({"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self):
        self.require_token()
        payload = self.read_json()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload.get('name')}"
        self.store.delete_repo(repo_type, repo_id)
        self.send_json({})

    def repo_api(self, repo_type: str, parts: list[str]):
        """`/api/{type}s/{repo_id}[/{action}/...]` where repo_id has one or two segments."""
        actions = {"revision", "tree", "paths-info", "preupload", "commit", "commits", "refs", "branch"}
        if len(parts) >= 3 and parts[2] in actions:
            repo_id, action, args = "/".join(parts[:2]), parts[2], parts[3:]
        elif len(parts) >= 2 and parts[1] in actions:
            repo_id, action, args = parts[0], parts[1], parts[2:]
        elif 1 <= len(parts) <= 2:
            repo_id, action, args = "/".join(parts), None, []
        else:
            raise HubError(404, f"Unknown API route {self.path}")
        m = self.command
        if action is None and m == "GET":
            return self.repo_info(repo_type, repo_id, "main")
        if action == "revision" and args and m == "GET":
            return self.repo_info(repo_type, repo_id, "/".join(args))
        if action == "tree" and args and m == "GET":
            return self.tree(repo_type, repo_id, args[0], "/".join(args[1:]))
        if action == "paths-info" and args and m == "POST":
            return self.paths_info(repo_type, repo_id, "/".join(args))
        if action == "preupload" and args and m == "POST":
            return self.preupload(repo_type, repo_id, "/".join(args))
        if action == "commit" and args and m == "POST":
            return self.commit(repo_type, repo_id, "/".join(args))
        if action == "commits" and args and m == "GET":
            return self.commits(repo_type, repo_id, "/".join(args))
        if action == "refs" and not args and m == "GET":
            return self.list_refs(repo_type, repo_id)
        if action == "branch" and args and m == "POST":
            self.require_token()
            payload = self.read_json()
            self.check_read(repo_type, repo_id)
            self.store.create_branch(repo_type, repo_id, "/".join(args), payload.get("startingPoint"))
            return self.send_json({})
        raise HubError(404, f"Unknown API route {m} {self.path}")

    def _tree_entry(self, path: str, f: dict, last_commit: dict | None = None) -> dict:
        entry = {"type": "file", "path": path, "size": f["size"], "oid": f["oid"]}
        if f["lfs"]:
            entry["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": len(lfs_pointer(f["sha256"], f["size"]))}
        if last_commit is not None:
            entry["lastCommit"] = {"id": last_commit["id"], "title": last_commit["title"], "date": last_commit["date"]}
        return entry

    def _dir_entry(self, path: str, files: dict, last_commit: dict | None = None) -> dict:
        prefix = path + "/"
        oid = hashlib.sha1(json.dumps(sorted((p, f["oid"]) for p, f in files.items() if p.startswith(prefix))).encode())
        entry = {"type": "directory", "path": path, "size": 0, "oid": oid.hexdigest()}
        if last_commit is not None:
            entry["lastCommit"] = {"id": last_commit["id"], "title": last_commit["title"], "date": last_commit["date"]}
        return entry

    def _last_commits(self, repo_type, repo_id, sha, paths: list[str]) -> dict[str, dict]:
        """For each path (file or folder), the newest commit that changed it."""
        history = self.store.history(repo_type, repo_id, sha)
        out = {}

        def snapshot(files, path):
            if path in files:
                return files[path]["oid"]
            return sorted((p, f["oid"]) for p, f in files.items() if p.startswith(path + "/"))

        for path in paths:
            for i, c in enumerate(history):
                parent = history[i + 1]["files"] if i + 1 < len(history) else {}
                if snapshot(c["files"], path) != snapshot(parent, path):
                    out[path] = c
                    break
        return out

    def repo_info(self, repo_type: str, repo_id: str, revision: str):
        self.check_read(repo_type, repo_id)
        meta = self.store.repo_meta(repo_type, repo_id)
        sha = self.store.resolve(repo_type, repo_id, revision)
        commit = self.store.commit(repo_type, repo_id, sha)
        files = commit["files"]
        card = {}
        if "README.md" in files:
            card = _front_matter(self.store.blob_path(files["README.md"]["sha256"]).read_bytes())
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(files):
            s = {"rfilename": path}
            if blobs:
                f = files[path]
                s.update(size=f["size"], blobId=f["oid"])
                if f["lfs"]:
                    s["lfs"] = {"sha256": f["sha256"], "size": f["size"],
                                "pointerSize": len(lfs_pointer(f["sha256"], f["size"]))}
            siblings.append(s)
        tags = list(card.get("tags") or []) if isinstance(card.get("tags"), list) else []
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "author": repo_id.split("/")[0],
            "sha": sha, "lastModified": commit["date"], "createdAt": meta["createdAt"], "private": meta["private"],
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": tags, "siblings": siblings,
            "cardData": card or None,
        }
        if repo_type == "model":
            info.update(library_name=card.get("library_name"), pipeline_tag=card.get("pipeline_tag"))
            if card.get("model-index"):
                info["model-index"] = card["model-index"]
            if "config.json" in files:
                try:
                    cfg = json.loads(self.store.blob_path(files["config.json"]["sha256"]).read_bytes())
                    info["config"] = {k: cfg[k] for k in ("architectures", "model_type", "auto_map") if k in cfg}
                except (ValueError, OSError):
                    pass
        self.send_json(info)

    def tree(self, repo_type: str, repo_id: str, revision: str, path: str):
        self.check_read(repo_type, repo_id)
        sha = self.store.resolve(repo_type, repo_id, revision)
        files = self.store.commit(repo_type, repo_id, sha)["files"]
        path = path.strip("/")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = self.query.get("expand", ["false"])[0].lower() in ("1", "true")
        prefix = path + "/" if path else ""
        if path and path in files:
            raise HubError(400, f"{path} is a file, not a folder")
        under = sorted(p for p in files if p.startswith(prefix))
        if path and not under:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        dirs, entries = set(), []
        for p in under:
            rel = p[len(prefix):].split("/")
            for depth in range(1, len(rel)):
                if recursive or depth == 1:
                    dirs.add(prefix + "/".join(rel[:depth]))
            if recursive or len(rel) == 1:
                entries.append(p)
        items = [("d", d) for d in sorted(dirs)] + [("f", p) for p in entries]
        page_size = TREE_PAGE_SIZE_EXPAND if expand else TREE_PAGE_SIZE
        page_size = int(self.server.tree_page_size or page_size)  # type: ignore[attr-defined]
        cursor = int(self.query.get("cursor", ["0"])[0] or 0)
        page = items[cursor: cursor + page_size]
        last = self._last_commits(repo_type, repo_id, sha, [p for _, p in page]) if expand else {}
        out = [self._dir_entry(p, files, last.get(p)) if kind == "d" else self._tree_entry(p, files[p], last.get(p))
               for kind, p in page]
        headers = {}
        if cursor + page_size < len(items):
            q = f"recursive={str(recursive).lower()}&expand={str(expand).lower()}&cursor={cursor + page_size}"
            url = f"{self.base_url()}/api/{repo_type}s/{repo_id}/tree/{quote(revision, safe='')}"
            if path:
                url += "/" + quote(path, safe="")
            headers["Link"] = f'<{url}?{q}>; rel="next"'
        self.send_json(out, headers=headers)

    def paths_info(self, repo_type: str, repo_id: str, revision: str):
        self.check_read(repo_type, repo_id)
        body = self.read_body()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            payload = json.loads(body or b"{}")
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(body.decode())
            paths, expand = form.get("paths", []), form.get("expand", ["False"])[0].lower() == "true"
        sha = self.store.resolve(repo_type, repo_id, revision)
        files = self.store.commit(repo_type, repo_id, sha)["files"]
        paths = [p.strip("/") for p in paths]
        last = self._last_commits(repo_type, repo_id, sha, paths) if expand else {}
        out = []
        for p in paths:
            if p in files:
                out.append(self._tree_entry(p, files[p], last.get(p)))
            elif any(f.startswith(p + "/") for f in files):
                out.append(self._dir_entry(p, files, last.get(p)))
        self.send_json(out)

    def commits(self, repo_type: str, repo_id: str, revision: str):
        self.check_read(repo_type, repo_id)
        sha = self.store.resolve(repo_type, repo_id, revision)
        out = [{"id": c["id"], "authors": c["authors"], "date": c["date"], "title": c["title"], "message": c["message"]}
               for c in self.store.history(repo_type, repo_id, sha)]
        self.send_json(out)

    def list_refs(self, repo_type: str, repo_id: str):
        self.check_read(repo_type, repo_id)
        refs = self.store.refs(repo_type, repo_id)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in sorted(refs.items())]
        self.send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    # ---------------------------------------------------------------------------------------------------- upload
    def preupload(self, repo_type: str, repo_id: str, revision: str):
        self.require_token()
        payload = self.read_json()
        self.check_read(repo_type, repo_id)
        if self.query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by this test server")
        sha = self.store.resolve(repo_type, repo_id, revision)
        files = self.store.commit(repo_type, repo_id, sha)["files"]
        gitattributes = None
        if ".gitattributes" in files:
            gitattributes = self.store.blob_path(files[".gitattributes"]["sha256"]).read_bytes()
        patterns = _lfs_patterns(gitattributes)
        out = []
        for item in payload.get("files", []):
            path, size = item.get("path", ""), int(item.get("size", 0))
            _check_path(path)
            try:
                sample = base64.b64decode(item.get("sample", ""))
            except binascii.Error:
                sample = b""
            lfs = size >= LFS_SIZE_THRESHOLD or _matches_lfs(path, patterns) or _looks_binary(sample)
            remote = files.get(path)
            oid = None
            if remote is not None:
                oid = remote["sha256"] if remote["lfs"] else remote["oid"]
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self.send_json({"files": out, "commitOid": sha})

    def commit(self, repo_type: str, repo_id: str, revision: str):
        self.require_token()
        body = self.read_body()
        self.check_read(repo_type, repo_id)
        if self.query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by this test server")
        header, ops = None, []
        for line in body.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise HubError(400, "Invalid NDJSON line in commit payload") from None
            if item.get("key") == "header":
                header = item.get("value") or {}
            else:
                ops.append((item.get("key"), item.get("value") or {}))
        if header is None:
            raise HubError(400, "Commit payload has no header line")
        sha = self.store.apply_commit(repo_type, repo_id, revision, header, ops)
        self.send_json({"success": True, "commitOid": sha, "pullRequestUrl": None,
                        "commitUrl": f"{self.base_url()}/{URL_PREFIX[repo_type]}{repo_id}/commit/{sha}",
                        "commitMessage": header.get("summary", "")})

    def lfs_batch(self, repo_type: str, repo_id: str):
        self.require_token()
        payload = self.read_json()
        self.check_read(repo_type, repo_id)
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' operation is supported")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "Only the 'basic' transfer is supported")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj.get("oid", "")), obj.get("size")
            if not SHA256.match(oid) or not isinstance(size, int):
                objects.append({"oid": oid, "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "Invalid oid or size"}})
                continue
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not self.store.has_blob(oid, size):
                entry["actions"] = {
                    "upload": {"href": f"{self.base_url()}/_lfs/upload/{oid}?size={size}"},
                    "verify": {"href": f"{self.base_url()}/_lfs/verify"},
                }
            objects.append(entry)
        self.send_body(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                       "application/vnd.git-lfs+json")

    def lfs_put(self, oid: str):
        if not SHA256.match(oid):
            raise HubError(400, "Invalid LFS oid")
        data = self.read_body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid}")
        expected = self.query.get("size", [None])[0]
        if expected is not None and int(expected) != len(data):
            raise HubError(400, f"Uploaded {len(data)} bytes, expected {expected}")
        with self.store.lock:
            self.store.put_blob(data, lfs=True)
        self.send_body(200, b"", "text/plain")

    def lfs_verify(self):
        payload = self.read_json()
        if not self.store.has_blob(str(payload.get("oid", "")), payload.get("size")):
            raise HubError(404, f"LFS object {payload.get('oid')} not found")
        self.send_json({"success": True})

    # ---------------------------------------------------------------------------------------------------- download
    def resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str):
        self.check_read(repo_type, repo_id)
        sha = self.store.resolve(repo_type, repo_id, revision)
        files = self.store.commit(repo_type, repo_id, sha)["files"]
        if path not in files:
            err = HubError(404, f"Entry not found: {path}", "EntryNotFound")
            err.headers = {"X-Repo-Commit": sha}
            raise err
        f = files[path]
        etag = f["sha256"] if f["lfs"] else f["oid"]
        blob = self.store.blob_path(f["sha256"])
        size = f["size"]
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and size > 0:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if match and (match.group(1) or match.group(2)):
                if match.group(1):
                    start = int(match.group(1))
                    end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                else:  # suffix range: the last N bytes
                    start, end = max(size - int(match.group(2)), 0), size - 1
                if start > end or start >= size:
                    err = HubError(416, "Requested range not satisfiable")
                    err.headers = {"Content-Range": f"bytes */{size}", "X-Repo-Commit": sha}
                    raise err
                status = 206
        length = end - start + 1 if size > 0 else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", sha)
        self.send_header("Content-Disposition", f'inline; filename="{quote(path.rsplit("/", 1)[-1])}"')
        if f["lfs"]:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(size))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "GET" and length:
            with open(blob, "rb") as fh:
                fh.seek(start)
                remaining = length
                while remaining > 0:
                    chunk = fh.read(min(READ_CHUNK, remaining))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
        self._record(status)


def _front_matter_strict(content: str) -> dict:
    """Parse README front matter the way the Hub validates it; ValueError with the reason when it is invalid."""
    if not content.startswith("---"):
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
    if not match:
        raise ValueError("Unterminated YAML front matter")
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        raise ValueError(f"Invalid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError("YAML front matter must be a mapping")
    return data or {}


class HubServer:
    """A running server: `url`, `root`, `request_log` (method, raw path, status), `stop()`."""

    def __init__(self, root: str | os.PathLike, port: int = 0, verbose: bool = False, tree_page_size: int | None = None):
        self.root = Path(root)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), HubRequestHandler)
        self.httpd.daemon_threads = True
        self.httpd.store = HubStore(self.root)
        self.httpd.verbose = verbose
        self.httpd.request_log = []
        self.httpd.tree_page_size = tree_page_size
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    @property
    def request_log(self) -> list[tuple[str, str, int]]:
        return self.httpd.request_log

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"hub-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def start_hub_server(root: str | os.PathLike, port: int = 0, **kwargs):
    """Serve a Hub-compatible API for repos stored under `root` from a background thread on 127.0.0.1.

    Returns `(url, stop)`; `stop()` shuts the server down and closes its socket.
    """
    server = HubServer(root, port=port, **kwargs).start()
    return server.url, server.stop


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--root", required=True, help="folder holding the repos")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    server = HubServer(args.root, port=args.port, verbose=args.verbose)
    print(server.port, flush=True)
    try:
        server.httpd.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
