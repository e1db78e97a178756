"""``serve``: reconciliation passes on a cron schedule, ``/metrics`` and ``/healthz``, graceful SIGTERM.

A stop (SIGTERM, SIGINT) ends the process within ``STOP_GRACE_SECONDS``: the stop flag cuts every wait between
retries short and bounds the requests started after it, the pass in hand stops at its next safe point (between
two deployments, or after the page in hand), and if it has not ended when the grace is up the process exits
anyway. What was not recorded is sent again by the next run under the same ids (DevLake upserts), as after a
kill at any other point.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

from apscheduler.events import EVENT_SCHEDULER_STARTED
from apscheduler.executors.base import BaseExecutor, run_job
from apscheduler.job import Job
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.base import BaseTrigger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from reconciler import exitcodes
from reconciler.config import Config
from reconciler.cron import cron_trigger
from reconciler.metrics import PrometheusMetrics
from reconciler.model import format_time
from reconciler.run import RunOptions, RunSummary
from reconciler.runtime import Runtime, progress_reporter, run_pass
from reconciler.store import StoreUnavailable, warn_if_state_can_be_evicted

log = logging.getLogger(__name__)

MISFIRE_GRACE_SECONDS = 300
"""A pass that could not start on time (the previous one still running, a GC pause) still runs within this."""
STOP_GRACE_SECONDS = 25.0
"""How long after a stop request the process may take to exit: the pass in hand has until then to end at a safe
point. Keep it under the pod's terminationGracePeriodSeconds (30 s in ``cronjob/``), which ends in SIGKILL."""
DEFAULT_HOST = "0.0.0.0"


class DaemonThreadExecutor(BaseExecutor):  # type: ignore[misc]
    """Runs each pass in a daemon thread of its own.

    APScheduler's ``ThreadPoolExecutor`` uses ``concurrent.futures`` threads, which the interpreter joins at exit:
    a pass stuck in a request would hold the process past its grace period until the kubelet's SIGKILL."""

    def _do_submit_job(self, job: Job, run_times: list[datetime]) -> None:
        def target() -> None:
            try:
                events = run_job(job, job._jobstore_alias, run_times, self._logger.name)
            except BaseException as error:
                self._run_job_error(job.id, error, error.__traceback__)
            else:
                self._run_job_success(job.id, events)

        threading.Thread(target=target, name="reconcile-pass", daemon=True).start()


def build_trigger(config: Config) -> BaseTrigger:
    """The trigger ``serve`` runs on: the config's ``schedule``, in UTC."""
    return cron_trigger(config.schedule, UTC)


# -- the service ---------------------------------------------------------------------------------------


