"""The Kafka path next to Redis Streams and file replay: same events, same flow, same harness.

    .venv/bin/python -m benchmarks.kafka_streaming [--events 40000] [--rate 5000] [--seconds 20]

Kafka is librdkafka's mock cluster (3 brokers, hosted by kcat: a real Kafka-protocol server
in another process, not Apache Kafka; topics get 4 partitions), Redis a real redis-server;
both on loopback, the redis profile's online store. Each run is ``hotpath stream`` in its
own process (one Bytewax worker), every streamed view the repo declares, online only:

1. throughput: ``--events`` payments (their times spread over the last minute, so every
   row is within its view's TTL and written) are in the topic / stream / parquet before
   the flow starts; events/s = events counted by the flow's ``/metrics`` from the first
   one seen to the last (start-up excluded). Kafka twice: keyed by user over 4 partitions
   (as ``hotpath replay`` produces), and all in one partition (the stream's own order, as in
   one Redis stream): the merchant-keyed views then see their events out of order across
   partitions, by up to a consumer batch, and each out-of-order event recomputes the rows
   after it;
2. freshness at a steady ``--rate`` for ``--seconds``: ``hotpath replay --to kafka|redis``
   produces while the flow reads; lag = from the message's produce time (Kafka) / entry id
   time (Redis) to its row in the online store, p50/p99 from the flow's histogram.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import redis
import requests

from benchmarks.feature_retrieval import backfilled_project
from benchmarks.streaming import _as_live, quantile, scrape_lag
from pipelines import store
from pipelines.contract import event_rules
from pipelines.generate import GenerateConfig, generate
from pipelines.settings import DEFAULT_REPO, Settings
from pipelines.stream.kafka import cluster_metadata, producer
from pipelines.stream.replay import replay, to_kafka, to_stream
from pipelines.stream.sources import read_events
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
def flow(s: Settings, source: list[str], epoch_s: float) -> Iterator[int]:
    """``hotpath stream`` on ``source`` in its own process, once its metrics answer; their
    port. The online store starts empty (Redis streams live in another database)."""
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


def throughput(s: Settings, name: str, source: list[str], n: int, epoch_s: float) -> float:
    with flow(s, source, epoch_s) as port:
        first, t0, t1 = until(port, n)
    rate = (n - first) / max(t1 - t0, 1e-9)
    print(f"  {name:<28} {rate:9,.0f} events/s ({n - first:,.0f} events in {t1 - t0:.1f}s)")
    return rate


def freshness(
    s: Settings, name: str, source: list[str], to: list[str], live: Path, n: int, rate: float,
    epoch_s: float, streams: str,
) -> None:  # fmt: skip
    with flow(s, source, epoch_s) as port:
        before = events_seen(port)
        r = hotpath("replay", *to, "--rate", str(rate), "--limit", str(n), "--file", live,
                    env={"HOTPATH_REPO": str(s.repo), "HOTPATH_REDIS_URL": streams})  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"hotpath replay failed: {r.stderr[-2000:]}")
        until(port, int(before) + n, timeout=120)
        time.sleep(1)
        buckets, count = scrape_lag(port)
    print(
        f"  {name:<28} at {rate:,.0f} events/s for {n / rate:.0f}s ({count:,.0f} rows written): "
        f"p50 {quantile(0.5, buckets) * 1000:.1f} ms, p99 {quantile(0.99, buckets) * 1000:.1f} ms"
    )


def one_partition(
    kafka: MockKafka, topic: str, live: Path, fields: tuple[str, ...], n: int
) -> None:
    """The first ``n`` events all in partition 0 of ``topic``: the stream's order, as in one
    Redis stream (the replay keys by user, spreading one merchant's events over partitions)."""
    _, columns = read_events(live, fields, n)
    p = producer(kafka.brokers)
    for i in range(n):
        event = json.dumps({f: columns[f][i] for f in fields}).encode()
        while True:
            try:
                p.produce(topic, event, partition=0)
                break
            except BufferError:  # the local queue is full: let it drain
                p.poll(0.01)
    assert p.flush(60) == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events",
        type=int,
        default=40_000,
        help="at most ~45,000: the mock keeps ~5 MB a partition",
    )
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--epoch", type=float, default=2.0, help="the stream's epoch (seconds)")
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    root = Path(tempfile.mkdtemp(prefix="hotpath-kafka-bench-"))
    shutil.copytree(
        DEFAULT_REPO, root / "feature_repo", ignore=shutil.ignore_patterns("__pycache__")
    )
    kafka: MockKafka | None = None
    try:
        redis_proc, url = start_redis_server(root)
        kafka = start_mock_kafka(root)
    except ServerError as e:
        sys.exit(str(e))
    try:
        s = Settings(repo=root / "feature_repo", profile="redis", redis_url=url)
        backfilled_project(s, 30_000, 1)  # the registry's offline sources must exist
        store.apply(store.open_store(s))
        n_fresh = int(args.rate * args.seconds)
        want = max(args.events, n_fresh)
        # the generator's row count is approximate: ask for more, then take what is needed
        generate(GenerateConfig(rows=want * 6 // 5, days=7, end=datetime.now(UTC)), root / "ev")
        live = _as_live(root / "ev" / "transactions", want, root / "live" / "transactions")
        fields = event_rules(s.repo).fields
        brokers = ",".join(kafka.brokers)
        to_topic = to_kafka(kafka.brokers, "transactions", fields[0])
        n = replay(to_topic, live, fields, limit=args.events).events
        streams = url.rsplit("/", 1)[0] + "/1"  # the streams' database: not flushed per run
        on_streams = ["--source-redis-url", streams]
        replay(to_stream(streams, "tx"), live, fields, limit=args.events)
        cluster_metadata(kafka.brokers, "fresh")  # the freshness topic (auto-created)
        one_partition(kafka, "ordered", live, fields, n)
        print(f"{n:,} events, one Bytewax worker, Redis online store, lateness 300 s")
        print("throughput (everything queued before the flow starts):")
        kafka_rate = throughput(
            s, "kafka (4 partitions)", ["--source", "kafka", "--brokers", brokers],
            n, args.epoch,
        )  # fmt: skip
        throughput(
            s, "kafka (1 partition used)", ["--source", "kafka", "--brokers", brokers,
            "--topics", "ordered"], n, args.epoch,
        )  # fmt: skip
        redis_rate = throughput(
            s, "redis streams", ["--source", "redis", "--streams", "tx", *on_streams],
            n, args.epoch,
        )  # fmt: skip
        file_rows = ["--source", "file", "--file", str(live)]
        throughput(s, "file replay", file_rows, len(pd.read_parquet(live)), args.epoch)
        print(f"  kafka vs redis streams throughput: {kafka_rate / redis_rate:.2f}x")
        print("freshness:")
        freshness(
            s, "kafka", ["--source", "kafka", "--brokers", brokers, "--topics", "fresh"],
            ["--to", "kafka", "--brokers", brokers, "--topic", "fresh"], live, n_fresh,
            args.rate, args.epoch, streams,
        )  # fmt: skip
        freshness(
            s, "redis streams", ["--source", "redis", "--streams", "fresh", *on_streams],
            ["--to", "redis", "--stream", "fresh"], live, n_fresh, args.rate, args.epoch, streams,
        )  # fmt: skip
    finally:
        kafka.stop()
        stop(redis_proc)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
