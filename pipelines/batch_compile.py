"""One compiler from a declared computation (:class:`pipelines.declared.View`) to Spark.

:func:`compute_shared` gives the offline rows of views that share their events, keys and
cadence (a :func:`passes` group) in one pass over the events, one sort or one roll-up for
all of them; :func:`view_rows` takes one view's table from it (:func:`compute`: one view).
Point-in-time correct, by the semantics ``feature_repo/aggregated.py`` states:

* ``per_event``: a row per key and event instant ``t``, each window ``(t - W, t]`` (a range
  window over unix microseconds, so ties at ``t`` are in);
* ``daily``: a row per key and UTC midnight ``as_of`` while the key had an event in the
  longest window plus a day, each window ``[as_of - W, as_of)``. Events are first rolled
  into partial aggregates per key and day (and day their ``known_at`` value became known),
  so a 30-day window costs ~31 bucket rows per key, not a rescan of the raw events. The
  buckets are partitioned by key, so each bucket is copied to the snapshots it is in and
  summed there without a second shuffle;
* ``per_event`` with ``request_time`` (``View.tiles``, resolution ``R``): the windows end
  at the *request*, so a row per key at each event instant and at each instant a tile
  with events leaves a window (tile ``k`` leaves window ``W`` at ``(k + W/R)·R``), each
  window over ``[floor(t/R)·R - W + R, t]`` (``online_store/tiles.py``: what serving
  evaluates from the tiles at ``t``). The value is constant between two rows, so Feast's
  point-in-time join (latest row ``<= t``) gives the request-time value at any instant.
  After a key's last tile leaves its longest window a row holds count 0 and sum 0 (max,
  min, mean missing): the TTL (the longest window) keeps it that long, and after it a
  count or sum is missing, which training fills with 0 (``training.default_for``), the
  value serving computes for an empty window (a max, min or mean is missing on both
  sides). Expiry rows after the job's now are written too (the rows depend on the events
  alone, so a re-run writes the same files): they hold until an event arrives after the
  backfill, whose streamed row counts from its instant, until the next backfill.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime

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
# A request-time row's ``_marks`` bit for "an event at this instant" (bit ``i`` below it: a
# tile leaves one of the pass's view ``i``'s windows here).
EVENT_MARK = 1 << 30
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


def passes(views: Sequence[View]) -> list[tuple[View, ...]]:
    """``views`` grouped by what one pass can compute together: the same events, join keys,
    cadence and request-time resolution (one window sort, or one daily roll-up, for the
    whole group)."""
    groups: dict[tuple[str, tuple[str, ...], str, int], list[View]] = {}
    for view in views:
        resolution = view.tiles.resolution_us if view.tiles else 0
        groups.setdefault((view.events.name, view.keys, view.cadence, resolution), []).append(view)
    return [tuple(g) for g in groups.values()]


def compute(view: View, events: DataFrame, first: date, last: date) -> DataFrame:
    """The offline rows of ``view`` for the days ``first..last`` (``events`` must reach
    :func:`lookback_days` before ``first``): join keys, ``event_timestamp``, the features,
    ``created`` (if the table has one) and the ``date`` partition."""
    return view_rows(compute_shared((view,), events, first, last), (view,), 0)


def compute_shared(views: Sequence[View], events: DataFrame, first: date, last: date) -> DataFrame:
    """The rows of every view of one :func:`passes` group (``events`` reaching the longest
    :func:`lookback_days` of the group), in one frame: join keys, ``event_timestamp``,
    ``date`` and each view's features under private names; :func:`view_rows` takes one
    view's table out of it."""
    if len(passes(views)) != 1:
        raise ValueError(f"{[v.name for v in views]} are not one pass (events, keys, cadence)")
    aggs = [(_col(i, j), a) for i, v in enumerate(views) for j, a in enumerate(v.aggs)]
    if views[0].tiles:
        return _request_time(views, events, first, last)
    cadence = views[0].cadence
    return (_daily if cadence == DAILY else _per_event)(views, aggs, events, first, last)


def view_rows(shared: DataFrame, views: Sequence[View], index: int) -> DataFrame:
    """View ``views[index]``'s table out of :func:`compute_shared` ``(views, ...)``: its rows
    (a daily view keeps a key while it had an event in its own longest window plus a day),
    with its columns, types and ``created``."""
    view = views[index]
    if view.cadence == DAILY and _reach(view) < max(map(_reach, views)):
        shared = shared.filter(F.col("_nearest") <= _reach(view))
    if view.tiles and len(views) > 1:  # its event instants and its own windows' expiries
        shared = shared.filter(F.col("_marks").bitwiseAND(EVENT_MARK | 1 << index) != 0)
    created = F.timestamp_micros(F.lit(int(BACKFILL_CREATED.timestamp()) * US))
    return shared.select(
        *view.keys,
        "event_timestamp",
        *(
            F.col(_col(index, j)).cast(SPARK_TYPES[view.dtypes[a.name]]).alias(a.name)
            for j, a in enumerate(view.aggs)
        ),
        *([created.alias(view.created)] if view.created else []),
        "date",
    )


