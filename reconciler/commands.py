"""What each command does, wired from a validated config: ``run``/``backfill``, ``check``, ``explain``, ``status``.

``cli.py`` parses arguments and sets up logging; everything a test wants to call lives here (``serve`` is in
``scheduler.py``). A pass itself, shared with ``serve``, is ``runtime.run_pass``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from reconciler import exitcodes
from reconciler.application import MalformedApplication, parse_application
from reconciler.argocd import ClusterLister, ClusterUnavailable, FileLister, open_lister
from reconciler.config import ClusterConfig, Config
from reconciler.devlake import DevLakeClient
from reconciler.github import (
    UNREADABLE_CAUSE,
    WITHOUT_GITHUB,
    GitHubClient,
    GitHubUnavailable,
    RateLimited,
    RepositoryNotReadable,
    repository_from_url,
)
from reconciler.images import CommitTagRule, InvalidImageReference, RepositoryMapper, parse_image
from reconciler.logs import describe_run_error
from reconciler.model import OWNER_REPO, AppObservation, Snapshot, format_time
from reconciler.planner import plan
from reconciler.reconcile import iter_observations, planner_policy
from reconciler.run import InvalidRequest, RunOptions, RunSummary, Shard, StopFlag, selected_clusters
from reconciler.runtime import Runtime, progress_reporter, run_pass, store_unavailable_at_start
from reconciler.store import (
    BacklogItem,
    Store,
    StoreUnavailable,
    open_store,
    state_eviction,
    warn_if_state_can_be_evicted,
)

if TYPE_CHECKING:
    from reconciler.metrics import PrometheusMetrics

log = logging.getLogger("reconciler")


def run_command(
    config: Config,
    *,
    command: str = "run",
    dry_run: bool = False,
    clusters: tuple[str, ...] = (),
    shard: str | None = None,
    since: datetime | None = None,
    stdout: TextIO | None = None,
    progress: Callable[[RunSummary], None] | None = None,
    reader_gone: threading.Event | None = None,
) -> int:
    """``run`` and ``backfill``: one pass, then the metrics pushed to the Pushgateway (unless a dry run).

    ``reader_gone``: set when nobody reads ``stdout`` any more (``--dry-run | head``): a dry run then stops at
    its next safe point.

    Without a Pushgateway nothing would read the metrics: they are not counted, and prometheus_client is not
    even imported."""
    metrics: PrometheusMetrics | None = None
    if config.metrics.pushgateway and not dry_run:
        from reconciler.metrics import PrometheusMetrics

        metrics = PrometheusMetrics.for_config(config)

    def publish() -> None:
        if metrics is not None:
            from reconciler.metrics import grouping_key, push

            push(config, metrics, grouping_key(config, clusters, shard))

    options = RunOptions(
        dry_run=dry_run,
        clusters=clusters,
        shard=Shard.parse(shard) if shard else None,
        backfill=command == "backfill",
        since=since,
    )
    try:
        stop = StopFlag(reader_gone) if dry_run and reader_gone is not None else None
        runtime = Runtime.open(config, read_only=dry_run, stop=stop)
    except StoreUnavailable as error:
        store_unavailable_at_start(error)
        if metrics is not None:
            metrics.run_aborted(exitcodes.RETRY)
        publish()
        return exitcodes.RETRY
    try:
        result = run_pass(
            runtime,
            options,
            command=command,
            metrics=metrics,
            progress=progress or progress_reporter(sys.stderr),
            dry_run_output=stdout or sys.stdout,
            publish=publish,
            on_store_reached=warn_if_state_can_be_evicted,
        )
        if reader_gone is not None and reader_gone.is_set():
            log.info("the reader of the dry run's output went away; the dry run stopped early")
        return result.exit_code
    finally:
        runtime.close()


# -- check ---------------------------------------------------------------------------------------------


MAX_PROBED_REPOSITORIES = 50
"""Repositories ``check`` reads one commit of, at most (one GitHub request each)."""


def check_command(config: Config, *, stdout: TextIO, sleep: Callable[[float], None] = time.sleep) -> int:
    """One line per dependency, printed as soon as it is known; exit 0 only when every one answered as expected.

    Each dependency is checked on its own: GitHub is checked even when the state store is down. The Applications
    listed tell which GitHub repositories runs will read: one commit of each is read with the token.
    """
    results: list[bool] = []

    def report(ok: bool, line: str) -> None:
        results.append(ok)
        print(line, file=stdout, flush=True)

    missing = config.missing_secrets()
    if missing:
        report(False, f"config: FAILED ({'; '.join(missing)})")
    else:
        report(
            True,
            f"config: ok ({len(config.clusters)} cluster(s), {len(config.devlake.connections)} DevLake connection(s))",
        )
    observations: list[AppObservation] = []
    for cluster in config.clusters:
        report(*_check_cluster(cluster, sleep, config, observations))
    report(*_check_store(config))
    github = GitHubClient(config.github, _NoCache(), sleep=sleep, retries=CHECK_ATTEMPTS - 1)
    ok, line, usable = _check_github(config, github)
    report(ok, line)
    if usable:
        for result in _check_repositories(config, github, observations):
            report(*result)
    _check_devlake(config, sleep, report)
    return exitcodes.OK if all(results) else exitcodes.CONFIG


CHECK_ATTEMPTS = 2
"""``check`` reports what it sees now: one quick retry for a blip, not a run's patience."""


