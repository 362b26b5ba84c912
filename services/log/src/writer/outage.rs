//! The sequencer while the store cannot commit
//! ([docs/decisions/send-buffer.md](../../../../docs/decisions/send-buffer.md)).
//!
//! A commit that fails with an outage error (`Unreachable`, `Io`: the store says nothing
//! was applied) puts the writer in outage mode, if it has a send buffer. Then, batch by
//! batch and without pipelining:
//! - appends (posts, edits, recalls, reactions) of partitions it holds are applied as
//!   usual over what it knows: the send buffer's records, then its exact cache, then the
//!   store if it still reads. Their writes go to the send buffer as one record per
//!   conversation, fsynced; then they are acknowledged and announced like committed ones.
//! - everything else (creating conversations, membership, renames, read cursors) fails
//!   `unavailable`, retryably: those change what the cache would have to predict.
//! - every `PROBE_INTERVAL` (and before a batch when due) a probe renews the leases held;
//!   once that commits, the buffer is replayed into the store in seq order, trimmed, and the
//!   writer commits as usual again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prost::Message;
use tidings_schemas::storage::{Head, Lease};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Command, LeaseOp, Outage, Outcome, Request, State, Writer, fail_all};
use crate::error::LogError;
use crate::feed::FeedItem;
use crate::keys;
use crate::lease::{Held, partition_of_part};
use crate::send_buffer::{AppendRefused, Record, SendBuffer};
use crate::store::{StoreError, Transaction};

/// How often a writer in outage mode tries the store again.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// Records replayed per transaction.
const REPLAY_RECORDS_PER_COMMIT: usize = 256;

/// How often the buffer's size is logged while the outage lasts.
const REPORT_INTERVAL: Duration = Duration::from_secs(5);

impl Writer {
    /// Whether the error means "the store is out, nothing was applied", and this writer can
    /// buffer through it.
    pub(crate) fn is_outage_error(&self, e: &StoreError) -> bool {
        self.buffer.is_some() && matches!(e, StoreError::Unreachable { .. } | StoreError::Io { .. })
    }

    pub(crate) fn enter_outage(&mut self, e: &StoreError) {
        if self.outage.is_some() || self.buffer.is_none() {
            return;
        }
        warn!(
            error = %e,
            "the store cannot commit: messages go to the send buffer until it is back"
        );
        self.start_outage();
    }

    /// Buffered records were found at open: replay them before anything commits.
    pub(crate) fn replay_first(&mut self) {
        self.start_outage();
        if let Some(o) = self.outage.as_mut() {
            o.next_probe = Instant::now();
        }
    }

    fn start_outage(&mut self) {
        let now = Instant::now();
        self.outage = Some(Outage {
            since: now,
            next_probe: now + PROBE_INTERVAL,
            next_report: now + REPORT_INTERVAL,
        });
    }

    /// When to try the store next; `None` when not in outage mode.
    pub(crate) fn probe_at(&self) -> Option<Instant> {
        self.outage.as_ref().map(|o| o.next_probe)
    }

    pub(crate) fn unavailable(&self, e: &StoreError) -> LogError {
        LogError::Unavailable {
            reason: format!("the store cannot commit ({e}); only messages are buffered"),
        }
    }

    /// Loads what the send buffer holds of a partition being adopted. False if it cannot be
    /// read: the partition must not be taken then.
    pub(crate) async fn load_buffered(&mut self, partition: u32, epoch: u64) -> bool {
        let Some(buffer) = self.buffer.clone() else {
            return true;
        };
        let loaded = buffer.adopt(partition, epoch).await;
        match loaded {
            Ok(0) => true,
            Ok(records) => {
                warn!(
                    partition,
                    records, "adopted a partition with buffered events: replaying them first"
                );
                if self.outage.is_none() {
                    self.start_outage();
                }
                // Replay at once rather than after a probe interval.
                if let Some(o) = self.outage.as_mut() {
                    o.next_probe = Instant::now();
                }
                true
            }
            Err(e) => {
                warn!(partition, error = %e, "failed to load the send buffer of a partition; not taking it");
                false
            }
        }
    }

