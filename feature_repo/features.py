"""Batch feature views: daily snapshots and per-payment history, computed by Spark.

Daily snapshots are stamped with the UTC midnight they are *as of* and summarise the
payments strictly before it; an entity gets one while it had a payment in the longest
window plus a day, so its last row is an all-empty one that supersedes stale counts. The
``online_store`` tag names the tier that serves the view; ``freshness`` its class.
"""

from datetime import timedelta

from aggregated import DAILY, PER_EVENT, Aggregation, aggregated_view
from data_sources import transactions, user_profile_source
from entities import merchant, user
from feast import FeatureView, Field
from feast.types import Float64, Int64, String

DAY = timedelta(days=1)

user_spending_stats = aggregated_view(
    name="user_spending_stats",
    entities=[user],
    events=transactions,
    cadence=DAILY,
    aggregations=[
        Aggregation("amount", "count", DAY, name="user_txn_count_1d"),
        Aggregation("amount", "sum", DAY, name="user_amount_sum_1d"),
        Aggregation("amount", "count", 7 * DAY, name="user_txn_count_7d"),
        Aggregation("amount", "sum", 7 * DAY, name="user_amount_sum_7d"),
        Aggregation("amount", "count", 30 * DAY, name="user_txn_count_30d"),
        Aggregation("amount", "mean", 30 * DAY, name="user_amount_avg_30d"),
        Aggregation("amount", "max", 30 * DAY, name="user_amount_max_30d"),
    ],
    ttl=2 * DAY,
    tags={"online_store": "redis", "freshness": "daily", "team": "fraud"},
    description="Per-user spending over the 1, 7 and 30 days before a daily snapshot.",
)

merchant_risk_stats = aggregated_view(
    name="merchant_risk_stats",
    entities=[merchant],
    events=transactions,
    cadence=DAILY,
    aggregations=[
        Aggregation("amount", "count", 7 * DAY, name="merchant_txn_count_7d"),
        Aggregation("amount", "mean", 7 * DAY, name="merchant_amount_avg_7d"),
        Aggregation("amount", "count", 30 * DAY, name="merchant_txn_count_30d"),
        Aggregation("is_fraud", "sum", 30 * DAY, name="merchant_fraud_count_30d"),
        Aggregation("is_fraud", "mean", 30 * DAY, name="merchant_fraud_rate_30d"),
    ],
    # a fraud label counts only once known (label_ts before the snapshot): no future leaks
    known_at={"merchant_fraud_count_30d": "label_ts", "merchant_fraud_rate_30d": "label_ts"},
    ttl=2 * DAY,
    tags={"online_store": "redis", "freshness": "daily", "team": "fraud"},
    description="Per-merchant volume and confirmed fraud (labels known before the snapshot).",
)

user_merchant_history = aggregated_view(
    name="user_merchant_history",
    entities=[user, merchant],
    events=transactions,
    cadence=PER_EVENT,
    aggregations=[
        Aggregation("amount", "count", 90 * DAY, name="user_merchant_txn_count_90d"),
    ],
    ttl=90 * DAY,
    tags={"online_store": "scylla", "freshness": "daily", "team": "fraud"},
    description=(
        "Payments of this user at this merchant in the 90 days up to and including each "
        "payment (one row per payment); missing = never seen."
    ),
)

user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(days=365),
    schema=[
        Field(name="user_home_country", dtype=String),
        Field(name="user_credit_limit", dtype=Float64),
        Field(name="user_kyc_level", dtype=Int64),
    ],
    source=user_profile_source,
    online=True,
    tags={"online_store": "scylla", "freshness": "static", "team": "fraud"},
    description="Slowly changing card-holder profile, one row per profile update.",
)
