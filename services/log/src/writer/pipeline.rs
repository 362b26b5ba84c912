//! The sequencer's loop: batching requests, reading what they need, applying them (`rules`),
//! committing one batch while the next is prepared, and answering once a commit is durable.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prost::Message;
use tidings_schemas::storage::{Head, ReplicaBatch, ReplicaWrite, SealedEvent};
use tidings_schemas::v1::Event;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::command::author_only_target;
use super::rules::Scratch;
use super::{Command, LeaseOp, Outcome, Request, State, Writer};
use crate::crypto::DataKey;
use crate::error::LogError;
use crate::feed::FeedItem;
use crate::ids::{ConvId, TenantId};
use crate::keys;
use crate::store::{StoreError, Transaction};

/// The conversations a batch moved the heads of, with their new last seq: what the hot
/// search index is told (one notice per conversation per commit, not per event).
fn committed_heads(pending: &HashMap<Vec<u8>, Option<Vec<u8>>>) -> Vec<crate::hot_index::Notice> {
    pending
        .iter()
        .filter(|(k, _)| k.starts_with(b"hd\0"))
        .filter_map(|(k, v)| {
            let head = Head::decode(v.as_deref()?).ok()?;
            let (t, c) = keys::head_ids(k)?;
            Some((TenantId::new(t).ok()?, ConvId::new(c).ok()?, head.last_seq))
        })
        .collect()
}

