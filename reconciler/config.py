"""The configuration file: schema, environment overrides, secrets and readable validation errors.

One YAML file per environment. Every key is validated and unknown keys are rejected with their path.
Any value can be overridden by an environment variable ``DORA__SECTION__KEY`` (``__`` separates levels,
list items are addressed by index: ``DORA__DEVLAKE__CONNECTIONS__0__ID``). Secrets never live in the file:
it names the environment variables that hold them.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
import types
from collections.abc import Mapping
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "DORA__"


class ConfigError(Exception):
    """The configuration cannot be used. ``problems`` holds one line per problem, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> timedelta:
    """``30s``, ``5m``, ``1h``, ``2d``, ``250ms`` or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class Environment(StrEnum):
    PRODUCTION = "PRODUCTION"
    STAGING = "STAGING"
    TESTING = "TESTING"
    DEVELOPMENT = "DEVELOPMENT"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _read_secret(env_name: str | None) -> str | None:
    if not env_name:
        return None
    value = os.environ.get(env_name)
    return value if value else None


class ClusterConfig(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    kubeconfig: str | None = None
    """``None``: in-cluster service account, unless ``$KUBECONFIG`` or ``~/.kube/config`` exists."""
    context: str | None = None
    applications_file: str | None = Field(default=None, min_length=1)
    """Read the Applications from this file (``kubectl get applications.argoproj.io -A -o json`` or ``-o yaml``)
    instead of the Kubernetes API; a relative path is relative to the working directory, like ``kubeconfig``."""
    namespaces: list[str] = []
    label_selector: str | None = None
    environment: Environment | None = None
    page_size: int = Field(default=100, ge=1, le=5000)
    request_timeout: Duration = timedelta(seconds=60)
    verify_tls: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> ClusterConfig:
        if self.applications_file is not None and (self.kubeconfig is not None or self.context is not None):
            given = " and ".join(key for key in ("kubeconfig", "context") if getattr(self, key) is not None)
            raise ValueError(f"applications_file reads the Applications from a file: leave {given} out")
        return self


class ComponentConfig(_Section):
    label: str | None = None
    strip_suffixes: list[str] = []


class EnvironmentRule(_Section):
    match: str | None = None
    """Glob on ``namespace/name``."""
    source_path: str | None = None
    """Glob on any source's ``path``."""
    environment: Environment

    @model_validator(mode="after")
    def _one_criterion(self) -> EnvironmentRule:
        if (self.match is None) == (self.source_path is None):
            raise ValueError("give exactly one of match or source_path")
        return self


class ApplicationsConfig(_Section):
    include: list[str] = ["*"]
    exclude: list[str] = []
    component: ComponentConfig = ComponentConfig()
    environment_rules: list[EnvironmentRule] = []

    def selects(self, qualified_name: str) -> bool:
        """Whether ``namespace/name`` is included and not excluded."""
        return any(fnmatch.fnmatchcase(qualified_name, glob) for glob in self.include) and not any(
            fnmatch.fnmatchcase(qualified_name, glob) for glob in self.exclude
        )

    def component_of(self, name: str, labels: Mapping[str, str]) -> str:
        """The component: the configured label's value, else the name minus the first matching ``-suffix``."""
        if self.component.label and labels.get(self.component.label):
            return labels[self.component.label]
        for suffix in self.component.strip_suffixes:
            tail = f"-{suffix}"
            if name.endswith(tail) and len(name) > len(tail):
                return name[: -len(tail)]
        return name


class DetectionConfig(_Section):
    first_run: Literal["baseline", "backfill"] = "baseline"
    verdict_timeout: Duration = timedelta(hours=1)
    failure_on_out_of_sync_missing: bool = True
    detect_image_only_changes: bool = True
    deleted_grace: Duration = timedelta(days=7)
    """How long the snapshot of an Application that is no longer listed is kept."""


class RepositoryRule(_Section):
    image: str
    """Regex matched whole against the image repository (``registry/path/name``)."""
    repo: str
    """``owner/repo`` template filled from the regex's named groups."""

    @field_validator("image")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"not a valid regular expression: {error}") from None
        return value


class ImagesConfig(_Section):
    commit_tag_pattern: str | None = None
    """Regex matched whole against a tag; group ``sha`` (or the whole match) is the commit. ``None``: default rule."""
    repositories: list[RepositoryRule] = []
    search_fallback: bool = False
    ignore: list[str] = []
    """Image globs never considered (proxies, sidecars), matched against the raw reference and the repository."""

    @field_validator("commit_tag_pattern")
    @classmethod
    def _pattern_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"not a valid regular expression: {error}") from None
        return value


_GHE_COM_API = re.compile(r"^api\.(?P<subdomain>[a-z0-9-]+)\.ghe\.com$")


