"""Tests for ``reconciler.application``: realistic Applications, the corpus, fuzzing."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.application import MalformedApplication, parse_application, source_fingerprint
from reconciler.model import AppKey, AppObservation, HistoryEntry, OperationState, SourceRef
from tests.corpus import CorpusCase, corpus_case, load_corpus
from tests.corpus import generate as corpus_generator

CLUSTER = "prod-east"


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- realistic Applications, as a v3.2-v3.5 controller writes them ----------------------------------------

PAYMENTS_SHA = "7c1e4b2a9f0d3c8e6b5a4d3c2b1a0f9e8d7c6b5a"
GITOPS = "https://github.com/acme/payments-gitops.git"


def payments_api() -> dict[str, Any]:
    """First deployment, single source, automated, v3.x controller with images in syncResult."""
    source = {"repoURL": GITOPS, "path": "apps/payments-api/overlays/prod", "targetRevision": "main"}
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {
            "name": "payments-api",
            "namespace": "argocd",
            "uid": "2f6a1c4e-8d0b-4b7e-9a3f-5c1d2e3f4a5b",
            "generation": 1893,
            "resourceVersion": "48211907",
            "creationTimestamp": "2025-06-03T08:59:40Z",
            "labels": {"team": "payments", "app.kubernetes.io/part-of": "checkout"},
            "annotations": {
                "notified.notifications.argoproj.io": json.dumps({f"{PAYMENTS_SHA}:on-deployed:[0]": 1748941277})
            },
            "finalizers": ["resources-finalizer.argocd.argoproj.io"],
        },
        "spec": {
            "project": "payments",
            "source": source,
            "destination": {"server": "https://kubernetes.default.svc", "namespace": "payments"},
            "syncPolicy": {"automated": {"prune": True, "selfHeal": True}, "syncOptions": ["CreateNamespace=true"]},
        },
        "status": {
            "resources": [
                {
                    "version": "v1",
                    "kind": "Service",
                    "namespace": "payments",
                    "name": "payments-api",
                    "status": "Synced",
                },
                {
                    "group": "apps",
                    "version": "v1",
                    "kind": "Deployment",
                    "namespace": "payments",
                    "name": "payments-api",
                    "status": "Synced",
                },
            ],
            "sync": {
                "status": "Synced",
                "comparedTo": {"source": source, "destination": {"server": "https://kubernetes.default.svc"}},
                "revision": PAYMENTS_SHA,
            },
            "health": {"status": "Healthy", "lastTransitionTime": "2025-06-03T09:01:17Z"},
            "history": [
                {
                    "revision": PAYMENTS_SHA,
                    "deployedAt": "2025-06-03T09:00:12Z",
                    "id": 0,
                    "source": source,
                    "deployStartedAt": "2025-06-03T09:00:04Z",
                    "initiatedBy": {"automated": True},
                }
            ],
            "reconciledAt": "2025-06-03T09:03:40Z",
            "operationState": {
                "operation": {
                    "sync": {"revision": PAYMENTS_SHA, "syncStrategy": {"hook": {}}, "source": source},
                    "initiatedBy": {"automated": True},
                    "retry": {"limit": 5},
                },
                "phase": "Succeeded",
                "message": "successfully synced (all tasks run)",
                "syncResult": {
                    "resources": [
                        {
                            "group": "",
                            "version": "v1",
                            "kind": "Service",
                            "namespace": "payments",
                            "name": "payments-api",
                            "status": "Synced",
                            "message": "service/payments-api created",
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
                            "message": "deployment.apps/payments-api created",
                            "hookPhase": "Running",
                            "syncPhase": "Sync",
                            "images": ["ghcr.io/acme/payments-api:7c1e4b2", "ghcr.io/acme/payments-worker:7c1e4b2"],
                        },
                    ],
                    "revision": PAYMENTS_SHA,
                    "source": source,
                },
                "startedAt": "2025-06-03T09:00:04Z",
                "finishedAt": "2025-06-03T09:00:12Z",
            },
            "sourceType": "Kustomize",
            "summary": {
                "images": [
                    "busybox:1.36.1",
                    "ghcr.io/acme/payments-api:7c1e4b2",
                    "ghcr.io/acme/payments-worker:7c1e4b2",
                ]
            },
            "resourceHealthSource": "appTree",
            "controllerNamespace": "argocd",
        },
    }


VALUES_SHA_OLD = "a1b2c3d4e5f60718293a4b5c6d7e8f9011223344"
VALUES_SHA = "d3d52c6f0e9b8a7c6d5e4f3a2b1c0d9e8f7a6b5c"


def search_platform() -> dict[str, Any]:
    """Multi-source, Helm chart version plus a ``ref: values`` git repository."""
    sources = [
        {
            "repoURL": "https://charts.acme.io",
            "chart": "search-platform",
            "targetRevision": "3.4.*",
            "helm": {"valueFiles": ["$values/search-platform/prod.yaml"]},
        },
        {"repoURL": "https://github.com/acme/helm-values.git", "targetRevision": "main", "ref": "values"},
    ]
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {
            "name": "search-platform",
            "namespace": "argocd",
            "uid": "9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a",
            "labels": {"team": "search"},
        },
        "spec": {
            "project": "search",
            "sources": sources,
            "destination": {"server": "https://10.20.0.1:6443", "namespace": "search"},
            "syncPolicy": {"automated": {}},
        },
        "status": {
            "sync": {
                "status": "Synced",
                "comparedTo": {"source": {"repoURL": ""}, "sources": sources, "destination": {}},
                "revisions": ["3.4.2", VALUES_SHA],
            },
            "health": {"status": "Healthy", "lastTransitionTime": "2025-06-04T12:27:48Z"},
            "history": [
                {
                    "deployedAt": "2025-05-28T16:02:10Z",
                    "id": 8,
                    "source": {"repoURL": ""},
                    "deployStartedAt": "2025-05-28T16:01:58Z",
                    "sources": sources,
                    "revisions": ["3.4.1", VALUES_SHA_OLD],
                    "initiatedBy": {"automated": True},
                },
                {
                    "deployedAt": "2025-06-04T12:25:02Z",
                    "id": 9,
                    "source": {"repoURL": ""},
                    "deployStartedAt": "2025-06-04T12:24:41Z",
                    "sources": sources,
                    "revisions": ["3.4.2", VALUES_SHA],
                    "initiatedBy": {"automated": True},
                },
            ],
            "reconciledAt": "2025-06-04T12:28:30Z",
            "operationState": {
                "operation": {
                    "sync": {"revisions": ["3.4.2", VALUES_SHA], "sources": sources},
                    "initiatedBy": {"automated": True},
                    "retry": {"limit": 5},
                },
                "phase": "Succeeded",
                "message": "successfully synced (all tasks run)",
                "syncResult": {
                    "resources": [
                        {
                            "group": "apps",
                            "version": "v1",
                            "kind": "StatefulSet",
                            "namespace": "search",
                            "name": "search-indexer",
                            "status": "Synced",
                            "message": "statefulset.apps/search-indexer configured",
                            "hookPhase": "Running",
                            "syncPhase": "Sync",
                            "images": [
                                "quay.io/acme/search-indexer@sha256:"
                                "3b1f5e2d4c6a8b0e9f7d5c3a1b2e4f6a8c0d2e4f6a8b0c2d4e6f8a0b2c4d6e8f"
                            ],
                        }
                    ],
                    "revision": "",
                    "source": {"repoURL": ""},
                    "sources": sources,
                    "revisions": ["3.4.2", VALUES_SHA],
                },
                "startedAt": "2025-06-04T12:24:41Z",
                "finishedAt": "2025-06-04T12:25:02Z",
            },
            "sourceTypes": ["Helm", ""],
            "summary": {
                "images": [
                    "quay.io/acme/search-indexer@sha256:"
                    "3b1f5e2d4c6a8b0e9f7d5c3a1b2e4f6a8c0d2e4f6a8b0c2d4e6f8a0b2c4d6e8f"
                ]
            },
            "resourceHealthSource": "appTree",
        },
    }


CHECKOUT_OLD = "58e0a1f7c2b94d3e6a5f8c7b0d1e2f3a4b5c6d7e"
CHECKOUT_NEW = "dc43d94b7a1e5f2c8d0b3a6e9f1c4d7a2b5e8f0c"


def checkout_service() -> dict[str, Any]:
    """Auto-sync failed after two retries; a PreSync migration Job failed; history unchanged."""
    source = {"repoURL": "https://github.com/acme/checkout-gitops.git", "path": "prod", "targetRevision": "HEAD"}
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {"name": "checkout-service", "namespace": "argocd", "uid": "c0ffee00-1111-4222-8333-444455556666"},
        "spec": {
            "project": "default",
            "source": source,
            "destination": {"server": "https://kubernetes.default.svc", "namespace": "checkout"},
            "syncPolicy": {"automated": {"prune": True}, "retry": {"limit": 2}},
        },
        "status": {
            "sync": {"status": "OutOfSync", "revision": CHECKOUT_NEW},
            "health": {"status": "Healthy", "lastTransitionTime": "2025-06-01T07:40:09Z"},
            "history": [
                {
                    "revision": CHECKOUT_OLD,
                    "deployedAt": "2025-06-01T07:39:20Z",
                    "id": 22,
                    "source": source,
                    "deployStartedAt": "2025-06-01T07:38:57Z",
                    "initiatedBy": {"automated": True},
                }
            ],
            "reconciledAt": "2025-06-03T10:36:02Z",
            "operationState": {
                "operation": {
                    "sync": {"revision": CHECKOUT_NEW, "source": source},
                    "initiatedBy": {"automated": True},
                    "retry": {"limit": 2},
                },
                "phase": "Failed",
                "message": (
                    "one or more synchronization tasks completed unsuccessfully, reason: Job has reached the "
                    "specified backoff limit (retried 2 times)."
                ),
                "syncResult": {
                    "resources": [
                        {
                            "group": "batch",
                            "version": "v1",
                            "kind": "Job",
                            "namespace": "checkout",
                            "name": "checkout-db-migrate",
                            "status": "",
                            "message": "Job has reached the specified backoff limit",
                            "hookType": "PreSync",
                            "hookPhase": "Failed",
                            "syncPhase": "PreSync",
                            "images": ["ghcr.io/acme/checkout-migrations:2.15.0"],
                        }
                    ],
                    "revision": CHECKOUT_NEW,
                    "source": source,
                },
                "startedAt": "2025-06-03T10:31:52Z",
                "finishedAt": "2025-06-03T10:35:47Z",
                "retryCount": 2,
            },
            "conditions": [
                {
                    "type": "SyncError",
                    "message": f"Failed last sync attempt to [{CHECKOUT_NEW}]: one or more synchronization tasks",
                    "lastTransitionTime": "2025-06-03T10:35:47Z",
                }
            ],
            "summary": {"images": ["ghcr.io/acme/checkout-migrations:2.15.0", "ghcr.io/acme/checkout-service:2.14.3"]},
        },
    }


ORDERS_OLD = "1234567890abcdef1234567890abcdef12345678"
ORDERS_NEW = "769772b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6"


def orders_api(*, retrying: bool = False) -> dict[str, Any]:
    """In progress or, with ``retrying``, an auto-sync retry: ``Running`` with ``finishedAt`` set."""
    source = {"repoURL": "https://github.com/acme/orders-gitops.git", "path": "deploy/prod", "targetRevision": "main"}
    state: dict[str, Any] = {
        "operation": {
            "sync": {"revision": ORDERS_NEW, "source": source},
            "initiatedBy": {"automated": True},
            "retry": {"limit": 5},
        },
        "phase": "Running",
        "message": "waiting for healthy state of apps/Deployment/orders-api",
        "syncResult": {
            "resources": [
                {
                    "group": "apps",
                    "version": "v1",
                    "kind": "Deployment",
                    "namespace": "orders",
                    "name": "orders-api",
                    "status": "Synced",
                    "message": "deployment.apps/orders-api configured",
                    "hookPhase": "Running",
                    "syncPhase": "Sync",
                    "images": ["ghcr.io/acme/orders-api:769772b"],
                }
            ],
            "revision": ORDERS_NEW,
            "source": source,
        },
        "startedAt": "2025-06-03T14:10:03Z",
    }
    if retrying:
        state["message"] = (
            'one or more objects failed to apply, reason: admission webhook "policy.acme.io" denied the request. '
            "Retrying attempt #2 at 2:11PM."
        )
        state["finishedAt"] = "2025-06-03T14:10:49Z"
        state["retryCount"] = 2
        del state["syncResult"]
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {"name": "orders-api", "namespace": "argocd", "uid": "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"},
        "spec": {
            "project": "orders",
            "source": source,
            "destination": {"server": "https://kubernetes.default.svc", "namespace": "orders"},
        },
        "operation": {
            "sync": {"revision": ORDERS_NEW, "source": source},
            "initiatedBy": {"automated": True},
            "retry": {"limit": 5},
        },
        "status": {
            "sync": {"status": "OutOfSync", "revision": ORDERS_NEW},
            "health": {"status": "Progressing", "lastTransitionTime": "2025-06-03T14:10:05Z"},
            "history": [
                {
                    "revision": ORDERS_OLD,
                    "deployedAt": "2025-06-02T09:12:40Z",
                    "id": 12,
                    "source": source,
                    "deployStartedAt": "2025-06-02T09:12:31Z",
                    "initiatedBy": {"automated": True},
                }
            ],
            "reconciledAt": "2025-06-03T14:09:58Z",
            "operationState": state,
            "summary": {"images": ["ghcr.io/acme/orders-api:1234567", "ghcr.io/acme/orders-api:769772b"]},
        },
    }


def storefront_preview_deleting() -> dict[str, Any]:
    """A PR preview being deleted, owned by an ApplicationSet."""
    source = {
        "repoURL": "https://github.com/acme/storefront.git",
        "path": "deploy/preview",
        "targetRevision": "pr-1423",
    }
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {
            "name": "storefront-pr-1423",
            "namespace": "argocd",
            "uid": "77e1d2c3-b4a5-4960-8877-665544332211",
            "deletionTimestamp": "2025-06-03T15:02:10Z",
            "deletionGracePeriodSeconds": 0,
            "finalizers": ["resources-finalizer.argocd.argoproj.io"],
            "ownerReferences": [
                {
                    "apiVersion": "argoproj.io/v1alpha1",
                    "kind": "ApplicationSet",
                    "name": "storefront-previews",
                    "uid": "aa11bb22-cc33-4d44-8e55-ff6677889900",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "labels": {"preview": "true"},
        },
        "spec": {
            "project": "previews",
            "source": source,
            "destination": {"name": "in-cluster", "namespace": "storefront-pr-1423"},
            "syncPolicy": {"automated": {"prune": True}},
        },
        "status": {
            "sync": {"status": "Synced", "revision": "e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6"},
            "health": {"status": "Progressing", "lastTransitionTime": "2025-06-03T15:02:41Z"},
            "history": [
                {
                    "revision": "0f1e2d3c4b5a69788796a5b4c3d2e1f0a9b8c7d6",
                    "deployedAt": "2025-06-02T11:00:31Z",
                    "id": 0,
                    "source": source,
                    "deployStartedAt": "2025-06-02T11:00:20Z",
                    "initiatedBy": {"username": "applicationset-controller", "automated": True},
                },
                {
                    "revision": "e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6",
                    "deployedAt": "2025-06-03T10:14:05Z",
                    "id": 1,
                    "source": source,
                    "deployStartedAt": "2025-06-03T10:13:59Z",
                    "initiatedBy": {"automated": True},
                },
            ],
            "reconciledAt": "2025-06-03T15:03:00Z",
            "operationState": {
                "operation": {"sync": {"revision": "e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6"}},
                "phase": "Succeeded",
                "message": "successfully synced (all tasks run)",
                "startedAt": "2025-06-03T10:13:59Z",
                "finishedAt": "2025-06-03T10:14:05Z",
                "syncResult": {"revision": "e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6", "source": source},
            },
            "summary": {"images": ["ghcr.io/acme/storefront-web:pr-1423-e5d4c3b"]},
        },
    }


def billing_worker_never_synced() -> dict[str, Any]:
    """Created by an ApplicationSet, never synced."""
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {
            "name": "billing-worker-eu-west-1",
            "namespace": "argocd",
            "uid": "b111ee22-3333-4444-9555-666677778888",
            "creationTimestamp": "2025-06-03T14:47:02Z",
            "ownerReferences": [{"kind": "ApplicationSet", "name": "billing-worker", "uid": "x"}],
        },
        "spec": {
            "project": "billing",
            "source": {
                "repoURL": "https://github.com/acme/billing-gitops.git",
                "path": "regions/eu-west-1",
                "targetRevision": "main",
            },
            "destination": {"name": "eu-west-1", "namespace": "billing"},
        },
        "status": {
            "sync": {"status": "OutOfSync", "revision": "5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f"},
            "health": {"status": "Missing", "lastTransitionTime": "2025-06-03T14:47:05Z"},
            "reconciledAt": "2025-06-03T14:49:31Z",
            "sourceType": "Kustomize",
            "summary": {},
            "resources": [{"group": "apps", "kind": "Deployment", "name": "billing-worker", "status": "OutOfSync"}],
        },
    }


def storefront_web() -> dict[str, Any]:
    """An Application in a non-``argocd`` namespace, destination by cluster name, Kustomize images."""
    revision = "8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b"

    def source(tag: str) -> dict[str, Any]:
        return {
            "repoURL": "https://github.com/acme/storefront-gitops",
            "path": "overlays/prod",
            "targetRevision": "main",
            "kustomize": {"images": [f"registry.acme.io:5000/storefront/storefront-web:{tag}"]},
        }

    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {
            "name": "storefront-web",
            "namespace": "team-storefront",
            "uid": "5f0e1d2c-3b4a-4958-8776-655443322110",
            "labels": {"app.kubernetes.io/name": "storefront-web", "acme.io/component": "storefront"},
        },
        "spec": {
            "project": "team-storefront",
            "source": source("3f9c2ab"),
            "destination": {"name": "prod-eu", "namespace": "storefront"},
        },
        "status": {
            "sync": {"status": "Synced", "revision": revision},
            "health": {"status": "Healthy", "lastTransitionTime": "2025-06-05T10:22:31Z"},
            "history": [
                {
                    "revision": revision,
                    "deployedAt": "2025-06-04T17:45:10Z",
                    "id": 3,
                    "source": source("9be41d0"),
                    "deployStartedAt": "2025-06-04T17:45:01Z",
                    "initiatedBy": {"username": "ci-bot"},
                },
                {
                    "revision": revision,
                    "deployedAt": "2025-06-05T10:21:02Z",
                    "id": 4,
                    "source": source("3f9c2ab"),
                    "deployStartedAt": "2025-06-05T10:20:55Z",
                    "initiatedBy": {"username": "ci-bot"},
                },
            ],
            "reconciledAt": "2025-06-05T10:24:00Z",
            "operationState": {
                "operation": {"sync": {"revision": revision}, "initiatedBy": {"username": "ci-bot"}},
                "phase": "Succeeded",
                "message": "successfully synced (all tasks run)",
                "startedAt": "2025-06-05T10:20:55+00:00",
                "finishedAt": "2025-06-05T12:21:02+02:00",
                "syncResult": {
                    "revision": revision,
                    "source": source("3f9c2ab"),
                    "resources": [
                        {
                            "group": "apps",
                            "kind": "Deployment",
                            "name": "storefront-web",
                            "status": "Synced",
                            "images": [
                                "registry.acme.io:5000/storefront/storefront-web:3f9c2ab",
                                "nginx:1.25",
                            ],
                        },
                        {
                            "group": "apps",
                            "kind": "Deployment",
                            "name": "storefront-assets",
                            "status": "Synced",
                            "images": ["registry.acme.io:5000/storefront/assets:5d1e0c4b", "nginx:1.25"],
                        },
                        {"group": "", "kind": "ConfigMap", "name": "storefront-config", "status": "Synced"},
                    ],
                },
            },
            "summary": {
                "images": [
                    "docker.io/envoyproxy/envoy:v1.29.2",
                    "ghcr.io/acme/storefront-init:2.7.0-rc.1",
                    "nginx:1.25",
                    "registry.acme.io:5000/storefront/assets:5d1e0c4b",
                    "registry.acme.io:5000/storefront/storefront-web:3f9c2ab",
                ]
            },
        },
    }


def ledger_api_rollback() -> dict[str, Any]:
    """A manual rollback to id 5's revision recorded as id 7."""
    good, bad = "1f99ebc0a2b3c4d5e6f708192a3b4c5d6e7f8091", "b2316b0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"
    source = {"repoURL": "https://github.com/acme/ledger-gitops.git", "path": "prod", "targetRevision": "main"}
    return {
        "metadata": {"name": "ledger-api", "namespace": "argocd", "uid": "1edge400-aaaa-4bbb-8ccc-dddddddddddd"},
        "spec": {"project": "ledger", "source": source, "destination": {"server": "https://kubernetes.default.svc"}},
        "status": {
            "sync": {"status": "OutOfSync", "revision": bad},
            "health": {"status": "Healthy", "lastTransitionTime": "2025-06-04T08:32:20Z"},
            "history": [
                {"id": 5, "revision": good, "deployedAt": "2025-06-02T13:10:00Z", "source": source},
                {
                    "id": 6,
                    "revision": bad,
                    "deployedAt": "2025-06-04T08:05:44Z",
                    "source": source,
                    "initiatedBy": {"automated": True},
                },
                {
                    "id": 7,
                    "revision": good,
                    "deployedAt": "2025-06-04T08:31:02Z",
                    "deployStartedAt": "2025-06-04T08:30:51Z",
                    "source": source,
                    "initiatedBy": {"username": "jane.doe@acme.io"},
                },
            ],
            "reconciledAt": "2025-06-04T08:33:10Z",
            "operationState": {
                "operation": {
                    "sync": {"revision": good, "source": source, "syncStrategy": {"apply": {}}},
                    "initiatedBy": {"username": "jane.doe@acme.io"},
                },
                "phase": "Succeeded",
                "message": "successfully synced (all tasks run)",
                "startedAt": "2025-06-04T08:30:51Z",
                "finishedAt": "2025-06-04T08:31:02Z",
                "syncResult": {"revision": good, "source": source},
            },
        },
    }


