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
use futures_util::TryFutureExt;
use tidings_auth::{AuthConfig, Ed25519Key, Jwks, Verifier};
use tidings_gateway::Shared;
use tidings_log_api::LogService;
use tidings_log_api::health::{Health, link_probe};
use tidings_log_api::nats::BusEvents;
use tidings_log_api::rpc::NatsLogService;
use tidings_log_role::{publisher, rpc_server as rpc};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::cli::Role;
use crate::config::Config;
use crate::supervise::{self, Supervisor};

/// The token verifiers of one process: one per plane, all reading the same keys.
pub struct Verifiers {
    /// The gateway's: the chat audience, never the compliance one.
    pub chat: Verifier,
    /// The admin listener's: the compliance audience, never the chat one.
    pub admin: Verifier,
    /// The log service's, for the users' tokens on calls from gateways: the chat audience.
    pub rpc: Verifier,
    /// The JWKS file all read, when configured (see [`watch_jwks`]).
    pub jwks: Option<Arc<Jwks>>,
}

/// The HS256 secret, only when `auth.hs256_enabled`: the file's presence alone enables
/// nothing.
pub fn hs256_secret(config: &Config) -> anyhow::Result<Option<Vec<u8>>> {
    let a = &config.auth;
    if !a.hs256_enabled {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&a.hs256_secret_file).with_context(|| {
        format!(
            "auth.hs256_enabled is set but the HS256 secret {} cannot be read \
             (`tidings keys init` writes one)",
            a.hs256_secret_file.display()
        )
    })?;
    let secret = tidings_log::crypto::hex_decode(text.trim())
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("read the HS256 secret in {}", a.hs256_secret_file.display()))?;
    Ok(Some(secret))
}

/// Reads the token verification keys from the config.
pub fn verifiers(config: &Config) -> anyhow::Result<Verifiers> {
    let a = &config.auth;
    let hs256_secret = hs256_secret(config)?;
    let mut keys = Vec::new();
    for entry in &a.ed25519_public_keys {
        let (kid, hex) = match entry.split_once(':') {
            Some((kid, hex)) => (Some(kid.to_string()), hex),
            None => (None, entry.as_str()),
        };
        let bytes = tidings_log::crypto::hex_decode(hex)
            .map_err(anyhow::Error::msg)
            .context("auth.ed25519_public_keys")?;
        let public_key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("an Ed25519 public key is 32 bytes (64 hex digits)"))?;
        keys.push(Ed25519Key { kid, public_key });
    }
    let jwks = if a.jwks_file.as_os_str().is_empty() {
        None
    } else {
        Some(Arc::new(
            Jwks::load(&a.jwks_file).context("auth.jwks_file")?,
        ))
    };
    if hs256_secret.is_none() && keys.is_empty() && jwks.is_none() {
        anyhow::bail!(
            "no token keys: set auth.ed25519_public_keys or auth.jwks_file, or for development \
             auth.hs256_enabled = true (TIDINGS_AUTH_HS256_ENABLED=1) with the secret \
             `tidings keys init` writes to {}",
            a.hs256_secret_file.display()
        );
    }
    let build = |audience: &str, refused: &str| {
        Verifier::new(AuthConfig {
            issuer: a.issuer.clone(),
            audience: audience.to_owned(),
            refused_audiences: vec![refused.to_owned()],
            hs256_secret: hs256_secret.clone(),
            ed25519_public_keys: keys.clone(),
            jwks: jwks.clone(),
            leeway_secs: a.leeway_secs,
            max_lifetime_secs: a.max_token_lifetime_secs,
        })
    };
    // Bots chat (gateway and log RPC) but never reach the admin plane.
    let bot_key = config.bot_public_key()?;
    let with_bots = |verifier: Verifier| match &bot_key {
        Some(key) => verifier.with_bot_key(key),
        None => Ok(verifier),
    };
    Ok(Verifiers {
        chat: with_bots(build(&a.audience, &a.compliance_audience)?)?,
        admin: build(&a.compliance_audience, &a.audience)?,
        rpc: with_bots(build(&a.audience, &a.compliance_audience)?)?,
        jwks,
    })
}

