//! The log's own metrics (append and commit latency, group-commit sizes, interceptor
//! verdicts), declared with the primitives of [`tidings_log_api::metrics`], which this
//! module re-exports. Instance figures (queue depth, the send buffer) are collected at
//! scrape time by whoever holds the [`crate::Log`].

pub use tidings_log_api::metrics::*;

/// Time from a request's enqueue to its ack (or refusal), as the caller of the log waits.
pub static APPEND_SECONDS: Histogram = Histogram::new(
    "tidings_log_append_seconds",
    "Time from queuing an append to the sequencer until it is durable or refused.",
    LATENCY_BUCKETS,
);
/// One store transaction (and its fsync) of the sequencer.
pub static COMMIT_SECONDS: Histogram = Histogram::new(
    "tidings_log_commit_seconds",
    "Time of one sequencer store commit, fsync included.",
    LATENCY_BUCKETS,
);
/// Requests per sequencer batch (group commit at work).
pub static COMMIT_GROUP_SIZE: Histogram = Histogram::new(
    "tidings_log_commit_group_size",
    "Requests the sequencer took in one batch (one store commit).",
    SIZE_BUCKETS,
);
/// Commits that failed.
pub static COMMIT_FAILURES: Counter = Counter::new(
    "tidings_log_commit_failures_total",
    "Sequencer store commits that failed (their requests were refused or buffered).",
);

/// Interceptor verdicts and failures ([`crate::interceptor`]).
pub static INTERCEPTS: LabeledCounter = LabeledCounter::new(
    "tidings_log_intercepts_total",
    "Appends an interceptor was asked about, by outcome.",
    "outcome",
    &["allowed", "rejected", "failed_open", "failed_closed"],
);
/// Time an append waited for its interceptor.
pub static INTERCEPT_SECONDS: Histogram = Histogram::new(
    "tidings_log_intercept_seconds",
    "Time an append waited for its interceptor's verdict (deadline included).",
    LATENCY_BUCKETS,
);

/// Writes the log's process-wide metrics.
pub fn write_log_metrics(out: &mut Text) {
    APPEND_SECONDS.write(out);
    COMMIT_SECONDS.write(out);
    COMMIT_GROUP_SIZE.write(out);
    COMMIT_FAILURES.write(out);
    INTERCEPTS.write(out);
    INTERCEPT_SECONDS.write(out);
    crate::store::metered::READS.write(out);
}
