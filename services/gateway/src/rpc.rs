//! The log service over NATS request/reply, for gateways and log writers that run as
//! separate processes (`--role gateway`, `--role log`).
//!
//! Requests go to `tidings.rpc.log`; log processes answer in the queue group `tidings-log`,
//! so any number of them share the load and a request is answered once. Errors travel as
//! (code, message, retryable) and come back as [`LogError::Remote`]; an unreachable log
//! service is `unavailable` and retryable.
//!
//! Nothing readable travels: the tenant is in the clear, the call (with the user's token)
//! is sealed under the tenant's transport key with a fresh nonce, and the reply is sealed
//! with the same nonce the other way ([`crate::bus_crypto`]). A gateway gets a tenant's
//! transport key from the log itself, by an X25519 exchange over this same subject. The log
//! verifies the token and refuses a call that acts as anyone else
//! ([`crate::rpc_identity`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use tidings_auth::Claims;
use tidings_log::crypto::TransportKey;
use tidings_log::store::Order;
use tidings_log::{
    Append, Body, ClientMsgId, Committed, ConvId, ConversationInfo, ConversationKind,
    ConversationSummary, CreateConversation, Event, Log, LogError, Member, MemberChange,
    MemberPage, MemberRole, MembersQuery, ReadRange, TenantId, UserId,
};
use tidings_schemas::client::{Search as SearchRequest, SearchResult};
use tidings_schemas::internal as wire;
use tidings_schemas::internal::log_request::Call;
use tidings_schemas::internal::log_response::Result as Reply;
use tidings_schemas::internal::{rpc_reply, rpc_request};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::bus_crypto::{
    self, Direction, Exchange, KeyCache, LogIdentity, LogPublicKey, NONCE_LEN,
};
use crate::rpc_identity::{self, TokenCache};
use crate::service::{Caller, LogService};
use crate::subjects;

/// Client side: a [`LogService`] that sends every call to the log processes over NATS.
#[derive(Clone)]
pub struct NatsLogService {
    client: async_nats::Client,
    timeout: Duration,
    /// The log identity this gateway pins: only it can answer a transport key request.
    log: LogPublicKey,
    /// Transport keys fetched from the log, to seal calls with.
    keys: Arc<KeyCache>,
}

impl NatsLogService {
    pub fn new(client: async_nats::Client, timeout: Duration, log: LogPublicKey) -> Self {
        NatsLogService {
            client,
            timeout,
            log,
            keys: Arc::new(KeyCache::default()),
        }
    }

    /// Asks the log for a tenant's transport key: an ephemeral X25519 public key out, the key
    /// sealed for it back. The X25519 secret lives in this call only. `token` (the user's,
    /// empty for the gateway's own reads) goes sealed for the log: a tenant's first key is
    /// made only for one of its users.
    async fn fetch_key(
        &self,
        tenant: &TenantId,
        key_id: Option<u32>,
        token: &str,
    ) -> Result<TransportKey, LogError> {
        let exchange = Exchange::new(&self.log)?;
        let sealed_token = if token.is_empty() {
            Vec::new()
        } else {
            exchange.seal_token(tenant, token)
        };
        let req = wire::RpcRequest {
            tenant: tenant.to_string(),
            body: Some(rpc_request::Body::TransportKey(wire::TransportKeyRequest {
                public_key: exchange.public_key().to_vec(),
                key_id,
                sealed_token,
            })),
        };
        let reply = self
            .round_trip(subjects::LOG_RPC, Bytes::from(req.encode_to_vec()))
            .await
            .map_err(|r| r.error)?;
        match reply.body {
            Some(rpc_reply::Body::TransportKey(k)) => exchange.finish(tenant, &k),
            Some(rpc_reply::Body::Refused(e)) => Err(from_wire(e).0),
            _ => Err(unexpected()),
        }
    }

    /// The tenant's transport key, cached.
    async fn key(&self, tenant: &TenantId, token: &str) -> Result<TransportKey, LogError> {
        self.keys
            .get(tenant, None, || self.fetch_key(tenant, None, token))
            .await
    }

