"""DORA numbers as Apache DevLake computes them from the rows the fake DevLake stored.

A DevLake *project* here is a set of webhook connections: DevLake maps each connection's ``cicd_scopes``, ``boards``
and ``repos`` scope ``webhook:<id>`` into the project, so every deployment and incident of every connection in it
counts. What is mirrored, and from where (``apache/incubator-devlake``):

- the previous-success chain, ``backend/plugins/dora/tasks/prev_deployment_commit_enricher.go``: SUCCESS commit rows
  with a finished date, an environment and a repo URL, grouped by (scope, exact repo URL, environment) and ordered by
  finished date; each row points at the one before it (the first at nothing). Equal finished dates have no tie-break
  in DevLake (``ChainLink.tied`` says where the order is DevLake's choice);
- the commit diffs, ``backend/plugins/refdiff`` (``CalculateLostSha``): the commits reachable from the new SHA and not
  from the old one; a SHA missing from the git graph is a node of its own;
- which deployment first shipped a commit, ``backend/plugins/dora/tasks/change_lead_time_calculator.go``: the
  earliest commit row by ``(started_date, id)`` that is PRODUCTION, SUCCESS, has a previous success, and whose diff
  contains the commit;
- incident links, ``backend/plugins/dora/tasks/incident_deploy_connector.go``: each incident of the project goes to
  the one SUCCESS PRODUCTION commit row of the project with the latest ``finished_date`` strictly before the
  incident's ``created_date``; an incident with no such row is dropped;
- the dashboards (``grafana/dashboards/DORA.json``): deployments are SUCCESS PRODUCTION commit rows grouped by
  ``cicd_deployment_id`` and dated by their latest ``finished_date``; change failure rate = deployments with a linked
  incident ÷ deployments; time to restore (2023 report) = median of ``TIMESTAMPDIFF(MINUTE, deployment finished,
  incident resolution)`` over linked resolved incidents, (2021 report) median of the incidents' ``lead_time_minutes``
  over resolved incidents; the median is ``max(x) where percent_rank() <= 0.5``, the lower median for an even count.

A ``window`` stands for the dashboard's time range (``$__timeFilter``, both ends included): it selects deployments by
their finished date and incidents by their resolution date; chains and links are computed over everything, as the
blueprint run does.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from fractions import Fraction
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fakes.devlake import FakeDevLake

SUCCESS = "SUCCESS"
PRODUCTION = "PRODUCTION"
_MINUTE_US = 60_000_000


@dataclass(frozen=True)
class Deployment:
    """A production deployment as the dashboards count it: one per ``cicd_deployment_id`` in the project."""

    deployment_id: str
    finished_date: datetime
    """The latest ``finished_date`` of its SUCCESS PRODUCTION commit rows."""

    @property
    def day(self) -> date:
        """The UTC day deployment frequency counts it on."""
        return self.finished_date.date()


@dataclass(frozen=True)
class ChainKey:
    """What separates previous-success chains: the scope (``webhook:<connection>``), exact repo URL, environment."""

    scope_id: str
    repo_url: str
    environment: str


@dataclass(frozen=True)
class ChainLink:
    """A SUCCESS commit row in its chain, with the ``prev_success_deployment_commit_id`` DevLake gives it."""

    row_id: str
    deployment_id: str
    commit_sha: str
    started_date: datetime | None
    finished_date: datetime
    prev_row_id: str
    """``''`` for the first row of the chain."""
    prev_commit_sha: str
    """The previous row's SHA (``''`` for the first row): the old side of this row's commit diff."""
    tied: bool = False
    """Same ``finished_date`` as the row before it: DevLake's order between the two is undefined."""


@dataclass(frozen=True)
class DiffPair:
    """A commit row with a previous success: refdiff diffs ``new_sha`` against ``old_sha`` for it."""

    row_id: str
    deployment_id: str
    environment: str
    old_sha: str
    new_sha: str
    started_date: datetime | None
    finished_date: datetime


