"""The ``hotpath`` command as a user runs it: bad input gets one line and a non-zero exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, Project, free_port

from pipelines.generate import TRANSACTION_SCHEMA

HOTPATH = [sys.executable, "-m", "pipelines.cli"]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*HOTPATH, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def empty_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("__pycache__"))
    return repo


def test_missing_raw_data(empty_repo: Path) -> None:
    proc = run("--repo", str(empty_repo), "batch", "--start", "2026-01-01", "--end", "2026-01-02")
    assert_one_line_error(proc, "raw transactions not found", str(empty_repo.parent / "data"))


def test_end_before_start(batch_done: Project) -> None:
    repo = str(batch_done.settings.repo)
    proc = run("--repo", repo, "batch", "--start", "2026-01-10", "--end", "2026-01-01")
    assert_one_line_error(proc, "2026-01-01 is before start date 2026-01-10")


def test_malformed_date(empty_repo: Path) -> None:
    proc = run("--repo", str(empty_repo), "generate", "--end", "yesterday")
    assert_one_line_error(proc, "--end", "'yesterday'")


def test_empty_parquet(empty_repo: Path) -> None:
    part = empty_repo.parent / "data" / "raw" / "transactions" / "date=2026-01-01"
    part.mkdir(parents=True)
    pq.write_table(TRANSACTION_SCHEMA.empty_table(), part / "part-00000.parquet")
    proc = run("--repo", str(empty_repo), "batch")
    assert_one_line_error(proc, "no transactions under")


def test_malformed_parquet(empty_repo: Path) -> None:
    part = empty_repo.parent / "data" / "raw" / "transactions" / "date=2026-01-01"
    part.mkdir(parents=True)
    (part / "part-00000.parquet").write_bytes(b"this is not parquet" * 10)
    proc = run("--repo", str(empty_repo), "batch")
    assert_one_line_error(proc, "cannot read raw transactions")


def test_parquet_missing_columns(empty_repo: Path) -> None:
    part = empty_repo.parent / "data" / "raw" / "transactions" / "date=2026-01-01"
    part.mkdir(parents=True)
    pq.write_table(pa.table({"user_id": [1, 2]}), part / "part-00000.parquet")
    proc = run("--repo", str(empty_repo), "batch")
    assert_one_line_error(proc, "lack columns", "amount")


def test_unknown_profile(empty_repo: Path) -> None:
    proc = run("--repo", str(empty_repo), "--profile", "postgres", "apply")
    assert_one_line_error(proc, "unknown profile 'postgres'", "embedded, redis")


def test_not_a_feature_repo(tmp_path: Path) -> None:
    proc = run("--repo", str(tmp_path), "apply")
    assert_one_line_error(proc, "not a feature repo", str(tmp_path))


def test_redis_unreachable_names_the_url(empty_repo: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    for command in ("apply", "materialize"):
        proc = run("--repo", str(empty_repo), "--profile", "redis", "--redis-url", url, command)
        assert_one_line_error(proc, "Redis unreachable", url)


def test_wrong_redis_password(empty_repo: Path, redis_url: str) -> None:
    url = redis_url.replace("redis://", "redis://:wrong@")
    proc = run("--repo", str(empty_repo), "--profile", "redis", "--redis-url", url, "apply")
    assert_one_line_error(proc, "Redis")


def test_materialize_before_apply(empty_repo: Path) -> None:
    proc = run("--repo", str(empty_repo), "materialize")
    assert_one_line_error(proc, "hotpath apply")


def test_spark_submit_runs_the_same_job(batch_done: Project, tmp_path: Path) -> None:
    """The batch job submitted with spark-submit writes what the in-process run wrote, and
    reports the raw events it refused (one with a negative amount is added here)."""
    import pandas as pd

    repo = tmp_path / "feature_repo"
    shutil.copytree(batch_done.settings.repo, repo, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(batch_done.settings.raw_dir, tmp_path / "data" / "raw")
    day = batch_done.edge_day.date().isoformat()
    refused = pd.read_parquet(tmp_path / "data" / "raw" / "transactions" / f"date={day}").head(1)
    refused = refused.assign(amount=-1.0, transaction_id=9 * 10**12)
    pq.write_table(
        pa.Table.from_pandas(refused[TRANSACTION_SCHEMA.names], TRANSACTION_SCHEMA, False),
        tmp_path / "data" / "raw" / "transactions" / f"date={day}" / "part-refused.parquet",
    )
    spark_submit = Path(sys.executable).with_name("spark-submit")
    proc = subprocess.run(
        [
            str(spark_submit),
            "--master",
            "local[2]",
            str(ROOT / "pipelines" / "batch_job.py"),
            "--start",
            day,
            "--end",
            day,
            "--repo",
            str(repo),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYSPARK_PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused 1 raw events (bad_amount: 1)" in proc.stdout, proc.stdout
    rejected = pd.read_parquet(tmp_path / "data" / "rejected" / "transactions")
    assert rejected.transaction_id.tolist() == [9 * 10**12] and rejected.code[0] == "bad_amount"
    for table in ("user_spending_stats", "user_velocity"):
        mine = pd.read_parquet(tmp_path / "data" / "offline" / table / f"date={day}")
        ref = pd.read_parquet(batch_done.settings.offline_dir / table / f"date={day}")
        cols = list(ref.columns)
        pd.testing.assert_frame_equal(
            mine[cols].sort_values(cols).reset_index(drop=True),
            ref.sort_values(cols).reset_index(drop=True),
        )


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """The README's main job, on a fresh copy of the repo."""
    repo = tmp_path / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("__pycache__"))
    proc = run("--repo", str(repo), "demo", "--rows", "5000", "--days", "35", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    steps = (
        "generate",
        "spark batch backfill",
        "feast apply",
        "materialize",
        "train on",
        "published version 1",
        "demo finished",
    )
    for step in steps:
        assert step in out, out
    assert "user_txn_count_30d" in out and "request-time" in out
    assert (tmp_path / "data" / "online_store.db").exists()
    assert (
        tmp_path / "data" / "model_repository" / "fraud_detection" / "1" / "model.onnx"
    ).exists()


def test_train_into_unwritable_repository(applied, batch_done: Project, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    repo = str(batch_done.settings.repo)
    proc = run("--repo", repo, "train", "--model-repository", str(blocker / "models"))
    assert_one_line_error(proc, "not writable", str(blocker / "models"))


def test_triton_binary_missing(batch_done: Project, tmp_path: Path) -> None:
    env_venv = tmp_path / "no-venv"
    proc = subprocess.run(
        [*HOTPATH, "--repo", str(batch_done.settings.repo), "triton", "start"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "HOTPATH_TRITON_VENV": str(env_venv)},
    )
    assert_one_line_error(proc, "tritonserver not found", str(env_venv))
