"""The archive as Spark reads it: pyspark in local mode, spark.read.parquet on the root
with partition discovery.

Usage: python3 spark_read.py ARCHIVE_ROOT NEEDLE
Prints the summary tests/archive.rs compares with the log (the shape pyarrow_read.py
documents). Kept fast for a test: one local core, one shuffle partition, no UI, loopback
only, warnings and up only.
"""

import json
import os
import sys

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

import pyspark  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402
from pyspark.sql import types as T  # noqa: E402


def category(t):
    if isinstance(t, T.StringType):
        return "string"
    if isinstance(t, T.BinaryType):
        return "binary"
    if isinstance(t, (T.IntegerType, T.LongType, T.ShortType, T.ByteType)):
        return "int"
    if isinstance(t, (T.TimestampType, T.TimestampNTZType)):
        return "timestamp"
    if isinstance(t, T.DateType):
        return "date"
    return "other"


root, needle = sys.argv[1], sys.argv[2].encode()
spark = (
    SparkSession.builder.master("local[1]")
    .appName("tidings-archive-test")
    .config("spark.sql.shuffle.partitions", "1")
    .config("spark.default.parallelism", "1")
    .config("spark.ui.enabled", "false")
    .config("spark.ui.showConsoleProgress", "false")
    .config("spark.driver.host", "127.0.0.1")
    .config("spark.driver.bindAddress", "127.0.0.1")
    .config("spark.sql.session.timeZone", "UTC")
    # A few hundred rows: the JVM's quick compiler, no adaptive re-planning and no generated
    # code pay back more than they cost (measured: see the test's report line).
    .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
    .config("spark.sql.adaptive.enabled", "false")
    .config("spark.sql.codegen.wholeStage", "false")
    .getOrCreate()
)
spark.sparkContext.setLogLevel("WARN")
try:
    df = spark.read.parquet(root)
    per_tenant = df.groupBy("tenant").agg(
        F.count("*").alias("rows"),
        F.countDistinct("conversation").alias("conversations"),
        F.min("seq").alias("min_seq"),
        F.max("seq").alias("max_seq"),
        F.sort_array(F.collect_set(F.col("date").cast("string"))).alias("dates"),
        F.min(F.unix_millis("time")).alias("min_time_ms"),
        F.max(F.unix_millis("time")).alias("max_time_ms"),
    )
    per_conv = df.groupBy("tenant", "conversation").agg(
        F.count("*"), F.min("seq"), F.max("seq")
    )
    kinds = df.groupBy("kind").count()
    raw = [r.body for r in df.select("body").collect()]
    bodies = [bytes(b) for b in raw if isinstance(b, (bytes, bytearray))]
    print(
        json.dumps(
            {
                "tool": f"spark {pyspark.__version__}",
                "columns": {
                    f.name: {"type": f.dataType.simpleString(), "is": category(f.dataType)}
                    for f in df.schema.fields
                },
                "tenants": {
                    r["tenant"]: {k: v for k, v in r.asDict().items() if k != "tenant"}
                    for r in per_tenant.collect()
                },
                "conversations": sorted(list(r) for r in per_conv.collect()),
                "kinds": {r["kind"]: r["count"] for r in kinds.collect()},
                "bodies_as_bytes": len(bodies),
                "bodies_with_plaintext": sum(needle in b for b in bodies),
            }
        )
    )
finally:
    spark.stop()