REALISTIC: dict[str, Callable[[], dict[str, Any]]] = {
    "payments-api": payments_api,
    "search-platform": search_platform,
    "checkout-service": checkout_service,
    "orders-api": orders_api,
    "orders-api-retrying": lambda: orders_api(retrying=True),
    "storefront-pr-1423": storefront_preview_deleting,
    "billing-worker-eu-west-1": billing_worker_never_synced,
    "storefront-web": storefront_web,
    "ledger-api": ledger_api_rollback,
}


# --- realistic Applications: parsed fields ----------------------------------------------------------------


def test_single_source_first_deployment() -> None:
    observation = parse_application(payments_api(), CLUSTER)

    assert observation.key == AppKey(CLUSTER, "argocd", "payments-api")
    assert observation.uid == "2f6a1c4e-8d0b-4b7e-9a3f-5c1d2e3f4a5b"
    assert observation.deleting is False
    assert observation.sync_status == "Synced"
    assert observation.health_status == "Healthy"
    assert observation.health_transition_at == ts("2025-06-03T09:01:17Z")
    assert observation.reconciled_at == ts("2025-06-03T09:03:40Z")
    assert observation.project == "payments"
    assert observation.destination == "https://kubernetes.default.svc"
    assert observation.labels == {"team": "payments", "app.kubernetes.io/part-of": "checkout"}
    assert observation.sources == (
        SourceRef(repo_url=GITOPS, path="apps/payments-api/overlays/prod", target_revision="main"),
    )
    assert observation.operation_in_flight is False
    assert observation.summary_images == (
        "busybox:1.36.1",
        "ghcr.io/acme/payments-api:7c1e4b2",
        "ghcr.io/acme/payments-worker:7c1e4b2",
    )

    (entry,) = observation.history
    assert entry.id == 0
    assert entry.revisions == (PAYMENTS_SHA,)
    assert entry.deployed_at == ts("2025-06-03T09:00:12Z")
    assert entry.started_at == ts("2025-06-03T09:00:04Z")
    assert entry.sources == observation.sources
    assert entry.initiated_by == "automated"
    assert len(entry.source_fingerprint) == 64

    operation = observation.operation
    assert operation is not None
    assert operation.phase == "Succeeded"
    assert operation.completed and not operation.failed
    assert operation.started_at == ts("2025-06-03T09:00:04Z")
    assert operation.finished_at == ts("2025-06-03T09:00:12Z")
    assert operation.message == "successfully synced (all tasks run)"
    assert operation.retry_count == 0
    assert operation.revisions == (PAYMENTS_SHA,)
    assert operation.sources == observation.sources
    # syncResult images: the init container busybox is not among them (summary has it).
    assert operation.images == ("ghcr.io/acme/payments-api:7c1e4b2", "ghcr.io/acme/payments-worker:7c1e4b2")
    assert operation.dry_run is False
    assert operation.partial is False


