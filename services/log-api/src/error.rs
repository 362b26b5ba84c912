//! The log's typed errors.

/// Everything the log can refuse or fail with. Each variant says what was wrong in terms the
/// caller can act on; [`LogError::is_retryable`] says whether trying again can help.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidId {
        field: &'static str,
        value: String,
        reason: &'static str,
    },

    #[error("{what} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },

    #[error("invalid request: {0}")]
    InvalidRequest(String),

    #[error("conversation {conversation} does not exist in tenant {tenant}")]
    ConversationNotFound {
        tenant: String,
        conversation: String,
    },

    #[error("conversation {conversation} already exists in tenant {tenant}")]
    ConversationExists {
        tenant: String,
        conversation: String,
    },

    #[error("user {user} is not a member of conversation {conversation}")]
    NotMember { user: String, conversation: String },

    #[error("user {user} is already a member of conversation {conversation}")]
    AlreadyMember { user: String, conversation: String },

    #[error("not allowed: {0}")]
    NotAllowed(String),

    /// The tenant's interceptor (a DLP or moderation hook) refused the append, with its
    /// reason; nothing was committed.
    #[error("rejected: {reason}")]
    Rejected { reason: String },

    #[error("seq {seq} is not a message in conversation {conversation} (head is {head})")]
    NoSuchMessage {
        conversation: String,
        seq: u64,
        head: u64,
    },

    #[error(
        "no master key: set TIDINGS_MASTER_KEY or create the key file {path} (`tidings keys init`)"
    )]
    MasterKeyMissing { path: String },

    #[error("master key {path} is malformed: {reason}")]
    MasterKeyMalformed { path: String, reason: String },

    #[error("the master key does not open this data directory (wrong key?)")]
    WrongMasterKey,

    #[error("stored value at {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },

    /// The tenant was crypto-shredded (`tidings keys shred`): its data keys are gone.
    #[error(
        "tenant {tenant} was shredded: its data keys were destroyed and its history can never \
         be opened again"
    )]
    TenantShredded { tenant: String },

    /// The tenant's data keys are also sealed under a key the tenant holds, and that key
    /// could not be had: none is configured, its file is gone, its command failed.
    #[error("the tenant-held key of tenant {tenant} is unavailable: {reason}")]
    TenantKeyUnavailable { tenant: String, reason: String },

    /// The tenant-held key was read but is not the one the tenant's data keys were sealed
    /// under.
    #[error("the tenant-held key of tenant {tenant} does not open its data keys (wrong key?)")]
    WrongTenantKey { tenant: String },

    /// Archived history could not be read: no archive is configured, the object store is
    /// unreachable, or a segment is missing.
    #[error("archived history is unavailable: {reason}")]
    Archive { reason: String, retryable: bool },

    #[error("the log is shutting down")]
    ShuttingDown,

    /// The store cannot take this write now (an outage) and it cannot be buffered: not a
    /// message, or the send buffer is full or too old. Nothing was written; retry later.
    #[error("unavailable: {reason}")]
    Unavailable { reason: String },

    /// The caller did too much of something that has a rate limit (conversations created
    /// per user per hour); trying again after `retry_after_ms` may succeed.
    #[error("too many {what}; try again in {retry_after_ms} ms")]
    RateLimited {
        what: &'static str,
        retry_after_ms: u64,
    },

    /// This writer does not own the conversation's partition (another writer holds its lease,
    /// or took it over). Nothing was written; the owner, or this writer once it owns the
    /// partition again, will take the request.
    #[error("this log writer does not own partition {partition}; its owner is {owner:?}")]
    NotOwner { partition: u32, owner: String },

    /// `log.partitions` differs from the count the store was created with; conversations
    /// would move between leases, so the store refuses to open.
    #[error(
        "log.partitions is {configured} but this store was created with {stored}; the count is \
         fixed for the life of a store"
    )]
    PartitionsMismatch { stored: u32, configured: u32 },

    /// The tenant is served by another cell (cells.rs): nothing was done here; its clients
    /// belong to `cell`.
    #[error("the tenant is served by cell {cell}")]
    WrongCell { cell: String },

    #[error(transparent)]
    Store(#[from] StoreError),

    /// An error that crossed a process boundary (the log service over NATS): its code and
    /// message as the remote side gave them, and when to try again (0: not said).
    #[error("{message}")]
    Remote {
        code: &'static str,
        message: String,
        retryable: bool,
        retry_after_ms: u64,
    },
}

/// Every code [`LogError::code`] can return.
pub const ERROR_CODES: &[&str] = &[
    "invalid_id",
    "too_large",
    "invalid_request",
    "conversation_not_found",
    "conversation_exists",
    "not_member",
    "already_member",
    "not_allowed",
    "rejected",
    "no_such_message",
    "master_key_missing",
    "master_key_malformed",
    "wrong_master_key",
    "corrupt",
    "tenant_shredded",
    "tenant_key_unavailable",
    "wrong_tenant_key",
    "shutting_down",
    "rate_limited",
    "not_owner",
    "partitions_mismatch",
    "archive_unavailable",
    "conflict",
    "store_locked",
    "store_error",
    "unavailable",
    "wrong_cell",
];

