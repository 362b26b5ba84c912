//! A user's search of their own history ([`Log::search`]): the gateway's Search op.
//!
//! **What a user may find.** Messages of the conversations in the user's list (`uc/`: those
//! they are a member of now), at or after the seq they joined at and above what retention
//! purged; by their current text only (an edited message by its latest edit, a recalled one
//! never). Earlier membership windows of a user who left and rejoined are not searched
//! (the list keeps the current window only), nor conversations they left.
//!
//! **How.** Per conversation, newest first: the hot postings (`hot_index`) name candidate
//! events up to the index's watermark, every event above it is opened (so a lagging index
//! changes the cost, never the result), and archived events are read newest first, only
//! as deep as the page needs. The conversations' candidates are merged by (time,
//! conversation, seq), descending; each is opened and confirmed with [`Needle::matches`] and
//! its message's fate. Every byte examined is charged to `log.search_budget_bytes`.
//!
//! **Cursor.** `(query hash, time, seq, conversation)` of the last candidate examined, hex:
//! the next page continues strictly below it. A cursor of another query is refused.

use std::collections::{BTreeMap, HashMap, VecDeque};

use prost::Message;
use sha2::{Digest, Sha256};
use tidings_schemas::client::{Highlight, SearchHit, SearchResult};
use tidings_schemas::storage::{Head, UserConversation};
use tidings_schemas::v1::event::Body;

use crate::cold::{archived_through, purged_through};
use crate::crypto::hex_encode;
use crate::error::LogError;
use crate::hot_index::{Fate, posting_time, watermark};
use crate::ids::{ConvId, TenantId, UserId};
use crate::keys;
use crate::log::{Log, ReadRange, open_stored_event};
use crate::search::Needle;
use crate::store::{KeyRange, Order, Pages};
use tidings_schemas::v1::Event;

/// Bytes of text around the first match a hit shows.
pub const SNIPPET_BYTES: usize = 200;
/// Events read per archive page while merging.
const ARCHIVE_PAGE: usize = 64;
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

/// (seq, time) of postings, newest first.
type Listing = Vec<(u64, i64)>;

/// Where a conversation's postings are paged from, newest first.
struct PostingCursor {
    /// The query's term tags under each search key id the tenant has had.
    tags: Vec<(u32, Vec<crate::search::Tag>)>,
    /// The lowest seq postings are read for (the window's or the hot floor).
    lo: u64,
    /// The highest seq not yet listed; below `lo`: done.
    next_hi: u64,
}

/// A candidate: known by its posting (time only) or already opened.
enum Cand {
    Posting { seq: u64, time: i64 },
    Event(Box<Event>),
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
        }
    }
}

