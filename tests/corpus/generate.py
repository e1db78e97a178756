"""Regenerate the Application corpus: ``python -m tests.corpus.generate`` from the repository root.

The JSON files next to this script are the corpus; this script is only how they were written. Each
file is ``{"expect": "ok" | "malformed", "reason_contains": "...", "app": {...}}``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent

SHA_A = "4b8f6f1c0d3e2a9b7c6d5e4f3a2b1c0d9e8f7a6b"
SHA_B = "9081c34e5a7b2d1f0c9e8d7c6b5a4f3e2d1c0b9a"
SHA_C = "dc43d94a1b2c3d4e5f60718293a4b5c6d7e8f901"


def base_app() -> dict[str, Any]:
    """A valid single-source Application carrying every field the parser reads."""
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {
            "name": "payments-api",
            "namespace": "argocd",
            "uid": "5b0c3f0e-6a43-4c1e-9a59-0f8f1b2d7c11",
            "resourceVersion": "918273",
            "generation": 2214,
            "labels": {"team": "payments", "app.kubernetes.io/part-of": "checkout"},
            "finalizers": ["resources-finalizer.argocd.argoproj.io"],
        },
        "spec": {
            "project": "payments",
            "source": {
                "repoURL": "https://github.com/acme/payments-gitops.git",
                "path": "apps/payments-api/overlays/prod",
                "targetRevision": "main",
            },
            "destination": {"server": "https://kubernetes.default.svc", "namespace": "payments"},
            "syncPolicy": {"automated": {"prune": True, "selfHeal": False}},
        },
        "status": {
            "sync": {"status": "Synced", "revision": SHA_B},
            "health": {"status": "Healthy", "lastTransitionTime": "2025-06-03T09:01:17Z"},
            "reconciledAt": "2025-06-03T09:03:40Z",
            "history": [
                {
                    "id": 0,
                    "revision": SHA_A,
                    "deployedAt": "2025-06-02T15:20:03Z",
                    "deployStartedAt": "2025-06-02T15:19:58Z",
                    "source": {
                        "repoURL": "https://github.com/acme/payments-gitops.git",
                        "path": "apps/payments-api/overlays/prod",
                        "targetRevision": "main",
                    },
                    "initiatedBy": {"username": "jane.doe@acme.io"},
                },
                {
                    "id": 1,
                    "revision": SHA_B,
                    "deployedAt": "2025-06-03T09:00:12Z",
                    "deployStartedAt": "2025-06-03T09:00:05Z",
                    "source": {
                        "repoURL": "https://github.com/acme/payments-gitops.git",
                        "path": "apps/payments-api/overlays/prod",
                        "targetRevision": "main",
                    },
                    "initiatedBy": {"automated": True},
                },
            ],
            "operationState": {
                "operation": {
                    "sync": {"revision": SHA_B, "syncStrategy": {"hook": {}}},
                    "initiatedBy": {"automated": True},
                    "retry": {"limit": 5},
                },
                "phase": "Succeeded",
                "message": "successfully synced (all tasks run)",
                "startedAt": "2025-06-03T09:00:05Z",
                "finishedAt": "2025-06-03T09:00:12Z",
                "syncResult": {
                    "revision": SHA_B,
                    "source": {
                        "repoURL": "https://github.com/acme/payments-gitops.git",
                        "path": "apps/payments-api/overlays/prod",
                        "targetRevision": "main",
                    },
                    "resources": [
                        {
                            "group": "",
                            "version": "v1",
                            "kind": "Service",
                            "namespace": "payments",
                            "name": "payments-api",
                            "status": "Synced",
                            "message": "service/payments-api unchanged",
                            "hookPhase": "Running",
                            "syncPhase": "Sync",
                        },
                        {
                            "group": "apps",
                            "version": "v1",
                            "kind": "Deployment",
                            "namespace": "payments",
                            "name": "payments-api",
                            "status": "Synced",
                            "message": "deployment.apps/payments-api configured",
                            "hookPhase": "Running",
                            "syncPhase": "Sync",
                            "images": ["ghcr.io/acme/payments-api:9081c34", "ghcr.io/acme/envoy-sidecar:1.29.2"],
                        },
                    ],
                },
            },
            "summary": {
                "images": [
                    "busybox:1.36.1",
                    "ghcr.io/acme/envoy-sidecar:1.29.2",
                    "ghcr.io/acme/payments-api:9081c34",
                ]
            },
            "sourceType": "Kustomize",
            "resourceHealthSource": "appTree",
            "controllerNamespace": "argocd",
        },
    }


def multi_source_app() -> dict[str, Any]:
    app = base_app()
    app["metadata"]["name"] = "search-platform"
    sources = [
        {"repoURL": "https://charts.acme.io", "chart": "search-platform", "targetRevision": "3.4.*"},
        {"repoURL": "https://github.com/acme/search-values.git", "targetRevision": "main", "ref": "values"},
    ]
    app["spec"].pop("source")
    app["spec"]["sources"] = sources
    for entry, revisions in zip(app["status"]["history"], (["3.4.1", SHA_A], ["3.4.2", SHA_B]), strict=True):
        entry.pop("revision")
        entry["revisions"] = revisions
        entry["source"] = {"repoURL": ""}
        entry["sources"] = copy.deepcopy(sources)
    state = app["status"]["operationState"]
    state["operation"]["sync"] = {"revisions": ["3.4.2", SHA_B], "sources": copy.deepcopy(sources)}
    state["syncResult"]["revision"] = ""
    state["syncResult"]["revisions"] = ["3.4.2", SHA_B]
    state["syncResult"]["source"] = {"repoURL": ""}
    state["syncResult"]["sources"] = copy.deepcopy(sources)
    return app


def _set(app: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """A copy of ``app`` with ``value`` at ``path``; missing object keys on the way are created."""
    result = copy.deepcopy(app)
    node: Any = result
    for step in path[:-1]:
        if isinstance(step, str) and step not in node:
            node[step] = {}
        node = node[step]
    node[path[-1]] = value
    return result


def _delete(app: dict[str, Any], path: tuple[str | int, ...]) -> dict[str, Any]:
    result = copy.deepcopy(app)
    node: Any = result
    for step in path[:-1]:
        node = node[step]
    del node[path[-1]]
    return result


def _dotted(path: tuple[str | int, ...]) -> str:
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text


OS = ("status", "operationState")
H0 = ("status", "history", 0)

# (path, wrong value, reason path when it differs from ``path``) for every field the parser reads.
WRONG_TYPES: list[tuple[tuple[str | int, ...], Any, str | None]] = [
    (("metadata",), "payments-api", None),
    (("metadata", "name"), 42, None),
    (("metadata", "namespace"), ["argocd"], None),
    (("metadata", "uid"), 1234, None),
    (("metadata", "deletionTimestamp"), 1717405200, None),
    (("metadata", "labels"), ["team=payments"], None),
    (("metadata", "labels", "team"), 7, "metadata.labels['team']"),
    (("spec",), "payments", None),
    (("spec", "source"), "https://github.com/acme/payments-gitops.git", None),
    (("spec", "source", "repoURL"), 1, None),
    (("spec", "source", "path"), {"dir": "apps"}, None),
    (("spec", "source", "chart"), ["payments"], None),
    (("spec", "source", "targetRevision"), 1.0, None),
    (("spec", "sources"), {"repoURL": "https://github.com/acme/x.git"}, None),
    (("spec", "sources"), ["https://github.com/acme/x.git"], "spec.sources[0]"),
    (("spec", "sources"), [{"repoURL": False}], "spec.sources[0].repoURL"),
    (("spec", "destination"), "in-cluster", None),
    (("spec", "destination", "name"), 3, None),
    (("spec", "destination", "server"), ["https://kubernetes.default.svc"], None),
    (("spec", "project"), {"name": "payments"}, None),
    (("operation",), "sync", None),
    (("status",), ["Synced"], None),
    (("status", "sync"), "Synced", None),
    (("status", "sync", "status"), 1, None),
    (("status", "health"), ["Healthy"], None),
    (("status", "health", "status"), {"status": "Healthy"}, None),
    (("status", "health", "lastTransitionTime"), 1717405277, None),
    (("status", "reconciledAt"), 1717405420, None),
    (("status", "history"), {"0": {"id": 0}}, None),
    (("status", "history", 0), 5, None),
    ((*H0, "id"), "x", None),
    ((*H0, "revision"), 5, None),
    ((*H0, "revisions"), SHA_A, None),
    ((*H0, "revisions"), [SHA_A, None], "status.history[0].revisions[1]"),
    ((*H0, "deployedAt"), 1717341603, None),
    ((*H0, "deployStartedAt"), ["2025-06-02T15:19:58Z"], None),
    ((*H0, "source"), "https://github.com/acme/payments-gitops.git", None),
    ((*H0, "source", "repoURL"), 5, None),
    ((*H0, "source", "path"), 5, None),
    ((*H0, "source", "chart"), {}, None),
    ((*H0, "source", "targetRevision"), [], None),
    ((*H0, "sources"), {"repoURL": ""}, None),
    ((*H0, "sources"), [[]], "status.history[0].sources[0]"),
    ((*H0, "initiatedBy"), "jane.doe@acme.io", None),
    ((*H0, "initiatedBy", "username"), 5, None),
    ((*H0, "initiatedBy", "automated"), "true", None),
    ((*OS,), "Succeeded", None),
    ((*OS, "phase"), 3, None),
    ((*OS, "startedAt"), 1717405205, None),
    ((*OS, "finishedAt"), {}, None),
    ((*OS, "message"), ["successfully synced"], None),
    ((*OS, "retryCount"), "2", None),
    ((*OS, "syncResult"), [], None),
    ((*OS, "syncResult", "revision"), 5, None),
    ((*OS, "syncResult", "revisions"), SHA_B, None),
    ((*OS, "syncResult", "source"), 5, None),
    ((*OS, "syncResult", "sources"), "https://charts.acme.io", None),
    ((*OS, "syncResult", "resources"), {"kind": "Deployment"}, None),
    ((*OS, "syncResult", "resources", 1), "deployment.apps/payments-api", None),
    ((*OS, "syncResult", "resources", 1, "images"), "ghcr.io/acme/payments-api:9081c34", None),
    ((*OS, "syncResult", "resources", 1, "images", 0), 5, None),
    ((*OS, "operation"), 5, None),
    ((*OS, "operation", "sync"), [], None),
    ((*OS, "operation", "sync", "revision"), 5, None),
    ((*OS, "operation", "sync", "revisions"), "x", None),
    ((*OS, "operation", "sync", "source"), [], None),
    ((*OS, "operation", "sync", "sources"), {}, None),
    ((*OS, "operation", "sync", "dryRun"), "false", None),
    ((*OS, "operation", "sync", "resources"), "all", None),
    (("status", "summary"), ["nginx:1.25"], None),
    (("status", "summary", "images"), "nginx:1.25", None),
    (("status", "summary", "images", 0), 5, None),
]


def wrong_type_cases() -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {}
    for path, value, reason_path in WRONG_TYPES:
        reason = reason_path or _dotted(path)
        stem = "wrong-type-" + reason.replace(".", "-").replace("[", "-").replace("]", "").replace("'", "")
        stem = stem.replace("--", "-")
        while stem in cases:
            stem += "-again"
        cases[stem] = {"expect": "malformed", "reason_contains": reason + ":", "app": _set(base_app(), path, value)}
    return cases


def _ok(app: Any) -> dict[str, Any]:
    return {"expect": "ok", "app": app}


def _bad(app: Any, reason: str) -> dict[str, Any]:
    return {"expect": "malformed", "reason_contains": reason, "app": app}


def unusual_cases() -> dict[str, dict[str, Any]]:
    base = base_app()
    history = base["status"]["history"]
    cases: dict[str, dict[str, Any]] = {}

    # identity
    cases["application-not-an-object"] = _bad([base], "application: expected an object")
    cases["application-empty-object"] = _bad({}, "metadata: missing")
    cases["metadata-null"] = _bad(_set(base, ("metadata",), None), "metadata: missing")
    cases["metadata-name-empty"] = _bad(_set(base, ("metadata", "name"), ""), "metadata.name: missing or empty")
    cases["metadata-name-missing"] = _bad(_delete(base, ("metadata", "name")), "metadata.name: missing or empty")
    cases["metadata-namespace-missing"] = _bad(
        _delete(base, ("metadata", "namespace")), "metadata.namespace: missing or empty"
    )
    cases["metadata-uid-missing"] = _bad(_delete(base, ("metadata", "uid")), "metadata.uid: missing or empty")
    cases["metadata-uid-null"] = _bad(_set(base, ("metadata", "uid"), None), "metadata.uid: missing or empty")
    cases["metadata-name-with-slash"] = _bad(_set(base, ("metadata", "name"), "a/b"), "metadata.name: must not")
    cases["metadata-name-lone-surrogate"] = _bad(
        _set(base, ("metadata", "name"), "payments-\ud800"), "metadata.name: not valid Unicode"
    )
    cases["metadata-labels-null"] = _ok(_set(base, ("metadata", "labels"), None))
    cases["metadata-deletionTimestamp-garbage"] = _bad(
        _set(base, ("metadata", "deletionTimestamp"), "soon"), "metadata.deletionTimestamp: not an RFC 3339"
    )
    cases["unicode-names"] = _ok(
        _set(
            _set(_set(base, ("metadata", "name"), "zahlungsdienst-ü-支付"), ("metadata", "labels"), {"équipe": "支付"}),
            (*OS, "message"),
            "synchronisé ✅ — 同步成功",
        )
    )

    # status presence
    cases["status-null"] = _ok(_set(base, ("status",), None))
    cases["status-missing"] = _ok(_delete(base, ("status",)))
    cases["status-empty-object"] = _ok(_set(base, ("status",), {}))
    cases["spec-missing"] = _ok(_delete(base, ("spec",)))
    cases["never-synced"] = _ok(
        _set(
            base,
            ("status",),
            {
                "sync": {"status": "OutOfSync", "revision": SHA_B},
                "health": {"status": "Missing"},
                "reconciledAt": "2025-06-03T14:47:30Z",
                "summary": {},
            },
        )
    )
    cases["deleting"] = _ok(_set(base, ("metadata", "deletionTimestamp"), "2025-06-03T15:02:10Z"))
    cases["top-level-operation-present"] = _ok(
        _set(base, ("operation",), {"sync": {"revision": SHA_C}, "initiatedBy": {"automated": True}})
    )
    cases["nulls-everywhere"] = _ok(
        {
            "metadata": {"name": "n", "namespace": "ns", "uid": "u", "labels": None, "deletionTimestamp": None},
            "spec": {"source": None, "sources": None, "destination": None, "project": None},
            "operation": None,
            "status": {
                "sync": None,
                "health": {"status": None, "lastTransitionTime": None},
                "reconciledAt": None,
                "history": None,
                "operationState": None,
                "summary": {"images": None},
            },
        }
    )
    cases["extra-unknown-fields"] = _ok(
        _set(_set(base, ("status", "futureField"), {"x": [1, 2]}), (*H0, "somethingNew"), {"a": None})
    )
    cases["destination-name-and-server"] = _ok(
        _set(base, ("spec", "destination"), {"name": "prod-east", "server": "https://10.0.0.1:6443"})
    )

    # history
    cases["history-empty-list"] = _ok(_set(base, ("status", "history"), []))
    cases["history-id-negative"] = _bad(_set(base, (*H0, "id"), -1), "status.history[0].id: must not be negative")
    cases["history-id-float"] = _bad(_set(base, (*H0, "id"), 0.0), "status.history[0].id: expected an integer")
    cases["history-id-bool"] = _bad(_set(base, (*H0, "id"), False), "status.history[0].id: expected an integer")
    cases["history-id-null"] = _bad(_set(base, (*H0, "id"), None), "status.history[0].id: missing")
    cases["history-id-missing"] = _bad(_delete(base, (*H0, "id")), "status.history[0].id: missing")
    cases["history-id-string-third-entry"] = _bad(
        _set(base, ("status", "history"), [*history, {**history[1], "id": "x"}]),
        "status.history[2].id: expected an integer, got 'x'",
    )
    cases["history-duplicate-ids"] = _bad(
        _set(base, ("status", "history", 1, "id"), 0), "status.history[1].id: duplicate history id 0"
    )
    cases["history-missing-deployedAt"] = _bad(
        _delete(base, (*H0, "deployedAt")), "status.history[0].deployedAt: missing"
    )
    cases["history-deployedAt-null"] = _bad(
        _set(base, (*H0, "deployedAt"), None), "status.history[0].deployedAt: missing"
    )
    cases["history-deployedAt-no-offset"] = _bad(
        _set(base, (*H0, "deployedAt"), "2025-06-02T15:20:03"), "status.history[0].deployedAt: not an RFC 3339"
    )
    cases["history-deployedAt-prose"] = _bad(
        _set(base, (*H0, "deployedAt"), "June 2nd, 3pm"), "status.history[0].deployedAt: not an RFC 3339"
    )
    cases["history-huge-id"] = _ok(_set(base, ("status", "history", 1, "id"), 2**62))
    cases["history-unsorted"] = _ok(
        _set(
            base,
            ("status", "history"),
            [{**history[1], "id": 7}, {**history[0], "id": 5}, {**history[1], "id": 6}],
        )
    )
    cases["history-without-deployStartedAt-or-initiatedBy"] = _ok(
        _set(
            base,
            ("status", "history"),
            [{"id": 3, "revision": SHA_A, "deployedAt": "2024-11-02T10:00:00Z", "source": history[0]["source"]}],
        )
    )
    cases["history-no-revision-at-all"] = _ok(_delete(_delete(base, (*H0, "revision")), (*H0, "source")))
    cases["history-200-entries"] = _ok(
        _set(
            base,
            ("status", "history"),
            [
                {
                    **history[1],
                    "id": i,
                    "deployedAt": f"2025-01-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z",
                }
                for i in range(200)
            ],
        )
    )
    cases["history-entry-null"] = _bad(
        _set(base, ("status", "history"), [None]), "status.history[0]: expected an object"
    )
    cases["history-initiatedBy-applicationset"] = _ok(
        _set(base, (*H0, "initiatedBy"), {"username": "applicationset-controller", "automated": True})
    )
    cases["history-source-deep-helm-values"] = _ok(_set(base, (*H0, "source", "helm"), {"valuesObject": _nested(150)}))
    cases["revision-HEAD"] = _ok(
        _set(_set(base, ("status", "history", 1, "revision"), "HEAD"), (*OS, "syncResult", "revision"), "HEAD")
    )

    # sources
    cases["multi-source-helm-and-git"] = _ok(multi_source_app())
    single_element = multi_source_app()
    single_element["spec"]["sources"] = single_element["spec"]["sources"][:1]
    cases["multi-source-single-element"] = _ok(single_element)
    cases["multi-source-empty-sources-list"] = _ok(_set(base, ("spec", "sources"), []))
    cases["oci-digest-revision"] = _ok(_set(base, ("status", "history", 1, "revision"), "sha256:" + "ab" * 32))
    cases["source-repoURL-missing"] = _ok(_delete(base, ("spec", "source", "repoURL")))

    # operation state
    cases["operation-missing-phase"] = _bad(_delete(base, (*OS, "phase")), "status.operationState.phase: missing")
    cases["operation-missing-startedAt"] = _bad(
        _delete(base, (*OS, "startedAt")), "status.operationState.startedAt: missing"
    )
    cases["operation-empty-object"] = _bad(_set(base, OS, {}), "status.operationState.phase: missing")
    cases["operation-unknown-phase"] = _ok(_set(base, (*OS, "phase"), "Paused"))
    cases["operation-running-with-finishedAt"] = _ok(
        _set(
            _set(_set(base, (*OS, "phase"), "Running"), (*OS, "retryCount"), 1),
            (*OS, "message"),
            "one or more objects failed to apply, reason: admission webhook denied. Retrying attempt #1 at 9:00AM.",
        )
    )
    cases["operation-error-empty-revision"] = _ok(
        _set(
            _set(_set(base, (*OS, "phase"), "Error"), (*OS, "syncResult"), {"revision": "", "source": {"repoURL": ""}}),
            (*OS, "message"),
            "ComparisonError: failed to load target state: rpc error: code = Unavailable",
        )
    )
    cases["operation-retryCount-bool"] = _bad(
        _set(base, (*OS, "retryCount"), True), "status.operationState.retryCount: expected an integer"
    )
    cases["operation-retryCount-float"] = _bad(
        _set(base, (*OS, "retryCount"), 2.0), "status.operationState.retryCount: expected an integer"
    )
    cases["operation-images-absent"] = _ok(
        _set(base, (*OS, "syncResult", "resources"), [{"kind": "Deployment", "name": "x", "status": "Synced"}])
    )
    cases["operation-images-null"] = _ok(_set(base, (*OS, "syncResult", "resources", 1, "images"), None))
    cases["operation-images-empty-list"] = _ok(_set(base, (*OS, "syncResult", "resources", 1, "images"), []))
    cases["operation-partial-sync"] = _ok(
        _set(base, (*OS, "operation", "sync", "resources"), [{"group": "apps", "kind": "Deployment", "name": "x"}])
    )
    cases["operation-dry-run"] = _ok(_set(base, (*OS, "operation", "sync", "dryRun"), True))
    cases["operation-no-syncResult"] = _ok(_delete(base, (*OS, "syncResult")))

    # timestamps
    cases["timestamp-with-offset"] = _ok(_set(base, ("status", "reconciledAt"), "2025-06-03T11:03:40+02:00"))
    cases["timestamp-fractional-seconds"] = _ok(_set(base, ("status", "reconciledAt"), "2025-06-03T09:03:40.123456Z"))
    cases["timestamp-zero-time"] = _ok(_set(base, (*H0, "deployStartedAt"), "0001-01-01T00:00:00Z"))
    cases["timestamp-year-underflow"] = _bad(
        _set(base, (*OS, "startedAt"), "0001-01-01T00:00:00+01:00"), "status.operationState.startedAt: not an RFC 3339"
    )
    cases["timestamp-prose"] = _bad(
        _set(base, ("status", "reconciledAt"), "yesterday"), "status.reconciledAt: not an RFC"
    )
    cases["timestamp-empty-string"] = _bad(
        _set(base, ("status", "reconciledAt"), ""), "status.reconciledAt: not an RFC"
    )

    # sizes and values
    images = [f"registry.acme.io:5000/svc-{i % 40}:{i:07x}" for i in range(2000)]
    huge = _set(base, (*OS, "syncResult", "resources", 1, "images"), images)
    cases["huge-image-list"] = _ok(_set(huge, ("status", "summary", "images"), sorted(images)))
    long_image = "ghcr.io/acme/" + "a" * 9_983 + ":1.0"
    cases["string-10000-chars"] = _ok(
        _set(
            _set(base, ("status", "summary", "images"), [long_image]),
            (*OS, "message"),
            "x" * 10_000,
        )
    )
    cases["health-unknown-value"] = _ok(_set(base, ("status", "health", "status"), "Exploding"))
    cases["sync-unknown-value"] = _ok(_set(base, ("status", "sync", "status"), "Unknown"))
    cases["retry-count-large"] = _ok(_set(base, (*OS, "retryCount"), 2**40))
    return cases


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"leaf": True}
    for level in range(depth):
        node = {f"level{level}": node}
    return node


def main() -> None:
    cases = {**wrong_type_cases(), **unusual_cases()}
    for old in HERE.glob("*.json"):
        old.unlink()
    for name, case in sorted(cases.items()):
        text = json.dumps(case, indent=1, ensure_ascii=False) + "\n"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(case, indent=1, ensure_ascii=True) + "\n"
        (HERE / f"{name}.json").write_text(text, encoding="utf-8")
    print(f"wrote {len(cases)} corpus files to {HERE}")


if __name__ == "__main__":
    main()
