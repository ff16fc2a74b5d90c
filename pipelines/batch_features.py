"""Spark transformations from raw transactions to the batch and stream feature views.

Each function is pure (DataFrame in, DataFrame out) and point-in-time correct:

* daily snapshots (``user_spending_stats``, ``merchant_risk_stats``) are stamped
  with the UTC midnight they are as of and use only events strictly before it;
  fraud counts use only labels known (``label_ts``) before it;
* per-event rows (``user_velocity``, ``user_merchant_history``) are stamped with
  the event's time and cover the window ending at and including that event.

Daily snapshots first roll events up into per-day buckets, so a 30-day window
costs 31 bucket rows per entity, not a rescan of the raw events.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

SNAPSHOT_LOOKBACK_DAYS = 31  # 30-day windows plus one day for the closing all-zero row
US = 1_000_000
# The ``created`` of every backfilled row of a table the stream also appends to: above any
# streamed row's (wall-clock) ``created``, so for the same entity and instant the backfill
# (complete, late events included) wins Feast's point-in-time join and materialization,
# whichever writer ran last. Below pandas' datetime64[ns] limit (2262).
BACKFILL_CREATED = datetime(2200, 1, 1, tzinfo=UTC)
MINUTE_US = 60 * US
HOUR_US = 60 * MINUTE_US
DAY_US = 24 * HOUR_US


def _snapshot_days(spark: SparkSession, days: list[date]) -> DataFrame:
    return spark.createDataFrame([(d,) for d in days], "as_of_day date")


def _bucketed(buckets: DataFrame, snapshots: DataFrame, day_col: str = "day") -> DataFrame:
    """Pair each per-day bucket with the snapshots whose lookback window contains it."""
    joined = buckets.join(
        F.broadcast(snapshots),
        (F.col(day_col) < F.col("as_of_day"))
        & (F.col(day_col) >= F.date_sub(F.col("as_of_day"), SNAPSHOT_LOOKBACK_DAYS)),
    )
    return joined.withColumn("lag_days", F.datediff(F.col("as_of_day"), F.col(day_col)))


def _within(days: int, value: Column | str, otherwise: object = None) -> Column:
    """``value`` for buckets at most ``days`` before the snapshot, else ``otherwise``."""
    col = F.col(value) if isinstance(value, str) else value
    expr = F.when(F.col("lag_days") <= days, col)
    return expr.otherwise(F.lit(otherwise)) if otherwise is not None else expr


def _stamp(df: DataFrame) -> DataFrame:
    """Snapshot timestamp = midnight UTC of the as-of day; partition = that day."""
    return df.withColumn("event_timestamp", F.to_timestamp(F.col("as_of_day"))).withColumn(
        "date", F.col("as_of_day")
    )


def user_spending_stats(tx: DataFrame, days: list[date]) -> DataFrame:
    spark = tx.sparkSession
    buckets = (
        tx.withColumn("day", F.to_date("event_timestamp"))
        .groupBy("user_id", "day")
        .agg(F.count("*").alias("n"), F.sum("amount").alias("s"), F.max("amount").alias("mx"))
    )
    joined = _bucketed(buckets, _snapshot_days(spark, days))
    out = joined.groupBy("user_id", "as_of_day").agg(
        F.sum(_within(1, "n", 0)).cast("long").alias("user_txn_count_1d"),
        F.sum(_within(1, "s", 0.0)).cast("double").alias("user_amount_sum_1d"),
        F.sum(_within(7, "n", 0)).cast("long").alias("user_txn_count_7d"),
        F.sum(_within(7, "s", 0.0)).cast("double").alias("user_amount_sum_7d"),
        F.sum(_within(30, "n", 0)).cast("long").alias("user_txn_count_30d"),
        F.sum(_within(30, "s")).cast("double").alias("_sum_30d"),
        F.max(_within(30, "mx")).cast("double").alias("user_amount_max_30d"),
    )
    out = out.withColumn(
        "user_amount_avg_30d",
        F.when(F.col("user_txn_count_30d") > 0, F.col("_sum_30d") / F.col("user_txn_count_30d")),
    )
    return _stamp(out).select(
        "user_id",
        "event_timestamp",
        "user_txn_count_1d",
        "user_amount_sum_1d",
        "user_txn_count_7d",
        "user_amount_sum_7d",
        "user_txn_count_30d",
        "user_amount_avg_30d",
        "user_amount_max_30d",
        "date",
    )


def merchant_risk_stats(tx: DataFrame, days: list[date]) -> DataFrame:
    spark = tx.sparkSession
    snapshots = _snapshot_days(spark, days)
    volume = (
        tx.withColumn("day", F.to_date("event_timestamp"))
        .groupBy("merchant_id", "day")
        .agg(F.count("*").alias("n"), F.sum("amount").alias("s"))
    )
    out = (
        _bucketed(volume, snapshots)
        .groupBy("merchant_id", "as_of_day")
        .agg(
            F.sum(_within(7, "n", 0)).cast("long").alias("merchant_txn_count_7d"),
            F.sum(_within(7, "s")).alias("_sum_7d"),
            F.sum(_within(30, "n", 0)).cast("long").alias("merchant_txn_count_30d"),
        )
    )
    fraud = (
        tx.filter(F.col("is_fraud"))
        .withColumn("day", F.to_date("event_timestamp"))
        .withColumn("label_day", F.to_date("label_ts"))
        .groupBy("merchant_id", "day", "label_day")
        .agg(F.count("*").alias("f"))
    )
    known = (
        _bucketed(fraud, snapshots)
        .filter((F.col("lag_days") <= 30) & (F.col("label_day") < F.col("as_of_day")))
        .groupBy("merchant_id", "as_of_day")
        .agg(F.sum("f").cast("long").alias("merchant_fraud_count_30d"))
    )
    out = out.join(known, ["merchant_id", "as_of_day"], "left").fillna(
        0, subset=["merchant_fraud_count_30d"]
    )
    out = out.withColumn(
        "merchant_amount_avg_7d",
        F.when(
            F.col("merchant_txn_count_7d") > 0, F.col("_sum_7d") / F.col("merchant_txn_count_7d")
        ),
    ).withColumn(
        "merchant_fraud_rate_30d",
        F.when(
            F.col("merchant_txn_count_30d") > 0,
            F.col("merchant_fraud_count_30d") / F.col("merchant_txn_count_30d"),
        ),
    )
    return _stamp(out).select(
        "merchant_id",
        "event_timestamp",
        "merchant_txn_count_7d",
        "merchant_amount_avg_7d",
        "merchant_txn_count_30d",
        "merchant_fraud_count_30d",
        "merchant_fraud_rate_30d",
        "date",
    )


def _trailing(partition: list[str], span_us: int) -> Window:
    """Rows of the same key in ``(t - span, t]`` (ties at ``t`` included)."""
    return (
        Window.partitionBy(*partition)
        .orderBy(F.col("_ts_us"))
        .rangeBetween(-(span_us - 1), Window.currentRow)
    )


def _per_event(tx: DataFrame, keys: list[str], first: date, last: date) -> DataFrame:
    """Stamp, partition and keep one row per key and instant, for events in ``[first, last]``."""
    day = F.to_date("event_timestamp")
    return (
        tx.filter((day >= F.lit(first)) & (day <= F.lit(last)))
        .withColumn("date", day)
        .dropDuplicates([*keys, "event_timestamp"])
    )


def user_velocity(tx: DataFrame, first: date, last: date) -> DataFrame:
    """Lookback needed in ``tx``: 24 hours before ``first``."""
    tx = tx.withColumn("_ts_us", F.unix_micros("event_timestamp"))
    w5m, w1h, w24h = (_trailing(["user_id"], s) for s in (5 * MINUTE_US, HOUR_US, DAY_US))
    out = tx.select(
        "user_id",
        "event_timestamp",
        F.count("*").over(w5m).cast("long").alias("user_txn_count_5m"),
        F.sum("amount").over(w5m).cast("double").alias("user_amount_sum_5m"),
        F.count("*").over(w1h).cast("long").alias("user_txn_count_1h"),
        F.sum("amount").over(w1h).cast("double").alias("user_amount_sum_1h"),
        F.size(F.collect_set("merchant_id").over(w24h))
        .cast("long")
        .alias("user_distinct_merchants_24h"),
        F.timestamp_micros(F.lit(int(BACKFILL_CREATED.timestamp()) * US)).alias("created"),
    )
    return _per_event(out, ["user_id"], first, last)


def user_merchant_history(tx: DataFrame, first: date, last: date) -> DataFrame:
    """Lookback needed in ``tx``: 90 days before ``first``."""
    tx = tx.withColumn("_ts_us", F.unix_micros("event_timestamp"))
    w = _trailing(["user_id", "merchant_id"], 90 * DAY_US)
    out = tx.select(
        "user_id",
        "merchant_id",
        "event_timestamp",
        F.count("*").over(w).cast("long").alias("user_merchant_txn_count_90d"),
    )
    return _per_event(out, ["user_id", "merchant_id"], first, last)
