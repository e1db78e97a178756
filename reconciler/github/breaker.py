"""The per-tick circuit breaker: GitHub not answering stops this tick's GitHub work at once."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("reconciler.github")

OUTAGE_ATTEMPTS = 6
"""Failed attempts in a row (timeouts, connection errors, HTTP 5xx), spread over at least two different
requests, after which GitHub counts as down for the rest of the tick: what is left of the tick's GitHub work is
deferred to the next run at once instead of waiting out every attempt (6 attempts x ``github.timeout`` per
commit). Six is one request's attempts (the first and its five retries), so one request that always fails (a
compare GitHub cannot compute in time) never opens the breaker alone and cannot hold back everything else."""


class Breaker:
    """Opens after ``threshold`` failed attempts in a row over at least two different requests, and stays open
    until ``reset()``. Thread-safe; logs once when it opens."""

    def __init__(self, threshold: int = OUTAGE_ATTEMPTS) -> None:
        self.threshold = threshold
        self._lock = threading.Lock()
        self._streak = 0
        self._requests: set[str] = set()
        self._reason: str | None = None
        self._local = threading.local()

    @property
    def reason(self) -> str | None:
        """Why GitHub counts as down for the rest of the tick, or ``None`` while it does not."""
        return self._reason

    def begin(self) -> None:
        """A request starts on this thread."""
        self._local.failures = 0

    def recorded(self) -> bool:
        """Whether an attempt of this thread's current request was already counted as failed."""
        return bool(getattr(self._local, "failures", 0))

    def failure(self, request: str, why: str) -> None:
        self._local.failures = getattr(self._local, "failures", 0) + 1
        with self._lock:
            self._streak += 1
            self._requests.add(request)
            if self._reason is not None or self._streak < self.threshold or len(self._requests) < 2:
                return
            self._reason = (
                f"GitHub is not answering ({self._streak} attempts in a row failed, the last: {why}); "
                "the rest of this run's GitHub work waits for the next run"
            )
        log.error("GitHub is down for the rest of this run", extra={"reason": self._reason})

    def success(self) -> None:
        with self._lock:
            self._streak = 0
            self._requests.clear()

    def reset(self) -> None:
        with self._lock:
            self._streak = 0
            self._requests.clear()
            self._reason = None
