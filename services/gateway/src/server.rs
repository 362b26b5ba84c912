//! The gateway's listener and the state its sessions share.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tidings_auth::Verifier;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::hub::{HubConfig, Registry};
use crate::service::LogService;

/// Limits and defaults of the gateway. Every queue and frame is bounded.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Largest WebSocket frame/message accepted; larger ones close the connection (1009).
    pub max_frame_bytes: usize,
    /// Frames queued for one session before it is disconnected as a slow consumer.
    pub outbound_queue: usize,
    /// Events per conversation in a Sync answer when the client does not say.
    pub sync_latest: usize,
    /// Most events or entries one read returns (History, Pull, lists).
    pub read_limit: usize,
    /// Time allowed between connecting and Hello.
    pub hello_timeout: Duration,
    /// Frames a session may send per second, and in a burst.
    pub frames_per_second: u32,
    pub frame_burst: u32,
    /// Origins browsers may connect from ("*" for any); clients without Origin are allowed.
    pub allowed_origins: Vec<String>,
    /// Conversations one session follows at most.
    pub max_conversations_per_session: usize,
    /// How often an idle conversation hub checks the log for events NATS did not bring.
    pub heal_interval: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_frame_bytes: 128 * 1024,
            outbound_queue: 1024,
            sync_latest: 100,
            read_limit: 1000,
            hello_timeout: Duration::from_secs(10),
            frames_per_second: 200,
            frame_burst: 400,
            allowed_origins: Vec::new(),
            max_conversations_per_session: 10_000,
            heal_interval: Duration::from_secs(30),
        }
    }
}

/// What every session of a gateway shares.
pub struct Shared {
    pub cfg: GatewayConfig,
    pub log: Arc<dyn LogService>,
    pub nats: async_nats::Client,
    pub verifier: Verifier,
    pub registry: Registry,
    /// Revoked tokens: checked at Hello; notices end live sessions (`revocation.rs`).
    pub revocations: crate::revocation::Revocations,
    session_ids: AtomicU64,
}

impl Shared {
    pub fn new(
        cfg: GatewayConfig,
        log: Arc<dyn LogService>,
        nats: async_nats::Client,
        verifier: Verifier,
        reconnected: broadcast::Sender<()>,
    ) -> Arc<Shared> {
        let registry = Registry::new(
            log.clone(),
            nats.clone(),
            HubConfig {
                read_limit: cfg.read_limit,
                max_pending: 10_000,
                heal_interval: cfg.heal_interval,
            },
            reconnected,
        );
        Arc::new(Shared {
            cfg,
            log,
            nats,
            verifier,
            registry,
            revocations: crate::revocation::Revocations::default(),
            session_ids: AtomicU64::new(1),
        })
    }

    pub fn next_session_id(&self) -> u64 {
        self.session_ids.fetch_add(1, Ordering::Relaxed)
    }
}

/// Accepts connections until `shutdown` resolves; each is served on its own task.
pub async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "gateway listening on ws://{addr}/v1/ws");
    }
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                // Stop accepting, tell every session why, and give them a moment to go.
                drop(listener);
                let n = shared.registry.close_all(crate::hub::CloseOrder {
                    reason: tidings_schemas::client::CloseReason::ShuttingDown,
                    message: "the server is shutting down; reconnect shortly".into(),
                });
                info!(sessions = n, "gateway stopping");
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while shared.registry.session_count() > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(crate::session::serve(stream, shared.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Connects to NATS, retrying in the background if it is not up yet, reconnecting forever.
/// The returned channel fires on every (re)connection, so hubs can check what they missed.
pub async fn connect_nats(
    url: &str,
    name: &str,
) -> Result<(async_nats::Client, broadcast::Sender<()>), async_nats::ConnectError> {
    let (reconnected, _) = broadcast::channel(16);
    let tx = reconnected.clone();
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((50 * 2u64.saturating_pow(attempts.min(6) as u32)).min(2000))
        })
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        info!("connected to nats");
                        let _ = tx.send(());
                    }
                    async_nats::Event::Disconnected => warn!("disconnected from nats"),
                    other => info!(event = %other, "nats event"),
                }
            }
        })
        .connect(url)
        .await?;
    Ok((client, reconnected))
}
