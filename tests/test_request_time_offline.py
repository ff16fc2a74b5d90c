"""Request-time windows, offline: the Spark rows of a request-time view, looked up point in
time at arbitrary instants, equal the spec's value over the exact events
(``reference.request_time_at``); the materialized tiles evaluated at the materialization
end equal the offline row there."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import reference
from conftest import ROOT
from feast.types import Float64, Int64
from test_batch_features import assert_frames_match

from online_store.tiles import tile_plan
from pipelines import batch_compile
from pipelines.contract import computed_views, event_rules
from pipelines.declared import PER_EVENT, US, Agg, View
from pipelines.materialize import event_tiles

MINUTE_US, HOUR_US = 60 * US, 3600 * US
R = MINUTE_US
SPECS = [("count", "amount", 5 * MINUTE_US), ("sum", "amount", 5 * MINUTE_US),
         ("count", "amount", HOUR_US), ("sum", "amount", HOUR_US),
         ("max", "amount", HOUR_US), ("min", "amount", 5 * MINUTE_US),
         ("mean", "amount", HOUR_US), ("sum", "merchant_id", 2 * MINUTE_US),
         ("max", "merchant_id", 5 * MINUTE_US), ("count", "amount", MINUTE_US),
         ("max", "amount", MINUTE_US)]  # fmt: skip


def request_view(name: str, specs: list[tuple[str, str, int]], resolution: int = R) -> View:
    """A per-event view of the repo's transactions by user, with request-time windows."""
    base = next(v for v in computed_views(ROOT / "feature_repo") if v.cadence == PER_EVENT)
    aggs = tuple(Agg(f"{name}_{i}_{f}_{c}", c, f, w) for i, (f, c, w) in enumerate(specs))
    integer = {a.name: a.column == "merchant_id" and a.function != "mean" for a in aggs}
    integer |= {a.name: True for a in aggs if a.function == "count"}
    plan = tile_plan(
        resolution, [(a.function, a.column, a.window_us, integer[a.name]) for a in aggs]
    )
    return dataclasses.replace(
        base,
        name=name,
        keys=("user_id",),
        aggs=aggs,
        dtypes={a.name: Int64 if integer[a.name] else Float64 for a in aggs},
        created="",
        ttl_us=max(a.window_us for a in aggs),
        tiles=plan,
    )


def _events(now: datetime) -> pd.DataFrame:
    """Hand-placed payments on tile and window edges, ties, zero amounts, a burst after a
    long quiet period, a random history, and payments minutes before now."""
    t0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a tile edge
    us, s, m = timedelta(microseconds=1), timedelta(seconds=1), timedelta(minutes=1)
    hand = [
        (1, 7, t0, 1.0), (1, 7, t0 + 30 * s, 0.0), (1, 8, t0 + 30 * s, 2.0),  # tie, zero
        (1, 9, t0 + m - us, 4.0),  # the last µs of the first tile
        (1, 7, t0 + 5 * m, 8.0),  # exactly when the first tile leaves the 5-minute windows
        (1, 7, t0 + 5 * m + us, 16.0), (1, 7, t0 + 65 * m, 32.0),
        (1, 3, t0 + 4 * 60 * m + s, 5.0), (1, 3, t0 + 4 * 60 * m + 2 * s, 6.0),  # a burst
        (1, 3, t0 + 4 * 60 * m + 2 * s, 0.0),
        (3, 1, t0 + 17 * s, 3.5),  # alone
        (4, 2, now - 150 * s, 1.0), (4, 2, now - 20 * m, 2.0),  # some leave after now
    ]  # fmt: skip
    rng = np.random.default_rng(5)
    offsets = np.sort(rng.integers(0, 3 * 3600 * US, 250))
    offsets[10:14] = offsets[10]  # a 4-way tie
    amounts = np.round(rng.exponential(20, 250), 2) * (rng.random(250) > 0.1)  # some 0.0
    rand = [
        (2, int(rng.integers(1, 5)), t0 + timedelta(microseconds=int(o)), float(a))
        for o, a in zip(offsets, amounts, strict=True)
    ]
    df = pd.DataFrame(hand + rand, columns=["user_id", "merchant_id", "event_timestamp", "amount"])
    df["event_timestamp"] = pd.to_datetime(df.event_timestamp, utc=True)
    return df.sample(frac=1.0, random_state=3).reset_index(drop=True)  # history out of order


