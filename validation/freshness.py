"""Freshness: how old is the newest value of each feature view in the online store?

Reads the online store's own layout (Feast's): SQLite keeps ``event_ts`` per row of the
view's table; Redis keeps a ``_ts:<view>`` timestamp in each entity's hash (scanned up to
``max_keys`` keys, enough to find the newest write of a live store).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from feast import FeatureStore

from validation.declared import ValidationError, load


@dataclass(frozen=True)
class Freshness:
    view: str
    freshness_class: str | None
    newest: datetime | None
    age: timedelta | None
    max_staleness: timedelta | None

    @property
    def ok(self) -> bool:
        if self.max_staleness is None:
            return True
        return self.age is not None and self.age <= self.max_staleness


def _sqlite_newest(store: FeatureStore, views: list[str]) -> dict[str, datetime | None]:
    path = Path(store.config.online_store.path)
    if not path.is_absolute():
        path = Path(store.repo_path) / path
    if not path.exists():
        raise ValidationError(f"online store {path} does not exist (run `hotpath materialize`)")
    db = sqlite3.connect(path)
    out: dict[str, datetime | None] = {}
    for view in views:
        try:
            (value,) = db.execute(f'SELECT MAX(event_ts) FROM "{store.project}_{view}"').fetchone()
        except sqlite3.OperationalError:
            value = None
        if value is None:
            out[view] = None
        elif isinstance(value, int | float):
            out[view] = datetime.fromtimestamp(value, UTC)
        else:
            out[view] = datetime.fromisoformat(str(value)).replace(tzinfo=UTC)
    return out


def _redis_newest(
    store: FeatureStore, views: list[str], max_keys: int
) -> dict[str, datetime | None]:
    from feast.infra.online_stores.redis import RedisOnlineStore
    from google.protobuf.timestamp_pb2 import Timestamp

    client = RedisOnlineStore()._get_client(store.config.online_store)
    fields = [f"_ts:{v}" for v in views]
    newest: dict[str, float] = {}
    keys = []
    for i, key in enumerate(client.scan_iter(count=1000)):
        if i >= max_keys:
            break
        keys.append(key)
    for start in range(0, len(keys), 500):
        pipe = client.pipeline(transaction=False)
        for key in keys[start : start + 500]:
            pipe.hmget(key, fields)
        for values in pipe.execute():
            for view, raw in zip(views, values, strict=True):
                if raw:
                    ts = Timestamp()
                    ts.ParseFromString(raw)
                    seconds = ts.seconds + ts.nanos / 1e9
                    newest[view] = max(newest.get(view, 0.0), seconds)
    return {v: datetime.fromtimestamp(newest[v], UTC) if v in newest else None for v in views}


def check_freshness(
    store: FeatureStore, repo: Path, now: datetime | None = None, max_keys: int = 200_000
) -> list[Freshness]:
    """Each feature view's newest online value against its allowed staleness."""
    now = now or datetime.now(UTC)
    declared = load(repo)
    views = sorted(store.list_feature_views(), key=lambda v: v.name)
    names = [v.name for v in views]
    kind = store.config.online_store.type
    if kind == "sqlite":
        newest = _sqlite_newest(store, names)
    elif kind == "redis":
        newest = _redis_newest(store, names, max_keys)
    else:
        raise ValidationError(f"freshness check does not know the {kind!r} online store")
    out = []
    for view in views:
        cls = view.tags.get("freshness")
        ts = newest.get(view.name)
        out.append(
            Freshness(
                view.name, cls, ts, (now - ts) if ts else None, declared.staleness(view.name, cls)
            )
        )
    return out