/// One conversation's candidates, newest first.
struct Stream {
    conv: ConvId,
    /// The user's window starts here.
    lo: u64,
    /// Hot candidates ready, descending by seq (and so by time): first the events opened
    /// above the index's watermark, then pages of postings.
    hot: VecDeque<Cand>,
    /// The postings still to page through, newest first.
    postings: Option<PostingCursor>,
    /// Opened archived events waiting, descending.
    archived: VecDeque<Event>,
    /// The next archived seq to read (descending); 0: none left.
    archive_next: u64,
    /// Fates seen in the events opened above the index's watermark.
    fates: HashMap<u64, Fate>,
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
        let dir = keys::user_conv_dir(t, user);
        let mut pages = Pages::new(KeyRange::prefix(dir.clone()));
        'list: while let Some(rows) = pages.next(&**self.store()).await? {
            for (key, value) in rows {
                if !budget.charge(CONVERSATION_COST) {
                    break 'list;
                }
                let entry = UserConversation::decode(value.as_slice())
                    .map_err(|e| LogError::corrupt(&key, e))?;
                let conv = keys::last_part(&dir, &key)
                    .and_then(|c| ConvId::new(c).ok())
                    .ok_or_else(|| LogError::corrupt(&key, "bad conversation key"))?;
                if let Some(s) = self
                    .open_stream(t, conv, entry.joined_seq, &needle, &after, &mut budget)
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
            // Refill where the ready candidates are used up: postings, then the archive.
            for s in streams.iter_mut() {
                while s.hot.is_empty()
                    && let Some(p) = s.postings.as_mut()
                {
                    if p.next_hi < p.lo {
                        s.postings = None;
                        break;
                    }
                    let page = self.posting_page(t, &s.conv, p, &mut budget).await?;
                    let conv = s.conv.to_string();
                    s.hot.extend(
                        page.into_iter()
                            .map(|(seq, time)| Cand::Posting { seq, time })
                            .filter(|c| after.as_ref().is_none_or(|a| c.pos(&conv) < *a)),
                    );
                }
                if s.hot.is_empty() && s.archived.is_empty() && s.archive_next >= s.lo {
                    self.read_archived(t, s, &after, &mut budget).await?;
                }
            }
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
            let event = match cand {
                Cand::Event(e) => *e,
                Cand::Posting { seq, .. } => {
                    let key = keys::event(t, &s.conv, seq);
                    // Archived or purged meanwhile: the next search finds it there.
                    let Some(value) = self.store().get(&key).await? else {
                        continue;
                    };
                    budget.charge(value.len());
                    open_stored_event(self.keyring(), t, &s.conv, seq, &key, &value).await?
                }
            };
            last_examined = Some(pos);
            if let Some(hit) = self.confirm(t, s, &needle, &event).await? {
                hits.push(hit);
            }
        }
        let more = !exhausted
            || hits.len() == limit
                && streams.iter().any(|s| {
                    !s.hot.is_empty()
                        || s.postings.is_some()
                        || !s.archived.is_empty()
                        || s.archive_next >= s.lo
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

    /// The candidates of one conversation of the user's, or `None` if the user's window
    /// there is empty.
    async fn open_stream(
        &self,
        t: &TenantId,
        conv: ConvId,
        joined_seq: u64,
        needle: &Needle,
        after: &Option<Pos>,
        budget: &mut Budget,
    ) -> Result<Option<Stream>, LogError> {
        let store = self.store().clone();
        let Some(head) = store.get(&keys::head(t, &conv)).await? else {
            return Ok(None);
        };
        let head = Head::decode(head.as_slice())
            .map_err(|e| LogError::corrupt(&keys::head(t, &conv), e))?
            .last_seq;
        let lo = joined_seq
            .max(1)
            .max(purged_through(&*store, t, &conv).await? + 1);
        if lo > head {
            return Ok(None);
        }
        let archived = archived_through(&*store, t, &conv).await?;
        let cfg = &self.config().search;
        let wm = watermark(&*store, t, &conv).await?.min(head);
        // Postings are used from the hot floor up to the watermark; everything above the
        // watermark (or all hot events, without the index) is opened.
        let indexed_to = if cfg.use_index { wm } else { 0 };
        let hot_from = lo.max(archived + 1);
        let mut hot: BTreeMap<u64, Cand> = BTreeMap::new();
        let mut postings = None;
        if indexed_to >= hot_from && !needle.terms().is_empty() {
            let mut tags = Vec::new();
            for key in self.keyring().all_keys(t).await? {
                let search = key.search_key(t);
                tags.push((
                    key.id,
                    needle.terms().iter().map(|t| search.tag(t)).collect(),
                ));
            }
            // The cursor's own conversation resumes below its seq (times grow with seqs).
            let next_hi = match after {
                Some(a) if a.conv == conv.as_str() => indexed_to.min(a.seq.saturating_sub(1)),
                _ => indexed_to,
            };
            postings = Some(PostingCursor {
                tags,
                lo: hot_from,
                next_hi,
            });
        } else if indexed_to >= hot_from {
            // A query without terms (punctuation only): every indexed event is a candidate.
            self.open_range(t, &conv, hot_from, indexed_to, budget, |e| {
                hot.insert(e.seq, Cand::Event(Box::new(e)));
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
            if matches!(
                e.body,
                Some(Body::MessagePosted(_)) | Some(Body::MessageEdited(_))
            ) {
                hot.insert(e.seq, Cand::Event(Box::new(e)));
            }
        })
        .await?;
        let mut stream = Stream {
            conv,
            lo,
            hot: hot.into_values().rev().collect(),
            postings,
            archived: VecDeque::new(),
            archive_next: archived.min(head),
            fates,
        };
        // Skip what the cursor has passed.
        if let Some(after) = after {
            let conv = stream.conv.to_string();
            while stream.hot.front().is_some_and(|c| c.pos(&conv) >= *after) {
                stream.hot.pop_front();
            }
            if after.conv == conv && stream.archive_next >= after.seq {
                stream.archive_next = after.seq.saturating_sub(1);
            }
        }
        Ok(Some(stream))
    }

    /// The next page of `p`'s candidates, descending: seqs whose text has every term, with
    /// their times. Per search key id the sparsest term (the one whose page of postings
    /// reaches furthest down) drives, and the others are checked by point reads, so a rare
    /// word next to a common one costs the rare one's postings; then the page ends where
    /// every key id's listing is complete.
    async fn posting_page(
        &self,
        t: &TenantId,
        conv: &ConvId,
        p: &mut PostingCursor,
        budget: &mut Budget,
    ) -> Result<Vec<(u64, i64)>, LogError> {
        let store = self.store().clone();
        let mut found: BTreeMap<u64, i64> = BTreeMap::new();
        let mut floor = p.lo;
        for (key_id, tags) in &p.tags {
            // Probe each term: a page of its postings, newest first.
            // (complete down to, its postings, which term)
            let mut best: Option<(u64, Listing, usize)> = None;
            for (i, tag) in tags.iter().enumerate() {
                let range = keys::search_postings(t, conv, *key_id, tag, p.lo, p.next_hi);
                let rows = store.scan(range, POSTING_PAGE, Order::Descending).await?;
                let mut list = Vec::with_capacity(rows.len());
                for (k, v) in rows {
                    if !budget.charge(k.len() + v.len()) {
                        return Err(too_broad(self.config().search.budget_bytes));
                    }
                    let seq = keys::event_seq(&k)
                        .ok_or_else(|| LogError::corrupt(&k, "bad posting key"))?;
                    list.push((seq, posting_time(&k, &v)?));
                }
                // Where this term's listing is complete down to.
                let reach = if list.len() < POSTING_PAGE {
                    p.lo
                } else {
                    list.last().map_or(p.lo, |l| l.0)
                };
                if best.as_ref().is_none_or(|b| reach < b.0) {
                    best = Some((reach, list, i));
                }
            }
            let Some((reach, driver, at)) = best else {
                continue;
            };
            floor = floor.max(reach);
            // The other terms, by point reads of the driver's seqs.
            let mut keep = driver;
            for (i, tag) in tags.iter().enumerate() {
                if i == at || keep.is_empty() {
                    continue;
                }
                let wanted: Vec<Vec<u8>> = keep
                    .iter()
                    .map(|(seq, _)| keys::search_posting(t, conv, *key_id, tag, *seq))
                    .collect();
                budget.charge(wanted.iter().map(Vec::len).sum());
                let got = store.batch_get(wanted).await?;
                keep = keep
                    .into_iter()
                    .zip(got)
                    .filter_map(|(c, v)| v.map(|_| c))
                    .collect();
            }
            found.extend(keep);
        }
        // Everything in floor..=next_hi is listed for every key id; below it, next time.
        let page: Vec<(u64, i64)> = found.range(floor..).rev().map(|(s, t)| (*s, *t)).collect();
        p.next_hi = floor.saturating_sub(1);
        Ok(page)
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

    /// Reads the next page of a stream's archived events, newest first.
    async fn read_archived(
        &self,
        t: &TenantId,
        s: &mut Stream,
        after: &Option<Pos>,
        budget: &mut Budget,
    ) -> Result<(), LogError> {
        let limit = ARCHIVE_PAGE.min(self.config().max_read_limit);
        let events = self
            .read(
                t,
                &s.conv,
                ReadRange {
                    from: Some(s.archive_next),
                    limit,
                    order: Order::Descending,
                },
            )
            .await?;
        let lowest = events.last().map_or(0, |e| e.seq);
        s.archive_next = lowest.saturating_sub(1);
        let conv = s.conv.to_string();
        for e in events {
            if e.seq < s.lo {
                s.archive_next = 0;
                break;
            }
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
        if lowest == 0 {
            s.archive_next = 0;
        }
        Ok(())
    }

    /// The hit `event` makes, if its text matches and is its message's current text.
    async fn confirm(
        &self,
        t: &TenantId,
        s: &Stream,
        needle: &Needle,
        event: &Event,
    ) -> Result<Option<SearchHit>, LogError> {
        let (message, text) = match &event.body {
            Some(Body::MessagePosted(p)) => (event.seq, p.text.as_str()),
            Some(Body::MessageEdited(e)) => (e.target_seq, e.new_text.as_str()),
            _ => return Ok(None),
        };
        if message < s.lo || message > event.seq || !needle.matches(text) {
            return Ok(None);
        }
        let mut fate = s.fates.get(&message).copied().unwrap_or_default();
        let key = keys::search_fate(t, &s.conv, message);
        if let Some(v) = self.store().get(&key).await? {
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
