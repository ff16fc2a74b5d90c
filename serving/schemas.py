"""Request and response bodies of the predict API.

Each model's request body is derived from its FeatureService (:func:`request_shape`: its
entities' join keys, then its request sources' fields, typed as Feast declares them) with
the bounds its declaration gives, recorded in the model's metadata; :func:`request_models`
builds the pydantic models at start-up, named after the model, so each is in the OpenAPI
document under its own name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from annotated_types import Interval
from pydantic import AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, create_model

# Feast value/field types -> the JSON type a request gives
_PYTHON = {"INT32": int, "INT64": int, "FLOAT": float, "DOUBLE": float, "STRING": str,
           "BOOL": bool, "Int32": int, "Int64": int, "Float32": float, "Float64": float,
           "String": str, "Bool": bool}  # fmt: skip
_STRICT = ConfigDict(extra="forbid", strict=True)
_RANGE = {"INT32": (-(2**31), 2**31 - 1), "INT64": (-(2**63), 2**63 - 1)}  # integer types


@dataclass(frozen=True)
class RequestField:
    """One field of a model's request: an entity join key or a request-source field."""

    name: str
    dtype: str  # the Feast type's name, e.g. "INT64" (entity) or "Float64" (field)
    entity: bool
    ge: float | None = None
    le: float | None = None


def request_shape(store: Any, service: str) -> list[tuple[str, str, bool]]:
    """``(name, Feast type, is an entity key)`` of every field a request for ``service``
    carries: the join keys of its views' entities (first appearance first), then the fields
    of the request sources its on-demand views read. From the registry."""
    fs = store.get_feature_service(service)
    odfvs = {v.name: v for v in store.list_on_demand_feature_views()}
    entities = {e.name: e for e in store.list_entities()}
    keys: dict[str, tuple[str, str, bool]] = {}
    fields: dict[str, tuple[str, str, bool]] = {}
    for proj in fs.feature_view_projections:
        if proj.name in odfvs:
            for source in odfvs[proj.name].source_request_sources.values():
                for f in source.schema:
                    fields.setdefault(f.name, (f.name, str(f.dtype), False))
            continue
        for name in store.get_feature_view(proj.name).entities:
            e = entities[name]
            key = proj.join_key_map.get(e.join_key, e.join_key)
            keys.setdefault(key, (key, e.value_type.name, True))
    return [*keys.values(), *(f for n, f in fields.items() if n not in keys)]


def _integral(value: Any) -> Any:
    """JSON Schema's ``integer`` includes ``7.0``: take a float without a fraction as the
    integer it is; a bool, a string or ``7.5`` still fails strict validation."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.replace("-", "_").split("_"))


def _typed(f: RequestField) -> Any:
    """The field's type with its validation: strict JSON type, bounds, finite floats."""
    kind = _PYTHON.get(f.dtype)
    if kind is None:
        raise ValueError(f"request field {f.name!r}: unsupported type {f.dtype}")
    if kind is int:
        # within the declared bounds and always within the Feast type's range: a value the
        # store's key encoding can't hold is a 422, not a failed batch
        lo, hi = _RANGE[f.dtype.upper()]
        lo, hi = (lo if f.ge is None else max(lo, f.ge)), (hi if f.le is None else min(hi, f.le))
        return Annotated[int, Interval(ge=lo, le=hi), BeforeValidator(_integral)]
    if kind is float:
        return Annotated[float, AllowInfNan(False), Interval(ge=f.ge, le=f.le)]
    return kind


def request_models(
    model: str, fields: list[RequestField], batch_field: str
) -> tuple[type[BaseModel], type[BaseModel]]:
    """The strict request body of ``model`` (JSON types as declared, no unknown fields,
    the declared bounds) and its batch body (``{batch_field: [...]}``)."""
    name = camel(model)
    one = create_model(
        f"{name}Request", __config__=_STRICT, **{f.name: (_typed(f), ...) for f in fields}
    )
    one.__doc__ = f"One request to score with {model}."
    batch = create_model(
        f"{name}BatchRequest", __config__=_STRICT, **{batch_field: (list[one], Field(min_length=1))}
    )
    return one, batch


def rank_model(model: str, fields: list[RequestField], candidate_key: str) -> type[BaseModel]:
    """The body of ``POST /v1/models/{model}/rank``: every field of ``model``'s request but
    ``candidate_key``, which comes as the ``candidates`` list, and ``top_k``."""
    spec: dict[str, Any] = {f.name: (_typed(f), ...) for f in fields if f.name != candidate_key}
    (key,) = [f for f in fields if f.name == candidate_key]
    spec["candidates"] = (list[_typed(key)], Field(min_length=1))  # type: ignore[misc]
    spec["top_k"] = (int | None, Field(default=None, ge=1, description="answer the best k"))
    ranked = create_model(f"{camel(model)}RankRequest", __config__=_STRICT, **spec)
    ranked.__doc__ = f"Candidates ({candidate_key}) to rank with {model}."
    return ranked


class Prediction(BaseModel):
    score: float | None = Field(description="the model's score; null for a fallback decision")
    decision: str = Field(description="from the model's declared policy")
    reasons: list[str]
    fallback: bool = Field(description="true when the rule-based fallback decided")
    model: str
    model_version: int
    missing_features: list[str] = Field(description="features replaced by their defaults")
    feature_age_s: dict[str, float | None] = Field(
        description="per feature view, seconds since the served value's event time "
        "(null: no value, or older than the view's TTL)"
    )
    latency_ms: dict[str, float]


class BatchResponse(BaseModel):
    predictions: list[Prediction]


class RankedCandidate(BaseModel):
    candidate: int | str = Field(description="the candidate's key, as given")
    score: float | None
    decision: str
    reasons: list[str]
    missing_features: list[str]


class Ranking(BaseModel):
    """Candidates by score, best first (fallback: in the order given)."""

    ranked: list[RankedCandidate]
    fallback: bool
    model: str
    model_version: int
    latency_ms: dict[str, float]


class ServedModel(BaseModel):
    """One entry of ``GET /v1/models``."""

    name: str
    version: int
    versions: list[int] = Field(description="every published version")
    feature_service: str
    task: str
    default: bool = Field(description="also served at /predict and /predict/batch")
    request_schema: dict[str, Any] = Field(description="JSON Schema of one request")
    batch_field: str
    decisions: list[str]
    candidate_key: str | None = Field(description="the key ranked at .../rank, if any")
    rank_schema: dict[str, Any] | None = Field(description="JSON Schema of a rank request")


class Models(BaseModel):
    models: list[ServedModel]


class Problem(BaseModel):
    """Every error answer (401, 404, 413, 422, 503): what went wrong, and the request field
    at fault when there is one."""

    detail: str
    field: str | None = Field(default=None, description="the request field at fault")


class Readiness(BaseModel):
    ready: bool
    warmed_up: bool
    model: str = Field(description="names and versions served")
    model_backend: bool = Field(description="every backend answers its health call in budget")
    online_store: bool = Field(description="every tier answers")
    materialized: bool = Field(description="every view the models read has been loaded")
    reasons: list[str] = Field(description="why not ready (empty when ready)")
