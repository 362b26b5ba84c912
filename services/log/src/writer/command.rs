//! The commands the sequencer takes, what it answers them, and the keys each one reads:
//! what `log` and `outage` hand the writer, kept apart from how the commands are applied.

use tidings_schemas::storage::ReplicaBatch;
use tidings_schemas::v1::event::Body;
use tokio::sync::oneshot;

use crate::error::LogError;
use crate::ids::{ConvId, TenantId, UserId};
use crate::keys;
use crate::lease::Held;
use crate::{Append, By, Committed, CreateConversation};

pub(crate) enum Command {
    Create(CreateConversation),
    Append(Append),
    AddMember {
        tenant: TenantId,
        conv: ConvId,
        by: UserId,
        user: UserId,
        /// `None`: the kind's member role.
        role: Option<String>,
    },
    SetRole {
        tenant: TenantId,
        conv: ConvId,
        by: UserId,
        user: UserId,
        role: String,
    },
    SetDisplayName {
        tenant: TenantId,
        conv: ConvId,
        by: By,
        user: UserId,
        name: String,
    },
    RemoveMember {
        tenant: TenantId,
        conv: ConvId,
        by: UserId,
        user: UserId,
    },
    Rename {
        tenant: TenantId,
        conv: ConvId,
        by: UserId,
        title: String,
    },
    MarkRead {
        tenant: TenantId,
        conv: ConvId,
        user: UserId,
        seq: u64,
    },
    /// A home cell's commit of a replicated tenant, applied here (the DR cell) as it was
    /// written there (`cells`).
    Replica {
        tenant: TenantId,
        conv: ConvId,
        batch: Box<ReplicaBatch>,
    },
    /// Lease upkeep, queued like any write so it is ordered with the batches.
    Lease(LeaseOp),
}

pub(crate) enum LeaseOp {
    /// Push the expiry of every lease held; answers with the partitions found lost.
    Renew,
    /// Start taking requests for partitions the log's lease keeper just acquired.
    Adopt(Vec<(u32, Held)>),
    /// Release every lease held (a clean stop): later requests are refused.
    Release,
}

impl Command {
    /// The conversation a write is about; `None` for lease upkeep.
    pub(crate) fn tenant_conv(&self) -> Option<(&TenantId, &ConvId)> {
        match self {
            Command::Create(c) => Some((&c.tenant, &c.conv)),
            Command::Append(a) => Some((&a.tenant, &a.conv)),
            Command::AddMember { tenant, conv, .. }
            | Command::SetRole { tenant, conv, .. }
            | Command::SetDisplayName { tenant, conv, .. }
            | Command::RemoveMember { tenant, conv, .. }
            | Command::Rename { tenant, conv, .. }
            | Command::MarkRead { tenant, conv, .. }
            | Command::Replica { tenant, conv, .. } => Some((tenant, conv)),
            Command::Lease(_) => None,
        }
    }

    /// Every key `apply` may read, so the batch can fetch them in one round trip.
    pub(crate) fn reads(&self, out: &mut Vec<Vec<u8>>) {
        let Some((t, c)) = self.tenant_conv() else {
            return;
        };
        out.push(keys::head(t, c));
        match self {
            Command::Create(_) | Command::Lease(_) => {}
            Command::Append(a) => {
                out.push(keys::member(t, c, &a.sender));
                out.push(keys::dedupe(t, c, &a.sender, &a.client_msg_id));
                if crate::unread::is_message(&a.body) {
                    // The sender's own messages are kept out of their unread count.
                    out.push(keys::user_conv(t, &a.sender, c));
                }
                if let Some(target) = author_only_target(&a.body) {
                    out.push(keys::event(t, c, target));
                }
            }
            Command::AddMember { by, user, .. }
            | Command::RemoveMember { by, user, .. }
            | Command::SetRole { by, user, .. } => {
                out.push(keys::member(t, c, by));
                out.push(keys::member(t, c, user));
            }
            Command::SetDisplayName { by, user, .. } => {
                if let By::Member(by) = by {
                    out.push(keys::member(t, c, by));
                }
                out.push(keys::member(t, c, user));
            }
            Command::Rename { by, .. } => out.push(keys::member(t, c, by)),
            Command::MarkRead { user, seq, .. } => {
                out.push(keys::member(t, c, user));
                out.push(keys::user_conv(t, user, c));
                // The message count as of the new cursor (when it is not the head).
                out.push(keys::event(t, c, *seq));
            }
            Command::Replica { batch, .. } => {
                out.push(keys::replica_mark(&batch.source, batch.partition));
                // Heads are checked in the transaction; events it would replace are kept.
                out.extend(
                    batch
                        .writes
                        .iter()
                        .filter(|w| w.key.starts_with(b"hd\0") || w.key.starts_with(b"ev\0"))
                        .map(|w| w.key.clone()),
                );
            }
        }
    }
}

/// Edits and recalls point at a message (recalls of others' messages as the policy allows).
pub(super) fn author_only_target(body: &Body) -> Option<u64> {
    match body {
        Body::MessageEdited(e) => Some(e.target_seq),
        Body::MessageRecalled(r) => Some(r.target_seq),
        _ => None,
    }
}

/// The seq a body points at, if it points at one.
pub(super) fn target_seq(body: &Body) -> Option<u64> {
    match body {
        Body::MessagePosted(p) if p.reply_to_seq != 0 => Some(p.reply_to_seq),
        Body::ReactionAdded(r) => Some(r.target_seq),
        Body::ReactionRemoved(r) => Some(r.target_seq),
        other => author_only_target(other),
    }
}

pub(crate) enum Outcome {
    Committed(Committed),
    Cursor(u64),
    /// Lease upkeep done; the partitions found lost on the way.
    Leases {
        lost: Vec<u32>,
    },
    /// A replica batch: applied now, or skipped (at or below the mark: applied before).
    Replica {
        applied: bool,
    },
}

pub(crate) struct Request {
    pub cmd: Command,
    pub reply: oneshot::Sender<Result<Outcome, LogError>>,
}
