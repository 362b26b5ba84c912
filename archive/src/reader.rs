//! [`ColdReader`]: the log's cold tier. Finds archived events through the index, fetches
//! only the row groups it needs and decodes only the pages it needs.
//!
//! Three bounded caches keep repeated paging and searching cheap: segment footers (Parquet
//! metadata with the page index, and the opened body dictionary), fetched row-group bytes,
//! and opened search indexes (a user's search asks the same segments again and again; each
//! index is sealed whole, so opening it is the cost). All evict the oldest entry first once
//! over their byte budget.
//!
//! A user's search ([`ColdTier::search_candidates`]) gets a conversation's candidate seqs
//! from the search indexes of the segments its runs are in: the index's rows that hold
//! every term, within the run's rows, turned back into seqs. A segment without an index
//! names all of its seqs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

use base64::Engine;
use tidings_log::cold::{ColdTier, decode_run};
use tidings_log::crypto::Keyring;
use tidings_log::search::Needle;
use tidings_log::store::{KeyRange, KvStore, Order};
use tidings_log::{ConvId, Event, LogError, TenantId, keys};
use tidings_schemas::storage::ArchiveRun;

use crate::codec::{self, Dictionary};
use crate::error::ArchiveError;
use crate::format::{self, Fetched, Footer, meta};
use crate::search_index::{self, SegmentIndex};
use crate::storage::Objects;

/// A segment's footer with what it takes to open its rows.
pub struct Segment {
    pub footer: Footer,
    pub tenant: TenantId,
    pub segment_id: String,
    pub key_id: u32,
    dict: Option<Dictionary>,
}

impl Segment {
    /// Checks the footer belongs to `tenant` and opens its dictionary.
    pub async fn open(
        path: &str,
        footer: Footer,
        tenant: &TenantId,
        keyring: &Keyring,
    ) -> Result<Segment, ArchiveError> {
        let get = |name: &str| {
            footer
                .kv
                .get(name)
                .cloned()
                .ok_or_else(|| ArchiveError::corrupt(path, format!("footer lacks {name}")))
        };
        let version = get(meta::FORMAT)?;
        if version != format::FORMAT_VERSION {
            return Err(ArchiveError::corrupt(
                path,
                format!("segment format {version} is not one this build reads"),
            ));
        }
        if get(meta::TENANT)? != tenant.as_str() {
            return Err(ArchiveError::corrupt(
                path,
                "segment belongs to another tenant",
            ));
        }
        let segment_id = get(meta::SEGMENT)?;
        let key_id: u32 = get(meta::KEY_ID)?
            .parse()
            .map_err(|_| ArchiveError::corrupt(path, "bad key id in footer"))?;
        let dict = match footer.kv.get(meta::DICT) {
            None => None,
            Some(b64) => {
                let sealed = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| ArchiveError::corrupt(path, e))?;
                let key = keyring.key(tenant, key_id).await?;
                Some(
                    Dictionary::open(&key, tenant, &segment_id, &sealed)
                        .map_err(|e| ArchiveError::corrupt(path, e))?,
                )
            }
        };
        Ok(Segment {
            footer,
            tenant: tenant.clone(),
            segment_id,
            key_id,
            dict,
        })
    }

    /// Rows `offset..offset + n` of row group `rg` (whose bytes `data` holds), checked to be
    /// seqs `first_seq..` of `conv` as the index says.
    #[allow(clippy::too_many_arguments)]
    pub fn read_indexed(
        &self,
        path: &str,
        data: &Fetched,
        rg: usize,
        offset: usize,
        n: usize,
        conv: &str,
        first_seq: u64,
    ) -> Result<Vec<format::Row>, ArchiveError> {
        let rows = format::read_rows(&self.footer, data, rg, offset, n, true)
            .map_err(|e| ArchiveError::corrupt(path, e))?;
        for (i, (row, seq)) in rows.iter().zip(first_seq..).enumerate() {
            check_row(path, rg, offset + i, row, conv, seq)?;
        }
        Ok(rows)
    }

    /// Fetches `range` of this segment's object (a row group's columns, a bloom filter).
    pub async fn fetch(
        &self,
        objects: &Objects,
        path: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<Fetched, ArchiveError> {
        let range = range.ok_or_else(|| ArchiveError::corrupt(path, "empty row group"))?;
        let bytes = objects.get_range(path, range.clone()).await?;
        Ok(Fetched {
            base: range.start,
            bytes,
            len: self.footer.len,
        })
    }

    /// An opener for many rows of this segment.
    pub fn opener(&self) -> codec::Opener<'_> {
        codec::Opener::new(self.dict.as_ref())
    }

    /// Opens rows read from this segment into events.
    pub async fn open_rows(
        &self,
        path: &str,
        keyring: &Keyring,
        rows: &[format::Row],
    ) -> Result<Vec<Event>, ArchiveError> {
        let key = keyring.key(&self.tenant, self.key_id).await?;
        self.open_all(&key, rows)
            .map_err(|e| ArchiveError::corrupt(path, e))
    }

    /// Opens rows read from this segment into events with `key`, its data key; CPU work,
    /// for the blocking pool when there are many.
    pub fn open_all(
        &self,
        key: &tidings_log::crypto::DataKey,
        rows: &[format::Row],
    ) -> Result<Vec<Event>, String> {
        let mut opener = self.opener();
        rows.iter()
            .map(|row| opener.open(key, &self.tenant, row))
            .collect()
    }
}

