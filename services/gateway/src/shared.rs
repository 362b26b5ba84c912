//! The state every session of a gateway shares, and the metrics read from it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tidings_auth::Verifier;
use tidings_log_api::metrics::{Collector, Text};
use tidings_log_api::service::LogService;

use crate::GatewayConfig;
use crate::admission::{Admission, Limits};
use crate::hub::{HubConfig, Registry};
use crate::metrics;

/// What every session of a gateway shares.
pub struct Shared {
    pub cfg: GatewayConfig,
    pub log: Arc<dyn LogService>,
    pub nats: async_nats::Client,
    pub verifier: Verifier,
    pub registry: Registry,
    pub admission: Admission,
    /// Revoked tokens: checked at Hello; notices end live sessions (`revocation_watch.rs`).
    pub revocations: crate::revocation::Revocations,
    /// What `/readyz` on this listener reports (set by the process that owns the probes).
    pub health: std::sync::OnceLock<tidings_log_api::health::Health>,
    /// The web client's development sign-in; set only in HS256 development mode.
    pub dev_tokens: std::sync::OnceLock<crate::web::DevTokens>,
    /// Conversations the log is limiting: their sends are refused here until the window
    /// ends (`shed.rs`).
    pub shed: crate::shed::EdgeShed,
    session_ids: AtomicU64,
}

impl Shared {
    pub fn new(
        cfg: GatewayConfig,
        log: Arc<dyn LogService>,
        nats: async_nats::Client,
        verifier: Verifier,
        bus: tidings_log_api::nats::BusEvents,
    ) -> Arc<Shared> {
        let registry = Registry::new(
            log.clone(),
            nats.clone(),
            HubConfig {
                read_limit: cfg.read_limit,
                max_pending: 10_000,
                heal_interval: cfg.heal_interval,
                member_cache_bytes: cfg.member_cache_bytes,
                member_fill_page: cfg.member_fill_page,
                fan_out_pushes_per_sec: cfg.fan_out_pushes_per_core.saturating_mul(
                    std::thread::available_parallelism().map_or(1, |n| n.get()) as u64,
                ),
                fan_out_paced_sessions: cfg.fan_out_paced_sessions,
            },
            bus,
        );
        let admission = Admission::new(Limits {
            max_connections: cfg.max_connections,
            max_connections_per_ip: cfg.max_connections_per_ip,
            max_sessions_per_user: cfg.max_sessions_per_user,
        });
        Arc::new(Shared {
            admission,
            cfg,
            log,
            nats,
            verifier,
            registry,
            revocations: crate::revocation::Revocations::default(),
            health: std::sync::OnceLock::new(),
            dev_tokens: std::sync::OnceLock::new(),
            shed: crate::shed::EdgeShed::default(),
            session_ids: AtomicU64::new(1),
        })
    }

    pub fn next_session_id(&self) -> u64 {
        self.session_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// The gateway's metrics ([`crate::metrics`]), static and read from this state at
    /// scrape time.
    pub fn collector(self: &Arc<Self>) -> Collector {
        let shared = Arc::downgrade(self);
        Arc::new(move |out: &mut Text| {
            metrics::SEND_SECONDS.write(out);
            metrics::FANOUT_SECONDS.write(out);
            metrics::RATE_LIMITED.write(out);
            metrics::SEARCH_SECONDS.write(out);
            metrics::SESSIONS_OPENED.write(out);
            metrics::CELL_REDIRECTS.write(out);
            let Some(shared) = shared.upgrade() else {
                return;
            };
            out.gauge(
                "tidings_gateway_sessions",
                "Sessions open on this gateway.",
                shared.registry.session_count() as f64,
            );
            out.gauge(
                "tidings_gateway_hubs",
                "Conversation hubs (conversations with a session) on this gateway.",
                shared.registry.hub_count() as f64,
            );
            out.header(
                "tidings_gateway_fanout_paced_seconds_total",
                "Time big groups' fan-outs waited for the gateway's pacing budget \
             (gateway.fan_out_pushes_per_core), summed over their slices.",
                "counter",
            );
            out.sample(
                "tidings_gateway_fanout_paced_seconds_total",
                &[],
                shared.registry.fan_out_paced_seconds(),
            );
            metrics::write_member_cache(out, &shared.registry.members().stats());
            let refused = shared.admission.refused();
            out.header(
                "tidings_gateway_admission_refused_total",
                "Connections or sessions refused over a cap.",
                "counter",
            );
            for (cap, n) in [
                ("global", &refused.global),
                ("per_ip", &refused.per_ip),
                ("per_user", &refused.per_user),
            ] {
                out.sample(
                    "tidings_gateway_admission_refused_total",
                    &[("cap", cap)],
                    n.load(Ordering::Relaxed) as f64,
                );
            }
        })
    }
}