impl Writer {
    /// The sequencer loop, pipelined: batch N+1 is read, applied and sealed while batch N's
    /// commit (and fsync) runs; N+1 is committed only after N succeeded, so commits keep
    /// their order. N+1's reads see N's writes through `in_flight`; if N fails, N+1 was built
    /// on writes that never happened, so it is failed too (and the cache dropped).
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let max = self.cfg.max_batch;
        let mut batch = Vec::with_capacity(max);
        let mut committing: Option<(tokio::task::JoinHandle<Result<(), StoreError>>, Prepared)> =
            None;
        loop {
            let received = if let Some(probe_at) = self.probe_at() {
                // The store cannot commit: appends go to the send buffer (see `outage`).
                if let Some((handle, prev)) = committing.take() {
                    let done = handle.await;
                    self.finish(prev, done).await;
                    continue;
                }
                let n = tokio::select! {
                    biased;
                    n = rx.recv_many(&mut batch, max) => n,
                    () = tokio::time::sleep_until(probe_at) => {
                        self.probe().await;
                        continue;
                    }
                };
                if n > 0 {
                    if tokio::time::Instant::now() >= probe_at {
                        self.probe().await;
                    }
                    if self.outage.is_some() {
                        self.buffer_batch(std::mem::take(&mut batch)).await;
                        continue;
                    }
                }
                n
            } else {
                match committing.as_mut() {
                    Some((handle, _)) => tokio::select! {
                        biased;
                        done = handle => {
                            if let Some((_, prev)) = committing.take() {
                                self.finish(prev, done).await;
                            }
                            continue;
                        }
                        n = rx.recv_many(&mut batch, max) => n,
                    },
                    None => rx.recv_many(&mut batch, max).await,
                }
            };
            if received == 0 {
                if let Some((handle, prev)) = committing.take() {
                    let done = handle.await;
                    self.finish(prev, done).await;
                }
                self.release().await;
                debug!("sequencer stopped: every handle to the log is gone");
                return;
            }
            crate::metrics::COMMIT_GROUP_SIZE.observe(batch.len() as f64);
            let Some(mut next) = self.prepare(std::mem::take(&mut batch)).await else {
                continue;
            };
            if let Some((handle, prev)) = committing.take() {
                let done = handle.await;
                if !self.finish(prev, done).await {
                    // Built on a batch that did not commit.
                    if self.outage.is_none() {
                        self.cache.clear();
                    }
                    let error = StoreError::Conflict {
                        key: "the previous batch".into(),
                        reason: "it failed to commit, and this batch was built on it",
                    };
                    self.complete(next, Err(error)).await;
                    continue;
                }
            }
            let txn = next.txn.take().unwrap_or_default();
            // The next batch reads these until the commit is done (moved back in `finish`).
            self.in_flight = std::mem::take(&mut next.state.pending);
            let store = self.store.clone();
            committing = Some((
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    let result = store.commit(txn).await;
                    crate::metrics::COMMIT_SECONDS.observe_duration(started.elapsed());
                    if result.is_err() {
                        crate::metrics::COMMIT_FAILURES.inc();
                    }
                    result
                }),
                next,
            ));
        }
    }

    /// Completes the committed batch; returns whether it committed.
    async fn finish(
        &mut self,
        mut batch: Prepared,
        done: Result<Result<(), StoreError>, tokio::task::JoinError>,
    ) -> bool {
        batch.state.pending = std::mem::take(&mut self.in_flight);
        // A panic in the commit is a broken invariant, not a failed write: the sequencer
        // panics too, and the log's watcher makes the process exit saying why.
        let done = done.map_err(|e| match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => e,
        });
        let result = done.unwrap_or_else(|e| {
            Err(StoreError::Backend {
                action: "run a commit",
                message: e.to_string(),
            })
        });
        let ok = result.is_ok();
        self.complete(batch, result).await;
        ok
    }

    /// Data keys the batch needs: each tenant's current key (to seal) and the keys of any
    /// stored events it must open. A tenant whose keys cannot be had (shredded, its tenant
    /// key unavailable) gets its error; the other tenants' requests in the batch go on.
    async fn resolve_keys(
        &self,
        reqs: &[Request],
        fetched: &HashMap<Vec<u8>, Option<Vec<u8>>>,
    ) -> BatchKeys {
        let mut keys = BatchKeys::default();
        for r in reqs {
            let Some((t, _)) = r.cmd.tenant_conv() else {
                continue;
            };
            if keys.refused.contains_key(t)
                || !matches!(self.owned_partition(&r.cmd), Some(Ok(_)))
                || matches!(r.cmd, Command::Replica { .. })
            {
                continue;
            }
            if let Some(cells) = &self.cells
                && !keys.replicate.contains_key(t)
            {
                // Before any key is made: a cell that is not the tenant's home must never
                // create a data key of its own for it.
                match cells.admit(t) {
                    Ok(Some(replication)) => {
                        keys.replicate.insert(t.clone(), replication);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        keys.refused.insert(t.clone(), e);
                        continue;
                    }
                }
            }
            if let Err(e) = self.resolve_request_keys(r, t, fetched, &mut keys).await {
                keys.refused.insert(t.clone(), e);
            }
        }
        keys
    }

    async fn resolve_request_keys(
        &self,
        r: &Request,
        t: &TenantId,
        fetched: &HashMap<Vec<u8>, Option<Vec<u8>>>,
        keys: &mut BatchKeys,
    ) -> Result<(), LogError> {
        if !keys.current.contains_key(t) {
            let k = self.keyring.current(t).await?;
            keys.all.insert((t.clone(), k.id), k.clone());
            keys.current.insert(t.clone(), k);
        }
        if let Command::Append(a) = &r.cmd
            && let Some(target) = author_only_target(&a.body)
        {
            let key = keys::event(&a.tenant, &a.conv, target);
            if let Some(Some(bytes)) = fetched.get(&key) {
                let sealed = SealedEvent::decode(bytes.as_slice())
                    .map_err(|e| LogError::corrupt(&key, e))?;
                if let std::collections::hash_map::Entry::Vacant(slot) =
                    keys.all.entry((a.tenant.clone(), sealed.key_id))
                {
                    slot.insert(self.keyring.key(&a.tenant, sealed.key_id).await?);
                }
            }
        }
        Ok(())
    }

    /// Reads what the batch needs: cached keys from the cache, the rest in one `batch_get`.
    /// Requests for partitions this writer does not own read nothing (they are refused).
    async fn fetch(
        &self,
        reqs: &[Request],
    ) -> Result<HashMap<Vec<u8>, Option<Vec<u8>>>, StoreError> {
        let wanted = batch_reads(
            reqs.iter()
                .filter(|r| matches!(self.owned_partition(&r.cmd), Some(Ok(_)))),
        );
        let mut fetched = HashMap::with_capacity(wanted.len());
        let mut missing = Vec::new();
        for key in wanted {
            // The batch being committed right now first: its writes are not in the store yet.
            if let Some(value) = self.in_flight.get(&key) {
                fetched.insert(key, value.clone());
                continue;
            }
            match self.cache.get(&key) {
                Some(value) => {
                    fetched.insert(key, value.clone());
                }
                None => missing.push(key),
            }
        }
        if !missing.is_empty() {
            let values = self.store.batch_get(missing.clone()).await?;
            fetched.extend(missing.into_iter().zip(values));
        }
        Ok(fetched)
    }

    /// Reads, applies and seals a batch: everything but the commit. `None` when the batch
    /// failed before anything could be applied (its callers have been answered).
    async fn prepare(&mut self, reqs: Vec<Request>) -> Option<Prepared> {
        // Partitions acquired since the last batch first, so their requests in this batch
        // are read and applied.
        for r in &reqs {
            if let Command::Lease(LeaseOp::Adopt(acquired)) = &r.cmd {
                self.adopt(acquired).await;
            }
        }
        let fetched = match self.fetch(&reqs).await {
            Ok(fetched) => fetched,
            Err(e) if self.is_outage_error(&e) => {
                self.enter_outage(&e);
                fail_all(reqs, self.unavailable(&e));
                return None;
            }
            Err(e) => {
                fail_all(reqs, LogError::Store(e));
                return None;
            }
        };
        Some(self.apply_batch(reqs, fetched).await)
    }

    /// Applies and seals a batch over the values read for it: everything but the commit.
    pub(crate) async fn apply_batch(
        &mut self,
        reqs: Vec<Request>,
        fetched: HashMap<Vec<u8>, Option<Vec<u8>>>,
    ) -> Prepared {
        let BatchKeys {
            current,
            all: data_keys,
            refused,
            replicate,
        } = self.resolve_keys(&reqs, &fetched).await;
        // Each replicated tenant's writes of this batch, per conversation: one outbox row each.
        let mut outbox = Outbox::new();

        let mut state = State {
            fetched,
            pending: HashMap::new(),
            order: Vec::new(),
            announce: Vec::new(),
            unsealed: HashMap::new(),
        };
        let now_ms = crate::now_ms();
        let mut results = Vec::with_capacity(reqs.len());
        let mut partitions = Vec::with_capacity(reqs.len());
        let mut touched = BTreeSet::new();
        // Releases expect the lease as held, like any commit, though they stop holding it.
        let mut fence: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for r in &reqs {
            let partition = match self.owned_partition(&r.cmd) {
                None => {
                    match r.cmd {
                        Command::Lease(LeaseOp::Renew) => {
                            self.renew(&mut state, &mut touched, now_ms);
                        }
                        Command::Lease(LeaseOp::Release) => {
                            self.release_in(&mut state, &mut fence);
                        }
                        _ => {}
                    }
                    partitions.push(None);
                    results.push(Ok(Outcome::Leases { lost: Vec::new() }));
                    continue;
                }
                Some(Err(not_owner)) => {
                    partitions.push(None);
                    results.push(Err(not_owner));
                    continue;
                }
                Some(Ok(p)) => p,
            };
            partitions.push(Some(partition));
            let Some((t, _)) = r.cmd.tenant_conv() else {
                results.push(Err(LogError::corrupt(
                    b"",
                    "internal: write without a conversation",
                )));
                continue;
            };
            if let Some(e) = refused.get(t) {
                results.push(Err(e.clone()));
                continue;
            }
            let epoch = self.held.get(&partition).map_or(0, |h| h.lease.epoch);
            let mut scratch = Scratch {
                state: &state,
                writes: HashMap::new(),
                order: Vec::new(),
                unsealed: HashMap::new(),
                keys: &data_keys,
                current: current.get(t),
                now_ms,
                rng: &mut self.rng,
                // Committed events in the clear: for the feed, and for the hot indexer.
                announce: (self.feed.is_some() || self.indexer.is_some()).then(Vec::new),
                epoch,
            };
            let result = scratch.apply(&r.cmd, &self.cfg);
            if result.is_ok() {
                let Scratch {
                    mut writes,
                    order,
                    announce,
                    unsealed,
                    ..
                } = scratch;
                state.announce.extend(announce.unwrap_or_default());
                state.unsealed.extend(unsealed);
                if !order.is_empty() {
                    touched.insert(partition);
                }
                if replicate.contains_key(t)
                    && !order.is_empty()
                    && let Some((_, c)) = r.cmd.tenant_conv()
                {
                    outbox
                        .entry((partition, t.clone(), c.clone()))
                        .or_default()
                        .extend(order.iter().cloned());
                }
                for key in order {
                    let value = writes.remove(&key).flatten();
                    if state.pending.insert(key.clone(), value).is_none() {
                        state.order.push(key);
                    }
                }
            }
            results.push(result);
        }
        // Everything below (the outbox, the transaction, the next batch) sees sealed events.
        self.seal(&mut state).await;
        let positions = self.write_outbox(&mut state, outbox, &replicate, now_ms);
        // The fence: each touched partition's lease exactly as this writer holds it.
        fence.extend(
            touched
                .iter()
                .filter_map(|p| Some((keys::lease(*p), self.expected_lease(*p)?))),
        );
        let txn = transaction(&state, fence);
        // What a synchronous tenant's answer waits for: its partition's newest outbox row,
        // the one this batch wrote or (a duplicate) the last one written before.
        let sync_waits = reqs
            .iter()
            .zip(&partitions)
            .map(|(r, p)| {
                let (t, _) = r.cmd.tenant_conv()?;
                let p = (*p)?;
                if !replicate.get(t)?.sync {
                    return None;
                }
                positions
                    .get(&(p, t.clone()))
                    .copied()
                    .or_else(|| self.outbox_last.get(&p).copied())
                    .map(|at| (p, at))
            })
            .collect();
        Prepared {
            reqs,
            results,
            partitions,
            state,
            txn: Some(txn),
            sync_waits,
            wrote_outbox: !positions.is_empty(),
        }
    }

    /// Seals the batch's new events in one go, on the blocking pool when they are large
    /// ([`crate::crypto::INLINE_CRYPTO_BYTES`] in all), so a batch of big messages does not
    /// hold an async worker (the sessions scheduled on it) while AES-SIV runs.
    async fn seal(&self, state: &mut State) {
        if state.unsealed.is_empty() {
            return;
        }
        let unsealed = std::mem::take(&mut state.unsealed);
        let bytes = unsealed.values().map(|u| u.plain.len()).sum();
        if crate::crypto::is_large(bytes) {
            self.stats
                .sealed_off_runtime
                .fetch_add(1, Ordering::Relaxed);
        }
        let sealed = crate::crypto::off_runtime_if_large(bytes, move || {
            unsealed
                .into_iter()
                .map(|(key, u)| (key, u.seal()))
                .collect::<Vec<_>>()
        })
        .await;
        for (key, value) in sealed {
            // Its place in `order` was taken when the placeholder was written.
            state.pending.insert(key, Some(value));
        }
    }

    /// Writes one outbox row per conversation of a replicated tenant the batch wrote, holding
    /// those writes as the batch made them; returns each (partition, tenant)'s newest row.
    fn write_outbox(
        &mut self,
        state: &mut State,
        outbox: Outbox,
        replicate: &HashMap<TenantId, crate::cells::Replication>,
        now_ms: i64,
    ) -> HashMap<(u32, TenantId), crate::cells::Position> {
        let mut positions = HashMap::new();
        let Some(cells) = &self.cells else {
            return positions;
        };
        for ((p, t, c), keys_written) in outbox {
            let (Some(epoch), Some(replication)) =
                (self.held.get(&p).map(|h| h.lease.epoch), replicate.get(&t))
            else {
                continue;
            };
            let n = match self.outbox_last.get(&p) {
                Some((e, n)) if *e == epoch => n + 1,
                _ => 1,
            };
            let batch = ReplicaBatch {
                source: cells.name().to_string(),
                tenant: t.to_string(),
                conversation: c.to_string(),
                partition: p,
                partitions: self.own.partitions,
                epoch,
                n,
                writes: keys_written
                    .into_iter()
                    .map(|key| {
                        let value = state.pending.get(&key).cloned().flatten();
                        ReplicaWrite { key, value }
                    })
                    .collect(),
                keys: Vec::new(),
                dr: replication.dr.clone(),
                time_ms: now_ms,
                placement_version: replication.version,
                mac: Vec::new(),
            };
            let key = keys::outbox(p, epoch, n);
            if state
                .pending
                .insert(key.clone(), Some(batch.encode_to_vec()))
                .is_none()
            {
                state.order.push(key);
            }
            self.outbox_last.insert(p, (epoch, n));
            positions.insert((p, t), (epoch, n));
        }
        positions
    }

    /// Answers a batch after its commit: on success updates the cache and the leases held,
    /// announces and replies; on failure drops what it believed, reads the leases back and
    /// fails the batch's writes (with `not_owner` where the partition was lost).
    async fn complete(&mut self, batch: Prepared, committed: Result<(), StoreError>) {
        let Prepared {
            reqs,
            results,
            partitions,
            state,
            sync_waits,
            wrote_outbox,
            ..
        } = batch;
        if let Err(e) = committed {
            warn!(error = %e, requests = reqs.len(), "failed to commit a batch");
            if self.is_outage_error(&e) || self.outage.is_some() {
                // Not applied (an outage error): the cache still holds what the store
                // holds, and the send buffer builds on it.
                self.enter_outage(&e);
                let answer = self.unavailable(&e);
                for (r, result) in reqs.into_iter().zip(results) {
                    let _ = r.reply.send(match result {
                        Ok(Outcome::Leases { .. }) => Ok(Outcome::Leases { lost: Vec::new() }),
                        Ok(_) => Err(answer.clone()),
                        refused => refused,
                    });
                }
                return;
            }
            // What the store holds now is unknown to us: read it afresh next time.
            self.cache.clear();
            let lost = self.detect_loss().await;
            for ((r, result), partition) in reqs.into_iter().zip(results).zip(partitions) {
                let answer = match (result, partition) {
                    (Ok(Outcome::Leases { .. }), _) => Ok(Outcome::Leases {
                        lost: lost.iter().copied().collect(),
                    }),
                    // Lost now, or before (a batch built on the one that found out).
                    (Ok(_), Some(p)) if lost.contains(&p) || !self.held.contains_key(&p) => {
                        Err(self.own.not_owner(p))
                    }
                    (Ok(_), _) => Err(LogError::Store(e.clone())),
                    (refused, _) => refused,
                };
                let _ = r.reply.send(answer);
            }
            return;
        }
        for (key, value) in &state.fetched {
            if !state.pending.contains_key(key) {
                self.cache.remember(key, value.as_ref());
            }
        }
        for (key, value) in &state.pending {
            if key.starts_with(b"ls\0") {
                self.remember_lease(key, value.as_deref());
            } else {
                self.cache.remember(key, value.as_ref());
            }
        }
        if !state.pending.is_empty() {
            self.stats.commits.fetch_add(1, Ordering::Relaxed);
        }
        // The indexer's copy of the batch's events (shared, not copied).
        let plain: Vec<Arc<Event>> = match &self.indexer {
            None => Vec::new(),
            Some(_) => state
                .announce
                .iter()
                .filter_map(|item| match item {
                    FeedItem::Event { event, .. } => Some(event.clone()),
                    FeedItem::ReadCursor { .. } => None,
                })
                .collect(),
        };
        if let Some(feed) = &self.feed {
            for item in state.announce {
                if feed.try_send(item).is_err() {
                    self.stats.feed_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.stats
            .requests
            .fetch_add(reqs.len() as u64, Ordering::Relaxed);
        if let Some(cells) = &self.cells
            && wrote_outbox
        {
            cells.outbox_written.notify_one();
        }
        for ((r, result), wait) in reqs.into_iter().zip(results).zip(sync_waits) {
            match (wait, &self.cells) {
                // A synchronous tenant's commit is answered once its DR cell has it.
                (Some((p, at)), Some(cells)) if matches!(result, Ok(Outcome::Committed(_))) => {
                    let cells = cells.clone();
                    tokio::spawn(async move {
                        let answer = match cells.await_acknowledged(p, at).await {
                            Ok(()) => result,
                            Err(e) => Err(e),
                        };
                        let _ = r.reply.send(answer);
                    });
                }
                // The caller may have given up waiting; the write stands either way.
                _ => {
                    let _ = r.reply.send(result);
                }
            }
        }
        // After the replies: the index is never what an append waits for.
        if let Some(indexer) = &self.indexer {
            indexer.offer(plain, committed_heads(&state.pending));
        }
    }
}

/// A batch's writes of replicated tenants, per (partition, tenant, conversation): the keys
/// written (`write_outbox` makes one outbox row of each, so a send buffered during a store
/// outage carries its own row, `outage::records_of`).
type Outbox = std::collections::BTreeMap<(u32, TenantId, ConvId), Vec<Vec<u8>>>;

/// The data keys a batch uses, and the tenants whose keys could not be had.
#[derive(Default)]
struct BatchKeys {
    /// Each tenant's newest key, which seals its new events.
    current: HashMap<TenantId, DataKey>,
    /// Every key the batch opens or seals with.
    all: HashMap<(TenantId, u32), DataKey>,
    /// Tenants whose requests are refused with this error.
    refused: HashMap<TenantId, LogError>,
    /// Tenants whose writes are replicated to a DR cell (`cells`).
    replicate: HashMap<TenantId, crate::cells::Replication>,
}

/// A batch applied and sealed, waiting for (or in) its commit.
pub(crate) struct Prepared {
    pub reqs: Vec<Request>,
    pub results: Vec<Result<Outcome, LogError>>,
    /// Each request's partition, where it is a write this writer owns.
    pub partitions: Vec<Option<u32>>,
    pub state: State,
    pub txn: Option<Transaction>,
    /// Per request: the outbox position a synchronous tenant's answer waits for.
    pub sync_waits: Vec<Option<(u32, crate::cells::Position)>>,
    /// The batch wrote outbox rows (the relay is woken once it commits).
    pub wrote_outbox: bool,
}

/// The batch as one transaction: first the fence (each touched partition's lease as this
/// writer holds it), then every head it moves is checked against the value the batch read,
/// then everything is written as decided. Events need no check of their own: an event key
/// above a head is only ever written together with that head, so a head that still holds the
/// value we read proves the seqs we assign are free.
fn transaction(state: &State, fence: Vec<(Vec<u8>, Vec<u8>)>) -> Transaction {
    let mut txn = Transaction::new();
    for (key, value) in fence {
        txn.expect(key, Some(value));
    }
    for key in &state.order {
        let value = state.pending.get(key).cloned().flatten();
        if key.starts_with(b"hd\0") {
            let read = state.fetched.get(key).cloned().flatten();
            txn.expect(key.clone(), read);
        }
        match value {
            Some(v) => txn.put(key.clone(), v),
            None => txn.delete(key.clone()),
        };
    }
    txn
}

/// Every key the commands of `reqs` read, sorted and once each.
pub(crate) fn batch_reads<'a>(reqs: impl Iterator<Item = &'a Request>) -> Vec<Vec<u8>> {
    let mut wanted = Vec::new();
    for r in reqs {
        r.cmd.reads(&mut wanted);
    }
    wanted.sort_unstable();
    wanted.dedup();
    wanted
}

pub(crate) fn fail_all(reqs: Vec<Request>, e: LogError) {
    warn!(error = %e, requests = reqs.len(), "failed to prepare a batch");
    for r in reqs {
        let _ = r.reply.send(Err(e.clone()));
    }
}