def _check_cluster(
    cluster: ClusterConfig, sleep: Callable[[float], None], config: Config, found: list[AppObservation]
) -> tuple[bool, str]:
    """List the cluster's Applications as a run does; the ones the config selects go to ``found``."""
    name = cluster.name
    if cluster.applications_file is not None:
        return _check_applications_file(cluster, config, found)
    count = 0
    try:
        lister = ClusterLister(cluster, sleep=sleep, attempts=CHECK_ATTEMPTS)
        for item in iter_observations(lister, name):
            count += 1
            if isinstance(item, AppObservation) and config.applications.selects(item.key.qualified_name):
                found.append(item)
    except ClusterUnavailable as error:
        return False, f"kubernetes {name}: FAILED ({error})"
    return True, f"kubernetes {name}: ok (can list applications.argoproj.io; {count} Application(s))"


def _check_applications_file(cluster: ClusterConfig, config: Config, found: list[AppObservation]) -> tuple[bool, str]:
    """Readable, a list of Applications; how many, how many the cluster's selectors keep, how many are malformed.
    The ones the config selects go to ``found``."""
    lister = FileLister(cluster)
    try:
        items = lister.read()
        selected = lister.selected(items)
    except ClusterUnavailable as error:
        return False, f"applications file {cluster.name}: FAILED ({error})"
    malformed = 0
    for item in selected:
        try:
            observation = parse_application(item, cluster.name)
        except MalformedApplication:
            malformed += 1
            continue
        if config.applications.selects(observation.key.qualified_name):
            found.append(observation)
    details = [f"{len(items)} Application(s)"]
    if len(selected) != len(items):
        details.append(f"{len(selected)} selected by namespaces and label_selector")
    if malformed:
        details.append(f"{malformed} malformed, skipped by every run (explain names why)")
    return True, f"applications file {cluster.name}: ok ({lister.path}: {', '.join(details)})"


def _check_store(config: Config) -> tuple[bool, str]:
    """Reached, and (Redis) not allowed to evict the state: an ``allkeys-*`` policy under a memory limit fails;
    one without a limit yet, or a policy Redis will not tell, is a warning on an ``ok`` line."""
    store: Store | None = None
    try:
        store = open_store(config.state)
        store.ping()
        eviction = state_eviction(store)
    except StoreUnavailable as error:
        return False, f"state store: FAILED ({error})"
    finally:
        if store is not None:
            store.close()
    where = _describe_state_url(config.state.url)
    if eviction is None:
        return True, f"state store: ok ({where})"
    if eviction.evicts_state:
        return False, f"state store: FAILED ({where}: {eviction.problem})"
    if eviction.problem is not None:
        return True, f"state store: ok ({where}; WARNING: {eviction.problem})"
    if eviction.policy is None:
        return True, f"state store: ok ({where}; WARNING: {eviction.describe()})"
    return True, f"state store: ok ({where}; {eviction.describe()})"


class _NoCache:
    """``check`` asks GitHub itself; it needs no cache (and must not depend on the state store)."""

    def cache_get(self, kind: str, keys: Sequence[str]) -> dict[str, str]:
        return {}

    def cache_put(self, kind: str, items: Mapping[str, str]) -> None:
        return None


