"""Validation: the batch gate blocks bad batches by name; freshness, drift and skew checks."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import Project, make_project
from helpers import hotpath

from pipelines import store
from validation.drift import THRESHOLD, drift_report
from validation.freshness import check_freshness
from validation.gate import materialization_windows, validate_batch
from validation.skew import check_skew

# ---------------------------------------------------------------- the batch gate


@pytest.fixture(scope="module")
def gate_project(tmp_path_factory: pytest.TempPathFactory, spark):
    """A small project, backfilled and applied but never materialized."""
    from pipelines.batch_job import run_batch

    project = make_project(tmp_path_factory.mktemp("gate"), 3000, 12, edges=False)
    s = project.settings
    run_batch(
        spark, s.repo, s.raw_dir, s.offline_dir, project.generated.start.date(), project.now.date()
    )
    fs = store.open_store(s)
    store.apply(fs)
    return project, fs


def _gate(project: Project, fs):
    s = project.settings
    windows = materialization_windows(fs, datetime.now(UTC))
    return validate_batch(fs, s.repo, s.validation_dir, views=sorted(windows), windows=windows)


@pytest.fixture
def corrupt(gate_project) -> Iterator[Callable[[Callable[[pd.DataFrame], pd.DataFrame]], None]]:
    """Rewrite today's user_spending_stats partition through a function; restore after."""
    project, _ = gate_project
    folder = project.settings.offline_dir / "user_spending_stats" / f"date={project.now.date()}"
    backup = folder.with_name(folder.name + ".bak")
    shutil.copytree(folder, backup)

    def apply(change: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
        files = sorted(folder.glob("*.parquet"))
        frame = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
        for f in files:
            f.unlink()
        out = change(frame)
        schema = None if len(out.columns) else pa.schema([])
        pq.write_table(
            pa.Table.from_pandas(out, schema=schema, preserve_index=False),
            folder / "part-0.parquet",
        )

    yield apply
    shutil.rmtree(folder)
    backup.rename(folder)


def test_clean_batch_passes(gate_project) -> None:
    report = _gate(*gate_project)
    assert report.success, report.summary()
    assert {v.view for v in report.views} >= {"user_spending_stats", "user_velocity"}
    assert report.data_docs and report.data_docs.exists()


def _null_keys(df: pd.DataFrame) -> pd.DataFrame:
    df["user_id"] = df["user_id"].astype("float64")
    df.loc[df.index[:3], "user_id"] = np.nan
    return df


def _future(df: pd.DataFrame) -> pd.DataFrame:
    df.loc[df.index[:2], "event_timestamp"] += pd.Timedelta(days=3)
    return df


BAD_BATCHES = {
    "null keys": (_null_keys, "expect_column_values_to_not_be_null(user_id)"),
    "out-of-range amount": (
        lambda df: df.assign(user_amount_sum_1d=-50.0),
        "expect_column_values_to_be_between(user_amount_sum_1d)",
    ),
    "duplicated entity rows": (
        lambda df: pd.concat([df, df.head(5)], ignore_index=True),
        "expect_compound_columns_to_be_unique(user_id,event_timestamp)",
    ),
    "future timestamps": (_future, "expect_column_values_to_be_between(event_timestamp)"),
    "empty partition": (
        lambda df: df.head(0),
        "expect_column_distinct_values_to_contain_set(date)",
    ),
    "missing column": (
        lambda df: df.drop(columns="user_txn_count_7d"),
        "expect_column_to_exist(user_txn_count_7d)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_batch_is_blocked_by_name(gate_project, corrupt, case: str) -> None:
    change, expectation = BAD_BATCHES[case]
    corrupt(change)
    report = _gate(*gate_project)
    assert not report.success
    spending = next(v for v in report.views if v.view == "user_spending_stats")
    names = [str(f).split(":")[0] for f in spending.failures]
    assert expectation in names, spending.failures
    assert all(v.success for v in report.views if v.view != "user_spending_stats")


def test_streamed_rows_superseded_by_the_backfill_pass_the_gate(gate_project) -> None:
    """The stream appends rows the backfill later recomputes (same user and instant, older
    ``created``): Feast keeps the newest, and so does the gate; it does not call them
    duplicates (it did, after `hotpath demo`, on the next `hotpath materialize`)."""
    project, fs = gate_project
    folder = project.settings.offline_dir / "user_velocity" / f"date={project.now.date()}"
    frame = pd.concat([pq.read_table(f).to_pandas() for f in folder.glob("*.parquet")])
    streamed = frame.assign(created=pd.Timestamp.now(tz="UTC").floor("us"))
    extra = folder / "stream-test.parquet"
    pq.write_table(pa.Table.from_pandas(streamed, preserve_index=False), extra)
    try:
        report = _gate(project, fs)
        assert report.success, report.summary()
    finally:
        extra.unlink()


def test_materialize_refuses_a_failing_batch_until_overridden(
    gate_project, corrupt, capsys: pytest.CaptureFixture[str]
) -> None:
    """``hotpath materialize`` refuses (as a user runs it: exit 1, one line naming the view
    and the expectation); the override is the same command's function called here, in the
    test's process, so it reuses the warm Spark session instead of starting a JVM."""
    from pipelines.cli.context import Hotpath
    from pipelines.cli.store import materialize

    project, _ = gate_project
    online_db = project.settings.data_dir / "online_store.db"
    corrupt(BAD_BATCHES["out-of-range amount"][0])
    proc = hotpath("materialize", repo=project.settings.repo)
    assert proc.returncode == 1
    assert "validation failed for user_spending_stats" in proc.stderr
    assert "expect_column_values_to_be_between(user_amount_sum_1d)" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "materialized up to" not in proc.stdout
    fs = store.open_store(project.settings)
    assert all(not v.materialization_intervals for v in fs.list_feature_views())

    capsys.readouterr()
    materialize(SimpleNamespace(obj=Hotpath(project.settings)), skip_validation=True)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "WARNING: loading despite failed validation" in out
    assert "materialized up to" in out
    log = (project.settings.validation_dir / "overrides.log").read_text()
    assert "user_spending_stats" in log
    assert online_db.exists()


# ---------------------------------------------------------------- freshness, drift, skew


def test_freshness_passes_on_a_fresh_store(trained_online) -> None:
    project, fs, _ = trained_online
    results = check_freshness(fs, project.settings.repo, now=project.now + timedelta(minutes=1))
    assert all(r.ok for r in results), [(r.view, r.age) for r in results]
    assert {r.freshness_class for r in results} == {"daily", "stream", "static"}


def test_freshness_fails_on_a_stale_store(trained_online) -> None:
    project, fs, _ = trained_online
    later = project.now + timedelta(days=3)  # nothing was loaded for three days
    stale = {r.view for r in check_freshness(fs, project.settings.repo, now=later) if not r.ok}
    assert {
        "user_velocity",
        "user_merchant_spread",
        "user_spending_stats",
        "merchant_risk_stats",
    } <= stale


def _psi_by_hand(edges: list[float], fractions: list[float], values: np.ndarray) -> float:
    """PSI of ``values`` against recorded bins, with pandas: bins (-inf, e1], ..., (ek, inf),
    empty shares floored at 1e-4 (the definition in validation/drift.py's docstring). Shares
    nothing with ``validation.drift`` or ``model_repository.bin_fractions``."""
    actual = _shares_by_hand(edges, values)
    a, e = np.maximum(actual, 1e-4), np.maximum(np.asarray(fractions, dtype=float), 1e-4)
    return float(np.sum((a - e) * np.log(a / e)))


def _shares_by_hand(edges: list[float], values: np.ndarray) -> np.ndarray:
    bins = pd.cut(pd.Series(values, dtype=float), [-np.inf, *edges, np.inf], labels=False)
    counts = bins.value_counts().reindex(range(len(edges) + 1), fill_value=0)
    return counts.to_numpy() / len(values)


def test_drift_against_the_model_repositorys_reference(trained_online) -> None:
    """The reference the drift check uses is the one training recorded in metadata.json (read
    here as a file), judged against resampled and drifted samples; every PSI is checked
    against a computation by hand, so a wrong bin, formula or feature order shows."""
    _, _, result = trained_online
    recorded = json.loads((result.path / "metadata.json").read_text())
    names = [f["name"] for f in recorded["features"]]  # the model's input columns, in order
    reference = recorded["reference"]
    assert set(reference) == set(names)
    x = result.x_valid  # the validation slice the reference says it describes
    # the recorded shares are the slice's own, feature by feature (by name, not position)
    for j, name in enumerate(names):
        np.testing.assert_allclose(
            reference[name]["fractions"], _shares_by_hand(reference[name]["edges"], x[:, j]),
            atol=1e-12, err_msg=name,
        )  # fmt: skip
    rng = np.random.default_rng(5)
    resampled = x[rng.integers(0, len(x), len(x))]
    drifted = resampled.copy()
    planted = {"user_amount_avg_30d", "amount_to_avg_30d", "merchant_fraud_rate_30d"}
    drifted[:, names.index("user_amount_avg_30d")] *= 3
    drifted[:, names.index("amount_to_avg_30d")] += 2.5
    # a broken join: 40 % of the rows lose the merchant's fraud rate (its default, -1)
    lost = rng.random(len(drifted)) < 0.4
    drifted[lost, names.index("merchant_fraud_rate_30d")] = -1.0
    for sample, want_flagged in ((resampled, set()), (drifted, planted)):
        report = drift_report(reference, sample, names)
        by_hand = {
            n: _psi_by_hand(reference[n]["edges"], reference[n]["fractions"], sample[:, j])
            for j, n in enumerate(names)
        }
        assert {d.feature for d in report} == set(names)
        for d in report:
            assert d.psi == pytest.approx(by_hand[d.feature], rel=1e-9, abs=1e-12), d
        assert {d.feature for d in report if d.drifted} == want_flagged, report[:5]
        assert {n for n, p in by_hand.items() if p > THRESHOLD} == want_flagged


def test_skew_is_zero_then_finds_an_injected_mismatch(trained_online) -> None:
    project, fs, _ = trained_online
    tx = project.transactions.sort_values("event_timestamp").tail(150)
    entities = tx[["user_id", "merchant_id"]].drop_duplicates()
    compared, mismatches = check_skew(fs, entities)
    assert compared > 1000 and mismatches == [], [str(m) for m in mismatches[:5]]

    user = int(entities.user_id.iloc[0])
    row = fs.get_online_features(
        features=["user_spending_stats:user_txn_count_7d"], entity_rows=[{"user_id": user}]
    ).to_dict(include_event_timestamps=True)
    stamp = pd.Timestamp(row["user_txn_count_7d__ts"][0], unit="s", tz="UTC")
    names = [f.name for f in fs.get_feature_view("user_spending_stats").features]
    good = fs.get_online_features(
        features=[f"user_spending_stats:{n}" for n in names], entity_rows=[{"user_id": user}]
    ).to_dict()
    bad = pd.DataFrame([{**{k: v[0] for k, v in good.items()}, "event_timestamp": stamp}])
    bad["user_txn_count_7d"] = int(bad["user_txn_count_7d"].iloc[0]) + 1000
    fs.write_to_online_store("user_spending_stats", bad)
    try:
        _, found = check_skew(fs, entities)
        # one mismatch per sampled (user, merchant) row of that user, and nothing else
        assert {(m.view, m.feature, m.entity["user_id"]) for m in found} == {
            ("user_spending_stats", "user_txn_count_7d", user)
        }
        assert len(found) == int((entities.user_id == user).sum())
    finally:
        fs.write_to_online_store(
            "user_spending_stats",
            pd.DataFrame([{**{k: v[0] for k, v in good.items()}, "event_timestamp": stamp}]),
        )
