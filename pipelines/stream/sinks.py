"""Where the stream's rows go: the online store (fresh), the offline store (training),
and the dead-letter output (rejected and late events, with the reason).

Writes are idempotent, because recovery replays at-least-once: online, a row overwrites
the stored one when its event time is the same or newer (never an increment); offline,
each (user, event time) row carries a ``created`` time and Feast's point-in-time join
keeps the newest, so a replayed or corrected row supersedes, never adds (a backfilled row,
``created`` fixed above any of these, supersedes them all). Online, a row already past a
view's TTL is not written to that view. Dead letters are written once per source id.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import redis
from bytewax.outputs import (
    DynamicSink,
    FixedPartitionedSink,
    StatefulSinkPartition,
    StatelessSinkPartition,
)
from feast import FeatureStore, FeatureView
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.types import Int64

from online_store import layout
from online_store.connect import redis_client
from online_store.tiers import feast_write, placement
from pipelines.stream import metrics
from pipelines.stream.events import Rejected


@dataclass(frozen=True, slots=True)
class Row:
    """One user's stream aggregates as of ``ts_us`` (every stream view's features)."""

    user_id: int
    ts_us: int
    values: dict[str, Any]
    ingest_s: float


class OnlineWriter:
    """Writes rows into the profile's online store in Feast's layout: Redis by
    compare-and-set (``online_store.layout.COMPARE_AND_SET``), any other store through
    Feast's own ``online_write_batch`` (SQLite upserts, which with one writer per user in
    event order is the same).

    A row older than a view's TTL at write time (``clock``) is not written to that view: a
    replay of old events must not leave values the store would serve as current (Feast's
    SDK returns whatever is stored); the views of one push source have their own TTLs."""

    def __init__(
        self, store: FeatureStore, views: list[FeatureView], clock: Callable[[], float] = time.time
    ) -> None:
        self.store, self.views, self.clock = store, views, clock
        self.project = store.project
        self.ttl_us = [int(v.ttl.total_seconds() * 1e6) if v.ttl else None for v in views]
        cfg, self.ttl_s = _stream_tier(store, views)
        self.redis: Any = None
        if cfg.type == "redis":  # standalone or cluster: one key per call, routed by key
            self.redis = redis_client(cfg)
            self.cas = self.redis.register_script(layout.COMPARE_AND_SET)
            self.user_key = layout.KeyEncoder.for_view(store, views[0])
            # per view: (ts field, [(feature, hash field, encoder)])
            self.layout = [
                (
                    layout.ts_field(v.name),
                    [
                        (f.name, layout.feature_field(v.name, f.name), layout.value_proto(f.dtype))
                        for f in v.features
                    ],
                )
                for v in views
            ]
        self.encoders = {f.name: layout.value_proto(f.dtype) for v in views for f in v.features}

    def _key(self, user_id: int) -> EntityKeyProto:
        return EntityKeyProto(join_keys=["user_id"], entity_values=[ValueProto(int64_val=user_id)])

    def write(self, rows: Sequence[Row]) -> None:
        newest: dict[int, Row] = {}
        for r in rows:  # only each user's newest row matters online
            if r.user_id not in newest or r.ts_us >= newest[r.user_id].ts_us:
                newest[r.user_id] = r
        if not newest:
            return
        # per row, the views it is still within the TTL of (age == TTL is still served)
        now_us = int(self.clock() * 1e6)
        live: dict[int, list[int]] = {}
        for u, r in newest.items():
            live[u] = [i for i, t in enumerate(self.ttl_us) if t is None or now_us - r.ts_us <= t]
        for i, view in enumerate(self.views):
            expired = sum(i not in views for views in live.values())
            if expired:
                metrics.EXPIRED.labels(view.name).inc(expired)
        written = [r for u, r in newest.items() if live[u]]
        if self.redis is not None:
            # redis-py refuses scripts in a cluster pipeline: one call per row there
            cluster = isinstance(self.redis, redis.RedisCluster)
            pipe = None if cluster else self.redis.pipeline(transaction=False)
            project = self.project.encode()
            for r in written:
                key = self.user_key.encode_values((r.user_id,)) + project
                expire_at = layout.expire_at(r.ts_us / 1e6, self.ttl_s) if self.ttl_s else 0
                args: list[Any] = [r.ts_us, layout.encode_stamp(r.ts_us), expire_at]
                for i in live[r.user_id]:
                    ts_field, fields = self.layout[i]
                    args += [ts_field, len(fields)]
                    for name, field, encode in fields:
                        args += [field, encode(r.values[name]).SerializeToString()]
                self.cas(keys=[key], args=args, client=pipe)
            if pipe is not None:
                pipe.execute()
        else:
            for i, view in enumerate(self.views):
                data = [
                    (
                        self._key(r.user_id),
                        {f.name: self.encoders[f.name](r.values[f.name]) for f in view.features},
                        datetime.fromtimestamp(r.ts_us / 1e6, UTC),
                        None,
                    )
                    for r in written
                    if i in live[r.user_id]
                ]
                if data:
                    feast_write(self.store, view, data)
        now = time.time()
        metrics.WRITES.labels("online").inc(len(written))
        for r in written:
            metrics.LAG.observe(max(0.0, now - r.ingest_s))


def _stream_tier(store: FeatureStore, views: list[FeatureView]) -> tuple[Any, float]:
    """The online store config the stream views live in (their tier on a tiered store)
    and the key expiry to keep there (the longest view TTL; 0 when the store sets none)."""
    placed = [placement(store, v) for v in views]
    tiers = {p.tier for p in placed}
    if len(tiers) != 1:
        raise ValueError(f"the stream views must share one online store tier, not {tiers}")
    ttl = max((v.ttl.total_seconds() for v in views if v.ttl), default=0.0)
    return placed[0].config, ttl if placed[0].expires else 0.0


class _OnlinePartition(StatelessSinkPartition[Row]):
    def __init__(self, writer: OnlineWriter) -> None:
        self.writer = writer

    def write_batch(self, items: list[Row]) -> None:
        self.writer.write(items)


class OnlineSink(DynamicSink[Row]):
    def __init__(self, open_writer: Any) -> None:
        self.open_writer = open_writer  # called once per worker: each opens its own store

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _OnlinePartition:
        return _OnlinePartition(self.open_writer())


class _OfflinePartition(StatefulSinkPartition[Row, None]):
    """Buffers rows and writes one parquet file per ``date=`` partition at each epoch's
    snapshot, so a committed epoch's rows are on disk (Bytewax commits an epoch only after
    every snapshotted step has written it)."""

    def __init__(self, path: Path, schema: pa.Schema, features: list[str]) -> None:
        self.path, self.schema, self.features = path, schema, features
        self.buffer: list[Row] = []

    def write_batch(self, items: list[Row]) -> None:  # routed by user key, keys stripped
        self.buffer.extend(items)

    def snapshot(self) -> None:
        if not self.buffer:
            return None
        created = int(time.time() * 1e6)
        by_day: dict[str, list[Row]] = {}
        for r in self.buffer:
            day = datetime.fromtimestamp(r.ts_us / 1e6, UTC).date().isoformat()
            by_day.setdefault(day, []).append(r)
        for day, rows in by_day.items():
            columns: dict[str, list[Any]] = {
                "user_id": [r.user_id for r in rows],
                "event_timestamp": [r.ts_us for r in rows],
                "created": [created] * len(rows),
            }
            for f in self.features:
                columns[f] = [r.values[f] for r in rows]
            table = pa.table(columns, schema=self.schema)
            folder = self.path / f"date={day}"
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".stream-{uuid.uuid4().hex}.parquet.tmp"
            pq.write_table(table, tmp)
            tmp.rename(folder / f"stream-{uuid.uuid4().hex}.parquet")  # readers never see half
        metrics.WRITES.labels("offline").inc(len(self.buffer))
        self.buffer = []
        return None

    def close(self) -> None:
        self.snapshot()


class OfflineSink(FixedPartitionedSink[Row, None]):
    """Appends rows to the push source's offline table (parquet, ``date=`` partitions)."""

    PARTS = 4

    def __init__(self, path: Path, schema: pa.Schema, features: list[str]) -> None:
        self.path, self.schema, self.features = path, schema, features

    def list_parts(self) -> list[str]:
        return [str(i) for i in range(self.PARTS)]

    def part_fn(self, item_key: str) -> int:
        return int(item_key) % self.PARTS

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _OfflinePartition:
        return _OfflinePartition(self.path, self.schema, self.features)


