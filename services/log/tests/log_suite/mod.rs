//! The log's guarantees that hold on any store: contiguity, idempotency, membership, read
//! cursors, reads, edits, bad input, tenant isolation. Each case takes a fresh store (a
//! fresh directory, or a fresh key prefix on a shared cluster) and opens the log on it;
//! [`log_suite!`] makes one `#[tokio::test]` per case for a backend, as
//! `kv_conformance_suite!` does for the store interface. `tests/log.rs` runs it on fjall,
//! `tests/tikv.rs` on TiKV when `TIDINGS_TIKV_PD` is set.
//!
//! Shared by two test crates, each using part of it.
#![allow(dead_code, unused_imports, unused_macros)]

use std::collections::HashSet;
use std::sync::Arc;

use tidings_log::crypto::MasterKey;
use tidings_log::store::{KvStore, Order, StoreError, Transaction};
use tidings_log::{
    Append, Body, By, ClientMsgId, ConvId, ConversationKind, CreateConversation, Event, Log,
    LogConfig, LogError, MemberRole, MembersQuery, ReadRange, TenantId, UserId, keys,
};
use tidings_schemas::v1::{MessageEdited, MessagePosted, MessageRecalled, ReactionAdded};

pub struct Fixture {
    pub log: Log,
    pub store: Arc<dyn KvStore>,
}

pub async fn fixture(store: Arc<dyn KvStore>) -> Fixture {
    fixture_with(store, LogConfig::default()).await
}

pub async fn fixture_with(store: Arc<dyn KvStore>, cfg: LogConfig) -> Fixture {
    let log = Log::open(store.clone(), MasterKey::generate(), cfg)
        .await
        .expect("open log");
    Fixture { log, store }
}

pub fn t(s: &str) -> TenantId {
    TenantId::new(s).expect("tenant id")
}
pub fn c(s: &str) -> ConvId {
    ConvId::new(s).expect("conv id")
}
pub fn u(s: &str) -> UserId {
    UserId::new(s).expect("user id")
}
pub fn m(s: &str) -> ClientMsgId {
    ClientMsgId::new(s).expect("client msg id")
}

pub async fn group(log: &Log, tenant: &str, conv: &str, creator: &str, members: &[&str]) {
    log.create_conversation(CreateConversation {
        tenant: t(tenant),
        conv: c(conv),
        kind: "group".into(),
        title: format!("{conv} title"),
        creator: u(creator),
        members: members.iter().map(|x| u(x)).collect(),
    })
    .await
    .expect("create group");
}

pub fn text(tenant: &str, conv: &str, sender: &str, id: &str, body: &str) -> Append {
    Append::text(t(tenant), c(conv), u(sender), m(id), body)
}

pub fn text_of(e: &Event) -> &str {
    match &e.body {
        Some(Body::MessagePosted(p)) => &p.text,
        _ => "",
    }
}

pub async fn read_all(log: &Log, tenant: &str, conv: &str) -> Vec<Event> {
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let page = log
            .read(&t(tenant), &c(conv), ReadRange::forward(from, 1000))
            .await
            .expect("read");
        if page.is_empty() {
            return out;
        }
        from = page.last().expect("non-empty").seq + 1;
        out.extend(page);
    }
}

pub fn assert_contiguous(events: &[Event]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "seqs must be exactly 1..=head");
    }
}

pub async fn seqs_are_exactly_one_to_head_under_concurrent_appends(store: Arc<dyn KvStore>) {
    let f = fixture(store).await;
    let convs = ["hot", "c1", "c2", "c3", "c4", "c5"];
    for conv in convs {
        group(&f.log, "acme", conv, "alice", &["bob"]).await;
    }
    // 40 tasks; half hammer one conversation, half spread over the rest.
    let mut tasks = Vec::new();
    for task in 0..40 {
        let log = f.log.clone();
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..25 {
                let conv = if task % 2 == 0 {
                    "hot"
                } else {
                    convs[1 + (task + i) % 5]
                };
                let id = format!("t{task}-m{i}");
                let ack = log
                    .append(text("acme", conv, "alice", &id, &id))
                    .await
                    .expect("append");
                acks.push((conv, id, ack.seq));
            }
            acks
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.expect("task"));
    }
    assert_eq!(acked.len(), 1000);
    for conv in convs {
        let events = read_all(&f.log, "acme", conv).await;
        assert_contiguous(&events);
        let info = f
            .log
            .conversation(&t("acme"), &c(conv))
            .await
            .expect("info");
        assert_eq!(info.head_seq, events.len() as u64);
        let ids: Vec<_> = events[1..]
            .iter()
            .map(|e| e.client_msg_id.clone())
            .collect();
        let unique: HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "no message twice in {conv}");
        // Every ack names the event that holds its message.
        for (acked_conv, id, seq) in acked.iter().filter(|(a, _, _)| *a == conv) {
            let e = &events[(*seq - 1) as usize];
            assert_eq!(
                (e.client_msg_id.as_str(), text_of(e)),
                (id.as_str(), id.as_str()),
                "{acked_conv}"
            );
        }
    }
    let hot = f
        .log
        .conversation(&t("acme"), &c("hot"))
        .await
        .expect("info");
    assert_eq!(hot.head_seq, 1 + 20 * 25);
}

