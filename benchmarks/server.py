"""The outside world of a benchmark in a process of its own: the fake Kubernetes API and the fake DevLake.

Kept out of the measured process so that its memory (every Application's JSON) and its threads (serving pages
while the client parses them) count neither against the reconciler's peak RSS nor against its GIL.

Protocol: one JSON line on stdout once serving (``kube``, ``devlake``, ``apps``, ``bytes``), then one command per
line on stdin, each answered by one JSON line: ``burst`` (serve the fleet after the burst), ``stats`` (requests
seen so far), ``quit``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.fleet import Fleet
from tests.fakes.devlake import FakeDevLake
from tests.fakes.kube_api import FakeKubeAPI

CONNECTION_ID = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--apps", type=int, required=True)
    parser.add_argument("--now", required=True, help="the fleet's reference instant (ISO 8601)")
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--devlake-key", required=True)
    parser.add_argument("--sync-result-resources", type=int, default=20)
    args = parser.parse_args(argv)
    fleet = Fleet(args.apps, datetime.fromisoformat(args.now), sync_result_resources=args.sync_result_resources)
    bodies: list[bytes] = []

    def keep(apps: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for app in apps:
            bodies.append(json.dumps(app, separators=(",", ":")).encode())
            yield app

    with FakeKubeAPI() as kube, FakeDevLake() as devlake:
        kube.set_apps(keep(fleet.applications()))
        devlake.add_connection(CONNECTION_ID, args.devlake_key)
        kube.write_kubeconfig(args.kubeconfig)
        size = sum(len(body) for body in bodies)
        _reply(kube=kube.url, devlake=devlake.url, apps=len(bodies), bytes=size)
        for line in sys.stdin:
            command = line.strip()
            if command == "burst":
                kube.set_apps(_burst(fleet, bodies))
                _reply(ok=True)
            elif command == "stats":
                requests = devlake.requests
                _reply(
                    kube_lists=kube.list_calls,
                    devlake_requests=len(requests),
                    devlake_posts=sum(1 for r in requests if r.method == "POST"),
                    devlake_accepted=sum(1 for r in requests if r.status == 200),
                )
            elif command == "quit":
                break
            else:
                _reply(error=f"unknown command {command!r}")
    return 0


def _burst(fleet: Fleet, bodies: list[bytes]) -> Iterator[dict[str, Any]]:
    for member, body in zip(fleet.members(), bodies, strict=True):
        yield fleet.burst_application(member) if member.bursts else json.loads(body)


def _reply(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


if __name__ == "__main__":
    sys.exit(main())
