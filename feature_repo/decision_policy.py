"""The fraud model's decision policy: reason codes from feature values, and the rule that
decides when the model is late or down. Plain declarations, read by path by serving
(``serving/decision.py``), like ``transaction_event.py``.

A reason is ``(code, feature, comparison, threshold)``; comparisons are ``>``, ``>=``,
``<``, ``<=``, ``==`` (false when the value is missing) and ``missing``.
"""

REASONS = [
    ("amount_far_above_usual", "amount_to_avg_30d", ">", 5),
    ("new_merchant", "is_new_merchant", "==", 1),
    ("velocity_burst", "user_txn_count_5m", ">=", 3),
    ("risky_merchant", "merchant_fraud_rate_30d", ">", 0.05),
    ("no_history", "user_txn_count_30d", "missing", None),
]

# Without a score: decline when every code of any one set is present; else review when a
# reason other than these is present, or the amount is at least REVIEW_AMOUNT; else approve.
FALLBACK_DECLINE_WHEN = [{"amount_far_above_usual", "new_merchant"}, {"velocity_burst"}]
FALLBACK_REVIEW_IGNORES = {"no_history"}
FALLBACK_REVIEW_AMOUNT = 1_000
