"""hotpath's one settings tree, read from flags and ``HOTPATH_*`` in the environment.

The root (:class:`Settings`) holds what every command needs (repo, profile, the online
store's endpoints) and nests one section per component: ``spark`` (``HOTPATH_SPARK_*``),
``stream`` (``HOTPATH_STREAM_*``) and ``serving`` (``HOTPATH_SERVING_*``; its class lives
in ``serving.settings`` because serving never imports ``pipelines/``). Each default is
declared once, here; the CLI's options default to None and fall back to it, and the tree
is passed explicitly (the server gets its section as an object, not through the
environment).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from pydantic import Field
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.errors import HotpathError
from serving.settings import (
    DEFAULT_REPO,
    PROJECT_ROOT,
    ServingSettings,
    data_dir,
    default_model_repository,
)

# profile name -> Feast config file inside the feature repo
PROFILES = {
    "embedded": "feature_store.yaml",
    "redis": "feature_store.redis.yaml",
    "redis-cluster": "feature_store.redis-cluster.yaml",
    "production": "feature_store.production.yaml",
}


class SparkSettings(BaseSettings):
    """``HOTPATH_SPARK_MASTER`` (``local[*]`` or a cluster URL), ``HOTPATH_SPARK_DRIVER_MEMORY``.
    The session configuration every job relies on is ``pipelines.spark.SESSION_CONF``."""

    model_config = SettingsConfigDict(env_prefix="HOTPATH_SPARK_", extra="ignore")

    master: str = "local[*]"
    driver_memory: str = "2g"


class StreamSettings(BaseSettings):
    """What the streaming flow reads and how (``HOTPATH_STREAM_*``); stores come from the root."""

    model_config = SettingsConfigDict(env_prefix="HOTPATH_STREAM_", extra="ignore")

    source: Literal["file", "redis", "kafka"] = "file"
    file: Path | None = None  # default: the raw transactions
    rate: float = Field(0, ge=0)  # file replay, events/s (0: as fast as possible)
    source_redis_url: str | None = None  # default: the profile's Redis URL
    streams: list[str] = Field(["transactions"], min_length=1)
    group: str = "hotpath"
    block_ms: int = Field(100, ge=1)  # (0 would be Redis's "block forever")
    # default: the declared KafkaSource's bootstrap servers and topic (pipelines.stream.kafka)
    kafka_brokers: list[str] | None = None
    kafka_topics: list[str] | None = None
    # out-of-order tolerance, per key (behind its newest event)
    lateness_s: float = Field(300, ge=0)
    # Redis stream (redis source), Kafka topic (kafka source) or file; default derived
    dead_letter: str | None = None
    offline: bool = True
    metrics_port: int | None = Field(None, ge=1, le=65535)


class Settings(BaseSettings):
    """``HOTPATH_REPO``, ``HOTPATH_PROFILE``, ``HOTPATH_REDIS_URL``... plus the nested sections."""

    model_config = SettingsConfigDict(env_prefix="HOTPATH_", extra="ignore")

    repo: Path = DEFAULT_REPO
    profile: str = "embedded"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # redis-cluster and production profiles
    redis_cluster_nodes: str = "127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002"
    redis_password: str | None = None  # HOTPATH_REDIS_PASSWORD (cluster profiles)
    redis_ssl: bool = False
    scylla_host: str = "127.0.0.1"  # production profile: HOTPATH_SCYLLA_HOST...
    scylla_keyspace: str = "hotpath"
    scylla_local_dc: str = "datacenter1"
    # HOTPATH_SCYLLA_USERNAME / _PASSWORD: both or neither (unset: no credential is sent)
    scylla_username: str | None = None
    scylla_password: str | None = None
    feature_service: str = "fraud_detection_v1"  # what train, features and the demo use
    triton_venv: Path = PROJECT_ROOT / ".venv-triton"
    spark: SparkSettings = Field(default_factory=SparkSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)

    @property
    def model_name(self) -> str:
        """The default model: ``HOTPATH_SERVING_DEFAULT_MODEL``, else the repo's declared one."""
        from pipelines.contract import default_model

        return self.serving.default_model or default_model(self.repo)

    @property
    def data_dir(self) -> Path:
        return data_dir(self.repo)

    @property
    def validation_dir(self) -> Path:
        return self.data_dir / "validation"

    @property
    def triton_dir(self) -> Path:
        return self.data_dir / "triton"

    @property
    def model_repository(self) -> Path:
        """``HOTPATH_SERVING_MODEL_REPOSITORY``; default ``data/model_repository``."""
        return self.serving.model_repository or default_model_repository(self.repo)

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "raw"

    @property
    def offline_dir(self) -> Path:
        return self.data_dir / "offline"

    @property
    def feature_store_yaml(self) -> Path:
        if self.profile not in PROFILES:
            known = ", ".join(PROFILES)
            raise HotpathError(f"unknown profile {self.profile!r} (known: {known})")
        return self.repo.resolve() / PROFILES[self.profile]

    def with_model_repository(self, path: Path | None) -> Settings:
        """These settings with another model repository (``None``: unchanged)."""
        if path is None:
            return self
        return self.model_copy(
            update={"serving": self.serving.model_copy(update={"model_repository": path})}
        )

    def stream_settings(self, **overrides: object) -> StreamSettings:
        """The stream section with ``overrides`` (None: keep) applied and checked: what
        ``hotpath stream`` runs with."""
        values = self.stream.model_dump() | {k: v for k, v in overrides.items() if v is not None}
        try:
            return StreamSettings.model_validate(values)
        except PydanticValidationError as e:
            raise invalid(e, "stream.") from None

    def serving_settings(self, **overrides: object) -> ServingSettings:
        """The serving section bound to this repo, profile and model repository, with
        ``overrides`` (None: keep) applied and checked: what ``hotpath serve`` hands the
        server."""
        values = self.serving.model_dump() | {
            "repo": self.repo.resolve(),
            "feature_store_yaml": self.feature_store_yaml,
            "model_repository": self.model_repository,
        }
        values |= {k: v for k, v in overrides.items() if v is not None}
        try:
            return ServingSettings.model_validate(values)  # validated; env is not read again
        except PydanticValidationError as e:
            raise invalid(e, "serving.") from None


