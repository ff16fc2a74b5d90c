"""The Spark backfill: raw transactions -> offline parquet of every batch-computed view.

Idempotent: each run replaces exactly the ``date=`` partitions of its range and
nothing else, so re-running a range (or an overlapping one) gives the same files'
contents. Runs inside ``hotpath batch`` or on its own::

    spark-submit --master spark://host:7077 pipelines/batch_job.py \\
        --start 2026-01-01 --end 2026-01-31 --repo feature_repo
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from feast import Entity, FeatureView, ValueType
from feast.types import Bool, Float32, Float64, Int32, Int64, String
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines import batch_features
from pipelines.contract import entities, event_rules, feature_views
from pipelines.errors import HotpathError, check_order, first_line
from pipelines.settings import Settings
from pipelines.spark import configure
from serving.event_rules import EventRules

RAW_COLUMNS = {
    "transaction_id": T.LongType(),
    "user_id": T.LongType(),
    "merchant_id": T.LongType(),
    "amount": T.DoubleType(),
    "event_timestamp": T.TimestampType(),
    "is_fraud": T.BooleanType(),
    "label_ts": T.TimestampType(),
}
SPARK_TYPES = {
    Int64: T.LongType(),
    Int32: T.IntegerType(),
    Float64: T.DoubleType(),
    Float32: T.FloatType(),
    String: T.StringType(),
    Bool: T.BooleanType(),
}


@dataclass(frozen=True)
class ViewJob:
    """How one offline table is computed and how much raw history it needs."""

    name: str
    lookback_days: int
    compute: Callable[[DataFrame, date, date], DataFrame]


JOBS = [
    ViewJob(
        "user_spending_stats",
        batch_features.SNAPSHOT_LOOKBACK_DAYS,
        lambda tx, first, last: batch_features.user_spending_stats(tx, _snapshot_days(first, last)),
    ),
    ViewJob(
        "merchant_risk_stats",
        batch_features.SNAPSHOT_LOOKBACK_DAYS,
        lambda tx, first, last: batch_features.merchant_risk_stats(tx, _snapshot_days(first, last)),
    ),
    ViewJob("user_velocity", 1, batch_features.user_velocity),
    ViewJob("user_merchant_history", 90, batch_features.user_merchant_history),
]
VIEW_NAMES = [j.name for j in JOBS]


@dataclass(frozen=True)
class ViewResult:
    name: str
    rows: int
    seconds: float
    path: Path


@dataclass(frozen=True)
class Refused:
    """Raw events of the run's days that no feature counts, by reason code (the stream's
    dead-letter codes), written with their code and reason under ``path``."""

    by_code: dict[str, int]
    path: Path

    @property
    def total(self) -> int:
        return sum(self.by_code.values())

    def summary(self) -> str:
        codes = ", ".join(f"{c}: {n:,}" for c, n in sorted(self.by_code.items()))
        return f"refused {self.total:,} raw events" + (f" ({codes})" if codes else "")


def judge(tx: DataFrame, rules: EventRules, now: datetime) -> DataFrame:
    """``tx`` plus ``code`` and ``reason``: null for a valid event, else why it is refused.
    The repo's declaration, checked in the stream's order with the stream's codes, so an
    event the stream dead-letters is one the backfill refuses (future: against ``now``)."""
    us = batch_features.US
    ahead_us = int(now.timestamp() * us) + round(rules.max_future_s * us)
    ts, amount = F.col("event_timestamp"), F.col("amount")
    checks: list[tuple[Column, str, Column]] = [
        (ts.isNull(), "bad_type", F.lit("event_timestamp is null")),
        (
            F.unix_micros(ts) > ahead_us,
            "future_timestamp",
            F.format_string(
                "event_timestamp %s is more than %ss ahead", ts, F.lit(f"{rules.max_future_s:g}")
            ),
        ),
    ]
    for name in ("user_id", "merchant_id"):
        c = F.col(name)
        checks.append(
            (
                c.isNull() | (c < rules.id_min) | (c > rules.id_max),
                "bad_type",
                F.format_string(f"{name} %s outside [{rules.id_min}, {rules.id_max}]", c),
            )
        )
    checks += [
        (amount.isNull(), "bad_type", F.lit("amount is null")),
        (
            F.isnan(amount) | (amount < rules.amount_min) | (amount > rules.amount_max),
            "bad_amount",
            F.format_string(
                f"amount %s outside [{rules.amount_min:g}, {rules.amount_max:g}]", amount
            ),
        ),
    ]
    code, reason = F.when(checks[0][0], F.lit(checks[0][1])), F.when(checks[0][0], checks[0][2])
    for cond, c, r in checks[1:]:  # the first failing check names the event's code
        code, reason = code.when(cond, F.lit(c)), reason.when(cond, r)
    return tx.withColumn("code", code).withColumn("reason", reason)


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def _snapshot_days(first: date, last: date) -> list[date]:
    """Snapshot days up to today: a snapshot as of a future midnight would summarise a day
    that has not finished, and be served as complete once that midnight passes."""
    return _days(first, min(last, datetime.now(UTC).date()))


def read_transactions(spark: SparkSession, raw_dir: Path) -> DataFrame:
    """The raw transactions, checked for the columns the jobs need."""
    path = raw_dir / "transactions"
    if not path.exists():
        raise HotpathError(f"raw transactions not found at {path} (run `hotpath generate` first)")
    try:
        tx = spark.read.parquet(str(path))
        schema = {f.name: f.dataType for f in tx.schema.fields}
    except Exception as e:  # Spark raises several Java-backed types for unreadable files
        raise HotpathError(f"cannot read raw transactions at {path}: {first_line(e)}") from None
    missing = [c for c in RAW_COLUMNS if c not in schema]
    if missing:
        raise HotpathError(f"raw transactions at {path} lack columns: {', '.join(missing)}")
    wrong = [
        f"{c} is {schema[c].simpleString()}, expected {t.simpleString()}"
        for c, t in RAW_COLUMNS.items()
        if schema[c] != t and not (isinstance(t, T.TimestampType) and "timestamp" in str(schema[c]))
    ]
    if wrong:
        raise HotpathError(f"raw transactions at {path} have wrong types: {'; '.join(wrong)}")
    if "date" not in schema:
        raise HotpathError(f"raw transactions at {path} are not partitioned by date=YYYY-MM-DD")
    return tx


KEY_TYPES = {
    ValueType.INT64: T.LongType(),
    ValueType.INT32: T.IntegerType(),
    ValueType.STRING: T.StringType(),
}


def check_contract(
    df: DataFrame, table: str, views: list[FeatureView], keys: dict[str, Entity]
) -> None:
    """Fail unless the columns equal what the views reading this table declare."""
    if not views:
        raise HotpathError(f"no feature view in the repo reads the offline table {table}")
    expected: dict[str, T.DataType] = {"event_timestamp": T.TimestampType()}
    for view in views:
        if view.batch_source.created_timestamp_column:
            expected[view.batch_source.created_timestamp_column] = T.TimestampType()
        expected.update({keys[e].join_key: KEY_TYPES[keys[e].value_type] for e in view.entities})
        expected.update({f.name: SPARK_TYPES[f.dtype] for f in view.features})
    actual = {f.name: f.dataType for f in df.schema.fields if f.name != "date"}
    if actual != expected:
        raise HotpathError(
            f"job output for {table} does not match its feature views: "
            f"missing {sorted(set(expected) - set(actual))}, "
            f"extra {sorted(set(actual) - set(expected))}, "
            f"types {[c for c in expected if c in actual and actual[c] != expected[c]]}"
        )


def _replace_partitions(
    spark: SparkSession, df: DataFrame | None, path: Path, days: list[date]
) -> None:
    """Delete the range's partitions (also those that will be empty), then write the new ones
    (none when ``df`` is None)."""
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    for d in days:
        p = jvm.org.apache.hadoop.fs.Path(str(path / f"date={d.isoformat()}"))
        p.getFileSystem(conf).delete(p, True)
    if df is not None:
        df.repartition("date").write.mode("append").partitionBy("date").parquet(str(path))


def _write_refused(
    spark: SparkSession, refused: DataFrame, path: Path, days: list[date]
) -> Refused:
    """Replace the days' partitions of the refused-events table (idempotent, as the offline
    tables are) and count them by code."""
    by_code = {r["code"]: r["count"] for r in refused.groupBy("code").count().collect()}
    _replace_partitions(spark, refused if by_code else None, path, days)
    return Refused(by_code, path)


def run_batch(
    spark: SparkSession,
    repo: Path,
    raw_dir: Path,
    offline_dir: Path,
    start: date,
    end: date,
    views: list[str] | None = None,
    progress: Callable[[ViewResult], None] | None = None,
    on_refused: Callable[[Refused], None] | None = None,
    rejected_dir: Path | None = None,
    now: datetime | None = None,
) -> list[ViewResult]:
    """Backfill the days ``start..end`` (inclusive) of the selected views (default: all).

    Only events valid by the repo's declaration are counted; the refused ones of the run's
    days replace their ``date=`` partitions of ``rejected_dir/transactions`` (default
    ``data/rejected``) with their code and reason, and are reported to ``on_refused``."""
    check_order(start, end)
    unknown = sorted(set(views or []) - set(VIEW_NAMES))
    if unknown:
        raise HotpathError(f"unknown view(s) {unknown}; batch views are {VIEW_NAMES}")
    contract, keys = feature_views(repo), entities(repo)
    tx = read_transactions(spark, raw_dir)
    lookback = max(j.lookback_days for j in JOBS)
    in_range = tx.filter((tx.date >= start - timedelta(days=lookback)) & (tx.date <= end))
    if in_range.limit(1).count() == 0:
        raise HotpathError(
            f"no transactions under {raw_dir / 'transactions'} between "
            f"{start - timedelta(days=lookback)} and {end}"
        )
    judged = judge(tx, event_rules(repo), now or datetime.now(UTC))
    refused = _write_refused(
        spark,
        judged.filter(F.col("code").isNotNull() & F.col("date").between(start, end)),
        (rejected_dir or offline_dir.parent / "rejected") / "transactions",
        _days(start, end),
    )
    if on_refused:
        on_refused(refused)
    tx = judged.filter(F.col("code").isNull()).drop("code", "reason")
    results = []
    for job in JOBS:
        if views and job.name not in views:
            continue
        t0 = time.perf_counter()
        source = tx.filter(
            (tx.date >= start - timedelta(days=job.lookback_days)) & (tx.date <= end)
        ).drop("date")
        out = job.compute(source, start, end)
        readers = [v for v in contract.values() if v.batch_source.name == f"{job.name}_source"]
        check_contract(out, job.name, readers, keys)
        target = offline_dir / job.name
        _replace_partitions(spark, out, target, _days(start, end))
        rows = (
            spark.read.parquet(str(target)).filter(f"date >= '{start}' and date <= '{end}'").count()
        )
        result = ViewResult(job.name, rows, time.perf_counter() - t0, target)
        results.append(result)
        if progress:
            progress(result)
    return results


def main(argv: list[str] | None = None) -> None:
    """Entry point for ``spark-submit`` (the master comes from spark-submit)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=date.fromisoformat, required=True)
    parser.add_argument("--end", type=date.fromisoformat, required=True)
    parser.add_argument("--repo", type=Path, default=Path("feature_repo"))
    parser.add_argument("--view", action="append", dest="views")
    args = parser.parse_args(argv)
    settings = Settings(repo=args.repo)
    spark = configure(SparkSession.builder.appName("hotpath-batch").getOrCreate())
    for r in run_batch(
        spark,
        args.repo,
        settings.raw_dir,
        settings.offline_dir,
        args.start,
        args.end,
        args.views,
        on_refused=lambda x: print(f"{x.summary()} -> {x.path}"),
    ):
        print(f"{r.name}: {r.rows} rows in {r.seconds:.1f}s -> {r.path}")


if __name__ == "__main__":
    main()
