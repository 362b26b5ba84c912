//! The archive's typed errors.

use tidings_log::LogError;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The object store failed or could not be reached (after its own retries).
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),

    /// An indexed segment is not in the object store.
    #[error("archive segment {path} is missing from the object store")]
    Missing { path: String },

    /// A segment's bytes are not what was written: unreadable Parquet, a checksum or row that
    /// does not match the index, a body that fails authentication.
    #[error("archive segment {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },

    /// A segment read back after upload is not the segment that was written; nothing was
    /// indexed and no hot event was deleted.
    #[error("archive segment {path} failed verification after upload: {reason}")]
    Verify { path: String, reason: String },

    /// Another archiver indexed some of the same events first; nothing of this segment was
    /// indexed or deleted, and the next pass continues above what the other one archived.
    #[error(
        "another archiver indexed events of tenant {tenant} first; is more than one archiver \
         running against this store?"
    )]
    Conflict { tenant: String },

    /// A segment could not be encoded (compression, Parquet writing) in memory.
    #[error("could not encode an archive segment: {0}")]
    Encode(String),

    #[error("invalid archive configuration: {0}")]
    Config(String),

    #[error(transparent)]
    Log(#[from] LogError),
}

impl ArchiveError {
    pub(crate) fn corrupt(path: &str, reason: impl std::fmt::Display) -> Self {
        ArchiveError::Corrupt {
            path: path.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ArchiveError::ObjectStore(e) => !matches!(
                e,
                object_store::Error::NotFound { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ),
            ArchiveError::Log(e) => e.is_retryable(),
            ArchiveError::Verify { .. } | ArchiveError::Conflict { .. } => true,
            _ => false,
        }
    }

    /// A stable name for JSON output.
    pub fn code(&self) -> &'static str {
        match self {
            ArchiveError::ObjectStore(_) => "object_store",
            ArchiveError::Missing { .. } => "segment_missing",
            ArchiveError::Corrupt { .. } => "segment_corrupt",
            ArchiveError::Verify { .. } => "verify_failed",
            ArchiveError::Conflict { .. } => "archiver_conflict",
            ArchiveError::Encode(_) => "encode_failed",
            ArchiveError::Config(_) => "invalid_config",
            ArchiveError::Log(e) => e.code(),
        }
    }
}

/// How the log reports a failed cold read.
impl From<ArchiveError> for LogError {
    fn from(e: ArchiveError) -> LogError {
        match e {
            ArchiveError::Log(e) => e,
            ArchiveError::Corrupt { path, reason } | ArchiveError::Verify { path, reason } => {
                LogError::Corrupt {
                    key: format!("archive:{path}"),
                    reason,
                }
            }
            other => LogError::Archive {
                retryable: other.is_retryable(),
                reason: other.to_string(),
            },
        }
    }
}
