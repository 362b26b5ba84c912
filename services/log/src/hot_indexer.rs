//! The hot index's indexer: the task that turns the sequencer's notices into postings, and
//! the log's methods that index a conversation ([`crate::hot_index`] has the index itself:
//! its queue, its postings and its watermarks).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::warn;

use crate::cold::archived_through;
use crate::error::LogError;
use crate::hot_index::{
    BUSY_SLICE, Fate, Indexer, MAX_YIELD, QUIET, fate_change, merge_fates, watermark,
    watermark_value,
};
use crate::ids::{ConvId, TenantId};
use crate::keys;
use crate::log::{Log, WeakLog, open_stored_event};
use crate::search::{kind_term, terms};
use crate::store::{Order, Transaction};
use tidings_schemas::v1::Event;
use tidings_schemas::v1::event::Body;

/// Runs the hot index's indexer until the log closes (see the module doc); holds the log
/// only weakly, so closing it is not held up. Restartable: a second call waits for the
/// first to end, then takes over its queue.
pub async fn run_indexer(weak: WeakLog) -> Result<(), LogError> {
    let Some(indexer) = weak.upgrade().and_then(|l| l.indexer().cloned()) else {
        return Ok(()); // off, or closed
    };
    indexer_loop(weak, indexer).await
}

impl Log {
    /// Indexes `conv` from its watermark through `through` (at most its head): what the
    /// indexer does for each notice. Public for tests and the bench.
    pub async fn index_conversation(
        &self,
        t: &TenantId,
        c: &ConvId,
        through: u64,
    ) -> Result<u64, LogError> {
        self.index_with(t, c, through, BTreeMap::new(), false).await
    }

    /// Waits while the sequencer is busy, at most [`MAX_YIELD`]; whether it still is. Busy:
    /// requests waiting, or a commit within the last [`QUIET`] (pipelined appends leave the
    /// queue empty for an instant between batches, which is not a pause).
    async fn yield_to_appends(&self) -> bool {
        let deadline = tokio::time::Instant::now() + MAX_YIELD;
        loop {
            let (idle, commits) = (self.queued() == 0, self.stats().0);
            tokio::time::sleep(QUIET).await;
            if idle && self.queued() == 0 && self.stats().0 == commits {
                return false;
            }
            if tokio::time::Instant::now() >= deadline {
                return true;
            }
        }
    }

