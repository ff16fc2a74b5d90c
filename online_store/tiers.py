"""Which online store holds a feature view, and the tiered store that routes by it.

A view tagged ``online_store: redis`` lives in the ``redis`` tier, ``online_store: scylla``
in the ``scylla`` tier, and so on; every tier is one of Feast's own stores (Redis or
Redis Cluster, ScyllaDB/Cassandra, SQLite), configured under ``tiers`` exactly as it
would be on its own. Feast's ``HybridOnlineStore`` routes by tag too, but it names a
tier by its store class (so SQLite can't stand in for the ScyllaDB tier), mutates the
shared repo config per call, and hands every tier every table on ``apply``.

:func:`placement` answers "which store holds this view" for every reader and writer, on a
tiered store or a single one. :class:`TieredOnlineStore` is referenced from
``feature_store.*.yaml`` by class path (Feast's rule: the class name ends in
``OnlineStore`` and its config class, ``<Name>Config``, sits beside it)::

    online_store:
      type: online_store.tiers.TieredOnlineStore
      tiers:
        redis: {type: redis, redis_type: redis_cluster, connection_string: "..."}
        scylla: {type: scylladb, hosts: [...], keyspace: feast}

For Redis tiers the store also sets each entity key's expiry to the newest event time
plus the longest TTL of the views stored in it, so expired values leave memory; hotpath's
own writers do the same (:attr:`Placement.expires`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from feast import Entity, FeatureStore, FeatureView, RepoConfig
from feast.infra.online_stores.helpers import get_online_store_from_config
from feast.infra.online_stores.online_store import OnlineStore
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import FeastConfigBaseModel, get_online_config_from_type
from feast.utils import make_tzaware
from pydantic import StrictStr

from online_store.layout import expire_at, expire_commands

ROUTING_TAG = "online_store"
TYPE = "online_store.tiers.TieredOnlineStore"


class TieredOnlineStoreConfig(FeastConfigBaseModel):
    type: Literal["online_store.tiers.TieredOnlineStore"] = TYPE
    routing_tag: StrictStr = ROUTING_TAG
    tiers: dict[str, dict[str, Any]]  # tier name -> that store's own config (with its type)


class UnknownTierError(ValueError):
    """A view's tag names no configured tier, or it has no tag on a tiered store."""


# ------------------------------------------------------------------ resolution


def tier_of(view: Any, routing_tag: str = ROUTING_TAG) -> str | None:
    """The tier ``view``'s tag names (None: untagged)."""
    return view.tags.get(routing_tag)


def is_tiered(online_config: Any) -> bool:
    return online_config.type == TYPE


class UnsetVariableError(ValueError):
    """A tier's setting names an environment variable that is not set."""


_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
CREDENTIALS = ("username", "password")


def _resolved(conf: dict[str, Any]) -> dict[str, Any]:
    """``conf`` with the ``${VAR}`` Feast's substitution left as written (it keeps an unset
    variable's placeholder): an unset or empty credential is no credential, never the
    placeholder sent as one; any other unset value, or one credential without the other,
    is a one-line error naming the variable."""
    out = dict(conf)
    for key, value in conf.items():
        unset = [m[1] for v in (value if isinstance(value, list) else [value])
                 if isinstance(v, str) for m in _PLACEHOLDER.finditer(v)]  # fmt: skip
        if unset and key in CREDENTIALS:
            out[key] = None
        elif unset:
            raise UnsetVariableError(f"{conf['type']} store {key}: ${{{unset[0]}}} is not set")
    for key in CREDENTIALS:
        if out.get(key) == "":  # set to nothing: no credential either
            out[key] = None
    given = [k for k in CREDENTIALS if out.get(k) is not None]
    if len(given) == 1:
        missing = next(k for k in CREDENTIALS if k not in given)
        why = f": {conf[missing]} is not set" if conf.get(missing) else ""
        raise UnsetVariableError(
            f"{conf['type']} store: {given[0]} given without {missing}{why} (give both or neither)"
        )
    return out


def store_config(conf: dict[str, Any]) -> Any:
    """One tier's Feast config object from its ``tiers`` entry (unset variables resolved
    by :func:`_resolved`)."""
    return get_online_config_from_type(conf["type"])(**_resolved(conf))


def tier_configs(online_config: Any) -> dict[str, Any]:
    """The online store's tiers by name (one, ``online``, unless the store is tiered)."""
    if not is_tiered(online_config):
        return {"online": online_config}
    return {name: store_config(dict(conf)) for name, conf in online_config.tiers.items()}


def tier_name(online_config: Any, view: Any) -> str:
    """The configured tier holding ``view`` on a tiered store (raises if none does)."""
    tag = online_config.routing_tag
    tier = tier_of(view, tag)
    if tier is None:
        raise UnknownTierError(f"feature view {view.name} has no {tag!r} tag")
    if tier not in online_config.tiers:
        raise UnknownTierError(
            f"feature view {view.name}: {tag} tag {tier!r} names no tier of this profile's "
            f"online store (tiers: {', '.join(sorted(online_config.tiers))})"
        )
    return tier


@dataclass(frozen=True)
class Placement:
    """Where a feature view's online rows live."""

    tier: str | None  # None: the store is not tiered
    config: Any  # Feast's config of the store holding the view (the tier's, when tiered)

    @property
    def kind(self) -> str:
        """Feast's store type: ``redis``, ``sqlite``, ``scylladb``..."""
        return self.config.type

    @property
    def expires(self) -> bool:
        """Whether writers set key expiry (the tiered store does, in its Redis tiers)."""
        return self.tier is not None


