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
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from feast import FeatureStore
from feast.infra.key_encoding_utils import serialize_entity_key, serialize_entity_key_prefix
from feast.infra.online_stores.helpers import _mmh3
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import feast_value_type_to_python_type
from feast.value_type import ValueType
from google.protobuf.timestamp_pb2 import Timestamp

from serving.resp import RespClient, pack

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
        # one backend per online store tier, each reading its views (see tiered_store)
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.view_names):
            groups.setdefault(_tier_name(store, name), []).append(i)
        self._backends: list[tuple[_Backend, list[int]]] = []
        for tier, members in groups.items():
            plans = [self.views[i] for i in members]
            backend = _backend_for(store, tier, plans, self.project, timeout_s)
            self._backends.append((backend, members))

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


class KeyEncoder:
    """Feast's serialized entity key (``serialize_entity_key``, version 3) for one set of
    join keys, as a constant prefix plus struct-packed values: ~1 µs instead of building
    a protobuf per key. Checked against Feast's own function at construction. The
    streaming and materialization writers use it too, so reads and writes agree."""

    _PACK = {
        ValueType.INT64: lambda v: struct.pack("<IIq", ValueType.INT64.value, 8, v),
        ValueType.INT32: lambda v: struct.pack("<IIi", ValueType.INT32.value, 4, v),
        ValueType.STRING: lambda v: (
            struct.pack("<II", ValueType.STRING.value, len(b := v.encode())) + b
        ),
    }

    def __init__(self, join_keys: tuple[str, ...], types: tuple[ValueType, ...], version: int):
        if version != 3 or any(t not in self._PACK for t in types):
            raise ValueError(
                f"the fast path reads entity keys of version 3 with {list(self._PACK)} values"
            )
        self.join_keys = join_keys
        self.prefix = serialize_entity_key_prefix(list(join_keys), version)
        self.packers = [self._PACK[t] for t in types]
        probe = tuple("7" if t == ValueType.STRING else 7 for t in types)
        proto = EntityKeyProto(
            join_keys=list(join_keys),
            entity_values=[
                ValueProto(**{_KEY_FIELDS[t]: v}) for t, v in zip(types, probe, strict=True)
            ],
        )
        if self.encode_values(probe) != serialize_entity_key(proto, version):
            raise ValueError("Feast's entity key layout changed: the fast path can't read it")

    @classmethod
    def for_view(cls, store: FeatureStore, view: Any) -> KeyEncoder:
        """The encoder of ``view``'s entities, join keys sorted as Feast serializes them."""
        keys = sorted((store.get_entity(e).join_key, store.get_entity(e).value_type)
                      for e in view.entities)  # fmt: skip
        return cls(
            tuple(k for k, _ in keys),
            tuple(t for _, t in keys),
            store.config.entity_key_serialization_version,
        )

    def encode_values(self, values: tuple[Any, ...]) -> bytes:
        return self.prefix + b"".join(p(v) for p, v in zip(self.packers, values, strict=True))

    def encode(self, row: dict[str, Any]) -> bytes:
        if len(self.packers) == 1:
            return self.prefix + self.packers[0](row[self.join_keys[0]])
        return self.encode_values(tuple(map(row.__getitem__, self.join_keys)))


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


def materialized_key(project: str) -> str:
    """The Redis hash where materialization records, per view, the end of the newest
    window it loaded: a store that restarted empty has none, and serving is not ready."""
    return f"hotpath:materialized:{project}"


def _decode(blob: bytes | None) -> Any:
    """ValueProto bytes to the Python value Feast's SDK returns (memoised: counts, flags
    and ratios repeat across entities, and a dict lookup is ~20x cheaper than a parse)."""
    if not blob:
        return None
    try:
        return _DECODED[blob]
    except KeyError:
        pass
    value = ValueProto()
    value.ParseFromString(blob)
    kind = value.WhichOneof("val")
    if kind in _SCALARS:
        out = getattr(value, kind)
    else:
        return feast_value_type_to_python_type(value)  # lists, maps: Feast's own rules
    if len(_DECODED) >= _DECODED_MAX:
        _DECODED.clear()
    _DECODED[blob] = out
    return out


_DECODED: dict[bytes, Any] = {}
_STAMPS: dict[bytes | None, float] = {}
_DECODED_MAX = 200_000


_SCALARS = {
    "int64_val",
    "int32_val",
    "double_val",
    "float_val",
    "string_val",
    "bool_val",
    "bytes_val",
}


Found = list[tuple[float | None, Sequence[Any] | None]]


class _Backend:
    """Reads its views for a batch of entity keys: ``send`` issues the request,
    ``receive`` returns, per view (in plan order) and row, (event time, values in the
    view's feature order) or (None, None) when the entity has no row."""

    def send(self, keys: dict[tuple[str, ...], list[bytes]]) -> Any:
        return keys

    def receive(self, handle: Any) -> list[Found]:
        raise NotImplementedError

    def read(self, keys: dict[tuple[str, ...], list[bytes]]) -> list[Found]:
        return self.receive(self.send(keys))

    def ping(self) -> None:
        """Raise unless the store answers."""

    def unmaterialized(self, views: list[str]) -> list[str]:
        """Those of ``views`` with no materialized data here (unknown: none)."""
        return []