def test_multi_source_helm_chart_version_and_git_sha() -> None:
    observation = parse_application(search_platform(), CLUSTER)

    chart = SourceRef(repo_url="https://charts.acme.io", chart="search-platform", target_revision="3.4.*")
    values = SourceRef(repo_url="https://github.com/acme/helm-values.git", target_revision="main")
    assert observation.sources == (chart, values)
    assert [entry.id for entry in observation.history] == [8, 9]
    assert observation.history[0].revisions == ("3.4.1", VALUES_SHA_OLD)
    assert observation.history[1].revisions == ("3.4.2", VALUES_SHA)
    # The {"repoURL": ""} placeholder in history[].source is not a source.
    assert observation.history[1].sources == (chart, values)
    assert observation.history[1].started_at == ts("2025-06-04T12:24:41Z")

    operation = observation.operation
    assert operation is not None
    # syncResult.revision is "" for multi-source apps: the plural field is used.
    assert operation.revisions == ("3.4.2", VALUES_SHA)
    assert operation.sources == (chart, values)
    assert operation.images == (
        "quay.io/acme/search-indexer@sha256:3b1f5e2d4c6a8b0e9f7d5c3a1b2e4f6a8c0d2e4f6a8b0c2d4e6f8a0b2c4d6e8f",
    )


