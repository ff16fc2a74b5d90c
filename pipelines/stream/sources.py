"""Where events come from, behind one shape: a Bytewax source of
``(raw event, ingest time, source id)``.

The Bytewax recovery store is the only record of a source's position. A partition resumes
from the position in its snapshot; with none (a first start, a crash before the first commit,
a run without ``--recovery-dir``) it reads its stream from the start, which rebuilds the
window state exactly. Nothing done before a durable commit (a Redis ack, a Kafka offset
commit) decides where a run resumes, so a crash between the two loses nothing. Replay is
at-least-once; the sinks are idempotent (online compare-and-set by event time, dead letters
keyed by the source id).

* :class:`RedisStreamSource`: Redis Streams with a consumer group, one partition per stream
  key. Reads block at most ``block_ms`` (an idle stream never freezes the flow). Entries
  are acknowledged at each snapshot only to keep the group's pending list short.
* :class:`FileReplaySource`: the generated parquet, in event-time order, at a chosen rate
  (0: as fast as possible); resumable by row offset. The embedded default.
* :func:`kafka_source`: ``bytewax.connectors.kafka`` over the declared topic (one partition
  per Kafka partition), which follows the same rule (offsets live in its snapshots, never
  committed to the broker; no snapshot: the topic's beginning); fails fast when no broker
  answers (the connector itself retries forever). ``pipelines.stream.kafka`` says which
  topic and brokers.

Every source stops at its next batch once :func:`request_stop` is called (a signal handler
does), so the dataflow ends normally: sinks flush, the last epoch is committed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.dataset as ds
import redis
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from pipelines.errors import HotpathError, first_line
from pipelines.stream.retry import retrying

if TYPE_CHECKING:
    from pipelines.stream.kafka import KafkaTopic

# (event payload, ingest time in epoch seconds, source id: "stream:entry-id", "file:row",
# "topic:partition:offset"; the dead-letter output is keyed by it)
Raw = tuple[Any, float, str]
EVENT_FIELD = b"event"  # each stream entry carries one JSON event in this field

_STOP = threading.Event()


def request_stop() -> None:
    """Ask every source to end at its next batch (safe from a signal handler)."""
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def reset_stop() -> None:
    _STOP.clear()


def stop_on_signals() -> Callable[[], None]:
    """Make the first SIGINT or SIGTERM a clean stop (:func:`request_stop`) instead of
    Bytewax's panic; a second one exits at once with 130, as a crash would (a recovered run
    resumes from the last commit). Returns a function that restores the previous handlers.
    Off the main thread (where Python allows no handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    reset_stop()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if _STOP.is_set():
            sys.stderr.write(f"\n{name} again: exiting now, without draining\n")
            sys.stderr.flush()
            os._exit(130)
        _STOP.set()
        sys.stderr.write(f"\n{name}: stopping after the current batch (again: exit now)\n")
        sys.stderr.flush()

    for s in signals:
        signal.signal(s, handler)

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)
        reset_stop()

    return restore


class _Stoppable(StatefulSourcePartition[Any, Any]):
    """A partition that reports end of input once a stop is requested: Bytewax then
    snapshots it, lets the sinks flush and commits, as at the end of a finite source."""

    def __init__(self, part: StatefulSourcePartition[Any, Any]) -> None:
        self.part = part

    def next_batch(self) -> Iterable[Any]:
        if _STOP.is_set():
            raise StopIteration
        return self.part.next_batch()

    def next_awake(self) -> datetime | None:
        return self.part.next_awake()

    def snapshot(self) -> Any:
        return self.part.snapshot()

    def close(self) -> None:
        self.part.close()


class StoppableSource(FixedPartitionedSource[Any, Any]):
    """Wraps any partitioned source (ours or Bytewax's Kafka source) so that
    :func:`request_stop` ends it cleanly; partition keys and snapshots are the inner ones."""

    def __init__(self, inner: FixedPartitionedSource[Any, Any]) -> None:
        self.inner = inner

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> _Stoppable:
        return _Stoppable(self.inner.build_part(step_id, for_part, resume_state))


