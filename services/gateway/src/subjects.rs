//! NATS subject names. Ids are `[A-Za-z0-9_-]`, so they are always single subject tokens.

use tidings_log::{ConvId, TenantId, UserId};

/// The JetStream stream that keeps a bounded replay window of committed events.
pub const STREAM: &str = "TIDINGS_EVENTS";
/// What the stream captures.
pub const STREAM_SUBJECTS: &str = "tidings.ev.>";
/// The log service's request subject and queue group.
pub const LOG_RPC: &str = "tidings.rpc.log";
pub const LOG_QUEUE_GROUP: &str = "tidings-log";

/// Committed events of one conversation.
pub fn events(t: &TenantId, c: &ConvId) -> String {
    format!("tidings.ev.{t}.{c}")
}

/// Typing notices of one conversation (core NATS, never stored).
pub fn typing(t: &TenantId, c: &ConvId) -> String {
    format!("tidings.ty.{t}.{c}")
}

/// Membership changes and read cursors of one user.
pub fn user(t: &TenantId, u: &UserId) -> String {
    format!("tidings.user.{t}.{u}")
}

/// The JetStream dedupe id of an event.
pub fn msg_id(t: &str, c: &str, seq: u64) -> String {
    format!("{t}/{c}/{seq}")
}
