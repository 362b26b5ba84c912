//! tidings-archive's integration tests: one test binary (`cargo test -p tidings-archive
//! --test it`) whose modules are the files beside this one (`cargo test -p tidings-archive
//! --test it s3::` runs tests/s3.rs). One binary links the archive, Parquet and the S3 client
//! once, where a binary per file did it four times (docs/decisions/one-test-binary.md).
//!
//! Cargo does not discover test files here (`autotests = false`): a new file is a new `mod`
//! line below.

mod compliance;
mod local;
mod s3;
mod search;