def _spark_events(spark, events: pd.DataFrame):
    return spark.createDataFrame(
        events.assign(event_timestamp=events.event_timestamp.dt.tz_localize(None)),
        "user_id long, merchant_id long, event_timestamp timestamp, amount double",
    )


def spark_rows(spark, view: View, events: pd.DataFrame) -> pd.DataFrame:
    df = _spark_events(spark, events)
    days = events.event_timestamp.dt.date
    rows = batch_compile.compute(view, df, days.min(), days.max()).toPandas()
    rows = rows.drop(columns="date")
    return rows.assign(event_timestamp=pd.to_datetime(rows.event_timestamp, utc=True))


def _instants(events: pd.DataFrame, rows: pd.DataFrame, longest: int) -> np.ndarray:
    """Where to look: every row and event instant and every tile edge of the key's span (and
    a window later), each also 1 µs before and after; random instants; long after."""
    ev, at = reference._micros(events.event_timestamp), reference._micros(rows.event_timestamp)
    lo, hi = ev.min() // R * R, (ev.max() // R + 1) * R + longest
    edges = np.arange(lo, hi + R, R)
    base = np.concatenate([ev, at, edges])
    rng = np.random.default_rng(len(ev))
    spread = rng.integers(lo - R, hi + R, 200)
    later = ev.max() + np.array([2 * longest, 10 * longest, 400 * longest])
    return np.unique(np.concatenate([base - 1, base, base + 1, spread, later]))


def assert_point_in_time(
    view: View, events: pd.DataFrame, rows: pd.DataFrame, until_us: int
) -> int:
    """At each instant of :func:`_instants` up to ``until_us`` (the end of the job's last
    day: it writes no row after it), per key, Feast's point-in-time join (the newest row at or
    before ``t``, no older than the TTL) gives ``reference.request_time_at`` over the exact
    events; where the TTL leaves no row the window is empty (count and sum 0: what
    training's default fills in). Returns the number of instants checked."""
    checked = 0
    empty = {a.name: 0 if a.function in ("count", "sum") else np.nan for a in view.aggs}
    for key, g in events.groupby("user_id"):
        mine = rows[rows.user_id == key].sort_values("event_timestamp")
        at = reference._micros(mine.event_timestamp)
        values = mine[[a.name for a in view.aggs]].to_dict("records")
        instants = [int(t) for t in _instants(g, mine, view.longest_us) if t <= until_us]
        for t, want in zip(instants, reference.request_time_at(view, g, instants), strict=True):
            i = np.searchsorted(at, t, side="right") - 1
            got = empty if i < 0 or at[i] < t - view.ttl_us else values[i]
            for name, w in want.items():
                where = f"user {key} at {pd.Timestamp(t, unit='us')} {name}: {got[name]} != {w}"
                if pd.isna(w):
                    assert pd.isna(got[name]), where
                else:
                    assert got[name] == pytest.approx(w, rel=1e-9, abs=1e-9), where
            checked += 1
    return checked


@dataclass(frozen=True)
class Computed:
    view: View
    events: pd.DataFrame  # the valid events, out of order
    rows: pd.DataFrame  # the Spark rows
    until_us: int  # the end of the job's last day


@pytest.fixture(scope="module")
def computed(spark, tmp_path_factory: pytest.TempPathFactory) -> Computed:
    """The hand-placed events as raw history (with two invalid ones, which no reader
    counts) and the Spark rows of a request-time view over the valid ones."""
    now = datetime.now(UTC)
    events = _events(now)
    raw = tmp_path_factory.mktemp("raw") / "transactions"
    bad = pd.DataFrame(
        {"user_id": [1, 2], "merchant_id": [7, 7], "amount": [-1.0, np.nan],
         "event_timestamp": events.event_timestamp.max() - pd.Timedelta(seconds=1)}
    )  # fmt: skip
    history = pd.concat([events, bad], ignore_index=True)
    history["date"] = history.event_timestamp.dt.strftime("%Y-%m-%d")
    pq.write_to_dataset(pa.Table.from_pandas(history, preserve_index=False), raw, ["date"])
    view = request_view("rt", SPECS)
    view = dataclasses.replace(view, events=dataclasses.replace(view.events, history_path=str(raw)))
    last_day = pd.Timestamp(events.event_timestamp.max().date(), tz="UTC")
    until_us = int(reference._micros(pd.Series([last_day + pd.Timedelta(days=1)]))[0]) - 1
    return Computed(view, events, spark_rows(spark, view, events), until_us)


