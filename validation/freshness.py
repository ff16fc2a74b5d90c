"""Freshness: how old is the newest value of each feature view in the online store?

The newest stored event time of each view comes from the store holding it, read in
Feast's layout by :func:`online_store.read.newest_event_times` (per tier on a tiered
store: Redis or Redis Cluster and SQLite); this module holds the policy: each view's
allowed staleness, by its ``freshness`` class or its own declaration.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from feast import FeatureStore

from online_store.read import StoreMissing, newest_event_times
from online_store.tiers import UnknownTierError
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


def check_freshness(
    store: FeatureStore, repo: Path, now: datetime | None = None, max_keys: int = 200_000
) -> list[Freshness]:
    """Each feature view's newest online value against its allowed staleness."""
    now = now or datetime.now(UTC)
    declared = load(repo)
    views = sorted(store.list_feature_views(), key=lambda v: v.name)
    names = [v.name for v in views]
    try:
        newest = newest_event_times(store, names, max_keys)
    except (StoreMissing, UnknownTierError) as e:
        raise ValidationError(str(e)) from None
    except NotImplementedError as e:
        raise ValidationError(f"freshness check does not know {e}") from None
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
