//! A user's search of their own history ([`Log::search`]): the gateway's Search op.
//!
//! **What a user may find.** Messages of the conversations in the user's list (`uc/`: those
//! they are a member of now), within the windows they were a member in: from the seq they
//! (last) joined at, and each earlier window that ended with their leave or removal
//! (`uw/`), never between windows; above what retention purged; by their current text only
//! (an edited message by its latest edit, if that edit too falls in a window; a recalled one
//! never). Conversations they left and did not rejoin are not searched (they cannot read
//! them either).
//!
//! **How.** Per conversation, newest first: the hot postings (`hot_index`) name candidate
//! events up to the index's watermark, every event above it is opened (so a lagging index
//! changes the cost, never the result), and archived candidates come from the archive's
//! sealed per-segment indexes ([`ColdTier::search_candidates`](crate::cold::ColdTier)),
//! opened newest first, only as deep as the page needs. The conversations' candidates are
//! merged by (time, conversation, seq), descending; each is opened and confirmed with
//! [`Needle::matches`] and its message's fate. Every byte examined is charged to
//! `log.search_budget_bytes`.
//!
//! **Cursor.** `(query hash, time, seq, conversation)` of the last candidate examined, hex:
//! the next page continues strictly below it. A cursor of another query is refused.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::RangeInclusive;

use prost::Message;
use sha2::{Digest, Sha256};
use tidings_schemas::client::{Highlight, SearchHit, SearchResult};
use tidings_schemas::storage::{Head, UserConversation};
use tidings_schemas::v1::event::Body;

use crate::ReadRange;
use crate::cold::{archived_through_each, decode_purge_marker};
use crate::crypto::hex_encode;
use crate::error::LogError;
use crate::hot_index::{Fate, Postings, decode_watermark};
use crate::ids::{ConvId, TenantId, UserId};
use crate::keys;
use crate::log::{Log, open_stored_event};
use crate::search::{Needle, Term};
use crate::store::{KeyRange, Order, Pages};
use tidings_schemas::v1::Event;

/// Bytes of text around the first match a hit shows.
pub const SNIPPET_BYTES: usize = 200;
/// Archived candidates opened per step while merging: the first step of a conversation
/// opens [`ARCHIVE_FIRST`] (the merge may need only its newest), each next one twice as many,
/// up to this.
const ARCHIVE_PAGE: usize = 64;
const ARCHIVE_FIRST: usize = 4;
/// Charged per range of archived candidates held (and per membership window).
const RANGE_COST: usize = 16;
/// Charged per conversation listed (its list entry and head).
const CONVERSATION_COST: usize = 128;
const CURSOR_VERSION: u8 = 1;

/// A position in the merge: newest first by time, then conversation, then seq.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Pos {
    time: i64,
    conv: String,
    seq: u64,
}

/// Postings read per term per step of a conversation's candidates.
const POSTING_PAGE: usize = 64;

/// Hot candidates known by their postings opened in one read when the merge reaches the
/// first of them: the next ones of a conversation are usually wanted next.
const OPEN_AHEAD: usize = 16;

/// A candidate: known by its posting (time only), already opened, or opened with its
/// message's stored fate (`sf/`, for a posted message).
enum Cand {
    Posting { seq: u64, time: i64 },
    Event(Box<Event>),
    Opened(Box<(Event, Option<Vec<u8>>)>),
}

impl Cand {
    fn pos(&self, conv: &str) -> Pos {
        match self {
            Cand::Posting { seq, time } => Pos {
                time: *time,
                conv: conv.to_string(),
                seq: *seq,
            },
            Cand::Event(e) => Pos {
                time: e.server_time_ms,
                conv: conv.to_string(),
                seq: e.seq,
            },
            Cand::Opened(o) => Pos {
                time: o.0.server_time_ms,
                conv: conv.to_string(),
                seq: o.0.seq,
            },
        }
    }
}

