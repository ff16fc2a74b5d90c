"""The computations the feature repo declares, read once for both engines.

A computed view is a Feast ``FeatureView`` built by ``feature_repo/aggregated.py``: its tags
carry the events source, the cadence and Feast ``Aggregation`` protos (see that file for
the semantics). :func:`computed_views` turns them into :class:`View` objects the Spark
compiler (``pipelines.batch_compile``) and the Bytewax compiler (``pipelines.stream``)
share, and refuses a bad declaration with one line naming the view and the problem, so it
fails at ``hotpath apply``, not in the stream at night.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from feast import Entity, FeatureView
from feast.aggregation import Aggregation

from online_store.tiles import REQUEST_TIME_TAG, TilePlan, declared_aggregations, view_plan
from pipelines.errors import HotpathError

PER_EVENT, DAILY = "per_event", "daily"
FUNCTIONS = ("count", "sum", "mean", "max", "min", "count_distinct")
US = 1_000_000
DAY_US = 86_400 * US
_NUMERIC = {"bigint", "long", "int", "double", "float", "boolean"}
_TIME = {"timestamp"}


class DeclarationError(HotpathError):
    """A computed view's declaration the engines cannot compute (one line: view, problem)."""


@dataclass(frozen=True)
class Agg:
    """One declared aggregation: ``function`` of ``column`` over a window of ``window_us``."""

    name: str
    column: str
    function: str
    window_us: int
    known_at: str | None = None  # daily views: the value counts only once this time passed


@dataclass(frozen=True)
class Events:
    """The events source a view aggregates: its name, the history the backfill reads (a
    parquet folder partitioned by ``date``), its timestamp field and column types."""

    name: str
    history_path: str
    timestamp_field: str
    columns: dict[str, str]  # column -> Spark DDL type


@dataclass(frozen=True)
class View:
    """A computed feature view: what its rows are keyed by and how they are computed."""

    name: str
    keys: tuple[str, ...]  # join keys, in the view's entity order
    cadence: str
    events: Events
    aggs: tuple[Agg, ...]
    streamed: bool  # the stream computes it live (its source is a PushSource)
    table: str  # offline table path
    created: str  # created-timestamp column ("" if none)
    ttl_us: int | None
    dtypes: dict[str, Any]  # feature -> Feast type
    tiles: TilePlan | None = None  # request-time windows: the tiles serving evaluates

    @property
    def request_time(self) -> bool:
        """Its windows end at the request (evaluated from tiles), not at its last event."""
        return self.tiles is not None

    @property
    def longest_us(self) -> int:
        return max(a.window_us for a in self.aggs)


def is_computed(view: FeatureView) -> bool:
    return "hotpath.aggregations" in (view.tags or {})


def events_of(source: Any) -> Events:
    """The :class:`Events` of a declared events source (a ``KafkaSource`` with a
    ``JsonFormat`` schema and a parquet ``batch_source``)."""
    options = getattr(source, "kafka_options", None)
    schema = getattr(getattr(options, "message_format", None), "schema_json", None)
    batch = getattr(source, "batch_source", None)
    if not schema or batch is None or not getattr(batch, "path", None):
        raise DeclarationError(
            f"events source {source.name}: needs a JsonFormat schema and a batch_source "
            "with the history (a parquet SparkSource)"
        )
    columns: dict[str, str] = {}
    for part in schema.split(","):
        bits = part.strip().split(None, 1)
        if len(bits) != 2:
            raise DeclarationError(f"events source {source.name}: bad schema entry {part!r}")
        columns[bits[0]] = bits[1].strip().lower()
    return Events(source.name, batch.path, source.timestamp_field, columns)


def _aggs(view: FeatureView) -> list[Aggregation]:
    try:
        return declared_aggregations(view)
    except Exception as e:  # JSON, protobuf's ParseError, a wrong shape: one line
        raise DeclarationError(f"{view.name}: unreadable hotpath.aggregations tag ({e})") from None


