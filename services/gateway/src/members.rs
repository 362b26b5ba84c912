//! The gateway's member cache: "is this user a member of this conversation?", and the
//! conversation's member list (pages and @-list prefix searches, [`MemberList`]), answered
//! from memory for the conversations this gateway follows, instead of a log call (over NATS
//! when roles run apart) on every History, Pull, Typing and ListMembers.
//!
//! An answer is kept only while the conversation's hub runs here, because the hub is what
//! keeps it true: it sees every event of the conversation in seq order, once, with gaps filled
//! from the log, and applies each join and leave to the cache *before* delivering it to any
//! session ([`MemberCache::apply`]). So once a gateway has delivered a member's removal, that
//! member is never answered "member" from the cache.
//!
//! - A conversation is tracked from the moment its hub has fixed the seq it delivers after
//!   (its head at start): every membership change after that seq reaches the cache.
//! - An answer fetched from the log is remembered only if no membership change was applied to
//!   its conversation while it was being fetched (a ticket, [`MemberCache::ticket`]): it could
//!   otherwise predate the change and be kept after it.
//! - When the hub stops (no session here follows the conversation), its answers go.
//! - A member list is filled from the log a page at a time by a task the list's slot owns
//!   (at most [`MAX_FILLS`] at once); meanwhile pages are asked of the log. Changes applied
//!   during the fill follow [`MemberList`]'s rule: nothing older replaces anything newer, so
//!   a removal delivered while a page holding the removed member travels keeps them out.
//! - Bounded in bytes ([`MemberCache::new`], `gateway.member_cache_bytes`), answers and lists
//!   together: past it, the least recently used lists go first (counted), then every
//!   remembered answer (exact and simple, like the sequencer's cache); a list larger than the
//!   whole bound is not kept, and its conversation's pages are asked of the log.
//!
//! What it cannot do: see a change before the gateway receives it. Between the log's commit of
//! a removal and its delivery here (NATS latency; a heal interval if NATS lost it) the removed
//! member is still answered "member", as every pushed event also reaches them until then.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tidings_log_api::{ConvId, Event, Member, MemberPage, TenantId, UserId};

use crate::member_list::{Applied, Change, MemberList};

/// Bytes counted per remembered answer beyond the user id (map entry, hashing, padding).
const ANSWER_OVERHEAD: usize = 48;

/// Member lists being filled at once, across conversations: each fill is a run of log reads;
/// past this, pages are asked of the log until a fill ends.
pub const MAX_FILLS: usize = 4;

/// The member cache of one gateway (see the module docs).
pub struct MemberCache {
    max_bytes: usize,
    inner: Mutex<Inner>,
    counters: Counters,
}

/// What the cache did, since the gateway started.
#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    page_hits: AtomicU64,
    page_misses: AtomicU64,
    list_evictions: AtomicU64,
    answer_clears: AtomicU64,
}

/// A snapshot of the cache's counters and size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemberCacheStats {
    /// Membership checks answered from memory, and those that asked the log.
    pub hits: u64,
    pub misses: u64,
    /// Member pages (and prefix searches) answered from memory, and those asked of the log.
    pub page_hits: u64,
    pub page_misses: u64,
    /// Member lists dropped to stay within the byte bound (or too large for it).
    pub list_evictions: u64,
    /// Times every remembered answer was dropped to stay within the bound.
    pub answer_clears: u64,
    /// Bytes held now, and the bound.
    pub bytes: usize,
    pub max_bytes: usize,
    /// Complete member lists held now.
    pub lists: usize,
}

#[derive(Default)]
struct Inner {
    convs: HashMap<(TenantId, ConvId), Conv>,
    bytes: usize,
    /// Tracking periods started so far: a hub stopped and started again is a new period, and
    /// tickets of the old one are void.
    periods: u64,
    /// Fills started so far (a fill's id).
    fills: u64,
    /// A clock of uses, for least-recently-used eviction of lists.
    clock: u64,
}

