//! The sequencer: one task owns every write, assigns seqs and group-commits.
//!
//! Requests queue on a bounded channel. The task takes whatever has queued (up to
//! `max_batch`), reads every key the batch needs in one `batch_get`, applies the commands in
//! arrival order against that snapshot plus the batch's own earlier writes, and commits the
//! whole batch as one transaction: one fsync for many appends across many conversations.
//! Only after the commit returns are the callers answered, so an ack always means durable.
//!
//! While a commit is in flight new requests keep queueing, so the batch grows with the load:
//! one request alone commits at once, a thousand concurrent ones share a handful of fsyncs.
//!
//! Because this task is the only writer of its store, its reads are never stale, and it keeps
//! exact caches of the keys it reads for almost every request: heads (`hd/`) and memberships
//! (`mb/`). Only dedupe keys are read from the store per append. The head checks in the
//! transaction (`Expect` on every `hd/` key) guard against writes behind its back.
//!
//! Ownership (see `lease`): the sequencer only takes requests for partitions it holds the
//! lease of, and every commit expects each touched partition's lease exactly as held, so a
//! writer whose lease was taken over can never commit again: its batch fails whole, it reads
//! the leases back, drops what it lost (logged) and refuses those partitions from then on.
//! Renewals are requests on the same queue, so the lease value a batch expects is always the
//! one the batch before it wrote.
//!
//! # Layout
//! - `command`: the commands the sequencer takes, what it answers, the keys each reads.
//! - `rules`: what each command does to a batch's state (policy checks, seqs, sealing).
//! - `pipeline`: the loop: batching, reading, applying, committing, answering.
//! - `leases`: the leases held and the fence every commit carries.
//! - `cache`: the exact cache of heads and memberships.
//! - here: the [`Writer`] they all work on, its stats, and a batch's [`State`]; the crate's
//!   `outage` adds what the same `Writer` does while the store cannot commit.

mod cache;
mod command;
mod leases;
mod outage;
mod pipeline;
mod rules;

pub(crate) use cache::Cache;
pub(crate) use command::{Command, LeaseOp, Outcome, Request};
pub(crate) use pipeline::{batch_reads, fail_all};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::sync::mpsc;

use crate::config::LogConfig;
use crate::crypto::Keyring;
use crate::feed::FeedItem;
use crate::lease::{Held, Ownership, Registration};
use crate::send_buffer::SendBuffer;
use crate::store::KvStore;

/// Counters that show group commit at work (and feed the benchmark).
#[derive(Default)]
pub struct WriterStats {
    pub commits: AtomicU64,
    pub requests: AtomicU64,
    pub feed_dropped: AtomicU64,
    /// Events in the send buffer, not yet in the store (as of the last outage batch).
    pub buffered_events: AtomicU64,
    /// Events replayed from the send buffer into the store since the log opened.
    pub replayed_events: AtomicU64,
    /// Batches whose new events were sealed on the blocking pool (large ones).
    pub sealed_off_runtime: AtomicU64,
}

pub(crate) struct Writer {
    pub store: Arc<dyn KvStore>,
    pub keyring: Arc<Keyring>,
    pub cfg: LogConfig,
    pub stats: Arc<WriterStats>,
    pub cache: Cache,
    /// Random bits for event ids; seeded from the OS, no syscall per event.
    pub rng: fastrand::Rng,
    /// Where committed events and cursor moves are announced, if anyone listens.
    pub feed: Option<mpsc::Sender<FeedItem>>,
    /// Told which conversations committed, for the hot search index (`hot_index`).
    pub indexer: Option<Arc<crate::hot_index::Indexer>>,
    /// The writes of the batch whose commit is running (empty when none is).
    pub in_flight: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Which partitions this writer owns, as every handle of the log sees it.
    pub own: Arc<Ownership>,
    /// The leases held, as last committed by this writer: what a batch expects when the
    /// batch in flight does not write the lease.
    pub held: HashMap<u32, Held>,
    /// Keeps the writer id registered as alive in this process while the sequencer runs.
    pub _registration: Registration,
    /// Where appends go while the store cannot commit (`outage`); `None`: they fail.
    pub buffer: Option<Arc<SendBuffer>>,
    /// Set while the store cannot commit or buffered records wait for replay.
    pub outage: Option<Outage>,
    /// This cell and the directory (`cells`); `None`: cells are off.
    pub cells: Option<Arc<crate::cells::Cells>>,
    /// Per partition, the last outbox position written (under the lease's epoch).
    pub outbox_last: HashMap<u32, crate::cells::Position>,
}

/// Values read for a batch, and the batch's writes so far (`None`: deleted).
pub(crate) struct State {
    pub fetched: HashMap<Vec<u8>, Option<Vec<u8>>>,
    pub pending: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Keys written by this batch in the order first written, so the transaction is built
    /// deterministically.
    pub order: Vec<Vec<u8>>,
    /// What to announce once the batch is committed.
    pub announce: Vec<FeedItem>,
    /// New events of the batch, in the clear, by key: sealed all at once when the batch
    /// is applied (off the async workers when large); until then `pending` holds each as
    /// a [`rules::Unsealed::placeholder`].
    pub unsealed: HashMap<Vec<u8>, rules::Unsealed>,
}

/// The state of an outage (`outage`): since when, and when to probe and report next.
pub(crate) struct Outage {
    since: tokio::time::Instant,
    next_probe: tokio::time::Instant,
    next_report: tokio::time::Instant,
}
