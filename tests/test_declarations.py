"""Feature computations are declarations: bad ones fail at ``hotpath apply`` with one line
naming the view and the problem; the repo's own declarations compile."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import ROOT, hotpath

from pipelines import contract
from pipelines.errors import HotpathError

BAD = {
    "unknown column": (
        'Aggregation("tip", "sum", HOUR, name="user_tip_sum_1h")',
        "unknown column 'tip'",
    ),
    "unsupported function": (
        'Aggregation("amount", "median", HOUR, name="user_amount_median_1h")',
        "unsupported function 'median'",
    ),
    "window zero": (
        'Aggregation("amount", "sum", HOUR * 0, name="user_amount_sum_0")',
        "window must be > 0",
    ),
    "negative window": (
        'Aggregation("amount", "count", -HOUR, name="user_txn_count_neg")',
        "window must be > 0",
    ),
    "max of a boolean": (
        'Aggregation("is_fraud", "max", HOUR, name="user_fraud_max_1h")',
        "max of a boolean",
    ),
    "unnamed": ('Aggregation("amount", "sum", HOUR)', "give it a name"),
}


def _add_view(repo: Path, aggregation: str, entity: str = "user", extra: str = "") -> None:
    """Append a streamed view with one aggregation to the repo copy's stream features."""
    source = repo / "streaming_features.py"
    source.write_text(
        source.read_text()
        + f"""
{extra}
bad_view = aggregated_view(
    name="bad_view",
    entities=[{entity}],
    events=transactions,
    cadence=PER_EVENT,
    stream=True,
    aggregations=[{aggregation}],
    ttl=HOUR,
)
"""
    )


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    repo = tmp_path / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("__pycache__"))
    return repo


def test_the_repo_declarations_compile() -> None:
    views = {v.name: v for v in contract.computed_views(ROOT / "feature_repo")}
    keys = {v.keys for v in views.values()}
    assert {("user_id",), ("merchant_id",), ("user_id", "merchant_id")} <= keys
    # every feature of a computed view is one declared aggregation of it
    for view in contract.feature_views(ROOT / "feature_repo").values():
        if view.name in views:
            assert [f.name for f in view.features] == [a.name for a in views[view.name].aggs]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_declarations_name_the_view_and_problem(repo_copy: Path, case: str) -> None:
    aggregation, problem = BAD[case]
    _add_view(repo_copy, aggregation)
    with pytest.raises(HotpathError) as e:
        contract.computed_views(repo_copy)
    assert "bad_view" in str(e.value) and problem in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_entity_without_join_key_in_events(repo_copy: Path) -> None:
    extra = (
        "from feast import Entity, ValueType\n"
        'device = Entity(name="device", join_keys=["device_id"], value_type=ValueType.INT64)'
    )
    _add_view(repo_copy, 'Aggregation("amount", "sum", HOUR, name="x_1h")', "device", extra)
    with pytest.raises(HotpathError, match="bad_view: entity 'device' has no join key"):
        contract.computed_views(repo_copy)


def test_daily_windows_are_whole_days(repo_copy: Path) -> None:
    source = repo_copy / "features.py"
    text = source.read_text().replace(
        'Aggregation("amount", "count", DAY, name="user_txn_count_1d")',
        'Aggregation("amount", "count", DAY / 2, name="user_txn_count_1d")',
    )
    source.write_text(text)
    with pytest.raises(HotpathError, match="user_spending_stats: .* whole days"):
        contract.computed_views(repo_copy)


