"""Feature retrieval latency: Feast SDK ``get_online_features`` vs the serving fast path.

One run, same data, same FeatureService (``fraud_detection_v1``, on-demand features
included), single-row calls from one client, on SQLite and on a real redis-server:

    .venv/bin/python -m benchmarks.feature_retrieval [--rows 30000] [--calls 2000]

It builds its own project in a temporary folder (generate, Spark backfill, apply,
materialize) and starts redis-server on a free loopback port when one is installed.
Feast is measured at its best here: ``mode="python"`` on-demand view, no pandas.

Each peer is measured twice: unpinned, and with this process and redis-server pinned to
one CPU. On these 2-vCPU VMs a loopback round trip costs ~14 µs when both ends share a
CPU and ~50 µs when the kernel wakes the other vCPU, and which one a run gets is chance;
pinning removes that noise from both peers alike.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from benchmarks.timing import report, timed
from pipelines import store
from pipelines.batch_job import run_batch
from pipelines.generate import GenerateConfig, GenerateResult, generate
from pipelines.settings import DEFAULT_REPO, Settings
from pipelines.spark import spark_session
from serving.online_features import OnlineFeatures
from tests.helpers import ServerError, start_redis_server, stop

SERVICE = "fraud_detection_v1"


@contextmanager
def pinned(*pids: int) -> Iterator[None]:
    """This process and ``pids`` on CPU 0 for the block (see the module docstring)."""
    before = {pid: os.sched_getaffinity(pid) for pid in (0, *pids)}
    for pid in before:
        os.sched_setaffinity(pid, {0})
    try:
        yield
    finally:
        for pid, cpus in before.items():
            os.sched_setaffinity(pid, cpus)


def compare(
    name_a: str,
    call_a: Callable[[dict], object],
    name_c: str,
    call_c: Callable[[dict], object],
    rows: list[dict],
    redis_pid: int | None,
) -> None:
    """Feast's call vs the fast path, unpinned then pinned, with the ratios."""
    placements = [("unpinned", None)]
    if redis_pid is not None:
        placements.append(("pinned to one CPU with redis-server", redis_pid))
    for label, pid in placements:
        print(f"  {label}:")
        with pinned(pid) if pid is not None else _nothing():
            a = report(name_a, timed(call_a, rows))
            c = report(name_c, timed(call_c, rows))
        print(f"    fast path vs Feast SDK: {a[0] / c[0]:.1f}x p50, {a[1] / c[1]:.1f}x p99")
    return a, c


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def backfilled_project(
    settings: Settings, rows: int, calls: int
) -> tuple[GenerateResult, list[dict]]:
    """Generate ``rows`` payments ending now, backfill every feature with Spark, and draw
    ``calls`` request bodies (user, merchant, amount) from the payments."""
    now = datetime.now(UTC).replace(microsecond=0)
    gen = generate(GenerateConfig(rows=rows, days=35, end=now), settings.raw_dir)
    spark = spark_session()
    run_batch(
        spark, settings.repo, settings.raw_dir, settings.offline_dir, gen.start.date(), now.date()
    )
    tx = pd.read_parquet(settings.raw_dir / "transactions")
    sample = tx.sample(calls, random_state=1, replace=len(tx) < calls)
    bodies = [
        {"user_id": int(r.user_id), "merchant_id": int(r.merchant_id), "amount": float(r.amount)}
        for r in sample.itertuples()
    ]
    return gen, bodies


def measure(settings: Settings, rows: list[dict], redis_pid: int | None) -> None:
    """(a) and (c) on one profile's freshly materialized online store."""
    fs = store.open_store(settings)
    store.apply(fs)
    store.materialize(fs)
    service = fs.get_feature_service(SERVICE)
    fast = OnlineFeatures(fs, SERVICE)
    gc.collect()
    gc.freeze()  # as the service does after start-up: no full collections over Feast's objects
    compare(
        "(a) Feast SDK get_online_features",
        lambda r: fs.get_online_features(features=service, entity_rows=[r]),
        "(c) fast path, in-process",
        lambda r: fast.read([r]),
        rows,
        redis_pid,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--calls", type=int, default=2_000)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="hotpath-bench-"))
    shutil.copytree(
        DEFAULT_REPO, root / "feature_repo", ignore=shutil.ignore_patterns("__pycache__")
    )
    try:
        redis_proc, url = start_redis_server(root)
    except ServerError:
        redis_proc, url = None, None
    try:
        base = Settings(repo=root / "feature_repo")
        gen, rows = backfilled_project(base, args.rows, args.calls)
        profiles = [("embedded", base)]
        if url:
            profiles.append(
                ("redis", base.model_copy(update={"profile": "redis", "redis_url": url}))
            )
        else:
            print("redis-server not installed: measuring SQLite only")
        print(f"{args.calls:,} single-row calls of {SERVICE}, {gen.transactions:,} payments:")
        for name, settings in profiles:
            print(f"[{name}]")
            pid = redis_proc.pid if name == "redis" and redis_proc else None
            measure(settings, rows, pid)
    finally:
        if redis_proc:
            stop(redis_proc)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
