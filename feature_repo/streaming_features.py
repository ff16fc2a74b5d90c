"""Real-time velocity features: computed live by the stream, backfilled by Spark.

Each view says which window semantics it uses (its description says it too):

* **request time** (``request_time=MINUTE``: ``user_velocity``, ``merchant_velocity``,
  ``user_amount_peak``): the windows end at the *request*. Serving computes "payments in
  the last 5 minutes" at the instant it scores, from the entity's one-minute tiles, so a
  user who paid at 12:00 has a 5-minute count of 0 at 12:30 (not 1, not missing), and a
  burst after a quiet period counts at once. Resolution: a window ``W`` at ``t`` counts the
  payments in ``[floor(t/1min)·1min - W + 1min, t]``: never one older than ``W``, and it
  may miss up to one minute at its oldest edge. Training rows are computed the same way at
  each label's instant. The TTL (the longest window) only bounds how long Feast's own SDK
  serves the last row.
* **last event** (``user_merchant_spread``, ``user_merchant_velocity``: distinct counts,
  which tiles cannot hold): one row per payment, each aggregate over the window ending at
  (and including) that payment, served until the TTL, the longest window, so a value is
  never served once its window has certainly moved past it.
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
    request_time=MINUTE,
    tags={"online_store": "redis", "freshness": "stream", "team": "fraud"},
    description=(
        "Per-user payment count and amount over the last 5 minutes and 1 hour, "
        "as of the request (request-time windows, 1-minute tiles)."
    ),
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
    description=(
        "Distinct merchants a user paid in the 24 hours up to their last payment "
        "(last-event window)."
    ),
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
    request_time=MINUTE,
    tags={"online_store": "redis", "freshness": "stream", "team": "fraud"},
    description=(
        "Per-merchant payment count and amount over the last 5 minutes and 1 hour, "
        "as of the request (request-time windows, 1-minute tiles)."
    ),
)

user_amount_peak = aggregated_view(
    name="user_amount_peak",
    entities=[user],
    events=transactions,
    cadence=PER_EVENT,
    stream=True,
    aggregations=[Aggregation("amount", "max", HOUR, name="user_amount_max_1h")],
    ttl=HOUR,
    request_time=MINUTE,
    tags={"online_store": "redis", "freshness": "stream", "team": "fraud"},
    description=(
        "A user's largest payment in the last hour, as of the request (request-time "
        "window, 1-minute tiles; none in the hour: missing)."
    ),
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
    description=(
        "Distinct amounts a user paid one merchant in the 24 hours up to their last payment "
        "there (last-event window; card testing)."
    ),
)
