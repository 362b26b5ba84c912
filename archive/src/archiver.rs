//! One archive pass: move aged events of every tenant from the hot log into segments.
//!
//! For each tenant, conversations are visited in key order and their oldest hot events
//! (older than the tenant's hot window, or beyond its cap of hot events per conversation)
//! are gathered per UTC date. A batch becomes a segment in this order, which is what makes a
//! crash at any point harmless:
//!
//! 1. write the Parquet object;
//! 2. read it back and verify it (size, SHA-256, row count, every (conversation, seq));
//! 3. in one KV transaction: index it (`ax/` runs, `sg/` record) and delete the archived hot
//!    events and their dedupe records.
//!
//! Before step 3 the events are only hot (a crash leaves an unindexed object, which the
//! next pass deletes once it is older than the orphan grace); after it they are only
//! archived. No hot event is deleted unless its segment was verified.
//!
//! Archiving only ever takes a conversation's oldest hot events, so the archived seqs are
//! always a prefix 1..=floor and the hot ones floor+1..=head; readers rely on this.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use prost::Message;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tidings_log::cold::archived_through;
use tidings_log::crypto::Keyring;
use tidings_log::log::open_stored_event;
use tidings_log::store::{KeyRange, KvStore, Order, StoreError, Transaction};
use tidings_log::{ClientMsgId, ConvId, Event, LogError, TenantId, UserId, keys};
use tidings_schemas::storage::{ArchiveRun, ArchiveSegment, Head};

use crate::codec::{self, Dictionary, Packer};
use crate::error::ArchiveError;
use crate::format::{self, Body, Fetched, Footer, WriteOptions, meta};
use crate::search_index;
use crate::storage::{self, Objects};
use tidings_log::hot_index;

const DAY_MS: u64 = 86_400_000;

/// Hot-window policy of one tenant; unset fields fall back to [`ArchiveConfig`]'s.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantPolicy {
    pub hot_window_ms: Option<u64>,
    pub max_hot_events: Option<u64>,
    /// Delete events older than this (both tiers); `None` falls back to the default.
    pub retention_ms: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct ArchiveConfig {
    /// Events older than this move to the archive.
    pub hot_window_ms: u64,
    /// Keep at most this many hot events per conversation (older ones are archived whatever
    /// their age); 0 for no cap.
    pub max_hot_events: u64,
    pub tenants: BTreeMap<String, TenantPolicy>,
    /// Default retention: events older than this are deleted from both tiers unless a legal
    /// hold covers them; `None` keeps history forever.
    pub retention_ms: Option<u64>,
    /// Most events in one segment (and one KV transaction).
    pub segment_max_events: usize,
    pub row_group_events: usize,
    /// Plaintext bytes a pass may hold before it writes what it has.
    pub buffer_bytes: usize,
    pub zstd_level: i32,
    /// Unindexed objects younger than this are left alone (another archiver may be about
    /// to index them); older ones are leftovers of a crash and are deleted.
    pub orphan_grace_ms: u64,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            hot_window_ms: 30 * DAY_MS,
            max_hot_events: 0,
            tenants: BTreeMap::new(),
            retention_ms: None,
            segment_max_events: 256 * 1024,
            row_group_events: 64 * 1024,
            buffer_bytes: 256 << 20,
            zstd_level: 6,
            orphan_grace_ms: 3_600_000,
        }
    }
}

impl ArchiveConfig {
    pub fn validate(&self) -> Result<(), ArchiveError> {
        let bad = |what: &str| Err(ArchiveError::Config(what.to_string()));
        if self.segment_max_events == 0 || self.row_group_events == 0 {
            return bad("segment_max_events and row_group_events must be positive");
        }
        if self.buffer_bytes < 1 << 20 {
            return bad("buffer_bytes must be at least 1 MiB");
        }
        if !(1..=19).contains(&self.zstd_level) {
            return bad("zstd_level must be between 1 and 19");
        }
        for tenant in self.tenants.keys() {
            TenantId::new(tenant.as_str())
                .map_err(|e| ArchiveError::Config(format!("archive.tenants: {e}")))?;
        }
        Ok(())
    }