/// Checks that row `index` of row group `rg` is seq `seq` of `conv`, as the index says.
fn check_row(
    path: &str,
    rg: usize,
    index: usize,
    row: &format::Row,
    conv: &str,
    seq: u64,
) -> Result<(), ArchiveError> {
    if row.conversation == conv && row.seq == seq {
        return Ok(());
    }
    Err(ArchiveError::corrupt(
        path,
        format!(
            "row {index} of row group {rg} holds ({}, {}) where the index says ({conv}, {seq})",
            row.conversation, row.seq
        ),
    ))
}

/// Fetches a segment's footer: the object's tail, fetched again larger until the footer and
/// page index fit (one request for almost every segment).
pub async fn fetch_footer(objects: &Objects, path: &str) -> Result<Footer, ArchiveError> {
    let (mut bytes, len) = objects.get_tail(path, 256 << 10).await?;
    loop {
        let want = bytes.len() as u64;
        let tail = Fetched {
            base: len - want,
            bytes,
            len,
        };
        match Footer::parse(&tail) {
            Ok(footer) => return Ok(footer),
            Err(_) if want < len => {
                let more = (want * 4).min(len);
                bytes = objects.get_range(path, len - more..len).await?;
            }
            Err(e) => return Err(ArchiveError::corrupt(path, e)),
        }
    }
}

/// A byte-bounded cache that evicts its oldest entry first.
struct Cache<K, V> {
    map: HashMap<K, (V, usize)>,
    order: VecDeque<K>,
    bytes: usize,
    budget: usize,
}

impl<K: Clone + Eq + Hash, V: Clone> Cache<K, V> {
    fn new(budget: usize) -> Self {
        Cache {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        self.map.get(key).map(|(v, _)| v.clone())
    }

    fn insert(&mut self, key: K, value: V, size: usize) {
        if size > self.budget || self.map.contains_key(&key) {
            return;
        }
        while self.bytes + size > self.budget {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some((_, s)) = self.map.remove(&old) {
                self.bytes -= s;
            }
        }
        self.bytes += size;
        self.order.push_back(key.clone());
        self.map.insert(key, (value, size));
    }
}

/// A [`Cache`] shared between tasks (a std mutex: it is held for a map operation only,
/// never across an await).
struct Shared<K, V>(Mutex<Cache<K, V>>);

impl<K: Clone + Eq + Hash, V: Clone> Shared<K, V> {
    fn new(budget: usize) -> Self {
        Shared(Mutex::new(Cache::new(budget)))
    }

    fn get(&self, key: &K) -> Option<V> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(key)
    }

    fn insert(&self, key: K, value: V, size: usize) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, value, size);
    }
}

/// Counters of what reads cost, for the benchmark and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub footer_fetches: u64,
    pub row_group_fetches: u64,
    pub fetched_bytes: u64,
}

pub struct ColdReader {
    store: Arc<dyn KvStore>,
    keyring: Arc<Keyring>,
    objects: Objects,
    segments: Shared<String, Arc<Segment>>,
    groups: Shared<(String, usize), Fetched>,
    /// Opened search indexes by segment path (`None`: the segment has none).
    indexes: Shared<String, Option<Arc<SegmentIndex>>>,
    stats: Mutex<ReadStats>,
}

/// A row a scattered read wants: (row in its row group, which conversation asked, seq).
type Wanted = (usize, usize, u64);

/// Conversations whose archive runs are looked up together.
const RUNS_AT_ONCE: usize = 64;
/// Runs read per conversation per round trip.
const RUN_PAGE: usize = 256;