def test_request_time_rows_equal_pandas_point_in_time(computed: Computed) -> None:
    """Every row equals the oracle's, and the rows looked up point-in-time at any instant
    (between events, ±1 µs around tile and window edges, ties, long after) give the value
    over the exact events in ``[floor(t/R)·R - W + R, t]``."""
    view, events, rows, until = computed.view, computed.events, computed.rows, computed.until_us
    expected = reference.request_time(view, events, until)
    assert_frames_match(rows, expected, ["user_id", "event_timestamp"])
    assert assert_point_in_time(view, events, rows, until) > 2000
    # a burst after a long quiet period is seen at once
    count_5m = view.aggs[0].name
    mine = rows[rows.user_id == 1].set_index("event_timestamp")[count_5m]
    burst = mine[mine.index.hour == 16].tolist()
    assert mine[mine.index.hour < 16].iloc[-1] == 0 and burst[:2] == [1, 3]


def test_materialized_tiles_equal_offline_rows(computed: Computed) -> None:
    """The tiles materialization writes for a key (``materialize.event_tiles``: its valid
    raw events in the longest window ending at ``end``), evaluated at ``end`` as serving
    does, equal the offline row Feast's point-in-time join gives at ``end``: at event
    instants, ±1 µs around tile and window edges, in quiet periods and long after."""
    view, events, rows = computed.view, computed.events, computed.rows
    rules = event_rules(ROOT / "feature_repo")
    ev = reference._micros(events.event_timestamp)
    edges = ev // R * R + np.array([[0], [1], [2], [5], [60]]) * R
    ends = np.unique(
        np.concatenate([ev, edges.ravel() - 1, edges.ravel(), [ev.max() + 10 * HOUR_US]])
    )
    ends = np.random.default_rng(1).choice(ends[ends <= computed.until_us], 60, replace=False)
    ends = np.append(ends, ev.max())  # just after the invalid events: they never count
    names = [a.name for a in view.aggs]
    by_key = {k: g.sort_values("event_timestamp") for k, g in rows.groupby("user_id")}
    stamps = {k: reference._micros(g.event_timestamp) for k, g in by_key.items()}
    for end_us in map(int, ends):
        end = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=end_us)
        blobs = event_tiles(view, end, ["user_id"], rules)
        for key, g in by_key.items():
            online = view.tiles.evaluate(blobs.get((key,), (None,))[0], end_us)
            i = np.searchsorted(stamps[key], end_us, side="right") - 1
            if i < 0 or stamps[key][i] < end_us - view.ttl_us:  # no row: an empty window
                assert online == [0 if a.function in ("count", "sum") else None for a in view.aggs]
                continue
            offline = g.iloc[i][names].tolist()
            for name, on, off in zip(names, online, offline, strict=True):
                where = f"user {key} at {pd.Timestamp(end_us, unit='us')} {name}: {on} != {off}"
                assert (on is None and pd.isna(off)) or on == pytest.approx(off, rel=1e-9), where


def test_request_time_views_share_one_pass(spark, computed: Computed) -> None:
    """Request-time views of one resolution share a pass (one sort), and each view's table
    out of it equals the view computed alone: its event instants and its own windows'
    expiries only (a 2-minute view gets no row where a tile leaves a 1-hour window)."""
    events = _spark_events(spark, computed.events)
    group = (computed.view, request_view("short", [("sum", "amount", 2 * MINUTE_US)]))
    other = request_view("coarse", [("count", "amount", 10 * MINUTE_US)], 5 * MINUTE_US)
    assert batch_compile.passes([*group, other]) == [group, (other,)]
    days = computed.events.event_timestamp.dt.date
    first, last = days.min(), days.max()
    shared = batch_compile.compute_shared(group, events, first, last)
    sizes = []
    for i, view in enumerate(group):
        one = batch_compile.view_rows(shared, group, i).toPandas()
        alone = batch_compile.compute(view, events, first, last).toPandas()
        assert_frames_match(one, alone, ["user_id", "event_timestamp"])
        sizes.append(len(one))
    assert sizes[1] < sizes[0]