class _Sqlite(_Backend):
    """One ``SELECT ... WHERE entity_key IN (...)`` per view, in one statement, on a shared
    connection."""

    def __init__(self, path: Path, project: str, views: list[ViewPlan]) -> None:
        if not path.exists():
            raise FileNotFoundError(f"online store {path} does not exist")
        self.conn = sqlite3.connect(path, check_same_thread=False)
        self.lock = threading.Lock()  # readers run in worker threads; one at a time
        self.project = project
        self.views = views
        self._sql: dict[int, str] = {}  # query text per batch size

    def ping(self) -> None:
        with self.lock:
            self.conn.execute("SELECT 1").fetchall()

    def unmaterialized(self, views: list[str]) -> list[str]:
        with self.lock:
            return [
                v
                for v in views
                if not self.conn.execute(
                    f'SELECT EXISTS (SELECT 1 FROM "{self.project}_{v}")'
                ).fetchone()[0]
            ]

    def receive(self, keys):
        n = len(next(iter(keys.values())))
        sql = self._sql.get(n)
        if sql is None:
            sql = self._sql[n] = " UNION ALL ".join(
                f"SELECT {i}, entity_key, feature_name, value, event_ts "
                f'FROM "{self.project}_{plan.name}" WHERE entity_key IN ({",".join("?" * n)})'
                for i, plan in enumerate(self.views)
            )
        params = [b for plan in self.views for b in keys[plan.join_keys]]
        found: list[dict[bytes, tuple[float | None, dict[str, Any]]]] = [{} for _ in self.views]
        with self.lock:
            rows = self.conn.execute(sql, params).fetchall()
        for i, key, feature, value, event_ts in rows:
            _, values = found[i].setdefault(key, (_seconds(event_ts), {}))
            values[feature] = _decode(value)
        out = []
        for i, plan in enumerate(self.views):
            per_view: Found = []
            for b in keys[plan.join_keys]:
                hit = found[i].get(b)
                if hit is None:
                    per_view.append((None, None))
                else:
                    per_view.append((hit[0], [hit[1].get(f) for f in plan.features]))
            out.append(per_view)
        return out


class _Redis(_Backend):
    """One round trip: one ``HMGET`` per entity key and row covering every view on that
    key (Feast keeps all of an entity's views in one hash), sent pre-packed on a raw
    socket."""

    def __init__(self, client: RespClient, project: str, views: list[ViewPlan]) -> None:
        self.client = client
        self.project_bytes = project.encode()  # Feast's key: serialized entity key + project
        self.n_views = len(views)
        # per entity key: the views on it (index, feature count), the HMGET header and the
        # packed field list (each view's features, then its ``_ts:<view>``)
        self.groups: list[tuple[tuple[str, ...], list[tuple[int, int]], bytes, bytes]] = []
        by_key: dict[tuple[str, ...], list[int]] = {}
        for i, plan in enumerate(views):
            by_key.setdefault(plan.join_keys, []).append(i)
        for join_keys, members in by_key.items():
            fields = [
                f
                for i in members
                for f in [_mmh3(f"{views[i].name}:{x}") for x in views[i].features]
                + [f"_ts:{views[i].name}".encode()]
            ]
            head = f"*{len(fields) + 2}\r\n$5\r\nHMGET\r\n".encode()
            tail = pack("HMGET", b"", *fields)[len(head) + len(b"$0\r\n\r\n") :]
            spans = [(i, len(views[i].features)) for i in members]
            self.groups.append((join_keys, spans, head, tail))

    def ping(self) -> None:
        self.client.execute(pack("PING"), 1)

    def unmaterialized(self, views: list[str]) -> list[str]:
        key = materialized_key(self.project_bytes.decode())
        (stamps,) = self.client.execute(pack("HMGET", key, *views), 1)
        return [v for v, stamp in zip(views, stamps, strict=True) if not stamp]

    def send(self, keys):
        commands = []
        for join_keys, _, head, tail in self.groups:
            for entity_key in keys[join_keys]:
                key = entity_key + self.project_bytes
                commands.append(b"%s$%d\r\n%s\r\n%s" % (head, len(key), key, tail))
        self.client.send(b"".join(commands))
        return keys, len(commands)

    def receive(self, handle):
        keys, n = handle
        return self._parse(keys, iter(self.client.receive(n)))

    def _parse(self, keys: dict[tuple[str, ...], list[bytes]], replies: Any) -> list[Found]:
        out: list[Found] = [[] for _ in range(self.n_views)]
        for join_keys, spans, _, _ in self.groups:
            for _ in keys[join_keys]:
                raw = next(replies)
                at = 0
                for i, n in spans:
                    values, ts_blob = raw[at : at + n], raw[at + n]
                    at += n + 1
                    if any(values):
                        out[i].append((_stamp(ts_blob), [_decode(v) for v in values]))
                    else:
                        out[i].append((None, None))
        return out


