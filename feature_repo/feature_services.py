"""Feature services: the named input contracts models are trained and served on."""

from feast import FeatureService
from features import merchant_risk_stats, user_merchant_history, user_profile, user_spending_stats
from on_demand_features import transaction_context
from streaming_features import user_merchant_spread, user_velocity

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
