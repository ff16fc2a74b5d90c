"""Shared fixtures: a real redis-server, a Redis Cluster and a CQL stand-in for ScyllaDB (the
production profile's two tiers), Spark in local mode, and one generated project.

The project is a copy of ``feature_repo/`` in a temporary folder, so its ``../data``
is private to the test session. Its raw data is the generator's output plus a few
hand-placed payments exactly on window edges.

Every Spark JVM a test starts in a child process (``hotpath`` commands, notebook kernels,
spark-submit and its executors) reads ``tests/spark_conf/spark-defaults.conf``, through
``SPARK_CONF_DIR``, which children inherit: the client JIT compiler only, which starts
their small jobs about a fifth sooner and changes nothing they compute. This process's own
session keeps the default compilers: it runs the suite's longest jobs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cql_stand_in import CqlStandIn, start_on_loopback
from helpers import (
    ROOT,
    Background,
    RedisCluster,
    hotpath_background,
    start_redis_cluster,
    start_redis_server,
    stop,
)

from pipelines.generate import TRANSACTION_SCHEMA, GenerateConfig, GenerateResult, generate
from pipelines.settings import Settings, SparkSettings

SPARK_CONF_DIR = str(ROOT / "tests" / "spark_conf")
os.environ.setdefault("SPARK_CONF_DIR", SPARK_CONF_DIR)

EDGE_USER, VELOCITY_USER, STALE_USER, FRESH_USER = 900_001, 900_002, 900_003, 900_004
EDGE_MERCHANT = 900


DEMO_TEST = "test_demo.py"


@pytest.fixture(scope="session", autouse=True)
def demo_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Background | None]:
    """``hotpath demo`` on a fresh copy of the repo, started with the session when
    ``tests/test_demo.py`` is selected (None otherwise), which asserts on its output: a
    real end-to-end run in a subprocess of its own, mostly spent starting things up and
    waiting on them, so it overlaps the first tests instead of running after them.
    Stopped at the end of the session if still running."""
    if not any(item.path.name == DEMO_TEST for item in request.session.items):
        yield None
        return
    root = tmp_path_factory.mktemp("demo")
    repo = root / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("__pycache__"))
    run = hotpath_background(
        "demo", "--rows", "3000", "--days", "5",
        logs=root,
        repo=repo,
        clean_env=True,
        # answers, not deadlines, are checked there: budgets a busy machine cannot break
        env={"HOTPATH_SERVING_FEATURES_BUDGET_MS": "2000",
             "HOTPATH_SERVING_MODEL_BUDGET_MS": "2000"},
    )  # fmt: skip
    yield run
    stop(run.proc)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server for the session, stopped after it."""
    proc, url = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A real 3-master Redis Cluster for the session."""
    cluster = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def scylla() -> Iterator[CqlStandIn]:
    """The CQL stand-in for the production profile's ScyllaDB tier, on the port and in the
    datacenter the profile names (``feature_store.production.yaml``, ``Settings``)."""
    stand_in = start_on_loopback(9042, Settings.model_fields["scylla_local_dc"].default)
    yield stand_in
    stand_in.stop()


def production_settings(settings: Settings, cluster: RedisCluster, scylla: CqlStandIn) -> Settings:
    """``settings`` on the production profile: Redis Cluster + (the stand-in for) ScyllaDB."""
    return settings.model_copy(
        update={
            "profile": "production",
            "redis_cluster_nodes": cluster.nodes,
            "redis_password": cluster.password,
            "scylla_host": scylla.host,
        }
    )


@pytest.fixture(scope="session")
def spark():
    """This process's Spark session, its JVM started without ``tests/spark_conf``."""
    from pipelines.spark import spark_session

    ours = os.environ.get("SPARK_CONF_DIR") == SPARK_CONF_DIR
    if ours:
        del os.environ["SPARK_CONF_DIR"]
    try:
        return spark_session("local[2]", "2g")
    finally:
        if ours:
            os.environ["SPARK_CONF_DIR"] = SPARK_CONF_DIR


@dataclass(frozen=True)
class Project:
    settings: Settings
    generated: GenerateResult
    now: datetime
    edge_day: datetime  # a UTC midnight with payments placed exactly on its window edges

    @property
    def transactions(self) -> pd.DataFrame:
        return pd.read_parquet(self.settings.raw_dir / "transactions").drop(columns="date")


