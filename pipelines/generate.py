"""Deterministic synthetic card transactions with learnable fraud.

Each day is drawn from its own seeded generator and written as one parquet
partition, so memory stays bounded by one day however many rows are asked for,
and the same seed always gives the same bytes. Fraud comes from patterns a model
can learn from the features in ``feature_repo``:

* ``ato``: account takeover bursts, 3-8 payments within 15 minutes at merchants the
  user never used, on a new device, often abroad, at several times the usual amount;
* ``new_merchant_high_amount``: a single large payment at an unfamiliar merchant;
* ``risky_merchant``: a small share of payments at risky merchants are fraud;
* ``noise``: a few random legitimate-looking payments are fraud.

Labels arrive late: ``label_ts`` is when the outcome became known (fraud through a
chargeback hours to weeks later, legitimate payments after the 1-3 day statement cycle).

Recommendation impressions (``impressions/``, day-partitioned like the payments) are slates
of candidate merchants shown to a user at an instant, labelled from the payments themselves:
``purchased`` is whether the user paid that merchant within ``PURCHASE_HORIZON`` after the
impression, known (``label_ts``) once the horizon has passed. A slate mixes the user's
habitual merchants with popular ones, so the pair's payment history and the merchant's
volume predict the label; app sessions are more often opened just before a payment than
web ones (shopping intent), so the request's platform predicts it too. Drawn from their own
seeded generators, they leave the payments' bytes unchanged.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

US_PER_DAY = 86_400_000_000
US_PER_HOUR = 3_600_000_000
COUNTRIES = np.array(["US", "GB", "DE", "FR", "ES", "IT", "NL", "SE", "PL", "BR", "IN", "JP"])
CATEGORIES = np.array(
    ["grocery", "fuel", "restaurant", "travel", "electronics", "fashion", "digital", "gambling"]
)
FAVOURITES = 8  # merchants a user habitually pays
PLATFORMS = np.array(["app", "web"])
PURCHASE_HORIZON = timedelta(hours=24)

TRANSACTION_SCHEMA = pa.schema(
    [
        ("transaction_id", pa.int64()),
        ("user_id", pa.int64()),
        ("merchant_id", pa.int64()),
        ("device_id", pa.int64()),
        ("amount", pa.float64()),
        ("country", pa.string()),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
        ("is_fraud", pa.bool_()),
        ("fraud_pattern", pa.string()),
        ("label_ts", pa.timestamp("us", tz="UTC")),
    ]
)

IMPRESSION_SCHEMA = pa.schema(
    [
        ("impression_id", pa.int64()),  # one slate: a user, an instant, its candidates
        ("position", pa.int64()),  # 0 = shown first
        ("user_id", pa.int64()),
        ("merchant_id", pa.int64()),
        ("platform", pa.string()),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
        ("purchased", pa.bool_()),  # paid this merchant within PURCHASE_HORIZON after
        ("label_ts", pa.timestamp("us", tz="UTC")),  # event_timestamp + PURCHASE_HORIZON
    ]
)


@dataclass(frozen=True)
class GenerateConfig:
    """What to generate: about ``rows`` transactions in the ``days`` days before ``end``."""

    rows: int = 20_000
    days: int = 30
    end: datetime | None = None  # exclusive, UTC; default: now, so the newest events are fresh
    seed: int = 7
    users: int | None = None  # default: rows // 40, at least 50
    merchants: int | None = None  # default: rows // 400, at least 30
    slates: int | None = None  # recommendation impressions; default: rows // 20
    slate_size: int = 10  # candidates drawn per slate (duplicates dropped)

    def resolved(self) -> GenerateConfig:
        """This config with ``end`` fixed (to now, to the second, when unset)."""
        end = self.end or datetime.now(UTC).replace(microsecond=0)
        if end.tzinfo is None:
            end = end.replace(tzinfo=UTC)
        return replace(self, end=end)

    @property
    def end_time(self) -> datetime:
        assert self.end is not None, "call resolved() first"
        return self.end

    @property
    def start_time(self) -> datetime:
        return self.end_time - timedelta(days=self.days)

    @property
    def n_users(self) -> int:
        return self.users or max(50, self.rows // 40)

    @property
    def n_merchants(self) -> int:
        return self.merchants or max(30, self.rows // 400)

    @property
    def n_slates(self) -> int:
        return self.rows // 20 if self.slates is None else self.slates


@dataclass(frozen=True)
class GenerateResult:
    transactions: int
    fraud: int
    users: int
    merchants: int
    start: datetime
    end: datetime
    path: Path
    impressions: int = 0  # candidate rows over all slates
    purchased: int = 0  # of which the user paid the merchant within the horizon


@dataclass(frozen=True)
class _Population:
    """Per-user and per-merchant traits shared by every day."""

    rate: np.ndarray  # expected payments per user per day
    log_mu: np.ndarray  # log of each user's typical amount
    home: np.ndarray  # index into COUNTRIES
    favourites: np.ndarray  # (users, FAVOURITES) merchant ids
    merchant_weights: np.ndarray  # popularity, sums to 1
    risky: np.ndarray  # bool per merchant


def _micros(t: date | datetime) -> int:
    if not isinstance(t, datetime):
        t = datetime(t.year, t.month, t.day, tzinfo=UTC)
    return int(t.timestamp()) * 1_000_000 + t.microsecond


def _population(cfg: GenerateConfig) -> _Population:
    rng = np.random.default_rng([cfg.seed, 0])
    u, m = cfg.n_users, cfg.n_merchants
    per_user_day = cfg.rows / (u * cfg.days)
    popularity = 1.0 / np.arange(1, m + 1) ** 0.8
    popularity = rng.permutation(popularity)
    weights = popularity / popularity.sum()
    return _Population(
        rate=per_user_day * rng.gamma(2.0, 0.5, size=u),
        log_mu=rng.normal(3.3, 0.6, size=u),
        home=rng.integers(0, len(COUNTRIES), size=u),
        favourites=rng.choice(m, size=(u, FAVOURITES), p=weights),
        merchant_weights=weights,
        risky=rng.random(m) < 0.05,
    )


def users_table(cfg: GenerateConfig, pop: _Population) -> pa.Table:
    """The static profile: one row per user, plus a credit-limit change for 5 % of them."""
    rng = np.random.default_rng([cfg.seed, 1])
    u = cfg.n_users
    start_us = _micros(cfg.start_time)
    ids = np.arange(u, dtype=np.int64)
    limit = np.round(rng.choice([500, 1000, 2000, 5000, 10000], size=u) * 1.0, 2)
    kyc = rng.integers(1, 4, size=u)
    updated = start_us - rng.integers(US_PER_DAY, 90 * US_PER_DAY, size=u)
    changed = rng.random(u) < 0.05
    n_changed = int(changed.sum())
    ids = np.concatenate([ids, ids[changed]])
    home = np.concatenate([pop.home, pop.home[changed]])
    kyc = np.concatenate([kyc, kyc[changed]])
    limit = np.concatenate([limit, limit[changed] * 2])
    span = max(1, cfg.days * US_PER_DAY)
    updated = np.concatenate([updated, start_us + rng.integers(0, span, size=n_changed)])
    return pa.table(
        {
            "user_id": pa.array(ids, pa.int64()),
            "home_country": pa.array(COUNTRIES[home]),
            "credit_limit": pa.array(limit, pa.float64()),
            "kyc_level": pa.array(kyc, pa.int64()),
            "updated_at": pa.array(updated, pa.timestamp("us", tz="UTC")),
        }
    )


def merchants_table(cfg: GenerateConfig, pop: _Population) -> pa.Table:
    """Merchant reference data. ``is_risky`` is ground truth for analysis, not a feature."""
    rng = np.random.default_rng([cfg.seed, 2])
    m = cfg.n_merchants
    return pa.table(
        {
            "merchant_id": pa.array(np.arange(m, dtype=np.int64)),
            "category": pa.array(CATEGORIES[rng.integers(0, len(CATEGORIES), size=m)]),
            "country": pa.array(COUNTRIES[rng.integers(0, len(COUNTRIES), size=m)]),
            "is_risky": pa.array(pop.risky),
        }
    )


def _day(cfg: GenerateConfig, pop: _Population, day: date) -> dict[str, np.ndarray]:
    """Draw one UTC day's transactions (unsorted, without ids, not yet clipped to the range)."""
    rng = np.random.default_rng([cfg.seed, 100 + day.toordinal()])
    u, m = cfg.n_users, cfg.n_merchants
    day_start = _micros(day)

    # Ordinary payments.
    counts = rng.poisson(pop.rate)
    user = np.repeat(np.arange(u, dtype=np.int64), counts)
    n = len(user)
    ts = day_start + rng.integers(0, US_PER_DAY, size=n)
    habitual = rng.random(n) < 0.85
    merchant = np.where(
        habitual,
        pop.favourites[user, rng.integers(0, FAVOURITES, size=n)],
        rng.choice(m, size=n, p=pop.merchant_weights),
    )
    amount = np.exp(rng.normal(pop.log_mu[user], 0.5))
    country = np.where(
        rng.random(n) < 0.02, rng.integers(0, len(COUNTRIES), size=n), pop.home[user]
    )
    device = user * 4 + rng.integers(0, 2, size=n)
    pattern = np.full(n, "", dtype=object)

    risky_hit = pop.risky[merchant] & (rng.random(n) < 0.06)
    pattern[risky_hit] = "risky_merchant"
    anomaly = (rng.random(n) < 0.002) & (pattern == "")
    merchant[anomaly] = rng.integers(0, m, size=int(anomaly.sum()))
    amount[anomaly] *= rng.uniform(8, 20, size=int(anomaly.sum()))
    pattern[anomaly] = "new_merchant_high_amount"
    noise = (rng.random(n) < 0.0003) & (pattern == "")
    pattern[noise] = "noise"

    # Account takeover bursts.
    n_ato = rng.poisson(max(1.0, u * 0.0015))
    victims = rng.integers(0, u, size=n_ato)
    burst = rng.integers(3, 9, size=n_ato)
    b_user = np.repeat(victims, burst)
    b_start = np.repeat(
        day_start + rng.integers(0, US_PER_DAY - 15 * 60_000_000, size=n_ato), burst
    )
    k = len(b_user)
    b_ts = b_start + rng.integers(0, 15 * 60_000_000, size=k)
    b_merchant = rng.integers(0, m, size=k)
    b_amount = np.exp(pop.log_mu[b_user]) * rng.uniform(3, 10, size=k)
    b_country = np.where(
        rng.random(k) < 0.7, rng.integers(0, len(COUNTRIES), size=k), pop.home[b_user]
    )
    b_device = 1_000_000_000 + rng.integers(0, 1_000_000_000, size=k)

    user = np.concatenate([user, b_user])
    ts = np.concatenate([ts, b_ts])
    merchant = np.concatenate([merchant, b_merchant]).astype(np.int64)
    amount = np.round(np.concatenate([amount, b_amount]), 2)
    country = np.concatenate([country, b_country])
    device = np.concatenate([device, b_device]).astype(np.int64)
    pattern = np.concatenate([pattern, np.full(k, "ato", dtype=object)])
    is_fraud = pattern != ""

    delay = np.where(
        is_fraud,
        US_PER_HOUR + rng.exponential(3 * US_PER_DAY, size=len(ts)).astype(np.int64),
        rng.integers(US_PER_DAY, 3 * US_PER_DAY, size=len(ts)),
    )
    delay = np.minimum(delay, 30 * US_PER_DAY)
    return {
        "user_id": user,
        "merchant_id": merchant,
        "device_id": device,
        "amount": amount,
        "country": COUNTRIES[country],
        "event_timestamp": ts,
        "is_fraud": is_fraud,
        "fraud_pattern": pattern.astype(str),
        "label_ts": ts + delay,
    }


