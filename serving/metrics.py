"""The service's Prometheus metrics, with every labelled child resolved once.

``labels()`` costs microseconds per call; on a path that answers in a few hundred of
them, children are looked up at start-up. With several workers every write goes to a
memory-mapped file under a lock, and a dozen of them per request cost an eighth of the
service's CPU; so counters add up in a plain dict and are written by :meth:`flush` (the
health monitor's tick, every ``breaker_probe_s``, and every ``/metrics`` scrape), breaker
states are set there too, and
feature ages are observed for one row per coalesced batch (a sample). Stage latencies are
per batch (``hotpath_batch_rows`` says how large); ``hotpath_request_seconds`` is per
request, from arrival to answer, queueing included.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.resilience import CircuitBreaker

STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
DECISIONS = ("approve", "review", "decline")


class Metrics:
    def __init__(self, features: list[str], views: list[str]) -> None:
        self.registry = r = CollectorRegistry()
        stage = Histogram(
            "hotpath_stage_seconds",
            "Latency per stage, per coalesced batch",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.stages = [stage.labels(s) for s in ("features", "model", "postprocess")]
        self.batch_rows = Histogram(
            "hotpath_batch_rows",
            "Rows scored together (coalesced requests)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.request = Histogram(
            "hotpath_request_seconds",
            "From a request's arrival to its answer",
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        decisions = Counter(
            "hotpath_decisions_total", "Decisions", ["decision", "fallback"], registry=r
        )
        self.decisions = {
            (d, f): decisions.labels(d, str(f).lower()) for d in DECISIONS for f in (True, False)
        }
        self._fallbacks = Counter(
            "hotpath_fallbacks_total", "Fallback decisions", ["cause"], registry=r
        )
        self.fallback_of: dict[str, Counter] = {}
        missing = Counter(
            "hotpath_missing_features_total", "Features served as defaults", ["feature"], registry=r
        )
        self.missing_of = {f: missing.labels(f) for f in features}
        age = Histogram(
            "hotpath_feature_age_seconds",
            "Age of served feature values",
            ["feature_view"],
            buckets=(1, 10, 60, 600, 3600, 86400, 172800),
            registry=r,
        )
        self.age_of = {v: age.labels(v) for v in views}
        breaker = Gauge(
            "hotpath_breaker_state",
            "0 closed, 1 open (the worst over workers)",
            ["breaker"],
            registry=r,
            multiprocess_mode="max",
        )
        self.breaker_of = {b: breaker.labels(b) for b in ("online_store", "model")}
        self.shed = Counter(
            "hotpath_shed_total", "Requests refused with 503", ["reason"], registry=r
        )
        self.shed_of = {w: self.shed.labels(w) for w in ("in_flight", "queue_budget")}
        self.ready = Gauge(
            "hotpath_ready",
            "1 when this worker is ready (the lowest over workers)",
            registry=r,
            multiprocess_mode="min",
        )
        self._pending: defaultdict[Any, float] = defaultdict(float)  # child -> increments
        self.unready = Gauge(
            "hotpath_not_ready",
            "1 per cause keeping the worker out of rotation",
            ["cause"],
            registry=r,
            multiprocess_mode="max",
        )

    def observe_batch(self, rows: int, features: float, model: float, post: float) -> None:
        self.batch_rows.observe(rows)
        for child, seconds in zip(self.stages, (features, model, post), strict=True):
            child.observe(seconds)

    def breakers(self, *breakers: CircuitBreaker) -> None:
        for b in breakers:
            self.breaker_of[b.name].set(b.state.value)

    def count(self, verdict: str, fallback: bool, cause: str | None, missing: list[str]) -> None:
        """One answered row (written at the next :meth:`flush`)."""
        pending = self._pending
        pending[self.decisions[verdict, fallback]] += 1
        if fallback:
            cause = cause or "unknown"
            child = self.fallback_of.get(cause)
            if child is None:
                child = self.fallback_of[cause] = self._fallbacks.labels(cause)
            pending[child] += 1
        for name in missing:
            pending[self.missing_of[name]] += 1

    def flush(self) -> None:
        """Write the counted increments: one write per counter that moved."""
        pending, self._pending = self._pending, defaultdict(float)
        for child, n in pending.items():
            child.inc(n)