    /// Tries the store: renews the leases held (the probe), then replays the buffer. Leaves
    /// outage mode once every record is in the store.
    pub(crate) async fn probe(&mut self) {
        let Some(buffer) = self.buffer.clone() else {
            self.outage = None;
            return;
        };
        let result = match self.renew_now().await {
            Ok(()) => self.replay(&buffer).await,
            Err(e) => Err(e),
        };
        let now = Instant::now();
        match result {
            Ok(()) => {
                let lasted = self.outage.take().map(|o| o.since.elapsed());
                // Replay moved heads behind the cache's back.
                self.cache.clear();
                let stats = buffer.stats();
                self.stats
                    .replayed_events
                    .store(stats.replayed, Ordering::Relaxed);
                self.stats.buffered_events.store(0, Ordering::Relaxed);
                info!(
                    lasted_ms = lasted.map_or(0, |d| d.as_millis() as u64),
                    replayed_total = stats.replayed,
                    "the store commits again: the send buffer is replayed and empty"
                );
            }
            Err(e) => {
                if matches!(e, LogError::Store(StoreError::Conflict { .. })) {
                    // A fence failed: some lease changed hands (or a record does not fit).
                    self.detect_loss().await;
                }
                let stats = buffer.stats();
                self.stats
                    .buffered_events
                    .store(stats.events, Ordering::Relaxed);
                if let Some(o) = self.outage.as_mut() {
                    o.next_probe = now + PROBE_INTERVAL;
                    if now >= o.next_report {
                        o.next_report = now + REPORT_INTERVAL;
                        warn!(
                            error = %e,
                            outage_ms = o.since.elapsed().as_millis() as u64,
                            buffered_events = stats.events,
                            buffered_bytes = stats.bytes,
                            oldest_age_ms = if stats.oldest_ms == 0 { 0 } else { crate::now_ms() - stats.oldest_ms },
                            "the store is still unavailable"
                        );
                    } else {
                        debug!(error = %e, "the store is still unavailable");
                    }
                }
            }
        }
    }

    /// Renews every lease held in one transaction (what proves the store commits again).
    async fn renew_now(&mut self) -> Result<(), LogError> {
        if self.held.is_empty() {
            return Ok(());
        }
        let now = crate::now_ms();
        let mut txn = Transaction::new();
        let mut renewed = Vec::with_capacity(self.held.len());
        for (p, held) in &self.held {
            let lease = Lease {
                expires_ms: now + self.own.ttl_ms,
                ..held.lease.clone()
            };
            let key = keys::lease(*p);
            txn.expect(key.clone(), Some(held.bytes.clone()));
            txn.put(key, lease.encode_to_vec());
            renewed.push((*p, lease));
        }
        self.store.commit(txn).await?;
        for (p, lease) in renewed {
            self.held.insert(p, Held::new(lease));
        }
        Ok(())
    }

    /// Replays every record of the partitions held, partition by partition, in file order
    /// (seq order per conversation), then trims each partition's file.
    async fn replay(&mut self, buffer: &Arc<SendBuffer>) -> Result<(), LogError> {
        for p in buffer.partitions() {
            if !self.held.contains_key(&p) {
                buffer.drop_partition(p);
                continue;
            }
            let records = buffer.records(p);
            let started = Instant::now();
            let events: u64 = records.iter().map(Record::events).sum();
            for chunk in records.chunks(REPLAY_RECORDS_PER_COMMIT) {
                self.replay_chunk(p, chunk).await?;
            }
            let epoch = self.held.get(&p).map_or(0, |h| h.lease.epoch);
            buffer.trim(p, epoch).await?;
            info!(
                partition = p,
                events,
                replay_ms = started.elapsed().as_millis() as u64,
                "replayed a partition's send buffer into the store"
            );
        }
        Ok(())
    }