pub async fn appends_queued_in_order_get_seqs_in_that_order(store: Arc<dyn KvStore>) {
    let f = fixture(store).await;
    group(&f.log, "acme", "ordered", "alice", &[]).await;
    let mut pending = Vec::new();
    for i in 0..500 {
        let id = format!("m{i}");
        pending.push(
            f.log
                .enqueue(text("acme", "ordered", "alice", &id, &id))
                .await
                .expect("enqueue"),
        );
    }
    for (i, p) in pending.into_iter().enumerate() {
        assert_eq!(p.wait().await.expect("ack").seq, i as u64 + 2);
    }
}

pub async fn retry_with_same_client_msg_id_returns_original_and_writes_nothing(
    store: Arc<dyn KvStore>,
) {
    let f = fixture(store).await;
    group(&f.log, "acme", "general", "alice", &["bob"]).await;
    let first = f
        .log
        .append(text("acme", "general", "alice", "abc", "hello"))
        .await
        .expect("append");
    assert!(!first.duplicate);
    let retry = f
        .log
        .append(text("acme", "general", "alice", "abc", "hello"))
        .await
        .expect("retry");
    assert_eq!(
        (retry.seq, &retry.event_id, retry.time_ms),
        (first.seq, &first.event_id, first.time_ms)
    );
    assert!(retry.duplicate);
    // Retries racing in the same group commit still make one event.
    let racing: Vec<_> = futures_join(
        &f.log,
        (0..20).map(|_| text("acme", "general", "bob", "same", "hi")),
    )
    .await;
    let seqs: HashSet<_> = racing.iter().map(|a| a.seq).collect();
    assert_eq!(seqs.len(), 1, "{racing:?}");
    assert_eq!(racing.iter().filter(|a| !a.duplicate).count(), 1);
    // The same id from another sender is another message.
    let other = f
        .log
        .append(text("acme", "general", "bob", "abc", "mine"))
        .await
        .expect("append");
    assert!(!other.duplicate);
    assert_ne!(other.seq, first.seq);
    let events = read_all(&f.log, "acme", "general").await;
    assert_eq!(events.len(), 4, "created + alice/abc + bob/same + bob/abc");
    assert_contiguous(&events);
}

/// Enqueues every append before awaiting any, so they share batches.
pub async fn futures_join(
    log: &Log,
    reqs: impl Iterator<Item = Append>,
) -> Vec<tidings_log::Committed> {
    let mut pending = Vec::new();
    for r in reqs {
        pending.push(log.enqueue(r).await.expect("enqueue"));
    }
    let mut out = Vec::new();
    for p in pending {
        out.push(p.wait().await.expect("ack"));
    }
    out
}

pub async fn concurrent_appends_share_store_commits(store: Arc<dyn KvStore>) {
    let f = fixture(store).await;
    for conv in ["a", "b", "c"] {
        group(&f.log, "acme", conv, "alice", &[]).await;
    }
    let (commits_before, requests_before) = f.log.stats();
    let reqs = (0..1500).map(|i| {
        let conv = ["a", "b", "c"][i % 3];
        text("acme", conv, "alice", &format!("m{i}"), "x")
    });
    let acks = futures_join(&f.log, reqs).await;
    assert_eq!(acks.len(), 1500);
    let (commits, requests) = f.log.stats();
    let (commits, requests) = (commits - commits_before, requests - requests_before);
    assert_eq!(requests, 1500);
    assert!(
        commits * 10 <= requests,
        "1500 queued appends took {commits} commits: group commit is not grouping"
    );
}

