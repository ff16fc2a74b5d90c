"""The serving fast path: a FeatureService's vector straight from Feast's online layout.

Feast stays the writer and the source of definitions; this reads what Feast wrote through
the readers of :mod:`online_store.read` (the one owner of Feast's layout), with everything
resolvable precomputed at start-up: one query per view on SQLite, one pipelined round trip
for all views on Redis. On-demand features run the view's own ``python``-mode function, so
values equal ``FeatureStore.get_online_features``.

Feast returns whatever was materialized, however old; :meth:`OnlineFeatures.read` does the
same (for parity), and :func:`served` applies each view's TTL: an expired value is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from feast import FeatureStore

from online_store.layout import KeyEncoder
from online_store.read import Found, Reader, ViewPlan, readers


@dataclass(frozen=True)
class OnDemandPlan:
    name: str
    udf: Callable[[dict[str, Any]], dict[str, Any]]
    outputs: tuple[str, ...]


@dataclass
class Vector:
    """Feature values of one entity row; ``ts`` holds each stored value's event time."""

    values: dict[str, Any]
    ts: dict[str, float | None]


class OnlineFeatures:
    """Reads one FeatureService for entity rows, from SQLite or Redis, as Feast would."""

    def __init__(self, store: FeatureStore, service: str, timeout_s: float = 1.0) -> None:
        fs = store.get_feature_service(service)
        self.project = store.project
        self.version = store.config.entity_key_serialization_version
        entities = {e.name: e for e in store.list_entities()}
        odfvs = {v.name: v for v in store.list_on_demand_feature_views()}
        self.views: list[ViewPlan] = []
        self.on_demand: list[OnDemandPlan] = []
        for proj in fs.feature_view_projections:
            names = tuple(f.name for f in proj.features)
            if proj.name in odfvs:
                odfv = odfvs[proj.name]
                self.on_demand.append(
                    OnDemandPlan(proj.name, odfv.feature_transformation.udf, names)
                )
                continue
            view = store.get_feature_view(proj.name)
            keys = sorted(
                ((entities[e].join_key, entities[e].value_type) for e in view.entities),
                key=lambda kv: kv[0],
            )
            self.views.append(
                ViewPlan(
                    view.name,
                    tuple(k for k, _ in keys),
                    tuple(t for _, t in keys),
                    names,
                    view.ttl.total_seconds() if view.ttl else None,
                )
            )
        self._ttls = {n: v.ttl_s for v in self.views for n in v.features}
        self.view_names = [v.name for v in self.views]
        # distinct entity keys (views on the same join keys share one serialized key)
        self._encoders = {
            v.join_keys: KeyEncoder(v.join_keys, v.key_types, self.version) for v in self.views
        }
        self.feature_names = [n for v in self.views for n in v.features] + [
            n for o in self.on_demand for n in o.outputs
        ]
        # one reader per online store tier, each reading its views (see online_store.tiers)
        self._backends: list[tuple[Reader, list[int]]] = readers(store, self.views, timeout_s)

    def entity_keys(self, rows: Sequence[dict[str, Any]]) -> dict[tuple[str, ...], list[bytes]]:
        """Feast's serialized entity key of every row, per distinct set of join keys."""
        return {jk: [enc.encode(row) for row in rows] for jk, enc in self._encoders.items()}

    def read(self, rows: Sequence[dict[str, Any]]) -> list[Vector]:
        """Stored and on-demand values for each row (``row`` holds join keys and request
        fields); no TTL applied, like Feast."""
        keys = self.entity_keys(rows)
        # every tier's request goes out before any answer is awaited: one round trip each,
        # concurrently
        pending = [(backend.send(keys), backend, members) for backend, members in self._backends]
        stored: list[Found] = [[] for _ in self.views]
        for handle, backend, members in pending:
            for i, found in zip(members, backend.receive(handle), strict=True):
                stored[i] = found
        vectors = []
        for i in range(len(rows)):
            values: dict[str, Any] = {}
            ts: dict[str, float | None] = {}
            for plan, found in zip(self.views, stored, strict=True):
                stamp, feature_values = found[i]
                if feature_values is None:
                    values.update(dict.fromkeys(plan.features))
                    ts.update(dict.fromkeys(plan.features))
                else:
                    values.update(zip(plan.features, feature_values, strict=True))
                    ts.update(dict.fromkeys(plan.features, stamp))
            vectors.append(Vector(values, ts))
        for od in self.on_demand:
            if len(rows) == 1:
                inputs = {k: [v] for k, v in (rows[0] | vectors[0].values).items()}
            else:
                inputs = {}
                for vec, row in zip(vectors, rows, strict=True):
                    for k, v in (row | vec.values).items():
                        inputs.setdefault(k, []).append(v)
            out = od.udf(inputs)
            for i, vec in enumerate(vectors):
                for name in od.outputs:
                    vec.values[name] = out[name][i]
                    vec.ts[name] = None
        return vectors

    def ttl_of(self) -> dict[str, float | None]:
        """Each stored feature's view TTL in seconds (computed once, at start-up)."""
        return self._ttls

    def ping(self) -> None:
        """Raise unless every tier answers (its own cheapest call)."""
        for backend, _ in self._backends:
            backend.ping()

    def unmaterialized(self) -> list[str]:
        """The views whose tier holds no materialized data for them (e.g. a Redis that
        restarted empty): serving them would answer on defaults."""
        out = []
        for backend, members in self._backends:
            out += backend.unmaterialized([self.views[i].name for i in members])
        return out


def served(vector: Vector, ttls: dict[str, float | None], now: float | None = None) -> set[str]:
    """Blank every value older than its view's TTL (point-in-time: stale is missing).
    Returns the names blanked."""
    now = time.time() if now is None else now
    expired = set()
    for name, ttl in ttls.items():
        ts = vector.ts.get(name)
        if ttl and ts is not None and now - ts > ttl and vector.values.get(name) is not None:
            vector.values[name] = None
            expired.add(name)
    return expired
