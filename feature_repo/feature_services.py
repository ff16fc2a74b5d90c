"""Feature services: the named input contracts models are trained and served on."""

from feast import FeatureService
from features import merchant_risk_stats, user_merchant_history, user_profile, user_spending_stats
from on_demand_features import transaction_context
from streaming_features import (
    merchant_velocity,
    user_amount_peak,
    user_merchant_spread,
    user_merchant_velocity,
    user_velocity,
)

fraud_detection_v1 = FeatureService(
    name="fraud_detection_v1",
    features=[
        user_spending_stats,
        merchant_risk_stats,
        user_merchant_history,
        user_profile[["user_credit_limit", "user_kyc_level"]],
        user_velocity,
        user_merchant_spread,
        transaction_context,
    ],
    tags={"model": "fraud", "owner": "fraud-team"},
    description="Card-fraud model inputs: spending, merchant risk, velocity, request context.",
)

fraud_detection_v2 = FeatureService(
    name="fraud_detection_v2",
    features=[
        user_spending_stats,
        merchant_risk_stats,
        user_merchant_history,
        user_profile[["user_credit_limit", "user_kyc_level"]],
        user_velocity,
        user_merchant_spread,
        merchant_velocity,
        user_amount_peak,
        user_merchant_velocity,
        transaction_context,
    ],
    tags={"model": "fraud", "owner": "fraud-team"},
    description="v1 plus merchant velocity, a user's peak amount and pair-level card testing.",
)
