"""Reading what Feast wrote, per store: the serving fast path's readers and the checks'.

Each reader covers the views one store holds (see :mod:`online_store.tiers`) with
everything resolvable precomputed at start-up: one query for all its views on SQLite, one
pipelined round trip on Redis (one ``HMGET`` per entity key, pre-packed on a raw socket),
redis-py's cluster pipeline on Redis Cluster, Feast's own ``online_read`` for any other
store. Values are decoded as Feast's SDK returns them (:mod:`online_store.layout`).

A request-time view (:class:`RequestTime`: its windows end at the request) is read with its
tiles in the same call (the ``_tiles:<view>`` field of the same ``HMGET``; on SQLite the
``_tiles`` row the same ``SELECT`` returns) and answered as of the instant the caller gives
(``online_store.tiles``' semantics): an entity without events in a window, or without a row
at all, has a count and a sum of 0 there, never a missing value. Feast's own read
(:class:`FeastReader`, the tiers it alone reads) has no tiles: it returns the last-event
row, as Feast's SDK does.
"""

from __future__ import annotations

import logging
import sqlite3
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hiredis
from feast import FeatureStore
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.value_type import ValueType
from google.protobuf.message import DecodeError

from online_store.connect import RespClient, RespError, pack, redis_client
from online_store.layout import (
    decode_stamp,
    decode_value,
    decode_values,
    hash_fields,
    materialized_key,
    seconds,
    sqlite_table,
    ts_field,
)
from online_store.tiers import Placement, feast_store, placement
from online_store.tiles import (
    TILES_FEATURE,
    TilePlan,
    declared_aggregations,
    tile_of,
    tiles_field,
    view_plan,
)

# what decoding bytes that are no ValueProto or Timestamp raises
_UNDECODABLE = (DecodeError, ValueError, struct.error)
_log = logging.getLogger("hotpath.online_store")
_logged: dict[str, list[float]] = {}  # view -> [last line (monotonic s), rows since]


def _undecodable(view: str, error: Exception) -> None:
    """A stored value that can't be decoded is missing for its row alone (the rest of
    the batch is read as usual); a warning line per view per 10 s, with the rows since."""
    now = time.monotonic()
    last = _logged.setdefault(view, [-1e9, 0])
    last[1] += 1
    if now - last[0] >= 10.0:
        what = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        _log.warning("undecodable_value view=%s rows=%d error=%s", view, last[1], what)
        last[:] = [now, 0]


def _salvaged(
    ts_blob: bytes | None, blobs: Sequence[bytes | None], rt: Any
) -> tuple[float | None, list[Any] | None]:
    """A view's row with an undecodable value: the others decoded, that one missing; the
    whole row missing when its event time is undecodable (or it is request-time)."""
    try:
        stamp = decode_stamp(ts_blob)
    except _UNDECODABLE:
        return (None, None)
    if rt is not None:
        return (None, None)
    values = []
    for blob in blobs:
        try:
            values.append(decode_value(blob))
        except _UNDECODABLE:
            values.append(None)
    return (stamp, values)


class _TileMemo:
    """One request-time view's evaluated blobs, for one tile of the instant: a blob's
    values change only when the instant enters another tile (then it starts afresh)."""

    __slots__ = ("tile", "values", "size")

    def __init__(self) -> None:
        self.tile: int | None = None
        self.values: dict[bytes | None, tuple[Any, ...]] = {}
        self.size = 0  # bytes of the blobs kept


