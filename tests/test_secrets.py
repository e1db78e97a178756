"""Secrets never leave the process, whatever fails; TLS verification stays on unless a config key turns it off."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.argocd import ClusterLister, ClusterUnavailable, build_api_client
from reconciler.cli import main
from reconciler.config import StateConfig, validate_config
from reconciler.devlake import DevLakeClient
from reconciler.github import GitHubClient, GitHubError
from reconciler.logs import REDACTED, Redactor, url_secrets
from reconciler.runtime import Runtime
from reconciler.store import RedisStore, StoreUnavailable, open_store
from tests.factories import at, redeployed, settled_app
from tests.fakes.github import InMemoryCache
from tests.fakes.hardening import never_wait, no_sleep
from tests.fakes.server import free_port as closed_port
from tests.fakes.tls import SelfSignedServer
from tests.world import DEVLAKE_KEYS, GITHUB_TOKEN, IMAGE_REPO, KUBE_TOKEN, World

REDIS_PASSWORD = "redis-PASSWORD-s3cr3t-0192837465"
WRONG_GITHUB_TOKEN = "ghp_WRONGtokenSECRET9876543210zyxwvu"
WRONG_DEVLAKE_KEY = "devlake-key-WRONG-" + "w" * 30
KEY_LINE = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7SECRETLINE"
GITHUB_APP_KEY = f"-----BEGIN PRIVATE KEY-----\n{KEY_LINE}\n-----END PRIVATE KEY-----\n"
SECRETS = (
    GITHUB_TOKEN,
    DEVLAKE_KEYS[1],
    DEVLAKE_KEYS[6],
    KUBE_TOKEN,
    REDIS_PASSWORD,
    WRONG_GITHUB_TOKEN,
    WRONG_DEVLAKE_KEY,
)


def assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} leaks {secret[:12]}…"
    assert KEY_LINE not in text, f"{where} leaks a private key"


class Scenario:
    """A world with one deployment waiting to be sent, then ``breaks`` applied before the runs under test."""

    def __init__(self, world: World) -> None:
        self.world = world
        gitops = world.github.add_commits("acme/gitops", 2)
        images = world.github.add_commits("acme/payments-api", 2)
        app = settled_app("payments-api", gitops[0], f"{IMAGE_REPO}:{images[0]}")
        world.set_apps([app])
        assert world.run() == 0
        world.set_apps([redeployed(app, 1, gitops[1], f"{IMAGE_REPO}:{images[1]}", minute=30)])


def _devlake_401(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.devlake.fail_always(401)


def _devlake_403(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVLAKE_KEY_1", WRONG_DEVLAKE_KEY)


def _devlake_500(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.devlake.fail_always(500)


def _devlake_rejects(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.devlake.fail_always(422)


def _github_401(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", WRONG_GITHUB_TOKEN)


def _github_rate_limited(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.github.exhaust_rate_limit(at(90))


def _kube_401(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.kube.require_token("another-token-entirely")


def _redis_with_password_unreachable(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DORA__STATE__URL", f"redis://:{REDIS_PASSWORD}@127.0.0.1:{closed_port()}/0")


def _nothing(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    pass


FAILURES: dict[str, Callable[[World, pytest.MonkeyPatch], None]] = {
    "devlake-401": _devlake_401,
    "devlake-403": _devlake_403,
    "devlake-500": _devlake_500,
    "devlake-422-dead-letter": _devlake_rejects,
    "github-401": _github_401,
    "github-rate-limit": _github_rate_limited,
    "kubernetes-401": _kube_401,
    "redis-password-unreachable": _redis_with_password_unreachable,
    "nothing-fails": _nothing,
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_no_output_and_nothing_stored_carries_a_secret(
    tmp_path: Path,
    state_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failure: str,
) -> None:
    never_wait(monkeypatch)
    connections = [{"id": 1, "api_key_env": "DEVLAKE_KEY_1"}, {"id": 6, "api_key_env": "DEVLAKE_KEY_6"}]
    with World(tmp_path, state_url, monkeypatch, connections=connections) as world:
        Scenario(world)
        FAILURES[failure](world, monkeypatch)
        codes = [
            world.run("--log-level", "debug"),
            world.run("--log-level", "debug", "--log-format", "text"),
            world.run("--dry-run", "--log-level", "debug"),
            world.run("--log-level", "debug", command="check"),
            world.run("argocd/payments-api", "--log-level", "debug", command="explain"),
            world.run("--json", command="status"),
            world.run(command="status"),
        ]
        captured = capsys.readouterr()
        output = captured.out + captured.err
        assert output
        assert "Traceback" not in output
        assert_no_secret(output, "stdout/stderr")
        expected_first = 0 if failure in ("nothing-fails", "devlake-422-dead-letter") else 1
        assert codes[0] == expected_first, output[-2000:]

        if failure != "redis-password-unreachable":
            store = open_store(StateConfig(url=state_url, key_prefix=f"e2e-{tmp_path.name}"))
            try:
                stored = json.dumps([store.dead_letters(), store.run_summaries()])
            finally:
                store.close()
            assert_no_secret(stored, "the stored dead letters and run summaries")
            if failure == "devlake-422-dead-letter":
                assert "fake failure 422" in stored, "the dead letter is there, without a secret"


def test_a_config_error_prints_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for secret_env, value in (("GITHUB_TOKEN", GITHUB_TOKEN), ("DEVLAKE_KEY_1", DEVLAKE_KEYS[1])):
        monkeypatch.setenv(secret_env, value)
    monkeypatch.setenv("DORA__GITHUB__MAX_CONCURRENCY", GITHUB_TOKEN)
    config = {
        "clusters": [{"name": "prod"}],
        "state": {"url": f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0"},
        "devlake": {"url": "https://devlake.example.com", "connections": [{"id": 1, "api_key_env": "DEVLAKE_KEY_1"}]},
        "unknown": True,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path), "--log-level", "debug"]) == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"state:\n  url: redis://:{REDIS_PASSWORD}@h:6379/0\n  key_prefix: [unclosed\n")
    assert main(["check", "--config", str(broken)]) == 2
    captured = capsys.readouterr()
    assert "config error: unknown: unknown key" in captured.err
    assert "github.max_concurrency" in captured.err
    assert_no_secret(captured.out + captured.err, "config errors")


def test_exception_messages_and_reprs_carry_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state_url: str
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", GITHUB_TOKEN)
    monkeypatch.setenv("DEVLAKE_KEY_1", DEVLAKE_KEYS[1])
    with World(tmp_path, state_url, monkeypatch) as world:
        world.kube.require_token("another-token-entirely")
        world.devlake.fail_always(403)
        world.github.tokens = {"some-other-token"}
        url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{closed_port()}/0"
        config = validate_config(
            {
                "clusters": [{"name": "prod", "kubeconfig": str(tmp_path / "kubeconfig")}],
                "state": {"url": url},
                "devlake": {"url": world.devlake.url, "connections": [{"id": 1, "api_key_env": "DEVLAKE_KEY_1"}]},
            }
        )
        texts: list[str] = [repr(config), str(config), repr(config.state)]

        with pytest.raises(ClusterUnavailable) as listing:
            list(ClusterLister(config.clusters[0], sleep=no_sleep).pages())
        texts += [str(listing.value), repr(listing.value)]

        store = RedisStore(url, "x", retries=0)
        with pytest.raises(StoreUnavailable) as unreachable:
            store.ping()
        texts += [str(unreachable.value), repr(unreachable.value), repr(store)]

        github = GitHubClient(config.github, InMemoryCache(), sleep=no_sleep)
        with pytest.raises(GitHubError) as refused:
            github.commit("acme/payments-api", "a" * 40)
        texts += [str(refused.value), repr(refused.value), repr(github)]

        devlake = DevLakeClient(config.devlake, sleep=no_sleep)
        delivery = devlake.deliver(config.devlake.connections[0], {"id": "x"}, deadline=0)
        texts += [delivery.message, repr(delivery), repr(devlake), devlake.probe(config.devlake.connections[0])[1]]

        runtime = Runtime(config, store, github, devlake)
        texts.append(repr(runtime))
        for text in texts:
            assert_no_secret(text, text[:60])


def test_the_redactor_masks_secrets_in_every_form_they_take() -> None:
    redactor = Redactor([GITHUB_TOKEN, GITHUB_APP_KEY, "abc"])
    redactor.add(url_secrets(f"redis://user:{REDIS_PASSWORD}@redis:6379/0?password={WRONG_DEVLAKE_KEY}"))
    line = json.dumps(
        {
            "token": GITHUB_TOKEN,
            "key": GITHUB_APP_KEY,
            "line": GITHUB_APP_KEY.splitlines()[1],
            "query": f"password={WRONG_DEVLAKE_KEY}",
            "unknown-url": "https://someone:hunter2hunter2@proxy.example.com/x",
            "short": "abc",
        }
    )
    redacted = redactor(line)
    assert_no_secret(redacted, "a redacted line")
    assert "hunter2hunter2" not in redacted
    assert redacted.count(REDACTED) == 5
    assert '"short": "abc"' in redacted, "values shorter than 4 characters are not treated as secrets"


# -- TLS -------------------------------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[SelfSignedServer]:
    with SelfSignedServer(tmp_path) as server:
        yield server


def _tls_config(tmp_path: Path, server: SelfSignedServer, verify: bool | None) -> Path:
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "tls", "cluster": {"server": server.url}}],
        "users": [{"name": "tls", "user": {"token": KUBE_TOKEN}}],
        "contexts": [{"name": "tls", "context": {"cluster": "tls", "user": "tls"}}],
        "current-context": "tls",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    extra: dict[str, Any] = {} if verify is None else {"verify_tls": verify}
    config = {
        "clusters": [{"name": "tls", "kubeconfig": str(tmp_path / "kubeconfig"), **extra}],
        "github": {"url": server.url, **extra},
        "state": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
        "devlake": {"url": server.url, "connections": [{"id": 1, "api_key_env": "DEVLAKE_KEY_1"}], **extra},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_clients_verify_tls_by_default(
    tmp_path: Path, tls_server: SelfSignedServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", GITHUB_TOKEN)
    monkeypatch.setenv("DEVLAKE_KEY_1", DEVLAKE_KEYS[1])
    path = _tls_config(tmp_path, tls_server, verify=None)
    assert main(["check", "--config", str(path)]) == 2
    lines = capsys.readouterr().out.splitlines()
    kube = next(line for line in lines if line.startswith("kubernetes tls:"))
    github = next(line for line in lines if line.startswith("github:"))
    devlake = next(line for line in lines if line.startswith("devlake connection 1:"))
    assert "FAILED (TLS handshake" in kube and "CERTIFICATE_VERIFY_FAILED" in kube
    assert "FAILED" in github and "SSLError" in github
    assert "FAILED" in devlake and "CERTIFICATE_VERIFY_FAILED" in devlake
    assert tls_server.paths == [], "no request got past the handshake"

    config = validate_config(yaml.safe_load(path.read_text()))
    assert build_api_client(config.clusters[0]).configuration.verify_ssl is True
    assert config.github.verify_tls is True and config.devlake.verify_tls is True


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_verify_tls_false_turns_verification_off_for_each_client(
    tmp_path: Path, tls_server: SelfSignedServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", GITHUB_TOKEN)
    monkeypatch.setenv("DEVLAKE_KEY_1", DEVLAKE_KEYS[1])
    path = _tls_config(tmp_path, tls_server, verify=False)
    assert main(["check", "--config", str(path)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "kubernetes tls: ok" in out
    assert "github: ok (authenticated; rate limit 4999/5000" in out
    assert "devlake connection 1: ok" in out
    assert sorted(set(tls_server.paths)) == [
        "/api/rest/plugins/webhook/connections/1/deployments",
        "/apis/argoproj.io/v1alpha1/applications",
        "/rate_limit",
    ]
    config = validate_config(yaml.safe_load(path.read_text()))
    assert build_api_client(config.clusters[0]).configuration.verify_ssl is False


def test_an_unexpected_error_is_one_redacted_log_line_not_a_raw_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError(f"unforeseen: {GITHUB_TOKEN}, {DEVLAKE_KEYS[1]} and {REDIS_PASSWORD}")

    monkeypatch.setattr("reconciler.commands.run_command", broken)
    with World(tmp_path, f"redis://:{REDIS_PASSWORD}@127.0.0.1:{closed_port()}/0", monkeypatch) as world:
        assert world.run() == 1
        captured = capsys.readouterr()
        assert_no_secret(captured.out + captured.err, "an unexpected error")
        (line,) = [json.loads(text) for text in captured.err.splitlines()]
        assert line["level"] == "critical"
        assert line["message"] == "the command failed unexpectedly"
        assert line["reason"] == "RuntimeError"
        expected = f"unforeseen: {REDACTED}, {REDACTED} and {REDACTED}"
        assert expected in line["error"], "the config's secrets and the state URL's password are all redacted"


USERINFO_TOKEN = "ghp_USERNAMEtokenSECRET0123456789abcdefgh"
USERINFO_PASSWORD = "glpat-PASSWORDsecret-0123456789"


def test_credentials_in_an_applications_repo_url_never_reach_any_output(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Argo CD accepts a token as the user name of ``repoURL`` (``https://TOKEN@host/...``) as well as
    ``user:password@``: neither is a secret the reconciler was told about, and each reaches logs and ``explain``."""
    never_wait(monkeypatch)
    urls = {
        "token-as-user": f"https://{USERINFO_TOKEN}@github.com/acme/gitops.git",
        "user-password": f"https://oauth2:{USERINFO_PASSWORD}@github.com/acme/gitops.git",
    }
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops = world.github.add_commits("acme/gitops", 2)
        images = world.github.add_commits("acme/payments-api", 2)

        def with_url(app: dict[str, Any], url: str) -> dict[str, Any]:
            loaded: dict[str, Any] = json.loads(json.dumps(app).replace("https://github.com/acme/gitops.git", url))
            return loaded

        apps = {
            name: with_url(settled_app(name, gitops[0], f"{IMAGE_REPO}:{images[0]}"), url) for name, url in urls.items()
        }
        world.set_apps(list(apps.values()))
        assert world.run() == 0
        world.set_apps(
            [
                with_url(redeployed(apps[name], 1, gitops[1], f"{IMAGE_REPO}:{images[1]}", minute=30), url)
                for name, url in urls.items()
            ]
        )
        capsys.readouterr()
        for args in (
            ("--dry-run", "--log-level", "debug"),
            ("--log-level", "debug", "--log-format", "text"),
            ("--log-level", "debug"),
        ):
            world.run(*args)
        for name in urls:
            assert world.run(f"argocd/{name}", "--log-level", "debug", command="explain") == 0
        world.run(command="check")
        world.run(command="status")
        world.run("--json", command="status")
        captured = capsys.readouterr()
        output = captured.out + captured.err

        assert "source: https://[REDACTED]@github.com/acme/gitops.git" in output, "explain shows the URL, masked"
        assert USERINFO_TOKEN not in output and USERINFO_PASSWORD not in output and "oauth2" not in output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"https://{USERINFO_TOKEN}@github.com/acme/gitops.git", "https://[REDACTED]@github.com/acme/gitops.git"),
        ("https://x-access-token:ghs_abc@github.com/a/b", "https://[REDACTED]@github.com/a/b"),
        (
            "redis://:pw%40rd@redis:6379/0 and ssh://git@host/r",
            "redis://[REDACTED]@redis:6379/0 and ssh://[REDACTED]@host/r",
        ),
        ('{"repo": "HTTPS://tok@Example.com/x"}', '{"repo": "HTTPS://[REDACTED]@Example.com/x"}'),
        ("https://github.com/acme/x@v1.2 https://h/p?to=a@b git@github.com:acme/x.git", None),
    ],
)
def test_the_redactor_masks_the_user_information_of_any_url_and_nothing_else(text: str, expected: str | None) -> None:
    assert Redactor()(text) == (text if expected is None else expected)
