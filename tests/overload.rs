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

use crate::common::prom;
use crate::common::{self, Nats, Sandbox, Server};
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

/// `senders` tasks each sending `each` messages to `conv` at once, as fast as answered:
/// what was acked (seq → client_msg_id) and how many were refused RATE_LIMITED.
fn flood(
    r: &Requester,
    conv: &'static str,
    senders: usize,
    each: usize,
) -> tokio::task::JoinHandle<(BTreeMap<u64, String>, usize)> {
    let mut tasks = tokio::task::JoinSet::new();
    for sender in 0..senders {
        let r = r.clone();
        tasks.spawn(async move {
            let (mut acked, mut limited) = (Vec::new(), 0);
            for i in 0..each {
                let id = format!("{conv}-{sender}-{i}");
                match send_once(&r, conv, &id).await.expect("flood send") {
                    Some(seq) => acked.push((seq, id)),
                    None => limited += 1,
                }
            }
            (acked, limited)
        });
    }
    tokio::spawn(async move {
        let (mut acked, mut limited) = (BTreeMap::new(), 0);
        while let Some(done) = tasks.join_next().await {
            let (a, l) = done.expect("flood task");
            acked.extend(a);
            limited += l;
        }
        (acked, limited)
    })
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

/// A server with the overload settings `env` (floor 3) and alice of acme connected.
async fn start(env: &[(&str, &str)]) -> (Sandbox, Nats, Server, Connection) {
    let s = Sandbox::new();
    let nats = Nats::start();
    let mut env = env.to_vec();
    env.extend([
        ("TIDINGS_LOG_OVERLOAD_FLOOR_PER_SEC", "3"),
        // The session's own frame bucket is not what is under test.
        ("TIDINGS_GATEWAY_FRAMES_PER_SECOND", "100000"),
        ("TIDINGS_GATEWAY_FRAME_BURST", "100000"),
    ]);
    let server = Server::start(&s, &nats, "all", &env);
    let (acme, _) = Connection::open(&server.url(), &s.token("acme", "alice", 3600), "t")
        .await
        .expect("connect acme");
    (s, nats, server, acme)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hottest_conversations_are_limited_past_capacity_and_no_one_else() {
    let (s, _nats, server, acme) = start(&[
        ("TIDINGS_LOG_CAPACITY_PER_SEC", "20"),
        ("TIDINGS_LOG_VIP_TENANTS", "gold"),
        ("TIDINGS_GATEWAY_TYPING_MAX_MEMBERS", "2"),
    ])
    .await;
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
    let hot = flood(&acme, "hot", 8, 100);
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
    let (hot, hot_limited) = hot.await.expect("flood");
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

/// The fan-out budget (`log.overload_fanout_per_sec`): a send to a group of 100 members is
/// 100 pushes, so the group is limited by the pushes it causes while a two-member
/// conversation sending as often is not, and small conversations never are.
///
/// Why no claim depends on speed: the budget is 1,000 pushes a second and nothing else is
/// configured. The pair sends 150 messages in all (at most 300 pushes in any window), the
/// small conversations 2 each (200 pushes in all); with the group held to at least its
/// floor (3 × 100 pushes), what is left for it is 500 pushes, more than either ever asks,
/// so the water-fill can never cut them. The group's 400 sends are 40,000 pushes: past the
/// budget unless they took 40 seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_group_is_limited_by_its_fan_out_and_a_busy_pair_is_not() {
    const BIG: usize = 100;
    const PAIR_SENDS: usize = 150;
    const FEW: usize = 50;
    let (_s, _nats, server, acme) = start(&[("TIDINGS_LOG_OVERLOAD_FANOUT_PER_SEC", "1000")]).await;
    let acme = acme.requester();
    let members: Vec<String> = (1..BIG).map(|i| format!("m{i}")).collect();
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    acme.create_conversation("big", ConversationKind::Group, "big", &members)
        .await
        .expect("create big");
    acme.create_conversation("pair", ConversationKind::Group, "pair", &["bob"])
        .await
        .expect("create pair");
    for i in 0..FEW {
        let c = format!("few{i}");
        acme.create_conversation(&c, ConversationKind::Group, &c, &["bob"])
            .await
            .expect("create");
    }

    let big = flood(&acme, "big", 8, 50);
    let pair = {
        let r = acme.clone();
        tokio::spawn(async move {
            let mut acked = BTreeMap::new();
            for i in 0..PAIR_SENDS {
                let id = format!("pair-{i}");
                let seq = send_once(&r, "pair", &id).await.expect("pair send");
                acked.insert(
                    seq.unwrap_or_else(|| panic!("the pair was limited at {i}")),
                    id,
                );
            }
            acked
        })
    };
    let few = {
        let r = acme.clone();
        tokio::spawn(async move {
            let mut acked: BTreeMap<String, BTreeMap<u64, String>> = BTreeMap::new();
            for round in 0..2 {
                for i in 0..FEW {
                    let conv = format!("few{i}");
                    let id = format!("{conv}-{round}");
                    let seq = send_once(&r, &conv, &id).await.expect("small send");
                    let seq = seq.unwrap_or_else(|| panic!("{conv} was limited"));
                    acked.entry(conv).or_default().insert(seq, id);
                }
            }
            acked
        })
    };
    let (big, big_limited) = big.await.expect("flood");
    let pair = pair.await.expect("pair task");
    let few = few.await.expect("few task");
    println!("big: {} acked, {big_limited} limited", big.len());
    assert!(big_limited > 0, "the big group is limited");
    assert_eq!(big.len() + big_limited, 400);
    assert_exactly(&acme, "big", &big).await;
    assert_eq!(pair.len(), PAIR_SENDS);
    assert_exactly(&acme, "pair", &pair).await;
    assert_eq!(few.len(), FEW);
    for (conv, acked) in &few {
        assert_eq!(acked.len(), 2, "{conv}");
        assert_exactly(&acme, conv, acked).await;
    }

    // What was limited and why is counted where an operator looks: the gateway answered
    // every refusal (some itself, shedding the group's sends until the window ended); every
    // one the log made was the fan-out budget's, of a standard tenant's conversation.
    let page = prom::scrape(&common::http_client(), server.admin_port).await;
    assert_eq!(
        page.value("tidings_gateway_rate_limited_total", &[("limit", "log")]),
        big_limited as f64
    );
    let by_log = page.value(
        "tidings_log_overload_limited_total",
        &[("tier", "standard")],
    );
    assert!(by_log >= 1.0 && by_log <= big_limited as f64, "{by_log}");
    assert_eq!(
        page.value("tidings_log_overload_limited_by_fanout_total", &[]),
        by_log
    );
    assert_eq!(
        page.value("tidings_log_overload_limited_total", &[("tier", "vip")]),
        0.0
    );
    assert_eq!(
        page.value("tidings_log_overload_admitted_total", &[]),
        (big.len() + PAIR_SENDS + 2 * FEW) as f64
    );
}

/// The seqs of `conv`'s messages pushed to `conn`, in the order they came, until the last
/// of `sent` (20 s at most).
async fn messages(conn: &mut Connection, conv: &str, sent: &[u64]) -> Vec<u64> {
    let last = *sent.last().expect("something sent");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut got = Vec::new();
    while got.last() != Some(&last) {
        match tokio::time::timeout_at(deadline, conn.next_push()).await {
            Ok(Some(Push::Event(e))) if e.conversation == conv => {
                if let Some(Body::MessagePosted(_)) = e.body {
                    got.push(e.seq);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the session ended after {got:?}"),
            Err(_) => panic!("{conv}: only {got:?} of {sent:?} arrived in time"),
        }
    }
    got
}

/// A big group's fan-out is paced (`gateway.fan_out_pushes_per_core`), a small
/// conversation's never is, and pacing loses and reorders nothing.
///
/// Why no claim depends on speed: the budget is 20 pushes a second per core with a burst
/// of a tenth of a second of it (2 pushes per core), and a group is big from 3 sessions
/// here. The pair (alice and bob, 2 sessions) is below that, so whatever its rate, it never
/// waits: the pacing counter stays exactly 0 through its 40 messages. The group's 20
/// messages are 60 pushes, past the burst on any machine of fewer than 30 cores, so at
/// least one of its slices must wait, however the sends fall in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_groups_fan_out_is_paced_and_a_small_conversations_is_not() {
    const PAIR: usize = 40;
    const GROUP: usize = 20;
    let (s, _nats, server, mut alice) = start(&[
        ("TIDINGS_GATEWAY_FAN_OUT_PUSHES_PER_CORE", "20"),
        ("TIDINGS_GATEWAY_FAN_OUT_PACED_SESSIONS", "3"),
    ])
    .await;
    let r = alice.requester();
    r.create_conversation("pair", ConversationKind::Group, "pair", &["bob"])
        .await
        .expect("create pair");
    r.create_conversation("big", ConversationKind::Group, "big", &["bob", "carol"])
        .await
        .expect("create big");
    let open = |user: &'static str| {
        let (url, token) = (server.url(), s.token("acme", user, 3600));
        async move {
            Connection::open(&url, &token, "t")
                .await
                .unwrap_or_else(|e| panic!("connect {user}: {e}"))
                .0
        }
    };
    let (mut bob, mut carol) = (open("bob").await, open("carol").await);
    let paced = || async {
        prom::scrape(&common::http_client(), server.admin_port)
            .await
            .value("tidings_gateway_fanout_paced_seconds_total", &[])
    };

    let mut sent = Vec::new();
    for i in 0..PAIR {
        let id = format!("pair-{i}");
        sent.push(r.send_text("pair", &id, &id).await.expect("pair send").seq);
    }
    assert_eq!(messages(&mut bob, "pair", &sent).await, sent);
    assert_eq!(paced().await, 0.0, "two sessions are never paced");

    let mut sent = Vec::new();
    for i in 0..GROUP {
        let id = format!("big-{i}");
        sent.push(r.send_text("big", &id, &id).await.expect("group send").seq);
    }
    for (who, conn) in [
        ("alice", &mut alice),
        ("bob", &mut bob),
        ("carol", &mut carol),
    ] {
        assert_eq!(
            messages(conn, "big", &sent).await,
            sent,
            "{who} gets every message of the group once, in order"
        );
    }
    assert!(
        paced().await > 0.0,
        "the group's fan-out waited for the budget"
    );
}