/// The archived part of a conversation's candidates.
enum ArchivePart {
    /// Not asked of the archive yet: seqs up to this one are archived (below the stream's
    /// `lo`: none).
    Unasked { through: u64 },
    /// Candidate seqs still to open, ascending ranges, taken from the top.
    Candidates(Vec<RangeInclusive<u64>>),
}

/// One conversation's candidates, newest first.
struct Stream {
    conv: ConvId,
    /// The seqs the user may find here, ascending, disjoint, never empty.
    windows: Vec<RangeInclusive<u64>>,
    /// The first of them.
    lo: u64,
    /// Hot candidates ready, descending by seq (and so by time): first the events opened
    /// above the index's watermark, then pages of postings.
    hot: VecDeque<Cand>,
    /// The postings still to page through, newest first.
    postings: Option<Postings>,
    /// Opened archived events waiting, descending.
    archived: VecDeque<Event>,
    /// Archived candidates not opened yet.
    archive: ArchivePart,
    /// How many of them the next step opens.
    archive_step: usize,
    /// Fates seen in the events opened above the index's watermark.
    fates: HashMap<u64, Fate>,
}

impl Stream {
    fn in_window(&self, seq: u64) -> bool {
        self.windows.iter().any(|w| w.contains(&seq))
    }

    fn archive_left(&self) -> bool {
        match &self.archive {
            ArchivePart::Unasked { through } => *through >= self.lo,
            ArchivePart::Candidates(ranges) => !ranges.is_empty(),
        }
    }
}

/// Where a conversation stands: its head (`None`: no such conversation), the last seq
/// retention purged, the last archived, and the hot index's watermark (0: none).
struct ConvState {
    head: Option<u64>,
    purged: u64,
    archived: u64,
    watermark: u64,
}

struct Budget {
    left: usize,
}

impl Budget {
    /// Charges `bytes`; false once the budget is spent.
    fn charge(&mut self, bytes: usize) -> bool {
        self.left = self.left.saturating_sub(bytes);
        self.left > 0
    }
}