@dataclass(frozen=True)
class IncidentLink:
    """An incident and the deployment DevLake blames it on (``project_incident_deployment_relationships``)."""

    incident_id: str
    deployment_id: str
    row_id: str
    """The commit row that matched: the latest SUCCESS PRODUCTION row finished before the incident was created."""
    row_finished_date: datetime
    created_date: datetime
    resolution_date: datetime | None
    ambiguous: bool = False
    """Another deployment's row finished at the same instant: which one DevLake picks is undefined."""


@dataclass(frozen=True)
class ShippedBy:
    """The commit row DevLake credits with first shipping a commit (``project_pr_metrics.deployment_commit_id``)."""

    deployment_id: str
    row_id: str
    started_date: datetime | None
    finished_date: datetime


class CommitGraph:
    """A git history as refdiff sees it: each commit's parents (``commit_parents`` of the project's repos)."""

    def __init__(self, parents: Mapping[str, Sequence[str]]) -> None:
        self._parents: dict[str, tuple[str, ...]] = {}
        for sha, of in parents.items():
            self._parents.setdefault(sha, ())
            self._parents[sha] += tuple(of)
            for parent in of:
                self._parents.setdefault(parent, ())

    @classmethod
    def linear(cls, shas: Sequence[str]) -> CommitGraph:
        """One branch, oldest commit first."""
        return cls({sha: (shas[index - 1],) if index else () for index, sha in enumerate(shas)})

    def __contains__(self, sha: object) -> bool:
        return sha in self._parents

    def lost(self, old_sha: str, new_sha: str) -> list[str]:
        """``CalculateLostSha``: what ``new_sha`` reaches and ``old_sha`` does not, in DevLake's depth-first order."""
        old_side: set[str] = set()
        stack = [old_sha]
        while stack:
            sha = stack.pop()
            if sha not in old_side:
                old_side.add(sha)
                stack.extend(self._parents.get(sha, ()))
        lost: list[str] = []
        seen: set[str] = set()
        stack = [new_sha]
        while stack:
            sha = stack.pop()
            if sha in old_side or sha in seen:
                continue
            seen.add(sha)
            lost.append(sha)
            stack.extend(reversed(self._parents.get(sha, ())))
        return lost


def devlake_median(values: Iterable[int]) -> int | None:
    """The dashboards' median: ``max(x)`` over the rows whose ``percent_rank()`` (ascending) is at most 0.5."""
    ordered = sorted(values)
    if not ordered:
        return None
    last = len(ordered) - 1
    return max(value for value in ordered if 2 * bisect_left(ordered, value) <= last)


def timestampdiff_minutes(start: datetime, end: datetime) -> int:
    """MySQL ``TIMESTAMPDIFF(MINUTE, start, end)``: whole minutes, truncated toward zero."""
    microseconds = (end - start) // timedelta(microseconds=1)
    minutes = abs(microseconds) // _MINUTE_US
    return minutes if microseconds >= 0 else -minutes


def _in(moment: datetime | None, window: tuple[datetime, datetime] | None) -> bool:
    if moment is None:
        return False
    return window is None or window[0] <= moment <= window[1]


