"""Streaming throughput and freshness: the hotpath flow vs Bytewax's built-in windowing.

    .venv/bin/python -m benchmarks.streaming [--events 600000] [--rate 5000] [--seconds 20]

Against a real redis-server it starts on a free loopback port (the redis profile), with
every streamed view the repo declares (all key groups: user, merchant, user x merchant):

1. throughput, one Bytewax worker, file replay as fast as possible, in this process:
   (i) the hotpath flow writing the online store; (ii) the same plus offline appends;
   (iii) the naive baseline: Bytewax's ``fold_window`` over the same declarations (per key
   group and window, sliding windows: 5 min tumbling, 1 h by 5 min, 24 h by 1 h), results
   written to the same Redis (on the first ``--naive-events`` events only: it is that slow);
2. freshness at a steady ``--rate``: ``hotpath replay`` pushes events into a Redis
   stream, ``hotpath stream --source redis`` (its own process) reads them; lag = from
   the stream entry's id time (XADD) to the row written in the online store, p50/p99
   interpolated from the flow's Prometheus histogram (as ``histogram_quantile`` does).

The naive flow's freshness is not measured: its values appear when a window closes,
i.e. up to the hop (5 min for the 1-h window) after the event, by construction.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
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
from pipelines.stream.sources import FileReplaySource
from tests.helpers import ServerError, free_port, hotpath, hotpath_popen, start_redis_server, stop


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


def freshness(s: Settings, events: Path, rate: float, seconds: float, epoch_s: float) -> None:
    env = {
        "HOTPATH_REPO": str(s.repo),
        "HOTPATH_PROFILE": "redis",
        "HOTPATH_REDIS_URL": s.redis_url,
    }
    port = free_port()
    flow = hotpath_popen(
        "stream", "--source", "redis", "--streams", "bench", "--no-offline",
        "--metrics-port", str(port), "--snapshot-interval", str(epoch_s),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                scrape_lag(port)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline or flow.poll() is not None:
                    raise RuntimeError("the stream flow did not start") from None
                time.sleep(0.2)
        n = int(rate * seconds)
        live = _as_live(events, n, events.parent.parent / "live" / "transactions")
        replay = hotpath(
            "replay", "--rate", str(rate), "--stream", "bench", "--limit", str(n),
            "--file", str(live), env=env,
        )  # fmt: skip
        if replay.returncode != 0:
            raise RuntimeError(f"hotpath replay failed: {replay.stderr[-2000:]}")
        client = redis.Redis.from_url(s.redis_url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            group = client.xinfo_groups("bench")[0]
            if group["lag"] == 0 and group["pending"] == 0:
                break
            time.sleep(0.2)
        time.sleep(1)
        buckets, count = scrape_lag(port)
        print(
            f"  freshness at {rate:,.0f} events/s for {seconds:.0f}s ({count:,.0f} rows written): "
            f"p50 {quantile(0.5, buckets) * 1000:.1f} ms, "
            f"p99 {quantile(0.99, buckets) * 1000:.1f} ms"
        )
    finally:
        flow.terminate()
        flow.wait(timeout=30)


def report(name: str, n: int, seconds: float) -> float:
    print(f"  {name:<42} {n / seconds:9,.0f} events/s ({n:,} in {seconds:.1f}s)")
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=600_000)
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument(
        "--naive-events", type=int, default=30_000, help="the baseline is slow: its first N events"
    )
    parser.add_argument("--epoch", type=float, default=2.0, help="the stream's epoch (seconds)")
    parser.add_argument("--freshness-only", action="store_true", help="skip the throughput runs")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="hotpath-stream-bench-"))
    shutil.copytree(
        DEFAULT_REPO, root / "feature_repo", ignore=shutil.ignore_patterns("__pycache__")
    )
    try:
        redis_proc, url = start_redis_server(root)
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
        if args.freshness_only:
            freshness(s, events, args.rate, args.seconds, args.epoch)
            return
        ours = report("(i)   hotpath flow, online writes", *hotpath_throughput(s, events, False))
        report("(ii)  hotpath flow, online + offline", *hotpath_throughput(s, events, True))
        first = root / "first" / "transactions"
        table = ds.dataset(events, partitioning="hive").to_table().sort_by("event_timestamp")
        first.mkdir(parents=True)
        pq.write_table(table.slice(0, args.naive_events), first / "part.parquet")
        naive = report("(iii) naive Bytewax windowing (baseline)", *naive_throughput(first, url))
        print(f"  hotpath vs naive throughput: {ours / naive:.1f}x")
        freshness(s, events, args.rate, args.seconds, args.epoch)
    finally:
        stop(redis_proc)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
