"""The Bytewax streaming flow against a real redis-server and Bytewax's real runtime.

Expected values come from ``reference.user_velocity`` (pandas over the same events);
the Spark backfill is compared on the same events too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
import reference
from conftest import ROOT, Project, free_port

from pipelines import store
from pipelines.settings import Settings
from pipelines.stream.aggregates import UserWindow, aggregate, apply
from pipelines.stream.events import Event, Rejected, parse

FEATURES = [
    "user_txn_count_5m",
    "user_amount_sum_5m",
    "user_txn_count_1h",
    "user_amount_sum_1h",
    "user_distinct_merchants_24h",
]
AGGS = [aggregate(f) for f in FEATURES]
FIRST_USER = 100_000  # stream-test users: none of the project's own
LATENESS_S = 120


# ------------------------------------------------------------------ pure functions
def _event(**kw) -> dict:
    base = {"user_id": 1, "merchant_id": 2, "amount": 3.5, "event_timestamp": 1_700_000_000_000_000}
    return base | kw


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "malformed"),
        (b"[1, 2]", "malformed"),
        (json.dumps({"user_id": 1, "amount": 2.0, "event_timestamp": 5}), "missing_field"),
        (_event(user_id="abc"), "bad_type"),
        (_event(user_id=1.5), "bad_type"),
        (_event(merchant_id=-3), "bad_type"),
        (_event(amount="ten"), "bad_type"),
        (_event(amount=None), "bad_type"),
        (_event(amount=-5.0), "bad_amount"),
        (_event(amount=0), "bad_amount"),
        (_event(amount=float("inf")), "bad_amount"),
        (_event(amount=1e9), "bad_amount"),
        (_event(event_timestamp="yesterday"), "bad_type"),
        (_event(event_timestamp="2026-01-01T00:00:00"), "bad_type"),  # no time zone
        (_event(event_timestamp=int((time.time() + 86400) * 1e6)), "future_timestamp"),
    ],
)
def test_bad_events_are_rejected_with_a_reason(raw, code: str) -> None:
    out = parse(raw, 1.0, max_future_s=300)
    assert isinstance(out, Rejected), out
    assert out.code == code and out.reason


def test_event_forms_parse_to_the_same_event() -> None:
    t = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    micros = int(t.timestamp()) * 1_000_000 + 678901
    forms = [
        _event(event_timestamp=micros),
        _event(event_timestamp=t.isoformat()),
        json.dumps(_event(event_timestamp=t.isoformat())).encode(),
        _event(event_timestamp=micros, user_id="1"),
    ]
    parsed = [parse(f, 7.0, max_future_s=300, now=t.timestamp()) for f in forms]
    assert all(p == Event(1, 2, 3.5, micros, 7.0) for p in parsed), parsed


def _events(n_users: int, per_user: int, seed: int, end: datetime) -> pd.DataFrame:
    """Payments over the 3 hours before ``end``, bursts included (so 5-minute windows
    hold several), amounts in cents, a few exact ties."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        base = end - timedelta(hours=3)
        offsets = np.sort(rng.uniform(0, 3 * 3600, size=per_user))
        offsets[rng.random(per_user) < 0.3] -= rng.uniform(0, 30)  # bursts
        for i, off in enumerate(np.sort(offsets)):
            ts = base + timedelta(seconds=float(off))
            if i and rng.random() < 0.05:
                ts = rows[-1][2]  # a tie with the previous payment
            rows.append(
                (
                    FIRST_USER + u,
                    int(rng.integers(0, 6)),
                    ts.replace(microsecond=ts.microsecond),
                    round(float(rng.uniform(1, 200)), 2),
                )
            )
    df = pd.DataFrame(rows, columns=["user_id", "merchant_id", "event_timestamp", "amount"])
    df["event_timestamp"] = pd.to_datetime(df.event_timestamp, utc=True).dt.floor("us")
    return df


def _delivery_order(df: pd.DataFrame, seed: int, skew_s: float) -> pd.DataFrame:
    """Out of order: each event delayed by up to ``skew_s`` of event time."""
    rng = np.random.default_rng(seed)
    delay = pd.to_timedelta(rng.uniform(0, skew_s, size=len(df)), unit="s")
    return df.assign(_k=df.event_timestamp + delay).sort_values("_k").drop(columns="_k")