def _check_github(config: Config, client: GitHubClient) -> tuple[bool, str, bool]:
    """``(ok, line, usable)``: ``usable`` when repositories can be probed next."""
    if not config.github.enabled:
        return True, f"github: disabled (github.enabled: false): {WITHOUT_GITHUB}", False
    try:
        remaining, limit, reset = client.rate_limit()
    except RateLimited as error:
        return False, f"github: FAILED (rate limited until {error.reset_at})", False
    except GitHubUnavailable as error:
        hint = ""
        if "401" in str(error) and config.github.app_id is None and config.github.token_env:
            hint = f"; check ${config.github.token_env}"
        return False, f"github: FAILED ({error}{hint})", False
    authenticated = "authenticated" if (config.github.token() or config.github.app_id) else "NOT authenticated"
    if limit < 0:
        return True, f"github: ok ({authenticated}; rate limiting disabled on this server)", True
    if remaining <= 0:
        return (
            False,
            f"github: FAILED ({authenticated}; rate limit exhausted: 0/{limit} until {format_time(reset)}; runs defer "
            "their GitHub work until then)",
            False,
        )
    return True, f"github: ok ({authenticated}; rate limit {remaining}/{limit}, resets {format_time(reset)})", True


def known_repositories(config: Config, observations: Sequence[AppObservation]) -> tuple[dict[str, str], list[str]]:
    """The GitHub repositories runs will read for these Applications, each with what needs it, and the
    ``images.repositories`` rules that map none of their images.

    A rule is a regex with an ``owner/repo`` template: its repositories are the ones it makes of the images the
    Applications run (the first matching rule maps an image, as in a run), plus its template when it has no
    placeholder. The GitOps repositories are the sources' GitHub ``repoURL`` (when GitOps commits are sent)."""
    rules = config.images.repositories
    mappers = [RepositoryMapper(config.images.model_copy(update={"repositories": [rule]})) for rule in rules]
    patterns = [re.compile(rule.image) for rule in rules]
    needed: dict[str, str] = {}
    used: set[int] = set()
    for index, rule in enumerate(rules):
        if "{" not in rule.repo and OWNER_REPO.fullmatch(rule.repo):
            needed.setdefault(rule.repo.lower(), f"images.repositories[{index}]")
            used.add(index)
    for observation in observations:
        images = list(observation.operation.images or []) if observation.operation else []
        for raw in dict.fromkeys([*images, *observation.summary_images]):
            try:
                image = parse_image(raw)
            except InvalidImageReference:
                continue
            if mappers and mappers[0].ignored(image):
                continue
            for index, pattern in enumerate(patterns):
                if pattern.fullmatch(image.repository) is None:
                    continue
                repo = mappers[index].repository_for(image)
                if repo is not None:
                    used.add(index)
                    needed.setdefault(repo, f"images.repositories[{index}] for {image.repository}")
                break
    if config.devlake.include_gitops_commit:
        for observation in observations:
            for source in observation.sources:
                repo = repository_from_url(source.repo_url, config.github.web_url)
                if repo is not None:
                    needed.setdefault(repo, f"the GitOps source of {observation.key.qualified_name}")
    unused = [f"images.repositories[{i}] ({rules[i].image})" for i in range(len(rules)) if i not in used]
    return needed, unused


def _check_repositories(
    config: Config, client: GitHubClient, observations: Sequence[AppObservation]
) -> Iterator[tuple[bool, str]]:
    needed, unused = known_repositories(config, observations)
    if observations:
        for rule in unused:
            yield True, f"github rule {rule}: ok (no image of the listed Applications matches it)"
    for probed, (repo, why) in enumerate(sorted(needed.items())):
        if probed == MAX_PROBED_REPOSITORIES:
            yield True, f"github repositories: {len(needed) - probed} more not probed (at most {probed} are)"
            return
        where = f"github repository {repo}"
        try:
            client.probe_repository(repo)
        except RepositoryNotReadable:
            yield False, f"{where}: FAILED (needed by {why}; {UNREADABLE_CAUSE})"
            continue
        except RateLimited as error:
            until = f" until {format_time(error.reset_at)}" if error.reset_at else ""
            yield False, f"{where}: FAILED (rate limit exhausted{until}: the other repositories were not probed)"
            return
        except GitHubUnavailable as error:
            yield False, f"{where}: FAILED (needed by {why}; {error})"
            continue
        yield True, f"{where}: ok (readable; needed by {why})"


