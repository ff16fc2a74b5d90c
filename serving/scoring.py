"""From requests to predictions: features, model, decision — for every request waiting.

Concurrent requests are coalesced: each request queues its rows and awaits; one drain
task takes everything queued, reads the store once (one round trip per tier for the
whole batch) and calls the model once, then answers each request. Under load batches
grow by themselves (what waits while one batch runs forms the next), so the per-request
cost falls as load rises instead of queueing delay growing — the same idea as Triton's
dynamic batching, applied to the store read and the HTTP service too.

Budgets: a request still waiting ``queue_budget_ms`` after it arrived is shed (503,
never a fallback, never counted against a backend); the store read and the model call
each have their own budget, and only they move the breakers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving import decision
from serving.errors import first_line
from serving.logs import Throttled
from serving.metrics import Metrics
from serving.model_backend import ModelBackend
from serving.model_repository import ModelMetadata
from serving.online_features import OnlineFeatures, served
from serving.resilience import CircuitBreaker
from serving.settings import ServingSettings


class Shed(Exception):
    """The request waited past its queue budget: answer 503 + Retry-After."""


@dataclass(slots=True)
class _Job:
    rows: list[dict[str, Any]]
    arrival: float
    future: asyncio.Future[list[dict[str, Any]]]


class Scorer:
    """Scores rows (entity keys + request fields) with one model, coalescing requests."""

    def __init__(
        self,
        settings: ServingSettings,
        features: OnlineFeatures,
        meta: ModelMetadata,
        backend: ModelBackend,
        metrics: Metrics,
        policy: decision.Policy,
    ) -> None:
        self.settings, self.features, self.meta = settings, features, meta
        self.policy = policy
        self.backend, self.metrics = backend, metrics
        self.store_breaker = CircuitBreaker("online_store", settings.breaker_failures)
        self.model_breaker = CircuitBreaker("model", settings.breaker_failures)
        self.store_empty: list[str] = []  # views not materialized (the monitor keeps it)
        self.recording = True  # off during warm-up: dummy requests are not traffic
        self._queue: list[_Job] = []
        self._drainer: asyncio.Task[None] | None = None
        self._ttls = features.ttl_of()
        self._names = meta.feature_names
        self._defaults = [(f.name, f.default) for f in meta.features]
        self._views = [(v.name, v.features[0]) for v in features.views]
        self._queue_s = settings.queue_budget_ms / 1000
        self._max_rows = settings.max_batch
        self._features_s = settings.features_budget_ms / 1000
        self._model_s = settings.model_budget_ms / 1000
        self._log = Throttled()  # request-path events: a line per kind per interval

    def backlogged(self) -> bool:
        """Has the oldest queued request waited half its queue budget? (Then new arrivals
        are refused at admission: they would only be shed later.)"""
        q = self._queue
        return bool(q) and time.perf_counter() - q[0].arrival > self._queue_s / 2

    @contextlib.contextmanager
    def warming(self) -> Iterator[None]:
        """Warm-up calls: not recorded, generous budgets (other workers may be loading),
        and they leave the breakers closed."""
        budgets = self._queue_s, self._features_s, self._model_s
        self.recording, self._queue_s, self._features_s, self._model_s = False, 10, 10, 10
        try:
            yield
        finally:
            self._queue_s, self._features_s, self._model_s = budgets
            self.recording = True
            self.store_breaker.success()
            self.model_breaker.success()

    async def predict(self, rows: list[dict[str, Any]], arrival: float) -> list[dict[str, Any]]:
        """One prediction per row (a dict shaped like ``schemas.Prediction``); raises
        :class:`Shed` when the request waited past its budget."""
        loop = asyncio.get_running_loop()
        job = _Job(rows, arrival, loop.create_future())
        self._queue.append(job)
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return await job.future

    async def _drain(self) -> None:
        try:
            while self._queue:
                jobs, size, limit = [], 0, self._max_rows
                while self._queue and (not jobs or size + len(self._queue[0].rows) <= limit):
                    job = self._queue.pop(0)
                    jobs.append(job)
                    size += len(job.rows)
                try:
                    await self._run(jobs)
                except Exception as e:  # a bug must fail these requests, not hang them
                    self._log(logging.ERROR, "scoring_bug", type(e).__name__, error=repr(e))
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(e)
        finally:
            self._drainer = None

    async def _run(self, jobs: list[_Job]) -> None:
        t0 = time.perf_counter()
        live = []
        for job in jobs:
            if t0 - job.arrival > self._queue_s:
                if not job.future.done():
                    job.future.set_exception(Shed())
                    self.metrics.shed_of["queue_budget"].inc()
            else:
                live.append(job)
        if not live:
            return
        rows = [r for job in live for r in job.rows]
        values, ages, store_cause = self._read(rows)
        t1 = time.perf_counter()
        scores, cause = None, store_cause
        if values is not None:
            scores, cause = await self._score(values)
        t2 = time.perf_counter()
        out = self._answers(rows, values, ages, scores, cause)
        t3 = time.perf_counter()
        m, record = self.metrics, self.recording
        if record:  # (breaker states: the health monitor publishes them)
            m.observe_batch(len(rows), t1 - t0, t2 - t1, t3 - t2)
        at = 0
        for job in live:
            answers = out[at : at + len(job.rows)]
            at += len(job.rows)
            latency = {
                "queue": round((t0 - job.arrival) * 1000, 3),
                "features": round((t1 - t0) * 1000, 3),
                "model": round((t2 - t1) * 1000, 3),
                "total": round((t3 - job.arrival) * 1000, 3),
            }
            for a in answers:
                a["latency_ms"] = latency
            if record:
                m.request.observe(t3 - job.arrival)
            if not job.future.done():
                job.future.set_result(answers)

    def _read(
        self, rows: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]] | None, list[dict[str, float | None]], str | None]:
        """Served values (TTL applied) and per-view ages, or None and the cause."""
        ages: list[dict[str, float | None]] = [
            dict.fromkeys(self.features.view_names) for _ in rows
        ]
        if self.store_empty:
            return None, ages, "online_store_not_materialized"
        if not self.store_breaker.allow():
            return None, ages, "online_store_breaker_open"
        t0 = time.perf_counter()
        # Inline: one local round trip for the whole batch, cheaper than a thread hop. The
        # store's socket timeout is the features budget, so a hung store can't hold the
        # loop longer, and the breaker stops asking after a few misses.
        try:
            vectors = self.features.read(rows)
        except (TimeoutError, BlockingIOError):
            self.store_breaker.failure("timeout")
            return None, ages, "online_store_deadline"
        except Exception as e:  # a store outage must not fail the request
            self.store_breaker.failure(type(e).__name__)
            self._log(logging.WARNING, "store_error", type(e).__name__, error=first_line(e))
            return None, ages, "online_store_error"
        if time.perf_counter() - t0 > self._features_s:
            self.store_breaker.failure("slow")
            return None, ages, "online_store_deadline"
        self.store_breaker.success()
        now = time.time()
        sample = self.recording  # ages go to the metric for one row per batch
        out = []
        for vec, row_ages in zip(vectors, ages, strict=True):
            served(vec, self._ttls, now)
            for view, first in self._views:
                ts = vec.ts.get(first)
                if ts is not None and vec.values.get(first) is not None:
                    row_ages[view] = age = round(max(0.0, now - ts), 3)
                    if sample:
                        self.metrics.age_of[view].observe(age)
            sample = False
            out.append(vec.values)
        return out, ages, None

    async def _score(self, values: list[dict[str, Any]]) -> tuple[Any, str | None]:
        """Model scores for every row, or None and the cause of the fallback."""
        if not self.model_breaker.allow():
            return None, "breaker_open"
        # the model's float32 input, contract order, defaults for missing (and NaN) values;
        # equal to model_repository.feature_matrix, without a numpy array per column
        x = np.array(
            [
                [d if (v := vals.get(n)) is None or v != v else v for n, d in self._defaults]
                for vals in values
            ],
            dtype=np.float32,
        )
        try:
            scores = await self.call_model(x)
        except TimeoutError:
            self.model_breaker.failure("deadline")
            return None, "model_deadline"
        except Exception as e:
            self.model_breaker.failure(type(e).__name__)
            self._log(logging.WARNING, "model_error", type(e).__name__, error=first_line(e))
            return None, "model_error"
        self.model_breaker.success()
        return scores, None

    async def call_model(self, x: np.ndarray) -> np.ndarray:
        """The backend's scores for ``x``; TimeoutError past the model budget (a remote
        call is cut there; an in-process one, which cannot be cut, is judged by its time)."""
        t0 = time.perf_counter()
        if self.backend.in_process:
            scores = await self.backend.predict(x)
        else:
            scores = await asyncio.wait_for(self.backend.predict(x), self._model_s)
        if time.perf_counter() - t0 > self._model_s:
            raise TimeoutError
        return scores

    def _answers(
        self,
        rows: list[dict[str, Any]],
        values: list[dict[str, Any]] | None,
        ages: list[dict[str, float | None]],
        scores: Any,
        cause: str | None,
    ) -> list[dict[str, Any]]:
        s, m, record = self.settings, self.metrics, self.recording
        name, version = self.meta.model_name, self.meta.version
        if cause is not None and record:
            self._log(logging.WARNING, "fallback", cause, cause=cause, rows=len(rows))
        out = []
        for i, row in enumerate(rows):
            vals = values[i] if values is not None else {}
            missing = [n for n in self._names if vals.get(n) is None]
            why = self.policy.reasons(vals)
            if scores is not None:
                p: float | None = float(scores[i])
                verdict = decision.decide(p, s.review_threshold, s.decline_threshold)
            else:
                p, verdict = None, self.policy.fallback(vals, row["amount"])
                why = [f"fallback:{cause}", *why]
            if record:
                m.count(verdict, p is None, cause, missing)
            out.append(
                {
                    "score": p,
                    "decision": verdict,
                    "reasons": why,
                    "fallback": p is None,
                    "model": name,
                    "model_version": version,
                    "missing_features": missing,
                    "feature_age_s": ages[i],
                    "latency_ms": {},
                }
            )
        return out
