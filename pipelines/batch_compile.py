"""One compiler from a declared computation (:class:`pipelines.declared.View`) to Spark.

:func:`compute` gives a view's offline rows for a range of days, point-in-time correct, by
the semantics ``feature_repo/aggregated.py`` states:

* ``per_event``: a row per key and event instant ``t``, each window ``(t - W, t]`` (a range
  window over unix microseconds, so ties at ``t`` are in);
* ``daily``: a row per key and UTC midnight ``as_of`` while the key had an event in the
  longest window plus a day, each window ``[as_of - W, as_of)``. Events are first rolled
  into partial aggregates per key and day (and day their ``known_at`` value became known),
  so a 30-day window costs ~31 bucket rows per key, not a rescan of the raw events.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from feast.types import Bool, Float32, Float64, Int32, Int64, String
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.declared import DAILY, DAY_US, US, Agg, View

# The ``created`` of every backfilled row of a table the stream also appends to: above any
# streamed row's (wall-clock) ``created``, so for the same entity and instant the backfill
# (complete, late events included) wins Feast's point-in-time join and materialization,
# whichever writer ran last. Below pandas' datetime64[ns] limit (2262).
BACKFILL_CREATED = datetime(2200, 1, 1, tzinfo=UTC)
SPARK_TYPES = {
    Int64: T.LongType(),
    Int32: T.IntegerType(),
    Float64: T.DoubleType(),
    Float32: T.FloatType(),
    String: T.StringType(),
    Bool: T.BooleanType(),
}


def lookback_days(view: View) -> int:
    """Days of raw history ``compute`` needs before its first day: the longest window (and,
    for daily views, the day that closes a key with an all-empty row)."""
    days = -(-view.longest_us // DAY_US)
    return days + 1 if view.cadence == DAILY else days


def compute(view: View, events: DataFrame, first: date, last: date) -> DataFrame:
    """The offline rows of ``view`` for the days ``first..last`` (``events`` must reach
    :func:`lookback_days` before ``first``): join keys, ``event_timestamp``, the features,
    ``created`` (if the table has one) and the ``date`` partition."""
    out = (_daily if view.cadence == DAILY else _per_event)(view, events, first, last)
    created = F.timestamp_micros(F.lit(int(BACKFILL_CREATED.timestamp()) * US))
    return out.select(
        *view.keys,
        "event_timestamp",
        *(F.col(a.name).cast(SPARK_TYPES[view.dtypes[a.name]]) for a in view.aggs),
        *([created.alias(view.created)] if view.created else []),
        "date",
    )


def _summed(view: View, column: str) -> Column:
    """``column`` as the type its sum has (booleans count as 0/1)."""
    floating = view.events.columns[column] in ("double", "float")
    return F.col(column).cast("double" if floating else "bigint")


def _per_event(view: View, events: DataFrame, first: date, last: date) -> DataFrame:
    ts = F.col(view.events.timestamp_field)
    events = events.withColumn("_us", F.unix_micros(ts))

    def over(a: Agg) -> Column:
        window = Window.partitionBy(*view.keys).orderBy("_us").rangeBetween(-(a.window_us - 1), 0)
        value = {
            "count": F.count(F.lit(1)),
            "sum": F.sum(_summed(view, a.column)),
            "mean": F.avg(_summed(view, a.column)),
            "max": F.max(a.column),
            "min": F.min(a.column),
            "count_distinct": F.collect_set(a.column),
        }[a.function].over(window)
        if a.function == "sum":
            value = F.coalesce(value, F.lit(0))
        elif a.function == "count_distinct":
            value = F.size(value)
        return value.alias(a.name)

    return (
        events.select(*view.keys, ts.alias("event_timestamp"), *map(over, view.aggs))
        .withColumn("date", F.to_date("event_timestamp"))
        .filter(F.col("date").between(first, last))
        .dropDuplicates([*view.keys, "event_timestamp"])  # ties share their window's values
    )


def _daily(view: View, events: DataFrame, first: date, last: date) -> DataFrame:
    spark = events.sparkSession
    today = datetime.now(UTC).date()  # a snapshot as of a future midnight is unfinished
    days = [first + timedelta(days=i) for i in range((min(last, today) - first).days + 1)]
    snapshots = spark.createDataFrame([(d,) for d in days], "as_of date")

    # Partial aggregates per bucket (key, event day, day each known_at column became known).
    known_at = sorted({a.known_at for a in view.aggs if a.known_at})
    known = {c: f"_known{i}" for i, c in enumerate(known_at)}
    partials: dict[tuple[str, str], str] = {}

    def partial(kind: str, column: str = "") -> Column:
        name = partials.setdefault((kind, column), f"_p{len(partials)}")
        return F.col(name)

    def final(a: Agg) -> Column:
        inside = F.col("_lag") <= a.window_us // DAY_US
        is_known = F.col(known[a.known_at]) < F.col("as_of") if a.known_at else F.lit(True)
        rows = partial("rows")
        if a.function == "count":
            return F.coalesce(F.sum(F.when(inside, rows)), F.lit(0))
        if a.function in ("max", "min"):
            return getattr(F, a.function)(F.when(inside, partial(a.function, a.column)))
        if a.function == "count_distinct":
            sets = F.collect_list(F.when(inside, partial("set", a.column)))
            return F.size(F.array_distinct(F.flatten(sets)))
        total = F.coalesce(F.sum(F.when(inside & is_known, partial("sum", a.column))), F.lit(0))
        if a.function == "sum":
            return total
        # mean: an unknown value counts as 0, so its event is in the denominator all the same
        counted = partial("values", a.column)
        if a.known_at:
            counted = F.when(is_known, counted).otherwise(rows)
        n = F.sum(F.when(inside, counted))
        return F.when(n > 0, total / n)

    finals = [final(a).alias(a.name) for a in view.aggs]  # registers the partials used
    exprs = {
        "rows": lambda c: F.count(F.lit(1)),
        "values": F.count,
        "sum": lambda c: F.sum(_summed(view, c)),
        "max": F.max,
        "min": F.min,
        "set": F.collect_set,
    }
    ts = F.col(view.events.timestamp_field)
    buckets = (
        events.withColumn("_day", F.to_date(ts))
        .withColumns({k: F.to_date(c) for c, k in known.items()})
        .groupBy(*view.keys, "_day", *known.values())
        .agg(*(exprs[kind](c).alias(name) for (kind, c), name in partials.items()))
    )
    reach = view.longest_us // DAY_US + 1  # the longest window plus the closing day
    joined = buckets.join(
        F.broadcast(snapshots),
        (F.col("_day") < F.col("as_of")) & (F.col("_day") >= F.date_sub(F.col("as_of"), reach)),
    ).withColumn("_lag", F.datediff(F.col("as_of"), F.col("_day")))
    return (
        joined.groupBy(*view.keys, "as_of")
        .agg(*finals)
        .withColumn("event_timestamp", F.to_timestamp("as_of"))
        .withColumnRenamed("as_of", "date")
    )
