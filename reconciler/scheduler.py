"""``serve``: reconciliation passes on a cron schedule, ``/metrics`` and ``/healthz``, graceful SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from reconciler import exitcodes
from reconciler.config import Config
from reconciler.metrics import PrometheusMetrics
from reconciler.model import format_time
from reconciler.reconcile import RunOptions
from reconciler.runtime import Runtime, log_summary
from reconciler.store import LockHeld, StoreUnavailable

log = logging.getLogger(__name__)

MISFIRE_GRACE_SECONDS = 300
STOP_GRACE_SECONDS = 25.0
"""How long a stop waits for the pass in hand; keep it under the pod's terminationGracePeriodSeconds."""


class Service:
    """The long-running process: one scheduler, one HTTP endpoint, one stop flag checked between Applications."""

    def __init__(
        self,
        config: Config,
        *,
        runtime: Runtime | None = None,
        metrics: PrometheusMetrics | None = None,
        trigger: BaseTrigger | None = None,
        port: int | None = None,
    ) -> None:
        self.config = config
        self.runtime = runtime or Runtime.open(config)
        self.metrics = metrics or PrometheusMetrics()
        self.trigger = trigger or CronTrigger.from_crontab(config.schedule, timezone=UTC)
        self.port = config.metrics.port if port is None else port
        self.stop = threading.Event()
        self.ticks = 0
        self.last_finished: datetime | None = None
        self.last_exit_code: int | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._scheduler = BlockingScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE_SECONDS},
        )
        self._http: ThreadingHTTPServer | None = None

    # -- one pass ------------------------------------------------------------------------------------

    def tick(self) -> int:
        """One pass, exactly like ``run``; never raises, so one bad pass does not stop the schedule."""
        if self.stop.is_set():
            return exitcodes.OK
        self._idle.clear()
        try:
            reconciler = self.runtime.reconciler(metrics=self.metrics, stop=self.stop)
            summary = reconciler.run(RunOptions(), command="serve")
            log_summary(summary)
            code = summary.exit_code
        except LockHeld as error:
            log.warning("another run holds the lock; skipping this pass", extra={"reason": str(error)})
            code = exitcodes.LOCKED
        except StoreUnavailable as error:
            log.error("state store unavailable; skipping this pass", extra={"reason": str(error)})
            code = exitcodes.RETRY
        except Exception:
            log.exception("the pass failed unexpectedly; the next one will retry")
            code = exitcodes.RETRY
        finally:
            self.ticks += 1
            self.last_finished = datetime.now(UTC)
            self._idle.set()
        self.last_exit_code = code
        return code

    # -- health --------------------------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        """Unhealthy only when passes stopped happening: a pass that found work to retry is still healthy."""
        if self.stop.is_set():
            return False, "stopping"
        if self.last_finished is None:
            return True, "waiting for the first pass"
        now = datetime.now(UTC)
        following = self.trigger.get_next_fire_time(self.last_finished, self.last_finished)
        allowed = timedelta(seconds=MISFIRE_GRACE_SECONDS) * 2
        if following is not None:
            allowed += max(following - self.last_finished, timedelta(0)) * 2
        if now - self.last_finished > allowed:
            return False, f"no pass finished since {format_time(self.last_finished)}"
        return True, f"last pass finished {format_time(self.last_finished)} with exit code {self.last_exit_code}"

    def serve_http(self) -> ThreadingHTTPServer:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] == "/metrics":
                    body, status, kind = generate_latest(service.metrics.registry), 200, CONTENT_TYPE_LATEST
                elif self.path.split("?", 1)[0] == "/healthz":
                    ok, message = service.health()
                    body, status, kind = (message + "\n").encode(), 200 if ok else 503, "text/plain; charset=utf-8"
                else:
                    body, status, kind = b"not found\n", 404, "text/plain; charset=utf-8"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("0.0.0.0", self.port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        self._http = server
        self.port = server.server_address[1]
        return server

    # -- lifecycle -----------------------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        """SIGTERM/SIGINT: stop scheduling, let the pass in hand finish its current Application and save."""
        if self.stop.is_set():
            return
        log.info("stop requested; finishing the Application in hand")
        self.stop.set()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def run(self) -> int:
        """Blocks until stopped. Installs the signal handlers, so call it from the main thread."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.serve_http()
        self._scheduler.add_job(self.tick, self.trigger, id="reconcile", name="reconcile")
        first = self.trigger.get_next_fire_time(None, datetime.now(UTC))
        log.info("serving", extra={"schedule": self.config.schedule, "port": self.port, "next": str(first)})
        try:
            self._scheduler.start()
        finally:
            self._idle.wait(timeout=STOP_GRACE_SECONDS)
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
            self.runtime.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("stopped", extra={"passes": self.ticks})
        return exitcodes.OK

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop()


def serve(config: Config) -> int:
    return Service(config).run()
