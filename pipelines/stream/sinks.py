"""Where the stream's rows go: the online store (fresh) and the offline store (training).
Rejected and late events go to ``pipelines.stream.dead_letters``.

Writes are idempotent, because recovery replays at-least-once: online, a row overwrites
the stored one when its event time is the same or newer (never an increment); offline,
each (key, event time) row carries a ``created`` time and Feast's point-in-time join
keeps the newest, so a replayed or corrected row supersedes, never adds (a backfilled row,
``created`` fixed above any of these, supersedes them all). Online, a row already past a
view's TTL is not written to that view. A request-time view's row carries the key's tiles
(``online_store.tiles``), written in the same call as its row (Redis: hash field
``_tiles:<view>``; SQLite: the row ``_tiles``).
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NamedTuple

import hiredis
import pyarrow as pa
import pyarrow.parquet as pq
import redis
from bytewax.outputs import (
    DynamicSink,
    FixedPartitionedSink,
    StatefulSinkPartition,
    StatelessSinkPartition,
)
from feast import FeatureStore, ValueType
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.types import Int32, Int64
from redis._parsers.base import BaseParser

from online_store import layout
from online_store.connect import RespClient, RespError, redis_client
from online_store.tiers import Placement, feast_write, placement
from online_store.tiles import TILES_FEATURE, TilePlan, tiles_field
from pipelines.declared import View
from pipelines.stream import metrics
from pipelines.stream.aggregates import Group, Row, key_groups
from pipelines.stream.events import Rejected
from pipelines.stream.retry import RETRY_S, retrying
from pipelines.stream.tiles import tile_rows


class Emitted(NamedTuple):
    """What a keyed step emits for one key and batch: its rows (of every group in the
    step), and the dead letters of its late events."""

    rows: list[Row]
    late: list[tuple[str, Rejected]]


# ValueProto field of an entity's value type (the stream's keys are integers)
parse_error = BaseParser.parse_error  # an error reply as redis-py's exception for it
_KEY_FIELD = {ValueType.INT64: "int64_val", ValueType.INT32: "int32_val"}


def _proto(dtype: Any) -> Callable[[Any], ValueProto]:
    """A feature value -> ValueProto for Feast's write (None: an empty value, a null)."""
    encode = layout.value_proto(dtype)
    return lambda v: ValueProto() if v is None else encode(v)


