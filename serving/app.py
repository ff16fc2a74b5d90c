"""The online predict service: request -> feature vector -> model -> decision, for every
published model at once.

Thin routes over a ``Runtime`` built once at start-up (FastAPI lifespan): per served model,
the FeatureService's fast-path reader, the model's metadata (refused if the registry can't
provide its features or its request schema), its request models (derived from the
FeatureService, recorded at training), the model backend, the coalescing scorer with its
own breakers, budgets and metric children, and its decision policy (from the metadata);
one health monitor for all, warm-up before ``/ready``, and Prometheus metrics. Admission
control runs before any of this, in uvicorn's protocol (``serving.admission``). Errors are
mapped once, to one ``Problem`` shape.

The predict routes are served in front of FastAPI (``serving.predict_routes``): its
generic request handling costs as much as the prediction. The OpenAPI document still
declares every route, body and answer (``serving.openapi``).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from serving import admission, problems
from serving.canary import Canary
from serving.decision import Policy
from serving.errors import HotpathError, first_line
from serving.health import Health, Monitor
from serving.logs import Throttled, event, setup
from serving.metrics import Metrics
from serving.model_backend import ModelBackend, OnnxBackend, TritonBackend
from serving.model_repository import (
    ModelMetadata,
    latest_version,
    load_metadata,
    onnx_path,
    pinned,
    published,
    versions,
)
from serving.model_versions import BadCommand, ModelVersions, NoSuchVersion, VersionRefused
from serving.online_features import OnlineFeatures
from serving.openapi import openapi_document
from serving.predict_routes import PredictRoutes
from serving.prediction_cache import PredictionCache
from serving.schemas import (
    Models,
    Readiness,
    ServedModel,
    rank_model,
    request_models,
    request_shape,
)
from serving.scoring import Scorer
from serving.served_log import ServedLog
from serving.settings import ServingSettings


class StartupError(HotpathError):
    """The service cannot serve this model with this feature repo."""


_throttled = Throttled()  # warm-up is retried on every /ready poll: a line per interval
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass
class Served:
    """One model as served: its metadata, request bodies, scorer and health."""

    meta: ModelMetadata
    request: type[BaseModel]
    batch: type[BaseModel]
    rank: type[BaseModel] | None  # with a candidate key: the body of .../rank
    scorer: Scorer
    health: Health
    canary: Canary | None = None  # a candidate answering a share of the entities

    def describe(self, root: Any) -> dict[str, Any]:
        m = self.meta
        return ServedModel(
            name=m.model_name,
            version=m.version,
            versions=versions(root, m.model_name),
            feature_service=m.feature_service,
            task=m.task,
            default=False,
            request_schema=self.request.model_json_schema(),
            batch_field=m.batch_field,
            decisions=self.scorer.policy.decisions,
            candidate_key=m.candidate_key,
            rank_schema=self.rank.model_json_schema() if self.rank else None,
        ).model_dump()


@dataclass
class Runtime:
    settings: ServingSettings
    models: dict[str, Served]
    default: Served | None  # what /predict and /predict/batch serve
    monitor: Monitor
    metrics: Metrics
    served_log: ServedLog | None  # the served-vector log's writer (settings.served_log)
    store: Any = None  # the FeatureStore new versions are checked against
    cache_redis: Any = None  # the prediction cache's shared level, if any
    versions: ModelVersions | None = None  # set by the lifespan

    def backlog_changed(self) -> None:
        """Admission's backlog test over the scorers serving now (one bound method for
        one model: it runs on every request)."""
        scorers = [m.scorer for m in self.models.values()]
        admission.configure(
            self.settings.max_in_flight,
            scorers[0].backlogged
            if len(scorers) == 1
            else lambda: any(s.backlogged() for s in scorers),
            self.settings.max_body_bytes,
            self.settings.body_timeout_s,
        )

    def attach(self, served: Served) -> None:
        """The served-vector log and prediction cache the settings ask for."""
        settings, m = self.settings, served.meta
        if self.served_log is not None:
            served.scorer.served_log = self.served_log.model(self.store, m)
        ttl = settings.prediction_cache.get(m.model_name)
        if ttl is None:
            return
        try:
            served.scorer.cache = PredictionCache(
                m.model_name,
                m.version,
                ttl,
                settings.prediction_cache_jitter,
                settings.prediction_cache_entries,
                self.cache_redis,
                self.metrics.prediction_cache,
            )
        except ValueError as e:
            raise StartupError(str(e)) from None

    async def build(self, name: str, version: int) -> Served:
        """``version`` of ``name`` beside the serving one, made off the event loop (the
        registry check, ONNX Runtime loading the file, the log's schema from Feast)."""
        backend: ModelBackend | None = None
        if self.settings.backend == "triton":  # its asyncio channel belongs to this loop
            backend = TritonBackend(self.settings.triton_url, name, version)

        def make() -> Served:
            served = _serve_model(self.settings, self.store, name, self.metrics, version, backend)
            self.attach(served)
            return served

        try:
            served = await asyncio.to_thread(make)
        except BaseException:
            if backend is not None:
                await backend.close()
            raise
        return served


def build_runtime(settings: ServingSettings) -> Runtime:
    from feast import FeatureStore

    yaml = settings.feature_store_yaml or settings.repo / "feature_store.yaml"
    store = FeatureStore(repo_path=str(settings.repo), fs_yaml_file=yaml)
    names = settings.models or published(settings.repository)
    if not names:
        raise StartupError(f"no published model in {settings.repository}")
    metrics = Metrics(settings.metrics_dir)
    log = None
    if settings.served_log:
        log = ServedLog(
            settings.served_log_path,
            settings.served_log_queue,
            settings.served_log_flush_s,
            metrics,
        )
    models = {n: _serve_model(settings, store, n, metrics) for n in names}
    unknown = sorted(set(settings.prediction_cache) - set(models))
    if unknown:
        raise StartupError(f"prediction_cache names models that are not served: {unknown}")
    defaults = [n for n, m in models.items() if m.meta.default] or names[:1]
    default_name = settings.default_model or (defaults[0] if len(defaults) == 1 else None)
    if default_name is not None and default_name not in models:
        raise StartupError(f"default model {default_name!r} is not served ({', '.join(models)})")
    healths = {n: m.health for n, m in models.items()}
    monitor = Monitor(healths, metrics, settings.breaker_probe_s)
    default = models[default_name] if default_name is not None else None
    rt = Runtime(settings, models, default, monitor, metrics, log, store, _cache_redis(settings))
    for m in models.values():
        rt.attach(m)
    rt.backlog_changed()
    return rt


def _cache_redis(settings: ServingSettings) -> Any:
    """The prediction caches' shared Redis level, if asked for (see
    :mod:`serving.prediction_cache`)."""
    shared = None
    if settings.prediction_cache and settings.prediction_cache_redis_url:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        timeout = settings.features_budget_ms / 1000  # it is read on the event loop
        shared = redis.Redis.from_url(
            settings.prediction_cache_redis_url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), retries=0),
        )
        try:
            shared.ping()
        except redis.RedisError as e:
            raise StartupError(
                f"prediction cache: Redis at {settings.prediction_cache_redis_url} does not "
                f"answer ({e})"
            ) from None
    return shared