impl Log {
    /// One page of `user`'s search (see the module doc). `limit` is clamped to
    /// `log.search_max_page_hits`; 0 means that many.
    pub async fn search(
        &self,
        t: &TenantId,
        user: &UserId,
        query: &str,
        cursor: &str,
        limit: usize,
    ) -> Result<SearchResult, LogError> {
        let cfg = &self.config().search;
        let needle = Needle::new(query).map_err(|e| LogError::InvalidRequest(e.to_string()))?;
        let qhash = query_hash(query);
        let after = parse_cursor(cursor, qhash)?;
        let limit = match limit {
            0 => cfg.max_page_hits,
            n => n.min(cfg.max_page_hits),
        };
        let mut budget = Budget {
            left: cfg.budget_bytes,
        };
        let mut streams = Vec::new();
        let mut ended = self.ended_windows(t, user, &mut budget).await?;
        let dir = keys::user_conv_dir(t, user);
        let mut pages = Pages::new(KeyRange::prefix(dir.clone()));
        let mut listed = true;
        while listed && let Some(rows) = pages.next(&**self.store()).await? {
            let mut page = Vec::with_capacity(rows.len());
            for (key, value) in rows {
                if !budget.charge(CONVERSATION_COST) {
                    listed = false;
                    break;
                }
                let entry = UserConversation::decode(value.as_slice())
                    .map_err(|e| LogError::corrupt(&key, e))?;
                let conv = keys::last_part(&dir, &key)
                    .and_then(|c| ConvId::new(c).ok())
                    .ok_or_else(|| LogError::corrupt(&key, "bad conversation key"))?;
                let mut windows = ended.remove(conv.as_str()).unwrap_or_default();
                windows.push(entry.joined_seq..=u64::MAX);
                page.push((conv, windows));
            }
            let convs: Vec<ConvId> = page.iter().map(|(c, _)| c.clone()).collect();
            let states = self.conversation_states(t, &convs).await?;
            for ((conv, windows), state) in page.into_iter().zip(states) {
                if let Some(s) = self
                    .open_stream(t, conv, windows, state, &needle, &after, &mut budget)
                    .await?
                {
                    streams.push(s);
                }
            }
        }
        let mut hits = Vec::new();
        let mut last_examined: Option<Pos> = None;
        let mut exhausted = true;
        while hits.len() < limit {
            if budget.left == 0 {
                exhausted = false;
                break;
            }
            // Refill where the ready candidates are used up: postings, then the archive (asked
            // once for every conversation that has not asked yet, as soon as one needs it: a
            // segment's index serves them all at once).
            for s in streams.iter_mut() {
                while s.hot.is_empty()
                    && let Some(p) = s.postings.as_mut()
                {
                    if p.done() {
                        s.postings = None;
                        break;
                    }
                    let (page, bytes) = p.next(&**self.store(), t, &s.conv, POSTING_PAGE).await?;
                    if !budget.charge(bytes) {
                        return Err(too_broad(cfg.budget_bytes));
                    }
                    let conv = s.conv.to_string();
                    let page: Vec<Cand> = page
                        .into_iter()
                        .filter(|(seq, _)| s.in_window(*seq))
                        .map(|(seq, time)| Cand::Posting { seq, time })
                        .filter(|c| after.as_ref().is_none_or(|a| c.pos(&conv) < *a))
                        .collect();
                    s.hot.extend(page);
                }
            }
            self.read_archived(t, &mut streams, &needle, &after, &mut budget)
                .await?;
            let best = streams
                .iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    let c = s.hot.front().map(|c| c.pos(s.conv.as_str())).or_else(|| {
                        s.archived.front().map(|e| Pos {
                            time: e.server_time_ms,
                            conv: s.conv.to_string(),
                            seq: e.seq,
                        })
                    })?;
                    Some((c, i))
                })
                .max();
            let Some((pos, i)) = best else { break };
            let s = &mut streams[i];
            let cand = match s.hot.pop_front() {
                Some(c) => c,
                None => Cand::Event(Box::new(s.archived.pop_front().expect("peeked"))),
            };
            // The event, and its message's fate (`sf/`) if it is a posted message: an edit's
            // fate is its target's, read in `confirm`.
            let (event, fate) = match cand {
                Cand::Event(e) => (*e, None),
                Cand::Opened(o) => (o.0, Some(o.1)),
                Cand::Posting { seq, .. } => {
                    // This one and the postings right behind it, in one read.
                    let mut seqs = vec![seq];
                    while seqs.len() < OPEN_AHEAD
                        && let Some(Cand::Posting { seq, .. }) = s.hot.front()
                    {
                        seqs.push(*seq);
                        s.hot.pop_front();
                    }
                    let mut opened = self.open_postings(t, &s.conv, &seqs, &mut budget).await?;
                    let first = match opened.first() {
                        Some((event, _)) if event.seq == seq => Some(opened.remove(0)),
                        _ => None,
                    };
                    for o in opened.into_iter().rev() {
                        s.hot.push_front(Cand::Opened(Box::new(o)));
                    }
                    // Archived or purged meanwhile: the next search finds it there.
                    let Some((event, fate)) = first else {
                        continue;
                    };
                    (event, Some(fate))
                }
            };
            last_examined = Some(pos);
            if let Some(hit) = self.confirm(t, s, &needle, &event, fate).await? {
                hits.push(hit);
            }
        }
        let more = !exhausted
            || hits.len() == limit
                && streams.iter().any(|s| {
                    !s.hot.is_empty()
                        || s.postings.is_some()
                        || !s.archived.is_empty()
                        || s.archive_left()
                });
        let next_cursor = match (&last_examined, more) {
            (Some(pos), true) => cursor_text(qhash, pos),
            (None, true) => {
                return Err(LogError::InvalidRequest(format!(
                    "the search examined its budget of {} bytes without reaching a message; \
                     use more specific words",
                    cfg.budget_bytes
                )));
            }
            (_, false) => String::new(),
        };
        Ok(SearchResult { hits, next_cursor })
    }

    /// The membership windows of `user` that ended, by conversation, ascending.
    async fn ended_windows(
        &self,
        t: &TenantId,
        user: &UserId,
        budget: &mut Budget,
    ) -> Result<HashMap<String, Vec<RangeInclusive<u64>>>, LogError> {
        let dir = keys::user_window_dir(t, user);
        let mut pages = Pages::new(KeyRange::prefix(dir.clone()));
        let mut out: HashMap<String, Vec<RangeInclusive<u64>>> = HashMap::new();
        while let Some(rows) = pages.next(&**self.store()).await? {
            for (key, value) in rows {
                if !budget.charge(key.len() + value.len() + RANGE_COST) {
                    return Err(too_broad(self.config().search.budget_bytes));
                }
                let (conv, joined) = keys::user_window_parts(&dir, &key)
                    .ok_or_else(|| LogError::corrupt(&key, "bad membership window key"))?;
                let ended = u64::from_be_bytes(value.as_slice().try_into().map_err(|_| {
                    LogError::corrupt(&key, "membership window end is not 8 bytes")
                })?);
                // Member from the join event up to the event that ended it, exclusive.
                out.entry(conv)
                    .or_default()
                    .push(joined..=ended.saturating_sub(1));
            }
        }
        Ok(out)
    }

    /// Opens the hot events `seqs` of `conv` with their stored fates, in one read, charging
    /// each; those gone meanwhile (archived or purged) are left out.
    async fn open_postings(
        &self,
        t: &TenantId,
        conv: &ConvId,
        seqs: &[u64],
        budget: &mut Budget,
    ) -> Result<Vec<(Event, Option<Vec<u8>>)>, LogError> {
        let wanted = seqs
            .iter()
            .flat_map(|&seq| [keys::event(t, conv, seq), keys::search_fate(t, conv, seq)])
            .collect::<Vec<_>>();
        let mut got = self.store().batch_get(wanted.clone()).await?.into_iter();
        let mut opened = Vec::with_capacity(seqs.len());
        for (&seq, key) in seqs.iter().zip(wanted.iter().step_by(2)) {
            let (value, fate) = (got.next().flatten(), got.next().flatten());
            let Some(value) = value else { continue };
            budget.charge(value.len());
            let event = open_stored_event(self.keyring(), t, conv, seq, key, &value).await?;
            opened.push((event, fate));
        }
        Ok(opened)
    }

    /// Where each of `convs` stands, in two round trips for all of them.
    async fn conversation_states(
        &self,
        t: &TenantId,
        convs: &[ConvId],
    ) -> Result<Vec<ConvState>, LogError> {
        let store = self.store();
        let wanted = convs
            .iter()
            .flat_map(|c| {
                [
                    keys::head(t, c),
                    keys::purge_marker(t, c),
                    keys::search_watermark(t, c),
                ]
            })
            .collect::<Vec<_>>();
        let mut values = store.batch_get(wanted.clone()).await?.into_iter();
        let archived = archived_through_each(&**store, t, convs).await?;
        let mut keys = wanted.iter();
        let mut next = || {
            (
                keys.next().expect("3 per conversation"),
                values.next().flatten(),
            )
        };
        let mut states = Vec::with_capacity(convs.len());
        for archived in archived {
            let (head_key, head) = next();
            let (purge_key, purge) = next();
            let (watermark_key, watermark) = next();
            let head = match head {
                Some(v) => Some(
                    Head::decode(v.as_slice())
                        .map_err(|e| LogError::corrupt(head_key, e))?
                        .last_seq,
                ),
                None => None,
            };
            states.push(ConvState {
                head,
                purged: decode_purge_marker(purge_key, purge)?,
                archived,
                watermark: decode_watermark(watermark_key, watermark)?,
            });
        }
        Ok(states)
    }

    /// The candidates of one conversation of the user's, or `None` if the user's windows
    /// there (ascending, the current one last) hold nothing to find.
    #[allow(clippy::too_many_arguments)]
    async fn open_stream(
        &self,
        t: &TenantId,
        conv: ConvId,
        windows: Vec<RangeInclusive<u64>>,
        state: ConvState,
        needle: &Needle,
        after: &Option<Pos>,
        budget: &mut Budget,
    ) -> Result<Option<Stream>, LogError> {
        let Some(head) = state.head else {
            return Ok(None);
        };
        let floor = state.purged + 1;
        let windows: Vec<RangeInclusive<u64>> = windows
            .into_iter()
            .map(|w| (*w.start()).max(floor)..=(*w.end()).min(head))
            .filter(|w| !w.is_empty())
            .collect();
        let Some(lo) = windows.first().map(|w| *w.start()) else {
            return Ok(None);
        };
        let archived = state.archived;
        let cfg = &self.config().search;
        let wm = state.watermark.min(head);
        // Postings are used from the hot floor up to the watermark; everything above the
        // watermark (or all hot events, without the index) is opened.
        let indexed_to = if cfg.use_index { wm } else { 0 };
        let hot_from = lo.max(archived + 1);
        let in_window = |seq: u64| windows.iter().any(|w| w.contains(&seq));
        let mut hot: BTreeMap<u64, Cand> = BTreeMap::new();
        let mut postings = None;
        if indexed_to >= hot_from && !needle.terms().is_empty() {
            // The cursor's own conversation resumes below its seq (times grow with seqs).
            let next_hi = match after {
                Some(a) if a.conv == conv.as_str() => indexed_to.min(a.seq.saturating_sub(1)),
                _ => indexed_to,
            };
            let terms: Vec<&Term> = needle.terms().iter().collect();
            postings = Some(
                Postings::new(
                    self.keyring(),
                    t,
                    &terms,
                    hot_from,
                    next_hi,
                    Order::Descending,
                )
                .await?,
            );
        } else if indexed_to >= hot_from {
            // A query without terms (punctuation only): every indexed event is a candidate.
            self.open_range(t, &conv, hot_from, indexed_to, budget, |e| {
                if in_window(e.seq) {
                    hot.insert(e.seq, Cand::Event(Box::new(e)));
                }
            })
            .await?;
        }
        let mut fates: HashMap<u64, Fate> = HashMap::new();
        let tail_from = hot_from.max(indexed_to + 1);
        // Fates above the watermark are not in `sf/` yet: read from the tail itself. The
        // tail starts at the watermark even below the user's window (an edit of an older
        // message cannot matter: its message is outside the window).
        self.open_range(t, &conv, tail_from, head, budget, |e| {
            match &e.body {
                Some(Body::MessageEdited(x)) => {
                    fates.entry(x.target_seq).or_default().merge(Fate {
                        latest_edit: e.seq,
                        recalled: false,
                    })
                }
                Some(Body::MessageRecalled(x)) => {
                    fates.entry(x.target_seq).or_default().recalled = true
                }
                _ => {}
            }
            if in_window(e.seq)
                && matches!(
                    e.body,
                    Some(Body::MessagePosted(_)) | Some(Body::MessageEdited(_))
                )
            {
                hot.insert(e.seq, Cand::Event(Box::new(e)));
            }
        })
        .await?;
        // The cursor's own conversation resumes below its seq in the archive too.
        let archived = match after {
            Some(a) if a.conv == conv.as_str() => archived.min(a.seq.saturating_sub(1)),
            _ => archived,
        };
        let mut stream = Stream {
            conv,
            windows,
            lo,
            hot: hot.into_values().rev().collect(),
            postings,
            archived: VecDeque::new(),
            archive: ArchivePart::Unasked {
                through: archived.min(head),
            },
            archive_step: ARCHIVE_FIRST,
            fates,
        };
        // Skip what the cursor has passed.
        if let Some(after) = after {
            let conv = stream.conv.to_string();
            while stream.hot.front().is_some_and(|c| c.pos(&conv) >= *after) {
                stream.hot.pop_front();
            }
        }
        Ok(Some(stream))
    }

    /// Opens events `from..=to` (hot or archived), charging each, and gives each to `each`.
    async fn open_range(
        &self,
        t: &TenantId,
        conv: &ConvId,
        from: u64,
        to: u64,
        budget: &mut Budget,
        mut each: impl FnMut(Event),
    ) -> Result<(), LogError> {
        let mut next = from;
        let page = self.config().max_read_limit.min(256);
        while next <= to {
            let events = self.read(t, conv, ReadRange::forward(next, page)).await?;
            let Some(last) = events.last().map(|e| e.seq) else {
                break;
            };
            for e in events {
                if e.seq > to {
                    return Ok(());
                }
                if !budget.charge(e.encoded_len()) {
                    return Err(too_broad(self.config().search.budget_bytes));
                }
                each(e);
            }
            next = last + 1;
        }
        Ok(())
    }

    /// Asks the archive for the candidates of every stream that has not asked yet, at once:
    /// through the segments' sealed indexes, or every archived seq in the windows without
    /// the index.
    async fn ask_archive(
        &self,
        t: &TenantId,
        streams: &mut [Stream],
        needle: &Needle,
        budget: &mut Budget,
    ) -> Result<(), LogError> {
        let mut wanted: Vec<(ConvId, RangeInclusive<u64>)> = Vec::new();
        let mut owner = Vec::new();
        for (i, s) in streams.iter().enumerate() {
            let ArchivePart::Unasked { through } = s.archive else {
                continue;
            };
            for w in &s.windows {
                let (from, to) = (*w.start(), (*w.end()).min(through));
                if from <= to {
                    wanted.push((s.conv.clone(), from..=to));
                    owner.push(i);
                }
            }
        }
        let found = match self.cold_tier() {
            Some(cold) if self.config().search.use_index && !wanted.is_empty() => {
                cold.search_candidates(t, &wanted, needle).await?
            }
            // Without the index (or an archive, which reading reports): every seq.
            _ => wanted.into_iter().map(|(_, r)| vec![r]).collect(),
        };
        for s in streams.iter_mut() {
            if matches!(s.archive, ArchivePart::Unasked { .. }) {
                s.archive = ArchivePart::Candidates(Vec::new());
            }
        }
        for (i, ranges) in owner.into_iter().zip(found) {
            budget.charge(ranges.len() * RANGE_COST);
            if let ArchivePart::Candidates(mine) = &mut streams[i].archive {
                mine.extend(ranges);
            }
        }
        Ok(())
    }

    /// Opens the next archived candidates of every stream that has run dry, newest first,
    /// until each has one or its archive is used up: asks the archive's search indexes for
    /// them the first time (every archived seq in the windows, without the index), then
    /// opens the next step's worth of each in one read of the archive, so a row group the
    /// conversations share is decoded once.
    async fn read_archived(
        &self,
        t: &TenantId,
        streams: &mut [Stream],
        needle: &Needle,
        after: &Option<Pos>,
        budget: &mut Budget,
    ) -> Result<(), LogError> {
        let dry = |s: &Stream| s.hot.is_empty() && s.archived.is_empty() && s.archive_left();
        while budget.left > 0 && streams.iter().any(dry) {
            if streams
                .iter()
                .any(|s| dry(s) && matches!(s.archive, ArchivePart::Unasked { .. }))
            {
                self.ask_archive(t, streams, needle, budget).await?;
                continue;
            }
            let mut wanted = Vec::new();
            let mut owner = Vec::new();
            for (i, s) in streams.iter_mut().enumerate() {
                if !dry(s) {
                    continue;
                }
                let mut step = s.archive_step.min(self.config().max_read_limit) as u64;
                s.archive_step = (s.archive_step * 2).min(ARCHIVE_PAGE);
                let ArchivePart::Candidates(ranges) = &mut s.archive else {
                    continue;
                };
                // A conversation with few candidates left has them all opened at once: a
                // query whose candidates are mostly rejected (two words, not adjacent) would
                // otherwise take several rounds to get through them.
                let left: u64 = ranges.iter().map(|r| r.end() - r.start() + 1).sum();
                if left <= ARCHIVE_PAGE as u64 {
                    step = step.max(left).min(self.config().max_read_limit as u64);
                }
                let pieces = take_newest(ranges, step);
                if !pieces.is_empty() {
                    wanted.push((s.conv.clone(), pieces));
                    owner.push(i);
                }
            }
            let found = self.read_cold_ranges(t, &wanted).await?;
            for (i, events) in owner.into_iter().zip(found) {
                let s = &mut streams[i];
                let conv = s.conv.to_string();
                for e in events.into_iter().rev() {
                    // Past the budget the merge stops with a cursor (see `search`).
                    budget.charge(e.encoded_len());
                    let pos = Pos {
                        time: e.server_time_ms,
                        conv: conv.clone(),
                        seq: e.seq,
                    };
                    if after.as_ref().is_some_and(|a| pos >= *a) {
                        continue;
                    }
                    if matches!(
                        e.body,
                        Some(Body::MessagePosted(_)) | Some(Body::MessageEdited(_))
                    ) {
                        s.archived.push_back(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// The hit `event` makes, if its text matches and is its message's current text.
    /// `stored_fate`: the event's own `sf/` value, if already read (for a posted message).
    async fn confirm(
        &self,
        t: &TenantId,
        s: &Stream,
        needle: &Needle,
        event: &Event,
        stored_fate: Option<Option<Vec<u8>>>,
    ) -> Result<Option<SearchHit>, LogError> {
        let (message, text) = match &event.body {
            Some(Body::MessagePosted(p)) => (event.seq, p.text.as_str()),
            Some(Body::MessageEdited(e)) => (e.target_seq, e.new_text.as_str()),
            _ => return Ok(None),
        };
        // The message and its text (an edit) both in a window: nothing from outside them.
        if !s.in_window(message)
            || !s.in_window(event.seq)
            || message > event.seq
            || !needle.matches(text)
        {
            return Ok(None);
        }
        let mut fate = s.fates.get(&message).copied().unwrap_or_default();
        let key = keys::search_fate(t, &s.conv, message);
        let stored = match stored_fate {
            Some(v) if message == event.seq => v,
            _ => self.store().get(&key).await?,
        };
        if let Some(v) = stored {
            fate.merge(Fate::decode(&key, &v)?);
        }
        let current = if fate.latest_edit == 0 {
            message
        } else {
            fate.latest_edit
        };
        if fate.recalled || current != event.seq {
            return Ok(None);
        }
        let (snippet, highlights) = snippet(needle, text);
        Ok(Some(SearchHit {
            conversation: s.conv.to_string(),
            seq: message,
            text_seq: event.seq,
            server_time_ms: event.server_time_ms,
            sender: event.sender.clone(),
            snippet,
            highlights,
        }))
    }
}

/// Takes up to `n` of the highest seqs of `ranges` (ascending, disjoint) off its top; returns
/// them as ascending ranges.
fn take_newest(ranges: &mut Vec<RangeInclusive<u64>>, n: u64) -> Vec<RangeInclusive<u64>> {
    let mut left = n;
    let mut pieces = Vec::new();
    while left > 0
        && let Some(r) = ranges.last_mut()
    {
        let (lo, hi) = (*r.start(), *r.end());
        let from = hi - (hi - lo).min(left - 1);
        pieces.push(from..=hi);
        left -= hi - from + 1;
        if from == lo {
            ranges.pop();
        } else {
            *r = lo..=from - 1;
        }
    }
    pieces.reverse();
    pieces
}

fn too_broad(budget: usize) -> LogError {
    LogError::InvalidRequest(format!(
        "the search would examine more than its budget of {budget} bytes; use more specific words"
    ))
}

fn query_hash(query: &str) -> [u8; 8] {
    let d = Sha256::digest(query.as_bytes());
    d[..8].try_into().expect("8 bytes")
}

fn cursor_text(qhash: [u8; 8], pos: &Pos) -> String {
    let mut b = vec![CURSOR_VERSION];
    b.extend_from_slice(&qhash);
    b.extend_from_slice(&pos.time.to_be_bytes());
    b.extend_from_slice(&pos.seq.to_be_bytes());
    b.extend_from_slice(pos.conv.as_bytes());
    hex_encode(&b)
}

fn parse_cursor(text: &str, qhash: [u8; 8]) -> Result<Option<Pos>, LogError> {
    if text.is_empty() {
        return Ok(None);
    }
    let bad = || LogError::InvalidRequest("the search cursor is not valid for this query".into());
    if text.len() > 2 * (25 + 64) {
        return Err(bad());
    }
    let b = crate::crypto::hex_decode(text).map_err(|_| bad())?;
    if b.len() < 26 || b[0] != CURSOR_VERSION || b[1..9] != qhash {
        return Err(bad());
    }
    let time = i64::from_be_bytes(b[9..17].try_into().expect("8 bytes"));
    let seq = u64::from_be_bytes(b[17..25].try_into().expect("8 bytes"));
    let conv = String::from_utf8(b[25..].to_vec()).map_err(|_| bad())?;
    ConvId::new(conv.clone()).map_err(|_| bad())?;
    Ok(Some(Pos { time, conv, seq }))
}

/// About [`SNIPPET_BYTES`] of `text` around its first match, and the matches in it.
fn snippet(needle: &Needle, text: &str) -> (String, Vec<Highlight>) {
    let spans = needle.highlights(text);
    let first = spans.first().map_or(0, |r| r.start);
    let mut start = first.saturating_sub(SNIPPET_BYTES / 4);
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let mut end = (start + SNIPPET_BYTES).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let highlights = spans
        .into_iter()
        .filter(|r| r.start >= start && r.end <= end)
        .map(|r| Highlight {
            start: (r.start - start) as u32,
            end: (r.end - start) as u32,
        })
        .collect();
    (text[start..end].to_string(), highlights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_other_queries_and_garbage() {
        let q = query_hash("forecast");
        let pos = Pos {
            time: 1_700_000_000_000,
            conv: "general".into(),
            seq: 42,
        };
        let text = cursor_text(q, &pos);
        assert_eq!(parse_cursor(&text, q).expect("parses"), Some(pos));
        assert!(parse_cursor(&text, query_hash("other")).is_err());
        assert!(parse_cursor("zz", q).is_err());
        assert!(parse_cursor(&"ab".repeat(500), q).is_err());
        assert_eq!(parse_cursor("", q).expect("empty"), None);
    }

    #[test]
    fn snippets_keep_highlights_on_char_boundaries() {
        let n = Needle::new("发布").expect("q");
        let text = format!("{}新品发布会{}", "长".repeat(100), "尾".repeat(100));
        let (s, h) = snippet(&n, &text);
        assert!(s.len() <= SNIPPET_BYTES);
        assert_eq!(h.len(), 1);
        assert_eq!(&s[h[0].start as usize..h[0].end as usize], "发布");
    }
}