@dataclass(frozen=True)
class RequestTime:
    """A request-time view's tile plan (``online_store.tiles.view_plan``, built once) and,
    per feature read, its aggregation's place in :meth:`TilePlan.evaluate`'s answer."""

    plan: TilePlan
    pick: tuple[int, ...]
    # a ranking request's candidates come back request after request (evaluating 100
    # merchants' tiles was a tenth of a ranking request's time)
    _memo: _TileMemo = field(default_factory=_TileMemo, repr=False, compare=False)

    @classmethod
    def of(cls, view: Any, features: Sequence[str]) -> RequestTime | None:
        """For a registered feature view read for ``features``; None: its windows end at
        its last event (no ``hotpath.request_time`` tag)."""
        plan = view_plan(view)
        if plan is None:
            return None
        names = [a.name for a in declared_aggregations(view)]
        return cls(plan, tuple(names.index(f) for f in features))

    def values(self, blobs: Sequence[bytes | None], now_us: int) -> list[tuple[Any, ...]]:
        """Per entity, the features' values at ``now_us`` from its tiles blob (None: no
        tiles, empty windows): those not evaluated in this tile before, all at once
        (``evaluate_many``)."""
        tile, memo = tile_of(now_us, self.plan.resolution_us), self._memo
        if memo.tile != tile:
            memo.tile, memo.values, memo.size = tile, {}, 0
        known = memo.values
        got: dict[bytes | None, Any] = {b: known.get(b) for b in blobs}
        new = [b for b, v in got.items() if v is None]
        if new:
            pick = self.pick
            for b, out in zip(new, self.plan.evaluate_many(new, now_us), strict=True):
                got[b] = value = tuple(out[i] for i in pick)
                if memo.size < _MEMO_BYTES:
                    known[b] = value
                    memo.size += len(b) if b else 0
        return [got[b] for b in blobs]


_MEMO_BYTES = 16 << 20  # blob bytes kept per request-time view within a tile


@dataclass(frozen=True)
class ViewPlan:
    """What to read of one feature view: its sorted join keys, their types, the features
    (in the order callers get them), its TTL and, for a request-time view, its tiles."""

    name: str
    join_keys: tuple[str, ...]
    key_types: tuple[ValueType, ...]
    features: tuple[str, ...]
    ttl_s: float | None
    request_time: RequestTime | None = None

    @classmethod
    def of(cls, store: FeatureStore, view: Any, features: Sequence[str]) -> ViewPlan:
        """The plan of a registered feature view read for ``features``."""
        keys = sorted(
            (store.get_entity(e).join_key, store.get_entity(e).value_type) for e in view.entities
        )
        names = tuple(features)
        return cls(
            view.name,
            tuple(k for k, _ in keys),
            tuple(t for _, t in keys),
            names,
            view.ttl.total_seconds() if view.ttl else None,
            RequestTime.of(view, names),
        )


Found = list[tuple[float | None, Sequence[Any] | None]]
Keys = dict[tuple[str, ...], list[bytes]]  # serialized entity keys per set of join keys


class Reader:
    """Reads its views for a batch of entity keys: ``send`` issues the request,
    ``receive`` returns, per view (in plan order) and row, (event time, values in the
    view's feature order) or (None, None) when the entity has no row (or its stored bytes
    decode as no value). A request-time view (``plans[i].request_time``) has values as of
    ``now_us`` (empty windows without a row); its event time is its last event's (None:
    no row). A request sent is either received or abandoned."""

    plans: list[ViewPlan]  # the views as this reader answers them (plan order)

    def send(self, keys: Keys) -> Any:
        return keys

    def receive(self, handle: Any, now_us: int) -> list[Found]:
        raise NotImplementedError

    def abandon(self) -> None:
        """Forget a request sent and not to be received (another tier failed first): its
        replies must not answer the next one."""

    def read(self, keys: Keys, now_us: int | None = None) -> list[Found]:
        """``send`` then ``receive``; request-time views as of ``now_us`` (default: now)."""
        now_us = int(time.time() * 1e6) if now_us is None else now_us
        return self.receive(self.send(keys), now_us)

    def ping(self) -> None:
        """Raise unless the store answers."""

    def unmaterialized(self, views: list[str]) -> list[str]:
        """Those of ``views`` with no materialized data here (unknown: none)."""
        return []


