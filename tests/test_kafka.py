"""The streaming flow on Kafka: the declared ``KafkaSource`` read through
``bytewax.connectors.kafka`` from librdkafka's mock cluster (hosted by kcat: a real
Kafka-protocol server in another process, not Apache Kafka; see the README).

Expected values come from ``reference.per_event`` (pandas over the same events), for every
streamed view the registry declares; the events, the stream command and the comparisons are
``test_stream``'s own.
"""

from __future__ import annotations

import json
import pickle
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import redis
import reference
import test_stream
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from helpers import MockKafka, free_port, hotpath_popen, start_mock_kafka
from test_stream import (
    BAD,
    _commit,
    _delivery_order,
    _events,
    _open,
    _payloads,
    _recovery,
    _settings,
    _stream,
    _valid,
    _wait_for,
    _write_events,
)

from pipelines import declared, store
from pipelines.declared import View
from pipelines.settings import Settings, StreamSettings
from pipelines.stream.kafka import DEAD_LETTER_SUFFIX, KafkaTopic, declared_topic
from pipelines.stream.sources import kafka_source

TOPIC = "transactions"  # the declared KafkaSource's topic (feature_repo/data_sources.py)
DEAD_LETTERS = TOPIC + DEAD_LETTER_SUFFIX
PARTITIONS = 4  # what the mock cluster gives an auto-created topic
# events span 3 hours and partitions interleave: nothing is late, whatever the order
LATENESS = str(4 * 3600)
stream_root = test_stream.stream_root  # the fixture: a copy of the backfilled project
CODES = ["malformed", "missing_field", "bad_type", "bad_amount", "future_timestamp"]  # BAD's


@pytest.fixture
def kafka(tmp_path: Path) -> Iterator[MockKafka]:
    """A fresh mock cluster per test (it starts in milliseconds): its topics are the test's."""
    cluster = start_mock_kafka(tmp_path)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def kafka_root(stream_root: Path, redis_url: str) -> Path:
    """``test_stream``'s project copy with its registry applied once for this module."""
    _open(_settings(stream_root, redis_url, 12))
    return stream_root


def _fresh(root: Path, redis_url: str, db: int) -> tuple[Settings, Any]:
    """Settings on Redis database ``db``, emptied, and their store (already applied)."""
    s = _settings(root, redis_url, db)
    redis.Redis.from_url(s.redis_url).flushdb()
    return s, store.open_store(s)


def _produce(kafka: MockKafka, payloads: list) -> list[str]:
    """Each payload produced to the topic (a JSON object keyed by its user, as the replay
    does; bytes as they are, unkeyed); the source id of each (``topic:partition:offset``)."""
    producer = Producer({"bootstrap.servers": ",".join(kafka.brokers), "linger.ms": 5})
    ids: dict[int, str] = {}
    for i, p in enumerate(payloads):
        raw = p if isinstance(p, bytes) else json.dumps(p).encode()
        key = str(p["user_id"]).encode() if isinstance(p, dict) and "user_id" in p else None

        def done(err, msg, i=i) -> None:
            assert err is None, err
            ids[i] = f"{msg.topic()}:{msg.partition()}:{msg.offset()}"

        producer.produce(TOPIC, raw, key, on_delivery=done)
    assert producer.flush(30) == 0
    return [ids[i] for i in range(len(payloads))]


def _read_topic(kafka: MockKafka, topic: str, at_least: int = 0, timeout: float = 30) -> list:
    """Every message on ``topic`` (read to each partition's end) once it holds at least
    ``at_least``; one consumer polling every few milliseconds, so a message is seen as soon
    as it is written."""
    consumer = Consumer(
        {"bootstrap.servers": ",".join(kafka.brokers), "group.id": "test",
         "fetch.wait.max.ms": 5, "enable.auto.commit": False}
    )  # fmt: skip
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out, deadline = [], time.monotonic() + timeout
        while True:
            for m in consumer.consume(1000, timeout=0.01):
                assert m.error() is None, m.error()
                out.append(m)
            if len(out) >= at_least:
                ends = {
                    p: consumer.get_watermark_offsets(TopicPartition(topic, p))[1] for p in parts
                }
                seen = {p: 1 + max((m.offset() for m in out if m.partition() == p), default=-1)
                        for p in parts}  # fmt: skip
                if seen == ends:
                    return out
            if time.monotonic() > deadline:
                pytest.fail(f"{topic}: {len(out)} messages after {timeout:g}s, expected {at_least}")
    finally:
        consumer.close()


