//! The log's settings: the server's `[log]` section, read straight into [`LogConfig`].

use std::time::Duration;

/// Limits and sizes of the log. Every queue and batch is bounded.
///
/// The server's `[log]` section is read straight into this type (its fields as the file
/// names them; `overload` and `search` flattened into the same table under their own
/// prefixes): a setting's doc, type and default are here only. The fields the file does not
/// hold (`own_partitions`, `send_buffer`, `kinds`, `cell`) are `#[serde(skip)]` and filled
/// in by whoever opens the log (the server from its other settings).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct LogConfig {
    /// Largest encoded message body (text, mentions, ...) accepted from a client.
    pub max_body_bytes: usize,
    /// Largest conversation title.
    pub max_title_bytes: usize,
    /// Most requests the sequencer commits in one transaction.
    pub max_batch: usize,
    /// Requests that may wait for the sequencer before callers are held back.
    pub queue_depth: usize,
    /// Most events or list entries one read returns.
    pub max_read_limit: usize,
    /// Most bytes of events one read returns (one event always): what a read holds in
    /// memory, and what a page read through the log RPC puts in one NATS message.
    pub max_read_bytes: usize,
    /// Most members a group may have.
    pub max_group_members: usize,
    /// Most members one CreateConversation may list; bigger groups grow by AddMember.
    pub max_members_per_request: usize,
    /// Conversations one user may create per hour (per writer; see `quota`).
    pub max_conversations_created_per_user_per_hour: u32,
    /// Heads and memberships the sequencer keeps in memory (exact; dropped whole when full).
    pub writer_cache_entries: usize,
    /// How many partitions conversations hash into (each has one lease, one owner). Fixed
    /// for the life of a store: recorded at its first open, any other count is refused.
    pub partitions: u32,
    /// This writer's owner id in the leases; empty: `hostname-pid-random`, new every open.
    /// Must be unique among the writers of a store.
    pub writer_id: String,
    /// How long a lease lives without renewal; renewed every third of it. Another writer
    /// takes over a partition at the earliest this long after its owner stopped renewing.
    #[serde(rename = "lease_ttl_ms", with = "crate::duration_as::millis")]
    pub lease_ttl: Duration,
    /// Whether this log takes partition leases at all. False for processes that read and
    /// archive but never write through the sequencer (`serve --role archiver`): they must
    /// not hold the partitions the writers need. Their writes are refused with `not_owner`.
    #[serde(skip)]
    pub own_partitions: bool,
    /// Where appends go while the store cannot commit (`send_buffer`); `None`: they fail.
    /// Every writer of a store must use the same directory.
    #[serde(skip)]
    pub send_buffer: Option<crate::send_buffer::SendBufferConfig>,
    /// Conversation kinds and their role policies: the built-in ones and any configured
    /// (`policy`). Every writer of a store must know the same kinds.
    #[serde(skip)]
    pub kinds: crate::policy::Kinds,
    /// Admission control of appends past the writer's capacity (`overload`).
    #[serde(flatten)]
    pub overload: crate::overload::OverloadConfig,
    /// Groups with at least this many members reserve @all (`mention_all`) to owners.
    pub mention_all_owners_only_from: u64,
    /// Search: the hot index and the limits of a user's search (`hot_index`, `user_search`).
    #[serde(flatten)]
    pub search: crate::hot_index::SearchConfig,
    /// This cell (`cells`): the directory fence, the outbox, replicas. `None`: cells off.
    #[serde(skip)]
    pub cell: Option<crate::cells::CellConfig>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            max_body_bytes: 64 * 1024,
            max_title_bytes: 1024,
            max_batch: 2048,
            queue_depth: 16 * 1024,
            max_read_limit: 1000,
            // Half of NATS's default max_payload (1 MiB): a page and its envelope fit.
            max_read_bytes: 512 << 10,
            max_group_members: 100_000,
            // One create is one sequencer command and one transaction: it must stay small.
            max_members_per_request: 1000,
            max_conversations_created_per_user_per_hour: 1000,
            writer_cache_entries: 1_000_000,
            partitions: 64,
            writer_id: String::new(),
            lease_ttl: Duration::from_secs(10),
            own_partitions: true,
            send_buffer: None,
            kinds: crate::policy::Kinds::default(),
            overload: crate::overload::OverloadConfig::default(),
            mention_all_owners_only_from: 500,
            search: crate::hot_index::SearchConfig::default(),
            cell: None,
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max_body_bytes", self.max_body_bytes),
            ("max_title_bytes", self.max_title_bytes),
            ("max_batch", self.max_batch),
            ("queue_depth", self.queue_depth),
            ("max_read_limit", self.max_read_limit),
            ("max_read_bytes", self.max_read_bytes),
            ("max_group_members", self.max_group_members),
            ("max_members_per_request", self.max_members_per_request),
            (
                "max_conversations_created_per_user_per_hour",
                self.max_conversations_created_per_user_per_hour as usize,
            ),
            ("writer_cache_entries", self.writer_cache_entries),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("{name} must be greater than 0"));
            }
        }
        if self.partitions == 0 || self.partitions > 65_536 {
            return Err("partitions must be between 1 and 65536".into());
        }
        if self.lease_ttl < Duration::from_millis(50) || self.lease_ttl > Duration::from_secs(3600)
        {
            return Err("lease_ttl_ms must be between 50 and 3600000 (1 hour)".into());
        }
        if self.writer_id.len() > 128
            || self
                .writer_id
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err("writer_id must be at most 128 characters, without spaces".into());
        }
        if let Some(b) = &self.send_buffer {
            b.validate()?;
        }
        self.overload.validate()?;
        self.search.validate()?;
        if self.max_read_limit > crate::store::FjallStore::MAX_SCAN_LIMIT {
            return Err(format!(
                "max_read_limit must be at most {}",
                crate::store::FjallStore::MAX_SCAN_LIMIT
            ));
        }
        Ok(())
    }
}