class SqliteReader(Reader):
    """One ``SELECT ... WHERE entity_key IN (...)`` per view, in one statement, on a shared
    connection."""

    def __init__(self, path: Path, project: str, views: list[ViewPlan]) -> None:
        if not path.exists():
            raise FileNotFoundError(f"online store {path} does not exist")
        self.conn = sqlite3.connect(path, check_same_thread=False)
        self.lock = threading.Lock()  # readers run in worker threads; one at a time
        self.project = project
        self.views = self.plans = views
        self._sql: dict[tuple[int, int], str] = {}  # per (view, number of keys): its SELECT

    def ping(self) -> None:
        with self.lock:
            self.conn.execute("SELECT 1").fetchall()

    def unmaterialized(self, views: list[str]) -> list[str]:
        with self.lock:
            return [
                v
                for v in views
                if not self.conn.execute(
                    f'SELECT EXISTS (SELECT 1 FROM "{sqlite_table(self.project, v)}")'
                ).fetchone()[0]
            ]

    def receive(self, keys, now_us):
        parts = []  # one SELECT per view, for its number of keys (entities may differ)
        for i, plan in enumerate(self.views):
            n = len(keys[plan.join_keys])
            part = self._sql.get((i, n))
            if part is None:
                part = self._sql[(i, n)] = (
                    f"SELECT {i}, entity_key, feature_name, value, event_ts "
                    f'FROM "{sqlite_table(self.project, plan.name)}" '
                    f"WHERE entity_key IN ({','.join('?' * n)})"
                )
            parts.append(part)
        sql = " UNION ALL ".join(parts)
        params = [b for plan in self.views for b in keys[plan.join_keys]]
        found: list[dict[bytes, list[Any]]] = [{} for _ in self.views]  # key -> [stamp, values]
        with self.lock:
            rows = self.conn.execute(sql, params).fetchall()
        for i, key, feature, value, event_ts in rows:
            entry = found[i].get(key)
            if entry is None:
                entry = found[i][key] = [None, {}]
            if feature == TILES_FEATURE:  # raw bytes, not memoised (each entity's differ)
                entry[1][feature] = value
                continue
            if entry[0] is None:  # the view's event time: its rows', not its tiles' row
                entry[0] = seconds(event_ts)
            try:
                entry[1][feature] = decode_value(value)
            except _UNDECODABLE as e:  # a foreign writer's bytes: this value only
                _undecodable(self.views[i].name, e)
                entry[1][feature] = None
        out = []
        for i, plan in enumerate(self.views):
            rt = plan.request_time
            if rt is not None:  # every row's values from its tiles, evaluated at once
                hits = [found[i].get(b) for b in keys[plan.join_keys]]
                raw = [hit[1].get(TILES_FEATURE) if hit is not None else None for hit in hits]
                blobs, bad = [], []
                for j, r in enumerate(raw):
                    try:
                        blobs.append(ValueProto.FromString(r).bytes_val if r else None)
                    except _UNDECODABLE as e:  # missing, not empty windows
                        _undecodable(plan.name, e)
                        blobs.append(None)
                        bad.append(j)
                values = rt.values(blobs, now_us)
                got = [(hit and hit[0], v) for hit, v in zip(hits, values, strict=True)]
                for j in bad:
                    got[j] = (None, None)
                out.append(got)
                continue
            per_view: Found = []
            for b in keys[plan.join_keys]:
                hit = found[i].get(b)
                if hit is None:
                    per_view.append((None, None))
                else:
                    per_view.append((hit[0], [hit[1].get(f) for f in plan.features]))
            out.append(per_view)
        return out