def _ends(kafka: MockKafka) -> dict[str, int]:
    """Each partition's end offset, keyed as Bytewax keys its Kafka partitions."""
    consumer = Consumer({"bootstrap.servers": ",".join(kafka.brokers), "group.id": "test"})
    try:
        return {
            f"{p}-{TOPIC}": consumer.get_watermark_offsets(TopicPartition(TOPIC, p), timeout=10)[1]
            for p in range(PARTITIONS)
        }
    finally:
        consumer.close()


def _offsets(db: sqlite3.Connection) -> dict[str, int]:
    """The Kafka source's committed position per partition (what a restart resumes from):
    its newest snapshot up to the committed epoch."""
    try:
        rows = db.execute(
            "SELECT state_key, ser_change FROM snaps WHERE step_id = 'hotpath_stream.events' "
            "AND snap_epoch <= (SELECT MAX(commit_epoch) FROM commits) ORDER BY snap_epoch"
        ).fetchall()
    except sqlite3.OperationalError:  # the flow has not created its tables yet
        return {}
    return {key: pickle.loads(blob) for key, blob in rows}  # newest wins


@dataclass(frozen=True)
class Expected:
    """One streamed view's expected online rows: per key, its newest row's values, NaN
    where that row is older than the view's TTL."""

    view: View
    rows: pd.DataFrame  # join keys + features


def _expected(fs, events: pd.DataFrame) -> list[Expected]:
    """``reference.per_event`` over the valid events for every streamed view the registry
    declares (keys within a minute of their TTL are left out: they may expire while read)."""
    now = pd.Timestamp.now(tz="UTC")
    out = []
    for view in (v for v in declared.from_store(fs) if v.streamed):
        names = [a.name for a in view.aggs]
        want = reference.per_event(view, _valid(events)).sort_values("event_timestamp")
        want = want.groupby(list(view.keys)).tail(1)
        age_us = (now - want.event_timestamp).dt.total_seconds() * 1e6
        want.loc[age_us > view.ttl_us, names] = np.nan
        out.append(Expected(view, want[(age_us - view.ttl_us).abs() > 60e6]))
    return out


def _differences(fs, expected: list[Expected]) -> list[str]:
    bad = []
    for e in expected:
        keys, names = list(e.view.keys), [a.name for a in e.view.aggs]
        got = fs.get_online_features(
            features=[f"{e.view.name}:{f}" for f in names],
            entity_rows=e.rows[keys].astype(int).to_dict("records"),
        ).to_df()
        for f in names:
            g, w = got[f].astype(float).to_numpy(), e.rows[f].astype(float).to_numpy()
            same = np.isclose(g, w, rtol=1e-12, atol=0) | (np.isnan(g) & np.isnan(w))
            rows = zip(e.rows[keys].values.tolist(), g, w, same, strict=True)
            bad += [
                f"{e.view.name}.{f} {k}: online {a}, pandas {b}" for k, a, b, ok in rows if not ok
            ]
    return bad


