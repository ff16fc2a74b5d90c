"""The Spark backfill of every computed view the repo declares, against independent pandas
oracles (``reference.per_event`` / ``reference.daily``), point-in-time; edge cases by hand."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import reference
from conftest import (
    EDGE_MERCHANT,
    EDGE_USER,
    ROOT,
    STALE_USER,
    VELOCITY_USER,
    Project,
    read_offline,
)
from feast.types import Float64, Int64
from pyspark.sql import functions as F

from pipelines import batch_compile
from pipelines.batch_compile import BACKFILL_CREATED, SPARK_TYPES
from pipelines.batch_job import check_contract, run_batch
from pipelines.contract import computed_views, entities, feature_views
from pipelines.declared import DAILY, DAY_US, PER_EVENT, US, Agg, View
from pipelines.errors import HotpathError

REPO_VIEWS = computed_views(ROOT / "feature_repo")
HOUR_US = 3600 * US


def _views(cadence: str) -> list[str]:
    return [v.name for v in REPO_VIEWS if v.cadence == cadence]


def _view(project: Project, name: str) -> View:
    return next(v for v in computed_views(project.settings.repo) if v.name == name)


def assert_frames_match(actual: pd.DataFrame, expected: pd.DataFrame, keys: list[str]) -> None:
    """Same keys, same values (floats to 1e-9 relative), NaN where missing."""
    assert sorted(actual.columns) == sorted(expected.columns)
    a, e = actual.copy(), expected[actual.columns].copy()
    if "event_timestamp" in a:
        for df in (a, e):
            df["event_timestamp"] = pd.to_datetime(df.event_timestamp, utc=True).astype(
                "datetime64[us, UTC]"
            )
    a = a.sort_values(keys).reset_index(drop=True)
    e = e.sort_values(keys).reset_index(drop=True)
    assert len(a) == len(e), f"{len(a)} rows, expected {len(e)}"
    for col in a.columns:
        if col in keys:
            assert (a[col].to_numpy() == e[col].to_numpy()).all(), col
        elif a[col].dtype.kind == "f" or e[col].dtype.kind == "f":
            np.testing.assert_allclose(
                a[col].astype(float), e[col].astype(float), rtol=1e-9, atol=1e-9, err_msg=col
            )
        else:
            bad = a[col].to_numpy() != e[col].to_numpy()
            assert not bad.any(), f"{col}: {a[bad].head()} vs {e[bad].head()}"


def assert_declared_types(df: pd.DataFrame, view: View) -> None:
    for a in view.aggs:
        kind = df[a.name].dtype.kind
        assert kind == ("i" if view.dtypes[a.name] == Int64 else "f"), (a.name, kind)


def _snapshot_times(project: Project) -> list[pd.Timestamp]:
    """Several snapshots, including the one whose windows the edge payments straddle."""
    day0 = pd.Timestamp(project.edge_day)
    first = pd.Timestamp(project.generated.start).normalize() + pd.Timedelta(days=1)
    return [
        first,
        day0 - pd.Timedelta(days=1),
        day0,
        day0 + pd.Timedelta(days=1),
        pd.Timestamp(project.now).normalize(),
    ]


@pytest.mark.parametrize("name", _views(DAILY))
def test_daily_views_match_pandas(batch_done: Project, name: str) -> None:
    view = _view(batch_done, name)
    offline = read_offline(batch_done, name)
    assert_declared_types(offline, view)
    tx = batch_done.transactions
    for as_of in _snapshot_times(batch_done):
        actual = offline[offline.event_timestamp == as_of].drop(columns="event_timestamp")
        expected = reference.daily(view, tx, as_of)
        assert len(expected) > 0
        assert_frames_match(actual, expected, list(view.keys))


@pytest.mark.parametrize("name", _views(PER_EVENT))
def test_per_event_views_match_pandas(batch_done: Project, name: str) -> None:
    view = _view(batch_done, name)
    actual = read_offline(batch_done, name)
    if view.created:  # backfilled rows supersede streamed ones for the same instant
        assert (actual.pop(view.created) == pd.Timestamp(BACKFILL_CREATED)).all()
    assert_declared_types(actual, view)
    if view.request_time:  # rows at events and at tile expiries up to the job's now
        newest = int(reference._micros(actual.event_timestamp).max())
        expected = reference.request_time(view, batch_done.transactions, newest)
    else:
        expected = reference.per_event(view, batch_done.transactions)
    assert_frames_match(actual, expected, [*view.keys, "event_timestamp"])


def _every_function(base: View, keys: tuple[str, ...], aggs: list[Agg]) -> View:
    """``base`` recomputed by ``aggs`` (every function, int/float/boolean columns)."""
    columns = base.events.columns

    def dtype(a: Agg):
        if a.function in ("count", "count_distinct"):
            return Int64
        if a.function == "mean" or columns[a.column] in ("double", "float"):
            return Float64
        return Int64

    return dataclasses.replace(
        base,
        keys=keys,
        aggs=tuple(aggs),
        dtypes={a.name: dtype(a) for a in aggs},
        created="",
        tiles=None,  # windows ending at each event (tests/test_request_time_offline.py: tiles)
    )


def _raw(project: Project, spark):
    """The raw events in Spark and pandas, some labels never known (null ``label_ts``)."""
    path = str(project.settings.raw_dir / "transactions")
    unknown = F.col("transaction_id") % 7 == 0
    events = spark.read.parquet(path).drop("date")
    events = events.withColumn("label_ts", F.when(~unknown, F.col("label_ts")))
    tx = project.transactions
    tx.loc[tx.transaction_id % 7 == 0, "label_ts"] = pd.NaT
    return events, tx


def _spark_rows(view: View, events, first, last) -> pd.DataFrame:
    out = batch_compile.compute(view, events, first, last)
    assert out.columns == [*view.keys, "event_timestamp", *view.dtypes, "date"]
    types = {f.name: f.dataType for f in out.schema.fields}
    assert all(types[name] == SPARK_TYPES[t] for name, t in view.dtypes.items())
    rows = out.toPandas().drop(columns="date")
    return rows.assign(event_timestamp=pd.to_datetime(rows.event_timestamp, utc=True))


def test_every_function_per_event(batch_done: Project, spark) -> None:
    """count, sum, mean, max, min, count_distinct of float, int and boolean columns over
    sub-hour to multi-day windows, at every event instant."""
    h, d = HOUR_US, DAY_US
    specs = [("amount", "count", h), ("amount", "sum", h), ("amount", "mean", h),
             ("amount", "max", 3 * d), ("amount", "min", 3 * d), ("merchant_id", "sum", h),
             ("merchant_id", "max", 3 * d), ("merchant_id", "count_distinct", 3 * d),
             ("is_fraud", "sum", 3 * d), ("is_fraud", "mean", 3 * d + 1)]  # fmt: skip
    aggs = [Agg(f"f{i}_{f}_{c}", c, f, w) for i, (c, f, w) in enumerate(specs)]
    view = _every_function(
        next(v for v in REPO_VIEWS if v.cadence == PER_EVENT), ("user_id",), aggs
    )
    events, tx = _raw(batch_done, spark)
    mine = (F.col("user_id") % 5 == 0) | F.col("user_id").isin(VELOCITY_USER, EDGE_USER)
    events = events.filter(mine)
    tx = tx[(tx.user_id % 5 == 0) | tx.user_id.isin([VELOCITY_USER, EDGE_USER])]
    days = tx.event_timestamp.dt.date
    actual = _spark_rows(view, events, days.min(), days.max())
    assert_frames_match(actual, reference.per_event(view, tx), ["user_id", "event_timestamp"])


def test_every_function_daily(batch_done: Project, spark) -> None:
    """The same functions on a daily view, with values known only once ``label_ts`` passed
    (null: never), at several snapshots; none for days after today."""
    d = DAY_US
    specs = [("amount", "count", d, None), ("amount", "sum", 7 * d, "label_ts"),
             ("amount", "mean", 7 * d, "label_ts"), ("is_fraud", "sum", 3 * d, "label_ts"),
             ("is_fraud", "mean", 7 * d, "label_ts"), ("amount", "max", 2 * d, None),
             ("merchant_id", "min", 7 * d, None), ("user_id", "count_distinct", 7 * d, None),
             ("amount", "mean", d, None), ("merchant_id", "sum", 2 * d, None)]  # fmt: skip
    aggs = [Agg(f"f{i}_{f}_{c}", c, f, w, k) for i, (c, f, w, k) in enumerate(specs)]
    view = _every_function(
        next(v for v in REPO_VIEWS if v.cadence == DAILY), ("merchant_id",), aggs
    )
    assert batch_compile.lookback_days(view) == 8
    events, tx = _raw(batch_done, spark)
    first, today = batch_done.generated.start.date(), datetime.now(UTC).date()
    actual = _spark_rows(view, events, first, today + timedelta(days=2))
    assert actual.event_timestamp.max() == pd.Timestamp(today, tz="UTC")
    for as_of in _snapshot_times(batch_done):
        expected = reference.daily(view, tx, as_of)
        assert len(expected) > 0
        at = actual[actual.event_timestamp == as_of]
        assert_frames_match(at.drop(columns="event_timestamp"), expected, ["merchant_id"])
    tomorrow = today + timedelta(days=1)
    assert _spark_rows(view, events, tomorrow, tomorrow + timedelta(days=3)).empty


def test_one_pass_per_keys_and_cadence(batch_done: Project, spark) -> None:
    """Views sharing events, keys and cadence are computed in one pass (one sort, one
    roll-up) and each view's table out of it equals the view computed alone: rows, values
    and, for daily views of different reach, each keeping a key only its own reach."""
    events, _ = _raw(batch_done, spark)
    day0 = batch_done.edge_day.date()
    first, last = day0 - timedelta(days=3), day0 + timedelta(days=6)
    for cadence, windows in ((DAILY, (7 * DAY_US, 2 * DAY_US)), (PER_EVENT, (HOUR_US, DAY_US))):
        base = next(v for v in REPO_VIEWS if v.cadence == cadence)
        group = tuple(
            dataclasses.replace(
                _every_function(base, base.keys, [Agg("same_name", "amount", "sum", w)]),
                name=f"v{i}",
            )
            for i, w in enumerate(windows)
        )
        assert batch_compile.passes(group) == [group]
        shared = batch_compile.compute_shared(group, events, first, last)
        rows = []
        for i, view in enumerate(group):
            one = batch_compile.view_rows(shared, group, i).toPandas()
            alone = batch_compile.compute(view, events, first, last).toPandas()
            assert_frames_match(one, alone, [*view.keys, "event_timestamp"])
            rows.append(len(one))
        assert rows[0] > 0
        assert rows[1] < rows[0] if cadence == DAILY else rows[1] == rows[0]


def test_snapshot_window_edges(batch_done: Project) -> None:
    """Hand-placed payments land exactly where the half-open windows say."""
    users = read_offline(batch_done, "user_spending_stats")
    day0 = pd.Timestamp(batch_done.edge_day)
    row = users[(users.user_id == EDGE_USER) & (users.event_timestamp == day0)].iloc[0]
    # [day0-1d, day0) holds the payment 1us before midnight and the one at day0-1d (20 + 7),
    # but not the one at day0 itself.
    assert row.user_txn_count_1d == 2 and row.user_amount_sum_1d == pytest.approx(27.0)
    # [day0-30d, day0): day0-30d is in (40), 1us before it is out (80).
    assert row.user_txn_count_30d == 4
    assert row.user_amount_max_30d == pytest.approx(40.0)
    nxt = users[
        (users.user_id == EDGE_USER) & (users.event_timestamp == day0 + pd.Timedelta(days=1))
    ]
    assert nxt.iloc[0].user_txn_count_1d == 1 and nxt.iloc[0].user_amount_sum_1d == 10.0

    merchants = read_offline(batch_done, "merchant_risk_stats")
    m = merchants[(merchants.merchant_id == EDGE_MERCHANT) & (merchants.event_timestamp == day0)]
    # Two frauds in the window; only the one labelled before day0 is known at day0.
    assert m.iloc[0].merchant_fraud_count_30d == 1
    m1 = merchants[
        (merchants.merchant_id == EDGE_MERCHANT)
        & (merchants.event_timestamp == day0 + pd.Timedelta(days=1))
    ]
    assert m1.iloc[0].merchant_fraud_count_30d == 2


def test_snapshot_closes_with_zero_row(batch_done: Project) -> None:
    """The day after a user's window empties, a zero row supersedes the old counts."""
    users = read_offline(batch_done, "user_spending_stats")
    mine = users[users.user_id == STALE_USER].sort_values("event_timestamp")
    assert mine.iloc[0].user_txn_count_30d == 1
    last = mine.iloc[-1]
    assert last.user_txn_count_30d == 0 and np.isnan(last.user_amount_avg_30d)
    assert len(mine) == 31  # one row per snapshot while the payment is in the 31-day lookback


