//! The log service over NATS request/reply, for gateways and log writers that run as
//! separate processes (`--role gateway`, `--role log`): the client side, and the wire
//! conversions both sides share (the server is `tidings_log_role::rpc_server`).
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
//! (`tidings_log_role::rpc_identity`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use prost::Message;
use tidings_schemas::client::{Search as SearchRequest, SearchResult};
use tidings_schemas::internal as wire;
use tidings_schemas::internal::log_request::Call;
use tidings_schemas::internal::log_response::Result as Reply;
use tidings_schemas::internal::{rpc_reply, rpc_request};
use tracing::debug;

use crate::bus_crypto::{self, Direction, Exchange, KeyCache, LogPublicKey, NONCE_LEN};
use crate::crypto::TransportKey;
use crate::service::{Caller, LogService};
use crate::{
    Append, Body, Committed, ConvId, ConversationInfo, ConversationKind, ConversationSummary,
    CreateConversation, Event, LogError, Member, MemberChange, MemberPage, MemberRole,
    MembersQuery, Order, ReadRange, TenantId, UserId, subjects,
};

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
            sent_ms: crate::now_ms(),
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

pub fn body_from_wire(body: wire::append::Body) -> Body {
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
            kind: crate::policy::builtin_kind(&req.kind) as i32,
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

fn member_change(c: &ConvId, by: &UserId, user: &UserId, role: &str) -> wire::MemberChange {
    wire::MemberChange {
        conversation: c.to_string(),
        by: by.to_string(),
        user: user.to_string(),
        role: role.to_string(),
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

/// The cell a `wrong_cell` error names (empty for every other error).
pub fn wrong_cell(e: &LogError) -> String {
    match e {
        LogError::WrongCell { cell } => cell.clone(),
        _ => String::new(),
    }
}

/// A conversation kind from the wire: by name when given, else the built-in enum.
pub fn kind_by_name(name: String, kind: i32) -> Result<String, LogError> {
    if !name.is_empty() {
        return Ok(name);
    }
    match ConversationKind::try_from(kind) {
        Ok(ConversationKind::Direct) => Ok(crate::policy::DIRECT.into()),
        Ok(ConversationKind::Group) => Ok(crate::policy::GROUP_KIND.into()),
        _ => Err(LogError::InvalidRequest(
            "say the conversation kind (kind_name, or kind direct or group)".into(),
        )),
    }
}
