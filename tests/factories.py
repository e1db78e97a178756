"""Builders of realistic Argo CD ``Application`` dicts, as the Kubernetes API returns them.

The shapes follow a v3.2-v3.5 controller (the fields ``docs/design.md`` §3 reads): camelCase keys, RFC 3339
``Z`` timestamps with one-second precision, ``resourceHealthSource: appTree`` (no per-resource health),
``syncResult.resources[].images`` on operations, ``{"repoURL": ""}`` as the ``source`` of multi-source
history entries, and a top-level ``operation`` only while a sync is requested or running.

Every builder returns a new dict; the ``with_*``/``set_*`` helpers deep-copy the app they are given, so a
test can derive the states of successive ticks from one another without aliasing::

    app = make_app("payments-api", history=[history_entry(0, fake_sha("a"), at(0))],
                   operation_state=operation_state("Succeeded", at(-0.1), at(0), revision=fake_sha("a"),
                                                   images=["quay.io/acme/payments-api:" + fake_sha("a")]))
    later = set_health(app, "Degraded", at(10))

Times can be given as aware ``datetime`` or as strings; ``at(minutes)`` gives times relative to ``T0``.
"""

from __future__ import annotations

import copy
import hashlib
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = [
    "DEFAULT_REPO",
    "OMIT",
    "T0",
    "Time",
    "append_history",
    "at",
    "fake_sha",
    "fake_uid",
    "git_source",
    "helm_source",
    "history_entry",
    "make_app",
    "mark_deleting",
    "operation_state",
    "redeployed",
    "set_health",
    "set_reconciled",
    "set_summary_images",
    "set_sync",
    "settled_app",
    "ts",
    "values_source",
    "with_history",
    "with_operation",
    "with_operation_state",
]

T0 = datetime(2025, 6, 3, 9, 0, 0, tzinfo=UTC)
"""The instant the examples are dated around (May and June 2025)."""

DEFAULT_REPO = "https://github.com/acme/gitops.git"
SIDECAR = "docker.io/library/busybox:1.36.1"
"""An image in the live Pods that no sync applied (an init container): never a commit."""
DEFAULT_SERVER = "https://kubernetes.default.svc"

Time = datetime | str


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


OMIT: Any = _Omit()
"""Pass as a field value to leave the field out entirely (older controllers, legacy objects)."""


def at(minutes: float = 0, *, seconds: float = 0, base: datetime = T0) -> datetime:
    """``base`` + ``minutes`` (+ ``seconds``), truncated to whole seconds like every Argo CD timestamp."""
    value = base + timedelta(minutes=minutes, seconds=seconds)
    return value.replace(microsecond=0)


def ts(value: Time) -> str:
    """RFC 3339 UTC with a ``Z`` and whole seconds, as ``metav1.Time`` serializes."""
    if isinstance(value, str):
        return value
    if value.tzinfo is None:
        raise ValueError("naive datetime")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fake_sha(seed: str) -> str:
    """A deterministic 40-hex git SHA for ``seed`` (always contains a letter a-f, like real SHAs)."""
    digest = hashlib.sha1(seed.encode()).hexdigest()
    return digest if any(c in "abcdef" for c in digest) else "a" + digest[1:]