def test_velocity_window_edges(batch_done: Project) -> None:
    v = read_offline(batch_done, "user_velocity")
    mine = v[v.user_id == VELOCITY_USER].sort_values("event_timestamp")
    t0 = pd.Timestamp(batch_done.edge_day) + pd.Timedelta(hours=12)  # a tile edge
    m, us = pd.Timedelta(minutes=1), pd.Timedelta(microseconds=1)
    events = [t0, t0 + 5 * m - us, t0 + 10 * m - us, t0 + 60 * m, t0 + pd.Timedelta(days=1)]
    at = mine.set_index("event_timestamp")
    # t0; t0+5m-1us (sees t0); two at t0+10m-1us (tie: one row, exactly 5m after the second
    # payment, so it is out); t0+1h (t0 exactly 1h before: out); a day later (alone). Both
    # semantics agree at these instants (minute tiles: each window starts on a tile edge).
    assert at.loc[events, "user_txn_count_5m"].tolist() == [1, 2, 2, 1, 1]
    assert at.loc[events, "user_txn_count_1h"].tolist() == [1, 2, 4, 4, 1]
    assert at.loc[events, "user_amount_sum_1h"].tolist() == [1.0, 3.0, 15.0, 30.0, 32.0]
    if _view(batch_done, "user_velocity").request_time:
        # and rows where a tile leaves a window: t0's tile leaves the 5-minute window at
        # t0+5m (the one of t0+4m stays), the one of t0+9m at t0+14m; the last tile
        # leaves the hour at t0+1d+1h, with an all-empty row
        assert at.loc[t0 + 5 * m, "user_txn_count_5m"] == 1
        assert at.loc[t0 + 14 * m, ["user_txn_count_5m", "user_txn_count_1h"]].tolist() == [0, 4]
        last = at.loc[t0 + pd.Timedelta(days=1, hours=1)]
        assert last.user_txn_count_1h == 0 and last.user_amount_sum_1h == 0
        # each of the 5 tiles leaves both windows; t0's leaves the hour at the event t0+1h
        assert len(mine) == len(events) + 2 * 5 - 1
    else:
        assert len(mine) == len(events)
    spread = read_offline(batch_done, "user_merchant_spread")  # its own table now
    mine = spread[spread.user_id == VELOCITY_USER].sort_values("event_timestamp")
    assert mine.user_distinct_merchants_24h.tolist() == [1, 2, 4, 4, 4]