pub async fn only_members_may_post_and_refusals_write_nothing(store: Arc<dyn KvStore>) {
    let f = fixture(store).await;
    group(&f.log, "acme", "general", "alice", &["bob"]).await;
    let err = f
        .log
        .append(text("acme", "general", "mallory", "x1", "hi"))
        .await
        .expect_err("non-member");
    assert!(
        matches!(err, LogError::NotMember { ref user, .. } if user == "mallory"),
        "{err:?}"
    );
    let err = f
        .log
        .append(text("acme", "nowhere", "alice", "x2", "hi"))
        .await
        .expect_err("unknown conv");
    assert!(
        matches!(err, LogError::ConversationNotFound { .. }),
        "{err:?}"
    );
    // Another tenant's conversation of the same name does not exist for it.
    let err = f
        .log
        .append(text("globex", "general", "alice", "x3", "hi"))
        .await
        .expect_err("other tenant");
    assert!(
        matches!(err, LogError::ConversationNotFound { .. }),
        "{err:?}"
    );
    assert_eq!(read_all(&f.log, "acme", "general").await.len(), 1);
    // A refused request in the same batch as good ones leaves the good ones intact.
    let mut pending = Vec::new();
    for (i, sender) in ["alice", "mallory", "bob", "eve", "alice"]
        .iter()
        .enumerate()
    {
        pending.push(
            f.log
                .enqueue(text("acme", "general", sender, &format!("b{i}"), "hi"))
                .await
                .expect("enqueue"),
        );
    }
    let mut results = Vec::new();
    for p in pending {
        results.push(p.wait().await.map(|a| a.seq));
    }
    let seqs: Vec<_> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    assert_eq!(seqs, vec![2, 3, 4]);
    assert_eq!(
        results
            .iter()
            .filter(|r| matches!(r, Err(LogError::NotMember { .. })))
            .count(),
        2
    );
    assert_contiguous(&read_all(&f.log, "acme", "general").await);
}

pub async fn membership_changes_are_events_and_keep_the_lists_current(store: Arc<dyn KvStore>) {
    let f = fixture(store).await;
    let (acme, general) = (t("acme"), c("general"));
    group(&f.log, "acme", "general", "alice", &["bob"]).await;
    group(&f.log, "acme", "random", "bob", &["alice"]).await;

    // Only owners add; adding twice is refused.
    let err = f
        .log
        .add_member(&acme, &general, &u("bob"), &u("carol"))
        .await
        .expect_err("bob is no owner");
    assert!(matches!(err, LogError::NotAllowed(_)), "{err:?}");
    let joined = f
        .log
        .add_member(&acme, &general, &u("alice"), &u("carol"))
        .await
        .expect("add");
    assert_eq!(joined.seq, 2);
    let err = f
        .log
        .add_member(&acme, &general, &u("alice"), &u("carol"))
        .await
        .expect_err("twice");
    assert!(matches!(err, LogError::AlreadyMember { .. }), "{err:?}");
    // The new member can post at once.
    f.log
        .append(text("acme", "general", "carol", "c1", "hello"))
        .await
        .expect("carol posts");

    let events = read_all(&f.log, "acme", "general").await;
    match &events[1].body {
        Some(Body::MemberJoined(j)) => assert_eq!(j.user, "carol"),
        other => panic!("expected a join event, got {other:?}"),
    }
    match &events[0].body {
        Some(Body::ConversationCreated(cr)) => {
            assert_eq!(cr.kind, ConversationKind::Group as i32);
            assert_eq!(
                (cr.creator.as_str(), cr.title.as_str()),
                ("alice", "general title")
            );
            assert_eq!(cr.members, vec!["alice", "bob"]);
        }
        other => panic!("expected the creation event, got {other:?}"),
    }

    // Member list, paged in user order.
    let page1 = f
        .log
        .members(&acme, &general, None, 2)
        .await
        .expect("members");
    let names: Vec<_> = page1.iter().map(|x| x.user.to_string()).collect();
    assert_eq!(names, vec!["alice", "bob"]);
    assert_eq!(page1[0].role, MemberRole::Owner);
    let page2 = f
        .log
        .members(&acme, &general, Some(&page1[1].user), 2)
        .await
        .expect("members");
    let names: Vec<_> = page2.iter().map(|x| x.user.to_string()).collect();
    assert_eq!(names, vec!["carol"]);
    assert_eq!(page2[0].joined_seq, 2);

    // A user's conversation list.
    let convs = f
        .log
        .conversations(&acme, &u("alice"), None, 10)
        .await
        .expect("list");
    let ids: Vec<_> = convs.iter().map(|x| x.conv.to_string()).collect();
    assert_eq!(ids, vec!["general", "random"]);
    let carols = f
        .log
        .conversations(&acme, &u("carol"), None, 10)
        .await
        .expect("list");
    assert_eq!(carols.len(), 1);

    // Non-owners may leave; owners may remove; removed members may not post.
    f.log
        .remove_member(&acme, &general, &u("bob"), &u("bob"))
        .await
        .expect("bob leaves");
    let err = f
        .log
        .remove_member(&acme, &general, &u("carol"), &u("alice"))
        .await
        .expect_err("not owner");
    assert!(matches!(err, LogError::NotAllowed(_)), "{err:?}");
    f.log
        .remove_member(&acme, &general, &u("alice"), &u("carol"))
        .await
        .expect("removed");
    let err = f
        .log
        .append(text("acme", "general", "carol", "c2", "still here?"))
        .await
        .expect_err("removed");
    assert!(matches!(err, LogError::NotMember { .. }), "{err:?}");
    assert!(
        f.log
            .conversations(&acme, &u("carol"), None, 10)
            .await
            .expect("list")
            .is_empty()
    );
    let info = f.log.conversation(&acme, &general).await.expect("info");
    assert_eq!(info.member_count, 1);
    let last = read_all(&f.log, "acme", "general").await;
    match &last.last().expect("events").body {
        Some(Body::MemberLeft(l)) => assert_eq!(l.user, "carol"),
        other => panic!("expected a leave event, got {other:?}"),
    }
}