struct Conv {
    period: u64,
    /// Membership changes applied so far in this period.
    changes: u64,
    answers: HashMap<UserId, bool>,
    list: Option<ListSlot>,
    /// The list did not fit in the bound: not filled again in this period.
    list_refused: bool,
    /// When the list was last used ([`Inner::clock`]).
    used: u64,
}

/// A member list and the fill that owns it.
struct ListSlot {
    fill: u64,
    list: MemberList,
    /// The fill task, aborted when the slot goes (untracked, evicted, unusable).
    task: Option<tokio::task::AbortHandle>,
}

impl Drop for ListSlot {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl ListSlot {
    fn filling(&self) -> bool {
        !self.list.is_complete()
    }

    /// Being filled by a live task (or one about to be attached).
    fn running(&self) -> bool {
        self.filling() && !self.task.as_ref().is_some_and(|task| task.is_finished())
    }
}

/// Conversations one session remembers its membership changes of ([`MemberWrites`]).
pub const MAX_MEMBER_WRITES: usize = 64;

/// The seq of the last membership change a session made, per conversation: its pages from
/// memory must include it (read your own writes). At most [`MAX_MEMBER_WRITES`]
/// conversations; past it the record starts over, and a page may then lag the session's own
/// older changes by the delivery delay (as anyone else's do).
#[derive(Default)]
pub struct MemberWrites {
    seqs: HashMap<ConvId, u64>,
}

impl MemberWrites {
    pub fn record(&mut self, c: &ConvId, seq: u64) {
        if self.seqs.len() >= MAX_MEMBER_WRITES && !self.seqs.contains_key(c) {
            self.seqs.clear();
        }
        let at = self.seqs.entry(c.clone()).or_default();
        *at = (*at).max(seq);
    }

    /// The version a page of `c` from memory must have reached (0: any).
    pub fn floor(&self, c: &ConvId) -> u64 {
        self.seqs.get(c).copied().unwrap_or(0)
    }
}

/// Taken before asking the log; the answer is remembered only if it is still current.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    period: u64,
    changes: u64,
}

/// A member-list fill started by [`MemberCache::begin_fill`]: its pages are taken only while
/// its slot is the conversation's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fill(u64);

