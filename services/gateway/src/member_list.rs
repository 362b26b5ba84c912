//! One conversation's member list held by the gateway ([`MemberList`]): filled from the log a
//! page at a time, kept true by the membership events the conversation's hub applies in seq
//! order, and asked for pages and @-list prefix searches without a log call.
//!
//! The rule that keeps it exact: every entry knows the seq it is true at, and nothing older
//! replaces it. A member row of a page is true at least at that page's version (the log reads
//! the version before the page); a change is true at its event's seq. So:
//! - a change is applied only if its seq is above what the list knows of that user (its
//!   entry's seq, or the version of the page that covered the user and did not list them);
//! - a page's row is taken only if no newer change of its user was applied while the page
//!   travelled; a removal applied before a stale page arrives keeps its user out
//!   (the removal is held as a tombstone until the page covering the user is in).
//!
//! A change the list cannot apply exactly (a role or display name for a user it holds no row
//! of) makes the list [`Applied::Unusable`]: the caller drops it and fills it again later.

use std::collections::BTreeMap;
use std::ops::Bound;

use tidings_log_api::{Body, Event, Member, MemberRole, UserId};

/// Bytes counted per entry beyond its strings (tree node share, the entry's fields).
const ENTRY_OVERHEAD: usize = 96;
/// Bytes counted per page boundary kept.
const BOUND_OVERHEAD: usize = 48;

/// A membership change, as a hub's event says it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Joined {
        user: UserId,
        role: MemberRole,
        role_name: String,
    },
    Left(UserId),
    Role {
        user: UserId,
        role_name: String,
    },
    DisplayName {
        user: UserId,
        name: String,
    },
    /// An event that changes the list in a way it cannot follow (a creation).
    Unknown,
}

impl Change {
    /// The change an event makes to a member list; `None` for events that make none.
    pub fn of(event: &Event) -> Option<Change> {
        let user = |u: &str| UserId::new(u.to_string()).ok();
        let change = match event.body.as_ref()? {
            Body::MemberJoined(j) => Change::Joined {
                user: user(&j.user)?,
                role: MemberRole::try_from(j.role).unwrap_or(MemberRole::Unspecified),
                role_name: j.role_name.clone(),
            },
            Body::MemberLeft(l) => Change::Left(user(&l.user)?),
            Body::MemberRoleChanged(r) => Change::Role {
                user: user(&r.user)?,
                role_name: r.role_name.clone(),
            },
            Body::DisplayNameSet(d) => Change::DisplayName {
                user: user(&d.user)?,
                name: d.display_name.clone(),
            },
            Body::ConversationCreated(_) => Change::Unknown,
            _ => return None,
        };
        Some(change)
    }

    /// The user whose membership it changes, with `Some(true)` for a join and `Some(false)`
    /// for a removal.
    pub fn membership(&self) -> Option<(&UserId, bool)> {
        match self {
            Change::Joined { user, .. } => Some((user, true)),
            Change::Left(user) => Some((user, false)),
            _ => None,
        }
    }
}

/// What applying a change did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Applied, or older than what the list holds.
    Kept,
    /// The list cannot follow it: drop the list.
    Unusable,
}

struct Entry {
    /// The seq the entry is true at.
    seq: u64,
    /// `None`: removed (a tombstone, kept only until a page covers the user).
    member: Option<Member>,
}

/// One conversation's member list (see the module docs).
#[derive(Default)]
pub struct MemberList {
    entries: BTreeMap<UserId, Entry>,
    /// Pages taken so far, in id order: (the last id a page covers, its version); the last
    /// page covers everything after the one before it (`None`).
    covered: Vec<(Option<UserId>, u64)>,
    /// The version of the first page: every page reflects every change up to it.
    first_version: u64,
    /// The highest seq of a change applied (or found older than the list).
    applied: u64,
    complete: bool,
    bytes: usize,
}

impl MemberList {
    pub fn new() -> Self {
        MemberList::default()
    }