# what a read of a stream whose group is gone answers: the group (or the key) missing, or,
# to a read blocked at the time, the key deleted under it
GONE = ("NOGROUP", "UNBLOCKED the stream key no longer exists")


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class _RedisStreamPartition(StatefulSourcePartition[Raw, str | None]):
    """Replays by id (``XRANGE``) from the snapshot's entry, or from the stream's start
    without one, up to what the group last delivered, then reads new entries (``>``)."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        group: str,
        resume_from: str | None,
        count: int,
        block_ms: int,
    ) -> None:
        self.client, self.stream, self.group = client, stream, group
        self.consumer = f"{group}:{stream}"  # stable: a restart owns its old pending entries
        self.count, self.block_ms = count, block_ms
        self._create_group()
        self.last: str | None = resume_from  # the newest entry read (None: none yet)
        self.unacked: list[bytes] = []
        self.acks = ThreadPoolExecutor(1, thread_name_prefix="xack")  # in order
        info = {g["name"].decode(): g for g in client.xinfo_groups(stream)}
        self.replay_until: str = info[group]["last-delivered-id"].decode()
        self.live = False
        self.missed = False  # a live read failed: its entries may be pending, unseen
        self.newest = _id_key(resume_from) if resume_from is not None else None  # of last

    def _create_group(self) -> None:
        """The consumer group, from the stream's start (the stream created if need be)."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _entries(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[Raw]:
        """Raw events of the entries newer than the last one read. An older one was read
        already: a group that went back (reset behind a snapshot, or on a Redis restored
        from an older copy while the flow waited) delivers it again."""
        out = []
        prefix = self.stream + ":"
        newest = self.newest
        for entry_id, fields in entries:
            self.unacked.append(entry_id)
            eid = entry_id.decode()
            key = _id_key(eid)
            if newest is not None and key <= newest:
                continue
            newest, self.last = key, eid
            if not fields:  # pending, but trimmed from the stream since: nothing to read
                continue
            out.append((fields.get(EVENT_FIELD, fields), key[0] / 1000, prefix + eid))
        self.newest = newest
        return out

    def next_batch(self) -> Iterable[Raw]:
        """The next entries; a Redis that stops answering is waited for (:func:`retrying`).
        A group that is gone (a Redis that came back empty, a ``FLUSHALL``, a destroyed
        group) is created again from the stream's start, with a warning: what producers
        add from then on is read (what the Redis lost is lost), what was read already is
        passed over."""
        try:
            return retrying(self._next_batch, f"reading the Redis stream {self.stream}")
        except redis.ResponseError as e:
            if not str(e).startswith(GONE):
                raise
            print(
                f"warning: the consumer group {self.group} of the Redis stream {self.stream} "
                f"is gone ({first_line(e)}); created again, reading on from the stream's start",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            retrying(self._create_group, f"creating the group {self.group} again")
            self.missed = False  # the group's pending entries went with it
            return []

    def _next_batch(self) -> list[Raw]:
        if not self.live:
            start = "-" if self.last is None else f"({self.last}"
            entries = self.client.xrange(self.stream, start, self.replay_until, count=self.count)
            if len(entries) < self.count:
                self.live = True
            return self._entries(entries)
        if self.missed:
            # A read that failed may have been served all the same (its reply lost on the
            # way): those entries are this consumer's pending ones past the last seen, which
            # ">" never delivers again
            mine = {self.stream: self.last or "0-0"}
            reply = self.client.xreadgroup(self.group, self.consumer, mine, count=self.count)
            entries = reply[0][1] if reply else []
            if len(entries) < self.count:
                self.missed = False
            return self._entries(entries)
        self.missed = True  # until this read's reply is in
        reply = self.client.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=self.count, block=self.block_ms
        )
        self.missed = False
        return self._entries(reply[0][1]) if reply else []

    def snapshot(self) -> str | None:
        # The position is the snapshot itself. The ack only trims the group's pending list:
        # a restart never reads it, so acking before Bytewax commits the epoch is harmless,
        # and so is acking a little later: a helper thread does, in pieces (one XACK of an
        # epoch's 10,000 ids held the worker thread 9 ms at every epoch's end).
        if self.unacked:
            self.acks.submit(self._ack, self.unacked)
            self.unacked = []
        return self.last

    def _ack(self, ids: list[bytes], piece: int = 500) -> None:
        for i in range(0, len(ids), piece):
            self.client.xack(self.stream, self.group, *ids[i : i + piece])

    def close(self) -> None:
        self.acks.shutdown(wait=True)
        if self.unacked:
            self._ack(self.unacked)
        self.client.close()


class RedisStreamSource(FixedPartitionedSource[Raw, str | None]):
    def __init__(
        self,
        url: str,
        streams: list[str],
        group: str = "hotpath",
        count: int = 2000,
        block_ms: int = 100,
    ) -> None:
        self.url, self.streams, self.group = url, streams, group
        self.count, self.block_ms = count, block_ms

    def list_parts(self) -> list[str]:
        return list(self.streams)

    def build_part(
        self, step_id: str, for_part: str, resume_state: str | None
    ) -> _RedisStreamPartition:
        client = redis.Redis.from_url(self.url, socket_timeout=max(5.0, self.block_ms / 500))
        return _RedisStreamPartition(
            client, for_part, self.group, resume_state, self.count, self.block_ms
        )


