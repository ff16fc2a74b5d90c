"""The online predict service: request -> feature vector -> model -> decision.

Thin routes over a ``Runtime`` built once at start-up (FastAPI lifespan): the
FeatureService's fast-path reader, the model's metadata (refused if the registry can't
provide its features), the model backend, breakers around the online store and the
model, warm-up before ``/ready``, and Prometheus metrics. Errors are mapped once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from serving import decision
from serving.model_backend import ModelBackend, OnnxBackend, TritonBackend
from serving.model_repository import ModelMetadata, feature_matrix, load_metadata, onnx_path
from serving.online_features import OnlineFeatures, served
from serving.resilience import CircuitBreaker, InFlight, Overloaded
from serving.schemas import BatchRequest, BatchResponse, Prediction, Problem, Transaction
from serving.settings import ServingSettings

STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class StartupError(Exception):
    """The service cannot serve this model with this feature repo."""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stage = Histogram(
            "hotpath_stage_seconds",
            "Latency per stage",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "hotpath_decisions_total", "Decisions", ["decision", "fallback"], registry=r
        )
        self.fallbacks = Counter(
            "hotpath_fallbacks_total", "Fallback decisions", ["cause"], registry=r
        )
        self.missing = Counter(
            "hotpath_missing_features_total", "Features served as defaults", ["feature"], registry=r
        )
        self.age = Histogram(
            "hotpath_feature_age_seconds",
            "Age of served feature values",
            ["feature_view"],
            buckets=(1, 10, 60, 600, 3600, 86400, 172800),
            registry=r,
        )
        self.breaker = Gauge(
            "hotpath_breaker_state",
            "0 closed, 1 open, 2 half-open (the worst over workers)",
            ["breaker"],
            registry=r,
            multiprocess_mode="max",
        )
        self.shed = Counter("hotpath_shed_total", "Requests refused with 503", registry=r)


@dataclass
class Runtime:
    settings: ServingSettings
    features: OnlineFeatures
    meta: ModelMetadata
    backend: ModelBackend
    store_breaker: CircuitBreaker
    model_breaker: CircuitBreaker
    in_flight: InFlight
    metrics: Metrics
    ready: bool = False


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
    return Runtime(
        settings,
        reader,
        meta,
        backend,
        CircuitBreaker("online_store", settings.breaker_failures, settings.breaker_reset_s),
        CircuitBreaker("model", settings.breaker_failures, settings.breaker_reset_s),
        InFlight(settings.max_in_flight),
        Metrics(),
    )


async def warm_up(rt: Runtime, rounds: int = 20) -> None:
    """Dummy inferences so the first real request pays no lazy initialisation."""
    x = np.array([[f.default for f in rt.meta.features]], dtype=np.float32)
    for _ in range(rounds):
        await rt.backend.predict(x)
    dummy = Transaction(user_id=0, merchant_id=0, amount=1.0)
    for size in (1, 1, 1, 32):  # the whole request path, metrics and response models included
        await score(rt, [dummy] * size)
    rt.store_breaker.success()  # warm-up calls don't count towards the breakers
    rt.model_breaker.success()
    rt.ready = True


async def score(rt: Runtime, txs: list[Transaction]) -> list[Prediction]:
    """Features (fast path, TTL applied), model under its deadline, decisions."""
    s, m = rt.settings, rt.metrics
    t0 = time.perf_counter()
    rows = [t.model_dump() for t in txs]
    vectors, store_error = None, None
    if rt.store_breaker.allow():
        # Inline: a lookup is one local round trip (~50 µs), cheaper than a thread hop. The
        # store's socket timeout is the features budget, so a hung store can't hold the
        # loop longer, and the breaker stops asking after a few misses.
        try:
            vectors = rt.features.read(rows)
            if time.perf_counter() - t0 > s.features_budget_ms / 1000:
                raise TimeoutError
            rt.store_breaker.success()
        except (TimeoutError, BlockingIOError):
            vectors = None
            rt.store_breaker.failure()
            store_error = "online_store_deadline"
        except Exception as e:  # a store outage must not fail the request
            rt.store_breaker.failure()
            store_error = type(e).__name__
    now = time.time()
    ttls = rt.features.ttl_of()
    values_list: list[dict[str, Any]] = []
    ages_list: list[dict[str, float | None]] = []
    for i in range(len(rows)):
        ages: dict[str, float | None] = dict.fromkeys(rt.features.view_names)
        ages_list.append(ages)
        if vectors is None:
            values_list.append({})
            continue
        served(vectors[i], ttls, now)
        for view in rt.features.views:
            first = view.features[0]
            ts = vectors[i].ts.get(first)
            if ts is not None and vectors[i].values.get(first) is not None:
                ages[view.name] = age = round(max(0.0, now - ts), 3)
                m.age.labels(view.name).observe(age)
        values_list.append(vectors[i].values)
    t1 = time.perf_counter()
    m.stage.labels("features").observe(t1 - t0)

    scores, cause = None, None
    if vectors is None:
        cause = store_error or "online_store_breaker_open"
    elif not rt.model_breaker.allow():
        cause = "breaker_open"
    else:
        x = feature_matrix(
            {n: [v.get(n) for v in values_list] for n in rt.meta.feature_names}, rt.meta.features
        )
        try:
            scores = await asyncio.wait_for(rt.backend.predict(x), s.model_budget_ms / 1000)
            rt.model_breaker.success()
        except TimeoutError:
            rt.model_breaker.failure()
            cause = "model_deadline"
        except Exception:
            rt.model_breaker.failure()
            cause = "model_error"
    t2 = time.perf_counter()
    m.stage.labels("model").observe(t2 - t1)
    for b in (rt.store_breaker, rt.model_breaker):
        m.breaker.labels(b.name).set(b.state.value)

    out = []
    for i, (tx, values, ages) in enumerate(zip(txs, values_list, ages_list, strict=True)):
        missing = [n for n in rt.meta.feature_names if values.get(n) is None]
        for n in missing:
            m.missing.labels(n).inc()
        if scores is not None:
            p = float(scores[i])
            verdict = decision.decide(p, s.review_threshold, s.decline_threshold)
            why = decision.reasons(values)
        else:
            p, verdict = None, decision.fallback(values, tx.amount)
            why = [f"fallback:{cause or store_error}", *decision.reasons(values)]
            m.fallbacks.labels(cause or "unknown").inc()
        m.decisions.labels(verdict, str(p is None).lower()).inc()
        out.append(
            Prediction(
                score=p,
                decision=verdict,
                reasons=why,
                fallback=p is None,
                model=rt.meta.model_name,
                model_version=rt.meta.version,
                missing_features=missing,
                feature_age_s=ages,
                latency_ms={},
            )
        )
    t3 = time.perf_counter()
    m.stage.labels("postprocess").observe(t3 - t2)
    timing = {"features": (t1 - t0) * 1000, "model": (t2 - t1) * 1000, "total": (t3 - t0) * 1000}
    for p in out:
        p.latency_ms = {k: round(v, 3) for k, v in timing.items()}
    return out


async def get_runtime(request: Request) -> Runtime:  # async: no thread-pool hop
    return request.app.state.runtime


async def authorized(
    rt: Annotated[Runtime, Depends(get_runtime)],
    x_api_key: Annotated[str | None, Header()] = None,
) -> Runtime:
    expected = rt.settings.api_key
    if expected is not None and x_api_key != expected.get_secret_value():
        raise HTTPException(401, "missing or wrong X-API-Key")
    return rt


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
AuthorizedDep = Annotated[Runtime, Depends(authorized)]


def create_app(settings: ServingSettings | None = None) -> FastAPI:
    settings = settings or ServingSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.runtime = build_runtime(settings)
        with contextlib.suppress(Exception):  # not ready: /ready says so, /predict falls back
            await warm_up(app.state.runtime)
        # Feast, protobuf and ONNX Runtime leave ~10^6 long-lived objects; a full
        # collection walking them stalls every in-flight request for tens of ms. Move
        # them out of the collector's sight once they're loaded.
        gc.collect()
        gc.freeze()
        yield
        await app.state.runtime.backend.close()

    app = FastAPI(
        title="hotpath",
        version="0.1.0",
        lifespan=lifespan,
        responses={401: {"model": Problem}, 503: {"model": Problem}},
    )

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse({"detail": "request body is not valid JSON"}, status_code=422)
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(
            {"detail": f"{where}: {first.get('msg', 'invalid request')}".strip(": ")},
            status_code=422,
        )

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, _: Overloaded) -> JSONResponse:
        request.app.state.runtime.metrics.shed.inc()
        return JSONResponse(
            {"detail": "overloaded, retry shortly"}, status_code=503, headers={"Retry-After": "1"}
        )

    @app.post("/predict", response_model=Prediction)
    async def predict(tx: Transaction, rt: AuthorizedDep) -> Prediction:
        with rt.in_flight:
            (p,) = await score(rt, [tx])
            return p

    @app.post("/predict/batch", response_model=BatchResponse)
    async def predict_batch(body: BatchRequest, rt: AuthorizedDep) -> BatchResponse:
        if len(body.transactions) > rt.settings.max_batch:
            raise HTTPException(413, f"at most {rt.settings.max_batch} transactions per batch")
        with rt.in_flight:
            return BatchResponse(predictions=await score(rt, body.transactions))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/ready")
    async def ready(rt: RuntimeDep) -> JSONResponse:
        if not rt.ready:  # e.g. the model backend was down at start: try again now
            with contextlib.suppress(Exception):
                await asyncio.wait_for(warm_up(rt, rounds=3), timeout=2)
        store_ok = rt.store_breaker.state.value == 0
        ok = rt.ready and store_ok
        body = {
            "ready": ok,
            "warmed_up": rt.ready,
            "online_store": store_ok,
            "model": f"{rt.meta.model_name} v{rt.meta.version}",
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(rt: RuntimeDep) -> Response:
        registry = rt.metrics.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # every uvicorn worker's values
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
