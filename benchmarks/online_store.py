"""Materialization throughput into Redis: Feast's default engine vs hotpath's, one run.

    .venv/bin/python -m benchmarks.online_store [--rows 1000000]

Builds a project in a temporary folder, adds one day of ``user_spending_stats`` for
``--rows`` users to its offline store, and materializes that view (rows/s, wall clock
including the offline read):

  (a) Feast's default local engine (``batch_engine: local``) into a standalone redis-server
  (b) ``pipelines.materialize`` (what ``hotpath materialize`` runs) into the same Redis
  (c) ``pipelines.materialize`` into a 3-master Redis Cluster on loopback

Needs redis-server and redis-cli (Debian's redis-server package).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis
from feast import FeatureStore

from benchmarks.feature_retrieval import backfilled_project
from pipelines import store
from pipelines.materialize import load_view
from pipelines.settings import DEFAULT_REPO, Settings
from tests.helpers import ServerError, start_redis_cluster, start_redis_server, stop

VIEW = "user_spending_stats"
FIRST_USER = 10_000_000


def add_day(s: Settings, rows: int, day: datetime) -> None:
    """``rows`` users' snapshot rows for ``day`` in the view's offline table."""
    table_dir = s.offline_dir / VIEW
    schema = pq.read_schema(next(table_dir.glob("date=*/*.parquet")))
    rng = np.random.default_rng(1)
    cols = {}
    for field in schema:
        if field.name == "user_id":
            cols[field.name] = pa.array(np.arange(FIRST_USER, FIRST_USER + rows), pa.int64())
        elif field.name == "event_timestamp":
            cols[field.name] = pa.array(np.full(rows, int(day.timestamp() * 1e6)), field.type)
        elif pa.types.is_integer(field.type):
            cols[field.name] = pa.array(rng.integers(0, 50, rows), field.type)
        else:
            cols[field.name] = pa.array(rng.random(rows) * 100, field.type)
    part = table_dir / f"date={day.date()}"
    part.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), part / "bench.parquet")


def profile_yaml(repo: Path, name: str, online: str, engine: str) -> Path:
    base = (repo / "feature_store.redis.yaml").read_text()
    tail = base[base.index("offline_store:") :]
    if engine == "local":
        tail = (
            tail[: tail.index("batch_engine:")]
            + "batch_engine: local\n"
            + (tail[tail.index("entity_key_serialization_version") :])
        )
    path = repo / f"feature_store.{name}.yaml"
    path.write_text(
        f"project: hotpath\nprovider: local\nregistry: ../data/registry_{name}.db\n"
        f"online_store:\n{online}\n{tail}"
    )
    return path


def report(name: str, rows: int, seconds: float) -> float:
    print(f"  {name:<52} {rows / seconds:10,.0f} rows/s ({rows:,} in {seconds:.1f}s)")
    return rows / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

    root = Path(tempfile.mkdtemp(prefix="hotpath-store-bench-"))
    repo = root / "feature_repo"
    shutil.copytree(DEFAULT_REPO, repo, ignore=shutil.ignore_patterns("__pycache__"))
    try:
        redis_proc, url = start_redis_server(root)
        cluster = start_redis_cluster(root / "cluster", password=None)
    except ServerError as e:
        sys.exit(str(e))
    nodes = cluster.nodes
    try:
        s = Settings(repo=repo)
        backfilled_project(s, 30_000, 1)  # the repo's other sources must exist for apply
        day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        add_day(s, args.rows, day)
        start, end = day - timedelta(hours=1), day + timedelta(hours=1)
        port = url.rsplit(":", 1)[1].split("/")[0]
        standalone = f'  type: redis\n  connection_string: "127.0.0.1:{port}"'
        clustered = f'  type: redis\n  redis_type: redis_cluster\n  connection_string: "{nodes}"'
        print(f"materializing {VIEW}: {args.rows:,} entity rows (one day), 2-core machine")

        fs = FeatureStore(
            repo_path=str(repo), fs_yaml_file=profile_yaml(repo, "bl", standalone, "local")
        )
        store.apply(fs)
        t0 = time.perf_counter()
        fs.materialize(start_date=start, end_date=end, feature_views=[VIEW])
        feast = report("(a) Feast local engine -> Redis", args.rows, time.perf_counter() - t0)

        redis.Redis.from_url(url).flushdb()
        fs = FeatureStore(
            repo_path=str(repo), fs_yaml_file=profile_yaml(repo, "hs", standalone, "spark")
        )
        store.apply(fs)
        load = load_view(fs, fs.get_feature_view(VIEW), fs.config.online_store, start, end, False)
        ours = report("(b) hotpath -> Redis", load.written, load.seconds)

        fs = FeatureStore(
            repo_path=str(repo), fs_yaml_file=profile_yaml(repo, "hc", clustered, "spark")
        )
        store.apply(fs)
        load = load_view(fs, fs.get_feature_view(VIEW), fs.config.online_store, start, end, False)
        cl = report("(c) hotpath -> Redis Cluster (3 masters)", load.written, load.seconds)
        print(
            f"  hotpath vs Feast default: {ours / feast:.1f}x (Redis), {cl / feast:.1f}x (cluster)"
        )
    finally:
        stop(redis_proc)
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