impl LogError {
    /// A stable, machine-readable name for the error, for JSON output and wire errors.
    pub fn code(&self) -> &'static str {
        match self {
            LogError::InvalidId { .. } => "invalid_id",
            LogError::TooLarge { .. } => "too_large",
            LogError::InvalidRequest(_) => "invalid_request",
            LogError::ConversationNotFound { .. } => "conversation_not_found",
            LogError::ConversationExists { .. } => "conversation_exists",
            LogError::NotMember { .. } => "not_member",
            LogError::AlreadyMember { .. } => "already_member",
            LogError::NotAllowed(_) => "not_allowed",
            LogError::Rejected { .. } => "rejected",
            LogError::NoSuchMessage { .. } => "no_such_message",
            LogError::MasterKeyMissing { .. } => "master_key_missing",
            LogError::MasterKeyMalformed { .. } => "master_key_malformed",
            LogError::WrongMasterKey => "wrong_master_key",
            LogError::Corrupt { .. } => "corrupt",
            LogError::TenantShredded { .. } => "tenant_shredded",
            LogError::TenantKeyUnavailable { .. } => "tenant_key_unavailable",
            LogError::WrongTenantKey { .. } => "wrong_tenant_key",
            LogError::ShuttingDown => "shutting_down",
            LogError::Unavailable { .. } => "unavailable",
            LogError::RateLimited { .. } => "rate_limited",
            LogError::NotOwner { .. } => "not_owner",
            LogError::PartitionsMismatch { .. } => "partitions_mismatch",
            LogError::WrongCell { .. } => "wrong_cell",
            LogError::Archive { .. } => "archive_unavailable",
            LogError::Store(StoreError::Conflict { .. }) => "conflict",
            LogError::Store(StoreError::Locked { .. }) => "store_locked",
            LogError::Store(_) => "store_error",
            LogError::Remote { code, .. } => code,
        }
    }

    /// Rebuilds an error reported by a remote log service. Unknown codes become
    /// "store_error" so callers can still match on known ones.
    pub fn remote(code: &str, message: String, retryable: bool) -> LogError {
        let code = ERROR_CODES
            .iter()
            .find(|known| **known == code)
            .copied()
            .unwrap_or("store_error");
        LogError::Remote {
            code,
            message,
            retryable,
            retry_after_ms: 0,
        }
    }

    /// [`LogError::remote`] with the remote side's advice on when to try again.
    pub fn remote_after(
        code: &str,
        message: String,
        retryable: bool,
        retry_after_ms: u64,
    ) -> LogError {
        match Self::remote(code, message, retryable) {
            LogError::Remote {
                code,
                message,
                retryable,
                ..
            } => LogError::Remote {
                code,
                message,
                retryable,
                retry_after_ms,
            },
            other => other,
        }
    }

    /// How long to wait before trying again, if the error says (0: it does not): a rate
    /// limit's window, here or in the process that refused.
    pub fn retry_after_ms(&self) -> u64 {
        match self {
            LogError::RateLimited { retry_after_ms, .. }
            | LogError::Remote { retry_after_ms, .. } => *retry_after_ms,
            _ => 0,
        }
    }

    /// Whether the same request may succeed if sent again later. Validation and permission
    /// errors are permanent; store hiccups and conflicts are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            LogError::Store(e) => e.is_retryable(),
            LogError::ShuttingDown
            | LogError::Unavailable { .. }
            | LogError::NotOwner { .. }
            | LogError::RateLimited { .. } => true,
            LogError::Archive { retryable, .. } => *retryable,
            LogError::Remote { retryable, .. } => *retryable,
            _ => false,
        }
    }

    pub fn corrupt(key: &[u8], reason: impl std::fmt::Display) -> Self {
        LogError::Corrupt {
            key: display_key(key),
            reason: reason.to_string(),
        }
    }
}

/// What a key-value store refused or failed with (the log wraps it in [`LogError::Store`]).
/// Clone, so one failed batch commit can answer each of its requests with the same error.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// A check of the transaction failed; nothing was written.
    #[error("transaction conflict at {key}: {reason}")]
    Conflict { key: String, reason: &'static str },

    #[error("the store at {path} is in use by another process (is a tidings server running?)")]
    Locked { path: String },

    #[error("store I/O failed while trying to {action}: {source}")]
    Io {
        action: &'static str,
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },

    #[error("store failed while trying to {action}: {message}")]
    Backend {
        action: &'static str,
        message: String,
    },

    #[error("invalid store request: {0}")]
    InvalidRequest(String),

    /// The store's configuration cannot work; found before connecting.
    #[error("invalid store configuration: {0}")]
    Config(String),

    /// A networked store's cluster could not be reached (at start: after bounded retries).
    #[error("could not reach {what} at {endpoints} ({attempts} attempt(s)): {message}")]
    Unreachable {
        what: &'static str,
        endpoints: String,
        attempts: u32,
        message: String,
    },
}

impl StoreError {
    /// Conflicts, I/O hiccups and an unreachable cluster may clear up; a lock held by
    /// another process, a broken backend, a bad request or bad configuration will not by
    /// retrying alone.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Conflict { .. } | StoreError::Io { .. } | StoreError::Unreachable { .. }
        )
    }
}

/// A key for messages and logs: printable bytes as they are, others as `\xNN`.
pub fn display_key(key: &[u8]) -> String {
    let mut s = String::with_capacity(key.len());
    for &b in key {
        match b {
            0 => s.push('/'),
            b if b.is_ascii_graphic() => s.push(b as char),
            b => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}