pub async fn direct_conversations_have_exactly_two_fixed_members(store: Arc<dyn KvStore>) {
    let f = fixture(store).await;
    let create = |members: Vec<UserId>| CreateConversation {
        tenant: t("acme"),
        conv: c("dm"),
        kind: "direct".into(),
        title: String::new(),
        creator: u("alice"),
        members,
    };
    let err = f
        .log
        .create_conversation(create(vec![]))
        .await
        .expect_err("one member");
    assert!(matches!(err, LogError::InvalidRequest(_)), "{err:?}");
    let err = f
        .log
        .create_conversation(create(vec![u("bob"), u("carol")]))
        .await
        .expect_err("three");
    assert!(matches!(err, LogError::InvalidRequest(_)), "{err:?}");
    f.log
        .create_conversation(create(vec![u("bob")]))
        .await
        .expect("two");
    let err = f
        .log
        .create_conversation(create(vec![u("bob")]))
        .await
        .expect_err("exists");
    assert!(
        matches!(err, LogError::ConversationExists { .. }),
        "{err:?}"
    );
    let err = f
        .log
        .add_member(&t("acme"), &c("dm"), &u("alice"), &u("carol"))
        .await
        .expect_err("fixed");
    assert!(matches!(err, LogError::NotAllowed(_)), "{err:?}");
}

pub async fn read_cursors_move_forward_only_and_give_unread_counts(store: Arc<dyn KvStore>) {
    let f = fixture(store).await;
    let (acme, general) = (t("acme"), c("general"));
    group(&f.log, "acme", "general", "alice", &["bob"]).await;
    for i in 0..5 {
        f.log
            .append(text("acme", "general", "alice", &format!("m{i}"), "hi"))
            .await
            .expect("append");
    }
    let list = f
        .log
        .conversations(&acme, &u("bob"), None, 10)
        .await
        .expect("list");
    assert_eq!(
        (list[0].head_seq, list[0].read_seq, list[0].unread),
        (6, 1, 5)
    );
    assert_eq!(
        f.log
            .mark_read(&acme, &general, &u("bob"), 4)
            .await
            .expect("mark"),
        4
    );
    assert_eq!(
        f.log
            .mark_read(&acme, &general, &u("bob"), 2)
            .await
            .expect("mark"),
        4,
        "never back"
    );
    assert_eq!(
        f.log
            .mark_read(&acme, &general, &u("bob"), 99)
            .await
            .expect("mark"),
        6,
        "never past head"
    );
    let list = f
        .log
        .conversations(&acme, &u("bob"), None, 10)
        .await
        .expect("list");
    assert_eq!(list[0].unread, 0);
    let err = f
        .log
        .mark_read(&acme, &general, &u("mallory"), 1)
        .await
        .expect_err("non-member");
    assert!(matches!(err, LogError::NotMember { .. }), "{err:?}");
}

/// Unread counts count others' messages only: not one's own, not reactions, joins or edits;
/// @all is reserved to owners from `mention_all_owners_only_from` members.
/// The user's unread count in one conversation, from their conversation list.
pub async fn unread_of(log: &Log, tenant: &str, user: &str, conv: &str) -> u64 {
    let list = log
        .conversations(&t(tenant), &u(user), None, 100)
        .await
        .expect("list");
    list.iter()
        .find(|s| s.conv.as_str() == conv)
        .map(|s| s.unread)
        .expect("listed")
}

