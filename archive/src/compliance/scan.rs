//! The scanning engine behind search, export and retention's hold resolution.
//!
//! **Archive.** The tenant's segments come from its `sg/` records (so an unindexed orphan
//! is never read), pruned by their time span. In each segment, a row group is skipped on
//! its column statistics (time, conversation, sender) and then on its bloom filters
//! (conversation, sender), each fetched alone. Only then are the plain metadata columns
//! fetched (the bytes before the body column, a small part of the group) and filtered
//! row by row; the whole row group is fetched and bodies opened only for the candidate
//! rows that remain. Opening runs on the blocking pool, split over the cores.
//!
//! **Search index.** With a text filter, a segment's sealed search index
//! ([`crate::search_index`]) names the rows whose text holds every term of the query; those,
//! and the messages whose edits match (located through the `ax/` runs), are the only rows
//! fetched and opened. The decrypted text confirms each one with the same rule a full scan
//! applies, so the results are the same. A segment without an index (written before there
//! were indexes) is scanned as above.
//!
//! **Hot log.** Hot events are sealed whole (no plain metadata). Up to each conversation's
//! hot index watermark, a selection with a [`HotQuery`] opens only the events the hot
//! postings name (`tidings_log::hot_index::Postings`: a text's terms, or the kind term of
//! edits and recalls) and the messages it names itself; every event above the watermark,
//! and every hot event of a selection without one, is opened and then filtered. Either way
//! the filters decide on the opened event, so the results are those of opening everything.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parquet::data_type::ByteArray;
use parquet::file::statistics::Statistics;
use prost::Message;
use tidings_log::cold::{archived_through_each, decode_run, is_purge_marker};
use tidings_log::crypto::Keyring;
use tidings_log::hot_index::{Postings, watermark};
use tidings_log::log::open_stored_event;
use tidings_log::search::{Needle, Term, kind_term};
use tidings_log::store::{KeyRange, KvStore, Order};
use tidings_log::{ConvId, Event, LogError, TenantId, UserId, keys};
use tidings_schemas::storage::{ArchiveSegment, Head};

use super::{ComplianceError, Progress, Tier};
use crate::archiver::{Pages, scan_all};
use crate::error::ArchiveError;
use crate::format::{self, col};
use crate::reader::{Segment, fetch_footer};
use crate::search_index;
use crate::storage::{self, Objects};

/// Which events a scan visits. Every filter is checked on every visited event; the archive
/// also uses them to skip what cannot match.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Selection<'a> {
    pub conv: Option<&'a ConvId>,
    pub sender: Option<&'a UserId>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Only events of these kinds (`None`: all).
    pub kinds: Option<&'a [&'static str]>,
    /// A text filter the archive may answer through the segments' search indexes; `None`:
    /// every row the other filters allow is visited.
    pub text: Option<&'a IndexedText>,
    /// What the hot index may answer for the hot log; `None`: every hot event is opened.
    pub hot: Option<&'a HotQuery>,
}

/// What the hot index looks for: the events whose postings hold every term of any one of
/// `any_of`, and the messages `also` names (by conversation: seqs). The events the index
/// names are a superset of what the selection's other filters (kinds, text) accept.
#[derive(Debug, Default)]
pub(super) struct HotQuery {
    pub any_of: Vec<Vec<Term>>,
    pub also: HashMap<String, Vec<u64>>,
}

/// Seqs of a conversation's indexed hot events whose candidates are gathered and opened at a
/// time: bounds the candidates held to this many.
const HOT_CHUNK: u64 = 4096;
/// Conversations whose hot tails are read together (their archive floors, then up to
/// [`HOT_OPEN_ALL`] events of each, in one round trip each).
const HOT_CONVS_AT_ONCE: usize = 256;
/// Postings read per term per page.
const POSTING_PAGE: usize = 1000;
/// Indexed hot events of a conversation at or below which they are all opened rather than
/// asked of the postings: a few events cost less to open than the posting scans and point
/// reads that would name them (a tenant's thin hot tail over thousands of conversations).
const HOT_OPEN_ALL: u64 = 256;

