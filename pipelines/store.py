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

from pipelines.errors import HotpathError
from pipelines.settings import Settings, feast_redis_connection

REDIS_ENV = "HOTPATH_REDIS_CONNECTION"


def open_store(settings: Settings) -> FeatureStore:
    """The FeatureStore of the active profile, its online store checked reachable."""
    yaml_path = settings.feature_store_yaml
    if not yaml_path.exists():
        raise HotpathError(f"profile {settings.profile!r} has no config: {yaml_path} is missing")
    if settings.profile == "redis":
        os.environ[REDIS_ENV] = feast_redis_connection(settings.redis_url)
        check_redis(settings.redis_url)
    try:
        return FeatureStore(repo_path=str(settings.repo.resolve()), fs_yaml_file=yaml_path)
    except Exception as e:
        raise HotpathError(f"cannot load {yaml_path}: {_first_line(e)}") from None


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
        raise HotpathError(f"Redis at {_safe(url)} refused the credentials: {e}") from None
    except redis.RedisError as e:
        raise HotpathError(f"Redis unreachable at {_safe(url)}: {_first_line(e)}") from None


def _safe(url: str) -> str:
    """The URL with any password hidden."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _restoring_cwd() -> Iterator[None]:
    cwd = os.getcwd()
    try:
        yield
    finally:
        os.chdir(cwd)


def apply(store: FeatureStore) -> None:
    """``feast apply`` for the store's repo (registers definitions, validates sources)."""
    from feast.repo_operations import apply_total

    from pipelines.contract import use_repo

    repo = Path(store.repo_path)
    use_repo(repo)
    with _restoring_cwd():  # apply_total chdirs into the repo
        try:
            apply_total(store.config, repo, skip_source_validation=False)
        except Exception as e:
            raise HotpathError(f"feast apply failed: {_first_line(e)}") from None


def materialize(store: FeatureStore, end: datetime | None = None) -> datetime:
    """``feast materialize-incremental`` up to ``end`` (default now); returns ``end``."""
    end = end or datetime.now(UTC)
    try:
        store.materialize_incremental(end_date=end)
    except Exception as e:
        raise HotpathError(f"materialization failed: {_first_line(e)}") from None
    return end


@dataclass(frozen=True)
class FeatureValue:
    name: str
    value: Any
    age_s: float | None  # None when the value is missing


def read_vector(
    store: FeatureStore, service: str, entity: dict[str, Any], now: datetime | None = None
) -> list[FeatureValue]:
    """One entity's online feature vector for ``service``, each value with its age."""
    try:
        fs = store.get_feature_service(service)
        response = store.get_online_features(features=fs, entity_rows=[entity]).to_dict(
            include_event_timestamps=True
        )
    except Exception as e:
        raise HotpathError(f"online read failed: {_first_line(e)}") from None
    now_s = (now or datetime.now(UTC)).timestamp()
    out = []
    for name, values in response.items():
        if name.endswith("__ts") or name in entity:
            continue
        value = values[0]
        ts = response.get(f"{name}__ts", [None])[0]
        age = now_s - ts if value is not None and ts else None
        out.append(FeatureValue(name, value, age))
    return out