def test_failed_operation_after_retries() -> None:
    observation = parse_application(checkout_service(), CLUSTER)

    operation = observation.operation
    assert operation is not None
    assert operation.phase == "Failed"
    assert operation.failed and operation.completed
    assert operation.retry_count == 2
    assert operation.message.endswith("(retried 2 times).")
    assert operation.started_at == ts("2025-06-03T10:31:52Z")
    assert operation.finished_at == ts("2025-06-03T10:35:47Z")
    assert operation.revisions == (CHECKOUT_NEW,)
    assert operation.images == ("ghcr.io/acme/checkout-migrations:2.15.0",)
    assert [entry.id for entry in observation.history] == [22]
    assert observation.history[0].revisions == (CHECKOUT_OLD,)
    assert observation.sync_status == "OutOfSync"
    assert observation.health_status == "Healthy"
    # targetRevision HEAD is kept as written.
    assert observation.sources[0].target_revision == "HEAD"


def test_running_operation_in_flight() -> None:
    observation = parse_application(orders_api(), CLUSTER)

    assert observation.operation_in_flight is True
    operation = observation.operation
    assert operation is not None
    assert operation.phase == "Running"
    assert operation.finished_at is None
    assert not operation.completed
    assert operation.revisions == (ORDERS_NEW,)
    assert operation.images == ("ghcr.io/acme/orders-api:769772b",)
    assert observation.health_status == "Progressing"
    assert [entry.id for entry in observation.history] == [12]


