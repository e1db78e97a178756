"""A stateful fake of the GitHub REST API for ``responses``, plus an in-memory ``CommitCache``.

``FakeGitHub`` serves what the reconciler uses, with the JSON shapes and status codes GitHub really returns:
``GET /repos/{o}/{r}`` (404 for a repository that does not exist or that the token cannot see: ``hide()``),
``GET /repos/{o}/{r}/commits/{ref}`` (422 "No commit found for SHA" for an unknown SHA, short SHAs resolved by
unique prefix), ``GET /repos/{o}/{r}/compare/{base}...{head}`` (computed from the commit graph: ahead / behind /
identical / diverged; paginated with ``Link`` headers, 250 commits without paging; 404 for an unknown ref),
``GET /search/commits?q=hash:SHA``, ``GET /rate_limit`` and ``POST /app/installations/{id}/access_tokens``. It
keeps rate-limit headers, can exhaust the rate limit, fail the next requests, and logs every request.

PyGithub puts an explicit ``:443`` in its URLs, so every route is a regex that accepts an optional port.

Usage::

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        fake = FakeGitHub(rsps, token="t0ken")
        shas = fake.add_commits("acme/api", 3)
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import responses
from requests import PreparedRequest

from reconciler.config import GitHubConfig, derive_web_url, validate_config

Reply = tuple[int, dict[str, str], str]

START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
DEFAULT_RESET = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)


@dataclass
class FakeCommit:
    sha: str
    message: str
    author_date: datetime | None
    committer_date: datetime | None
    parent: str | None
    author: str = "Dev Eloper"


@dataclass
class FakeRepo:
    full_name: str
    commits: dict[str, FakeCommit] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    fork_of: str | None = None
    private: bool = False
    visible: bool = True
    """``False``: the token cannot see it (a private repository outside its access): GitHub answers 404."""


class InMemoryCache:
    """A ``CommitCache`` (the state store's cache part) in a dict."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def cache_get(self, kind: str, keys: Sequence[str]) -> dict[str, str]:
        with self._lock:
            return {key: self.data[(kind, key)] for key in keys if (kind, key) in self.data}

    def cache_put(self, kind: str, items: Mapping[str, str]) -> None:
        with self._lock:
            for key, value in items.items():
                self.data[(kind, key)] = value

    def keys(self, kind: str) -> list[str]:
        return sorted(key for k, key in self.data if k == kind)


class SilentServer:
    """A GitHub that accepts connections on 127.0.0.1 and never answers: every request waits for its timeout.

    ``accepted`` counts connections, one per attempt (a timed-out connection is never reused)."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(128)
        self._socket.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self.accepted = 0
        self._open: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-github", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._open.append(connection)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self._socket.close()
        for connection in self._open:
            connection.close()

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def github_config(url: str = "https://api.github.com", **overrides: Any) -> GitHubConfig:
    """A validated ``GitHubConfig`` for tests: no rate-limit waiting, token from ``$GITHUB_TOKEN``."""
    section: dict[str, Any] = {"url": url, "max_rate_limit_wait": "0s", "timeout": "5s"}
    section.update(overrides)
    config = validate_config(
        {
            "clusters": [{"name": "test"}],
            "github": section,
            "devlake": {"url": "https://devlake.example.com", "connections": [{"id": 1, "api_key_env": "K"}]},
        }
    )
    return config.github


def fake_sha(*parts: object) -> str:
    return hashlib.sha1(":".join(str(p) for p in parts).encode()).hexdigest()


class FakeGitHub:
    """GitHub (api.github.com or an Enterprise ``https://HOST/api/v3``) behind ``responses`` callbacks."""

    def __init__(
        self,
        rsps: responses.RequestsMock,
        *,
        api_url: str = "https://api.github.com",
        token: str | None = None,
        app_installation_id: int | None = None,
        rate_limit: int = 5000,
        per_page_max: int = 100,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        parts = urlsplit(self.api_url)
        self.host = parts.hostname or ""
        self.prefix = parts.path.rstrip("/")
        self.web_url = derive_web_url(self.api_url)
        self.tokens: set[str] = {token} if token else set()
        self.require_auth = token is not None or app_installation_id is not None
        self.app_installation_id = app_installation_id
        self.installation_token = "ghs_FAKEinstallationTOKEN0000000000000000"
        self.repos: dict[str, FakeRepo] = {}
        self.rate_limit = rate_limit
        self.remaining = rate_limit
        self.reset_at = DEFAULT_RESET
        self.rate_limited_status: int | None = None
        self.secondary_limited = False
        self.canned: list[Reply | BaseException] = []
        self.gate: threading.Event | None = None
        """When set to an Event, every request waits for it (after setting ``entered``): for single-flight tests."""
        self.entered = threading.Event()
        self.per_page_max = per_page_max
        self.calls: list[tuple[str, str, dict[str, list[str]]]] = []
        self.tokens_issued = 0
        self._lock = threading.RLock()
        self.install(rsps)

    # -- routes --------------------------------------------------------------------------------------

    def install(self, rsps: responses.RequestsMock) -> None:
        base = rf"https?://{re.escape(self.host)}(?::\d+)?{re.escape(self.prefix)}"
        query = r"(?:\?.*)?$"
        routes: list[tuple[str, str, Any]] = [
            ("GET", rf"{base}/repos/[^/]+/[^/?]+{query}", self._get_repo),
            ("GET", rf"{base}/repos/[^/]+/[^/]+/commits/[^/?]+{query}", self._get_commit),
            ("GET", rf"{base}/repos/[^/]+/[^/]+/commits{query}", self._list_commits),
            ("GET", rf"{base}/repos/[^/]+/[^/]+/compare/[^/?]+{query}", self._compare),
            ("GET", rf"{base}/search/commits{query}", self._search),
            ("GET", rf"{base}/rate_limit{query}", self._rate_limit),
            ("POST", rf"{base}/app/installations/\d+/access_tokens{query}", self._access_token),
        ]
        for method, pattern, handler in routes:
            rsps.add_callback(
                method, re.compile(pattern), callback=self._wrap(handler), content_type="application/json"
            )

    def _wrap(self, handler: Any) -> Any:
        def callback(request: PreparedRequest) -> Reply:
            gate = self.gate
            if gate is not None:
                self.entered.set()
                gate.wait(10)
            with self._lock:
                parts = urlsplit(str(request.url))
                path = parts.path[len(self.prefix) :]
                params = parse_qs(parts.query)
                self.calls.append((str(request.method), path, params))
                if self.canned:
                    reply = self.canned.pop(0)
                    if isinstance(reply, BaseException):
                        raise reply
                    status, extra, text = reply
                    headers = self._headers()
                    headers.update(extra)
                    return status, headers, text
                is_rate_limit = path == "/rate_limit"
                is_token = path.startswith("/app/")
                if self.require_auth and not is_token and not self._authorised(request):
                    body = {"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"}
                    return 401, self._headers(), json.dumps(body)
                if self.secondary_limited and not is_rate_limit:
                    body = {
                        "message": "You have exceeded a secondary rate limit. Please wait a few minutes before "
                        "you try again. If you reach out to GitHub Support for help, please include the request ID.",
                        "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api",
                    }
                    return 403, self._headers(), json.dumps(body)
                if self.rate_limited_status is not None and not is_rate_limit:
                    headers = self._headers()
                    headers["X-RateLimit-Remaining"] = "0"
                    body = {
                        "message": "API rate limit exceeded for installation ID 4242.",
                        "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api",
                    }
                    return self.rate_limited_status, headers, json.dumps(body)
                if not is_rate_limit and not is_token:
                    self.remaining = max(0, self.remaining - 1)
                status, body_obj, extra = handler(request, path, params)
                headers = self._headers()
                headers.update(extra)
                return status, headers, json.dumps(body_obj)

        return callback

    def _authorised(self, request: PreparedRequest) -> bool:
        header = str(request.headers.get("Authorization", ""))
        scheme, _, value = header.partition(" ")
        return scheme.lower() in ("token", "bearer") and value in self.tokens

    def _headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.rate_limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(int(self.reset_at.timestamp())),
            "X-RateLimit-Used": str(self.rate_limit - self.remaining),
            "X-RateLimit-Resource": "core",
            "X-GitHub-Media-Type": "github.v3; format=json",
        }

    # -- building history ----------------------------------------------------------------------------

    def add_repo(self, full_name: str, *, fork_of: str | None = None) -> FakeRepo:
        with self._lock:
            repo = self.repos.get(full_name.lower())
            if repo is None:
                repo = FakeRepo(full_name, fork_of=fork_of)
                self.repos[full_name.lower()] = repo
                if fork_of is not None:
                    source = self.repos[fork_of.lower()]
                    repo.commits = dict(source.commits)
                    repo.order = list(source.order)
            return repo

    def add_commit(
        self,
        repo_name: str,
        *,
        parent: str | None = "head",
        message: str | None = None,
        author_date: datetime | None = None,
        committer_date: datetime | None = None,
        dated: bool = True,
        sha: str | None = None,
    ) -> str:
        """Add one commit; ``parent="head"`` continues the newest commit, ``None`` starts a root."""
        with self._lock:
            repo = self.add_repo(repo_name)
            if parent == "head":
                parent = repo.order[-1] if repo.order else None
            index = len(repo.order)
            sha = sha or fake_sha(repo.full_name, index, parent, message)
            when = START + timedelta(minutes=10 * index)
            repo.commits[sha] = FakeCommit(
                sha=sha,
                message=message or f"Change {index} of {repo.full_name}\n\nLonger description.",
                author_date=(author_date or when) if dated else None,
                committer_date=(committer_date or author_date or when) if dated else None,
                parent=parent,
            )
            repo.order.append(sha)
            return sha

    def add_commits(self, repo_name: str, count: int, *, parent: str | None = "head") -> list[str]:
        """``count`` commits in a line, oldest first."""
        shas: list[str] = []
        for _ in range(count):
            shas.append(self.add_commit(repo_name, parent=parent))
            parent = shas[-1]
        return shas

    def head(self, repo_name: str) -> str:
        return self.repos[repo_name.lower()].order[-1]

    def hide(self, repo_name: str, *, hidden: bool = True) -> None:
        """The token loses (``hidden=False``: regains) access to the repository: every request about it is a 404."""
        with self._lock:
            self.add_repo(repo_name).visible = not hidden

    # -- behaviour switches --------------------------------------------------------------------------

    def exhaust_rate_limit(self, reset_at: datetime, *, status: int = 403) -> None:
        with self._lock:
            self.rate_limited_status = status
            self.remaining = 0
            self.reset_at = reset_at

    def restore_rate_limit(self, reset_at: datetime | None = None) -> None:
        with self._lock:
            self.rate_limited_status = None
            self.secondary_limited = False
            self.remaining = self.rate_limit
            if reset_at is not None:
                self.reset_at = reset_at

    def fail_next(self, count: int, status: int = 502) -> None:
        """The next ``count`` requests (whatever they ask) get ``status``."""
        body = json.dumps({"message": "Server Error"})
        with self._lock:
            self.canned.extend([(status, {}, body)] * count)

    def reply_next(
        self, status: int, body: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        """The next request gets this reply (queued after earlier canned replies)."""
        with self._lock:
            self.canned.append((status, dict(headers or {}), json.dumps(dict(body or {"message": "canned"}))))

    def raise_next(self, error: BaseException) -> None:
        """The next request fails at the transport with ``error`` (a requests ConnectionError, Timeout…)."""
        with self._lock:
            self.canned.append(error)

    # -- inspection ----------------------------------------------------------------------------------

    def count(self, kind: str, repo: str | None = None) -> int:
        """Requests of one kind: ``repo``, ``commit``, ``commits`` (a list), ``compare``, ``search``, ``rate_limit``,
        ``token`` or ``all``."""
        total = 0
        for _method, path, _params in self.calls:
            if kind != "all" and _kind(path) != kind:
                continue
            if repo is not None and not path.lower().startswith(f"/repos/{repo.lower()}/"):
                continue
            total += 1
        return total

    def paths(self, kind: str = "all") -> list[str]:
        return [path for _m, path, _p in self.calls if kind == "all" or _kind(path) == kind]

    # -- JSON ----------------------------------------------------------------------------------------

    def commit_json(self, repo: FakeRepo, commit: FakeCommit, *, full: bool) -> dict[str, Any]:
        api = f"{self.api_url}/repos/{repo.full_name}"
        web = f"{self.web_url}/{repo.full_name}"

        def person(when: datetime | None) -> dict[str, Any] | None:
            if when is None:
                return None
            return {"name": commit.author, "email": "dev@example.com", "date": when.strftime("%Y-%m-%dT%H:%M:%SZ")}

        data: dict[str, Any] = {
            "sha": commit.sha,
            "node_id": "C_kwDO" + commit.sha[:20],
            "commit": {
                "author": person(commit.author_date),
                "committer": person(commit.committer_date),
                "message": commit.message,
                "tree": {"sha": fake_sha("tree", commit.sha), "url": f"{api}/git/trees/{fake_sha('tree', commit.sha)}"},
                "url": f"{api}/git/commits/{commit.sha}",
                "comment_count": 0,
                "verification": {"verified": False, "reason": "unsigned", "signature": None, "payload": None},
            },
            "url": f"{api}/commits/{commit.sha}",
            "html_url": f"{web}/commit/{commit.sha}",
            "comments_url": f"{api}/commits/{commit.sha}/comments",
            "author": {"login": "developer", "id": 1001, "type": "User"},
            "committer": {"login": "web-flow", "id": 19864447, "type": "User"},
            "parents": (
                []
                if commit.parent is None
                else [
                    {
                        "sha": commit.parent,
                        "url": f"{api}/commits/{commit.parent}",
                        "html_url": f"{web}/commit/{commit.parent}",
                    }
                ]
            ),
        }
        if full:
            data["stats"] = {"total": 2, "additions": 1, "deletions": 1}
            data["files"] = [
                {"sha": fake_sha("blob", commit.sha), "filename": "main.go", "status": "modified", "changes": 2}
            ]
        return data

    def repository_json(self, repo: FakeRepo) -> dict[str, Any]:
        owner, name = repo.full_name.split("/", 1)
        return {
            "id": int(fake_sha(repo.full_name)[:6], 16),
            "name": name,
            "full_name": repo.full_name,
            "owner": {"login": owner, "type": "Organization"},
            "private": repo.private,
            "fork": repo.fork_of is not None,
            "html_url": f"{self.web_url}/{repo.full_name}",
            "url": f"{self.api_url}/repos/{repo.full_name}",
        }

    # -- handlers ------------------------------------------------------------------------------------

    def _repo(self, path: str) -> FakeRepo | None:
        """The repository of a ``/repos/{o}/{r}...`` path, if it exists and the token can see it."""
        owner, name = path.split("/")[2:4]
        repo = self.repos.get(f"{owner}/{name}".lower())
        return repo if repo is not None and repo.visible else None

    def _get_repo(
        self, request: PreparedRequest, path: str, params: dict[str, list[str]]
    ) -> tuple[int, Any, dict[str, str]]:
        repo = self._repo(path)
        if repo is None:
            body = {
                "message": "Not Found",
                "documentation_url": "https://docs.github.com/rest/repos/repos#get-a-repository",
                "status": "404",
            }
            return 404, body, {}
        return 200, self.repository_json(repo), {}

    def _resolve(self, repo: FakeRepo, ref: str) -> str | None:
        ref = ref.lower()
        if ref in repo.commits:
            return ref
        if len(ref) < 4:
            return None
        matches = [sha for sha in repo.commits if sha.startswith(ref)]
        return matches[0] if len(matches) == 1 else None

    def _get_commit(
        self, request: PreparedRequest, path: str, params: dict[str, list[str]]
    ) -> tuple[int, Any, dict[str, str]]:
        repo = self._repo(path)
        if repo is None:
            return 404, _not_found("get-a-commit"), {}
        ref = path.rsplit("/", 1)[1]
        sha = self._resolve(repo, ref)
        if sha is None:
            body = {
                "message": f"No commit found for SHA: {ref}",
                "documentation_url": "https://docs.github.com/rest/commits/commits#get-a-commit",
                "status": "422",
            }
            return 422, body, {}
        return 200, self.commit_json(repo, repo.commits[sha], full=True), {}

    def _list_commits(
        self, request: PreparedRequest, path: str, params: dict[str, list[str]]
    ) -> tuple[int, Any, dict[str, str]]:
        """The default branch's commits, newest first (``per_page``); 409 for an empty repository, as GitHub."""
        repo = self._repo(path)
        if repo is None:
            return 404, _not_found("list-commits"), {}
        if not repo.order:
            body = {"message": "Git Repository is empty.", "status": "409"}
            return 409, body, {}
        per_page = int((params.get("per_page") or ["30"])[0])
        newest = [repo.commits[sha] for sha in reversed(repo.order)][:per_page]
        return 200, [self.commit_json(repo, commit, full=False) for commit in newest], {}

    def _ancestors(self, repo: FakeRepo, sha: str) -> list[str]:
        """``sha`` and its ancestors, newest first."""
        chain: list[str] = []
        current: str | None = sha
        while current is not None:
            chain.append(current)
            current = repo.commits[current].parent
        return chain

    def _compare(
        self, request: PreparedRequest, path: str, params: dict[str, list[str]]
    ) -> tuple[int, Any, dict[str, str]]:
        repo = self._repo(path)
        basehead = path.rsplit("/", 1)[1]
        if repo is None or "..." not in basehead:
            return 404, _not_found("compare-two-commits"), {}
        base_ref, head_ref = basehead.split("...", 1)
        base, head = self._resolve(repo, base_ref), self._resolve(repo, head_ref)
        if base is None or head is None:
            return 404, _not_found("compare-two-commits"), {}
        head_chain = self._ancestors(repo, head)
        base_chain = self._ancestors(repo, base)
        base_set, head_set = set(base_chain), set(head_chain)
        ahead = [sha for sha in reversed(head_chain) if sha not in base_set]
        behind = [sha for sha in base_chain if sha not in head_set]
        merge_base = next((sha for sha in head_chain if sha in base_set), None)
        if base == head:
            status = "identical"
        elif not behind:
            status = "ahead"
        elif not ahead:
            status = "behind"
        else:
            status = "diverged"
        headers: dict[str, str] = {}
        if "page" in params or "per_page" in params:
            page = int(params.get("page", ["1"])[0])
            per_page = min(int(params.get("per_page", ["30"])[0]), self.per_page_max)
            pages = max(1, -(-len(ahead) // per_page))
            shown = ahead[(page - 1) * per_page : page * per_page]
            links = []
            url = f"{self.api_url}/repos/{repo.full_name}/compare/{quote(basehead)}"
            if page < pages:
                links.append(f'<{url}?page={page + 1}&per_page={per_page}>; rel="next"')
                links.append(f'<{url}?page={pages}&per_page={per_page}>; rel="last"')
            if page > 1:
                links.append(f'<{url}?page={page - 1}&per_page={per_page}>; rel="prev"')
                links.append(f'<{url}?page=1&per_page={per_page}>; rel="first"')
            if links:
                headers["Link"] = ", ".join(links)
        else:
            page, shown = 1, ahead[:250]
        owner = repo.full_name.split("/")[0]
        body = {
            "url": f"{self.api_url}/repos/{repo.full_name}/compare/{basehead}",
            "html_url": f"{self.web_url}/{repo.full_name}/compare/{basehead}",
            "permalink_url": f"{self.web_url}/{repo.full_name}/compare/{owner}:{base[:7]}...{owner}:{head[:7]}",
            "diff_url": f"{self.web_url}/{repo.full_name}/compare/{basehead}.diff",
            "patch_url": f"{self.web_url}/{repo.full_name}/compare/{basehead}.patch",
            "base_commit": self.commit_json(repo, repo.commits[base], full=False),
            "merge_base_commit": (
                self.commit_json(repo, repo.commits[merge_base], full=False) if merge_base is not None else None
            ),
            "status": status,
            "ahead_by": len(ahead),
            "behind_by": len(behind),
            "total_commits": len(ahead),
            "commits": [self.commit_json(repo, repo.commits[sha], full=False) for sha in shown],
            "files": [] if page > 1 else [{"filename": "main.go", "status": "modified", "changes": len(ahead)}],
        }
        return 200, body, headers

    def _search(
        self, request: PreparedRequest, path: str, params: dict[str, list[str]]
    ) -> tuple[int, Any, dict[str, str]]:
        query = params.get("q", [""])[0]
        match = re.search(r"hash:([0-9a-fA-F]+)", query)
        items: list[dict[str, Any]] = []
        if match:
            wanted = match.group(1).lower()
            for repo in self.repos.values():
                if not repo.visible:
                    continue
                for sha, commit in repo.commits.items():
                    if sha.startswith(wanted):
                        item = self.commit_json(repo, commit, full=False)
                        item["repository"] = self.repository_json(repo)
                        item["score"] = 1.0
                        items.append(item)
        headers = {"X-RateLimit-Resource": "search", "X-RateLimit-Limit": "30", "X-RateLimit-Remaining": "29"}
        return 200, {"total_count": len(items), "incomplete_results": False, "items": items}, headers

    def _rate_limit(
        self, request: PreparedRequest, path: str, params: dict[str, list[str]]
    ) -> tuple[int, Any, dict[str, str]]:
        core = {
            "limit": self.rate_limit,
            "remaining": self.remaining,
            "reset": int(self.reset_at.timestamp()),
            "used": self.rate_limit - self.remaining,
            "resource": "core",
        }
        search = {
            "limit": 30,
            "remaining": 30,
            "reset": int(self.reset_at.timestamp()),
            "used": 0,
            "resource": "search",
        }
        return 200, {"resources": {"core": core, "search": search}, "rate": core}, {}

    def _access_token(
        self, request: PreparedRequest, path: str, params: dict[str, list[str]]
    ) -> tuple[int, Any, dict[str, str]]:
        installation = int(path.split("/")[3])
        header = str(request.headers.get("Authorization", ""))
        if not header.startswith("Bearer ") or header.count(".") != 2:
            return 401, {"message": "A JSON web token could not be decoded"}, {}
        if installation != self.app_installation_id:
            return 404, _not_found("create-an-installation-access-token-for-an-app"), {}
        self.tokens.add(self.installation_token)
        self.tokens_issued += 1
        expires = datetime.now(UTC) + timedelta(hours=1)
        body = {
            "token": self.installation_token,
            "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "permissions": {"contents": "read", "metadata": "read"},
            "repository_selection": "all",
        }
        return 201, body, {}


def _kind(path: str) -> str:
    if path.startswith("/repos/") and path.count("/") == 3:
        return "repo"
    if path.startswith("/repos/") and "/commits/" in path:
        return "commit"
    if path.startswith("/repos/") and path.endswith("/commits"):
        return "commits"
    if path.startswith("/repos/") and "/compare/" in path:
        return "compare"
    if path.startswith("/search/"):
        return "search"
    if path.startswith("/rate_limit"):
        return "rate_limit"
    if path.startswith("/app/"):
        return "token"
    return "other"


def _not_found(anchor: str) -> dict[str, str]:
    return {
        "message": "Not Found",
        "documentation_url": f"https://docs.github.com/rest/commits/commits#{anchor}",
        "status": "404",
    }