def read_events(
    path: Path, fields: tuple[str, ...], limit: int | None = None
) -> tuple[int, dict[str, list[Any]]]:
    """The generated transactions at ``path`` (parquet, ``date=`` partitions) in event-time
    order, as columns of plain values (``event_timestamp`` in epoch microseconds), the first
    ``limit`` of them (None: all); and how many. The file source and ``hotpath replay``
    read through it."""
    dataset = ds.dataset(path, format="parquet", partitioning="hive")
    table = dataset.to_table(columns=list(fields)).sort_by("event_timestamp")
    if limit is not None:
        table = table.slice(0, limit)
    micros = table["event_timestamp"].cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    columns = {f: table[f].to_pylist() for f in fields} | {"event_timestamp": micros.to_pylist()}
    return table.num_rows, columns


class _FilePartition(StatefulSourcePartition[Raw, int]):
    def __init__(
        self, path: Path, fields: tuple[str, ...], offset: int, rate: float, batch: int
    ) -> None:
        self.n, self.columns = read_events(path, fields)
        self.offset = offset
        self.rate, self.batch = rate, batch
        self.started, self.start_offset = time.monotonic(), offset

    def next_batch(self) -> Iterable[Raw]:
        if self.offset >= self.n:
            raise StopIteration
        stop = min(self.n, self.offset + self.batch)
        if self.rate > 0:  # never ahead of the schedule
            due = self.start_offset + int((time.monotonic() - self.started) * self.rate)
            stop = min(stop, max(due, self.offset))
        now = time.time()
        c = self.columns
        out = [({f: c[f][i] for f in c}, now, f"file:{i}") for i in range(self.offset, stop)]
        self.offset = stop
        return out

    def next_awake(self) -> datetime | None:
        if self.rate <= 0:
            return None
        return datetime.now(UTC) + timedelta(milliseconds=2)

    def snapshot(self) -> int:
        return self.offset


class FileReplaySource(FixedPartitionedSource[Raw, int]):
    """Generated transactions (parquet, ``date=`` partitions) replayed in event-time order;
    each event has the declared ``fields`` (``EventRules.fields``)."""

    def __init__(
        self, path: Path, fields: tuple[str, ...], rate: float = 0, batch: int = 2000
    ) -> None:
        if not path.exists():
            raise HotpathError(f"no transactions at {path} (run `hotpath generate` first)")
        try:  # here, not in the flow's first batch (a worker's panic, a Rust backtrace)
            names = ds.dataset(path, format="parquet", partitioning="hive").schema.names
        except Exception as e:
            raise HotpathError(f"cannot read {path} as parquet: {first_line(e)}") from None
        missing = [f for f in fields if f not in names]
        if missing:
            raise HotpathError(f"{path} lacks the event's field(s) {missing}")
        self.path, self.fields, self.rate, self.batch = path, fields, rate, batch

    def list_parts(self) -> list[str]:
        return ["transactions"]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _FilePartition:
        return _FilePartition(self.path, self.fields, resume_state or 0, self.rate, self.batch)


def kafka_source(kafka: KafkaTopic, timeout_s: float = 5.0) -> Any:
    """Bytewax's Kafka source over ``kafka.topics`` (every partition of each; the partitions
    spread over the workers of all processes), after checking that a broker answers and
    the topics exist (else a clear error now, not a connector retrying forever).
    Messages' values are the JSON events.

    Its position is the offset in its snapshot only: it assigns partitions without a
    consumer group and never commits offsets to the broker, and without a snapshot it
    starts at the beginning (stated here, not left to a default)."""
    from bytewax.connectors.kafka import KafkaSource
    from confluent_kafka import OFFSET_BEGINNING

    from pipelines.stream.kafka import check_topics

    check_topics(kafka.brokers, kafka.topics, timeout_s)
    # A snapshot's offset the broker no longer holds (retention passed it) stops the flow
    # with that error, instead of librdkafka's default of jumping to the newest message
    # (silently skipping everything in between). A fetch waits at most 10 ms for data, not
    # librdkafka's 500: a broker that parks an empty fetch for the whole wait (librdkafka's
    # mock cluster does) otherwise adds ~0.4 s to every event's freshness (p50 424 -> 32 ms
    # at 5,000 events/s, benchmarks/streaming.py); a busy stream's fetches return on data.
    config = {"auto.offset.reset": "error", "fetch.wait.max.ms": 10}
    return KafkaSource(
        kafka.brokers, kafka.topics, tail=True, starting_offset=OFFSET_BEGINNING, add_config=config
    )
