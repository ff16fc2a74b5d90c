"""One Feast online store over several tiers, routed per feature view by its tag.

A view tagged ``online_store: redis`` lives in the ``redis`` tier, ``online_store: scylla``
in the ``scylla`` tier, and so on; every tier is one of Feast's own stores (Redis or
Redis Cluster, ScyllaDB/Cassandra, SQLite), configured under ``tiers`` exactly as it
would be on its own. Feast's ``HybridOnlineStore`` routes by tag too, but it names a
tier by its store class (so SQLite can't stand in for the ScyllaDB tier), mutates the
shared repo config per call, and hands every tier every table on ``apply``.

Referenced from ``feature_store.*.yaml`` by class path (Feast's rule: the class name ends
in ``OnlineStore`` and its config class, ``<Name>Config``, sits beside it)::

    online_store:
      type: serving.tiered_store.TieredOnlineStore
      tiers:
        redis: {type: redis, redis_type: redis_cluster, connection_string: "..."}
        scylla: {type: scylladb, hosts: [...], keyspace: feast}

For Redis tiers the store also sets each entity key's expiry to the newest event time
plus the longest TTL of the views stored in it, so expired values leave memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Literal

from feast import Entity, FeatureView, RepoConfig
from feast.infra.online_stores.helpers import get_online_store_from_config
from feast.infra.online_stores.online_store import OnlineStore
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import FeastConfigBaseModel, get_online_config_from_type
from pydantic import StrictStr

ROUTING_TAG = "online_store"
TYPE = "serving.tiered_store.TieredOnlineStore"


class TieredOnlineStoreConfig(FeastConfigBaseModel):
    type: Literal["serving.tiered_store.TieredOnlineStore"] = TYPE
    routing_tag: StrictStr = ROUTING_TAG
    tiers: dict[str, dict[str, Any]]  # tier name -> that store's own config (with its type)


def tier_of(view: Any, routing_tag: str = ROUTING_TAG) -> str | None:
    return view.tags.get(routing_tag)


class UnknownTierError(ValueError):
    pass


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
            conf = dict(tiers[tier])
            tier_cfg = get_online_config_from_type(conf["type"])(**conf)
            sub = config.model_copy()
            sub.online_config = tier_cfg
            sub._online_store = tier_cfg
            self._stores[tier] = (sub, get_online_store_from_config(tier_cfg))
        return self._stores[tier]

    def _route(self, config: RepoConfig, table: FeatureView) -> tuple[RepoConfig, OnlineStore]:
        tag = config.online_store.routing_tag
        tier = tier_of(table, tag)
        if tier is None:
            raise UnknownTierError(f"feature view {table.name} has no {tag!r} tag")
        return self._tier(config, tier)

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
    client = store._get_client(config.online_store)
    pipe = client.pipeline(transaction=False)
    for entity_key, _, ts, _ in data:
        key = _redis_key(config.project, entity_key, config.entity_key_serialization_version)
        at = int(ts.timestamp() + ttl) + 1
        pipe.expireat(key, at, nx=True)  # a key without expiry: set one
        pipe.expireat(key, at, gt=True)  # one with an earlier expiry: extend it
    pipe.execute()
