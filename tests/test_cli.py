"""The ``hotpath`` command as a user runs it: bad input gets one line and a non-zero exit."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from conftest import Project
from helpers import ROOT, concurrently, free_port

from pipelines.generate import TRANSACTION_SCHEMA
from serving.model_repository import versions

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


def _copy_repo(root: Path) -> Path:
    repo = root / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("__pycache__"))
    return repo


@pytest.fixture
def empty_repo(tmp_path: Path) -> Path:
    return _copy_repo(tmp_path)


def _raw_partition(repo: Path) -> Path:
    part = repo.parent / "data" / "raw" / "transactions" / "date=2026-01-01"
    part.mkdir(parents=True)
    return part


@dataclass(frozen=True)
class Ran:
    proc: subprocess.CompletedProcess
    subject: str  # what the error must name: the repo's data folder, a URL, a path


@pytest.fixture(scope="module")
def ran(
    tmp_path_factory: pytest.TempPathFactory, project: Project, redis_url: str
) -> dict[str, Ran]:
    """The commands that fail only after seconds of start-up (Feast imported, for some
    a JVM started), run at once so that their start-ups overlap; the tests below
    assert on them one by one. Each runs on a fresh copy of the repo, except the one that
    needs ``project``'s raw data. ``train`` runs on a repo never applied: it must refuse an
    unwritable model repository before it opens the store (and starts Spark)."""

    def fresh() -> Path:
        return _copy_repo(tmp_path_factory.mktemp("cli"))

    generated = str(project.settings.repo)
    missing, empty, malformed, no_columns = fresh(), fresh(), fresh(), fresh()
    part = "part-00000.parquet"
    pq.write_table(TRANSACTION_SCHEMA.empty_table(), _raw_partition(empty) / part)
    (_raw_partition(malformed) / part).write_bytes(b"this is not parquet" * 10)
    pq.write_table(pa.table({"user_id": [1, 2]}), _raw_partition(no_columns) / part)
    closed = f"redis://127.0.0.1:{free_port()}/0"
    wrong = redis_url.replace("redis://", "redis://:wrong@")
    blocker = tmp_path_factory.mktemp("cli") / "a-file"
    blocker.write_text("x")
    redis = ("--profile", "redis", "--redis-url")
    commands: dict[str, tuple[tuple[str, ...], str]] = {
        "missing raw data": (
            ("--repo", str(missing), "batch", "--start", "2026-01-01", "--end", "2026-01-02"),
            str(missing.parent / "data"),
        ),
        "end before start": (("--repo", generated, "batch", "--start", "2026-01-10", "--end",
                              "2026-01-01"), ""),
        "empty parquet": (("--repo", str(empty), "batch"), ""),
        "malformed parquet": (("--repo", str(malformed), "batch"), ""),
        "missing columns": (("--repo", str(no_columns), "batch"), ""),
        "unreachable apply": (("--repo", str(fresh()), *redis, closed, "apply"), closed),
        "unreachable materialize": (("--repo", str(fresh()), *redis, closed, "materialize"),
                                    closed),
        "wrong password": (("--repo", str(fresh()), *redis, wrong, "apply"), ""),
        "materialize before apply": (("--repo", str(fresh()), "materialize"), ""),
        "unwritable repository": (
            ("--repo", str(fresh()), "train", "--model-repository", str(blocker / "models")),
            str(blocker / "models"),
        ),
    }  # fmt: skip
    procs = concurrently(*(partial(run, *args) for args, _ in commands.values()))
    return {
        k: Ran(p, subject) for (k, (_, subject)), p in zip(commands.items(), procs, strict=True)
    }


def test_missing_raw_data(ran: dict[str, Ran]) -> None:
    r = ran["missing raw data"]
    assert_one_line_error(r.proc, "raw transactions not found", r.subject)


def test_end_before_start(ran: dict[str, Ran]) -> None:
    assert_one_line_error(
        ran["end before start"].proc, "2026-01-01 is before start date 2026-01-10"
    )


def test_malformed_date(empty_repo: Path) -> None:
    proc = run("--repo", str(empty_repo), "generate", "--end", "yesterday")
    assert_one_line_error(proc, "--end", "'yesterday'")


def test_empty_parquet(ran: dict[str, Ran]) -> None:
    assert_one_line_error(ran["empty parquet"].proc, "no transactions under")


def test_malformed_parquet(ran: dict[str, Ran]) -> None:
    assert_one_line_error(ran["malformed parquet"].proc, "cannot read raw transactions")


def test_parquet_missing_columns(ran: dict[str, Ran]) -> None:
    assert_one_line_error(ran["missing columns"].proc, "lack columns", "amount")


def test_unknown_profile(empty_repo: Path) -> None:
    proc = run("--repo", str(empty_repo), "--profile", "postgres", "apply")
    assert_one_line_error(proc, "unknown profile 'postgres'", "embedded, redis")


def test_not_a_feature_repo(tmp_path: Path) -> None:
    proc = run("--repo", str(tmp_path), "apply")
    assert_one_line_error(proc, "not a feature repo", str(tmp_path))


def test_redis_unreachable_names_the_url(ran: dict[str, Ran]) -> None:
    for command in ("apply", "materialize"):
        r = ran[f"unreachable {command}"]
        assert_one_line_error(r.proc, "Redis unreachable", r.subject)


def test_wrong_redis_password(ran: dict[str, Ran]) -> None:
    assert_one_line_error(ran["wrong password"].proc, "Redis")


def test_materialize_before_apply(ran: dict[str, Ran]) -> None:
    assert_one_line_error(ran["materialize before apply"].proc, "hotpath apply")


def test_train_into_unwritable_repository(ran: dict[str, Ran]) -> None:
    r = ran["unwritable repository"]
    assert_one_line_error(r.proc, "not writable", r.subject)


def test_triton_binary_missing(empty_repo: Path, tmp_path: Path) -> None:
    env_venv = tmp_path / "no-venv"
    proc = subprocess.run(
        [*HOTPATH, "--repo", str(empty_repo), "triton", "start"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "HOTPATH_TRITON_VENV": str(env_venv)},
    )
    assert_one_line_error(proc, "tritonserver not found", str(env_venv))


def test_unknown_backend_is_refused_before_any_work(empty_repo: Path) -> None:
    proc = run("--repo", str(empty_repo), "serve", "--backend", "nope")
    assert_one_line_error(proc, "backend", "'onnx' or 'triton'")


@pytest.mark.parametrize(
    ("setting", "value", "fragment"),
    [
        ("--port", "99999", "serving.port"),  # hung, announcing it served on that port
        ("--port", "0", "serving.port"),
        ("--host", "", "serving.host"),  # bound every interface, no key asked
        ("HOTPATH_SERVING_MAX_BATCH", "0", "serving.max_batch"),
        ("HOTPATH_SERVING_BODY_TIMEOUT_S", "-1", "serving.body_timeout_s"),
        ("HOTPATH_SERVING_PREDICTION_CACHE", '{"fraud_detection": -3}', "prediction_cache"),
    ],
)
def test_a_serving_setting_out_of_range_is_refused_before_any_work(
    empty_repo: Path, setting: str, value: str, fragment: str
) -> None:
    option = setting.startswith("--")
    proc = subprocess.run(
        [*HOTPATH, "--repo", str(empty_repo), "serve", *((setting, value) if option else ())],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **({} if option else {setting: value})},
    )
    assert_one_line_error(proc, fragment)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--rate", "-5"), "stream.rate"),  # ran as fast as possible
        (("--lateness", "-1"), "stream.lateness_s"),  # ran, every event "late" by nothing
        (("--metrics-port", "70000"), "stream.metrics_port"),  # an OverflowError
        (("--process-id", "1"), "--addresses"),  # ran as if alone
        (("--file", __file__), "as parquet"),  # a worker's panic with a Rust backtrace
    ],
)
def test_a_stream_setting_out_of_range_is_refused_before_any_work(
    empty_repo: Path, args: tuple[str, ...], fragment: str
) -> None:
    proc = run("--repo", str(empty_repo), "stream", *args, timeout=60)
    assert_one_line_error(proc, fragment)


@pytest.mark.parametrize(
    "args",
    [
        ("generate", "--seed", "-1"),  # a ValueError naming no option
        ("replay", "--rate", "inf"),  # an OverflowError after "replaying"
    ],
)
def test_a_data_option_out_of_range_is_a_usage_error(empty_repo: Path, args: tuple) -> None:
    proc = run("--repo", str(empty_repo), *args, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"Invalid value for '{args[1]}'" in proc.stderr, proc.stderr


@pytest.mark.parametrize("url", ["nope", ""])
def test_a_server_url_that_is_no_url_is_one_line(empty_repo: Path, url: str) -> None:
    """It was a ValueError "unknown url type" (or, empty, the default server)."""
    proc = run("--repo", str(empty_repo), "models", "status", "--url", url, timeout=60)
    assert_one_line_error(proc, "--url must be")


@pytest.mark.parametrize("option", ["--http-port", "--grpc-port", "--metrics-port"])
def test_a_triton_port_out_of_range_is_a_usage_error(empty_repo: Path, option: str) -> None:
    """99999 was taken (Triton listened on 34463, 99999 - 65536, and said 99999)."""
    proc = run("--repo", str(empty_repo), "triton", "start", option, "99999", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"Invalid value for '{option}'" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "args",
    [("--snapshot-interval", "0"), ("--backup-interval", "-5"), ("--process-id", "-1")],
)
def test_a_stream_option_out_of_range_is_a_usage_error(empty_repo: Path, args: tuple) -> None:
    """Ran before (a zero or negative epoch interval, a negative backup), or died with an
    OverflowError (a negative process id): now the option is named, exit 2 (usage)."""
    proc = run("--repo", str(empty_repo), "stream", *args, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"Invalid value for '{args[0]}'" in proc.stderr, proc.stderr


def test_options_fall_back_to_the_settings_tree(empty_repo: Path) -> None:
    """An option left out takes the settings' value, environment included: here the serving
    section's backend, refused by name before anything starts."""
    proc = subprocess.run(
        [*HOTPATH, "--repo", str(empty_repo), "serve"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "HOTPATH_SERVING_BACKEND": "nope"},
    )
    assert_one_line_error(proc, "backend")


