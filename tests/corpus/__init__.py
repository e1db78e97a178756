"""A corpus of malformed or unusual Argo CD Applications, one JSON file per case.

Each file is ``{"expect": "ok" | "malformed", "reason_contains": "...", "app": {...}}`` and is named for
what it exercises. ``generate.py`` wrote them; the JSON files are the source of truth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

CORPUS_DIR = Path(__file__).parent


@dataclass(frozen=True)
class CorpusCase:
    name: str
    """The file name without ``.json``."""
    expect: Literal["ok", "malformed"]
    reason_contains: str | None
    app: Any
    """The Application as decoded from JSON; deliberately not always an object."""


def load_corpus() -> list[CorpusCase]:
    """Every case in the corpus directory, sorted by name."""
    return [_load(path) for path in sorted(CORPUS_DIR.glob("*.json"))]


def corpus_case(name: str) -> CorpusCase:
    """One case by name, e.g. ``corpus_case("status-null")``."""
    return _load(CORPUS_DIR / f"{name}.json")


def _load(path: Path) -> CorpusCase:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or set(data) - {"expect", "reason_contains", "app"} or "app" not in data:
        raise ValueError(f"{path.name}: expected an object with keys expect, app and optionally reason_contains")
    expect = data.get("expect")
    if expect not in ("ok", "malformed"):
        raise ValueError(f"{path.name}: expect must be 'ok' or 'malformed', got {expect!r}")
    reason = data.get("reason_contains")
    if reason is not None and not isinstance(reason, str):
        raise ValueError(f"{path.name}: reason_contains must be a string")
    return CorpusCase(name=path.stem, expect=expect, reason_contains=reason, app=data["app"])
