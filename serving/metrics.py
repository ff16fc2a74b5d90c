"""The service's Prometheus metrics, with every labelled child resolved once.

``labels()`` costs microseconds per call; on a path that answers in a few hundred of
them, children are looked up at start-up. Values live in each worker's memory:
prometheus_client's multiprocess mode makes every write a locked write to a memory-mapped
file, and a dozen per request cost an eighth of the service's CPU. Instead, with several
workers, each saves its whole exposition to the server's metrics folder on the health
monitor's tick (every ``breaker_probe_s``) and a scrape merges the folder
(:func:`merged`: counters and histograms summed, gauges by their rule), so ``/metrics``
shows every worker, the others as of their last tick. Breaker states are set on that
tick too, and feature ages are observed for one row per coalesced batch (a sample).
Stage latencies are per batch (``hotpath_batch_rows`` says how large);
``hotpath_request_seconds`` is per request, from arrival to answer, queueing included.
Every per-model metric carries a ``model`` label.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from serving.resilience import CircuitBreaker

STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


disable_created_metrics()  # creation timestamps: noise, and meaningless once summed
# Importing Feast (feast.metrics, pulled in by FeatureStore) sets PROMETHEUS_MULTIPROC_DIR
# in the environment, which switches prometheus_client to memory-mapped values for every
# metric made afterwards, in this process and in the workers it spawns: the locked file
# writes this module exists to avoid (a tenth of a worker's CPU at load). Values stay in
# memory whatever the environment says.
values.ValueClass = values.MutexValue
# how a gauge combines over workers (default: the worst, max)
GAUGE_RULE: dict[str, Callable[[float, float], float]] = {"hotpath_ready": min}


class Metrics:
    """The service's registry: per-model children (:meth:`model`, a ``model`` label on
    each) and the service-wide ones (admission refusals, readiness)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder  # the server's metrics folder (None: this process only)
        self.registry = r = CollectorRegistry()
        self.stage = Histogram(
            "hotpath_stage_seconds",
            "Latency per stage, per coalesced batch",
            ["model", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "hotpath_batch_rows",
            "Rows scored together (coalesced requests)",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.request = Histogram(
            "hotpath_request_seconds",
            "From a request's arrival to its answer",
            ["model"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "hotpath_decisions_total", "Decisions", ["model", "decision", "fallback"], registry=r
        )
        self.fallbacks = Counter(
            "hotpath_fallbacks_total", "Fallback decisions", ["model", "cause"], registry=r
        )
        self.missing = Counter(
            "hotpath_missing_features_total",
            "Features served as defaults",
            ["model", "feature"],
            registry=r,
        )
        self.age = Histogram(
            "hotpath_feature_age_seconds",
            "Age of served feature values",
            ["model", "feature_view"],
            buckets=(1, 10, 60, 600, 3600, 86400, 172800),
            registry=r,
        )
        self.breaker = Gauge(
            "hotpath_breaker_state",
            "0 closed, 1 open (the worst over workers)",
            ["model", "breaker"],
            registry=r,
        )
        self.shed = Counter(
            "hotpath_shed_total",
            "Requests refused with 503 (model empty: refused at admission, before routing)",
            ["model", "reason"],
            registry=r,
        )
        self.refused = self.shed.labels("", "in_flight")
        self.served_log_rows = Counter(
            "hotpath_served_log_rows_total",
            "Served predictions written to the served-vector log",
            ["model"],
            registry=r,
        )
        self.served_log_dropped = Counter(
            "hotpath_served_log_dropped_total",
            "Served predictions not logged: queue_full (never waited for) or error",
            ["model", "reason"],
            registry=r,
        )
        self.prediction_cache = Counter(
            "hotpath_prediction_cache_total",
            "Rows by prediction-cache outcome: hit, redis_hit, shared (waited for the same row "
            "being scored), miss (sent to the model); error: a Redis cache call failed",
            ["model", "outcome"],
            registry=r,
        )
        self.model_transitions = Counter(
            "hotpath_model_transitions_total",
            "Model version transitions (serving.model_versions) by action (published: a new "
            "version seen by polling; pinned: a pin seen by polling; promote, rollback: a "
            "command) and outcome (served; refused: the old version kept serving)",
            ["model", "action", "outcome"],
            registry=r,
        )
        self.model_serving = Gauge(
            "hotpath_model_serving",
            "1 for the version a model serves (over workers: 1 for each version any serves)",
            ["model", "version"],
            registry=r,
        )
        self.publish_to_serving = Gauge(
            "hotpath_model_publish_to_serving_seconds",
            "From publication to serving, warmed up (the last version picked up by polling)",
            ["model"],
            registry=r,
        )
        self.shadow_rows = Counter(
            "hotpath_shadow_rows_total",
            "Rows a shadow candidate scored (serving.shadow): its decision agreed with the "
            "serving version's or not; dropped (its queue was full); error",
            ["model", "outcome"],
            registry=r,
        )
        self.shadow_diff = Histogram(
            "hotpath_shadow_score_diff",
            "|candidate score - serving score| per row a shadow candidate scored",
            ["model"],
            buckets=(0.0001, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=r,
        )
        self.canary_rows = Counter(
            "hotpath_canary_rows_total",
            "Rows answered while a canary runs (serving.canary), by arm (stable, candidate) "
            "and outcome (ok, fallback, error)",
            ["model", "arm", "outcome"],
            registry=r,
        )
        self.canary_percent = Gauge(
            "hotpath_canary_percent",
            "Share of the entities a canary candidate answers (0: no canary)",
            ["model"],
            registry=r,
        )
        self.ready = Gauge(
            "hotpath_ready",
            "1 when this worker is ready (the lowest over workers)",
            registry=r,
        )
        self.unready = Gauge(
            "hotpath_not_ready",
            "1 per model and cause keeping the worker out of rotation",
            ["model", "cause"],
            registry=r,
        )

    def model(
        self, name: str, features: list[str], views: list[str], decisions: list[str]
    ) -> ModelMetrics:
        return ModelMetrics(self, name, features, views, decisions)

    def save(self) -> None:
        """This worker's values into the folder, for the other workers' scrapes (written
        aside, then renamed: a scrape never reads half a file)."""
        if self.folder is None:
            return
        tmp = self.folder / f".{os.getpid()}.tmp"
        tmp.write_bytes(generate_latest(self.registry))
        tmp.replace(self.folder / f"{os.getpid()}.prom")

    def exposition(self) -> bytes:
        """Prometheus text: every worker's values merged (this one's as of now)."""
        if self.folder is None:
            return generate_latest(self.registry)
        self.save()
        return merged(self.folder)


class ModelMetrics:
    """One model's children of the service's metrics, resolved once."""

    def __init__(
        self, m: Metrics, name: str, features: list[str], views: list[str], decisions: list[str]
    ) -> None:
        self.name = name
        self._m = m
        self.stages = [m.stage.labels(name, s) for s in ("features", "model", "postprocess")]
        self.batch_rows = m.batch_rows.labels(name)
        self.request = m.request.labels(name)
        self.decisions = {
            (d, f): m.decisions.labels(name, d, str(f).lower())
            for d in decisions
            for f in (True, False)
        }
        self.fallback_of: dict[str, Any] = {}
        self.missing_of = {f: m.missing.labels(name, f) for f in features}
        self.age_of = {v: m.age.labels(name, v) for v in views}
        self.breaker_of = {b: m.breaker.labels(name, b) for b in ("online_store", "model")}
        self.shed_of = {"queue_budget": m.shed.labels(name, "queue_budget")}
        self.unready_of = {
            c: m.unready.labels(name, c) for c in ("model", "online_store", "not_materialized")
        }

    def observe_batch(self, rows: int, features: float, model: float, post: float) -> None:
        self.batch_rows.observe(rows)
        for child, seconds in zip(self.stages, (features, model, post), strict=True):
            child.observe(seconds)

    def breakers(self, *breakers: CircuitBreaker) -> None:
        for b in breakers:
            self.breaker_of[b.name].set(b.state.value)

    def count(
        self,
        verdicts: dict[tuple[str, bool], int],
        cause: str | None,
        missing: dict[str, int],
    ) -> None:
        """A batch of answered rows: how many got each decision, by whether it was a
        fallback's (``cause`` is theirs), and how many missed each feature (one increment
        per counter, not per row)."""
        fallbacks = 0
        for (verdict, fallback), n in verdicts.items():
            self.decisions[verdict, fallback].inc(n)
            if fallback:
                fallbacks += n
        if fallbacks:
            cause = cause or "unknown"
            child = self.fallback_of.get(cause)
            if child is None:
                child = self.fallback_of[cause] = self._m.fallbacks.labels(self.name, cause)
            child.inc(fallbacks)
        for name, n in missing.items():
            self.missing_of[name].inc(n)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merged(folder: Path) -> bytes:
    """The workers' saved expositions as one: counters and histograms summed per label
    set, gauges by :data:`GAUGE_RULE` (default max)."""
    families: dict[str, Metric] = {}
    values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for path in sorted(folder.glob("*.prom")):
        for fam in text_string_to_metric_families(path.read_text()):
            family = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
            rule = GAUGE_RULE.get(fam.name, max) if fam.type == "gauge" else operator.add
            for sample in fam.samples:
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                values[key] = rule(values[key], sample.value) if key in values else sample.value
    for (name, sample_name, labels), value in values.items():
        families[name].add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry()
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