def test_backfill_is_idempotent(batch_done: Project, spark) -> None:
    """Re-running a sub-range rewrites exactly its partitions with identical contents."""
    s = batch_done.settings
    before = {v.name: read_offline(batch_done, v.name) for v in REPO_VIEWS}
    day0 = batch_done.edge_day.date()
    files_outside = sorted(
        p.stat().st_mtime_ns
        for p in (s.offline_dir / "user_velocity").glob("date=*/*.parquet")
        if p.parent.name < f"date={day0 - timedelta(days=2)}"
    )
    run_batch(
        spark, s.repo, s.raw_dir, s.offline_dir, day0 - timedelta(days=2), day0 + timedelta(days=1)
    )
    for table, df in before.items():
        after = read_offline(batch_done, table)
        cols = list(df.columns)
        pd.testing.assert_frame_equal(
            df.sort_values(cols).reset_index(drop=True),
            after.sort_values(cols).reset_index(drop=True),
        )
    untouched = sorted(
        p.stat().st_mtime_ns
        for p in (s.offline_dir / "user_velocity").glob("date=*/*.parquet")
        if p.parent.name < f"date={day0 - timedelta(days=2)}"
    )
    assert untouched == files_outside


def test_contract_mismatch_is_refused(batch_done: Project, spark) -> None:
    s = batch_done.settings
    df = spark.read.parquet(str(s.offline_dir / "user_spending_stats")).drop("user_txn_count_1d")
    views = [feature_views(s.repo)["user_spending_stats"]]
    with pytest.raises(HotpathError, match="user_txn_count_1d"):
        check_contract(df, "user_spending_stats", views, entities(s.repo))


