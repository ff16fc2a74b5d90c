"""The flow's Prometheus metrics, served by each process on ``--metrics-port`` (+ its index)."""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from itertools import accumulate

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    start_http_server,
    values,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# Feast's import sets PROMETHEUS_MULTIPROC_DIR, which makes every metric created afterwards
# a locked write to a memory-mapped file; the flow's values live in this process's memory
# (each process serves its own port), as serving's do.
values.ValueClass = values.MutexValue

EVENTS_IN = Counter("hotpath_stream_events_total", "Valid events read")
LATE = Counter("hotpath_stream_late_events_total", "Events later than the allowed lateness")
DEAD_LETTERS = Counter(
    "hotpath_stream_dead_letters_total", "Events sent to the dead-letter output", ["reason"]
)
WRITES = Counter("hotpath_stream_writes_total", "Rows written", ["store"])
EXPIRED = Counter(
    "hotpath_stream_expired_rows_total",
    "Rows not written online: already older than the view's TTL",
    ["view"],
)
KEYS = Gauge(
    "hotpath_stream_keys",
    "Keys holding window state (idle ones are evicted)",
    ["step"],
)


class BatchHistogram:
    """A Prometheus histogram fed a batch of observations at once: the stream observes one
    lag per row written, and ``Histogram.observe`` (a lock and a bucket search in Python
    per row) was 2-3 % of the flow's time. Exposed as any histogram is (``_bucket``,
    ``_sum``, ``_count``)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: tuple[float, ...],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        if list(buckets) != sorted(set(buckets)) or math.inf in buckets:
            raise ValueError(f"{name}: bucket bounds must be finite and increasing")
        self.name, self.documentation, self.registry = name, documentation, registry
        self.bounds = [*buckets, math.inf]
        self.counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self.total = 0.0
        self._lock = threading.Lock()  # the flow's workers and the scrape's thread
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        bounds, counts, total = self.bounds, [0] * len(self.bounds), 0.0
        for v in values:
            counts[bisect_left(bounds, v)] += 1  # the first bucket with v <= its bound
            total += v
        with self._lock:
            self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
            self.total += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative, total = list(accumulate(self.counts)), self.total
        yield HistogramMetricFamily(
            self.name,
            self.documentation,
            buckets=[(floatToGoString(b), c) for b, c in zip(self.bounds, cumulative, strict=True)],
            sum_value=total,
        )


LAG = BatchHistogram(
    "hotpath_stream_lag_seconds",
    "From an event entering the stream to its row in the online store",
    buckets=(
        0.001,
        0.002,
        0.003,
        0.005,
        0.0075,
        0.01,
        0.015,
        0.02,
        0.03,
        0.05,
        0.075,
        0.1,
        0.15,
        0.2,
        0.3,
        0.5,
        1,
        2.5,
        5,
        10,
    ),  # fmt: skip
)


def serve(port: int) -> None:
    start_http_server(port, addr="127.0.0.1")


def _total(counter: Counter, **labels: str) -> float:
    """A counter's value in this process (summed over the label values not given), read
    through the public collector API."""
    return sum(
        s.value
        for m in counter.collect()
        for s in m.samples
        if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items())
    )


def totals() -> dict[str, float]:
    """What this process's flow did: events in, online writes, offline rows, late events,
    dead letters."""
    return {
        "events": _total(EVENTS_IN),
        "online": _total(WRITES, store="online"),
        "offline": _total(WRITES, store="offline"),
        "late": _total(LATE),
        "dead_letters": _total(DEAD_LETTERS),
    }