pub async fn unread_counts_only_others_messages_and_at_all_is_for_owners(store: Arc<dyn KvStore>) {
    let cfg = LogConfig {
        mention_all_owners_only_from: 3,
        ..LogConfig::default()
    };
    let f = fixture_with(store, cfg).await;
    let (acme, general) = (t("acme"), c("general"));
    group(&f.log, "acme", "general", "alice", &["bob"]).await;
    let post = |sender: &str, id: &str| text("acme", "general", sender, id, "hi");
    for i in 0..3 {
        f.log
            .append(post("alice", &format!("a{i}")))
            .await
            .expect("post"); // 2, 3, 4
    }
    let mut react = post("bob", "r1");
    react.body = Body::ReactionAdded(ReactionAdded {
        target_seq: 2,
        reaction: "+1".into(),
    });
    assert_eq!(f.log.append(react).await.expect("react").seq, 5);
    f.log.append(post("bob", "b1")).await.expect("post"); // 6
    f.log.append(post("bob", "b2")).await.expect("post"); // 7
    f.log
        .add_member(&acme, &general, &u("alice"), &u("carol"))
        .await
        .expect("join"); // 8
    let mut edit = post("alice", "e1");
    edit.body = Body::MessageEdited(MessageEdited {
        target_seq: 2,
        new_text: "hello".into(),
    });
    f.log.append(edit).await.expect("edit"); // 9
    assert_eq!(
        f.log.append(post("alice", "a3")).await.expect("post").seq,
        10
    );

    let unread = |user: &'static str| unread_of(&f.log, "acme", user, "general");
    assert_eq!(unread("bob").await, 4, "alice's 2, 3, 4 and 10");
    assert_eq!(unread("alice").await, 2, "bob's 6 and 7");
    assert_eq!(unread("carol").await, 1, "alice's 10, after carol joined");
    f.log
        .mark_read(&acme, &general, &u("bob"), 4)
        .await
        .expect("mark");
    assert_eq!(unread("bob").await, 1);
    f.log
        .mark_read(&acme, &general, &u("bob"), 6)
        .await
        .expect("mark");
    assert_eq!(unread("bob").await, 1, "his own 7 is still not unread");
    f.log
        .mark_read(&acme, &general, &u("alice"), 7)
        .await
        .expect("mark");
    assert_eq!(unread("alice").await, 0);

    // @all: three members now, so owners only; a group of two lets anyone.
    let all = |sender: &str, conv: &str, id: &str| Append {
        body: Body::MessagePosted(MessagePosted {
            text: "everyone".into(),
            mention_all: true,
            ..MessagePosted::default()
        }),
        ..text("acme", conv, sender, id, "")
    };
    let err = f
        .log
        .append(all("bob", "general", "all1"))
        .await
        .expect_err("member");
    assert!(matches!(err, LogError::NotAllowed(_)), "{err:?}");
    f.log
        .append(all("alice", "general", "all2"))
        .await
        .expect("owner");
    group(&f.log, "acme", "pair", "alice", &["bob"]).await;
    f.log
        .append(all("bob", "pair", "all3"))
        .await
        .expect("small group");

    // Sending past 64 own messages after the cursor moves it: nothing unread for bob, every
    // one of them for alice.
    for i in 0..70 {
        f.log
            .append(text("acme", "pair", "bob", &format!("p{i}"), "hi"))
            .await
            .expect("post");
    }
    assert_eq!(unread_of(&f.log, "acme", "bob", "pair").await, 0);
    assert_eq!(unread_of(&f.log, "acme", "alice", "pair").await, 71);
}

