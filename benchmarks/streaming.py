"""Streaming throughput and freshness: the hotpath flow vs Bytewax's built-in windowing, and
the flow on Redis Streams next to Kafka.

    .venv/bin/python -m benchmarks.streaming [--events 600000] [--rate 5000] [--seconds 20]
        [--naive-events 30000] [--source-events 40000] [--no-kafka] [--freshness-only]

Against a real redis-server it starts on a free loopback port (the redis profile), and
librdkafka's mock Kafka cluster (3 brokers hosted by kcat: a real Kafka-protocol server in
another process, not Apache Kafka; topics get 4 partitions), with every streamed view the
repo declares (all key groups: user, merchant, user x merchant):

1. throughput, one Bytewax worker, file replay as fast as possible, in this process:
   (i) the hotpath flow writing the online store; (ii) the same plus offline appends;
   (iii) the naive baseline: Bytewax's ``fold_window`` over the same declarations (per key
   group and window, sliding windows: 5 min tumbling, 1 h by 5 min, 24 h by 1 h), results
   written to the same Redis (on the first ``--naive-events`` events only: it is that slow);
2. per source, ``hotpath stream`` in its own process (one worker, online only, lateness
   300 s: Kafka partitions interleave): throughput with ``--source-events`` payments (their
   times spread over the last minute, so every row is within its view's TTL) queued in the
   Redis stream / the topic (keyed by user over 4 partitions, as ``hotpath replay``
   produces) before the flow starts, events/s counted by the flow's ``/metrics`` from the
   first one seen to the last (start-up excluded); then freshness at a steady ``--rate``
   for ``--seconds``: ``hotpath replay --to redis|kafka`` produces while the flow reads,
   lag = from the entry id time (Redis) / the message's produce time (Kafka) to its row in
   the online store, p50/p99 interpolated from the flow's Prometheus histogram (as
   ``histogram_quantile`` does).

The naive flow's freshness is not measured: its values appear when a window closes,
i.e. up to the hop (5 min for the 1-h window) after the event, by construction.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import bytewax.operators.windowing as win
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import redis
import requests
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import run_main

from benchmarks.feature_retrieval import backfilled_project
from pipelines import contract, store
from pipelines.contract import event_rules
from pipelines.generate import GenerateConfig, generate
from pipelines.settings import DEFAULT_REPO, Settings
from pipelines.stream import metrics
from pipelines.stream.aggregates import key_groups
from pipelines.stream.events import Event, parse
from pipelines.stream.flow import StreamSettings, build_flow
from pipelines.stream.kafka import cluster_metadata
from pipelines.stream.replay import replay, to_kafka, to_stream
from pipelines.stream.sources import FileReplaySource
from tests.helpers import (
    MockKafka,
    ServerError,
    free_port,
    hotpath,
    hotpath_popen,
    start_mock_kafka,
    start_redis_server,
    stop,
)


def _events_in() -> float:
    return metrics.EVENTS_IN._value.get()


def hotpath_throughput(s: Settings, events: Path, offline: bool) -> tuple[int, float]:
    flow = build_flow(s, StreamSettings(source="file", file=events, offline=offline))
    before = _events_in()
    t0 = time.perf_counter()
    run_main(flow, epoch_interval=timedelta(seconds=2))
    return int(_events_in() - before), time.perf_counter() - t0


class _RedisHashSink(DynamicSink):
    """The naive flow's window results, one HSET each, pipelined per batch."""

    def __init__(self, url: str) -> None:
        self.url = url

    def build(self, step_id: str, worker_index: int, worker_count: int):
        client = redis.Redis.from_url(self.url)

        class _Part(StatelessSinkPartition):
            def write_batch(self, items: list) -> None:
                pipe = client.pipeline(transaction=False)
                for user, (window_id, value) in items:
                    pipe.hset(f"naive:{user}", mapping={f"{step_id}:{window_id}": repr(value)})
                pipe.execute()

        return _Part()