def offline_schema(views: list[FeatureView]) -> pa.Schema:
    fields = [
        pa.field("user_id", pa.int64()),
        pa.field("event_timestamp", pa.timestamp("us", tz="UTC")),
        pa.field("created", pa.timestamp("us", tz="UTC")),
    ]
    for v in views:
        for f in v.features:
            fields.append(pa.field(f.name, pa.int64() if f.dtype == Int64 else pa.float64()))
    return pa.schema(fields)


# Write a dead letter once per source id (KEYS: the dead-letter stream, its companion hash
# source id -> dead-letter entry id; ARGV: the source id, then the entry's field/value pairs).
_DEAD_LETTER_ONCE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local entry = redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], unpack(ARGV, 2))
redis.call('HSET', KEYS[2], ARGV[1], entry)
return 1
"""


class _DeadLetterPartition(StatefulSinkPartition[tuple[str, Rejected], None]):
    """Writes each source id at most once, because a recovered run replays whatever its
    last commit had not covered: in Redis by the script above (the id hash is
    ``<stream>:ids``), in a file by skipping the ids already in it at start-up."""

    def __init__(self, target: str, redis_url: str | None) -> None:
        self.target = target
        self.client = redis.Redis.from_url(redis_url) if redis_url else None
        if self.client is not None:
            self.once = self.client.register_script(_DEAD_LETTER_ONCE)
            self.ids_key = f"{target}:ids"
        else:
            self.seen = _ids_in_file(Path(target))

    def write_batch(self, items: list[tuple[str, Rejected]]) -> None:
        if self.client is not None:
            pipe = self.client.pipeline(transaction=False)
            for sid, r in items:
                fields = ["reason", r.reason, "code", r.code, "event", json.dumps(_jsonable(r.raw))]
                self.once(keys=[self.target, self.ids_key], args=[sid, *fields], client=pipe)
            written = [r for (_, r), new in zip(items, pipe.execute(), strict=True) if new]
        else:
            written, lines = [], []
            for sid, r in items:
                if sid in self.seen:
                    continue
                self.seen.add(sid)
                written.append(r)
                rec = {"id": sid, "reason": r.reason, "code": r.code}
                rec |= {"event": _jsonable(r.raw), "ingest_s": r.ingest_s}
                lines.append(json.dumps(rec) + "\n")
            if lines:
                path = Path(self.target)
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a") as f:
                    f.writelines(lines)
        for r in written:
            metrics.DEAD_LETTERS.labels(r.code).inc()

    def snapshot(self) -> None:
        return None  # nothing to restore: the written ids are the store's own state


def _ids_in_file(path: Path) -> set[str]:
    """The ids already in a dead-letter file; a last line cut short by a crash is dropped
    (its event is replayed, the epoch that read it was never committed)."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with path.open("r+b") as f:
            f.truncate(len(data))
    ids: set[str] = set()
    for line in data.decode(errors="replace").splitlines():
        try:
            ids.add(json.loads(line)["id"])
        except (ValueError, KeyError, TypeError):
            continue  # a record written before dead letters carried ids
    return ids


class DeadLetterSink(FixedPartitionedSink[tuple[str, Rejected], None]):
    """A Redis stream (``redis_url`` given) or a JSON-lines file: the source id (``id``),
    the reason, its code and the original event; once per source id.

    One partition: one writer (one file, however many workers). A partitioned sink is
    snapshotted at each epoch's end, after that epoch's writes, so Bytewax commits an epoch
    only once its dead letters are written (a dynamic sink's writes are not waited for)."""

    def __init__(self, target: str, redis_url: str | None = None) -> None:
        self.target, self.redis_url = target, redis_url

    def list_parts(self) -> list[str]:
        return ["dead-letter"]

    def part_fn(self, item_key: str) -> int:
        return 0

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _DeadLetterPartition:
        return _DeadLetterPartition(self.target, self.redis_url)


def _jsonable(raw: Any) -> Any:
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "replace")
    if isinstance(raw, dict):
        return {
            (k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)): _jsonable(v)
            for k, v in raw.items()
        }
    if isinstance(raw, str | int | float | bool) or raw is None:
        return raw
    return repr(raw)
