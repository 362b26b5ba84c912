"""The archive as DuckDB reads it: read_parquet over the root's files, Hive partitions.

Usage: python3 duckdb_read.py ARCHIVE_ROOT NEEDLE
Prints the summary tests/archive.rs compares with the log (the shape pyarrow_read.py
documents).
"""

import json
import sys

import duckdb


def category(t):
    t = t.upper()
    if t == "VARCHAR":
        return "string"
    if t == "BLOB":
        return "binary"
    if t in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"):
        return "int"
    if t.startswith("TIMESTAMP"):
        return "timestamp"
    if t == "DATE":
        return "date"
    return "other"


root, needle = sys.argv[1], sys.argv[2].encode()
rel = "read_parquet('" + root.replace("'", "''") + "/**/*.parquet', hive_partitioning = true)"
sql = duckdb.sql
columns = {name: {"type": t, "is": category(t)} for name, t, *_ in sql(f"describe select * from {rel}").fetchall()}
tenants = {
    t: {
        "rows": rows,
        "conversations": convs,
        "min_seq": lo,
        "max_seq": hi,
        "dates": dates,
        "min_time_ms": t0,
        "max_time_ms": t1,
    }
    for t, rows, convs, lo, hi, dates, t0, t1 in sql(
        "select tenant, count(*), count(distinct conversation), min(seq), max(seq),"
        " list_sort(list(distinct date::varchar)), epoch_ms(min(time)), epoch_ms(max(time))"
        f" from {rel} group by tenant"
    ).fetchall()
}
conversations = sql(
    f"select tenant, conversation, count(*), min(seq), max(seq) from {rel} group by all order by all"
).fetchall()
kinds = dict(sql(f"select kind, count(*) from {rel} group by kind").fetchall())
bodies = [b for (b,) in sql(f"select body from {rel}").fetchall()]
print(
    json.dumps(
        {
            "tool": f"duckdb {duckdb.__version__}",
            "columns": columns,
            "tenants": tenants,
            "conversations": [list(r) for r in conversations],
            "kinds": kinds,
            "bodies_as_bytes": sum(isinstance(b, bytes) for b in bodies),
            "bodies_with_plaintext": sum(needle in b for b in bodies),
        }
    )
)
