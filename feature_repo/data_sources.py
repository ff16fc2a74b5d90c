"""Data sources: where the offline rows of each feature view live.

Everything generated sits in the data directory beside this repo (``../data``),
the same place ``feature_store.yaml`` keeps the registry and the SQLite store.
Batch outputs are parquet written by the Spark jobs in ``pipelines.batch``,
partitioned by ``date`` (the UTC day of ``event_timestamp``).
"""

from pathlib import Path

from feast import PushSource, RequestSource
from feast.field import Field
from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource
from feast.types import Float64

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
RAW_DIR = DATA_DIR / "raw"
OFFLINE_DIR = DATA_DIR / "offline"


def _offline(name: str, created: str | None = None) -> SparkSource:
    return SparkSource(
        name=f"{name}_source",
        path=str(OFFLINE_DIR / name),
        file_format="parquet",
        timestamp_field="event_timestamp",
        created_timestamp_column=created or "",
        date_partition_column="date",
    )


user_spending_source = _offline("user_spending_stats")
merchant_risk_source = _offline("merchant_risk_stats")
user_merchant_source = _offline("user_merchant_history")
# The streaming job appends here too; where a row for the same user and instant exists
# twice, the newer ``created`` wins: among streamed rows the later one (a replay, a late
# event's correction), and a backfilled row over any streamed one (its ``created`` is fixed
# far above, so the answer does not depend on which writer ran last).
user_velocity_batch_source = _offline("user_velocity", created="created")

user_profile_source = SparkSource(
    name="user_profile_source",
    path=str(RAW_DIR / "users"),
    file_format="parquet",
    timestamp_field="updated_at",
)

# Live velocity values are pushed here by the streaming job; the batch source
# holds the Spark backfill of the same aggregates.
user_velocity_push = PushSource(name="user_velocity_push", batch_source=user_velocity_batch_source)

# Fields that arrive with the request to be scored, not from a store.
transaction_request = RequestSource(
    name="transaction_request",
    schema=[Field(name="amount", dtype=Float64)],
)
