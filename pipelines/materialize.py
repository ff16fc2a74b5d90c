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

A request-time view (``online_store/tiles.py``) also gets each key's tiles as of the
materialization end: the tiles of its longest window, from the raw events (the valid ones:
the event declaration the batch job and the stream judge by), grouped by key and tile with
pyarrow (:func:`event_tiles`). On Redis they go in the row's ``HSET`` (field
``_tiles:<view>``); on SQLite as the key's ``_tiles`` row, beside the rows Feast's engine
writes (Feast's own read returns only the features asked for). A ScyllaDB tier gets none:
only Feast reads it, and Feast serves the last row.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hiredis
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from feast import FeatureStore, FeatureView
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import python_values_to_proto_values

from online_store import layout
from online_store.connect import NodeClients, redis_client
from online_store.tiers import feast_write, placement
from online_store.tiles import TILES_FEATURE, tile_of, tiles_field, view_plan
from pipelines.contract import computed_views, event_rules
from pipelines.declared import View
from serving.event_rules import EventRules

CHUNK = 5_000  # rows per pipelined batch
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
    ts, created = source.timestamp_field, source.created_timestamp_column or None
    stored = {v: k for k, v in (source.field_mapping or {}).items()}  # feature -> column
    wanted = list(dict.fromkeys([*keys, *features, ts] + ([created] if created else [])))
    table = _between(
        Path(source.path), ts, source.date_partition_column, start, end,
        [stored.get(c, c) for c in wanted],
    )  # fmt: skip
    if table is None:
        return pa.table({c: pa.array([], pa.int64()) for c in keys})
    table = table.rename_columns(wanted)
    if table.num_rows == 0:
        return table
    order = [(k, "ascending") for k in keys] + [(ts, "descending")]
    if created:
        order.append((created, "descending"))
    table = table.sort_by(order)
    return table.filter(_group_starts(table, keys))


def _between(
    path: Path, ts: str, partition: str | None, start: datetime, end: datetime, columns: list[str]
) -> pa.Table | None:
    """The rows of a parquet table with ``start <= ts <= end`` (its ``date=`` partitions
    of the range only); None when there is no table."""
    if not path.exists():
        return None
    dataset = ds.dataset(path, format="parquet", partitioning="hive")
    flt = (ds.field(ts) >= pa.scalar(start, pa.timestamp("us", "UTC"))) & (
        ds.field(ts) <= pa.scalar(end, pa.timestamp("us", "UTC"))
    )
    if partition and partition in dataset.schema.names:
        part = ds.field(partition)
        flt &= (part >= start.date().isoformat()) & (part <= end.date().isoformat())
    return dataset.to_table(columns=columns, filter=flt)


def _group_starts(table: pa.Table, keys: list[str]) -> pa.Array:
    """Per row of ``table`` (sorted by ``keys``): whether it starts a new key."""
    first = None
    for k in keys:  # a row starts its entity's group when any key differs from the last row
        col = table[k].combine_chunks()
        differs = pc.fill_null(pc.not_equal(col, _shifted(col)), True)
        first = differs if first is None else pc.or_(first, differs)
    return first


def _valid(table: pa.Table, rules: EventRules) -> pa.Array:
    """Per event: whether the repo's event declaration counts it (the batch job's
    ``judge`` and the stream's parser refuse the others): every declared integer field
    within the id bounds, every floating one finite within the amount bounds. (Events
    read here are at or before the materialization end, never in the future.)"""
    ok = pa.array([True] * table.num_rows)
    for name in rules.fields:
        if name not in table.column_names:
            continue
        c, kind = table[name], table.schema.field(name).type
        if pa.types.is_integer(kind):
            good = pc.and_(pc.greater_equal(c, rules.id_min), pc.less_equal(c, rules.id_max))
        elif pa.types.is_floating(kind):
            inside = pc.and_(
                pc.greater_equal(c, rules.amount_min), pc.less_equal(c, rules.amount_max)
            )
            good = pc.and_(inside, pc.invert(pc.is_nan(c)))
        else:
            good = pc.is_valid(c)
        ok = pc.and_(ok, pc.fill_null(good, False))
    return ok


def event_tiles(
    view: View, end: datetime, keys: list[str], rules: EventRules
) -> dict[tuple[Any, ...], tuple[bytes, int]]:
    """Each key's tiles as of ``end``: the tiles of the request-time ``view``'s longest
    window ending at ``end`` (``online_store.tiles``), from its raw events (the valid ones,
    of the window's days only), grouped by key and tile in pyarrow. Per tuple of ``keys``
    values: (the blob, its newest event in µs). Keys without an event in the window have
    none: their window is empty (their stored tiles, if any, are all older)."""
    plan = view.tiles
    resolution, ts = plan.resolution_us, view.events.timestamp_field
    end_us = (end - EPOCH) // timedelta(microseconds=1)
    lo_us = (tile_of(end_us, resolution) - plan.longest_tiles + 1) * resolution
    fields = [f for f in rules.fields if f in view.events.columns and f != ts]
    table = _between(
        Path(view.events.history_path), ts, "date", EPOCH + timedelta(microseconds=lo_us), end,
        list(dict.fromkeys([*keys, *plan.columns, *fields, ts])),
    )  # fmt: skip
    if table is None or table.num_rows == 0:
        return {}
    table = table.filter(_valid(table, rules))
    micros = pc.cast(pc.cast(table[ts], pa.timestamp("us", "UTC")), pa.int64())
    tile = np.floor_divide(micros.to_numpy(), resolution)
    table = table.append_column("_tile", pa.array(tile)).append_column("_us", micros)
    slotted = table.select([*keys, "_tile", "_us"])
    for i, c in enumerate(plan.columns):
        slotted = slotted.append_column(f"_c{i}", pc.cast(table[c], pa.float64()))
    grouped = slotted.group_by([*keys, "_tile"]).aggregate(
        [("_us", "count"), ("_us", "max")]
        + [(f"_c{i}", kind) for i, (kind, _) in enumerate(plan.slots[1:])]  # sum|max|min
    )
    grouped = grouped.sort_by([(k, "ascending") for k in [*keys, "_tile"]])
    starts = np.flatnonzero(_group_starts(grouped, keys).to_numpy(zero_copy_only=False))
    bounds = [*starts.tolist(), grouped.num_rows]
    slots = np.column_stack(
        [grouped["_us_count"].to_numpy()]
        + [grouped[f"_c{i}_{k}"].to_numpy() for i, (k, _) in enumerate(plan.slots[1:])]
    ).astype(float)
    tiles = grouped["_tile"].to_numpy()
    newest = grouped["_us_max"].to_numpy()
    key_values = [grouped[k].to_pylist() for k in keys]
    out = {}
    for lo, hi in itertools.pairwise(bounds):
        key = tuple(c[lo] for c in key_values)
        blob = plan.encode(zip(tiles[lo:hi].tolist(), slots[lo:hi], strict=True))
        out[key] = (blob, int(newest[lo:hi].max()))
    return out


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
    request_time: tuple[View, EventRules] | None = None,
) -> ViewLoad:
    """Write ``view``'s newest rows in ``[start, end]`` into the Redis store at
    ``redis_config`` (Feast's layout and skip-if-older rule); a request-time view's row
    (``request_time``: its declaration and the event rules) with its key's tiles as of
    ``end`` (:func:`event_tiles`) in the same ``HSET``."""
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
    blobs: dict[tuple[Any, ...], tuple[bytes, int]] = {}
    no_tiles = b""
    if request_time is not None:
        blobs = event_tiles(request_time[0], end, key_names, request_time[1])
        no_tiles = request_time[0].tiles.encode([])
    project = store.project.encode()
    ts_field = layout.ts_field(view.name)
    tiles_at = tiles_field(view.name)
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
                if request_time is not None:
                    key = tuple(c[row] for c in key_columns)
                    args += [tiles_at, blobs.get(key, (no_tiles,))[0]]
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


