//! What callers of the log send and get back: appends, reads, member pages, conversation
//! summaries. The same types whether the log is in this process or across NATS.

use tidings_schemas::v1::{ConversationKind, MemberRole, event::Body};

use crate::error::LogError;
use crate::ids::{ClientMsgId, ConvId, TenantId, UserId};

/// Scan direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Ascending,
    Descending,
}

/// Longest display name, in bytes.
pub const MAX_DISPLAY_NAME_BYTES: usize = 128;

/// Who makes a change that members or the system may make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum By {
    Member(UserId),
    /// The operator's tools (`tidings conv set-name`): the system, past the kind's policy.
    System,
}

/// Create a conversation: the creator takes the kind's creator role (a group's owner, a
/// class's teacher), the others its member role.
#[derive(Clone, Debug)]
pub struct CreateConversation {
    pub tenant: TenantId,
    pub conv: ConvId,
    /// The kind's name: `direct`, `group`, `announcement`, `class` or a configured one.
    pub kind: String,
    pub title: String,
    pub creator: UserId,
    /// Other members; the creator is added whether listed or not, duplicates are ignored.
    pub members: Vec<UserId>,
}

impl CreateConversation {
    /// Creator first, then the others in the order given, each once.
    pub fn all_members(&self) -> Vec<UserId> {
        let mut seen = std::collections::HashSet::new();
        std::iter::once(&self.creator)
            .chain(&self.members)
            .filter(|u| seen.insert(*u))
            .cloned()
            .collect()
    }
}

/// Append one client event (a message, an edit, a recall, a reaction) to a conversation.
#[derive(Clone, Debug)]
pub struct Append {
    pub tenant: TenantId,
    pub conv: ConvId,
    pub sender: UserId,
    pub client_msg_id: ClientMsgId,
    pub body: Body,
}

impl Append {
    /// A plain text message.
    pub fn text(
        tenant: TenantId,
        conv: ConvId,
        sender: UserId,
        client_msg_id: ClientMsgId,
        text: impl Into<String>,
    ) -> Self {
        Append {
            tenant,
            conv,
            sender,
            client_msg_id,
            body: Body::MessagePosted(tidings_schemas::v1::MessagePosted {
                text: text.into(),
                ..Default::default()
            }),
        }
    }
}

/// What a committed write answers: the event's position and id. `duplicate` is true when
/// this was a retry and these are the original's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub seq: u64,
    pub event_id: String,
    pub time_ms: i64,
    pub duplicate: bool,
    /// The conversation's members when it committed (the pushes it makes); 0 when not
    /// known here (a retry answered with the original, an answer from another process).
    pub members: u64,
}

/// Which events to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRange {
    /// First seq to return. Forward: default 1. Backward: default the head.
    pub from: Option<u64>,
    pub limit: usize,
    pub order: Order,
}

impl ReadRange {
    pub fn forward(from: u64, limit: usize) -> Self {
        ReadRange {
            from: Some(from),
            limit,
            order: Order::Ascending,
        }
    }

    /// The newest `limit` events (from the head down).
    pub fn latest(limit: usize) -> Self {
        ReadRange {
            from: None,
            limit,
            order: Order::Descending,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub user: UserId,
    /// The built-in role, for clients that predate role names (`Unspecified` for others).
    pub role: MemberRole,
    /// The role by name, one of the conversation kind's roles.
    pub role_name: String,
    /// The member's display name in this conversation; empty: none.
    pub display_name: String,
    pub joined_seq: u64,
}

/// What a member-list request asks for (a member page).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MembersQuery {
    /// Members after this id (paging).
    pub after: Option<UserId>,
    pub limit: usize,
    /// Only members whose id starts with this; empty: all.
    pub prefix: String,
    /// `Some(v)`: the changes after version `v` instead of members.
    pub since_version: Option<u64>,
}

/// One membership change of the change feed: `user` joined, had their role or display name
/// changed (the fields hold the member as they are after it), or was removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberChange {
    pub seq: u64,
    pub user: UserId,
    pub role: MemberRole,
    pub role_name: String,
    pub display_name: String,
    pub removed: bool,
}

/// A page of members or of membership changes, and the member list's version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberPage {
    /// The seq of the last membership event, read before the page (0: the conversation
    /// predates versions and has no change feed).
    pub version: u64,
    pub members: Vec<Member>,
    pub changes: Vec<MemberChange>,
}

/// One entry of a user's conversation list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationSummary {
    pub conv: ConvId,
    pub head_seq: u64,
    pub read_seq: u64,
    /// head − read cursor: no per-message counters.
    pub unread: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationInfo {
    /// The built-in kind, for clients that predate kind names (`Unspecified` for others).
    pub kind: ConversationKind,
    /// The kind by name.
    pub kind_name: String,
    pub head_seq: u64,
    pub last_time_ms: i64,
    pub member_count: u64,
}

/// A member-list prefix search's prefix is at most 64 characters of the id alphabet (a
/// gateway answering from memory checks it as the log does).
pub fn check_member_prefix(prefix: &str) -> Result<(), LogError> {
    if prefix.len() > 64
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(LogError::InvalidRequest(
            "a member prefix is at most 64 characters of [A-Za-z0-9_-]".into(),
        ));
    }
    Ok(())
}

/// What a revocation check needs to know about a verified token.
#[derive(Clone, Copy, Debug)]
pub struct TokenRef<'a> {
    pub tenant: &'a TenantId,
    pub user: &'a UserId,
    pub jti: Option<&'a str>,
    /// `iat`, seconds since the Unix epoch.
    pub issued_at: u64,
}
