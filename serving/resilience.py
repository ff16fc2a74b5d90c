"""Request-path resilience: circuit breakers and a bound on requests in flight."""

from __future__ import annotations

import time
from enum import Enum


class State(Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    """Closed until ``failures`` consecutive errors; open (calls skipped) for ``reset_s``;
    then half-open: one trial call, closing on success and re-opening on failure."""

    def __init__(self, name: str, failures: int = 5, reset_s: float = 5.0) -> None:
        self.name = name
        self.failures = failures
        self.reset_s = reset_s
        self._count = 0
        self._opened_at = 0.0
        self._state = State.CLOSED
        self._trial_running = False

    @property
    def state(self) -> State:
        if self._state is State.OPEN and time.monotonic() - self._opened_at >= self.reset_s:
            self._state = State.HALF_OPEN
            self._trial_running = False
        return self._state

    def allow(self) -> bool:
        """May a call go through now? (In half-open, only one trial at a time.)"""
        state = self.state
        if state is State.CLOSED:
            return True
        if state is State.HALF_OPEN and not self._trial_running:
            self._trial_running = True
            return True
        return False

    def success(self) -> None:
        self._count = 0
        self._state = State.CLOSED
        self._trial_running = False

    def failure(self) -> None:
        self._count += 1
        if self._state is State.HALF_OPEN or self._count >= self.failures:
            self._state = State.OPEN
            self._opened_at = time.monotonic()
            self._trial_running = False


class Overloaded(Exception):
    """More requests in flight than allowed: answer 503 with Retry-After, don't queue."""


class InFlight:
    """Counts requests being served (the event loop is single-threaded: a plain counter)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.current = 0

    def __enter__(self) -> InFlight:
        if self.current >= self.limit:
            raise Overloaded
        self.current += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.current -= 1
