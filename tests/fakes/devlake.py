"""A fake Apache DevLake webhook that checks keys and bodies the way DevLake v1.0.x does.

Behaviour follows DevLake's webhook plugin (``backend/plugins/webhook``) and REST API-key middleware: 401/403 for a
missing or wrong key, the decode step (case-insensitive keys, weak typing, the date layouts; decode errors come back as
a bare JSON string), the validator (400 envelopes), 500 on malformed JSON, and the upsert storage: deployments
by ``id`` per connection, commit rows keyed by (row id, commit SHA), where a re-POST with another SHA *adds* a row.
A commit without ``result`` is stored as ``SUCCESS`` whatever the top level says, as DevLake does. Every answer
is DevLake's envelope (``shared.ApiOutputSuccess``/``ApiOutputError``): a stored deployment is
``200 {"code":0,"success":true,"message":"success","causes":null,"data":null}``.

``sso_redirect()`` puts a single-sign-on proxy in front of it, as a misconfigured ingress does: every API request is
redirected (302) to a login page that answers ``GET`` with ``200`` and HTML.

The issues routes (``POST …/connections/<id>/issues`` and ``…/issue/<issueKey>/close``) follow
``backend/plugins/webhook/api/issues.go``: the same keys and decoding, validation errors as a bare 400 string, and an
upsert of the ``issues`` row ``webhook:<connection>:<issueKey>`` on every POST (and, for ``type: INCIDENT``, of its
``incidents`` row).

Usage::

    with FakeDevLake() as devlake:
        devlake.add_connection(1, "key-1")
        ...  # POST to f"{devlake.url}/api/rest/plugins/webhook/connections/1/deployments"
        devlake.deployments(1)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import quote, unquote

from tests.fakes.server import FakeServer

ENVIRONMENTS = ("PRODUCTION", "STAGING", "TESTING", "DEVELOPMENT")
DEVLAKE_TIME = re.compile(
    r"^\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}:\d{2}(?:(?:[.,]\d{1,9})?Z|(?:[.,](?:\d{1,3}|\d{6}))?[+-]\d{2}:\d{2}"
    r"|(?:[.,]\d{1,9})?[+-]\d{4})| \d{2}:\d{2}(?::\d{2})?)?$"
)
"""The date strings DevLake's parser accepts: ``T`` with ``Z`` or an offset, the space form and a bare date."""

_ROUTE = re.compile(r"^/plugins/webhook/connections/([^/]+)/deployments$")
_TOP_STRINGS = ("id", "environment", "originalEnvironment", "result", "displayTitle", "name")
_TOP_TIMES = ("startedDate", "finishedDate", "createdDate")
_COMMIT_STRINGS = ("repoUrl", "commitSha", "result", "status", "refName", "commitMsg", "displayTitle", "name", "repoId")
_COMMIT_TIMES = ("startedDate", "finishedDate", "createdDate")
_STRUCT = "WebhookDeploymentReq"
_NOT_FOUND = b"404 page not found"
_LOGIN_PAGE = b"<!DOCTYPE html><html><body><h1>Sign in</h1><form method='post'></form></body></html>"

ISSUE_STATUSES = ("TODO", "DONE", "IN_PROGRESS")
_ISSUES_ROUTE = re.compile(r"^/plugins/webhook/connections/([^/]+)/issues$")
_CLOSE_ROUTE = re.compile(r"^/plugins/webhook/connections/([^/]+)/issue/([^/]+)/close$")
_ISSUE_STRINGS = (
    "url",
    "issueKey",
    "title",
    "description",
    "epicKey",
    "type",
    "status",
    "originalStatus",
    "parentIssueKey",
    "priority",
    "creatorId",
    "creatorName",
    "assigneeId",
    "assigneeName",
    "severity",
    "component",
)
_ISSUE_TIMES = ("resolutionDate", "createdDate", "updatedDate")
_ISSUE_NUMBERS = {
    "storyPoint": "float64",
    "leadTimeMinutes": "uint",
    "originalEstimateMinutes": "int64",
    "timeSpentMinutes": "int64",
    "timeRemainingMinutes": "int64",
}
_ISSUE_STRUCT = "WebhookIssueRequest"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    connection: int | None
    """The connection id in the path, when the path names one."""
    headers: dict[str, str]
    """Request headers; the ``Authorization`` value is replaced by its scheme and ``<redacted>``."""
    body: Any
    """Parsed JSON, or the raw text when it is not JSON."""
    status: int


