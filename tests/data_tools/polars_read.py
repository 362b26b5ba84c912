"""The archive as Polars reads it: pl.scan_parquet over the root, Hive partitions.

Usage: python3 polars_read.py ARCHIVE_ROOT NEEDLE
Prints the summary tests/archive.rs compares with the log (the shape pyarrow_read.py
documents).
"""

import json
import sys

import polars as pl


def category(t):
    if t == pl.String or t == pl.Categorical or t == pl.Enum:
        return "string"
    if t == pl.Binary:
        return "binary"
    if t.is_integer():
        return "int"
    if t == pl.Datetime:
        return "timestamp"
    if t == pl.Date:
        return "date"
    return "other"


root, needle = sys.argv[1], sys.argv[2].encode()
lf = pl.scan_parquet(root, hive_partitioning=True)
schema = lf.collect_schema()
df = lf.collect()

per_tenant = df.group_by("tenant").agg(
    rows=pl.len(),
    conversations=pl.col("conversation").n_unique(),
    min_seq=pl.col("seq").min(),
    max_seq=pl.col("seq").max(),
    dates=pl.col("date").cast(pl.String).unique().sort(),
    min_time_ms=pl.col("time").dt.epoch("ms").min(),
    max_time_ms=pl.col("time").dt.epoch("ms").max(),
)
per_conv = df.group_by("tenant", "conversation").agg(
    pl.len(), pl.col("seq").min().alias("min"), pl.col("seq").max().alias("max")
)
kinds = df.group_by("kind").len()
bodies = df["body"].to_list()
print(
    json.dumps(
        {
            "tool": f"polars {pl.__version__}",
            "columns": {n: {"type": str(t), "is": category(t)} for n, t in schema.items()},
            "tenants": {r.pop("tenant"): r for r in per_tenant.to_dicts()},
            "conversations": sorted(list(r) for r in per_conv.iter_rows()),
            "kinds": dict(kinds.iter_rows()),
            "bodies_as_bytes": sum(isinstance(b, bytes) for b in bodies),
            "bodies_with_plaintext": sum(needle in b for b in bodies),
        }
    )
)