def fake_uid(seed: str) -> str:
    """A deterministic Kubernetes-style uid (UUID) for ``seed``."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"argocd-app:{seed}"))


# -- sources ---------------------------------------------------------------------------------------------


def git_source(
    repo_url: str = DEFAULT_REPO,
    path: str = "apps/payments-api/overlays/prod",
    target_revision: str = "HEAD",
    *,
    kustomize_images: Sequence[str] | None = None,
    helm_parameters: Mapping[str, str] | None = None,
    helm_values: str | None = None,
) -> dict[str, Any]:
    """A git ``ApplicationSource``: Kustomize when ``kustomize_images`` is given, Helm-in-git with parameters."""
    source: dict[str, Any] = {"repoURL": repo_url, "path": path, "targetRevision": target_revision}
    if kustomize_images is not None:
        source["kustomize"] = {"images": list(kustomize_images)}
    if helm_parameters is not None or helm_values is not None:
        helm: dict[str, Any] = {}
        if helm_parameters is not None:
            helm["parameters"] = [{"name": key, "value": value} for key, value in helm_parameters.items()]
        if helm_values is not None:
            helm["values"] = helm_values
        source["helm"] = helm
    return source


def helm_source(
    repo_url: str = "https://charts.acme.io",
    chart: str = "search-platform",
    target_revision: str = "3.4.*",
    *,
    value_files: Sequence[str] = ("$values/search-platform/prod.yaml",),
) -> dict[str, Any]:
    """A Helm repository source (its resolved revision is a chart version, not a SHA)."""
    return {
        "repoURL": repo_url,
        "chart": chart,
        "targetRevision": target_revision,
        "helm": {"valueFiles": list(value_files)},
    }


def values_source(repo_url: str = DEFAULT_REPO, target_revision: str = "main", ref: str = "values") -> dict[str, Any]:
    """A ``ref:``-only git source that serves ``$values`` files to a Helm source (multi-source apps)."""
    return {"repoURL": repo_url, "targetRevision": target_revision, "ref": ref}


# -- history and operations ------------------------------------------------------------------------------


def _initiated_by(initiated_by: str | None) -> dict[str, Any] | None:
    if initiated_by is None:
        return None
    if initiated_by == "automated":
        return {"automated": True}
    return {"username": initiated_by}


def history_entry(
    id: int,
    revision: str | None = None,
    deployed_at: Time = T0,
    started_at: Time | None = None,
    *,
    revisions: Sequence[str] | None = None,
    source: Mapping[str, Any] | None = None,
    sources: Sequence[Mapping[str, Any]] | None = None,
    initiated_by: str | None = "automated",
) -> dict[str, Any]:
    """One ``status.history[]`` entry.

    ``started_at`` (``deployStartedAt``) defaults to six seconds before ``deployed_at``; pass ``OMIT`` to
    leave it out (pre-v1.7). A multi-source entry (``revisions``/``sources``) gets the ``{"repoURL": ""}``
    placeholder as ``source`` and no ``revision``, as Argo CD serializes it. ``initiated_by`` is a username,
    ``"automated"`` or ``None`` (pre-v2.11: field absent).
    """
    deployed = deployed_at if isinstance(deployed_at, datetime) else None
    entry: dict[str, Any] = {"id": id}
    if revisions is not None or sources is not None:
        entry["revisions"] = list(revisions or [])
        entry["source"] = {"repoURL": ""}
        entry["sources"] = [dict(s) for s in (sources or [helm_source(), values_source()])]
    else:
        if revision is not None:
            entry["revision"] = revision
        entry["source"] = dict(source) if source is not None else git_source()
    entry["deployedAt"] = ts(deployed_at)
    if started_at is not OMIT:
        if started_at is None:
            if deployed is None:
                raise ValueError("give started_at explicitly when deployed_at is a string")
            started_at = deployed - timedelta(seconds=6)
        entry["deployStartedAt"] = ts(started_at)
    who = _initiated_by(initiated_by)
    if who is not None:
        entry["initiatedBy"] = who
    return copy.deepcopy(entry)


_DEFAULT_MESSAGES = {
    "Succeeded": "successfully synced (all tasks run)",
    "Running": "waiting for healthy state of apps/Deployment/app",
    "Failed": "one or more objects failed to apply, reason: admission webhook denied the request",
    "Error": "ComparisonError: failed to load target state: rpc error: code = Unavailable",
    "Terminating": "Operation is terminating",
}


def operation_state(
    phase: str,
    started_at: Time,
    finished_at: Time | None = None,
    *,
    revision: str | None = None,
    revisions: Sequence[str] | None = None,
    images: Sequence[str] | None = None,
    retry_count: int = 0,
    message: str | None = None,
    source: Mapping[str, Any] | None = None,
    sources: Sequence[Mapping[str, Any]] | None = None,
    dry_run: bool = False,
    resources: Sequence[Mapping[str, str]] | None = None,
    initiated_by: str | None = "automated",
    sync_result: bool = True,
    workload: str = "app",
) -> dict[str, Any]:
    """``status.operationState`` for a sync.

    * ``revision``/``revisions``: both what was requested (``operation.sync``) and what was resolved
      (``syncResult``); a multi-source operation (``revisions`` given) has ``syncResult.revision == ""``.
    * ``images``: ``syncResult.resources[].images`` of the synced Deployment (v3.1+, manifest order);
      ``None`` leaves the ``images`` key out (older controllers).
    * ``resources``: the ``operation.sync.resources`` of a selective or self-heal (partial) sync.
    * ``sync_result=False``: an early failure with no ``syncResult`` at all.
    * ``message`` defaults to a realistic one for the phase; a retrying or failed-after-retries
      operation gets Argo CD's retry suffix when ``retry_count`` is set.
    """
    multi = revisions is not None or sources is not None
    if message is None:
        message = _DEFAULT_MESSAGES.get(phase, "")
        if retry_count and phase in ("Failed", "Error"):
            message = f"{message} (retried {retry_count} times)."
        elif retry_count and phase == "Running" and finished_at is not None:
            message = f"{_DEFAULT_MESSAGES['Failed']}. Retrying attempt #{retry_count} at 9:04AM."
    requested: dict[str, Any] = {"syncStrategy": {"hook": {}}}
    if multi:
        requested["revisions"] = list(revisions or [])
        requested["sources"] = [dict(s) for s in (sources or [helm_source(), values_source()])]
    else:
        if revision is not None:
            requested["revision"] = revision
        requested["source"] = dict(source) if source is not None else git_source()
    if dry_run:
        requested["dryRun"] = True
    if resources is not None:
        requested["resources"] = [dict(r) for r in resources]
    operation: dict[str, Any] = {"sync": requested, "retry": {"limit": 5}}
    who = _initiated_by(initiated_by)
    if who is not None:
        operation["initiatedBy"] = who
    state: dict[str, Any] = {
        "operation": operation,
        "phase": phase,
        "message": message,
        "startedAt": ts(started_at),
    }
    if finished_at is not None:
        state["finishedAt"] = ts(finished_at)
    if retry_count:
        state["retryCount"] = retry_count
    if sync_result:
        deployment: dict[str, Any] = {
            "group": "apps",
            "version": "v1",
            "kind": "Deployment",
            "namespace": "prod",
            "name": workload,
            "status": "Synced",
            "message": f"deployment.apps/{workload} configured",
            "hookPhase": "Running",
            "syncPhase": "Sync",
        }
        if images is not None:
            deployment["images"] = list(images)
        service: dict[str, Any] = {
            "group": "",
            "version": "v1",
            "kind": "Service",
            "namespace": "prod",
            "name": workload,
            "status": "Synced",
            "message": f"service/{workload} unchanged",
            "hookPhase": "Running",
            "syncPhase": "Sync",
        }
        if images is not None:
            service["images"] = []
        result: dict[str, Any] = {"resources": [deployment, service]}
        if multi:
            result["revision"] = ""
            result["revisions"] = list(revisions or [])
            result["source"] = {"repoURL": ""}
            result["sources"] = requested["sources"]
        else:
            result["revision"] = revision or ""
            result["source"] = requested["source"]
        state["syncResult"] = result
    return copy.deepcopy(state)


# -- the Application -------------------------------------------------------------------------------------


def make_app(
    name: str = "payments-api",
    namespace: str = "argocd",
    *,
    uid: str | None = None,
    source: Mapping[str, Any] | None = None,
    sources: Sequence[Mapping[str, Any]] | None = None,
    destination_server: str | None = DEFAULT_SERVER,
    destination_name: str | None = None,
    destination_namespace: str = "prod",
    project: str = "default",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    automated: bool = True,
    revision_history_limit: int | None = None,
    sync_status: str = "Synced",
    sync_revision: str | None = None,
    health_status: str | None = "Healthy",
    health_transition_at: Time | None = None,
    reconciled_at: Time | None = None,
    history: Sequence[Mapping[str, Any]] = (),
    operation_state: Mapping[str, Any] | None = None,
    operation: Mapping[str, Any] | None = None,
    summary_images: Sequence[str] = (),
    deletion_timestamp: Time | None = None,
    created_at: Time = datetime(2025, 4, 1, 8, 0, 0, tzinfo=UTC),
    status: bool = True,
) -> dict[str, Any]:
    """A whole ``Application`` object.

    Defaults describe a settled single-source app: ``Synced``, ``Healthy``, no history. ``uid`` defaults
    to ``fake_uid(namespace/name)``. ``reconciled_at`` defaults to five seconds after the latest of the
    operation's ``finishedAt``, the newest ``deployedAt`` and ``health_transition_at`` (a fresh status);
    pass an earlier time to make the status stale. ``sync_revision`` defaults to the newest history
    entry's revision(s). ``operation`` is the top-level field (a sync requested or running: see
    ``with_operation``). ``status=False`` leaves the status out (an app the controller never saw).
    """
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": uid or fake_uid(f"{namespace}/{name}"),
        "resourceVersion": "48213377",
        "generation": 20931,
        "creationTimestamp": ts(created_at),
        "finalizers": ["resources-finalizer.argocd.argoproj.io"],
    }
    if labels:
        metadata["labels"] = dict(labels)
    if annotations:
        metadata["annotations"] = dict(annotations)
    if deletion_timestamp is not None:
        metadata["deletionTimestamp"] = ts(deletion_timestamp)
        metadata["deletionGracePeriodSeconds"] = 0

    spec: dict[str, Any] = {"project": project}
    if sources is not None:
        spec["sources"] = [dict(s) for s in sources]
    else:
        spec["source"] = dict(source) if source is not None else git_source()
    destination: dict[str, Any] = {"namespace": destination_namespace}
    if destination_name is not None:
        destination["name"] = destination_name
    elif destination_server is not None:
        destination["server"] = destination_server
    spec["destination"] = destination
    sync_policy: dict[str, Any] = {"syncOptions": ["CreateNamespace=true"]}
    if automated:
        sync_policy["automated"] = {"prune": True, "selfHeal": True}
    spec["syncPolicy"] = sync_policy
    if revision_history_limit is not None:
        spec["revisionHistoryLimit"] = revision_history_limit

    app: dict[str, Any] = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": metadata,
        "spec": spec,
    }
    if operation is not None:
        app["operation"] = dict(operation)
    if not status:
        return app
    app["status"] = _status(
        spec,
        sync_status=sync_status,
        sync_revision=sync_revision,
        health_status=health_status,
        health_transition_at=health_transition_at,
        history=copy.deepcopy([dict(h) for h in history]),
        operation_state=copy.deepcopy(dict(operation_state)) if operation_state is not None else None,
        summary_images=sorted(set(summary_images)),
        workload=name,
    )
    app["status"]["reconciledAt"] = ts(reconciled_at) if reconciled_at is not None else _fresh_reconcile(app)
    return copy.deepcopy(app)


def _status(
    spec: Mapping[str, Any],
    *,
    sync_status: str,
    sync_revision: str | None,
    health_status: str | None,
    health_transition_at: Time | None,
    history: list[dict[str, Any]],
    operation_state: dict[str, Any] | None,
    summary_images: list[str],
    workload: str,
) -> dict[str, Any]:
    multi = "sources" in spec
    sync: dict[str, Any] = {"status": sync_status}
    compared: dict[str, Any] = {"destination": spec["destination"]}
    if multi:
        compared["source"] = {"repoURL": ""}
        compared["sources"] = spec["sources"]
        newest = history[-1].get("revisions") if history else None
        if newest:
            sync["revisions"] = list(newest)
    else:
        compared["source"] = spec["source"]
        revision = sync_revision or (history[-1].get("revision") if history else None)
        if revision:
            sync["revision"] = revision
    sync["comparedTo"] = compared
    status: dict[str, Any] = {
        "sync": sync,
        "resources": [
            {
                "group": "apps",
                "version": "v1",
                "kind": "Deployment",
                "namespace": "prod",
                "name": workload,
                "status": sync_status,
            },
            {"version": "v1", "kind": "Service", "namespace": "prod", "name": workload, "status": sync_status},
        ],
        "controllerNamespace": "argocd",
        "resourceHealthSource": "appTree",
        "summary": {"images": summary_images} if summary_images else {},
    }
    if health_status is not None:
        health: dict[str, Any] = {"status": health_status}
        if health_transition_at is not None:
            health["lastTransitionTime"] = ts(health_transition_at)
        status["health"] = health
    if multi:
        status["sourceTypes"] = ["Helm", ""]
    else:
        status["sourceType"] = "Kustomize"
    if history:
        status["history"] = history
    if operation_state is not None:
        status["operationState"] = operation_state
    return status


def _fresh_reconcile(app: Mapping[str, Any]) -> str:
    status = app.get("status") or {}
    candidates = [app["metadata"]["creationTimestamp"]]
    state = status.get("operationState") or {}
    candidates += [state[k] for k in ("startedAt", "finishedAt") if state.get(k)]
    candidates += [h["deployedAt"] for h in status.get("history") or []]
    transition = (status.get("health") or {}).get("lastTransitionTime")
    if transition:
        candidates.append(transition)
    latest = max(datetime.fromisoformat(c.replace("Z", "+00:00")) for c in candidates)
    return ts(latest + timedelta(seconds=5))


# -- derived states (each returns a deep copy) -----------------------------------------------------------


def _copy(app: Mapping[str, Any]) -> dict[str, Any]:
    copied: dict[str, Any] = copy.deepcopy(dict(app))
    copied.setdefault("status", {})
    return copied


def with_history(app: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Replace ``status.history`` (oldest first) and point ``status.sync.revision(s)`` at the newest entry."""
    new = _copy(app)
    status = new["status"]
    status["history"] = [dict(e) for e in entries]
    if not entries:
        status.pop("history")
        return new
    newest = entries[-1]
    sync = status.setdefault("sync", {"status": "Synced"})
    if newest.get("revisions"):
        sync["revisions"] = list(newest["revisions"])
    elif newest.get("revision"):
        sync["revision"] = newest["revision"]
    return new