def _check_devlake(config: Config, sleep: Callable[[float], None], report: Callable[[bool, str], None]) -> None:
    not_found = 0
    with DevLakeClient(config.devlake, sleep=sleep) as devlake:
        for connection in config.devlake.connections:
            ok, message = devlake.probe(connection)
            report(ok, f"devlake connection {connection.id}: {'ok' if ok else 'FAILED'} ({message})")
            not_found += "HTTP 404" in message
    if not_found == len(config.devlake.connections):
        report(
            False,
            f"devlake: FAILED (every connection answered 404: is devlake.url ({config.devlake.url}) the Config UI "
            "address of the DevLake that has these connections, without /api?)",
        )


def _describe_state_url(url: str | None) -> str:
    if url is None:
        return "embedded SQLite in ./.dora-reconciler/"
    scheme, _, rest = url.partition("://")
    host = rest.rsplit("@", 1)[-1]
    return f"{scheme}://{host}"


# -- --applications-file -------------------------------------------------------------------------------


def read_applications_from(config: Config, clusters: tuple[str, ...], path: str) -> Config:
    """``--applications-file``: for this command, one cluster's Applications come from ``path`` (an export) instead
    of its configured source. The cluster keeps its name, so deployment ids and snapshots are that cluster's own.

    Raises ``InvalidRequest`` unless exactly one cluster is meant (``--cluster NAME``, or the only one configured).
    """
    names = tuple(dict.fromkeys(clusters or [cluster.name for cluster in config.clusters]))
    if len(names) != 1:
        raise InvalidRequest(
            f"--applications-file holds one cluster's Applications: say which with --cluster NAME "
            f"(configured: {', '.join(c.name for c in config.clusters)})"
        )
    selected_clusters(config, RunOptions(clusters=names))
    update = {"applications_file": path, "kubeconfig": None, "context": None}
    return config.model_copy(
        update={"clusters": [c.model_copy(update=update) if c.name == names[0] else c for c in config.clusters]}
    )


# -- explain -------------------------------------------------------------------------------------------


def explain_command(config: Config, application: str, *, clusters: tuple[str, ...], stdout: TextIO) -> int:
    """Exit 0 when a run reads the Application in at least one selected cluster; 1 when none does (not found, or
    hidden by ``clusters[].namespaces``, ``clusters[].label_selector`` or ``applications.include/exclude``), and
    then say which selector would hide it."""
    namespace, sep, name = application.partition("/")
    if not sep or not namespace or not name:
        raise InvalidRequest(f"expected NAMESPACE/NAME, got {application!r}")
    store = open_store(config.state)
    try:
        found = read = False
        searched: list[str] = []
        for index, cluster in enumerate(config.clusters):
            if clusters and cluster.name not in clusters:
                continue
            searched.append(cluster.name)
            try:
                item = _find_application(cluster, namespace, name)
                hidden_by_labels = False
                if item is None and cluster.label_selector:
                    item = _find_application(cluster.model_copy(update={"label_selector": None}), namespace, name)
                    hidden_by_labels = item is not None
            except ClusterUnavailable as error:
                print(f"cluster {cluster.name}: unavailable ({error})", file=stdout)
                continue
            if item is None:
                continue
            found = True
            if isinstance(item, MalformedApplication):
                print(
                    f"Application {application} in cluster {cluster.name}: malformed, skipped by every run "
                    f"({item.reason})",
                    file=stdout,
                )
            else:
                _explain_one(config, store, item, stdout)
            hiding = _selectors_hiding(config, index, namespace, name, found=True, by_labels=hidden_by_labels)
            for selector in hiding:
                print(f"  NOT READ BY RUNS: {selector}", file=stdout)
            read = read or not hiding
        if not found:
            where = ", ".join(searched) or "no cluster (none selected)"
            print(f"{application}: not found in any selected cluster ({where})", file=stdout)
            for index, cluster in enumerate(config.clusters):
                if cluster.name in searched:
                    for selector in _selectors_hiding(config, index, namespace, name, found=False):
                        print(f"  would hide it: {selector}", file=stdout)
        return exitcodes.OK if read else exitcodes.NOT_FOUND
    finally:
        store.close()


