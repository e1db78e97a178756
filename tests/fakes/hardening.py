"""Helpers shared by the hardening tests (bad input, faults, secrets): apps, and a runtime that never waits."""

from __future__ import annotations

from typing import Any

import pytest

from reconciler import runtime
from reconciler.config import StateConfig
from reconciler.store import RedisStore, Store, open_store
from tests.factories import (
    append_history,
    at,
    git_source,
    history_entry,
    make_app,
    operation_state,
    set_health,
    set_summary_images,
    with_operation_state,
)

GITOPS = "https://github.com/acme/gitops.git"
SIDECAR = "docker.io/library/busybox:1.36.1"


def no_sleep(seconds: float) -> None:
    """Every retry of every client happens at once."""


def never_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients built by the CLI retry without sleeping, and Redis gives up on the first refused connection."""
    original = runtime.Runtime.open.__func__  # type: ignore[attr-defined]

    def open_without_waiting(cls: type[runtime.Runtime], /, config: Any, **kwargs: Any) -> runtime.Runtime:
        kwargs.setdefault("sleep", no_sleep)
        opened: runtime.Runtime = original(cls, config, **kwargs)
        return opened

    def open_store_at_once(state: StateConfig) -> Store:
        if state.url is not None and state.url.startswith(("redis://", "rediss://")):
            return RedisStore(state.url, state.key_prefix, retries=0)
        return open_store(state)

    monkeypatch.setattr(runtime.Runtime, "open", classmethod(open_without_waiting))
    monkeypatch.setattr(runtime, "open_store", open_store_at_once)


def settled_app(name: str, gitops_sha: str, image: str, *, namespace: str = "argocd") -> dict[str, Any]:
    """History id 0 deployed ``gitops_sha`` with ``image`` (``repo:tag``), Synced and Healthy."""
    return make_app(
        name,
        namespace,
        source=git_source(GITOPS),
        history=[history_entry(0, gitops_sha, at(0), source=git_source(GITOPS))],
        operation_state=operation_state("Succeeded", at(-0.1), at(0), revision=gitops_sha, images=[image]),
        summary_images=[image, SIDECAR],
        health_transition_at=at(1),
    )


def redeployed(app: dict[str, Any], history_id: int, gitops_sha: str, image: str, minute: float) -> dict[str, Any]:
    """``app`` after a successful sync of ``gitops_sha`` with ``image`` at ``minute``, then Healthy."""
    started, finished = at(minute - 0.2), at(minute)
    app = append_history(app, history_entry(history_id, gitops_sha, finished, started, source=git_source(GITOPS)))
    app = with_operation_state(
        app,
        operation_state("Succeeded", started, finished, revision=gitops_sha, images=[image]),
        reconciled_at=at(minute + 2),
    )
    app = set_health(app, "Healthy", at(minute + 1.5))
    return set_summary_images(app, [image, SIDECAR])
