//! The tidings archive: aged events as AES-SIV-sealed Parquet on object storage.
//!
//! # Layout
//! - [`format`](mod@format): the Parquet segment layout, its writer and readers.
//! - [`codec`]: body compression (zstd with a per-segment dictionary) and sealing.
//! - [`storage`]: the object store (local directory or S3) and the Hive-style paths.
//! - [`archiver`]: one archive pass: gather aged events, write, verify, index, delete hot.
//! - [`reader`]: [`ColdReader`], the log's cold tier, with its caches.
//! - [`search_index`]: the sealed search index written beside each segment.
//! - [`tools`]: `inspect` and `verify`.
//! - [`conformance`]: the suite every object store backend runs.
//! - [`error`]: the typed [`ArchiveError`].

pub mod archiver;
pub mod codec;
pub mod compliance;
pub mod conformance;
pub mod error;
pub mod format;
pub mod reader;
pub mod search_index;
pub mod storage;
pub mod tools;

pub use archiver::{ArchiveConfig, Archiver, PassOptions, Summary, TenantPolicy};
pub use error::ArchiveError;
pub use reader::ColdReader;
pub use storage::{Objects, S3Config, StorageConfig};