impl MemberCache {
    pub fn new(max_bytes: usize) -> Self {
        MemberCache {
            max_bytes,
            inner: Mutex::new(Inner::default()),
            counters: Counters::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The conversation's hub has fixed where it delivers from: start keeping answers.
    pub fn track(&self, t: &TenantId, c: &ConvId) {
        let mut inner = self.lock();
        inner.periods += 1;
        let period = inner.periods;
        let old = inner.convs.insert(
            (t.clone(), c.clone()),
            Conv {
                period,
                changes: 0,
                answers: HashMap::new(),
                list: None,
                list_refused: false,
                used: 0,
            },
        );
        if let Some(old) = old {
            inner.bytes -= old.bytes();
        }
    }

    /// The conversation's hub stopped: its answers can no longer be kept true.
    pub fn untrack(&self, t: &TenantId, c: &ConvId) {
        let mut inner = self.lock();
        if let Some(conv) = inner.convs.remove(&(t.clone(), c.clone())) {
            inner.bytes -= conv.bytes();
        }
    }

    /// Applies an event the hub is about to deliver (in seq order): joins and leaves change
    /// the answers of their user and void tickets taken before them; every membership change
    /// updates the member list.
    pub fn apply(&self, t: &TenantId, c: &ConvId, event: &Event) {
        let Some(change) = Change::of(event) else {
            return;
        };
        let mut inner = self.lock();
        let Some(conv) = inner.convs.get_mut(&(t.clone(), c.clone())) else {
            return;
        };
        if let Some((user, member)) = change.membership() {
            conv.changes += 1;
            // Only users asked about are kept: their answer changes in place.
            if let Some(answer) = conv.answers.get_mut(user) {
                *answer = member;
            }
        }
        let Some(slot) = conv.list.as_mut() else {
            return;
        };
        let before = slot.list.bytes();
        let applied = slot.list.apply(event.seq, &change);
        let after = slot.list.bytes();
        if applied == Applied::Unusable {
            // Filled again on a later request.
            conv.list = None;
            inner.bytes -= before;
        } else {
            inner.bytes = inner.bytes + after - before;
            inner.enforce(self.max_bytes, None, &self.counters);
        }
    }

    /// The answer, if this gateway keeps one.
    pub fn lookup(&self, t: &TenantId, c: &ConvId, u: &UserId) -> Option<bool> {
        let inner = self.lock();
        // Only "member" is taken from a list: a user it does not hold may have joined at a
        // seq not delivered here yet (a newcomer told by its user notice acts at once), so
        // they are asked of the log (or of a remembered answer, kept true the same way).
        let answer = inner.convs.get(&(t.clone(), c.clone())).and_then(|conv| {
            match conv.list.as_ref().filter(|slot| !slot.filling()) {
                Some(slot) if slot.list.contains(u) => Some(true),
                _ => conv.answers.get(u).copied(),
            }
        });
        count(answer.is_some(), &self.counters.hits, &self.counters.misses);
        answer
    }

    /// Taken before asking the log; `None` when the conversation is not tracked here.
    pub fn ticket(&self, t: &TenantId, c: &ConvId) -> Option<Ticket> {
        self.lock()
            .convs
            .get(&(t.clone(), c.clone()))
            .map(|conv| Ticket {
                period: conv.period,
                changes: conv.changes,
            })
    }

    /// Keeps the log's answer, if no membership change was applied since `ticket`.
    pub fn remember(&self, t: &TenantId, c: &ConvId, u: &UserId, member: bool, ticket: Ticket) {
        let mut inner = self.lock();
        let Some(conv) = inner.convs.get_mut(&(t.clone(), c.clone())) else {
            return;
        };
        if (conv.period, conv.changes) != (ticket.period, ticket.changes) {
            return;
        }
        if conv.answers.insert(u.clone(), member).is_none() {
            inner.bytes += answer_bytes(u);
        }
        inner.enforce(self.max_bytes, None, &self.counters);
    }

    /// A page of the member list from memory (members after `after` starting with
    /// `prefix`, at most `limit`), with the list's version; `None` when the conversation's
    /// list is not complete here, or older than `floor` (a change the asker made that has
    /// not reached this gateway yet): ask the log ([`begin_fill`](Self::begin_fill) may
    /// start filling it).
    pub fn page(
        &self,
        t: &TenantId,
        c: &ConvId,
        after: Option<&UserId>,
        prefix: &str,
        limit: usize,
        floor: u64,
    ) -> Option<MemberPage> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let answer = inner
            .convs
            .get_mut(&(t.clone(), c.clone()))
            .and_then(|conv| {
                let slot = conv.list.as_ref().filter(|slot| !slot.filling())?;
                conv.used = now;
                if slot.list.version() < floor {
                    return None;
                }
                let (members, _more) = slot.list.page(after, prefix, limit);
                Some(MemberPage {
                    version: slot.list.version(),
                    members,
                    changes: Vec::new(),
                })
            });
        count(
            answer.is_some(),
            &self.counters.page_hits,
            &self.counters.page_misses,
        );
        answer
    }

    /// Starts filling the conversation's member list, if it is tracked, has none (or its
    /// fill died), fits the bound and fewer than [`MAX_FILLS`] fills run. The caller runs
    /// the fill ([`next_after`](Self::next_after), [`add_page`](Self::add_page)) in a task
    /// it hands over with [`attach`](Self::attach).
    pub fn begin_fill(&self, t: &TenantId, c: &ConvId) -> Option<Fill> {
        let mut inner = self.lock();
        // Fills running: a slot whose task died (it should not) holds no place.
        let filling = inner
            .convs
            .values()
            .filter(|conv| conv.list.as_ref().is_some_and(ListSlot::running))
            .count();
        inner.fills += 1;
        let (id, now) = (inner.fills, inner.clock);
        let conv = inner.convs.get_mut(&(t.clone(), c.clone()))?;
        if conv.list_refused {
            return None;
        }
        let freed = match &conv.list {
            None => 0,
            Some(slot) if slot.filling() && !slot.running() => slot.list.bytes(),
            Some(_) => return None,
        };
        if filling >= MAX_FILLS {
            return None;
        }
        conv.list = Some(ListSlot {
            fill: id,
            list: MemberList::new(),
            task: None,
        });
        conv.used = now;
        inner.bytes -= freed;
        Some(Fill(id))
    }

    /// Hands the fill's task to its slot, which aborts it when it goes.
    pub fn attach(&self, t: &TenantId, c: &ConvId, fill: Fill, task: tokio::task::AbortHandle) {
        let mut inner = self.lock();
        match inner.slot(t, c, fill) {
            Some(slot) => slot.task = Some(task),
            None => task.abort(),
        }
    }

    /// Where the fill's next page starts: `Some(None)` at the start, `None` when the fill is
    /// void (its slot went) and must stop.
    pub fn next_after(&self, t: &TenantId, c: &ConvId, fill: Fill) -> Option<Option<UserId>> {
        let mut inner = self.lock();
        let slot = inner.slot(t, c, fill)?;
        slot.filling().then(|| slot.list.next_after().cloned())
    }

    /// Takes the fill's next page (read by the log at `version`; `last` when it ends the
    /// list). Returns whether the fill goes on.
    pub fn add_page(
        &self,
        t: &TenantId,
        c: &ConvId,
        fill: Fill,
        version: u64,
        rows: Vec<Member>,
        last: bool,
    ) -> bool {
        let mut inner = self.lock();
        let Some(slot) = inner.slot(t, c, fill) else {
            return false;
        };
        let before = slot.list.bytes();
        slot.list.add_page(version, rows, last);
        let after = slot.list.bytes();
        inner.bytes = inner.bytes + after - before;
        let key = (t.clone(), c.clone());
        inner.enforce(self.max_bytes, Some(&key), &self.counters);
        !last && inner.slot(t, c, fill).is_some()
    }

    /// The fill failed: its partial list goes (the next request starts another).
    pub fn abandon(&self, t: &TenantId, c: &ConvId, fill: Fill) {
        let mut inner = self.lock();
        let Some(conv) = inner.convs.get_mut(&(t.clone(), c.clone())) else {
            return;
        };
        if conv.list.as_ref().is_some_and(|slot| slot.fill == fill.0) {
            let freed = conv.list.take().map_or(0, |slot| slot.list.bytes());
            inner.bytes -= freed;
        }
    }

    /// Counters and size now.
    pub fn stats(&self) -> MemberCacheStats {
        let inner = self.lock();
        let c = &self.counters;
        MemberCacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            page_hits: c.page_hits.load(Ordering::Relaxed),
            page_misses: c.page_misses.load(Ordering::Relaxed),
            list_evictions: c.list_evictions.load(Ordering::Relaxed),
            answer_clears: c.answer_clears.load(Ordering::Relaxed),
            bytes: inner.bytes,
            max_bytes: self.max_bytes,
            lists: inner
                .convs
                .values()
                .filter(|conv| conv.list.as_ref().is_some_and(|slot| !slot.filling()))
                .count(),
        }
    }

