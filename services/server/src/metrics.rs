//! The metrics of `tidings serve` that belong to no library: the archiver's passes and the
//! admin listener's requests, and the collectors that read a running log, publisher and
//! gateway at scrape time. `/metrics` (admin listener, and the gateway's listener) answers
//! [`tidings_log::metrics::render`]; names and rules are in [`tidings_log::metrics`] and
//! docs/metrics.md.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tidings_log::metrics::{
    self, Counter, Histogram, LATENCY_BUCKETS, LabeledCounter, TASK_BUCKETS, Text,
};
use tidings_log::{FeedItem, Log};
use tidings_log_role::publisher::PublisherStats;

/// Archive passes of `serve`'s archiver, by outcome.
pub static ARCHIVE_PASSES: LabeledCounter = LabeledCounter::new(
    "tidings_archive_passes_total",
    "Archive passes run by the periodic archiver, by outcome.",
    "outcome",
    &["ok", "failed"],
);
pub static ARCHIVE_PASS_SECONDS: Histogram = Histogram::new(
    "tidings_archive_pass_seconds",
    "Time of one archive pass (successful or not).",
    TASK_BUCKETS,
);
pub static ARCHIVED_EVENTS: Counter = Counter::new(
    "tidings_archive_events_archived_total",
    "Events moved from the hot log to archive segments.",
);
/// Unix time of the last successful pass (0: none yet): `time() - this` is how far behind
/// the archive is, the figure the alert rules watch.
static ARCHIVE_LAST_SUCCESS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Records one pass of the periodic archiver.
pub fn archive_pass(seconds: f64, archived: Option<u64>) {
    ARCHIVE_PASS_SECONDS.observe(seconds);
    match archived {
        Some(n) => {
            ARCHIVE_PASSES.inc("ok");
            ARCHIVED_EVENTS.add(n);
            ARCHIVE_LAST_SUCCESS.store(tidings_log_api::now_secs(), Ordering::Relaxed);
        }
        None => ARCHIVE_PASSES.inc("failed"),
    }
}

fn write_archive(out: &mut Text) {
    ARCHIVE_PASSES.write(out);
    ARCHIVE_PASS_SECONDS.write(out);
    ARCHIVED_EVENTS.write(out);
    out.gauge(
        "tidings_archive_last_success_timestamp_seconds",
        "Unix time of the last successful archive pass (0: none since start).",
        ARCHIVE_LAST_SUCCESS.load(Ordering::Relaxed) as f64,
    );
}

/// Cells (`crate::cells`): replication between a tenant's home and DR cells.
pub static CELL_REPLICATED: Counter = Counter::new(
    "tidings_cell_replicas_sent_total",
    "Replica batches (one commit's writes of one replicated tenant) the DR cell acknowledged.",
);
pub static CELL_PUBLISH_FAILURES: Counter = Counter::new(
    "tidings_cell_replica_send_failures_total",
    "Replica batches the DR cell did not take (unreachable, no answer in time); retried.",
);
pub static CELL_APPLIED: Counter = Counter::new(
    "tidings_cell_replicas_applied_total",
    "Replica batches applied here as a DR cell.",
);
pub static CELL_REFUSED: Counter = Counter::new(
    "tidings_cell_replicas_refused_total",
    "Replica batches this cell refused to apply (not its tenant to replicate, undecodable).",
);
pub static CELL_LOST: Counter = Counter::new(
    "tidings_cell_lost_events_total",
    "Events acknowledged here as the tenant's home that never reached the cell that took it \
     over (an unplanned failover); kept for `tidings cell lost`.",
);
pub static CELL_ARRIVED: Counter = Counter::new(
    "tidings_cell_arrived_events_total",
    "Events an old home found waiting in its outbox for a tenant that moved, which the cell \
     that took it over had applied (handed over just before the old home went down): \
     dropped, not lost.",
);
pub static CELL_LAG_SECONDS: Histogram = Histogram::new(
    "tidings_cell_replication_lag_seconds",
    "From a replicated commit in the home cell to its replica applied here.",
    LATENCY_BUCKETS,
);

/// How long the oldest outbox row has waited for its DR cell, as of the relay's last pass.
pub static CELL_OUTBOX_AGE_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn write_cells(out: &mut Text) {
    CELL_REPLICATED.write(out);
    CELL_PUBLISH_FAILURES.write(out);
    CELL_APPLIED.write(out);
    CELL_REFUSED.write(out);
    CELL_LOST.write(out);
    CELL_ARRIVED.write(out);
    CELL_LAG_SECONDS.write(out);
    out.gauge(
        "tidings_cell_outbox_age_seconds",
        "How long the oldest replica waiting for its DR cell has waited (0: none); it grows \
         while the DR cell or the link is down.",
        CELL_OUTBOX_AGE_MS.load(Ordering::Relaxed) as f64 / 1000.0,
    );
}

