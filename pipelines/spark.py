"""The Spark session every job uses: UTC, microsecond parquet timestamps, quiet logs."""

from __future__ import annotations

import os
import shutil
import sys

from pyspark.sql import SparkSession

from pipelines.errors import HotpathError


def _java_present() -> bool:
    java_home = os.environ.get("JAVA_HOME")
    return bool(shutil.which("java") or (java_home and os.path.exists(f"{java_home}/bin/java")))


def spark_session(master: str = "local[*]", driver_memory: str = "2g") -> SparkSession:
    """Get (or create) the session; ``master`` may be ``local[*]`` or a cluster URL."""
    if not _java_present():
        raise HotpathError("Java 17 is required for Spark: apt-get install openjdk-17-jre-headless")
    # Python workers must run this interpreter (the one with feast installed), not PATH's.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.appName("hotpath")
        .master(master)
        .config("spark.driver.memory", driver_memory)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark
