"""Batch feature views, computed daily by the Spark jobs in ``pipelines.batch``.

Daily snapshots are stamped with the UTC midnight they are *as of* and summarise
the events strictly before it. A user (merchant) gets a snapshot row while it
had any transaction in the 31 days before the snapshot, so its last row is an
all-zero one that supersedes stale counts. The ``online_store`` tag names the
tier that serves the view; ``freshness`` its class.
"""

from datetime import timedelta

from data_sources import (
    merchant_risk_source,
    user_merchant_source,
    user_profile_source,
    user_spending_source,
)
from entities import merchant, user
from feast import FeatureView, Field
from feast.types import Float64, Int64, String

user_spending_stats = FeatureView(
    name="user_spending_stats",
    entities=[user],
    ttl=timedelta(days=2),
    schema=[
        Field(name="user_txn_count_1d", dtype=Int64),
        Field(name="user_amount_sum_1d", dtype=Float64),
        Field(name="user_txn_count_7d", dtype=Int64),
        Field(name="user_amount_sum_7d", dtype=Float64),
        Field(name="user_txn_count_30d", dtype=Int64),
        Field(name="user_amount_avg_30d", dtype=Float64),
        Field(name="user_amount_max_30d", dtype=Float64),
    ],
    source=user_spending_source,
    online=True,
    tags={"online_store": "redis", "freshness": "daily", "team": "fraud"},
    description="Per-user spending over the 1, 7 and 30 days before a daily snapshot.",
)

merchant_risk_stats = FeatureView(
    name="merchant_risk_stats",
    entities=[merchant],
    ttl=timedelta(days=2),
    schema=[
        Field(name="merchant_txn_count_7d", dtype=Int64),
        Field(name="merchant_amount_avg_7d", dtype=Float64),
        Field(name="merchant_txn_count_30d", dtype=Int64),
        Field(name="merchant_fraud_count_30d", dtype=Int64),
        Field(name="merchant_fraud_rate_30d", dtype=Float64),
    ],
    source=merchant_risk_source,
    online=True,
    tags={"online_store": "redis", "freshness": "daily", "team": "fraud"},
    description=(
        "Per-merchant volume and confirmed fraud. Fraud counts only labels known "
        "(label_ts) before the snapshot, so no future label leaks into training."
    ),
)

user_merchant_history = FeatureView(
    name="user_merchant_history",
    entities=[user, merchant],
    ttl=timedelta(days=90),
    schema=[
        Field(name="user_merchant_txn_count_90d", dtype=Int64),
    ],
    source=user_merchant_source,
    online=True,
    tags={"online_store": "scylla", "freshness": "daily", "team": "fraud"},
    description=(
        "Transactions of this user at this merchant in the 90 days up to and "
        "including each transaction (one row per transaction); missing = never seen."
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
