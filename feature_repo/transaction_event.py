"""The transaction event: what counts as a valid payment, declared once.

The Spark backfill, the streaming flow and the ``/predict`` request schema all derive their
checks from these names (read by path: plain declarations, no imports), so an event one of
them counts is counted by all, and one refused by one is refused by all, with the same
reason code. An amount of 0.00 is a valid payment (card verifications are exactly that).
"""

from datetime import timedelta

# Every field a transaction event must carry.
FIELDS = ("user_id", "merchant_id", "amount", "event_timestamp")

# user_id and merchant_id: int64 ids, inclusive bounds.
ID_MIN = 0
ID_MAX = 2**63 - 1

# amount: finite, inclusive bounds.
AMOUNT_MIN = 0.0
AMOUNT_MAX = 1_000_000.0

# Event times further ahead of the judge's clock (the stream's at ingest, the batch job's
# when it runs) than this are refused.
MAX_FUTURE_SKEW = timedelta(minutes=5)
