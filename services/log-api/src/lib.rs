//! The tidings log's API, as a gateway sees it: what it sends the log, what comes back, how
//! refusals are typed, and the sealed NATS transport between the two. No store, no
//! sequencer: a gateway builds against this crate, not against `tidings-log`
//! (docs/decisions/log-api-crate.md).
//!
//! # Layout
//! - [`ids`]: validated tenant, conversation, user and client message ids.
//! - [`error`]: the typed [`LogError`] with its wire codes, and the store's [`StoreError`].
//! - [`types`]: appends, reads, member pages, conversation summaries, token references.
//! - [`policy`]: conversation kinds and their role policies, as data (the built-in names a
//!   client may use, and the rules the log applies).
//! - [`search`]: search terms: folding, words and CJK bigrams, the match rule, sealed tags.
//! - [`service`]: [`LogService`], what a gateway needs from the log
//!   whether in its process or across NATS, and who a call is made for.
//! - [`rpc`]: `LogService` over NATS request/reply, the client side and the wire
//!   conversions; calls and replies sealed.
//! - [`crypto`]: AES-SIV secrets and tenants' transport keys; [`bus_crypto`]: sealing on
//!   NATS (event envelopes, RPC payloads, the X25519 key exchange) and a bounded key cache.
//! - [`subjects`]: NATS subject names; [`nats`]: connecting to NATS with a role's
//!   credential and TLS, the link's state for `/readyz`, URL redaction.
//! - [`health`]: the named probes `/readyz` reports.
//! - [`metrics`]: Prometheus counters and histograms, the text format, the process's
//!   collectors.
//! - [`duration_as`]: durations read from the config file as whole milliseconds or
//!   seconds; [`now_ms`], [`now_secs`], [`event_kind`].

pub mod bus_crypto;
pub mod crypto;
pub mod error;
pub mod health;
pub mod ids;
pub mod metrics;
pub mod nats;
pub mod policy;
pub mod rpc;
pub mod search;
pub mod service;
pub mod subjects;
pub mod types;

pub use error::{LogError, StoreError};
pub use ids::{ClientMsgId, ConvId, TenantId, UserId};
pub use service::{Caller, LogService, RevocationStore};
pub use tidings_schemas::v1::{ConversationKind, Event, MemberRole, event::Body};
pub use types::{
    Append, By, Committed, ConversationInfo, ConversationSummary, CreateConversation, Member,
    MemberChange, MemberPage, MembersQuery, Order, ReadRange, TokenRef,
};

/// Milliseconds since the Unix epoch, by the wall clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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

    /// `d` as the whole milliseconds a `*_ms` setting holds (saturating).
    pub fn whole_millis(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }

    /// Whole milliseconds (`*_ms` settings).
    pub mod millis {
        use super::*;

        pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_u64(whole_millis(*d))
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
