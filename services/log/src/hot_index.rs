//! The hot events' search index: sealed postings in the KV, built after commit, off the
//! append's path (docs/decisions/hot-search-index.md).
//!
//! ```text
//! sx/tenant/conv/key_id(4)/tag(8)/seq(8) -> server time (8, BE)   a term of event seq's text
//! si/tenant/conv                         -> seq (8, BE) | version (1)   indexed through seq
//! sf/tenant/conv/seq(8)                  -> latest(8, BE) | recalled(1)   a message's fate
//! ```
//!
//! - **Feed.** After each commit the sequencer offers `(tenant, conv, last seq)` per touched
//!   conversation to a bounded queue ([`SearchConfig::indexer_queue`]) with `try_send`: a
//!   full queue drops the notice (counted), never holds the append. The next notice of the
//!   conversation heals it, because the indexer always indexes from the conversation's
//!   watermark (`si/`) up; and search opens every event above the watermark itself, so a
//!   lagging or dropped index never changes results, only their cost.
//! - **Plaintext.** Beside each notice the sequencer hands over the committed events it
//!   still holds in the clear, through a queue bounded in bytes
//!   ([`SearchConfig::indexer_queue_bytes`]); what does not fit is not handed over
//!   (counted) and the indexer reads and opens those events from the store instead. So the
//!   indexer neither reads nor decrypts again what the sequencer just sealed.
//! - **Indexer** ([`crate::hot_indexer::run_indexer`]): one task, supervised by `serve` (restarted on
//!   failure; the queue's receiver survives restarts). It takes the new events, folds and
//!   splits their texts ([`crate::search`]) and writes one posting per (term, event): the
//!   term as an 8-byte HMAC tag under the tenant's search key of the current data key, so the
//!   KV shows tags, never words. Posted messages, edits' new texts and conversation titles
//!   are indexed, and every edit and recall under its kind's term
//!   ([`kind_term`](crate::search::kind_term)), so compliance lists them without opening the
//!   rest; an edit or a recall also updates the target message's fate (`sf/`), which search
//!   uses to keep only a message's current text and never a recalled one.
//! - **Version.** The watermark carries the index's format ([`INDEX_VERSION`]); a watermark
//!   of an older format counts as nothing indexed, so the indexer builds the conversation
//!   again (postings are idempotent) and nobody trusts postings that lack what they now
//!   promise.
//! - **Readers.** [`Postings`] pages through the seqs holding every term of a query, for a
//!   user's search (newest first) and for compliance (oldest first).
//! - **Archive and retention.** Postings at or below a conversation's archived seq are never
//!   used (the archived events are searched through the archive); the archiver deletes them
//!   ([`forget_postings_through`]), and retention also deletes the fates of what it purges.
//!   Shredding destroys the keys the tags and the texts need.
//!
//! What the postings show to whoever reads the KV: per conversation, how many events hold
//! each (unknown) tag, and when. The archive's indexes are sealed whole and show less; the
//! hot tier trades that for updates in place (see the decision file).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::cold::purged_through;
use crate::error::LogError;
use crate::ids::{ConvId, TenantId};
use crate::keys;
use crate::search::{Tag, Term};
use crate::store::{KeyRange, KvStore, Order, Pages, Transaction};
use prost::Message;
use tidings_schemas::v1::Event;
use tidings_schemas::v1::event::Body;