    /// [`Log::index_conversation`], taking the events from `given` (the sequencer's
    /// plaintext, by seq) where it holds the next seqs, and reading and opening them from
    /// the store where it does not. `polite`: appends first (the indexer's way): before each
    /// transaction it waits for the sequencer ([`Log::yield_to_appends`]) and, if that is
    /// still busy, indexes only [`BUSY_SLICE`] events.
    async fn index_with(
        &self,
        t: &TenantId,
        c: &ConvId,
        through: u64,
        mut given: BTreeMap<u64, Arc<Event>>,
        polite: bool,
    ) -> Result<u64, LogError> {
        let store = self.store().clone();
        let full_batch = self.config().search.indexer_batch;
        let mut done = 0u64;
        let mut from = watermark(&*store, t, c)
            .await?
            .max(archived_through(&*store, t, c).await?)
            + 1;
        if from > through {
            return Ok(0);
        }
        let key = self.keyring().current(t).await?;
        let search = key.search_key(t);
        while from <= through {
            let batch = if polite && self.yield_to_appends().await {
                BUSY_SLICE.min(full_batch)
            } else {
                full_batch
            };
            // The sequencer's plaintext if it holds `from` on, a run of it; else the store.
            given = given.split_off(&from);
            let mut events: Vec<Arc<Event>> = Vec::new();
            for (seq, e) in given.range(from..=through) {
                if *seq != from + events.len() as u64 || events.len() == batch {
                    break;
                }
                events.push(e.clone());
            }
            let last = match events.last() {
                Some(e) => e.seq,
                None => {
                    let rows = store
                        .scan(
                            keys::event_range(t, c, from, through),
                            batch,
                            Order::Ascending,
                        )
                        .await?;
                    for (k, v) in &rows {
                        let seq = keys::event_seq(k)
                            .ok_or_else(|| LogError::corrupt(k, "bad event key"))?;
                        let event = open_stored_event(self.keyring(), t, c, seq, k, v).await?;
                        events.push(Arc::new(event));
                    }
                    // Rows may be missing below the hot floor (archived meanwhile): skip to
                    // the end.
                    match rows.last() {
                        Some((k, _)) => keys::event_seq(k)
                            .ok_or_else(|| LogError::corrupt(k, "bad event key"))?,
                        None => through,
                    }
                }
            };
            let mut txn = Transaction::new();
            let mut fates: BTreeMap<(ConvId, u64), Fate> = BTreeMap::new();
            let mut latest_time = 0i64;
            for event in &events {
                let seq = event.seq;
                latest_time = event.server_time_ms;
                let time = event.server_time_ms.to_be_bytes().to_vec();
                if let Some((target, fate)) = fate_change(event) {
                    fates.entry((c.clone(), target)).or_default().merge(fate);
                }
                let (text, kind) = match &event.body {
                    Some(Body::MessagePosted(p)) => (Some(p.text.as_str()), None),
                    Some(Body::ConversationCreated(x)) => (Some(x.title.as_str()), None),
                    Some(Body::ConversationRenamed(x)) => (Some(x.title.as_str()), None),
                    Some(Body::MessageEdited(e)) => {
                        (Some(e.new_text.as_str()), Some("message_edited"))
                    }
                    Some(Body::MessageRecalled(_)) => (None, Some("message_recalled")),
                    _ => (None, None),
                };
                let mut terms = text.map(terms).unwrap_or_default();
                terms.extend(kind.map(kind_term));
                for term in terms {
                    let tag = search.tag(&term);
                    txn.put(keys::search_posting(t, c, key.id, &tag, seq), time.clone());
                }
                done += 1;
            }
            merge_fates(&*store, t, fates, &mut txn).await?;
            txn.put(keys::search_watermark(t, c), watermark_value(last));
            store.commit(txn).await?;
            if latest_time > 0 {
                let stats = &self.indexer().map(|i| &i.stats);
                if let Some(stats) = stats {
                    stats
                        .lag_ms
                        .store(crate::now_ms() - latest_time, Ordering::Relaxed);
                }
            }
            from = last + 1;
        }
        if let Some(i) = self.indexer() {
            i.stats.indexed_events.fetch_add(done, Ordering::Relaxed);
        }
        Ok(done)
    }
}

async fn indexer_loop(weak: WeakLog, indexer: Arc<Indexer>) -> Result<(), LogError> {
    let mut rx = indexer.rx.lock().await;
    // Notices coalesce per conversation: the highest seq wins. Bounded by the queue.
    let mut pending: HashMap<(TenantId, ConvId), u64> = HashMap::new();
    loop {
        // Woken now and then to notice that the log closed (the queue's sender lives as
        // long as the indexer itself).
        let (t, c, seq) = match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            Ok(Some(notice)) => notice,
            Ok(None) => return Ok(()),
            Err(_) if weak.upgrade().is_none() => return Ok(()),
            Err(_) => continue,
        };
        pending.insert((t, c), seq);
        while pending.len() < 1024
            && let Ok((t, c, seq)) = rx.try_recv()
        {
            let at = pending.entry((t, c)).or_insert(seq);
            *at = (*at).max(seq);
        }
        let Some(log) = weak.upgrade() else {
            return Ok(());
        };
        // Appends first (`polite`): while the sequencer has requests waiting, each index
        // transaction waits (at most MAX_YIELD) and then takes a small slice, so at full load
        // indexing takes the idle moments and its lag grows rather than the appends' latency
        // or their rate. Search opens whatever is not indexed yet.
        let mut taken = indexer.take();
        for ((t, c), through) in pending.drain() {
            let given = taken
                .by_conv
                .remove(&(t.to_string(), c.to_string()))
                .unwrap_or_default();
            if let Err(e) = log.index_with(&t, &c, through, given, true).await {
                indexer.stats.failures.fetch_add(1, Ordering::Relaxed);
                warn!(tenant = %t, conversation = %c, "failed to index for search: {e:#}");
                if e.is_retryable() {
                    // The store is struggling: give it a moment rather than a busy loop.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}
