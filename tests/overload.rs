//! Overload (issue 13): past the log writer's capacity the hottest conversations get
//! RATE_LIMITED, small conversations never do, a VIP tenant's hot group is limited after a
//! standard one's, and nothing acknowledged is lost; big groups get no typing notices,
//! unread counts skip joins, and a removed member is never let in by the gateway's cache. One server, real sockets, real NATS.
//!
//! The capacity is configured small (20 appends a second) so the test's own sends are far
//! past it on any machine; no claim depends on how fast they go: a conversation that sends
//! at most the floor (3) in total can never be limited, whatever windows its sends fall in,
//! and which of two alternating senders is refused first follows from the tiers alone.

use std::collections::{BTreeMap, BTreeSet};

use crate::common::{Nats, Sandbox, Server};
use tidings_client::client::ErrorCode;
use tidings_client::{ClientError, Connection, MemberCache, Push, Requester, RetryPolicy};
use tidings_schemas::v1::ConversationKind;
use tidings_schemas::v1::event::Body;

const SMALL: usize = 100;

/// Sends `text` once; `Ok(Some(seq))` acked, `Ok(None)` RATE_LIMITED (with a window).
async fn send_once(r: &Requester, conv: &str, id: &str) -> Result<Option<u64>, ClientError> {
    match r.send_text(conv, id, id).await {
        Ok(ack) => Ok(Some(ack.seq)),
        Err(ClientError::Server {
            code: ErrorCode::RateLimited,
            retry_after_ms,
            ..
        }) => {
            assert!(
                (1..=1001).contains(&retry_after_ms),
                "a refusal says when its window ends: {retry_after_ms}"
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Every message of the conversation, seq → client_msg_id, read back through the gateway.
async fn read_back(r: &Requester, conv: &str) -> BTreeMap<u64, String> {
    let mut out = BTreeMap::new();
    let mut from = 1;
    loop {
        let page = r.pull(conv, from, u64::MAX - 1).await.expect("pull");
        for e in &page.events {
            if let Some(Body::MessagePosted(_)) = e.body {
                out.insert(e.seq, e.client_msg_id.clone());
            }
        }
        match page.events.last() {
            Some(last) if last.seq < page.head_seq => from = last.seq + 1,
            _ => return out,
        }
    }
}

/// The acks are exactly what the log holds: nothing acked lost, nothing refused written.
async fn assert_exactly(r: &Requester, conv: &str, acked: &BTreeMap<u64, String>) {
    let stored = read_back(r, conv).await;
    assert_eq!(
        &stored, acked,
        "conversation {conv}: stored messages are the acked ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hottest_conversations_are_limited_past_capacity_and_no_one_else() {
    let s = Sandbox::new();
    let nats = Nats::start();
    let server = Server::start(
        &s,
        &nats,
        "all",
        &[
            ("TIDINGS_LOG_CAPACITY_PER_SEC", "20"),
            ("TIDINGS_LOG_OVERLOAD_FLOOR_PER_SEC", "3"),
            ("TIDINGS_LOG_VIP_TENANTS", "gold"),
            // The session's own frame bucket is not what is under test.
            ("TIDINGS_GATEWAY_FRAMES_PER_SECOND", "100000"),
            ("TIDINGS_GATEWAY_FRAME_BURST", "100000"),
            ("TIDINGS_GATEWAY_TYPING_MAX_MEMBERS", "2"),
        ],
    );
    let (acme, _) = Connection::open(&server.url(), &s.token("acme", "alice", 3600), "t")
        .await
        .expect("connect acme");
    let (gold, _) = Connection::open(&server.url(), &s.token("gold", "alice", 3600), "t")
        .await
        .expect("connect gold");
    let acme = acme.requester();
    let gold = gold.requester();
    let mut convs: Vec<String> = ["calm", "hot", "race", "patient"]
        .iter()
        .map(|c| c.to_string())
        .collect();
    convs.extend((0..SMALL).map(|i| format!("small{i}")));
    for c in &convs {
        acme.create_conversation(c, ConversationKind::Group, c, &["bob"])
            .await
            .expect("create");
    }
    gold.create_conversation("race", ConversationKind::Group, "race", &["bob"])
        .await
        .expect("create gold race");
    acme.create_conversation("crowd", ConversationKind::Group, "crowd", &["bob", "carol"])
        .await
        .expect("create crowd");

    // Below capacity nobody is limited: 15 sends in all, fewer than one window's 20.
    let mut calm = BTreeMap::new();
    for i in 0..15 {
        let id = format!("calm-{i}");
        let seq = send_once(&acme, "calm", &id).await.expect("send");
        calm.insert(seq.expect("below capacity: never limited"), id);
    }
    assert_exactly(&acme, "calm", &calm).await;

    // A VIP tenant's hot group is limited after a standard one: the two send in strict
    // alternation, standard first, so the first refusal tells which tier gave way first.
    // (Run before the small conversations' flood: while small conversations alone fill the
    // capacity, every hot group, VIP or not, is held at the floor.)
    let (mut std_acked, mut vip_acked) = (BTreeMap::new(), BTreeMap::new());
    let (mut std_first, mut vip_first) = (None, None);
    for i in 0..200 {
        let id = format!("race-{i}");
        match send_once(&acme, "race", &id).await.expect("standard send") {
            Some(seq) => {
                std_acked.insert(seq, id.clone());
            }
            None => {
                std_first.get_or_insert(i);
            }
        }
        match send_once(&gold, "race", &id).await.expect("vip send") {
            Some(seq) => {
                vip_acked.insert(seq, id);
            }
            None => {
                vip_first.get_or_insert(i);
            }
        }
    }
    println!(
        "race: standard {} acked (first limited at {std_first:?}), vip {} acked (first \
         limited at {vip_first:?})",
        std_acked.len(),
        vip_acked.len()
    );
    let std_first = std_first.expect("the standard hot group is limited");
    assert!(
        vip_first.is_none_or(|v| v > std_first),
        "the VIP group is limited only after the standard one"
    );
    assert!(vip_acked.len() > std_acked.len());
    assert_exactly(&acme, "race", &std_acked).await;
    assert_exactly(&gold, "race", &vip_acked).await;

    // One hot group far past capacity (8 senders, 100 sends each) while 100 small
    // conversations send 2 messages each (under the floor of 3).
    let mut flood = tokio::task::JoinSet::new();
    for sender in 0..8 {
        let r = acme.clone();
        flood.spawn(async move {
            let (mut acked, mut limited) = (Vec::new(), 0);
            for i in 0..100 {
                let id = format!("hot-{sender}-{i}");
                match send_once(&r, "hot", &id).await.expect("hot send") {
                    Some(seq) => acked.push((seq, id)),
                    None => limited += 1,
                }
            }
            (acked, limited)
        });
    }
    let mut smalls = tokio::task::JoinSet::new();
    for chunk in 0..4 {
        let r = acme.clone();
        smalls.spawn(async move {
            let mut acked = Vec::new();
            for round in 0..2 {
                for i in (chunk..SMALL).step_by(4) {
                    let conv = format!("small{i}");
                    let id = format!("{conv}-{round}");
                    let seq = send_once(&r, &conv, &id).await.expect("small send");
                    let seq = seq.unwrap_or_else(|| panic!("{conv} was limited"));
                    acked.push((conv, seq, id));
                }
            }
            acked
        });
    }
    let mut hot = BTreeMap::new();
    let mut hot_limited = 0;
    while let Some(done) = flood.join_next().await {
        let (acked, limited) = done.expect("flood task");
        hot.extend(acked);
        hot_limited += limited;
    }
    let mut small: BTreeMap<String, BTreeMap<u64, String>> = BTreeMap::new();
    while let Some(done) = smalls.join_next().await {
        for (conv, seq, id) in done.expect("small task") {
            small.entry(conv).or_default().insert(seq, id);
        }
    }
    println!("hot: {} acked, {hot_limited} limited", hot.len());
    assert!(hot_limited > 0, "the hot group is limited");
    assert_eq!(hot.len() + hot_limited, 800);
    assert_exactly(&acme, "hot", &hot).await;
    assert_eq!(small.len(), SMALL);
    for (conv, acked) in &small {
        assert_eq!(acked.len(), 2, "{conv}");
        assert_exactly(&acme, conv, acked).await;
    }

    // The client library honours retry_after (with jitter): 4 senders past capacity, each
    // message retried with its client_msg_id until acked; every one lands exactly once.
    let mut patient = tokio::task::JoinSet::new();
    for sender in 0..4 {
        let r = acme.clone();
        patient.spawn(async move {
            let mut acked = Vec::new();
            for i in 0..15 {
                let id = format!("patient-{sender}-{i}");
                let policy = RetryPolicy {
                    max_attempts: 1000,
                    max_wait: std::time::Duration::from_secs(120),
                };
                let ack = r
                    .send_text_with_retry("patient", &id, &id, policy)
                    .await
                    .expect("acked after retries");
                acked.push((ack.seq, id));
            }
            acked
        });
    }
    let mut patient_acked = BTreeMap::new();
    while let Some(done) = patient.join_next().await {
        patient_acked.extend(done.expect("patient task"));
    }
    assert_eq!(patient_acked.len(), 60);
    let ids: BTreeSet<_> = patient_acked.values().collect();
    assert_eq!(ids.len(), 60, "each message once");
    assert_exactly(&acme, "patient", &patient_acked).await;

    // Above `gateway.typing_max_members` (2 here) typing notices are not relayed: bob sees
    // the pair's notice and not the crowd's, sent just before it. Both hubs are live first
    // (a message through each reached him).
    let (mut bob, _) = Connection::open(&server.url(), &s.token("acme", "bob", 3600), "t")
        .await
        .expect("connect bob");
    acme.send_text("crowd", "crowd-1", "hi all")
        .await
        .expect("send");
    acme.send_text("calm", "calm-last", "hi bob")
        .await
        .expect("send");
    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while seen.len() < 2 {
        match tokio::time::timeout_at(deadline, bob.next_push()).await {
            Ok(Some(Push::Event(e))) => {
                seen.insert(e.conversation);
            }
            Ok(Some(_)) => {}
            other => panic!("no events: {other:?}"),
        }
    }
    acme.typing("crowd").await.expect("typing in the crowd");
    acme.typing("calm").await.expect("typing in the pair");
    loop {
        match tokio::time::timeout_at(deadline, bob.next_push()).await {
            Ok(Some(Push::Typing(t))) => {
                assert_eq!(t.conversation, "calm", "the crowd's notice is not relayed");
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("no typing notice: {other:?}"),
        }
    }
    // Unread counts through the gateway: alice's message in the crowd, not the join events.
    let list = bob.list_conversations().await.expect("list");
    let crowd = list
        .iter()
        .find(|c| c.conversation == "crowd")
        .expect("crowd");
    assert_eq!(crowd.unread, 1);

    // A removed member is never answered from the gateway's membership cache: bob's checks
    // in the crowd are answered from memory (his hub keeps them true); once his gateway has
    // delivered his removal to him, History refuses him.
    bob.history("crowd", 0, 10).await.expect("a member reads");
    bob.history("crowd", 0, 10)
        .await
        .expect("again, from the cache");
    acme.remove_member("crowd", "bob")
        .await
        .expect("remove bob");
    loop {
        match tokio::time::timeout_at(deadline, bob.next_push()).await {
            Ok(Some(Push::Event(e)))
                if e.conversation == "crowd"
                    && matches!(&e.body, Some(Body::MemberLeft(l)) if l.user == "bob") =>
            {
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("no removal: {other:?}"),
        }
    }
    match bob.history("crowd", 0, 10).await {
        Err(ClientError::Server {
            code: ErrorCode::NotMember,
            ..
        }) => {}
        other => panic!("a removed member read the crowd: {other:?}"),
    }

    // The client's versioned member cache: loaded once, then only the changes since its
    // version; the @-list searched from memory and on the server by prefix.
    let mut crowd = MemberCache::load(&acme, "crowd").await.expect("load");
    assert_eq!(
        (crowd.len(), crowd.version()),
        (2, 3),
        "alice and carol, after bob left"
    );
    acme.add_member("crowd", "dave").await.expect("add dave");
    assert_eq!(crowd.refresh(&acme).await.expect("refresh"), 1);
    assert_eq!(crowd.version(), 4);
    assert!(crowd.contains("dave") && !crowd.contains("bob"));
    let found: Vec<_> = crowd
        .search("ca", 10)
        .iter()
        .map(|m| m.user.clone())
        .collect();
    assert_eq!(found, ["carol"]);
    let page = acme
        .member_page(tidings_client::client::ListMembers {
            conversation: "crowd".into(),
            prefix: "da".into(),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("prefix search");
    assert_eq!((page.members.len(), page.version), (1, 4));
    assert_eq!(page.members[0].user, "dave");
}