@dataclass(frozen=True)
class DoraReport:
    """What one DevLake project's DORA dashboards show, computed from its commit rows and incident rows."""

    deployments: tuple[Deployment, ...]
    """SUCCESS production deployments (in the window), by finished date."""
    chains: Mapping[ChainKey, tuple[ChainLink, ...]]
    diff_pairs: tuple[DiffPair, ...]
    incident_links: Mapping[str, IncidentLink]
    """Incident id (``webhook:<connection>:<issueKey>``) -> its link; incidents with no earlier deployment: absent."""
    unlinked_incidents: tuple[str, ...]
    """Incident ids DevLake drops: no SUCCESS PRODUCTION row of the project finished before they were created."""
    change_failure_rate: Fraction | None
    """Deployments with at least one linked incident ÷ deployments; ``None`` without deployments."""
    recovery_minutes: Mapping[str, int]
    """Incident id -> minutes from its deployment's finish to its resolution, for the incidents the 2023 figure uses."""
    time_to_restore: timedelta | None
    """2023 report (failed deployment recovery time): the median of ``recovery_minutes``."""
    time_to_restore_2021: timedelta | None
    """2021 report: the median ``lead_time_minutes`` (resolution - creation) of the project's resolved incidents."""

    @classmethod
    def of(
        cls, fake: FakeDevLake, connections: Iterable[int], window: tuple[datetime, datetime] | None = None
    ) -> DoraReport:
        """The report of the project made of these webhook connections of ``fake``."""
        chosen = sorted(set(connections))
        rows = [row for connection in chosen for row in fake.commit_rows(connection)]
        incidents = [row for connection in chosen for row in fake.incidents(connection).values()]
        return cls.from_rows(rows, incidents, window)

    @classmethod
    def from_rows(
        cls,
        commit_rows: Iterable[Mapping[str, Any]],
        incidents: Iterable[Mapping[str, Any]] = (),
        window: tuple[datetime, datetime] | None = None,
    ) -> DoraReport:
        """The report of a project holding exactly these rows.

        Commit rows need ``id``, ``cicd_deployment_id``, ``cicd_scope_id``, ``repo_url``, ``commit_sha``, ``result``,
        ``environment``, ``started_date`` and ``finished_date`` (aware datetimes), in insertion order; incident rows
        need ``id``, ``created_date``, ``resolution_date`` and ``lead_time_minutes``.
        """
        rows = tuple(commit_rows)
        incident_rows = tuple(incidents)
        production = [row for row in rows if row["result"] == SUCCESS and row["environment"] == PRODUCTION]

        finished: dict[str, datetime] = {}
        for row in production:
            if row["finished_date"] is not None:
                previous = finished.get(row["cicd_deployment_id"])
                finished[row["cicd_deployment_id"]] = max(row["finished_date"], previous or row["finished_date"])
        in_window = {key: value for key, value in finished.items() if _in(value, window)}
        deployments = tuple(
            sorted((Deployment(key, value) for key, value in in_window.items()), key=lambda d: d.finished_date)
        )

        chains = _chains(rows)
        diff_pairs = tuple(
            DiffPair(
                row_id=link.row_id,
                deployment_id=link.deployment_id,
                environment=key.environment,
                old_sha=link.prev_commit_sha,
                new_sha=link.commit_sha,
                started_date=link.started_date,
                finished_date=link.finished_date,
            )
            for key, links in chains.items()
            for link in links
            if link.prev_row_id
        )

        links, unlinked = _link_incidents(production, incident_rows)
        failed = {link.deployment_id for link in links.values()}
        change_failure_rate = (
            Fraction(sum(1 for key in in_window if key in failed), len(in_window)) if in_window else None
        )
        recovery = {
            incident_id: timestampdiff_minutes(in_window[link.deployment_id], link.resolution_date)
            for incident_id, link in links.items()
            if link.deployment_id in in_window
            and link.resolution_date is not None
            and _in(link.resolution_date, window)
        }
        lead_times = [
            int(row["lead_time_minutes"])
            for row in incident_rows
            if row["lead_time_minutes"] is not None and _in(row["resolution_date"], window)
        ]
        return cls(
            deployments=deployments,
            chains=chains,
            diff_pairs=diff_pairs,
            incident_links=links,
            unlinked_incidents=unlinked,
            change_failure_rate=change_failure_rate,
            recovery_minutes=recovery,
            time_to_restore=_minutes(devlake_median(recovery.values())),
            time_to_restore_2021=_minutes(devlake_median(lead_times)),
        )

    @property
    def deployment_ids(self) -> list[str]:
        return [deployment.deployment_id for deployment in self.deployments]

    @property
    def deployment_days(self) -> list[date]:
        """The distinct UTC days with a production deployment: what deployment frequency scores."""
        return sorted({deployment.day for deployment in self.deployments})

    @property
    def failed_deployments(self) -> list[str]:
        """Deployment ids (in the window) with at least one linked incident: the change failure rate's numerator."""
        blamed = {link.deployment_id for link in self.incident_links.values()}
        return [deployment_id for deployment_id in self.deployment_ids if deployment_id in blamed]

    def chain(self, repo_url: str, connection: int, environment: str = PRODUCTION) -> tuple[ChainLink, ...]:
        """One chain (empty when DevLake would have none)."""
        return self.chains.get(ChainKey(f"webhook:{connection}", repo_url, environment), ())

    def first_shipped(self, graph: CommitGraph, commits: Iterable[str]) -> dict[str, ShippedBy | None]:
        """For each commit, the commit row DevLake says first shipped it (``None``: no lead time for it).

        The rule of ``change_lead_time_calculator.go``: among the project's PRODUCTION SUCCESS rows with a previous
        success, the earliest by ``(started_date, id)`` whose diff against its previous row's SHA contains the commit.
        """
        candidates = sorted(
            (
                link
                for key, links in self.chains.items()
                if key.environment == PRODUCTION
                for link in links
                if link.prev_row_id
            ),
            key=lambda link: (_sort_time(link.started_date), link.row_id),
        )
        diffs: dict[tuple[str, str], frozenset[str]] = {}
        shipped: dict[str, ShippedBy | None] = {}
        for commit in commits:
            shipped[commit] = None
            for link in candidates:
                pair = (link.prev_commit_sha, link.commit_sha)
                if pair not in diffs:
                    diffs[pair] = frozenset(graph.lost(*pair))
                if commit in diffs[pair]:
                    shipped[commit] = ShippedBy(link.deployment_id, link.row_id, link.started_date, link.finished_date)
                    break
        return shipped


