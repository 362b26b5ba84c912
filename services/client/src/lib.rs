//! A Rust client for the tidings gateway (used by `tidings chat`, the tests and the
//! benchmarks).
//!
//! [`Connection`] speaks the protocol of `schemas/proto/tidings/client/v1/client.proto`:
//! requests are pipelined (each gets a request id; replies are matched to it), pushes
//! (events, read cursors, typing, goodbye) come out of [`Connection::next_push`], and
//! [`Tracker`] does the client's half of ordering: drop what it has seen, report gaps to
//! fill with `Pull`.
//!
//! Backpressure is real: a [`Connection`] buffers up to 4,096 pushes; if the application
//! does not take them, the connection stops reading its socket, replies stall behind the
//! pushes, and the server eventually disconnects it as a slow consumer. An application that
//! only sends keeps a [`Requester`] and drops the `Connection`: its pushes are then discarded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tidings_schemas::client::{self as proto, ClientFrame, client_frame::Op, server_frame::Msg};
use tidings_schemas::v1::{Event, MessagePosted};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

pub use tidings_schemas::client;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
    #[error("the connection is closed{}", .reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    Closed { reason: Option<String> },
    #[error("server refused the request ({code:?}): {message}")]
    Server {
        code: proto::ErrorCode,
        message: String,
        retry_after_ms: u64,
    },
    #[error("unexpected reply: {0}")]
    Unexpected(String),
    /// The tenant is served by another cell: connect to `url` (empty: the server does not
    /// know it). [`Connection::open`] follows it.
    #[error("the tenant is served by another cell{}", if .url.is_empty() { String::new() } else { format!(": {}", .url) })]
    WrongCell { url: String },
}

/// How many cells [`Connection::open`] follows before it gives up (a loop of redirects
/// between cells that disagree).
pub const MAX_CELL_REDIRECTS: usize = 3;

/// Whether the client follows a cell redirect from `from` to `to`: never from `wss://` to
/// anything but `wss://` (a redirect must not make the token cross in clear).
pub fn redirect_allowed(from: &str, to: &str) -> bool {
    let secure = |u: &str| u.get(..6).is_some_and(|s| s.eq_ignore_ascii_case("wss://"));
    !secure(from) || secure(to)
}

/// How a `wss://` server's certificate is verified.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// Trust only the CA certificates in this PEM file (a private CA); without it, the
    /// system's roots.
    pub ca_file: Option<std::path::PathBuf>,
}

impl ClientTls {
    /// The rustls configuration this verification means (ring provider; the CA file's
    /// certificates, or the system's roots). Other HTTPS clients of tidings use it too.
    pub fn rustls_config(&self) -> Result<rustls::ClientConfig, String> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("read CA file {}: {e}", path.display()))?;
                for cert in certs {
                    let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("CA file {}: {e}", path.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("CA file {} holds no certificate", path.display()));
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }
}

/// Something the server sent without being asked.
#[derive(Clone, Debug, PartialEq)]
pub enum Push {
    Event(Event),
    ReadCursor(proto::ReadCursor),
    Typing(proto::TypingNotice),
    /// An error not tied to a request (bad frame, rate limited).
    Error(proto::Error),
    /// The server is closing the connection, and why.
    Goodbye(proto::Goodbye),
    /// The connection closed; the close code and reason if the server sent one.
    Closed {
        code: Option<u16>,
        reason: String,
    },
}

/// Replies awaited, by request id; `None` once the connection is gone, so a request made
/// after that fails at once instead of waiting forever.
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Msg>>>>>;

/// A connection: the request side ([`Requester`], via `Deref`, cloneable for other tasks)
/// and the pushes.
pub struct Connection {
    requester: Requester,
    pushes: mpsc::Receiver<Push>,
}

/// Sends requests on a connection; clones share it.
#[derive(Clone)]
pub struct Requester {
    inner: Arc<RequesterInner>,
}

struct RequesterInner {
    out: mpsc::Sender<Message>,
    pending: Pending,
    next_id: AtomicU64,
    closed_reason: Arc<Mutex<Option<String>>>,
}

