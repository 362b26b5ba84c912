//! The log service over NATS request/reply, for gateways and log writers that run as
//! separate processes (`--role gateway`, `--role log`).
//!
//! Requests go to `tidings.rpc.log`; log processes answer in the queue group `tidings-log`,
//! so any number of them share the load and a request is answered once. Errors travel as
//! (code, message, retryable) and come back as [`LogError::Remote`]; an unreachable log
//! service is `unavailable` and retryable.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use tidings_log::store::Order;
use tidings_log::{
    Append, Body, ClientMsgId, Committed, ConvId, ConversationInfo, ConversationKind,
    ConversationSummary, CreateConversation, Event, Log, LogError, Member, MemberRole, ReadRange,
    TenantId, UserId,
};
use tidings_schemas::internal as wire;
use tidings_schemas::internal::log_request::Call;
use tidings_schemas::internal::log_response::Result as Reply;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::service::LogService;
use crate::subjects;

/// Client side: a [`LogService`] that sends every call to the log processes over NATS.
#[derive(Clone)]
pub struct NatsLogService {
    client: async_nats::Client,
    timeout: Duration,
}

impl NatsLogService {
    pub fn new(client: async_nats::Client, timeout: Duration) -> Self {
        NatsLogService { client, timeout }
    }

    /// Sends a call. A log process that does not own the conversation's partition answers
    /// `not_owner` naming the owner; the call then goes straight to that writer's own
    /// subject (one more hop, no guessing). While ownership is changing hands (no owner, or
    /// the named one has just lost it) it is sent again a bounded number of times with a
    /// short jittered backoff. A refusal wrote nothing, and appends are idempotent besides.
    async fn call(&self, tenant: &TenantId, call: Call) -> Result<Reply, LogError> {
        let req = wire::LogRequest {
            tenant: tenant.to_string(),
            call: Some(call),
        };
        let payload = Bytes::from(req.encode_to_vec());
        let mut subject = subjects::LOG_RPC.to_string();
        let mut attempt = 1;
        loop {
            match self.call_once(&subject, payload.clone()).await {
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

    async fn call_once(&self, subject: &str, payload: Bytes) -> Result<Reply, Refused> {
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
        let resp = wire::LogResponse::decode(msg.payload.as_ref()).map_err(|e| {
            Refused::from(LogError::remote(
                "store_error",
                format!("bad reply from the log service: {e}"),
                false,
            ))
        })?;
        match resp.result {
            Some(Reply::Error(e)) => Err(Refused {
                error: LogError::remote(&e.code, e.message, e.retryable),
                owner: e.owner,
            }),
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
    async fn append(&self, req: Append) -> Result<Committed, LogError> {
        let call = Call::Append(wire::Append {
            conversation: req.conv.to_string(),
            sender: req.sender.to_string(),
            client_msg_id: req.client_msg_id.to_string(),
            body: Some(body_to_wire(req.body)?),
        });
        committed_reply(self.call(&req.tenant, call).await?)
    }

    async fn read(
        &self,
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
        match self.call(t, call).await? {
            Reply::Events(list) => Ok(list.events),
            _ => Err(unexpected()),
        }
    }

    async fn create_conversation(&self, req: CreateConversation) -> Result<Committed, LogError> {
        let call = Call::Create(wire::Create {
            conversation: req.conv.to_string(),
            kind: req.kind as i32,
            title: req.title,
            creator: req.creator.to_string(),
            members: req.members.iter().map(|m| m.to_string()).collect(),
        });
        committed_reply(self.call(&req.tenant, call).await?)
    }

    async fn add_member(
        &self,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
    ) -> Result<Committed, LogError> {
        let call = Call::AddMember(member_change(c, by, user));
        committed_reply(self.call(t, call).await?)
    }

    async fn remove_member(
        &self,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
    ) -> Result<Committed, LogError> {
        let call = Call::RemoveMember(member_change(c, by, user));
        committed_reply(self.call(t, call).await?)
    }

    async fn mark_read(
        &self,
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
        match self.call(t, call).await? {
            Reply::ReadSeq(s) => Ok(s),
            _ => Err(unexpected()),
        }
    }

    async fn conversations(
        &self,
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
        match self.call(t, call).await? {
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
        t: &TenantId,
        c: &ConvId,
        after: Option<&UserId>,
        limit: usize,
    ) -> Result<Vec<Member>, LogError> {
        let call = Call::ListMembers(wire::ListMembers {
            conversation: c.to_string(),
            after: after.map(|a| a.to_string()).unwrap_or_default(),
            limit: limit_u32(limit),
        });
        match self.call(t, call).await? {
            Reply::Members(list) => list
                .members
                .into_iter()
                .map(|m| {
                    Ok(Member {
                        user: UserId::new(m.user)?,
                        role: MemberRole::try_from(m.role).unwrap_or(MemberRole::Unspecified),
                        joined_seq: m.joined_seq,
                    })
                })
                .collect(),
            _ => Err(unexpected()),
        }
    }

    async fn is_member(&self, t: &TenantId, c: &ConvId, user: &UserId) -> Result<bool, LogError> {
        let call = Call::IsMember(wire::IsMember {
            conversation: c.to_string(),
            user: user.to_string(),
        });
        match self.call(t, call).await? {
            Reply::IsMember(b) => Ok(b),
            _ => Err(unexpected()),
        }
    }

    async fn conversation(&self, t: &TenantId, c: &ConvId) -> Result<ConversationInfo, LogError> {
        let call = Call::ConversationInfo(wire::ConversationInfo {
            conversation: c.to_string(),
        });
        match self.call(t, call).await? {
            Reply::Info(i) => Ok(ConversationInfo {
                kind: ConversationKind::try_from(i.kind).unwrap_or(ConversationKind::Unspecified),
                head_seq: i.head_seq,
                last_time_ms: i.last_time_ms,
                member_count: i.member_count,
            }),
            _ => Err(unexpected()),
        }
    }
}

fn member_change(c: &ConvId, by: &UserId, user: &UserId) -> wire::MemberChange {
    wire::MemberChange {
        conversation: c.to_string(),
        by: by.to_string(),
        user: user.to_string(),
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
async fn execute(log: &Log, req: wire::LogRequest) -> Result<Reply, LogError> {
    let t = TenantId::new(req.tenant)?;
    let call = req
        .call
        .ok_or_else(|| LogError::InvalidRequest("request without a call".into()))?;
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
            to_wire_committed(log.append(req).await?)
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
                kind: ConversationKind::try_from(c.kind).unwrap_or(ConversationKind::Unspecified),
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
            to_wire_committed(log.add_member(&t, &c, &by, &user).await?)
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
            let after = opt(l.after, UserId::new)?;
            let list = log
                .members(&t, &c, after.as_ref(), l.limit as usize)
                .await?;
            Reply::Members(wire::MemberList {
                members: list
                    .into_iter()
                    .map(|m| wire::Member {
                        user: m.user.to_string(),
                        role: m.role as i32,
                        joined_seq: m.joined_seq,
                    })
                    .collect(),
            })
        }
        Call::IsMember(m) => {
            let (c, user) = (ConvId::new(m.conversation)?, UserId::new(m.user)?);
            Reply::IsMember(log.is_member(&t, &c, &user).await?)
        }
        Call::ConversationInfo(i) => {
            let info = log.conversation(&t, &ConvId::new(i.conversation)?).await?;
            Reply::Info(wire::Info {
                kind: info.kind as i32,
                head_seq: info.head_seq,
                last_time_ms: info.last_time_ms,
                member_count: info.member_count,
            })
        }
    })
}

/// Server side: answers log requests from NATS until the subscriptions end: those of the
/// queue group (any log process may get them) and those sent to this writer by name. At
/// most `max_in_flight` requests run at once; the rest wait in NATS's queue.
pub async fn serve(
    client: async_nats::Client,
    log: Log,
    max_in_flight: usize,
) -> Result<(), async_nats::SubscribeError> {
    serve_on(client, log, max_in_flight, true).await
}

/// [`serve`] without joining the queue group: answers only requests sent to this writer
/// by name. For tests that must know which process a request reaches first.
pub async fn serve_by_name_only(
    client: async_nats::Client,
    log: Log,
    max_in_flight: usize,
) -> Result<(), async_nats::SubscribeError> {
    serve_on(client, log, max_in_flight, false).await
}

async fn serve_on(
    client: async_nats::Client,
    log: Log,
    max_in_flight: usize,
    shared: bool,
) -> Result<(), async_nats::SubscribeError> {
    // Requests sent here by name, after another log process said this one owns them.
    let own = client
        .subscribe(subjects::log_writer(log.writer_id()))
        .await?;
    let mut requests = if shared {
        let group = client
            .queue_subscribe(subjects::LOG_RPC, subjects::LOG_QUEUE_GROUP.to_string())
            .await?;
        futures_util::stream::select(group, own).boxed()
    } else {
        own.boxed()
    };
    let permits = Arc::new(Semaphore::new(max_in_flight));
    while let Some(msg) = requests.next().await {
        let Some(reply_to) = msg.reply.clone() else {
            debug!("log request without a reply subject ignored");
            continue;
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (client, log) = (client.clone(), log.clone());
        tokio::spawn(async move {
            let result = match wire::LogRequest::decode(msg.payload.as_ref()) {
                Ok(req) => execute(&log, req).await,
                Err(e) => Err(LogError::InvalidRequest(format!(
                    "undecodable log request: {e}"
                ))),
            };
            let reply = match result {
                Ok(r) => r,
                Err(e) => Reply::Error(wire::LogError {
                    code: e.code().to_string(),
                    message: e.to_string(),
                    retryable: e.is_retryable(),
                    owner: match &e {
                        LogError::NotOwner { owner, .. } => owner.clone(),
                        _ => String::new(),
                    },
                }),
            };
            let resp = wire::LogResponse {
                result: Some(reply),
            };
            if let Err(e) = client
                .publish(reply_to, Bytes::from(resp.encode_to_vec()))
                .await
            {
                warn!(error = %e, "failed to send a log reply");
            }
            drop(permit);
        });
    }
    Ok(())
}
