"""Reading the raw data folder (``data/raw/``) for the commands: its day range and its
latest payments."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd

from pipelines.errors import HotpathError

PAYMENT_COLUMNS = ["user_id", "merchant_id", "amount", "event_timestamp"]


def _transactions(raw_dir: Path) -> Path:
    path = raw_dir / "transactions"
    if not path.exists():
        raise HotpathError(f"raw transactions not found at {path} (run `hotpath generate` first)")
    return path


def day_range(raw_dir: Path) -> tuple[date, date]:
    """First raw day and the day after the last (the snapshot at its midnight covers the
    last day), but never after today."""
    tx = _transactions(raw_dir)
    days = sorted(p.name.removeprefix("date=") for p in tx.glob("date=*"))
    if not days:
        raise HotpathError(f"raw transactions not found at {tx} (run `hotpath generate` first)")
    try:
        first, last = date.fromisoformat(days[0]), date.fromisoformat(days[-1])
    except ValueError as e:
        raise HotpathError(f"a partition under {tx} is not a date: {e}") from None
    return first, min(last + timedelta(days=1), datetime.now(UTC).date())


def recent_payments(raw_dir: Path, n: int) -> pd.DataFrame:
    """Entity rows (and amounts, times) of the latest ``n`` payments, newest first, each
    with a ``transaction_id`` of its own."""
    tx = pd.read_parquet(_transactions(raw_dir), columns=PAYMENT_COLUMNS)
    latest = tx.nlargest(n, "event_timestamp").reset_index(drop=True)
    return latest.astype({"user_id": "int64", "merchant_id": "int64", "amount": "float64"}).assign(
        transaction_id=range(len(latest))
    )


def latest_payers(raw_dir: Path, n: int) -> pd.DataFrame:
    """The last payment of each of the ``n`` users who paid last, oldest first."""
    tx = pd.read_parquet(_transactions(raw_dir), columns=PAYMENT_COLUMNS)
    tx = tx.sort_values("event_timestamp")
    return tx.drop_duplicates("user_id", keep="last").tail(n)
