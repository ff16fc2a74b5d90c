"""Real-time velocity features: computed live by the stream, backfilled by Spark.

One row per payment, stamped with its event time; each aggregate covers the window
ending at (and including) that payment. The TTL equals the longest window in the view,
so a value is never served once its window has certainly moved past it.
"""

from datetime import timedelta

from aggregated import PER_EVENT, Aggregation, aggregated_view
from data_sources import transactions
from entities import merchant, user

MINUTE, HOUR = timedelta(minutes=1), timedelta(hours=1)

user_velocity = aggregated_view(
    name="user_velocity",
    entities=[user],
    events=transactions,
    cadence=PER_EVENT,
    stream=True,
    aggregations=[
        Aggregation("amount", "count", 5 * MINUTE, name="user_txn_count_5m"),
        Aggregation("amount", "sum", 5 * MINUTE, name="user_amount_sum_5m"),
        Aggregation("amount", "count", HOUR, name="user_txn_count_1h"),
        Aggregation("amount", "sum", HOUR, name="user_amount_sum_1h"),
    ],
    ttl=HOUR,
    tags={"online_store": "redis", "freshness": "stream", "team": "fraud"},
    description="Per-user payment count and amount over the last 5 minutes and 1 hour.",
)

user_merchant_spread = aggregated_view(
    name="user_merchant_spread",
    entities=[user],
    events=transactions,
    cadence=PER_EVENT,
    stream=True,
    aggregations=[
        Aggregation("merchant_id", "count_distinct", 24 * HOUR, name="user_distinct_merchants_24h"),
    ],
    ttl=24 * HOUR,
    tags={"online_store": "redis", "freshness": "stream", "team": "fraud"},
    description="Distinct merchants a user paid in the last 24 hours.",
)

merchant_velocity = aggregated_view(
    name="merchant_velocity",
    entities=[merchant],
    events=transactions,
    cadence=PER_EVENT,
    stream=True,
    aggregations=[
        Aggregation("amount", "count", 5 * MINUTE, name="merchant_txn_count_5m"),
        Aggregation("amount", "sum", 5 * MINUTE, name="merchant_amount_sum_5m"),
        Aggregation("amount", "count", HOUR, name="merchant_txn_count_1h"),
        Aggregation("amount", "sum", HOUR, name="merchant_amount_sum_1h"),
    ],
    ttl=HOUR,
    tags={"online_store": "redis", "freshness": "stream", "team": "fraud"},
    description="Per-merchant payment count and amount over the last 5 minutes and 1 hour.",
)

user_amount_peak = aggregated_view(
    name="user_amount_peak",
    entities=[user],
    events=transactions,
    cadence=PER_EVENT,
    stream=True,
    aggregations=[Aggregation("amount", "max", HOUR, name="user_amount_max_1h")],
    ttl=HOUR,
    tags={"online_store": "redis", "freshness": "stream", "team": "fraud"},
    description="A user's largest payment in the last hour.",
)

user_merchant_velocity = aggregated_view(
    name="user_merchant_velocity",
    entities=[user, merchant],
    events=transactions,
    cadence=PER_EVENT,
    stream=True,
    aggregations=[
        Aggregation(
            "amount", "count_distinct", 24 * HOUR, name="user_merchant_distinct_amounts_24h"
        ),
    ],
    ttl=24 * HOUR,
    tags={"online_store": "redis", "freshness": "stream", "team": "fraud"},
    description="Distinct amounts a user paid one merchant in the last 24 hours (card testing).",
)
