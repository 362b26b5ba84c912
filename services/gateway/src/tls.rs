//! TLS for the listeners at the edge: the gateway's `wss://` and the admin listener's
//! `https://` (docs/decisions/edge-tls.md).
//!
//! - The certificate chain and the private key are PEM files, parsed with
//!   `rustls-pki-types` (no rustls-pemfile, which is unmaintained).
//! - [`ReloadingAcceptor`] re-reads them when either file's modification time changes
//!   (checked every [`RELOAD_POLL`]), so a renewed certificate is served to new connections
//!   without a restart. A new pair that does not load (half-written, mismatched key) is
//!   refused with a warning and the old one stays in service: a botched renewal never takes
//!   the listener down.
//! - [`ReloadingAcceptor::accept`] puts the handshake under [`HANDSHAKE_TIMEOUT`]: a client
//!   that opens a TCP connection and never finishes its ClientHello holds a socket for that
//!   long at most.
//!
//! Only TLS 1.2 and 1.3 with rustls' default (ring) cipher suites are offered.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};

/// How often the certificate and key files are checked for a change. A renewal is served
/// within this long; a stat of two files every few seconds costs nothing.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// Longest a TLS handshake may take from the accepted TCP connection. Generous for a slow
/// mobile link (two round trips), short enough that a flood of silent connections releases
/// its sockets quickly.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate chain and key from PEM files, and what is wrong with them.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path} is not a PEM private key (PKCS#8, PKCS#1 or SEC1): {reason}")]
    BadKey { path: String, reason: String },
    #[error("the certificate and key in {cert} / {key} are not usable together: {source}")]
    Config {
        cert: String,
        key: String,
        source: rustls::Error,
    },
    #[error(
        "TLS handshake with {peer} did not finish within {:?}",
        HANDSHAKE_TIMEOUT
    )]
    HandshakeTimeout { peer: SocketAddr },
    #[error("TLS handshake with {peer} failed: {source}")]
    Handshake {
        peer: SocketAddr,
        source: std::io::Error,
    },
}

/// The rustls provider every TLS user in tidings shares (ring, as async-nats and reqwest).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file, leaf first. Blocking: called at startup and from
/// the reload task's blocking job.
#[allow(clippy::disallowed_methods)]
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: shown.clone(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: shown });
    }
    Ok(certs)
}

/// Reads the first private key in a PEM file. Blocking, like [`load_certs`].
#[allow(clippy::disallowed_methods)]
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: shown.clone(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::BadKey {
        path: shown,
        reason: e.to_string(),
    })
}

/// A rustls server configuration from a certificate chain file and its key file.
/// `alpn`: protocols to offer (`http/1.1` for the admin listener; none for WebSocket).
pub fn server_config(cert: &Path, key: &Path, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    let config_error = |source| TlsError::Config {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(config_error)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Where a listener's certificate and key live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A TLS acceptor whose certificate follows the files on disk.
#[derive(Clone)]
pub struct ReloadingAcceptor {
    current: Arc<RwLock<TlsAcceptor>>,
    files: TlsFiles,
}

impl std::fmt::Debug for ReloadingAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingAcceptor")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// The pair's modification times. Blocking: the reload task runs it on the blocking pool.
#[allow(clippy::disallowed_methods)]
fn modified(files: &TlsFiles) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(&files.cert)?, m(&files.key)?))
}

impl ReloadingAcceptor {
    /// Loads the pair now (an error here fails startup) and watches it from a background
    /// task for as long as any clone of the acceptor lives.
    pub fn start(files: TlsFiles, alpn: &'static [&'static [u8]]) -> Result<Self, TlsError> {
        let config = server_config(&files.cert, &files.key, alpn)?;
        let acceptor = ReloadingAcceptor {
            current: Arc::new(RwLock::new(TlsAcceptor::from(Arc::new(config)))),
            files,
        };
        let weak = Arc::downgrade(&acceptor.current);
        let files = acceptor.files.clone();
        let mut seen = modified(&files);
        tokio::spawn(async move {
            // The last pair that failed to load: warned about once, retried every poll.
            let mut failed = None;
            let mut ticker = tokio::time::interval(RELOAD_POLL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(current) = weak.upgrade() else {
                    return;
                };
                // Stat and load on the blocking pool: file I/O never stalls a worker.
                let polled = files.clone();
                let now = tokio::task::spawn_blocking(move || modified(&polled))
                    .await
                    .ok()
                    .flatten();
                if now == seen {
                    continue;
                }
                let loading = files.clone();
                let loaded = tokio::task::spawn_blocking(move || {
                    server_config(&loading.cert, &loading.key, alpn)
                })
                .await;
                let Ok(loaded) = loaded else {
                    continue; // the blocking job panicked: try again at the next poll
                };
                match loaded {
                    Ok(config) => {
                        if let Ok(mut slot) = current.write() {
                            *slot = TlsAcceptor::from(Arc::new(config));
                        }
                        seen = now;
                        info!(cert = %files.cert.display(), "reloaded the TLS certificate");
                    }
                    // Not remembered as seen: a renewal written in two steps (cert, then
                    // key) loads on the next poll once both files agree.
                    Err(e) => {
                        if failed != now {
                            warn!(
                                error = %e,
                                "failed to reload the TLS certificate; the previous one stays in use"
                            );
                            failed = now;
                        }
                    }
                }
            }
        });
        Ok(acceptor)
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The TLS handshake on an accepted connection, under [`HANDSHAKE_TIMEOUT`].
    pub async fn accept<S>(&self, stream: S, peer: SocketAddr) -> Result<TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = match self.current.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(source)) => Err(TlsError::Handshake { peer, source }),
            Err(_) => Err(TlsError::HandshakeTimeout { peer }),
        }
    }
}

/// True for addresses only this machine can reach; plain listeners there are acceptable.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}
