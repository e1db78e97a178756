from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from reconciler.cli import main
from reconciler.config import Config, ConfigError, Environment, load_config, parse_duration, validate_config

REPO = Path(__file__).resolve().parent.parent


def minimal() -> dict[str, Any]:
    return {
        "clusters": [{"name": "prod-east"}],
        "devlake": {"url": "https://devlake.example.com", "connections": [{"id": 1, "api_key_env": "KEY"}]},
    }


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def problems(tmp_path: Path, data: Any, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, data), environ or {})
    return caught.value.problems


def test_example_config_is_valid_and_documents_defaults() -> None:
    config = load_config(REPO / "config.example.yaml", {})
    assert config.state.url is None
    assert config.devlake.commits == "head"
    assert config.detection.verdict_timeout == timedelta(hours=1)
    assert config.images.repositories[0].repo == "{owner}/{name}"


def test_defaults_fill_everything_not_given(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, minimal()), {})
    assert config.environment is Environment.PRODUCTION
    assert config.github.url == "https://api.github.com"
    assert config.github.web_url == "https://github.com"
    assert config.state.key_prefix == "dora"
    assert config.devlake.dedupe == "component"
    assert config.clusters[0].namespaces == []


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    data = minimal()
    del data["devlake"]["url"]
    data["devlake"]["connections"].append({"api_key_env": "OTHER"})
    assert problems(tmp_path, data) == ["devlake.url: field required", "devlake.connections[1].id: field required"]


def test_unknown_key_is_named_even_when_nested(tmp_path: Path) -> None:
    data = minimal()
    data["clusters"][0]["contxt"] = "prod"
    data["devlake"]["connections"][0]["match"] = {"component": ["x"]}
    assert problems(tmp_path, data) == [
        "clusters[0].contxt: unknown key (did you mean context?)",
        "devlake.connections[0].match.component: unknown key (did you mean components?)",
    ]


def test_an_unknown_key_far_from_any_known_one_gets_no_suggestion(tmp_path: Path) -> None:
    data = minimal()
    data["devlake"]["flux_capacitor"] = True
    data["metrics"] = {"pushgatway": "http://pushgateway:9091"}
    assert problems(tmp_path, data) == [
        "devlake.flux_capacitor: unknown key",
        "metrics.pushgatway: unknown key (did you mean pushgateway?)",
    ]


def test_wrong_types_and_values_are_named(tmp_path: Path) -> None:
    data = minimal()
    data["github"] = {"max_concurrency": "many"}
    data["environment"] = "production"
    data["detection"] = {"verdict_timeout": "soon"}
    found = problems(tmp_path, data)
    assert any(p.startswith("github.max_concurrency: ") for p in found)
    assert any(p.startswith("environment: ") and "PRODUCTION" in p for p in found)
    assert "detection.verdict_timeout: expected a duration such as 30s, 5m or 1h" in found


def test_invalid_regex_cron_and_duplicates_are_named(tmp_path: Path) -> None:
    data = minimal()
    data["images"] = {"repositories": [{"image": "quay.io/(unclosed", "repo": "a/b"}]}
    data["schedule"] = "every five minutes"
    data["clusters"].append({"name": "prod-east"})
    found = problems(tmp_path, data)
    assert any(p.startswith("images.repositories[0].image: not a valid regular expression") for p in found)
    assert any(p.startswith("schedule: not a valid cron expression") for p in found)
    assert any(p.startswith("clusters: cluster names must be unique") for p in found)


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "absent.yaml", {})
    assert problems(tmp_path, "- a\n- b\n") == [f"{tmp_path / 'config.yaml'}: the top level must be a mapping of keys"]
    assert "not valid YAML" in problems(tmp_path, "clusters: [\n")[0]


def test_environment_overrides_any_value_including_list_items(tmp_path: Path) -> None:
    environ = {
        "DORA__STATE__URL": "redis://redis:6379/0",
        "DORA__DEVLAKE__CONNECTIONS__0__ID": "4",
        "DORA__DEVLAKE__CONNECTIONS__1__ID": "5",
        "DORA__DEVLAKE__CONNECTIONS__1__API_KEY_ENV": "TEAM_KEY",
        "DORA__DETECTION__VERDICT_TIMEOUT": "15m",
        "UNRELATED": "x",
    }
    config = load_config(write(tmp_path, minimal()), environ)
    assert config.state.url == "redis://redis:6379/0"
    assert [c.id for c in config.devlake.connections] == [4, 5]
    assert config.devlake.connections[1].api_key_env == "TEAM_KEY"
    assert config.detection.verdict_timeout == timedelta(minutes=15)