impl std::ops::Deref for Connection {
    type Target = Requester;
    fn deref(&self) -> &Requester {
        &self.requester
    }
}

/// How a send is retried when the server answers RATE_LIMITED (the log is overloaded and
/// the conversation is among the hottest, or the session sends too many frames): after the
/// `retry_after_ms` the server gave, stretched by a random jitter ([`retry_delay`]) so the
/// many clients refused in one window do not all come back at the same instant. The retry
/// carries the same `client_msg_id`, so a send that did land is never written twice.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Longest total wait; past it the last refusal is returned.
    pub max_wait: std::time::Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            max_wait: std::time::Duration::from_secs(30),
        }
    }
}

/// A conversation's member list kept by the client (the @-list, member checks): loaded once,
/// page after page, then kept current by asking only for the changes since its version.
/// It holds the whole list of one conversation: at most the server's `log.max_group_members`.
#[derive(Clone, Debug, Default)]
pub struct MemberCache {
    conversation: String,
    version: u64,
    members: std::collections::BTreeMap<String, proto::Member>,
}

/// Entries asked for per ListMembers request by [`MemberCache`].
const MEMBER_PAGE: u32 = 1000;

impl MemberCache {
    /// Loads the whole list, page after page.
    pub async fn load(r: &Requester, conversation: &str) -> Result<Self, ClientError> {
        let mut cache = MemberCache {
            conversation: conversation.to_string(),
            ..MemberCache::default()
        };
        let mut after = String::new();
        let mut first = true;
        loop {
            let page = r
                .member_page(proto::ListMembers {
                    conversation: conversation.to_string(),
                    after: after.clone(),
                    limit: MEMBER_PAGE,
                    ..Default::default()
                })
                .await?;
            if first {
                // The oldest version the pages reflect: the changes since it cover the rest.
                cache.version = page.version;
                first = false;
            }
            let Some(last) = page.members.last() else {
                break;
            };
            after = last.user.clone();
            for m in page.members {
                cache.members.insert(m.user.clone(), m);
            }
            if !page.more {
                break;
            }
        }
        Ok(cache)
    }

    /// Applies the changes since the version held (reloading the whole list for a
    /// conversation without versions); returns how many changes were applied.
    pub async fn refresh(&mut self, r: &Requester) -> Result<usize, ClientError> {
        if self.version == 0 {
            *self = MemberCache::load(r, &self.conversation).await?;
            return Ok(self.members.len());
        }
        let mut applied = 0;
        loop {
            let page = r
                .member_page(proto::ListMembers {
                    conversation: self.conversation.clone(),
                    limit: MEMBER_PAGE,
                    since_version: self.version,
                    ..Default::default()
                })
                .await?;
            for ch in &page.changes {
                if ch.removed {
                    self.members.remove(&ch.user);
                } else {
                    // A join, or a role or display name change of a member held (who keeps
                    // the seq they joined at).
                    let m = self
                        .members
                        .entry(ch.user.clone())
                        .or_insert_with(|| proto::Member {
                            user: ch.user.clone(),
                            joined_seq: ch.seq,
                            ..Default::default()
                        });
                    m.role = ch.role;
                    m.role_name = ch.role_name.clone();
                    m.display_name = ch.display_name.clone();
                }
                self.version = self.version.max(ch.seq);
                applied += 1;
            }
            self.version = self.version.max(page.version);
            if !page.more || page.changes.is_empty() {
                return Ok(applied);
            }
        }
    }

    /// The version held: the seq of the last membership event applied.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn contains(&self, user: &str) -> bool {
        self.members.contains_key(user)
    }

    /// Up to `limit` members whose id starts with `prefix`, in id order (the @-list), from
    /// memory.
    pub fn search(&self, prefix: &str, limit: usize) -> Vec<&proto::Member> {
        self.members
            .range(prefix.to_string()..)
            .take_while(|(user, _)| user.starts_with(prefix))
            .take(limit)
            .map(|(_, m)| m)
            .collect()
    }
}

/// Least wait before a retry, when the server said less (or nothing).
pub const MIN_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(10);

