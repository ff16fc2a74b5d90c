"""Serving configuration: the ``serving`` section of hotpath's one settings tree.

``HOTPATH_SERVING_*`` in the environment. The ``hotpath`` CLI nests this class in its
root settings (``pipelines.settings.Settings.serving``), binds it to the chosen repo,
profile and model repository, and hands it to the server explicitly; it lives here
because serving never imports ``pipelines/``. Also the one definition of where generated
data lives (:func:`data_dir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPO = PROJECT_ROOT / "feature_repo"


def data_dir(repo: Path) -> Path:
    """Generated data lives beside the feature repo, where its YAML files point (``../data``)."""
    return repo.resolve().parent / "data"


def default_model_repository(repo: Path) -> Path:
    return data_dir(repo) / "model_repository"


class ServingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOTPATH_SERVING_", extra="ignore")

    repo: Path = DEFAULT_REPO
    feature_store_yaml: Path | None = None  # default: the repo's feature_store.yaml
    model_repository: Path | None = None  # default: ../data/model_repository beside the repo
    # served: every published model (default), or these; each at its pinned version, else
    # its newest
    models: list[str] | None = None
    # the model /predict and /predict/batch serve (default: the one declared ``default``)
    default_model: str | None = None
    backend: Literal["onnx", "triton"] = "onnx"  # in-process ONNX Runtime, or Triton (gRPC)
    triton_url: str = "127.0.0.1:8001"
    api_key: SecretStr | None = None  # required on /predict when set
    # required (as X-API-Key) on /admin/models...; unset: those answer loopback clients only
    admin_key: SecretStr | None = None
    # each worker looks for a new version or a changed pin this often (0: never; then only
    # `hotpath models promote|rollback` changes versions). See serving.model_versions
    model_poll_s: float = Field(5.0, ge=0)
    # batches a shadow candidate may have waiting (`hotpath models shadow`); past it dropped
    shadow_queue: int = Field(256, ge=0)
    metrics_key: SecretStr | None = None  # required (as X-API-Key) on /metrics when set
    host: str = Field("127.0.0.1", pattern=r"^\S+$")  # loopback unless told ("": every one)
    port: int = Field(8080, ge=1, le=65535)
    workers: int = Field(1, ge=1)  # uvicorn worker processes
    log_level: str = "warning"
    metrics_dir: Path | None = None  # set by the server: where its workers' metrics meet
    # admitted, unanswered requests per worker (waiting or running); past it 503 at once
    max_in_flight: int = Field(64, ge=1)
    max_batch: int = Field(256, ge=1)  # rows per batch request; also the largest coalesced batch
    max_body_bytes: int = Field(1 << 20, ge=1)  # a larger request body: 413, the connection closed
    body_timeout_s: float = Field(5.0, gt=0)  # a body still arriving this long after it began: 408
    # a small coalesced batch waits at most this long for requests about to arrive (0:
    # never); uvloop's timers count whole milliseconds
    coalesce_wait_ms: float = Field(1.0, ge=0)
    # not started this long after arrival: 503, not a fallback
    queue_budget_ms: float = Field(100.0, gt=0)
    features_budget_ms: float = Field(50.0, gt=0)  # store read past it: fallback decision
    model_budget_ms: float = Field(50.0, gt=0)  # model call past it: fallback decision
    breaker_failures: int = Field(5, ge=1)  # consecutive failed backend calls that open a breaker
    breaker_probe_s: float = Field(0.5, gt=0)  # how often the backends' health calls are probed
    # served-vector log (serving.served_log): every answered prediction, sampled at its
    # model's declared rate, as Feast feature-logging parquet under <dir>/<feature service>
    served_log: bool = True  # on: ~10 % of /predict throughput at CPU saturation (README)
    served_log_dir: Path | None = None  # default: ../data/served_log beside the repo
    # prediction cache (serving.prediction_cache), off by default: model name -> TTL in s,
    # e.g. HOTPATH_SERVING_PREDICTION_CACHE='{"fraud_detection": 30}'
    prediction_cache: dict[str, Annotated[float, Field(gt=0)]] = {}
    prediction_cache_jitter: float = Field(0.1, ge=0, lt=1)  # each entry lives ttl * (1 ± jitter)
    prediction_cache_entries: int = Field(100_000, ge=1)  # per model and worker
    prediction_cache_redis_url: str | None = None  # a Redis level shared by the workers
    # predictions waiting for the writer; past it dropped
    served_log_queue: int = Field(20_000, ge=1)
    # a file per feature service this often, and at shutdown
    served_log_flush_s: float = Field(10.0, gt=0)

    @property
    def repository(self) -> Path:
        return self.model_repository or default_model_repository(self.repo)

    @property
    def served_log_path(self) -> Path:
        return self.served_log_dir or data_dir(self.repo) / "served_log"