def compile_view(
    view: FeatureView, join_keys: Mapping[str, str], sources: Mapping[str, Any]
) -> View:
    """The :class:`View` a computed feature view declares, checked."""

    def fail(problem: str) -> DeclarationError:
        return DeclarationError(f"feature view {view.name}: {problem}")

    tags = view.tags
    cadence = tags.get("hotpath.cadence", "")
    if cadence not in (PER_EVENT, DAILY):
        raise fail(f"cadence {cadence!r} is not {PER_EVENT!r} or {DAILY!r}")
    source_name = tags.get("hotpath.events", "")
    if source_name not in sources:
        raise fail(f"events source {source_name!r} is not declared in the repo")
    events = events_of(sources[source_name])
    try:
        known_at: dict[str, str] = dict(json.loads(tags.get("hotpath.known_at", "{}")))
    except (ValueError, TypeError):
        raise fail("unreadable hotpath.known_at tag (a JSON object: feature -> column)") from None
    keys: list[str] = []
    for entity in view.entities:
        key = join_keys.get(entity)
        if key is None:
            raise fail(f"entity {entity!r} is not declared")
        if key not in events.columns:
            raise fail(f"entity {entity!r} has no join key {key!r} in events {events.name}")
        keys.append(key)
    if not keys:
        raise fail("a computed view needs at least one entity")
    declared = {f.name: f.dtype for f in view.features}
    aggs: list[Agg] = []
    for a in _aggs(view):
        what = f"aggregation {a.name or '(unnamed)'}"
        if not a.name:
            raise fail(f"{what}: give it a name (the feature it computes)")
        if a.function not in FUNCTIONS:
            raise fail(f"{what}: unsupported function {a.function!r} ({', '.join(FUNCTIONS)})")
        kind = events.columns.get(a.column)
        if kind is None:
            raise fail(f"{what}: unknown column {a.column!r} in events {events.name}")
        if a.function in ("sum", "mean", "max", "min") and kind not in _NUMERIC:
            raise fail(f"{what}: {a.function} of {a.column} ({kind}) is not numeric")
        if a.function in ("max", "min") and kind == "boolean":
            raise fail(f"{what}: {a.function} of a boolean column; use sum or mean")
        window = a.time_window or timedelta(0)
        window_us = round(window.total_seconds() * US)
        if window_us <= 0:
            raise fail(f"{what}: window must be > 0, not {window}")
        if a.slide_interval not in (None, a.time_window):
            raise fail(f"{what}: slide_interval is not supported (windows slide per event/day)")
        if cadence == DAILY and window_us % DAY_US:
            raise fail(f"{what}: a daily view's windows are whole days, not {window}")
        if a.name not in declared:
            raise fail(f"{what}: not in the view's schema")
        when = known_at.pop(a.name, None)
        if when is not None:
            if cadence != DAILY or a.function not in ("sum", "mean"):
                raise fail(f"{what}: known_at applies to sum and mean of daily views only")
            if events.columns.get(when) not in _TIME:
                raise fail(f"{what}: known_at column {when!r} is not a timestamp of the events")
        aggs.append(Agg(a.name, a.column, a.function, window_us, when))
    if not aggs:
        raise fail("declares no aggregation")
    if known_at:
        raise fail(f"known_at names features it does not aggregate: {sorted(known_at)}")
    if len({a.name for a in aggs}) != len(aggs):
        raise fail("two aggregations compute the same feature")
    extra = sorted(set(declared) - {a.name for a in aggs})
    if extra:
        raise fail(f"features without an aggregation: {extra}")
    streamed = view.stream_source is not None
    if streamed and cadence != PER_EVENT:
        raise fail("only per_event views can be streamed")
    tiles = None
    if REQUEST_TIME_TAG in tags:
        if cadence != PER_EVENT:
            raise fail("request_time applies to per_event views")
        try:
            tiles = view_plan(view)
        except ValueError as e:
            raise fail(f"request_time: {e}") from None
    batch = view.batch_source
    return View(
        name=view.name,
        keys=tuple(keys),
        cadence=cadence,
        events=events,
        aggs=tuple(aggs),
        streamed=streamed,
        table=batch.path,
        created=batch.created_timestamp_column or "",
        ttl_us=round(view.ttl.total_seconds() * US) if view.ttl else None,
        dtypes=declared,
        tiles=tiles,
    )


def computed_views(
    views: Iterable[FeatureView], entities: Iterable[Entity], sources: Iterable[Any]
) -> list[View]:
    """Every computed view among ``views``, checked (the first bad one raises)."""
    views = list(views)
    for v in views:
        if getattr(v, "aggregations", None):
            raise DeclarationError(
                f"feature view {v.name}: Feast's engine computes `aggregations` itself on "
                "materialize (one tumbling window), unlike the backfill and the stream; "
                "declare them with feature_repo/aggregated.py's aggregated_view"
            )
    join_keys = {e.name: e.join_key for e in entities}
    by_name = {s.name: s for s in sources}
    out = [compile_view(v, join_keys, by_name) for v in views if is_computed(v)]
    tables: dict[str, str] = {}
    for v in out:
        if v.table in tables:
            raise DeclarationError(
                f"feature view {v.name}: shares its offline table with {tables[v.table]}"
            )
        tables[v.table] = v.name
    return out


def from_store(store: Any) -> list[View]:
    """The computed views registered in a Feast store's registry."""
    return computed_views(
        store.list_feature_views(), store.list_entities(), store.list_data_sources()
    )
