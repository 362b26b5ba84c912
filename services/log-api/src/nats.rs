//! The one way every tidings process connects to NATS: with its role's credential and,
//! when configured, TLS (docs/decisions/nats-identity-and-permissions.md).
//!
//! The first connection decides whether the process starts:
//! - the server is not reachable yet (refused, timed out, DNS): retried with backoff for up
//!   to [`NatsConnect::initial_wait`], so roles may start in any order;
//! - the server refuses the credential, or its certificate is not trusted, or the URL is
//!   malformed: fatal at once, with the reason. Retrying cannot fix a wrong password, and a
//!   process that retries it forever looks healthy while it serves nothing.
//!
//! Once connected, the client reconnects forever (a NATS restart must not take tidings
//! down), and every (re)connection is announced so hubs can check what they missed.
//!
//! URLs are printed through [`redact_url`] only: a `nats://user:password@host` never reaches
//! a log line.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::ConnectErrorKind;
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use crate::health::Link;

/// What the NATS connection tells the tasks of a process.
#[derive(Clone)]
pub struct BusEvents {
    /// Fires on every (re)connection: hubs then check what they missed.
    pub reconnected: broadcast::Sender<()>,
    /// The subject of each subscription the server removed (a permission violation, e.g.
    /// after a configuration reload). The client's stream for it stays open but silent, so
    /// its owner must subscribe again (or end, and be restarted).
    pub lost: broadcast::Sender<String>,
    /// Connected or not, and how many times it (re)connected.
    pub link: watch::Sender<Link>,
}

/// Most undelivered notices of each kind kept per listener; a listener that falls further
/// behind sees `Lagged` and re-checks everything it owns.
const EVENT_QUEUE: usize = 64;

impl BusEvents {
    pub fn new() -> Self {
        BusEvents {
            reconnected: broadcast::channel(EVENT_QUEUE).0,
            lost: broadcast::channel(EVENT_QUEUE).0,
            link: watch::channel(Link {
                connected: true,
                epoch: 0,
            })
            .0,
        }
    }
}

impl Default for BusEvents {
    fn default() -> Self {
        Self::new()
    }
}

/// The subject in a server error saying a subscription was refused or removed, as
/// nats-server words it: `Permissions Violation for Subscription to "SUBJECT"`.
pub fn lost_subject(error: &str) -> Option<&str> {
    const MARK: &str = "permissions violation for subscription to ";
    let at = error.to_ascii_lowercase().find(MARK)? + MARK.len();
    let rest = error.get(at..)?.trim_start_matches(['"', '\\']);
    let end = rest.find(['"', '\\', ' ']).unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

/// How a process proves who it is to NATS. Secrets are held already read (from a file or
/// the environment), never printed: `Debug` shows the kind only.
#[derive(Clone, Default)]
pub enum NatsAuth {
    /// No credential (a development server without authorization, or userinfo in the URL).
    #[default]
    None,
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
    /// An NKey user seed (`SU...`): the server holds only the public key.
    NKeySeed(String),
    /// The text of a `.creds` file (a user JWT and its NKey seed, for operator mode).
    Creds(String),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::UserPassword { user, .. } => {
                write!(f, "UserPassword {{ user: {user:?}, password: <redacted> }}")
            }
            NatsAuth::Token(_) => f.write_str("Token(<redacted>)"),
            NatsAuth::NKeySeed(_) => f.write_str("NKeySeed(<redacted>)"),
            NatsAuth::Creds(_) => f.write_str("Creds(<redacted>)"),
        }
    }
}

/// Everything needed to connect: where, as whom, and how the link is protected.
/// `Debug` redacts the URL's userinfo and every secret.
#[derive(Clone)]
pub struct NatsConnect {
    pub url: String,
    pub auth: NatsAuth,
    /// CA certificates (PEM) that sign the server's certificate; without it the system's
    /// roots are used if the server asks for TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// A client certificate and key (PEM), for servers that verify clients.
    pub tls_client_cert: Option<(PathBuf, PathBuf)>,
    /// Refuse to talk to a server that does not do TLS.
    pub tls_required: bool,
    /// How long the first connection may wait for a server that is not up yet.
    pub initial_wait: Duration,
    /// Where replies to this process's requests arrive (`_INBOX.<role>`): each role may
    /// subscribe to its own inbox prefix only, so one role's credential cannot read
    /// another's replies. `None`: async-nats's `_INBOX`.
    pub inbox_prefix: Option<String>,
}

