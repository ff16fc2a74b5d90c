"""Where events come from, behind one shape: a Bytewax source of ``(raw event, ingest time)``.

* :class:`RedisStreamSource`: Redis Streams with a consumer group, one partition per stream
  key. Reads block at most ``block_ms`` (an idle stream never freezes the flow), entries
  are acknowledged when Bytewax snapshots the partition, and the snapshot is the last
  entry id: a recovered run re-reads exactly what came after it (``XRANGE``), a plain
  restart re-reads what was delivered but never acknowledged (the group's pending list).
* :class:`FileReplaySource`: the generated parquet, in event-time order, at a chosen rate
  (0: as fast as possible); resumable by row offset. The embedded default.
* :func:`kafka_source`: ``bytewax.connectors.kafka``; fails fast when no broker answers
  (the connector itself retries forever). Untested here: no broker runs on these machines.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import redis
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from pipelines.errors import HotpathError
from pipelines.stream.events import FIELDS

Raw = tuple[Any, float]  # (event payload, ingest time in epoch seconds)
EVENT_FIELD = b"event"  # each stream entry carries one JSON event in this field


class _RedisStreamPartition(StatefulSourcePartition[Raw, str | None]):
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
        self.consumer = f"{group}:{stream}"  # stable: a restart sees its own pending entries
        self.count, self.block_ms = count, block_ms
        try:
            client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self.last: str | None = resume_from
        self.unacked: list[bytes] = []
        if resume_from is not None:  # recovered: replay by id up to what the group delivered
            info = {g["name"].decode(): g for g in client.xinfo_groups(stream)}
            self.replay_until: str | None = info[group]["last-delivered-id"].decode()
            self.mode = "replay"
        else:  # fresh or plain restart: first what was delivered but never acknowledged
            self.replay_until = None
            self.mode = "pending"
            self.last = "0"

    def _entries(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[Raw]:
        out = []
        for entry_id, fields in entries:
            ms = int(entry_id.split(b"-")[0])
            out.append((fields.get(EVENT_FIELD, fields), ms / 1000))
            self.unacked.append(entry_id)
            self.last = entry_id.decode()
        return out

    def next_batch(self) -> Iterable[Raw]:
        if self.mode == "replay":
            assert self.replay_until is not None
            entries = self.client.xrange(
                self.stream, f"({self.last}", self.replay_until, count=self.count
            )
            if not entries:
                self.mode = "live"
            return self._entries(entries)
        if self.mode == "pending":
            reply = self.client.xreadgroup(
                self.group, self.consumer, {self.stream: self.last}, count=self.count
            )
            entries = reply[0][1] if reply else []
            if not entries:
                self.mode = "live"
            return self._entries(entries)
        reply = self.client.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=self.count, block=self.block_ms
        )
        return self._entries(reply[0][1]) if reply else []

    def snapshot(self) -> str | None:
        if self.unacked:
            self.client.xack(self.stream, self.group, *self.unacked)
            self.unacked = []
        return None if self.last == "0" else self.last

    def close(self) -> None:
        self.snapshot()
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

    def build_part(self, step_id: str, for_part: str, resume_state: str | None):
        client = redis.Redis.from_url(self.url, socket_timeout=max(5.0, self.block_ms / 500))
        return _RedisStreamPartition(
            client, for_part, self.group, resume_state, self.count, self.block_ms
        )


class _FilePartition(StatefulSourcePartition[Raw, int]):
    def __init__(self, path: Path, offset: int, rate: float, batch: int) -> None:
        dataset = ds.dataset(path, format="parquet", partitioning="hive")
        table = dataset.to_table(columns=list(FIELDS)).sort_by("event_timestamp")
        self.columns = {
            "user_id": table["user_id"].to_pylist(),
            "merchant_id": table["merchant_id"].to_pylist(),
            "amount": table["amount"].to_pylist(),
            "event_timestamp": table["event_timestamp"]
            .cast(pa.timestamp("us", tz="UTC"))
            .cast(pa.int64())
            .to_pylist(),  # µs
        }
        self.n = table.num_rows
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
        out = [
            (
                {
                    "user_id": c["user_id"][i],
                    "merchant_id": c["merchant_id"][i],
                    "amount": c["amount"][i],
                    "event_timestamp": c["event_timestamp"][i],
                },
                now,
            )
            for i in range(self.offset, stop)
        ]
        self.offset = stop
        return out

    def next_awake(self) -> datetime | None:
        if self.rate <= 0:
            return None
        return datetime.now(UTC) + timedelta(milliseconds=2)

    def snapshot(self) -> int:
        return self.offset


class FileReplaySource(FixedPartitionedSource[Raw, int]):
    """Generated transactions (parquet, ``date=`` partitions) replayed in event-time order."""

    def __init__(self, path: Path, rate: float = 0, batch: int = 2000) -> None:
        if not path.exists():
            raise HotpathError(f"no transactions at {path} (run `hotpath generate` first)")
        self.path, self.rate, self.batch = path, rate, batch

    def list_parts(self) -> list[str]:
        return ["transactions"]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None):
        return _FilePartition(self.path, resume_state or 0, self.rate, self.batch)


def kafka_source(brokers: list[str], topics: list[str], timeout_s: float = 5.0) -> Any:
    """Bytewax's Kafka source, after checking that a broker answers (else a clear error
    now, not a connector retrying forever). Messages' values are the JSON events."""
    from bytewax.connectors.kafka import KafkaSource
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": ",".join(brokers), "socket.timeout.ms": 2000})
    try:
        meta = admin.list_topics(timeout=timeout_s)
    except Exception as e:  # KafkaException: transport failure, all brokers down
        raise HotpathError(f"Kafka broker unreachable at {','.join(brokers)}: {e}") from None
    absent = [t for t in topics if t not in meta.topics]
    if absent:
        raise HotpathError(f"Kafka topics not found on {','.join(brokers)}: {absent}")
    return KafkaSource(brokers, topics, tail=True)