def test_end_before_start_is_refused(batch_done: Project, spark) -> None:
    s = batch_done.settings
    day0 = batch_done.edge_day.date()
    with pytest.raises(HotpathError, match="before start"):
        run_batch(spark, s.repo, s.raw_dir, s.offline_dir, day0, day0 - timedelta(days=1))


def test_no_snapshot_from_the_future(batch_done: Project, spark) -> None:
    """A range reaching past today yields no snapshot stamped after now (today's day is
    unfinished, so a snapshot as of tomorrow would be served as complete later)."""
    s = batch_done.settings
    today = batch_done.now.date()
    run_batch(spark, s.repo, s.raw_dir, s.offline_dir, today, today + timedelta(days=2))
    for name in _views(DAILY):
        rows = read_offline(batch_done, name)
        assert rows.event_timestamp.max() <= pd.Timestamp(datetime.now(UTC))
        assert rows.event_timestamp.max() == pd.Timestamp(today, tz="UTC")


def test_unknown_view_is_refused(batch_done: Project, spark) -> None:
    s = batch_done.settings
    day0 = batch_done.edge_day.date()
    with pytest.raises(HotpathError, match=r"unknown view\(s\) \['nope'\]; computed views are"):
        run_batch(spark, s.repo, s.raw_dir, s.offline_dir, day0, day0, ["nope"])