impl std::fmt::Debug for NatsConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConnect")
            .field("url", &redact_url(&self.url))
            .field("auth", &self.auth)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_client_cert", &self.tls_client_cert)
            .field("tls_required", &self.tls_required)
            .field("initial_wait", &self.initial_wait)
            .field("inbox_prefix", &self.inbox_prefix)
            .finish()
    }
}

impl NatsConnect {
    /// A plain connection without credentials (tests, a development server).
    pub fn plain(url: impl Into<String>) -> Self {
        NatsConnect {
            url: url.into(),
            auth: NatsAuth::None,
            tls_ca_file: None,
            tls_client_cert: None,
            tls_required: false,
            initial_wait: DEFAULT_INITIAL_WAIT,
            inbox_prefix: None,
        }
    }
}

/// Default for [`NatsConnect::initial_wait`]: long enough for a NATS server started at the
/// same time (systemd, ops/run) to come up, short enough that a wrong address is reported
/// while someone is still watching.
pub const DEFAULT_INITIAL_WAIT: Duration = Duration::from_secs(30);

/// Why the first connection failed.
#[derive(Debug, thiserror::Error)]
pub enum NatsConnectError {
    #[error(
        "NATS at {url} refused the credential ({detail}); check nats.user/password_file, \
         token_file, nkey_seed_file or creds_file against the server's accounts"
    )]
    Refused { url: String, detail: String },
    #[error(
        "TLS with NATS at {url} failed ({detail}); check nats.tls_ca_file (the CA that \
         signed the server's certificate) and the server name in the URL"
    )]
    Tls { url: String, detail: String },
    #[error("NATS at {url} was not reachable within {waited:?}: {detail}")]
    Unreachable {
        url: String,
        waited: Duration,
        detail: String,
    },
    #[error("cannot connect to NATS at {url}: {detail}")]
    Other { url: String, detail: String },
}

/// The URL with any `user:password@` replaced by `***@`, fit for a log line.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let (scheme, rest) = match one.find("://") {
                Some(i) => (&one[..i + 3], &one[i + 3..]),
                None => ("", one),
            };
            let host_end = rest.find('/').unwrap_or(rest.len());
            match rest[..host_end].rfind('@') {
                Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
                None => one.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Every message of an error and its sources, for matching and for the report.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A TLS failure hides behind an I/O error (async-nats wraps the handshake's error so):
/// rustls reports a bad certificate as `InvalidData` with its own error inside.
fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && (io.kind() == std::io::ErrorKind::InvalidData
                || io.get_ref().is_some_and(|i| i.is::<rustls::Error>()))
        {
            return true;
        }
        source = s.source();
    }
    false
}

enum Attempt {
    Retry(String),
    Fatal(NatsConnectError),
}

fn classify(url: &str, e: &async_nats::ConnectError) -> Attempt {
    let url = redact_url(url);
    let detail = chain(e);
    match e.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            Attempt::Fatal(NatsConnectError::Refused { url, detail })
        }
        ConnectErrorKind::Tls => Attempt::Fatal(NatsConnectError::Tls { url, detail }),
        ConnectErrorKind::Io if is_tls_failure(e) => {
            Attempt::Fatal(NatsConnectError::Tls { url, detail })
        }
        ConnectErrorKind::Io | ConnectErrorKind::TimedOut | ConnectErrorKind::Dns => {
            Attempt::Retry(detail)
        }
        ConnectErrorKind::ServerParse | ConnectErrorKind::MaxReconnects => {
            Attempt::Fatal(NatsConnectError::Other { url, detail })
        }
    }
}