/// The wait before retrying a refusal that said `retry_after_ms`: from it to 1.5 times it,
/// `unit` (in [0, 1)) choosing where; never under [`MIN_RETRY_DELAY`].
pub fn retry_delay(retry_after_ms: u64, unit: f64) -> std::time::Duration {
    let base = std::time::Duration::from_millis(retry_after_ms).max(MIN_RETRY_DELAY);
    base + base.mul_f64(unit.clamp(0.0, 1.0) / 2.0)
}

/// Pushes buffered on the client before it stops reading the socket (and the server, seeing
/// its queue fill, disconnects it as a slow consumer).
const PUSH_BUFFER: usize = 4096;

impl Connection {
    /// Opens the WebSocket (no Hello yet); `wss://` trusts the system's roots.
    pub async fn connect(url: &str) -> Result<Connection, ClientError> {
        Connection::connect_with(url, &ClientTls::default()).await
    }

    /// Opens the WebSocket (no Hello yet); `wss://` is verified as `tls` says.
    pub async fn connect_with(url: &str, tls: &ClientTls) -> Result<Connection, ClientError> {
        let fail = |message: String| ClientError::Connect {
            url: url.to_string(),
            message,
        };
        if !url.starts_with("wss://") {
            let (ws, _) = tokio_tungstenite::connect_async(url)
                .await
                .map_err(|e| fail(e.to_string()))?;
            return Ok(Connection::start(ws));
        }
        let uri: tokio_tungstenite::tungstenite::http::Uri =
            url.parse().map_err(|e| fail(format!("{e}")))?;
        let host = uri
            .host()
            .ok_or_else(|| fail("no host".into()))?
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let config = tls.rustls_config().map_err(fail)?;
        let bare = host.trim_matches(['[', ']']);
        let name = rustls_pki_types::ServerName::try_from(bare)
            .map_err(|e| fail(format!("bad server name {host:?}: {e}")))?
            .to_owned();
        let tcp = tokio::net::TcpStream::connect((bare, port))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| fail(format!("TLS: {e}")))?;
        let (ws, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(Connection::start(ws))
    }

    fn start<S>(ws: tokio_tungstenite::WebSocketStream<S>) -> Connection
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sink, mut source) = ws.split();
        let (out, mut out_rx) = mpsc::channel::<Message>(1024);
        let (push_tx, pushes) = mpsc::channel(PUSH_BUFFER);
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let closed_reason = Arc::new(Mutex::new(None));
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    return;
                }
            }
            let _ = sink.close().await;
        });
        let reader_pending = pending.clone();
        let reader_reason = closed_reason.clone();
        tokio::spawn(async move {
            let mut close = Push::Closed {
                code: None,
                reason: String::new(),
            };
            while let Some(msg) = source.next().await {
                let bytes = match msg {
                    Ok(Message::Binary(b)) => b,
                    Ok(Message::Close(frame)) => {
                        if let Some(f) = frame {
                            close = Push::Closed {
                                code: Some(u16::from(f.code)),
                                reason: f.reason.to_string(),
                            };
                        }
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => break,
                };
                let Ok(frame) = proto::ServerFrame::decode(bytes.as_ref()) else {
                    continue;
                };
                let Some(msg) = frame.msg else { continue };
                if frame.request_id != 0 {
                    let waiter = reader_pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_mut()
                        .and_then(|p| p.remove(&frame.request_id));
                    if let Some(w) = waiter {
                        let _ = w.send(msg);
                        continue;
                    }
                }
                let push = match msg {
                    Msg::Event(e) => Push::Event(e),
                    Msg::ReadCursor(c) => Push::ReadCursor(c),
                    Msg::Typing(t) => Push::Typing(t),
                    Msg::Error(e) => Push::Error(e),
                    Msg::Goodbye(g) => {
                        *reader_reason.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(g.message.clone());
                        Push::Goodbye(g)
                    }
                    _ => continue,
                };
                // Nobody taking pushes (only the Requester is kept) is fine: drop them.
                let _ = push_tx.send(push).await;
            }
            // Fail whatever still waits for a reply, and whatever asks later.
            reader_pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            let _ = push_tx.send(close).await;
        });
        Connection {
            requester: Requester {
                inner: Arc::new(RequesterInner {
                    out,
                    pending,
                    next_id: AtomicU64::new(1),
                    closed_reason,
                }),
            },
            pushes,
        }
    }

    /// Connects and authenticates.
    pub async fn open(
        url: &str,
        token: &str,
        device: &str,
    ) -> Result<(Connection, proto::Welcome), ClientError> {
        Connection::open_with(url, &ClientTls::default(), token, device).await
    }

    /// Connects with `tls` for `wss://`, and authenticates, following the server to the
    /// tenant's cell when it answers `WRONG_CELL` (at most [`MAX_CELL_REDIRECTS`] times): a
    /// client's first connect can go to any cell.
    pub async fn open_with(
        url: &str,
        tls: &ClientTls,
        token: &str,
        device: &str,
    ) -> Result<(Connection, proto::Welcome), ClientError> {
        let mut url = url.to_string();
        for _ in 0..=MAX_CELL_REDIRECTS {
            let conn = Connection::connect_with(&url, tls).await?;
            match conn.hello(token, device).await {
                Ok(welcome) => return Ok((conn, welcome)),
                Err(ClientError::WrongCell { url: next }) if !next.is_empty() => {
                    if !redirect_allowed(&url, &next) {
                        return Err(ClientError::Connect {
                            url: next,
                            message: format!(
                                "refused a cell redirect from {url} that drops TLS (the token \
                                 would cross in clear)"
                            ),
                        });
                    }
                    url = next;
                }
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Connect {
            url,
            message: format!("more than {MAX_CELL_REDIRECTS} cell redirects"),
        })
    }

    /// A handle for sending requests from another task.
    pub fn requester(&self) -> Requester {
        self.requester.clone()
    }

    /// The next push, or `None` once the connection is gone and every push was taken.
    pub async fn next_push(&mut self) -> Option<Push> {
        self.pushes.recv().await
    }
}