/// The member list has a version (the seq of its last membership event), the changes since
/// a version, and a prefix search; each a bounded read.
pub async fn member_lists_have_versions_changes_and_prefix_search(store: Arc<dyn KvStore>) {
    let f = fixture(store).await;
    let (acme, general) = (t("acme"), c("general"));
    group(
        &f.log,
        "acme",
        "general",
        "alice",
        &["bob", "bobby", "carol"],
    )
    .await; // seq 1
    f.log
        .append(text("acme", "general", "alice", "m1", "hi"))
        .await
        .expect("post"); // 2
    let q = |prefix: &str, since: Option<u64>| MembersQuery {
        after: None,
        limit: 10,
        prefix: prefix.into(),
        since_version: since,
    };
    let page = f
        .log
        .member_page(&acme, &general, &q("", None))
        .await
        .expect("page");
    assert_eq!(page.version, 1, "a message is not a membership change");
    assert_eq!(page.members.len(), 4);
    let bo = f
        .log
        .member_page(&acme, &general, &q("bo", None))
        .await
        .expect("prefix");
    let names: Vec<_> = bo.members.iter().map(|m| m.user.as_str()).collect();
    assert_eq!(names, ["bob", "bobby"]);
    let after = MembersQuery {
        after: Some(u("bob")),
        ..q("bo", None)
    };
    let rest = f
        .log
        .member_page(&acme, &general, &after)
        .await
        .expect("after");
    assert_eq!(rest.members.len(), 1);
    assert_eq!(rest.members[0].user.as_str(), "bobby");

    f.log
        .add_member(&acme, &general, &u("alice"), &u("dave"))
        .await
        .expect("add"); // 3
    f.log
        .remove_member(&acme, &general, &u("alice"), &u("bob"))
        .await
        .expect("remove"); // 4
    let since = f
        .log
        .member_page(&acme, &general, &q("", Some(1)))
        .await
        .expect("since");
    assert_eq!(since.version, 4);
    let changes: Vec<_> = since
        .changes
        .iter()
        .map(|ch| (ch.seq, ch.user.as_str(), ch.removed))
        .collect();
    assert_eq!(changes, [(3, "dave", false), (4, "bob", true)]);
    let none = f
        .log
        .member_page(&acme, &general, &q("", Some(4)))
        .await
        .expect("none");
    assert!(none.changes.is_empty());
    // The whole feed from the start rebuilds the list.
    let all = f
        .log
        .member_page(&acme, &general, &q("", Some(0)))
        .await
        .expect("all");
    assert_eq!(all.changes.len(), 6, "4 at creation, dave, bob");
    // Role and display name changes are membership changes too: the feed carries the member
    // as they are after each one.
    f.log
        .set_role(&acme, &general, &u("alice"), &u("carol"), "admin")
        .await
        .expect("set role"); // 5
    f.log
        .set_display_name(
            &acme,
            &general,
            By::Member(u("carol")),
            &u("carol"),
            "Carol",
        )
        .await
        .expect("set name"); // 6
    let renamed = f
        .log
        .member_page(&acme, &general, &q("", Some(4)))
        .await
        .expect("since 4");
    assert_eq!(renamed.version, 6);
    let changes: Vec<_> = renamed
        .changes
        .iter()
        .map(|ch| {
            (
                ch.seq,
                ch.user.as_str(),
                ch.role_name.as_str(),
                ch.display_name.as_str(),
                ch.removed,
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            (5, "carol", "admin", "", false),
            (6, "carol", "admin", "Carol", false)
        ]
    );
    let err = f
        .log
        .member_page(&acme, &general, &q("b*", None))
        .await
        .expect_err("bad prefix");
    assert!(matches!(err, LogError::InvalidRequest(_)), "{err:?}");
}

pub async fn reads_go_forward_or_backward_with_a_limit(store: Arc<dyn KvStore>) {
    let f = fixture(store).await;
    let (acme, general) = (t("acme"), c("general"));
    group(&f.log, "acme", "general", "alice", &[]).await;
    for i in 2..=30 {
        f.log
            .append(text(
                "acme",
                "general",
                "alice",
                &format!("m{i}"),
                &format!("text {i}"),
            ))
            .await
            .expect("append");
    }
    let seqs = |events: Vec<Event>| events.iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(
            f.log
                .read(&acme, &general, ReadRange::forward(5, 3))
                .await
                .expect("read")
        ),
        vec![5, 6, 7]
    );
    assert_eq!(
        seqs(
            f.log
                .read(&acme, &general, ReadRange::latest(3))
                .await
                .expect("read")
        ),
        vec![30, 29, 28]
    );
    let before_ten = ReadRange {
        from: Some(9),
        limit: 4,
        order: Order::Descending,
    };
    assert_eq!(
        seqs(f.log.read(&acme, &general, before_ten).await.expect("read")),
        vec![9, 8, 7, 6]
    );
    assert_eq!(
        seqs(
            f.log
                .read(&acme, &general, ReadRange::forward(29, 10))
                .await
                .expect("read")
        ),
        vec![29, 30]
    );
    assert!(
        f.log
            .read(&acme, &general, ReadRange::forward(31, 10))
            .await
            .expect("read")
            .is_empty()
    );
    let start = ReadRange {
        from: Some(2),
        limit: 10,
        order: Order::Descending,
    };
    assert_eq!(
        seqs(f.log.read(&acme, &general, start).await.expect("read")),
        vec![2, 1]
    );
    let e = &f
        .log
        .read(&acme, &general, ReadRange::forward(7, 1))
        .await
        .expect("read")[0];
    assert_eq!(
        (text_of(e), e.sender.as_str(), e.client_msg_id.as_str()),
        ("text 7", "alice", "m7")
    );
    assert!(uuid_v7(&e.event_id), "{}", e.event_id);
    for bad in [0, 1001] {
        let err = f
            .log
            .read(&acme, &general, ReadRange::forward(1, bad))
            .await
            .expect_err("limit");
        assert!(matches!(err, LogError::InvalidRequest(_)), "{err:?}");
    }
}

