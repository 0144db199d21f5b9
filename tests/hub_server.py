"""A loopback stand-in for the Hugging Face Hub's HTTP API, spoken well enough for the REAL
`huggingface_hub` client (2.x, httpx) to create repos, commit files, read repo info and trees, and
download files. Nothing is mocked inside Python: requests go over a socket on 127.0.0.1.

    server = HubServer(tokens={"hf_write": ("alice", "write"), "hf_read": ("alice", "read")}).start()
    point_client_at(server, monkeypatch, cache_dir)      # huggingface_hub.constants -> this server
    ...                                                  # HfApi / snapshot_download as usual
    server.files("alice/my-lora")                        # {path: bytes} at main
    server.requests                                      # every request, recorded
    server.stop()                                        # also by itself after `max_lifetime_s`

Routes (models only; {rev} = a branch name or a full commit sha, URL-quoted by the client):
    POST /api/repos/create                         json {name, organization, visibility|private, type}
    DELETE /api/repos/delete                       json {name, organization, type}
    POST /api/validate-yaml                        json {content, repoType}
    GET  /api/whoami-v2
    GET  /api/models/{ns}/{name}[/revision/{rev}]  info with sha, siblings, cardData (from README.md)
    GET  /api/models/{ns}/{name}/tree/{rev}[/{path}]?recursive=&expand=
    POST /api/models/{ns}/{name}/paths-info/{rev}  form paths=...&expand=
    POST /api/models/{ns}/{name}/preupload/{rev}   -> uploadMode "regular" for every file (no LFS/Xet)
    POST /api/models/{ns}/{name}/commit/{rev}      NDJSON: header, file (base64), deletedFile, deletedFolder
    HEAD/GET /{ns}/{name}/resolve/{rev}/{path}     X-Repo-Commit, ETag, Content-Length; Range on GET

Errors as the Hub sends them: 401 (no or unknown token; an unknown one carries
`X-Error-Message: Invalid credentials in Authorization header`), 403 (read-only token or another
user's namespace), 404 with `X-Error-Code` RepoNotFound / RevisionNotFound / EntryNotFound (a private
repo of another user is "not found", as on the Hub), 409 (repo exists), 412 (stale parentCommit).
Like the Hub, preupload answers the git-sha1 `oid` of files that already exist, so the client skips
unchanged files and an all-unchanged commit is never sent.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_NAME = r"[A-Za-z0-9][\w.-]*"
_REPO = rf"(?P<repo>{_NAME}/{_NAME})"
_ROUTES = [  # (method, pattern, handler name); the first match wins
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
    ("POST", rf"/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "model_info"),
    ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_hash(data: bytes) -> str:
    """git's blob sha1 (`git hash-object`): the Hub's oid of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def front_matter(text: str) -> dict | None:
    """The YAML metadata block of a README.md (None when there is none). Raises on invalid YAML."""
    import yaml

    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    return None if m is None else (yaml.safe_load(m.group(1)) or {})


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    date: str
    files: dict[str, bytes]  # the whole tree at this commit


@dataclass
class Repo:
    id: str
    owner: str
    private: bool
    created_at: str
    commits: list[Commit] = field(default_factory=list)  # oldest first
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid


@dataclass
class Recorded:
    method: str
    path: str  # unquoted URL path, without the query
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased; "authorization" is here as sent (auth needs it)
    body: bytes
    status: int = 0


