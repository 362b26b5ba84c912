//! One WebSocket connection: handshake, Hello, then requests in order until it closes.
//!
//! The connection has two halves. This task reads frames and answers them in order; a
//! writer task sends whatever is queued on the session's outbound queue (replies and pushes
//! alike), bounded in frames and in bytes, and pings the client. Fatal conditions — a bad
//! token, operations before Hello, an expired token, a full outbound queue, a flood, an
//! oversized frame, silence past the idle timeout, too many sessions of the user — end with a
//! Goodbye frame and a close code; everything else gets a typed Error frame and the session
//! goes on.
//!
//! Every deadline is named in [`GatewayConfig`](crate::GatewayConfig): the handshake, Hello,
//! the token's expiry, idleness. Every reply is cut to `max_reply_bytes` and says whether more
//! remain. Errors a client sees carry a code and a fixed message ([`crate::errors::log_error`]): internal
//! detail goes to the log under a trace id the client also gets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use std::net::SocketAddr;
use tidings_auth::Claims;
use tidings_log_api::Order;
use tidings_log_api::{
    Append, ClientMsgId, ConvId, CreateConversation, LogError, ReadRange, TenantId, UserId,
};
use tidings_schemas::client::{
    self as proto, ClientFrame, CloseReason, ErrorCode, client_frame::Op, server_frame::Msg,
};
use tidings_schemas::internal::TypingNotice;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::{debug, info};

use crate::admission::SessionPermit;
use crate::errors::{log_error, with_redirect};
use crate::hub::{CloseOrder, KillSwitch, OutboundBudget, SessionHandle, queue_frame};
use crate::shared::Shared;
use tidings_log_api::service::Caller;
use tidings_log_api::subjects;

fn frame(request_id: u64, msg: Msg) -> Bytes {
    Bytes::from(
        proto::ServerFrame {
            request_id,
            msg: Some(msg),
        }
        .encode_to_vec(),
    )
}

fn error(code: ErrorCode, message: impl Into<String>) -> Msg {
    Msg::Error(proto::Error {
        code: code as i32,
        message: message.into(),
        retry_after_ms: 0,
        retryable: false,
        ..Default::default()
    })
}

/// Room kept in a reply's byte budget for what surrounds its entries (ids, heads, tags).
const REPLY_OVERHEAD: usize = 1024;