/// Re-reads the JWKS file every `auth.jwks_poll_ms` when it changed; a broken file keeps the
/// keys in use and is reported once.
pub fn watch_jwks(jwks: Arc<Jwks>, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut timer = tokio::time::interval(every);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            timer.tick().await;
            let reload = {
                let jwks = jwks.clone();
                tokio::task::spawn_blocking(move || jwks.reload_if_changed()).await
            };
            match reload {
                Ok(Ok(None)) => {}
                Ok(Ok(Some(keys))) => {
                    info!(path = %jwks.path().display(), keys, "JWKS file reloaded");
                }
                Ok(Err(e)) => warn!(
                    path = %jwks.path().display(),
                    error = %e,
                    "JWKS file not reloaded; the keys loaded before stay in use"
                ),
                Err(e) => warn!(error = %e, "JWKS reload task failed"),
            }
        }
    })
}

/// The admin listener, unless `admin.listen` is empty. It takes admin-plane tokens only
/// (the compliance audience), checked against the revocation records like the gateway's.
async fn start_admin(
    config: &Config,
    log: &tidings_log::Log,
    archive_gate: Arc<tokio::sync::RwLock<()>>,
    verifier: Verifier,
    nats: async_nats::Client,
    health: Health,
    cells: Option<Arc<crate::cells::Link>>,
) -> anyhow::Result<Option<crate::admin::Admin>> {
    if config.admin.listen.is_empty() {
        return Ok(None);
    }
    let compliance = tidings_archive::compliance::Compliance::new(
        log.store().clone(),
        log.keyring().clone(),
        Some(crate::archive::objects(config)?),
        archive_gate.clone(),
    );
    let archive = crate::admin::Archive {
        archiver: Arc::new(crate::archive::archiver(config, log)?.with_gate(archive_gate)),
        objects: crate::archive::objects(config)?,
    };
    let services = crate::admin::Services {
        verifier,
        compliance,
        log: log.clone(),
        nats: Some(nats),
        archive: Some(archive),
        spool: config.data_dir.join("export-spool"),
        chat_audience: config.auth.audience.clone(),
        webhooks: config.webhooks.clone(),
        cells,
    };
    admin_listener(config, health, Some(services)).await
}