    fn policy(&self, tenant: &str) -> (u64, u64) {
        let own = self.tenants.get(tenant).cloned().unwrap_or_default();
        (
            own.hot_window_ms.unwrap_or(self.hot_window_ms),
            own.max_hot_events.unwrap_or(self.max_hot_events),
        )
    }

    /// The tenant's retention, if it has one.
    pub fn retention(&self, tenant: &str) -> Option<u64> {
        self.tenants
            .get(tenant)
            .and_then(|p| p.retention_ms)
            .or(self.retention_ms)
            // u64::MAX is a tenant's explicit "forever" over a default.
            .filter(|&ms| ms != u64::MAX)
    }
}

/// What one pass may override.
#[derive(Clone, Debug, Default)]
pub struct PassOptions {
    /// Archive everything older than this, for every tenant (`--older-than`).
    pub older_than_ms: Option<u64>,
    /// Override of [`ArchiveConfig::orphan_grace_ms`].
    pub orphan_grace_ms: Option<u64>,
    /// Only this tenant.
    pub tenant: Option<TenantId>,
}

/// What a pass did. Also its progress report while it runs.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub tenants: u64,
    pub conversations: u64,
    pub events_archived: u64,
    pub segments: u64,
    /// Bytes of segment objects written.
    pub bytes: u64,
    pub orphans_removed: u64,
    /// Events the retention policy deleted.
    pub events_purged: u64,
    /// Segments deleted whole, and rewritten without their expired rows.
    pub segments_purged: u64,
    pub segments_rewritten: u64,
    /// Expired events kept because a legal hold covers them (or an earlier event of their
    /// conversation that is held).
    pub events_held: u64,
    pub duration_ms: u64,
}

/// Crash points for the crash tests: `TIDINGS_FAILPOINT=<name>` aborts the process there.
pub mod failpoint {
    pub const BEFORE_UPLOAD: &str = "archive-before-upload";
    /// Writes the first half of the object, then aborts: an upload cut short.
    pub const PARTIAL_UPLOAD: &str = "archive-partial-upload";
    pub const AFTER_UPLOAD: &str = "archive-after-upload";
    pub const AFTER_VERIFY: &str = "archive-after-verify";
    pub const AFTER_COMMIT: &str = "archive-after-commit";
    pub const ALL: &[&str] = &[
        BEFORE_UPLOAD,
        PARTIAL_UPLOAD,
        AFTER_UPLOAD,
        AFTER_VERIFY,
        AFTER_COMMIT,
    ];

    pub(crate) fn armed(name: &str) -> bool {
        static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        ARMED
            .get_or_init(|| std::env::var("TIDINGS_FAILPOINT").ok())
            .as_deref()
            == Some(name)
    }

    pub(crate) fn hit(name: &str) {
        if armed(name) {
            eprintln!("failpoint {name}: aborting");
            std::process::abort();
        }
    }
}

/// One event waiting to be archived.
pub(crate) struct Pending {
    pub(crate) event: Event,
    pub(crate) plain_bytes: usize,
}

impl Pending {
    pub(crate) fn new(event: Event) -> Self {
        let plain_bytes = event.encoded_len() + 64;
        Pending { event, plain_bytes }
    }
}

/// A segment that a new one replaces (retention rewrote it without its expired rows): the
/// commit drops its record and runs and moves the conversations' retention markers.
pub(crate) struct Replace {
    pub(crate) segment_key: Vec<u8>,
    pub(crate) segment_value: Vec<u8>,
    pub(crate) run_keys: Vec<Vec<u8>>,
    pub(crate) markers: Vec<MarkerMove>,
}

/// A retention marker's move: (key, the value it must still have, the new value).
pub(crate) type MarkerMove = (Vec<u8>, Option<Vec<u8>>, Vec<u8>);

/// The events of one tenant gathered so far, per UTC date, each list sorted by
/// (conversation, seq).
#[derive(Default)]
struct Batch {
    by_date: BTreeMap<String, Vec<Pending>>,
    bytes: usize,
}