class _GroupWriter:
    """The online writes of one key group's views: one entity key per row, in the tier
    the group's views live in."""

    def __init__(self, store: FeatureStore, group: Group, clients: dict[Any, Any]) -> None:
        self.group = group
        self.views = [store.get_feature_view(v.name) for v in group.views]
        self.ttl_us = [_live_us(v) for v in group.views]
        index = [group.positions(v.name) for v in group.views]
        # per view, if it is request-time: (its place in Row.tiles, its tile plan, its field)
        self.tiled = [
            None
            if (at := group.tiles_of(v.name)) is None
            else (at, group.tiles[at], tiles_field(v.name))
            for v in group.views
        ]
        # per view: [(feature, its index in Row.values, ValueProto of a value or None)]
        self.features = [
            [(f.name, at[f.name], _proto(f.dtype)) for f in fv.features]
            for fv, at in zip(self.views, index, strict=True)
        ]
        placed, self.ttl_s = _stream_tier(store, group)
        self.redis: Any = None
        if placed.kind == "redis":  # standalone or cluster: one key per call, routed by key
            if placed.tier not in clients:  # groups in one tier share a client (one pipeline)
                client = redis_client(placed.config)
                # a standalone node's pipeline goes out on a raw connection, packed by hiredis
                # in one call (redis-py's pipeline cost a fifth of the flow's time)
                raw = None
                if placed.config.redis_type == "redis":
                    raw = RespClient.from_feast(placed.config.connection_string, RETRY_S)
                cas = client.register_script(layout.COMPARE_AND_SET)
                clients[placed.tier] = (client, cas, raw)
            self.redis, self.cas, self.raw = clients[placed.tier]
            # redis-py refuses scripts in a cluster pipeline, and a sentinel's master is found
            # through redis-py: one call per row there
            self.pipelined = self.raw is not None
            self.encoder = layout.KeyEncoder.for_view(store, self.views[0])
            # Feast serializes join keys sorted: the entity's values in that order (None: as is)
            order = [group.keys.index(k) for k in self.encoder.join_keys]
            self.order = None if order == sorted(order) else order
            self.redis_keys: dict[tuple[Any, ...], bytes] = {}  # entity -> its Redis key
            # per view: (ts field, [(hash field, index in Row.values, serialized ValueProto)])
            self.layout = [
                (
                    layout.ts_field(fv.name),
                    [
                        (layout.feature_field(fv.name, f.name), at[f.name],
                         layout.value_bytes(f.dtype))
                        for f in fv.features
                    ],
                )
                for fv, at in zip(self.views, index, strict=True)
            ]  # fmt: skip
        else:
            types = {
                store.get_entity(e).join_key: store.get_entity(e).value_type
                for e in self.views[0].entities
            }
            if any(types[k] not in _KEY_FIELD for k in group.keys):
                raise ValueError(
                    f"the stream writes integer entity keys, not {[types[k] for k in group.keys]}"
                )
            self.key_fields = [_KEY_FIELD[types[k]] for k in group.keys]

    def _key_bytes(self, entity: tuple[Any, ...], project: bytes) -> bytes:
        order = self.order
        values = entity if order is None else tuple(entity[i] for i in order)
        return self.encoder.encode_values(values) + project

    def _key(self, entity: tuple[Any, ...]) -> EntityKeyProto:
        return EntityKeyProto(
            join_keys=list(self.group.keys),
            entity_values=[
                ValueProto(**{f: v}) for f, v in zip(self.key_fields, entity, strict=True)
            ],
        )

    def write(
        self,
        store: FeatureStore,
        newest: dict[tuple[Any, ...], Row],
        now_us: int,
        calls: _Pipeline | None,
    ) -> list[Row]:
        """Write each entity's newest row to the views it is still within the TTL of (age
        == TTL is still served), Redis calls appended to ``calls`` (None: one call per row,
        on a cluster); the rows written."""
        every, youngest = list(range(len(self.ttl_us))), min(self.ttl_us, key=_no_ttl_last)
        live: dict[tuple[Any, ...], list[int]] = {}
        for entity, r in newest.items():
            age = now_us - r.ts_us
            live[entity] = (
                every
                if youngest is None or age <= youngest
                else [i for i, t in enumerate(self.ttl_us) if t is None or age <= t]
            )
        for i, view in enumerate(self.views):
            expired = sum(i not in views for views in live.values())
            if expired:
                metrics.EXPIRED.labels(view.name).inc(expired)
        written = [r for entity, r in newest.items() if live[entity]]
        if self.redis is not None:
            project = store.project.encode()
            keys = self.redis_keys
            if len(keys) > _KEYS_KEPT:
                keys.clear()
            for r in written:
                key = keys.get(r.entity)
                if key is None:
                    key = keys[r.entity] = self._key_bytes(r.entity, project)
                expire_at = layout.expire_at(r.ts_us / 1e6, self.ttl_s) if self.ttl_s else 0
                args: list[Any] = [r.ts_us, layout.encode_stamp(r.ts_us), expire_at]
                values = r.values
                for i in live[r.entity]:
                    ts_field, fields = self.layout[i]
                    tiled = self.tiled[i]
                    args += [ts_field, len(fields) + (tiled is not None)]
                    for field, j, encode in fields:
                        args += [field, encode(values[j])]
                    if tiled is not None:
                        args += [tiled[2], _blob(tiled, r)]
                if calls is None:
                    self.cas(keys=[key], args=args)
                else:  # EVALSHA itself: redis-py's script call asks SCRIPT EXISTS per pipeline
                    calls.append(("EVALSHA", self.cas.sha, 1, key, *args))
        else:
            for i, view in enumerate(self.views):
                tiled = self.tiled[i]
                data = [
                    (
                        self._key(r.entity),
                        {name: encode(r.values[j]) for name, j, encode in self.features[i]}
                        | ({} if tiled is None
                           else {TILES_FEATURE: ValueProto(bytes_val=_blob(tiled, r))}),
                        datetime.fromtimestamp(r.ts_us / 1e6, UTC),
                        None,
                    )
                    for r in written
                    if i in live[r.entity]
                ]  # fmt: skip
                if data:
                    feast_write(store, view, data)
        return written


