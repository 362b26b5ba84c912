//! The gateway's membership cache: "is this user a member of this conversation?" answered
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
//! - Bounded in bytes ([`MemberCache::new`], `gateway.member_cache_bytes`): past it, every
//!   remembered answer is dropped (exact and simple, like the sequencer's cache) and the next
//!   checks ask the log again.
//!
//! What it cannot do: see a change before the gateway receives it. Between the log's commit of
//! a removal and its delivery here (NATS latency; a heal interval if NATS lost it) the removed
//! member is still answered "member", as every pushed event also reaches them until then.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tidings_log::{Body, ConvId, Event, TenantId, UserId};

/// Bytes counted per remembered answer beyond the user id (map entry, hashing, padding).
const ANSWER_OVERHEAD: usize = 48;

/// The membership cache of one gateway (see the module docs).
pub struct MemberCache {
    max_bytes: usize,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct Inner {
    convs: HashMap<(TenantId, ConvId), Conv>,
    bytes: usize,
    /// Tracking periods started so far: a hub stopped and started again is a new period, and
    /// tickets of the old one are void.
    periods: u64,
}

struct Conv {
    period: u64,
    /// Membership changes applied so far in this period.
    changes: u64,
    answers: HashMap<UserId, bool>,
}

/// Taken before asking the log; the answer is remembered only if it is still current.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    period: u64,
    changes: u64,
}

impl MemberCache {
    pub fn new(max_bytes: usize) -> Self {
        MemberCache {
            max_bytes,
            inner: Mutex::new(Inner::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
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
        inner.convs.insert(
            (t.clone(), c.clone()),
            Conv {
                period,
                changes: 0,
                answers: HashMap::new(),
            },
        );
    }

    /// The conversation's hub stopped: its answers can no longer be kept true.
    pub fn untrack(&self, t: &TenantId, c: &ConvId) {
        let mut inner = self.lock();
        if let Some(conv) = inner.convs.remove(&(t.clone(), c.clone())) {
            let freed: usize = conv.answers.keys().map(answer_bytes).sum();
            inner.bytes -= freed;
        }
    }

    /// Applies an event the hub is about to deliver (in seq order): joins and leaves change
    /// the answers of their user, and void tickets taken before them.
    pub fn apply(&self, t: &TenantId, c: &ConvId, event: &Event) {
        let (user, member) = match &event.body {
            Some(Body::MemberJoined(j)) => (&j.user, true),
            Some(Body::MemberLeft(l)) => (&l.user, false),
            _ => return,
        };
        let mut inner = self.lock();
        let Some(conv) = inner.convs.get_mut(&(t.clone(), c.clone())) else {
            return;
        };
        conv.changes += 1;
        // Only users asked about are kept: their answer changes in place.
        if let Ok(user) = UserId::new(user.clone())
            && let Some(answer) = conv.answers.get_mut(&user)
        {
            *answer = member;
        }
    }

    /// The answer, if this gateway keeps one.
    pub fn lookup(&self, t: &TenantId, c: &ConvId, u: &UserId) -> Option<bool> {
        let inner = self.lock();
        let answer = inner
            .convs
            .get(&(t.clone(), c.clone()))
            .and_then(|conv| conv.answers.get(u).copied());
        let counter = if answer.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
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
        self.enforce(&mut inner);
    }

    fn enforce(&self, inner: &mut Inner) {
        if inner.bytes > self.max_bytes {
            for conv in inner.convs.values_mut() {
                conv.answers.clear();
            }
            inner.bytes = 0;
        }
    }

    /// (answers from memory, checks that asked the log) since the gateway started.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Bytes of answers held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

fn answer_bytes(u: &UserId) -> usize {
    u.as_str().len() + ANSWER_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