class _RedisCluster(_Redis):
    """Redis Cluster: the same HMGETs through redis-py's cluster pipeline, which sends
    each to the master owning its slot (one round trip per node)."""

    def __init__(self, client: Any, project: str, views: list[ViewPlan]) -> None:
        super().__init__(None, project, views)  # type: ignore[arg-type]
        self.cluster = client
        self.fields = {
            join_keys: _hmget_fields(views, [i for i, _ in spans])
            for join_keys, spans, _, _ in self.groups
        }

    def ping(self) -> None:
        self.cluster.ping()

    def unmaterialized(self, views: list[str]) -> list[str]:
        stamps = self.cluster.hmget(materialized_key(self.project_bytes.decode()), views)
        return [v for v, stamp in zip(views, stamps, strict=True) if not stamp]

    def send(self, keys):
        return keys

    def receive(self, keys):
        pipe = self.cluster.pipeline(transaction=False)
        for join_keys, _, _, _ in self.groups:
            for entity_key in keys[join_keys]:
                pipe.hmget(entity_key + self.project_bytes, self.fields[join_keys])
        return self._parse(keys, iter(pipe.execute()))


class _FeastStore(_Backend):
    """Any other tier (ScyllaDB, Cassandra...): Feast's own ``online_read`` for the tier."""

    def __init__(self, store: FeatureStore, tier: str | None, views: list[ViewPlan]) -> None:
        from serving.tiered_store import TieredOnlineStore

        provider = store._get_provider()
        online = provider.online_store
        self.config = store.config
        if isinstance(online, TieredOnlineStore) and tier is not None:
            self.config = online.tier_config(store.config, tier)
            online = online.tier_store(store.config, tier)
        self.online = online
        self.views = [store.get_feature_view(v.name) for v in views]
        self.plans = views
        self.project = store.project

    def receive(self, keys):
        from feast.infra.key_encoding_utils import deserialize_entity_key

        out = []
        for view, plan in zip(self.views, self.plans, strict=True):
            protos = [deserialize_entity_key(k, 3) for k in keys[plan.join_keys]]
            rows = self.online.online_read(self.config, view, protos, list(plan.features))
            per_view: Found = []
            for ts, values in rows:
                if values is None:
                    per_view.append((None, None))
                    continue
                stamp = _seconds(ts)
                per_view.append(
                    (
                        stamp,
                        [
                            _decode(values[f].SerializeToString()) if f in values else None
                            for f in plan.features
                        ],
                    )
                )
            out.append(per_view)
        return out


def _hmget_fields(views: list[ViewPlan], members: list[int]) -> list[bytes]:
    return [
        f
        for i in members
        for f in [_mmh3(f"{views[i].name}:{x}") for x in views[i].features]
        + [f"_ts:{views[i].name}".encode()]
    ]


def _tier_name(store: FeatureStore, view: str) -> str | None:
    from serving.tiered_store import TYPE, tier_of

    cfg = store.config.online_store
    if cfg.type != TYPE:
        return None
    return tier_of(store.get_feature_view(view), cfg.routing_tag)


def _backend_for(
    store: FeatureStore, tier: str | None, views: list[ViewPlan], project: str, timeout_s: float
) -> _Backend:
    """The fastest reader for a tier's store config: raw Redis, Redis Cluster, SQLite, or
    Feast's own read for anything else."""
    from serving.tiered_store import TYPE

    cfg = store.config.online_store
    if cfg.type == TYPE:
        if tier not in cfg.tiers:
            raise ValueError(f"no online store tier {tier!r} (configured: {sorted(cfg.tiers)})")
        tier_cfg = dict(cfg.tiers[tier])
        kind = tier_cfg.get("type")
    else:
        tier_cfg, kind = {}, cfg.type
    if kind == "sqlite":
        path = Path(tier_cfg.get("path") or cfg.path)
        if not path.is_absolute():
            path = Path(store.repo_path) / path
        return _Sqlite(path, project, views)
    if kind == "redis":
        from feast.infra.online_stores.redis import RedisOnlineStoreConfig

        rcfg = RedisOnlineStoreConfig(**tier_cfg) if tier_cfg else cfg
        if rcfg.redis_type == "redis_cluster":
            from feast.infra.online_stores.redis import RedisOnlineStore

            return _RedisCluster(RedisOnlineStore()._get_client(rcfg), project, views)
        if rcfg.redis_type != "redis":
            return _FeastStore(store, tier, views)
        return _Redis(RespClient.from_feast(rcfg.connection_string, timeout_s), project, views)
    return _FeastStore(store, tier, views)


def _stamp(blob: bytes | None) -> float:
    """A serialized protobuf Timestamp (Feast's ``_ts:<view>`` field) in epoch seconds
    (memoised like values: a daily snapshot stamps every entity alike)."""
    try:
        return _STAMPS[blob]
    except KeyError:
        pass
    stamp = Timestamp()
    if blob:
        stamp.ParseFromString(blob)
    out = stamp.seconds + stamp.nanos / 1e9
    if len(_STAMPS) >= _DECODED_MAX:
        _STAMPS.clear()
    _STAMPS[blob] = out
    return out


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC).timestamp()
