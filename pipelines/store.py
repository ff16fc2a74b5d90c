"""Feast operations on the active profile: open, check, apply, materialize, read.

Feast stays the writer and the source of definitions; this module only picks the
profile's ``feature_store.yaml``, checks the online store answers before work
starts (so a bad URL fails at once, naming it), and reports what happened.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from feast import FeatureStore

from online_store import connect
from online_store.tiers import UnknownTierError, is_tiered, placement, tier_configs, tier_name
from pipelines.errors import HotpathError, first_line
from pipelines.settings import Settings, feast_cluster_connection, feast_redis_connection

REDIS_ENV = "HOTPATH_REDIS_CONNECTION"
CLUSTER_ENV = "HOTPATH_REDIS_CLUSTER_CONNECTION"


def open_store(settings: Settings) -> FeatureStore:
    """The FeatureStore of the active profile, its online store checked reachable."""
    yaml_path = settings.feature_store_yaml
    if not yaml_path.exists():
        raise HotpathError(f"profile {settings.profile!r} has no config: {yaml_path} is missing")
    open_store_env(settings)
    if settings.profile == "redis":
        check_redis(settings.redis_url)
    try:
        fs = FeatureStore(repo_path=str(settings.repo.resolve()), fs_yaml_file=yaml_path)
        config = fs.config.online_store  # parses the online store section now
        tiers = tier_configs(config)
    except Exception as e:
        raise HotpathError(f"cannot load {yaml_path}: {first_line(e)}") from None
    if settings.profile != "redis":
        for tier, cfg in tiers.items():
            check_tier(tier, cfg)
    return fs


def open_store_env(settings: Settings) -> None:
    """The variables the profiles' ``feature_store.*.yaml`` files substitute."""
    if settings.profile == "redis":
        os.environ[REDIS_ENV] = feast_redis_connection(settings.redis_url)
    os.environ[CLUSTER_ENV] = feast_cluster_connection(
        settings.redis_cluster_nodes, settings.redis_password, settings.redis_ssl
    )
    os.environ["HOTPATH_SCYLLA_HOST"] = settings.scylla_host
    os.environ["HOTPATH_SCYLLA_KEYSPACE"] = settings.scylla_keyspace
    os.environ["HOTPATH_SCYLLA_LOCAL_DC"] = settings.scylla_local_dc
    credentials = {"HOTPATH_SCYLLA_USERNAME": settings.scylla_username,
                   "HOTPATH_SCYLLA_PASSWORD": settings.scylla_password}  # fmt: skip
    for name, value in credentials.items():  # unset: none sent (online_store.tiers)
        if value:
            os.environ[name] = value
        else:
            os.environ.pop(name, None)


def check_tier(name: str, cfg: Any, timeout_s: float = 3.0) -> str:
    """Reach one online store tier now (not at the first request): its server version and
    round trip, or a one-line error naming the endpoint."""
    kind = cfg.type
    if kind == "sqlite":
        return "sqlite (a local file)"
    if kind == "redis":
        endpoints = connect.where(cfg)
        try:
            client = connect.redis_client(cfg, timeout_s)
            t0 = time.perf_counter()
            client.ping()
            ms = (time.perf_counter() - t0) * 1000
            info = client.info("server")
            version = info.get("redis_version") if isinstance(info, dict) else None
            if version is None and isinstance(info, dict):  # cluster: per node
                version = next(iter(info.values()), {}).get("redis_version")
            client.close()
        except redis.AuthenticationError as e:
            raise HotpathError(
                f"{name} tier: Redis at {endpoints} refused the credentials: {e}"
            ) from None
        except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as e:
            if "username-password" in str(e) or "WRONGPASS" in str(e):  # cluster wraps auth
                raise HotpathError(
                    f"{name} tier: Redis at {endpoints} refused the credentials: {first_line(e)}"
                ) from None
            raise HotpathError(
                f"{name} tier: Redis unreachable at {endpoints}: {first_line(e)}"
            ) from None
        shape = "Redis Cluster" if cfg.redis_type == "redis_cluster" else "Redis"
        return f"{shape} {version} at {endpoints}, round trip {ms:.2f} ms"
    if kind in ("scylladb", "cassandra"):
        from cassandra.auth import PlainTextAuthProvider
        from cassandra.cluster import Cluster

        hosts = list(cfg.hosts or [])
        where = ",".join(f"{h}:{cfg.port or 9042}" for h in hosts)
        auth = PlainTextAuthProvider(cfg.username, cfg.password) if cfg.username else None
        cluster = Cluster(
            hosts, port=cfg.port or 9042, auth_provider=auth, connect_timeout=timeout_s
        )
        try:
            t0 = time.perf_counter()
            session = cluster.connect()
            row = session.execute("SELECT release_version FROM system.local").one()
            ms = (time.perf_counter() - t0) * 1000
        except Exception as e:  # NoHostAvailable, AuthenticationFailed...
            raise HotpathError(
                f"{name} tier: {kind} unreachable at {where}: {first_line(e)}"
            ) from None
        finally:
            cluster.shutdown()
        return f"{kind} {row.release_version} at {where}, connect + query {ms:.1f} ms"
    return f"{kind} (not checked)"