    /// One request and its (still sealed) reply.
    async fn round_trip(&self, subject: &str, payload: Bytes) -> Result<wire::RpcReply, Refused> {
        let request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(self.timeout));
        let msg = self
            .client
            .send_request(subject.to_string(), request)
            .await
            .map_err(|e| {
                Refused::from(LogError::remote(
                    "unavailable",
                    format!("log service unreachable: {e}"),
                    true,
                ))
            })?;
        wire::RpcReply::decode(msg.payload.as_ref()).map_err(|e| {
            Refused::from(LogError::remote(
                "store_error",
                format!("bad reply from the log service: {e}"),
                false,
            ))
        })
    }

    /// Sends a call. A log process that does not own the conversation's partition answers
    /// `not_owner` naming the owner; the call then goes straight to that writer's own
    /// subject (one more hop, no guessing). While ownership is changing hands (no owner, or
    /// the named one has just lost it) it is sent again a bounded number of times with a
    /// short jittered backoff. A refusal wrote nothing, and appends are idempotent besides.
    async fn call(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        call: Call,
    ) -> Result<Reply, LogError> {
        let key = self.key(tenant, caller.token()).await?;
        let req = wire::LogRequest {
            tenant: tenant.to_string(),
            token: caller.token().to_string(),
            sent_ms: tidings_log::now_ms(),
            call: Some(call),
        };
        let nonce = bus_crypto::nonce();
        let plain = req.encode_to_vec();
        let sealed = {
            let key = key.clone();
            bus_crypto::off_runtime_if_large(plain.len(), move || {
                bus_crypto::seal_rpc(&key, Direction::Request, &nonce, &plain)
            })
            .await
        };
        let payload = Bytes::from(
            wire::RpcRequest {
                tenant: tenant.to_string(),
                body: Some(rpc_request::Body::Call(wire::SealedCall {
                    key_id: key.id,
                    nonce: nonce.to_vec(),
                    sealed,
                })),
            }
            .encode_to_vec(),
        );
        let mut subject = subjects::LOG_RPC.to_string();
        let mut attempt = 1;
        loop {
            match self
                .call_once(&subject, payload.clone(), &key, &nonce)
                .await
            {
                Err(Refused { error, owner })
                    if error.code() == "not_owner" && attempt < NOT_OWNER_ATTEMPTS =>
                {
                    debug!(attempt, %owner, error = %error, "not the owner; sending to the owner");
                    if owner.is_empty() {
                        tokio::time::sleep(not_owner_backoff(attempt)).await;
                        subject = subjects::LOG_RPC.to_string();
                    } else {
                        if attempt > 1 {
                            tokio::time::sleep(not_owner_backoff(attempt)).await;
                        }
                        subject = subjects::log_writer(&owner);
                    }
                    attempt += 1;
                }
                Err(Refused { error, .. }) => return Err(error),
                Ok(reply) => return Ok(reply),
            }
        }
    }

    async fn call_once(
        &self,
        subject: &str,
        payload: Bytes,
        key: &TransportKey,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<Reply, Refused> {
        let sealed = match self.round_trip(subject, payload).await?.body {
            Some(rpc_reply::Body::Sealed(sealed)) => sealed,
            Some(rpc_reply::Body::Refused(e)) => {
                if e.code == "tenant_shredded" {
                    self.keys.forget(key.tenant());
                }
                let (error, owner) = from_wire(e);
                return Err(Refused { error, owner });
            }
            _ => return Err(unexpected().into()),
        };
        let opened = {
            let (key, nonce) = (key.clone(), *nonce);
            bus_crypto::off_runtime_if_large(sealed.len(), move || {
                bus_crypto::open_rpc(&key, Direction::Reply, &nonce, &sealed)
            })
            .await
        };
        let plain = opened.map_err(|_| {
            Refused::from(LogError::remote(
                "store_error",
                "a reply from the log service does not open under the call's key".into(),
                false,
            ))
        })?;
        let resp = wire::LogResponse::decode(plain.as_slice()).map_err(|e| {
            Refused::from(LogError::remote(
                "store_error",
                format!("bad reply from the log service: {e}"),
                false,
            ))
        })?;
        match resp.result {
            Some(Reply::Error(e)) => {
                let (error, owner) = from_wire(e);
                Err(Refused { error, owner })
            }
            Some(other) => Ok(other),
            None => Err(unexpected().into()),
        }
    }
}

/// A call the log service refused, with the partition's owner when it said `not_owner`.
struct Refused {
    error: LogError,
    owner: String,
}

impl From<LogError> for Refused {
    fn from(error: LogError) -> Self {
        Refused {
            error,
            owner: String::new(),
        }
    }
}

/// Tries of one call while log processes answer `not_owner` (a partition changing hands, or
/// a try that reached a process that does not own it).
const NOT_OWNER_ATTEMPTS: u32 = 6;

/// 10 ms doubling per attempt up to 160 ms, with jitter (half to all of it) so the retries
/// of many gateways do not arrive together.
fn not_owner_backoff(attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let full = 10u64 << attempt.saturating_sub(1).min(4);
    // A fresh RandomState is randomly keyed: random bits without a dependency.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Duration::from_millis(full / 2 + random % (full / 2 + 1))
}

fn unexpected() -> LogError {
    LogError::remote(
        "store_error",
        "unexpected reply from the log service".into(),
        false,
    )
}

fn committed_from(c: wire::Committed) -> Committed {
    Committed {
        seq: c.seq,
        event_id: c.event_id,
        time_ms: c.time_ms,
        duplicate: c.duplicate,
        members: 0,
    }
}

fn committed_reply(r: Reply) -> Result<Committed, LogError> {
    match r {
        Reply::Committed(c) => Ok(committed_from(c)),
        _ => Err(unexpected()),
    }
}