pub struct Archiver {
    pub(crate) store: Arc<dyn KvStore>,
    pub(crate) keyring: Arc<Keyring>,
    pub(crate) objects: Objects,
    pub(crate) cfg: ArchiveConfig,
    /// Taken exclusively for a pass; compliance reads in this process take it shared, so
    /// they never see events halfway between the tiers.
    gate: Arc<tokio::sync::RwLock<()>>,
}

impl Archiver {
    pub fn new(
        store: Arc<dyn KvStore>,
        keyring: Arc<Keyring>,
        objects: Objects,
        cfg: ArchiveConfig,
    ) -> Result<Self, ArchiveError> {
        cfg.validate()?;
        Ok(Archiver {
            store,
            keyring,
            objects,
            cfg,
            gate: Arc::default(),
        })
    }

    /// Shares the gate with this process's compliance reads.
    pub fn with_gate(mut self, gate: Arc<tokio::sync::RwLock<()>>) -> Self {
        self.gate = gate;
        self
    }

    /// Runs one pass over every tenant (or the one in `opts`). `progress` is called after
    /// every segment with the totals so far.
    pub async fn run_pass(
        &self,
        opts: &PassOptions,
        progress: &(dyn Fn(&Summary) + Sync),
    ) -> Result<Summary, ArchiveError> {
        let _pass = self.gate.write().await;
        let started = std::time::Instant::now();
        let mut summary = Summary::default();
        let tenants = match &opts.tenant {
            Some(t) => vec![t.clone()],
            None => tenants(&*self.store).await?,
        };
        for tenant in tenants {
            // Its events can no longer be opened, so they can never be archived; they must
            // not stop the pass for everyone else.
            if self.keyring.is_shredded(&tenant).await? {
                tracing::debug!(%tenant, "skipping a shredded tenant");
                continue;
            }
            summary.tenants += 1;
            summary.orphans_removed += self.sweep_orphans(&tenant, opts).await?;
            self.archive_tenant(&tenant, opts, &mut summary, progress)
                .await?;
            if let Some(retention) = self.cfg.retention(tenant.as_str()) {
                self.enforce_retention(&tenant, retention, &mut summary)
                    .await?;
            }
        }
        summary.duration_ms = started.elapsed().as_millis() as u64;
        Ok(summary)
    }

    /// Deletes objects under the tenant's prefix that no index record names, once they are
    /// older than the grace period: what a crash between upload and commit leaves behind.
    async fn sweep_orphans(
        &self,
        tenant: &TenantId,
        opts: &PassOptions,
    ) -> Result<u64, ArchiveError> {
        let grace = opts.orphan_grace_ms.unwrap_or(self.cfg.orphan_grace_ms) as i64;
        let indexed = indexed_segments(&*self.store, tenant).await?;
        let now = tidings_log::now_ms();
        let mut removed = 0;
        let prefix = storage::tenant_prefix(tenant.as_str());
        for object in self.objects.list(&prefix).await? {
            let known = storage::segment_id_of(&object.path).is_some_and(|id| indexed.contains(id));
            if !known && now - object.modified_ms >= grace {
                tracing::info!(path = %object.path, "deleting unindexed archive object");
                self.objects.delete(&object.path).await?;
                removed += 1;
            }
        }
        // Search indexes of segments no record names (a crash before the commit, or a
        // retention delete that failed); not counted: the count is of segments.
        let indexes = self.objects.search_indexes();
        for object in indexes.list(&prefix).await? {
            let known = storage::search_index_segment_id(&object.path)
                .is_some_and(|id| indexed.contains(id));
            if !known && now - object.modified_ms >= grace {
                tracing::info!(path = %object.path, "deleting the search index of no segment");
                indexes.delete(&object.path).await?;
            }
        }
        Ok(removed)
    }