def append_history(app: Mapping[str, Any], entry: Mapping[str, Any], *, limit: int = 10) -> dict[str, Any]:
    """Append one entry and keep the newest ``limit`` (Argo CD's ``revisionHistoryLimit`` truncation)."""
    entries = list((app.get("status") or {}).get("history") or [])
    entries.append(dict(entry))
    return with_history(app, entries[-limit:] if limit else [])


def with_operation_state(
    app: Mapping[str, Any], state: Mapping[str, Any] | None, *, reconciled_at: Time | None = None
) -> dict[str, Any]:
    """Replace ``status.operationState`` (``None`` removes it). The top-level ``operation`` is removed when
    the new state is completed, as the controller does. ``reconciled_at`` optionally moves the refresh."""
    new = _copy(app)
    if state is None:
        new["status"].pop("operationState", None)
    else:
        new["status"]["operationState"] = copy.deepcopy(dict(state))
        if state.get("phase") in ("Succeeded", "Failed", "Error"):
            new.pop("operation", None)
    if reconciled_at is not None:
        new["status"]["reconciledAt"] = ts(reconciled_at)
    return new


def with_operation(
    app: Mapping[str, Any],
    revision: str | None = None,
    *,
    revisions: Sequence[str] | None = None,
    initiated_by: str | None = "automated",
) -> dict[str, Any]:
    """Set the top-level ``operation`` (a sync requested or running); ``None`` revision means the spec's."""
    new = _copy(app)
    sync: dict[str, Any] = {"syncStrategy": {"hook": {}}}
    if revisions is not None:
        sync["revisions"] = list(revisions)
    elif revision is not None:
        sync["revision"] = revision
    operation: dict[str, Any] = {"sync": sync, "retry": {"limit": 5}}
    who = _initiated_by(initiated_by)
    if who is not None:
        operation["initiatedBy"] = who
    new["operation"] = operation
    return new