@dataclass
class _Failure:
    status: int
    retry_after: float | str | None = None
    body: Any = None
    """The answer's body; ``None``: DevLake's failure envelope."""


@dataclass
class _State:
    keys: dict[str, str] = field(default_factory=dict)
    """API key -> allowedPath regex."""
    connections: set[int] = field(default_factory=set)
    deployments: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    deployment_rows: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    commit_rows: dict[int, dict[tuple[str, str], dict[str, Any]]] = field(default_factory=dict)
    issues: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Connection -> issue key -> ``issues`` row."""
    incidents: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Connection -> issue key -> ``incidents`` row."""
    requests: list[RecordedRequest] = field(default_factory=list)
    fail_next: list[_Failure] = field(default_factory=list)
    fail_always: _Failure | None = None
    delay: float = 0.0
    sso_login: str | None = None
    """The login page every API request is redirected to, when an SSO proxy is in front."""


class FakeDevLake(FakeServer):
    """The fake DevLake's HTTP server; a context manager."""

    thread_name = "fake-devlake"

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._state = _State()
        self._closing = threading.Event()
        self._bound()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _handler_for(self)

    def stopping(self) -> None:
        self._closing.set()

    # -- controls ----------------------------------------------------------------------------------

    def add_connection(self, connection_id: int, key: str) -> None:
        """A webhook connection with its auto-created key, scoped to ``/plugins/webhook/connections/<id>/.*``."""
        with self._lock:
            self._state.connections.add(connection_id)
            self._state.keys[key] = f"/plugins/webhook/connections/{connection_id}/.*"

    def remove_connection(self, connection_id: int) -> None:
        """Deleting a connection deletes its key too."""
        scope = f"/plugins/webhook/connections/{connection_id}/.*"
        with self._lock:
            self._state.connections.discard(connection_id)
            self._state.keys = {k: v for k, v in self._state.keys.items() if v != scope}

    def add_api_key(self, key: str, allowed_path: str = ".*") -> None:
        """A general key (``POST /api-keys``); its ``allowedPath`` is an unanchored regex on the path sans ``/rest``."""
        with self._lock:
            self._state.keys[key] = allowed_path

    def fail_next(self, n: int, status: int = 503, retry_after: float | str | None = None, body: Any = None) -> None:
        """Answer the next ``n`` requests with ``status`` (and ``Retry-After`` when given) before any other check;
        the body is ``body`` (JSON, or ``bytes`` as they are) or else DevLake's failure envelope."""
        with self._lock:
            self._state.fail_next.extend(_Failure(status, retry_after, body) for _ in range(n))

    def fail_always(self, status: int | None, retry_after: float | str | None = None, body: Any = None) -> None:
        """Answer every request with ``status`` (and ``body``, as ``fail_next``); ``None`` stops it."""
        with self._lock:
            self._state.fail_always = None if status is None else _Failure(status, retry_after, body)

    def sso_redirect(self, login_path: str | None = "/oauth2/start") -> None:
        """Redirect every API request (302) to ``login_path`` with the original URL in ``?rd=``, and answer ``GET``
        on it with a 200 HTML login page, as an SSO proxy does; ``None`` takes the proxy away."""
        with self._lock:
            self._state.sso_login = login_path

    def delay(self, seconds: float) -> None:
        """Server-side latency before every answer (pair it with a short client timeout)."""
        with self._lock:
            self._state.delay = seconds

    # -- what was received -------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._state.requests)

    @property
    def post_count(self) -> int:
        with self._lock:
            return sum(1 for request in self._state.requests if request.method == "POST")

    def deployments(self, connection_id: int) -> dict[str, dict[str, Any]]:
        """Deployment id -> the last accepted body for it on this connection."""
        with self._lock:
            return {k: json.loads(json.dumps(v)) for k, v in self._state.deployments.get(connection_id, {}).items()}

    def deployment_rows(self, connection_id: int) -> dict[str, dict[str, Any]]:
        """``cicd_deployments`` rows written through this connection, DevLake's defaults applied."""
        with self._lock:
            return {k: dict(v) for k, v in self._state.deployment_rows.get(connection_id, {}).items()}

    def commit_rows(self, connection_id: int) -> list[dict[str, Any]]:
        """``cicd_deployment_commits`` rows (snake_case columns, defaults applied), in insertion order."""
        with self._lock:
            return [dict(row) for row in self._state.commit_rows.get(connection_id, {}).values()]

    def issues(self, connection_id: int) -> dict[str, dict[str, Any]]:
        """Issue key -> its ``issues`` row (snake_case columns, DevLake's derived values), as last upserted."""
        with self._lock:
            return {k: dict(v) for k, v in self._state.issues.get(connection_id, {}).items()}

    def incidents(self, connection_id: int) -> dict[str, dict[str, Any]]:
        """Issue key -> its ``incidents`` row: what DevLake's DORA plugin links to deployments.

        Written only while the issue's ``type`` is ``INCIDENT``; a later POST of another type leaves it as it was.
        """
        with self._lock:
            return {k: dict(v) for k, v in self._state.incidents.get(connection_id, {}).items()}

    # -- request handling (runs on the server's threads) -------------------------------------------

    def _handle(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            delay = self._state.delay
        if delay > 0 and self._closing.wait(delay):
            return 503, _envelope("shutting down"), {}
        connection = _connection_in(path)
        text = raw.decode("utf-8", errors="replace")
        try:
            body: Any = json.loads(text) if text.strip() else None
        except ValueError:
            body = text
        status, answer, extra = self._respond(method, path, headers, text)
        recorded = dict(headers)
        for name in list(recorded):
            if name.lower() == "authorization":
                scheme = recorded[name].split(" ", 1)[0] if " " in recorded[name] else ""
                recorded[name] = f"{scheme} <redacted>".strip()
        with self._lock:
            self._state.requests.append(RecordedRequest(method, path, connection, recorded, body, status))
        return status, answer, extra

    def _respond(self, method: str, path: str, headers: dict[str, str], text: str) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            failure = self._state.fail_next.pop(0) if self._state.fail_next else self._state.fail_always
        if failure is not None:
            extra = {} if failure.retry_after is None else {"Retry-After": _header_value(failure.retry_after)}
            body = _envelope(f"fake failure {failure.status}") if failure.body is None else failure.body
            return failure.status, body, extra
        with self._lock:
            login = self._state.sso_login
        if login is not None:
            if path.split("?", 1)[0] == login:
                return 200, _LOGIN_PAGE, {"Content-Type": "text/html; charset=utf-8"}
            return 302, b"", {"Location": f"{self.url}{login}?rd={quote(path, safe='')}"}
        if not path.startswith("/api/rest/"):
            return 404, _NOT_FOUND, {}
        inner = path.removeprefix("/api/rest")
        denied = self._authenticate(inner, headers)
        if denied is not None:
            return denied[0], {"success": False, "message": denied[1]}, {}
        issue_answer = self._respond_issues(method, inner, text)
        if issue_answer is not None:
            return issue_answer
        route = _ROUTE.match(inner)
        if method != "POST" or route is None:
            return 404, _NOT_FOUND, {}
        if not route.group(1).isdigit() or int(route.group(1)) <= 0:
            return 400, _envelope("invalid connectionId (400)"), {}
        connection_id = int(route.group(1))
        with self._lock:
            known = connection_id in self._state.connections
        if not known:
            return 404, _envelope("record not found (404)"), {}
        return self._post_deployment(connection_id, text)

    def _authenticate(self, inner: str, headers: dict[str, str]) -> tuple[int, str] | None:
        value = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
        if value is None:
            return 401, "token is missing"
        if not value.startswith("Bearer ") or not value[len("Bearer ") :].strip():
            return 401, "token is not present or malformed"
        with self._lock:
            allowed = self._state.keys.get(value[len("Bearer ") :].strip())
        if allowed is None:
            return 403, "api key is invalid"
        if not re.search(allowed, inner):
            return 403, "path doesn't match api key's scope"
        return None

    def _post_deployment(self, connection_id: int, text: str) -> tuple[int, Any, dict[str, str]]:
        body = _json_object(text)
        if isinstance(body, tuple):
            return body

        errors: list[str] = []
        request = _decode(body, _TOP_STRINGS, _TOP_TIMES, "", errors)
        commits: list[dict[str, Any]] = []
        raw_commits = _lookup(body, "deploymentCommits")
        if isinstance(raw_commits, dict):
            raw_commits = [raw_commits]
        if isinstance(raw_commits, list):
            for index, item in enumerate(raw_commits):
                where = f"deploymentCommits[{index}]"
                if not isinstance(item, dict):
                    errors.append(f"'{where}' expected a map, got '{_go_type(item)}'")
                    continue
                commits.append(_decode(item, _COMMIT_STRINGS, _COMMIT_TIMES, f"{where}.", errors))
        elif raw_commits is not None:
            errors.append(f"'deploymentCommits': source data must be an array or slice, got {_go_type(raw_commits)}")
        if errors:
            return 400, f"{len(errors)} error(s) decoding:\n\n" + "\n".join(f"* {e}" for e in errors), {}

        failures = _validate(request, commits)
        if failures:
            message = (
                "input json error (400)\nWraps: (2) "
                + "\n  | ".join(failures)
                + "\nError types: (1) *hintdetail.withDetail (2) validator.ValidationErrors"
            )
            return 400, _envelope(message), {}
        if not commits:
            return 400, _envelope("deployment_commits is empty (400)"), {}
        self._store(connection_id, body, request, commits)
        return 200, {"code": 0, "success": True, "message": "success", "causes": None, "data": None}, {}

    def _store(
        self, connection_id: int, body: dict[str, Any], request: dict[str, Any], commits: list[dict[str, Any]]
    ) -> None:
        deployment_id = request["id"]
        environment = request["environment"] or "PRODUCTION"
        started, finished = request["startedDate"], request["finishedDate"]
        created = request["createdDate"] or started
        rows: list[dict[str, Any]] = []
        for commit in commits:
            sha, repo_url = commit["commitSha"], commit["repoUrl"]
            url_hash = hashlib.md5(repo_url.encode()).hexdigest()[:16]
            rows.append(
                {
                    "id": f"webhook:{connection_id}:{deployment_id}:{url_hash}:{sha}",
                    "cicd_deployment_id": deployment_id,
                    "cicd_scope_id": f"webhook:{connection_id}",
                    "repo_url": repo_url,
                    "commit_sha": sha,
                    "ref_name": commit["refName"] or "",
                    "commit_msg": commit["commitMsg"] or "",
                    "result": commit["result"] or "SUCCESS",
                    "status": commit["status"] or "DONE",
                    "environment": environment,
                    "created_date": commit["createdDate"] or created,
                    "started_date": commit["startedDate"],
                    "finished_date": commit["finishedDate"],
                    "duration_sec": int((finished - started).total_seconds()),
                    "display_title": commit["displayTitle"] or "",
                    "name": commit["name"] or f"deployment for {sha}",
                }
            )
        shas = ",".join(commit["commitSha"] for commit in commits)
        deployment_row = {
            "id": deployment_id,
            "cicd_scope_id": f"webhook:{connection_id}",
            "name": request["name"] or f"deploy {shas} to {environment}",
            "display_title": request["displayTitle"] or "",
            "result": request["result"] or "SUCCESS",
            "environment": environment,
            "created_date": created,
            "started_date": started,
            "finished_date": finished,
        }
        with self._lock:
            store = self._state.commit_rows.setdefault(connection_id, {})
            for row in rows:
                store[(row["id"], row["commit_sha"])] = row
            self._state.deployment_rows.setdefault(connection_id, {})[deployment_id] = deployment_row
            self._state.deployments.setdefault(connection_id, {})[deployment_id] = json.loads(json.dumps(body))

    # -- the issues routes ---------------------------------------------------------------------------

    def _respond_issues(self, method: str, inner: str, text: str) -> tuple[int, Any, dict[str, str]] | None:
        """The answer of an issues route, or ``None`` when ``inner`` is not one (gin matches the decoded path)."""
        path = unquote(inner.split("?", 1)[0])
        close = _CLOSE_ROUTE.match(path)
        route = _ISSUES_ROUTE.match(path) or close
        if method != "POST" or route is None:
            return None
        connection = self._known_connection(route.group(1))
        if not isinstance(connection, int):
            return connection
        if close is not None:
            return self._close_issue(connection, close.group(2))
        return self._post_issue(connection, text)

    def _known_connection(self, raw: str) -> int | tuple[int, Any, dict[str, str]]:
        if not raw.isdigit() or int(raw) <= 0:
            return 400, _envelope("invalid connectionId (400)"), {}
        with self._lock:
            known = int(raw) in self._state.connections
        return int(raw) if known else (404, _envelope("record not found (404)"), {})

    def _post_issue(self, connection_id: int, text: str) -> tuple[int, Any, dict[str, str]]:
        body = _json_object(text)
        if isinstance(body, tuple):
            return body

        errors: list[str] = []
        request = _decode(body, _ISSUE_STRINGS, _ISSUE_TIMES, "", errors)
        for name, kind in _ISSUE_NUMBERS.items():
            request[name] = _decode_number(_lookup(body, name), name, kind, errors)
        if errors:
            return 400, f"{len(errors)} error(s) decoding:\n\n" + "\n".join(f"* {e}" for e in errors), {}
        failures = _validate_issue(request)
        if failures:
            detail = "\n  | ".join(failures)
            types = "Error types: (1) *hintdetail.withDetail (2) validator.ValidationErrors"
            return 400, f"{detail}\nWraps: (2) {detail}\n{types}", {}
        issue, incident = _issue_rows(connection_id, request)
        with self._lock:
            self._state.issues.setdefault(connection_id, {})[issue["issue_key"]] = issue
            if incident is not None:
                self._state.incidents.setdefault(connection_id, {})[issue["issue_key"]] = incident
        return 200, {"code": 0, "success": True, "message": "success", "causes": None, "data": None}, {}

    def _close_issue(self, connection_id: int, issue_key: str) -> tuple[int, Any, dict[str, str]]:
        """Status ``DONE`` and an empty original status; ``resolution_date`` is left as it was, as DevLake does."""
        with self._lock:
            issue = self._state.issues.get(connection_id, {}).get(issue_key)
            if issue is None:
                return 404, _envelope("issue not found (404)"), {}
            issue.update(status="DONE", original_status="")
            incident = self._state.incidents.get(connection_id, {}).get(issue_key)
            if issue["type"] == "INCIDENT" and incident is not None:
                incident.update(status="DONE", original_status="")
        return 200, {"code": 0, "success": True, "message": "success", "causes": None, "data": None}, {}


# -- decoding and validation as DevLake does it ------------------------------------------------------


def _lookup(data: dict[str, Any], name: str) -> Any:
    """mapstructure matches keys case-insensitively (an exact match wins); ``null`` counts as absent."""
    if name in data:
        return data[name]
    lowered = name.lower()
    for key, value in data.items():
        if key.lower() == lowered:
            return value
    return None


def _decode(
    data: dict[str, Any], strings: tuple[str, ...], times: tuple[str, ...], prefix: str, errors: list[str]
) -> dict[str, Any]:
    decoded: dict[str, Any] = {}
    for name in strings:
        value = _lookup(data, name)
        if value is None:
            decoded[name] = ""
        elif isinstance(value, str):
            decoded[name] = value
        elif isinstance(value, bool):
            decoded[name] = "1" if value else "0"
        elif isinstance(value, int):
            decoded[name] = str(value)
        elif isinstance(value, float):
            decoded[name] = str(int(value)) if value.is_integer() else repr(value)
        else:
            decoded[name] = ""
            errors.append(f"'{prefix}{name}' expected type 'string', got unconvertible type '{_go_type(value)}'")
    for name in times:
        value = _lookup(data, name)
        decoded[name] = None
        if value is None:
            continue
        if not isinstance(value, str):
            errors.append(f"'{prefix}{name}' expected a map, got '{_go_type(value)}'")
            continue
        parsed = parse_devlake_time(value)
        if isinstance(parsed, str):
            errors.append(f"error decoding '{prefix}{name}': {parsed}")
        else:
            decoded[name] = parsed
    return decoded


def _validate(request: dict[str, Any], commits: list[dict[str, Any]]) -> list[str]:
    """go-playground validator messages, in struct field order."""
    failures: list[str] = []

    def fail(path: str, tag: str) -> None:
        failures.append(
            f"Key: '{_STRUCT}.{path}' Error:Field validation for '{path.rsplit('.', 1)[-1]}' failed on the '{tag}' tag"
        )

    if not request["id"]:
        fail("Id", "required")
    if request["startedDate"] is None:
        fail("StartedDate", "required")
    if request["finishedDate"] is None:
        fail("FinishedDate", "required")
    if request["environment"] and request["environment"] not in ENVIRONMENTS:
        fail("Environment", "oneof")
    for index, commit in enumerate(commits):
        where = f"DeploymentCommits[{index}]"
        if not commit["repoUrl"]:
            fail(f"{where}.RepoUrl", "required")
        if not commit["commitSha"]:
            fail(f"{where}.CommitSha", "required")
        if commit["startedDate"] is None:
            fail(f"{where}.StartedDate", "required")
        if commit["finishedDate"] is None:
            fail(f"{where}.FinishedDate", "required")
    return failures


def _decode_number(value: Any, name: str, kind: str, errors: list[str]) -> float | int:
    """mapstructure's weak decoding into a Go number (JSON numbers arrive as float64; Go truncates to integers)."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return float(value) if kind == "float64" else math.trunc(value)
    if isinstance(value, str):
        text = value or "0"
        try:
            return float(text) if kind == "float64" else int(text, 0)
        except ValueError:
            parser = {"float64": "ParseFloat", "uint": "ParseUint", "int64": "ParseInt"}[kind]
            target = {"float64": "float", "uint": "uint", "int64": "int"}[kind]
            errors.append(
                f"cannot parse '{name}' as {target}: strconv.{parser}: parsing {json.dumps(value)}: invalid syntax"
            )
            return 0
    errors.append(f"'{name}' expected type '{kind}', got unconvertible type '{_go_type(value)}'")
    return 0


def _validate_issue(request: dict[str, Any]) -> list[str]:
    """go-playground validator messages for ``WebhookIssueRequest``, in struct field order."""
    failures: list[str] = []

    def fail(name: str, tag: str) -> None:
        failures.append(f"Key: '{_ISSUE_STRUCT}.{name}' Error:Field validation for '{name}' failed on the '{tag}' tag")

    if not request["issueKey"]:
        fail("IssueKey", "required")
    if not request["title"]:
        fail("Title", "required")
    if request["status"] not in ISSUE_STATUSES:
        fail("Status", "oneof")
    if not request["originalStatus"]:
        fail("OriginalStatus", "required")
    if request["createdDate"] is None:
        fail("CreatedDate", "required")
    return failures


def _issue_rows(connection_id: int, request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The ``issues`` row and, for an ``INCIDENT``, the ``incidents`` row (``Issue.ToIncident``) DevLake upserts."""
    prefix = f"webhook:{connection_id}"

    def scoped(value: str) -> str:
        return f"{prefix}:{value}" if value else ""

    resolved, created = request["resolutionDate"], request["createdDate"]
    lead_time = request["leadTimeMinutes"]
    if lead_time == 0 and resolved is not None and created is not None:
        lead_time = math.trunc((resolved - created).total_seconds() / 60)
    issue = {
        "id": f"{prefix}:{request['issueKey']}",
        "board_id": prefix,
        "url": request["url"],
        "issue_key": request["issueKey"],
        "title": request["title"],
        "description": request["description"],
        "epic_key": request["epicKey"],
        "type": request["type"],
        "status": request["status"],
        "original_status": request["originalStatus"],
        "story_point": request["storyPoint"],
        "resolution_date": resolved,
        "created_date": created,
        "updated_date": request["updatedDate"],
        "lead_time_minutes": lead_time,
        "parent_issue_id": scoped(request["parentIssueKey"]),
        "priority": request["priority"],
        "original_estimate_minutes": request["originalEstimateMinutes"],
        "time_spent_minutes": request["timeSpentMinutes"],
        "time_remaining_minutes": request["timeRemainingMinutes"],
        "creator_id": scoped(request["creatorId"]),
        "creator_name": request["creatorName"],
        "assignee_id": scoped(request["assigneeId"]),
        "assignee_name": request["assigneeName"],
        "severity": request["severity"],
        "component": request["component"],
    }
    if issue["type"] != "INCIDENT":
        return issue, None
    incident = {
        "id": issue["id"],
        "scope_id": prefix,
        "table": "boards",
        "incident_key": issue["issue_key"],
        "parent_incident_id": issue["parent_issue_id"],
        **{
            column: issue[column]
            for column in (
                "url",
                "title",
                "description",
                "status",
                "original_status",
                "resolution_date",
                "created_date",
                "updated_date",
                "lead_time_minutes",
                "original_estimate_minutes",
                "time_spent_minutes",
                "time_remaining_minutes",
                "creator_id",
                "creator_name",
                "priority",
                "severity",
                "component",
                "assignee_id",
                "assignee_name",
            )
        },
    }
    return issue, incident


_NAIVE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:[.,]\d+)?$")
_COLON_OFFSET = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})[.,](\d+)([+-]\d{2}:\d{2})$")
_SPACE_WITH_REST = re.compile(r"^\d{4}-\d{2}-\d{2}( .+)$")