/// A token bucket per session: `rate` frames a second, bursts of `burst`.
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
    /// Frames refused in a row; a client that keeps sending past RATE_LIMITED is cut off.
    refused: u32,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        Bucket {
            tokens: f64::from(burst),
            rate: f64::from(rate),
            burst: f64::from(burst),
            last: Instant::now(),
            refused: 0,
        }
    }

    /// `per_minute` a minute, bursts of as many.
    fn per_minute(per_minute: u32) -> Self {
        let mut b = Bucket::new(1, per_minute.max(1));
        b.rate = f64::from(per_minute.max(1)) / 60.0;
        b
    }

    /// `Ok` to go on, or how long to wait.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused = 0;
            Ok(())
        } else {
            self.refused += 1;
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

enum Out {
    Frame(Bytes),
    Ping,
    Close(CloseOrder),
}

/// Serves one connection (plain TCP or TLS over it) from `peer` until it closes.
// The handshake callback's error type is tungstenite's HTTP response; its size is theirs.
#[allow(clippy::result_large_err)]
pub async fn serve<S>(stream: S, peer: SocketAddr, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer_addr = peer;
    let peer = Some(peer);
    let cfg = &shared.cfg;
    let allowed = cfg.allowed_origins.clone();
    // Small I/O buffers: tungstenite's 128 KiB default per connection is 1.3 GB for 10,000
    // sessions; frames larger than the buffer are still read, in more than one go.
    let ws_config = tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(cfg.max_frame_bytes))
        .max_frame_size(Some(cfg.max_frame_bytes));
    let callback = |req: &tungstenite::handshake::server::Request,
                    resp: tungstenite::handshake::server::Response| {
        let reject = |status: u16, why: &str| {
            let mut r = tungstenite::handshake::server::ErrorResponse::new(Some(why.to_string()));
            *r.status_mut() = tungstenite::http::StatusCode::from_u16(status).unwrap_or_default();
            Err(r)
        };
        if req.uri().path() != "/v1/ws" {
            return reject(404, "not found: the WebSocket endpoint is /v1/ws");
        }
        // Browsers send Origin; other clients need not. A browser's origin must be allowed,
        // or be this listener's own (the web client served at /app/).
        if let Some(origin) = req.headers().get("origin") {
            let origin = origin.to_str().unwrap_or("");
            let host = req.headers().get("host").and_then(|h| h.to_str().ok());
            let same_origin = host.is_some_and(|host| {
                origin
                    .strip_prefix("http://")
                    .or_else(|| origin.strip_prefix("https://"))
                    == Some(host)
            });
            if !same_origin && !allowed.iter().any(|a| a == origin || a == "*") {
                return reject(403, "origin not allowed");
            }
        }
        Ok(resp)
    };
    // A deadline on the handshake: a client that connects and sends nothing (or a byte a
    // minute) must not hold a task, a socket and a place under the connection caps.
    // The head is read first: other paths are plain HTTP (crate::http), answered and done.
    let handshake = async {
        let stream = match crate::http::route(stream, peer_addr, &shared).await {
            Ok(crate::http::Routed::WebSocket(stream)) => stream,
            Ok(crate::http::Routed::Done) => return None,
            Err(e) => {
                debug!(?peer, error = %e, "http request failed");
                return None;
            }
        };
        Some(
            tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config))
                .await,
        )
    };
    let ws = match tokio::time::timeout(cfg.handshake_timeout, handshake).await {
        Ok(None) => return,
        Ok(Some(ws)) => match ws {
            Ok(ws) => ws,
            Err(e) => {
                debug!(?peer, error = %e, "websocket handshake failed");
                return;
            }
        },
        Err(_) => {
            debug!(?peer, "websocket handshake timed out");
            return;
        }
    };
    let (mut sink, mut source) = ws.split();

    // The writer: everything the session sends goes through one bounded queue.
    // Bounded in frames (the channel) and in bytes (the budget, refunded once a frame is
    // written to the socket).
    let (frames_tx, mut frames_rx) = mpsc::channel::<Bytes>(cfg.outbound_queue);
    let budget = OutboundBudget::new(cfg.outbound_queue_bytes);
    let (close_tx, mut close_rx) = mpsc::channel::<CloseOrder>(1);
    let writer_budget = budget.clone();
    let ping_every = cfg.ping_interval;
    let writer = tokio::spawn(async move {
        let mut pings =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let out = tokio::select! {
                biased;
                order = close_rx.recv() => match order {
                    Some(order) => Out::Close(order),
                    None => return,
                },
                f = frames_rx.recv() => match f {
                    Some(f) => Out::Frame(f),
                    None => return,
                },
                _ = pings.tick() => Out::Ping,
            };
            match out {
                Out::Frame(f) => {
                    let n = f.len();
                    if sink.send(Message::Binary(f)).await.is_err() {
                        return;
                    }
                    writer_budget.refund(n);
                }
                Out::Ping => {
                    // The answer (any frame, or the pong a WebSocket library sends by
                    // itself) keeps the session from the idle cutoff.
                    if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                        return;
                    }
                }
                Out::Close(order) => {
                    // Replies already queued (e.g. the error that explains a refused Hello)
                    // go out first, unless the queue is the problem.
                    if order.reason != CloseReason::SlowConsumer {
                        while let Ok(f) = frames_rx.try_recv() {
                            if sink.send(Message::Binary(f)).await.is_err() {
                                return;
                            }
                        }
                    }
                    let goodbye = frame(
                        0,
                        Msg::Goodbye(proto::Goodbye {
                            reason: order.reason as i32,
                            message: order.message.clone(),
                        }),
                    );
                    let _ = sink.send(Message::Binary(goodbye)).await;
                    let code = CloseCode::from(order.reason as u16);
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code,
                            reason: order.message.chars().take(100).collect::<String>().into(),
                        })))
                        .await;
                    let _ = sink.close().await;
                    return;
                }
            }
        }
    });

    let kill = Arc::new(KillSwitch::default());
    let mut session = Session {
        shared: shared.clone(),
        frames: frames_tx,
        budget,
        kill: kill.clone(),
        claims: None,
        caller: Caller::Gateway,
        handle: None,
        permit: None,
        session_id: 0,
        bucket: Bucket::new(cfg.frames_per_second, cfg.frame_burst),
        member_writes: crate::members::MemberWrites::default(),
        searches: Bucket::per_minute(cfg.search_per_minute),
    };
    let order = session.run(&mut source).await;
    if let Some(handle) = &session.handle {
        shared.registry.remove_session(handle);
    }
    let closing = order.is_some();
    if let Some(order) = order {
        debug!(?peer, reason = ?order.reason, message = %order.message, "closing session");
        let _ = close_tx.send(order).await;
    }
    drop(session);
    if closing {
        // Lingering close: read (and discard) until the client answers our close frame or
        // goes. Closing a socket with unread input makes the kernel reset the connection,
        // and a reset can destroy the frames still on their way to the client — the very
        // Goodbye and errors that say why (a flooding client always has unread input).
        let drain = async { while let Some(Ok(_)) = source.next().await {} };
        let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
    }
    // A client that reads nothing cannot be told why; after a grace period the socket goes.
    let mut writer = writer;
    if tokio::time::timeout(CLOSE_GRACE, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// How long a closing session's last frames may take to leave.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

struct Session {
    shared: Arc<Shared>,
    frames: mpsc::Sender<Bytes>,
    budget: Arc<OutboundBudget>,
    kill: Arc<KillSwitch>,
    claims: Option<Claims>,
    /// Who the session's log calls act for (set by Hello).
    caller: Caller,
    handle: Option<SessionHandle>,
    /// The session's place under the per-user cap, from Hello on.
    permit: Option<SessionPermit>,
    /// 0 until Hello.
    session_id: u64,
    bucket: Bucket,
    /// The membership changes this session made: its member pages from the gateway's memory
    /// include them (read your writes), else they are asked of the log.
    member_writes: crate::members::MemberWrites,
    /// Searches (each may open many events): gateway.search_per_minute.
    searches: Bucket,
}

fn close(reason: CloseReason, message: impl Into<String>) -> Option<CloseOrder> {
    Some(CloseOrder {
        reason,
        message: message.into(),
    })
}

impl Session {
    /// [`crate::errors::log_error`] for this session, with a redirect where the error is `wrong_cell`.
    fn log_error(&self, e: &LogError, request_id: u64) -> Msg {
        with_redirect(
            log_error(e, self.session_id, request_id),
            e,
            &self.shared.cfg.cell_urls,
        )
    }

    /// Queues a reply, charged to the session's byte budget like a push; a full queue ends
    /// the session as a slow consumer.
    fn reply(&self, request_id: u64, msg: Msg) {
        queue_frame(
            &self.frames,
            &self.budget,
            &self.kill,
            frame(request_id, msg),
        );
    }

    /// Charges one frame to the session's bucket. `Err(None)`: refused, RATE_LIMITED sent;
    /// `Err(Some(order))`: the client kept flooding, close.
    fn charge(&mut self, request_id: u64) -> Result<(), Option<CloseOrder>> {
        let Err(wait) = self.bucket.take() else {
            return Ok(());
        };
        crate::metrics::RATE_LIMITED.inc("frames");
        if self.bucket.refused > self.shared.cfg.frame_burst {
            return Err(close(
                CloseReason::Flood,
                "too many frames: the session kept sending while rate limited",
            ));
        }
        self.reply(
            request_id,
            Msg::Error(proto::Error {
                code: ErrorCode::RateLimited as i32,
                message: "too many frames; slow down".into(),
                retry_after_ms: wait.as_millis() as u64 + 1,
                retryable: true,
                ..Default::default()
            }),
        );
        Err(None)
    }

    /// Reads and answers frames until the connection ends; returns why the server closes it,
    /// if it does.
    async fn run<S>(&mut self, source: &mut S) -> Option<CloseOrder>
    where
        S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
    {
        let hello_deadline = tokio::time::Instant::now() + self.shared.cfg.hello_timeout;
        let idle = self.shared.cfg.idle_timeout;
        let mut last_heard = tokio::time::Instant::now();
        loop {
            let expiry = match &self.claims {
                Some(c) => {
                    // Capped: a token may claim an expiry centuries away, and Instant
                    // arithmetic must not overflow on it.
                    const YEAR: u64 = 365 * 24 * 3600;
                    let left = c
                        .expires_at
                        .saturating_sub(tidings_log_api::now_secs())
                        .min(YEAR);
                    tokio::time::Instant::now() + Duration::from_secs(left)
                }
                None => hello_deadline,
            };
            let msg = tokio::select! {
                msg = source.next() => msg,
                _ = self.kill.notify.notified() => return self.kill.order(),
                _ = tokio::time::sleep_until(last_heard + idle) => {
                    return close(
                        CloseReason::IdleTimeout,
                        "nothing received (no frame, no pong) for the idle timeout",
                    );
                }
                _ = tokio::time::sleep_until(expiry) => {
                    return match self.claims {
                        Some(_) => close(CloseReason::TokenExpired, "the token has expired"),
                        None => close(CloseReason::ProtocolViolation, "no Hello in time"),
                    };
                }
            };
            last_heard = tokio::time::Instant::now();
            let msg = match msg {
                None => return None,
                Some(Ok(m)) => m,
                Some(Err(tungstenite::Error::Capacity(e))) => {
                    return close(CloseReason::FrameTooLarge, format!("frame too large: {e}"));
                }
                Some(Err(e)) => {
                    info!(error = %e, "websocket read failed; dropping the session");
                    return None;
                }
            };
            // Every data frame, good or bad, is charged to the rate limit once.
            let frame = match msg {
                Message::Binary(b) => {
                    ClientFrame::decode(b.as_ref()).map_err(|e| format!("not a ClientFrame: {e}"))
                }
                Message::Text(_) => Err(
                    "text frames are not accepted: send binary protobuf ClientFrames".to_string(),
                ),
                Message::Close(_) => return None,
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            let id = frame.as_ref().map_or(0, |f| f.request_id);
            match self.charge(id) {
                Ok(()) => {}
                Err(Some(order)) => return Some(order),
                Err(None) => continue,
            }
            let client_frame = match frame {
                Ok(f) => f,
                Err(problem) => {
                    if self.claims.is_none() {
                        return close(
                            CloseReason::ProtocolViolation,
                            "the first frame must be a binary Hello ClientFrame",
                        );
                    }
                    self.reply(0, error(ErrorCode::BadFrame, problem));
                    continue;
                }
            };

            let Some(op) = client_frame.op else {
                if self.claims.is_none() {
                    return close(
                        CloseReason::ProtocolViolation,
                        "the first frame must be Hello",
                    );
                }
                self.reply(
                    id,
                    error(ErrorCode::UnknownOp, "unknown or missing operation"),
                );
                continue;
            };
            match (&self.claims, op) {
                (None, Op::Hello(hello)) => {
                    if let Some(order) = self.hello(id, hello).await {
                        return Some(order);
                    }
                }
                (None, _) => {
                    self.reply(id, error(ErrorCode::NotAuthenticated, "send Hello first"));
                    return close(CloseReason::ProtocolViolation, "operation before Hello");
                }
                (Some(_), Op::Hello(_)) => {
                    self.reply(
                        id,
                        error(ErrorCode::InvalidRequest, "already authenticated"),
                    );
                }
                (Some(_), op) => {
                    let send = matches!(op, Op::Send(_)).then(Instant::now);
                    let msg = match self.op(op).await {
                        Ok(msg) => msg,
                        Err(e) => {
                            if e.code() == "rate_limited" {
                                crate::metrics::RATE_LIMITED.inc("log");
                            }
                            self.log_error(&e, id)
                        }
                    };
                    self.reply(id, msg);
                    if let Some(started) = send {
                        crate::metrics::SEND_SECONDS.observe_duration(started.elapsed());
                    }
                }
            }
        }
    }

    async fn hello(&mut self, id: u64, hello: proto::Hello) -> Option<CloseOrder> {
        let claims = match self
            .shared
            .verifier
            .verify(&hello.token, tidings_log_api::now_secs())
        {
            Ok(c) => c,
            Err(e) => {
                let code = if e.code() == "expired" {
                    ErrorCode::TokenExpired
                } else {
                    ErrorCode::AuthFailed
                };
                self.reply(id, error(code, format!("token refused: {e}")));
                return close(
                    CloseReason::AuthFailed,
                    format!("token refused: {}", e.code()),
                );
            }
        };
        let (tenant, user) = match (
            TenantId::new(claims.tenant.clone()),
            UserId::new(claims.user.clone()),
        ) {
            (Ok(t), Ok(u)) => (t, u),
            (Err(e), _) | (_, Err(e)) => {
                self.reply(
                    id,
                    error(ErrorCode::AuthFailed, format!("token refused: {e}")),
                );
                return close(
                    CloseReason::AuthFailed,
                    "token names an invalid tenant or user",
                );
            }
        };
        self.caller = Caller::user(claims.clone(), hello.token.clone());
        let permit = match self.shared.admission.session(&tenant, &user) {
            Ok(permit) => permit,
            Err(_) => {
                let max = self.shared.cfg.max_sessions_per_user;
                debug!(%tenant, %user, max, "session refused: too many sessions of the user");
                self.reply(
                    id,
                    error(
                        ErrorCode::NotAllowed,
                        format!("too many sessions of this user (max {max}); close one first"),
                    ),
                );
                return close(
                    CloseReason::TooManySessions,
                    format!("too many sessions of this user (max {max})"),
                );
            }
        };
        self.permit = Some(permit);
        let session_id = self.shared.next_session_id();
        self.session_id = session_id;
        let handle = SessionHandle::new(
            session_id,
            tenant.clone(),
            user.clone(),
            self.frames.clone(),
            self.kill.clone(),
            self.budget.clone(),
        )
        .with_token(claims.jti.as_deref(), claims.issued_at);
        let registry = &self.shared.registry;
        registry.add_session(&handle);
        self.handle = Some(handle.clone());
        // Checked once the session is registered: a revocation recorded after this check
        // reaches the session through its notice (see `revocation.rs`).
        if let Some(order) = self.refuse_if_revoked(id, &tenant, &user, &claims).await {
            return Some(order);
        }
        // Join every conversation of the user before Welcome: from then on, every event
        // delivered here reaches this session, and the client's Sync covers the rest.
        let convs = match self.all_conversations(&tenant, &user).await {
            Ok(convs) => convs,
            Err(e) if e.code() == "wrong_cell" => {
                crate::metrics::CELL_REDIRECTS.inc();
                self.reply(id, self.log_error(&e, id));
                return close(
                    CloseReason::WrongCell,
                    "this tenant is served by another cell",
                );
            }
            Err(e) => {
                self.reply(id, self.log_error(&e, id));
                return close(
                    CloseReason::Unavailable,
                    "cannot list the user's conversations; try again later",
                );
            }
        };
        for summary in &convs {
            registry
                .join(&tenant, &summary.conv, vec![handle.clone()], None)
                .await;
        }
        let joined = convs.len();
        info!(session = session_id, %tenant, %user, device = %hello.device.chars().take(64).collect::<String>(), conversations = joined, "session started");
        self.reply(
            id,
            Msg::Welcome(proto::Welcome {
                session_id: session_id.to_string(),
                tenant: tenant.to_string(),
                user: user.to_string(),
                expires_at: claims.expires_at,
                max_frame_bytes: u32::try_from(self.shared.cfg.max_frame_bytes).unwrap_or(u32::MAX),
            }),
        );
        self.claims = Some(claims);
        crate::metrics::SESSIONS_OPENED.inc();
        None
    }

    /// Refuses a revoked token (or one whose revocation cannot be checked: fail closed).
    async fn refuse_if_revoked(
        &self,
        id: u64,
        tenant: &TenantId,
        user: &UserId,
        claims: &Claims,
    ) -> Option<CloseOrder> {
        let token = tidings_log_api::TokenRef {
            tenant,
            user,
            jti: claims.jti.as_deref(),
            issued_at: claims.issued_at,
        };
        match self.shared.revocations.is_revoked(token).await {
            Ok(false) => None,
            Ok(true) => {
                self.reply(
                    id,
                    error(ErrorCode::AuthFailed, "token refused: it has been revoked"),
                );
                close(CloseReason::Revoked, "token refused: revoked")
            }
            Err(e) => {
                info!(error = %e, "failed to check a token's revocation");
                self.reply(id, self.log_error(&e, id));
                close(
                    CloseReason::Unavailable,
                    "cannot check the token right now; try again later",
                )
            }
        }
    }

    /// The user's conversations, every page, up to `max_conversations_per_session`.
    async fn all_conversations(
        &self,
        t: &TenantId,
        u: &UserId,
    ) -> Result<Vec<tidings_log_api::ConversationSummary>, LogError> {
        let page = self.shared.cfg.read_limit;
        let cap = self.shared.cfg.max_conversations_per_session;
        let mut all = Vec::new();
        while all.len() < cap {
            let after = all
                .last()
                .map(|s: &tidings_log_api::ConversationSummary| s.conv.clone());
            let list = self
                .shared
                .log
                .conversations(&self.caller, t, u, after.as_ref(), page)
                .await?;
            let full = list.len() == page;
            all.extend(list);
            if !full {
                break;
            }
        }
        all.truncate(cap);
        Ok(all)
    }

    fn who(&self) -> Result<(TenantId, UserId), LogError> {
        match &self.handle {
            Some(h) => Ok((h.tenant.clone(), h.user.clone())),
            None => Err(LogError::InvalidRequest("not authenticated".into())),
        }
    }

    async fn member_or_refuse(&self, t: &TenantId, c: &ConvId, u: &UserId) -> Result<(), LogError> {
        // From memory for conversations a hub here keeps true (`members.rs`), else the log.
        let cache = self.shared.registry.members();
        let member = match cache.lookup(t, c, u) {
            Some(member) => member,
            None => {
                let ticket = cache.ticket(t, c);
                let member = self.shared.log.is_member(&self.caller, t, c, u).await?;
                if let Some(ticket) = ticket {
                    cache.remember(t, c, u, member, ticket);
                }
                member
            }
        };
        if member {
            Ok(())
        } else {
            Err(LogError::NotMember {
                user: u.to_string(),
                conversation: c.to_string(),
            })
        }
    }

    fn limit(&self, asked: u32, default: usize) -> usize {
        let max = self.shared.cfg.read_limit;
        match asked {
            0 => default.min(max),
            n => (n as usize).min(max),
        }
    }

    async fn op(&mut self, op: Op) -> Result<Msg, LogError> {
        let (t, u) = self.who()?;
        let log = self.shared.log.clone();
        let caller = self.caller.clone();
        let caller = &caller;
        match op {
            Op::Hello(_) => Err(LogError::InvalidRequest("already authenticated".into())),
            Op::Ping(_) => Ok(Msg::Pong(proto::Pong {})),
            Op::Send(send) => {
                use proto::send::Body as B;
                use tidings_log_api::Body;
                let body = match send.body {
                    Some(B::MessagePosted(b)) => Body::MessagePosted(b),
                    Some(B::MessageEdited(b)) => Body::MessageEdited(b),
                    Some(B::MessageRecalled(b)) => Body::MessageRecalled(b),
                    Some(B::ReactionAdded(b)) => Body::ReactionAdded(b),
                    Some(B::ReactionRemoved(b)) => Body::ReactionRemoved(b),
                    None => return Err(LogError::InvalidRequest("Send without a body".into())),
                };
                let conv = ConvId::new(send.conversation)?;
                let client_msg_id = ClientMsgId::new(send.client_msg_id)?;
                // A conversation the log is limiting is refused here until its window ends.
                self.shared.shed.check(&t, &conv, Instant::now())?;
                let shed_key = t.clone();
                let c = log
                    .append(
                        caller,
                        Append {
                            tenant: t,
                            conv: conv.clone(),
                            sender: u,
                            client_msg_id: client_msg_id.clone(),
                            body,
                        },
                    )
                    .await
                    .inspect_err(|e| {
                        self.shared
                            .shed
                            .refused(&shed_key, &conv, e, Instant::now());
                    })?;
                Ok(Msg::SendAck(proto::SendAck {
                    client_msg_id: client_msg_id.to_string(),
                    conversation: conv.to_string(),
                    seq: c.seq,
                    event_id: c.event_id,
                    server_time_ms: c.time_ms,
                    duplicate: c.duplicate,
                }))
            }
            Op::Sync(sync) => self.sync(&t, &u, sync).await,
            Op::Search(q) => self.search(&t, &u, q).await,
            Op::History(h) => {
                let conv = ConvId::new(h.conversation)?;
                self.member_or_refuse(&t, &conv, &u).await?;
                let limit = self.limit(h.limit, self.shared.cfg.sync_latest);
                let range = ReadRange {
                    from: (h.before_seq > 0).then(|| h.before_seq - 1),
                    limit,
                    order: Order::Descending,
                };
                let mut events = if h.before_seq == 1 {
                    Vec::new()
                } else {
                    log.read(caller, &t, &conv, range).await?
                };
                // Newest first: the page keeps the newest that fit, the client pages on
                // from the oldest it got.
                fit(&mut events, self.reply_budget());
                events.reverse();
                let head = log.conversation(caller, &t, &conv).await?.head_seq;
                let more = events.first().is_some_and(|e| e.seq > 1);
                Ok(Msg::Events(proto::Events {
                    conversation: conv.to_string(),
                    events,
                    head_seq: head,
                    more,
                }))
            }
            Op::Pull(p) => {
                let conv = ConvId::new(p.conversation)?;
                self.member_or_refuse(&t, &conv, &u).await?;
                if p.from_seq == 0 || p.to_seq < p.from_seq {
                    return Err(LogError::InvalidRequest(
                        "Pull needs 1 <= from_seq <= to_seq".into(),
                    ));
                }
                let span = (p.to_seq - p.from_seq).saturating_add(1);
                let limit = usize::try_from(span)
                    .unwrap_or(usize::MAX)
                    .min(self.shared.cfg.read_limit);
                let mut events = log
                    .read(caller, &t, &conv, ReadRange::forward(p.from_seq, limit))
                    .await?;
                fit(&mut events, self.reply_budget());
                let head = log.conversation(caller, &t, &conv).await?.head_seq;
                let more = events
                    .last()
                    .is_some_and(|e| e.seq < p.to_seq && e.seq < head);
                Ok(Msg::Events(proto::Events {
                    conversation: conv.to_string(),
                    events,
                    head_seq: head,
                    more,
                }))
            }
            Op::MarkRead(m) => {
                let conv = ConvId::new(m.conversation)?;
                let read_seq = log.mark_read(caller, &t, &conv, &u, m.seq).await?;
                Ok(Msg::ReadCursor(proto::ReadCursor {
                    conversation: conv.to_string(),
                    read_seq,
                }))
            }
            Op::Typing(ty) => {
                let conv = ConvId::new(ty.conversation)?;
                self.member_or_refuse(&t, &conv, &u).await?;
                // Big groups get no typing notices (answered alike: nothing to tell).
                let members = log.conversation(caller, &t, &conv).await?.member_count;
                if members > self.shared.cfg.typing_max_members {
                    return Ok(Msg::Pong(proto::Pong {}));
                }
                let notice = TypingNotice {
                    conversation: conv.to_string(),
                    user: u.to_string(),
                };
                // Ephemeral: core NATS, never stored; lost if NATS is down, which is fine.
                let _ = self
                    .shared
                    .nats
                    .publish(
                        subjects::typing(&t, &conv),
                        Bytes::from(notice.encode_to_vec()),
                    )
                    .await;
                Ok(Msg::Pong(proto::Pong {}))
            }
            Op::CreateConversation(c) => {
                let kind = tidings_log_api::rpc::kind_by_name(c.kind_name, c.kind)?;
                let conv = ConvId::new(c.conversation)?;
                let members = c
                    .members
                    .into_iter()
                    .map(UserId::new)
                    .collect::<Result<Vec<_>, _>>()?;
                let done = log
                    .create_conversation(
                        caller,
                        CreateConversation {
                            tenant: t,
                            conv: conv.clone(),
                            kind,
                            title: c.title,
                            creator: u,
                            members,
                        },
                    )
                    .await?;
                Ok(committed(&conv, done))
            }
            Op::AddMember(m) => {
                let (conv, user) = (ConvId::new(m.conversation)?, UserId::new(m.user)?);
                let role = Some(m.role.as_str()).filter(|r| !r.is_empty());
                let done = log.add_member(caller, &t, &conv, &u, &user, role).await?;
                self.member_writes.record(&conv, done.seq);
                Ok(committed(&conv, done))
            }
            Op::SetRole(m) => {
                let (conv, user) = (ConvId::new(m.conversation)?, UserId::new(m.user)?);
                let done = log.set_role(caller, &t, &conv, &u, &user, &m.role).await?;
                self.member_writes.record(&conv, done.seq);
                Ok(committed(&conv, done))
            }
            Op::SetDisplayName(m) => {
                let (conv, user) = (ConvId::new(m.conversation)?, UserId::new(m.user)?);
                let done = log
                    .set_display_name(caller, &t, &conv, &u, &user, &m.display_name)
                    .await?;
                self.member_writes.record(&conv, done.seq);
                Ok(committed(&conv, done))
            }
            Op::RemoveMember(m) => {
                let (conv, user) = (ConvId::new(m.conversation)?, UserId::new(m.user)?);
                let done = log.remove_member(caller, &t, &conv, &u, &user).await?;
                self.member_writes.record(&conv, done.seq);
                Ok(committed(&conv, done))
            }
            Op::ListConversations(l) => {
                let after = (!l.after.is_empty())
                    .then(|| ConvId::new(l.after))
                    .transpose()?;
                let limit = self.limit(l.limit, self.shared.cfg.read_limit);
                let list = log
                    .conversations(caller, &t, &u, after.as_ref(), limit)
                    .await?;
                let full = list.len() == limit;
                let mut conversations: Vec<_> = list
                    .into_iter()
                    .map(|s| proto::ConversationSummary {
                        conversation: s.conv.to_string(),
                        head_seq: s.head_seq,
                        read_seq: s.read_seq,
                        unread: s.unread,
                    })
                    .collect();
                let cut = fit(&mut conversations, self.reply_budget());
                Ok(Msg::ConversationList(proto::ConversationList {
                    conversations,
                    more: full || cut,
                }))
            }
            Op::ListMembers(l) => {
                let conv = ConvId::new(l.conversation)?;
                self.member_or_refuse(&t, &conv, &u).await?;
                let after = (!l.after.is_empty())
                    .then(|| UserId::new(l.after))
                    .transpose()?;
                let limit = self.limit(l.limit, self.shared.cfg.read_limit);
                let q = tidings_log_api::MembersQuery {
                    after,
                    limit,
                    prefix: l.prefix,
                    since_version: (l.since_version > 0).then_some(l.since_version),
                };
                // Pages and prefix searches of a list kept here come from memory.
                let cached = if q.since_version.is_none() {
                    tidings_log_api::types::check_member_prefix(&q.prefix)?;
                    let floor = self.member_writes.floor(&conv);
                    self.shared.registry.member_page(&t, &conv, &q, floor)
                } else {
                    None
                };
                let page = match cached {
                    Some(page) => page,
                    None => log.members(caller, &t, &conv, &q).await?,
                };
                let full = page.members.len() == limit || page.changes.len() == limit;
                let mut members: Vec<_> = page
                    .members
                    .into_iter()
                    .map(|m| proto::Member {
                        user: m.user.to_string(),
                        role: m.role as i32,
                        joined_seq: m.joined_seq,
                        role_name: m.role_name,
                        display_name: m.display_name,
                    })
                    .collect();
                let mut changes: Vec<_> = page
                    .changes
                    .into_iter()
                    .map(|m| proto::MemberUpdate {
                        user: m.user.to_string(),
                        role: m.role as i32,
                        removed: m.removed,
                        seq: m.seq,
                        role_name: m.role_name,
                        display_name: m.display_name,
                    })
                    .collect();
                // One of the two is empty.
                let cut_members = fit(&mut members, self.reply_budget());
                let cut_changes = fit(&mut changes, self.reply_budget());
                let cut = cut_members || cut_changes;
                Ok(Msg::MemberList(proto::MemberList {
                    members,
                    more: full || cut,
                    version: page.version,
                    changes,
                }))
            }
        }
    }

    /// A search of the user's own conversations: the query checked against the gateway's
    /// limits here (so a hostile one costs the log nothing), then one page from the log.
    async fn search(
        &mut self,
        t: &TenantId,
        u: &UserId,
        mut q: proto::Search,
    ) -> Result<Msg, LogError> {
        let cfg = &self.shared.cfg;
        if let Err(wait) = self.searches.take() {
            crate::metrics::RATE_LIMITED.inc("search");
            return Err(LogError::RateLimited {
                what: "searches",
                retry_after_ms: wait.as_millis().max(1) as u64,
            });
        }
        if q.query.len() > cfg.search_max_query_bytes {
            return Err(LogError::TooLarge {
                what: "search query",
                size: q.query.len(),
                limit: cfg.search_max_query_bytes,
            });
        }
        let needle = tidings_log_api::search::Needle::new(&q.query)
            .map_err(|e| LogError::InvalidRequest(e.to_string()))?;
        if needle.terms().len() > cfg.search_max_terms {
            return Err(LogError::InvalidRequest(format!(
                "the search query has {} terms; the most is {}",
                needle.terms().len(),
                cfg.search_max_terms
            )));
        }
        if q.cursor.len() > 512 {
            return Err(LogError::InvalidRequest(
                "the search cursor is not valid for this query".into(),
            ));
        }
        q.limit = match q.limit {
            0 => cfg.search_page_hits,
            n => (n as usize).min(cfg.search_page_hits),
        } as u32;
        let started = Instant::now();
        let page = self.shared.log.search(&self.caller, t, u, &q).await?;
        crate::metrics::SEARCH_SECONDS.observe_duration(started.elapsed());
        Ok(Msg::SearchResult(page))
    }

    /// Bytes the entries of one reply may take.
    fn reply_budget(&self) -> usize {
        self.shared
            .cfg
            .max_reply_bytes
            .saturating_sub(REPLY_OVERHEAD)
            .max(1)
    }

    /// One page of Sync: the user's conversations after the cursor, as many as fit in the
    /// reply's byte budget, at most `max_conversations`. A conversation that cannot be read
    /// gets an entry with its error; the others are answered as usual.
    async fn sync(&self, t: &TenantId, u: &UserId, sync: proto::Sync) -> Result<Msg, LogError> {
        let cfg = &self.shared.cfg;
        let latest = self.limit(sync.latest, cfg.sync_latest);
        let mut known = std::collections::HashMap::new();
        for k in sync.known {
            known.insert(ConvId::new(k.conversation)?, k.last_seq);
        }
        let cursor = (!sync.cursor.is_empty())
            .then(|| ConvId::new(sync.cursor))
            .transpose()?;
        let page = match sync.max_conversations {
            0 => cfg.sync_page_conversations,
            n => (n as usize).min(cfg.sync_page_conversations),
        };
        // One more than the page: whether another page follows, without asking again.
        let mut list = self
            .shared
            .log
            .conversations(
                &self.caller,
                t,
                u,
                cursor.as_ref(),
                (page + 1).min(cfg.read_limit),
            )
            .await?;
        let mut more = list.len() > page;
        list.truncate(page);
        let budget = self.reply_budget();
        let mut used = 0;
        let mut states = Vec::new();
        for s in list {
            let state = match self.sync_one(t, &s, &known, latest, budget).await {
                Ok(state) => state,
                Err(e) => {
                    let Msg::Error(error) = self.log_error(&e, 0) else {
                        unreachable!("log_error makes errors")
                    };
                    proto::ConversationState {
                        conversation: s.conv.to_string(),
                        error: Some(error),
                        ..Default::default()
                    }
                }
            };
            let size = state.encoded_len() + 8;
            if !states.is_empty() && used + size > budget {
                // The next page starts with this one.
                more = true;
                break;
            }
            used += size;
            states.push(state);
        }
        let next_cursor = match (more, states.last()) {
            (true, Some(last)) => last.conversation.clone(),
            _ => String::new(),
        };
        Ok(Msg::SyncResult(proto::SyncResult {
            conversations: states,
            next_cursor,
        }))
    }

    /// One conversation's entry in a Sync: the events after the client's last seq, the
    /// newest `latest` of them that fit in `budget` bytes.
    async fn sync_one(
        &self,
        t: &TenantId,
        s: &tidings_log_api::ConversationSummary,
        known: &std::collections::HashMap<ConvId, u64>,
        latest: usize,
        budget: usize,
    ) -> Result<proto::ConversationState, LogError> {
        let log = &self.shared.log;
        let last_seq = known.get(&s.conv).copied().unwrap_or(0).min(s.head_seq);
        let missing = s.head_seq - last_seq;
        let want = missing.min(latest as u64) as usize;
        let mut events = if want == 0 {
            Vec::new()
        } else {
            // The newest `want` up to the head the list showed, newest first; later ones
            // reach the session as pushes.
            let range = ReadRange {
                from: Some(s.head_seq),
                limit: want,
                order: Order::Descending,
            };
            log.read(&self.caller, t, &s.conv, range).await?
        };
        // Keep the newest that fit (one at least, so the client always moves on). A read
        // may also have stopped short at the log's own byte budget.
        let cut = fit(&mut events, budget);
        let truncated = missing > latest as u64 || cut || events.len() < want;
        events.reverse();
        Ok(proto::ConversationState {
            conversation: s.conv.to_string(),
            head_seq: s.head_seq,
            read_seq: s.read_seq,
            unread: s.unread,
            events,
            truncated,
            error: None,
        })
    }
}

/// Cuts `items` after the last one that fits in `budget` encoded bytes (the first one always
/// stays, so every page makes progress); returns whether anything was cut.
fn fit<T: prost::Message>(items: &mut Vec<T>, budget: usize) -> bool {
    let mut used = 0;
    for (i, item) in items.iter().enumerate() {
        // The field tag and length prefix around each entry: a few bytes.
        used += item.encoded_len() + 8;
        if i > 0 && used > budget {
            items.truncate(i);
            return true;
        }
    }
    false
}

fn committed(conv: &ConvId, c: tidings_log_api::Committed) -> Msg {
    Msg::Committed(proto::Committed {
        conversation: conv.to_string(),
        seq: c.seq,
        event_id: c.event_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_what_fits_and_always_one() {
        let ev = |n: usize| tidings_log_api::Event {
            event_id: "x".repeat(n),
            ..Default::default()
        };
        let mut one = vec![ev(1000)];
        assert!(!fit(&mut one, 10));
        assert_eq!(one.len(), 1);
        let mut many = vec![ev(100), ev(100), ev(100)];
        assert!(fit(&mut many, 250));
        assert_eq!(many.len(), 2);
    }
}