    /// Every page is in: the list answers for the whole conversation.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Bytes the list holds (its own estimate, for the cache's bound).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The id the next page starts after; `None` before the first page.
    pub fn next_after(&self) -> Option<&UserId> {
        self.covered.last().and_then(|(last, _)| last.as_ref())
    }

    /// The member list's version (the seq of the last membership change it reflects; 0 for
    /// a conversation that predates versions, as the log answers).
    pub fn version(&self) -> u64 {
        if self.first_version == 0 {
            0
        } else {
            self.first_version.max(self.applied)
        }
    }

    /// What the list knows of `user`: the seq its knowledge is true at.
    fn known_seq(&self, user: &UserId) -> u64 {
        if let Some(e) = self.entries.get(user) {
            return e.seq;
        }
        self.covered
            .iter()
            .find(|(last, _)| last.as_ref().is_none_or(|last| user <= last))
            .map_or(0, |(_, version)| *version)
    }

    /// Applies a change the hub delivers at `seq` (in seq order).
    pub fn apply(&mut self, seq: u64, change: &Change) -> Applied {
        self.applied = self.applied.max(seq);
        let user = match change {
            Change::Unknown => return Applied::Unusable,
            Change::Joined { user, .. }
            | Change::Left(user)
            | Change::Role { user, .. }
            | Change::DisplayName { user, .. } => user,
        };
        if seq <= self.known_seq(user) {
            return Applied::Kept; // the list already holds something newer
        }
        let member = match change {
            Change::Joined {
                user,
                role,
                role_name,
            } => Some(Member {
                user: user.clone(),
                role: *role,
                role_name: role_name.clone(),
                display_name: String::new(),
                joined_seq: seq,
            }),
            // A removal of a user a page already covered needs no tombstone: every later
            // change is newer than it (the hub applies in seq order).
            Change::Left(user) if self.is_covered(user) => {
                self.remove(user);
                return Applied::Kept;
            }
            Change::Left(_) => None,
            Change::Role { role_name, .. } => {
                let Some(mut m) = self.live(user).cloned() else {
                    return Applied::Unusable; // a member the list holds no row of
                };
                m.role = tidings_log_api::policy::builtin_role(role_name);
                m.role_name = role_name.clone();
                Some(m)
            }
            Change::DisplayName { name, .. } => {
                let Some(mut m) = self.live(user).cloned() else {
                    return Applied::Unusable;
                };
                m.display_name = name.clone();
                Some(m)
            }
            Change::Unknown => return Applied::Unusable,
        };
        self.put(user.clone(), Entry { seq, member });
        Applied::Kept
    }

    /// Whether a page taken so far covers `user`'s id.
    fn is_covered(&self, user: &UserId) -> bool {
        self.complete || self.next_after().is_some_and(|last| user <= last)
    }

    fn live(&self, user: &UserId) -> Option<&Member> {
        self.entries.get(user).and_then(|e| e.member.as_ref())
    }

    fn put(&mut self, user: UserId, entry: Entry) {
        self.bytes += entry_bytes(&user, &entry);
        if let Some(old) = self.entries.insert(user.clone(), entry) {
            self.bytes -= entry_bytes(&user, &old);
        }
    }

    fn remove(&mut self, user: &UserId) {
        if let Some(old) = self.entries.remove(user) {
            self.bytes -= entry_bytes(user, &old);
        }
    }