fn body_to_wire(body: Body) -> Result<wire::append::Body, LogError> {
    use wire::append::Body as W;
    Ok(match body {
        Body::MessagePosted(b) => W::MessagePosted(b),
        Body::MessageEdited(b) => W::MessageEdited(b),
        Body::MessageRecalled(b) => W::MessageRecalled(b),
        Body::ReactionAdded(b) => W::ReactionAdded(b),
        Body::ReactionRemoved(b) => W::ReactionRemoved(b),
        _ => {
            return Err(LogError::InvalidRequest(
                "membership and conversation events are made by their own operations".into(),
            ));
        }
    })
}

fn body_from_wire(body: wire::append::Body) -> Body {
    use wire::append::Body as W;
    match body {
        W::MessagePosted(b) => Body::MessagePosted(b),
        W::MessageEdited(b) => Body::MessageEdited(b),
        W::MessageRecalled(b) => Body::MessageRecalled(b),
        W::ReactionAdded(b) => Body::ReactionAdded(b),
        W::ReactionRemoved(b) => Body::ReactionRemoved(b),
    }
}

fn limit_u32(limit: usize) -> u32 {
    u32::try_from(limit).unwrap_or(u32::MAX)
}

#[async_trait]
impl LogService for NatsLogService {
    async fn append(&self, caller: &Caller, req: Append) -> Result<Committed, LogError> {
        let call = Call::Append(wire::Append {
            conversation: req.conv.to_string(),
            sender: req.sender.to_string(),
            client_msg_id: req.client_msg_id.to_string(),
            body: Some(body_to_wire(req.body)?),
        });
        committed_reply(self.call(caller, &req.tenant, call).await?)
    }

    async fn read(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        range: ReadRange,
    ) -> Result<Vec<Event>, LogError> {
        let call = Call::Read(wire::Read {
            conversation: c.to_string(),
            from_seq: range.from,
            limit: limit_u32(range.limit),
            descending: range.order == Order::Descending,
        });
        match self.call(caller, t, call).await? {
            Reply::Events(list) => Ok(list.events),
            _ => Err(unexpected()),
        }
    }

    async fn create_conversation(
        &self,
        caller: &Caller,
        req: CreateConversation,
    ) -> Result<Committed, LogError> {
        let call = Call::Create(wire::Create {
            conversation: req.conv.to_string(),
            kind: tidings_log::policy::builtin_kind(&req.kind) as i32,
            kind_name: req.kind,
            title: req.title,
            creator: req.creator.to_string(),
            members: req.members.iter().map(|m| m.to_string()).collect(),
        });
        committed_reply(self.call(caller, &req.tenant, call).await?)
    }

    async fn add_member(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
        role: Option<&str>,
    ) -> Result<Committed, LogError> {
        let call = Call::AddMember(member_change(c, by, user, role.unwrap_or_default()));
        committed_reply(self.call(caller, t, call).await?)
    }

    async fn set_role(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
        role: &str,
    ) -> Result<Committed, LogError> {
        let call = Call::SetRole(member_change(c, by, user, role));
        committed_reply(self.call(caller, t, call).await?)
    }

    async fn set_display_name(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
        name: &str,
    ) -> Result<Committed, LogError> {
        let call = Call::SetDisplayName(wire::SetDisplayName {
            conversation: c.to_string(),
            by: by.to_string(),
            user: user.to_string(),
            display_name: name.to_string(),
        });
        committed_reply(self.call(caller, t, call).await?)
    }

    async fn remove_member(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
    ) -> Result<Committed, LogError> {
        let call = Call::RemoveMember(member_change(c, by, user, ""));
        committed_reply(self.call(caller, t, call).await?)
    }

    async fn mark_read(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        user: &UserId,
        seq: u64,
    ) -> Result<u64, LogError> {
        let call = Call::MarkRead(wire::MarkRead {
            conversation: c.to_string(),
            user: user.to_string(),
            seq,
        });
        match self.call(caller, t, call).await? {
            Reply::ReadSeq(s) => Ok(s),
            _ => Err(unexpected()),
        }
    }