pub fn uuid_v7(s: &str) -> bool {
    s.len() == 36 && s.as_bytes()[14] == b'7'
}

pub async fn reads_racing_appends_see_contiguous_committed_runs(store: Arc<dyn KvStore>) {
    let f = fixture(store).await;
    let (acme, general) = (t("acme"), c("general"));
    group(&f.log, "acme", "general", "alice", &[]).await;
    let writer = {
        let log = f.log.clone();
        tokio::spawn(async move {
            let reqs = (0..2000).map(|i| text("acme", "general", "alice", &format!("m{i}"), "x"));
            futures_join(&log, reqs).await.len()
        })
    };
    let mut reads = 0;
    while !writer.is_finished() {
        let latest = f
            .log
            .read(&acme, &general, ReadRange::latest(50))
            .await
            .expect("read");
        let head = latest[0].seq;
        for (i, e) in latest.iter().enumerate() {
            assert_eq!(e.seq, head - i as u64);
        }
        let fwd = f
            .log
            .read(
                &acme,
                &general,
                ReadRange::forward(head.saturating_sub(20).max(1), 100),
            )
            .await
            .expect("read");
        assert!(fwd.len() >= 20.min(head as usize));
        for w in fwd.windows(2) {
            assert_eq!(w[1].seq, w[0].seq + 1);
        }
        reads += 1;
    }
    assert_eq!(writer.await.expect("writer"), 2000);
    assert!(reads > 0);
    assert_eq!(read_all(&f.log, "acme", "general").await.len(), 2001);
}

pub async fn edits_and_recalls_point_at_the_authors_own_messages(store: Arc<dyn KvStore>) {
    let f = fixture(store).await;
    group(&f.log, "acme", "general", "alice", &["bob"]).await;
    f.log
        .append(text("acme", "general", "alice", "m1", "helo"))
        .await
        .expect("post");
    let body = |b: Body| Append {
        tenant: t("acme"),
        conv: c("general"),
        sender: u("alice"),
        client_msg_id: m("e1"),
        body: b,
    };
    let edit = f
        .log
        .append(body(Body::MessageEdited(MessageEdited {
            target_seq: 2,
            new_text: "hello".into(),
        })))
        .await
        .expect("edit");
    assert_eq!(edit.seq, 3);
    let mut by_bob = body(Body::MessageRecalled(MessageRecalled { target_seq: 2 }));
    by_bob.sender = u("bob");
    by_bob.client_msg_id = m("r1");
    let err = f.log.append(by_bob).await.expect_err("not the author");
    assert!(matches!(err, LogError::NotAllowed(_)), "{err:?}");
    let mut recall_missing = body(Body::MessageRecalled(MessageRecalled { target_seq: 99 }));
    recall_missing.client_msg_id = m("r2");
    let err = f
        .log
        .append(recall_missing)
        .await
        .expect_err("no such message");
    assert!(
        matches!(
            err,
            LogError::NoSuchMessage {
                seq: 99,
                head: 3,
                ..
            }
        ),
        "{err:?}"
    );
    let mut react = body(Body::ReactionAdded(ReactionAdded {
        target_seq: 2,
        reaction: "+1".into(),
    }));
    react.sender = u("bob");
    react.client_msg_id = m("x1");
    assert_eq!(f.log.append(react).await.expect("react").seq, 4);
}