/// Search settings of the log (docs/limits.md): read from `[log]` in the server's config,
/// flattened into [`LogConfig`](crate::LogConfig), each as `search_<field>` there.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct SearchConfig {
    /// Whether committed events are indexed as they commit. Off: search opens every hot
    /// event of the user's conversations (same results, more work).
    #[serde(rename = "search_hot_index")]
    pub hot_index: bool,
    /// Notices (one per conversation per commit) waiting for the indexer; past it they are
    /// dropped and counted (the next notice of the conversation heals the gap).
    #[serde(rename = "search_indexer_queue")]
    pub indexer_queue: usize,
    /// Events the indexer reads and indexes in one store transaction.
    #[serde(rename = "search_indexer_batch")]
    pub indexer_batch: usize,
    /// Bytes of committed events (in the clear) the sequencer may hand to the indexer and
    /// the indexer may hold; past it events are not handed over and the indexer reads them
    /// from the store.
    #[serde(rename = "search_indexer_queue_bytes")]
    pub indexer_queue_bytes: usize,
    /// Bytes one search may examine (events opened, postings read, conversations listed):
    /// what bounds its memory and time. A page may come back short, with a cursor.
    #[serde(rename = "search_budget_bytes")]
    pub budget_bytes: usize,
    /// Most hits in one page.
    #[serde(rename = "search_max_page_hits")]
    pub max_page_hits: usize,
    /// Whether search asks the postings (the default); without, every hot event of the
    /// user's conversations is opened. Both give the same results (for comparing them).
    /// Not a setting of the file: the server asks the postings only when `hot_index` is on
    /// (the postings a past run left are not trusted to be current).
    #[serde(skip)]
    pub use_index: bool,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            hot_index: true,
            indexer_queue: 16 * 1024,
            indexer_batch: 512,
            indexer_queue_bytes: 8 << 20,
            // 8 MiB: thousands of candidate messages, a few tens of ms of opening.
            budget_bytes: 8 << 20,
            max_page_hits: 100,
            use_index: true,
        }
    }
}

impl SearchConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("search_indexer_queue", self.indexer_queue),
            ("search_indexer_batch", self.indexer_batch),
            ("search_indexer_queue_bytes", self.indexer_queue_bytes),
            ("search_budget_bytes", self.budget_bytes),
            ("search_max_page_hits", self.max_page_hits),
        ] {
            if v == 0 {
                return Err(format!("{name} must be greater than 0"));
            }
        }
        if self.indexer_batch > crate::store::FjallStore::MAX_SCAN_LIMIT {
            return Err(format!(
                "search_indexer_batch must be at most {}",
                crate::store::FjallStore::MAX_SCAN_LIMIT
            ));
        }
        Ok(())
    }
}

/// Longest the indexer waits for the sequencer's queue to empty before a transaction (see
/// `indexer_loop`): with [`BUSY_SLICE`], what it still indexes under sustained full load.
pub const MAX_YIELD: Duration = Duration::from_millis(50);

/// How long the sequencer must go without requests waiting or commits for the indexer to
/// take a full batch (see `Log::yield_to_appends`).
pub const QUIET: Duration = Duration::from_millis(2);

/// Events the indexer indexes in one transaction while the sequencer still has requests
/// waiting after [`MAX_YIELD`] (idle, it takes `log.search_indexer_batch`): at full load it
/// indexes at least this many per `MAX_YIELD` (1,280 events/s), a small share of the cores,
/// and catches up once the load falls.
pub const BUSY_SLICE: usize = 64;

/// What the sequencer tells the indexer: this conversation committed up to this seq.
pub(crate) type Notice = (TenantId, ConvId, u64);

/// The indexer's queue and counters, shared by the sequencer (sender) and the task.
pub struct Indexer {
    pub(crate) tx: mpsc::Sender<Notice>,
    pub(crate) rx: tokio::sync::Mutex<mpsc::Receiver<Notice>>,
    /// Committed events in the clear, handed over by the sequencer before their notices.
    plain: std::sync::Mutex<Plain>,
    plain_budget: usize,
    pub stats: IndexerStats,
}

/// The plaintext queue: events and their bytes (`Event::encoded_len`), counted from the
/// moment they are queued until the indexer has indexed or dropped them.
#[derive(Default)]
struct Plain {
    events: Vec<Arc<Event>>,
    bytes: usize,
}

/// The events an indexer pass took from the plaintext queue, by conversation and seq; gives
/// their bytes back to the queue's budget when dropped (at the end of the pass).
pub(crate) struct Taken<'a> {
    pub(crate) by_conv: HashMap<(String, String), BTreeMap<u64, Arc<Event>>>,
    bytes: usize,
    indexer: &'a Indexer,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let mut plain = self.indexer.plain.lock().unwrap_or_else(|p| p.into_inner());
        plain.bytes = plain.bytes.saturating_sub(self.bytes);
    }
}