/// Requests to the admin listener, by route.
pub static ADMIN_REQUESTS: LabeledCounter = LabeledCounter::new(
    "tidings_admin_requests_total",
    "Requests to the admin listener, by route.",
    "route",
    &[
        "healthz",
        "readyz",
        "metrics",
        "search",
        "export",
        "audit_read",
        "holds",
        "hold_release",
        "token_revoke",
        "console",
        "rotate",
        "wrap",
        "shred",
        "archive_run",
        "archive_verify",
        "webhooks",
        "bots",
        "cells",
        "other",
    ],
);
/// Answers of the admin listener that refused or failed, by status class.
pub static ADMIN_REFUSED: LabeledCounter = LabeledCounter::new(
    "tidings_admin_refused_total",
    "Admin requests not served: 401 unauthenticated, 403 forbidden, 400 invalid, 503 busy \
     or unavailable, other.",
    "status",
    &["401", "403", "400", "503", "other"],
);
/// Compliance searches and audit reads that ran, by how they ended.
pub static COMPLIANCE_QUERIES: LabeledCounter = LabeledCounter::new(
    "tidings_compliance_queries_total",
    "Compliance searches and audit reads run, by outcome (complete or failed midway).",
    "outcome",
    &["complete", "failed"],
);

fn write_admin(out: &mut Text) {
    ADMIN_REQUESTS.write(out);
    ADMIN_REFUSED.write(out);
    COMPLIANCE_QUERIES.write(out);
}

/// Webhook events answered 2xx by their receiver.
pub static WEBHOOK_DELIVERED: Counter = Counter::new(
    "tidings_webhook_delivered_total",
    "Webhook events delivered (answered 2xx).",
);
/// Webhook tries that failed and were tried again.
pub static WEBHOOK_RETRIES: Counter = Counter::new(
    "tidings_webhook_retries_total",
    "Webhook requests retried after a failure (non-2xx, timeout, unreachable).",
);
/// Webhook events given up on after their subscription's max attempts.
pub static WEBHOOK_DEAD_LETTERS: Counter = Counter::new(
    "tidings_webhook_dead_letters_total",
    "Webhook events dead-lettered after the subscription's max attempts.",
);
/// Webhook workers that panicked (each made again).
pub static WEBHOOK_WORKER_PANICS: Counter = Counter::new(
    "tidings_webhook_worker_panics_total",
    "Webhook delivery workers that panicked (each is made again).",
);
/// Event commit to the receiver's 2xx, retries included.
pub static WEBHOOK_DELIVERY_SECONDS: Histogram = Histogram::new(
    "tidings_webhook_delivery_seconds",
    "Event commit (server_time_ms) to the webhook receiver's 2xx answer, retries included.",
    LATENCY_BUCKETS,
);

/// What a running dispatcher reports at scrape time: workers running, and the commit time
/// (ms) of the oldest event being delivered, if any.
pub type WebhookProbe = Arc<dyn Fn() -> (usize, Option<i64>) + Send + Sync>;

fn write_webhook_counters(out: &mut Text) {
    WEBHOOK_DELIVERED.write(out);
    WEBHOOK_RETRIES.write(out);
    WEBHOOK_DEAD_LETTERS.write(out);
    WEBHOOK_WORKER_PANICS.write(out);
    WEBHOOK_DELIVERY_SECONDS.write(out);
}

/// The dispatcher's gauges: subscriptions delivering here, and the lag (now − commit time
/// of the oldest event being delivered; 0 when idle).
pub fn register_webhooks(probe: WebhookProbe) {
    metrics::register(
        "webhooks dispatcher",
        Arc::new(move |out: &mut Text| {
            let (workers, oldest) = probe();
            out.gauge(
                "tidings_webhook_subscriptions",
                "Webhook subscriptions this process delivers.",
                workers as f64,
            );
            let lag = oldest.map_or(0.0, |t| (tidings_log::now_ms() - t).max(0) as f64 / 1000.0);
            out.gauge(
                "tidings_webhook_lag_seconds",
                "Now minus the commit time of the oldest webhook event being delivered (0: \
                 none in flight).",
                lag,
            );
        }),
    );
}

/// Registers what every role has: the process-wide families of the libraries and of
/// `serve` (each family appears whether or not the role moves it, so dashboards and
/// alerts see a zero, not a gap).
pub fn register_process() {
    metrics::register("log", Arc::new(metrics::write_log_metrics));
    metrics::register("archive", Arc::new(write_archive));
    metrics::register("admin", Arc::new(write_admin));
    metrics::register("webhooks", Arc::new(write_webhook_counters));
    metrics::register("cells", Arc::new(write_cells));
}