pub async fn bad_input_gets_typed_errors(store: Arc<dyn KvStore>) {
    let cfg = LogConfig {
        max_body_bytes: 1024,
        ..LogConfig::default()
    };
    let f = fixture_with(store, cfg).await;
    group(&f.log, "acme", "general", "alice", &[]).await;
    let err = f
        .log
        .append(text("acme", "general", "alice", "big", &"x".repeat(2000)))
        .await
        .expect_err("too big");
    assert!(
        matches!(err, LogError::TooLarge { size, limit: 1024, .. } if size > 2000),
        "{err:?}"
    );
    let err = f
        .log
        .append(text("acme", "general", "alice", "empty", ""))
        .await
        .expect_err("empty");
    assert!(matches!(err, LogError::InvalidRequest(_)), "{err:?}");
    let mention = Append {
        body: Body::MessagePosted(MessagePosted {
            text: "hi".into(),
            mentions: vec!["bad id!".into()],
            reply_to_seq: 0,
            mention_all: false,
        }),
        ..text("acme", "general", "alice", "mention", "")
    };
    let err = f.log.append(mention).await.expect_err("bad mention");
    assert!(
        matches!(
            err,
            LogError::InvalidId {
                field: "mention",
                ..
            }
        ),
        "{err:?}"
    );
    let system = Append {
        body: Body::MemberLeft(tidings_schemas::v1::MemberLeft {
            user: "alice".into(),
        }),
        ..text("acme", "general", "alice", "sys", "")
    };
    let err = f.log.append(system).await.expect_err("system event");
    assert!(matches!(err, LogError::InvalidRequest(_)), "{err:?}");
    let err = f
        .log
        .rename(&t("acme"), &c("general"), &u("alice"), &"t".repeat(5000))
        .await
        .expect_err("title");
    assert!(
        matches!(err, LogError::TooLarge { what: "title", .. }),
        "{err:?}"
    );
    assert_eq!(
        read_all(&f.log, "acme", "general").await.len(),
        1,
        "nothing written"
    );
}

pub async fn tenants_are_isolated(store: Arc<dyn KvStore>) {
    let f = fixture(store).await;
    group(&f.log, "acme", "general", "alice", &[]).await;
    group(&f.log, "globex", "general", "alice", &[]).await;
    f.log
        .append(text("acme", "general", "alice", "m1", "acme only"))
        .await
        .expect("append");
    let globex = read_all(&f.log, "globex", "general").await;
    assert_eq!(globex.len(), 1);
    assert!(globex.iter().all(|e| e.tenant == "globex"));
    let list = f
        .log
        .conversations(&t("globex"), &u("alice"), None, 10)
        .await
        .expect("list");
    assert_eq!(list[0].head_seq, 1);
    // Each tenant has its own data key.
    let a = f
        .store
        .get(&keys::data_key(&t("acme"), 1))
        .await
        .expect("get");
    let g = f
        .store
        .get(&keys::data_key(&t("globex"), 1))
        .await
        .expect("get");
    assert!(a.is_some() && g.is_some() && a != g);
}

/// One `#[tokio::test]` per case. `$make` is an async block returning
/// `Result<(Arc<dyn KvStore>, guard), String>`: `Err(reason)` skips the case with one
/// `SKIPPED <case>: <reason>` line; the guard lives until the case ends. Each case keeps the
/// runtime it was written for (two need real parallelism; the group-commit case relies on
/// one thread queueing everything before the sequencer runs).
macro_rules! log_suite {
    ($make:expr) => {
        log_suite!(@cases $make; (flavor = "multi_thread", worker_threads = 2); seqs_are_exactly_one_to_head_under_concurrent_appends, reads_racing_appends_see_contiguous_committed_runs);
        log_suite!(@cases $make; (flavor = "current_thread"); appends_queued_in_order_get_seqs_in_that_order, retry_with_same_client_msg_id_returns_original_and_writes_nothing, concurrent_appends_share_store_commits, only_members_may_post_and_refusals_write_nothing, membership_changes_are_events_and_keep_the_lists_current, direct_conversations_have_exactly_two_fixed_members, read_cursors_move_forward_only_and_give_unread_counts, unread_counts_only_others_messages_and_at_all_is_for_owners, member_lists_have_versions_changes_and_prefix_search, reads_go_forward_or_backward_with_a_limit, edits_and_recalls_point_at_the_authors_own_messages, bad_input_gets_typed_errors, tenants_are_isolated);
    };
    (@cases $make:expr; $flavor:tt; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test $flavor]
            async fn $case() {
                let (store, _guard) = match $make.await {
                    Ok(made) => made,
                    Err(reason) => {
                        tidings_log::store::conformance::report_skip(stringify!($case), &reason);
                        return;
                    }
                };
                crate::log_suite::$case(store).await;
            }
        )*
    };
}
