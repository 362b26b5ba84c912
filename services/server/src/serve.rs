//! `tidings serve`: the server roles.
//!
//! - `all` (default): the log, the publisher, the log service on NATS and the gateway, in one
//!   process; the gateway calls the log directly.
//! - `log`: the log, the publisher and the log service on NATS (queue group `tidings-log`).
//! - `gateway`: the WebSocket gateway; it reaches the log over NATS request/reply.
//! - `archiver`: only the periodic archiver (no NATS). The embedded store is one process's,
//!   so on one machine the archiver runs inside `all` or `log` (archive.enabled) instead.
//!
//! `all` and `log` have the store open, so they also run the admin listener (`admin.listen`):
//! health and compliance search (see [`crate::admin`]).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tidings_auth::{AuthConfig, Ed25519Key, Verifier};
use tidings_gateway::{LogService, Shared, publisher, rpc};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::config::Config;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    All,
    Log,
    Gateway,
    Archiver,
}

/// Reads the token verification keys from the config.
pub fn verifier(config: &Config) -> anyhow::Result<Verifier> {
    let a = &config.auth;
    let hs256_secret = match std::fs::read_to_string(&a.hs256_secret_file) {
        Ok(text) => Some(crate::commands::hex_decode(text.trim()).with_context(|| {
            format!("read the HS256 secret in {}", a.hs256_secret_file.display())
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(e).with_context(|| format!("read {}", a.hs256_secret_file.display()));
        }
    };
    let mut keys = Vec::new();
    for entry in &a.ed25519_public_keys {
        let (kid, hex) = match entry.split_once(':') {
            Some((kid, hex)) => (Some(kid.to_string()), hex),
            None => (None, entry.as_str()),
        };
        let bytes = crate::commands::hex_decode(hex).context("auth.ed25519_public_keys")?;
        let public_key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("an Ed25519 public key is 32 bytes (64 hex digits)"))?;
        keys.push(Ed25519Key { kid, public_key });
    }
    if hs256_secret.is_none() && keys.is_empty() {
        anyhow::bail!(
            "no token keys: run `tidings keys init` (writes the development secret {}) \
             or set auth.ed25519_public_keys",
            a.hs256_secret_file.display()
        );
    }
    Ok(Verifier::new(AuthConfig {
        issuer: a.issuer.clone(),
        audience: a.audience.clone(),
        hs256_secret,
        ed25519_public_keys: keys,
        leeway_secs: a.leeway_secs,
    })?)
}

/// The admin listener, unless `admin.listen` is empty. Its tokens are checked exactly as
/// the gateway's.
async fn start_admin(
    config: &Config,
    log: &tidings_log::Log,
    archive_gate: Arc<tokio::sync::RwLock<()>>,
) -> anyhow::Result<Option<crate::admin::Admin>> {
    if config.admin.listen.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = config.admin.listen.parse()?;
    let verifier = verifier(config)
        .context("the admin listener checks tokens (admin.listen = \"\" disables it)")?;
    let compliance = tidings_archive::compliance::Compliance::new(
        log.store().clone(),
        log.keyring().clone(),
        Some(crate::archive::objects(config)?),
        archive_gate,
    );
    let tls = edge_tls(
        "admin",
        &config.admin.tls_cert_file,
        &config.admin.tls_key_file,
        ADMIN_ALPN,
    )?;
    let secure = tls.is_some();
    let admin = crate::admin::Admin::start(addr, verifier, compliance, tls)
        .await
        .with_context(|| format!("admin listener on {addr}"))?;
    announce(
        "admin",
        admin.local_addr(),
        secure,
        "https://",
        "http://",
        "",
    );
    Ok(admin.into())
}

/// The admin listener speaks HTTP/1.1 only; saying so in ALPN lets clients skip h2.
const ADMIN_ALPN: &[&[u8]] = &[b"http/1.1"];

/// The TLS acceptor of a listener, if its section names a certificate; a certificate that
/// does not load fails startup.
fn edge_tls(
    section: &str,
    cert: &Option<std::path::PathBuf>,
    key: &Option<std::path::PathBuf>,
    alpn: &'static [&'static [u8]],
) -> anyhow::Result<Option<tidings_gateway::tls::ReloadingAcceptor>> {
    let Some(files) = crate::config::edge_tls(section, cert, key)? else {
        return Ok(None);
    };
    let acceptor = tidings_gateway::tls::ReloadingAcceptor::start(files, alpn)
        .with_context(|| format!("load the {section} TLS certificate"))?;
    Ok(Some(acceptor))
}

/// Says where a listener is, and loudly when it is plain on an address others can reach.
fn announce(what: &str, addr: SocketAddr, tls: bool, secure: &str, plain: &str, path: &str) {
    // The address ends the first part of each line: tests and scripts read the port there.
    if tls {
        eprintln!("tidings: {what} on {secure}{addr}{path}");
    } else if addr.ip().is_loopback() {
        eprintln!("tidings: {what} on {plain}{addr}{path} (plain, loopback only)");
    } else {
        eprintln!(
            "tidings: {what} on {plain}{addr}{path} WARNING, PLAIN and reachable from the \
             network, unencrypted (tokens and messages in the clear); set {what}.tls_cert_file \
             and {what}.tls_key_file"
        );
    }
}

/// The NATS connection of a `serve` role (and of every tool that talks to NATS), with the
/// configured credential and TLS. A refused credential or an untrusted server certificate
/// fails here, at startup.
pub async fn connect_nats(
    config: &Config,
    role: Role,
) -> anyhow::Result<(async_nats::Client, tokio::sync::broadcast::Sender<()>)> {
    let mut opts = config.nats.connect()?;
    let role_name = match role {
        Role::All => "all",
        Role::Log => "log",
        Role::Gateway => "gateway",
        Role::Archiver => "archiver",
    };
    opts.inbox_prefix = Some(crate::nats_init::inbox_prefix(role_name));
    Ok(tidings_gateway::connect_nats(&opts, &format!("tidings-{role_name}")).await?)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

pub async fn serve(config: Config, role: Role) -> anyhow::Result<()> {
    if role == Role::Archiver {
        // The archiver never writes through the sequencer: it leaves the partitions to the
        // log writers.
        let log = crate::commands::open_log_owning(&config, None, false).await?;
        let archiver = crate::archive::spawn_periodic(&config, log, Arc::default())?;
        eprintln!("tidings: archiver every {}", config.archive.interval);
        shutdown_signal().await;
        archiver.abort();
        return Ok(());
    }
    // The log service checks the token of every call that acts for a user (a NATS
    // credential alone never writes as anyone): the same [auth] settings as the gateways.
    let rpc_auth = match role {
        Role::All | Role::Log => Some(rpc::RpcAuth::new(verifier(&config).context(
            "the log service verifies the users' tokens on calls from gateways ([auth])",
        )?)),
        _ => None,
    };
    let verifier = match role {
        Role::Log => None,
        _ => Some(verifier(&config)?),
    };
    let (nats, reconnected) = connect_nats(&config, role).await?;

    // Held shared by compliance reads and exclusively by an archive pass, so a read never
    // sees events halfway between the tiers; made here, once per process, for both.
    let archive_gate = Arc::new(tokio::sync::RwLock::new(()));
    let mut log_handle = None;
    let mut admin = None;
    let mut background = Vec::new();
    let service: Option<Arc<dyn LogService>> = match role {
        Role::All | Role::Log => {
            let (feed_tx, feed_rx) = tokio::sync::mpsc::channel(64 * 1024);
            let log = crate::commands::open_log_with_feed(&config, Some(feed_tx)).await?;
            let (publisher, _stats) = publisher::spawn(
                nats.clone(),
                feed_rx,
                log.keyring().clone(),
                config.publisher_config(),
            );
            background.push(publisher);
            let (rpc_nats, rpc_log, in_flight) =
                (nats.clone(), log.clone(), config.nats.rpc_in_flight);
            let auth = rpc_auth
                .clone()
                .context("the log service has its token check")?;
            background.push(tokio::spawn(async move {
                if let Err(e) = rpc::serve(rpc_nats, rpc_log, auth, in_flight).await {
                    warn!(error = %e, "log service stopped");
                }
            }));
            if config.archive.enabled {
                background.push(crate::archive::spawn_periodic(
                    &config,
                    log.clone(),
                    archive_gate.clone(),
                )?);
            }
            admin = start_admin(&config, &log, archive_gate.clone()).await?;
            info!(
                backend = %config.store.backend,
                data_dir = %config.data_dir.display(),
                "log ready"
            );
            log_handle = Some(log.clone());
            Some(Arc::new(log))
        }
        Role::Archiver => None,
        Role::Gateway => Some(Arc::new(rpc::NatsLogService::new(
            nats.clone(),
            std::time::Duration::from_millis(config.nats.request_timeout_ms),
        ))),
    };

    match (role, service, verifier) {
        (Role::All | Role::Gateway, Some(service), Some(verifier)) => {
            let addr: SocketAddr = config.gateway.listen.parse()?;
            let tls = edge_tls(
                "gateway",
                &config.gateway.tls_cert_file,
                &config.gateway.tls_key_file,
                &[],
            )?;
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("listen on {addr}"))?;
            let shared = Shared::new(
                config.gateway_config(),
                service,
                nats.clone(),
                verifier,
                reconnected,
            );
            let local = listener.local_addr()?;
            announce("gateway", local, tls.is_some(), "wss://", "ws://", "/v1/ws");
            tidings_gateway::run(listener, shared, tls, shutdown_signal()).await;
        }
        _ => {
            eprintln!(
                "tidings: log service on NATS {}",
                tidings_gateway::redact_url(&config.nats.url)
            );
            shutdown_signal().await;
        }
    }

    info!("shutting down");
    if let Some(admin) = admin {
        admin.stop().await;
    }
    for task in background.iter().skip(1) {
        task.abort();
    }
    if let Some(log) = log_handle {
        // Appends already acknowledged are durable. Hand the partitions over at once (other
        // writers need not wait for the leases to expire); the store is released with the
        // last handle.
        if let Err(e) = log.release_leases().await {
            warn!(error = %e, "failed to release the partition leases; they expire on their own");
        }
        drop(log);
    }
    // Give the publisher a moment to hand over what is committed.
    if let Some(publisher) = background.into_iter().next() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), publisher).await;
    }
    // With NATS down a flush would wait for a reconnect that may never come.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), nats.flush()).await;
    Ok(())
}