def parse_devlake_time(value: str) -> datetime | str:
    """An aware UTC datetime, or Go's parse error text for a string DevLake would refuse."""
    if DEVLAKE_TIME.match(value):
        normalised = value.replace(",", ".")
        if len(normalised) == 10:
            normalised += "T00:00:00"
        normalised = normalised.replace(" ", "T")
        try:
            parsed = datetime.fromisoformat(normalised.replace("Z", "+00:00"))
        except ValueError as error:
            return f'parsing time "{value}": {error}'
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    if _NAIVE.match(value):
        return f'parsing time "{value}" as "2006-01-02T15:04:05Z07:00": cannot parse "" as "Z07:00"'
    if match := _COLON_OFFSET.match(value):
        fraction, offset = match.group(2), match.group(3)
        kept = 3 if len(fraction) < 6 else 6
        layout = "2006-01-02T15:04:05." + "0" * kept + "-07:00"
        return f'parsing time "{value}" as "{layout}": cannot parse "{fraction[kept:]}{offset}" as "-07:00"'
    if match := _SPACE_WITH_REST.match(value):
        return f'parsing time "{value}" as "2006-01-02T15:04:05-07:00": cannot parse "{match.group(1)}" as "T"'
    return f'parsing time "{value}" as "2006-01-02T15:04:05Z07:00": cannot parse "{value}" as "2006"'