def test_running_with_finished_at_is_a_retry_wait() -> None:
    observation = parse_application(orders_api(retrying=True), CLUSTER)

    operation = observation.operation
    assert operation is not None
    assert operation.phase == "Running"
    assert operation.finished_at == ts("2025-06-03T14:10:49Z")
    assert operation.retry_count == 2
    assert not operation.completed
    assert "Retrying attempt #2" in operation.message
    # No syncResult yet on this attempt: the requested revision is used, images are unknown.
    assert operation.revisions == (ORDERS_NEW,)
    assert operation.images is None
    assert observation.operation_in_flight is True


def test_deleting_application() -> None:
    observation = parse_application(storefront_preview_deleting(), CLUSTER)

    assert observation.deleting is True
    assert observation.destination == "in-cluster"
    assert [entry.id for entry in observation.history] == [0, 1]
    assert observation.history[0].initiated_by == "applicationset-controller"
    assert observation.history[1].initiated_by == "automated"
    assert observation.labels == {"preview": "true"}


def test_never_synced_application() -> None:
    observation = parse_application(billing_worker_never_synced(), CLUSTER)

    assert observation.history == ()
    assert observation.operation is None
    assert observation.operation_in_flight is False
    assert observation.sync_status == "OutOfSync"
    assert observation.health_status == "Missing"
    assert observation.summary_images == ()
    assert observation.destination == "eu-west-1"
    assert observation.reconciled_at == ts("2025-06-03T14:49:31Z")


def test_application_in_a_non_argocd_namespace() -> None:
    observation = parse_application(storefront_web(), "prod-eu")

    assert observation.key == AppKey("prod-eu", "team-storefront", "storefront-web")
    assert observation.key.qualified_name == "team-storefront/storefront-web"
    assert observation.destination == "prod-eu"
    assert observation.project == "team-storefront"
    previous, newest = observation.history
    # Same revision, different Kustomize image: only the source fingerprint tells them apart.
    assert previous.revisions == newest.revisions
    assert previous.source_fingerprint != newest.source_fingerprint
    assert newest.initiated_by == "ci-bot"
    operation = observation.operation
    assert operation is not None
    # Manifest order, duplicates kept; the ConfigMap without images contributes nothing.
    assert operation.images == (
        "registry.acme.io:5000/storefront/storefront-web:3f9c2ab",
        "nginx:1.25",
        "registry.acme.io:5000/storefront/assets:5d1e0c4b",
        "nginx:1.25",
    )
    # An offset is converted to UTC.
    assert operation.finished_at == ts("2025-06-05T10:21:02Z")
    assert operation.finished_at is not None and operation.finished_at.tzinfo is UTC