    async fn archive_tenant(
        &self,
        tenant: &TenantId,
        opts: &PassOptions,
        summary: &mut Summary,
        progress: &(dyn Fn(&Summary) + Sync),
    ) -> Result<(), ArchiveError> {
        let (window, cap) = self.cfg.policy(tenant.as_str());
        let window = opts.older_than_ms.unwrap_or(window);
        // Events past retention are archived first, then deleted from the archive by the
        // retention step of the same pass: one deletion path, held events kept in the cold tier.
        let window = self
            .cfg
            .retention(tenant.as_str())
            .map_or(window, |r| window.min(r));
        let cutoff = tidings_log::now_ms().saturating_sub(window.min(i64::MAX as u64) as i64);
        let cap = if opts.older_than_ms.is_some() { 0 } else { cap };
        let heads = KeyRange::prefix(keys::head_dir(Some(tenant)));
        let mut start = heads.start.clone();
        let mut batch = Batch::default();
        loop {
            let page = self
                .store
                .scan(
                    KeyRange {
                        start: start.clone(),
                        end: heads.end.clone(),
                    },
                    1000,
                    Order::Ascending,
                )
                .await
                .map_err(LogError::from)?;
            let Some((last, _)) = page.last() else { break };
            start = last.clone();
            start.push(0);
            for (key, value) in &page {
                let (_, conv) =
                    keys::head_ids(key).ok_or_else(|| LogError::corrupt(key, "bad head key"))?;
                let conv = ConvId::new(conv)?;
                let head = Head::decode(value.as_slice()).map_err(|e| LogError::corrupt(key, e))?;
                let cap_cut = if cap > 0 {
                    head.last_seq.saturating_sub(cap)
                } else {
                    0
                };
                // A conversation with more aged events than one batch holds is taken in
                // several: each flush moves its floor, and gathering resumes above it.
                let mut taken_any = false;
                loop {
                    let (taken, full) = self
                        .gather(tenant, &conv, head.last_seq, cutoff, cap_cut, &mut batch)
                        .await?;
                    taken_any |= taken > 0;
                    if !full {
                        break;
                    }
                    self.flush(tenant, &mut batch, summary, progress).await?;
                }
                if taken_any {
                    summary.conversations += 1;
                }
            }
        }
        self.flush(tenant, &mut batch, summary, progress).await
    }

    fn batch_full(&self, batch: &Batch) -> bool {
        batch.bytes >= self.cfg.buffer_bytes
            || batch
                .by_date
                .values()
                .any(|rows| rows.len() >= self.cfg.segment_max_events)
    }

    /// Adds the conversation's archivable hot events to the batch, stopping early when the
    /// batch is full. Returns how many it added and whether it stopped early.
    async fn gather(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        head: u64,
        cutoff_ms: i64,
        cap_cut: u64,
        batch: &mut Batch,
    ) -> Result<(u64, bool), ArchiveError> {
        let floor = archived_through(&*self.store, tenant, conv).await?;
        let mut next = floor + 1;
        let mut taken = 0;
        // Dates never go backwards within a conversation, even if the clock did, so a
        // conversation's events in earlier partitions always have the lower seqs.
        let mut date = String::new();
        while next <= head {
            if self.batch_full(batch) {
                return Ok((taken, true));
            }
            let rows = self
                .store
                .scan(
                    keys::event_range(tenant, conv, next, head),
                    256,
                    Order::Ascending,
                )
                .await
                .map_err(LogError::from)?;
            if rows.is_empty() {
                break;
            }
            for (key, value) in rows {
                let seq =
                    keys::event_seq(&key).ok_or_else(|| LogError::corrupt(&key, "bad key"))?;
                if seq != next {
                    return Err(LogError::corrupt(
                        &keys::event(tenant, conv, next),
                        "event missing below the head",
                    )
                    .into());
                }
                let event =
                    open_stored_event(&self.keyring, tenant, conv, seq, &key, &value).await?;
                if event.server_time_ms >= cutoff_ms && seq > cap_cut {
                    return Ok((taken, false));
                }
                let day = storage::utc_date(event.server_time_ms);
                if day > date {
                    date = day;
                }
                let pending = Pending::new(event);
                batch.bytes += pending.plain_bytes;
                let rows = batch.by_date.entry(date.clone()).or_default();
                rows.push(pending);
                taken += 1;
                next = seq + 1;
                // Full exactly at the limit, not a page later: an overshoot would become a
                // segment of its own, a few hundred rows long.
                if rows.len() >= self.cfg.segment_max_events || batch.bytes >= self.cfg.buffer_bytes
                {
                    return Ok((taken, true));
                }
            }
        }
        Ok((taken, false))
    }