def set_health(app: Mapping[str, Any], status: str | None, transition_at: Time | None = None) -> dict[str, Any]:
    """``status.health``; ``transition_at`` is ``lastTransitionTime`` (left out when ``None``, as before v2.14)."""
    new = _copy(app)
    if status is None:
        new["status"].pop("health", None)
        return new
    health: dict[str, Any] = {"status": status}
    if transition_at is not None:
        health["lastTransitionTime"] = ts(transition_at)
    new["status"]["health"] = health
    return new


def set_sync(
    app: Mapping[str, Any], status: str, revision: str | None = None, *, revisions: Sequence[str] | None = None
) -> dict[str, Any]:
    """``status.sync.status`` and optionally the compared revision(s)."""
    new = _copy(app)
    sync = new["status"].setdefault("sync", {})
    sync["status"] = status
    if revision is not None:
        sync["revision"] = revision
    if revisions is not None:
        sync["revisions"] = list(revisions)
    for resource in new["status"].get("resources") or []:
        resource["status"] = status
    return new


def set_reconciled(app: Mapping[str, Any], reconciled_at: Time | None) -> dict[str, Any]:
    """``status.reconciledAt`` (``None`` removes it)."""
    new = _copy(app)
    if reconciled_at is None:
        new["status"].pop("reconciledAt", None)
    else:
        new["status"]["reconciledAt"] = ts(reconciled_at)
    return new