def test_rollback_history_keeps_equal_fingerprints() -> None:
    observation = parse_application(ledger_api_rollback(), CLUSTER)

    five, six, seven = observation.history
    assert (five.id, six.id, seven.id) == (5, 6, 7)
    assert seven.revisions == five.revisions != six.revisions
    assert seven.source_fingerprint == five.source_fingerprint == six.source_fingerprint
    assert seven.initiated_by == "jane.doe@acme.io"
    assert five.initiated_by is None
    assert five.started_at is None
    assert observation.sync_status == "OutOfSync"


# --- field rules ------------------------------------------------------------------------------------------


def test_history_is_sorted_by_id() -> None:
    app = ledger_api_rollback()
    app["status"]["history"].reverse()
    assert [entry.id for entry in parse_application(app, CLUSTER).history] == [5, 6, 7]


def test_revisions_prefer_the_plural_field_when_non_empty() -> None:
    app = payments_api()
    entry = app["status"]["history"][0]
    entry["revisions"] = []
    assert parse_application(app, CLUSTER).history[0].revisions == (PAYMENTS_SHA,)
    entry["revisions"] = ["1.2.3", "abc"]
    assert parse_application(app, CLUSTER).history[0].revisions == ("1.2.3", "abc")
    del entry["revision"], entry["revisions"]
    assert parse_application(app, CLUSTER).history[0].revisions == ()


def test_operation_revisions_fall_back_to_the_requested_ones() -> None:
    app = payments_api()
    state = app["status"]["operationState"]
    state["phase"] = "Error"
    state["syncResult"] = {"revision": "", "source": {"repoURL": ""}}
    state["operation"]["sync"] = {"revisions": ["3.4.2", VALUES_SHA], "sources": [{"repoURL": "https://charts"}]}
    operation = parse_application(app, CLUSTER).operation
    assert operation is not None
    assert operation.revisions == ("3.4.2", VALUES_SHA)
    assert operation.sources == (SourceRef(repo_url="https://charts"),)
    assert operation.images is None

    del state["operation"]
    operation = parse_application(app, CLUSTER).operation
    assert operation is not None
    assert operation.revisions == ()
    assert operation.sources == ()


def test_images_none_only_when_no_resource_reports_them() -> None:
    app = payments_api()
    resources = app["status"]["operationState"]["syncResult"]["resources"]
    resources[1]["images"] = []
    operation = parse_application(app, CLUSTER).operation
    assert operation is not None and operation.images == ()
    del resources[1]["images"]
    operation = parse_application(app, CLUSTER).operation
    assert operation is not None and operation.images is None


def test_partial_and_dry_run_operations() -> None:
    app = payments_api()
    sync = app["status"]["operationState"]["operation"]["sync"]
    sync["resources"] = [{"group": "apps", "kind": "Deployment", "name": "payments-api"}]
    sync["dryRun"] = True
    operation = parse_application(app, CLUSTER).operation
    assert operation is not None
    assert operation.partial is True
    assert operation.dry_run is True
    sync["resources"] = []
    operation = parse_application(app, CLUSTER).operation
    assert operation is not None and operation.partial is False


@pytest.mark.parametrize(
    ("initiated_by", "expected"),
    [
        ({"username": "jane"}, "jane"),
        ({"automated": True}, "automated"),
        ({"username": "applicationset-controller", "automated": True}, "applicationset-controller"),
        ({"username": "", "automated": False}, None),
        ({}, None),
        (None, None),
    ],
)
def test_initiated_by(initiated_by: dict[str, Any] | None, expected: str | None) -> None:
    app = payments_api()
    app["status"]["history"][0]["initiatedBy"] = initiated_by
    assert parse_application(app, CLUSTER).history[0].initiated_by == expected


def test_destination_prefers_the_cluster_name() -> None:
    app = payments_api()
    app["spec"]["destination"] = {"name": "prod-east", "server": "https://10.0.0.1"}
    assert parse_application(app, CLUSTER).destination == "prod-east"
    app["spec"]["destination"] = {"name": "", "server": "https://10.0.0.1"}
    assert parse_application(app, CLUSTER).destination == "https://10.0.0.1"
    del app["spec"]["destination"]
    assert parse_application(app, CLUSTER).destination == ""


def test_source_fingerprint_ignores_key_order_and_null_versus_absent() -> None:
    app = payments_api()
    entry = app["status"]["history"][0]
    original = parse_application(app, CLUSTER).history[0].source_fingerprint
    entry["source"] = dict(reversed(list(entry["source"].items())))
    entry["sources"] = None
    assert parse_application(app, CLUSTER).history[0].source_fingerprint == original
    assert original == source_fingerprint(payments_api()["status"]["history"][0]["source"], None)

    entry["source"] = {**entry["source"], "helm": {"parameters": [{"name": "image.tag", "value": "1.8.3"}]}}
    assert parse_application(app, CLUSTER).history[0].source_fingerprint != original


def test_missing_status_is_an_empty_observation() -> None:
    statuses: list[Any] = [None, "absent", {}]
    for status in statuses:
        app = payments_api()
        if status == "absent":
            del app["status"]
        else:
            app["status"] = status
        observation = parse_application(app, CLUSTER)
        assert observation.key == AppKey(CLUSTER, "argocd", "payments-api")
        assert observation.history == ()
        assert observation.operation is None
        assert observation.sync_status is None
        assert observation.health_status is None
        assert observation.reconciled_at is None
        assert observation.summary_images == ()
        assert observation.sources  # the spec is still read