def _paid_within(
    query: dict[str, np.ndarray], payments: dict[str, np.ndarray], origin: int, horizon: int
) -> np.ndarray:
    """For each (user_id, merchant_id, event_timestamp) of ``query``: did ``payments`` hold a
    payment of that user at that merchant in ``(t, t + horizon]``? Every time is at or after
    ``origin`` and within 2**40 microseconds (12 days) of it."""
    if len(payments["user_id"]) == 0 or len(query["user_id"]) == 0:
        return np.zeros(len(query["user_id"]), dtype=bool)
    span = np.int64(2**40)
    width = np.int64(max(int(payments["merchant_id"].max()), int(query["merchant_id"].max())) + 1)
    pairs, rank = np.unique(
        payments["user_id"] * width + payments["merchant_id"], return_inverse=True
    )
    stamps = np.sort(rank.astype(np.int64) * span + (payments["event_timestamp"] - origin))
    wanted = query["user_id"] * width + query["merchant_id"]
    at = np.minimum(np.searchsorted(pairs, wanted), len(pairs) - 1)
    known = pairs[at] == wanted
    t = at.astype(np.int64) * span + (query["event_timestamp"] - origin)
    nxt = np.minimum(np.searchsorted(stamps, t, side="right"), len(stamps) - 1)
    return known & (stamps[nxt] > t) & (stamps[nxt] <= t + horizon)