class RedisReader(Reader):
    """One round trip: one ``HMGET`` per entity key and row covering every view on that
    key (Feast keeps all of an entity's views in one hash), sent pre-packed on a raw
    socket."""

    def __init__(self, client: RespClient, project: str, views: list[ViewPlan]) -> None:
        self.client = client
        self.project_bytes = project.encode()  # Feast's key: serialized entity key + project
        self.n_views = len(views)
        self.plans = views
        # per entity key: the views on it (index, feature count, request-time plan or None),
        # the HMGET header and the packed field list (each view's features, then its
        # ``_ts:<view>``, then a request-time view's ``_tiles:<view>``)
        self.groups: list[
            tuple[tuple[str, ...], list[tuple[int, int, RequestTime | None]], bytes, bytes]
        ] = []
        by_key: dict[tuple[str, ...], list[int]] = {}
        for i, plan in enumerate(views):
            by_key.setdefault(plan.join_keys, []).append(i)
        for join_keys, members in by_key.items():
            fields = _hmget_fields(views, members)
            head = f"*{len(fields) + 2}\r\n$5\r\nHMGET\r\n".encode()
            tail = pack("HMGET", b"", *fields)[len(head) + len(b"$0\r\n\r\n") :]
            spans = [(i, len(views[i].features), views[i].request_time) for i in members]
            self.groups.append((join_keys, spans, head, tail))

    def ping(self) -> None:
        self.client.execute(pack("PING"), 1)

    def unmaterialized(self, views: list[str]) -> list[str]:
        key = materialized_key(self.project_bytes.decode())
        (stamps,) = self.client.execute(pack("HMGET", key, *views), 1)
        return [v for v, stamp in zip(views, stamps, strict=True) if not stamp]

    def send(self, keys):
        commands = []
        for join_keys, _, head, tail in self.groups:
            for entity_key in keys[join_keys]:
                key = entity_key + self.project_bytes
                commands.append(b"%s$%d\r\n%s\r\n%s" % (head, len(key), key, tail))
        self.client.send(b"".join(commands))
        return keys, len(commands)

    def receive(self, handle, now_us):
        keys, n = handle
        return self._parse(keys, iter(self.client.receive(n, errors=True)), now_us)

    def abandon(self) -> None:
        self.client.close()  # the replies in flight go with the connection

    def _parse(self, keys: Keys, replies: Any, now_us: int) -> list[Found]:
        out: list[Found] = [[] for _ in range(self.n_views)]
        # request-time views: their blobs, in row order
        tiles: dict[int, tuple[RequestTime, list[bytes | None]]] = {}
        bad: list[tuple[int, int]] = []  # (view, row) of request-time rows not decoded
        for join_keys, spans, _, _ in self.groups:
            for _ in keys[join_keys]:
                raw = next(replies)
                if isinstance(raw, Exception):  # an error reply for this key
                    if not str(raw).startswith("WRONGTYPE"):  # the store's, not the key's
                        raise RespError(str(raw)) if isinstance(raw, hiredis.ReplyError) else raw
                    # a foreign writer's value that is no hash: nothing of this row is read
                    _undecodable(self.plans[spans[0][0]].name, raw)
                    for i, _, rt in spans:
                        out[i].append((None, None))
                        if rt is not None:
                            tiles.setdefault(i, (rt, []))[1].append(None)
                            bad.append((i, len(out[i]) - 1))
                    continue
                at = 0
                for i, n, rt in spans:
                    values, ts_blob = raw[at : at + n], raw[at + n]
                    at += n + 1
                    if rt is not None:  # its values: evaluated below, all rows at once
                        tiles.setdefault(i, (rt, []))[1].append(raw[at])
                        at += 1
                    try:
                        if rt is not None:
                            out[i].append((decode_stamp(ts_blob) if ts_blob else None, None))
                        elif any(values):
                            out[i].append((decode_stamp(ts_blob), decode_values(values)))
                        else:
                            out[i].append((None, None))
                    except _UNDECODABLE as e:  # a foreign writer's bytes: this row only
                        _undecodable(self.plans[i].name, e)
                        out[i].append(_salvaged(ts_blob, values, rt))
                        if rt is not None:  # nor its tiles: missing, not empty windows
                            bad.append((i, len(out[i]) - 1))
        for i, (rt, blobs) in tiles.items():
            values = rt.values(blobs, now_us)
            out[i] = [(stamp, v) for (stamp, _), v in zip(out[i], values, strict=True)]
        for i, row in bad:
            out[i][row] = (None, None)
        return out


