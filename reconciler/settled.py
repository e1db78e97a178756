"""The steady-state fast path: an Application unchanged since a tick that left nothing to decide is skipped.

Such an Application's snapshot stores two digests, each salted with the configuration that shapes decisions
(``decision_salt``): ``settled_digest``, of every field the planner reads, and ``encoded_digest``, of the
Application's JSON as the API server sent it, less the values that move on every refresh. While the listing shows
the same JSON, the Application is not even decoded; while it shows the same fields, it is decoded but neither
parsed nor planned. A quiet tick costs the listing, one batched snapshot read per page (the store reads the
digests without decoding the snapshot: ``stored_settled_digest``) and a hash of each Application's bytes.
``split_page`` applies this to one page; ``frozen_heap`` keeps the collector from scanning again and again what
it cannot free. Pure, except for the collector: the caller reads the store and passes the reader in.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import re
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


_VOLATILE = re.compile(rb'"(?:reconciledAt|resourceVersion|time)":("[^"\\]*")|"generation":(\d+)')
"""What moves on every refresh of an Application without changing anything the planner reads: the values of
``status.reconciledAt``, ``metadata.resourceVersion``, ``metadata.generation`` (the Application CRD has no status
subresource, so every status update counts) and the ``time`` of ``metadata.managedFields`` entries. Only whole
values (strings without escapes, digits) are left out, each marked where it was: two pieces of JSON digest alike
only if they differ in those values alone, so one is a valid Application exactly when the other is."""
_RECONCILED_AT = b'"reconciledAt":'
_STRING_VALUE = re.compile(rb'"[^"\\]*"')


def encoded_digest(encoded: bytes, salt: str = "", metadata_end: int | None = None) -> str:
    """A digest of an Application's JSON exactly as the API server wrote it, except the values that move on
    every refresh (``_VOLATILE``). Any other change, even one the planner does not read, changes it: equal
    digests mean the same Application with the same fields, which ``settled_digest`` (a function of those
    fields that ignores the same refreshes) would find equal too.

    ``metadata_end``: where the item's ``metadata`` ends, when known. The API server writes keys in order, so
    after it only ``status.reconciledAt`` moves, the last member of that name: the rest is not searched."""
    digest = hashlib.blake2b(salt.encode(), digest_size=16)
    view = memoryview(encoded)
    start = 0
    for begin, end in _volatile_values(encoded, metadata_end):
        digest.update(view[start:begin])
        digest.update(b"\0")
        start = end
    digest.update(view[start:])
    return digest.hexdigest()


def _volatile_values(encoded: bytes, metadata_end: int | None) -> list[tuple[int, int]]:
    if metadata_end is None:
        return [match.span(match.lastindex or 0) for match in _VOLATILE.finditer(encoded)]
    spans = [match.span(match.lastindex or 0) for match in _VOLATILE.finditer(encoded, 0, metadata_end)]
    reconciled = encoded.rfind(_RECONCILED_AT, metadata_end)
    if reconciled >= 0 and (value := _STRING_VALUE.match(encoded, reconciled + len(_RECONCILED_AT))) is not None:
        spans.append(value.span())
    return spans


def stored_digests(value: str | None) -> tuple[str | None, str | None]:
    """``(settled digest, encoded digest)`` of what a snapshot stores as its ``settled_digest``."""
    if not value:
        return None, None
    settled, _, encoded = value.partition(".")
    return settled, encoded or None


def digests_to_store(settled: str | None, encoded: str | None) -> str | None:
    """What a snapshot stores as its ``settled_digest``: both digests, or the settled one alone when the
    Application's JSON was not at hand (its page was decoded whole)."""
    if settled is None:
        return None
    return f"{settled}.{encoded}" if encoded else settled


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
    return text[start:end] if 0 < end - start <= 160 else None


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


class EncodedItem(Protocol):
    """An Application's JSON as the API server sent it, its ``metadata`` decoded alone and where that ends in
    ``body`` (``argocd.EncodedItem``)."""

    @property
    def metadata(self) -> Any: ...
    @property
    def body(self) -> bytes: ...
    @property
    def metadata_end(self) -> int | None: ...


class ListedPage(Protocol):
    """A page of the listing (``argocd.ListedPage``): decoded on demand, and its items' JSON when it could be cut."""

    @property
    def encoded(self) -> Sequence[EncodedItem] | None: ...
    def items(self) -> list[Any]: ...