def _impressions(
    cfg: GenerateConfig,
    pop: _Population,
    day: date,
    today: dict[str, np.ndarray],
    tomorrow: dict[str, np.ndarray] | None,
    lo: int,
    hi: int,
) -> dict[str, np.ndarray]:
    """One UTC day's slates, in event-time order, labelled from ``today``'s and
    ``tomorrow``'s payments (clipped to the range, as written); without ids."""
    rng = np.random.default_rng([cfg.seed, 3, day.toordinal()])
    u, m, size = cfg.n_users, cfg.n_merchants, cfg.slate_size
    day_start = _micros(day)
    n = rng.poisson(cfg.n_slates / cfg.days)
    platform = (rng.random(n) < 0.4).astype(np.int64)  # index into PLATFORMS: 60 % app
    user = rng.choice(u, size=n, p=pop.rate / pop.rate.sum())
    ts = day_start + rng.integers(0, US_PER_DAY, size=n)
    # shopping intent: the session opens 1 minute to 2 hours before one of the user's payments
    intent = rng.random(n) < np.where(platform == 0, 0.8, 0.1)
    ordinary = np.flatnonzero(today["fraud_pattern"] == "")
    k = int(intent.sum()) if len(ordinary) else 0
    if k:
        anchor = ordinary[rng.integers(0, len(ordinary), size=k)]
        user[intent] = today["user_id"][anchor]
        before = rng.integers(60_000_000, 2 * US_PER_HOUR, size=k)
        ts[intent] = today["event_timestamp"][anchor] - before
    keep = np.flatnonzero((ts >= max(lo, day_start)) & (ts < hi))  # in this day's partition
    keep = keep[np.lexsort((user[keep], ts[keep]))]
    user, ts, platform = user[keep], ts[keep], platform[keep]

    # candidates: 30 % from the user's habitual merchants, the rest by popularity
    habitual = rng.random((len(user), size)) < 0.3
    candidate = np.where(
        habitual,
        pop.favourites[user[:, None], rng.integers(0, FAVOURITES, size=(len(user), size))],
        rng.choice(m, size=(len(user), size), p=pop.merchant_weights),
    ).astype(np.int64)
    earlier = np.tri(size, k=-1, dtype=bool)  # [j, i]: i before j
    repeat = ((candidate[:, :, None] == candidate[:, None, :]) & earlier).any(axis=2)
    position = np.cumsum(~repeat, axis=1) - 1
    shown = ~repeat
    slate = np.repeat(np.arange(len(user), dtype=np.int64), shown.sum(axis=1))
    rows = {
        "slate": slate,
        "position": position[shown].astype(np.int64),
        "user_id": user[slate].astype(np.int64),
        "merchant_id": candidate[shown],
        "platform": PLATFORMS[platform[slate]],
        "event_timestamp": ts[slate],
    }
    payments = [today] if tomorrow is None else [today, tomorrow]
    legit = {
        col: np.concatenate([p[col][~p["is_fraud"]] for p in payments])
        for col in ("user_id", "merchant_id", "event_timestamp")
    }
    horizon = PURCHASE_HORIZON // timedelta(microseconds=1)
    rows["purchased"] = _paid_within(rows, legit, day_start, horizon)
    rows["label_ts"] = rows["event_timestamp"] + horizon
    return rows