def test_unknown_values_are_kept_as_strings() -> None:
    app = checkout_service()
    app["status"]["health"]["status"] = "Exploding"
    app["status"]["sync"]["status"] = "Sideways"
    app["status"]["operationState"]["phase"] = "Paused"
    app["status"]["operationState"]["syncResult"]["revision"] = "HEAD"
    observation = parse_application(app, CLUSTER)
    assert observation.health_status == "Exploding"
    assert observation.sync_status == "Sideways"
    assert observation.operation is not None
    assert observation.operation.phase == "Paused"
    assert not observation.operation.completed
    assert observation.operation.revisions == ("HEAD",)


def test_long_strings_and_unicode_are_kept() -> None:
    app = payments_api()
    long_image = "ghcr.io/acme/" + "x" * 10_000 + ":1"
    app["status"]["summary"]["images"] = [long_image]
    app["metadata"]["labels"] = {"équipe": "paiements 💳"}
    app["status"]["operationState"]["message"] = "同步成功 " * 2_000
    observation = parse_application(app, CLUSTER)
    assert observation.summary_images == (long_image,)
    assert observation.labels == {"équipe": "paiements 💳"}
    assert observation.operation is not None and len(observation.operation.message) == 10_000


def test_a_read_only_mapping_is_accepted() -> None:
    app = MappingProxyType(payments_api())
    assert parse_application(app, CLUSTER).key.name == "payments-api"


def test_malformed_application_carries_the_reason_and_the_app() -> None:
    app = payments_api()
    app["status"]["history"].append({**app["status"]["history"][0], "id": 1})
    app["status"]["history"].append({**app["status"]["history"][0], "id": "x"})
    with pytest.raises(MalformedApplication) as caught:
        parse_application(app, CLUSTER)
    assert isinstance(caught.value, ValueError)
    assert caught.value.reason == "status.history[2].id: expected an integer, got 'x'"
    assert str(caught.value) == caught.value.reason
    assert caught.value.app == "argocd/payments-api"


def test_duplicate_history_ids_name_both_entries() -> None:
    app = ledger_api_rollback()
    app["status"]["history"][2]["id"] = 5
    with pytest.raises(MalformedApplication, match=r"status\.history\[2\]\.id: duplicate history id 5 .*history\[0\]"):
        parse_application(app, CLUSTER)


def test_bad_values_are_shortened_in_the_reason() -> None:
    app = payments_api()
    app["status"]["reconciledAt"] = "y" * 10_000
    with pytest.raises(MalformedApplication) as caught:
        parse_application(app, CLUSTER)
    assert caught.value.reason.startswith("status.reconciledAt: not an RFC 3339 timestamp: 'yyyy")
    assert len(caught.value.reason) < 120

    app = payments_api()
    app["status"]["history"][0]["revision"] = 10**5000
    with pytest.raises(MalformedApplication, match=r"revision: expected a string, got a very large integer"):
        parse_application(app, CLUSTER)


def _walk(value: Any) -> Iterator[Any]:
    yield value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _walk(getattr(value, field.name))
    elif isinstance(value, tuple):
        for item in value:
            yield from _walk(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _walk(item)


def _containers(raw: Any) -> Iterator[Any]:
    if isinstance(raw, dict | list):
        yield raw
        for item in raw.values() if isinstance(raw, dict) else raw:
            yield from _containers(item)


def test_the_observation_keeps_no_reference_to_the_raw_dict() -> None:
    for factory in REALISTIC.values():
        raw = factory()
        observation = parse_application(raw, CLUSTER)
        raw_ids = {id(container) for container in _containers(raw)}
        leaked = [value for value in _walk(observation) if id(value) in raw_ids]
        assert leaked == []
        assert not any(isinstance(value, list) for value in _walk(observation))
        snapshot = copy.deepcopy(observation)
        if raw["metadata"].get("labels"):
            raw["metadata"]["labels"]["team"] = "changed afterwards"
        raw["status"].clear()
        assert observation == snapshot
        assert dict(observation.labels) == dict(snapshot.labels)


# --- the corpus -------------------------------------------------------------------------------------------

CORPUS = load_corpus()


def test_corpus_is_large_and_covers_both_outcomes() -> None:
    assert len(CORPUS) >= 50
    assert sum(case.expect == "ok" for case in CORPUS) >= 20
    assert sum(case.expect == "malformed" for case in CORPUS) >= 20
    assert all(case.reason_contains for case in CORPUS if case.expect == "malformed")


def test_corpus_files_match_the_generator() -> None:
    """The JSON in the tree is the corpus; the generator must not drift from it unnoticed."""
    generated = {**corpus_generator.wrong_type_cases(), **corpus_generator.unusual_cases()}
    on_disk = {case.name: case for case in CORPUS}
    assert set(generated) == set(on_disk)
    for name, case in generated.items():
        assert json.loads(json.dumps(case["app"])) == on_disk[name].app, name
        assert case["expect"] == on_disk[name].expect, name
        assert case.get("reason_contains") == on_disk[name].reason_contains, name


def test_every_field_the_parser_reads_has_a_wrong_type_case() -> None:
    reasons = {case.reason_contains for case in CORPUS if case.name.startswith("wrong-type-")}
    for path, _value, reason_path in corpus_generator.WRONG_TYPES:
        assert (reason_path or corpus_generator._dotted(path)) + ":" in reasons
    assert len(reasons) >= 60


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_corpus_case(case: CorpusCase) -> None:
    if case.expect == "ok":
        observation = parse_application(case.app, CLUSTER)
        _assert_valid(observation)
    else:
        with pytest.raises(MalformedApplication) as caught:
            parse_application(case.app, CLUSTER)
        assert case.reason_contains is not None
        assert case.reason_contains in caught.value.reason


def test_corpus_details() -> None:
    status_null = parse_application(corpus_case("status-null").app, CLUSTER)
    assert status_null.history == () and status_null.operation is None and status_null.health_status is None

    huge = parse_application(corpus_case("huge-image-list").app, CLUSTER)
    assert huge.operation is not None and huge.operation.images is not None
    assert len(huge.operation.images) == 2000
    assert len(huge.summary_images) == 2000

    long_strings = parse_application(corpus_case("string-10000-chars").app, CLUSTER)
    assert len(long_strings.summary_images[0]) == 10_000
    assert long_strings.operation is not None and len(long_strings.operation.message) == 10_000

    head = parse_application(corpus_case("revision-HEAD").app, CLUSTER)
    assert head.history[-1].revisions == ("HEAD",)
    assert head.operation is not None and head.operation.revisions == ("HEAD",)

    unsorted = parse_application(corpus_case("history-unsorted").app, CLUSTER)
    assert [entry.id for entry in unsorted.history] == [5, 6, 7]

    unicode = parse_application(corpus_case("unicode-names").app, CLUSTER)
    assert unicode.key.name == "zahlungsdienst-ü-支付"

    zero = parse_application(corpus_case("timestamp-zero-time").app, CLUSTER)
    assert zero.history[0].started_at == datetime(1, 1, 1, tzinfo=UTC)

    single = parse_application(corpus_case("multi-source-single-element").app, CLUSTER)
    assert len(single.sources) == 1 and single.sources[0].chart == "search-platform"

    nulls = parse_application(corpus_case("nulls-everywhere").app, CLUSTER)
    assert nulls == AppObservation(key=AppKey(CLUSTER, "ns", "n"), uid="u")


# --- fuzzing ----------------------------------------------------------------------------------------------


def _assert_valid(observation: AppObservation) -> None:
    assert isinstance(observation, AppObservation)
    assert observation.key.cluster == CLUSTER
    assert observation.key.name and observation.key.namespace and observation.uid
    ids = [entry.id for entry in observation.history]
    assert ids == sorted(set(ids)) and all(type(i) is int and i >= 0 for i in ids)
    for entry in observation.history:
        assert isinstance(entry, HistoryEntry)
        assert entry.deployed_at.tzinfo is UTC
        assert entry.started_at is None or entry.started_at.tzinfo is UTC
        assert all(isinstance(revision, str) for revision in entry.revisions)
        assert all(isinstance(source, SourceRef) for source in entry.sources)
        assert len(entry.source_fingerprint) == 64
    for moment in (observation.health_transition_at, observation.reconciled_at):
        assert moment is None or moment.tzinfo is UTC
    operation = observation.operation
    if operation is not None:
        assert isinstance(operation, OperationState)
        assert isinstance(operation.phase, str) and operation.started_at.tzinfo is UTC
        assert operation.finished_at is None or operation.finished_at.tzinfo is UTC
        assert type(operation.retry_count) is int
        assert operation.images is None or all(isinstance(image, str) for image in operation.images)
        assert all(isinstance(revision, str) for revision in operation.revisions)
    assert all(isinstance(image, str) for image in observation.summary_images)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in observation.labels.items())
    assert isinstance(observation.destination, str) and isinstance(observation.project, str)
    # Everything downstream hashes these into ids: they must encode.
    str(observation.key).encode("utf-8")