class Changed(NamedTuple):
    """An Application that may have changed: parsed, with its stored snapshot and its digests now (what its
    snapshot stores once settled: ``digests_to_store``)."""

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
    refreshed: dict[AppKey, Snapshot] = field(default_factory=dict)
    """Unchanged Applications whose JSON changed in what the planner does not read: their snapshots with the new
    encoded digest, to store so that the next tick need not decode them."""

    @property
    def listed(self) -> list[AppKey]:
        """Every selected Application of the page that could be read."""
        return [*self.unchanged, *(item.observation.key for item in self.changed)]


def split_page(
    page: Sequence[Any] | ListedPage,
    cluster: str,
    *,
    selected: Callable[[AppKey], bool],
    load: Callable[[list[AppKey]], Mapping[AppKey, StoredItem]],
    salt: str,
    backfill: bool = False,
) -> PageSplit:
    """The selected Applications of a page that may have changed, parsed, with their stored snapshots; the
    others counted. A backfill looks at everything. A malformed Application is logged with its reason.

    When the page's items could be cut apart undecoded, an Application whose encoded digest is the stored one is
    not decoded, and the others are decoded one by one. If one of those pieces is not a JSON value on its own, the
    cut was wrong (or an item is too deep to decode): the whole page is then decoded and looked at the usual way."""
    if isinstance(page, Sequence):
        return _split_items(page, cluster, selected, load, salt, backfill)
    encoded = None if backfill else page.encoded
    if encoded is not None:
        split = _split_encoded(encoded, cluster, selected, load, salt)
        if split is not None:
            return split
    return _split_items(page.items(), cluster, selected, load, salt, backfill)


def _split_encoded(
    encoded: Sequence[EncodedItem],
    cluster: str,
    selected: Callable[[AppKey], bool],
    load: Callable[[list[AppKey]], Mapping[AppKey, StoredItem]],
    salt: str,
) -> PageSplit | None:
    candidates: list[tuple[EncodedItem, AppKey | None]] = []
    for item in encoded:
        key = application_key({"metadata": item.metadata}, cluster) if item.metadata is not None else None
        if key is not None and not selected(key):
            continue
        candidates.append((item, key))
    snapshots = load([key for _, key in candidates if key is not None])
    split = PageSplit()
    decoded: list[tuple[Any, AppKey | None, str]] = []
    for item, key in candidates:
        body = item.body
        digest = encoded_digest(body, salt, item.metadata_end)
        stored = snapshots.get(key) if key is not None else None
        if key is not None and stored is not None and stored_digests(stored.settled_digest)[1] == digest:
            split.unchanged.append(key)
            continue
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError):
            return None
        decoded.append((raw, key, digest))
    for raw, key, digest in decoded:
        _decide(split, raw, key, snapshots.get(key) if key is not None else None, cluster, selected, salt, digest)
    return split


def _split_items(
    page: Sequence[Any],
    cluster: str,
    selected: Callable[[AppKey], bool],
    load: Callable[[list[AppKey]], Mapping[AppKey, StoredItem]],
    salt: str,
    backfill: bool,
) -> PageSplit:
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
        _decide(split, raw, key, item, cluster, selected, None if backfill else salt, None)
    return split


def _decide(
    split: PageSplit,
    raw: Any,
    key: AppKey | None,
    item: StoredItem | None,
    cluster: str,
    selected: Callable[[AppKey], bool],
    salt: str | None,
    encoded: str | None,
) -> None:
    """One decoded Application: unchanged when its settled digest is the stored one, else parsed (``salt`` is
    ``None`` for a backfill, which looks at everything)."""
    digest = None if salt is None else settled_digest(raw, salt)
    if key is not None and item is not None and digest is not None:
        stored_settled, stored_encoded = stored_digests(item.settled_digest)
        if stored_settled == digest:
            split.unchanged.append(key)
            if encoded is not None and encoded != stored_encoded and (snapshot := item.snapshot()) is not None:
                split.refreshed[key] = snapshot.evolve(settled_digest=digests_to_store(digest, encoded))
            return
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
        return
    if key is None and not selected(observation.key):
        return
    split.changed.append(Changed(observation, stored, digests_to_store(digest, encoded)))


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