    /// Writes every date of the batch as segments, oldest date first (so each
    /// conversation's archived seqs stay a prefix), and empties it.
    async fn flush(
        &self,
        tenant: &TenantId,
        batch: &mut Batch,
        summary: &mut Summary,
        progress: &(dyn Fn(&Summary) + Sync),
    ) -> Result<(), ArchiveError> {
        let by_date = std::mem::take(&mut batch.by_date);
        batch.bytes = 0;
        for (date, mut pending) in by_date {
            while !pending.is_empty() {
                let n = pending.len().min(self.cfg.segment_max_events);
                let chunk: Vec<Pending> = pending.drain(..n).collect();
                let bytes = self.write_segment(tenant, &date, chunk, None).await?;
                summary.segments += 1;
                summary.events_archived += n as u64;
                summary.bytes += bytes;
                progress(summary);
            }
        }
        Ok(())
    }

    /// Steps 1 to 3 for one segment. Returns its size in bytes. With `replaces`, the new
    /// segment takes the place of an old one instead of taking events from the hot log.
    pub(crate) async fn write_segment(
        &self,
        tenant: &TenantId,
        date: &str,
        pending: Vec<Pending>,
        replaces: Option<&Replace>,
    ) -> Result<u64, ArchiveError> {
        let segment_id = uuid::Uuid::now_v7().simple().to_string();
        let path = storage::segment_path(tenant.as_str(), date, &segment_id);
        let key = self.keyring.current(tenant).await?;
        let plain: u64 = pending.iter().map(|p| p.plain_bytes as u64).sum();
        tracing::debug!(%path, rows = pending.len(), plain, "writing archive segment");

        // Encoding and sealing is CPU work: off the runtime, with the events moved there and
        // back rather than copied.
        let cfg = self.cfg.clone();
        let tenant_owned = tenant.clone();
        let segment = segment_id.clone();
        let (built, index, pending) = tokio::task::spawn_blocking(move || {
            let built = build_segment(&cfg, &tenant_owned, &key, &segment, &pending);
            let events: Vec<&Event> = pending.iter().map(|p| &p.event).collect();
            let index = search_index::build(&key, &tenant_owned, &segment, &events);
            (built, index, pending)
        })
        .await
        .map_err(|e| ArchiveError::Encode(format!("segment build task failed: {e}")))?;
        let (bytes, runs, record) = built?;
        let pending = pending.as_slice();
        let bytes = Bytes::from(bytes);
        let digest = off_runtime({
            let bytes = bytes.clone();
            move || Sha256::digest(&bytes).to_vec()
        })
        .await?;

        // The fates of the edits and recalls archived, for a user's search: the hot indexer
        // may never have seen them (archived before it caught up). Read before the upload,
        // committed with the index (on the condition that they did not change meanwhile).
        let mut fates = Transaction::new();
        if replaces.is_none() {
            let mut changes = BTreeMap::new();
            for p in pending {
                if let Some((target, fate)) = hot_index::fate_change(&p.event) {
                    let conv = ConvId::new(p.event.conversation.as_str())?;
                    changes
                        .entry((conv, target))
                        .or_insert_with(hot_index::Fate::default)
                        .merge(fate);
                }
            }
            hot_index::merge_fates(&*self.store, tenant, changes, &mut fates).await?;
        }

        failpoint::hit(failpoint::BEFORE_UPLOAD);
        if failpoint::armed(failpoint::PARTIAL_UPLOAD) {
            self.objects
                .put(&path, bytes.slice(..bytes.len() / 2))
                .await?;
            failpoint::hit(failpoint::PARTIAL_UPLOAD);
        }
        self.objects.put(&path, bytes.clone()).await?;
        failpoint::hit(failpoint::AFTER_UPLOAD);

        if let Err(e) = self.verify_upload(&path, &bytes, &digest, pending).await {
            // Best effort: the next pass's orphan sweep removes it otherwise.
            let _ = self.objects.delete(&path).await;
            return Err(e);
        }
        failpoint::hit(failpoint::AFTER_VERIFY);
        // The search index goes up before the commit, so every indexed segment has one; a
        // crash before the commit leaves it to the orphan sweep with its segment.
        let index_path = storage::search_index_path(&path)
            .ok_or_else(|| ArchiveError::Encode(format!("no search index path for {path}")))?;
        let indexes = self.objects.search_indexes();
        if let Err(e) = indexes.put(&index_path, Bytes::from(index)).await {
            let _ = self.objects.delete(&path).await;
            return Err(e);
        }

        let record = ArchiveSegment {
            path: path.clone(),
            date: date.to_string(),
            bytes: bytes.len() as u64,
            sha256: digest,
            created_ms: tidings_log::now_ms(),
            ..record
        };
        let txn = match replaces {
            None => {
                let mut txn =
                    self.index_transaction(tenant, &segment_id, &path, &record, &runs, pending)?;
                txn.ops.extend(fates.ops);
                txn
            }
            Some(old) => replace_transaction(tenant, &segment_id, &path, &record, &runs, old)?,
        };
        if let Err(e) = self.store.commit(txn).await {
            let _ = self.objects.delete(&path).await;
            let _ = indexes.delete(&index_path).await;
            return Err(match e {
                StoreError::Conflict { .. } => ArchiveError::Conflict {
                    tenant: tenant.to_string(),
                },
                other => LogError::from(other).into(),
            });
        }
        failpoint::hit(failpoint::AFTER_COMMIT);
        // The archived events' hot postings are superseded by the segment's index (search
        // never reads postings below the archived seq); delete them. A failure leaves them
        // unused until the next pass.
        for (conv, _, run) in &runs {
            let conv = ConvId::new(conv.as_str())?;
            if let Err(e) =
                hot_index::forget_postings_through(&*self.store, tenant, &conv, run.last_seq).await
            {
                tracing::warn!(conversation = %conv, "failed to delete archived search postings: {e:#}");
            }
        }
        Ok(bytes.len() as u64)
    }

