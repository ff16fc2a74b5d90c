"""Materialization into Redis tiers, fast: the newest offline row per entity, written in
Feast's Redis layout with pipelined raw commands.

Feast's engines write ~10k rows/s here (the local engine; the Spark engine's workers are
slower still): per row they build protobufs, read the stored timestamp and queue redis-py
commands at ~10 µs of Python each. This reads the view's parquet table with pyarrow
(the partitions of the window only), keeps each entity's newest row in
``[start, end]`` (ties by ``created``), reads the stored ``_ts:<view>`` of every key in
one pipelined pass and writes the newer rows in a second — Feast's semantics (an older
row never overwrites a newer one), its key, field and value encodings, and its
materialization record in the registry, so ``materialize-incremental`` continues from
here. On a Redis Cluster, keys are grouped by the node owning their slot. Views in any
other store (SQLite, ScyllaDB tiers) go through Feast's own engine.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hiredis
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from feast import FeatureStore, FeatureView
from feast.infra.online_stores.helpers import _mmh3
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.types import Float32, Float64, Int32, Int64, String
from google.protobuf.timestamp_pb2 import Timestamp

from serving.online_features import KeyEncoder
from serving.resp import RespClient

CHUNK = 5_000  # rows per pipelined batch


class UnsupportedView(ValueError):
    """A key or value type this path does not encode: Feast's engine loads the view."""


@dataclass
class ViewLoad:
    view: str
    rows: int  # entity rows read (newest per entity in the window)
    written: int  # rows newer than what the store held
    seconds: float


def _value_encoder(dtype: Any) -> Callable[[Any], bytes]:
    """Python value -> serialized ValueProto, as Feast writes it (empty for nulls)."""
    if dtype == Float64:
        pack = struct.Struct("<d").pack
        return lambda v: b"" if v is None or v != v else b")" + pack(v)  # field 5, fixed64
    cache: dict[Any, bytes] = {}
    field = {Int64: "int64_val", Int32: "int32_val", String: "string_val", Float32: "float_val"}
    name = field.get(dtype)
    if name is None:
        raise UnsupportedView(f"fast materialization does not encode {dtype}")

    def encode(v: Any) -> bytes:
        if v is None or v != v:
            return b""
        out = cache.get(v)
        if out is None:
            out = ValueProto(**{name: v}).SerializeToString()
            if len(cache) < 100_000:
                cache[v] = out
        return out

    return encode


def newest_rows(
    view: FeatureView, start: datetime, end: datetime, keys: list[str], features: list[str]
) -> pa.Table:
    """Each entity's newest row with ``start <= event_timestamp <= end`` from the view's
    parquet table (date partitions of the window only)."""
    source = view.batch_source
    path = Path(source.path)
    ts, created = source.timestamp_field, source.created_timestamp_column or None
    if not path.exists():
        return pa.table({c: pa.array([], pa.int64()) for c in keys})
    dataset = ds.dataset(path, format="parquet", partitioning="hive")
    flt = (ds.field(ts) >= pa.scalar(start, pa.timestamp("us", "UTC"))) & (
        ds.field(ts) <= pa.scalar(end, pa.timestamp("us", "UTC"))
    )
    if source.date_partition_column and source.date_partition_column in dataset.schema.names:
        part = ds.field(source.date_partition_column)
        flt &= (part >= start.date().isoformat()) & (part <= end.date().isoformat())
    wanted = list(dict.fromkeys([*keys, *features, ts] + ([created] if created else [])))
    table = dataset.to_table(columns=wanted, filter=flt)
    if table.num_rows == 0:
        return table
    order = [(k, "ascending") for k in keys] + [(ts, "descending")]
    if created:
        order.append((created, "descending"))
    table = table.sort_by(order)
    first = None
    for k in keys:  # a row starts its entity's group when any key differs from the last row
        col = table[k].combine_chunks()
        differs = pc.fill_null(pc.not_equal(col, _shifted(col)), True)
        first = differs if first is None else pc.or_(first, differs)
    return table.filter(first)