def _parse_or_reject(raw: Any) -> None:
    try:
        observation = parse_application(raw, CLUSTER)
    except MalformedApplication as error:
        assert error.reason.startswith(("application:", "metadata", "spec", "status", "operation")), error.reason
        error.reason.encode("utf-8")
    else:
        _assert_valid(observation)


SPECIAL_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**63,
    1.5,
    float("nan"),
    float("inf"),
    "",
    "HEAD",
    "x" * 10_000,
    "2025-06-03T09:00:12Z",
    "2025-06-03T09:00:12",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "\ud800",
    "ü/支付",
    [],
    {},
    [None],
    [{}],
    {"repoURL": ""},
    {"": None},
]

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(SPECIAL_VALUES),
    # Too long for int -> str (Python's 4300-digit limit); built lazily so the strategy's repr works.
    st.integers(min_value=4400, max_value=4500).map(lambda digits: 10**digits),
)
json_trees = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=25,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _mutate(app: Any, path: tuple[Any, ...], action: str, value: Any, key: str) -> Any:
    if not path:
        return value if action == "replace" else app
    parent = app
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif action == "insert" and isinstance(parent[last], dict):
        parent[last][key] = value
    elif action == "insert" and isinstance(parent[last], list):
        parent[last].append(value)
    return app


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(sorted(REALISTIC)),
    mutations=st.lists(
        st.tuples(
            st.integers(min_value=0),
            st.sampled_from(["replace", "replace", "delete", "insert"]),
            json_trees,
            st.text(max_size=10) | st.sampled_from(["id", "images", "revisions", "sources", "deployedAt"]),
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_fuzz_mutated_applications(base: str, mutations: list[tuple[int, str, Any, str]]) -> None:
    # Fresh, unshared objects: the factories reuse one ``source`` dict in several places and
    # sampled special values are the same object on every draw.
    app: Any = copy.deepcopy(json.loads(json.dumps(REALISTIC[base]())))
    for pick, action, value, key in mutations:
        paths = list(_paths(app))
        app = _mutate(app, paths[pick % len(paths)], action, copy.deepcopy(value), key)
    _parse_or_reject(app)


@settings(max_examples=200, deadline=None)
@given(
    where=st.sampled_from(
        [
            (),
            ("metadata",),
            ("spec",),
            ("spec", "source"),
            ("status",),
            ("status", "history"),
            ("status", "history", 0),
            ("status", "operationState"),
            ("status", "operationState", "syncResult"),
            ("status", "operationState", "operation", "sync"),
            ("status", "summary"),
        ]
    ),
    tree=json_trees,
)
def test_fuzz_random_json_trees(where: tuple[Any, ...], tree: Any) -> None:
    _parse_or_reject(_mutate(payments_api(), where, "replace", copy.deepcopy(tree), ""))


identity = st.text(alphabet="abcdefghij-0123", min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    metadata=st.fixed_dictionaries(
        {"name": identity, "namespace": identity, "uid": identity},
        optional={
            "labels": st.dictionaries(st.text(max_size=8), st.text(max_size=8)) | json_trees,
            "deletionTimestamp": st.sampled_from([None, "2025-06-03T15:02:10Z"]),
        },
    ),
    spec=json_trees,
    status=json_trees,
)
def test_fuzz_random_spec_and_status(metadata: dict[str, Any], spec: Any, status: Any) -> None:
    _parse_or_reject({"metadata": metadata, "spec": spec, "status": status})
