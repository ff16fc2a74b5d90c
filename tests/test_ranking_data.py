"""The ranking use case's data: generated impressions are consistent with the payments and
learnable, and its declared label source builds a point-in-time training set for its
FeatureService with Feast's ``get_historical_features``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from conftest import Project

from online_store.point_in_time import historical_features
from pipelines.generate import GenerateConfig, generate

END = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
SERVICE = "merchant_ranking_v1"
LABELS = "ranking_impressions"


def _purchased(impressions: pd.DataFrame, payments: pd.DataFrame) -> pd.Series:
    """Did the user pay the merchant (a payment not marked fraud) within 24 h after each
    impression? Computed by a join, independently of the generator."""
    legit = payments.loc[~payments.is_fraud, ["user_id", "merchant_id", "event_timestamp"]]
    pairs = impressions.reset_index()[["index", "user_id", "merchant_id", "event_timestamp"]]
    joined = pairs.merge(legit, on=["user_id", "merchant_id"], suffixes=("", "_paid"))
    after = joined.event_timestamp_paid - joined.event_timestamp
    hit = joined.loc[(after > pd.Timedelta(0)) & (after <= pd.Timedelta(hours=24)), "index"]
    return impressions.index.isin(hit.unique())


def test_impressions_are_consistent_and_learnable(tmp_path: Path) -> None:
    result = generate(GenerateConfig(rows=20_000, days=30, end=END, seed=3), tmp_path)
    path = tmp_path / "impressions"
    schema = pq.read_schema(next(path.glob("date=*/part-00000.parquet")))
    for col in ("event_timestamp", "label_ts"):
        assert str(schema.field(col).type) == "timestamp[us, tz=UTC]"
    shown = pd.read_parquet(path)
    payments = pd.read_parquet(tmp_path / "transactions")
    merchants = pd.read_parquet(tmp_path / "merchants")
    users = pd.read_parquet(tmp_path / "users")
    assert len(shown) == result.impressions and shown.purchased.sum() == result.purchased
    assert set(shown.merchant_id) <= set(merchants.merchant_id)
    assert set(shown.user_id) <= set(users.user_id)
    assert shown.event_timestamp.min() >= pd.Timestamp(END - timedelta(days=30))
    assert shown.event_timestamp.max() < pd.Timestamp(END)
    assert (shown.label_ts == shown.event_timestamp + timedelta(hours=24)).all()
    assert (shown.date.astype(str) == shown.event_timestamp.dt.strftime("%Y-%m-%d")).all()
    # a slate: one user, one instant, one platform, distinct merchants at positions 0..n-1
    slates = shown.groupby("impression_id")
    assert (slates[["user_id", "event_timestamp", "platform"]].nunique() == 1).all().all()
    assert (slates.merchant_id.nunique() == slates.size()).all()
    assert (slates.position.max() + 1 == slates.size()).all()
    assert set(shown.platform) == {"app", "web"}

    # the label is what the payments say
    assert (shown.purchased.to_numpy() == _purchased(shown, payments)).all()
    rate = shown.purchased.mean()
    assert 0.03 < rate < 0.3
    # learnable from what the features see: the pair's earlier payments, the platform
    first = payments.groupby(["user_id", "merchant_id"]).event_timestamp.min()
    paid_before = shown.join(first.rename("first"), on=["user_id", "merchant_id"])
    paid_before = (paid_before["first"] < shown.event_timestamp).to_numpy()
    assert shown.purchased[paid_before].mean() > 3 * shown.purchased[~paid_before].mean()
    by_platform = shown.groupby("platform").purchased.mean()
    assert by_platform["app"] > by_platform["web"]


def test_impressions_leave_the_payments_unchanged(tmp_path: Path) -> None:
    """Impressions come from their own random streams: without them no payment changes."""
    generate(GenerateConfig(rows=3000, days=5, end=END, seed=4), tmp_path / "with")
    generate(GenerateConfig(rows=3000, days=5, end=END, seed=4, slates=0), tmp_path / "without")
    assert pd.read_parquet(tmp_path / "without" / "impressions").empty  # readable, no rows
    for sub in ("transactions", "users", "merchants"):
        a = sorted((tmp_path / "with" / sub).rglob("*.parquet"))
        b = sorted((tmp_path / "without" / sub).rglob("*.parquet"))
        assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def _pair_count_90d(payments: pd.DataFrame, rows: pd.DataFrame) -> pd.Series:
    """``user_merchant_txn_count_90d`` as the point-in-time join must give it: the pair's
    latest payment at or before the row's time, within the view's 90-day TTL, counting the
    pair's payments in the 90 days up to and including that payment; else missing."""
    day90 = pd.Timedelta(days=90)
    out = []
    by_pair = {
        k: g.event_timestamp.sort_values() for k, g in payments.groupby(["user_id", "merchant_id"])
    }
    for r in rows.itertuples():
        ts = by_pair.get((r.user_id, r.merchant_id))
        last = None if ts is None else ts[ts <= r.event_timestamp].max()
        if last is None or pd.isna(last) or last < r.event_timestamp - day90:
            out.append(None)
        else:
            out.append(int(((ts > last - day90) & (ts <= last)).sum()))
    return pd.Series(out, index=rows.index, dtype="Int64")


def test_ranking_training_set_is_point_in_time(applied, batch_done: Project) -> None:
    source = applied.get_data_source(LABELS)
    assert Path(source.path).resolve() == (batch_done.settings.raw_dir / "impressions").resolve()
    labels = pd.read_parquet(source.path).drop(columns="date")
    labels = labels[labels.label_ts <= pd.Timestamp(batch_done.now)]
    sample = labels.sample(300, random_state=0).sort_values(["impression_id", "position"])
    service = applied.get_feature_service(SERVICE)
    df = historical_features(applied, sample.reset_index(drop=True), service)
    df["event_timestamp"] = pd.to_datetime(df.event_timestamp, utc=True)
    df = df.sort_values(["impression_id", "position"]).reset_index(drop=True)
    assert len(df) == len(sample)
    assert (df.purchased.to_numpy() == sample.purchased.to_numpy()).all()
    wanted = [f.name for p in service.feature_view_projections for f in p.features]
    assert set(wanted) <= set(df.columns)
    assert (df.is_app == (df.platform == "app").astype(int)).all()
    expected = _pair_count_90d(batch_done.transactions, df)
    got = df.user_merchant_txn_count_90d.astype("Int64")
    assert got.isna().equals(expected.isna())
    assert (got[got.notna()] == expected[expected.notna()]).all()
    # the features see what the label depends on
    seen = got.notna().to_numpy()
    assert df.purchased[seen].mean() > df.purchased[~seen].mean()
