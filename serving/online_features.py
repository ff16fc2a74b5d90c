"""The serving fast path: a FeatureService's vector straight from Feast's online layout.

Feast stays the writer and the source of definitions; this reads what Feast wrote (SQLite
rows keyed by the serialized entity key, or Redis hashes keyed by it with murmur3 field
names) with everything resolvable precomputed at start-up: one query per view on SQLite,
one pipelined round trip for all views on Redis. On-demand features run the view's own
``python``-mode function, so values equal ``FeatureStore.get_online_features``.

Feast returns whatever was materialized, however old; :meth:`OnlineFeatures.read` does the
same (for parity), and :func:`served` applies each view's TTL: an expired value is missing.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from feast import FeatureStore
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import feast_value_type_to_python_type
from feast.value_type import ValueType
from google.protobuf.timestamp_pb2 import Timestamp

_KEY_FIELDS = {
    ValueType.INT64: "int64_val",
    ValueType.INT32: "int32_val",
    ValueType.STRING: "string_val",
}


@dataclass(frozen=True)
class ViewPlan:
    name: str
    join_keys: tuple[str, ...]
    key_types: tuple[ValueType, ...]
    features: tuple[str, ...]
    ttl_s: float | None


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

    def __init__(self, store: FeatureStore, service: str) -> None:
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
        self.feature_names = [n for v in self.views for n in v.features] + [
            n for o in self.on_demand for n in o.outputs
        ]
        cfg = store.config.online_store
        if cfg.type == "sqlite":
            path = Path(cfg.path)
            if not path.is_absolute():
                path = Path(store.repo_path) / path
            self._backend: _Backend = _Sqlite(path, self.project)
        elif cfg.type == "redis":
            from feast.infra.online_stores.redis import RedisOnlineStore

            client = RedisOnlineStore()._get_client(cfg)
            self._backend = _Redis(client, self.project)
        else:
            raise ValueError(f"the fast path does not read the {cfg.type!r} online store")

    def entity_key(self, plan: ViewPlan, row: dict[str, Any]) -> bytes:
        """Feast's serialized entity key for ``row`` in ``plan``'s view (cached: hot
        entities repeat)."""
        values = tuple(map(row.__getitem__, plan.join_keys))
        return _serialized_key(plan.join_keys, plan.key_types, values, self.version)

    def read(self, rows: Sequence[dict[str, Any]]) -> list[Vector]:
        """Stored and on-demand values for each row (``row`` holds join keys and request
        fields); no TTL applied, like Feast."""
        keys = [(plan, [self.entity_key(plan, row) for row in rows]) for plan in self.views]
        stored = self._backend.read(keys, self.version)
        vectors = []
        for i in range(len(rows)):
            values: dict[str, Any] = {}
            ts: dict[str, float | None] = {}
            for plan, found in zip(self.views, stored, strict=True):
                stamp, feature_values = found[i]
                for name in plan.features:
                    values[name] = feature_values.get(name) if feature_values else None
                    ts[name] = stamp
            vectors.append(Vector(values, ts))
        for od in self.on_demand:
            inputs: dict[str, list[Any]] = {}
            for vec, row in zip(vectors, rows, strict=True):
                merged = {**row, **vec.values}
                for k, v in merged.items():
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


@lru_cache(maxsize=65_536)
def _serialized_key(
    join_keys: tuple[str, ...], types: tuple[ValueType, ...], values: tuple[Any, ...], version: int
) -> bytes:
    proto = EntityKeyProto(
        join_keys=list(join_keys),
        entity_values=[
            ValueProto(**{_KEY_FIELDS[t]: v}) for t, v in zip(types, values, strict=True)
        ],
    )
    return serialize_entity_key(proto, entity_key_serialization_version=version)


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


def _decode(blob: bytes | None) -> Any:
    """ValueProto bytes to the Python value Feast's SDK returns."""
    if not blob:
        return None
    value = ValueProto()
    value.ParseFromString(blob)
    kind = value.WhichOneof("val")
    if kind in _SCALARS:
        return getattr(value, kind)
    return feast_value_type_to_python_type(value)  # lists, maps, timestamps: Feast's own rules


_SCALARS = {
    "int64_val",
    "int32_val",
    "double_val",
    "float_val",
    "string_val",
    "bool_val",
    "bytes_val",
}


class _Backend:
    def read(
        self, keys: list[tuple[ViewPlan, list[bytes]]], version: int
    ) -> list[list[tuple[float | None, dict[str, Any] | None]]]:
        raise NotImplementedError


class _Sqlite(_Backend):
    """One ``SELECT ... WHERE entity_key IN (...)`` per view on a shared connection."""

    def __init__(self, path: Path, project: str) -> None:
        if not path.exists():
            raise FileNotFoundError(f"online store {path} does not exist")
        self.conn = sqlite3.connect(path, check_same_thread=False)
        self.lock = threading.Lock()  # readers run in worker threads; one at a time
        self.project = project
        self._sql: dict[tuple[int, ...], str] = {}  # query text per batch shape

    def read(self, keys, version):
        sizes = tuple(len(blobs) for _, blobs in keys)
        sql = self._sql.get(sizes)
        if sql is None:
            sql = self._sql[sizes] = " UNION ALL ".join(
                f"SELECT {i}, entity_key, feature_name, value, event_ts "
                f'FROM "{self.project}_{plan.name}" WHERE entity_key IN ({",".join("?" * n)})'
                for i, ((plan, _), n) in enumerate(zip(keys, sizes, strict=True))
            )
        params = [b for _, blobs in keys for b in blobs]
        found: list[dict[bytes, tuple[float | None, dict[str, Any]]]] = [{} for _ in keys]
        with self.lock:
            rows = self.conn.execute(sql, params).fetchall()
        for i, key, feature, value, event_ts in rows:
            _, values = found[i].setdefault(key, (_seconds(event_ts), {}))
            values[feature] = _decode(value)
        return [[found[i].get(b, (None, None)) for b in blobs] for i, (_, blobs) in enumerate(keys)]


class _Redis(_Backend):
    """One pipelined round trip: ``HMGET`` per (view, entity)."""

    def __init__(self, client: Any, project: str) -> None:
        self.client = client
        self.project_bytes = project.encode()  # Feast's key: serialized entity key + project
        self._fields: dict[str, list[bytes]] = {}

    def _hset_keys(self, plan: ViewPlan) -> list[bytes]:
        if plan.name not in self._fields:
            self._fields[plan.name] = [_mmh3(f"{plan.name}:{f}") for f in plan.features] + [
                f"_ts:{plan.name}".encode()
            ]
        return self._fields[plan.name]

    def read(self, keys, version):
        pipe = self.client.pipeline(transaction=False)
        for plan, entity_keys in keys:
            fields = self._hset_keys(plan)
            for k in entity_keys:
                pipe.hmget(k + self.project_bytes, fields)
        replies = iter(pipe.execute())
        out = []
        for plan, entity_keys in keys:
            per_view = []
            for _ in entity_keys:
                raw = next(replies)
                *values, ts_blob = raw
                if not any(values):
                    per_view.append((None, None))
                    continue
                stamp = Timestamp()
                if ts_blob:
                    stamp.ParseFromString(ts_blob)
                per_view.append(
                    (
                        stamp.seconds + stamp.nanos / 1e9,
                        {f: _decode(v) for f, v in zip(plan.features, values, strict=True)},
                    )
                )
            out.append(per_view)
        return out


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC).timestamp()