class _HTTPError(Exception):
    """An HTTP error answer: status, JSON message and the Hub's X-Error-* headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, dict(headers or {})
        self.extra = extra  # more JSON fields of the answer


class HubServer:
    """The in-memory Hub. `tokens`: {token: (user, "read" | "write")}."""

    def __init__(self, tokens: dict[str, tuple[str, str]] | None = None, *, allow_anonymous_read: bool = False,
                 max_lifetime_s: float = 900.0):  # fmt: skip
        self.tokens = dict(tokens or {"hf_loopback_write": ("user", "write")})
        self.allow_anonymous_read = allow_anonymous_read
        self.max_lifetime_s = max_lifetime_s
        self.repos: dict[str, Repo] = {}
        self.requests: list[Recorded] = []
        self.lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._stop_lock = threading.Lock()
        self._counter = 0

    # ---- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # loopback only, a free port
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="loopback-hub", daemon=True)  # fmt: skip
        self._thread.start()
        # Bounded: stops by itself even if nobody calls stop() (a crashed fixture, an aborted session).
        self._timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        with self._stop_lock:  # the timer, atexit and the fixture may all call this
            httpd = self._httpd
            if self._timer is not None and self._timer is not threading.current_thread():
                self._timer.cancel()
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(timeout=5)
            self._httpd = None  # only now: `running` turns false once the port is really closed

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- what tests look at ----------------------------------------------------------------------

    def commits(self, repo_id: str) -> list[Commit]:
        return list(self.repos[repo_id].commits)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self.lock:
            return dict(self._commit(self.repos[repo_id], revision).files)

    def uploaded_blobs(self) -> list[tuple[str, str, bytes]]:
        """(repo id, path, content) of every file version ever committed, in every repo."""
        with self.lock:
            return [(r.id, p, b) for r in self.repos.values() for c in r.commits for p, b in c.files.items()]

    def requests_to(self, method: str, pattern: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    # ---- state helpers (hold self.lock) ----------------------------------------------------------

    def _new_commit(self, repo: Repo, parent: Commit | None, title: str, files: dict[str, bytes]) -> Commit:
        self._counter += 1
        h = hashlib.sha1(f"{repo.id}\n{parent.oid if parent else ''}\n{title}\n{self._counter}\n".encode())
        for path in sorted(files):
            h.update(f"{path}\0{git_hash(files[path])}\n".encode())
        commit = Commit(h.hexdigest(), parent.oid if parent else None, title, _now(), files)
        repo.commits.append(commit)
        return commit

    def _repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and repo.owner != user):  # the Hub hides private repos: 404
            raise _HTTPError(404, f"Repository not found: {repo_id}", "RepoNotFound",
                           {"X-Error-Message": "Repository not found"})  # fmt: skip
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        oid = repo.branches.get(rev, rev)
        for commit in repo.commits:
            if commit.oid == oid:
                return commit
        raise _HTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound", {"X-Error-Message": "Invalid rev id"})

    def _user(self, headers, need: str) -> str | None:
        """Who is asking; 401 without a valid token (reads may be anonymous), 403 for read tokens on writes."""
        auth = headers.get("authorization")
        if not auth:
            if need == "read" and self.allow_anonymous_read:
                return None
            raise _HTTPError(401, "Authorization header is required: log in or pass a token")
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise _HTTPError(401, "Invalid credentials in Authorization header", None,
                           {"X-Error-Message": "Invalid credentials in Authorization header"})  # fmt: skip
        user, role = self.tokens[token]
        if need == "write" and role != "write":
            raise _HTTPError(403, f"This token ({role} access) cannot write: a token with write access is needed")
        return user


def _entry(path: str, files: dict[str, bytes], commits: list[Commit] | None) -> dict:
    """A tree / paths-info entry; `commits` (oldest first) adds lastCommit, as expand=True does."""
    if path in files:
        out = {"type": "file", "oid": git_hash(files[path]), "size": len(files[path]), "path": path}
    else:
        inside = sorted(p for p in files if p.startswith(path + "/"))
        digest = hashlib.sha1("".join(f"{p}{git_hash(files[p])}" for p in inside).encode()).hexdigest()
        out = {"type": "directory", "oid": digest, "size": 0, "path": path}
    if commits:
        def state(c):
            return {p: b for p, b in c.files.items() if p == path or p.startswith(path + "/")}

        last = commits[-1]
        for older in reversed(commits[:-1]):
            if state(older) != state(last):
                break
            last = older
        out["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
    return out


def _folders(files: dict[str, bytes]) -> set[str]:
    return {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
    timeout = 30  # an idle keep-alive connection is dropped after this

    def log_message(self, *args) -> None:  # quiet: tests read server.requests instead
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # ---- plumbing --------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path = split.path
        record = Recorded(method, unquote(path), parse_qs(split.query), {k.lower(): v for k, v in self.headers.items()}, self._body())
        with self.hub.lock:
            self.hub.requests.append(record)
        try:
            for m, pattern, name in _ROUTES:
                match = re.fullmatch(pattern, path) if m == method else None
                if match:
                    groups = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    status, headers, body = getattr(self, "_" + name)(record, **groups)
                    break
            else:
                raise _HTTPError(404, f"loopback hub: no route for {method} {path}")
        except _HTTPError as e:
            status, headers, body = e.status, dict(e.headers), json.dumps({"error": e.message, **e.extra}).encode()
            if e.code:
                headers["X-Error-Code"] = e.code
            headers.setdefault("Content-Type", "application/json")
        except Exception as e:  # noqa: BLE001 -- a server bug must surface as a 500, not a hung client
            status, headers, body = 500, {"Content-Type": "application/json"}, json.dumps({"error": repr(e)}).encode()
        record.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    @staticmethod
    def _json(obj, status: int = 200, headers: dict | None = None):
        return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()

    # ---- routes ----------------------------------------------------------------------------------

    def _create_repo(self, req: Recorded):
        hub = self.hub
        user = hub._user(req.headers, "write")
        payload = json.loads(req.body or b"{}")
        if payload.get("type", "model") != "model":
            raise _HTTPError(400, f"loopback hub: only model repos, not {payload.get('type')!r}")
        ns, name = payload.get("organization") or user, payload.get("name", "")
        repo_id = f"{ns}/{name}"
        if not _REPO_ID.match(repo_id):
            raise _HTTPError(400, f"Invalid repo name {repo_id!r}")
        if ns != user:
            raise _HTTPError(403, f"You don't have the rights to create a model under the namespace {ns!r}")
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        with hub.lock:
            if repo_id in hub.repos:
                raise _HTTPError(409, "You already created this model repo", url=f"{hub.url}/{repo_id}")
            repo = Repo(repo_id, user, private, _now())
            first = hub._new_commit(repo, None, "initial commit", {".gitattributes": GITATTRIBUTES})
            repo.branches["main"] = first.oid
            hub.repos[repo_id] = repo
        return self._json({"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _delete_repo(self, req: Recorded):
        hub = self.hub
        user = hub._user(req.headers, "write")
        payload = json.loads(req.body or b"{}")
        repo_id = f"{payload.get('organization') or user}/{payload.get('name', '')}"
        with hub.lock:
            repo = hub._repo(repo_id, user)
            if repo.owner != user:
                raise _HTTPError(403, f"You don't have the rights to delete {repo_id}")
            del hub.repos[repo_id]
        return self._json({})

    def _validate_yaml(self, req: Recorded):
        self.hub._user(req.headers, "read")
        content = json.loads(req.body or b"{}").get("content", "")
        try:
            meta = front_matter(content)
        except Exception as e:  # noqa: BLE001 -- any YAML error is the client's 400
            return self._json({"errors": [{"message": f"Invalid YAML in README.md front matter: {e}"}]}, 400)
        if meta is None:
            return self._json({"warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        if not isinstance(meta, dict):
            return self._json({"errors": [{"message": "the YAML front matter must be a mapping"}]}, 400)
        errors = []  # a few of the Hub's own checks, enough to catch obvious mistakes
        if "license" in meta and not isinstance(meta["license"], str):
            errors.append('"license" must be a string')
        if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
            errors.append('"tags" must be a list of strings')
        bases = meta.get("base_model", [])
        for base in [bases] if isinstance(bases, str) else bases if isinstance(bases, list) else [bases]:
            if not (isinstance(base, str) and re.fullmatch(rf"({_NAME}/)?{_NAME}", base)):
                errors.append(f'"base_model" must be Hub model ids, got {base!r}')
        if errors:
            return self._json({"errors": [{"message": m} for m in errors]}, 400)
        return self._json({"warnings": []})

    def _whoami(self, req: Recorded):
        user = self.hub._user(req.headers, "read")
        if user is None:
            raise _HTTPError(401, "Authorization header is required")
        role = self.hub.tokens[req.headers["authorization"].removeprefix("Bearer ").strip()][1]
        return self._json({"type": "user", "name": user, "orgs": [],
                           "auth": {"type": "access_token", "accessToken": {"displayName": "loopback", "role": role}}})  # fmt: skip

    def _model_info(self, req: Recorded, repo: str, rev: str | None = None):
        hub = self.hub
        user = hub._user(req.headers, "read")
        with hub.lock:
            r = hub._repo(repo, user)
            commit = hub._commit(r, rev or "main")
            files = dict(commit.files)
        try:
            card = front_matter(files["README.md"].decode()) if "README.md" in files else None
        except Exception:  # noqa: BLE001 -- a broken card just has no cardData
            card = None
        card = card if isinstance(card, dict) else None
        blobs = req.query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [{"rfilename": p, **({"size": len(b), "blobId": git_hash(b)} if blobs else {})} for p, b in sorted(files.items())]
        info = {
            "_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo, "author": r.owner,
            "sha": commit.oid, "lastModified": commit.date, "createdAt": r.created_at, "private": r.private,
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "siblings": siblings,
            "tags": list((card or {}).get("tags") or []), "library_name": (card or {}).get("library_name"),
            "pipeline_tag": (card or {}).get("pipeline_tag"), "cardData": card,
        }  # fmt: skip
        return self._json(info)

    def _commit_and_history(self, req: Recorded, repo: str, rev: str):
        """The commit `rev` names in `repo` (read access checked) and the commits up to it."""
        hub = self.hub
        user = hub._user(req.headers, "read")
        with hub.lock:
            r = hub._repo(repo, user)
            commit = hub._commit(r, rev)
            return commit, r.commits[: r.commits.index(commit) + 1]

    def _tree(self, req: Recorded, repo: str, rev: str, path: str | None = None):
        commit, history = self._commit_and_history(req, repo, rev)
        files, folders = commit.files, _folders(commit.files)
        path = (path or "").strip("/")
        if path and path not in folders:
            raise _HTTPError(404, f"{path} is not a folder at {rev}", "EntryNotFound", {"X-Error-Message": "Entry not found"})
        recursive = req.query.get("recursive", ["false"])[0].lower() == "true"
        expand = req.query.get("expand", ["false"])[0].lower() == "true"
        prefix = path + "/" if path else ""
        names = sorted(p for p in set(files) | folders if p.startswith(prefix) and p != path)
        if not recursive:
            names = [p for p in names if "/" not in p[len(prefix) :]]
        return self._json([_entry(p, files, history if expand else None) for p in names])

    def _paths_info(self, req: Recorded, repo: str, rev: str):
        commit, history = self._commit_and_history(req, repo, rev)
        form = parse_qs(req.body.decode())
        expand = form.get("expand", ["false"])[0].lower() == "true"
        known = set(commit.files) | _folders(commit.files)
        paths = [p.strip("/") for p in form.get("paths", [])]
        return self._json([_entry(p, commit.files, history if expand else None) for p in paths if p in known])

    def _preupload(self, req: Recorded, repo: str, rev: str):
        hub = self.hub
        user = hub._user(req.headers, "write")
        with hub.lock:
            r = hub._repo(repo, user)
            if r.owner != user:
                raise _HTTPError(403, f"You don't have write access to {repo}")
            commit = hub._commit(r, rev)
        out = []
        for f in json.loads(req.body or b"{}").get("files", []):
            entry = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
            if f["path"] in commit.files:
                entry["oid"] = git_hash(commit.files[f["path"]])
            out.append(entry)
        return self._json({"files": out, "commitOid": commit.oid})

    def _commit(self, req: Recorded, repo: str, rev: str):
        hub = self.hub
        user = hub._user(req.headers, "write")
        if req.query.get("create_pr"):
            raise _HTTPError(400, "loopback hub: pull requests are not supported")
        lines = [json.loads(x) for x in req.body.splitlines() if x.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HTTPError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        with hub.lock:
            r = hub._repo(repo, user)
            if r.owner != user:
                raise _HTTPError(403, f"You don't have write access to {repo}")
            if rev not in r.branches:
                raise _HTTPError(404, f"Invalid rev id: {rev} (commits go to a branch)", "RevisionNotFound")
            head = hub._commit(r, rev)
            if header.get("parentCommit") and header["parentCommit"] != head.oid:
                raise _HTTPError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise _HTTPError(400, f"unknown encoding {value.get('encoding')!r}")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise _HTTPError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: b for p, b in files.items() if not p.startswith(folder)}
                elif key == "lfsFile":
                    raise _HTTPError(400, "loopback hub: LFS/Xet uploads are not supported (preupload answers regular)")
                else:
                    raise _HTTPError(400, f"unknown commit operation {key!r}")
            commit = hub._new_commit(r, head, header.get("summary") or "", files)
            r.branches[rev] = commit.oid
        return self._json({"success": True, "commitOid": commit.oid, "commitUrl": f"{hub.url}/{repo}/commit/{commit.oid}",
                           "pullRequestUrl": None})  # fmt: skip

    def _resolve(self, req: Recorded, repo: str, rev: str, path: str):
        hub = self.hub
        user = hub._user(req.headers, "read")
        with hub.lock:
            r = hub._repo(repo, user)
            commit = hub._commit(r, rev)
        if path not in commit.files:
            raise _HTTPError(404, f"Entry not found: {path}", "EntryNotFound",
                           {"X-Error-Message": "Entry not found", "X-Repo-Commit": commit.oid})  # fmt: skip
        data = commit.files[path]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_hash(data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream", "Content-Length": str(len(data))}  # fmt: skip
        status = 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("range", "") or "")
        if m and req.method == "GET":
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
            headers["Content-Length"] = str(len(data))
        return status, headers, data


def point_client_at(server: HubServer, monkeypatch, cache_dir) -> None:
    """Send the real huggingface_hub client to `server` for one test (undone by monkeypatch).

    huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE into `huggingface_hub.constants` at import
    time, so setting the environment variables inside a running test is not enough: patch the
    constants that are read per call (the module-level `huggingface_hub.hf_api.api` object keeps the
    endpoint it was built with; `HfApi()` instances and `snapshot_download` read it fresh)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS | {"127.0.0.1"}))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache_dir / "no-stored-token"))  # no real login leaks in
    if hasattr(constants, "AGENT_HARNESSES_PATH"):  # a registry the client fetches from ENDPOINT and caches
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(cache_dir / "agent-harnesses.json"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # for subprocesses
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


if __name__ == "__main__":  # manual poking: python tests/hub_server.py
    with HubServer() as s:
        print(f"loopback hub at {s.url}, token hf_loopback_write (user 'user'); Ctrl-C stops")
        try:
            while s.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
