"""Request and response bodies of the predict API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from serving.event_rules import load_event_rules
from serving.settings import ServingSettings

# What a valid transaction is: the feature repo's declaration, which the batch job and the
# stream judge events by too.
_EVENT = load_event_rules(ServingSettings.model_fields["repo"].default)


def _integral(value: Any) -> Any:
    """JSON Schema's ``integer`` includes ``7.0``: take a float without a fraction as the
    integer it is; a bool, a string or ``7.5`` still fails strict validation."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Id = Annotated[int, BeforeValidator(_integral)]


class Transaction(BaseModel):
    """A payment to score."""

    # strict: JSON types as declared (no bool or string as a number); ints are numbers
    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: Id = Field(ge=_EVENT.id_min, le=_EVENT.id_max)
    merchant_id: Id = Field(ge=_EVENT.id_min, le=_EVENT.id_max)
    amount: float = Field(ge=_EVENT.amount_min, le=_EVENT.amount_max, allow_inf_nan=False)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    transactions: list[Transaction] = Field(min_length=1)


class Prediction(BaseModel):
    score: float | None = Field(description="fraud probability; null for a fallback decision")
    decision: Literal["approve", "review", "decline"]
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


class Problem(BaseModel):
    """Every error answer (401, 413, 422, 503): what went wrong, and the request field
    at fault when there is one."""

    detail: str
    field: str | None = Field(default=None, description="the request field at fault")


class Readiness(BaseModel):
    ready: bool
    warmed_up: bool
    model: str = Field(description="name and version served")
    model_backend: bool = Field(description="the backend answers its health call in budget")
    online_store: bool = Field(description="every tier answers")
    materialized: bool = Field(description="every view the model reads has been loaded")
    reasons: list[str] = Field(description="why not ready (empty when ready)")