def _col(view: int, agg: int) -> str:
    """The private column of a view's aggregation in a shared pass (two views of one pass
    may name a feature alike)."""
    return f"_v{view}_{agg}"


def _reach(view: View) -> int:
    """Days a daily view keeps a key after its last event: the longest window plus the
    closing day."""
    return view.longest_us // DAY_US + 1


def _summed(view: View, column: str) -> Column:
    """``column`` as the type its sum has (booleans count as 0/1)."""
    floating = view.events.columns[column] in ("double", "float")
    return F.col(column).cast("double" if floating else "bigint")


def _per_event(
    views: Sequence[View], aggs: list[tuple[str, Agg]], events: DataFrame, first: date, last: date
) -> DataFrame:
    """Every aggregation of the group over one window sort (Spark evaluates window
    expressions sharing ``partitionBy``/``orderBy`` in one pass, whatever their frames)."""
    view = views[0]
    ts = F.col(view.events.timestamp_field)
    events = events.withColumn("_us", F.unix_micros(ts))
    ordered = Window.partitionBy(*view.keys).orderBy("_us")

    def over(name: str, a: Agg) -> Column:
        window = ordered.rangeBetween(-(a.window_us - 1), 0)
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
        return value.alias(name)

    # Ties share their window's values: keep the first row of each key and instant, found in
    # the same sort (a dropDuplicates would hash every row again).
    instant = F.lag("_us").over(ordered)
    return (
        events.select(
            *view.keys,
            ts.alias("event_timestamp"),
            *(over(n, a) for n, a in aggs),
            (instant.isNull() | (instant != F.col("_us"))).alias("_first"),
        )
        .filter(F.col("_first"))
        .drop("_first")
        .withColumn("date", F.to_date("event_timestamp"))
        .filter(F.col("date").between(first, last))
    )