impl Requester {
    fn closed(&self) -> ClientError {
        ClientError::Closed {
            reason: self
                .inner
                .closed_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// Sends one operation and waits for its reply. A server Error becomes
    /// [`ClientError::Server`].
    pub async fn request(&self, op: Op) -> Result<Msg, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self
            .inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            Some(pending) => {
                pending.insert(id, tx);
            }
            None => return Err(self.closed()),
        }
        let frame = ClientFrame {
            request_id: id,
            op: Some(op),
        };
        if self
            .inner
            .out
            .send(Message::Binary(Bytes::from(frame.encode_to_vec())))
            .await
            .is_err()
        {
            return Err(self.closed());
        }
        match rx.await {
            Ok(Msg::Error(e)) if e.code == proto::ErrorCode::WrongCell as i32 => {
                Err(ClientError::WrongCell {
                    url: e.redirect_url,
                })
            }
            Ok(Msg::Error(e)) => Err(ClientError::Server {
                code: proto::ErrorCode::try_from(e.code).unwrap_or(proto::ErrorCode::Unspecified),
                message: e.message,
                retry_after_ms: e.retry_after_ms,
            }),
            Ok(msg) => Ok(msg),
            Err(_) => Err(self.closed()),
        }
    }

    /// Sends a raw WebSocket message (for testing how the server treats bad input).
    pub async fn send_raw(&self, msg: Message) -> Result<(), ClientError> {
        self.inner.out.send(msg).await.map_err(|_| self.closed())
    }