def load_settings(**overrides: object) -> Settings:
    """The settings tree from the environment and ``overrides`` (None: not given); a bad
    value is one ``HotpathError`` naming the setting."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except PydanticValidationError as e:
        raise invalid(e) from None


def invalid(e: PydanticValidationError, section: str = "") -> HotpathError:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"])
    title = e.title.removesuffix("Settings").lower()  # the section that refused it
    prefix = section or ("" if title in ("", "root") else f"{title}.")
    return HotpathError(f"setting {prefix}{where}: {err['msg']}")


def feast_cluster_connection(nodes: str, password: str | None, ssl: bool) -> str:
    """``host:port,host:port`` plus credentials, as Feast's Redis Cluster connection string."""
    parts = [n.strip() for n in nodes.split(",") if n.strip()]
    for n in parts:
        host, _, port = n.rpartition(":")
        if not host or not port.isdigit():
            raise HotpathError(f"not a Redis Cluster node: {n!r} (expected host:port)")
    if not parts:
        raise HotpathError("no Redis Cluster nodes given (host:port,host:port,...)")
    if password:
        parts.append(f"password={password}")
    if ssl:
        parts.append("ssl=true")
    return ",".join(parts)


def feast_redis_connection(url: str) -> str:
    """``redis://[:password@]host:port/db`` (or ``rediss://``) as Feast's connection string."""
    parsed = urlparse(url if "://" in url else f"redis://{url}")
    if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
        raise HotpathError(f"not a Redis URL: {url!r} (expected redis://host:port/db)")
    try:
        port = parsed.port or 6379
    except ValueError as e:
        raise HotpathError(f"not a Redis URL: {url!r} ({e})") from None
    parts = [f"{parsed.hostname}:{port}"]
    if parsed.password:
        parts.append(f"password={unquote(parsed.password)}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    db = parsed.path.strip("/")
    if db:
        if not db.isdigit():
            raise HotpathError(f"not a Redis URL: {url!r} (database must be a number)")
        parts.append(f"db={db}")
    return ",".join(parts)