def generate(
    cfg: GenerateConfig,
    raw_dir: Path,
    progress: Callable[[int, int, int], None] | None = None,
) -> GenerateResult:
    """Write ``users``, ``merchants``, and day-partitioned ``transactions`` and
    ``impressions`` (empty with ``slates=0``) under ``raw_dir``.

    Replaces whatever was there, so a re-run with the same config gives the same data.
    ``progress(day_done, days_total, rows_so_far)`` is called after each day.
    """
    if cfg.rows <= 0 or cfg.days <= 0:
        raise ValueError("rows and days must be positive")
    cfg = cfg.resolved()
    lo, hi = _micros(cfg.start_time), _micros(cfg.end_time)
    first, last = cfg.start_time.date(), (cfg.end_time - timedelta(microseconds=1)).date()
    n_days = (last - first).days + 1
    pop = _population(cfg)
    if raw_dir.exists():
        shutil.rmtree(raw_dir)
    (raw_dir / "users").mkdir(parents=True)
    (raw_dir / "merchants").mkdir(parents=True)
    pq.write_table(users_table(cfg, pop), raw_dir / "users" / "users.parquet")
    pq.write_table(merchants_table(cfg, pop), raw_dir / "merchants" / "merchants.parquet")

    next_id, fraud = 0, 0
    shown = _Shown(cfg, pop, raw_dir / "impressions", lo, hi)
    for i in range(n_days):
        day = first + timedelta(days=i)
        cols = _day(cfg, pop, day)
        ts = cols["event_timestamp"]
        keep = (ts >= lo) & (ts < hi)
        order = np.flatnonzero(keep)[np.lexsort((cols["user_id"][keep], ts[keep]))]
        cols = {k: v[order] for k, v in cols.items()}
        n = len(order)
        cols["transaction_id"] = np.arange(next_id, next_id + n, dtype=np.int64)
        next_id += n
        fraud += int(cols["is_fraud"].sum())
        table = pa.table({f.name: pa.array(cols[f.name], f.type) for f in TRANSACTION_SCHEMA})
        part = raw_dir / "transactions" / f"date={day.isoformat()}"
        part.mkdir(parents=True)
        pq.write_table(table, part / "part-00000.parquet")
        shown.day(day, cols)
        if progress:
            progress(i + 1, n_days, next_id)
    shown.day(None, None)
    return GenerateResult(
        transactions=next_id,
        fraud=fraud,
        users=cfg.n_users,
        merchants=cfg.n_merchants,
        start=cfg.start_time,
        end=cfg.end_time,
        path=raw_dir,
        impressions=shown.rows,
        purchased=shown.purchased,
    )


