"""The batch backfill submitted to a Spark standalone cluster (a master and two workers on
loopback, see :mod:`spark_cluster`) writes what the in-process ``local`` run wrote, and
still does when a worker and its executor are killed mid-job (Spark reruns their tasks)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import Project
from helpers import ROOT
from spark_cluster import SPARK_HOME, SparkCluster, start_spark_cluster

from pipelines.contract import computed_views
from pipelines.generate import TRANSACTION_SCHEMA

REFUSED_ID = 9 * 10**12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SparkCluster]:
    c = start_spark_cluster(tmp_path_factory.mktemp("spark-cluster"), workers=2)
    yield c
    c.stop()


def _copy_project(done: Project, root: Path) -> tuple[Path, str]:
    """The repo and raw data under ``root``, plus one refused raw event on the edge day."""
    repo = root / "feature_repo"
    shutil.copytree(done.settings.repo, repo, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(done.settings.raw_dir, root / "data" / "raw")
    day = done.edge_day.date().isoformat()
    part = root / "data" / "raw" / "transactions" / f"date={day}"
    refused = pd.read_parquet(part).head(1).assign(amount=-1.0, transaction_id=REFUSED_ID)
    pq.write_table(
        pa.Table.from_pandas(refused[TRANSACTION_SCHEMA.names], TRANSACTION_SCHEMA, False),
        part / "part-refused.parquet",
    )
    return repo, day


def _submit(master: str, repo: Path, day: str) -> subprocess.Popen:
    """``spark-submit pipelines/batch_job.py`` for one day, its stdout a line-buffered pipe."""
    return subprocess.Popen(
        [str(SPARK_HOME / "bin" / "spark-submit"), "--master", master,
         "--conf", "spark.task.maxFailures=4", "--conf", "spark.executor.memory=768m",
         str(ROOT / "pipelines" / "batch_job.py"),
         "--start", day, "--end", day, "--repo", str(repo)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        env={**os.environ, "PYSPARK_PYTHON": sys.executable,
             "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip


def _assert_same_tables(done: Project, root: Path, day: str) -> None:
    for view in computed_views(done.settings.repo):
        mine = pd.read_parquet(root / "data" / "offline" / view.name / f"date={day}")
        ref = pd.read_parquet(done.settings.offline_dir / view.name / f"date={day}")
        cols = list(ref.columns)
        assert len(ref) > 0, view.name
        pd.testing.assert_frame_equal(
            mine[cols].sort_values(cols).reset_index(drop=True),
            ref.sort_values(cols).reset_index(drop=True),
            obj=view.name,
        )


def test_a_worker_killed_mid_job_changes_nothing(
    batch_done: Project, cluster: SparkCluster, tmp_path
) -> None:
    """Submitted to the cluster, the job writes every computed view's day as the local run
    did, and reports and writes the refused event, although one worker (and its executor)
    is killed -9 once the job has judged the raw events and before it computes the views:
    Spark reruns the lost tasks on the other worker. (One run shows both: a clean cluster
    run would take as long again.)"""
    repo, day = _copy_project(batch_done, tmp_path)
    proc = _submit(cluster.url, repo, day)
    assert proc.stdout is not None
    head = []
    for line in proc.stdout:  # until the refused-events line: views not computed yet
        head.append(line)
        if line.startswith("refused"):
            break
    assert head and head[-1].startswith("refused"), "".join(head) + proc.stderr.read()[-3000:]
    assert cluster.state()["activeapps"], "the job is not running on the cluster"
    cluster.kill_worker(1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "refused 1 raw events (bad_amount: 1)" in head[-1], head[-1]
    rejected = pd.read_parquet(tmp_path / "data" / "rejected" / "transactions")
    assert rejected.transaction_id.tolist() == [REFUSED_ID] and rejected.code[0] == "bad_amount"
    views = [line for line in out.splitlines() if " rows in " in line]
    assert len(views) == len(computed_views(repo)), out  # all written after the kill
    assert "Lost executor" in err or "ExecutorLostFailure" in err, err[-3000:]
    _assert_same_tables(batch_done, tmp_path, day)
