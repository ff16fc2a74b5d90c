"""How a computed feature view is declared: Feast's own ``Aggregation`` objects, plus the
two things Feast has no object for (the cadence, and when a column's value becomes known).

``aggregated_view(...)`` returns a plain Feast ``FeatureView`` whose schema is derived from
its aggregations and whose source is the offline table hotpath's engines write (with a
``PushSource`` in front when the stream computes it too). The computation travels in the
view's tags, so it is in the registry and in ``feast ui``:

* ``hotpath.events``: the events source aggregated (a ``KafkaSource`` whose
  ``batch_source`` holds the history; its ``JsonFormat`` schema gives the column types);
* ``hotpath.cadence``: ``per_event`` (one row per event, each window ``(t - W, t]``, ties at
  ``t`` included) or ``daily`` (one row per entity and UTC midnight ``as_of`` while the
  entity had an event in the longest window plus a day, each window ``[as_of - W, as_of)``);
* ``hotpath.aggregations``: the ``Aggregation`` protos, as JSON;
* ``hotpath.known_at``: per feature, a timestamp column before which a row's value does not
  count yet (a fraud label is known at ``label_ts``); daily views, ``sum`` and ``mean`` only;
* ``hotpath.request_time``: per_event views only, the tile resolution in µs when the
  view's windows end at the *request* (``request_time=timedelta(minutes=1)``): serving
  computes each aggregate over ``(now - W, now]`` from the entity's tiles, to that
  resolution (``online_store/tiles.py`` says exactly what it counts), and training rows are
  computed at each label's instant the same way. Without it a window ends at the entity's
  last event and the row is served until the TTL (what Feast's own SDK always serves).
  count, sum, mean, max and min only; windows whole multiples of the resolution.

Why tags and not ``StreamFeatureView(aggregations=...)``: Feast's compute engine applies a
view's ``aggregations`` itself on ``feast materialize`` (one tumbling window per view), which
would write values that differ from ours. A plain view is materialized as the rows our
engines wrote, so Feast can never serve a different value. ``hotpath apply`` checks every
declaration and names the view and the problem.
"""

import json
from datetime import timedelta

from data_sources import OFFLINE_DIR
from feast import Entity, FeatureView, Field, PushSource
from feast.aggregation import Aggregation
from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource
from feast.types import Float64, Int64
from google.protobuf.json_format import MessageToDict

PER_EVENT = "per_event"
DAILY = "daily"

# Spark DDL types of the events' JSON schema -> the Feast type a sum/max/min of it has.
_NUMERIC = {"bigint": Int64, "long": Int64, "int": Int64, "double": Float64, "float": Float64}


def _column_types(events) -> dict[str, str]:
    """Column -> Spark DDL type, from the events source's ``JsonFormat`` schema."""
    schema = events.kafka_options.message_format.schema_json
    pairs = (part.strip().split(None, 1) for part in schema.split(",") if part.strip())
    return {name: kind.strip().lower() for name, kind in pairs}


def _dtype(agg: Aggregation, columns: dict[str, str]):
    if agg.function in ("count", "count_distinct"):
        return Int64
    if agg.function == "mean":
        return Float64
    kind = columns.get(agg.column, "")
    if agg.function == "sum" and kind == "boolean":
        return Int64
    return _NUMERIC.get(kind, Float64)  # unknown columns are refused by `hotpath apply`


def aggregated_view(
    *,
    name: str,
    entities: list[Entity],
    events,
    cadence: str,
    aggregations: list[Aggregation],
    ttl: timedelta,
    stream: bool = False,
    known_at: dict[str, str] | None = None,
    request_time: timedelta | None = None,
    tags: dict[str, str] | None = None,
    description: str = "",
    owner: str = "",
) -> FeatureView:
    """A feature view computed from ``events`` by ``aggregations``, one feature each (named by
    ``Aggregation.name``), grouped by the entities' join keys. ``stream=True``: the stream
    computes it live too and pushes into ``<name>_push``. ``request_time=R``: its windows end
    at the request, evaluated from tiles of resolution ``R`` (see the module docstring)."""
    columns = _column_types(events)
    table = SparkSource(
        name=f"{name}_source",
        path=str(OFFLINE_DIR / name),
        file_format="parquet",
        timestamp_field="event_timestamp",
        # streamed rows are appended; the newer `created` wins (a backfilled row over all)
        created_timestamp_column="created" if stream else "",
        date_partition_column="date",
    )
    source = PushSource(name=f"{name}_push", batch_source=table) if stream else table
    computation = {
        "hotpath.events": events.name,
        "hotpath.cadence": cadence,
        "hotpath.aggregations": json.dumps([MessageToDict(a.to_proto()) for a in aggregations]),
    }
    if known_at:
        computation["hotpath.known_at"] = json.dumps(known_at)
    if request_time is not None:
        computation["hotpath.request_time"] = str(round(request_time.total_seconds() * 1e6))
    return FeatureView(
        name=name,
        entities=entities,
        ttl=ttl,
        schema=[Field(name=a.name, dtype=_dtype(a, columns)) for a in aggregations],
        source=source,
        online=True,
        tags={**(tags or {}), **computation},
        description=description,
        owner=owner,
    )


__all__ = ["DAILY", "PER_EVENT", "Aggregation", "aggregated_view"]
