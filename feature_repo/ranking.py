"""Candidate ranking: which merchants to show a user. Its labels, its request context and
its input contract, over the same user, merchant and user x merchant views fraud uses.

A ranking request carries one user, the candidate merchants and the session's context; each
candidate is one (user_id, merchant_id) row of ``merchant_ranking_v1``. The labels are the
recommendation impressions: a candidate shown to a user at ``event_timestamp`` is positive
(``purchased``) when the user paid that merchant within 24 hours, known at ``label_ts``
(the end of that horizon). The model itself is declared in ``models.py``.
"""

from typing import Any

from data_sources import RAW_DIR
from feast import FeatureService, Field, RequestSource
from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Int64, String
from features import merchant_risk_stats, user_merchant_history, user_profile, user_spending_stats
from streaming_features import merchant_velocity, user_merchant_spread, user_velocity

# One row per candidate shown: impression_id (the slate), position, user_id, merchant_id,
# platform, event_timestamp (when shown), purchased (the label), label_ts (when known).
ranking_impressions = SparkSource(
    name="ranking_impressions",
    path=str(RAW_DIR / "impressions"),
    file_format="parquet",
    timestamp_field="event_timestamp",
    date_partition_column="date",
    description=(
        "Merchants shown to a user, one row per candidate; purchased: the user paid that "
        "merchant within 24 h of the impression, known at label_ts."
    ),
    tags={"team": "ranking"},
    owner="ranking-team",
)

# The session the candidates are ranked for, sent with the request.
ranking_request = RequestSource(
    name="ranking_request",
    schema=[Field(name="platform", dtype=String)],
    description="The surface the user is on: app or web.",
    tags={"team": "ranking"},
    owner="ranking-team",
)


@on_demand_feature_view(
    sources=[ranking_request],
    schema=[Field(name="is_app", dtype=Int64)],
    mode="python",
    tags={"team": "ranking"},
    owner="ranking-team",
    description="Whether the session is in the app (app sessions more often end in a payment).",
)
def ranking_context(inputs: dict[str, Any]) -> dict[str, Any]:
    return {"is_app": [int(p == "app") for p in inputs["platform"]]}


merchant_ranking_v1 = FeatureService(
    name="merchant_ranking_v1",
    features=[
        user_spending_stats,
        user_profile[["user_credit_limit", "user_kyc_level"]],
        user_velocity,
        user_merchant_spread,
        merchant_risk_stats,
        merchant_velocity,
        user_merchant_history,
        ranking_context,
    ],
    tags={"model": "ranking", "owner": "ranking-team"},
    description=(
        "Merchant ranking inputs: the user's activity, the merchant's volume and risk, the "
        "pair's payment history, and the session's platform."
    ),
)
