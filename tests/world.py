"""The whole outside world of a run, faked on 127.0.0.1: Argo CD's Kubernetes API, GitHub and DevLake.

End-to-end tests drive the real CLI (``cli.main``) against it::

    with World(tmp_path, state_url) as world:
        world.set_apps([make_app(...)])
        assert world.run() == 0
        world.devlake.deployments(1)

GitHub is served through ``responses`` (PyGithub speaks ``requests``); the fake Kubernetes API server and
the fake DevLake are real HTTP servers, so ``responses`` lets 127.0.0.1 through.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import responses
import yaml

from reconciler.cli import main
from tests.fakes.devlake import FakeDevLake
from tests.fakes.github import FakeGitHub
from tests.fakes.kube_api import FakeKubeAPI

GITHUB_TOKEN = "ghp_e2eSECRETtoken0123456789abcdefghijkl"
DEVLAKE_KEYS = {1: "devlake-key-ONE-" + "k" * 40, 6: "devlake-key-SIX-" + "s" * 40}
KUBE_TOKEN = "kube-bearer-SECRET-token-0123456789"
IMAGE_REPO = "quay.io/acme/payments-api"


class World:
    def __init__(
        self,
        tmp_path: Path,
        state_url: str | None,
        monkeypatch: pytest.MonkeyPatch,
        *,
        config: Mapping[str, Any] | None = None,
        connections: Sequence[Mapping[str, Any]] | None = None,
        page_size: int = 2,
    ) -> None:
        self.tmp_path = tmp_path
        self.state_url = state_url
        self.monkeypatch = monkeypatch
        self.overrides = dict(config or {})
        self.connections = list(connections or [{"id": 1, "api_key_env": "DEVLAKE_KEY_1"}])
        self.page_size = page_size
        self._stack = ExitStack()
        self.kube = FakeKubeAPI()
        self.devlake = FakeDevLake()
        self.rsps = responses.RequestsMock(assert_all_requests_are_fired=False)
        self.github: FakeGitHub
        self.config_path = tmp_path / "config.yaml"

    def __enter__(self) -> World:
        self._stack.enter_context(self.kube)
        self._stack.enter_context(self.devlake)
        self._stack.enter_context(self.rsps)
        self.rsps.add_passthru(re.compile(r"https?://127\.0\.0\.1(:\d+)?/.*"))
        self.github = FakeGitHub(self.rsps, token=GITHUB_TOKEN)
        self.kube.require_token(KUBE_TOKEN)
        kubeconfig = self.kube.write_kubeconfig(self.tmp_path / "kubeconfig", token=KUBE_TOKEN)
        for connection_id, key in DEVLAKE_KEYS.items():
            self.devlake.add_connection(connection_id, key)
            self.monkeypatch.setenv(f"DEVLAKE_KEY_{connection_id}", key)
        self.monkeypatch.setenv("GITHUB_TOKEN", GITHUB_TOKEN)
        self.monkeypatch.chdir(self.tmp_path)
        self.write_config(kubeconfig)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def write_config(self, kubeconfig: Path) -> None:
        config: dict[str, Any] = {
            "environment": "PRODUCTION",
            "clusters": [
                {"name": "prod-east", "kubeconfig": str(kubeconfig), "context": "fake", "page_size": self.page_size}
            ],
            "images": {"repositories": [{"image": r"quay\.io/acme/(?P<name>[^/]+)", "repo": "acme/{name}"}]},
            "github": {"max_rate_limit_wait": "0s", "timeout": "5s"},
            "state": {"url": self.state_url, "key_prefix": f"e2e-{self.tmp_path.name}"},
            "devlake": {
                "url": self.devlake.url,
                "connections": self.connections,
                "retry_budget": "2s",
                "timeout": "5s",
                # The scenarios count on a GitOps commit in every deployment (the default before ``fallback``);
                # tests of the default pass ``{"devlake": {"include_gitops_commit": "fallback"}}``.
                "include_gitops_commit": True,
            },
        }
        for section, values in self.overrides.items():
            if isinstance(values, dict) and isinstance(config.get(section), dict):
                config[section] = {**config[section], **values}
            else:
                config[section] = values
        self.config_path.write_text(yaml.safe_dump(config))

    def set_apps(self, apps: Sequence[Mapping[str, Any]]) -> None:
        self.kube.set_apps(list(apps))

    def run(self, *args: str, command: str = "run") -> int:
        return main([command, "--config", str(self.config_path), *args])

    def posts(self) -> list[dict[str, Any]]:
        """Bodies DevLake accepted, in order, across connections."""
        return [r.body for r in self.devlake.requests if r.status == 200 and isinstance(r.body, dict)]


def dry_run_lines(out: str) -> Iterator[dict[str, Any]]:
    for line in out.splitlines():
        if line.strip():
            yield json.loads(line)


def log_lines(err: str) -> list[dict[str, Any]]:
    """The JSON log lines of a run (stderr), in order."""
    lines: list[dict[str, Any]] = []
    for line in err.splitlines():
        line = line.strip()
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines
