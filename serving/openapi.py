"""The service's OpenAPI document: FastAPI's, plus the predict routes that
``serving.predict_routes`` serves in front of FastAPI (so FastAPI doesn't see them), each
served model's with its own request bodies and answers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from serving.schemas import BatchResponse, Prediction, Problem, Ranking
from serving.settings import ServingSettings

if TYPE_CHECKING:
    from serving.app import Runtime


def openapi_document(app: FastAPI, settings: ServingSettings) -> dict[str, Any]:
    """FastAPI's document plus the predict routes (served by ``PredictRoutes``, so FastAPI
    doesn't see them): each served model's routes with its own request bodies, the
    ``/predict`` alias with the default model's, their answers — the Problem answers (401
    with a key, 413, 415, 422, 503 with Retry-After) — and the key scheme."""
    if app.openapi_schema:
        return app.openapi_schema
    rt: Runtime = app.state.runtime
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    bodies: list[type[BaseModel]] = [Prediction, BatchResponse, Ranking, Problem]
    for served in rt.models.values():
        bodies += [served.request, served.batch, *([served.rank] if served.rank else [])]
    for model in bodies:
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js

    def content(model: str) -> dict[str, Any]:
        return {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}

    retry = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    routes: dict[str, tuple[str, str, str, str]] = {}
    for name, served in rt.models.items():
        one, many = served.request.__name__, served.batch.__name__
        base = f"/v1/models/{name}/predict"
        routes[base] = (f"Predict {name}", f"Score one request with {name}", one, "Prediction")
        routes[base + "/batch"] = (f"Predict batch {name}", "Score many", many, "BatchResponse")
        if served.rank is not None:
            key = served.meta.candidate_key
            routes[f"/v1/models/{name}/rank"] = (
                f"Rank {name}",
                f"Score candidate {key}s together; answer them best first",
                served.rank.__name__,
                "Ranking",
            )
    if rt.default is not None:
        one, many = rt.default.request.__name__, rt.default.batch.__name__
        alias = f"Alias of /v1/models/{rt.default.meta.model_name}/predict"
        routes["/predict"] = ("Predict", alias, one, "Prediction")
        routes["/predict/batch"] = ("Predict Batch", alias + "/batch", many, "BatchResponse")
    for path, (summary, description, request, answer) in routes.items():
        op: dict[str, Any] = {
            "summary": summary,
            "description": description,
            "operationId": summary.lower().replace(" ", "_"),
            "requestBody": {"required": True, "content": content(request)},
            "responses": {
                "200": {"description": "the prediction(s)", "content": content(answer)},
                "415": {
                    "description": "a compressed body (Content-Encoding): send it uncompressed",
                    "content": content("Problem"),
                },
                "422": {"description": "invalid request", "content": content("Problem")},
                "503": {
                    "description": "overloaded: retry after the given seconds",
                    "content": content("Problem"),
                    "headers": retry,
                },
            },
        }
        if path.endswith(("/batch", "/rank")):
            op["responses"]["413"] = {
                "description": "more rows than max_batch, or candidates than declared",
                "content": content("Problem"),
            }
        if settings.api_key is not None:
            op["responses"]["401"] = {
                "description": "missing or wrong key",
                "content": content("Problem"),
            }
            op["security"] = [{"ApiKey": []}]
        doc["paths"][path] = {"post": op}
    keyed = [("/metrics", settings.metrics_key), ("/v1/models", settings.api_key)]
    for path, key in keyed:
        if key is not None:
            op = doc["paths"][path]["get"]
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
