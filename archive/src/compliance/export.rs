//! Export files: JSONL, CSV and Parquet.