def _daily(
    views: Sequence[View], aggs: list[tuple[str, Agg]], events: DataFrame, first: date, last: date
) -> DataFrame:
    view = views[0]
    # a snapshot as of a future midnight is unfinished
    last = min(last, datetime.now(UTC).date())

    # Partial aggregates per bucket (key, event day, day each known_at column became known).
    known_at = sorted({a.known_at for _, a in aggs if a.known_at})
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

    finals = [final(a).alias(name) for name, a in aggs]  # registers the partials used
    exprs = {
        "rows": lambda c: F.count(F.lit(1)),
        "values": F.count,
        "sum": lambda c: F.sum(_summed(view, c)),
        "max": F.max,
        "min": F.min,
        "set": F.collect_set,
    }
    ts = F.col(view.events.timestamp_field)
    reach = max(map(_reach, views))
    # Partitioned by key alone, so the buckets' copies below are summed where they are; in
    # partitions of a fixed number (not left to adaptive coalescing, which sees the events,
    # not the copies), more of them as each bucket is copied to more snapshots: the session's
    # shuffle partitions per week of reach.
    parts = int(events.sparkSession.conf.get("spark.sql.shuffle.partitions") or 8)
    buckets = (
        events.withColumn("_day", F.to_date(ts))
        .withColumns({k: F.to_date(c) for c, k in known.items()})
        .repartition(parts * -(-reach // 7), *view.keys)
        .groupBy(*view.keys, "_day", *known.values())
        .agg(*(exprs[kind](c).alias(name) for (kind, c), name in partials.items()))
    )
    # A bucket is in the snapshots as of the `reach` days after it (the longest window plus
    # the closing day) that fall in first..last.
    lo = F.greatest(F.date_add("_day", 1), F.lit(first))
    hi = F.least(F.date_add("_day", reach), F.lit(last))
    copies = (
        buckets.filter(lo <= hi)
        .withColumn("as_of", F.explode(F.sequence(lo, hi)))
        .withColumn("_lag", F.datediff(F.col("as_of"), F.col("_day")))
    )
    return (
        copies.groupBy(*view.keys, "as_of")
        .agg(*finals, F.min("_lag").alias("_nearest"))
        .withColumn("event_timestamp", F.to_timestamp("as_of"))
        .withColumnRenamed("as_of", "date")
    )


def _request_time(views: Sequence[View], events: DataFrame, first: date, last: date) -> DataFrame:
    """The request-time rows of a group sharing one resolution ``R``, scalable: one scan
    and one shuffle of the events, each exploded into its row and its tile's expiry
    instants, then one sort by key, tile and instant; a cumulative window within each
    tile gives the events of ``t``'s tile up to ``t`` (the *head*), and a range window over
    the tile indexes sums the whole tiles before it (each tile's partial is the head at
    its last instant), so no frame holds more than ``W/R`` tiles' rows.

    Columns: join keys, ``event_timestamp``, ``date``, each view's features under private
    names and ``_marks`` (:data:`EVENT_MARK`: an event at this instant; bit ``i``: a tile
    leaves one of ``views[i]``'s windows here)."""
    view = views[0]
    resolution = view.tiles.resolution_us
    keys = list(view.keys)
    # what the tiles hold (the slots of every view) and the windows, in tiles, by view
    slots = sorted({s for v in views for s in v.tiles.slots[1:]})
    windows: dict[int, int] = {}  # W/R -> bit mask of the views with such a window
    for i, v in enumerate(views):
        for a in v.tiles.aggs:
            windows[a.window_tiles] = windows.get(a.window_tiles, 0) | (1 << i)

    us = F.unix_micros(F.col(view.events.timestamp_field))
    start = F.col("_us") - F.pmod("_us", F.lit(resolution))  # its tile's start, exact
    columns = sorted({c for _, c in slots})
    # Each event row and the instants its tile leaves each window W (the start of tile
    # k + W/R) in one pass over the shuffled events: no second scan, no distinct. A tile's
    # several events give the same instants, merged with every other row of that instant
    # below; an expiry row holds no event (``_one`` and the columns null).
    instants = F.array(
        F.struct(F.col("_us").alias("_us"), F.lit(1).alias("_one"), F.lit(EVENT_MARK).alias("_m")),
        *(
            F.struct(
                (start + n * resolution).alias("_us"),
                F.lit(None).cast("int").alias("_one"),
                F.lit(m).alias("_m"),
            )
            for n, m in windows.items()
        ),
    )
    both = (
        events.select(*keys, us.alias("_us"), *columns)
        .repartition(*keys)  # one shuffle: every window below is by key
        .select(*keys, *columns, F.explode(instants).alias("_x"))
        .select(
            *keys,
            F.expr(f"(_x._us - pmod(_x._us, {resolution})) div {resolution}").alias("_tile"),
            "_x.*",
            *(F.when(F.col("_x._one").isNotNull(), F.col(c)).alias(c) for c in columns),
        )
    )

    in_tile = Window.partitionBy(*keys, "_tile").orderBy("_us")
    head_frame = in_tile.rangeBetween(Window.unboundedPreceding, Window.currentRow)
    peers = in_tile.rangeBetween(Window.currentRow, Window.currentRow)
    whole = in_tile.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    partial = {
        "sum": lambda c: F.sum(_summed(view, c)),
        "max": F.max,
        "min": F.min,
    }
    head = {("count", ""): F.sum("_one")} | {(k, c): partial[k](c) for k, c in slots}
    name = {s: f"_h{i}" for i, s in enumerate(head)}
    instant = F.lag("_us").over(in_tile)
    instants = (
        both.select(
            *keys,
            "_tile",
            "_us",
            *(expr.over(head_frame).alias(name[s]) for s, expr in head.items()),
            (F.max("_us").over(whole) == F.col("_us")).alias("_last"),  # the tile's last
            F.bit_or("_m").over(peers).alias("_marks"),
            (instant.isNull() | (instant != F.col("_us"))).alias("_first"),
        )
        .filter(F.col("_first"))  # ties share their values: one row per instant
        .drop("_first")
    )

    by_tile = Window.partitionBy(*keys).orderBy("_tile")
    combine = {"count": F.sum, "sum": F.sum, "max": F.max, "min": F.min}

    def before(s: tuple[str, str], n: int) -> Column:
        """The whole tiles before ``t``'s within window ``n`` tiles: ``[k - n + 1, k - 1]``."""
        frame = by_tile.rangeBetween(-(n - 1), -1)
        return combine[s[0]](F.when(F.col("_last"), F.col(name[s]))).over(frame)

    def total(s: tuple[str, str], n: int) -> Column:
        now = F.col(name[s])
        if n == 1:  # a window of one tile: t's tile alone
            return now if s[0] in ("max", "min") else F.coalesce(now, F.lit(0))
        whole = before(s, n)
        if s[0] == "max":
            return F.greatest(whole, now)
        if s[0] == "min":
            return F.least(whole, now)
        return F.coalesce(whole, F.lit(0)) + F.coalesce(now, F.lit(0))

    def value(v: View, j: int) -> Column:
        a = v.tiles.aggs[j]
        count = total(("count", ""), a.window_tiles)
        if a.function == "count":
            return count
        got = total(v.tiles.slots[a.slot], a.window_tiles)
        return F.when(count > 0, got / count) if a.function == "mean" else got

    return (
        instants.select(
            *keys,
            F.timestamp_micros("_us").alias("event_timestamp"),
            *(
                value(v, j).alias(_col(i, j))
                for i, v in enumerate(views)
                for j in range(len(v.aggs))
            ),
            "_marks",
        )
        .withColumn("date", F.to_date("event_timestamp"))
        .filter(F.col("date").between(first, last))
    )