def _late_copies(df: pd.DataFrame, n: int) -> pd.DataFrame:
    """Events 10 minutes older than their user's newest: past a 2-minute lateness."""
    newest = df.groupby("user_id").event_timestamp.max()
    late = newest.head(n).reset_index()
    late["event_timestamp"] -= pd.Timedelta(minutes=10)
    late["merchant_id"] = 99
    late["amount"] = 999.0
    return late


def _latest_expected(events: pd.DataFrame) -> pd.DataFrame:
    """Per user, the aggregates as of their newest event (pandas, independent)."""
    ref = reference.user_velocity(events)
    return ref.sort_values("event_timestamp").groupby("user_id").tail(1).set_index("user_id")


def _as_events(df: pd.DataFrame) -> list[Event]:
    return [
        Event(int(r.user_id), int(r.merchant_id), float(r.amount), _micros(r.event_timestamp), 0.0)
        for r in df.itertuples()
    ]


def _micros(ts: pd.Timestamp) -> int:
    return int(ts.value // 1000)


def test_window_state_equals_pandas_with_out_of_order_and_late_events() -> None:
    end = datetime(2026, 11, 1, tzinfo=UTC)
    events = _events(12, 60, seed=3, end=end)
    order = _delivery_order(events, seed=4, skew_s=90)
    late = _late_copies(events, 5)
    states: dict[int, UserWindow] = {}
    rows: dict[tuple[int, int], dict] = {}
    late_seen = []
    feed = _as_events(order) + _as_events(late)
    for i in range(0, len(feed), 7):  # micro-batches of 7, as they may arrive
        by_user: dict[int, list[Event]] = {}
        for e in feed[i : i + 7]:
            by_user.setdefault(e.user_id, []).append(e)
        for user, batch in by_user.items():
            u = apply(states.setdefault(user, UserWindow()), batch, AGGS, LATENESS_S * 1_000_000)
            rows.update({(user, t): r for t, r in u.rows.items()})
            late_seen += u.late
    assert len(late_seen) == len(late)  # every late event reported, none counted
    want = reference.user_velocity(events)
    assert len(rows) == len(want)  # a final row for every distinct (user, instant)
    for r in want.itertuples():
        got = rows[(r.user_id, _micros(r.event_timestamp))]
        for f in FEATURES:
            assert got[f] == pytest.approx(getattr(r, f), rel=1e-12), (r.user_id, f)


# ------------------------------------------------------------------ the real flow
@pytest.fixture(scope="module")
def stream_root(batch_done: Project, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the backfilled project: its own registry, online and offline stores."""
    root = tmp_path_factory.mktemp("stream") / "project"
    shutil.copytree(
        batch_done.settings.repo.parent,
        root,
        ignore=shutil.ignore_patterns("registry*", "online*", "__pycache__"),
    )
    return root


def _settings(root: Path, redis_url: str, db: int) -> Settings:
    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    return Settings(repo=root / "feature_repo", profile="redis", redis_url=url)


def _open(settings: Settings):
    redis.Redis.from_url(settings.redis_url).flushdb()
    fs = store.open_store(settings)
    store.apply(fs)
    return fs


def _online(fs, users: list[int]) -> pd.DataFrame:
    got = fs.get_online_features(
        features=[f"user_velocity:{f}" for f in FEATURES[:4]]
        + ["user_merchant_spread:user_distinct_merchants_24h"],
        entity_rows=[{"user_id": u} for u in users],
    ).to_df()
    return got.set_index("user_id")


def _mismatches(fs, want: pd.DataFrame) -> list[str]:
    got = _online(fs, list(want.index))
    bad = []
    for u, row in want.iterrows():
        for f in FEATURES:
            g = got.loc[u, f]
            if pd.isna(g) or abs(float(g) - float(row[f])) > 1e-9 * max(1.0, abs(row[f])):
                bad.append(f"user {u} {f}: online {g} expected {row[f]}")
    return bad


def _eventually_equal(fs, want: pd.DataFrame, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        bad = _mismatches(fs, want)
        if not bad:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{len(bad)} mismatches, e.g. {bad[:3]}")
        time.sleep(0.5)


def _env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "HOTPATH_REPO": str(settings.repo),
        "HOTPATH_PROFILE": "redis",
        "HOTPATH_REDIS_URL": settings.redis_url,
    }


def _stream(settings: Settings, *args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "stream", *args],
        env=_env(settings),
        cwd=ROOT,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
    )


def _push(url: str, stream: str, payloads: list) -> None:
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for p in payloads:
        pipe.xadd(stream, {"event": p if isinstance(p, bytes) else json.dumps(p)})
    pipe.execute()


def _payloads(df: pd.DataFrame) -> list[dict]:
    return [
        {
            "user_id": int(r.user_id),
            "merchant_id": int(r.merchant_id),
            "amount": float(r.amount),
            "event_timestamp": _micros(r.event_timestamp),
        }
        for r in df.itertuples()
    ]


BAD = [
    b"{not json",
    {"user_id": FIRST_USER, "amount": 5.0, "event_timestamp": 1},
    {"user_id": "x", "merchant_id": 1, "amount": 5.0, "event_timestamp": 1},
    {"user_id": FIRST_USER, "merchant_id": 1, "amount": -5.0, "event_timestamp": 1},
    {
        "user_id": FIRST_USER,
        "merchant_id": 1,
        "amount": 5.0,
        "event_timestamp": 4_000_000_000_000_000,
    },
]


def test_redis_stream_out_of_order_late_and_bad_events(stream_root, redis_url, tmp_path) -> None:
    """Redis Streams source with a consumer group, out-of-order events within the allowed
    lateness, late ones past it and malformed ones: the online store equals pandas over
    the valid, timely events; every rejected event is in the dead-letter stream with its
    reason; the flow keeps running."""
    s = _settings(stream_root, redis_url, 3)
    fs = _open(s)
    events = _events(25, 40, seed=7, end=datetime.now(UTC))
    order = _delivery_order(events, seed=8, skew_s=60)
    late = _late_copies(events, 6)
    payloads = _payloads(order)
    for i, bad in enumerate(BAD):  # spread the bad ones through the stream
        payloads.insert(i * 150, bad)
    _push(s.redis_url, "tx", payloads + _payloads(late))
    proc = _stream(
        s,
        "--source", "redis", "--streams", "tx", "--lateness", str(LATENESS_S),
        "--snapshot-interval", "0.5", "--no-offline",
        log=tmp_path / "stream.log",
    )  # fmt: skip
    try:
        _eventually_equal(fs, _latest_expected(events))
        client = redis.Redis.from_url(s.redis_url)
        deadline = time.monotonic() + 30
        while client.xlen("tx:dead-letter") < len(BAD) + len(late) and time.monotonic() < deadline:
            time.sleep(0.2)
        dead = client.xrange("tx:dead-letter")
        codes = sorted(fields[b"code"].decode() for _, fields in dead)
        assert codes == sorted(
            ["malformed", "missing_field", "bad_type", "bad_amount", "future_timestamp"]
            + ["late"] * len(late)
        ), codes
        assert all(fields[b"reason"] for _, fields in dead)
        # the flow is still running, and an idle stream does not freeze it: new events land
        more = _events(1, 5, seed=9, end=datetime.now(UTC)).assign(user_id=FIRST_USER + 500)
        _push(s.redis_url, "tx", _payloads(more))
        _eventually_equal(fs, _latest_expected(more), timeout=30)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_kill_9_and_recover_gives_exact_values(stream_root, redis_url, tmp_path) -> None:
    """kill -9 mid-stream, restart with Bytewax recovery: exactly the aggregates of an
    uninterrupted run (replay is at-least-once; writes overwrite by event time)."""
    s = _settings(stream_root, redis_url, 4)
    fs = _open(s)
    events = _events(40, 50, seed=11, end=datetime.now(UTC))
    payloads = _payloads(_delivery_order(events, seed=12, skew_s=30))
    half = len(payloads) // 2
    _push(s.redis_url, "tx", payloads[:half])
    args = (
        "--source", "redis", "--streams", "tx", "--lateness", str(LATENESS_S),
        "--snapshot-interval", "0.3", "--no-offline", "--recovery-dir", str(tmp_path / "rec"),
    )  # fmt: skip
    log = tmp_path / "stream.log"
    proc = _stream(s, *args, log=log)
    client = redis.Redis.from_url(s.redis_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until it has read some of the first half
        groups = client.xinfo_groups("tx") if client.exists("tx") else []
        if groups and groups[0]["last-delivered-id"] != b"0-0":
            break
        time.sleep(0.05)
    _push(s.redis_url, "tx", payloads[half : half + half // 2])
    time.sleep(0.7)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert _mismatches(fs, _latest_expected(events))  # not finished when killed
    _push(s.redis_url, "tx", payloads[half + half // 2 :])
    proc = _stream(s, *args, log=log)
    try:
        _eventually_equal(fs, _latest_expected(events), timeout=90)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _write_events(df: pd.DataFrame, path: Path) -> Path:
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path / "events.parquet")
    return path


def _hashes(url: str) -> dict[bytes, dict[bytes, bytes]]:
    client = redis.Redis.from_url(url)
    return {k: client.hgetall(k) for k in client.scan_iter(count=1000)}


@pytest.fixture(scope="module")
def file_runs(stream_root, redis_url, tmp_path_factory):
    """The same events through the file source: once on one process, once on two."""
    tmp = tmp_path_factory.mktemp("file_runs")
    events = _events(30, 40, seed=21, end=datetime.now(UTC))
    path = _write_events(events, tmp / "events")
    one, two = _settings(stream_root, redis_url, 5), _settings(stream_root, redis_url, 6)
    fs_one, _ = _open(one), _open(two)
    common = ("--source", "file", "--file", str(path), "--snapshot-interval", "0.5")
    single = _stream(one, *common, log=tmp / "one.log")
    assert single.wait(timeout=180) == 0, (tmp / "one.log").read_text()[-2000:]
    ports = f"127.0.0.1:{free_port()};127.0.0.1:{free_port()}"
    procs = [
        _stream(two, *common, "--no-offline", "-i", str(i), "-a", ports, log=tmp / f"two{i}.log")
        for i in range(2)
    ]
    for i, p in enumerate(procs):
        assert p.wait(timeout=180) == 0, (tmp / f"two{i}.log").read_text()[-2000:]
    return events, one, two, fs_one


def test_two_processes_equal_one(file_runs) -> None:
    events, one, two, fs_one = file_runs
    assert _mismatches(fs_one, _latest_expected(events)) == []
    a, b = _hashes(one.redis_url), _hashes(two.redis_url)
    assert len(a) == events.user_id.nunique()
    assert a == b


def test_spark_backfill_equals_the_stream(file_runs, spark) -> None:
    """The Spark batch job's user_velocity over the same events equals the rows the stream
    appended to the offline store, at every event time, and the online values."""
    from pipelines import batch_features

    events, one, _, _ = file_runs
    tx = spark.createDataFrame(events)
    day = events.event_timestamp.dt.date
    spark_rows = (
        batch_features.user_velocity(tx, day.min(), day.max()).toPandas().drop(columns="date")
    )
    offline = pd.read_parquet(Path(one.offline_dir) / "user_velocity")
    offline = offline[offline.user_id.between(FIRST_USER, FIRST_USER + 999)]
    streamed = offline.sort_values("created").groupby(["user_id", "event_timestamp"]).tail(1)
    key = ["user_id", "event_timestamp"]
    spark_rows["event_timestamp"] = pd.to_datetime(spark_rows.event_timestamp, utc=True)
    for df in (spark_rows, streamed):
        df["event_timestamp"] = df.event_timestamp.astype("datetime64[us, UTC]")
    merged = spark_rows.merge(streamed, on=key, suffixes=("_spark", "_stream"), how="outer")
    assert len(merged) == len(spark_rows) == len(streamed) == len(reference.user_velocity(events))
    for f in FEATURES:
        np.testing.assert_allclose(merged[f"{f}_stream"], merged[f"{f}_spark"], rtol=1e-12)


def test_kafka_unreachable_fails_fast(stream_root) -> None:
    s = Settings(repo=stream_root / "feature_repo")
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "stream", "--source", "kafka",
         "--brokers", f"127.0.0.1:{free_port()}"],
        env={**os.environ, "HOTPATH_REPO": str(s.repo)},
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    assert "Kafka broker unreachable" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 30


def test_embedded_profile_writes_sqlite_through_feast(file_runs, stream_root) -> None:
    """The embedded default (SQLite online store, written through Feast's own
    online_write_batch), run in this process by Bytewax's runtime."""
    from bytewax.testing import run_main

    from pipelines.stream.flow import StreamSettings, build_flow

    events = file_runs[0]
    path = _write_events(events, stream_root.parent / "embedded_events")
    s = Settings(repo=stream_root / "feature_repo")
    fs = store.open_store(s)
    store.apply(fs)
    run_main(build_flow(s, StreamSettings(source="file", file=path, offline=False)))
    assert _mismatches(fs, _latest_expected(events)) == []
