"""Scenario builders for the end-to-end tests: the Applications of a ``World`` and the runs that set them up.

``tests/factories.py`` builds single Application dicts; these builders put them in the shapes the scenarios
share: an app deployed and settled at history 0 (a baseline), the same app after its next deployments,
twin Applications of one component (one per region), GitHub histories to deploy from.
"""

from __future__ import annotations

from typing import Any

from reconciler.model import AppKey, deployment_id
from tests import factories
from tests.world import World

IMAGE_REGISTRY = "quay.io/acme"


def image_of(repo: str, sha: str) -> str:
    """``quay.io/acme/<repo>:<sha>``: an image the World maps to the GitHub repository ``acme/<repo>``."""
    return f"{IMAGE_REGISTRY}/{repo}:{sha}"


def settled_app(name: str, gitops_sha: str, image_sha: str, *, image_repo: str = "payments-api") -> dict[str, Any]:
    """History id 0 deployed ``gitops_sha`` with ``image_sha``; settled and Healthy (a baseline)."""
    return factories.settled_app(name, gitops_sha, image_of(image_repo, image_sha))


def deployed_app(world: World, gitops_sha: str, image_sha: str, *, name: str = "payments-api") -> dict[str, Any]:
    """An app whose history id 0 deployed ``gitops_sha`` with image ``image_sha``: settled and Healthy."""
    return settled_app(name, gitops_sha, image_sha)


def new_deployment(
    app: dict[str, Any],
    history_id: int,
    gitops_sha: str,
    image_sha: str,
    minute: float,
    *,
    image_repo: str = "payments-api",
) -> dict[str, Any]:
    """``app`` after a successful sync of ``gitops_sha`` with image ``image_sha`` at ``minute``, then Healthy."""
    return factories.redeployed(app, history_id, gitops_sha, image_of(image_repo, image_sha), minute)


def deploy(
    app: dict[str, Any], history_id: int, gitops_sha: str, image_sha: str, *, image_repo: str = "payments-api"
) -> dict[str, Any]:
    """``app`` after a successful sync (history ``history_id``, at minute ``10 * history_id``), then Healthy."""
    return new_deployment(app, history_id, gitops_sha, image_sha, 10.0 * history_id, image_repo=image_repo)


def payments_world(world: World) -> tuple[list[str], list[str]]:
    """Six GitOps commits and six payments-api commits on GitHub, oldest first."""
    return world.github.add_commits("acme/gitops", 6), world.github.add_commits("acme/payments-api", 6)


def baselined(world: World, gitops: int, *run_args: str, images: int | None = None) -> tuple[list[str], list[str], Any]:
    """``gitops`` GitOps commits and ``images`` (default: as many) image commits on GitHub, and the app
    deployed at the first of each, recorded by a first (baseline) run."""
    gitops_shas = world.github.add_commits("acme/gitops", gitops)
    image_shas = world.github.add_commits("acme/payments-api", images or gitops)
    app = deployed_app(world, gitops_shas[0], image_shas[0])
    world.set_apps([app])
    assert world.run(*run_args) == 0
    return gitops_shas, image_shas, app


def baselined_twins(world: World) -> tuple[list[str], list[str], dict[str, Any], dict[str, Any]]:
    """``payments_world``, and the component's two Applications (``payments-api-eu``, ``payments-api-us``)
    deployed at its first commits, recorded by a first (baseline) run."""
    gitops, images = payments_world(world)
    eu = settled_app("payments-api-eu", gitops[0], images[0])
    us = settled_app("payments-api-us", gitops[0], images[0])
    world.set_apps([eu, us])
    assert world.run() == 0
    return gitops, images, eu, us


def three_deployments_waiting(world: World, *names: str) -> None:
    """Each Application named is baselined by a first run, then deploys history ids 1, 2 and 3 (not run yet)."""
    gitops, images = payments_world(world)
    apps = [settled_app(name, gitops[0], images[0]) for name in names]
    world.set_apps(apps)
    assert world.run() == 0
    for i in (1, 2, 3):
        apps = [deploy(app, i, gitops[i], images[i]) for app in apps]
    world.set_apps(apps)


class Deploys:
    """The payments app of ``World``: a baseline, then one new deployment per call of ``next()``."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.gitops = world.github.add_commits("acme/gitops", 4)
        self.images = world.github.add_commits("acme/payments-api", 4)
        self.app = settled_app("payments-api", self.gitops[0], self.images[0])
        self.history_id = 0
        world.set_apps([self.app])

    def next(self) -> str:
        """Deploy the next commit; the deployment id the next run should send."""
        self.history_id += 1
        n = self.history_id
        self.app = new_deployment(self.app, n, self.gitops[n], self.images[n], minute=30 * n)
        self.world.set_apps([self.app])
        key = AppKey("prod-east", "argocd", "payments-api")
        return deployment_id(key, factories.fake_uid("argocd/payments-api"), f"h{n}")