def test_hotpath_apply_refuses_a_bad_declaration_in_one_line(repo_copy: Path) -> None:
    _add_view(repo_copy, 'Aggregation("tip", "sum", HOUR, name="user_tip_sum_1h")')
    proc = hotpath("apply", repo=repo_copy, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "bad_view" in errors[0] and "'tip'" in errors[0], out
    assert not (repo_copy.parent / "data" / "registry.db").exists()  # nothing registered


def test_feast_native_aggregations_are_refused(repo_copy: Path) -> None:
    """Feast's compute engine would aggregate such a view itself on `feast materialize` and
    write values that differ from the backfill's and the stream's."""
    source = repo_copy / "streaming_features.py"
    source.write_text(
        source.read_text()
        + """
from feast import Field, StreamFeatureView
from feast.types import Float64

feast_native = StreamFeatureView(
    name="feast_native",
    entities=[user],
    source=user_velocity.stream_source,
    schema=[Field(name="sum_amount", dtype=Float64)],
    aggregations=[Aggregation("amount", "sum", HOUR, name="sum_amount")],
    timestamp_field="event_timestamp",
)
"""
    )
    with pytest.raises(HotpathError, match="feast_native: Feast's engine computes"):
        contract.computed_views(repo_copy)


NEW_VIEW = """
merchant_floor = aggregated_view(
    name="merchant_floor",
    entities=[merchant],
    events=transactions,
    cadence=PER_EVENT,
    stream=True,
    aggregations=[
        Aggregation("amount", "min", 10 * MINUTE, name="merchant_amount_min_10m"),
        Aggregation("user_id", "count_distinct", 24 * HOUR, name="merchant_users_24h"),
    ],
    ttl=30 * 24 * HOUR,
    tags={"online_store": "redis", "freshness": "stream", "team": "test"},
)
"""


def test_a_new_declaration_is_backfilled_streamed_and_served(tmp_path: Path, spark) -> None:
    """Declared in a copy of the repo only: the backfill, `apply`, `materialize` (the library
    calls behind those commands, in this process) and `hotpath stream` compute it, and the
    online value equals pandas over the raw and streamed events."""
    import numpy as np
    import pandas as pd
    import reference
    from conftest import make_project

    from pipelines import store
    from pipelines.batch_job import run_batch

    project = make_project(tmp_path, rows=1500, days=3, users=40, merchants=8, edges=False)
    repo = project.settings.repo
    (repo / "streaming_features.py").write_text(
        (repo / "streaming_features.py").read_text() + NEW_VIEW
    )
    s = project.settings
    run_batch(
        spark, repo, s.raw_dir, s.offline_dir, project.generated.start.date(), project.now.date()
    )
    fs = store.open_store(s)
    store.apply(fs)
    store.materialize(fs)

    # live payments minutes ago, on merchants the history knows and one it does not
    now = pd.Timestamp.now(tz="UTC").floor("us")
    live = pd.DataFrame(
        {
            "user_id": [1, 2, 3, 1, 4],
            "merchant_id": [0, 0, 1, 1, 99],
            "amount": [0.0, 12.5, 7.25, 3.0, 40.0],
            "event_timestamp": [now - pd.Timedelta(minutes=m) for m in (9, 4, 3, 3, 1)],
        }
    )
    # the stream replays what its source retains (the longest window, 24 h, and more) and
    # then the live payments: its state starts empty, like any start without recovery
    history = project.transactions
    retained = history[history.event_timestamp >= now - pd.Timedelta(hours=25)]
    replay = pd.concat([retained[live.columns], live]).sort_values("event_timestamp")
    folder = tmp_path / "live"
    folder.mkdir()
    replay.to_parquet(folder / "events.parquet")
    proc = hotpath("stream", "--source", "file", "--file", str(folder), repo=repo, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    view = next(v for v in contract.computed_views(repo) if v.name == "merchant_floor")
    events = pd.concat([project.transactions, live], ignore_index=True)
    events["event_timestamp"] = pd.to_datetime(events.event_timestamp, utc=True)
    want = (
        reference.per_event(view, events)
        .sort_values("event_timestamp")
        .groupby("merchant_id")
        .tail(1)
        .set_index("merchant_id")
    )
    merchants = [0, 1, 99]
    got = fs.get_online_features(
        features=[f"merchant_floor:{a.name}" for a in view.aggs],
        entity_rows=[{"merchant_id": m} for m in merchants],
    ).to_df()
    got = got.set_index("merchant_id")
    for a in view.aggs:
        np.testing.assert_allclose(
            got.loc[merchants, a.name].astype(float),
            want.loc[merchants, a.name].astype(float),
            err_msg=a.name,
        )
    assert want.loc[0, "merchant_amount_min_10m"] == 0.0  # a 0.00 payment is a minimum


def test_stream_only_problems_fail_at_apply(repo_copy: Path) -> None:
    """A streamed view aggregating a column the live events do not carry passes the generic
    checks but not the stream's: `apply` runs both, before registering anything."""
    from pipelines import store
    from pipelines.settings import Settings

    _add_view(repo_copy, 'Aggregation("is_fraud", "sum", HOUR, name="user_fraud_1h")')
    with pytest.raises(HotpathError, match="bad_view: user_fraud_1h aggregates 'is_fraud'"):
        store.apply(store.open_store(Settings(repo=repo_copy)))


def test_one_offline_row_per_key_and_instant_per_epoch(tmp_path: Path) -> None:
    """A correction in the same epoch (an out-of-order event re-emits a later row) must not
    leave two rows with one ``created``: Feast's pick between them would be arbitrary."""
    import dataclasses

    import pandas as pd

    from pipelines.stream.sinks import Emitted, OfflineSink, Row

    view = next(
        v for v in contract.computed_views(ROOT / "feature_repo") if v.name == "user_velocity"
    )
    view = dataclasses.replace(view, table=str(tmp_path / "user_velocity"))
    part = OfflineSink([view]).build_part("offline", "0", None)
    t = 1_700_000_000_000_000
    first, corrected = (1, 10.0, 1, 10.0), (2, 15.0, 2, 15.0)
    part.write_batch([Emitted([Row(("user_id",), (7,), t, first, 0.0)], [])])
    part.write_batch([Emitted([Row(("user_id",), (7,), t, corrected, 0.0)], [])])
    part.snapshot()
    part.close()
    rows = pd.read_parquet(tmp_path / "user_velocity")
    assert len(rows) == 1 and rows.iloc[0]["user_txn_count_5m"] == 2, rows


def test_a_request_time_view_must_live_where_tiles_are_read(repo_copy: Path) -> None:
    """A request-time view in a store whose reads are Feast's own (ScyllaDB) would serve its
    last-event row under a request-time name: `apply` refuses it, naming view and tier."""
    from pipelines import store
    from pipelines.settings import Settings

    source = repo_copy / "streaming_features.py"
    text = source.read_text()
    at = text.index('name="user_velocity"')
    tags = text.index('"online_store": "redis"', at)
    source.write_text(text[:tags] + '"online_store": "scylla"' + text[tags + 23 :])
    from feast import FeatureStore

    production = Settings(repo=repo_copy, profile="production")
    store.open_store_env(production)  # (no server needed: the check reads the config)
    fs = FeatureStore(repo_path=str(repo_copy), fs_yaml_file=production.feature_store_yaml)
    with pytest.raises(HotpathError, match=r"user_velocity: request_time .* \(tier scylla\) is"):
        store.check_tiers(fs, repo_copy)
    store.check_tiers(store.open_store(Settings(repo=repo_copy)), repo_copy)  # SQLite: fine