def test_two_workers_get_their_settings_and_clean_up(trained_online, tmp_path: Path) -> None:
    """``serve --workers 2``: the settings reach the spawned workers as an object (the
    repo, model repository and API key are nowhere in their environment), /predict answers
    with the model, and SIGTERM stops the supervisor with exit 0 and removes the metrics
    folder."""
    project, _, _ = trained_online  # /ready also wants a materialized store
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTPATH_")}
    proc = subprocess.Popen(
        [*HOTPATH, "--repo", str(project.settings.repo), "serve", "--workers", "2"]
        + ["--port", str(port)],
        cwd=ROOT,
        env={**env, "TMPDIR": str(tmp_path), "HOTPATH_SERVING_API_KEY": "k2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()[-2000:] if proc.stderr else ""
            try:
                if requests.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "not ready in 120 s"
            time.sleep(0.2)
        body = {"user_id": 1, "merchant_id": 1, "amount": 12.5}
        assert requests.post(f"{url}/predict", json=body, timeout=5).status_code == 401
        r = requests.post(f"{url}/predict", json=body, headers={"X-API-Key": "k2"}, timeout=5)
        assert r.status_code == 200, r.text
        latest = versions(project.settings.model_repository, "fraud_detection")[-1]
        assert (r.json()["model"], r.json()["model_version"]) == ("fraud_detection", latest)
        # each worker saves its metrics there; a scrape (of either) sums both
        for _ in range(20):  # a connection each: the kernel spreads them over the workers
            requests.post(f"{url}/predict", json=body, headers={"X-API-Key": "k2"}, timeout=5)
        time.sleep(1.5)  # both workers' monitor ticks (0.5 s)
        (folder,) = tmp_path.glob("hotpath-metrics-*")
        assert len(list(folder.glob("*.prom"))) == 2, list(folder.iterdir())
        text = requests.get(f"{url}/metrics", timeout=5).text
        decided = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("hotpath_decisions_total{")
        )
        assert decided == 21, text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0
    assert not list(tmp_path.glob("hotpath-metrics-*"))