    /// Step 2: the object as stored is the object as written, row for row.
    async fn verify_upload(
        &self,
        path: &str,
        written: &Bytes,
        digest: &[u8],
        pending: &[Pending],
    ) -> Result<(), ArchiveError> {
        let fail = |reason: String| ArchiveError::Verify {
            path: path.to_string(),
            reason,
        };
        let read = self.objects.get(path).await?;
        if read.len() != written.len() {
            return Err(fail(format!(
                "{} bytes read back, {} written",
                read.len(),
                written.len()
            )));
        }
        // Hashing and decoding up to 256 MiB is CPU work: off the runtime, with the rows
        // expected moved there.
        let expected: Vec<(String, u64)> = pending
            .iter()
            .map(|p| (p.event.conversation.clone(), p.event.seq))
            .collect();
        let digest = digest.to_vec();
        off_runtime(move || check_read_back(read, &digest, &expected))
            .await?
            .map_err(fail)
    }

    /// Step 3: index the segment and delete its events from the hot log, in one transaction.
    fn index_transaction(
        &self,
        tenant: &TenantId,
        segment_id: &str,
        path: &str,
        record: &ArchiveSegment,
        runs: &[(String, u64, ArchiveRun)],
        pending: &[Pending],
    ) -> Result<Transaction, ArchiveError> {
        let mut txn = Transaction::new();
        for (conv, first_seq, run) in runs {
            let conv = ConvId::new(conv.as_str())?;
            txn.put_if_absent(
                keys::archive_run(tenant, &conv, *first_seq),
                ArchiveRun {
                    segment_id: segment_id.to_string(),
                    path: path.to_string(),
                    ..run.clone()
                }
                .encode_to_vec(),
            );
        }
        txn.put_if_absent(keys::segment(tenant, segment_id), record.encode_to_vec());
        for p in pending {
            let e = &p.event;
            let conv = ConvId::new(e.conversation.as_str())?;
            txn.delete(keys::event(tenant, &conv, e.seq));
            if !e.client_msg_id.is_empty() {
                let sender = UserId::new(e.sender.as_str())?;
                let id = ClientMsgId::new(e.client_msg_id.as_str())?;
                txn.delete(keys::dedupe(tenant, &conv, &sender, &id));
            }
        }
        Ok(txn)
    }
}

