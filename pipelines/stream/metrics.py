"""The flow's Prometheus metrics, served by each process on ``--metrics-port`` (+ its index)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server, values

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
LAG = Histogram(
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
