"""What the service knows about its backends, kept current off the request path.

A monitor task asks every ``breaker_probe_s``, for each served model: does its backend
answer its own health call and a one-row inference within the model budget? Does every
online-store tier it reads answer, and does it hold materialized data for the views the
model reads? A failed
check opens that breaker (requests fall back at once instead of each waiting for a
timeout); a passed one closes it. ``/ready`` reports these, so it is 503 when the model
backend is down, when the store is unreachable, and when the store is reachable but
empty (a Redis that restarted without its data), not only after requests failed.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from serving import admission
from serving.errors import first_line
from serving.logs import Throttled, event
from serving.metrics import Metrics
from serving.resilience import CircuitBreaker
from serving.scoring import Scorer


class Health:
    """One served model's backends, as the monitor last found them."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.model_ok = True
        self.store_ok = True
        meta = scorer.meta
        self._probe_x = np.array([[f.default for f in meta.features]], dtype=np.float32)

    def reasons(self) -> list[str]:
        """Why this model should not get traffic now (empty: ready)."""
        s = self.scorer
        out = []
        if s.model_breaker.is_open:
            out.append(f"model backend unavailable ({s.model_breaker.last_error or 'failing'})")
        if s.store_breaker.is_open:
            out.append(f"online store unreachable ({s.store_breaker.last_error or 'failing'})")
        if s.store_empty:
            out.append(f"online store holds no materialized data for {', '.join(s.store_empty)}")
        return out

    async def check_model(self) -> None:
        s = self.scorer
        budget = s.settings.model_budget_ms / 1000
        try:
            ok = await asyncio.wait_for(s.backend.ready(), max(budget, 1.0))
            if ok:
                probe = await s.call_model(self._probe_x)
                if not np.isfinite(probe).all():  # every request would fall back
                    raise ValueError("the model gave the probe no finite score")
            error = "" if ok else "not ready"
        except TimeoutError:
            ok, error = False, "health check past its budget"
        except Exception as e:
            ok, error = False, first_line(e)
        self._judge(s.model_breaker, ok, error)
        self.model_ok = ok

    def check_store(self) -> None:
        s = self.scorer
        try:
            s.features.ping()
            empty = s.features.unmaterialized()
            ok, error = True, ""
        except Exception as e:  # unreachable, wrong password, timeout
            ok, error, empty = False, first_line(e), s.store_empty
        self._judge(s.store_breaker, ok, error)
        if empty != s.store_empty:
            event(logging.WARNING, "store_materialized_data", missing=",".join(empty) or "none")
        s.store_empty = empty
        self.store_ok = ok

    def _judge(self, breaker: CircuitBreaker, ok: bool, error: str) -> None:
        if ok and breaker.is_open:
            breaker.success()  # the breaker logs its transitions
        elif not ok:
            breaker.trip(error)

    def publish(self) -> None:
        m, s = self.scorer.metrics, self.scorer
        m.breakers(s.store_breaker, s.model_breaker)
        m.unready_of["model"].set(int(s.model_breaker.is_open))
        m.unready_of["online_store"].set(int(s.store_breaker.is_open))
        m.unready_of["not_materialized"].set(int(bool(s.store_empty)))

    async def check(self) -> None:
        await self.check_model()
        self.check_store()


class Monitor:
    """Every served model's health, checked every probe interval, and the worker's
    readiness."""

    def __init__(self, healths: dict[str, Health], metrics: Metrics, probe_s: float) -> None:
        self.healths = healths
        self.metrics = metrics
        self.probe_s = probe_s
        self.warmed_up = False
        self._log = Throttled()

    def reasons(self) -> list[str]:
        """Why this worker should not get traffic now (empty: ready)."""
        out = [] if self.warmed_up else ["not warmed up"]
        for name, h in self.healths.items():
            out += [f"{name}: {r}" for r in h.reasons()]
        return out

    def publish(self) -> None:
        self.metrics.refused.inc(admission.take_refused())
        for h in self.healths.values():
            h.publish()
        self.metrics.ready.set(0 if self.reasons() else 1)
        self.metrics.save()

    async def run(self) -> None:
        """Forever: check every model's backends each probe interval (cancelled at
        shutdown)."""
        while True:
            for h in self.healths.values():
                try:
                    await h.check()
                except Exception as e:  # a check must never kill the monitor
                    self._log(logging.ERROR, "monitor_error", type(e).__name__, error=first_line(e))
            try:
                self.publish()
            except Exception as e:
                self._log(logging.ERROR, "monitor_error", type(e).__name__, error=first_line(e))
            await asyncio.sleep(self.probe_s)