def derive_web_url(api_url: str) -> str:
    """The web address of the GitHub whose REST API is ``api_url``: ``https://api.github.com`` ->
    ``https://github.com``; GitHub Enterprise Cloud with data residency ``https://api.SUBDOMAIN.ghe.com`` ->
    ``https://SUBDOMAIN.ghe.com``; GitHub Enterprise Server ``https://HOST/api/v3`` (or any other) ->
    ``https://HOST``."""
    host = (urlsplit(api_url.strip()).hostname or "").lower()
    if host == "api.github.com":
        return "https://github.com"
    if match := _GHE_COM_API.fullmatch(host):
        return f"https://{match.group('subdomain')}.ghe.com"
    return f"https://{host}"


def _normalise_web_url(value: str) -> str:
    """``scheme://host[:port][/path]`` with a lower-case scheme and host and no trailing slash: the base of every
    ``repoUrl``, which DevLake compares byte for byte."""
    parts = urlsplit(value.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an https:// (or http://) address such as https://github.com")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("must be a plain address: no user, query or fragment")
    netloc = parts.hostname.lower() + (f":{parts.port}" if parts.port else "")
    return f"{parts.scheme.lower()}://{netloc}{parts.path.rstrip('/')}"


class GitHubConfig(_Section):
    enabled: bool = True
    """``False``: never ask GitHub. Full-SHA image tags (with a repository rule) and 40-hex GitOps revisions are
    still commits, known by repository and SHA alone: no message, no range, no short-SHA expansion, no search."""
    url: str = "https://api.github.com"
    """The REST API (``https://api.github.com``, ``https://HOST/api/v3``, ``https://api.SUBDOMAIN.ghe.com``, a
    proxy)."""
    web_url: str = "https://github.com"
    """Base of every canonical ``repoUrl`` and the host whose GitOps ``repoURL``s are GitHub repositories.
    Left out: derived from ``url`` (``derive_web_url``)."""
    token_env: str | None = "GITHUB_TOKEN"
    app_id: int | None = None
    """GitHub App authentication: app id, installation id and the env var holding the private key (PEM)."""
    app_installation_id: int | None = None
    app_private_key_env: str | None = None
    max_concurrency: int = Field(default=8, ge=1, le=64)
    max_commits_per_range: int = Field(default=1000, ge=1)
    max_rate_limit_wait: Duration = timedelta(seconds=60)
    timeout: Duration = timedelta(seconds=15)
    verify_tls: bool = True

    @model_validator(mode="before")
    @classmethod
    def _derive_web_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("web_url") is None:
            url = data.get("url", "https://api.github.com")
            if isinstance(url, str) and url.startswith(("http://", "https://")):
                data = {**data, "web_url": derive_web_url(url)}
            else:
                data = {key: value for key, value in data.items() if key != "web_url"}
        return data

    @field_validator("url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with https:// (or http://)")
        return value.rstrip("/")

    @field_validator("web_url")
    @classmethod
    def _web_url(cls, value: str) -> str:
        return _normalise_web_url(value)

    @model_validator(mode="after")
    def _app_auth_complete(self) -> GitHubConfig:
        given = [
            self.app_id is not None,
            self.app_installation_id is not None,
            bool(self.app_private_key_env),
        ]
        if any(given) and not all(given):
            raise ValueError("GitHub App auth needs app_id, app_installation_id and app_private_key_env together")
        return self

    def token(self) -> str | None:
        return _read_secret(self.token_env)

    def app_private_key(self) -> str | None:
        return _read_secret(self.app_private_key_env)


class StateConfig(_Section):
    url: str | None = Field(default=None, repr=False)
    """``redis://``/``rediss://``/``unix://`` URL, ``sqlite:///relative.db``, ``sqlite:////abs.db``; ``None``: embedded
    SQLite.
    Left out of the repr: a Redis URL can carry a password."""
    key_prefix: str = Field(default="dora", min_length=1)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://", "sqlite:///")):
            raise ValueError("must start with redis://, rediss://, unix:// or sqlite:///")
        return value


class ConnectionMatch(_Section):
    components: list[str] | None = None
    applications: list[str] | None = None
    clusters: list[str] | None = None
    namespaces: list[str] | None = None

    def matches(self, *, component: str, application: str, cluster: str, namespace: str) -> bool:
        """Every key given must match one of its globs."""
        checks = (
            (self.components, component),
            (self.applications, application),
            (self.clusters, cluster),
            (self.namespaces, namespace),
        )
        return all(globs is None or any(fnmatch.fnmatchcase(value, glob) for glob in globs) for globs, value in checks)


class ConnectionConfig(_Section):
    id: int = Field(gt=0)
    api_key_env: str = Field(min_length=1)
    match: ConnectionMatch | None = None
    """``None``: the global connection, which receives every deployment."""

    def api_key(self) -> str | None:
        return _read_secret(self.api_key_env)


class GitOpsCommit(StrEnum):
    """When a deployment carries the commit of its GitOps repository (``devlake.include_gitops_commit``)."""

    ALWAYS = "always"
    """Every deployment (``true``)."""
    FALLBACK = "fallback"
    """Only a deployment that changed no image commit (a config change, a redeploy, images without commit
    tags): the GitOps commit is then what it shipped, and every deployment keeps at least one commit."""
    NEVER = "never"
    """No deployment (``false``): one without an image commit is recorded, not sent."""


def _gitops_commit(value: Any) -> Any:
    if value is True:
        return GitOpsCommit.ALWAYS
    if value is False:
        return GitOpsCommit.NEVER
    if isinstance(value, str) and value.strip().lower() in {mode.value for mode in GitOpsCommit}:
        return GitOpsCommit(value.strip().lower())
    raise ValueError("must be fallback, true (always) or false (never)")


class DevLakeConfig(_Section):
    url: str
    commits: Literal["head", "range"] = "head"
    include_gitops_commit: Annotated[GitOpsCommit, BeforeValidator(_gitops_commit)] = GitOpsCommit.FALLBACK
    """*Refined* default: ``fallback`` (it was ``true``); ``docs/design.md`` §4 says why."""
    dedupe: Literal["component", "application"] = "component"
    timeout: Duration = timedelta(seconds=30)
    max_concurrency: int = Field(default=8, ge=1, le=64)
    retry_budget: Duration = timedelta(minutes=2)
    """Total time one tick may spend retrying deliveries; what is left is retried on the next tick."""
    verify_tls: bool = True
    connections: list[ConnectionConfig] = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with https:// (or http://)")
        return value.rstrip("/")

    @field_validator("connections")
    @classmethod
    def _unique_ids(cls, value: list[ConnectionConfig]) -> list[ConnectionConfig]:
        ids = [connection.id for connection in value]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"connection ids must be unique, repeated: {duplicates}")
        return value


