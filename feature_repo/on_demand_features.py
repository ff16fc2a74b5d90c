"""Request-time features, computed from the transaction and stored features.

``mode="python"`` runs the same function in training and serving without pandas
(DESIGN.md: the pandas mode costs milliseconds per online call). Inputs may be
missing (None) for an unknown user or pair; the outputs say so explicitly.
"""

from typing import Any

from data_sources import transaction_request
from feast import Field
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float64, Int64
from features import user_merchant_history, user_spending_stats


@on_demand_feature_view(
    sources=[transaction_request, user_spending_stats, user_merchant_history],
    schema=[
        Field(name="amount_to_avg_30d", dtype=Float64),
        Field(name="amount_to_max_30d", dtype=Float64),
        Field(name="is_new_merchant", dtype=Int64),
    ],
    mode="python",
    tags={"team": "fraud"},
    description=(
        "Amount relative to the user's 30-day average and maximum (-1 = no history), "
        "and whether the user has not paid this merchant in 90 days."
    ),
)
def transaction_context(inputs: dict[str, Any]) -> dict[str, Any]:
    # Feast ships this function's body alone, so helpers live inside it.
    def _ratio(amount: float | None, base: float | None) -> float:
        """amount / base, or -1.0 when the base is unknown or zero (no history)."""
        if amount is None or base is None or base <= 0:
            return -1.0
        return float(amount) / float(base)

    amounts = inputs["amount"]
    avgs = inputs["user_amount_avg_30d"]
    maxes = inputs["user_amount_max_30d"]
    pair_counts = inputs["user_merchant_txn_count_90d"]
    return {
        "amount_to_avg_30d": [_ratio(a, b) for a, b in zip(amounts, avgs, strict=True)],
        "amount_to_max_30d": [_ratio(a, b) for a, b in zip(amounts, maxes, strict=True)],
        "is_new_merchant": [int(not c) for c in pair_counts],
    }