fn options(
    cfg: &NatsConnect,
    name: &str,
    events: BusEvents,
) -> Result<async_nats::ConnectOptions, NatsConnectError> {
    let mut o = match &cfg.auth {
        NatsAuth::None => async_nats::ConnectOptions::new(),
        NatsAuth::UserPassword { user, password } => {
            async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
        }
        NatsAuth::Token(t) => async_nats::ConnectOptions::with_token(t.clone()),
        NatsAuth::NKeySeed(seed) => async_nats::ConnectOptions::with_nkey(seed.trim().to_string()),
        NatsAuth::Creds(text) => async_nats::ConnectOptions::new()
            .credentials(text)
            .map_err(|e| NatsConnectError::Other {
                url: redact_url(&cfg.url),
                detail: format!("the creds file is not valid: {e}"),
            })?,
    };
    if let Some(ca) = &cfg.tls_ca_file {
        o = o.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &cfg.tls_client_cert {
        o = o.add_client_certificate(cert.clone(), key.clone());
    }
    if let Some(prefix) = &cfg.inbox_prefix {
        o = o.custom_inbox_prefix(prefix.as_str());
    }
    Ok(o.require_tls(cfg.tls_required)
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((50 * 2u64.saturating_pow(attempts.min(6) as u32)).min(2000))
        })
        .event_callback(move |event| {
            let events = events.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        info!("connected to nats");
                        events.link.send_modify(|l| {
                            l.connected = true;
                            l.epoch += 1;
                        });
                        let _ = events.reconnected.send(());
                    }
                    async_nats::Event::Disconnected => {
                        warn!("disconnected from nats");
                        events.link.send_modify(|l| l.connected = false);
                    }
                    async_nats::Event::ServerError(e) => {
                        let text = e.to_string();
                        match lost_subject(&text) {
                            Some(subject) => {
                                warn!(%subject, error = %text, "nats removed a subscription; its owner subscribes again");
                                let _ = events.lost.send(subject.to_string());
                            }
                            None => warn!(error = %text, "nats server error"),
                        }
                    }
                    other => info!(event = %other, "nats event"),
                }
            }
        }))
}

/// Connects as [`NatsConnect`] says (see the module doc for what is retried and what is
/// fatal). The returned [`BusEvents`] say when it (re)connects, disconnects, or loses a
/// subscription.
pub async fn connect_nats(
    cfg: &NatsConnect,
    name: &str,
) -> Result<(async_nats::Client, BusEvents), NatsConnectError> {
    let events = BusEvents::new();
    let deadline = tokio::time::Instant::now() + cfg.initial_wait;
    let mut delay = Duration::from_millis(100);
    let mut warned = false;
    loop {
        let attempt = options(cfg, name, events.clone())?
            .connect(cfg.url.as_str())
            .await;
        let detail = match attempt {
            Ok(client) => return Ok((client, events)),
            Err(e) => match classify(&cfg.url, &e) {
                Attempt::Fatal(fatal) => return Err(fatal),
                Attempt::Retry(detail) => detail,
            },
        };
        if tokio::time::Instant::now() + delay > deadline {
            return Err(NatsConnectError::Unreachable {
                url: redact_url(&cfg.url),
                waited: cfg.initial_wait,
                detail,
            });
        }
        if !warned {
            warn!(url = %redact_url(&cfg.url), error = %detail, "nats not reachable yet; retrying");
            warned = true;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_userinfo() {
        assert_eq!(
            redact_url("nats://u:secret@10.0.0.1:4222"),
            "nats://***@10.0.0.1:4222"
        );
        assert_eq!(
            redact_url("tls://a:b@h1:4222,nats://h2:4222"),
            "tls://***@h1:4222,nats://h2:4222"
        );
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("token@host:4222"), "***@host:4222");
    }

    #[test]
    fn a_removed_subscription_names_its_subject() {
        assert_eq!(
            lost_subject(r#"Permissions Violation for Subscription to "tidings.ev.acme.team""#),
            Some("tidings.ev.acme.team")
        );
        assert_eq!(
            lost_subject(
                r#"permissions violation for subscription to "tidings.rpc.log" using queue "tidings-log""#
            ),
            Some("tidings.rpc.log")
        );
        assert_eq!(
            lost_subject("Permissions Violation for Publish to \"x\""),
            None
        );
        assert_eq!(lost_subject("authorization violation"), None);
    }

    #[test]
    fn debug_never_shows_a_secret() {
        for auth in [
            NatsAuth::UserPassword {
                user: "log".into(),
                password: "hunter2".into(),
            },
            NatsAuth::Token("hunter2".into()),
            NatsAuth::NKeySeed("hunter2".into()),
            NatsAuth::Creds("hunter2".into()),
        ] {
            let shown = format!(
                "{:?}",
                NatsConnect {
                    auth,
                    ..NatsConnect::plain("nats://x:hunter2@h")
                }
            );
            assert!(!shown.contains("hunter2"), "{shown}");
        }
    }
}