/// The admin listener on `admin.listen` (unless empty), over TLS when `admin` names a
/// certificate: with the compliance plane's `services`, or without (the archiver: health,
/// readiness and metrics only, for it verifies no tokens).
async fn admin_listener(
    config: &Config,
    health: Health,
    services: Option<crate::admin::Services>,
) -> anyhow::Result<Option<crate::admin::Admin>> {
    if config.admin.listen.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = config.admin.listen.parse()?;
    let tls = edge_tls(
        "admin",
        &config.admin.tls_cert_file,
        &config.admin.tls_key_file,
        ADMIN_ALPN,
    )?;
    let secure = tls.is_some();
    let only = if services.is_none() {
        " (health, readiness and metrics only)"
    } else {
        ""
    };
    let admin = crate::admin::Admin::start(addr, tls, health, services)
        .await
        .with_context(|| format!("admin listener on {addr}"))?;
    announce(
        "admin",
        admin.local_addr(),
        secure,
        "https://",
        "http://",
        only,
    );
    Ok(Some(admin))
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
) -> anyhow::Result<(async_nats::Client, BusEvents)> {
    let role_name = match role {
        Role::All => "all",
        Role::Log => "log",
        Role::Gateway => "gateway",
        Role::Archiver => "archiver",
    };
    crate::nats_init::connect(config, role_name).await
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
    crate::metrics::register_process();
    let health = Health::default();
    let supervisor = Supervisor::new(health.clone());
    if role == Role::Archiver {
        // The archiver never writes through the sequencer: it leaves the partitions to the
        // log writers.
        let log = crate::open::open_log_owning(&config, None, false, None).await?;
        let archiver = crate::archive::spawn_periodic(&config, log, Arc::default())?;
        supervisor.essential("archiver", supervise::owned(archiver));
        eprintln!("tidings: archiver every {}", config.archive.interval);
        let operations = admin_listener(&config, health, None).await?;
        let fatal = tokio::select! {
            _ = shutdown_signal() => None,
            reason = supervisor.fatal() => Some(reason),
        };
        if let Some(operations) = operations {
            operations.stop().await;
        }
        supervisor.shutdown().await;
        return fatal.map_or(Ok(()), |reason| Err(anyhow::anyhow!(reason)));
    }
    // Every role but the archiver verifies tokens: the gateway its sessions', the log
    // service those on calls from gateways (a NATS credential alone never writes as anyone),
    // the admin listener the compliance plane's. One set of keys, three audiences' checks.
    let verifiers = verifiers(&config).context(
        "token keys ([auth]; the log service checks the users' tokens on calls from gateways)",
    )?;
    if verifiers.chat.hs256_enabled() {
        eprintln!(
            "tidings: HS256 development tokens are accepted (auth.hs256_enabled); \
             never in production"
        );
    }
    if let Some(jwks) = verifiers.jwks {
        let every = std::time::Duration::from_millis(config.auth.jwks_poll_ms);
        supervisor.essential("jwks reload", supervise::owned(watch_jwks(jwks, every)));
    }
    let rpc_auth = match role {
        Role::All | Role::Log => Some(rpc::RpcAuth::new(verifiers.rpc)),
        _ => None,
    };
    let admin_verifier = verifiers.admin;
    let verifier = match role {
        Role::Log => None,
        _ => Some(verifiers.chat),
    };
    // A gateway apart from the log pins the log's identity, so whoever can publish on NATS
    // cannot hand it transport keys of their own making.
    let pinned_log = config.log_public_key()?;
    if role == Role::Gateway && pinned_log.is_none() {
        anyhow::bail!(
            "--role gateway needs gateway.log_public_key (TIDINGS_GATEWAY_LOG_PUBLIC_KEY): \
             run `tidings keys log-identity` where the master key is and copy its output"
        );
    }
    let (nats, bus) = connect_nats(&config, role).await?;
    health.register("nats", link_probe(bus.link.subscribe()));

    // Held shared by compliance reads and exclusively by an archive pass, so a read never
    // sees events halfway between the tiers; made here, once per process, for both.
    let archive_gate = Arc::new(tokio::sync::RwLock::new(()));
    let mut log_handle = None;
    let mut admin = None;
    let mut publisher = None;
    let service: Option<Arc<dyn LogService>> = match role {
        Role::All | Role::Log => {
            let (feed_tx, feed_rx) = tokio::sync::mpsc::channel(64 * 1024);
            let log =
                crate::open::open_log_with_feed(&config, Some(feed_tx.clone()), Some(nats.clone()))
                    .await?;
            crate::metrics::register_log(&log, &feed_tx);
            drop(feed_tx);
            let rules = config.intercept_rules()?;
            if !rules.is_empty() {
                let count = rules.len();
                let hooks = std::sync::Arc::new(crate::intercept::NatsHooks {
                    client: nats.clone(),
                });
                let interceptors = tidings_log::interceptor::Interceptors::new(rules, hooks)
                    .map_err(|e| anyhow::anyhow!("log.interceptors: {e}"))?;
                log.set_interceptors(interceptors);
                eprintln!("tidings: {count} interceptor rule(s) check users' messages");
            }
            // A panic in the sequencer is fatal: the log takes no writes after it.
            let mut failure = log.sequencer_failure();
            supervisor.essential("sequencer", async move {
                let reason = match failure.wait_for(Option::is_some).await {
                    Ok(reason) => reason.clone(),
                    // The log is gone (shutdown): nothing to watch.
                    Err(_) => None,
                };
                let Some(reason) = reason else {
                    return std::future::pending().await;
                };
                Err(supervise::Stopped(format!("panicked: {reason}")).into())
            });
            // The publisher owns the feed: it cannot be made again without losing what it
            // holds, so it is not restarted; it runs until the feed closes at shutdown and
            // is awaited then, to hand over what is committed.
            let stats = Arc::new(publisher::PublisherStats::default());
            crate::metrics::register_publisher(&stats);
            health.register(
                "publisher",
                publisher::probe(stats.clone(), bus.link.subscribe()),
            );
            publisher = Some(tokio::spawn(publisher::run(
                nats.clone(),
                feed_rx,
                log.keyring().clone(),
                config.publisher_config(),
                bus.link.subscribe(),
                stats,
            )));
            // The hot search index's indexer: restartable (its queue outlives it), and
            // holding the log weakly so shutdown is not held up.
            if log.indexer().is_some() {
                let index_log = log.downgrade();
                supervisor.restarting("search indexer", move || {
                    tidings_log::hot_indexer::run_indexer(index_log.clone())
                        .map_err(anyhow::Error::from)
                });
            }
            let auth = rpc_auth
                .clone()
                .context("the log service has its token check")?;
            let (rpc_nats, rpc_log, in_flight, lost) = (
                nats.clone(),
                log.clone(),
                config.nats.rpc_in_flight,
                bus.lost.clone(),
            );
            supervisor.restarting("log service", move || {
                rpc::serve_watched(
                    rpc_nats.clone(),
                    rpc_log.clone(),
                    auth.clone(),
                    in_flight,
                    lost.subscribe(),
                )
                .map_err(anyhow::Error::from)
            });
            if config.webhooks.enabled {
                // Restarted on failure like the log service: its state is in the KV (cursors)
                // and in JetStream (the consumers), so a new run resumes where the last left.
                let dispatcher = crate::webhooks::dispatch::Dispatcher::new(
                    log.clone(),
                    nats.clone(),
                    config.webhooks.clone(),
                )?;
                supervisor.restarting("webhooks", move || dispatcher.clone().run());
            }
            if config.archive.enabled {
                let archiver =
                    crate::archive::spawn_periodic(&config, log.clone(), archive_gate.clone())?;
                supervisor.essential("archiver", supervise::owned(archiver));
            }
            let cells = if config.cell.enabled() {
                let link = crate::cells::Link::connect(&config.cell, log.clone()).await?;
                // Each restarted on failure: their state is in the KV (outbox, marks,
                // directory) and in JetStream (the replica stream and its consumer).
                for task in crate::cells::Task::ALL {
                    let link = link.clone();
                    supervisor.restarting(task.name(), move || link.clone().run(task));
                }
                eprintln!(
                    "tidings: cell {} with peers [{}]",
                    config.cell.name,
                    config
                        .cell
                        .peers
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                Some(link)
            } else {
                None
            };
            admin = start_admin(
                &config,
                &log,
                archive_gate.clone(),
                admin_verifier,
                nats.clone(),
                health.clone(),
                cells,
            )
            .await?;
            info!(
                backend = %config.store.backend,
                data_dir = %config.data_dir.display(),
                "log ready"
            );
            log_handle = Some(log.clone());
            Some(Arc::new(log))
        }
        Role::Archiver => None,
        Role::Gateway => Some(Arc::new(NatsLogService::new(
            nats.clone(),
            std::time::Duration::from_millis(config.nats.request_timeout_ms),
            pinned_log.context("checked above")?,
        ))),
    };

    // Ends on a signal, or on a fatal task failure (then `serve` fails with its reason).
    let stop = {
        let supervisor = supervisor.clone();
        async move {
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = supervisor.fatal() => {}
            }
        }
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
                bus.clone(),
            );
            if let Some(log) = &log_handle {
                shared.revocations.set_store(Arc::new(log.clone()));
            }
            tidings_log::metrics::register("gateway", shared.collector());
            let _ = shared.health.set(health.clone());
            if let Some(secret) = hs256_secret(&config)? {
                // The web client's development sign-in (loopback clients only).
                let _ = shared.dev_tokens.set(tidings_gateway::web::DevTokens {
                    secret,
                    issuer: config.auth.issuer.clone(),
                    audience: config.auth.audience.clone(),
                    ttl_secs: config.auth.max_token_lifetime_secs.min(12 * 3600),
                });
            }
            let registry = shared.registry.clone();
            health.register(
                "subscriptions",
                Arc::new(move || match registry.missing_subscriptions() {
                    0 => None,
                    n => Some(format!(
                        "{n} conversation or user subscriptions being made again"
                    )),
                }),
            );
            let recheck = std::time::Duration::from_secs(config.auth.revocation_recheck_secs);
            supervisor.essential(
                "revocations",
                supervise::owned(tidings_gateway::revocation_watch::spawn(
                    shared.clone(),
                    recheck,
                )),
            );
            let local = listener.local_addr()?;
            announce("gateway", local, tls.is_some(), "wss://", "ws://", "/v1/ws");
            let scheme = if tls.is_some() { "https" } else { "http" };
            eprintln!("tidings: web client at {scheme}://{local}/app/, metrics at /metrics");
            tidings_gateway::run(listener, shared, tls, stop).await;
        }
        _ => {
            eprintln!(
                "tidings: log service on NATS {}",
                tidings_log_api::nats::redact_url(&config.nats.url)
            );
            stop.await;
        }
    }

    let fatal = supervisor.fatal_now();
    match &fatal {
        Some(reason) => eprintln!("tidings: stopping: {reason}"),
        None => info!("shutting down"),
    }
    supervisor.shutdown().await;
    if let Some(admin) = admin {
        admin.stop().await;
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
    if let Some(publisher) = publisher {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), publisher).await;
    }
    // With NATS down a flush would wait for a reconnect that may never come.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), nats.flush()).await;
    match fatal {
        Some(reason) => Err(anyhow::anyhow!(reason)),
        None => Ok(()),
    }
}