/// The figures a running log holds: its sequencer queue, group commit counters, the commit
/// feed and the send buffer. Holds the log weakly: scraping never keeps it open.
pub fn register_log(log: &Log, feed: &tokio::sync::mpsc::Sender<FeedItem>) {
    let log = log.downgrade();
    let feed = feed.downgrade();
    metrics::register(
        "log instance",
        Arc::new(move |out: &mut Text| {
            let Some(log) = log.upgrade() else {
                return;
            };
            let (commits, requests) = log.stats();
            out.counter(
                "tidings_log_commits_total",
                "Store commits of the sequencer (each one fsync).",
                &[],
                commits,
            );
            out.counter(
                "tidings_log_requests_total",
                "Requests the sequencer answered.",
                &[],
                requests,
            );
            out.gauge(
                "tidings_log_sequencer_queue",
                "Requests waiting for the sequencer.",
                log.queued() as f64,
            );
            out.counter(
                "tidings_log_feed_dropped_total",
                "Commit feed items dropped because the feed was full (delivery heals them \
                 from the log).",
                &[],
                log.feed_dropped(),
            );
            let buffer = log.send_buffer_stats().unwrap_or_default();
            out.gauge(
                "tidings_log_send_buffer_events",
                "Events acked from the send buffer and not yet in the store (a store outage).",
                buffer.events as f64,
            );
            out.gauge(
                "tidings_log_send_buffer_bytes",
                "Bytes the send buffer holds.",
                buffer.bytes as f64,
            );
            out.counter(
                "tidings_log_send_buffer_replayed_total",
                "Events replayed from the send buffer into the store.",
                &[],
                buffer.replayed,
            );
            let o = log.overload_stats();
            let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            out.counter(
                "tidings_log_overload_admitted_total",
                "Users' appends the admission control let through while it was on.",
                &[],
                get(&o.admitted),
            );
            out.header(
                "tidings_log_overload_limited_total",
                "Users' appends refused RATE_LIMITED past the writer's capacity, by tenant tier.",
                "counter",
            );
            for (tier, c) in [("standard", &o.limited_standard), ("vip", &o.limited_vip)] {
                out.sample(
                    "tidings_log_overload_limited_total",
                    &[("tier", tier)],
                    get(c) as f64,
                );
            }
            out.counter(
                "tidings_log_overload_limited_by_fanout_total",
                "Of the refused appends, those whose allowance the fan-out budget set \
                 (log.overload_fanout_per_sec: pushes a second).",
                &[],
                get(&o.limited_by_fanout),
            );
            out.counter(
                "tidings_log_overload_limiting_windows_total",
                "One-second windows in which the admission control limited something.",
                &[],
                get(&o.limiting_windows),
            );
            if let Some(indexer) = log.indexer() {
                let s = &indexer.stats;
                out.gauge(
                    "tidings_log_search_index_queue",
                    "Commit notices waiting for the hot search indexer.",
                    indexer.queued() as f64,
                );
                out.gauge(
                    "tidings_log_search_index_lag_seconds",
                    "Commit-to-index lag of the last event the hot search indexer indexed.",
                    s.lag_ms.load(Ordering::Relaxed).max(0) as f64 / 1000.0,
                );
                out.counter(
                    "tidings_log_search_indexed_total",
                    "Events the hot search indexer indexed.",
                    &[],
                    s.indexed_events.load(Ordering::Relaxed),
                );
                out.counter(
                    "tidings_log_search_index_dropped_total",
                    "Notices dropped because the indexer's queue was full (the next commit \
                     of the conversation heals them; search opens unindexed events itself).",
                    &[],
                    s.dropped.load(Ordering::Relaxed),
                );
                out.counter(
                    "tidings_log_search_index_plain_dropped_total",
                    "Committed events not handed to the hot search indexer in the clear (its \
                     byte-bounded queue was full): it read and opened them from the store.",
                    &[],
                    s.plain_dropped.load(Ordering::Relaxed),
                );
                out.counter(
                    "tidings_log_search_index_failures_total",
                    "Index passes that failed (retried on the conversation's next notice).",
                    &[],
                    s.failures.load(Ordering::Relaxed),
                );
            }
            // The feed's depth: committed events the publisher has not yet taken.
            let backlog = feed
                .upgrade()
                .map_or(0, |tx| tx.max_capacity() - tx.capacity());
            out.gauge(
                "tidings_log_feed_queue",
                "Committed events and notices waiting for the publisher to take them (the \
                 commit feed's depth).",
                backlog as f64,
            );
        }),
    );
}

/// The publisher's counters.
pub fn register_publisher(stats: &Arc<PublisherStats>) {
    let stats = stats.clone();
    metrics::register(
        "publisher",
        Arc::new(move |out: &mut Text| {
            out.counter(
                "tidings_publisher_published_total",
                "Events published to JetStream (acknowledged by it).",
                &[],
                stats.published.load(Ordering::Relaxed),
            );
            out.counter(
                "tidings_publisher_retries_total",
                "JetStream publishes retried.",
                &[],
                stats.retried.load(Ordering::Relaxed),
            );
            out.gauge(
                "tidings_publisher_backlog",
                "Events the publisher holds for JetStream (NATS down or slow; bounded by \
                 nats.publish_backlog).",
                stats.backlog.load(Ordering::Relaxed) as f64,
            );
            out.counter(
                "tidings_publisher_dropped_total",
                "Events given up on by the publisher (delivery heals them from the log).",
                &[],
                stats.dropped.load(Ordering::Relaxed),
            );
        }),
    );
}