    /// Lands a run of records in one transaction, fenced by the lease. A record whose
    /// conversation head already reached its `after` landed before (a replay interrupted
    /// after its commit) and is skipped; one that does not start at the head is refused.
    /// Dedupe records already in the store are kept (see the decision's caveat).
    async fn replay_chunk(&mut self, p: u32, chunk: &[Record]) -> Result<(), LogError> {
        let mut wanted: Vec<Vec<u8>> = chunk
            .iter()
            .flat_map(|r| r.writes.iter().map(|(k, _)| k))
            .filter(|k| k.starts_with(b"hd\0") || k.starts_with(b"dd\0"))
            .cloned()
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let values = self.store.batch_get(wanted.clone()).await?;
        let stored: HashMap<Vec<u8>, Option<Vec<u8>>> = wanted.into_iter().zip(values).collect();
        let mut heads: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut txn = Transaction::new();
        let fence = self
            .expected_lease(p)
            .ok_or_else(|| self.own.not_owner(p))?;
        txn.expect(keys::lease(p), Some(fence));
        for (key, value) in &stored {
            if key.starts_with(b"hd\0") {
                let seq = match value {
                    Some(bytes) => {
                        Head::decode(bytes.as_slice())
                            .map_err(|e| LogError::corrupt(key, e))?
                            .last_seq
                    }
                    None => 0,
                };
                heads.insert(key.clone(), seq);
                txn.expect(key.clone(), value.clone());
            }
        }
        let mut puts: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut at: HashMap<Vec<u8>, usize> = HashMap::new();
        for r in chunk {
            let head_key = r
                .head_key()
                .ok_or_else(|| LogError::corrupt(b"", "a buffered record without a head"))?;
            let current = heads.get(head_key).copied().unwrap_or(0);
            if current >= r.after {
                continue;
            }
            if current != r.before {
                return Err(LogError::corrupt(
                    head_key,
                    format!(
                        "a buffered record builds on seq {} but the stored head is {current}",
                        r.before
                    ),
                ));
            }
            for (k, v) in &r.writes {
                if k.starts_with(b"dd\0") && stored.get(k).is_some_and(Option::is_some) {
                    continue;
                }
                match at.get(k) {
                    Some(i) => puts[*i].1 = v.clone(),
                    None => {
                        at.insert(k.clone(), puts.len());
                        puts.push((k.clone(), v.clone()));
                    }
                }
            }
            heads.insert(head_key.to_vec(), r.after);
        }
        if puts.is_empty() {
            return Ok(());
        }
        for (k, v) in puts {
            txn.put(k, v);
        }
        self.store.commit(txn).await?;
        Ok(())
    }