def _find_application(
    cluster: ClusterConfig, namespace: str, name: str
) -> AppObservation | MalformedApplication | None:
    """The Application ``namespace/name`` of ``cluster``, listed in its namespace whatever ``namespaces`` says."""
    scoped = cluster.model_copy(update={"namespaces": [namespace]})
    for item in iter_observations(open_lister(scoped), cluster.name):
        if isinstance(item, MalformedApplication):
            if item.app == f"{namespace}/{name}":
                return item
        elif item.key.namespace == namespace and item.key.name == name:
            return item
    return None


def _selectors_hiding(
    config: Config, index: int, namespace: str, name: str, *, found: bool, by_labels: bool = False
) -> list[str]:
    """The config's selectors that keep runs from reading ``namespace/name`` in ``config.clusters[index]``. For an
    Application that was not found, the label selector is named as one that would hide it when it has one."""
    cluster = config.clusters[index]
    where = f"clusters[{index}] ({cluster.name})"
    hiding: list[str] = []
    if cluster.namespaces and namespace not in cluster.namespaces:
        hiding.append(f"{where}.namespaces {cluster.namespaces} does not include {namespace}")
    if cluster.label_selector and (by_labels or not found):
        what = "does not match its labels" if by_labels else "lists only the Applications whose labels match it"
        hiding.append(f"{where}.label_selector {cluster.label_selector!r} {what}")
    applications = config.applications
    qualified = f"{namespace}/{name}"
    if not applications.selects(qualified):
        excluded = [glob for glob in applications.exclude if fnmatch.fnmatchcase(qualified, glob)]
        if excluded:
            hiding.append(f"applications.exclude {excluded[0]!r} matches {qualified}")
        else:
            hiding.append(f"applications.include {applications.include} does not match {qualified}")
    return hiding


def _explain_one(config: Config, store: Store, observation: AppObservation, out: TextIO) -> None:
    key = observation.key

    def p(text: str = "") -> None:
        print(text, file=out)

    p(f"Application {key.qualified_name} in cluster {key.cluster} (uid {observation.uid})")
    selected = config.applications.selects(key.qualified_name)
    p(f"  selected by applications.include/exclude: {'yes' if selected else 'NO'}")
    component = config.applications.component_of(key.name, observation.labels)
    paths = [s.path for s in observation.sources if s.path]
    p(f"  component: {component}; environment: {config.environment_for(key.cluster, key.qualified_name, paths)}")
    p(f"  destination: {observation.destination}; sync: {observation.sync_status}; health: {observation.health_status}")
    if observation.deleting:
        p("  being deleted")
    for source in observation.sources:
        p(f"  source: {source.repo_url} path={source.path} chart={source.chart} target={source.target_revision}")
    for entry in observation.history[-5:]:
        p(f"  history {entry.id}: revisions={list(entry.revisions)} deployed {format_time(entry.deployed_at)}")
    if observation.operation:
        op = observation.operation
        p(f"  operation: {op.phase} started {format_time(op.started_at)} revisions={list(op.revisions)}")
    rule = CommitTagRule(config.images.commit_tag_pattern)
    mapper = RepositoryMapper(config.images)
    images = list(observation.operation.images or []) if observation.operation else []
    for raw in dict.fromkeys([*images, *observation.summary_images]):
        try:
            image = parse_image(raw)
        except InvalidImageReference as error:
            p(f"  image {raw[:120]}: unparseable ({error})")
            continue
        if mapper.ignored(image):
            p(f"  image {raw}: ignored by images.ignore")
            continue
        sha = rule.commit_of(image.tag) if image.tag else None
        repo = mapper.repository_for(image)
        p(f"  image {raw}: commit tag {sha or 'none'}; GitHub repository {repo or 'no rule matches'}")
    snapshot = store.load_snapshots([key]).get(key)
    p(f"  snapshot: {_describe_snapshot(snapshot)}")
    policy = planner_policy(config, store.initialized_at(key.cluster), RunOptions())
    next_plan = plan(observation, snapshot, datetime.now(UTC), policy)
    if next_plan.deferred:
        p("  next run: deferred (status not fresh yet)")
    for deployment in next_plan.deployments:
        p(
            f"  next run emits {deployment.id}: {deployment.result.value} {deployment.deployment_class.value}, "
            f"finished {format_time(deployment.finished_at)}, revisions {list(deployment.revisions)}"
        )
    if not next_plan.deployments and not next_plan.deferred:
        p("  next run emits nothing")
    for note in next_plan.notes:
        p(f"  why: {note}")


