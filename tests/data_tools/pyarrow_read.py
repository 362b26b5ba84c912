"""The archive as pyarrow reads it: pyarrow.dataset over the root, Hive partitions.

Usage: python3 pyarrow_read.py ARCHIVE_ROOT NEEDLE
Prints the summary that tests/archive.rs compares with the log (the same shape for every
tool): column types, per tenant and per conversation counts, kinds, and whether any sealed
body holds NEEDLE in the clear.
"""

import json
import sys

import pyarrow as pa
import pyarrow.dataset as ds


def category(t):
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_date(t):
        return "date"
    return "other"


root, needle = sys.argv[1], sys.argv[2].encode()
table = ds.dataset(root, format="parquet", partitioning="hive").to_table()
table = table.append_column("time_ms", table["time"].cast(pa.int64()))

tenants = {
    r["tenant"]: {
        "rows": r["seq_count"],
        "conversations": r["conversation_count_distinct"],
        "min_seq": r["seq_min"],
        "max_seq": r["seq_max"],
        "dates": sorted(str(d) for d in r["date_distinct"]),
        "min_time_ms": r["time_ms_min"],
        "max_time_ms": r["time_ms_max"],
    }
    for r in table.group_by("tenant")
    .aggregate(
        [
            ("seq", "count"),
            ("conversation", "count_distinct"),
            ("seq", "min"),
            ("seq", "max"),
            ("date", "distinct"),
            ("time_ms", "min"),
            ("time_ms", "max"),
        ]
    )
    .to_pylist()
}
conversations = [
    [r["tenant"], r["conversation"], r["seq_count"], r["seq_min"], r["seq_max"]]
    for r in table.group_by(["tenant", "conversation"])
    .aggregate([("seq", "count"), ("seq", "min"), ("seq", "max")])
    .to_pylist()
]
kinds = {r["kind"]: r["seq_count"] for r in table.group_by("kind").aggregate([("seq", "count")]).to_pylist()}
bodies = table["body"].to_pylist()
print(
    json.dumps(
        {
            "tool": f"pyarrow {pa.__version__}",
            "columns": {
                f.name: {"type": str(f.type), "is": category(f.type)}
                for f in table.schema
                if f.name != "time_ms"
            },
            "tenants": tenants,
            "conversations": sorted(conversations),
            "kinds": kinds,
            "bodies_as_bytes": sum(isinstance(b, bytes) for b in bodies),
            "bodies_with_plaintext": sum(needle in b for b in bodies),
        }
    )
)