def _shifted(column: pa.Array) -> pa.Array:
    """The column moved down one row (first row null)."""
    return pa.concat_arrays([pa.nulls(1, column.type), column.slice(0, len(column) - 1)])


class _Nodes:
    """Where each key goes: one raw connection per Redis node (one for standalone)."""

    def __init__(self, config: Any) -> None:
        from feast.infra.online_stores.redis import RedisOnlineStore

        self.cluster = config.redis_type == "redis_cluster"
        nodes, params = RedisOnlineStore._parse_connection_string(config.connection_string)
        auth = {
            "username": None if params.get("username") is None else str(params["username"]),
            "password": None if params.get("password") is None else str(params["password"]),
            "use_ssl": bool(params.get("ssl", False)),
            "timeout_s": 30.0,
        }
        if not self.cluster:
            self.clients = [
                RespClient(
                    nodes[0]["host"], int(nodes[0]["port"]), int(params.get("db", 0)), **auth
                )
            ]
            return
        import redis

        rc = redis.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(n["host"], int(n["port"])) for n in nodes],
            username=auth["username"],
            password=auth["password"],
            ssl=auth["use_ssl"],
        )
        self.slot_node: list[int] = [0] * 16384
        names: dict[str, int] = {}
        self.clients = []
        for slot, holders in rc.nodes_manager.slots_cache.items():
            primary = holders[0]
            if primary.name not in names:
                names[primary.name] = len(self.clients)
                self.clients.append(RespClient(primary.host, int(primary.port), 0, **auth))
            self.slot_node[slot] = names[primary.name]
        rc.close()

    def node_of(self, key: bytes) -> int:
        if not self.cluster:
            return 0
        from redis.crc import key_slot

        return self.slot_node[key_slot(key)]


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for i in range(0, n, size):
        yield i, min(n, i + size)


def load_view(
    store: FeatureStore,
    view: FeatureView,
    redis_config: Any,
    start: datetime,
    end: datetime,
    expire: bool,
) -> ViewLoad:
    """Write ``view``'s newest rows in ``[start, end]`` into the Redis store at
    ``redis_config`` (Feast's layout and skip-if-older rule)."""
    import time

    t0 = time.perf_counter()
    features = [f.name for f in view.features]
    try:
        encoder = KeyEncoder.for_view(store, view)
    except ValueError as e:
        raise UnsupportedView(f"{view.name}: {e}") from None
    key_names = list(encoder.join_keys)
    encoders = [_value_encoder(f.dtype) for f in view.features]  # unsupported: fail before I/O
    table = newest_rows(view, start, end, key_names, features)
    n = table.num_rows
    if n == 0:
        return ViewLoad(view.name, 0, 0, time.perf_counter() - t0)
    project = store.project.encode()
    ts_field = f"_ts:{view.name}".encode()
    fields = [_mmh3(f"{view.name}:{f}") for f in features]
    columns = [table[c].to_pylist() for c in features]
    key_columns = [table[c].to_pylist() for c in key_names]
    stamps = pc.cast(table[view.batch_source.timestamp_field], pa.timestamp("us", "UTC"))
    micros = pc.cast(stamps, pa.int64()).to_pylist()
    ttl = view.ttl.total_seconds() if view.ttl else 0
    nodes = _Nodes(redis_config)
    written = 0
    for lo, hi in _chunks(n, CHUNK):
        keys = [
            encoder.encode_values(vals) + project
            for vals in zip(*(c[lo:hi] for c in key_columns), strict=True)
        ]
        where = [nodes.node_of(k) for k in keys]
        # pass 1: the stored event time of every key, one round trip per node
        per_node: dict[int, list[int]] = {}
        for i, node in enumerate(where):
            per_node.setdefault(node, []).append(i)
        stored: list[bytes | None] = [None] * len(keys)
        for node, idx in per_node.items():
            client = nodes.clients[node]
            client.send(b"".join(hiredis.pack_command(("HGET", keys[i], ts_field)) for i in idx))
            for i, reply in zip(idx, client.receive(len(idx)), strict=True):
                stored[i] = reply
        # pass 2: write the rows newer than what is stored
        for node, idx in per_node.items():
            commands = []
            for i in idx:
                row = lo + i
                us = micros[row]
                old = stored[i]
                if old:
                    prev = Timestamp()
                    prev.ParseFromString(old)
                    if prev.seconds * 1_000_000 + prev.nanos // 1000 >= us:
                        continue  # Feast's rule: skip older or same-instant rows
                stamp = Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)
                args: list[bytes] = [b"HSET", keys[i], ts_field, stamp.SerializeToString()]
                for field, encode, col in zip(fields, encoders, columns, strict=True):
                    args += [field, encode(col[row])]
                commands.append(hiredis.pack_command(tuple(args)))
                if expire and ttl:
                    at = str(int(us / 1e6 + ttl) + 1).encode()
                    commands.append(hiredis.pack_command((b"EXPIREAT", keys[i], at, b"NX")))
                    commands.append(hiredis.pack_command((b"EXPIREAT", keys[i], at, b"GT")))
            if commands:
                client = nodes.clients[node]
                client.send(b"".join(commands))
                client.receive(len(commands))
                written += len(commands) // (3 if expire and ttl else 1)
    for c in nodes.clients:
        c.close()
    return ViewLoad(view.name, n, written, time.perf_counter() - t0)


