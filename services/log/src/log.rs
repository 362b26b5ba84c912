//! [`Log`]: the event log's API.
//!
//! Writes (conversations, membership, appends, read cursors) go through the sequencer task
//! (see `writer`), which group-commits them; reads go straight to the store. Every id is a
//! validated type, every size is checked here against [`LogConfig`] before anything queues.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prost::Message;
use tidings_schemas::storage::{Head, Membership, ReplicaBatch, SealedEvent, UserConversation};
use tidings_schemas::v1::{ConversationKind, Event, MemberRole, event::Body};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::cold::{self, ColdTier};
pub use crate::config::LogConfig;
use crate::crypto::{Keyring, MasterKey};
use crate::error::LogError;
pub use crate::feed::FeedItem;
use crate::ids::{ConvId, TenantId, UserId, validate_id};
use crate::keys;
use crate::lease::{self, Ownership, Registration};
use crate::send_buffer::{BufferStats, SendBuffer};
use crate::store::{KeyRange, KvStore, Order};
use crate::writer::{Command, LeaseOp, Outcome, Request, Writer, WriterStats};
use tidings_log_api::types::{
    Append, By, Committed, ConversationInfo, ConversationSummary, CreateConversation,
    MAX_DISPLAY_NAME_BYTES, Member, MemberChange, MemberPage, MembersQuery, ReadRange,
    check_member_prefix,
};

/// Events in the first chunk of a read, before their size is known: 8 events of the largest
/// body are 512 KiB, the default budget; small events take a second, larger chunk.
const FIRST_CHUNK: usize = 8;

/// An append that has been queued in order; await [`PendingAppend::wait`] for its ack.
pub struct PendingAppend(
    oneshot::Receiver<Result<Outcome, LogError>>,
    std::time::Instant,
);

impl PendingAppend {
    /// Resolves once the event is durable (or was refused).
    pub async fn wait(self) -> Result<Committed, LogError> {
        let outcome = self.0.await;
        crate::metrics::APPEND_SECONDS.observe_duration(self.1.elapsed());
        committed(outcome.map_err(|_| LogError::ShuttingDown)??)
    }
}

fn committed(outcome: Outcome) -> Result<Committed, LogError> {
    match outcome {
        Outcome::Committed(c) => Ok(c),
        Outcome::Cursor(_) | Outcome::Leases { .. } | Outcome::Replica { .. } => {
            Err(LogError::corrupt(b"", "internal: unexpected outcome"))
        }
    }
}

/// `hostname-pid-random`: unique per open, readable in the leases and the logs.
fn default_writer_id(random: u64) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(64)
        .collect();
    let host = if host.is_empty() { "host".into() } else { host };
    format!("{host}-{}-{:08x}", std::process::id(), random as u32)
}

/// The lease keeper: every `period` (a third of the ttl) renews what the sequencer holds and
/// tries to acquire every partition no live writer holds. Stops when the log is gone.
async fn keep_leases(
    tx: mpsc::WeakSender<Request>,
    store: Arc<dyn KvStore>,
    own: Arc<Ownership>,
    acquiring: Arc<tokio::sync::Mutex<()>>,
    period: Duration,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(tx) = tx.upgrade() else {
            return;
        };
        // The sequencer logs what it lost; nothing more to do here.
        let _ = ask(&tx, Command::Lease(LeaseOp::Renew)).await;
        let _one_at_a_time = acquiring.lock().await;
        let wanted = own.not_owned();
        if wanted.is_empty() || own.retired() {
            continue;
        }
        match lease::acquire(&*store, &own, &wanted, false).await {
            Ok(acquired) => {
                for (p, owner) in &acquired.others {
                    own.set(*p, false, owner);
                }
                if acquired.got.is_empty() {
                    continue;
                }
                let partitions: Vec<u32> = acquired.got.iter().map(|(p, _)| *p).collect();
                info!(?partitions, "acquired the leases of partitions");
                if let Err(e) = ask(&tx, Command::Lease(LeaseOp::Adopt(acquired.got))).await {
                    warn!(error = %e, "failed to hand acquired leases to the sequencer");
                }
            }
            Err(e) => warn!(error = %e, "failed to acquire free partitions"),
        }
    }
}

async fn ask(tx: &mpsc::Sender<Request>, cmd: Command) -> Result<Outcome, LogError> {
    let (reply, rx) = oneshot::channel();
    tx.send(Request { cmd, reply })
        .await
        .map_err(|_| LogError::ShuttingDown)?;
    rx.await.map_err(|_| LogError::ShuttingDown)?
}

/// The event log. Cheap to clone; all clones share one sequencer.
#[derive(Clone)]
pub struct Log {
    inner: Arc<Inner>,
}

/// A handle that does not keep the log open: for observers (metrics) that must not delay
/// its release at shutdown.
#[derive(Clone)]
pub struct WeakLog(std::sync::Weak<Inner>);

impl WeakLog {
    /// The log, while some [`Log`] still holds it.
    pub fn upgrade(&self) -> Option<Log> {
        self.0.upgrade().map(|inner| Log { inner })
    }
}

/// The seqs a read covers and the hot floor it was planned with.
#[derive(Clone, Copy)]
struct Span {
    lo: u64,
    hi: u64,
    floor: u64,
}

struct Inner {
    store: Arc<dyn KvStore>,
    keyring: Arc<Keyring>,
    tx: mpsc::Sender<Request>,
    cfg: LogConfig,
    stats: Arc<WriterStats>,
    writer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    cold: std::sync::OnceLock<Arc<dyn ColdTier>>,
    /// Pre-commit hooks on users' appends (set once, after NATS is up).
    interceptors: std::sync::OnceLock<crate::interceptor::Interceptors>,
    /// Which partitions this writer owns (the sequencer keeps it current).
    own: Arc<Ownership>,
    /// One acquisition at a time per writer (the lease keeper's and `take_over`).
    acquiring: Arc<tokio::sync::Mutex<()>>,
    /// Renews and acquires leases; stopped with the last handle.
    keeper: Option<tokio::task::JoinHandle<()>>,
    /// Conversations created per user (a rate).
    creations: crate::quota::CreationQuota,
    /// Appends past the writer's capacity: the hottest conversations are limited first.
    overload: crate::overload::Overload,
    /// Revoked tokens, read through a small cache (`revocation.rs`).
    revocations: crate::revocation::Revocations,
    /// Appends made while the store could not commit, until replayed: reads see them too.
    buffer: Option<Arc<SendBuffer>>,
    /// Why the sequencer died, once it has (see [`Log::sequencer_failure`]).
    failure: watch::Receiver<Option<Arc<str>>>,
    /// The hot search index's queue (`hot_index`), when this log indexes.
    indexer: Option<Arc<crate::hot_index::Indexer>>,
    /// This cell and its directory (`cells`), when cells are on.
    cells: Option<Arc<crate::cells::Cells>>,
}

