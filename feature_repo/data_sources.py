"""Data sources: the events features are computed from, and where other rows live.

Everything generated sits in the data directory beside this repo (``../data``),
the same place ``feature_store.yaml`` keeps the registry and the SQLite store. The
offline table of each computed view is declared with it (``aggregated.aggregated_view``):
parquet under ``offline/<view>``, partitioned by ``date`` (the UTC day of
``event_timestamp``).
"""

from pathlib import Path

from feast import KafkaSource, RequestSource
from feast.data_format import JsonFormat
from feast.field import Field
from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource
from feast.types import Float64

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
RAW_DIR = DATA_DIR / "raw"
OFFLINE_DIR = DATA_DIR / "offline"

transaction_history = SparkSource(
    name="transaction_history",
    path=str(RAW_DIR / "transactions"),
    file_format="parquet",
    timestamp_field="event_timestamp",
    date_partition_column="date",
    description="Every card payment, partitioned by date; labels arrive later (label_ts).",
)

# The payment stream. Locally, Redis Streams and file replay stand in for the same topic
# (`hotpath stream --source redis|file`); its history is the backfill's input.
transactions = KafkaSource(
    name="transactions",
    kafka_bootstrap_servers="127.0.0.1:9092",
    topic="transactions",
    timestamp_field="event_timestamp",
    message_format=JsonFormat(
        schema_json=(
            "transaction_id bigint, user_id bigint, merchant_id bigint, amount double, "
            "event_timestamp timestamp, is_fraud boolean, label_ts timestamp"
        )
    ),
    batch_source=transaction_history,
    description="Card payments as they happen (JSON, one payment per message).",
)

# Card-holder profiles as the card system exports them; the feature names are ours.
user_profile_source = SparkSource(
    name="user_profile_source",
    path=str(RAW_DIR / "users"),
    file_format="parquet",
    timestamp_field="updated_at",
    field_mapping={
        "home_country": "user_home_country",
        "credit_limit": "user_credit_limit",
        "kyc_level": "user_kyc_level",
    },
)

# Fields that arrive with the request to be scored, not from a store.
transaction_request = RequestSource(
    name="transaction_request",
    schema=[Field(name="amount", dtype=Float64)],
)