# (user_id, merchant_id, amount, seconds ahead of now, the code every reader must give)
JUDGED = [
    (1, 2, 0.0, 0, None),  # a card verification
    (1, 2, 1_000_000.0, 0, None),
    (0, 2**63 - 1, 10.0, 0, None),
    (1, 2, 10.0, 290, None),
    (1, 2, -0.01, 0, "bad_amount"),
    (1, 2, 1_000_000.01, 0, "bad_amount"),
    (1, 2, float("nan"), 0, "bad_amount"),
    (1, 2, float("inf"), 0, "bad_amount"),
    (-1, 2, 10.0, 0, "bad_type"),
    (1, -1, 10.0, 0, "bad_type"),
    (1, 2, 10.0, 310, "future_timestamp"),
]


def test_batch_stream_and_serving_judge_events_alike(spark) -> None:
    """One declaration (``feature_repo/transaction_event.py``) behind all three readers: the
    Spark backfill's check, the stream's parser and the ``/predict`` request schema give the
    verdicts written out above (serving has no event time to judge)."""
    from pydantic import ValidationError

    from pipelines.batch_job import judge
    from pipelines.contract import event_rules, models
    from pipelines.stream.events import Rejected, parse
    from serving.schemas import RequestField, request_models

    bounds = models(ROOT / "feature_repo")["fraud_detection"].bounds  # from the declaration
    shape = [("user_id", "INT64"), ("merchant_id", "INT64"), ("amount", "Float64")]
    fields = [RequestField(n, t, t == "INT64", *bounds[n]) for n, t in shape]
    transaction, _ = request_models("fraud_detection", fields, "transactions")

    rules = event_rules(ROOT / "feature_repo")
    now = datetime.now(UTC).replace(microsecond=0)
    rows = [(i, u, m, a, now + timedelta(seconds=s)) for i, (u, m, a, s, _) in enumerate(JUDGED)]
    df = spark.createDataFrame(
        rows, "i long, user_id long, merchant_id long, amount double, event_timestamp timestamp"
    )
    batch = [r.code for r in judge(df, rules, now).orderBy("i").collect()]
    stream = []
    for _, u, m, a, t in rows:
        event = {"user_id": u, "merchant_id": m, "amount": a, "event_timestamp": t.isoformat()}
        out = parse(event, 0.0, rules, now=now.timestamp())
        stream.append(out.code if isinstance(out, Rejected) else None)
    serving = []
    for _, u, m, a, _t in rows:
        try:
            transaction.model_validate({"user_id": u, "merchant_id": m, "amount": a})
            serving.append(True)
        except ValidationError:
            serving.append(False)
    expected = [case[-1] for case in JUDGED]
    assert batch == expected
    assert stream == expected
    assert serving == [c in (None, "future_timestamp") for c in expected]