def placement(store: FeatureStore, view: Any) -> Placement:
    """The store holding ``view`` (a view or its name): its tier on a tiered store, the
    profile's store otherwise."""
    cfg = store.config.online_store
    if not is_tiered(cfg):
        return Placement(None, cfg)
    if isinstance(view, str):
        view = store.get_feature_view(view)
    tier = tier_name(cfg, view)
    return Placement(tier, store_config(dict(cfg.tiers[tier])))


# ------------------------------------------------------------------ Feast's own store objects


def feast_store(store: FeatureStore, tier: str | None = None) -> tuple[RepoConfig, OnlineStore]:
    """Feast's online store object for ``store`` (``tier``'s, when given on a tiered
    store) and the repo config to call it with."""
    online = store._get_provider().online_store
    if isinstance(online, TieredOnlineStore) and tier is not None:
        return online.tier_config(store.config, tier), online.tier_store(store.config, tier)
    return store.config, online


def feast_write(store: FeatureStore, view: FeatureView, data: list[tuple[Any, ...]]) -> None:
    """Write rows through Feast's own ``online_write_batch`` (the store routes tiers)."""
    store._get_provider().online_write_batch(store.config, view, data, progress=None)


# ------------------------------------------------------------------ the tiered store


class TieredOnlineStore(OnlineStore):
    def __init__(self) -> None:
        self._stores: dict[str, tuple[RepoConfig, OnlineStore]] = {}

    # ------------------------------------------------------------------ routing
    def tier_config(self, config: RepoConfig, tier: str) -> RepoConfig:
        """``config`` with ``tier``'s store as its online store (built once per tier)."""
        return self._tier(config, tier)[0]

    def tier_store(self, config: RepoConfig, tier: str) -> OnlineStore:
        return self._tier(config, tier)[1]

    def _tier(self, config: RepoConfig, tier: str) -> tuple[RepoConfig, OnlineStore]:
        if tier not in self._stores:
            tiers = config.online_store.tiers
            if tier not in tiers:
                raise UnknownTierError(
                    f"no online store tier {tier!r} (configured: {', '.join(sorted(tiers))})"
                )
            tier_cfg = store_config(dict(tiers[tier]))
            sub = config.model_copy()
            sub.online_config = tier_cfg
            sub._online_store = tier_cfg
            store = get_online_store_from_config(tier_cfg)
            if getattr(tier_cfg, "keyspace", None) and hasattr(store, "_keyspace"):
                # Feast 0.67's Cassandra/ScyllaDB store names tables with its class default
                # keyspace until its first connection: a first read would miss the table
                store._keyspace = tier_cfg.keyspace
            self._stores[tier] = (sub, store)
        return self._stores[tier]

    def _route(self, config: RepoConfig, table: FeatureView) -> tuple[RepoConfig, OnlineStore]:
        return self._tier(config, tier_name(config.online_store, table))

    # ------------------------------------------------------------------ Feast's interface
    def online_write_batch(
        self,
        config: RepoConfig,
        table: FeatureView,
        data: list[tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]],
        progress: Callable[[int], Any] | None,
    ) -> None:
        sub, store = self._route(config, table)
        store.online_write_batch(sub, table, data, progress)
        if sub.online_store.type == "redis":
            expire_redis_keys(store, sub, table, data)

    def online_read(
        self,
        config: RepoConfig,
        table: FeatureView,
        entity_keys: list[EntityKeyProto],
        requested_features: list[str] | None = None,
    ) -> list[tuple[datetime | None, dict[str, ValueProto] | None]]:
        sub, store = self._route(config, table)
        return store.online_read(sub, table, entity_keys, requested_features)

    def update(
        self,
        config: RepoConfig,
        tables_to_delete: Sequence[FeatureView],
        tables_to_keep: Sequence[FeatureView],
        entities_to_delete: Sequence[Entity],
        entities_to_keep: Sequence[Entity],
        partial: bool,
    ) -> None:
        tag = config.online_store.routing_tag
        for t in [*tables_to_keep, *tables_to_delete]:
            self._route(config, t)  # unknown or missing tags fail before any tier changes
        for tier in config.online_store.tiers:
            sub, store = self._tier(config, tier)
            store.update(
                sub,
                [t for t in tables_to_delete if tier_of(t, tag) == tier],
                [t for t in tables_to_keep if tier_of(t, tag) == tier],
                entities_to_delete,
                entities_to_keep,
                partial,
            )

    def teardown(
        self, config: RepoConfig, tables: Sequence[FeatureView], entities: Sequence[Entity]
    ) -> None:
        tag = config.online_store.routing_tag
        for tier in config.online_store.tiers:
            sub, store = self._tier(config, tier)
            store.teardown(sub, [t for t in tables if tier_of(t, tag) == tier], entities)


def expire_redis_keys(
    store: Any, config: RepoConfig, table: FeatureView, data: Sequence[tuple[Any, ...]]
) -> None:
    """Entity keys expire at their newest event time + the view's TTL, extended (never
    shortened) by later writes and by longer-lived views sharing the key."""
    if not table.ttl or not data:
        return
    from feast.infra.online_stores.redis import _redis_key

    ttl = table.ttl.total_seconds()
    client = store._get_client(config.online_store)  # the tier store's own connection
    pipe = client.pipeline(transaction=False)
    for entity_key, _, ts, _ in data:
        key = _redis_key(config.project, entity_key, config.entity_key_serialization_version)
        # a naive time is UTC, as Feast's write reads it (not this machine's local time)
        at = expire_at(make_tzaware(ts).timestamp(), ttl)
        for command in expire_commands(key, at):
            pipe.execute_command(*command)
    pipe.execute()