    async fn conversations(
        &self,
        caller: &Caller,
        t: &TenantId,
        user: &UserId,
        after: Option<&ConvId>,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, LogError> {
        let call = Call::ListConversations(wire::ListConversations {
            user: user.to_string(),
            after: after.map(|a| a.to_string()).unwrap_or_default(),
            limit: limit_u32(limit),
        });
        match self.call(caller, t, call).await? {
            Reply::Conversations(list) => list
                .conversations
                .into_iter()
                .map(|s| {
                    Ok(ConversationSummary {
                        conv: ConvId::new(s.conversation)?,
                        head_seq: s.head_seq,
                        read_seq: s.read_seq,
                        unread: s.unread,
                    })
                })
                .collect(),
            _ => Err(unexpected()),
        }
    }

    async fn members(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        q: &MembersQuery,
    ) -> Result<MemberPage, LogError> {
        let call = Call::ListMembers(wire::ListMembers {
            conversation: c.to_string(),
            after: q.after.as_ref().map(|a| a.to_string()).unwrap_or_default(),
            limit: limit_u32(q.limit),
            prefix: q.prefix.clone(),
            // The wire's 0 is "members": every version a list was served with is at least 1
            // (the creation), so no one asks the changes since 0.
            since_version: q.since_version.unwrap_or(0),
        });
        let Reply::Members(list) = self.call(caller, t, call).await? else {
            return Err(unexpected());
        };
        let members = list
            .members
            .into_iter()
            .map(|m| {
                Ok(Member {
                    user: UserId::new(m.user)?,
                    role: MemberRole::try_from(m.role).unwrap_or(MemberRole::Unspecified),
                    role_name: m.role_name,
                    display_name: m.display_name,
                    joined_seq: m.joined_seq,
                })
            })
            .collect::<Result<_, LogError>>()?;
        let changes = list
            .changes
            .into_iter()
            .map(|m| {
                Ok(MemberChange {
                    seq: m.seq,
                    user: UserId::new(m.user)?,
                    role: MemberRole::try_from(m.role).unwrap_or(MemberRole::Unspecified),
                    role_name: m.role_name,
                    display_name: m.display_name,
                    removed: m.removed,
                })
            })
            .collect::<Result<_, LogError>>()?;
        Ok(MemberPage {
            version: list.version,
            members,
            changes,
        })
    }

    async fn is_member(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
        user: &UserId,
    ) -> Result<bool, LogError> {
        let call = Call::IsMember(wire::IsMember {
            conversation: c.to_string(),
            user: user.to_string(),
        });
        match self.call(caller, t, call).await? {
            Reply::IsMember(b) => Ok(b),
            _ => Err(unexpected()),
        }
    }

    async fn conversation(
        &self,
        caller: &Caller,
        t: &TenantId,
        c: &ConvId,
    ) -> Result<ConversationInfo, LogError> {
        let call = Call::ConversationInfo(wire::ConversationInfo {
            conversation: c.to_string(),
        });
        match self.call(caller, t, call).await? {
            Reply::Info(i) => Ok(ConversationInfo {
                kind: ConversationKind::try_from(i.kind).unwrap_or(ConversationKind::Unspecified),
                kind_name: i.kind_name,
                head_seq: i.head_seq,
                last_time_ms: i.last_time_ms,
                member_count: i.member_count,
            }),
            _ => Err(unexpected()),
        }
    }

    async fn search(
        &self,
        caller: &Caller,
        t: &TenantId,
        user: &UserId,
        req: &SearchRequest,
    ) -> Result<SearchResult, LogError> {
        let call = Call::Search(wire::Search {
            user: user.to_string(),
            query: req.query.clone(),
            cursor: req.cursor.clone(),
            limit: req.limit,
        });
        match self.call(caller, t, call).await? {
            Reply::Search(page) => Ok(page),
            _ => Err(unexpected()),
        }
    }

    async fn transport_key(
        &self,
        t: &TenantId,
        key_id: Option<u32>,
    ) -> Result<TransportKey, LogError> {
        self.keys
            .get(t, key_id, || self.fetch_key(t, key_id, ""))
            .await
    }
}

/// A conversation kind from the wire: by name when given, else the built-in enum.
pub fn kind_by_name(name: String, kind: i32) -> Result<String, LogError> {
    if !name.is_empty() {
        return Ok(name);
    }
    match ConversationKind::try_from(kind) {
        Ok(ConversationKind::Direct) => Ok(tidings_log::policy::DIRECT.into()),
        Ok(ConversationKind::Group) => Ok(tidings_log::policy::GROUP_KIND.into()),
        _ => Err(LogError::InvalidRequest(
            "say the conversation kind (kind_name, or kind direct or group)".into(),
        )),
    }
}

fn member_change(c: &ConvId, by: &UserId, user: &UserId, role: &str) -> wire::MemberChange {
    wire::MemberChange {
        conversation: c.to_string(),
        by: by.to_string(),
        user: user.to_string(),
        role: role.to_string(),
    }
}

fn opt<T>(
    value: String,
    parse: impl Fn(String) -> Result<T, LogError>,
) -> Result<Option<T>, LogError> {
    if value.is_empty() {
        Ok(None)
    } else {
        parse(value).map(Some)
    }
}

fn to_wire_committed(c: Committed) -> Reply {
    Reply::Committed(wire::Committed {
        seq: c.seq,
        event_id: c.event_id,
        time_ms: c.time_ms,
        duplicate: c.duplicate,
    })
}

/// Executes one request against the log. Ids are validated here: the request came off the
/// network.
async fn execute(log: &Log, t: TenantId, call: Call) -> Result<Reply, LogError> {
    Ok(match call {
        Call::Append(a) => {
            let body = a
                .body
                .ok_or_else(|| LogError::InvalidRequest("append without a body".into()))?;
            let req = Append {
                tenant: t,
                conv: ConvId::new(a.conversation)?,
                sender: UserId::new(a.sender)?,
                client_msg_id: ClientMsgId::new(a.client_msg_id)?,
                body: body_from_wire(body),
            };
            to_wire_committed(log.append_for_user(req).await?)
        }
        Call::Read(r) => {
            let range = ReadRange {
                from: r.from_seq,
                limit: r.limit as usize,
                order: if r.descending {
                    Order::Descending
                } else {
                    Order::Ascending
                },
            };
            let events = log.read(&t, &ConvId::new(r.conversation)?, range).await?;
            Reply::Events(wire::EventList { events })
        }
        Call::Create(c) => {
            let req = CreateConversation {
                tenant: t,
                conv: ConvId::new(c.conversation)?,
                kind: kind_by_name(c.kind_name, c.kind)?,
                title: c.title,
                creator: UserId::new(c.creator)?,
                members: c
                    .members
                    .into_iter()
                    .map(UserId::new)
                    .collect::<Result<_, _>>()?,
            };
            to_wire_committed(log.create_conversation_for_user(req).await?)
        }
        Call::AddMember(m) => {
            let (c, by, user) = (
                ConvId::new(m.conversation)?,
                UserId::new(m.by)?,
                UserId::new(m.user)?,
            );
            let role = Some(m.role.as_str()).filter(|r| !r.is_empty());
            to_wire_committed(log.add_member_as(&t, &c, &by, &user, role).await?)
        }
        Call::SetRole(m) => {
            let (c, by, user) = (
                ConvId::new(m.conversation)?,
                UserId::new(m.by)?,
                UserId::new(m.user)?,
            );
            to_wire_committed(log.set_role(&t, &c, &by, &user, &m.role).await?)
        }
        Call::SetDisplayName(m) => {
            let (c, by, user) = (
                ConvId::new(m.conversation)?,
                UserId::new(m.by)?,
                UserId::new(m.user)?,
            );
            let by = tidings_log::By::Member(by);
            to_wire_committed(
                log.set_display_name(&t, &c, by, &user, &m.display_name)
                    .await?,
            )
        }
        Call::RemoveMember(m) => {
            let (c, by, user) = (
                ConvId::new(m.conversation)?,
                UserId::new(m.by)?,
                UserId::new(m.user)?,
            );
            to_wire_committed(log.remove_member(&t, &c, &by, &user).await?)
        }
        Call::MarkRead(m) => {
            let (c, user) = (ConvId::new(m.conversation)?, UserId::new(m.user)?);
            Reply::ReadSeq(log.mark_read(&t, &c, &user, m.seq).await?)
        }
        Call::ListConversations(l) => {
            let user = UserId::new(l.user)?;
            let after = opt(l.after, ConvId::new)?;
            let list = log
                .conversations(&t, &user, after.as_ref(), l.limit as usize)
                .await?;
            Reply::Conversations(wire::SummaryList {
                conversations: list
                    .into_iter()
                    .map(|s| wire::Summary {
                        conversation: s.conv.to_string(),
                        head_seq: s.head_seq,
                        read_seq: s.read_seq,
                        unread: s.unread,
                    })
                    .collect(),
            })
        }
        Call::ListMembers(l) => {
            let c = ConvId::new(l.conversation)?;
            let q = MembersQuery {
                after: opt(l.after, UserId::new)?,
                limit: l.limit as usize,
                prefix: l.prefix,
                since_version: (l.since_version > 0).then_some(l.since_version),
            };
            let page = log.member_page(&t, &c, &q).await?;
            Reply::Members(wire::MemberList {
                members: page
                    .members
                    .into_iter()
                    .map(|m| wire::Member {
                        user: m.user.to_string(),
                        role: m.role as i32,
                        joined_seq: m.joined_seq,
                        role_name: m.role_name,
                        display_name: m.display_name,
                    })
                    .collect(),
                version: page.version,
                changes: page
                    .changes
                    .into_iter()
                    .map(|m| wire::MemberUpdate {
                        user: m.user.to_string(),
                        role: m.role as i32,
                        removed: m.removed,
                        seq: m.seq,
                        role_name: m.role_name,
                        display_name: m.display_name,
                    })
                    .collect(),
            })
        }
        Call::IsMember(m) => {
            let (c, user) = (ConvId::new(m.conversation)?, UserId::new(m.user)?);
            Reply::IsMember(log.is_member(&t, &c, &user).await?)
        }
        Call::Search(q) => {
            let user = UserId::new(q.user)?;
            let page = log
                .search(&t, &user, &q.query, &q.cursor, q.limit as usize)
                .await?;
            Reply::Search(page)
        }
        Call::ConversationInfo(i) => {
            let info = log.conversation(&t, &ConvId::new(i.conversation)?).await?;
            Reply::Info(wire::Info {
                kind: info.kind as i32,
                kind_name: info.kind_name,
                head_seq: info.head_seq,
                last_time_ms: info.last_time_ms,
                member_count: info.member_count,
            })
        }
    })
}

/// How far a call's `sent_ms` may be from the log's clock: a captured request replayed
/// later than this is refused. Generous enough for clock skew between hosts and a request
/// retried to the partition's owner.
pub const MAX_CALL_AGE: Duration = Duration::from_secs(60);

/// Nonces of membership changes remembered (for [`MAX_CALL_AGE`]) so a captured one cannot be
/// replayed inside that window to undo a later change. Appends need no such memory (they are
/// idempotent by client message id), nor do reads and read cursors (monotonic). 100,000
/// entries of ~64 bytes: ~6 MB; past it the oldest are forgotten.
pub const REPLAY_NONCES: usize = 100_000;

/// What the log's RPC server checks calls against.
pub struct RpcAuth {
    tokens: TokenCache,
    replay: Mutex<ReplayGuard>,
    /// The log's identity, made from the log's master key on first use.
    identity: std::sync::OnceLock<LogIdentity>,
}

impl RpcAuth {
    /// Verifies user tokens with `verifier` (built from the same `[auth]` config as the
    /// gateways'), caching verified ones.
    pub fn new(verifier: tidings_auth::Verifier) -> Arc<RpcAuth> {
        Arc::new(RpcAuth {
            tokens: TokenCache::new(verifier),
            replay: Mutex::new(ReplayGuard::default()),
            identity: std::sync::OnceLock::new(),
        })
    }

