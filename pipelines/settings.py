"""One settings object for the CLI and the pipelines, read from flags and ``HOTPATH_*`` env."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.errors import HotpathError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPO = PROJECT_ROOT / "feature_repo"

# profile name -> Feast config file inside the feature repo
PROFILES = {
    "embedded": "feature_store.yaml",
    "redis": "feature_store.redis.yaml",
    "redis-cluster": "feature_store.redis-cluster.yaml",
    "production": "feature_store.production.yaml",
}


class Settings(BaseSettings):
    """``HOTPATH_REPO``, ``HOTPATH_PROFILE``, ``HOTPATH_REDIS_URL``, ``HOTPATH_SPARK_MASTER``..."""

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
    spark_master: str = "local[*]"
    spark_driver_memory: str = "2g"
    model_repository_path: Path | None = None  # HOTPATH_MODEL_REPOSITORY_PATH; default data/
    triton_venv: Path = PROJECT_ROOT / ".venv-triton"

    @property
    def validation_dir(self) -> Path:
        return self.data_dir / "validation"

    @property
    def triton_dir(self) -> Path:
        return self.data_dir / "triton"

    @property
    def model_repository(self) -> Path:
        return self.model_repository_path or self.data_dir / "model_repository"

    @property
    def data_dir(self) -> Path:
        """Generated data lives beside the feature repo, where its YAML points."""
        return self.repo.resolve().parent / "data"

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