def test_bad_override_names_the_variable(tmp_path: Path) -> None:
    found = problems(tmp_path, minimal(), {"DORA__DEVLAKE__CONNECTIONS__7__ID": "3"})
    assert found == ["DORA__DEVLAKE__CONNECTIONS__7__ID: devlake.connections.7 is past the end of the list"]
    found = problems(tmp_path, minimal(), {"DORA__GITHUB__NOPE": "3"})
    assert found == ["github.nope: unknown key (from the environment variable DORA__GITHUB__NOPE)"]
    found = problems(tmp_path, minimal(), {"DORA__GITHUB__TOKEN_EVN": "GH"})
    assert found == [
        "github.token_evn: unknown key (did you mean token_env?) "
        "(from the environment variable DORA__GITHUB__TOKEN_EVN)"
    ]
    found = problems(tmp_path, minimal(), {"DORA__DEVLAKE__TIMEOUT": "soon"})
    assert found == [
        "devlake.timeout: expected a duration such as 30s, 5m or 1h "
        "(from the environment variable DORA__DEVLAKE__TIMEOUT)"
    ]


def test_secrets_come_from_the_named_env_vars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_secret_value")
    monkeypatch.setenv("KEY", "devlake-secret-key")
    config = load_config(write(tmp_path, minimal()), {})
    assert config.github.token() == "ghp_secret_value"
    assert config.devlake.connections[0].api_key() == "devlake-secret-key"
    assert sorted(config.secret_values()) == ["devlake-secret-key", "ghp_secret_value"]
    assert "ghp_secret_value" not in repr(config)


def test_github_app_auth_needs_all_three_keys(tmp_path: Path) -> None:
    data = minimal()
    data["github"] = {"app_id": 12}
    assert problems(tmp_path, data) == [
        "github: GitHub App auth needs app_id, app_installation_id and app_private_key_env together"
    ]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("2d", 172800), ("250ms", 0.25), (45, 45), ("1.5h", 5400)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5s", "5 weeks", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_environment_rules_then_cluster_then_top_level() -> None:
    data = minimal()
    data["clusters"].append({"name": "stage", "environment": "STAGING"})
    data["applications"] = {
        "environment_rules": [
            {"match": "*/*-dev", "environment": "DEVELOPMENT"},
            {"source_path": "envs/testing/*", "environment": "TESTING"},
        ]
    }
    config = validate_config(data)
    assert config.environment_for("prod-east", "argocd/api-dev", []) is Environment.DEVELOPMENT
    assert config.environment_for("prod-east", "argocd/api", ["envs/testing/api"]) is Environment.TESTING
    assert config.environment_for("stage", "argocd/api", ["envs/prod/api"]) is Environment.STAGING
    assert config.environment_for("prod-east", "argocd/api", []) is Environment.PRODUCTION


def test_environment_rule_needs_exactly_one_criterion() -> None:
    data = minimal()
    data["applications"] = {"environment_rules": [{"environment": "STAGING"}]}
    with pytest.raises(ConfigError) as caught:
        validate_config(data)
    assert caught.value.problems == ["applications.environment_rules[0]: give exactly one of match or source_path"]


def test_component_from_label_else_stripped_name() -> None:
    data = minimal()
    data["applications"] = {"component": {"label": "app.kubernetes.io/part-of", "strip_suffixes": ["prod", "eu"]}}
    applications = validate_config(data).applications
    assert applications.component_of("payments-prod", {"app.kubernetes.io/part-of": "payments"}) == "payments"
    assert applications.component_of("payments-prod", {}) == "payments"
    assert applications.component_of("payments-eu", {}) == "payments"
    assert applications.component_of("prod", {}) == "prod"
    assert applications.component_of("payments", {}) == "payments"


def test_include_exclude_globs() -> None:
    data = minimal()
    data["applications"] = {"include": ["argocd/*", "team-*/*"], "exclude": ["*/*-preview-*"]}
    applications = validate_config(data).applications
    assert applications.selects("argocd/payments")
    assert applications.selects("team-a/web")
    assert not applications.selects("argocd/web-preview-12")
    assert not applications.selects("other/web")


def test_github_enterprise_web_url() -> None:
    data = minimal()
    data["github"] = {"url": "https://GHE.acme.io/api/v3/"}
    github = validate_config(data).github
    assert github.url == "https://GHE.acme.io/api/v3"
    assert github.web_url == "https://ghe.acme.io"


@pytest.mark.parametrize(
    ("url", "web_url"),
    [
        ("https://api.github.com", "https://github.com"),
        ("https://GHE.acme.io/api/v3/", "https://ghe.acme.io"),
        ("https://api.octocorp.ghe.com", "https://octocorp.ghe.com"),
        ("https://API.Octocorp.GHE.com/", "https://octocorp.ghe.com"),
        ("https://gh-proxy.acme.io:8443/github", "https://gh-proxy.acme.io"),
    ],
)
def test_github_web_url_is_derived_from_the_api_url(url: str, web_url: str) -> None:
    """GitHub Enterprise Cloud with data residency serves its API at api.SUBDOMAIN.ghe.com and its web (and
    git) at SUBDOMAIN.ghe.com."""
    data = minimal()
    data["github"] = {"url": url}
    assert validate_config(data).github.web_url == web_url