def check_redis(url: str, timeout_s: float = 2.0) -> float:
    """Ping Redis at ``url``; return the round trip in ms or fail with the URL in the message."""
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        t0 = time.perf_counter()
        client.ping()
        return (time.perf_counter() - t0) * 1000
    except ValueError as e:
        raise HotpathError(f"not a Redis URL: {url!r} ({e})") from None
    except redis.AuthenticationError as e:
        raise HotpathError(f"Redis at {safe_url(url)} refused the credentials: {e}") from None
    except redis.RedisError as e:
        raise HotpathError(f"Redis unreachable at {safe_url(url)}: {first_line(e)}") from None


def safe_url(url: str) -> str:
    """The URL with any password hidden."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


@contextlib.contextmanager
def _restoring_cwd() -> Iterator[None]:
    cwd = os.getcwd()
    try:
        yield
    finally:
        os.chdir(cwd)


def check_tiers(store: FeatureStore, repo: Path) -> None:
    """On a tiered online store, every feature view's tag must name a configured tier; a
    request-time view must live where its tiles are read (never served last-event values
    under a request-time name)."""
    from online_store.read import reads_tiles
    from online_store.tiles import REQUEST_TIME_TAG
    from pipelines.contract import feature_views

    cfg = store.config.online_store
    for view in feature_views(repo).values():
        if not view.online:
            continue
        if is_tiered(cfg):
            try:
                tier_name(cfg, view)
            except UnknownTierError as e:
                raise HotpathError(str(e)) from None
        where = placement(store, view)
        if REQUEST_TIME_TAG in (view.tags or {}) and not reads_tiles(where):
            raise HotpathError(
                f"feature view {view.name}: request_time needs its tiles in Redis or SQLite, "
                f"but its store{f' (tier {where.tier})' if where.tier else ''} is "
                f"{where.kind}: move it to a Redis tier or declare it without request_time"
            )


def apply(store: FeatureStore) -> None:
    """``feast apply`` for the store's repo (registers definitions, validates sources)."""
    from feast.repo_operations import apply_total

    from pipelines.contract import computed_views, use_repo

    repo = Path(store.repo_path)
    use_repo(repo)
    from pipelines.stream.aggregates import check_streamed

    check_streamed(computed_views(repo))  # a bad declaration fails here, in one line
    check_tiers(store, repo)
    with _restoring_cwd():  # apply_total chdirs into the repo
        try:
            apply_total(store.config, repo, skip_source_validation=False)
        except Exception as e:
            raise HotpathError(f"feast apply failed: {first_line(e)}") from None


def materialize(store: FeatureStore, end: datetime | None = None) -> datetime:
    """Incremental materialization up to ``end`` (default now): views stored in Redis by
    ``pipelines.materialize`` (same semantics, ~10x faster), the others by Feast's
    ``materialize-incremental``; returns ``end``."""
    from pipelines import materialize as fast

    end = end or datetime.now(UTC)
    try:
        _, others = fast.materialize(store, end)
        if others:
            store.materialize_incremental(end_date=end, feature_views=[v.name for v in others])
            for view in others:
                fast.mark_materialized(store, view, end)
    except Exception as e:
        raise HotpathError(f"materialization failed: {first_line(e)}") from None
    return end


@dataclass(frozen=True)
class FeatureValue:
    name: str
    value: Any  # None when missing or older than its view's TTL
    age_s: float | None  # None when missing, or computed at request time
    default: float | None = None  # what the model gets instead of a missing value


def read_vector(
    store: FeatureStore,
    service: str,
    entity: dict[str, Any],
    now: datetime | None = None,
    defaults: dict[str, float] | None = None,
) -> list[FeatureValue]:
    """One entity's online feature vector for ``service`` as serving reads it: the same
    fast path, each view's TTL applied (an expired value is missing), each value with
    its age, and the model's default for each missing one when ``defaults`` is given."""
    from serving.online_features import OnlineFeatures, served

    now_s = (now or datetime.now(UTC)).timestamp()
    try:
        reader = OnlineFeatures(store, service)
        (vector,) = reader.read([entity], now_s)  # request-time views as of ``now``
    except Exception as e:
        raise HotpathError(f"online read failed: {first_line(e)}") from None
    served(vector, reader.ttl_of(), now_s)
    out = []
    for name in reader.feature_names:
        value, ts = vector.values.get(name), vector.ts.get(name)
        age = now_s - ts if value is not None and ts else None
        default = (defaults or {}).get(name) if value is None else None
        out.append(FeatureValue(name, value, age, default))
    return out