    /// Takes the next page of the list (members after [`next_after`](Self::next_after), in
    /// id order), read by the log at `version`; `last` when it ends the list. The page is
    /// the truth at `version` for the ids it covers.
    pub fn add_page(&mut self, version: u64, rows: Vec<Member>, last: bool) {
        debug_assert!(!self.complete, "a page after the last");
        if self.covered.is_empty() {
            self.first_version = version;
        }
        let start = self.next_after().cloned();
        let end = if last {
            None
        } else {
            rows.last().map(|m| m.user.clone())
        };
        // What the page says about the ids it covers replaces anything older.
        let lower = start.as_ref().map_or(Bound::Unbounded, Bound::Excluded);
        let upper = end.as_ref().map_or(Bound::Unbounded, Bound::Included);
        let stale: Vec<UserId> = self
            .entries
            .range::<UserId, _>((lower, upper))
            .filter(|(_, e)| e.seq <= version)
            .map(|(u, _)| u.clone())
            .collect();
        for u in &stale {
            self.remove(u);
        }
        for row in rows {
            if self.entries.contains_key(&row.user) {
                continue; // a change newer than the page
            }
            let user = row.user.clone();
            self.put(
                user,
                Entry {
                    seq: version,
                    member: Some(row),
                },
            );
        }
        // Tombstones newer than the page stay out of it; no later change is older.
        let tombstones: Vec<UserId> = self
            .entries
            .range::<UserId, _>((lower, upper))
            .filter(|(_, e)| e.member.is_none())
            .map(|(u, _)| u.clone())
            .collect();
        for u in &tombstones {
            self.remove(u);
        }
        self.bytes += end.as_ref().map_or(0, |u| u.as_str().len()) + BOUND_OVERHEAD;
        self.covered.push((end, version));
        self.complete = last;
    }

    /// Whether `user` is a member (only meaningful once complete).
    pub fn contains(&self, user: &UserId) -> bool {
        self.live(user).is_some()
    }

    /// Up to `limit` members after `after` whose id starts with `prefix`, in id order, and
    /// whether more follow.
    pub fn page(&self, after: Option<&UserId>, prefix: &str, limit: usize) -> (Vec<Member>, bool) {
        let mut out = Vec::with_capacity(limit.min(1024));
        // Start at the later of the cursor and the prefix: only matching ids are visited.
        let lower = match after {
            Some(a) if a.as_str() >= prefix => Bound::Excluded(a.as_str()),
            _ => Bound::Included(prefix),
        };
        let mut range = self
            .entries
            .range::<str, _>((lower, Bound::Unbounded))
            .take_while(|(u, _)| u.as_str().starts_with(prefix))
            .filter_map(|(_, e)| e.member.as_ref());
        for m in range.by_ref() {
            if out.len() == limit {
                return (out, true);
            }
            out.push(m.clone());
        }
        (out, false)
    }
}

