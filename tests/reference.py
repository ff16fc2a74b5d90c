"""Independent pandas computations of every batch-computed feature, by brute force.

Written from the feature definitions' docstrings, not from the Spark code: each
value is computed by filtering the raw events for its window directly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DAY = pd.Timedelta(days=1)


def user_spending_stats(tx: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """Snapshot as of ``as_of`` for every user with a payment in the 31 days before it."""
    ts = tx["event_timestamp"]
    population = tx[(ts >= as_of - 31 * DAY) & (ts < as_of)]
    rows = []
    for user_id, g in population.groupby("user_id"):
        w1 = g[g.event_timestamp >= as_of - DAY]
        w7 = g[g.event_timestamp >= as_of - 7 * DAY]
        w30 = g[g.event_timestamp >= as_of - 30 * DAY]
        rows.append(
            {
                "user_id": user_id,
                "user_txn_count_1d": len(w1),
                "user_amount_sum_1d": float(w1.amount.sum()),
                "user_txn_count_7d": len(w7),
                "user_amount_sum_7d": float(w7.amount.sum()),
                "user_txn_count_30d": len(w30),
                "user_amount_avg_30d": float(w30.amount.mean()) if len(w30) else np.nan,
                "user_amount_max_30d": float(w30.amount.max()) if len(w30) else np.nan,
            }
        )
    return pd.DataFrame(rows)


def merchant_risk_stats(tx: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """Snapshot as of ``as_of``; fraud counts only labels known before ``as_of``."""
    ts = tx["event_timestamp"]
    population = tx[(ts >= as_of - 31 * DAY) & (ts < as_of)]
    rows = []
    for merchant_id, g in population.groupby("merchant_id"):
        w7 = g[g.event_timestamp >= as_of - 7 * DAY]
        w30 = g[g.event_timestamp >= as_of - 30 * DAY]
        fraud = int((w30.is_fraud & (w30.label_ts < as_of)).sum())
        rows.append(
            {
                "merchant_id": merchant_id,
                "merchant_txn_count_7d": len(w7),
                "merchant_amount_avg_7d": float(w7.amount.mean()) if len(w7) else np.nan,
                "merchant_txn_count_30d": len(w30),
                "merchant_fraud_count_30d": fraud,
                "merchant_fraud_rate_30d": fraud / len(w30) if len(w30) else np.nan,
            }
        )
    return pd.DataFrame(rows)


def user_velocity(tx: pd.DataFrame) -> pd.DataFrame:
    """For each payment: the user's payments in (t - window, t]."""
    rows = []
    for user_id, g in tx.groupby("user_id"):
        for t in g.event_timestamp.unique():
            w5 = g[(g.event_timestamp > t - pd.Timedelta(minutes=5)) & (g.event_timestamp <= t)]
            w60 = g[(g.event_timestamp > t - pd.Timedelta(hours=1)) & (g.event_timestamp <= t)]
            w24 = g[(g.event_timestamp > t - DAY) & (g.event_timestamp <= t)]
            rows.append(
                {
                    "user_id": user_id,
                    "event_timestamp": t,
                    "user_txn_count_5m": len(w5),
                    "user_amount_sum_5m": float(w5.amount.sum()),
                    "user_txn_count_1h": len(w60),
                    "user_amount_sum_1h": float(w60.amount.sum()),
                    "user_distinct_merchants_24h": w24.merchant_id.nunique(),
                }
            )
    return pd.DataFrame(rows)


def user_merchant_history(tx: pd.DataFrame) -> pd.DataFrame:
    """For each payment: this user's payments at this merchant in (t - 90 days, t]."""
    rows = []
    for (user_id, merchant_id), g in tx.groupby(["user_id", "merchant_id"]):
        times = g.event_timestamp.sort_values()
        for t in times.unique():
            n = int(((times > t - 90 * DAY) & (times <= t)).sum())
            rows.append(
                {
                    "user_id": user_id,
                    "merchant_id": merchant_id,
                    "event_timestamp": t,
                    "user_merchant_txn_count_90d": n,
                }
            )
    return pd.DataFrame(rows)


def latest_within_ttl(
    offline: pd.DataFrame, keys: list[str], end: pd.Timestamp, ttl: pd.Timedelta
) -> pd.DataFrame:
    """What an online store should hold after materializing up to ``end``: per key the newest
    row with ``end - ttl <= event_timestamp <= end``."""
    ts = offline["event_timestamp"]
    fresh = offline[(ts >= end - ttl) & (ts <= end)]
    return fresh.sort_values("event_timestamp").drop_duplicates(keys, keep="last")


# Generic oracles for whatever the repo declares (``pipelines.declared.View``), written from
# the semantics in ``feature_repo/aggregated.py`` by brute force over raw events.


def _value(function: str, values: pd.Series) -> object:
    """One aggregate of the window's values (empty window: count 0, sum 0, others None)."""
    if function == "count":
        return len(values)
    if function == "count_distinct":
        return int(values.nunique())
    if function == "sum":
        return values.sum() if len(values) else 0
    if not len(values):
        return np.nan
    return {"mean": values.mean, "max": values.max, "min": values.min}[function]()


def per_event(view, events: pd.DataFrame) -> pd.DataFrame:
    """One row per key and event instant ``t``: each aggregate over ``(t - W, t]``."""
    keys = list(view.keys)
    rows = []
    for key, g in events.groupby(keys):
        key = key if isinstance(key, tuple) else (key,)
        for t in g.event_timestamp.unique():
            row = dict(zip(keys, key, strict=True)) | {"event_timestamp": t}
            for a in view.aggs:
                w = pd.Timedelta(microseconds=a.window_us)
                inside = g[(g.event_timestamp > t - w) & (g.event_timestamp <= t)]
                row[a.name] = _value(a.function, inside[a.column])
            rows.append(row)
    return pd.DataFrame(rows)


def daily(view, events: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """The snapshot as of midnight ``as_of``: every key with an event in the longest window
    plus a day before it; each aggregate over ``[as_of - W, as_of)``; a ``known_at`` value
    counts only once known (before ``as_of``), else as 0."""
    keys = list(view.keys)
    longest = pd.Timedelta(microseconds=max(a.window_us for a in view.aggs))
    ts = events["event_timestamp"]
    population = events[(ts >= as_of - longest - DAY) & (ts < as_of)]
    rows = []
    for key, g in population.groupby(keys):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key, strict=True))
        for a in view.aggs:
            inside = g[g.event_timestamp >= as_of - pd.Timedelta(microseconds=a.window_us)]
            values = inside[a.column]
            if a.known_at:
                values = values.astype(float).where(inside[a.known_at] < as_of, 0.0)
            row[a.name] = _value(a.function, values)
        rows.append(row)
    return pd.DataFrame(rows)