/// Step 3 of a rewrite: the new segment's record and runs in, the old one's out, the
/// retention markers moved; the hot log is not touched.
fn replace_transaction(
    tenant: &TenantId,
    segment_id: &str,
    path: &str,
    record: &ArchiveSegment,
    runs: &[(String, u64, ArchiveRun)],
    old: &Replace,
) -> Result<Transaction, ArchiveError> {
    let mut txn = Transaction::new();
    let mut new_keys = HashSet::new();
    for (conv, first_seq, run) in runs {
        let conv = ConvId::new(conv.as_str())?;
        let key = keys::archive_run(tenant, &conv, *first_seq);
        new_keys.insert(key.clone());
        txn.put(
            key,
            ArchiveRun {
                segment_id: segment_id.to_string(),
                path: path.to_string(),
                ..run.clone()
            }
            .encode_to_vec(),
        );
    }
    for key in &old.run_keys {
        if !new_keys.contains(key) {
            txn.delete(key.clone());
        }
    }
    // The old record must still be what retention read: nothing else replaced it meanwhile.
    txn.expect(old.segment_key.clone(), Some(old.segment_value.clone()))
        .delete(old.segment_key.clone());
    txn.put_if_absent(keys::segment(tenant, segment_id), record.encode_to_vec());
    for (key, expected, value) in &old.markers {
        txn.expect(key.clone(), expected.clone())
            .put(key.clone(), value.clone());
    }
    Ok(txn)
}

/// Step 1 without the I/O: rows sealed, the Parquet bytes, the index runs
/// (conversation, first seq, run) and the segment record's row-derived fields.
type Built = (Vec<u8>, Vec<(String, u64, ArchiveRun)>, ArchiveSegment);

fn build_segment(
    cfg: &ArchiveConfig,
    tenant: &TenantId,
    key: &tidings_log::crypto::DataKey,
    segment_id: &str,
    pending: &[Pending],
) -> Result<Built, ArchiveError> {
    let mut rows: Vec<format::Row> = pending
        .iter()
        .map(|p| codec::plain_row(&p.event, key.id))
        .collect();
    let dict = {
        let bodies: Vec<&[u8]> = rows.iter().map(|r| r.body.as_slice()).collect();
        Dictionary::train(&bodies, cfg.zstd_level)
    };
    let io = |e: std::io::Error| ArchiveError::Encode(format!("zstd: {e}"));
    let mut packer = Packer::new(dict.as_ref(), cfg.zstd_level).map_err(io)?;
    for row in &mut rows {
        packer.seal(key, tenant, row).map_err(io)?;
    }
    let mut metadata = vec![
        (meta::FORMAT.to_string(), format::FORMAT_VERSION.to_string()),
        (meta::TENANT.to_string(), tenant.to_string()),
        (meta::SEGMENT.to_string(), segment_id.to_string()),
        (meta::KEY_ID.to_string(), key.id.to_string()),
    ];
    if let Some(dict) = &dict {
        let sealed = dict.seal(key, tenant, segment_id);
        metadata.push((
            meta::DICT.to_string(),
            base64::engine::general_purpose::STANDARD.encode(sealed),
        ));
    }
    let opts = WriteOptions {
        row_group_rows: cfg.row_group_events,
        zstd_level: cfg.zstd_level,
        body: Body::Sealed,
        metadata,
    };
    let bytes = format::write_segment(tenant.as_str(), &rows, &opts)
        .map_err(|e| ArchiveError::Encode(format!("writing Parquet: {e}")))?;

    let mut runs: Vec<(String, u64, ArchiveRun)> = Vec::new();
    let mut conversations = HashSet::new();
    for (i, row) in rows.iter().enumerate() {
        let rg = (i / cfg.row_group_events) as u32;
        let offset = (i % cfg.row_group_events) as u64;
        conversations.insert(row.conversation.as_str());
        match runs.last_mut() {
            Some((conv, _, run))
                if *conv == row.conversation
                    && run.row_group == rg
                    && run.last_seq + 1 == row.seq =>
            {
                run.last_seq = row.seq;
            }
            _ => runs.push((
                row.conversation.clone(),
                row.seq,
                ArchiveRun {
                    last_seq: row.seq,
                    row_group: rg,
                    row_offset: offset,
                    ..ArchiveRun::default()
                },
            )),
        }
    }
    let record = ArchiveSegment {
        rows: rows.len() as u64,
        key_id: key.id,
        row_groups: rows.len().div_ceil(cfg.row_group_events) as u32,
        conversations: conversations.len() as u64,
        min_time_ms: rows.iter().map(|r| r.time_ms).min().unwrap_or(0),
        max_time_ms: rows.iter().map(|r| r.time_ms).max().unwrap_or(0),
        ..ArchiveSegment::default()
    };
    Ok((bytes, runs, record))
}

