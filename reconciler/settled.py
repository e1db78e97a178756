"""The steady-state fast path: an Application unchanged since a tick that left nothing to decide is skipped.

Such an Application's snapshot stores a digest of every field the planner reads (``settled_digest``) and of the
configuration that shapes its decisions (``decision_salt``). While the listing shows the same digest, the
Application is neither parsed nor planned: a quiet tick costs the listing, one batched snapshot read per page
(the store reads the digest without decoding the snapshot: ``stored_settled_digest``) and a digest per
Application. ``split_page`` applies this to one page; ``frozen_heap`` keeps the collector from scanning
again and again what it cannot free. Pure, except for the collector: the caller reads the store and passes the
reader in.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from reconciler.application import MalformedApplication, application_key, parse_application
from reconciler.config import Config
from reconciler.model import SNAPSHOT_VERSION, AppKey, AppObservation, Snapshot

log = logging.getLogger(__name__)


def settled_digest(raw: Any, salt: str = "") -> str | None:
    """A cheap digest of every field of a raw Application that can change what the planner decides when it
    has nothing new to emit: identity, deletion, sync and health, live images, the history ids and times,
    and the operation's phase and times. ``reconciledAt``, ``resourceVersion`` and ``generation`` move on
    every refresh and are left out on purpose (a settled plan was already fresh, and freshness only grows).

    ``salt`` carries the configuration that shapes decisions. ``None`` when the object is not shaped like
    an Application: the caller then parses it the slow way, which reports why.
    """
    try:
        metadata = raw["metadata"]
        status = raw.get("status") or {}
        health = status.get("health") or {}
        state = status.get("operationState") or {}
        operation = state.get("operation") or {}
        sync = operation.get("sync") or {}
        material = (
            salt,
            metadata["uid"],
            metadata.get("deletionTimestamp"),
            raw.get("operation") is not None,
            (status.get("sync") or {}).get("status"),
            health.get("status"),
            health.get("lastTransitionTime"),
            tuple((status.get("summary") or {}).get("images") or ()),
            tuple((h["id"], h.get("deployedAt"), h.get("deployStartedAt")) for h in status.get("history") or ()),
            state.get("phase"),
            state.get("startedAt"),
            state.get("finishedAt"),
            bool(sync.get("dryRun")),
            bool(sync.get("resources")),
        )
        return hashlib.blake2b(repr(material).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    except (KeyError, TypeError, AttributeError, ValueError):
        return None


def decision_salt(config: Config) -> str:
    """The configuration that shapes the planner's decisions: changing it invalidates every settled digest."""
    shaping = {"detection": config.detection.model_dump(mode="json"), "images": config.images.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


_SETTLED_PREFIX = f'{{"version":{SNAPSHOT_VERSION},"settled_digest":"'


def stored_settled_digest(text: str) -> str | None:
    """The settled digest of a stored snapshot's JSON, read without decoding it (``to_json`` writes it
    second, right after the version); ``None`` when there is none or the text has another shape."""
    if not text.startswith(_SETTLED_PREFIX):
        return None
    start = len(_SETTLED_PREFIX)
    end = text.find('"', start)
    return text[start:end] if 0 < end - start <= 64 else None


def for_planning(stored: Snapshot | None) -> Snapshot | None:
    """The snapshot the planner gets: never one with a settled digest, so a plan can never carry it forward."""
    return stored.evolve(settled_digest=None) if stored is not None and stored.settled_digest else stored


def settle(final: Snapshot, digest: str | None) -> Snapshot:
    """The snapshot to store after a plan with nothing to deliver: with the digest, unless a verdict is pending
    (a pending verdict needs the clock, so that Application must be planned on every tick)."""
    return final.evolve(settled_digest=digest) if digest is not None and final.pending is None else final


class StoredItem(Protocol):
    """A stored snapshot whose settled digest is known without decoding it (``store.StoredSnapshot``)."""

    @property
    def settled_digest(self) -> str | None: ...
    def snapshot(self) -> Snapshot | None: ...


class Changed(NamedTuple):
    """An Application that may have changed: parsed, with its stored snapshot and its digest now."""

    observation: AppObservation
    stored: Snapshot | None
    digest: str | None


@dataclass
class PageSplit:
    changed: list[Changed] = field(default_factory=list)
    unchanged: list[AppKey] = field(default_factory=list)
    """Selected Applications whose digest equals the one stored: not parsed."""
    unreadable: list[AppKey] = field(default_factory=list)
    """Malformed Applications whose key could be read: listed, so not taken for deleted."""
    malformed: int = 0

    @property
    def listed(self) -> list[AppKey]:
        """Every selected Application of the page that could be read."""
        return [*self.unchanged, *(item.observation.key for item in self.changed)]


def split_page(
    page: Sequence[Any],
    cluster: str,
    *,
    selected: Callable[[AppKey], bool],
    load: Callable[[list[AppKey]], Mapping[AppKey, StoredItem]],
    salt: str,
    backfill: bool = False,
) -> PageSplit:
    """The selected Applications of a page that may have changed, parsed, with their stored snapshots; the
    others counted. A backfill looks at everything. A malformed Application is logged with its reason."""
    candidates: list[tuple[Any, AppKey | None]] = []
    for raw in page:
        key = application_key(raw, cluster)
        if key is not None and not selected(key):
            continue
        candidates.append((raw, key))
    snapshots = load([key for _, key in candidates if key is not None])
    split = PageSplit()
    for raw, key in candidates:
        item = snapshots.get(key) if key is not None else None
        digest = None if backfill else settled_digest(raw, salt)
        if key is not None and item is not None and digest is not None and item.settled_digest == digest:
            split.unchanged.append(key)
            continue
        stored = item.snapshot() if item is not None else None
        try:
            observation = parse_application(raw, cluster)
        except Exception as error:
            # Listed but unreadable is not deleted: its snapshot stays until it can be read again.
            if key is not None:
                split.unreadable.append(key)
            split.malformed += 1
            unexpected = not isinstance(error, MalformedApplication)
            reason = f"unexpected {type(error).__name__}: {error}" if unexpected else str(error)
            log.warning(
                "skipping malformed application",
                exc_info=unexpected,
                extra={"cluster": cluster, "app": _raw_name(raw), "reason": reason},
            )
            continue
        if key is None and not selected(observation.key):
            continue
        split.changed.append(Changed(observation, stored, digest))
    return split


PASS_GC_THRESHOLD = 50_000
"""Container allocations (net of frees) between two young collections during a pass (Python's default: 700)."""


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Keeps the cyclic collector from re-scanning, page after page, objects it cannot free.

    What exists before a pass (modules, clients, config) outlives it: it is frozen out of the collector's reach.
    A decoded page is about a hundred thousand dicts and lists, alive until the page is done and then freed by
    reference counting (JSON makes no cycles): at the default threshold the collector would run hundreds of
    times per page, find nothing and move the page into older generations, whose full scans it then pays for
    too (a quarter of a quiet pass's CPU time at 20,000 Applications). During a pass the young collection runs
    every ``PASS_GC_THRESHOLD`` allocations instead, which still bounds the cyclic garbage to a few MB.
    Everything is restored afterwards, so that in ``serve`` garbage frozen by chance is collected after all."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(PASS_GC_THRESHOLD, thresholds[0]), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _raw_name(raw: Any) -> str:
    try:
        metadata = raw["metadata"]
        return f"{metadata.get('namespace')}/{metadata.get('name')}"
    except (TypeError, KeyError, AttributeError):
        return "(unnamed)"
