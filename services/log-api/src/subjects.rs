//! NATS subject names. Ids are `[A-Za-z0-9_-]`, so they are always single subject tokens.

use crate::{ConvId, TenantId, UserId};

/// The JetStream stream that keeps a bounded replay window of committed events.
pub const STREAM: &str = "TIDINGS_EVENTS";
/// What the stream captures.
pub const STREAM_SUBJECTS: &str = "tidings.ev.>";
/// The log service's request subject and queue group.
pub const LOG_RPC: &str = "tidings.rpc.log";
pub const LOG_QUEUE_GROUP: &str = "tidings-log";

/// One log process's own request subject, named by its writer id: where a request goes
/// once a `not_owner` reply has said who owns the conversation. Writer ids may hold any
/// characters (a default one has the hostname), so everything outside `[A-Za-z0-9_-]`
/// becomes `_`; both sides map the same id the same way.
pub fn log_writer(writer_id: &str) -> String {
    let token: String = writer_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{LOG_RPC}.w.{token}")
}

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

/// Revocation notices of one tenant (core NATS): every gateway ends the sessions a notice
/// names.
pub fn revoked(t: &TenantId) -> String {
    format!("{REVOKED_PREFIX}.{t}")
}

/// What a gateway subscribes to for revocation notices of every tenant.
pub const REVOKED_ALL: &str = "tidings.revoked.*";
pub const REVOKED_PREFIX: &str = "tidings.revoked";

/// The JetStream dedupe id of an event.
pub fn msg_id(t: &str, c: &str, seq: u64) -> String {
    format!("{t}/{c}/{seq}")
}