class _Shown:
    """Writes each day's impressions once the next day's payments (their labels' horizon)
    are drawn: memory stays bounded by two days."""

    def __init__(self, cfg: GenerateConfig, pop: _Population, path: Path, lo: int, hi: int):
        self.cfg, self.pop, self.path, self.lo, self.hi = cfg, pop, path, lo, hi
        self.pending: tuple[date, dict[str, np.ndarray]] | None = None
        self.next_slate = self.rows = self.purchased = 0

    def day(self, day: date | None, payments: dict[str, np.ndarray] | None) -> None:
        """``day``'s payments are drawn (None: no more days): write the day before's."""
        if self.pending is not None:
            prev, today = self.pending
            rows = _impressions(self.cfg, self.pop, prev, today, payments, self.lo, self.hi)
            n_slates = int(rows["slate"][-1]) + 1 if len(rows["slate"]) else 0
            rows["impression_id"] = rows.pop("slate") + self.next_slate
            self.next_slate += n_slates
            self.rows += len(rows["user_id"])
            self.purchased += int(rows["purchased"].sum())
            # every day is written, empty or not: the declared source is always readable
            table = pa.table({f.name: pa.array(rows[f.name], f.type) for f in IMPRESSION_SCHEMA})
            part = self.path / f"date={prev.isoformat()}"
            part.mkdir(parents=True)
            pq.write_table(table, part / "part-00000.parquet")
        self.pending = None if day is None or payments is None else (day, payments)
