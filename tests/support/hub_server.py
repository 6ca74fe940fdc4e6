"""A small Hub-compatible HTTP server on loopback, for pushing and pulling with the unmodified
`huggingface_hub` client (pointed at it through `HF_ENDPOINT`).

No Hub-compatible server that runs here could be installed from the package registries (see the
README's "Testing against a Hub" section), so this is the smallest honest stand-in. It speaks the
Hub's HTTP API for **model repositories** as `huggingface_hub` uses it, and nothing more:

- `GET  /api/whoami-v2`                                  the user a bearer token belongs to (401 otherwise)
- `POST /api/repos/create`                                create a repo; 409 with its url if it exists
- `GET  /api/models/{repo}[/revision/{rev}]`              repo info: sha, siblings, private
- `GET  /api/models/{repo}/tree/{rev}[/{path}]`           list files
- `POST /api/models/{repo}/paths-info/{rev}`              info on given paths
- `POST /api/models/{repo}/preupload/{rev}`               every file is uploaded "regular" (inline)
- `POST /api/models/{repo}/commit/{rev}`                  NDJSON commit: header, file, deletedFile,
                                                          deletedFolder; `parentCommit` checked (412)
- `HEAD|GET /{repo}/resolve/{rev}/{path}`                 download, with X-Repo-Commit, ETag and size
- `POST /api/validate-yaml`                               a README's metadata, checked as the Hub does
                                                          for the fields cards here use: a YAML mapping,
                                                          `tags` a list of strings, `base_model` repo ids,
                                                          `library_name`/`pipeline_tag` strings
- errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) so the
  client raises its own exception types.

Writes need `Authorization: Bearer <token>` with a token the server was given; private repos are
invisible without one (404 RepoNotFound, as on the Hub). Revisions are `main` or a commit sha; every
commit is kept, so old revisions stay downloadable.

Not covered: LFS and Xet storage (files that the Hub would store through LFS/Xet travel inline
here, base64 in the commit, which the client also supports), branches other than `main`, tags,
pull requests, datasets and spaces, gated repos, rate limits and redirects to a CDN.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    def at(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.commits[-1]
        return next((c for c in self.commits if c.sha == revision), None)


class HubState:
    """What the server holds: users by token, and repos with their full commit history."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = dict(tokens)  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path), for tests that check what the client did
        self.lock = threading.Lock()

    def create(self, repo_id: str, private: bool) -> Repo:
        initial = Commit(
            hashlib.sha1(f"init {repo_id}".encode()).hexdigest(),
            "initial commit",
            {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
        )
        repo = self.repos[repo_id] = Repo(repo_id, private, [initial])
        return repo


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
REV = r"(?P<rev>[^/]+)"


class HubHandler(BaseHTTPRequestHandler):
    state: HubState  # set on the subclass the server makes
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: tests read `state.requests` instead
        pass

    # -- plumbing -------------------------------------------------------------------------------
    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def dispatch(self, method: str):
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.query = parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        with self.state.lock:
            self.state.requests.append((method, path))
        routes = [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", r"/api/repos/create", self.create_repo),
            ("GET", rf"/api/models/{REPO}(?:/revision/{REV})?", self.repo_info),
            ("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<sub>.*))?", self.tree),
            ("POST", rf"/api/models/{REPO}/paths-info/{REV}", self.paths_info),
            ("POST", rf"/api/models/{REPO}/preupload/{REV}", self.preupload),
            ("POST", rf"/api/models/{REPO}/commit/{REV}", self.commit),
            ("GET", rf"/{REPO}/resolve/{REV}/(?P<file>.+)", self.resolve),
            ("HEAD", rf"/{REPO}/resolve/{REV}/(?P<file>.+)", self.resolve),
        ]
        try:
            for route_method, pattern, handler in routes:
                match = re.fullmatch(pattern, path)
                if match and route_method == method:
                    with self.state.lock:
                        handler(**{k: v for k, v in match.groupdict().items()})
                    return
            raise HubError(404, f"This server does not implement {method} {path} (see tests/support/hub_server.py).")
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            self.send_json({"error": error.message}, status=error.status, headers=headers)

    def send_json(self, payload, status: int = 200, headers: dict[str, str] | None = None):
        self.send_bytes(json.dumps(payload).encode(), status, {"Content-Type": "application/json", **(headers or {})})

    def send_bytes(self, data: bytes, status: int = 200, headers: dict[str, str] | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def user(self, required: bool) -> str | None:
        authorization = self.headers.get("Authorization", "")
        token = authorization.removeprefix("Bearer ").strip() if authorization.startswith("Bearer ") else None
        user = self.state.tokens.get(token) if token else None
        if token and user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        if required and user is None:
            raise HubError(401, "You must be authenticated to write to the Hub (pass a token).")
        return user

    def repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self.user(required=write)
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise HubError(404, f"Repository Not Found: {repo_id}", "RepoNotFound")
        if write and repo_id.split("/")[0] != user:
            raise HubError(403, f"{user} cannot write to {repo_id}")
        return repo

    def commit_at(self, repo: Repo, rev: str) -> Commit:
        commit = repo.at(unquote(rev))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # -- routes ---------------------------------------------------------------------------------
    def whoami(self):
        user = self.user(required=True)
        self.send_json(
            {
                "type": "user",
                "name": user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def validate_yaml(self):
        import yaml

        content = json.loads(self.body)["content"]
        match = re.match(r"^---\n(.*?)\n---", content, re.DOTALL)
        errors, warnings = [], []
        metadata = {}
        if not match:
            warnings.append({"message": "Empty or missing yaml metadata in repo card"})
        else:
            try:
                metadata = yaml.safe_load(match.group(1)) or {}
            except yaml.YAMLError as error:
                errors.append({"message": f"Invalid YAML: {error}"})
            if not errors and not isinstance(metadata, dict):
                errors.append({"message": "YAML metadata must be a mapping"})
        if not errors:
            tags = metadata.get("tags", [])
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                errors.append({"message": '"tags" must be an array of strings'})
            base = metadata.get("base_model")
            for name in base if isinstance(base, list) else ([] if base is None else [base]):
                if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
                    errors.append({"message": f'"base_model" must be a model id (owner/name); got {name!r}'})
            for key in ("library_name", "pipeline_tag"):
                if key in metadata and not isinstance(metadata[key], str):
                    errors.append({"message": f'"{key}" must be a string'})
        self.send_json({"errors": errors, "warnings": warnings}, status=400 if errors else 200)

    def create_repo(self):
        user = self.user(required=True)
        payload = json.loads(self.body)
        if payload.get("type", "model") != "model":
            raise HubError(400, "This server only hosts model repositories.")
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        if repo_id.split("/")[0] != user:
            raise HubError(403, f"{user} cannot create repositories under {repo_id.split('/')[0]}")
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.state.repos:
            self.send_json({"error": "You already created this model repo", "url": url}, status=409)
            return
        private = payload.get("visibility", "public") == "private" or bool(payload.get("private"))
        self.state.create(repo_id, private)
        self.send_json({"url": url, "name": repo_id, "id": repo_id})

    def repo_info(self, repo: str, rev: str | None = None):
        found = self.repo(repo)
        commit = self.commit_at(found, rev or "main")
        self.send_json(
            {
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.sha,
                "private": found.private,
                "disabled": False,
                "gated": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": [{"rfilename": name} for name in sorted(commit.files)],
            }
        )

    def file_entry(self, name: str, content: bytes) -> dict:
        return {"type": "file", "path": name, "size": len(content), "oid": git_blob_sha(content)}

    def tree(self, repo: str, rev: str, sub: str | None = None):
        commit = self.commit_at(self.repo(repo), rev)
        prefix = f"{sub.rstrip('/')}/" if sub else ""
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for name, content in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries.append(self.file_entry(name, content))
        if prefix and not entries and not folders:
            raise HubError(404, f"{sub} does not exist at {rev}", "EntryNotFound")
        self.send_json([{"type": "directory", "path": f, "oid": "", "size": 0} for f in sorted(folders)] + entries)

    def paths_info(self, repo: str, rev: str):
        commit = self.commit_at(self.repo(repo), rev)
        form = parse_qs(self.body.decode())
        paths = form.get("paths", [])
        self.send_json([self.file_entry(p, commit.files[p]) for p in paths if p in commit.files])

    def preupload(self, repo: str, rev: str):
        self.commit_at(self.repo(repo, write=True), rev)
        files = json.loads(self.body)["files"]
        self.send_json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})

    def commit(self, repo: str, rev: str):
        found = self.repo(repo, write=True)
        if unquote(rev) != "main":
            raise HubError(400, "This server only commits to main.")
        if self.query.get("create_pr"):
            raise HubError(400, "This server does not implement pull requests.")
        files = dict(found.commits[-1].files)
        message = ""
        for line in self.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent and parent != found.commits[-1].sha:
                    raise HubError(412, f"Parent commit {parent} is not the head of main.")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"{value['path']} does not exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {k: v for k, v in files.items() if not k.startswith(prefix)}
            else:
                raise HubError(400, f"This server does not implement commit operation {key!r} (no LFS/Xet storage).")
        digest = hashlib.sha1(found.commits[-1].sha.encode() + message.encode() + str(time.time_ns()).encode())
        for name in sorted(files):
            digest.update(name.encode() + git_blob_sha(files[name]).encode())
        commit = Commit(digest.hexdigest(), message, files)
        found.commits.append(commit)
        self.send_json(
            {"success": True, "commitOid": commit.sha, "commitUrl": f"{self.endpoint}/{repo}/commit/{commit.sha}"}
        )

    def resolve(self, repo: str, rev: str, file: str):
        commit = self.commit_at(self.repo(repo), rev)
        content = commit.files.get(file)
        headers = {"X-Repo-Commit": commit.sha}
        if content is None:
            raise HubError(404, f"Entry not found: {file}", "EntryNotFound")
        self.send_bytes(
            content,
            headers={**headers, "ETag": f'"{git_blob_sha(content)}"', "Content-Type": "application/octet-stream"},
        )


class LocalHub:
    """`with LocalHub({"hf_secret": "alice"}) as hub:` serves on 127.0.0.1 at `hub.endpoint`."""

    def __init__(self, tokens: dict[str, str]):
        self.state = HubState(tokens)
        handler = type("Handler", (HubHandler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.state.repos[repo_id].at(revision).files)