    pub async fn hello(&self, token: &str, device: &str) -> Result<proto::Welcome, ClientError> {
        let op = Op::Hello(proto::Hello {
            token: token.to_string(),
            device: device.to_string(),
        });
        match self.request(op).await? {
            Msg::Welcome(w) => Ok(w),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn send_text(
        &self,
        conversation: &str,
        client_msg_id: &str,
        text: &str,
    ) -> Result<proto::SendAck, ClientError> {
        let op = Op::Send(proto::Send {
            client_msg_id: client_msg_id.to_string(),
            conversation: conversation.to_string(),
            body: Some(proto::send::Body::MessagePosted(MessagePosted {
                text: text.to_string(),
                ..Default::default()
            })),
        });
        match self.request(op).await? {
            Msg::SendAck(a) => Ok(a),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// [`Requester::send_text`], retried after RATE_LIMITED as `policy` says (same
    /// `client_msg_id`, waits from [`retry_delay`]). Other errors are returned at once.
    pub async fn send_text_with_retry(
        &self,
        conversation: &str,
        client_msg_id: &str,
        text: &str,
        policy: RetryPolicy,
    ) -> Result<proto::SendAck, ClientError> {
        let mut waited = std::time::Duration::ZERO;
        let mut attempt = 1;
        loop {
            match self.send_text(conversation, client_msg_id, text).await {
                Err(ClientError::Server {
                    code: proto::ErrorCode::RateLimited,
                    retry_after_ms,
                    message,
                }) => {
                    let wait = retry_delay(retry_after_ms, fastrand::f64());
                    if attempt >= policy.max_attempts || waited + wait > policy.max_wait {
                        return Err(ClientError::Server {
                            code: proto::ErrorCode::RateLimited,
                            message,
                            retry_after_ms,
                        });
                    }
                    tokio::time::sleep(wait).await;
                    waited += wait;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Catches up on every conversation of the user: asks Sync page after page (the server
    /// answers a bounded number of conversations and bytes per page) and returns them all,
    /// in id order. Conversations the server could not read carry their `error`.
    pub async fn sync(
        &self,
        known: &[(String, u64)],
        latest: u32,
    ) -> Result<proto::SyncResult, ClientError> {
        let mut all = proto::SyncResult::default();
        let mut cursor = String::new();
        loop {
            let page = self.sync_page(known, latest, &cursor, 0).await?;
            all.conversations.extend(page.conversations);
            if page.next_cursor.is_empty() {
                return Ok(all);
            }
            if page.next_cursor <= cursor {
                return Err(ClientError::Unexpected(format!(
                    "Sync cursor went from {cursor:?} back to {:?}",
                    page.next_cursor
                )));
            }
            cursor = page.next_cursor;
        }
    }

    /// One page of Sync: conversations after `cursor` ("" = from the first), at most
    /// `max_conversations` (0 = the server's default). Send the next with its `next_cursor`
    /// until that is empty.
    pub async fn sync_page(
        &self,
        known: &[(String, u64)],
        latest: u32,
        cursor: &str,
        max_conversations: u32,
    ) -> Result<proto::SyncResult, ClientError> {
        let op = Op::Sync(proto::Sync {
            known: known
                .iter()
                .map(|(c, s)| proto::KnownConversation {
                    conversation: c.clone(),
                    last_seq: *s,
                })
                .collect(),
            latest,
            cursor: cursor.to_string(),
            max_conversations,
        });
        match self.request(op).await? {
            Msg::SyncResult(r) => Ok(r),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    async fn events(&self, op: Op) -> Result<proto::Events, ClientError> {
        match self.request(op).await? {
            Msg::Events(e) => Ok(e),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Up to `limit` events before `before_seq` (0: from the head), ascending; fewer when
    /// the server's reply budget cut the page (`more` is then set).
    pub async fn history(
        &self,
        conversation: &str,
        before_seq: u64,
        limit: u32,
    ) -> Result<proto::Events, ClientError> {
        self.events(Op::History(proto::History {
            conversation: conversation.to_string(),
            before_seq,
            limit,
        }))
        .await
    }

    /// Events `from..=to`.
    pub async fn pull(
        &self,
        conversation: &str,
        from: u64,
        to: u64,
    ) -> Result<proto::Events, ClientError> {
        self.events(Op::Pull(proto::Pull {
            conversation: conversation.to_string(),
            from_seq: from,
            to_seq: to,
        }))
        .await
    }

    pub async fn mark_read(&self, conversation: &str, seq: u64) -> Result<u64, ClientError> {
        let op = Op::MarkRead(proto::MarkRead {
            conversation: conversation.to_string(),
            seq,
        });
        match self.request(op).await? {
            Msg::ReadCursor(c) => Ok(c.read_seq),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn typing(&self, conversation: &str) -> Result<(), ClientError> {
        self.request(Op::Typing(proto::Typing {
            conversation: conversation.to_string(),
        }))
        .await
        .map(|_| ())
    }

    async fn committed(&self, op: Op) -> Result<proto::Committed, ClientError> {
        match self.request(op).await? {
            Msg::Committed(c) => Ok(c),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn create_conversation(
        &self,
        conversation: &str,
        kind: tidings_schemas::v1::ConversationKind,
        title: &str,
        members: &[&str],
    ) -> Result<proto::Committed, ClientError> {
        self.committed(Op::CreateConversation(proto::CreateConversation {
            conversation: conversation.to_string(),
            kind: kind as i32,
            title: title.to_string(),
            members: members.iter().map(|m| m.to_string()).collect(),
            kind_name: String::new(),
        }))
        .await
    }

    /// Creates a conversation of a kind by name (`announcement`, `class`, or one the server
    /// defines); the creator takes the kind's creator role.
    pub async fn create_conversation_of_kind(
        &self,
        conversation: &str,
        kind: &str,
        title: &str,
        members: &[&str],
    ) -> Result<proto::Committed, ClientError> {
        self.committed(Op::CreateConversation(proto::CreateConversation {
            conversation: conversation.to_string(),
            kind: 0,
            title: title.to_string(),
            members: members.iter().map(|m| m.to_string()).collect(),
            kind_name: kind.to_string(),
        }))
        .await
    }

    pub async fn add_member(
        &self,
        conversation: &str,
        user: &str,
    ) -> Result<proto::Committed, ClientError> {
        self.add_member_as(conversation, user, "").await
    }

    /// Adds `user` with one of the kind's roles (empty: its member role).
    pub async fn add_member_as(
        &self,
        conversation: &str,
        user: &str,
        role: &str,
    ) -> Result<proto::Committed, ClientError> {
        self.committed(Op::AddMember(proto::AddMember {
            conversation: conversation.to_string(),
            user: user.to_string(),
            role: role.to_string(),
        }))
        .await
    }

    /// Gives a member another of the kind's roles.
    pub async fn set_role(
        &self,
        conversation: &str,
        user: &str,
        role: &str,
    ) -> Result<proto::Committed, ClientError> {
        self.committed(Op::SetRole(proto::SetRole {
            conversation: conversation.to_string(),
            user: user.to_string(),
            role: role.to_string(),
        }))
        .await
    }

    /// Sets a member's display name in the conversation (one's own, or another's where the
    /// kind allows it); empty clears it.
    pub async fn set_display_name(
        &self,
        conversation: &str,
        user: &str,
        name: &str,
    ) -> Result<proto::Committed, ClientError> {
        self.committed(Op::SetDisplayName(proto::SetDisplayName {
            conversation: conversation.to_string(),
            user: user.to_string(),
            display_name: name.to_string(),
        }))
        .await
    }

    pub async fn remove_member(
        &self,
        conversation: &str,
        user: &str,
    ) -> Result<proto::Committed, ClientError> {
        self.committed(Op::RemoveMember(proto::RemoveMember {
            conversation: conversation.to_string(),
            user: user.to_string(),
        }))
        .await
    }

    pub async fn list_conversations(&self) -> Result<Vec<proto::ConversationSummary>, ClientError> {
        match self
            .request(Op::ListConversations(proto::ListConversations::default()))
            .await?
        {
            Msg::ConversationList(l) => Ok(l.conversations),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn list_members(
        &self,
        conversation: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<proto::Member>, ClientError> {
        Ok(self
            .member_page(proto::ListMembers {
                conversation: conversation.to_string(),
                after: after.to_string(),
                limit,
                ..Default::default()
            })
            .await?
            .members)
    }

    /// One ListMembers answer as the server gave it: members (after, prefix) or the changes
    /// since a version, with the list's version and whether more follow.
    pub async fn member_page(
        &self,
        request: proto::ListMembers,
    ) -> Result<proto::MemberList, ClientError> {
        match self.request(Op::ListMembers(request)).await? {
            Msg::MemberList(l) => Ok(l),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// One page of a search of the user's own conversations: `cursor` empty for the first
    /// page, else the previous page's `next_cursor` (empty when there is no more); `limit`
    /// 0 for the server's page size.
    pub async fn search(
        &self,
        query: &str,
        cursor: &str,
        limit: u32,
    ) -> Result<proto::SearchResult, ClientError> {
        let op = Op::Search(proto::Search {
            query: query.to_string(),
            cursor: cursor.to_string(),
            limit,
        });
        match self.request(op).await? {
            Msg::SearchResult(r) => Ok(r),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        self.request(Op::Ping(proto::Ping {})).await.map(|_| ())
    }
}

/// What [`Tracker::observe`] makes of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// The next one: show it.
    New,
    /// Already had it: ignore.
    Duplicate,
    /// Events `from..=to` are missing before this one: Pull them, then show this.
    Gap { from: u64, to: u64 },
}

/// The last seq a client has per conversation.
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    last: HashMap<String, u64>,
}

impl Tracker {
    pub fn last(&self, conversation: &str) -> u64 {
        self.last.get(conversation).copied().unwrap_or(0)
    }

    /// Records that the client has everything up to `seq` (after a Sync or Pull).
    pub fn advance(&mut self, conversation: &str, seq: u64) {
        let last = self.last.entry(conversation.to_string()).or_insert(0);
        *last = (*last).max(seq);
    }

    /// Classifies a pushed event and, unless it is a duplicate or after a gap, records it.
    pub fn observe(&mut self, e: &Event) -> Seen {
        let last = self.last(&e.conversation);
        if e.seq <= last {
            Seen::Duplicate
        } else if e.seq == last + 1 {
            self.advance(&e.conversation, e.seq);
            Seen::New
        } else {
            Seen::Gap {
                from: last + 1,
                to: e.seq - 1,
            }
        }
    }

    /// Every conversation with its last seq, for Sync.
    pub fn known(&self) -> Vec<(String, u64)> {
        self.last.iter().map(|(c, s)| (c.clone(), *s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(conv: &str, seq: u64) -> Event {
        Event {
            conversation: conv.into(),
            seq,
            ..Default::default()
        }
    }

    #[test]
    fn cell_redirects_never_drop_tls() {
        assert!(redirect_allowed("wss://a/v1/ws", "wss://b/v1/ws"));
        assert!(redirect_allowed("WSS://a/v1/ws", "wss://b/v1/ws"));
        assert!(redirect_allowed("ws://a/v1/ws", "ws://b/v1/ws"));
        assert!(redirect_allowed("ws://a/v1/ws", "wss://b/v1/ws"));
        assert!(!redirect_allowed("wss://a/v1/ws", "ws://b/v1/ws"));
        assert!(!redirect_allowed("wss://a/v1/ws", "http://b/"));
    }

    #[test]
    fn retries_wait_what_the_server_said_plus_up_to_half_again() {
        use std::time::Duration;
        assert_eq!(retry_delay(400, 0.0), Duration::from_millis(400));
        assert_eq!(retry_delay(400, 0.5), Duration::from_millis(500));
        assert!(retry_delay(400, 0.999) < Duration::from_millis(600));
        assert_eq!(retry_delay(0, 0.0), MIN_RETRY_DELAY);
        assert_eq!(
            retry_delay(400, 7.0),
            Duration::from_millis(600),
            "unit clamped"
        );
    }

    #[test]
    fn tracker_drops_duplicates_and_reports_gaps() {
        let mut t = Tracker::default();
        assert_eq!(t.observe(&ev("a", 1)), Seen::New);
        assert_eq!(t.observe(&ev("a", 1)), Seen::Duplicate);
        assert_eq!(t.observe(&ev("a", 4)), Seen::Gap { from: 2, to: 3 });
        assert_eq!(t.last("a"), 1);
        t.advance("a", 3);
        assert_eq!(t.observe(&ev("a", 4)), Seen::New);
        assert_eq!(t.observe(&ev("b", 1)), Seen::New);
        let mut known = t.known();
        known.sort();
        assert_eq!(known, vec![("a".to_string(), 4), ("b".to_string(), 1)]);
    }
}