def _serve_model(
    settings: ServingSettings,
    store: Any,
    name: str,
    metrics: Metrics,
    version: int | None = None,
    backend: ModelBackend | None = None,
) -> Served:
    """One published model, checked against the registry: ``version``, else its pinned
    version, else its newest; on ``backend``, else one made for it."""
    repo = settings.repository
    meta = load_metadata(repo, name, version or pinned(repo, name) or latest_version(repo, name))
    where = f"model {meta.model_name} v{meta.version}"
    try:
        reader = OnlineFeatures(
            store, meta.feature_service, timeout_s=settings.features_budget_ms / 1000
        )
        derived = request_shape(store, meta.feature_service)
    except Exception as e:
        raise StartupError(f"{where}: feature service {meta.feature_service!r}: {e}") from None
    missing = sorted(set(meta.feature_names) - set(reader.feature_names))
    if missing:
        raise StartupError(
            f"{where} needs features the registry's {meta.feature_service} does not "
            f"provide: {missing}"
        )
    recorded = [(f.name, f.dtype, f.entity) for f in meta.request]
    if recorded != derived:
        raise StartupError(
            f"{where} was published for requests {recorded or 'of an unknown shape'}; the "
            f"registry's {meta.feature_service} needs {derived}: train it again"
        )
    try:
        policy = Policy.from_record(meta.policy)
        one, batch = request_models(meta.model_name, meta.request, meta.batch_field)
        rank = None
        if meta.candidate_key is not None:
            rank = rank_model(meta.model_name, meta.request, meta.candidate_key)
    except ValueError as e:
        raise StartupError(f"{where}: {e}") from None
    unknown = sorted(policy.fields - set(reader.feature_names) - {f.name for f in meta.request})
    if unknown:
        raise StartupError(f"{where}: its decision policy reads fields it is not served: {unknown}")
    if backend is not None:
        pass
    elif settings.backend == "triton":
        backend = TritonBackend(settings.triton_url, meta.model_name, meta.version)
    else:
        backend = OnnxBackend(onnx_path(settings.repository, meta.model_name, meta.version))
    children = metrics.model(
        meta.model_name, meta.feature_names, reader.view_names, policy.decisions
    )
    scorer = Scorer(settings, reader, meta, backend, children, policy, admission.company)
    return Served(meta, one, batch, rank, scorer, Health(scorer))