def naive_throughput(events: Path, redis_url: str) -> tuple[int, float]:
    """Bytewax's own windowing over the same declarations: per key group and window ``W``, a
    ``fold_window`` sliding by ``min(W, max(5 min, W / 24))`` (a 5-min window tumbles, 1 h
    slides by 5 min, 24 h by 1 h) that keeps its events and computes every aggregation of
    that window when it closes."""
    rules = event_rules(DEFAULT_REPO)
    source = FileReplaySource(events, rules.fields)
    flow = Dataflow("naive_windows")
    raw = op.input("events", flow, source)
    parsed = op.filter_map(
        "parse", raw, lambda r: e if isinstance(e := parse(r[0], r[1], rules), Event) else None
    )
    clock = win.EventClock(
        lambda e: datetime.fromtimestamp(e.ts_us / 1e6, UTC), wait_for_system_duration=timedelta(0)
    )
    align = datetime(2020, 1, 1, tzinfo=UTC)
    sink = _RedisHashSink(redis_url)
    reduce = {
        "count": len,
        "sum": sum,
        "mean": lambda v: sum(v) / len(v) if v else None,
        "max": lambda v: max(v, default=None),
        "min": lambda v: min(v, default=None),
        "count_distinct": lambda v: len(set(v)),
    }
    views = [v for v in contract.computed_views(DEFAULT_REPO) if v.streamed]
    for group in key_groups(views):
        name = group.name.replace("+", "_")
        keyed = op.key_on(f"by_{name}", parsed, group.key)
        for w_us in sorted({a.window_us for a in group.aggs}):
            aggs = [a for a in group.aggs if a.window_us == w_us]
            window = timedelta(microseconds=w_us)
            hop = min(window, max(timedelta(minutes=5), window / 24))
            folded = win.fold_window(
                f"{name}_{w_us}", keyed, clock, win.SlidingWindower(window, hop, align),
                list, lambda acc, e: acc.append(e) or acc,
                lambda a, b: a + b,
            )  # fmt: skip

            def result(kv: tuple[str, Any], aggs: list = aggs) -> tuple[str, Any]:
                key, (window_id, evs) = kv
                return key, (
                    window_id,
                    tuple(reduce[a.function]([getattr(e, a.column) for e in evs]) for a in aggs),
                )

            op.output(f"out_{name}_{w_us}", op.map(f"agg_{name}_{w_us}", folded.down, result), sink)
    counted = [0]

    def count(_: object) -> None:
        counted[0] += 1

    op.inspect("count", parsed, lambda _s, _e: count(None))
    t0 = time.perf_counter()
    run_main(flow, epoch_interval=timedelta(seconds=2))
    return counted[0], time.perf_counter() - t0


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus ``histogram_quantile``: linear within the bucket holding rank q."""
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-9)
        prev_le, prev_count = le, count
    return prev_le


def scrape_lag(port: int) -> tuple[list[tuple[float, float]], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    buckets, count = [], 0.0
    for line in text.splitlines():
        if line.startswith("hotpath_stream_lag_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
        elif line.startswith("hotpath_stream_lag_seconds_count"):
            count = float(line.rsplit(" ", 1)[1])
    return sorted(buckets), count


def _as_live(events: Path, n: int, out: Path) -> Path:
    """The first ``n`` events with their times spread over the last minute: rows older than
    a view's TTL are not written (by design), so replaying week-old events would measure
    nothing."""
    table = ds.dataset(events, partitioning="hive").to_table().sort_by("event_timestamp")
    table = table.slice(0, n)
    ts = table.column("event_timestamp").to_pandas()
    span = max((ts.iloc[-1] - ts.iloc[0]).total_seconds(), 1e-6)
    now = pd.Timestamp.now(tz="UTC")
    live = now - pd.Timedelta(seconds=60) + (ts - ts.iloc[0]) * (60 / span)
    i = table.schema.get_field_index("event_timestamp")
    table = table.set_column(
        i, table.schema.field(i), pa.array(live.dt.as_unit("us"), type=table.schema.field(i).type)
    )
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "part.parquet")
    return out


def report(name: str, n: int, seconds: float) -> float:
    print(f"  {name:<42} {n / seconds:9,.0f} events/s ({n:,} in {seconds:.1f}s)")
    return n / seconds


def events_seen(port: int) -> float:
    """Events the flow has taken in: valid ones plus those refused (not the late ones,
    which are valid events and counted as such)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("hotpath_stream_events_total ")
        or (line.startswith("hotpath_stream_dead_letters_total{") and 'reason="late"' not in line)
    )