/// The message a panic was raised with (for a supervisor's report).
pub fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload.downcast_ref::<&str>().map_or_else(
            || "a panic without a message".to_string(),
            |s| s.to_string(),
        ),
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
        }
    }
}

impl Log {
    /// Opens the log on `store`, checking the master key, and starts its sequencer.
    ///
    /// The log's writer takes the lease of every partition no other live writer holds
    /// (ARCHITECTURE.md, "Writer ownership and fencing"); alone on a store, that is all of
    /// them. Several logs may be opened on one already-open store (the same `Arc`) with
    /// different `writer_id`s: that is how two writers of one store are exercised in one
    /// process, since the embedded store can only be opened by one process.
    pub async fn open(
        store: Arc<dyn KvStore>,
        master: MasterKey,
        cfg: LogConfig,
    ) -> Result<Log, LogError> {
        Self::open_with_feed(store, master, cfg, None).await
    }

    /// Like [`Log::open`], and announces every commit on `feed`. The sequencer never waits
    /// for the feed: when it is full, items are dropped and counted (subscribers heal gaps
    /// from the log by seq), so a slow or absent consumer can never hold back appends.
    pub async fn open_with_feed(
        store: Arc<dyn KvStore>,
        master: MasterKey,
        cfg: LogConfig,
        feed: Option<mpsc::Sender<FeedItem>>,
    ) -> Result<Log, LogError> {
        let keyring = Keyring::open(store.clone(), master).await?;
        Self::open_with_keyring(store, keyring, cfg, feed).await
    }