def _until_equal(fs, expected: list[Expected], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while bad := _differences(fs, expected):
        if time.monotonic() > deadline:
            pytest.fail(f"{len(bad)} differences, e.g. {bad[:3]}")
        time.sleep(0.3)


def test_brokers_and_topic_default_to_the_declared_source(stream_root) -> None:
    repo = stream_root / "feature_repo"
    declared_only = declared_topic(repo, StreamSettings())
    assert (declared_only.brokers, declared_only.topics) == (["127.0.0.1:9092"], [TOPIC])
    assert declared_only.dead_letters == DEAD_LETTERS
    given = StreamSettings(kafka_brokers=["k1:9092", "k2:9092"], kafka_topics=["t"])
    assert declared_topic(repo, given).brokers == ["k1:9092", "k2:9092"]
    assert declared_topic(repo, given).dead_letters == "t" + DEAD_LETTER_SUFFIX


def test_replayed_topic_gives_pandas_values_and_dead_letters_on_a_topic(
    kafka_root, redis_url, kafka, tmp_path
) -> None:
    """`hotpath replay --to kafka` produces the generated payments (keyed by user, over the
    topic's partitions), the malformed ones are planted beside them, and `hotpath stream
    --source kafka` (the declared topic) computes every streamed view exactly as pandas does;
    the dead-letter topic holds exactly the planted messages, once each, with code and reason."""
    s, fs = _fresh(kafka_root, redis_url, 12)
    events = _events(12, 25, seed=61, end=datetime.now(UTC))
    path = _write_events(_delivery_order(events, seed=62, skew_s=30), tmp_path / "events")
    planted = dict(zip(_produce(kafka, BAD), CODES, strict=True))  # (creates the topic)
    brokers = ",".join(kafka.brokers)
    args = ("--source", "kafka", "--brokers", brokers, "--lateness", LATENESS,
            "--snapshot-interval", "0.5", "--no-offline")  # fmt: skip
    proc = _stream(s, *args, log=tmp_path / "stream.log")
    replay = hotpath_popen(
        "replay", "--to", "kafka", "--brokers", brokers, "--file", path, "--rate", "0",
        env={"HOTPATH_REPO": str(s.repo)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        want = _expected(fs, events)  # while both start
        out, err = replay.communicate(timeout=60)
        assert replay.returncode == 0, err
        assert f"sent {len(events):,} events" in out
        _until_equal(fs, want)
        dead = _read_topic(kafka, DEAD_LETTERS, len(planted))
        envelopes = [json.loads(m.value()) for m in dead]
        assert sorted(m.key().decode() for m in dead) == sorted(planted)  # each exactly once
        assert {e["id"]: e["code"] for e in envelopes} == planted
        assert all(e["reason"] and "event" in e for e in envelopes)
        assert all(dict(m.headers())["code"].decode() == planted[m.key().decode()] for m in dead)
        # the payments were spread over every partition, and one process read them all
        assert {m.partition() for m in _read_topic(kafka, TOPIC)} == set(range(PARTITIONS))
        assert proc.poll() is None
    finally:
        replay.kill()
        proc.kill()
        proc.wait(timeout=10)


def test_kill_9_and_restart_with_recovery_is_exact(kafka_root, redis_url, kafka, tmp_path) -> None:
    """kill -9 mid-epoch (malformed messages read and dead-lettered, their epoch not yet
    committed), then a restart with the same recovery folder: it resumes from the offsets in
    Bytewax's last committed snapshot (not the topic's start; no offsets are kept on the
    broker), replays what that commit had not covered, and every streamed view equals
    pandas; each malformed message is on the dead-letter topic once, though read twice."""
    s, fs = _fresh(kafka_root, redis_url, 13)
    events = _events(16, 25, seed=71, end=datetime.now(UTC))
    payloads = _payloads(_delivery_order(events, seed=72, skew_s=30))
    quarter = len(payloads) // 4
    ids = _produce(kafka, BAD[:3] + payloads[: 2 * quarter])
    planted = ids[:3]
    rec = tmp_path / "rec"
    args = ("--source", "kafka", "--brokers", ",".join(kafka.brokers), "--lateness", LATENESS,
            "--snapshot-interval", "1", "--no-offline", "--recovery-dir", str(rec))  # fmt: skip
    log = tmp_path / "stream.log"
    proc = _stream(s, *args, log=log)
    want = _expected(fs, events)  # while it starts
    db = _recovery(rec)
    try:
        _wait_for(lambda: max(_offsets(db).values(), default=0) > 0, "a first commit")
        seen = _commit(db)
        _wait_for(lambda: _commit(db) != seen, "the next commit")  # an epoch just began
        again = _produce(kafka, BAD[3:] + payloads[2 * quarter : 3 * quarter])[:2]
        planted += again
        _read_topic(kafka, DEAD_LETTERS, len(planted))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        resumed_from = _offsets(db)
        for sid in again:  # dead-lettered, yet after the committed position: read again
            _, part, offset = sid.split(":")
            assert int(offset) >= resumed_from[f"{part}-{TOPIC}"], "committed first: too slow?"
        assert _differences(fs, want)  # not finished when killed
        _produce(kafka, payloads[3 * quarter :])
        ends = _ends(kafka)
        proc = _stream(s, *args, log=log)
        _until_equal(fs, want)
        _wait_for(lambda: _offsets(db) == ends, "a commit at the topic's end")
        dead = _read_topic(kafka, DEAD_LETTERS, len(planted))
        assert sorted(m.key().decode() for m in dead) == sorted(planted)  # each exactly once
    finally:
        db.close()
        proc.kill()
        proc.wait(timeout=10)


def test_a_position_past_retention_stops_instead_of_skipping(kafka) -> None:
    """The mock cluster keeps about 5 MB per partition (size retention): a restart whose
    snapshot offset the broker no longer holds fails with that error, where librdkafka's
    default would jump to the newest message and skip everything in between; a first start
    reads from the oldest message still held."""
    producer = Producer({"bootstrap.servers": ",".join(kafka.brokers), "linger.ms": 5})
    for _ in range(60_000):  # ~6 MB into partition 0
        while True:
            try:
                producer.produce(TOPIC, b"x" * 100, partition=0)
                break
            except BufferError:
                producer.poll(0.01)
    assert producer.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": ",".join(kafka.brokers), "group.id": "test"})
    oldest = consumer.get_watermark_offsets(TopicPartition(TOPIC, 0), timeout=10)[0]
    consumer.close()
    assert oldest > 0  # retention dropped the first messages
    source = kafka_source(KafkaTopic(kafka.brokers, [TOPIC], DEAD_LETTERS))

    def first_offset(resume_from: int | None) -> int:
        part = source.build_part("events", f"0-{TOPIC}", resume_from)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if batch := part.next_batch():
                    return batch[0].offset
            pytest.fail("nothing read")
        finally:
            part.close()

    assert first_offset(None) == oldest
    assert first_offset(oldest + 10) == oldest + 10
    with pytest.raises(RuntimeError, match="Offset out of range"):
        first_offset(oldest - 1)


def _committed_offsets(rec: Path) -> dict[str, int]:
    """The Kafka source's committed positions over every recovery partition."""
    out: dict[str, int] = {}
    for part in sorted(rec.glob("part-*.sqlite3")):
        db = sqlite3.connect(part, timeout=10, isolation_level=None)
        try:
            out |= _offsets(db)
        finally:
            db.close()
    return out


def test_three_processes_killed_and_restarted_equal_one(
    kafka_root, redis_url, kafka, tmp_path
) -> None:
    """Three processes (``-i/-a``) with recovery share the topic's partitions; one is killed
    -9 mid-stream (a Bytewax cluster stops as one: the others are killed too), more events
    arrive, the cluster restarts from its recovery store, and every streamed view equals
    pandas, hash for hash what one uninterrupted process wrote."""
    from bytewax.recovery import init_db_dir

    s3, fs3 = _fresh(kafka_root, redis_url, 14)
    s1, _ = _fresh(kafka_root, redis_url, 15)
    events = _events(24, 25, seed=81, end=datetime.now(UTC))
    payloads = _payloads(_delivery_order(events, seed=82, skew_s=30))
    third = len(payloads) // 3
    _produce(kafka, payloads[: 2 * third])
    rec = tmp_path / "rec"
    rec.mkdir()
    init_db_dir(rec, 3)
    common = ("--source", "kafka", "--brokers", ",".join(kafka.brokers), "--lateness", LATENESS,
              "--snapshot-interval", "0.5", "--no-offline")  # fmt: skip
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(3))

    def cluster() -> list[subprocess.Popen]:
        return [
            _stream(
                s3,
                *common,
                "--recovery-dir",
                str(rec),
                "-i",
                str(i),
                "-a",
                addresses,
                log=tmp_path / f"p{i}.log",
            )  # fmt: skip
            for i in range(3)
        ]

    want = _expected(fs3, events)
    procs = cluster()
    single: subprocess.Popen | None = None
    try:
        # killed once a commit covers a third of the events: the restart needs its state
        _wait_for(
            lambda: sum(_committed_offsets(rec).values()) >= third,
            "a commit past a third of the events",
            timeout=60,
        )
        procs[1].send_signal(signal.SIGKILL)
        assert _differences(fs3, want)  # not finished when killed
        for p in procs:  # what an orchestrator does when a member dies: restart them all
            p.kill()
            p.wait(timeout=10)
        _produce(kafka, payloads[2 * third :])
        procs = cluster()
        _until_equal(fs3, want, timeout=90)
        single = _stream(s1, *common, log=tmp_path / "single.log")
        _until_equal(store.open_store(s1), want, timeout=90)
        assert test_stream._hashes(s3.redis_url) == test_stream._hashes(s1.redis_url)
        assert all(p.poll() is None for p in procs)
    finally:
        for p in [*procs, *([single] if single else [])]:
            p.kill()
            p.wait(timeout=10)
