"""Request and response bodies of the predict API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_AMOUNT = 1_000_000.0


class Transaction(BaseModel):
    """A payment to score."""

    model_config = ConfigDict(extra="forbid")

    user_id: int = Field(ge=0, le=2**63 - 1)
    merchant_id: int = Field(ge=0, le=2**63 - 1)
    amount: float = Field(gt=0, le=MAX_AMOUNT, allow_inf_nan=False)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
    detail: str
