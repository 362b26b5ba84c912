//! The tidings event log.
//!
//! # Layout
//! - [`ids`]: validated tenant, conversation, user and client message ids.
//! - [`keys`]: the keyspace (`ev/`, `hd/`, `dd/`, `mb/`, `uc/`, `kr/`, `ks/`, ...).
//! - [`store`]: the [`KvStore`](store::KvStore) interface, the embedded fjall backend and the
//!   conformance suite every backend runs.
//! - [`crypto`]: AES-256-SIV sealing under per-tenant data keys wrapped by a master key (and
//!   a tenant-held key, for tenants that have one); crypto-shredding.
//! - [`tenant_keys`]: where tenant-held keys come from (a file or a command).
//! - [`lease`]: writer ownership: partitions, leases and epochs, the fence every commit
//!   carries.
//! - `writer` (private): the sequencer, one task that assigns seqs and group-commits;
//!   `outage` (private): the sequencer while the store cannot commit.
//! - [`send_buffer`]: the write-ahead buffer outside the KV that appends go to during an
//!   outage, replayed in seq order when the store is back.
//! - [`policy`]: conversation kinds and their role policies, as data: who may post, add,
//!   rename, set names, ... (built-in kinds and configured ones).
//! - [`log`]: [`Log`], the API the binary and the gateway use: conversations, membership,
//!   appends, reads, read cursors.
//! - [`overload`]: admission control past the writer's capacity: the hottest conversations
//!   (a space-saving sketch) are limited first, VIP tenants' last.
//! - [`revocation`]: revoked tokens (by `jti`, and users' issued-before cutoffs), kept in
//!   the store (`rv/`) behind a small bounded cache.
//! - [`search`]: search terms: folding, words and CJK bigrams, the match rule, sealed
//!   term tags.
//! - [`hot_index`]: the hot events' search index (sealed postings in the KV, built after
//!   commit by a supervised indexer); `user_search`: [`Log::search`], a user's search of
//!   their own conversations.
//! - [`unread`]: unread counts of others' messages only (joins, reactions and one's own
//!   messages are not unread), from counts kept in heads, event rows and list entries.
//! - [`cold`]: the [`ColdTier`](cold::ColdTier) interface to archived events and the archive
//!   index lookups the log makes itself.
//! - [`webhooks`]: outgoing webhook subscriptions as stored: sealed secrets, delivery
//!   cursors, replays asked for, dead letters (delivery itself is the server's).
//! - [`error`]: the typed [`LogError`].
//! - [`metrics`]: Prometheus counters and histograms, the text format, the process's
//!   collectors; the log's own append and commit metrics.

pub mod bots;
pub mod cells;
pub mod cold;
pub mod crypto;
pub mod error;
pub mod hot_index;
pub mod ids;
pub mod interceptor;
pub mod keys;
pub mod lease;
pub mod log;
pub mod metrics;
mod outage;
pub mod overload;
pub mod policy;
mod quota;
pub mod revocation;
pub mod search;
pub mod send_buffer;
pub mod store;
pub mod tenant_keys;
pub mod unread;
mod user_search;
pub mod webhooks;
mod writer;

pub use error::LogError;
pub use ids::{ClientMsgId, ConvId, TenantId, UserId};
pub use log::{
    Append, By, Committed, ConversationInfo, ConversationSummary, CreateConversation, FeedItem,
    Log, LogConfig, Member, MemberChange, MemberPage, MembersQuery, PendingAppend, ReadRange,
    WeakLog, panic_text,
};
pub use tidings_schemas::v1::{ConversationKind, Event, MemberRole, event::Body};

/// Milliseconds since the Unix epoch, by the wall clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The name of an event body's kind: what the tools print, clients see and the archive's
/// `kind` column holds.
pub fn event_kind(body: Option<&Body>) -> &'static str {
    match body {
        Some(Body::MessagePosted(_)) => "message_posted",
        Some(Body::MessageEdited(_)) => "message_edited",
        Some(Body::MessageRecalled(_)) => "message_recalled",
        Some(Body::ReactionAdded(_)) => "reaction_added",
        Some(Body::ReactionRemoved(_)) => "reaction_removed",
        Some(Body::MemberJoined(_)) => "member_joined",
        Some(Body::MemberLeft(_)) => "member_left",
        Some(Body::ConversationCreated(_)) => "conversation_created",
        Some(Body::ConversationRenamed(_)) => "conversation_renamed",
        Some(Body::MemberRoleChanged(_)) => "member_role_changed",
        Some(Body::DisplayNameSet(_)) => "display_name_set",
        None => "unknown",
    }
}

/// A setting that is a [`Duration`](std::time::Duration) in the config types and a whole
/// number of a unit in the file (`lease_ttl_ms = 10000`): `#[serde(with = ...)]` helpers, so
/// a field keeps its type here and its name and unit there.
pub mod duration_as {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Whole milliseconds (`*_ms` settings).
    pub mod millis {
        use super::*;

        pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            u64::deserialize(d).map(Duration::from_millis)
        }
    }

    /// Whole seconds (`*_secs` settings).
    pub mod secs {
        use super::*;

        pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_u64(d.as_secs())
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            u64::deserialize(d).map(Duration::from_secs)
        }
    }
}