@contextmanager
def stream_process(s: Settings, source: list[str], epoch_s: float) -> Iterator[int]:
    """``hotpath stream`` on ``source`` in its own process, once its metrics answer; their
    port. The online store starts empty (the Redis streams live in another database)."""
    redis.Redis.from_url(s.redis_url).flushdb()
    port = free_port()
    env = {
        "HOTPATH_REPO": str(s.repo),
        "HOTPATH_PROFILE": "redis",
        "HOTPATH_REDIS_URL": s.redis_url,
    }
    proc = hotpath_popen(
        "stream", *source, "--no-offline", "--metrics-port", str(port),
        "--snapshot-interval", str(epoch_s), "--lateness", "300",
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                events_seen(port)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"hotpath stream {' '.join(source)} did not start") from None
                time.sleep(0.1)
        yield port
    finally:
        stop(proc, timeout=30)


def until(port: int, n: int, timeout: float = 180) -> tuple[float, float, float]:
    """Poll the flow's event count until it reaches ``n``: (first count seen above 0, its
    time, the time it reached ``n``)."""
    first = t0 = None
    deadline = time.monotonic() + timeout
    while True:
        seen, now = events_seen(port), time.monotonic()
        if seen and first is None:
            first, t0 = seen, now
        if seen >= n:
            assert first is not None and t0 is not None
            return first, t0, now
        if now > deadline:
            raise RuntimeError(f"only {seen:,.0f} of {n:,} events after {timeout:.0f}s")
        time.sleep(0.05)


def source_throughput(s: Settings, source: list[str], n: int, epoch_s: float) -> float:
    """Events/s of ``hotpath stream`` over ``n`` events already queued in its source."""
    with stream_process(s, source, epoch_s) as port:
        first, t0, t1 = until(port, n)
    return (n - first) / max(t1 - t0, 1e-9)


def source_freshness(
    s: Settings, source: list[str], to: list[str], live: Path, n: int, rate: float,
    epoch_s: float, streams_url: str,
) -> tuple[float, float, float]:  # fmt: skip
    """(p50, p99 in ms, rows written) while ``hotpath replay`` sends ``n`` events at ``rate``."""
    with stream_process(s, source, epoch_s) as port:
        before = events_seen(port)
        env = {"HOTPATH_REPO": str(s.repo), "HOTPATH_REDIS_URL": streams_url}
        r = hotpath("replay", *to, "--rate", str(rate), "--limit", str(n), "--file", live, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"hotpath replay failed: {r.stderr[-2000:]}")
        until(port, int(before) + n, timeout=120)
        time.sleep(1)
        buckets, count = scrape_lag(port)
    return quantile(0.5, buckets) * 1000, quantile(0.99, buckets) * 1000, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=600_000)
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument(
        "--naive-events", type=int, default=30_000, help="the baseline is slow: its first N events"
    )
    parser.add_argument(
        "--source-events",
        type=int,
        default=40_000,
        help="queued per source for its throughput (at most ~45,000: the mock Kafka cluster "
        "keeps ~5 MB a partition)",
    )
    parser.add_argument("--epoch", type=float, default=2.0, help="the stream's epoch (seconds)")
    parser.add_argument("--no-kafka", action="store_true", help="Redis Streams only")
    parser.add_argument("--freshness-only", action="store_true", help="skip the throughput runs")
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    root = Path(tempfile.mkdtemp(prefix="hotpath-stream-bench-"))
    shutil.copytree(
        DEFAULT_REPO, root / "feature_repo", ignore=shutil.ignore_patterns("__pycache__")
    )
    kafka: MockKafka | None = None
    try:
        redis_proc, url = start_redis_server(root)
        kafka = None if args.no_kafka else start_mock_kafka(root)
    except ServerError as e:
        sys.exit(str(e))
    try:
        s = Settings(repo=root / "feature_repo", profile="redis", redis_url=url)
        backfilled_project(s, 30_000, 1)  # the registry's offline sources must exist
        fs = store.open_store(s)
        store.apply(fs)
        big = generate(
            GenerateConfig(rows=args.events, days=7, end=datetime.now(UTC)), root / "events"
        )
        events = root / "events" / "transactions"
        print(f"{big.transactions:,} events, {big.users:,} users, one Bytewax worker, Redis online")
        naive = None
        if not args.freshness_only:
            ours = report(
                "(i)   hotpath flow, online writes", *hotpath_throughput(s, events, False)
            )
            report("(ii)  hotpath flow, online + offline", *hotpath_throughput(s, events, True))
            first = root / "first" / "transactions"
            table = ds.dataset(events, partitioning="hive").to_table().sort_by("event_timestamp")
            first.mkdir(parents=True)
            pq.write_table(table.slice(0, args.naive_events), first / "part.parquet")
            naive = report(
                "(iii) naive Bytewax windowing (baseline)", *naive_throughput(first, url)
            )
            print(f"  hotpath vs naive throughput: {ours / naive:.1f}x")
        per_source(s, kafka, events, args, naive)
    finally:
        if kafka is not None:
            kafka.stop()
        stop(redis_proc)
        shutil.rmtree(root, ignore_errors=True)