    fn identity(&self, log: &Log) -> &LogIdentity {
        self.identity
            .get_or_init(|| LogIdentity::new(log.log_identity_secret()))
    }

    pub fn tokens(&self) -> &TokenCache {
        &self.tokens
    }
}

#[derive(Default)]
struct ReplayGuard {
    seen: HashMap<[u8; NONCE_LEN], i64>,
    order: VecDeque<([u8; NONCE_LEN], i64)>,
}

impl ReplayGuard {
    /// Records a nonce; false if it was seen within the window.
    fn fresh(&mut self, nonce: [u8; NONCE_LEN], now_ms: i64) -> bool {
        let window = MAX_CALL_AGE.as_millis() as i64;
        while let Some((old, at)) = self.order.front().copied() {
            if now_ms - at > 2 * window || self.order.len() >= REPLAY_NONCES {
                self.order.pop_front();
                if self.seen.get(&old) == Some(&at) {
                    self.seen.remove(&old);
                }
            } else {
                break;
            }
        }
        if self.seen.contains_key(&nonce) {
            return false;
        }
        self.seen.insert(nonce, now_ms);
        self.order.push_back((nonce, now_ms));
        true
    }

    fn forget(&mut self, nonce: &[u8; NONCE_LEN]) {
        self.seen.remove(nonce);
    }
}

/// A refusal sent in the clear, for a request that could not be opened: a code and a fixed
/// message, nothing taken from the request.
fn refused(e: &LogError) -> wire::RpcReply {
    let message = match e {
        LogError::TenantShredded { .. } => "the tenant was shredded",
        LogError::InvalidId { .. } => "the tenant id is not valid",
        _ if e.code() == "invalid_request" => "the request could not be opened",
        _ => "the log could not answer",
    };
    wire::RpcReply {
        body: Some(rpc_reply::Body::Refused(wire::LogError {
            code: e.code().to_string(),
            message: message.into(),
            retryable: e.is_retryable(),
            owner: String::new(),
            retry_after_ms: e.retry_after_ms(),
            cell: wrong_cell(e),
        })),
    }
}

/// The cell a `wrong_cell` error names (empty for every other error).
fn wrong_cell(e: &LogError) -> String {
    match e {
        LogError::WrongCell { cell } => cell.clone(),
        _ => String::new(),
    }
}

/// A log error as the remote log service reported it, and the owner it named (not_owner).
fn from_wire(e: wire::LogError) -> (LogError, String) {
    let error = if e.code == "wrong_cell" {
        LogError::WrongCell { cell: e.cell }
    } else {
        LogError::remote_after(&e.code, e.message, e.retryable, e.retry_after_ms)
    };
    (error, e.owner)
}

fn error_reply(e: &LogError) -> Reply {
    Reply::Error(wire::LogError {
        code: e.code().to_string(),
        message: e.to_string(),
        retryable: e.is_retryable(),
        owner: match e {
            LogError::NotOwner { owner, .. } => owner.clone(),
            _ => String::new(),
        },
        retry_after_ms: e.retry_after_ms(),
        cell: wrong_cell(e),
    })
}

/// Answers one request off NATS.
async fn answer(log: &Log, auth: &RpcAuth, payload: &[u8]) -> wire::RpcReply {
    let req = match wire::RpcRequest::decode(payload) {
        Ok(req) => req,
        Err(_) => return refused(&LogError::InvalidRequest("undecodable".into())),
    };
    let t = match TenantId::new(req.tenant) {
        Ok(t) => t,
        Err(e) => return refused(&e),
    };
    // A tenant homed in another cell is not served here at all (cells).
    if let Err(e) = log.serves(&t) {
        return refused(&e);
    }
    match req.body {
        Some(rpc_request::Body::TransportKey(k)) => {
            let identity = auth.identity(log);
            let key = match key_for_request(log, auth, identity, &t, &k).await {
                Ok(key) => key,
                Err(e) => return refused(&e),
            };
            match identity.answer(&key, &k.public_key) {
                Ok(reply) => wire::RpcReply {
                    body: Some(rpc_reply::Body::TransportKey(reply)),
                },
                Err(e) => refused(&e),
            }
        }
        Some(rpc_request::Body::Call(call)) => {
            let Ok(nonce) = <[u8; NONCE_LEN]>::try_from(call.nonce.as_slice()) else {
                return refused(&LogError::InvalidRequest("bad nonce".into()));
            };
            let key = match log.transport_key(&t, Some(call.key_id)).await {
                Ok(key) => key,
                Err(e) => return refused(&e),
            };
            let sealed = call.sealed;
            let opened = {
                let key = key.clone();
                bus_crypto::off_runtime_if_large(sealed.len(), move || {
                    bus_crypto::open_rpc(&key, Direction::Request, &nonce, &sealed)
                })
                .await
            };
            let Ok(plain) = opened else {
                return refused(&LogError::InvalidRequest("does not open".into()));
            };
            let result = match wire::LogRequest::decode(plain.as_slice()) {
                Ok(inner) => run_call(log, auth, &t, nonce, inner).await,
                Err(e) => Err(LogError::InvalidRequest(format!(
                    "undecodable log request: {e}"
                ))),
            };
            let resp = wire::LogResponse {
                result: Some(result.unwrap_or_else(|e| error_reply(&e))),
            }
            .encode_to_vec();
            let sealed = bus_crypto::off_runtime_if_large(resp.len(), move || {
                bus_crypto::seal_rpc(&key, Direction::Reply, &nonce, &resp)
            })
            .await;
            wire::RpcReply {
                body: Some(rpc_reply::Body::Sealed(sealed)),
            }
        }
        None => refused(&LogError::InvalidRequest("empty".into())),
    }
}

/// The key a transport key request asks for. Nothing is created for the gateway alone: a
/// tenant's first key is made only when the request carries a valid, unrevoked token of that
/// tenant (sealed for this log), so a gateway credential cannot make the log write keys for
/// tenants it made up.
async fn key_for_request(
    log: &Log,
    auth: &RpcAuth,
    identity: &LogIdentity,
    t: &TenantId,
    k: &wire::TransportKeyRequest,
) -> Result<TransportKey, LogError> {
    if k.key_id.is_some() {
        return log.transport_key(t, k.key_id).await;
    }
    if let Some(key) = log.existing_transport_key(t).await? {
        return Ok(key);
    }
    let no_keys = || {
        LogError::NotAllowed(format!(
            "tenant {t} has no keys yet; a call of one of its users starts it"
        ))
    };
    if k.sealed_token.is_empty() {
        return Err(no_keys());
    }
    let token = identity.open_token(t, &k.public_key, &k.sealed_token)?;
    let claims = auth.tokens.verify(&token, crate::now_secs())?;
    if claims.tenant != t.as_str() {
        return Err(no_keys());
    }
    refuse_revoked(log, t, &claims).await?;
    log.transport_key(t, None).await
}

/// A revoked token acts for no one, here as at the gateway's Hello: a gateway that missed
/// the revocation notice still cannot act with it.
async fn refuse_revoked(log: &Log, t: &TenantId, claims: &Claims) -> Result<(), LogError> {
    let user = tidings_log::UserId::new(claims.user.clone())?;
    let token = tidings_log::revocation::TokenRef {
        tenant: t,
        user: &user,
        jti: claims.jti.as_deref(),
        issued_at: claims.issued_at,
    };
    if log.is_revoked(token).await? {
        return Err(LogError::NotAllowed("token refused: revoked".into()));
    }
    Ok(())
}

/// Checks an opened call (tenant, age, identity, replay) and runs it.
async fn run_call(
    log: &Log,
    auth: &RpcAuth,
    t: &TenantId,
    nonce: [u8; NONCE_LEN],
    req: wire::LogRequest,
) -> Result<Reply, LogError> {
    if req.tenant != t.as_str() {
        return Err(LogError::InvalidRequest(
            "the sealed call names another tenant than its envelope".into(),
        ));
    }
    let now = tidings_log::now_ms();
    if (now - req.sent_ms).unsigned_abs() > MAX_CALL_AGE.as_millis() as u64 {
        return Err(LogError::NotAllowed(
            "the call is stale (or the clocks of gateway and log disagree)".into(),
        ));
    }
    let call = req
        .call
        .ok_or_else(|| LogError::InvalidRequest("request without a call".into()))?;
    if let Some(claims) =
        rpc_identity::authorize(&auth.tokens, t, &req.token, &call, crate::now_secs())?
    {
        refuse_revoked(log, t, &claims).await?;
    }
    let membership = matches!(
        call,
        Call::AddMember(_) | Call::RemoveMember(_) | Call::SetRole(_) | Call::SetDisplayName(_)
    );
    if membership
        && !auth
            .replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fresh(nonce, now)
    {
        return Err(LogError::NotAllowed("the call was replayed".into()));
    }
    let result = execute(log, t.clone(), call).await;
    if membership && matches!(&result, Err(LogError::NotOwner { .. })) {
        // Not done here: the caller sends the same call on to the owner, maybe us again.
        auth.replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(&nonce);
    }
    result
}

/// Why [`serve`] stopped. It never stops on its own while NATS keeps the subscriptions: each
/// of these is a failure its owner restarts it for, or exits on.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("failed to subscribe to the log's subjects: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("NATS removed the subscription to {subject} (a permission violation)")]
    Lost { subject: String },
    #[error("the request subscription ended (the NATS client closed)")]
    Ended,
}

