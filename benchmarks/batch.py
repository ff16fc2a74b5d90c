"""Spark backfill time: every declared view over generated payments, against the scan ceiling.

    .venv/bin/python -m benchmarks.batch [--rows 10000000] [--days 60] [--raw DIR]

Generates ``--rows`` payments over ``--days`` days in a temporary copy of the feature repo
(or reuses ``--raw``, a ``data/raw`` folder from ``hotpath generate``), then, in one Spark
session (``local[*]``):

1. the ceiling: read the raw parquet, judge nothing, group by user and day (one shuffle of
   every payment, the least any backfill must do), written to parquet;
2. ``run_batch`` over the whole range: every computed view the repo declares.

3. the ceiling again, in the now warm JVM.

Prints payments/s of each and the backfill's time as a multiple of the first ceiling's
(the figure earlier runs reported) and of the second's (the first one also pays the JVM's
warm-up, and on a loaded machine either may vary by 20 %). The ratio, not the absolute
figure, is comparable between machines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from pipelines.batch_job import run_batch
from pipelines.generate import GenerateConfig, generate
from pipelines.settings import DEFAULT_REPO, Settings
from pipelines.spark import spark_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--raw", type=Path, help="reuse this raw data folder")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hotpath-batch-bench-"))
    try:
        shutil.copytree(
            DEFAULT_REPO, root / "feature_repo", ignore=shutil.ignore_patterns("__pycache__")
        )
        s = Settings(repo=root / "feature_repo")
        if args.raw:
            s.raw_dir.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(args.raw.resolve(), s.raw_dir)
        else:
            t0 = time.perf_counter()
            generate(
                GenerateConfig(rows=args.rows, days=args.days, end=datetime.now(UTC)), s.raw_dir
            )
            print(f"generated {args.rows:,} payments in {time.perf_counter() - t0:.0f}s")
        spark = spark_session(s.spark.master, s.spark.driver_memory)
        raw = spark.read.parquet(str(s.raw_dir / "transactions"))
        days = [r["date"] for r in raw.select("date").distinct().collect()]
        first, last = min(days), max(days)
        rows = raw.count()
        print(f"{rows:,} payments, {first}..{last}, load average {os.getloadavg()[0]:.1f}")

        def scan_and_shuffle() -> float:
            t0 = time.perf_counter()
            (
                raw.groupBy("user_id", "date")
                .count()
                .write.mode("overwrite")
                .parquet(str(root / "ceiling"))
            )
            return time.perf_counter() - t0

        ceiling = scan_and_shuffle()
        print(f"ceiling (scan + one shuffle): {ceiling:7.1f}s  {rows / ceiling:12,.0f} payments/s")

        t0 = time.perf_counter()
        results = run_batch(spark, s.repo, s.raw_dir, s.offline_dir, first, last)
        backfill = time.perf_counter() - t0
        print(
            f"backfill ({len(results)} views):     {backfill:7.1f}s  {rows / backfill:12,.0f} "
            f"payments/s  = {backfill / ceiling:.1f}x the ceiling's time"
        )
        for r in results:
            print(f"    {r.name:<26} {r.rows:>12,} rows  {r.seconds:6.1f}s")
        again = scan_and_shuffle()
        print(
            f"ceiling again (warm JVM):     {again:7.1f}s  {rows / again:12,.0f} payments/s  "
            f"backfill = {backfill / again:.1f}x its time"
        )
        print(f"load average {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
