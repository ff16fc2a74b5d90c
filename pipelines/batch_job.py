"""The Spark backfill: raw events -> offline parquet of every computed view the repo declares.

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
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines import batch_compile
from pipelines.batch_compile import SPARK_TYPES
from pipelines.contract import computed_views, entities, event_rules, feature_views
from pipelines.declared import Events, View
from pipelines.errors import HotpathError, check_order, first_line
from pipelines.settings import Settings
from pipelines.spark import configure
from serving.event_rules import EventRules


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


def judge(events: DataFrame, rules: EventRules, now: datetime) -> DataFrame:
    """``events`` plus ``code`` and ``reason``: null for a valid event, else why it is refused.
    The repo's declaration, checked in the stream's order with the stream's codes, so an
    event the stream dead-letters is one the backfill refuses (future: against ``now``).
    Generic over the declared fields by their type in ``events``: the timestamp first, then
    each integer field against the id bounds and each floating one against the amount's."""
    us = batch_compile.US
    types = {f.name: f.dataType for f in events.schema.fields}
    fields = [name for name in rules.fields if name in types]
    stamps = [n for n in fields if isinstance(types[n], T.TimestampType | T.TimestampNTZType)]
    checks: list[tuple[Column, str, Column]] = []
    for name in stamps:
        ts = F.col(name)
        checks += [
            (ts.isNull(), "bad_type", F.lit(f"{name} is null")),
            (
                F.unix_micros(ts) > int(now.timestamp() * us) + round(rules.max_future_s * us),
                "future_timestamp",
                F.format_string(f"{name} %s is more than {rules.max_future_s:g}s ahead", ts),
            ),
        ]
    for name in fields:
        c = F.col(name)
        if isinstance(types[name], T.IntegralType):
            checks.append(
                (
                    c.isNull() | (c < rules.id_min) | (c > rules.id_max),
                    "bad_type",
                    F.format_string(f"{name} %s outside [{rules.id_min}, {rules.id_max}]", c),
                )
            )
        elif isinstance(types[name], T.FractionalType):
            bounds = f"[{rules.amount_min:g}, {rules.amount_max:g}]"
            checks += [
                (c.isNull(), "bad_type", F.lit(f"{name} is null")),
                (
                    F.isnan(c) | (c < rules.amount_min) | (c > rules.amount_max),
                    "bad_amount",
                    F.format_string(f"{name} %s outside {bounds}", c),
                ),
            ]
    code = reason = F.lit(None).cast("string")
    for cond, c, r in reversed(checks):  # the first failing check names the event's code
        code, reason = F.when(cond, F.lit(c)).otherwise(code), F.when(cond, r).otherwise(reason)
    return events.withColumn("code", code).withColumn("reason", reason)


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def read_events(spark: SparkSession, events: Events, raw_dir: Path) -> DataFrame:
    """The raw history of ``events`` (``raw_dir`` / its folder), checked for the columns and
    types its declaration names and for the ``date`` partitions."""
    path = raw_dir / Path(events.history_path).name
    what = f"raw {events.name}"
    if not path.exists():
        raise HotpathError(f"{what} not found at {path} (run `hotpath generate` first)")
    try:
        df = spark.read.parquet(str(path))
        schema = {f.name: f.dataType for f in df.schema.fields}
    except Exception as e:  # Spark raises several Java-backed types for unreadable files
        raise HotpathError(f"cannot read {what} at {path}: {first_line(e)}") from None
    missing = [c for c in events.columns if c not in schema]
    if missing:
        raise HotpathError(f"{what} at {path} lack columns: {', '.join(missing)}")
    wanted = {c: T.DataType.fromDDL(t) for c, t in events.columns.items()}
    wrong = [
        f"{c} is {schema[c].simpleString()}, expected {t.simpleString()}"
        for c, t in wanted.items()
        if schema[c] != t and not (isinstance(t, T.TimestampType) and "timestamp" in str(schema[c]))
    ]
    if wrong:
        raise HotpathError(f"{what} at {path} have wrong types: {'; '.join(wrong)}")
    if "date" not in schema:
        raise HotpathError(f"{what} at {path} are not partitioned by date=YYYY-MM-DD")
    return df


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
    spark: SparkSession,
    df: DataFrame | None,
    path: Path,
    days: list[date],
    by_date: bool = True,
) -> None:
    """Delete the range's partitions (also those that will be empty), then write the new ones
    (none when ``df`` is None), one file per day (``by_date``; else ``df`` is already
    partitioned and sorted by ``date``)."""
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    for d in days:
        p = jvm.org.apache.hadoop.fs.Path(str(path / f"date={d.isoformat()}"))
        p.getFileSystem(conf).delete(p, True)
    if df is not None:
        df = df.repartition("date") if by_date else df
        df.write.mode("append").partitionBy("date").parquet(str(path))


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
    """Backfill the days ``start..end`` (inclusive) of the selected computed views (default:
    all the repo declares), each into ``offline_dir / <view>``.

    Only events valid by the repo's declaration are counted; the refused ones of the run's
    days replace their ``date=`` partitions of ``rejected_dir/<events>`` (default
    ``data/rejected``) with their code and reason, and are reported to ``on_refused``."""
    check_order(start, end)
    computed = computed_views(repo)
    names = [v.name for v in computed]
    unknown = sorted(set(views or []) - set(names))
    if unknown:
        raise HotpathError(f"unknown view(s) {unknown}; computed views are {names}")
    by_events: dict[str, list[View]] = {}
    for view in computed:
        if not views or view.name in views:
            by_events.setdefault(view.events.name, []).append(view)
    contract, keys, rules = feature_views(repo), entities(repo), event_rules(repo)
    results = []
    for jobs in by_events.values():
        events = jobs[0].events
        raw = read_events(spark, events, raw_dir)
        since = start - timedelta(days=max(map(batch_compile.lookback_days, jobs)))
        if raw.filter(raw.date.between(since, end)).limit(1).count() == 0:
            folder = raw_dir / Path(events.history_path).name
            raise HotpathError(f"no {events.name} under {folder} between {since} and {end}")
        judged = judge(raw, rules, now or datetime.now(UTC))
        refused = _write_refused(
            spark,
            judged.filter(F.col("code").isNotNull() & F.col("date").between(start, end)),
            (rejected_dir or offline_dir.parent / "rejected") / Path(events.history_path).name,
            _days(start, end),
        )
        if on_refused:
            on_refused(refused)
        valid = judged.filter(F.col("code").isNull()).drop("code", "reason")
        for group in batch_compile.passes(jobs):
            since = start - timedelta(days=max(map(batch_compile.lookback_days, group)))
            source = valid.filter(valid.date.between(since, end)).drop("date")
            shared = batch_compile.compute_shared(group, source, start, end)
            if len(group) > 1:  # computed once, each view's table written from the copy
                shared = shared.repartition("date").sortWithinPartitions("date").persist()
            for i, view in enumerate(group):
                t0 = time.perf_counter()
                out = batch_compile.view_rows(shared, group, i)
                readers = [
                    v
                    for v in contract.values()
                    if getattr(v.batch_source, "path", None) == view.table
                ]
                check_contract(out, view.name, readers, keys)
                target = offline_dir / view.name
                _replace_partitions(spark, out, target, _days(start, end), len(group) == 1)
                rows = (
                    spark.read.parquet(str(target))
                    .filter(F.col("date").between(start, end))
                    .count()
                )
                result = ViewResult(view.name, rows, time.perf_counter() - t0, target)
                results.append(result)
                if progress:
                    progress(result)
            shared.unpersist()
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