def redis_tier(store: FeatureStore, view: FeatureView) -> tuple[Any, bool] | None:
    """The Redis store config ``view`` lives in, and whether keys get expiry (tiered
    stores set it); None when the view is not in Redis."""
    from feast.repo_config import get_online_config_from_type

    from serving.tiered_store import TYPE, tier_of

    cfg = store.config.online_store
    if cfg.type == "redis":
        return cfg, False
    if cfg.type == TYPE:
        conf = dict(cfg.tiers.get(tier_of(view, cfg.routing_tag) or "", {}))
        if conf.get("type") == "redis":
            return get_online_config_from_type("redis")(**conf), True
    return None


def materialize(
    store: FeatureStore, end: datetime, views: list[str] | None = None
) -> tuple[list[ViewLoad], list[FeatureView]]:
    """Incremental materialization up to ``end`` of the Redis views (fast path); returns
    what was loaded and the views left for Feast's engine."""
    loads, others = [], []
    for view in store.list_feature_views():
        if not view.online or (views and view.name not in views):
            continue
        target = redis_tier(store, view)
        if target is None or not hasattr(view.batch_source, "path"):
            others.append(view)
            continue
        intervals = view.materialization_intervals
        if intervals:
            start = max(i[1] for i in intervals)
        elif view.ttl:
            start = end - view.ttl
        else:
            start = datetime(1970, 1, 1, tzinfo=UTC)
        start = start.astimezone(UTC) if start.tzinfo else start.replace(tzinfo=UTC)
        try:
            loads.append(load_view(store, view, target[0], start, end, target[1]))
        except UnsupportedView:
            others.append(view)
            continue
        store.registry.apply_materialization(view, store.project, start, end)
        mark_materialized(store, view, end)
    return loads, others


def mark_materialized(store: FeatureStore, view: FeatureView, end: datetime) -> None:
    """Record in the view's Redis tier that it holds materialized data (serving's
    readiness looks for it: a Redis that restarted empty has no record)."""
    from feast.infra.online_stores.redis import RedisOnlineStore

    from serving.online_features import materialized_key

    target = redis_tier(store, view)
    if target is None:
        return
    client = RedisOnlineStore()._get_client(target[0])
    client.hset(materialized_key(store.project), view.name, end.isoformat())