def _sort_time(moment: datetime | None) -> tuple[bool, datetime | None]:
    """SQL sorts NULL first in ascending order (MySQL)."""
    return (moment is not None, moment)


def _minutes(value: int | None) -> timedelta | None:
    return None if value is None else timedelta(minutes=value)


def _chains(rows: Sequence[Mapping[str, Any]]) -> dict[ChainKey, tuple[ChainLink, ...]]:
    grouped: dict[ChainKey, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["result"] != SUCCESS or row["finished_date"] is None or not row["environment"] or not row["repo_url"]:
            continue
        key = ChainKey(row["cicd_scope_id"], row["repo_url"], row["environment"])
        grouped.setdefault(key, []).append(row)
    chains: dict[ChainKey, tuple[ChainLink, ...]] = {}
    for key in sorted(grouped, key=lambda k: (k.scope_id, k.repo_url, k.environment)):
        links: list[ChainLink] = []
        previous: Mapping[str, Any] | None = None
        for row in sorted(grouped[key], key=lambda r: r["finished_date"]):  # stable: ties keep insertion order
            links.append(
                ChainLink(
                    row_id=row["id"],
                    deployment_id=row["cicd_deployment_id"],
                    commit_sha=row["commit_sha"],
                    started_date=row["started_date"],
                    finished_date=row["finished_date"],
                    prev_row_id=previous["id"] if previous is not None else "",
                    prev_commit_sha=previous["commit_sha"] if previous is not None else "",
                    tied=previous is not None and previous["finished_date"] == row["finished_date"],
                )
            )
            previous = row
        chains[key] = tuple(links)
    return chains


def _link_incidents(
    production: Sequence[Mapping[str, Any]], incidents: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, IncidentLink], tuple[str, ...]]:
    links: dict[str, IncidentLink] = {}
    unlinked: list[str] = []
    for incident in incidents:
        created = incident["created_date"]
        earlier = [
            row
            for row in production
            if row["finished_date"] is not None and created is not None and row["finished_date"] < created
        ]
        if not earlier:
            unlinked.append(incident["id"])
            continue
        latest = max(row["finished_date"] for row in earlier)
        at_latest = [row for row in earlier if row["finished_date"] == latest]
        chosen = at_latest[-1]
        links[incident["id"]] = IncidentLink(
            incident_id=incident["id"],
            deployment_id=chosen["cicd_deployment_id"],
            row_id=chosen["id"],
            row_finished_date=latest,
            created_date=created,
            resolution_date=incident["resolution_date"],
            ambiguous=len({row["cicd_deployment_id"] for row in at_latest}) > 1,
        )
    return links, tuple(unlinked)
