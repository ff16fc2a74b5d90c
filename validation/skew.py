"""Online/offline skew: for sampled entities, the online value must equal the row
``get_historical_features`` gives for the same instant (TTL applied on both sides: an
online value older than its view's TTL counts as missing, as serving treats it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from feast import FeatureStore


@dataclass(frozen=True)
class Mismatch:
    view: str
    feature: str
    entity: dict[str, Any]
    online: Any
    offline: Any

    def __str__(self) -> str:
        where = f"{self.view}.{self.feature} {self.entity}"
        return f"{where}: online {self.online!r} != offline {self.offline!r}"


def _norm(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    return value


def check_skew(
    store: FeatureStore, entities: pd.DataFrame, now: datetime | None = None
) -> tuple[int, list[Mismatch]]:
    """Compare every stored feature for ``entities`` (columns: the join keys). Returns the
    number of values compared and the mismatches."""
    now = now or datetime.now(UTC)
    views = sorted(store.list_feature_views(), key=lambda v: v.name)
    refs = [f"{v.name}:{f.name}" for v in views for f in v.features]
    rows = entities.drop_duplicates().reset_index(drop=True)
    online = store.get_online_features(
        features=refs, entity_rows=rows.to_dict("records"), full_feature_names=True
    ).to_dict(include_event_timestamps=True)
    offline = store.get_historical_features(
        entity_df=rows.assign(event_timestamp=pd.Timestamp(now)),
        features=refs,
        full_feature_names=True,
    ).to_df()
    keys = list(rows.columns)
    offline = rows.merge(offline, on=keys, how="left")
    compared, mismatches = 0, []
    for view in views:
        ttl = view.ttl.total_seconds() if view.ttl else None
        for f in view.features:
            name = f"{view.name}__{f.name}"
            stamps = online.get(f"{name}__ts", [None] * len(rows))
            for i, entity in enumerate(rows.to_dict("records")):
                on = _norm(online[name][i])
                ts = stamps[i]
                if on is not None and ttl and ts and now.timestamp() - ts > ttl:
                    on = None  # expired: serving treats it as missing
                off = _norm(offline[name].iloc[i])
                compared += 1
                if on != off and not (
                    isinstance(on, float) and off is not None and math.isclose(on, off)
                ):
                    mismatches.append(
                        Mismatch(
                            view.name, f.name, {k: _norm(v) for k, v in entity.items()}, on, off
                        )
                    )
    return compared, mismatches
