"""From requests to predictions: features, model, decision — for every request waiting.

Concurrent requests are coalesced: each request queues its rows and awaits; one drain
task takes everything queued, reads the store once (one round trip per tier for the
whole batch) and calls the model once, then answers each request. Under load batches
grow by themselves (what waits while one batch runs forms the next), so the per-request
cost falls as load rises instead of queueing delay growing — the same idea as Triton's
dynamic batching, applied to the store read and the HTTP service too.

Batches that would stay small wait a moment for company (``coalesce_wait_ms`` at most,
Nagle's idea): when requests are about to arrive — in flight in the HTTP layer, or from
clients answered moments ago that ask again at once (``admission.company``) — the drain
waits until they are queued or the wait is over. At a few requests per worker, that is
a round trip and a model call for several requests instead of one or two, which is most
of a request's cost; an overloaded worker never waits (its batches fill by themselves),
and a worker whose waits keep running out stops waiting for a while (clients that do not
ask again at once gain nothing from it).

Budgets: a request still waiting ``queue_budget_ms`` after it arrived is shed (503,
never a fallback, never counted against a backend); the store read and the model call
each have their own budget, and only they move the breakers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving import decision
from serving.errors import first_line
from serving.logs import Throttled
from serving.metrics import ModelMetrics
from serving.model_backend import ModelBackend
from serving.model_repository import ModelMetadata
from serving.online_features import OnlineFeatures, Served
from serving.prediction_cache import PredictionCache
from serving.resilience import CircuitBreaker
from serving.served_log import Answered, ModelLog
from serving.settings import ServingSettings
from serving.shadow import Shadow

MISSES_BEFORE_PAUSE = 3  # waits in a row that ran out before the company came
PAUSE_S = 0.1  # then no waiting this long
NON_FINITE = "model_error"  # a row's fallback cause when the model gave it no finite score


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Shed(Exception):
    """The request waited past its queue budget: answer 503 + Retry-After."""


@dataclass(slots=True)
class _Job:
    rows: list[dict[str, Any]]
    arrival: float
    future: asyncio.Future[Answers]


class Scorer:
    """Scores rows (entity keys + request fields) with one model, coalescing requests."""

    def __init__(
        self,
        settings: ServingSettings,
        features: OnlineFeatures,
        meta: ModelMetadata,
        backend: ModelBackend,
        metrics: ModelMetrics,
        policy: decision.Policy,
        company: Callable[[float], int] = lambda _: 0,
    ) -> None:
        self.settings, self.features, self.meta = settings, features, meta
        self.policy = policy
        self.backend, self.metrics = backend, metrics
        name = meta.model_name
        self.store_breaker = CircuitBreaker("online_store", settings.breaker_failures, name)
        self.model_breaker = CircuitBreaker("model", settings.breaker_failures, name)
        self.store_empty: list[str] = []  # views not materialized (the monitor keeps it)
        self.recording = True  # off during warm-up: dummy requests are not traffic
        self._queue: list[_Job] = []
        self._drainer: asyncio.Task[None] | None = None
        self._company_of = company  # requests expected shortly (see admission.company)
        self._wait_s = max(0.0, settings.coalesce_wait_ms / 1000)
        self._limit = settings.max_in_flight
        self._company: asyncio.Future[None] | None = None  # resolved once _wanted are queued
        self._wanted = 0
        self._misses = 0  # waits in a row that ran out
        self._no_wait_until = 0.0
        self._names = meta.feature_names
        self._defaults = [(f.name, f.default) for f in meta.features]
        self._fill = np.array([d for _, d in self._defaults], dtype=np.float64)
        # reason rules over request fields get them too (fallback rules always do)
        self._with_request = bool(policy.reason_fields & {f.name for f in meta.request})
        self._policy_fields = sorted(policy.fields)
        self._queue_s = settings.queue_budget_ms / 1000
        self._max_rows = settings.max_batch
        self._features_s = settings.features_budget_ms / 1000
        self._model_s = settings.model_budget_ms / 1000
        self._log = Throttled()  # request-path events: a line per kind per interval
        self.served_log: ModelLog | None = None  # set by the app when logging is on
        self.cache: PredictionCache | None = None  # set by the app when declared
        self.shadow: Shadow | None = None  # a candidate scoring a copy (serving.shadow)

    def backlogged(self) -> bool:
        """Has the oldest queued request waited half its queue budget? (Then new arrivals
        are refused at admission: they would only be shed later.)"""
        q = self._queue
        return bool(q) and time.perf_counter() - q[0].arrival > self._queue_s / 2

    def idle(self) -> bool:
        """Nothing queued or being scored (a replaced version may be released)."""
        return not self._queue and self._drainer is None

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

    async def predict(self, rows: list[dict[str, Any]], arrival: float) -> Answers:
        """One prediction per row (a dict shaped like ``schemas.Prediction``); raises
        :class:`Shed` when the request waited past its budget."""
        loop = asyncio.get_running_loop()
        job = _Job(rows, arrival, loop.create_future())
        self._queue.append(job)
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        elif self._company is not None and len(self._queue) >= self._wanted:
            _resolve(self._company)  # the company has come
        return await job.future

    async def _drain(self) -> None:
        try:
            while self._queue:
                if self._wait_s:
                    await self._wait_for_company()
                jobs: list[_Job] = []
                size, limit = 0, self._max_rows
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

    async def _wait_for_company(self) -> None:
        """Until the requests expected shortly are queued, ``coalesce_wait_ms`` at most."""
        now = time.perf_counter()
        if now < self._no_wait_until:
            return
        wanted = min(self._company_of(self._wait_s), self._limit)
        q = self._queue
        if len(q) >= wanted or sum(len(j.rows) for j in q) >= self._max_rows:
            return
        loop = asyncio.get_running_loop()
        self._wanted = wanted
        self._company = company = loop.create_future()
        timer = loop.call_later(self._wait_s, _resolve, company)
        try:
            await company
        finally:
            timer.cancel()
            self._company = None
        if len(self._queue) >= wanted:
            self._misses = 0
            return
        self._misses += 1
        if self._misses >= MISSES_BEFORE_PAUSE:  # company does not come: stop waiting a while
            self._misses = 0
            self._no_wait_until = time.perf_counter() + PAUSE_S

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
        read_at = time.time()  # the instant the features are computed and judged at
        got, store_cause = self._read(rows, read_at)
        t1 = time.perf_counter()
        served = mask = scores = None
        cause = store_cause
        if got is not None:
            served = self._served(got)
            mask = np.isnan(served)
            scores, cause = await self._score(served, mask)
        t2 = time.perf_counter()
        batch = _Scored(self, rows, got, mask, scores, cause)
        t3 = time.perf_counter()
        m, record = self.metrics, self.recording
        if record:  # (breaker states: the health monitor publishes them)
            m.observe_batch(len(rows), t1 - t0, t2 - t1, t3 - t2)
        at = 0
        for job in live:
            latency = {
                "queue": round((t0 - job.arrival) * 1000, 3),
                "features": round((t1 - t0) * 1000, 3),
                "model": round((t2 - t1) * 1000, 3),
                "total": round((t3 - job.arrival) * 1000, 3),
            }
            if record:
                m.request.observe(t3 - job.arrival)
            if not job.future.done():
                job.future.set_result(Answers(batch, at, len(job.rows), latency))
            at += len(job.rows)
        if record and self.served_log is not None:  # queued as built: the writer does the rest
            sizes, arrivals = [len(j.rows) for j in live], [j.arrival for j in live]
            asyncio.get_running_loop().call_soon(  # once the answers are on their way
                self.served_log.submit,
                Answered(
                    rows,
                    sizes,
                    arrivals,
                    got.values if got is not None else None,
                    served,
                    got.ages if got is not None else None,
                    scores,
                    batch.decisions,
                    read_at,
                    t3,
                ),
            )

    def _read(self, rows: list[dict[str, Any]], now: float) -> tuple[Served | None, str | None]:
        """Served values (TTL applied) and per-view ages as of ``now`` (epoch seconds), or
        None and the cause."""
        if self.store_empty:
            return None, "online_store_not_materialized"
        if not self.store_breaker.allow():
            return None, "online_store_breaker_open"
        t0 = time.perf_counter()
        # Inline: one local round trip for the whole batch, cheaper than a thread hop. The
        # store's socket timeout is the features budget, so a hung store can't hold the
        # loop longer, and the breaker stops asking after a few misses.
        try:
            got = self.features.read_served(rows, now)
        except (TimeoutError, BlockingIOError):
            self.store_breaker.failure("timeout")
            return None, "online_store_deadline"
        except Exception as e:  # a store outage must not fail the request
            self.store_breaker.failure(type(e).__name__)
            self._log(logging.WARNING, "store_error", type(e).__name__, error=first_line(e))
            return None, "online_store_error"
        if time.perf_counter() - t0 > self._features_s:
            self.store_breaker.failure("slow")
            return None, "online_store_deadline"
        self.store_breaker.success()
        if self.recording and rows:  # ages go to the metric for one row per batch (a sample)
            for view, col in got.ages.items():
                if col[0] is not None:
                    self.metrics.age_of[view].observe(col[0])
        return got, None

    async def _score(self, served: np.ndarray, missing: np.ndarray) -> tuple[Any, str | None]:
        """Model scores for every row of ``served`` (see :meth:`_served`; ``missing``: its
        NaNs), or None and the cause of the fallback."""
        if not self.model_breaker.allow():
            return None, "breaker_open"
        x = (np.where(missing, self._fill, served) if missing.any() else served).astype(np.float32)
        try:
            if self.cache is None:
                scores = await self.call_model(x)
            else:  # only the rows not cached (nor being scored) reach the model
                scores = await self.cache.scores(x, self.call_model)
        except TimeoutError:
            self.model_breaker.failure("deadline")
            return None, "model_deadline"
        except Exception as e:
            self.model_breaker.failure(type(e).__name__)
            self._log(logging.WARNING, "model_error", type(e).__name__, error=first_line(e))
            return None, "model_error"
        self.model_breaker.success()  # it answered: a row it gave no number is that row's
        scored = np.isfinite(scores)
        if not scored.all():  # NaN meets no threshold (it would read as the lowest band):
            scores = np.where(scored, scores, np.nan)  # those rows fall back, alone
            self._log(logging.WARNING, "non_finite_score", rows=int((~scored).sum()))
            x, scored_only = x[scored], scores[scored]
        else:
            scored_only = scores
        if self.shadow is not None and self.recording and len(x):  # scored off this path
            self.shadow.submit(x, scored_only)
        return scores, None

    def _served(self, got: Served) -> np.ndarray:
        """The served values in the model's contract order, float64, NaN where a value is
        missing (None, NaN or absent): what the model is given before defaults, what the
        answers call missing and what the served-vector log records, built once from the
        columns in one call. The defaults filled in, it equals
        model_repository.feature_matrix."""
        cols = got.values
        try:
            picked = [cols[n] for n in self._names]
        except KeyError:  # a contract feature the service lacks: it is missing
            absent = (None,) * got.n
            picked = [cols.get(n, absent) for n in self._names]
        try:
            by_feature = np.array(picked, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):  # a value that is no number (a bad writer)
            picked = [self._numbers(n, c, got) for n, c in zip(self._names, picked, strict=True)]
            by_feature = np.array(picked, dtype=np.float64)
        return np.ascontiguousarray(by_feature.reshape(len(self._names), got.n).T)

    def _numbers(self, name: str, column: Sequence[Any], got: Served) -> Sequence[Any]:
        """``column`` with each value that is no number missing, in ``got`` too, so the
        model gets the default, the answer and the log call it missing and the policy's
        rules see it missing: one bad row must not fail the batch it was coalesced into.
        Logged (a line per feature per interval), naming the feature."""
        clean = tuple(map(_number, column))
        bad = [v for v, c in zip(column, clean, strict=True) if v is not None and c is None]
        if bad:
            example = repr(bad[0])[:80]
            self._log(logging.WARNING, "not_a_number", name, feature=name, rows=len(bad),
                      example=example)  # fmt: skip
        if bad and name in got.values:  # the rest as it was, as the fast path leaves it
            got.values[name] = tuple(
                None if c is None else v for v, c in zip(column, clean, strict=True)
            )
        return clean

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
        if np.shape(scores) != (len(x),):  # a misconfigured backend: a fallback, not a 500
            raise ValueError(f"the model gave {np.shape(scores)} scores for {len(x)} rows")
        return scores


def _number(value: Any) -> float | None:
    """``value`` as a float, or None when it is none or no number."""
    try:
        return value if value is None else float(value)
    except (TypeError, ValueError, OverflowError):
        return None


class _Scored:
    """One coalesced batch as scored: every row's decision and missing features (the
    metrics and the log count them all), and what each answer is built from when it is
    read (:class:`Answers`)."""

    __slots__ = (
        "decisions",
        "_fields",
        "_got",
        "_holes",
        "_meta",
        "_policy",
        "_reasons",
        "_rows",
        "_scores",
        "_views",
        "_with_request",
    )

    def __init__(
        self,
        scorer: Scorer,
        rows: list[dict[str, Any]],
        got: Served | None,
        mask: np.ndarray | None,
        scores: np.ndarray | None,
        cause: str | None,
    ) -> None:
        policy, names, m = scorer.policy, scorer._names, scorer.metrics
        self._rows, self._got, self._scores = rows, got, scores
        self._policy, self._meta, self._with_request = policy, scorer.meta, scorer._with_request
        self._views = scorer.features.view_names
        # the policy's fields that were read, as columns (what reasons and fallbacks see)
        cols = got.values if got is not None else {}
        self._fields = [(f, cols[f]) for f in scorer._policy_fields if f in cols]
        if cause is not None and scorer.recording:
            name = self._meta.model_name
            scorer._log(logging.WARNING, "fallback", cause, cause=cause, model=name, rows=len(rows))
        # missing features: per row with any (NaN in the matrix), and per feature (a count)
        self._holes: dict[int, list[str]] = {}
        if mask is None:  # nothing was read: every feature of every row
            self._holes = {i: list(names) for i in range(len(rows))}
            misses = dict.fromkeys(names, len(rows)) if rows else {}
        else:
            lacking = np.flatnonzero(mask.any(axis=1))
            for i, flags in zip(lacking.tolist(), mask[lacking].tolist(), strict=True):
                self._holes[i] = list(itertools.compress(names, flags))
            misses = {names[j]: int(c) for j, c in enumerate(mask.sum(axis=0).tolist()) if c}
        # the rows without a score (all of them, or those the model gave no number):
        # decided by the fallback rules, with their reasons, now
        if scores is not None:
            self.decisions = policy.decide_all(scores)
            lost = np.flatnonzero(scores != scores).tolist()
            cause = cause or NON_FINITE
        else:
            self.decisions = [""] * len(rows)
            lost = range(len(rows))
        self._reasons: dict[int, list[str]] = {}
        for i in lost:
            vals = self._values(i)
            seen = {**rows[i], **vals}
            self.decisions[i] = policy.fallback(seen)
            why = policy.reasons(seen if self._with_request else vals)
            self._reasons[i] = [f"fallback:{cause}", *why]
        if scorer.recording:  # counted once per batch (see ModelMetrics.count)
            counts: dict[str, int] = {}
            for d in self.decisions:
                counts[d] = counts.get(d, 0) + 1
            verdicts = {(d, False): n for d, n in counts.items()}
            for i in self._reasons:  # the fallbacks' decisions, apart
                d = self.decisions[i]
                verdicts[d, False] -= 1
                verdicts[d, True] = verdicts.get((d, True), 0) + 1
            m.count(verdicts, cause, misses)

    def _values(self, i: int) -> dict[str, Any]:
        """Row ``i``'s values of the fields the policy reads."""
        return {f: col[i] for f, col in self._fields}

    def score(self, i: int) -> float | None:
        return None if self._scores is None or i in self._reasons else float(self._scores[i])

    def answer(self, i: int, latency: dict[str, float]) -> dict[str, Any]:
        """Row ``i``'s answer, shaped like ``schemas.Prediction``."""
        p = self.score(i)
        if i in self._reasons:
            why = self._reasons[i]
        elif self._policy.rules:
            vals = self._values(i)
            why = self._policy.reasons({**self._rows[i], **vals} if self._with_request else vals)
        else:
            why = []
        got = self._got
        return {
            "score": p,
            "decision": self.decisions[i],
            "reasons": why,
            "fallback": p is None,
            "model": self._meta.model_name,
            "model_version": self._meta.version,
            "missing_features": self._holes.get(i) or [],
            "feature_age_s": got.ages_of(i) if got is not None else dict.fromkeys(self._views),
            "latency_ms": latency,
        }

    def scores(self, at: int, n: int) -> list[float | None]:
        """Rows ``at`` to ``at + n``'s scores (None: a fallback), in one C call."""
        if self._scores is None:
            return [None] * n
        got = self._scores[at : at + n].tolist()
        return [s if s == s else None for s in got] if self._reasons else got


class Answers(Sequence[dict[str, Any]]):
    """One request's answers (dicts shaped like ``schemas.Prediction``), each built when
    read: a ranking request returns its best few of 100, so the rest are never built."""

    __slots__ = ("_batch", "_at", "_n", "_latency")

    def __init__(self, batch: _Scored, at: int, n: int, latency: dict[str, float]) -> None:
        self._batch, self._at, self._n, self._latency = batch, at, n, latency

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[dict[str, Any]]:  # (Sequence's raises IndexError to stop)
        answer, at, latency = self._batch.answer, self._at, self._latency
        return (answer(at + i, latency) for i in range(self._n))

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._batch.answer(self._at + i % self._n, self._latency)

    def scores(self) -> list[float | None]:
        """Each answer's score, without building the answers."""
        return self._batch.scores(self._at, self._n)


def best_first(answers: Sequence[dict[str, Any]]) -> list[int]:
    """The answers' indexes by score, best first; a fallback (no score) or a NaN counts as
    0, ties keep the candidates' order."""
    scores = answers.scores() if isinstance(answers, Answers) else [a["score"] for a in answers]
    return sorted(
        range(len(scores)),
        key=lambda i: -s if (s := scores[i]) is not None and s == s else 0.0,  # NaN: as None
    )