class OnlineWriter:
    """Writes rows into the profile's online store in Feast's layout, per key group (the
    entity key of that group's join keys): Redis by compare-and-set
    (``online_store.layout.COMPARE_AND_SET``), any other store through Feast's own
    ``online_write_batch`` (SQLite upserts, which with one writer per key in event order
    is the same).

    A row older than a view's TTL at write time (``clock``) is not written to that view: a
    replay of old events must not leave values the store would serve as current (Feast's
    SDK returns whatever is stored); the views of one key group have their own TTLs."""

    def __init__(
        self, store: FeatureStore, views: list[View], clock: Callable[[], float] = time.time
    ) -> None:
        self.store, self.clock = store, clock
        clients: dict[Any, Any] = {}  # per tier: (Redis client, compare-and-set script)
        self.groups = {g.keys: _GroupWriter(store, g, clients) for g in key_groups(views)}

    def write(self, rows: Sequence[Row]) -> None:
        """Write ``rows``; an unreachable node (a Redis Cluster failover, a restart) is
        retried for up to ``RETRY_S`` seconds before the error stops the flow
        (:func:`retrying`): the writes are compare-and-set, so writing a batch again is
        harmless."""
        retrying(lambda: self._write(rows), "online store write")

    def _write(self, rows: Sequence[Row]) -> None:
        newest: dict[tuple[str, ...], dict[tuple[Any, ...], Row]] = {}
        for r in rows:  # only each key's newest row matters online
            of_group = newest.setdefault(r.join_keys, {})
            seen = of_group.get(r.entity)
            if seen is None or r.ts_us >= seen.ts_us:
                of_group[r.entity] = r
        if not newest:
            return
        now_us = int(self.clock() * 1e6)
        written: list[Row] = []
        # one pipeline per Redis client, all groups' rows in it
        pipes: dict[int, _Pipeline] = {}
        try:
            for keys, of_group in newest.items():
                g, out = self.groups[keys], None
                if g.redis is not None and g.pipelined:
                    out = pipes.setdefault(id(g.redis), _Pipeline(g.raw, g.cas))
                written += g.write(self.store, of_group, now_us, out)
            for pipe in pipes.values():
                pipe.finish()
        except BaseException:
            for pipe in pipes.values():
                pipe.abandon()
            raise
        now = time.time()
        metrics.WRITES.labels("online").inc(len(written))
        metrics.LAG.observe_many([max(0.0, now - r.ingest_s) for r in written])


# Redis keys kept per key group, encoded (packing one was ~8 % of the flow's time): the
# live entities of a stream repeat; the cache starts over when it holds this many
_KEYS_KEPT = 100_000


def _no_ttl_last(ttl: int | None) -> float:
    return float("inf") if ttl is None else ttl


def _live_us(view: View) -> int | None:
    """How old a view's row may be and still be written: its TTL; a request-time view's
    tiles answer for its longest window whatever its TTL, so at least that long."""
    if view.tiles is None or view.ttl_us is None:
        return view.ttl_us
    return max(view.ttl_us, view.longest_us)


def _blob(tiled: tuple[int, TilePlan, bytes], row: Row) -> bytes:
    """A request-time view's tiles of ``row`` (its key's newest), as the blob serving reads."""
    at, plan, _ = tiled
    # a row built without its key's tiles (only by hand: the keyed state always fills them)
    # carries none: an empty window
    return plan.encode_rows(tile_rows(plan, row.tiles[at]) if at < len(row.tiles) else ())


