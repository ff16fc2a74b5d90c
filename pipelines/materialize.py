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

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hiredis
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from feast import FeatureStore, FeatureView

from online_store import layout
from online_store.connect import NodeClients, redis_client
from online_store.tiers import placement

CHUNK = 5_000  # rows per pipelined batch


class UnsupportedView(ValueError):
    """A key or value type this path does not encode: Feast's engine loads the view."""


@dataclass
class ViewLoad:
    view: str
    rows: int  # entity rows read (newest per entity in the window)
    written: int  # rows newer than what the store held
    seconds: float


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
    stored = {v: k for k, v in (source.field_mapping or {}).items()}  # feature -> column
    wanted = list(dict.fromkeys([*keys, *features, ts] + ([created] if created else [])))
    table = dataset.to_table(columns=[stored.get(c, c) for c in wanted], filter=flt)
    table = table.rename_columns(wanted)
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
        encoder = layout.KeyEncoder.for_view(store, view)
        encoders = [layout.value_bytes(f.dtype) for f in view.features]  # fail before I/O
    except ValueError as e:
        raise UnsupportedView(f"{view.name}: {e}") from None
    key_names = list(encoder.join_keys)
    table = newest_rows(view, start, end, key_names, features)
    n = table.num_rows
    if n == 0:
        return ViewLoad(view.name, 0, 0, time.perf_counter() - t0)
    project = store.project.encode()
    ts_field = layout.ts_field(view.name)
    fields = [layout.feature_field(view.name, f) for f in features]
    columns = [table[c].to_pylist() for c in features]
    key_columns = [table[c].to_pylist() for c in key_names]
    stamps = pc.cast(table[view.batch_source.timestamp_field], pa.timestamp("us", "UTC"))
    micros = pc.cast(stamps, pa.int64()).to_pylist()
    ttl = view.ttl.total_seconds() if view.ttl else 0
    nodes = NodeClients(redis_config)
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
                if old and layout.stamp_micros(old) >= us:
                    continue  # Feast's rule: skip older or same-instant rows
                args: list[bytes] = [b"HSET", keys[i], ts_field, layout.encode_stamp(us)]
                for field, encode, col in zip(fields, encoders, columns, strict=True):
                    args += [field, encode(col[row])]
                commands.append(hiredis.pack_command(tuple(args)))
                if expire and ttl:
                    at = layout.expire_at(us / 1e6, ttl)
                    commands += map(hiredis.pack_command, layout.expire_commands(keys[i], at))
            if commands:
                client = nodes.clients[node]
                client.send(b"".join(commands))
                client.receive(len(commands))
                written += len(commands) // (3 if expire and ttl else 1)
    nodes.close()
    return ViewLoad(view.name, n, written, time.perf_counter() - t0)


def redis_tier(store: FeatureStore, view: FeatureView) -> tuple[Any, bool] | None:
    """The Redis store config ``view`` lives in, and whether keys get expiry (tiered
    stores set it); None when the view is not in Redis."""
    where = placement(store, view)
    return (where.config, where.expires) if where.kind == "redis" else None


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
    target = redis_tier(store, view)
    if target is None:
        return
    client = redis_client(target[0])
    client.hset(layout.materialized_key(store.project), view.name, end.isoformat())