def test_github_web_url_given_wins_and_is_normalised(tmp_path: Path) -> None:
    """Behind a proxy the API host says nothing about where the repositories live."""
    data = minimal()
    data["github"] = {"url": "https://gh-proxy.acme.io/api/v3", "web_url": "HTTPS://GitHub.com/"}
    assert validate_config(data).github.web_url == "https://github.com"

    config = load_config(write(tmp_path, minimal()), {"DORA__GITHUB__WEB_URL": "https://octocorp.ghe.com"})
    assert config.github.url == "https://api.github.com"
    assert config.github.web_url == "https://octocorp.ghe.com"


@pytest.mark.parametrize("web_url", ["github.com", "ftp://github.com", "https://user:pw@github.com", "https://"])
def test_bad_github_web_url_names_the_key(web_url: str) -> None:
    data = minimal()
    data["github"] = {"web_url": web_url}
    with pytest.raises(ConfigError) as caught:
        validate_config(data)
    assert caught.value.problems[0].startswith("github.web_url: must be")


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d["devlake"].pop("connections"), "devlake.connections: field required"),
        (lambda d: d["clusters"][0].update(contxt="x"), "clusters[0].contxt: unknown key"),
        (lambda d: d.update(metrics={"port": "nine"}), "metrics.port: "),
    ],
)
def test_cli_reports_each_problem_with_its_key_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mutate: Any, key: str
) -> None:
    data = minimal()
    mutate(data)
    code = main(["run", "--config", str(write(tmp_path, data))])
    err = capsys.readouterr().err
    assert code == 2
    assert f"config error: {key}" in err
    assert "Traceback" not in err


def test_cli_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    assert "--config" in capsys.readouterr().err


@pytest.mark.parametrize("schedule", ["0 9 * * 7", "0 9 * * 1-5", "*/10 * * * *", "0 0 1 * mon"])
def test_schedules_are_read_as_cron_reads_them(schedule: str) -> None:
    data = minimal()
    data["schedule"] = schedule
    assert validate_config(data).schedule == schedule


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.add(path)
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            inner = getattr(candidate, "__args__", (candidate,))
            for kind in (candidate, *inner):
                if isinstance(kind, type) and issubclass(kind, BaseModel):
                    keys |= _keys(kind, f"{path}.")
    return keys


def test_the_example_config_documents_every_key() -> None:
    text = (REPO / "config.example.yaml").read_text()
    documented = set(re.findall(r"\b([a-z_]+):(?!//)", text))
    missing = sorted(key for key in _keys(Config) if key.rsplit(".", 1)[-1] not in documented)
    assert missing == []


CONFIG_TEXT = "environment: PRODUCTION\n# owner: équipe paiements\nclusters: [{name: prod-east}]\n"


def _unreadable_config(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A config path that cannot be used as it is, and what the error must say after the path."""
    path = tmp_path / "config.yaml"
    if case == "latin-1":
        path.write_bytes(CONFIG_TEXT.encode("latin-1"))
        return path, "not UTF-8 text: byte 0xe9 at line 2, column 10 (byte 33); save the file as UTF-8"
    if case == "utf-16":
        path.write_bytes(CONFIG_TEXT.encode("utf-16"))
        return path, "not UTF-8 text: byte 0xff at line 1, column 1 (byte 0); save the file as UTF-8"
    if case == "directory":
        path.mkdir()
        return path, "cannot read the config file: Is a directory"
    return path, "cannot read the config file: No such file or directory"


@pytest.mark.parametrize("case", ["latin-1", "utf-16", "directory", "missing"])
def test_an_unreadable_config_file_is_a_clear_error_naming_the_file_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    path, expected = _unreadable_config(tmp_path, case)

    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"config error: {path}: {expected}\n"


def test_a_config_file_without_read_permission_is_a_clear_error_and_exits_2(tmp_path: Path) -> None:
    """Root reads any file: as root, the command runs without the capabilities that bypass file permissions."""
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_TEXT)
    path.chmod(0)
    command = [sys.executable, "-m", "reconciler", "check", "--config", str(path)]
    if os.geteuid() == 0:
        capsh = shutil.which("capsh")
        if capsh is None:
            pytest.skip("running as root without capsh: root can read a file without read permission")
        command = [capsh, "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", 'exec "$@"', "-", *command]

    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)

    assert done.returncode == 2
    assert done.stderr == f"config error: {path}: cannot read the config file: Permission denied\n"