class _Pipeline:
    """One batch's compare-and-sets to one standalone Redis, sent every :attr:`CHUNK`
    calls as they are built and their replies read once, at :meth:`finish`: the server
    runs the first calls while the flow builds the rest (waiting for all of them at the
    end was a fifth of the flow's time at 5,000 events/s). The batch is written when
    :meth:`finish` returns, as before: an epoch never ends with a write in flight.

    A server that lost the compare-and-set script (a restart, ``SCRIPT FLUSH``) refuses
    its EVALSHAs: it is loaded and the calls are sent again (compare-and-set writes are
    idempotent). An error reply drops the connection (its other replies unread) and is
    raised as the exception redis-py raises for it, so what :data:`RETRYABLE` retries is
    the same (``LOADING`` while a restarted node reloads, ``MASTERDOWN``; not ``READONLY``
    or ``OOM``)."""

    CHUNK = 32

    def __init__(self, client: RespClient, script: Any) -> None:
        self.client, self.script = client, script
        self.calls: list[tuple[Any, ...]] = []
        self.sent = 0

    def append(self, call: tuple[Any, ...]) -> None:
        self.calls.append(call)
        if len(self.calls) - self.sent >= self.CHUNK:
            self._send()

    def _send(self) -> None:
        pack = hiredis.pack_command
        try:  # a reconnection's AUTH or SELECT can be refused
            self.client.send(b"".join([pack(c) for c in self.calls[self.sent :]]))
        except RespError as e:
            raise parse_error(str(e)) from None
        self.sent = len(self.calls)

    def abandon(self) -> None:
        """After a failure: replies left unread would answer the next batch's calls, so
        the connection goes."""
        self.client.close()

    def finish(self) -> None:
        """Send what is left and wait for every reply."""
        if not self.calls:
            return
        try:
            if self.sent < len(self.calls):
                self._send()
            self.client.receive(len(self.calls))
            return
        except RespError as e:
            error = parse_error(str(e))
        if not isinstance(error, redis.exceptions.NoScriptError):
            raise error from None
        try:
            self.client.execute(hiredis.pack_command(("SCRIPT", "LOAD", self.script.script)), 1)
            packed = b"".join([hiredis.pack_command(c) for c in self.calls])
            self.client.execute(packed, len(self.calls))
        except RespError as e:
            raise parse_error(str(e)) from None


def _stream_tier(store: FeatureStore, group: Group) -> tuple[Placement, float]:
    """Where a key group's views live (their tier on a tiered store) and the key expiry to
    keep there (the longest view TTL; 0 when the store sets none)."""
    placed = [placement(store, v.name) for v in group.views]
    tiers = {p.tier for p in placed}
    if len(tiers) != 1:
        names = [v.name for v in group.views]
        raise ValueError(
            f"the streamed views keyed by {group.keys} ({names}) must share one online store "
            f"tier, not {tiers}"
        )
    ttl = max((t / 1e6 for v in group.views if (t := _live_us(v))), default=0.0)
    return placed[0], ttl if placed[0].expires else 0.0


class _OnlinePartition(StatelessSinkPartition[tuple[str, Emitted]]):
    def __init__(self, writer: OnlineWriter) -> None:
        self.writer = writer

    def write_batch(self, items: list[tuple[str, Emitted]]) -> None:
        self.writer.write([r for _, emitted in items for r in emitted.rows])


class OnlineSink(DynamicSink[tuple[str, Emitted]]):
    def __init__(self, open_writer: Any) -> None:
        self.open_writer = open_writer  # called once per worker: each opens its own store

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _OnlinePartition:
        return _OnlinePartition(self.open_writer())


@dataclass(frozen=True)
class _Table:
    """One view's offline table: where, its schema, and its features' places in a row."""

    path: Path
    schema: pa.Schema
    keys: tuple[str, ...]
    created: str
    features: tuple[tuple[str, int], ...]  # (feature, index in Row.values)