/// What the search indexes look for: rows holding every term of any one of `any_of`, plus
/// the rows of `also` (messages an edit of which matches), by segment id, as (row group,
/// row). `kinds`: `any_of` holds kind terms, which only version 2 indexes post (a segment
/// with an older index is scanned).
#[derive(Debug)]
pub(super) struct IndexedText {
    pub any_of: Vec<Vec<Term>>,
    pub also: HashMap<String, Vec<(usize, usize)>>,
    pub kinds: bool,
}

impl IndexedText {
    /// The rows of events of `kinds` (indexed kinds: edits and recalls).
    pub fn of_kinds(kinds: &[&str]) -> IndexedText {
        IndexedText {
            any_of: kinds.iter().map(|k| vec![kind_term(k)]).collect(),
            also: HashMap::new(),
            kinds: true,
        }
    }

    /// Locates `messages` ((conversation, seq) pairs) in the archive through the `ax/` runs;
    /// those still hot are not in any segment and are left out.
    pub async fn new(
        store: &dyn KvStore,
        tenant: &TenantId,
        needle: Needle,
        messages: impl IntoIterator<Item = (String, u64)>,
    ) -> Result<IndexedText, ComplianceError> {
        let mut by_conv: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (conv, seq) in messages {
            by_conv.entry(conv).or_default().push(seq);
        }
        let mut also: HashMap<String, Vec<(usize, usize)>> = HashMap::new();
        for (conv, seqs) in by_conv {
            let conv = ConvId::new(conv)?;
            let dir = KeyRange::prefix(keys::archive_run_dir(tenant, &conv));
            for (key, value) in scan_all(store, dir).await? {
                let run = decode_run(&key, &value)?;
                let first =
                    keys::event_seq(&key).ok_or_else(|| LogError::corrupt(&key, "bad key"))?;
                if is_purge_marker(&run) {
                    continue;
                }
                for &seq in &seqs {
                    if first <= seq && seq <= run.last_seq {
                        also.entry(run.segment_id.clone()).or_default().push((
                            run.row_group as usize,
                            (run.row_offset + (seq - first)) as usize,
                        ));
                    }
                }
            }
        }
        Ok(IndexedText {
            any_of: vec![needle.terms().iter().cloned().collect()],
            also,
            kinds: false,
        })
    }
}

impl Selection<'_> {
    fn time_overlaps(&self, min: i64, max: i64) -> bool {
        self.from_ms.is_none_or(|f| max >= f) && self.to_ms.is_none_or(|t| min < t)
    }

    fn matches_meta(&self, conv: &[u8], sender: &[u8], time: i64, kind: &[u8]) -> bool {
        self.conv.is_none_or(|c| c.as_str().as_bytes() == conv)
            && self.sender.is_none_or(|u| u.as_str().as_bytes() == sender)
            && self.time_overlaps(time, time)
            && self
                .kinds
                .is_none_or(|ks| ks.iter().any(|k| k.as_bytes() == kind))
    }

    fn matches(&self, e: &Event) -> bool {
        self.matches_meta(
            e.conversation.as_bytes(),
            e.sender.as_bytes(),
            e.server_time_ms,
            tidings_log::event_kind(e.body.as_ref()).as_bytes(),
        )
    }
}

/// Receives the events a scan selects, in batches.
#[async_trait::async_trait]
pub(super) trait Visitor: Send {
    async fn visit(&mut self, events: Vec<Event>, tier: Tier) -> Result<(), ComplianceError>;
}

pub(super) struct Scanner<'a> {
    pub store: &'a dyn KvStore,
    pub keyring: &'a Arc<Keyring>,
    pub objects: Option<&'a Objects>,
    pub progress: &'a Progress,
}

