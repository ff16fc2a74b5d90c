"""The online predict service: request -> feature vector -> model -> decision.

Thin routes over a ``Runtime`` built once at start-up (FastAPI lifespan): the
FeatureService's fast-path reader, the model's metadata (refused if the registry can't
provide its features), the model backend, the coalescing scorer with its breakers, the
health monitor, warm-up before ``/ready``, and Prometheus metrics. Admission control
runs before any of this, in uvicorn's protocol (``serving.admission``). Errors are
mapped once, to one ``Problem`` shape.

The predict routes parse their body themselves (``model_validate_json``: parsing and
strict validation in one pass) and write their JSON directly: FastAPI's generic body and
response handling cost more than the rest of the request. The OpenAPI document still
declares every body and answer (see :func:`_openapi`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from serving import admission
from serving.health import Health
from serving.metrics import Metrics
from serving.model_backend import ModelBackend, OnnxBackend, TritonBackend
from serving.model_repository import load_metadata, onnx_path
from serving.online_features import OnlineFeatures
from serving.schemas import (
    BatchRequest,
    BatchResponse,
    Prediction,
    Problem,
    Readiness,
    Transaction,
)
from serving.scoring import Scorer, Shed
from serving.settings import ServingSettings


class StartupError(Exception):
    """The service cannot serve this model with this feature repo."""


class Unauthorized(Exception):
    pass


class TooLarge(Exception):
    pass


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
    metrics = Metrics(meta.feature_names, reader.view_names)
    scorer = Scorer(settings, reader, meta, backend, metrics)
    admission.backlogged = scorer.backlogged
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
        raise Unauthorized


def create_app(settings: ServingSettings | None = None) -> FastAPI:
    settings = settings or ServingSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = app.state.runtime = build_runtime(settings)
        with contextlib.suppress(Exception):  # not ready: /ready says so, /predict falls back
            await warm_up(rt)
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

    # ---- errors, mapped once: every error answer is a Problem
    def problem(status: int, detail: str, field: str | None = None, **headers: str) -> Response:
        return _json({"detail": detail, "field": field}, status, headers or None)

    def invalid(errors: list[Any]) -> Response:
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return problem(422, "request body is not valid JSON (UTF-8)")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        msg = first.get("msg", "invalid request")
        return problem(422, f"{where}: {msg}" if where else msg, where)

    @app.exception_handler(ValidationError)
    async def _invalid_body(_: Request, exc: ValidationError) -> Response:
        return invalid(exc.errors(include_url=False))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> Response:
        return invalid(list(exc.errors()))

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_: Request, __: Unauthorized) -> Response:
        return problem(401, "missing or wrong X-API-Key", "X-API-Key")

    @app.exception_handler(TooLarge)
    async def _too_large(_: Request, __: TooLarge) -> Response:
        n = settings.max_batch
        return problem(413, f"at most {n} transactions per batch", "transactions")

    @app.exception_handler(Shed)
    async def _shed(request: Request, _: Shed) -> Response:
        request.app.state.runtime.metrics.shed_of["queue_budget"].inc()
        return problem(
            503, "overloaded: waited past its queue budget, retry shortly", None, **_RETRY
        )

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> Response:
        return problem(exc.status_code, str(exc.detail), None, **(exc.headers or {}))

    # ---- routes
    @app.post("/predict", response_model=Prediction, openapi_extra=_body("Transaction"))
    async def predict(request: Request) -> Response:
        rt: Runtime = request.app.state.runtime
        _authorize(request, settings.api_key)
        tx = Transaction.model_validate_json(await request.body())
        (p,) = await rt.scorer.predict([tx.model_dump()], admission.arrival(request.scope))
        return _json(p)

    @app.post(
        "/predict/batch",
        response_model=BatchResponse,
        openapi_extra=_body("BatchRequest"),
        responses={413: {"model": Problem, "description": "more rows than max_batch"}},
    )
    async def predict_batch(request: Request) -> Response:
        rt: Runtime = request.app.state.runtime
        _authorize(request, settings.api_key)
        body = BatchRequest.model_validate_json(await request.body())
        if len(body.transactions) > settings.max_batch:
            raise TooLarge
        rows = [tx.model_dump() for tx in body.transactions]
        answers = await rt.scorer.predict(rows, admission.arrival(request.scope))
        return _json({"predictions": answers})

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
            with contextlib.suppress(Exception):
                await asyncio.wait_for(warm_up(rt), timeout=2)
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
        registry = rt.metrics.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi(app, settings)  # type: ignore[method-assign]
    return app


_RETRY = {"Retry-After": str(admission.RETRY_AFTER_S)}


def _body(model: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}},
        }
    }


def _openapi(app: FastAPI, settings: ServingSettings) -> dict[str, Any]:
    """FastAPI's document plus what the hand-parsed routes need: their request bodies,
    the Problem answers (401 with a key, 422, 503 with Retry-After) and the key scheme."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (Transaction, BatchRequest, Problem):
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js
    problem = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    retry = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    for path in ("/predict", "/predict/batch"):
        op = doc["paths"][path]["post"]
        op["responses"]["422"] = {"description": "invalid request", "content": problem}
        op["responses"]["503"] = {
            "description": "overloaded: retry after the given seconds",
            "content": problem,
            "headers": retry,
        }
        if settings.api_key is not None:
            op["responses"]["401"] = {"description": "missing or wrong key", "content": problem}
            op["security"] = [{"ApiKey": []}]
    if settings.metrics_key is not None:
        op = doc["paths"]["/metrics"]["get"]
        op["responses"]["401"] = {"description": "missing or wrong key", "content": problem}
        op["security"] = [{"ApiKey": []}]
    if settings.api_key is not None or settings.metrics_key is not None:
        doc["components"]["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
        }
    app.openapi_schema = doc
    return doc