def _tables(views: list[View]) -> dict[tuple[str, ...], list[_Table]]:
    """Per key group (its join keys), the offline tables of its views."""
    out: dict[tuple[str, ...], list[_Table]] = {}
    for g in key_groups(views):
        for v in g.views:
            if not v.created:
                raise ValueError(
                    f"streamed view {v.name}: its offline table needs a created timestamp "
                    "column (streamed rows are appended; the newest created wins)"
                )
            features = tuple(g.positions(v.name).items())
            table = _Table(Path(v.table), offline_schema(v), v.keys, v.created, features)
            out.setdefault(g.keys, []).append(table)
    return out


_DAY_US = 86_400_000_000
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


class _OfflinePartition(StatefulSinkPartition[Emitted, None]):
    """Buffers rows and writes, per view, one parquet file per ``date=`` partition of its
    table at each epoch's snapshot, so a committed epoch's rows are on disk (Bytewax
    commits an epoch only after every snapshotted step has written it)."""

    def __init__(self, tables: dict[tuple[str, ...], list[_Table]]) -> None:
        self.tables = tables
        self.buffer: list[Row] = []

    def write_batch(self, items: list[Emitted]) -> None:  # routed by key, keys stripped
        for emitted in items:
            self.buffer += emitted.rows

    def snapshot(self) -> None:
        if not self.buffer:
            return None
        created = int(time.time() * 1e6)
        # a key's row for one instant may come twice in an epoch (a correction after an
        # out-of-order event, a tie in a later batch): only the last one, which supersedes,
        # is written; equal ``created`` would leave Feast's pick between them arbitrary
        latest = {(r.join_keys, r.entity, r.ts_us): r for r in self.buffer}
        by_day: dict[tuple[tuple[str, ...], int], list[Row]] = {}
        for r in latest.values():  # by key group and UTC day (days since the epoch)
            by_day.setdefault((r.join_keys, r.ts_us // _DAY_US), []).append(r)
        for (keys, days), rows in by_day.items():
            day = date.fromordinal(_EPOCH_ORDINAL + days).isoformat()
            for t in self.tables[keys]:
                columns: dict[str, list[Any]] = {
                    k: [r.entity[i] for r in rows] for i, k in enumerate(t.keys)
                }
                columns["event_timestamp"] = [r.ts_us for r in rows]
                columns[t.created] = [created] * len(rows)
                for name, i in t.features:
                    columns[name] = [r.values[i] for r in rows]
                table = pa.table(columns, schema=t.schema)
                folder = t.path / f"date={day}"
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f".stream-{uuid.uuid4().hex}.parquet.tmp"
                pq.write_table(table, tmp)
                tmp.rename(folder / f"stream-{uuid.uuid4().hex}.parquet")  # readers never see half
        metrics.WRITES.labels("offline").inc(len(self.buffer))
        self.buffer = []
        return None

    def close(self) -> None:
        self.snapshot()


class OfflineSink(FixedPartitionedSink[Emitted, None]):
    """Appends rows to each streamed view's own offline table (parquet, ``date=``
    partitions): the view's keys, ``event_timestamp``, its ``created`` column and its
    features."""

    PARTS = 4

    def __init__(self, views: list[View]) -> None:
        self.tables = _tables(views)  # checked now, not at the first epoch

    def list_parts(self) -> list[str]:
        return [str(i) for i in range(self.PARTS)]

    def part_fn(self, item_key: str) -> int:
        return zlib.crc32(item_key.encode()) % self.PARTS  # the same in every process

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _OfflinePartition:
        return _OfflinePartition(self.tables)


def offline_schema(view: View) -> pa.Schema:
    """A streamed view's offline table: its keys, event time, created time, features."""
    fields = [pa.field(k, pa.int64()) for k in view.keys]
    fields += [
        pa.field("event_timestamp", pa.timestamp("us", tz="UTC")),
        pa.field(view.created, pa.timestamp("us", tz="UTC")),
    ]
    for a in view.aggs:
        is_int = view.dtypes.get(a.name) in (Int64, Int32)
        fields.append(pa.field(a.name, pa.int64() if is_int else pa.float64()))
    return pa.schema(fields)