def per_source(
    s: Settings, kafka: MockKafka | None, events: Path, args: argparse.Namespace,
    naive: float | None,
) -> None:  # fmt: skip
    """Redis Streams and Kafka side by side: throughput (``--source-events`` queued) and
    freshness at ``--rate``, each ``hotpath stream`` in its own process."""
    n_fresh = int(args.rate * args.seconds)
    live = _as_live(events, max(args.source_events, n_fresh), events.parent.parent / "live" / "tx")
    fields = event_rules(s.repo).fields
    streams_url = s.redis_url.rsplit("/", 1)[0] + "/1"  # the streams' database: never flushed
    sources = {"redis streams": (["--source", "redis", "--source-redis-url", streams_url], "tx")}
    replay(to_stream(streams_url, "tx"), live, fields, limit=args.source_events)
    if kafka is not None:
        brokers = ",".join(kafka.brokers)
        sources["kafka"] = (["--source", "kafka", "--brokers", brokers], "transactions")
        replay(to_kafka(kafka.brokers, "transactions", fields[0]), live, fields,
               limit=args.source_events)  # fmt: skip
        cluster_metadata(kafka.brokers, "fresh")  # the freshness topic (auto-created)
    print(
        f"per source: hotpath stream in its own process, one worker, lateness 300 s; "
        f"throughput over {args.source_events:,} queued events, freshness at "
        f"{args.rate:,.0f} events/s for {args.seconds:.0f}s"
    )
    rates = {}
    for name, (source, queue) in sources.items():
        at = ["--streams", queue] if name == "redis streams" else ["--topics", queue]
        rates[name] = source_throughput(s, [*source, *at], args.source_events, args.epoch)
        if name == "redis streams":
            fresh_at, to = ["--streams", "fresh"], ["--to", "redis", "--stream", "fresh"]
        else:
            fresh_at = ["--topics", "fresh"]
            to = ["--to", "kafka", "--brokers", ",".join(kafka.brokers), "--topic", "fresh"]
        p50, p99, rows = source_freshness(
            s, [*source, *fresh_at], to, live, n_fresh, args.rate, args.epoch, streams_url
        )
        vs = f", {rates[name] / naive:6.1f}x naive" if naive else ""
        print(
            f"  {name:<14} {rates[name]:9,.0f} events/s{vs}; freshness p50 {p50:5.1f} ms, "
            f"p99 {p99:6.1f} ms ({rows:,.0f} rows)"
        )
    if "kafka" in rates:
        print(
            f"  kafka vs redis streams throughput: {rates['kafka'] / rates['redis streams']:.2f}x"
        )


if __name__ == "__main__":
    main()
