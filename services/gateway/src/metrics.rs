//! The gateway's metrics (Prometheus names, no tenant or conversation labels; see
//! [`tidings_log_api::metrics`]). Figures the gateway's state already holds (sessions, hubs,
//! admission refusals) are read at scrape time by [`crate::shared::Shared::collector`].

use tidings_log_api::metrics::{Counter, Histogram, LATENCY_BUCKETS, LabeledCounter, Text};

/// From a Send frame read to its ack (or refusal) queued: what a sender waits, less the
/// network.
pub static SEND_SECONDS: Histogram = Histogram::new(
    "tidings_gateway_send_seconds",
    "Time from reading a Send frame to queuing its SendAck or error (the ack latency).",
    LATENCY_BUCKETS,
);
/// From an event's commit (its server time) to its frame queued to the sessions of a hub.
pub static FANOUT_SECONDS: Histogram = Histogram::new(
    "tidings_gateway_fanout_seconds",
    "Time from an event's commit (server_time_ms) to its push queued to the conversation's \
     sessions on this gateway.",
    LATENCY_BUCKETS,
);
/// Requests refused as rate limited: by the session's frame bucket, or by the log's
/// per-sender limits.
pub static RATE_LIMITED: LabeledCounter = LabeledCounter::new(
    "tidings_gateway_rate_limited_total",
    "Requests answered RATE_LIMITED: `frames` by the session's frame bucket, `search` by \
     its search bucket, `log` by the log's limits.",
    "limit",
    &["frames", "search", "log"],
);
/// A Search op, from its frame to its page (the log's work included).
pub static SEARCH_SECONDS: Histogram = Histogram::new(
    "tidings_gateway_search_seconds",
    "Time of one Search op: limits checked, the log's page searched (through NATS or not).",
    LATENCY_BUCKETS,
);
/// Sessions authenticated (Hello accepted) since start.
pub static SESSIONS_OPENED: Counter = Counter::new(
    "tidings_gateway_sessions_opened_total",
    "Sessions whose Hello was accepted.",
);

/// Hellos sent to another cell: the tenant is homed there (cells).
pub static CELL_REDIRECTS: Counter = Counter::new(
    "tidings_gateway_cell_redirects_total",
    "Sessions refused at Hello with WRONG_CELL and the URL of the tenant's home cell.",
);

/// The member cache's size, bound and what it answered (`members.rs`).
pub(crate) fn write_member_cache(out: &mut Text, m: &crate::members::MemberCacheStats) {
    out.gauge(
        "tidings_gateway_member_cache_bytes",
        "Bytes of membership answers and member lists the gateway holds.",
        m.bytes as f64,
    );
    out.gauge(
        "tidings_gateway_member_cache_max_bytes",
        "The member cache's bound (gateway.member_cache_bytes).",
        m.max_bytes as f64,
    );
    out.gauge(
        "tidings_gateway_member_lists",
        "Complete member lists held (pages and prefix searches answered from memory).",
        m.lists as f64,
    );
    out.header(
        "tidings_gateway_member_cache_evictions_total",
        "Dropped to stay within the bound: `list` a conversation's member list, `answers` \
         every remembered membership answer.",
        "counter",
    );
    for (what, n) in [("list", m.list_evictions), ("answers", m.answer_clears)] {
        out.sample(
            "tidings_gateway_member_cache_evictions_total",
            &[("what", what)],
            n as f64,
        );
    }
    out.header(
        "tidings_gateway_member_cache_requests_total",
        "Membership checks (`check`) and member pages or prefix searches (`page`), answered \
         from memory or asked of the log.",
        "counter",
    );
    for (kind, from, n) in [
        ("check", "memory", m.hits),
        ("check", "log", m.misses),
        ("page", "memory", m.page_hits),
        ("page", "log", m.page_misses),
    ] {
        out.sample(
            "tidings_gateway_member_cache_requests_total",
            &[("kind", kind), ("from", from)],
            n as f64,
        );
    }
}