def set_summary_images(app: Mapping[str, Any], images: Sequence[str]) -> dict[str, Any]:
    """``status.summary.images``: the live Pods' images, deduplicated and sorted as the controller does."""
    new = _copy(app)
    new["status"]["summary"] = {"images": sorted(set(images))} if images else {}
    return new


def mark_deleting(app: Mapping[str, Any], deleted_at: Time = T0) -> dict[str, Any]:
    """Set ``metadata.deletionTimestamp`` (the finalizers are still running)."""
    new = copy.deepcopy(dict(app))
    new["metadata"]["deletionTimestamp"] = ts(deleted_at)
    new["metadata"]["deletionGracePeriodSeconds"] = 0
    return new


# -- whole scenarios -------------------------------------------------------------------------------------


def settled_app(name: str, gitops_sha: str, image: str, *, namespace: str = "argocd") -> dict[str, Any]:
    """History id 0 deployed ``gitops_sha`` with ``image`` (``repo:tag``) at ``T0``; Synced and Healthy, with
    ``SIDECAR`` also running."""
    return make_app(
        name,
        namespace,
        source=git_source(DEFAULT_REPO),
        history=[history_entry(0, gitops_sha, at(0), source=git_source(DEFAULT_REPO))],
        operation_state=operation_state("Succeeded", at(-0.1), at(0), revision=gitops_sha, images=[image]),
        summary_images=[image, SIDECAR],
        health_transition_at=at(1),
    )


def redeployed(app: Mapping[str, Any], history_id: int, gitops_sha: str, image: str, minute: float) -> dict[str, Any]:
    """``app`` after a successful sync (history ``history_id``) of ``gitops_sha`` with ``image`` finishing at
    ``minute``, then Healthy 1.5 minutes later."""
    started, finished = at(minute - 0.2), at(minute)
    app = append_history(app, history_entry(history_id, gitops_sha, finished, started, source=git_source(DEFAULT_REPO)))
    app = with_operation_state(
        app,
        operation_state("Succeeded", started, finished, revision=gitops_sha, images=[image]),
        reconciled_at=at(minute + 2),
    )
    app = set_health(app, "Healthy", at(minute + 1.5))
    return set_summary_images(app, [image, SIDECAR])