    /// Bytes of answers and lists held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

impl Conv {
    fn bytes(&self) -> usize {
        let answers: usize = self.answers.keys().map(answer_bytes).sum();
        answers + self.list.as_ref().map_or(0, |slot| slot.list.bytes())
    }
}

impl Inner {
    /// The conversation's list slot, if it belongs to `fill`.
    fn slot(&mut self, t: &TenantId, c: &ConvId, fill: Fill) -> Option<&mut ListSlot> {
        self.convs
            .get_mut(&(t.clone(), c.clone()))?
            .list
            .as_mut()
            .filter(|slot| slot.fill == fill.0)
    }

    /// Back within `max` bytes: a growing list larger than the whole bound goes first (it
    /// would flush everything else and still not fit), then the least recently used lists
    /// (`growing`'s last), then every answer.
    fn enforce(&mut self, max: usize, growing: Option<&(TenantId, ConvId)>, counters: &Counters) {
        if self.bytes <= max {
            return;
        }
        if let Some(key) = growing
            && let Some(conv) = self.convs.get(key)
            && conv
                .list
                .as_ref()
                .is_some_and(|slot| slot.list.bytes() > max)
        {
            // Not kept, and not filled again in this period.
            self.drop_list(key, true);
            counters.list_evictions.fetch_add(1, Ordering::Relaxed);
        }
        while self.bytes > max {
            let victim = self
                .convs
                .iter()
                .filter(|(key, conv)| conv.list.is_some() && Some(*key) != growing)
                .min_by_key(|(_, conv)| conv.used)
                .map(|(key, _)| key.clone());
            let Some(victim) = victim else { break };
            self.drop_list(&victim, false);
            counters.list_evictions.fetch_add(1, Ordering::Relaxed);
        }
        if self.bytes > max {
            let mut freed = 0;
            for conv in self.convs.values_mut() {
                freed += conv.answers.keys().map(answer_bytes).sum::<usize>();
                conv.answers.clear();
            }
            self.bytes -= freed;
            counters.answer_clears.fetch_add(1, Ordering::Relaxed);
        }
        if self.bytes > max
            && let Some(key) = growing
        {
            // Fits alone, but not beside the answers: dropped, filled again later.
            self.drop_list(key, false);
            counters.list_evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn drop_list(&mut self, key: &(TenantId, ConvId), refuse: bool) {
        if let Some(conv) = self.convs.get_mut(key) {
            let freed = conv.list.take().map_or(0, |slot| slot.list.bytes());
            conv.list_refused |= refuse;
            self.bytes -= freed;
        }
    }
}

fn count(hit: bool, hits: &AtomicU64, misses: &AtomicU64) {
    let counter = if hit { hits } else { misses };
    counter.fetch_add(1, Ordering::Relaxed);
}

fn answer_bytes(u: &UserId) -> usize {
    u.as_str().len() + ANSWER_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings_log_api::{Body, MemberRole};
    use tidings_schemas::v1::{MemberJoined, MemberLeft};

    fn ids() -> (TenantId, ConvId) {
        (
            TenantId::new("acme".to_string()).expect("tenant"),
            ConvId::new("team".to_string()).expect("conv"),
        )
    }

    fn user(u: &str) -> UserId {
        UserId::new(u.to_string()).expect("user")
    }

    fn left(u: &str) -> Event {
        Event {
            body: Some(Body::MemberLeft(MemberLeft { user: u.into() })),
            ..Event::default()
        }
    }

    fn joined(u: &str) -> Event {
        Event {
            body: Some(Body::MemberJoined(MemberJoined {
                user: u.into(),
                role: 1,
                role_name: String::new(),
            })),
            ..Event::default()
        }
    }

    #[test]
    fn a_removed_member_is_never_answered_member_after_the_removal_is_applied() {
        let cache = MemberCache::new(1 << 20);
        let (t, c) = ids();
        assert_eq!(cache.ticket(&t, &c), None, "untracked: nothing kept");
        cache.track(&t, &c);
        let ticket = cache.ticket(&t, &c).expect("tracked");
        cache.remember(&t, &c, &user("bob"), true, ticket);
        assert_eq!(cache.lookup(&t, &c, &user("bob")), Some(true));
        cache.apply(&t, &c, &left("bob"));
        assert_eq!(cache.lookup(&t, &c, &user("bob")), Some(false));
        cache.apply(&t, &c, &joined("bob"));
        assert_eq!(cache.lookup(&t, &c, &user("bob")), Some(true));
    }

    #[test]
    fn an_answer_fetched_across_a_membership_change_is_not_kept() {
        let cache = MemberCache::new(1 << 20);
        let (t, c) = ids();
        cache.track(&t, &c);
        let ticket = cache.ticket(&t, &c).expect("tracked");
        // The log said "member", but bob's removal was applied while the answer travelled.
        cache.apply(&t, &c, &left("bob"));
        cache.remember(&t, &c, &user("bob"), true, ticket);
        assert_eq!(cache.lookup(&t, &c, &user("bob")), None, "asked again");
        cache.remember(&t, &c, &user("carol"), true, ticket);
        assert_eq!(cache.lookup(&t, &c, &user("carol")), None);
        // Nor one fetched while the hub stopped and started again.
        let ticket = cache.ticket(&t, &c).expect("tracked");
        cache.untrack(&t, &c);
        cache.track(&t, &c);
        cache.remember(&t, &c, &user("carol"), true, ticket);
        assert_eq!(cache.lookup(&t, &c, &user("carol")), None);
    }

    #[test]
    fn answers_go_with_the_hub_and_past_the_byte_bound() {
        let (t, c) = ids();
        let cache = MemberCache::new(10 * (ANSWER_OVERHEAD + 4));
        cache.track(&t, &c);
        for i in 0..10 {
            let ticket = cache.ticket(&t, &c).expect("tracked");
            cache.remember(&t, &c, &user(&format!("u{i:03}")), true, ticket);
        }
        assert_eq!(cache.bytes(), 10 * (ANSWER_OVERHEAD + 4));
        let ticket = cache.ticket(&t, &c).expect("tracked");
        cache.remember(&t, &c, &user("u999"), true, ticket);
        assert_eq!(cache.bytes(), 0, "past the bound: start over");
        cache.remember(&t, &c, &user("u001"), true, ticket);
        cache.untrack(&t, &c);
        assert_eq!(cache.bytes(), 0);
        assert_eq!(cache.lookup(&t, &c, &user("u001")), None);
    }

    fn member(u: &str) -> Member {
        Member {
            user: user(u),
            role: MemberRole::Member,
            role_name: "member".into(),
            display_name: String::new(),
            joined_seq: 1,
        }
    }

    fn conv(c: &str) -> ConvId {
        ConvId::new(c.to_string()).expect("conv")
    }

    /// Fills `c`'s list with `n` members in one page (the log's answer, read at version 1).
    fn fill(cache: &MemberCache, t: &TenantId, c: &ConvId, n: usize) {
        let fill = cache.begin_fill(t, c).expect("a fill starts");
        assert_eq!(cache.next_after(t, c, fill), Some(None));
        let rows = (0..n).map(|i| member(&format!("m{i:04}"))).collect();
        assert!(!cache.add_page(t, c, fill, 1, rows, true), "one page: done");
    }

    #[test]
    fn a_filled_list_answers_pages_and_checks_and_follows_removals() {
        let cache = MemberCache::new(1 << 20);
        let (t, c) = ids();
        assert!(cache.page(&t, &c, None, "", 10, 0).is_none(), "untracked");
        assert!(
            cache.begin_fill(&t, &c).is_none(),
            "untracked: nothing filled"
        );
        cache.track(&t, &c);
        fill(&cache, &t, &c, 3);
        assert!(
            cache.begin_fill(&t, &c).is_none(),
            "one list per conversation"
        );
        let page = cache.page(&t, &c, None, "", 10, 0).expect("from memory");
        assert_eq!(page.members.len(), 3);
        assert_eq!(cache.lookup(&t, &c, &user("m0001")), Some(true));
        let mut gone = left("m0001");
        gone.seq = 2;
        cache.apply(&t, &c, &gone);
        assert_eq!(
            cache.lookup(&t, &c, &user("m0001")),
            None,
            "not in the list: asked of the log, never answered member"
        );
        let page = cache
            .page(&t, &c, None, "m000", 10, 0)
            .expect("from memory");
        let ids: Vec<&str> = page.members.iter().map(|m| m.user.as_str()).collect();
        assert_eq!(ids, vec!["m0000", "m0002"]);
        assert_eq!(page.version, 2);
        // The asker's own change at 3 is not here yet: the log answers.
        assert!(cache.page(&t, &c, None, "", 10, 3).is_none());
        assert!(cache.page(&t, &c, None, "", 10, 2).is_some());
        let stats = cache.stats();
        assert_eq!((stats.page_hits, stats.page_misses, stats.lists), (3, 2, 1));
        cache.untrack(&t, &c);
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn a_session_remembers_its_own_membership_changes_within_a_bound() {
        let mut writes = MemberWrites::default();
        let c = conv("c");
        assert_eq!(writes.floor(&c), 0);
        writes.record(&c, 7);
        writes.record(&c, 5);
        assert_eq!(writes.floor(&c), 7);
        for i in 0..MAX_MEMBER_WRITES {
            writes.record(&conv(&format!("x{i}")), 1);
        }
        assert!(writes.seqs.len() <= MAX_MEMBER_WRITES);
    }

    #[test]
    fn lists_are_evicted_least_recently_used_first_within_the_byte_bound() {
        let t = ids().0;
        let (a, b, big) = (conv("a"), conv("b"), conv("big"));
        let probe = MemberCache::new(usize::MAX);
        probe.track(&t, &a);
        fill(&probe, &t, &a, 10);
        let ten = probe.bytes();
        // Room for two lists of ten, not three.
        let cache = MemberCache::new(2 * ten + ten / 2);
        for c in [&a, &b, &big] {
            cache.track(&t, c);
        }
        fill(&cache, &t, &a, 10);
        fill(&cache, &t, &b, 10);
        assert!(cache.page(&t, &a, None, "", 1, 0).is_some(), "a used last");
        fill(&cache, &t, &big, 10);
        let stats = cache.stats();
        assert!(stats.bytes <= stats.max_bytes, "{stats:?}");
        assert_eq!((stats.list_evictions, stats.lists), (1, 2));
        assert!(
            cache.page(&t, &b, None, "", 1, 0).is_none(),
            "b was least recently used"
        );
        assert!(cache.page(&t, &a, None, "", 1, 0).is_some());
        // A list larger than the whole bound is not kept, nor filled again.
        cache.untrack(&t, &b);
        cache.track(&t, &b);
        let fill_b = cache.begin_fill(&t, &b).expect("starts");
        let rows = (0..40).map(|i| member(&format!("m{i:04}"))).collect();
        assert!(!cache.add_page(&t, &b, fill_b, 1, rows, true));
        assert!(cache.page(&t, &b, None, "", 1, 0).is_none());
        assert!(
            cache.begin_fill(&t, &b).is_none(),
            "refused for this period"
        );
        let stats = cache.stats();
        assert!(stats.bytes <= stats.max_bytes, "{stats:?}");
    }

    #[test]
    fn a_fill_whose_slot_went_stops_and_at_most_max_fills_run() {
        let cache = MemberCache::new(1 << 20);
        let t = ids().0;
        let convs: Vec<ConvId> = (0..=MAX_FILLS).map(|i| conv(&format!("c{i}"))).collect();
        for c in &convs {
            cache.track(&t, c);
        }
        let fills: Vec<Option<Fill>> = convs.iter().map(|c| cache.begin_fill(&t, c)).collect();
        assert!(fills[..MAX_FILLS].iter().all(Option::is_some));
        assert_eq!(fills[MAX_FILLS], None, "past MAX_FILLS: ask the log");
        let (c0, f0) = (&convs[0], fills[0].expect("fill"));
        cache.untrack(&t, c0);
        cache.track(&t, c0);
        assert_eq!(cache.next_after(&t, c0, f0), None, "void: stop");
        assert!(!cache.add_page(&t, c0, f0, 1, vec![member("x")], false));
        assert!(cache.page(&t, c0, None, "", 1, 0).is_none());
    }
}