def _edge_events(day0: datetime, start: datetime, now: datetime) -> pd.DataFrame:
    """Payments exactly on window boundaries (inclusive/exclusive ends, ties, label timing)."""
    us = timedelta(microseconds=1)
    t0 = day0 + timedelta(hours=12)
    m5 = timedelta(minutes=5)
    rows = [
        # user spending windows around the day0 snapshot
        (EDGE_USER, 1, day0, 10.0),
        (EDGE_USER, 1, day0 - us, 20.0),
        (EDGE_USER, 2, day0 - timedelta(days=30), 40.0),
        (EDGE_USER, 2, day0 - timedelta(days=30) - us, 80.0),
        (EDGE_USER, 3, day0 - timedelta(days=7), 5.0),
        (EDGE_USER, 3, day0 - timedelta(days=1), 7.0),
        # velocity windows: (t - 5m, t] and (t - 1h, t], plus a tie
        (VELOCITY_USER, 1, t0, 1.0),
        (VELOCITY_USER, 2, t0 + m5 - us, 2.0),
        (VELOCITY_USER, 3, t0 + 2 * m5 - us, 4.0),
        (VELOCITY_USER, 4, t0 + 2 * m5 - us, 8.0),
        (VELOCITY_USER, 1, t0 + timedelta(hours=1), 16.0),
        (VELOCITY_USER, 1, t0 + timedelta(days=1), 32.0),
        # a user last seen long ago: every feature of theirs is past its TTL now
        (STALE_USER, 1, start + timedelta(hours=1), 50.0),
        # a payment minutes before "now": the one-hour views hold a value whatever the hour
        (FRESH_USER, 1, now - timedelta(minutes=3), 6.0),
    ]
    df = pd.DataFrame(rows, columns=["user_id", "merchant_id", "event_timestamp", "amount"])
    df["merchant_id"] = df["merchant_id"].where(df.user_id != EDGE_USER, EDGE_MERCHANT)
    df["transaction_id"] = range(10**12, 10**12 + len(df))
    df["device_id"] = 1
    df["country"] = "US"
    df["is_fraud"] = False
    df["fraud_pattern"] = ""
    df["label_ts"] = df["event_timestamp"] + timedelta(days=1)
    # a fraud at the edge merchant whose label becomes known exactly at day0
    df.loc[df.amount == 5.0, ["is_fraud", "fraud_pattern"]] = [True, "ato"]
    df.loc[df.amount == 5.0, "label_ts"] = day0
    df.loc[df.amount == 7.0, ["is_fraud", "fraud_pattern"]] = [True, "ato"]
    df.loc[df.amount == 7.0, "label_ts"] = day0 - us
    return df


def _append_events(raw_dir: Path, events: pd.DataFrame) -> None:
    events = events.assign(event_timestamp=pd.to_datetime(events.event_timestamp, utc=True))
    events["label_ts"] = pd.to_datetime(events.label_ts, utc=True)
    for day, part in events.groupby(events.event_timestamp.dt.strftime("%Y-%m-%d")):
        table = pa.Table.from_pandas(part[TRANSACTION_SCHEMA.names], TRANSACTION_SCHEMA, False)
        pq.write_table(table, raw_dir / "transactions" / f"date={day}" / "part-edges.parquet")


def make_project(
    root: Path,
    rows: int = 6000,
    days: int = 40,
    users: int | None = 150,
    merchants: int | None = 30,
    edges: bool = True,
) -> Project:
    """Copy the feature repo under ``root`` and generate its raw data (ending now), with the
    hand-placed edge payments unless ``edges`` is false (they need ``days`` >= 37)."""
    repo = root / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("__pycache__"))
    settings = Settings(repo=repo, spark=SparkSettings(master="local[2]"))
    now = datetime.now(UTC).replace(microsecond=0)
    result = generate(
        GenerateConfig(rows=rows, days=days, end=now, seed=11, users=users, merchants=merchants),
        settings.raw_dir,
    )
    edge_day = datetime.combine((now - timedelta(days=5)).date(), datetime.min.time(), UTC)
    if edges:
        _append_events(settings.raw_dir, _edge_events(edge_day, result.start, now))
    return Project(settings, result, now, edge_day)


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return make_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="session")
def batch_done(project: Project, spark) -> Project:
    """The project with the Spark backfill run over its whole raw range."""
    from pipelines.batch_job import run_batch

    first = project.generated.start.date()
    last = project.now.date()
    s = project.settings
    run_batch(spark, s.repo, s.raw_dir, s.offline_dir, first, last)
    return project


@pytest.fixture(scope="session")
def applied(batch_done: Project):
    """The embedded profile's FeatureStore with the repo applied (its offline store serves
    every profile)."""
    from pipelines import store

    fs = store.open_store(batch_done.settings)
    store.apply(fs)
    return fs


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, spark):
    """The demo's default data size, trained twice (versions 1 and 2)."""
    from pipelines import store
    from pipelines.batch_job import run_batch
    from pipelines.training import train

    project = make_project(
        tmp_path_factory.mktemp("training"), 30_000, 35, users=None, merchants=None, edges=False
    )
    s = project.settings
    run_batch(
        spark, s.repo, s.raw_dir, s.offline_dir, project.generated.start.date(), project.now.date()
    )
    fs = store.open_store(s)
    store.apply(fs)
    first = train(fs, s.model_repository, log=lambda _: None)
    return project, fs, first


@pytest.fixture(scope="session")
def trained_online(trained):
    """``trained`` with its online store loaded up to now (``/ready`` wants it): loaded
    once for every module that serves or checks it."""
    from pipelines import store

    _, fs, _ = trained
    store.materialize(fs, datetime.now(UTC))
    return trained


def read_offline(project: Project, table: str) -> pd.DataFrame:
    df = pd.read_parquet(project.settings.offline_dir / table)
    return df.drop(columns="date").reset_index(drop=True)