def _dummy(meta: ModelMetadata) -> dict[str, Any]:
    """A valid request of ``meta``'s schema (the lowest value each field allows)."""
    kinds = {"str": "", "bool": False}
    out: dict[str, Any] = {}
    for f in meta.request:
        low = f.ge if f.ge is not None else 0
        if f.dtype.upper().startswith("INT"):
            out[f.name] = int(low)
        elif f.dtype.upper().startswith(("FLOAT", "DOUBLE")):
            out[f.name] = float(min(max(1.0, low), f.le if f.le is not None else 1.0))
        else:
            out[f.name] = kinds["bool" if f.dtype.upper().startswith("BOOL") else "str"]
    return out


async def warm_up(rt: Runtime) -> None:
    """The whole request path of every model, a few times, so the first real request pays
    no lazy initialisation; not counted in metrics, with budgets that start-up contention
    (other workers loading) cannot break."""
    for served in rt.models.values():
        try:  # Triton: this version, if it does not serve it yet
            await served.scorer.backend.load()
        except Exception as e:  # unreachable: the health check below says so
            _throttled(logging.WARNING, "model_load_failed", error=first_line(e))
        await warm_model(served)
    rt.monitor.warmed_up = True
    rt.monitor.publish()


async def warm_model(served: Served) -> None:
    """One model's warm-up: at start-up, and for each new version before it is served."""
    dummy = _dummy(served.meta)
    with served.scorer.warming():
        for size in (1, 1, 1, 32):
            await served.scorer.predict([dummy] * size, admission.arrival({}))
    await served.health.check_model()
    served.health.check_store()


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":")).encode(),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _authorize(request: Request, key: Any) -> None:
    if key is not None and request.headers.get("x-api-key") != key.get_secret_value():
        raise problems.Unauthorized