class RedisClusterReader(RedisReader):
    """Redis Cluster: the same HMGETs through redis-py's cluster pipeline, which sends
    each to the master owning its slot (one round trip per node)."""

    def __init__(self, client: Any, project: str, views: list[ViewPlan]) -> None:
        super().__init__(None, project, views)  # type: ignore[arg-type]
        self.cluster = client
        self.fields = {
            join_keys: _hmget_fields(views, [span[0] for span in spans])
            for join_keys, spans, _, _ in self.groups
        }

    def ping(self) -> None:
        self.cluster.ping()

    def unmaterialized(self, views: list[str]) -> list[str]:
        # through a pipeline: redis-py's single-command path sleeps 0.25 s (hard-coded) on
        # each CLUSTERDOWN reply, which during a failover stalled the serving event loop
        pipe = self.cluster.pipeline(transaction=False)
        pipe.hmget(materialized_key(self.project_bytes.decode()), views)
        (stamps,) = pipe.execute()
        return [v for v, stamp in zip(views, stamps, strict=True) if not stamp]

    def send(self, keys):
        return keys  # nothing goes out before receive

    def abandon(self) -> None:
        return None

    def receive(self, keys, now_us):
        pipe = self.cluster.pipeline(transaction=False)
        for join_keys, _, _, _ in self.groups:
            for entity_key in keys[join_keys]:
                pipe.hmget(entity_key + self.project_bytes, self.fields[join_keys])
        return self._parse(keys, iter(pipe.execute(raise_on_error=False)), now_us)


class FeastReader(Reader):
    """Any other tier (ScyllaDB, Cassandra...): Feast's own ``online_read`` for the tier.
    It reads no tiles: a request-time view's values are its last-event row (as Feast's SDK
    serves it), and its TTL applies."""

    def __init__(self, store: FeatureStore, tier: str | None, views: list[ViewPlan]) -> None:
        self.config, self.online = feast_store(store, tier)
        self.views = [store.get_feature_view(v.name) for v in views]
        self.plans = [replace(v, request_time=None) for v in views]
        self.project = store.project

    def receive(self, keys, now_us):
        from feast.infra.key_encoding_utils import deserialize_entity_key

        out = []
        for view, plan in zip(self.views, self.plans, strict=True):
            protos = [deserialize_entity_key(k, 3) for k in keys[plan.join_keys]]
            rows = self.online.online_read(self.config, view, protos, list(plan.features))
            per_view: Found = []
            for ts, values in rows:
                if values is None:
                    per_view.append((None, None))
                    continue
                stamp = seconds(ts)
                per_view.append(
                    (
                        stamp,
                        [
                            decode_value(values[f].SerializeToString()) if f in values else None
                            for f in plan.features
                        ],
                    )
                )
            out.append(per_view)
        return out


def _hmget_fields(views: list[ViewPlan], members: list[int]) -> list[bytes]:
    """The HMGET fields of ``members`` of ``views``, one view after another (a request-time
    view's tiles after its event time)."""
    return [
        f
        for i in members
        for f in hash_fields(views[i].name, views[i].features)
        + ([tiles_field(views[i].name)] if views[i].request_time else [])
    ]


def _sqlite_path(store: FeatureStore, config: Any) -> Path:
    """A SQLite store's file, relative paths from the repo (as Feast resolves them)."""
    path = Path(config.path)
    return path if path.is_absolute() else Path(store.repo_path) / path


def readers(
    store: FeatureStore, views: list[ViewPlan], timeout_s: float = 1.0
) -> list[tuple[Reader, list[int]]]:
    """One reader per store holding some of ``views`` (one, unless the store is tiered),
    each with the indexes of the views it reads; the fastest kind for each store: raw
    Redis, Redis Cluster, SQLite, or Feast's own read for anything else."""
    return [
        (_reader(store, where, [views[i] for i in members], timeout_s), members)
        for where, members in _by_store(store, [v.name for v in views])
    ]