/// Every tenant with a conversation, found by skipping from one tenant's heads to the next's.
pub async fn tenants(store: &dyn KvStore) -> Result<Vec<TenantId>, ArchiveError> {
    let all = KeyRange::prefix(keys::head_dir(None));
    let mut start = all.start.clone();
    let mut found = Vec::new();
    loop {
        let range = KeyRange {
            start,
            end: all.end.clone(),
        };
        let Some((key, _)) = store
            .scan(range, 1, Order::Ascending)
            .await
            .map_err(LogError::from)?
            .into_iter()
            .next()
        else {
            return Ok(found);
        };
        let (tenant, _) =
            keys::head_ids(&key).ok_or_else(|| LogError::corrupt(&key, "bad head key"))?;
        start = keys::after_tenant_heads(&tenant);
        found.push(TenantId::new(tenant)?);
    }
}

/// Ids of every indexed segment of a tenant.
pub async fn indexed_segments(
    store: &dyn KvStore,
    tenant: &TenantId,
) -> Result<HashSet<String>, ArchiveError> {
    let dir = keys::segment_dir(tenant);
    let mut ids = HashSet::new();
    for (key, _) in scan_all(store, KeyRange::prefix(dir.clone())).await? {
        if let Some(id) = keys::last_part(&dir, &key) {
            ids.insert(id);
        }
    }
    Ok(ids)
}

/// A key range read page by page (it lives with the store it reads).
pub use tidings_log::store::{PAGE_ROWS, Pages};

/// Runs CPU work (hashing, decoding a segment) on the blocking pool, so the runtime's few
/// workers keep serving sessions meanwhile.
pub async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ArchiveError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ArchiveError::Encode(format!("a blocking task failed: {e}")))
}

/// The segment read back is the one written: same SHA-256, and the rows `expected` in order.
fn check_read_back(read: Bytes, digest: &[u8], expected: &[(String, u64)]) -> Result<(), String> {
    if Sha256::digest(&read).as_slice() != digest {
        return Err("SHA-256 of the bytes read back differs".into());
    }
    let data = Fetched::whole(read);
    let footer = Footer::parse(&data).map_err(|e| e.to_string())?;
    if footer.rows() != expected.len() as u64 {
        return Err(format!(
            "{} rows, {} written",
            footer.rows(),
            expected.len()
        ));
    }
    let mut expected = expected.iter().map(|(c, s)| (c.as_str(), *s));
    for rg in 0..footer.meta.num_row_groups() {
        for (conv, seq) in format::read_keys(&footer, &data, rg).map_err(|e| e.to_string())? {
            if expected.next() != Some((conv.as_str(), seq)) {
                return Err(format!("row ({conv}, {seq}) is not the row written"));
            }
        }
    }
    Ok(())
}

/// Every pair of `range`, page by page, collected: for ranges known to be small (a
/// conversation's runs, a hold's entries). Whole-tenant reads use [`Pages`].
pub async fn scan_all(
    store: &dyn KvStore,
    range: KeyRange,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ArchiveError> {
    let mut out = Vec::new();
    let mut pages = Pages::new(range);
    while let Some(page) = pages.next(store).await? {
        out.extend(page);
    }
    Ok(out)
}