/// A segment's rows that hold every term of a query, with where its row groups start.
struct IndexedRows {
    rows: Vec<u32>,
    starts: Vec<u32>,
}

impl ColdReader {
    /// `cache_bytes` bounds the row-group cache; footers get an eighth of it on top, opened
    /// search indexes a quarter.
    pub fn new(
        store: Arc<dyn KvStore>,
        keyring: Arc<Keyring>,
        objects: Objects,
        cache_bytes: usize,
    ) -> Self {
        ColdReader {
            store,
            keyring,
            objects,
            segments: Shared::new(cache_bytes / 8),
            groups: Shared::new(cache_bytes),
            indexes: Shared::new(cache_bytes / 4),
            stats: Mutex::new(ReadStats::default()),
        }
    }

    pub fn stats(&self) -> ReadStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, f: impl FnOnce(&mut ReadStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    async fn segment(&self, tenant: &TenantId, path: &str) -> Result<Arc<Segment>, ArchiveError> {
        let cached = self.segments.get(&path.to_string());
        if let Some(segment) = cached {
            return Ok(segment);
        }
        let footer = fetch_footer(&self.objects, path).await?;
        let size = footer.meta.memory_size() + 64 * 1024;
        self.count(|s| s.footer_fetches += 1);
        let segment = Arc::new(Segment::open(path, footer, tenant, &self.keyring).await?);
        self.segments
            .insert(path.to_string(), segment.clone(), size);
        Ok(segment)
    }

    async fn row_group(
        &self,
        path: &str,
        segment: &Segment,
        rg: usize,
    ) -> Result<Fetched, ArchiveError> {
        let key = (path.to_string(), rg);
        let cached = self.groups.get(&key);
        if let Some(data) = cached {
            return Ok(data);
        }
        let range = segment
            .footer
            .row_group_range(rg)
            .ok_or_else(|| ArchiveError::corrupt(path, format!("no row group {rg}")))?;
        let bytes = self.objects.get_range(path, range.clone()).await?;
        self.count(|s| {
            s.row_group_fetches += 1;
            s.fetched_bytes += bytes.len() as u64;
        });
        let data = Fetched {
            base: range.start,
            len: segment.footer.len,
            bytes,
        };
        let size = data.bytes.len();
        self.groups.insert(key, data.clone(), size);
        Ok(data)
    }

    /// The opened search index of the segment at `path`, cached.
    async fn search_index(
        &self,
        tenant: &TenantId,
        path: &str,
    ) -> Result<Option<Arc<SegmentIndex>>, ArchiveError> {
        let cached = self.indexes.get(&path.to_string());
        if let Some(index) = cached {
            return Ok(index);
        }
        let index = search_index::load(&self.objects, &self.keyring, tenant, path)
            .await?
            .map(Arc::new);
        let size = index.as_ref().map_or(64, |i| i.memory_size());
        self.indexes.insert(path.to_string(), index.clone(), size);
        Ok(index)
    }

    /// The rows of the segment at `path` that hold every term of `needle`; `None` if it has
    /// no search index.
    async fn indexed_rows(
        &self,
        tenant: &TenantId,
        path: &str,
        needle: &Needle,
    ) -> Result<Option<IndexedRows>, ArchiveError> {
        let Some(index) = self.search_index(tenant, path).await? else {
            return Ok(None);
        };
        let segment = self.segment(tenant, path).await?;
        let starts = index.row_group_starts(&segment.footer.meta)?;
        let key = self
            .keyring
            .key(tenant, index.key_id)
            .await?
            .search_key(tenant);
        let rows = index.candidates(&key, needle)?;
        Ok(Some(IndexedRows { rows, starts }))
    }

    /// The candidates of each of `wanted` (see [`ColdTier::search_candidates`]).
    async fn search_archived(
        &self,
        tenant: &TenantId,
        wanted: &[(ConvId, RangeInclusive<u64>)],
        needle: &Needle,
    ) -> Result<Vec<Vec<RangeInclusive<u64>>>, ArchiveError> {
        // A segment holds many conversations' runs: its rows are looked up once.
        let mut segments: HashMap<String, Option<IndexedRows>> = HashMap::new();
        let mut found = Vec::with_capacity(wanted.len());
        // A chunk's runs at a time: a user may have thousands of conversations, each
        // archived in many passes.
        for chunk in wanted.chunks(RUNS_AT_ONCE) {
            let runs = self.runs_each(tenant, chunk).await?;
            for ((_, range), runs) in chunk.iter().zip(runs) {
                let (from, to) = (*range.start(), *range.end());
                found.push(
                    self.conversation_candidates(tenant, runs, from, to, needle, &mut segments)
                        .await?,
                );
            }
        }
        Ok(found)
    }

    /// The candidates among `runs` (a conversation's, covering `from..=to`).
    async fn conversation_candidates(
        &self,
        tenant: &TenantId,
        runs: Vec<(u64, ArchiveRun)>,
        from: u64,
        to: u64,
        needle: &Needle,
        segments: &mut HashMap<String, Option<IndexedRows>>,
    ) -> Result<Vec<RangeInclusive<u64>>, ArchiveError> {
        let mut out: Vec<RangeInclusive<u64>> = Vec::new();
        let mut add = |lo: u64, hi: u64| match out.last_mut() {
            Some(last) if *last.end() + 1 == lo => *last = *last.start()..=hi,
            _ => out.push(lo..=hi),
        };
        for (first_seq, run) in runs {
            let (lo, hi) = (first_seq.max(from), run.last_seq.min(to));
            // Retention's marker: nothing below it is searched (the caller starts above it).
            if tidings_log::cold::is_purge_marker(&run) || lo > hi {
                continue;
            }
            if !segments.contains_key(&run.path) {
                let rows = self.indexed_rows(tenant, &run.path, needle).await?;
                segments.insert(run.path.clone(), rows);
            }
            let Some(Some(indexed)) = segments.get(&run.path) else {
                add(lo, hi);
                continue;
            };
            let start = indexed
                .starts
                .get(run.row_group as usize)
                .ok_or_else(|| ArchiveError::corrupt(&run.path, "no such row group"))?;
            // The row of the run's first seq, and the rows of lo..=hi.
            let base = u64::from(*start) + run.row_offset;
            let (a, b) = (base + (lo - first_seq), base + (hi - first_seq));
            let at = indexed.rows.partition_point(|&r| u64::from(r) < a);
            for &row in indexed.rows[at..]
                .iter()
                .take_while(|&&r| u64::from(r) <= b)
            {
                let seq = first_seq + (u64::from(row) - base);
                add(seq, seq);
            }
        }
        Ok(out)
    }

    /// The index runs covering `from..=to`, in order.
    async fn runs(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, ArchiveRun)>, ArchiveError> {
        let mut runs = self.runs_each(tenant, &[(conv.clone(), from..=to)]).await?;
        Ok(runs.pop().unwrap_or_default())
    }

    /// [`Self::runs`] of each of `wanted`, a few round trips for [`RUNS_AT_ONCE`]
    /// conversations at a time rather than a few for each.
    async fn runs_each(
        &self,
        tenant: &TenantId,
        wanted: &[(ConvId, RangeInclusive<u64>)],
    ) -> Result<Vec<Vec<(u64, ArchiveRun)>>, ArchiveError> {
        let mut out = Vec::with_capacity(wanted.len());
        for chunk in wanted.chunks(RUNS_AT_ONCE) {
            // The run holding each `from` (the last one starting at or below it).
            let firsts = self
                .store
                .scan_each(
                    chunk
                        .iter()
                        .map(|(c, r)| keys::archive_runs_through(tenant, c, *r.start()))
                        .collect(),
                    1,
                    Order::Descending,
                )
                .await
                .map_err(LogError::from)?;
            let mut runs: Vec<Vec<(u64, ArchiveRun)>> = Vec::with_capacity(chunk.len());
            let mut next: Vec<Option<u64>> = Vec::with_capacity(chunk.len());
            for ((_, range), first) in chunk.iter().zip(firsts) {
                let mut found = Vec::new();
                let mut at = *range.start();
                if let Some((key, value)) = first.first() {
                    let run = decode_run(key, value)?;
                    at = run.last_seq + 1;
                    found.push((keys::event_seq(key).unwrap_or(0), run));
                }
                runs.push(found);
                next.push((at <= *range.end()).then_some(at));
            }
            // Then the runs above it, a page of each conversation at a time.
            loop {
                let open: Vec<usize> = (0..chunk.len()).filter(|&i| next[i].is_some()).collect();
                if open.is_empty() {
                    break;
                }
                let ranges = open
                    .iter()
                    .map(|&i| {
                        let (conv, range) = &chunk[i];
                        KeyRange {
                            start: keys::archive_run(tenant, conv, next[i].unwrap_or(0)),
                            end: keys::archive_run(tenant, conv, range.end().saturating_add(1)),
                        }
                    })
                    .collect();
                let pages = self
                    .store
                    .scan_each(ranges, RUN_PAGE, Order::Ascending)
                    .await
                    .map_err(LogError::from)?;
                for (&i, page) in open.iter().zip(pages) {
                    let full = page.len() == RUN_PAGE;
                    let mut at = None;
                    for (key, value) in page {
                        let run = decode_run(&key, &value)?;
                        at = Some(run.last_seq + 1);
                        runs[i].push((keys::event_seq(&key).unwrap_or(0), run));
                    }
                    next[i] = at.filter(|&at| full && at <= *chunk[i].1.end());
                }
            }
            out.extend(runs);
        }
        Ok(out)
    }

    async fn read_archived(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        from: u64,
        to: u64,
    ) -> Result<Vec<Event>, ArchiveError> {
        let mut events = Vec::with_capacity((to - from + 1) as usize);
        let mut expected = from;
        for (first_seq, run) in self.runs(tenant, conv, from, to).await? {
            if expected > to {
                break;
            }
            if tidings_log::cold::is_purge_marker(&run) {
                return Err(purged(conv, run.last_seq));
            }
            if first_seq > expected || run.last_seq < expected {
                break;
            }
            let last = run.last_seq.min(to);
            let offset = run.row_offset + (expected - first_seq);
            let n = (last - expected + 1) as usize;
            let segment = self.segment(tenant, &run.path).await?;
            let rg = run.row_group as usize;
            let data = self.row_group(&run.path, &segment, rg).await?;
            let key = self.keyring.key(&segment.tenant, segment.key_id).await?;
            let (seg, path, conv) = (segment.clone(), run.path.clone(), conv.to_string());
            // Decoding pages and opening up to a page of events is CPU work: on the blocking
            // pool, off the async workers that carry every session's frames.
            let opened = tokio::task::spawn_blocking(move || {
                let rows =
                    seg.read_indexed(&path, &data, rg, offset as usize, n, &conv, expected)?;
                seg.open_all(&key, &rows)
                    .map_err(|e| ArchiveError::corrupt(&path, e))
            })
            .await
            .map_err(|e| ArchiveError::corrupt(&run.path, format!("opening rows failed: {e}")))??;
            events.extend(opened);
            expected = last + 1;
        }
        if expected <= to {
            return Err(ArchiveError::Log(LogError::corrupt(
                &keys::archive_run(tenant, conv, expected),
                "archive index has no run for this seq",
            )));
        }
        Ok(events)
    }
}

impl ColdReader {
    /// The events at `wanted`'s ranges (see [`ColdTier::read_ranges`]): every seq located
    /// through the conversation's runs, then each row group they fall in fetched, decoded
    /// (only the pages holding them) and opened once, on the blocking pool.
    async fn read_scattered(
        &self,
        tenant: &TenantId,
        wanted: &[(ConvId, Vec<RangeInclusive<u64>>)],
    ) -> Result<Vec<Vec<Event>>, ArchiveError> {
        let mut groups: BTreeMap<(String, usize), Vec<Wanted>> = BTreeMap::new();
        // A chunk of conversations' runs at a time (each may have been archived in many
        // passes).
        let mut runs_of: Vec<Vec<(u64, ArchiveRun)>> = Vec::new();
        for (i, (conv, ranges)) in wanted.iter().enumerate() {
            if i % RUNS_AT_ONCE == 0 {
                let spans: Vec<(ConvId, RangeInclusive<u64>)> = wanted[i..]
                    .iter()
                    .take(RUNS_AT_ONCE)
                    .map(|(conv, ranges)| match (ranges.first(), ranges.last()) {
                        (Some(first), Some(last)) => (conv.clone(), *first.start()..=*last.end()),
                        // Nothing asked: an empty span (its runs are never looked at).
                        _ => (conv.clone(), 0..=0),
                    })
                    .collect();
                runs_of = self.runs_each(tenant, &spans).await?;
                runs_of.reverse();
            }
            let runs = runs_of.pop().unwrap_or_default();
            if ranges.is_empty() {
                continue;
            }
            for seq in ranges.iter().flat_map(|r| r.clone()) {
                let at = runs.partition_point(|(first_seq, _)| *first_seq <= seq);
                let run = at
                    .checked_sub(1)
                    .map(|at| &runs[at])
                    .filter(|(_, run)| seq <= run.last_seq);
                let Some((first_seq, run)) = run else {
                    return Err(ArchiveError::Log(LogError::corrupt(
                        &keys::archive_run(tenant, conv, seq),
                        "archive index has no run for this seq",
                    )));
                };
                if tidings_log::cold::is_purge_marker(run) {
                    return Err(purged(conv, run.last_seq));
                }
                let row = run.row_offset + (seq - first_seq);
                groups
                    .entry((run.path.clone(), run.row_group as usize))
                    .or_default()
                    .push((row as usize, i, seq));
            }
        }
        let mut out: Vec<Vec<Event>> = vec![Vec::new(); wanted.len()];
        // Row groups are decoded and opened on the blocking pool, one per core at a time.
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(8);
        let mut decoding = VecDeque::new();
        for ((path, rg), mut rows) in groups {
            rows.sort_unstable();
            let segment = self.segment(tenant, &path).await?;
            let data = self.row_group(&path, &segment, rg).await?;
            let key = self.keyring.key(&segment.tenant, segment.key_id).await?;
            let convs: Vec<String> = rows
                .iter()
                .map(|&(_, i, _)| wanted[i].0.to_string())
                .collect();
            let (seg, at, object) = (segment.clone(), rows.clone(), path.clone());
            let task = tokio::task::spawn_blocking(move || -> Result<Vec<Event>, ArchiveError> {
                let path = object;
                let indices: Vec<usize> = at.iter().map(|r| r.0).collect();
                let read = format::read_rows_at(&seg.footer, &data, rg, &indices)
                    .map_err(|e| ArchiveError::corrupt(&path, e))?;
                if read.len() != at.len() {
                    return Err(ArchiveError::corrupt(
                        &path,
                        "rows missing from a row group",
                    ));
                }
                let mut opener = seg.opener();
                read.iter()
                    .zip(at.iter().zip(&convs))
                    .map(|(row, (&(index, _, seq), conv))| {
                        check_row(&path, rg, index, row, conv, seq)?;
                        opener
                            .open(&key, &seg.tenant, row)
                            .map_err(|e| ArchiveError::corrupt(&path, e))
                    })
                    .collect()
            });
            decoding.push_back((task, rows, path));
            if decoding.len() >= workers {
                place(&mut decoding, &mut out).await?;
            }
        }
        while !decoding.is_empty() {
            place(&mut decoding, &mut out).await?;
        }
        for events in &mut out {
            events.sort_unstable_by_key(|e| e.seq);
        }
        Ok(out)
    }
}

/// A row group being decoded on the blocking pool, with the rows it was asked for.
type Decoding = (
    tokio::task::JoinHandle<Result<Vec<Event>, ArchiveError>>,
    Vec<Wanted>,
    String,
);

/// Waits for the oldest row group being decoded and puts its events where they were asked.
async fn place(
    decoding: &mut VecDeque<Decoding>,
    out: &mut [Vec<Event>],
) -> Result<(), ArchiveError> {
    let Some((task, rows, path)) = decoding.pop_front() else {
        return Ok(());
    };
    let events = task
        .await
        .map_err(|e| ArchiveError::corrupt(&path, format!("opening rows failed: {e}")))??;
    for (event, (_, i, _)) in events.into_iter().zip(rows) {
        out[i].push(event);
    }
    Ok(())
}

/// Reading below retention's marker.
fn purged(conv: &ConvId, through: u64) -> ArchiveError {
    ArchiveError::Log(LogError::InvalidRequest(format!(
        "seqs up to {through} of conversation {conv} were deleted by the retention policy"
    )))
}

#[async_trait::async_trait]
impl ColdTier for ColdReader {
    async fn read_ranges(
        &self,
        tenant: &TenantId,
        wanted: &[(ConvId, Vec<RangeInclusive<u64>>)],
    ) -> Result<Vec<Vec<Event>>, LogError> {
        Ok(self.read_scattered(tenant, wanted).await?)
    }

    async fn read(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        from: u64,
        to: u64,
    ) -> Result<Vec<Event>, LogError> {
        Ok(self.read_archived(tenant, conv, from, to).await?)
    }

    async fn search_candidates(
        &self,
        tenant: &TenantId,
        wanted: &[(ConvId, RangeInclusive<u64>)],
        needle: &Needle,
    ) -> Result<Vec<Vec<RangeInclusive<u64>>>, LogError> {
        Ok(self.search_archived(tenant, wanted, needle).await?)
    }
}
