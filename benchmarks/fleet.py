"""A deterministic fleet of realistic Argo CD Applications, and the GitHub history behind their images.

Every process of a benchmark (the fake API server, the reconciler runs) derives the same fleet from the same
``(apps, now)``, so only those two numbers travel between them.

* 20 components, each with its own image repository ``quay.io/acme/<component>`` (GitHub ``acme/<component>``)
  and a line of 13 commits. Application ``i`` belongs to component ``i % 20``; its slot ``k = i // 20``
  decides its current version (one of the last three before the newest: a staggered rollout), its
  namespace and whether it takes part in the burst.
* Each Application (about 12.6 KB of JSON) has 20 live resources, 10 history entries whose Helm-in-git sources
  carry the image repository and tag, a completed sync whose ``syncResult`` reports the 20 resources (the
  workloads with their images), and ``summary.images`` with the component image next to two sidecars. The
  history alone is 4.6 KB and the last sync 4.2 KB, so these contents do not fit in 8 KB;
  ``sync_result_resources`` makes the sync report fewer resources (smaller apps; the two Deployments come first).
* The burst: every Application whose slot is a multiple of 10 (10 % of the fleet) deploys the component's
  newest commit through a new history entry, one GitOps commit per component.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from reconciler.config import GitOpsCommit
from tests.factories import (
    append_history,
    fake_sha,
    git_source,
    history_entry,
    make_app,
    operation_state,
    set_reconciled,
    set_summary_images,
    ts,
    with_operation_state,
)
from tests.fakes.github import FakeGitHub

COMPONENTS = (
    "payments-api",
    "checkout",
    "cart",
    "catalog",
    "search",
    "recommendations",
    "inventory",
    "orders",
    "shipping",
    "billing",
    "invoices",
    "accounts",
    "auth",
    "notifications",
    "email",
    "reviews",
    "pricing",
    "promotions",
    "gateway",
    "reporting",
)
VERSIONS = 13
"""Commits per component repository, oldest first; the last one is only deployed by the burst."""
HISTORY = 10
BURST_EVERY = 10
"""Slots ``k`` with ``k % BURST_EVERY == 0`` deploy in the burst: 10 % of the fleet."""
GITOPS_URL = "https://github.com/acme/gitops.git"
GITOPS_REPO = "acme/gitops"
IMAGE_RULE = {"image": r"quay\.io/acme/(?P<name>[^/]+)", "repo": "acme/{name}"}
COMPONENT_LABEL = "app.kubernetes.io/part-of"
SIDECARS = (
    "docker.io/istio/proxyv2:1.22.3",
    "docker.io/otel/opentelemetry-collector:0.104.0",
)
NAMESPACES = ("apps-core", "apps-commerce", "apps-platform", "apps-data", "apps-edge")
VERSION_SPACING = timedelta(days=2)


def image_repository(component: str) -> str:
    return f"quay.io/acme/{component}"


def commit_of(component: str, version: int) -> str:
    return fake_sha(f"{component}:v{version}")


def gitops_commit_of(component: str, version: int) -> str:
    return fake_sha(f"gitops:{component}:v{version}")


@dataclass(frozen=True)
class Member:
    """One Application of the fleet."""

    index: int
    component: str
    slot: int
    name: str
    namespace: str
    version: int
    """The version deployed now (before the burst)."""

    @property
    def bursts(self) -> bool:
        return self.slot % BURST_EVERY == 0


class Fleet:
    def __init__(self, apps: int, now: datetime, *, sync_result_resources: int = 20) -> None:
        self.apps = apps
        self.sync_result_resources = sync_result_resources
        """How many of the 20 resources the last sync reports (all of them in a full sync)."""
        self.now = now.replace(microsecond=0)
        self.origin = self.now - timedelta(days=30)
        """When version 0 of every component was deployed."""

    def members(self) -> Iterator[Member]:
        for index in range(self.apps):
            component = COMPONENTS[index % len(COMPONENTS)]
            slot = index // len(COMPONENTS)
            yield Member(
                index=index,
                component=component,
                slot=slot,
                name=f"{component}-{slot:04d}",
                namespace=NAMESPACES[slot % len(NAMESPACES)],
                version=VERSIONS - 2 - slot % 3,
            )

    def deployed_at(self, version: int) -> datetime:
        return self.origin + version * VERSION_SPACING

    # -- Applications ----------------------------------------------------------------------------

    def application(self, member: Member) -> dict[str, Any]:
        """The Application as the API server lists it before the burst."""
        first = member.version - HISTORY + 1
        history = [
            self._history_entry(member, version - first, version) for version in range(first, member.version + 1)
        ]
        deployed = self.deployed_at(member.version)
        images = self._images(member.component, member.version)
        return self._finish(
            make_app(
                member.name,
                member.namespace,
                source=self._source(member, member.version),
                labels={COMPONENT_LABEL: member.component, "team": f"team-{member.index % 7}"},
                annotations={"notifications.argoproj.io/subscribe.on-sync-failed.slack": f"{member.component}-alerts"},
                revision_history_limit=HISTORY,
                health_transition_at=deployed + timedelta(seconds=45),
                reconciled_at=self.now - timedelta(minutes=2),
                history=history,
                operation_state=self._operation(member, member.version, deployed),
                summary_images=images,
            ),
            member,
            images,
        )

    def burst_application(self, member: Member) -> dict[str, Any]:
        """The Application once the burst deployed the newest commit (only for members that burst)."""
        app = self.application(member)
        version = VERSIONS - 1
        deployed = self.now - timedelta(minutes=1)
        history_id = HISTORY
        entry = history_entry(
            history_id,
            gitops_commit_of(member.component, version),
            deployed,
            source=self._source(member, version),
        )
        app = append_history(app, entry, limit=HISTORY)
        images = self._images(member.component, version)
        app = with_operation_state(app, self._operation(member, version, deployed))
        app = set_summary_images(app, images)
        app = set_reconciled(app, self.now - timedelta(seconds=20))
        app["status"]["health"] = {"status": "Healthy", "lastTransitionTime": ts(deployed + timedelta(seconds=30))}
        return self._finish(app, member, images)

    def applications(self, *, burst: bool = False) -> Iterator[dict[str, Any]]:
        for member in self.members():
            yield self.burst_application(member) if burst and member.bursts else self.application(member)

    def _source(self, member: Member, version: int) -> dict[str, Any]:
        return git_source(
            GITOPS_URL,
            f"apps/{member.component}/overlays/{member.namespace}",
            "main",
            helm_parameters={
                "image.repository": image_repository(member.component),
                "image.tag": commit_of(member.component, version),
            },
        )

    def _history_entry(self, member: Member, history_id: int, version: int) -> dict[str, Any]:
        deployed = self.deployed_at(version)
        return history_entry(
            history_id,
            gitops_commit_of(member.component, version),
            deployed,
            source=self._source(member, version),
            initiated_by="automated" if version % 4 else "release-bot",
        )

    def _images(self, component: str, version: int) -> list[str]:
        return [f"{image_repository(component)}:{commit_of(component, version)}", *SIDECARS]

    def _operation(self, member: Member, version: int, deployed: datetime) -> dict[str, Any]:
        state = operation_state(
            "Succeeded",
            deployed - timedelta(seconds=6),
            deployed,
            revision=gitops_commit_of(member.component, version),
            source=self._source(member, version),
            workload=member.name,
        )
        state["syncResult"]["resources"] = [
            {**resource, "status": "Synced", "message": "configured" if "images" in resource else "unchanged"}
            for resource in self._resources(member, self._images(member.component, version))[
                : self.sync_result_resources
            ]
        ]
        return state

    def _resources(self, member: Member, images: list[str]) -> list[dict[str, Any]]:
        """Twenty live resources: two workloads (with images) and what usually comes with them."""
        name, namespace = member.name, "prod"
        app_image, *sidecars = images
        kinds: list[tuple[str, str, str, str]] = [
            ("apps", "v1", "Deployment", name),
            ("apps", "v1", "Deployment", f"{name}-worker"),
            ("", "v1", "Service", name),
            ("", "v1", "Service", f"{name}-metrics"),
            ("", "v1", "ConfigMap", f"{name}-config"),
            ("", "v1", "ConfigMap", f"{name}-feature-flags"),
            ("", "v1", "ConfigMap", f"{name}-otel"),
            ("", "v1", "Secret", f"{name}-db"),
            ("external-secrets.io", "v1beta1", "ExternalSecret", f"{name}-db"),
            ("", "v1", "ServiceAccount", name),
            ("rbac.authorization.k8s.io", "v1", "Role", name),
            ("rbac.authorization.k8s.io", "v1", "RoleBinding", name),
            ("autoscaling", "v2", "HorizontalPodAutoscaler", name),
            ("autoscaling", "v2", "HorizontalPodAutoscaler", f"{name}-worker"),
            ("policy", "v1", "PodDisruptionBudget", name),
            ("policy", "v1", "PodDisruptionBudget", f"{name}-worker"),
            ("networking.k8s.io", "v1", "Ingress", name),
            ("networking.k8s.io", "v1", "NetworkPolicy", name),
            ("monitoring.coreos.com", "v1", "ServiceMonitor", name),
            ("batch", "v1", "CronJob", f"{name}-cleanup"),
        ]
        resources: list[dict[str, Any]] = []
        for group, version, kind, resource_name in kinds:
            resource: dict[str, Any] = {"version": version, "kind": kind, "namespace": namespace, "name": resource_name}
            if group:
                resource["group"] = group
            if kind == "Deployment":
                resource["images"] = [app_image, *sidecars]
            elif kind == "CronJob":
                resource["images"] = [app_image]
            resources.append(resource)
        return resources

    def _finish(self, app: dict[str, Any], member: Member, images: list[str]) -> dict[str, Any]:
        status = app["status"]
        status["resources"] = [
            {**{k: v for k, v in resource.items() if k != "images"}, "status": "Synced"}
            for resource in self._resources(member, images)
        ]
        return app

    # -- GitHub ------------------------------------------------------------------------------------

    def seed_github(self, github: FakeGitHub) -> None:
        """Every commit the fleet names: a line per component repository, and the GitOps repository."""
        for component in COMPONENTS:
            parent: str | None = None
            for version in range(VERSIONS):
                parent = github.add_commit(
                    f"acme/{component}",
                    parent=parent,
                    sha=commit_of(component, version),
                    message=f"{component}: release v{version}\n\nChangelog.",
                    author_date=self.deployed_at(version) - timedelta(hours=3),
                )
        parent = None
        for version in range(VERSIONS):
            for component in COMPONENTS:
                parent = github.add_commit(
                    GITOPS_REPO,
                    parent=parent,
                    sha=gitops_commit_of(component, version),
                    message=f"chore({component}): bump to v{version}",
                    author_date=self.deployed_at(version) - timedelta(minutes=20),
                )

    def burst_minimum(self, gitops: GitOpsCommit = GitOpsCommit.FALLBACK) -> tuple[int, int]:
        """``(compares, commit lookups)`` the burst needs at least, with a cold cache: one compare per distinct
        (repository, previous SHA, new SHA), and one lookup per distinct new SHA that no compare returns (a
        compare ``base...head`` returns every commit in (base, head], head included): the GitOps revisions of the
        new history entries that carry their GitOps commit (``devlake.include_gitops_commit``: every one, or with
        ``fallback`` those whose image did not change), and any image SHA without a previous SHA or not ahead of
        it."""
        head = VERSIONS - 1
        compares: set[tuple[str, str, str]] = set()
        returned: set[tuple[str, str]] = set()
        wanted: set[tuple[str, str]] = set()
        for member in self.members():
            if not member.bursts:
                continue
            repo = f"acme/{member.component}"
            wanted.add((repo, commit_of(member.component, head)))
            image_changes = member.version != head
            if gitops is GitOpsCommit.ALWAYS or (gitops is GitOpsCommit.FALLBACK and not image_changes):
                wanted.add((GITOPS_REPO, gitops_commit_of(member.component, head)))
            if not image_changes:
                continue
            compares.add((repo, commit_of(member.component, member.version), commit_of(member.component, head)))
            returned.update((repo, commit_of(member.component, v)) for v in range(member.version + 1, head + 1))
        return len(compares), len(wanted - returned)

    def history_entries(self) -> int:
        """History entries of the fleet before the burst (what a backfill walks through)."""
        return self.apps * HISTORY

    def burst_count(self) -> int:
        return sum(1 for member in self.members() if member.bursts)