impl Scanner<'_> {
    /// Visits the selected events of `tenant`: archived ones first (by segment date), then
    /// hot ones, conversation by conversation.
    pub async fn scan(
        &self,
        tenant: &TenantId,
        sel: Selection<'_>,
        visitor: &mut dyn Visitor,
    ) -> Result<(), ComplianceError> {
        self.scan_archive(tenant, sel, visitor).await?;
        self.scan_hot(tenant, sel, visitor).await
    }

    async fn scan_archive(
        &self,
        tenant: &TenantId,
        sel: Selection<'_>,
        visitor: &mut dyn Visitor,
    ) -> Result<(), ComplianceError> {
        // One conversation: the index names exactly the segments that hold it.
        let only: Option<HashSet<String>> = match sel.conv {
            None => None,
            Some(conv) => {
                let dir = KeyRange::prefix(keys::archive_run_dir(tenant, conv));
                let mut ids = HashSet::new();
                for (key, value) in scan_all(self.store, dir).await? {
                    let run = decode_run(&key, &value)?;
                    if !is_purge_marker(&run) {
                        ids.insert(run.segment_id);
                    }
                }
                Some(ids)
            }
        };
        let dir = keys::segment_dir(tenant);
        let mut segments = Vec::new();
        for (key, value) in scan_all(self.store, KeyRange::prefix(dir.clone())).await? {
            let seg = ArchiveSegment::decode(value.as_slice())
                .map_err(|e| ArchiveError::Log(LogError::corrupt(&key, e)))?;
            let id = keys::last_part(&dir, &key).unwrap_or_default();
            if sel.time_overlaps(seg.min_time_ms, seg.max_time_ms)
                && only.as_ref().is_none_or(|ids| ids.contains(&id))
            {
                segments.push(seg);
            }
        }
        if segments.is_empty() {
            return Ok(());
        }
        let Some(objects) = self.objects else {
            return Err(ArchiveError::Config(format!(
                "tenant {tenant} has archived segments and no archive is configured"
            ))
            .into());
        };
        segments.sort_by(|a, b| (&a.date, a.min_time_ms).cmp(&(&b.date, b.min_time_ms)));
        self.progress
            .segments_total
            .fetch_add(segments.len() as u64, Ordering::Relaxed);
        for seg in segments {
            self.scan_segment(objects, tenant, &seg.path, sel, visitor)
                .await?;
            self.progress.segments_done.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn scan_segment(
        &self,
        objects: &Objects,
        tenant: &TenantId,
        path: &str,
        sel: Selection<'_>,
        visitor: &mut dyn Visitor,
    ) -> Result<(), ComplianceError> {
        let footer = fetch_footer(objects, path).await?;
        let segment = Arc::new(Segment::open(path, footer, tenant, self.keyring).await?);
        let key = self.keyring.key(tenant, segment.key_id).await?;
        if let Some(text) = sel.text
            && let Some(rows) = self
                .indexed_rows(objects, tenant, path, &segment, text)
                .await?
        {
            return self
                .visit_rows(objects, path, &segment, &key, rows, sel, visitor)
                .await;
        }
        let corrupt = |e: parquet::errors::ParquetError| ArchiveError::corrupt(path, e);
        for rg in 0..segment.footer.meta.num_row_groups() {
            let group = segment.footer.meta.row_group(rg);
            self.progress
                .scanned
                .fetch_add(group.num_rows().max(0) as u64, Ordering::Relaxed);
            if !stats_may_match(group, sel) {
                continue;
            }
            if !self
                .blooms_may_match(objects, path, &segment, rg, sel)
                .await?
            {
                continue;
            }
            let meta_bytes = segment
                .fetch(objects, path, segment.footer.meta_range(rg))
                .await?;
            let meta = format::read_meta(&segment.footer, &meta_bytes, rg).map_err(corrupt)?;
            let candidates: Vec<usize> = (0..meta.seq.len())
                .filter(|&i| {
                    sel.matches_meta(
                        meta.conversation[i].data(),
                        meta.sender[i].data(),
                        meta.time[i],
                        meta.kind[i].data(),
                    )
                })
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let data = segment
                .fetch(objects, path, segment.footer.row_group_range(rg))
                .await?;
            let rows =
                format::read_rows_at(&segment.footer, &data, rg, &candidates).map_err(corrupt)?;
            let events = open_parallel(&segment, &key, rows, path).await?;
            self.progress
                .opened
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            visitor.visit(events, Tier::Archive).await?;
        }
        Ok(())
    }

    /// The rows of the segment that may match `text`, by row group, from its search index;
    /// `None` if the segment has no index.
    async fn indexed_rows(
        &self,
        objects: &Objects,
        tenant: &TenantId,
        path: &str,
        segment: &Segment,
        text: &IndexedText,
    ) -> Result<Option<BTreeMap<usize, Vec<usize>>>, ComplianceError> {
        let Some(index) = search_index::load(objects, self.keyring, tenant, path).await? else {
            return Ok(None);
        };
        if text.kinds && !index.kinds {
            return Ok(None);
        }
        let search_key = self
            .keyring
            .key(tenant, index.key_id)
            .await?
            .search_key(tenant);
        // Row numbers to (row group, row in group).
        let starts = index.row_group_starts(&segment.footer.meta)?;
        let mut rows: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for row in index.holding_any(&search_key, &text.any_of)? {
            let rg = starts.partition_point(|&s| s <= row) - 1;
            rows.entry(rg)
                .or_default()
                .push((row - starts[rg]) as usize);
        }
        let segment_id = storage::segment_id_of(path).unwrap_or_default();
        for &(rg, row) in text.also.get(segment_id).into_iter().flatten() {
            rows.entry(rg).or_default().push(row);
        }
        for list in rows.values_mut() {
            list.sort_unstable();
            list.dedup();
        }
        Ok(Some(rows))
    }

    /// Fetches and opens the given rows (by row group), and visits those `sel` selects.
    #[allow(clippy::too_many_arguments)]
    async fn visit_rows(
        &self,
        objects: &Objects,
        path: &str,
        segment: &Arc<Segment>,
        key: &tidings_log::crypto::DataKey,
        rows: BTreeMap<usize, Vec<usize>>,
        sel: Selection<'_>,
        visitor: &mut dyn Visitor,
    ) -> Result<(), ComplianceError> {
        let meta = &segment.footer.meta;
        for rg in 0..meta.num_row_groups() {
            self.progress.scanned.fetch_add(
                meta.row_group(rg).num_rows().max(0) as u64,
                Ordering::Relaxed,
            );
        }
        // Each row group's rows are decoded and opened on the blocking pool, up to one row
        // group per core at a time (the next one fetched meanwhile), visited in order.
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(8);
        let mut decoding = VecDeque::new();
        for (rg, wanted) in rows {
            if rg >= meta.num_row_groups() || !stats_may_match(meta.row_group(rg), sel) {
                continue;
            }
            let data = segment
                .fetch(objects, path, segment.footer.row_group_range(rg))
                .await?;
            let (segment, key, object) = (segment.clone(), key.clone(), path.to_string());
            decoding.push_back(tokio::task::spawn_blocking(move || {
                let rows = format::read_rows_at(&segment.footer, &data, rg, &wanted)
                    .map_err(|e| ArchiveError::corrupt(&object, e))?;
                segment
                    .open_all(&key, &rows)
                    .map_err(|e| ArchiveError::corrupt(&object, e))
            }));
            if decoding.len() >= workers {
                self.visit_decoded(&mut decoding, path, sel, visitor)
                    .await?;
            }
        }
        while !decoding.is_empty() {
            self.visit_decoded(&mut decoding, path, sel, visitor)
                .await?;
        }
        Ok(())
    }

    /// Waits for the oldest row group being decoded and visits what `sel` selects of it.
    async fn visit_decoded(
        &self,
        decoding: &mut VecDeque<tokio::task::JoinHandle<Result<Vec<Event>, ArchiveError>>>,
        path: &str,
        sel: Selection<'_>,
        visitor: &mut dyn Visitor,
    ) -> Result<(), ComplianceError> {
        let Some(task) = decoding.pop_front() else {
            return Ok(());
        };
        let mut events = task
            .await
            .map_err(|e| ArchiveError::corrupt(path, format!("opening rows failed: {e}")))??;
        self.progress
            .opened
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        events.retain(|e| sel.matches(e));
        if !events.is_empty() {
            visitor.visit(events, Tier::Archive).await?;
        }
        Ok(())
    }

    async fn blooms_may_match(
        &self,
        objects: &Objects,
        path: &str,
        segment: &Segment,
        rg: usize,
        sel: Selection<'_>,
    ) -> Result<bool, ArchiveError> {
        let probes = [
            (col::CONVERSATION, sel.conv.map(ConvId::as_str)),
            (col::SENDER, sel.sender.map(UserId::as_str)),
        ];
        for (column, value) in probes {
            let Some(value) = value else { continue };
            let Some(range) = format::bloom_range(&segment.footer, rg, column) else {
                continue;
            };
            let data = segment.fetch(objects, path, Some(range)).await?;
            let may = format::bloom_may_contain(&segment.footer, &data, rg, column, value)
                .map_err(|e| ArchiveError::corrupt(path, e))?;
            if !may {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn scan_hot(
        &self,
        tenant: &TenantId,
        sel: Selection<'_>,
        visitor: &mut dyn Visitor,
    ) -> Result<(), ComplianceError> {
        // A tenant's heads are read a page at a time (a tenant may have millions of
        // conversations); each page's conversations are scanned before the next is read.
        if let Some(conv) = sel.conv {
            let head = self
                .store
                .get(&keys::head(tenant, conv))
                .await
                .map_err(LogError::from)?;
            let heads = head.map(|h| (conv.clone(), h)).into_iter().collect();
            return self
                .scan_hot_conversations(tenant, heads, sel, visitor)
                .await;
        }
        let dir = keys::head_dir(Some(tenant));
        let mut pages = Pages::new(KeyRange::prefix(dir.clone()));
        while let Some(page) = pages.next(self.store).await? {
            let mut heads = Vec::with_capacity(page.len());
            for (key, value) in page {
                let conv = keys::last_part(&dir, &key)
                    .ok_or_else(|| LogError::corrupt(&key, "bad head key"))?;
                heads.push((ConvId::new(conv)?, value));
            }
            self.scan_hot_conversations(tenant, heads, sel, visitor)
                .await?;
        }
        Ok(())
    }

    /// Opens the stored events `rows` of `conv`, counted as scanned and opened; keeps those
    /// `sel` selects.
    async fn open_hot(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        rows: &[(Vec<u8>, Vec<u8>)],
        sel: Selection<'_>,
        events: &mut Vec<Event>,
    ) -> Result<(), ComplianceError> {
        for (key, value) in rows {
            let seq = keys::event_seq(key).ok_or_else(|| LogError::corrupt(key, "bad key"))?;
            let event = open_stored_event(self.keyring, tenant, conv, seq, key, value).await?;
            if sel.matches(&event) {
                events.push(event);
            }
        }
        let n = rows.len() as u64;
        self.progress.scanned.fetch_add(n, Ordering::Relaxed);
        self.progress.opened.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Visits the hot events of the conversations whose heads are given.
    async fn scan_hot_conversations(
        &self,
        tenant: &TenantId,
        heads: Vec<(ConvId, Vec<u8>)>,
        sel: Selection<'_>,
        visitor: &mut dyn Visitor,
    ) -> Result<(), ComplianceError> {
        // A tenant's hot tail is often thin over many conversations: each chunk's archive
        // floors, then up to HOT_OPEN_ALL hot events of each, are read in one round trip
        // for all of them (each range read from its floor on: the archived events' deletes
        // are never walked through).
        for chunk in heads.chunks(HOT_CONVS_AT_ONCE) {
            let mut lasts = Vec::with_capacity(chunk.len());
            for (conv, head) in chunk {
                let head = Head::decode(head.as_slice())
                    .map_err(|e| LogError::corrupt(&keys::head(tenant, conv), e))?;
                lasts.push(head.last_seq);
            }
            let convs: Vec<ConvId> = chunk.iter().map(|(c, _)| c.clone()).collect();
            let floors = archived_through_each(self.store, tenant, &convs).await?;
            let ranges = convs
                .iter()
                .zip(floors.iter().zip(&lasts))
                // Nothing hot: an empty range (from 1 to 0).
                .map(|(conv, (&floor, &last))| match floor.checked_add(1) {
                    Some(from) if from <= last => keys::event_range(tenant, conv, from, last),
                    _ => keys::event_range(tenant, conv, 1, 0),
                })
                .collect();
            let firsts = self
                .store
                .scan_each(ranges, HOT_OPEN_ALL as usize, Order::Ascending)
                .await
                .map_err(LogError::from)?;
            for (((conv, &last), floor), first) in convs.iter().zip(&lasts).zip(floors).zip(firsts)
            {
                let mut next = floor + 1;
                let long = first.len() as u64 >= HOT_OPEN_ALL;
                if let Some(hot) = sel.hot
                    && long
                {
                    let indexed = watermark(self.store, tenant, conv).await?.min(last);
                    if indexed >= next && indexed - next + 1 > HOT_OPEN_ALL {
                        self.scan_indexed(tenant, conv, next, indexed, hot, sel, visitor)
                            .await?;
                        self.scan_hot_range(tenant, conv, indexed + 1, last, sel, visitor)
                            .await?;
                        continue;
                    }
                }
                if let Some((last_key, _)) = first.last() {
                    next = keys::event_seq(last_key)
                        .ok_or_else(|| LogError::corrupt(last_key, "bad key"))?
                        + 1;
                }
                let mut events = Vec::new();
                self.open_hot(tenant, conv, &first, sel, &mut events)
                    .await?;
                if !events.is_empty() {
                    visitor.visit(events, Tier::Hot).await?;
                }
                if long {
                    self.scan_hot_range(tenant, conv, next, last, sel, visitor)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Visits the hot events `next..=last` of `conv` that `sel` selects, a page at a time.
    async fn scan_hot_range(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        mut next: u64,
        last: u64,
        sel: Selection<'_>,
        visitor: &mut dyn Visitor,
    ) -> Result<(), ComplianceError> {
        while next <= last {
            let page = self
                .store
                .scan(
                    keys::event_range(tenant, conv, next, last),
                    1000,
                    Order::Ascending,
                )
                .await
                .map_err(LogError::from)?;
            let Some((last_key, _)) = page.last() else {
                break;
            };
            next = keys::event_seq(last_key)
                .ok_or_else(|| LogError::corrupt(last_key, "bad key"))?
                + 1;
            let mut events = Vec::new();
            self.open_hot(tenant, conv, &page, sel, &mut events).await?;
            if !events.is_empty() {
                visitor.visit(events, Tier::Hot).await?;
            }
        }
        Ok(())
    }
}

impl Scanner<'_> {
    /// Visits the events of `from..=to` of a conversation (all covered by its hot index)
    /// that `hot` names and `sel` selects, a chunk of seqs at a time.
    #[allow(clippy::too_many_arguments)]
    async fn scan_indexed(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        from: u64,
        to: u64,
        hot: &HotQuery,
        sel: Selection<'_>,
        visitor: &mut dyn Visitor,
    ) -> Result<(), ComplianceError> {
        let also = hot.also.get(conv.as_str());
        let mut lo = from;
        while lo <= to {
            let hi = to.min(lo.saturating_add(HOT_CHUNK - 1));
            let mut seqs: BTreeSet<u64> = BTreeSet::new();
            for terms in &hot.any_of {
                let terms: Vec<&Term> = terms.iter().collect();
                let mut postings =
                    Postings::new(self.keyring, tenant, &terms, lo, hi, Order::Ascending).await?;
                while !postings.done() {
                    let (page, _) = postings
                        .next(self.store, tenant, conv, POSTING_PAGE)
                        .await?;
                    seqs.extend(
                        page.into_iter()
                            .filter(|(_, time)| sel.time_overlaps(*time, *time))
                            .map(|(seq, _)| seq),
                    );
                }
            }
            seqs.extend(
                also.into_iter()
                    .flatten()
                    .filter(|s| (lo..=hi).contains(*s)),
            );
            self.progress
                .scanned
                .fetch_add(hi - lo + 1, Ordering::Relaxed);
            let wanted: Vec<Vec<u8>> = seqs.iter().map(|s| keys::event(tenant, conv, *s)).collect();
            let values = self
                .store
                .batch_get(wanted.clone())
                .await
                .map_err(LogError::from)?;
            let mut events = Vec::new();
            for ((key, value), seq) in wanted.iter().zip(values).zip(&seqs) {
                // Gone meanwhile (archived by another process): the full scan would not see it
                // either.
                let Some(value) = value else { continue };
                let event =
                    open_stored_event(self.keyring, tenant, conv, *seq, key, &value).await?;
                self.progress.opened.fetch_add(1, Ordering::Relaxed);
                if sel.matches(&event) {
                    events.push(event);
                }
            }
            if !events.is_empty() {
                visitor.visit(events, Tier::Hot).await?;
            }
            lo = hi + 1;
        }
        Ok(())
    }
}

/// Whether a row group's statistics allow a row matching `sel`.
fn stats_may_match(group: &parquet::file::metadata::RowGroupMetaData, sel: Selection<'_>) -> bool {
    if let Some(Statistics::Int64(s)) = group.column(col::TIME).statistics()
        && let (Some(&min), Some(&max)) = (s.min_opt(), s.max_opt())
        && !sel.time_overlaps(min, max)
    {
        return false;
    }
    let within = |column: usize, value: Option<&str>| {
        let Some(value) = value else { return true };
        match group.column(column).statistics() {
            Some(Statistics::ByteArray(s)) => match (s.min_opt(), s.max_opt()) {
                (Some(min), Some(max)) => {
                    let v = ByteArray::from(value);
                    min.data() <= v.data() && v.data() <= max.data()
                }
                _ => true,
            },
            _ => true,
        }
    };
    within(col::CONVERSATION, sel.conv.map(ConvId::as_str))
        && within(col::SENDER, sel.sender.map(UserId::as_str))
}

/// Opens rows on the blocking pool, split over the available cores; returns the events in
/// row order.
async fn open_parallel(
    segment: &Arc<Segment>,
    key: &tidings_log::crypto::DataKey,
    rows: Vec<format::Row>,
    path: &str,
) -> Result<Vec<Event>, ArchiveError> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let chunk = rows.len().div_ceil(workers).max(256);
    let mut rows = rows;
    let mut tasks = Vec::new();
    while !rows.is_empty() {
        let part: Vec<format::Row> = rows.drain(..chunk.min(rows.len())).collect();
        let (segment, key) = (segment.clone(), key.clone());
        tasks.push(tokio::task::spawn_blocking(move || {
            segment.open_all(&key, &part)
        }));
    }
    let mut events = Vec::new();
    for task in tasks {
        let opened = task
            .await
            .map_err(|e| ArchiveError::corrupt(path, format!("opening rows failed: {e}")))?
            .map_err(|e| ArchiveError::corrupt(path, e))?;
        events.extend(opened);
    }
    Ok(events)
}