class MetricsConfig(_Section):
    port: int = Field(default=9102, ge=0, le=65535)
    pushgateway: str | None = None
    job: str = "dora-reconciler"


class Config(_Section):
    environment: Environment = Environment.PRODUCTION
    clusters: list[ClusterConfig] = Field(min_length=1)
    applications: ApplicationsConfig = ApplicationsConfig()
    detection: DetectionConfig = DetectionConfig()
    images: ImagesConfig = ImagesConfig()
    github: GitHubConfig = GitHubConfig()
    state: StateConfig = StateConfig()
    devlake: DevLakeConfig
    schedule: str = "*/5 * * * *"
    metrics: MetricsConfig = MetricsConfig()

    @field_validator("clusters")
    @classmethod
    def _unique_cluster_names(cls, value: list[ClusterConfig]) -> list[ClusterConfig]:
        names = [cluster.name for cluster in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"cluster names must be unique, repeated: {duplicates}")
        return value

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        from reconciler.cron import cron_trigger  # APScheduler: imported only when a schedule is written out

        try:
            cron_trigger(value)
        except ValueError as error:
            raise ValueError(f"not a valid cron expression: {error}") from None
        return value

    def cluster(self, name: str) -> ClusterConfig:
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        raise KeyError(name)

    def environment_for(self, cluster: str, qualified_name: str, source_paths: list[str]) -> Environment:
        """``applications.environment_rules`` (first match wins), else the cluster's, else the top level."""
        for rule in self.applications.environment_rules:
            if rule.match is not None and fnmatch.fnmatchcase(qualified_name, rule.match):
                return rule.environment
            if rule.source_path is not None and any(
                fnmatch.fnmatchcase(path, rule.source_path) for path in source_paths
            ):
                return rule.environment
        cluster_environment = self.cluster(cluster).environment
        return cluster_environment if cluster_environment is not None else self.environment

    def missing_secrets(self, *, devlake: bool = True) -> list[str]:
        """One problem per environment variable the config names for a secret that is not set (or empty).

        ``github.token_env`` counts only when the config sets it: left at its default, an unset ``GITHUB_TOKEN``
        means unauthenticated GitHub, which works with a low rate limit; with ``github.enabled: false`` no GitHub
        secret is needed. ``devlake``: the connections' keys
        (a dry run sends nothing and needs none)."""
        named: list[tuple[str, str | None]] = []
        if self.github.enabled:
            if "token_env" in self.github.model_fields_set and self.github.app_id is None:
                named.append(("github.token_env", self.github.token_env))
            named.append(("github.app_private_key_env", self.github.app_private_key_env))
        if devlake:
            named += [
                (f"devlake.connections[{index}].api_key_env", connection.api_key_env)
                for index, connection in enumerate(self.devlake.connections)
            ]
        return [
            f"{key}: the environment variable {variable} is not set (or is empty)"
            for key, variable in named
            if variable and not _read_secret(variable)
        ]

    def secret_values(self) -> list[str]:
        """Every secret this config points at, so logging can redact them wherever they turn up."""
        values = [self.github.token(), self.github.app_private_key()]
        values += [connection.api_key() for connection in self.devlake.connections]
        return [value for value in values if value]


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment and validate. Raises ``ConfigError`` naming each bad key."""
    environ = os.environ if environ is None else environ
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError([f"{path}: cannot read the config file: {error.strerror or error}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: {_not_utf8(raw, error.start)}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError([f"{path}: not valid YAML: {error}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys"])
    problems: list[str] = []
    overrides: dict[tuple[str, ...], str] = {}
    for name, value in sorted(environ.items()):
        if name.startswith(ENV_PREFIX):
            problem = _apply_override(data, name, value)
            if problem:
                problems.append(problem)
            else:
                overrides[tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))] = name
    if problems:
        raise ConfigError(problems)
    return validate_config(data, overrides)


def _not_utf8(raw: bytes, offset: int) -> str:
    """Where the first byte that is not UTF-8 is: line and column (both counted in bytes, from 1)."""
    line_start = raw.rfind(b"\n", 0, offset) + 1
    line = raw.count(b"\n", 0, offset) + 1
    return (
        f"not UTF-8 text: byte 0x{raw[offset]:02x} at line {line}, column {offset - line_start + 1} "
        f"(byte {offset}); save the file as UTF-8"
    )


def validate_config(data: dict[str, Any], overrides: Mapping[tuple[str, ...], str] | None = None) -> Config:
    """``overrides``: the path each ``DORA__…`` variable set (lower case) -> its name, so that a problem with a
    value from the environment says which variable it came from."""
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        problems = [_describe(problem, overrides or {}) for problem in error.errors(include_url=False)]
        raise ConfigError(problems) from None


def _describe(problem: Mapping[str, Any], overrides: Mapping[tuple[str, ...], str]) -> str:
    path = ""
    parts: list[str | int] = []
    for part in problem["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
            parts.append(part)
        elif isinstance(part, str) and part.startswith(("function-", "literal[", "json-or-python")):
            continue
        else:
            path += f".{part}" if path else str(part)
            parts.append(part)
    message = str(problem["msg"])
    if problem["type"] == "missing":
        message = "field required"
    elif problem["type"] == "extra_forbidden":
        message = "unknown key"
        if parts and isinstance(parts[-1], str):
            known = _keys_at(parts[:-1])
            close = difflib.get_close_matches(parts[-1], known, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]}?)"
    message = message.removeprefix("Value error, ")
    source = _override_of([str(part) for part in parts], overrides)
    if source is not None:
        message += f" (from the environment variable {source})"
    return f"{path or '(top level)'}: {message}"


def _override_of(path: list[str], overrides: Mapping[tuple[str, ...], str]) -> str | None:
    """The ``DORA__…`` variable that set ``path`` or a section holding it, if one did."""
    for length in range(len(path), 0, -1):
        name = overrides.get(tuple(part.lower() for part in path[:length]))
        if name is not None:
            return name
    return None


def _keys_at(path: list[str | int]) -> list[str]:
    """The keys the section at ``path`` accepts (for "did you mean"); empty when it is not a known section."""
    model: Any = Config
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = _section_type(field.annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _section_type(annotation: Any) -> Any:
    """The model inside ``X``, ``X | None`` or ``list[X]``."""
    origin = get_origin(annotation)
    if origin in (list, Union, types.UnionType):
        for arg in get_args(annotation):
            found = _section_type(arg)
            if isinstance(found, type) and issubclass(found, BaseModel):
                return found
        return None
    return annotation


def _apply_override(data: dict[str, Any], name: str, raw: str) -> str | None:
    """Set ``DORA__A__B__0__C`` into ``data['a']['b'][0]['c']``; the value is parsed as YAML.

    Not pydantic-settings: it cannot address a list item by index (``CONNECTIONS__0__ID`` becomes a mapping
    with the key ``"0"``, which a list field rejects) and its merge of sources replaces a list whole, so one
    overridden item would drop the file's others. Overrides are applied to the file's data instead, before
    validation, so every problem names its key and one naming a variable says it came from the environment."""
    parts = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
    if not all(parts):
        return f"{name}: malformed override name"
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit():
                return f"{name}: {where} must be a list index"
            index = int(part)
            if index > len(node):
                return f"{name}: {where} is past the end of the list"
            if index == len(node):
                node.append({})
            if last:
                node[index] = value
            else:
                if node[index] is None:
                    node[index] = {}
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = [] if parts[depth + 1].isdigit() else {}
                node = node[part]
        else:
            return f"{name}: {where} is not a section"
    return None
