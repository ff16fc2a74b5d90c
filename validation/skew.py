"""Online/offline skew: for sampled entities, the online value must equal the row
``get_historical_features`` gives for the same instant (TTL applied on both sides: an
online value older than its view's TTL counts as missing, as serving treats it).

Two sources of "online": the store now (:func:`check_skew`), or the vectors the service
actually served, from its served-vector log, each against the offline row at the instant it
was read (:func:`check_served_skew`): what training would have seen for that request."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from feast import FeatureStore
from feast.feature_logging import LOG_TIMESTAMP_FIELD

from online_store.layout import KeyEncoder
from online_store.point_in_time import historical_features
from online_store.read import ViewPlan, readers
from online_store.tiles import view_plan, zero_when_empty
from serving.model_repository import load_metadata
from serving.served_log import served_requests
from validation.declared import ValidationError


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
    number of values compared and the mismatches. A request-time view (its windows end at
    the request) is read as serving reads it, evaluated at ``now``; Feast's SDK would give
    its last-event row."""
    now = now or datetime.now(UTC)
    views = sorted(store.list_feature_views(), key=lambda v: v.name)
    refs = [f"{v.name}:{f.name}" for v in views for f in v.features]
    rows = entities.drop_duplicates().reset_index(drop=True)
    online = store.get_online_features(
        features=refs, entity_rows=rows.to_dict("records"), full_feature_names=True
    ).to_dict(include_event_timestamps=True)
    at_request = _at_request(store, [v for v in views if view_plan(v)], rows, now)
    empty = _empty_is_zero(store)
    offline = historical_features(
        store, rows.assign(event_timestamp=pd.Timestamp(now)), refs, full_feature_names=True
    )
    keys = list(rows.columns)
    offline = rows.merge(offline, on=keys, how="left")
    compared, mismatches = 0, []
    for view in views:
        ttl = view.ttl.total_seconds() if view.ttl else None
        for f in view.features:
            name = f"{view.name}__{f.name}"
            stamps = online.get(f"{name}__ts", [None] * len(rows))
            for i, entity in enumerate(rows.to_dict("records")):
                if name in at_request:
                    on = _norm(at_request[name][i])
                else:
                    on = _norm(online[name][i])
                    ts = stamps[i]
                    if on is not None and ttl and ts and now.timestamp() - ts > ttl:
                        on = None  # expired: serving treats it as missing
                off = _norm(offline[name].iloc[i])
                if off is None and name in empty:
                    off = 0  # no row within the TTL: an empty request-time window
                compared += 1
                if _differ(on, off):
                    mismatches.append(
                        Mismatch(
                            view.name, f.name, {k: _norm(v) for k, v in entity.items()}, on, off
                        )
                    )
    return compared, mismatches


def _at_request(
    store: FeatureStore, views: list[Any], rows: pd.DataFrame, now: datetime
) -> dict[str, list[Any]]:
    """``{view}__{feature}`` -> per row, the value serving's readers answer at ``now``."""
    plans = [ViewPlan.of(store, v, [f.name for f in v.features]) for v in views]
    version = store.config.entity_key_serialization_version
    records = rows.to_dict("records")
    out: dict[str, list[Any]] = {}
    for reader, members in readers(store, plans):
        keys: dict[tuple[str, ...], list[bytes]] = {}
        for i in members:
            plan = plans[i]
            encoder = KeyEncoder(plan.join_keys, plan.key_types, version)
            keys.setdefault(plan.join_keys, [encoder.encode(r) for r in records])
        found = reader.read(keys, round(now.timestamp() * 1e6))
        for i, per_row in zip(members, found, strict=True):
            for j, feature in enumerate(plans[i].features):
                out[f"{plans[i].name}__{feature}"] = [
                    None if values is None else values[j] for _, values in per_row
                ]
    return out


def _empty_is_zero(store: FeatureStore) -> set[str]:
    """``{view}__{feature}`` of what is 0, not missing, when its window is empty
    (``online_store.tiles.zero_when_empty``)."""
    return {
        f"{view.name}__{name}"
        for view in store.list_feature_views()
        for name in zero_when_empty(view)
    }


def _differ(on: Any, off: Any) -> bool:
    return on != off and not (isinstance(on, float) and off is not None and math.isclose(on, off))


ROW = "served_row"  # the served row each offline row answers (Feast may reorder them)


def check_served_skew(
    store: FeatureStore, model_repository: Path, model: str, log_dir: Path, sample: int = 1000
) -> tuple[int, list[Mismatch]]:
    """The newest ``sample`` vectors ``model`` was served (its latest version's
    FeatureService's log under ``log_dir``, every logged version) vs
    ``get_historical_features`` at the instant each was read. Stored
    features only (an on-demand value is computed from them and the request). Returns the
    number of values compared and the mismatches (entity: the request's columns and the
    instant)."""
    folder = log_dir / load_metadata(model_repository, model).feature_service
    served = served_requests(folder, model, sample)
    if served.empty:
        raise ValidationError(f"no served vectors of {model} logged under {folder}")
    views = {v.name for v in store.list_feature_views()}
    logged = [c for c in served.columns if c.split("__", 1)[0] in views and "__" in c]
    request = [c for c in served.columns if "__" not in c]
    entity_df = served[request].assign(
        event_timestamp=pd.to_datetime(served[LOG_TIMESTAMP_FIELD], utc=True)
    )
    offline = historical_features(
        store,
        entity_df.assign(**{ROW: range(len(served))}),
        [c.replace("__", ":", 1) for c in logged],
        full_feature_names=True,
    )
    offline = offline.set_index(ROW).sort_index()
    empty = _empty_is_zero(store)
    compared, mismatches = 0, []
    for i, row in enumerate(served.to_dict("records")):
        entity = {k: _norm(row[k]) for k in request} | {"at": str(entity_df.event_timestamp[i])}
        for column in logged:
            on, off = _norm(row[column]), _norm(offline[column].iloc[i])
            if off is None and column in empty:
                off = 0  # no row within the TTL: an empty request-time window
            compared += 1
            if _differ(on, off):
                view, feature = column.split("__", 1)
                mismatches.append(Mismatch(view, feature, entity, on, off))
    return compared, mismatches
