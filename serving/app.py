"""The online predict service: request -> feature vector -> model -> decision.

Thin routes over a ``Runtime`` built once at start-up (FastAPI lifespan): the
FeatureService's fast-path reader, the model's metadata (refused if the registry can't
provide its features), the model backend, the coalescing scorer with its breakers, the
health monitor, warm-up before ``/ready``, and Prometheus metrics. Admission control
runs before any of this, in uvicorn's protocol (``serving.admission``). Errors are
mapped once, to one ``Problem`` shape.

The two predict routes are served in front of FastAPI (``serving.predict_routes``):
its generic request handling costs as much as the prediction. The OpenAPI document
still declares every route, body and answer (see :func:`_openapi`).
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

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from serving import admission, problems
from serving.decision import load_policy
from serving.errors import HotpathError, first_line
from serving.health import Health
from serving.logs import Throttled, event, setup
from serving.metrics import Metrics
from serving.model_backend import ModelBackend, OnnxBackend, TritonBackend
from serving.model_repository import load_metadata, onnx_path
from serving.online_features import OnlineFeatures
from serving.predict_routes import PredictRoutes
from serving.schemas import (
    BatchRequest,
    BatchResponse,
    Prediction,
    Problem,
    Readiness,
    Transaction,
)
from serving.scoring import Scorer
from serving.settings import ServingSettings


class StartupError(HotpathError):
    """The service cannot serve this model with this feature repo."""


_throttled = Throttled()  # warm-up is retried on every /ready poll: a line per interval


@dataclass
class Runtime:
    settings: ServingSettings
    scorer: Scorer
    health: Health
    metrics: Metrics


def build_runtime(settings: ServingSettings) -> Runtime:
    from feast import FeatureStore

    yaml = settings.feature_store_yaml or settings.repo / "feature_store.yaml"
    store = FeatureStore(repo_path=str(settings.repo), fs_yaml_file=yaml)
    meta = load_metadata(settings.repository, settings.model_name, settings.model_version)
    try:
        reader = OnlineFeatures(
            store, meta.feature_service, timeout_s=settings.features_budget_ms / 1000
        )
    except Exception as e:
        raise StartupError(f"feature service {meta.feature_service!r}: {e}") from None
    missing = sorted(set(meta.feature_names) - set(reader.feature_names))
    if missing:
        raise StartupError(
            f"model {meta.model_name} v{meta.version} needs features the registry's "
            f"{meta.feature_service} does not provide: {missing}"
        )
    if settings.backend == "triton":
        backend: ModelBackend = TritonBackend(settings.triton_url, meta.model_name, meta.version)
    else:
        backend = OnnxBackend(onnx_path(settings.repository, meta.model_name, meta.version))
    try:
        policy = load_policy(settings.repo)
    except ValueError as e:
        raise StartupError(str(e)) from None
    unknown = sorted({f for _, f, _, _ in policy.rules} - set(reader.feature_names))
    if unknown:
        raise StartupError(
            f"decision policy names features {meta.feature_service} does not serve: {unknown}"
        )
    metrics = Metrics(meta.feature_names, reader.view_names, settings.metrics_dir)
    scorer = Scorer(settings, reader, meta, backend, metrics, policy, admission.company)
    admission.configure(settings.max_in_flight, scorer.backlogged)
    return Runtime(settings, scorer, Health(scorer), metrics)


async def warm_up(rt: Runtime) -> None:
    """The whole request path, a few times, so the first real request pays no lazy
    initialisation; not counted in metrics, with budgets that start-up contention (other
    workers loading) cannot break."""
    dummy = {"user_id": 0, "merchant_id": 0, "amount": 1.0}
    with rt.scorer.warming():
        for size in (1, 1, 1, 32):
            await rt.scorer.predict([dummy] * size, admission.arrival({}))
    await rt.health.check_model()
    rt.health.check_store()
    rt.health.warmed_up = True
    rt.health.publish()


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
        monitor = asyncio.create_task(rt.health.run())
        yield
        monitor.cancel()
        await rt.scorer.backend.close()

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
        if not rt.health.warmed_up:  # e.g. the model backend was down at start: try again
            try:
                await asyncio.wait_for(warm_up(rt), timeout=2)
            except Exception as e:
                _throttled(logging.WARNING, "warm_up_failed", error=first_line(e))
        h, s = rt.health, rt.scorer
        reasons = h.reasons()
        body = Readiness(
            ready=not reasons,
            warmed_up=h.warmed_up,
            model=f"{s.meta.model_name} v{s.meta.version}",
            model_backend=not s.model_breaker.is_open,
            online_store=not s.store_breaker.is_open,
            materialized=not s.store_empty,
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
        rt.health.publish()  # this worker's current states
        return Response(rt.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi(app, settings)  # type: ignore[method-assign]
    key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    return PredictRoutes(app, key, settings.max_batch)


def _openapi(app: FastAPI, settings: ServingSettings) -> dict[str, Any]:
    """FastAPI's document plus the two predict routes (served by ``PredictRoutes``, so
    FastAPI doesn't see them): their bodies and answers — the Problem answers (401 with a
    key, 413, 422, 503 with Retry-After) — and the key scheme."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (Transaction, BatchRequest, Prediction, BatchResponse, Problem):
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js

    def content(model: str) -> dict[str, Any]:
        return {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}

    retry = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    routes = {
        "/predict": ("Predict", "Score one transaction", "Transaction", "Prediction"),
        "/predict/batch": ("Predict Batch", "Score many", "BatchRequest", "BatchResponse"),
    }
    for path, (summary, description, request, answer) in routes.items():
        op: dict[str, Any] = {
            "summary": summary,
            "description": description,
            "operationId": summary.lower().replace(" ", "_"),
            "requestBody": {"required": True, "content": content(request)},
            "responses": {
                "200": {"description": "the prediction(s)", "content": content(answer)},
                "422": {"description": "invalid request", "content": content("Problem")},
                "503": {
                    "description": "overloaded: retry after the given seconds",
                    "content": content("Problem"),
                    "headers": retry,
                },
            },
        }
        if path == "/predict/batch":
            op["responses"]["413"] = {
                "description": "more rows than max_batch",
                "content": content("Problem"),
            }
        if settings.api_key is not None:
            op["responses"]["401"] = {
                "description": "missing or wrong key",
                "content": content("Problem"),
            }
            op["security"] = [{"ApiKey": []}]
        doc["paths"][path] = {"post": op}
    if settings.metrics_key is not None:
        op = doc["paths"]["/metrics"]["get"]
        op["responses"]["401"] = {
            "description": "missing or wrong key",
            "content": content("Problem"),
        }
        op["security"] = [{"ApiKey": []}]
    if settings.api_key is not None or settings.metrics_key is not None:
        doc["components"]["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
        }
    app.openapi_schema = doc
    return doc
