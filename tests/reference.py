"""Independent pandas computations of every batch-computed feature, by brute force.

Written from the feature definitions' docstrings, not from the Spark code: each
value is computed by filtering the raw events for its window directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.contract import feature_views

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


def _velocity_tile() -> pd.Timedelta | None:
    """``user_velocity``'s request-time resolution as the repo declares it (its
    ``hotpath.request_time`` tag, µs); None: its windows end at each payment."""
    repo = Path(__file__).resolve().parent.parent / "feature_repo"
    tag = feature_views(repo)["user_velocity"].tags.get("hotpath.request_time")
    return pd.Timedelta(microseconds=int(tag)) if tag else None


def user_velocity(tx: pd.DataFrame) -> pd.DataFrame:
    """For each payment at ``t``: the user's payments in each window as of ``t``,
    ``(t - W, t]``; if the repo declares the view's 5-minute and 1-hour windows
    request-time, of one-minute tiles say, they start at ``floor(t, R) - W + R``
    (``[start, t]``). The 24-hour distinct count is always ``(t - 24h, t]``."""
    tile = _velocity_tile()
    rows = []
    for user_id, g in tx.groupby("user_id"):
        for t in g.event_timestamp.unique():
            ts = g.event_timestamp
            if tile is None:
                w5 = g[(ts > t - pd.Timedelta(minutes=5)) & (ts <= t)]
                w60 = g[(ts > t - pd.Timedelta(hours=1)) & (ts <= t)]
            else:
                start = t.floor(tile) + tile
                w5 = g[(ts >= start - pd.Timedelta(minutes=5)) & (ts <= t)]
                w60 = g[(ts >= start - pd.Timedelta(hours=1)) & (ts <= t)]
            w24 = g[(ts > t - DAY) & (ts <= t)]
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


def _value(function: str, values: pd.Series | np.ndarray) -> object:
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
    """One row per key and event instant ``t``: each aggregate over ``(t - W, t]``; for a
    request-time view (``view.tiles``), over ``[floor(t/R)*R - W + R, t]``
    (:func:`request_time_at`; its batch rows add the expiry instants: :func:`request_time`)."""
    keys = list(view.keys)
    rows = []
    for key, g in events.groupby(keys):
        key = key if isinstance(key, tuple) else (key,)
        if getattr(view, "tiles", None) is not None:
            at = np.unique(_micros(g.event_timestamp))
            for t, values in zip(at, request_time_at(view, g, at), strict=True):
                stamp = pd.Timestamp(int(t), unit="us", tz="UTC")
                rows.append(dict(zip(keys, key, strict=True)) | {"event_timestamp": stamp} | values)
            continue
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


def _micros(ts: pd.Series) -> np.ndarray:
    """Timestamps as integer microseconds since the epoch (exact)."""
    naive = pd.to_datetime(ts, utc=True).dt.tz_localize(None)
    return naive.astype("datetime64[us]").astype(np.int64).to_numpy()


def request_time_at(view, events: pd.DataFrame, instants) -> list[dict[str, object]]:
    """Each aggregate of a request-time view over one key's ``events`` at each instant
    ``t`` of ``instants`` (µs): the events with ``floor(t/R)*R - W + R <= ts <= t``
    (``online_store/tiles.py``)."""
    resolution = view.tiles.resolution_us
    ts = _micros(events.event_timestamp)
    columns = {a.column: events[a.column].to_numpy() for a in view.aggs}
    out = []
    for t in instants:
        start = int(t) // resolution * resolution + resolution
        masks = {w: (ts >= start - w) & (ts <= t) for w in {a.window_us for a in view.aggs}}
        out.append(
            {a.name: _value(a.function, columns[a.column][masks[a.window_us]]) for a in view.aggs}
        )
    return out


def request_time(view, events: pd.DataFrame, until_us: int) -> pd.DataFrame:
    """The rows of a request-time view: per key, one at each event instant and one at each
    instant a tile holding events leaves a window (tile ``k``, window ``W``: ``(k + W/R)*R``),
    up to ``until_us``; each value by :func:`request_time_at`."""
    keys = list(view.keys)
    resolution = view.tiles.resolution_us
    rows = []
    for key, g in events.groupby(keys):
        key = key if isinstance(key, tuple) else (key,)
        ts = _micros(g.event_timestamp)
        instants = set(ts.tolist())
        for k in set((ts // resolution).tolist()):
            for a in view.aggs:
                at = (k + a.window_us // resolution) * resolution
                if at <= until_us:
                    instants.add(at)
        at = sorted(instants)
        for t, values in zip(at, request_time_at(view, g, at), strict=True):
            row = dict(zip(keys, key, strict=True))
            row["event_timestamp"] = pd.Timestamp(t, unit="us", tz="UTC")
            rows.append(row | values)
    return pd.DataFrame(rows)