def write_sqlite_tiles(
    store: FeatureStore, view: FeatureView, declared: View, rules: EventRules, end: datetime
) -> int:
    """A request-time view's tiles as of ``end`` in the SQLite store, through Feast's own
    writer: per key with events in its longest window, the row ``_tiles`` (a
    ``ValueProto(bytes_val=blob)``) stamped with the key's newest row, beside the rows Feast's
    engine writes (Feast's read returns only the features asked for: an extra row changes
    nothing there). Returns the number of keys written."""
    keys = list(declared.keys)
    blobs = event_tiles(declared, end, keys, rules)
    # stamped like the key's other rows (its newest row by ``end``, which Feast's engine
    # writes or wrote): a key's rows share one event time, which readers take from any of
    # them. A key with events in the window has a row in it.
    plan = declared.tiles
    since = end - timedelta(microseconds=(plan.longest_tiles + 1) * plan.resolution_us)
    rows = newest_rows(view, since, end, keys, [])
    ts = view.batch_source.timestamp_field
    stamps = {tuple(r[k] for k in keys): r[ts] for r in rows.select([*keys, ts]).to_pylist()}
    types = [store.get_entity(e).value_type for e in view.entities]
    data = [
        (
            EntityKeyProto(
                join_keys=keys,
                entity_values=[
                    python_values_to_proto_values([v], t)[0]
                    for v, t in zip(key, types, strict=True)
                ],
            ),
            {TILES_FEATURE: ValueProto(bytes_val=blob)},
            stamps.get(key, EPOCH + timedelta(microseconds=newest)),
            None,
        )
        for key, (blob, newest) in blobs.items()
    ]
    if data:
        feast_write(store, view, data)
    return len(data)


def materialize(
    store: FeatureStore, end: datetime, views: list[str] | None = None
) -> tuple[list[ViewLoad], list[FeatureView]]:
    """Incremental materialization up to ``end`` of the Redis views (fast path); returns
    what was loaded and the views left for Feast's engine. A request-time view gets its
    keys' tiles too: in the row's ``HSET`` on Redis, as its ``_tiles`` row on SQLite
    (written here; Feast's engine then writes the other rows beside it)."""
    loads, others = [], []
    request_time: dict[str, View] = {}
    rules = None
    for view in store.list_feature_views():
        if not view.online or (views and view.name not in views):
            continue
        if view_plan(view) is not None and not request_time:
            repo = Path(store.repo_path)
            request_time = {v.name: v for v in computed_views(repo) if v.tiles}
            rules = event_rules(repo)
        tiled = (request_time[view.name], rules) if view.name in request_time else None
        target = redis_tier(store, view)
        if target is None or not hasattr(view.batch_source, "path"):
            others.append(view)
            if tiled and placement(store, view).kind == "sqlite":
                write_sqlite_tiles(store, view, *tiled, end)
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
            loads.append(load_view(store, view, target[0], start, end, target[1], tiled))
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