def _by_store(store: FeatureStore, views: list[str]) -> list[tuple[Placement, list[int]]]:
    """The stores holding ``views``, each with the indexes of the views it holds."""
    groups: dict[str | None, tuple[Placement, list[int]]] = {}
    for i, view in enumerate(views):
        where = placement(store, view)
        groups.setdefault(where.tier, (where, []))[1].append(i)
    return list(groups.values())


def _reader(
    store: FeatureStore, where: Placement, views: list[ViewPlan], timeout_s: float
) -> Reader:
    cfg, project = where.config, store.project
    if where.kind == "sqlite":
        return SqliteReader(_sqlite_path(store, cfg), project, views)
    if where.kind == "redis":
        if cfg.redis_type == "redis_cluster":
            return RedisClusterReader(redis_client(cfg, timeout_s), project, views)
        if cfg.redis_type == "redis":
            return RedisReader(
                RespClient.from_feast(cfg.connection_string, timeout_s), project, views
            )
    return FeastReader(store, where.tier, views)


def reads_tiles(where: Placement) -> bool:
    """Whether the fast path reads a request-time view's tiles in this store (SQLite, Redis,
    Redis Cluster: what :func:`_reader` reads itself). Anywhere else Feast's own read would
    answer last-event values, so ``hotpath apply`` refuses a request-time view there."""
    if where.kind == "sqlite":
        return True
    return where.kind == "redis" and where.config.redis_type in ("redis", "redis_cluster")


# ------------------------------------------------------------------ checks


class StoreMissing(FileNotFoundError):
    """The online store has not been written yet."""


def newest_event_times(
    store: FeatureStore, views: list[str], max_keys: int = 200_000
) -> dict[str, datetime | None]:
    """The newest stored event time of each view, per store holding it: SQLite's
    ``MAX(event_ts)`` of the view's table; in Redis, the newest ``_ts:<view>`` over up to
    ``max_keys`` scanned keys (per store), enough to find the newest write of a live store.
    Raises ``NotImplementedError`` for a store kind it cannot read."""
    out: dict[str, datetime | None] = {}
    for where, members in _by_store(store, views):
        names = [views[i] for i in members]
        if where.kind == "sqlite":
            out |= _sqlite_newest(store, where.config, names)
        elif where.kind == "redis":
            out |= _redis_newest(redis_client(where.config), names, max_keys)
        else:
            tier = f" (tier {where.tier})" if where.tier else ""
            raise NotImplementedError(f"the {where.kind!r} online store{tier}")
    return out


def _sqlite_newest(
    store: FeatureStore, config: Any, views: list[str]
) -> dict[str, datetime | None]:
    path = _sqlite_path(store, config)
    if not path.exists():
        raise StoreMissing(f"online store {path} does not exist (run `hotpath materialize`)")
    db = sqlite3.connect(path)
    out: dict[str, datetime | None] = {}
    try:
        for view in views:
            try:
                (value,) = db.execute(
                    f'SELECT MAX(event_ts) FROM "{sqlite_table(store.project, view)}"'
                ).fetchone()
            except sqlite3.OperationalError:
                value = None
            stamp = seconds(value)
            out[view] = None if stamp is None else datetime.fromtimestamp(stamp, UTC)
    finally:
        db.close()
    return out


def _redis_newest(client: Any, views: list[str], max_keys: int) -> dict[str, datetime | None]:
    fields = [ts_field(v) for v in views]
    newest: dict[str, float] = {}
    keys = []
    for i, key in enumerate(client.scan_iter(count=1000)):
        if i >= max_keys:
            break
        keys.append(key)
    for start in range(0, len(keys), 500):
        pipe = client.pipeline(transaction=False)
        for key in keys[start : start + 500]:
            pipe.hmget(key, fields)
        for values in pipe.execute(raise_on_error=False):
            if isinstance(values, Exception):  # not a hash (a stream, a plain value)
                continue
            for view, raw in zip(views, values, strict=True):
                if raw:
                    newest[view] = max(newest.get(view, 0.0), decode_stamp(raw))
    return {v: datetime.fromtimestamp(newest[v], UTC) if v in newest else None for v in views}
