"""The models trained and served on this repo's FeatureServices: one declaration each.

``hotpath train --model NAME`` builds the point-in-time training set from the declaration,
trains, exports ONNX and publishes a version recording the request schema (derived from the
FeatureService: its entities' join keys and its request sources' fields, with the bounds
below), the features with their defaults, and the decision policy. ``hotpath serve`` serves
every published model at ``/v1/models/{name}/predict``; the one declared ``default`` also at
``/predict``. Types: ``model_declaration.py``.
"""

from dataclasses import replace

from data_sources import transaction_history
from feature_services import fraud_detection_v1, fraud_detection_v2
from model_declaration import (
    BINARY,
    RANKING,
    Condition,
    DecisionPolicy,
    FallbackRule,
    Labels,
    Model,
    Reason,
    Training,
)
from ranking import merchant_ranking_v1, ranking_impressions
from transaction_event import AMOUNT_MAX, AMOUNT_MIN, ID_MAX, ID_MIN

# A payment is labelled once its outcome is known (label_ts); its features are what a
# scoring call saw one microsecond before it (its own per-event rows exist only after it).
PAYMENT_LABELS = Labels(
    source=transaction_history,
    label="is_fraud",
    known_at="label_ts",
    order_by=("transaction_id",),
    request_id="transaction_id",  # a payment is scored with X-Request-ID: its transaction_id
)

# What a valid payment is (transaction_event.py), as the batch job and the stream judge it.
PAYMENT_BOUNDS = {
    "user_id": (ID_MIN, ID_MAX),
    "merchant_id": (ID_MIN, ID_MAX),
    "amount": (AMOUNT_MIN, AMOUNT_MAX),
}

FRAUD_POLICY = DecisionPolicy(
    thresholds=((0.8, "decline"), (0.3, "review")),
    below="approve",
    reasons=(
        Reason("amount_far_above_usual", Condition("amount_to_avg_30d", ">", 5)),
        Reason("new_merchant", Condition("is_new_merchant", "==", 1)),
        Reason("velocity_burst", Condition("user_txn_count_5m", ">=", 3)),
        Reason("risky_merchant", Condition("merchant_fraud_rate_30d", ">", 0.05)),
        Reason("no_history", Condition("user_txn_count_30d", "missing")),
    ),
    # Without a score: decline on a known fraud pattern; review on any other reason, or a
    # large amount; else approve.
    fallback=(
        FallbackRule("decline", reasons=frozenset({"amount_far_above_usual", "new_merchant"})),
        FallbackRule("decline", reasons=frozenset({"velocity_burst"})),
        FallbackRule("review", any_reason_except=frozenset({"no_history"})),
        FallbackRule("review", when=Condition("amount", ">=", 1_000)),
    ),
    fallback_otherwise="approve",
)

fraud_detection = Model(
    name="fraud_detection",
    feature_service=fraud_detection_v1,
    labels=PAYMENT_LABELS,
    policy=FRAUD_POLICY,
    task=BINARY,
    training=Training(baseline="amount"),
    bounds=PAYMENT_BOUNDS,
    batch_field="transactions",
    default=True,
)

# the same model on v1 plus merchant velocity, a user's peak amount and pair-level card testing
fraud_detection_v2_model = replace(
    fraud_detection, name="fraud_detection_v2", feature_service=fraud_detection_v2, default=False
)

# Which merchants to show a user: each impression's candidates scored by the chance the user
# buys there within a day (ranking.py: the impressions, the request context, the features).
merchant_ranking = Model(
    name="merchant_ranking",
    feature_service=merchant_ranking_v1,
    labels=Labels(
        source=ranking_impressions,
        label="purchased",
        known_at="label_ts",
        order_by=("impression_id", "position"),
        group_by=("impression_id",),
    ),
    # a score to order candidates by; "show" above the threshold, else "hide"; without a
    # score (model late or down) every candidate is shown in the order given
    policy=DecisionPolicy(thresholds=((0.5, "show"),), below="hide", fallback_otherwise="show"),
    task=RANKING,
    training=Training(n_estimators=100),
    bounds={"user_id": (ID_MIN, ID_MAX), "merchant_id": (ID_MIN, ID_MAX)},
    candidate_key="merchant_id",
    max_candidates=100,
)