def _describe_snapshot(snapshot: Snapshot | None) -> str:
    if snapshot is None:
        return "none (never seen, or the store was wiped)"
    return json.dumps(json.loads(snapshot.to_json()))


# -- status --------------------------------------------------------------------------------------------


STATUS_RUNS = 20
STATUS_DEAD_LETTERS = 100
STATUS_ERRORS_PER_RUN = 5
"""``status`` (text) prints this many errors of a run; ``--json`` has them all."""


def status_command(config: Config, *, as_json: bool, stdout: TextIO) -> int:
    """The last runs (what each decided, held back and could not do), the dead letters still undelivered (a dead
    letter leaves the list when a later run, backfill or backlog delivers the same deployment to its connection)
    and what waits in each connection's backlog."""
    store = open_store(config.state)
    try:
        runs = store.run_summaries(STATUS_RUNS)
        letters = store.dead_letters(STATUS_DEAD_LETTERS + 1)
        backlog = backlog_by_connection(config, store.backlog())
    finally:
        store.close()
    more = len(letters) > STATUS_DEAD_LETTERS
    letters = letters[:STATUS_DEAD_LETTERS]
    if as_json:
        print(
            json.dumps({"runs": runs, "dead_letters": letters, "backlog": backlog}, indent=2, default=str), file=stdout
        )
        return exitcodes.OK
    print(f"last {len(runs)} run(s), newest first:", file=stdout)
    for run in runs:
        print(
            f"  {run.get('started_at')} {run.get('command')} exit {run.get('exit_code')}: "
            f"{run.get('apps_listed')} apps, {run.get('deployments_success')} success, "
            f"{run.get('deployments_failed')} failed, {run.get('deployments_pending', 0)} pending, "
            f"{run.get('deployments_deferred', 0)} deferred, {run.get('sent')} sent, "
            f"{run.get('dead_lettered')} dead-lettered, {run.get('seconds')} s",
            file=stdout,
        )
        errors = run.get("errors") or []
        for error in errors[:STATUS_ERRORS_PER_RUN]:
            print(f"    error: {describe_run_error(error)}", file=stdout)
        if len(errors) > STATUS_ERRORS_PER_RUN:
            print(
                f"    … and {len(errors) - STATUS_ERRORS_PER_RUN} more error(s) (status --json lists them)", file=stdout
            )
    shown = f"the {STATUS_DEAD_LETTERS} newest of more" if more else str(len(letters))
    retry = " (backfill sends them again once the cause is fixed)" if letters else ""
    print(f"dead letters ({shown}):{retry}", file=stdout)
    for letter in letters:
        print(
            f"  {letter.get('time')} connection {letter.get('connection')} {letter.get('deployment_id')}: "
            f"HTTP {letter.get('status')} {letter.get('message')}",
            file=stdout,
        )
    print(f"backlog ({sum(len(entry['deployments']) for entry in backlog)} waiting):", file=stdout)
    for entry in backlog:
        gone = "" if entry["configured"] else " (no longer configured: not sent)"
        print(
            f"  connection {entry['connection']}{gone}: {len(entry['deployments'])} waiting since {entry['since']}: "
            f"{entry['reason']}",
            file=stdout,
        )
    return exitcodes.OK


def backlog_by_connection(config: Config, items: Sequence[BacklogItem]) -> list[dict[str, Any]]:
    """What waits in each connection's backlog: the deployments, oldest first, since when and why (the newest
    reason: a connection refused once may have been fixed and refused again)."""
    configured = {connection.id for connection in config.devlake.connections}
    grouped: dict[int, list[BacklogItem]] = {}
    for item in items:
        grouped.setdefault(item.slot.connection, []).append(item)
    return [
        {
            "connection": connection,
            "configured": connection in configured,
            "since": format_time(waiting[0].since),
            "reason": waiting[-1].reason,
            "deployments": [item.slot.deployment_id for item in waiting],
        }
        for connection, waiting in sorted(grouped.items())
    ]
