"""The synthetic data generator: deterministic, bounded per day, labelled late, learnable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines.generate import GenerateConfig, generate

END = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    cfg = GenerateConfig(rows=3000, days=10, end=END, seed=5)
    generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b")
    generate(GenerateConfig(rows=3000, days=10, end=END, seed=6), tmp_path / "c")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")


def test_layout_types_and_range(tmp_path: Path) -> None:
    calls: list[tuple[int, int, int]] = []
    result = generate(
        GenerateConfig(rows=5000, days=7, end=END, seed=1),
        tmp_path,
        progress=lambda *a: calls.append(a),
    )
    tx_dir = tmp_path / "transactions"
    parts = sorted(p.name for p in tx_dir.iterdir())
    assert parts[0] == "date=2026-02-22" and parts[-1] == "date=2026-03-01"
    schema = pq.read_schema(next(tx_dir.glob("date=*/part-00000.parquet")))
    assert str(schema.field("event_timestamp").type) == "timestamp[us, tz=UTC]"
    assert str(schema.field("label_ts").type) == "timestamp[us, tz=UTC]"
    tx = pd.read_parquet(tx_dir)
    assert len(tx) == result.transactions
    assert 0.7 * 5000 < len(tx) < 1.3 * 5000
    assert tx.event_timestamp.min() >= pd.Timestamp(END - timedelta(days=7))
    assert tx.event_timestamp.max() < pd.Timestamp(END)
    assert tx.transaction_id.is_unique
    assert (tx.label_ts > tx.event_timestamp).all()
    assert (tx.date.astype(str) == tx.event_timestamp.dt.strftime("%Y-%m-%d")).all()
    assert calls[-1] == (8, 8, result.transactions)
    users = pd.read_parquet(tmp_path / "users")
    assert set(tx.user_id) <= set(users.user_id)


def test_fraud_follows_learnable_patterns(tmp_path: Path) -> None:
    generate(GenerateConfig(rows=40_000, days=20, end=END, seed=2), tmp_path)
    tx = pd.read_parquet(tmp_path / "transactions")
    rate = tx.is_fraud.mean()
    assert 0.002 < rate < 0.05
    assert set(tx.loc[tx.is_fraud, "fraud_pattern"]) >= {
        "ato",
        "risky_merchant",
        "new_merchant_high_amount",
    }
    user_median = tx[~tx.is_fraud].groupby("user_id").amount.median()
    ratio = tx.amount / tx.user_id.map(user_median)
    assert ratio[tx.fraud_pattern == "ato"].median() > 3 * ratio[~tx.is_fraud].median()
    ato = tx[tx.fraud_pattern == "ato"].sort_values("event_timestamp")
    gaps = ato.groupby("user_id").event_timestamp.diff().dropna()
    assert (gaps < pd.Timedelta(minutes=15)).mean() > 0.8  # bursts


def test_rejects_non_positive_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate(GenerateConfig(rows=0, days=3, end=END), tmp_path)