/// Server side: answers log requests from NATS until the subscriptions end: those of the
/// queue group (any log process may get them) and those sent to this writer by name. At
/// most `max_in_flight` requests run at once; the rest wait in NATS's queue.
pub async fn serve(
    client: async_nats::Client,
    log: Log,
    auth: Arc<RpcAuth>,
    max_in_flight: usize,
) -> Result<(), ServeError> {
    serve_on(client, log, auth, max_in_flight, true, None).await
}

/// [`serve`], ending with [`ServeError::Lost`] when NATS removes one of its subscriptions
/// (`lost` is [`crate::nats::BusEvents::lost`]); the subscription's stream would otherwise
/// stay open and silent while the process looks healthy.
pub async fn serve_watched(
    client: async_nats::Client,
    log: Log,
    auth: Arc<RpcAuth>,
    max_in_flight: usize,
    lost: tokio::sync::broadcast::Receiver<String>,
) -> Result<(), ServeError> {
    serve_on(client, log, auth, max_in_flight, true, Some(lost)).await
}

/// [`serve`] without joining the queue group: answers only requests sent to this writer
/// by name. For tests that must know which process a request reaches first.
pub async fn serve_by_name_only(
    client: async_nats::Client,
    log: Log,
    auth: Arc<RpcAuth>,
    max_in_flight: usize,
) -> Result<(), ServeError> {
    serve_on(client, log, auth, max_in_flight, false, None).await
}

