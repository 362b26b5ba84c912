//! The tidings event log.
//!
//! The API's ids, errors, request types, kinds-and-roles policy and search terms live in
//! `tidings-log-api` (what a gateway builds against) and are re-exported here under the
//! paths the log's code names them by: [`ids`], [`error`], [`policy`], [`search`].
//!
//! # Layout
//! - [`keys`]: the keyspace (`ev/`, `hd/`, `dd/`, `mb/`, `uc/`, `kr/`, `ks/`, ...).
//! - [`store`]: the [`KvStore`](store::KvStore) interface, the embedded fjall backend and the
//!   conformance suite every backend runs.
//! - [`crypto`]: AES-256-SIV sealing under per-tenant data keys wrapped by a master key (and
//!   a tenant-held key, for tenants that have one); crypto-shredding.
//! - [`tenant_keys`]: where tenant-held keys come from (a file or a command).
//! - [`lease`]: writer ownership: partitions, leases and epochs, the fence every commit
//!   carries.
//! - `writer` (private): the sequencer, one task that assigns seqs and group-commits, and
//!   (`writer/outage.rs`) what it does while the store cannot commit.
//! - [`send_buffer`]: the write-ahead buffer outside the KV that appends go to during an
//!   outage, replayed in seq order when the store is back.
//! - [`log`]: [`Log`], the API the binary and the gateway use: conversations, membership,
//!   appends, reads, read cursors; `service`: the `Log` as the gateway's `LogService` when
//!   both are in one process. [`config`]: its settings ([`LogConfig`]); [`feed`]: what it
//!   announces after each commit ([`FeedItem`]).
//! - [`overload`]: admission control past the writer's capacity: the hottest conversations
//!   (a space-saving sketch) are limited first, VIP tenants' last.
//! - [`revocation`]: revoked tokens (by `jti`, and users' issued-before cutoffs), kept in
//!   the store (`rv/`) behind a small bounded cache.
//! - [`hot_index`]: the hot events' search index (sealed postings in the KV, built after
//!   commit by a supervised indexer: [`hot_indexer`]); `user_search`: [`Log::search`], a
//!   user's search of their own conversations.
//! - [`unread`]: unread counts of others' messages only (joins, reactions and one's own
//!   messages are not unread), from counts kept in heads, event rows and list entries.
//! - [`cold`]: the [`ColdTier`](cold::ColdTier) interface to archived events and the archive
//!   index lookups the log makes itself.
//! - [`webhooks`]: outgoing webhook subscriptions as stored: sealed secrets, delivery
//!   cursors, replays asked for, dead letters (delivery itself is the server's).
//! - [`metrics`]: the log's own append and commit metrics (and, re-exported, the API's
//!   Prometheus primitives, text format and collector registry).

pub mod bots;
pub mod cells;
pub mod cold;
pub mod config;
pub mod crypto;
pub mod feed;
pub mod hot_index;
pub mod hot_indexer;
pub mod interceptor;
pub mod keys;
pub mod lease;
pub mod log;
pub mod metrics;
pub mod overload;
mod quota;
pub mod revocation;
pub mod send_buffer;
pub mod store;
pub mod tenant_keys;
pub mod unread;
mod user_search;
pub mod webhooks;
mod writer;

mod service;

// The API's modules and types, under the paths the log's code and its users have always
// named them by (docs/decisions/log-api-crate.md).
pub use config::LogConfig;
pub use feed::FeedItem;
pub use log::{Log, PendingAppend, WeakLog, panic_text};
pub use tidings_log_api::{
    Append, Body, By, ClientMsgId, Committed, ConvId, ConversationInfo, ConversationKind,
    ConversationSummary, CreateConversation, Event, LogError, Member, MemberChange, MemberPage,
    MemberRole, MembersQuery, ReadRange, TenantId, UserId, duration_as, error, event_kind, ids,
    now_ms, policy, search,
};