    /// Like [`Log::open_with_feed`], with a keyring opened (on the same store) by the caller,
    /// e.g. one that knows tenant-held keys ([`Keyring::with_tenant_keys`]).
    pub async fn open_with_keyring(
        store: Arc<dyn KvStore>,
        keyring: Keyring,
        cfg: LogConfig,
        feed: Option<mpsc::Sender<FeedItem>>,
    ) -> Result<Log, LogError> {
        cfg.validate().map_err(LogError::InvalidRequest)?;
        lease::check_partitions(&*store, cfg.partitions).await?;
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed)
            .map_err(|e| LogError::InvalidRequest(format!("no OS randomness: {e}")))?;
        let writer_id = if cfg.writer_id.is_empty() {
            default_writer_id(u64::from_le_bytes(seed))
        } else {
            cfg.writer_id.clone()
        };
        let registration = Registration::new(&writer_id)?;
        let ttl_ms = cfg.lease_ttl.as_millis() as i64;
        let own = Arc::new(Ownership::new(writer_id, cfg.partitions, ttl_ms));
        let acquired = if cfg.own_partitions {
            lease::acquire(&*store, &own, &own.not_owned(), false).await?
        } else {
            own.retire();
            lease::Acquired::default()
        };
        let buffer = match &cfg.send_buffer {
            Some(b) => Some(Arc::new(SendBuffer::open(b.clone())?)),
            None => None,
        };
        let mut held = std::collections::HashMap::new();
        for (p, h) in acquired.got {
            // What a previous owner buffered is loaded before any seq is assigned.
            if let Some(buffer) = &buffer {
                buffer.adopt(p, h.lease.epoch).await?;
            }
            own.set(p, true, &own.writer_id);
            held.insert(p, h);
        }
        for (p, owner) in acquired.others {
            own.set(p, false, &owner);
        }
        info!(
            writer_id = %own.writer_id,
            owned = held.len(),
            partitions = cfg.partitions,
            "log writer opened"
        );
        let keyring = Arc::new(keyring);
        let indexer = (cfg.search.hot_index && cfg.own_partitions).then(|| {
            Arc::new(crate::hot_index::Indexer::new(
                cfg.search.indexer_queue,
                cfg.search.indexer_queue_bytes,
            ))
        });
        let cells = match &cfg.cell {
            Some(c) => Some(Arc::new(
                crate::cells::Cells::open(&*store, c.clone()).await?,
            )),
            None => None,
        };
        let (tx, rx) = mpsc::channel(cfg.queue_depth);
        let stats = Arc::new(WriterStats::default());
        let mut writer = Writer {
            store: store.clone(),
            keyring: keyring.clone(),
            cfg: cfg.clone(),
            stats: stats.clone(),
            cache: crate::writer::Cache::new(cfg.writer_cache_entries),
            feed,
            indexer: indexer.clone(),
            rng: fastrand::Rng::with_seed(u64::from_le_bytes(seed)),
            in_flight: std::collections::HashMap::new(),
            own: own.clone(),
            held,
            _registration: registration,
            buffer: buffer.clone(),
            outage: None,
            cells: cells.clone(),
            outbox_last: std::collections::HashMap::new(),
        };
        if let Some(b) = &buffer
            && !b.is_empty()
        {
            let s = b.stats();
            warn!(
                events = s.events,
                bytes = s.bytes,
                "the send buffer holds events from before a restart: replaying them first"
            );
            writer.replay_first();
        }
        // The sequencer runs in a task of its own, watched: a panic there (a broken
        // invariant) is recorded with its message for the process to exit on, rather than
        // every later call being answered `shutting_down` by a log that looks alive.
        let (failure_tx, failure) = watch::channel(None);
        let sequencer = writer.run(rx);
        let writer = tokio::spawn(async move {
            if let Err(e) = tokio::spawn(sequencer).await
                && e.is_panic()
            {
                let reason = panic_text(e.into_panic());
                error!(%reason, "the sequencer panicked; the log takes no more writes");
                let _ = failure_tx.send(Some(Arc::from(reason)));
            }
        });
        let acquiring = Arc::new(tokio::sync::Mutex::new(()));
        let store_for_revocations = store.clone();
        let keeper = tokio::spawn(keep_leases(
            tx.downgrade(),
            store.clone(),
            own.clone(),
            acquiring.clone(),
            cfg.lease_ttl / 3,
        ));
        let creations =
            crate::quota::CreationQuota::new(cfg.max_conversations_created_per_user_per_hour);
        let overload =
            crate::overload::Overload::new(cfg.overload.clone(), std::time::Instant::now());
        Ok(Log {
            inner: Arc::new(Inner {
                store,
                keyring,
                tx,
                cfg,
                stats,
                writer: std::sync::Mutex::new(Some(writer)),
                cold: std::sync::OnceLock::new(),
                interceptors: std::sync::OnceLock::new(),
                own,
                acquiring,
                keeper: Some(keeper),
                creations,
                overload,
                revocations: crate::revocation::Revocations::new(store_for_revocations),
                buffer,
                failure,
                indexer,
                cells,
            }),
        })
    }

    /// Becomes `Some(reason)` if the sequencer panicked: the log then takes no writes, and
    /// the process should exit saying why (a supervisor waits on this).
    pub fn sequencer_failure(&self) -> watch::Receiver<Option<Arc<str>>> {
        self.inner.failure.clone()
    }

    /// This writer's owner id in the leases.
    pub fn writer_id(&self) -> &str {
        &self.inner.own.writer_id
    }

    /// The partition a conversation belongs to ([`lease::partition_of`] with this store's
    /// count).
    pub fn partition_of(&self, tenant: &TenantId, conv: &ConvId) -> u32 {
        self.inner.own.partition(tenant, conv)
    }

    /// The partitions this writer owns now, in order.
    pub fn owned_partitions(&self) -> Vec<u32> {
        self.inner.own.owned()
    }

    /// Renews every lease held now, instead of at the next tick of the lease keeper (which
    /// does this every `lease_ttl / 3`); returns the partitions found lost, which from now
    /// on are refused with `not_owner`.
    pub async fn renew_leases(&self) -> Result<Vec<u32>, LogError> {
        match self.call(Command::Lease(LeaseOp::Renew)).await? {
            Outcome::Leases { lost } => Ok(lost),
            _ => Err(LogError::corrupt(b"ls", "internal: unexpected outcome")),
        }
    }

    /// Stops writing: releases every lease this writer holds, so other writers take its
    /// partitions at once rather than after `lease_ttl`, and acquires none from now on.
    /// Later writes through any handle are refused with `not_owner`; reads go on. For a
    /// clean shutdown while handles may still be around (the gateway's, the RPC server's).
    pub async fn release_leases(&self) -> Result<(), LogError> {
        // Not while the keeper acquires: what it got would be adopted after the release.
        let _one_at_a_time = self.inner.acquiring.lock().await;
        self.inner.own.retire();
        self.call(Command::Lease(LeaseOp::Release)).await?;
        Ok(())
    }

    /// Takes the lease of `partition` whoever holds it, live or not, with a fresh epoch:
    /// the old owner's in-flight and later commits to it fail. For a forced hand-over (an
    /// operator draining a writer that cannot release, tests of fencing); ordinary
    /// ownership changes wait for a release or an expiry. Returns the new epoch.
    pub async fn take_over(&self, partition: u32) -> Result<u64, LogError> {
        if partition >= self.inner.cfg.partitions {
            return Err(LogError::InvalidRequest(format!(
                "partition {partition} is out of range (this store has {})",
                self.inner.cfg.partitions
            )));
        }
        let inner = &self.inner;
        let _one_at_a_time = inner.acquiring.lock().await;
        if inner.own.retired() {
            return Err(LogError::InvalidRequest(
                "this writer released its leases or owns no partitions".into(),
            ));
        }
        if inner.own.holds(partition) {
            return Err(LogError::InvalidRequest(format!(
                "this writer already owns partition {partition}"
            )));
        }
        let acquired = lease::acquire(&*inner.store, &inner.own, &[partition], true).await?;
        let epoch = acquired.got.first().map(|(_, h)| h.lease.epoch);
        let Some(epoch) = epoch else {
            return Err(LogError::Store(crate::store::StoreError::Conflict {
                key: keys::display_key(&keys::lease(partition)),
                reason: "other writers kept changing the lease",
            }));
        };
        self.call(Command::Lease(LeaseOp::Adopt(acquired.got)))
            .await?;
        warn!(partition, epoch, writer_id = %inner.own.writer_id, "took over a partition");
        Ok(epoch)
    }

    /// Drops this handle and waits for the sequencer to finish what is queued and stop,
    /// which it does once the last clone of the log is gone. Every acked write was durable
    /// before its ack; this only makes sure the store is released (e.g. before reopening).
    pub async fn close(self) {
        let handle = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(self);
        if let Some(handle) = handle {
            let _ = handle.await;
        }
    }

    pub fn config(&self) -> &LogConfig {
        &self.inner.cfg
    }

    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.inner.keyring
    }

    /// The tenant's transport key (what seals its traffic on NATS): `key_id`'s, or the
    /// current one's. See [`crate::crypto::TransportKey`].
    pub async fn transport_key(
        &self,
        tenant: &TenantId,
        key_id: Option<u32>,
    ) -> Result<crate::crypto::TransportKey, LogError> {
        self.inner.keyring.transport_key(tenant, key_id).await
    }

    /// The tenant's current transport key if it has data keys; `None` (nothing created) if not.
    pub async fn existing_transport_key(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<crate::crypto::TransportKey>, LogError> {
        self.inner.keyring.existing_transport_key(tenant).await
    }

    /// The log's long-term X25519 secret, derived from the master key: gateways pin its
    /// public half so only a log can answer their transport key requests.
    pub fn log_identity_secret(&self) -> [u8; 32] {
        self.inner.keyring.log_identity_secret()
    }

    /// The store the log writes to (the archiver shares it).
    /// The hot search index's queue, when this log indexes (`hot_index`).
    pub fn indexer(&self) -> Option<&Arc<crate::hot_index::Indexer>> {
        self.inner.indexer.as_ref()
    }

    pub fn store(&self) -> &Arc<dyn KvStore> {
        &self.inner.store
    }

    /// Revoked tokens: what Hello, the admin listener and the log's RPC check.
    pub fn revocations(&self) -> &crate::revocation::Revocations {
        &self.inner.revocations
    }

    /// Serves reads below the hot floor from `cold`. Set once, before or after the log is
    /// shared; returns false if a cold tier was already set.
    /// Installs the interceptors users' appends are checked by
    /// ([`crate::interceptor`]); `false` if some already were.
    pub fn set_interceptors(&self, interceptors: crate::interceptor::Interceptors) -> bool {
        self.inner.interceptors.set(interceptors).is_ok()
    }

    pub fn set_cold_tier(&self, cold: Arc<dyn ColdTier>) -> bool {
        self.inner.cold.set(cold).is_ok()
    }

    /// The archive's reader, if one is set.
    pub(crate) fn cold_tier(&self) -> Option<&Arc<dyn ColdTier>> {
        self.inner.cold.get()
    }

    /// A handle that does not keep the log open.
    pub fn downgrade(&self) -> WeakLog {
        WeakLog(Arc::downgrade(&self.inner))
    }

    /// Batches whose new events were sealed on the blocking pool (they were large).
    pub fn batches_sealed_off_runtime(&self) -> u64 {
        self.inner.stats.sealed_off_runtime.load(Ordering::Relaxed)
    }

    /// (store commits, requests answered) since open: requests / commits is the mean group
    /// size.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.inner.stats.commits.load(Ordering::Relaxed),
            self.inner.stats.requests.load(Ordering::Relaxed),
        )
    }

    /// What the send buffer holds now (`None`: this log has none).
    pub fn send_buffer_stats(&self) -> Option<BufferStats> {
        self.inner.buffer.as_ref().map(|b| b.stats())
    }

    /// Requests waiting for the sequencer to take them (its queue's depth now).
    pub fn queued(&self) -> usize {
        self.inner.tx.max_capacity() - self.inner.tx.capacity()
    }

    /// What the admission control let through and refused, and why, since open.
    pub fn overload_stats(&self) -> &crate::overload::OverloadStats {
        self.inner.overload.stats()
    }

    /// Feed items dropped because the feed was full.
    pub fn feed_dropped(&self) -> u64 {
        self.inner.stats.feed_dropped.load(Ordering::Relaxed)
    }

    async fn submit(
        &self,
        cmd: Command,
    ) -> Result<oneshot::Receiver<Result<Outcome, LogError>>, LogError> {
        // A partition this writer does not own is refused before it queues: the owner (or
        // this writer, once it owns it again) takes the retry.
        if let Some((t, c)) = cmd.tenant_conv() {
            let own = &self.inner.own;
            own.check(own.partition(t, c))?;
        }
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Request { cmd, reply })
            .await
            .map_err(|_| LogError::ShuttingDown)?;
        Ok(rx)
    }

    /// This cell and its directory, when cells are on.
    pub fn cells(&self) -> Option<&Arc<crate::cells::Cells>> {
        self.inner.cells.as_ref()
    }

    /// `Err(wrong_cell)` if the directory homes the tenant in another cell: what the log's
    /// service edges check before serving a tenant's client at all (writes are fenced in the
    /// sequencer besides).
    pub fn serves(&self, tenant: &TenantId) -> Result<(), LogError> {
        self.cells().map_or(Ok(()), |cells| cells.serves(tenant))
    }

    /// Applies a home cell's replica batch through the sequencer (`cells`): `Ok(false)` if
    /// it was applied before. Refused unless the directory names its source as the tenant's
    /// home and this cell as its DR cell.
    pub async fn apply_replica(
        &self,
        batch: ReplicaBatch,
        link: &crate::crypto::LinkKey,
    ) -> Result<bool, LogError> {
        let Some(cells) = self.cells() else {
            return Err(LogError::NotAllowed("cells are off in this process".into()));
        };
        let mut unsigned = batch.clone();
        let tag = std::mem::take(&mut unsigned.mac);
        if !link.verify(crate::cells::BATCH_MAC, &unsigned.encode_to_vec(), &tag) {
            return Err(LogError::NotAllowed(
                "a replica batch not signed with the cells' link key".into(),
            ));
        }
        let tenant = crate::cells::check_batch(&batch)?;
        cells.admit_replica(&tenant, &batch.source, batch.placement_version)?;
        if batch.partitions != self.inner.cfg.partitions {
            return Err(LogError::PartitionsMismatch {
                stored: batch.partitions,
                configured: self.inner.cfg.partitions,
            });
        }
        let conv = ConvId::new(&batch.conversation)?;
        if self.partition_of(&tenant, &conv) != batch.partition {
            return Err(LogError::InvalidRequest(format!(
                "a replica of partition {} names a conversation of another partition",
                batch.partition
            )));
        }
        for k in &batch.keys {
            self.inner
                .keyring
                .import_linked(&tenant, k.key_id, &k.sealed, link)
                .await?;
        }
        let cmd = Command::Replica {
            tenant,
            conv,
            batch: Box::new(batch),
        };
        match self.call(cmd).await? {
            Outcome::Replica { applied } => Ok(applied),
            _ => Err(LogError::corrupt(b"ri", "internal: unexpected outcome")),
        }
    }

    /// Waits until every write queued before this call has been committed or refused (a
    /// lease renewal through the sequencer's queue).
    pub async fn barrier(&self) -> Result<(), LogError> {
        self.renew_leases().await.map(|_| ())
    }

    async fn call(&self, cmd: Command) -> Result<Outcome, LogError> {
        self.submit(cmd)
            .await?
            .await
            .map_err(|_| LogError::ShuttingDown)?
    }

    fn check_title(&self, title: &str) -> Result<(), LogError> {
        let limit = self.inner.cfg.max_title_bytes;
        if title.len() > limit {
            return Err(LogError::TooLarge {
                what: "title",
                size: title.len(),
                limit,
            });
        }
        Ok(())
    }

    pub async fn create_conversation(
        &self,
        req: CreateConversation,
    ) -> Result<Committed, LogError> {
        self.check_title(&req.title)?;
        let count = req.all_members().len();
        let kind = self.inner.cfg.kinds.get(&req.kind)?;
        match kind {
            k if k.fixed_members && count != 2 => {
                return Err(LogError::InvalidRequest(format!(
                    "a {} conversation has exactly 2 members, not {count}",
                    k.name
                )));
            }
            _ if count > self.inner.cfg.max_group_members => {
                return Err(LogError::TooLarge {
                    what: "member list",
                    size: count,
                    limit: self.inner.cfg.max_group_members,
                });
            }
            _ => {}
        }
        committed(self.call(Command::Create(req)).await?)
    }

    /// [`Log::create_conversation`] for a user's request (through a gateway), held also to
    /// the caps a user is under: at most `max_members_per_request` members listed, and
    /// `max_conversations_created_per_user_per_hour` (see `quota`). Operator tools (the CLI,
    /// benchmarks) call `create_conversation` and are not held to them.
    pub async fn create_conversation_for_user(
        &self,
        req: CreateConversation,
    ) -> Result<Committed, LogError> {
        let listed = req.members.len();
        let max = self.inner.cfg.max_members_per_request;
        if listed > max {
            return Err(LogError::TooLarge {
                what: "member list of one request",
                size: listed,
                limit: max,
            });
        }
        // Charged where the create will run: a writer that does not own the partition
        // refuses it (the caller retries at the owner) without taking from the quota.
        let own = &self.inner.own;
        own.check(own.partition(&req.tenant, &req.conv))?;
        if let Err(wait) =
            self.inner
                .creations
                .take(&req.tenant, &req.creator, std::time::Instant::now())
        {
            return Err(LogError::RateLimited {
                what: "conversations created by this user",
                retry_after_ms: wait.as_millis() as u64 + 1,
            });
        }
        self.create_conversation(req).await
    }

    /// Adds `user` with the kind's member role; `by` must hold a role that may add.
    pub async fn add_member(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        by: &UserId,
        user: &UserId,
    ) -> Result<Committed, LogError> {
        self.add_member_as(tenant, conv, by, user, None).await
    }

    /// Adds `user` with `role` (`None`: the kind's member role). Another role than the
    /// member role needs a role of `by` that may also set roles.
    pub async fn add_member_as(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        by: &UserId,
        user: &UserId,
        role: Option<&str>,
    ) -> Result<Committed, LogError> {
        let cmd = Command::AddMember {
            tenant: tenant.clone(),
            conv: conv.clone(),
            by: by.clone(),
            user: user.clone(),
            role: role.map(str::to_string),
        };
        committed(self.call(cmd).await?)
    }

    /// Gives `user` another of the kind's roles; `by` must hold a role that may set roles.
    pub async fn set_role(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        by: &UserId,
        user: &UserId,
        role: &str,
    ) -> Result<Committed, LogError> {
        let cmd = Command::SetRole {
            tenant: tenant.clone(),
            conv: conv.clone(),
            by: by.clone(),
            user: user.clone(),
            role: role.to_string(),
        };
        committed(self.call(cmd).await?)
    }

    /// Sets `user`'s display name in the conversation (empty clears it). `by`: the member
    /// themselves (the kind must let their role set their own name), another member (whose
    /// role must be allowed to set others' names), or [`By::System`] (the operator's tools;
    /// no policy applies).
    pub async fn set_display_name(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        by: By,
        user: &UserId,
        name: &str,
    ) -> Result<Committed, LogError> {
        if name.len() > MAX_DISPLAY_NAME_BYTES || name.chars().any(char::is_control) {
            return Err(LogError::InvalidRequest(format!(
                "a display name is at most {MAX_DISPLAY_NAME_BYTES} bytes, without control characters"
            )));
        }
        let cmd = Command::SetDisplayName {
            tenant: tenant.clone(),
            conv: conv.clone(),
            by,
            user: user.clone(),
            name: name.to_string(),
        };
        committed(self.call(cmd).await?)
    }

    /// Removes `user`; `by` must be an owner, or `user` themselves (leaving).
    pub async fn remove_member(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        by: &UserId,
        user: &UserId,
    ) -> Result<Committed, LogError> {
        let cmd = Command::RemoveMember {
            tenant: tenant.clone(),
            conv: conv.clone(),
            by: by.clone(),
            user: user.clone(),
        };
        committed(self.call(cmd).await?)
    }

    pub async fn rename(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        by: &UserId,
        title: &str,
    ) -> Result<Committed, LogError> {
        self.check_title(title)?;
        let cmd = Command::Rename {
            tenant: tenant.clone(),
            conv: conv.clone(),
            by: by.clone(),
            title: title.to_string(),
        };
        committed(self.call(cmd).await?)
    }

    /// Checks what can be checked without the store: the body's kind, ids and size.
    fn check_append(&self, req: &Append) -> Result<(), LogError> {
        let size = req.body.encoded_len();
        let limit = self.inner.cfg.max_body_bytes;
        if size > limit {
            return Err(LogError::TooLarge {
                what: "message body",
                size,
                limit,
            });
        }
        match &req.body {
            Body::MessagePosted(p) => {
                if p.text.is_empty() {
                    return Err(LogError::InvalidRequest("message text is empty".into()));
                }
                for m in &p.mentions {
                    validate_id("mention", m)?;
                }
            }
            Body::MessageEdited(e) if e.new_text.is_empty() => {
                return Err(LogError::InvalidRequest("edited text is empty".into()));
            }
            Body::ReactionAdded(tidings_schemas::v1::ReactionAdded { reaction, .. })
            | Body::ReactionRemoved(tidings_schemas::v1::ReactionRemoved { reaction, .. })
                if reaction.is_empty() || reaction.len() > 64 =>
            {
                return Err(LogError::InvalidRequest(
                    "a reaction is 1 to 64 bytes".into(),
                ));
            }
            Body::MessageEdited(_)
            | Body::MessageRecalled(_)
            | Body::ReactionAdded(_)
            | Body::ReactionRemoved(_) => {}
            Body::MemberJoined(_)
            | Body::MemberLeft(_)
            | Body::ConversationCreated(_)
            | Body::ConversationRenamed(_)
            | Body::MemberRoleChanged(_)
            | Body::DisplayNameSet(_) => {
                return Err(LogError::InvalidRequest(
                    "membership and conversation events are made by their own operations, not appended"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// Queues an append behind every append queued before it and returns at once (or when
    /// the queue has room). Appends queued in order from one task get increasing seqs in
    /// that order.
    pub async fn enqueue(&self, req: Append) -> Result<PendingAppend, LogError> {
        self.check_append(&req)?;
        let queued = std::time::Instant::now();
        Ok(PendingAppend(
            self.submit(Command::Append(req)).await?,
            queued,
        ))
    }

    /// Appends and waits until the event is durable.
    pub async fn append(&self, req: Append) -> Result<Committed, LogError> {
        self.enqueue(req).await?.wait().await
    }

    /// [`Log::append`] for a user's send (through a gateway), held also to the writer's
    /// admission control: past its capacity, appends to the hottest conversations are
    /// refused with `rate_limited` before they queue (`overload`). Operator tools (the CLI's
    /// imports, benchmarks) call `append` and are not held to it.
    pub async fn append_for_user(&self, req: Append) -> Result<Committed, LogError> {
        self.check_append(&req)?;
        // Counted where the append will run: a writer that does not own the partition
        // refuses it (the caller retries at the owner) without counting it.
        let own = &self.inner.own;
        own.check(own.partition(&req.tenant, &req.conv))?;
        self.inner.overload.admit(
            &req.tenant,
            &req.conv,
            self.queued(),
            std::time::Instant::now(),
        )?;
        self.intercept(&req).await?;
        let (tenant, conv) = (req.tenant.clone(), req.conv.clone());
        let committed = self.append(req).await?;
        self.inner
            .overload
            .note_members(&tenant, &conv, committed.members);
        Ok(committed)
    }

    /// Asks the tenant's interceptor, if a rule has one for this append
    /// ([`crate::interceptor`]).
    async fn intercept(&self, req: &Append) -> Result<(), LogError> {
        let Some(interceptors) = self.inner.interceptors.get() else {
            return Ok(());
        };
        if !interceptors.may_apply(&req.tenant, &req.body) {
            return Ok(());
        }
        // The hook is told the kind, and a rule may name one.
        let kind = self.conversation(&req.tenant, &req.conv).await?.kind_name;
        let request = crate::interceptor::InterceptRequest {
            tenant: req.tenant.clone(),
            conv: req.conv.clone(),
            kind,
            sender: req.sender.clone(),
            client_msg_id: req.client_msg_id.clone(),
            body: req.body.clone(),
        };
        interceptors.check(&request).await
    }

    /// Moves the user's read cursor forward (never back, never past the head); returns it.
    pub async fn mark_read(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        user: &UserId,
        seq: u64,
    ) -> Result<u64, LogError> {
        let cmd = Command::MarkRead {
            tenant: tenant.clone(),
            conv: conv.clone(),
            user: user.clone(),
            seq,
        };
        match self.call(cmd).await? {
            Outcome::Cursor(c) => Ok(c),
            Outcome::Committed(_) | Outcome::Leases { .. } | Outcome::Replica { .. } => {
                Err(LogError::corrupt(b"", "internal: unexpected outcome"))
            }
        }
    }

    async fn head(&self, tenant: &TenantId, conv: &ConvId) -> Result<Head, LogError> {
        let key = keys::head(tenant, conv);
        // A buffered head is always ahead of the stored one.
        if let Some(bytes) = self.inner.buffer.as_ref().and_then(|b| b.get(&key)) {
            return Head::decode(bytes.as_slice()).map_err(|e| LogError::corrupt(&key, e));
        }
        let bytes =
            self.inner
                .store
                .get(&key)
                .await?
                .ok_or_else(|| LogError::ConversationNotFound {
                    tenant: tenant.to_string(),
                    conversation: conv.to_string(),
                })?;
        Head::decode(bytes.as_slice()).map_err(|e| LogError::corrupt(&key, e))
    }

    pub async fn conversation(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
    ) -> Result<ConversationInfo, LogError> {
        let head = self.head(tenant, conv).await?;
        Ok(ConversationInfo {
            kind: ConversationKind::try_from(head.kind).unwrap_or(ConversationKind::Unspecified),
            kind_name: crate::policy::kind_name(&head).to_string(),
            head_seq: head.last_seq,
            last_time_ms: head.last_time_ms,
            member_count: head.member_count,
        })
    }

    fn check_limit(&self, limit: usize) -> Result<(), LogError> {
        let max = self.inner.cfg.max_read_limit;
        if limit == 0 || limit > max {
            return Err(LogError::InvalidRequest(format!(
                "limit must be between 1 and {max}, not {limit}"
            )));
        }
        Ok(())
    }

    /// Reads committed events, forward or backward, at most `limit` and at most
    /// `max_read_bytes` of them (one event always), from the hot log and the archive alike:
    /// a page that crosses the hot floor comes back whole and in order. A read that stops at
    /// the byte budget returns fewer than `limit`: callers page on from the last event.
    ///
    /// Read in chunks sized from the events seen so far, so a page of large events never
    /// holds much more than the budget (a thousand 60 KB events would be 60 MB).
    pub async fn read(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        range: ReadRange,
    ) -> Result<Vec<Event>, LogError> {
        self.check_limit(range.limit)?;
        let budget = self.inner.cfg.max_read_bytes;
        let mut out: Vec<Event> = Vec::new();
        let mut bytes = 0usize;
        let mut from = range.from;
        loop {
            let left = range.limit - out.len();
            let chunk = if out.is_empty() {
                left.min(FIRST_CHUNK)
            } else {
                let mean = (bytes / out.len()).max(1);
                left.min(budget.saturating_sub(bytes) / mean + 1)
            };
            let page = self
                .read_run(
                    tenant,
                    conv,
                    ReadRange {
                        from,
                        limit: chunk,
                        ..range
                    },
                )
                .await?;
            let short = page.len() < chunk;
            for e in page {
                let n = e.encoded_len();
                if !out.is_empty() && bytes + n > budget {
                    return Ok(out);
                }
                bytes += n;
                out.push(e);
            }
            let Some(last) = out.last().map(|e| e.seq) else {
                return Ok(out);
            };
            if short || out.len() == range.limit {
                return Ok(out);
            }
            from = match range.order {
                Order::Ascending => Some(last + 1),
                Order::Descending if last > 1 => Some(last - 1),
                Order::Descending => return Ok(out),
            };
        }
    }

    /// One contiguous run of at most `range.limit` events (see [`Log::read`]). Bounded by
    /// the head read first, so a read racing appends returns a contiguous run and never a
    /// partial batch.
    async fn read_run(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        range: ReadRange,
    ) -> Result<Vec<Event>, LogError> {
        let head = self.head(tenant, conv).await?.last_seq;
        let (lo, hi) = match range.order {
            Order::Ascending => (range.from.unwrap_or(1).max(1), head),
            Order::Descending => (1, range.from.unwrap_or(head).min(head)),
        };
        if lo > hi {
            return Ok(Vec::new());
        }
        // All of it buffered (the store may not even read): served from the buffer alone.
        let lowest_wanted = match range.order {
            Order::Ascending => lo,
            Order::Descending => lo.max((hi + 1).saturating_sub(range.limit as u64)),
        };
        if self
            .buffered_low(tenant, conv)
            .is_some_and(|low| lowest_wanted >= low)
        {
            return self
                .read_buffered(
                    tenant,
                    conv,
                    (lowest_wanted.max(lo), hi),
                    range.limit,
                    range.order,
                )
                .await;
        }
        // The archiver moves a conversation's oldest events to the archive while we read. It
        // only ever raises the floor, in one transaction with the index, so a hot read that
        // comes back short means the floor moved: read again with the new one.
        let mut floor = cold::archived_through(&*self.inner.store, tenant, conv).await?;
        for _ in 0..8 {
            // Seqs the retention policy deleted are gone: history begins above them.
            let lo = if lo <= floor {
                lo.max(cold::purged_through(&*self.inner.store, tenant, conv).await? + 1)
            } else {
                lo
            };
            if lo > hi {
                return Ok(Vec::new());
            }
            let span = Span { lo, hi, floor };
            if let Some(events) = self.read_tiers(tenant, conv, span, range).await? {
                return Ok(events);
            }
            let moved = cold::archived_through(&*self.inner.store, tenant, conv).await?;
            if moved == floor {
                break;
            }
            floor = moved;
        }
        Err(LogError::corrupt(
            &keys::event_dir(tenant, conv),
            "event missing below the head",
        ))
    }

    /// One attempt of [`Log::read`] with the hot floor as it was read; `None` when the hot
    /// log lacks an event it should have.
    async fn read_tiers(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        Span { lo, hi, floor }: Span,
        range: ReadRange,
    ) -> Result<Option<Vec<Event>>, LogError> {
        let limit = range.limit as u64;
        let hot_lo = lo.max(floor + 1);
        let mut events = Vec::new();
        match range.order {
            Order::Ascending => {
                if lo <= floor {
                    let to = floor.min(hi).min(lo + limit - 1);
                    events = self.read_cold(tenant, conv, lo, to).await?;
                }
                let left = range.limit - events.len();
                if left > 0 && hot_lo <= hi {
                    let Some(hot) = self
                        .read_hot(tenant, conv, (hot_lo, hi), left, range.order)
                        .await?
                    else {
                        return Ok(None);
                    };
                    events.extend(hot);
                }
            }
            Order::Descending => {
                if hot_lo <= hi {
                    let Some(hot) = self
                        .read_hot(tenant, conv, (hot_lo, hi), range.limit, range.order)
                        .await?
                    else {
                        return Ok(None);
                    };
                    events = hot;
                }
                let left = (range.limit - events.len()) as u64;
                if left > 0 && lo <= floor {
                    let to = hi.min(floor);
                    let from = lo.max((to + 1).saturating_sub(left));
                    let cold = self.read_cold(tenant, conv, from, to).await?;
                    events.extend(cold.into_iter().rev());
                }
            }
        }
        Ok(Some(events))
    }

    /// The lowest seq of the conversation that is in the send buffer, not the store.
    fn buffered_low(&self, tenant: &TenantId, conv: &ConvId) -> Option<u64> {
        let b = self.inner.buffer.as_ref()?;
        let part = [tenant.as_str().as_bytes(), b"\0", conv.as_str().as_bytes()].concat();
        b.lowest_seq(&part)
    }

    /// Events `lo..=hi` (all buffered), up to `limit`, in `order`.
    async fn read_buffered(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        (lo, hi): (u64, u64),
        limit: usize,
        order: Order,
    ) -> Result<Vec<Event>, LogError> {
        let Some(buffer) = self.inner.buffer.as_ref() else {
            return Ok(Vec::new());
        };
        let seqs: Vec<u64> = match order {
            Order::Ascending => (lo..=hi).take(limit).collect(),
            Order::Descending => (lo..=hi).rev().take(limit).collect(),
        };
        let mut events = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let key = keys::event(tenant, conv, seq);
            let Some(value) = buffer.get(&key) else {
                // Replayed and trimmed meanwhile: a read again finds it in the store.
                return Err(LogError::Unavailable {
                    reason: "the send buffer was replayed during the read; read again".into(),
                });
            };
            events.push(self.open_event(tenant, conv, seq, &key, &value).await?);
        }
        Ok(events)
    }

    /// Hot events: from the store, and above what it holds, from the send buffer.
    async fn read_hot(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        (lo, hi): (u64, u64),
        limit: usize,
        order: Order,
    ) -> Result<Option<Vec<Event>>, LogError> {
        let Some(low) = self.buffered_low(tenant, conv).filter(|low| hi >= *low) else {
            return self.read_stored(tenant, conv, (lo, hi), limit, order).await;
        };
        let stored_hi = low - 1;
        match order {
            Order::Ascending => {
                let mut events = Vec::new();
                if lo <= stored_hi {
                    let Some(stored) = self
                        .read_stored(tenant, conv, (lo, stored_hi), limit, order)
                        .await?
                    else {
                        return Ok(None);
                    };
                    events = stored;
                }
                let left = limit - events.len();
                if left > 0 {
                    events.extend(
                        self.read_buffered(tenant, conv, (low.max(lo), hi), left, order)
                            .await?,
                    );
                }
                Ok(Some(events))
            }
            Order::Descending => {
                let mut events = self
                    .read_buffered(tenant, conv, (low.max(lo), hi), limit, order)
                    .await?;
                let left = limit - events.len();
                if left > 0 && lo <= stored_hi {
                    let Some(stored) = self
                        .read_stored(tenant, conv, (lo, stored_hi), left, order)
                        .await?
                    else {
                        return Ok(None);
                    };
                    events.extend(stored);
                }
                Ok(Some(events))
            }
        }
    }

    /// Events `lo..=hi` of the store in `order`, at most `limit`; `None` if one is missing.
    async fn read_stored(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        (lo, hi): (u64, u64),
        limit: usize,
        order: Order,
    ) -> Result<Option<Vec<Event>>, LogError> {
        let rows = self
            .inner
            .store
            .scan(keys::event_range(tenant, conv, lo, hi), limit, order)
            .await?;
        let wanted = limit.min((hi - lo + 1) as usize);
        if rows.len() != wanted {
            return Ok(None);
        }
        let mut expected = match order {
            Order::Ascending => lo,
            Order::Descending => hi,
        };
        let mut events = Vec::with_capacity(rows.len());
        for (key, value) in rows {
            let seq = keys::event_seq(&key).ok_or_else(|| LogError::corrupt(&key, "bad key"))?;
            if seq != expected {
                return Ok(None);
            }
            events.push(self.open_event(tenant, conv, seq, &key, &value).await?);
            expected = match order {
                Order::Ascending => seq + 1,
                Order::Descending => seq.saturating_sub(1),
            };
        }
        Ok(Some(events))
    }

    /// Events `from..=to` of the archive, checked to be exactly those.
    pub(crate) async fn read_cold(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        from: u64,
        to: u64,
    ) -> Result<Vec<Event>, LogError> {
        let events = self
            .cold_or_refuse(conv, from, to)?
            .read(tenant, conv, from, to)
            .await?;
        check_cold(tenant, conv, std::slice::from_ref(&(from..=to)), &events)?;
        Ok(events)
    }

    /// The archived events at each of `wanted`'s ranges (see [`ColdTier::read_ranges`]),
    /// checked to be exactly those.
    pub(crate) async fn read_cold_ranges(
        &self,
        tenant: &TenantId,
        wanted: &[(ConvId, Vec<std::ops::RangeInclusive<u64>>)],
    ) -> Result<Vec<Vec<Event>>, LogError> {
        let Some((conv, ranges)) = wanted.first() else {
            return Ok(Vec::new());
        };
        let (from, to) = ranges.first().map_or((0, 0), |r| (*r.start(), *r.end()));
        let found = self
            .cold_or_refuse(conv, from, to)?
            .read_ranges(tenant, wanted)
            .await?;
        if found.len() != wanted.len() {
            return Err(LogError::corrupt(
                &keys::archive_run(tenant, conv, from),
                "the archive answered for other conversations than asked",
            ));
        }
        for ((conv, ranges), events) in wanted.iter().zip(&found) {
            check_cold(tenant, conv, ranges, events)?;
        }
        Ok(found)
    }

    fn cold_or_refuse(
        &self,
        conv: &ConvId,
        from: u64,
        to: u64,
    ) -> Result<&Arc<dyn ColdTier>, LogError> {
        self.inner.cold.get().ok_or_else(|| LogError::Archive {
            reason: format!(
                "seqs {from}..={to} of conversation {conv} are archived and this log has no \
                 archive configured"
            ),
            retryable: false,
        })
    }

    async fn open_event(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        seq: u64,
        key: &[u8],
        value: &[u8],
    ) -> Result<Event, LogError> {
        open_stored_event(&self.inner.keyring, tenant, conv, seq, key, value).await
    }

    pub async fn is_member(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        user: &UserId,
    ) -> Result<bool, LogError> {
        Ok(self
            .inner
            .store
            .get(&keys::member(tenant, conv, user))
            .await?
            .is_some())
    }

    /// One page of members in user id order, starting after `after`.
    pub async fn members(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        after: Option<&UserId>,
        limit: usize,
    ) -> Result<Vec<Member>, LogError> {
        self.check_limit(limit)?;
        self.head(tenant, conv).await?;
        let dir = keys::member_dir(tenant, conv);
        let rows = self.page(&dir, after.map(|u| u.as_str()), limit).await?;
        rows.into_iter()
            .map(|(key, value)| member_of(&dir, &key, &value))
            .collect()
    }

    /// A page of members (in id order, after `after`, starting with `prefix`), or of the
    /// membership changes since a version, with the member list's version. Every read is a
    /// bounded range of at most `limit` rows, whatever the group's size.
    pub async fn member_page(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        q: &MembersQuery,
    ) -> Result<MemberPage, LogError> {
        self.check_limit(q.limit)?;
        check_member_prefix(&q.prefix)?;
        // Read first: the page reflects this version or later.
        let version = self.head(tenant, conv).await?.membership_seq;
        let mut page = MemberPage {
            version,
            ..MemberPage::default()
        };
        if let Some(since) = q.since_version {
            if version == 0 {
                return Err(LogError::InvalidRequest(
                    "this conversation predates member list versions: list its members".into(),
                ));
            }
            let dir = keys::member_change_dir(tenant, conv);
            let rows = self
                .inner
                .store
                .scan(
                    keys::member_changes_after(tenant, conv, since),
                    q.limit,
                    Order::Ascending,
                )
                .await?;
            for (key, value) in rows {
                let change = tidings_schemas::storage::MembershipChange::decode(value.as_slice())
                    .map_err(|e| LogError::corrupt(&key, e))?;
                let (seq, user) = keys::member_change_parts(&dir, &key)
                    .ok_or_else(|| LogError::corrupt(&key, "bad membership change key"))?;
                page.changes.push(MemberChange {
                    seq,
                    user: UserId::new(user).map_err(|e| LogError::corrupt(&key, e))?,
                    role: MemberRole::try_from(change.role).unwrap_or(MemberRole::Unspecified),
                    role_name: change.role_name,
                    display_name: change.display_name,
                    removed: change.removed,
                });
            }
            return Ok(page);
        }
        let dir = keys::member_dir(tenant, conv);
        let mut range = KeyRange::prefix([dir.as_slice(), q.prefix.as_bytes()].concat());
        if let Some(after) = &q.after {
            let start = [dir.as_slice(), after.as_str().as_bytes(), &[0]].concat();
            range.start = range.start.max(start);
        }
        let rows = self
            .inner
            .store
            .scan(range, q.limit, Order::Ascending)
            .await?;
        page.members = rows
            .into_iter()
            .map(|(key, value)| member_of(&dir, &key, &value))
            .collect::<Result<_, _>>()?;
        Ok(page)
    }

    /// One page of the user's conversations in id order, starting after `after`, with heads
    /// and unread counts.
    pub async fn conversations(
        &self,
        tenant: &TenantId,
        user: &UserId,
        after: Option<&ConvId>,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, LogError> {
        self.check_limit(limit)?;
        let dir = keys::user_conv_dir(tenant, user);
        let rows = self.page(&dir, after.map(|c| c.as_str()), limit).await?;
        let mut convs = Vec::with_capacity(rows.len());
        let mut entries = Vec::with_capacity(rows.len());
        for (key, value) in rows {
            let entry = UserConversation::decode(value.as_slice())
                .map_err(|e| LogError::corrupt(&key, e))?;
            let conv = keys::last_part(&dir, &key)
                .and_then(|c| ConvId::new(c).ok())
                .ok_or_else(|| LogError::corrupt(&key, "bad conversation key"))?;
            convs.push(conv);
            entries.push(entry);
        }
        let head_keys: Vec<Vec<u8>> = convs.iter().map(|c| keys::head(tenant, c)).collect();
        let mut heads = self.inner.store.batch_get(head_keys.clone()).await?;
        // Heads moved by buffered appends (a store outage) are ahead of the stored ones.
        if let Some(buffer) = &self.inner.buffer {
            for (key, head) in head_keys.iter().zip(heads.iter_mut()) {
                if let Some(bytes) = buffer.get(key) {
                    *head = Some(bytes);
                }
            }
        }
        convs
            .into_iter()
            .zip(entries)
            .zip(heads)
            .map(|((conv, entry), head)| {
                let head = match head {
                    Some(bytes) => Head::decode(bytes.as_slice())
                        .map_err(|e| LogError::corrupt(&keys::head(tenant, &conv), e))?,
                    None => {
                        return Err(LogError::corrupt(
                            &keys::head(tenant, &conv),
                            "listed conversation has no head",
                        ));
                    }
                };
                Ok(ConversationSummary {
                    conv,
                    head_seq: head.last_seq,
                    read_seq: entry.read_seq,
                    unread: crate::unread::unread(&head, &entry),
                })
            })
            .collect()
    }

    /// Up to `limit` rows under `dir` whose last part sorts after `after`.
    async fn page(
        &self,
        dir: &[u8],
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, LogError> {
        let mut range = KeyRange::prefix(dir.to_vec());
        if let Some(after) = after {
            // No id contains 0x00, so `after\0` sorts after `after` and before its successors.
            range.start = [dir, after.as_bytes(), &[0]].concat();
        }
        Ok(self
            .inner
            .store
            .scan(range, limit, Order::Ascending)
            .await?)
    }
}

/// The member a `mb/` row under `dir` holds.
fn member_of(dir: &[u8], key: &[u8], value: &[u8]) -> Result<Member, LogError> {
    let m = Membership::decode(value).map_err(|e| LogError::corrupt(key, e))?;
    let user = keys::last_part(dir, key)
        .and_then(|u| UserId::new(u).ok())
        .ok_or_else(|| LogError::corrupt(key, "bad member key"))?;
    Ok(Member {
        user,
        role: MemberRole::try_from(m.role).unwrap_or(MemberRole::Unspecified),
        role_name: crate::policy::role_name(&m).to_string(),
        display_name: m.display_name,
        joined_seq: m.joined_seq,
    })
}

/// Opens the value stored at `ev/<tenant>/<conv>/<seq>` (its key is `key`, for errors) and
/// checks that the event inside belongs to that row.
pub async fn open_stored_event(
    keyring: &Keyring,
    tenant: &TenantId,
    conv: &ConvId,
    seq: u64,
    key: &[u8],
    value: &[u8],
) -> Result<Event, LogError> {
    let sealed = SealedEvent::decode(value).map_err(|e| LogError::corrupt(key, e))?;
    let data_key = keyring.key(tenant, sealed.key_id).await?;
    let plain = data_key
        .open_event(tenant, conv, seq, &sealed.ciphertext)
        .map_err(|_| LogError::corrupt(key, "sealed event failed authentication"))?;
    let event = Event::decode(plain.as_slice()).map_err(|e| LogError::corrupt(key, e))?;
    if event.seq != seq || event.tenant != tenant.as_str() || event.conversation != conv.as_str() {
        return Err(LogError::corrupt(key, "event does not belong to its row"));
    }
    Ok(event)
}

/// Checks that `events` are exactly the seqs of `ranges` (ascending, disjoint), in order: the
/// archive must return what its index promised.
fn check_cold(
    tenant: &TenantId,
    conv: &ConvId,
    ranges: &[std::ops::RangeInclusive<u64>],
    events: &[Event],
) -> Result<(), LogError> {
    let mut got = events.iter().map(|e| e.seq);
    let exact = ranges
        .iter()
        .flat_map(|r| r.clone())
        .all(|seq| got.next() == Some(seq))
        && got.next().is_none();
    if exact {
        return Ok(());
    }
    let from = ranges.first().map_or(0, |r| *r.start());
    Err(LogError::corrupt(
        &keys::archive_run(tenant, conv, from),
        "the archive returned other events than the index promised",
    ))
}