class Service:
    """The long-running process: one scheduler, one HTTP endpoint, one stop flag checked between Applications.

    Signals only set the stop flag: the scheduler is shut down from a thread of its own, because the
    signal handler runs on the main thread at any point, possibly inside the scheduler while it holds
    a lock that ``shutdown()`` needs.
    """

    def __init__(
        self,
        config: Config,
        *,
        runtime: Runtime | None = None,
        metrics: PrometheusMetrics | None = None,
        trigger: BaseTrigger | None = None,
        host: str = DEFAULT_HOST,
        port: int | None = None,
        on_pass_finished: Callable[[int], None] | None = None,
        stop_grace: float = STOP_GRACE_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
        exit_process: Callable[[int], object] = os._exit,
    ) -> None:
        self.config = config
        self.trigger = trigger or build_trigger(config)
        self.runtime = runtime or Runtime.open(config)
        self.metrics = metrics or PrometheusMetrics.for_config(config)
        self.host = host
        self.port = config.metrics.port if port is None else port
        self.on_pass_finished = on_pass_finished
        """Called at the end of every pass, in the pass's thread, with its exit code (tests, embedding)."""
        self.stop = self.runtime.stop.event
        """Set by SIGTERM/SIGINT or :meth:`request_stop`: the clients stop retrying, and the pass in hand winds
        down at its next safe point."""
        self.stop_grace = stop_grace
        self._monotonic = monotonic
        self._exit_process = exit_process
        """How the process ends when the pass in hand outlives the grace period (tests record the call)."""
        self._stop_requested_at: float | None = None
        self.passes = 0
        self.last_exit_code: int | None = None
        self.started_at = datetime.now(UTC)
        self.last_finished: datetime | None = None
        self._pass_started: datetime | None = None
        self._heartbeat: datetime | None = None
        self._stopping = False
        self._idle = threading.Event()
        self._idle.set()
        self._pass_lock = threading.Lock()
        self._lifecycle_lock = threading.Lock()
        self._scheduler = BlockingScheduler(
            timezone=UTC,
            executors={"default": DaemonThreadExecutor()},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE_SECONDS},
        )
        self._http: ThreadingHTTPServer | None = None
        self._progress = progress_reporter(sys.stderr, interactive=False)

    # -- one pass ------------------------------------------------------------------------------------

    def tick(self) -> int:
        """One pass, exactly like ``run``; never raises, so one bad pass does not stop the schedule."""
        with self._pass_lock:
            if self.stop.is_set():
                return exitcodes.OK
            self._idle.clear()
            self._pass_started = self._heartbeat = datetime.now(UTC)
        code = exitcodes.RETRY
        try:
            code = self._pass()
        finally:
            self.passes += 1
            self.last_exit_code = code
            self.last_finished = datetime.now(UTC)
            self._pass_started = None
            try:
                if self.on_pass_finished is not None:
                    self.on_pass_finished(code)
            finally:
                self._idle.set()
        return code

    def _pass(self) -> int:
        try:
            result = run_pass(
                self.runtime,
                RunOptions(),
                command="serve",
                metrics=self.metrics,
                stop=self.stop,
                progress=self._on_progress,
            )
        except Exception:
            log.exception("the pass failed unexpectedly; the next one will retry")
            self.metrics.run_aborted(exitcodes.RETRY)
            return exitcodes.RETRY
        return result.exit_code

    def _on_progress(self, summary: RunSummary) -> None:
        self._heartbeat = datetime.now(UTC)
        self._progress(summary)

    # -- health --------------------------------------------------------------------------------------

    def health(self, now: datetime | None = None) -> tuple[bool, str]:
        """Unhealthy only when passes stopped happening; a pass that found work to retry is still healthy.

        From the last sign of life (the process starting, a pass finishing, or the pass in progress
        reporting a page of Applications), a pass is due at the next fire time; one may be skipped
        (the previous pass still running), so the second fire time plus the misfire grace is the limit.
        """
        now = now or datetime.now(UTC)
        if self.stop.is_set():
            return False, "stopping"
        running_since, heartbeat, last = self._pass_started, self._heartbeat, self.last_finished
        if running_since is not None and heartbeat is not None:
            if now > self._deadline_after(heartbeat):
                return False, f"the pass running since {format_time(running_since)} stopped reporting progress"
            return True, f"a pass is running since {format_time(running_since)}"
        if last is None:
            if now > self._deadline_after(self.started_at):
                return False, f"no pass ran since the process started at {format_time(self.started_at)}"
            return True, "waiting for the first pass"
        if now > self._deadline_after(last):
            return False, f"no pass since {format_time(last)}"
        return True, f"last pass finished {format_time(last)} with exit code {self.last_exit_code}"

    def _deadline_after(self, moment: datetime) -> datetime:
        grace = timedelta(seconds=MISFIRE_GRACE_SECONDS)
        first: datetime | None = self.trigger.get_next_fire_time(None, moment)
        if first is None:
            return datetime.max.replace(tzinfo=UTC)
        second: datetime | None = self.trigger.get_next_fire_time(first, first)
        return (second or first) + grace

    # -- HTTP ----------------------------------------------------------------------------------------

    def serve_http(self) -> ThreadingHTTPServer:
        """``/metrics`` (Prometheus text format) and ``/healthz`` (200, or 503 with the reason)."""
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, status, kind = generate_latest(service.metrics.registry), 200, CONTENT_TYPE_LATEST
                elif path == "/healthz":
                    ok, message = service.health()
                    body, status, kind = (message + "\n").encode(), 200 if ok else 503, "text/plain; charset=utf-8"
                else:
                    body, status, kind = b"not found: try /metrics or /healthz\n", 404, "text/plain; charset=utf-8"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        self._http = server
        self.port = server.server_address[1]
        return server

    # -- lifecycle -----------------------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        """Stop scheduling; the pass in hand ends at its next safe point, and the process exits within the grace."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_requested_at = self._monotonic()
        self.stop.set()

    def run(self) -> int:
        """Blocks until stopped, then returns 0. Installs the signal handlers, so call it from the main thread."""
        try:
            self.serve_http()
        except OSError as error:
            log.error("cannot listen for /metrics and /healthz", extra={"port": self.port, "reason": str(error)})
            self.runtime.close()
            return exitcodes.CONFIG
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            threading.Thread(target=self._shutdown_when_stopped, name="scheduler-stop", daemon=True).start()
            self._scheduler.add_listener(self._on_scheduler_started, EVENT_SCHEDULER_STARTED)
            self._scheduler.add_job(self.tick, self.trigger, id="reconcile", name="reconcile")
            first = self.trigger.get_next_fire_time(None, datetime.now(UTC))
            log.info(
                "serving",
                extra={
                    "schedule": self.config.schedule,
                    "port": self.port,
                    "next_pass": format_time(first) if first else None,
                },
            )
            if not self.stop.is_set():
                self._scheduler.start()
        finally:
            self._wind_down()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not self._idle.is_set():
            # Its worker threads (concurrent.futures) would be joined at exit, past the grace period: end here.
            # Nothing is lost: what the pass did not record is sent again by the next run under the same ids.
            log.warning("stopped; exiting without the pass in hand", extra={"passes": self.passes})
            for sink in logging.getLogger().handlers:
                sink.flush()
            self._exit_process(exitcodes.OK)
            return exitcodes.OK
        log.info("stopped", extra={"passes": self.passes})
        return exitcodes.OK

    def _wind_down(self) -> None:
        with self._pass_lock:
            self.request_stop()
        requested = self._stop_requested_at if self._stop_requested_at is not None else self._monotonic()
        left = max(0.0, self.stop_grace - (self._monotonic() - requested))
        if not self._idle.wait(timeout=left):
            log.warning(
                "the pass in hand did not reach a safe point within the stop grace period; exiting without it",
                extra={"seconds": self.stop_grace},
            )
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._idle.is_set():
            self.runtime.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop()

    def _shutdown_when_stopped(self) -> None:
        self.stop.wait()
        log.info(
            "stop requested; the pass in hand ends at its next safe point", extra={"grace_seconds": self.stop_grace}
        )
        self._shutdown_scheduler()

    def _on_scheduler_started(self, event: object) -> None:
        if self.stop.is_set():
            self._shutdown_scheduler()

    def _shutdown_scheduler(self) -> None:
        with self._lifecycle_lock:
            if self._scheduler.running:
                self._scheduler.shutdown(wait=False)


def serve(config: Config) -> int:
    try:
        service = Service(config)
    except StoreUnavailable as error:
        log.error("state store unavailable; cannot serve", extra={"reason": str(error)})
        return exitcodes.RETRY
    warn_if_state_can_be_evicted(service.runtime.store)
    return service.run()
