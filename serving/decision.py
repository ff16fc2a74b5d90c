"""From a score (or, without one, from rules) to approve / review / decline, with reasons."""

from __future__ import annotations

from typing import Any, Literal

Decision = Literal["approve", "review", "decline"]


def decide(score: float, review: float, decline: float) -> Decision:
    if score >= decline:
        return "decline"
    if score >= review:
        return "review"
    return "approve"


def reasons(values: dict[str, Any]) -> list[str]:
    """Reason codes a reviewer understands, from the features behind the decision."""
    out = []
    ratio = values.get("amount_to_avg_30d")
    if ratio is not None and ratio > 5:
        out.append("amount_far_above_usual")
    if values.get("is_new_merchant") == 1:
        out.append("new_merchant")
    if (values.get("user_txn_count_5m") or 0) >= 3:
        out.append("velocity_burst")
    if (values.get("merchant_fraud_rate_30d") or 0) > 0.05:
        out.append("risky_merchant")
    if values.get("user_txn_count_30d") is None:
        out.append("no_history")
    return out


def fallback(values: dict[str, Any], amount: float) -> Decision:
    """The rule used when the model is unavailable or late: conservative, explainable."""
    codes = set(reasons(values))
    if {"amount_far_above_usual", "new_merchant"} <= codes or "velocity_burst" in codes:
        return "decline"
    if codes - {"no_history"} or amount >= 1_000:
        return "review"
    return "approve"