async fn serve_on(
    client: async_nats::Client,
    log: Log,
    auth: Arc<RpcAuth>,
    max_in_flight: usize,
    shared: bool,
    mut lost: Option<tokio::sync::broadcast::Receiver<String>>,
) -> Result<(), ServeError> {
    // Requests sent here by name, after another log process said this one owns them.
    let own_subject = subjects::log_writer(log.writer_id());
    let own = client.subscribe(own_subject.clone()).await?;
    let mut requests = if shared {
        let group = client
            .queue_subscribe(subjects::LOG_RPC, subjects::LOG_QUEUE_GROUP.to_string())
            .await?;
        futures_util::stream::select(group, own).boxed()
    } else {
        own.boxed()
    };
    let permits = Arc::new(Semaphore::new(max_in_flight));
    loop {
        let removed = async {
            match lost.as_mut() {
                Some(lost) => lost.recv().await,
                None => std::future::pending().await,
            }
        };
        let msg = tokio::select! {
            msg = requests.next() => match msg {
                Some(msg) => msg,
                None => return Err(ServeError::Ended),
            },
            subject = removed => match subject {
                Ok(subject) if subject == subjects::LOG_RPC || subject == own_subject => {
                    return Err(ServeError::Lost { subject });
                }
                Ok(_) => continue,
                // Removal notices were missed, perhaps of ours: subscribe again to be sure.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    return Err(ServeError::Lost { subject: "(notices missed)".into() });
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    lost = None;
                    continue;
                }
            },
        };
        let Some(reply_to) = msg.reply.clone() else {
            debug!("log request without a reply subject ignored");
            continue;
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return Err(ServeError::Ended);
        };
        let (client, log, auth) = (client.clone(), log.clone(), auth.clone());
        tokio::spawn(async move {
            let reply = answer(&log, &auth, &msg.payload).await;
            if let Err(e) = client
                .publish(reply_to, Bytes::from(reply.encode_to_vec()))
                .await
            {
                warn!(error = %e, "failed to send a log reply");
            }
            drop(permit);
        });
    }
}
