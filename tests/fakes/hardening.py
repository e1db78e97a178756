"""Helpers shared by the hardening tests (bad input, faults, secrets): a runtime that never waits."""

from __future__ import annotations

from typing import Any

import pytest

from reconciler import commands, runtime
from reconciler.config import StateConfig
from reconciler.store import RedisStore, Store, open_store


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
    monkeypatch.setattr(commands, "open_store", open_store_at_once)