    /// One batch in outage mode: appends into the send buffer, the rest refused.
    pub(crate) async fn buffer_batch(&mut self, reqs: Vec<Request>) {
        let Some(buffer) = self.buffer.clone() else {
            fail_all(
                reqs,
                LogError::Unavailable {
                    reason: "the store cannot commit".into(),
                },
            );
            return;
        };
        let mut appends = Vec::with_capacity(reqs.len());
        for r in reqs {
            let answer = match &r.cmd {
                Command::Append(_) => match self.owned_partition(&r.cmd) {
                    Some(Ok(_)) => {
                        appends.push(r);
                        continue;
                    }
                    Some(Err(not_owner)) => Err(not_owner),
                    None => continue,
                },
                Command::Lease(LeaseOp::Adopt(acquired)) => {
                    self.adopt(acquired).await;
                    Ok(Outcome::Leases { lost: Vec::new() })
                }
                // The probe renews; a renewal cannot commit now anyway.
                Command::Lease(LeaseOp::Renew) => Ok(Outcome::Leases { lost: Vec::new() }),
                Command::Lease(LeaseOp::Release) => {
                    self.release().await;
                    Ok(Outcome::Leases { lost: Vec::new() })
                }
                _ => Err(LogError::Unavailable {
                    reason: "the store is unavailable; only messages (posts, edits, recalls, \
                             reactions) are accepted until it is back"
                        .into(),
                }),
            };
            let _ = r.reply.send(answer);
        }
        if appends.is_empty() {
            return;
        }
        let now_ms = crate::now_ms();
        if let Err(reason) = buffer.check_limits(0, now_ms) {
            fail_all(appends, LogError::Unavailable { reason });
            return;
        }
        let (fetched, unknown) = self.fetch_known(&appends, &buffer).await;
        let mut ready = Vec::with_capacity(appends.len());
        for r in appends {
            let mut wanted = Vec::new();
            r.cmd.reads(&mut wanted);
            if wanted.iter().any(|k| unknown.contains(k)) {
                let _ = r.reply.send(Err(LogError::Unavailable {
                    reason: "the store is unavailable and this conversation (or the message \
                             it refers to) is not in the writer's memory"
                        .into(),
                }));
            } else {
                ready.push(r);
            }
        }
        if ready.is_empty() {
            return;
        }
        let prepared = self.apply_batch(ready, fetched).await;
        let mut reqs = prepared.reqs;
        let mut results = prepared.results;
        let partitions = prepared.partitions;
        let state = prepared.state;

        let (mut by_partition, bytes) = records_of(&state, now_ms, self.own.partitions);
        let mut failed: HashMap<u32, LogError> = HashMap::new();
        if let Err(reason) = buffer.check_limits(bytes, now_ms) {
            for p in by_partition.keys() {
                failed.insert(
                    *p,
                    LogError::Unavailable {
                        reason: reason.clone(),
                    },
                );
            }
            by_partition.clear();
        }
        // Every partition at once: their fsyncs (or stream writes) overlap instead of queueing
        // one after another.
        let writes: Vec<_> = by_partition
            .into_iter()
            .map(|(p, records)| {
                let epoch = self.held.get(&p).map_or(0, |h| h.lease.epoch);
                let b = buffer.clone();
                (
                    p,
                    epoch,
                    tokio::spawn(async move { b.append(p, epoch, records).await }),
                )
            })
            .collect();
        for (p, epoch, handle) in writes {
            match handle.await {
                Ok(Ok(())) => {}
                Ok(Err(AppendRefused::Fenced { epoch: theirs })) => {
                    warn!(
                        partition = p,
                        epoch,
                        adopted_by_epoch = theirs,
                        "lost a partition to a writer that adopted its send buffer"
                    );
                    self.held.remove(&p);
                    self.own.set(p, false, "");
                    self.cache.forget_partition(p, self.own.partitions);
                    buffer.drop_partition(p);
                    failed.insert(p, self.own.not_owner(p));
                }
                Ok(Err(AppendRefused::Io(e))) => {
                    warn!(partition = p, error = %e, "failed to write the send buffer");
                    failed.insert(
                        p,
                        LogError::Unavailable {
                            reason: "the store is unavailable and the send buffer failed to write"
                                .into(),
                        },
                    );
                }
                Err(e) => {
                    failed.insert(
                        p,
                        LogError::Unavailable {
                            reason: format!("the send buffer write did not finish: {e}"),
                        },
                    );
                }
            }
        }
        for (result, partition) in results.iter_mut().zip(&partitions) {
            if let (Ok(_), Some(p)) = (&result, partition)
                && let Some(e) = failed.get(p)
            {
                *result = Err(e.clone());
            }
        }
        if let Some(feed) = &self.feed {
            for item in state.announce {
                if let FeedItem::Event { event: e, .. } = &item
                    && !failed.is_empty()
                {
                    let part = [e.tenant.as_bytes(), b"\0", e.conversation.as_bytes()].concat();
                    let p = partition_of_part(&part, self.own.partitions);
                    if failed.contains_key(&p) {
                        continue;
                    }
                }
                if feed.try_send(item).is_err() {
                    self.stats.feed_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let stats = buffer.stats();
        self.stats
            .buffered_events
            .store(stats.events, Ordering::Relaxed);
        self.stats
            .requests
            .fetch_add(reqs.len() as u64, Ordering::Relaxed);
        for (r, result) in reqs.drain(..).zip(results.drain(..)) {
            let _ = r.reply.send(result);
        }
    }

    /// What a batch in outage mode reads: the buffer's values over the cache over the store
    /// (if it still reads). Keys none of them can give are returned as unknown, except
    /// dedupe keys, taken as absent (the decision's caveat).
    async fn fetch_known(
        &self,
        reqs: &[Request],
        buffer: &SendBuffer,
    ) -> (HashMap<Vec<u8>, Option<Vec<u8>>>, HashSet<Vec<u8>>) {
        let wanted = crate::writer::batch_reads(reqs.iter());
        let mut fetched = HashMap::with_capacity(wanted.len());
        let mut missing = Vec::new();
        for key in wanted {
            if let Some(value) = buffer.get(&key) {
                fetched.insert(key, Some(value));
            } else if let Some(value) = self.cache.get(&key) {
                fetched.insert(key, value.clone());
            } else {
                missing.push(key);
            }
        }
        let mut unknown = HashSet::new();
        if !missing.is_empty() {
            match self.store.batch_get(missing.clone()).await {
                Ok(values) => fetched.extend(missing.into_iter().zip(values)),
                Err(_) => {
                    for key in missing {
                        // List entries only keep own messages out of unread counts.
                        if key.starts_with(b"dd\0") || key.starts_with(b"uc\0") {
                            fetched.insert(key, None);
                        } else {
                            unknown.insert(key);
                        }
                    }
                }
            }
        }
        (fetched, unknown)
    }
}

/// Puts, in the order made.
type Writes = Vec<(Vec<u8>, Vec<u8>)>;

/// A buffered batch's writes as records: one per conversation, grouped by partition; and
/// their size.
fn records_of(state: &State, now_ms: i64, partitions: u32) -> (BTreeMap<u32, Vec<Record>>, u64) {
    let mut convs: Vec<(Vec<u8>, Writes)> = Vec::new();
    let mut conv_at: HashMap<Vec<u8>, usize> = HashMap::new();
    for key in &state.order {
        let Some(Some(value)) = state.pending.get(key) else {
            continue;
        };
        // An outbox row (cells) goes with the conversation whose writes it holds.
        let outbox_part;
        let part = if key.starts_with(b"ro\0") {
            let Ok(batch) = tidings_schemas::storage::ReplicaBatch::decode(value.as_slice()) else {
                continue;
            };
            outbox_part = [
                batch.tenant.as_bytes(),
                b"\0",
                batch.conversation.as_bytes(),
            ]
            .concat();
            outbox_part.as_slice()
        } else {
            match keys::conversation_part(key) {
                Some(part) => part,
                None => continue,
            }
        };
        let i = *conv_at.entry(part.to_vec()).or_insert_with(|| {
            convs.push((part.to_vec(), Vec::new()));
            convs.len() - 1
        });
        convs[i].1.push((key.clone(), value.clone()));
    }
    let seq_of = |v: Option<&Vec<u8>>| {
        v.and_then(|b| Head::decode(b.as_slice()).ok())
            .map_or(0, |h| h.last_seq)
    };
    let mut by_partition: BTreeMap<u32, Vec<Record>> = BTreeMap::new();
    let mut bytes = 0u64;
    for (part, writes) in convs {
        let Some(head_key) = writes
            .iter()
            .map(|(k, _)| k)
            .find(|k| k.starts_with(b"hd\0"))
        else {
            continue;
        };
        let before = seq_of(state.fetched.get(head_key).and_then(Option::as_ref));
        let after = seq_of(state.pending.get(head_key).and_then(Option::as_ref));
        bytes += writes
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum::<u64>();
        by_partition
            .entry(partition_of_part(&part, partitions))
            .or_default()
            .push(Record {
                before,
                after,
                buffered_ms: now_ms,
                writes,
            });
    }
    (by_partition, bytes)
}
