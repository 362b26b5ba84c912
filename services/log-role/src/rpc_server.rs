//! The log's side of the RPC (`tidings_log_api::rpc`): requests off `tidings.rpc.log` in the
//! queue group `tidings-log`, opened under the tenant's transport key, checked (the user's
//! token verified, a membership change's nonce not replayed, the call not too old), executed
//! against the log, and answered sealed with the same nonce. A gateway asking for a
//! tenant's transport key gets it sealed for its X25519 key by the log's identity.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use tidings_auth::Claims;
use tidings_log::Log;
use tidings_log_api::bus_crypto::{self, Direction, LogIdentity, NONCE_LEN};
use tidings_log_api::crypto::TransportKey;
use tidings_log_api::rpc::{body_from_wire, kind_by_name, wrong_cell};
use tidings_log_api::{
    Append, By, ClientMsgId, Committed, ConvId, CreateConversation, LogError, MembersQuery, Order,
    ReadRange, TenantId, UserId, subjects,
};
use tidings_schemas::internal as wire;
use tidings_schemas::internal::log_request::Call;
use tidings_schemas::internal::log_response::Result as Reply;
use tidings_schemas::internal::{rpc_reply, rpc_request};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::rpc_identity::{self, TokenCache};

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
            let by = By::Member(by);
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
    let claims = auth.tokens.verify(&token, tidings_log_api::now_secs())?;
    if claims.tenant != t.as_str() {
        return Err(no_keys());
    }
    refuse_revoked(log, t, &claims).await?;
    log.transport_key(t, None).await
}

/// A revoked token acts for no one, here as at the gateway's Hello: a gateway that missed
/// the revocation notice still cannot act with it.
async fn refuse_revoked(log: &Log, t: &TenantId, claims: &Claims) -> Result<(), LogError> {
    let user = UserId::new(claims.user.clone())?;
    let token = tidings_log_api::TokenRef {
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
    let now = tidings_log_api::now_ms();
    if (now - req.sent_ms).unsigned_abs() > MAX_CALL_AGE.as_millis() as u64 {
        return Err(LogError::NotAllowed(
            "the call is stale (or the clocks of gateway and log disagree)".into(),
        ));
    }
    let call = req
        .call
        .ok_or_else(|| LogError::InvalidRequest("request without a call".into()))?;
    if let Some(claims) = rpc_identity::authorize(
        &auth.tokens,
        t,
        &req.token,
        &call,
        tidings_log_api::now_secs(),
    )? {
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
/// (`lost` is [`tidings_log_api::nats::BusEvents::lost`]); the subscription's stream would otherwise
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
