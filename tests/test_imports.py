"""What a ``run`` imports: a quiet run is a fresh process, so every library it imports without using is paid on
every run (PyGithub alone costs about as much as listing a thousand Applications)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _imported_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    probe = code + "\nprint(' '.join(sorted({name.split('.')[0] for name in sys.modules})))\n"
    done = subprocess.run(
        [sys.executable, "-c", "import sys\n" + probe],
        capture_output=True,
        text=True,
        check=True,
        env=None if env is None else {**os.environ, **env},
    )
    return set(done.stdout.split())


def test_a_run_imports_neither_pygithub_nor_the_scheduler_nor_prometheus_until_it_needs_them() -> None:
    imported = _imported_after(
        "from reconciler import cli, commands, runtime\n"
        "from reconciler.config import validate_config\n"
        "validate_config({'clusters': [{'name': 'c'}],"
        " 'devlake': {'url': 'https://devlake.example.com', 'connections': [{'id': 1, 'api_key_env': 'K'}]}})\n"
    )
    assert "reconciler" in imported and "redis" in imported
    assert not imported & {"github", "apscheduler", "prometheus_client"}


def test_serve_and_a_written_schedule_still_get_the_scheduler() -> None:
    imported = _imported_after(
        "from reconciler.config import validate_config\n"
        "validate_config({'clusters': [{'name': 'c'}], 'schedule': '0 * * * *',"
        " 'devlake': {'url': 'https://devlake.example.com', 'connections': [{'id': 1, 'api_key_env': 'K'}]}})\n"
    )
    assert "apscheduler" in imported


def test_a_whole_run_command_imports_none_of_them_when_nothing_needs_them(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "clusters": [{"name": "c", "kubeconfig": str(tmp_path / "missing-kubeconfig")}],
                "state": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
                "devlake": {"url": "https://devlake.example.com", "connections": [{"id": 1, "api_key_env": "K"}]},
            }
        )
    )
    imported = _imported_after(
        f"from reconciler.cli import main\ncode = main(['run', '--config', {str(config)!r}])\nassert code == 1, code\n",
        env={"K": "devlake-api-key"},  # a run refuses to start (exit 2) while a secret it names is unset
    )
    assert "kubernetes" in imported
    assert not imported & {"github", "apscheduler", "prometheus_client"}