def create_app(settings: ServingSettings | None = None) -> PredictRoutes:
    settings = settings or ServingSettings()
    setup(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            rt = app.state.runtime = build_runtime(settings)
        except Exception as e:
            event(logging.ERROR, "startup_refused", error=first_line(e))
            raise
        try:
            await warm_up(rt)
        except Exception as e:  # not ready: /ready says so, /predict falls back
            event(logging.WARNING, "warm_up_failed", error=first_line(e), retry="on /ready")
        # Feast, protobuf and ONNX Runtime leave ~10^6 long-lived objects; a full
        # collection walking them stalls every in-flight request for tens of ms. Move
        # them out of the collector's sight once they're loaded.
        gc.collect()
        gc.freeze()
        monitor = asyncio.create_task(rt.monitor.run())
        rt.versions = ModelVersions(rt, rt.build, warm_model)
        poll = asyncio.create_task(rt.versions.run()) if settings.model_poll_s > 0 else None
        if rt.served_log is not None:
            rt.served_log.start()
        yield
        monitor.cancel()
        if poll is not None:
            poll.cancel()
        await rt.versions.close()
        if rt.served_log is not None:  # every answered prediction written before exit
            await asyncio.to_thread(rt.served_log.close)
        for served in rt.models.values():
            await served.scorer.backend.close()

    app = FastAPI(title="hotpath", version="0.2.0", lifespan=lifespan)

    # ---- errors, mapped once (serving.problems): every error answer is a Problem
    async def _problem(_: Request, exc: Exception) -> Response:
        status, body, headers = problems.problem_of(exc)
        return Response(body, status, headers or None, media_type="application/json")

    for exc in problems.HANDLED:
        app.add_exception_handler(exc, _problem)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "alive"}

    @app.get(
        "/ready",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "not ready: see reasons"}},
    )
    async def ready(request: Request) -> Response:
        rt: Runtime = request.app.state.runtime
        if not rt.monitor.warmed_up:  # e.g. a model backend was down at start: try again
            try:
                await asyncio.wait_for(warm_up(rt), timeout=2)
            except Exception as e:
                _throttled(logging.WARNING, "warm_up_failed", error=first_line(e))
        scorers = [m.scorer for m in rt.models.values()]
        reasons = rt.monitor.reasons()
        body = Readiness(
            ready=not reasons,
            warmed_up=rt.monitor.warmed_up,
            model=", ".join(f"{s.meta.model_name} v{s.meta.version}" for s in scorers),
            model_backend=not any(s.model_breaker.is_open for s in scorers),
            online_store=not any(s.store_breaker.is_open for s in scorers),
            materialized=not any(s.store_empty for s in scorers),
            reasons=reasons,
        )
        return _json(body.model_dump(), 200 if not reasons else 503)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics(request: Request) -> Response:
        """Prometheus text format (every uvicorn worker's values)."""
        rt: Runtime = request.app.state.runtime
        _authorize(request, settings.metrics_key)
        rt.monitor.publish()  # this worker's current states
        return Response(rt.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=Models)
    async def list_models(request: Request) -> Response:
        """Every served model: its version, every published version, its request schema."""
        rt: Runtime = request.app.state.runtime
        _authorize(request, settings.api_key)
        out = []
        for served in rt.models.values():
            entry = served.describe(settings.repository)
            entry["default"] = served is rt.default
            out.append(entry)
        return _json({"models": out})

    # ---- versions (serving.model_versions): `hotpath models ...`, the operators' API (with
    # side effects on the served versions and the repository's pins): not in the clients'
    # OpenAPI document
    def admin(request: Request) -> ModelVersions:
        key = settings.admin_key
        if key is not None:
            _authorize(request, key)
        elif request.client is None or request.client.host not in LOOPBACK:
            raise problems.Unauthorized
        versions = request.app.state.runtime.versions
        assert versions is not None  # set before the first request
        return versions

    async def command(
        request: Request, name: str, action: str, fields: tuple[str, ...] | None = ("version",)
    ) -> Response:
        """``ModelVersions.<action>(name, *fields)``, the fields from the JSON body (None:
        the body itself, checked by the action)."""
        versions = admin(request)
        try:
            body = await request.json() if await request.body() else {}
            if fields is None:
                if not isinstance(body, dict):
                    raise ValueError
                args: list[Any] = [body]
            else:
                args = [body.get(f) for f in fields] if isinstance(body, dict) else [""]
                if not all(a is None or type(a) is int for a in args):
                    raise HTTPException(422, f"{', '.join(fields)}: integers or null")
            done = await getattr(versions, action)(name, *args)
        except NoSuchVersion as e:
            raise HTTPException(404, str(e)) from None
        except VersionRefused as e:
            raise HTTPException(409, str(e)) from None
        except BadCommand as e:
            raise HTTPException(422, str(e)) from None
        except ValueError:
            raise HTTPException(422, 'body must be JSON like {"version": 2}') from None
        return _json({name: done})

    @app.post("/admin/models/{name}/shadow", include_in_schema=False)
    async def shadow(request: Request, name: str) -> Response:
        """``{"version": N, "queue": Q}`` scores a copy of the traffic (null: stop)."""
        return await command(request, name, "shadow", ("version", "queue"))

    @app.post("/admin/models/{name}/canary", include_in_schema=False)
    async def canary(request: Request, name: str) -> Response:
        """``{"version": N, "percent": P, "thresholds": {...}}``, ``{"step": true}`` or
        ``{"abort": true}`` (serving.canary)."""
        return await command(request, name, "canary", None)

    @app.get("/admin/models", include_in_schema=False)
    async def models_status(request: Request) -> Response:
        """Each model's serving, pinned, published and refused versions."""
        return _json(admin(request).status())

    @app.post("/admin/models/{name}/promote", include_in_schema=False)
    async def promote(request: Request, name: str) -> Response:
        """Serve ``{"version": N}`` (null: the newest, following new ones) and pin it."""
        return await command(request, name, "promote")

    @app.post("/admin/models/{name}/rollback", include_in_schema=False)
    async def rollback(request: Request, name: str) -> Response:
        """Serve ``{"version": N}`` (null: the one below the serving one) and pin it."""
        return await command(request, name, "rollback")

    app.openapi = lambda: openapi_document(app, settings)  # type: ignore[method-assign]
    key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    return PredictRoutes(app, key, settings.max_batch)