def _go_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    return "map[string]interface {}"


def _go_json_error(text: str, error: json.JSONDecodeError) -> str:
    if error.pos >= len(text.rstrip()):
        return "unexpected EOF"
    return f"invalid character {text[error.pos]!r} looking for beginning of value"


def _json_object(text: str) -> dict[str, Any] | tuple[int, Any, dict[str, str]]:
    """The request body as DevLake's Go handler binds it: empty is ``{}``; anything but an object is a 500."""
    if not text.strip():
        return {}
    try:
        body = json.loads(text)
    except json.JSONDecodeError as error:
        return 500, _envelope(_go_json_error(text, error)), {}
    if not isinstance(body, dict):
        kind = "array" if isinstance(body, list) else type(body).__name__
        return 500, _envelope(f"json: cannot unmarshal {kind} into Go value of type map[string]interface {{}}"), {}
    return body


def _envelope(message: str) -> dict[str, Any]:
    return {"code": 0, "success": False, "message": message, "causes": None, "data": None}


def _header_value(retry_after: float | str) -> str:
    if isinstance(retry_after, str):
        return retry_after
    return str(int(retry_after)) if float(retry_after).is_integer() else str(retry_after)


def _connection_in(path: str) -> int | None:
    match = re.search(r"/connections/(\d+)/", path)
    return int(match.group(1)) if match else None


def _handler_for(fake: FakeDevLake) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self._serve("POST")

        def do_GET(self) -> None:
            self._serve("GET")

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            status, answer, extra = fake._handle(method, self.path, dict(self.headers.items()), raw)
            plain = isinstance(answer, bytes)
            payload = answer if plain else json.dumps(answer).encode()
            content_type = extra.pop("Content-Type", "text/plain" if plain else "application/json; charset=utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