fn entry_bytes(user: &UserId, e: &Entry) -> usize {
    let member = e.member.as_ref().map_or(0, |m| {
        m.user.as_str().len() + m.role_name.len() + m.display_name.len()
    });
    user.as_str().len() + member + ENTRY_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(u: &str) -> UserId {
        UserId::new(u.to_string()).expect("user")
    }

    fn member(u: &str, joined_seq: u64) -> Member {
        Member {
            user: user(u),
            role: MemberRole::Member,
            role_name: "member".into(),
            display_name: String::new(),
            joined_seq,
        }
    }

    fn joined(u: &str) -> Change {
        Change::Joined {
            user: user(u),
            role: MemberRole::Member,
            role_name: "member".into(),
        }
    }

    fn ids(members: &[Member]) -> Vec<&str> {
        members.iter().map(|m| m.user.as_str()).collect()
    }

    #[test]
    fn pages_prefixes_and_checks_come_from_the_filled_list() {
        let mut list = MemberList::new();
        list.add_page(5, vec![member("al", 1), member("alice", 1)], false);
        assert!(!list.is_complete());
        assert_eq!(list.next_after(), Some(&user("alice")));
        list.add_page(6, vec![member("bob", 1), member("carol", 6)], true);
        assert!(list.is_complete());
        // The first page may miss a change at 6 that the hub has not delivered yet.
        assert_eq!(list.version(), 5);
        let (page, more) = list.page(None, "", 3);
        assert_eq!((ids(&page), more), (vec!["al", "alice", "bob"], true));
        let (page, more) = list.page(Some(&user("bob")), "", 3);
        assert_eq!((ids(&page), more), (vec!["carol"], false));
        let (page, more) = list.page(None, "al", 10);
        assert_eq!((ids(&page), more), (vec!["al", "alice"], false));
        let (page, more) = list.page(Some(&user("al")), "al", 10);
        assert_eq!((ids(&page), more), (vec!["alice"], false));
        let (page, _) = list.page(None, "b", 10);
        assert_eq!(ids(&page), vec!["bob"]);
        assert!(list.page(None, "z", 10).0.is_empty());
        assert!(list.contains(&user("carol")));
        assert!(!list.contains(&user("dave")));
    }

    #[test]
    fn a_removal_applied_while_a_stale_page_travels_keeps_the_member_out() {
        let mut list = MemberList::new();
        list.add_page(10, vec![member("a", 1)], false);
        // bob's removal (seq 12) is delivered while the page holding him (read at version
        // 11, before the removal) is on its way.
        assert_eq!(list.apply(12, &Change::Left(user("bob"))), Applied::Kept);
        list.add_page(11, vec![member("bob", 2), member("carol", 3)], true);
        assert!(!list.contains(&user("bob")));
        assert_eq!(ids(&list.page(None, "", 10).0), vec!["a", "carol"]);
        assert_eq!(ids(&list.page(None, "b", 10).0), Vec::<&str>::new());
        assert_eq!(list.version(), 12);
    }

    #[test]
    fn nothing_older_replaces_what_the_list_holds() {
        let mut list = MemberList::new();
        // The hub lags: the page (version 20) already has dave's rejoin at 18; the hub then
        // delivers his removal at 15 and the rejoin at 18, both older than the page.
        list.add_page(20, vec![member("dave", 18)], true);
        assert_eq!(list.apply(15, &Change::Left(user("dave"))), Applied::Kept);
        assert!(list.contains(&user("dave")));
        // erin left at 19 (not in the page); her older join at 9 does not bring her back.
        assert_eq!(list.apply(9, &joined("erin")), Applied::Kept);
        assert!(!list.contains(&user("erin")));
        // Newer changes apply.
        assert_eq!(list.apply(21, &joined("erin")), Applied::Kept);
        assert_eq!(
            list.apply(
                22,
                &Change::DisplayName {
                    user: user("erin"),
                    name: "E".into()
                }
            ),
            Applied::Kept
        );
        assert_eq!(
            list.apply(
                23,
                &Change::Role {
                    user: user("erin"),
                    role_name: "owner".into()
                }
            ),
            Applied::Kept
        );
        let (page, _) = list.page(None, "e", 1);
        assert_eq!(page[0].display_name, "E");
        assert_eq!(page[0].role, MemberRole::Owner);
        assert_eq!(page[0].joined_seq, 21);
        assert_eq!(list.apply(24, &Change::Left(user("dave"))), Applied::Kept);
        assert!(!list.contains(&user("dave")));
        assert_eq!(list.version(), 24);
    }

    #[test]
    fn a_join_applied_before_its_page_is_not_lost_or_doubled_and_bytes_add_up() {
        let mut list = MemberList::new();
        list.add_page(3, vec![member("a", 1)], false);
        assert_eq!(list.apply(4, &joined("m")), Applied::Kept);
        // The page read before the join does not have m; the join is newer and stays.
        list.add_page(3, vec![member("b", 1), member("z", 1)], true);
        assert_eq!(ids(&list.page(None, "", 10).0), vec!["a", "b", "m", "z"]);
        let live: usize = list.entries.iter().map(|(u, e)| entry_bytes(u, e)).sum();
        let bounds: usize = BOUND_OVERHEAD * 2 + 1;
        assert_eq!(list.bytes(), live + bounds);
        list.apply(5, &Change::Left(user("m")));
        let live: usize = list.entries.iter().map(|(u, e)| entry_bytes(u, e)).sum();
        assert_eq!(list.bytes(), live + bounds);
        assert_eq!(list.entries.len(), 3, "no tombstone once covered");
    }

    #[test]
    fn changes_it_cannot_follow_make_it_unusable() {
        let mut list = MemberList::new();
        assert_eq!(
            list.apply(
                3,
                &Change::Role {
                    user: user("x"),
                    role_name: "owner".into()
                }
            ),
            Applied::Unusable
        );
        assert_eq!(list.apply(4, &Change::Unknown), Applied::Unusable);
    }
}
