"""The Spark session every job uses, and the one copy of its configuration.

The profiles' ``feature_store*.yaml`` keep only the session time zone, for ``feast`` run
on its own; under ``hotpath`` Feast's Spark offline store and engine reuse this session.
"""

from __future__ import annotations

import os
import shutil
import sys

from pyspark.sql import SparkSession

from pipelines import console
from pipelines.errors import HotpathError
from pipelines.settings import SparkSettings

# Settable on a running session too (``spark-submit`` brings its own): UTC, microsecond
# parquet timestamps (Spark 4 cannot read nanoseconds), a backfill replaces only the
# day partitions it writes, Arrow for pandas.
SQL_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.sources.partitionOverwriteMode": "dynamic",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.shuffle.partitions": "8",
}
# Fixed when the session starts: no web UI, no console progress bars.
SESSION_CONF = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"}
# The JVM's JIT code cache: the default 240 MB filled up in one long session (the demo:
# backfill, materialization and the training join, each with generated code for dozens of
# window expressions) and the JVM died ("Out of space in CodeCache").
JVM_OPTIONS = "-XX:ReservedCodeCacheSize=512m"


def _java_present() -> bool:
    java_home = os.environ.get("JAVA_HOME")
    return bool(shutil.which("java") or (java_home and os.path.exists(f"{java_home}/bin/java")))


def configure(spark: SparkSession) -> SparkSession:
    """Apply :data:`SQL_CONF` to a session made elsewhere (``spark-submit``)."""
    for key, value in SQL_CONF.items():
        spark.conf.set(key, value)
    return spark


def spark_session(master: str | None = None, driver_memory: str | None = None) -> SparkSession:
    """Get (or create) the session; ``master`` may be ``local[*]`` or a cluster URL (both
    default to :class:`~pipelines.settings.SparkSettings`)."""
    if not _java_present():
        raise HotpathError("Java 17 is required for Spark: apt-get install openjdk-17-jre-headless")
    defaults = SparkSettings()
    # Python workers must run this interpreter (the one with feast installed), not PATH's.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.appName("hotpath")
        .master(master or defaults.master)
        .config("spark.driver.memory", driver_memory or defaults.driver_memory)
    )
    conf = SESSION_CONF | SQL_CONF | console.spark_conf()
    logging = conf.get("spark.driver.extraJavaOptions", "")
    conf["spark.driver.extraJavaOptions"] = f"{JVM_OPTIONS} {logging}".strip()
    conf["spark.executor.extraJavaOptions"] = JVM_OPTIONS
    for key, value in conf.items():
        builder = builder.config(key, value)
    with console.jvm_stderr():  # a JVM started here inherits stderr
        spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN" if console.verbose() else "ERROR")
    return spark
