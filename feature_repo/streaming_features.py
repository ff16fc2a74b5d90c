"""Real-time velocity features: pushed live by the streaming job, backfilled by Spark.

One row per transaction, stamped with its event time; each aggregate covers the
window ending at (and including) that transaction. Both views read the same push
source (one row carries every velocity column). The TTL equals the longest
window in the view, so a value is never served once its window has certainly
moved past it: minutes-class data stays in the one-hour view.
"""

from datetime import timedelta

from data_sources import user_velocity_push
from entities import user
from feast import FeatureView, Field
from feast.types import Float64, Int64

user_velocity = FeatureView(
    name="user_velocity",
    entities=[user],
    ttl=timedelta(minutes=60),
    schema=[
        Field(name="user_txn_count_5m", dtype=Int64),
        Field(name="user_amount_sum_5m", dtype=Float64),
        Field(name="user_txn_count_1h", dtype=Int64),
        Field(name="user_amount_sum_1h", dtype=Float64),
    ],
    source=user_velocity_push,
    online=True,
    tags={"online_store": "redis", "freshness": "stream", "team": "fraud"},
    description="Per-user transaction count and amount over the last 5 minutes and 1 hour.",
)

user_merchant_spread = FeatureView(
    name="user_merchant_spread",
    entities=[user],
    ttl=timedelta(hours=24),
    schema=[
        Field(name="user_distinct_merchants_24h", dtype=Int64),
    ],
    source=user_velocity_push,
    online=True,
    tags={"online_store": "redis", "freshness": "stream", "team": "fraud"},
    description="Distinct merchants a user paid in the last 24 hours.",
)