/// What `/metrics` shows of the indexer.
#[derive(Debug, Default)]
pub struct IndexerStats {
    /// Events indexed since the log opened.
    pub indexed_events: AtomicU64,
    /// Notices dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Committed events not handed to the indexer in the clear (the plaintext queue was
    /// full): it read and opened them from the store.
    pub plain_dropped: AtomicU64,
    /// Index passes that failed (store errors); the conversation is retried on its next
    /// notice.
    pub failures: AtomicU64,
    /// Commit-to-index lag of the last event indexed, ms.
    pub lag_ms: AtomicI64,
}

impl Indexer {
    pub(crate) fn new(queue: usize, plain_bytes: usize) -> Indexer {
        let (tx, rx) = mpsc::channel(queue);
        Indexer {
            tx,
            rx: tokio::sync::Mutex::new(rx),
            plain: std::sync::Mutex::new(Plain::default()),
            plain_budget: plain_bytes,
            stats: IndexerStats::default(),
        }
    }

    /// Offers a commit's events in the clear, then its notices, without waiting (the
    /// sequencer's side). Events go first, so a notice's events are queued when it arrives.
    pub(crate) fn offer(
        &self,
        events: impl IntoIterator<Item = Arc<Event>>,
        notices: impl IntoIterator<Item = Notice>,
    ) {
        {
            let mut plain = self.plain.lock().unwrap_or_else(|p| p.into_inner());
            for e in events {
                let size = e.encoded_len();
                if plain.bytes + size > self.plain_budget {
                    self.stats.plain_dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                plain.bytes += size;
                plain.events.push(e);
            }
        }
        for n in notices {
            if self.tx.try_send(n).is_err() {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Notices waiting.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Takes the queued plaintext events; their bytes count against the queue until the
    /// [`Taken`] is dropped.
    pub(crate) fn take(&self) -> Taken<'_> {
        let (events, bytes) = {
            let mut plain = self.plain.lock().unwrap_or_else(|p| p.into_inner());
            let events = std::mem::take(&mut plain.events);
            let bytes = events.iter().map(|e| e.encoded_len()).sum();
            (events, bytes)
        };
        let mut by_conv: HashMap<(String, String), BTreeMap<u64, Arc<Event>>> = HashMap::new();
        for e in events {
            by_conv
                .entry((e.tenant.clone(), e.conversation.clone()))
                .or_default()
                .insert(e.seq, e);
        }
        Taken {
            by_conv,
            bytes,
            indexer: self,
        }
    }
}

/// The fate of a message: its latest edit's seq (0: never edited) and whether recalled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fate {
    pub latest_edit: u64,
    pub recalled: bool,
}

impl Fate {
    fn encode(self) -> Vec<u8> {
        let mut v = self.latest_edit.to_be_bytes().to_vec();
        v.push(u8::from(self.recalled));
        v
    }

    pub(crate) fn decode(key: &[u8], v: &[u8]) -> Result<Fate, LogError> {
        if v.len() != 9 {
            return Err(LogError::corrupt(key, "search fate is not 9 bytes"));
        }
        Ok(Fate {
            latest_edit: u64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
            recalled: v[8] != 0,
        })
    }

    pub fn merge(&mut self, other: Fate) {
        self.latest_edit = self.latest_edit.max(other.latest_edit);
        self.recalled |= other.recalled;
    }
}

/// What `event` does to its target message's fate: (target seq, fate) for an edit or a
/// recall.
pub fn fate_change(event: &Event) -> Option<(u64, Fate)> {
    match &event.body {
        Some(Body::MessageEdited(e)) => Some((
            e.target_seq,
            Fate {
                latest_edit: event.seq,
                recalled: false,
            },
        )),
        Some(Body::MessageRecalled(r)) => Some((
            r.target_seq,
            Fate {
                latest_edit: 0,
                recalled: true,
            },
        )),
        _ => None,
    }
}

/// Adds `fates` (by conversation and message), merged with what `sf/` holds, to `txn`, each
/// on the condition that `sf/` still holds what was read: the indexer and the archiver
/// (which records the fates of the edits and recalls it archives, in case the indexer never
/// saw them) may write the same message's fate, and neither may undo the other's.
pub async fn merge_fates(
    store: &dyn KvStore,
    t: &TenantId,
    fates: BTreeMap<(ConvId, u64), Fate>,
    txn: &mut Transaction,
) -> Result<(), LogError> {
    if fates.is_empty() {
        return Ok(());
    }
    let fate_keys: Vec<Vec<u8>> = fates
        .keys()
        .map(|(c, seq)| keys::search_fate(t, c, *seq))
        .collect();
    let stored = store.batch_get(fate_keys.clone()).await?;
    for ((key, value), (_, mut fate)) in fate_keys.into_iter().zip(stored).zip(fates) {
        if let Some(v) = &value {
            fate.merge(Fate::decode(&key, v)?);
        }
        if value.as_ref() != Some(&fate.encode()) {
            txn.expect(key.clone(), value).put(key, fate.encode());
        }
    }
    Ok(())
}

/// The format of the postings: 2 added titles and the kinds of edits and recalls.
pub const INDEX_VERSION: u8 = 2;

/// How far a conversation's hot index is built (0: not at all, or in an older format).
pub async fn watermark(store: &dyn KvStore, t: &TenantId, c: &ConvId) -> Result<u64, LogError> {
    let key = keys::search_watermark(t, c);
    decode_watermark(&key, store.get(&key).await?)
}

/// [`watermark`] from the stored value of its key.
pub fn decode_watermark(key: &[u8], value: Option<Vec<u8>>) -> Result<u64, LogError> {
    match value {
        None => Ok(0),
        Some(v) => match (v.len(), v.last().copied()) {
            // Version 1 stored the seq alone.
            (8, _) => Ok(0),
            (9, Some(INDEX_VERSION)) => Ok(u64::from_be_bytes(v[..8].try_into().expect("8 bytes"))),
            (9, Some(older)) if older < INDEX_VERSION => Ok(0),
            _ => Err(LogError::corrupt(
                key,
                "search watermark is not a seq and a known version",
            )),
        },
    }
}

pub(crate) fn watermark_value(seq: u64) -> Vec<u8> {
    let mut v = seq.to_be_bytes().to_vec();
    v.push(INDEX_VERSION);
    v
}

/// (seq, time) of postings, in the order listed.
type Listing = Vec<(u64, i64)>;

/// The seqs of one conversation whose text holds every term of a query, under each search
/// key id the tenant has had, with their times, a page at a time in either order. Within a
/// page, the sparsest term (the one whose postings reach furthest) drives and the others are
/// checked by point reads, so a rare word next to a common one costs the rare one's
/// postings.
pub struct Postings {
    /// The query's term tags under each search key id.
    tags: Vec<(u32, Vec<Tag>)>,
    /// What is left to list: `lo..=hi`; empty when `lo > hi`.
    lo: u64,
    hi: u64,
    order: Order,
}

impl Postings {
    /// Postings of `terms` (at least one) for seqs `lo..=hi`.
    pub async fn new(
        keyring: &crate::crypto::Keyring,
        t: &TenantId,
        terms: &[&Term],
        lo: u64,
        hi: u64,
        order: Order,
    ) -> Result<Postings, LogError> {
        debug_assert!(!terms.is_empty());
        let mut tags = Vec::new();
        for key in keyring.all_keys(t).await? {
            let search = key.search_key(t);
            tags.push((key.id, terms.iter().map(|t| search.tag(t)).collect()));
        }
        Ok(Postings {
            tags,
            lo,
            hi,
            order,
        })
    }

    /// Whether every page has been listed.
    pub fn done(&self) -> bool {
        self.lo > self.hi
    }

    /// The next page, in order, and the bytes read for it; reads at most `page` postings per
    /// term and key id, plus point reads.
    pub async fn next(
        &mut self,
        store: &dyn KvStore,
        t: &TenantId,
        c: &ConvId,
        page: usize,
    ) -> Result<(Vec<(u64, i64)>, usize), LogError> {
        let (lo, hi) = (self.lo, self.hi);
        if lo > hi {
            return Ok((Vec::new(), 0));
        }
        let descending = self.order == Order::Descending;
        let mut bytes = 0;
        let mut found: BTreeMap<u64, i64> = BTreeMap::new();
        // Where every key id's listing is complete to (the far end of this page).
        let mut bound = if descending { lo } else { hi };
        for (key_id, tags) in &self.tags {
            // (complete to, its postings, which term)
            let mut best: Option<(u64, Listing, usize)> = None;
            // Every term's page in one round trip (as many terms at a time as one scan's
            // limit allows: a long CJK query has hundreds of bigrams).
            let mut listed = Vec::with_capacity(tags.len());
            for chunk in
                tags.chunks((crate::store::FjallStore::MAX_SCAN_LIMIT / page.max(1)).max(1))
            {
                let ranges = chunk
                    .iter()
                    .map(|tag| keys::search_postings(t, c, *key_id, tag, lo, hi))
                    .collect();
                listed.extend(store.scan_each(ranges, page, self.order).await?);
            }
            for (i, rows) in listed.into_iter().enumerate() {
                let mut list = Vec::with_capacity(rows.len());
                for (k, v) in rows {
                    bytes += k.len() + v.len();
                    let seq = keys::event_seq(&k)
                        .ok_or_else(|| LogError::corrupt(&k, "bad posting key"))?;
                    list.push((seq, posting_time(&k, &v)?));
                }
                let reach = match list.last() {
                    Some(l) if list.len() >= page => l.0,
                    _ if descending => lo,
                    _ => hi,
                };
                let further = |b: &(u64, _, _)| {
                    if descending { reach < b.0 } else { reach > b.0 }
                };
                if best.as_ref().is_none_or(further) {
                    best = Some((reach, list, i));
                }
            }
            let Some((reach, driver, at)) = best else {
                continue;
            };
            bound = if descending {
                bound.max(reach)
            } else {
                bound.min(reach)
            };
            let mut keep = driver;
            for (i, tag) in tags.iter().enumerate() {
                if i == at || keep.is_empty() {
                    continue;
                }
                let wanted: Vec<Vec<u8>> = keep
                    .iter()
                    .map(|(seq, _)| keys::search_posting(t, c, *key_id, tag, *seq))
                    .collect();
                bytes += wanted.iter().map(Vec::len).sum::<usize>();
                let got = store.batch_get(wanted).await?;
                keep = keep
                    .into_iter()
                    .zip(got)
                    .filter_map(|(c, v)| v.map(|_| c))
                    .collect();
            }
            found.extend(keep);
        }
        // Everything between here and `bound` is listed for every key id; beyond it, next.
        let page: Vec<(u64, i64)> = if descending {
            found.range(bound..).rev().map(|(s, t)| (*s, *t)).collect()
        } else {
            found.range(..=bound).map(|(s, t)| (*s, *t)).collect()
        };
        let finished = if descending { bound <= lo } else { bound >= hi };
        if finished {
            (self.lo, self.hi) = (1, 0);
        } else if descending {
            self.hi = bound - 1;
        } else {
            self.lo = bound + 1;
        }
        Ok((page, bytes))
    }
}

/// The posting's event time as stored.
pub(crate) fn posting_time(key: &[u8], v: &[u8]) -> Result<i64, LogError> {
    Ok(i64::from_be_bytes(v.try_into().map_err(|_| {
        LogError::corrupt(key, "search posting is not 8 bytes")
    })?))
}

/// Deletes the hot postings of `conv` for seqs at or below `through` (archived or purged
/// events: the archive answers for them). Returns how many were deleted.
pub async fn forget_postings_through(
    store: &dyn KvStore,
    t: &TenantId,
    c: &ConvId,
    through: u64,
) -> Result<u64, LogError> {
    let mut pages = Pages::new(KeyRange::prefix(keys::search_posting_dir(t, c)));
    let mut deleted = 0;
    while let Some(rows) = pages.next(store).await? {
        let mut txn = Transaction::new();
        for (k, _) in rows {
            if keys::event_seq(&k).is_some_and(|s| s <= through) {
                txn.delete(k);
                deleted += 1;
            }
        }
        if !txn.is_empty() {
            store.commit(txn).await?;
        }
    }
    Ok(deleted)
}

/// Retention purged `conv` through its purge marker: its postings and fates there go too.
pub async fn forget_purged(store: &dyn KvStore, t: &TenantId, c: &ConvId) -> Result<(), LogError> {
    let through = purged_through(store, t, c).await?;
    if through == 0 {
        return Ok(());
    }
    forget_postings_through(store, t, c, through).await?;
    loop {
        let rows = store
            .scan(keys::search_fates(t, c, 0, through), 1000, Order::Ascending)
            .await?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut txn = Transaction::new();
        for (k, _) in rows {
            txn.delete(k);
        }
        store.commit(txn).await?;
    }
}
