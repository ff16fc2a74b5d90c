"""Request-path resilience: circuit breakers that judge a backend by its own calls.

A breaker counts only failures of the backend call itself (an error, or the call taking
longer than its budget), never the time a request spent queueing before it. While open,
calls are skipped (the request gets the rule-based fallback) and no customer request is
used as a trial: the service's monitor (``serving.health``) probes the backend's own
health call every probe interval and closes the breaker on the first success, so
recovery after a backend returns takes one probe interval, whatever the load.
"""

from __future__ import annotations

import logging
import time
from enum import Enum

from serving.logs import event


class State(Enum):
    CLOSED = 0
    OPEN = 1


class CircuitBreaker:
    """Closed until ``failures`` consecutive failed backend calls (or a failed health
    check); then open until a health check passes."""

    def __init__(self, name: str, failures: int = 5, model: str = "") -> None:
        self.name = name
        self.model = model  # whose backend (named in the log lines)
        self.failures = failures
        self.state = State.CLOSED
        self.opened_at = 0.0
        self.last_error = ""
        self._count = 0

    @property
    def is_open(self) -> bool:
        return self.state is State.OPEN

    def allow(self) -> bool:
        """May a request call the backend now?"""
        return self.state is State.CLOSED

    def success(self) -> None:
        self._count = 0
        if self.state is State.OPEN:
            self._event("breaker_closed", open_s=round(time.monotonic() - self.opened_at, 3))
        self.state = State.CLOSED
        self.last_error = ""

    def failure(self, error: str = "") -> None:
        self._count += 1
        self.last_error = error or self.last_error
        if self.state is State.CLOSED and self._count >= self.failures:
            self._open(f"{self._count} consecutive failed calls")

    def trip(self, error: str) -> None:
        """Open now: the backend failed its own health check."""
        self.last_error = error
        if self.state is State.CLOSED:
            self._open("failed health check")

    def _open(self, why: str) -> None:
        self.state = State.OPEN
        self.opened_at = time.monotonic()
        self._event("breaker_open", why=why, error=self.last_error)

    def _event(self, what: str, **kv: object) -> None:
        event(logging.WARNING, what, breaker=self.name, model=self.model, **kv)
