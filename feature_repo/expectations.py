"""Domain expectations per feature view: the one place to add one.

Derived from the Feast schema without being declared here (``validation.suites``):
every column exists with its declared type, entity keys and ``event_timestamp`` are never
null, one row per entity and timestamp, no timestamp in the future or before the
validated range, every day of the range has rows, and no feature is null unless its
``max_null_fraction`` below allows it (a request-time view's max, min and mean are null
wherever its window is empty: not bounded unless declared). Declare here what only a
person knows:

* ``columns``: per feature ``min`` / ``max`` (inclusive), ``in`` (allowed values),
  ``max_null_fraction`` (share of rows that may be null; default 0);
* ``min_rows_per_day``: the fewest rows a day of the view may hold;
* ``max_staleness``: how old the newest online value may be before the freshness check
  fails (default by the view's ``freshness`` tag, see ``MAX_STALENESS``).
"""

from datetime import timedelta

MAX_STALENESS = {
    "stream": timedelta(minutes=15),
    "daily": timedelta(days=2),
    "static": timedelta(days=7),
}

EXPECTATIONS = {
    "user_spending_stats": {
        "min_rows_per_day": 1,
        "columns": {
            "user_txn_count_1d": {"min": 0, "max": 10_000},
            "user_amount_sum_1d": {"min": 0, "max": 10_000_000},
            "user_txn_count_7d": {"min": 0, "max": 70_000},
            "user_amount_sum_7d": {"min": 0, "max": 70_000_000},
            "user_txn_count_30d": {"min": 0, "max": 300_000},
            # null when the user paid nothing in 30 days (their closing snapshot)
            "user_amount_avg_30d": {"min": 0, "max": 1_000_000, "max_null_fraction": 0.5},
            "user_amount_max_30d": {"min": 0, "max": 1_000_000, "max_null_fraction": 0.5},
        },
    },
    "merchant_risk_stats": {
        "min_rows_per_day": 1,
        "columns": {
            "merchant_txn_count_7d": {"min": 0},
            "merchant_amount_avg_7d": {"min": 0, "max": 1_000_000, "max_null_fraction": 0.5},
            "merchant_txn_count_30d": {"min": 0},
            "merchant_fraud_count_30d": {"min": 0},
            "merchant_fraud_rate_30d": {"min": 0, "max": 1, "max_null_fraction": 0.5},
        },
    },
    "user_velocity": {
        "min_rows_per_day": 1,
        "columns": {
            # request-time windows: 0 at the rows where the user's last tile left the window
            "user_txn_count_5m": {"min": 0, "max": 1_000},
            "user_amount_sum_5m": {"min": 0, "max": 10_000_000},
            "user_txn_count_1h": {"min": 0, "max": 10_000},
            "user_amount_sum_1h": {"min": 0, "max": 100_000_000},
        },
    },
    "user_amount_peak": {
        "min_rows_per_day": 1,
        # request-time: null where the user's hour is empty (any share: not bounded)
        "columns": {"user_amount_max_1h": {"min": 0, "max": 1_000_000}},
    },
    "user_merchant_spread": {
        "min_rows_per_day": 1,
        "columns": {"user_distinct_merchants_24h": {"min": 1, "max": 10_000}},
    },
    "user_merchant_history": {
        "min_rows_per_day": 1,
        "columns": {"user_merchant_txn_count_90d": {"min": 1}},
    },
    "user_profile": {
        "columns": {
            "user_credit_limit": {"min": 0, "max": 1_000_000},
            "user_kyc_level": {"in": [1, 2, 3]},
        },
    },
}
