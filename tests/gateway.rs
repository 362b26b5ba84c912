//! End to end through the gateway: real nats-server (started here, on a free port), real
//! `tidings serve` processes, real WebSockets, the client library.

use std::time::Duration;

use crate::common;
use crate::common::{Nats, Sandbox, Server, closed};
use tidings_client::client::{CloseReason, ErrorCode};
use tidings_client::{ClientError, Connection, Push};
use tidings_schemas::v1::{ConversationKind, Event};

const WAIT: Duration = Duration::from_secs(20);

fn setup() -> (Sandbox, Nats) {
    let s = Sandbox::new();
    (s, Nats::start())
}

async fn connect(server: &Server, s: &Sandbox, tenant: &str, user: &str) -> Connection {
    let token = s.token(tenant, user, 3600);
    let (conn, welcome) = Connection::open(&server.url(), &token, "test")
        .await
        .expect("connect and hello");
    assert_eq!(
        (welcome.tenant.as_str(), welcome.user.as_str()),
        (tenant, user)
    );
    conn
}

/// Takes pushes until `n` events of `conv` have arrived; fails after WAIT.
async fn events(conn: &mut Connection, conv: &str, n: usize) -> Vec<Event> {
    events_within(conn, conv, n, WAIT).await
}

/// [`events`], failing after `within`.
async fn events_within(
    conn: &mut Connection,
    conv: &str,
    n: usize,
    within: Duration,
) -> Vec<Event> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, conn.next_push()).await {
            Ok(Some(Push::Event(e))) if e.conversation == conv => got.push(e),
            Ok(Some(Push::Event(_) | Push::ReadCursor(_) | Push::Typing(_))) => {}
            Ok(other) => panic!(
                "expected events of {conv}, got {other:?} after {}",
                got.len()
            ),
            Err(_) => panic!(
                "only {} of {n} events of {conv} arrived in time: {:?}",
                got.len(),
                got.iter().map(|e| e.seq).collect::<Vec<_>>()
            ),
        }
    }
    got
}

/// No event arrives within `within`.
async fn quiet(conn: &mut Connection, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, conn.next_push()).await {
            Err(_) => return,
            Ok(Some(Push::Event(e))) => panic!("unexpected event {} of {}", e.seq, e.conversation),
            Ok(Some(_)) => {}
            Ok(None) => return,
        }
    }
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

fn text(e: &Event) -> &str {
    match &e.body {
        Some(tidings_schemas::v1::event::Body::MessagePosted(p)) => &p.text,
        _ => "",
    }
}

fn server_code(err: ClientError) -> ErrorCode {
    match err {
        ClientError::Server { code, .. } => code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_chat_delivers_every_message_once_in_order_to_both_sides() {
    let (s, nats) = setup();
    s.ok(&[
        "conv",
        "create",
        "--tenant",
        "acme",
        "--conv",
        "dm",
        "--kind",
        "direct",
        "--by",
        "alice",
        "--members",
        "bob",
    ]);
    let server = Server::start(&s, &nats, "all", &[]);
    let mut alice = connect(&server, &s, "acme", "alice").await;
    let mut bob = connect(&server, &s, "acme", "bob").await;
    for i in 0..20 {
        let a = alice
            .send_text("dm", &format!("a{i}"), &format!("from alice {i}"))
            .await
            .expect("send");
        let b = bob
            .send_text("dm", &format!("b{i}"), &format!("from bob {i}"))
            .await
            .expect("send");
        assert_eq!((a.seq, b.seq), (2 + 2 * i, 3 + 2 * i));
    }
    for conn in [&mut alice, &mut bob] {
        let got = events(conn, "dm", 40).await;
        assert_eq!(seqs(&got), (2..=41).collect::<Vec<_>>());
        assert_eq!(text(&got[0]), "from alice 0");
        assert_eq!(text(&got[39]), "from bob 19");
        quiet(conn, Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_reaches_every_device_and_read_cursors_follow_the_user() {
    let (s, nats) = setup();
    s.ok(&[
        "conv",
        "create",
        "--tenant",
        "acme",
        "--conv",
        "team",
        "--kind",
        "group",
        "--by",
        "alice",
        "--members",
        "bob,carol",
    ]);
    let server = Server::start(&s, &nats, "all", &[]);
    let mut alice_phone = connect(&server, &s, "acme", "alice").await;
    let mut alice_laptop = connect(&server, &s, "acme", "alice").await;
    let mut bob = connect(&server, &s, "acme", "bob").await;
    let mut carol = connect(&server, &s, "acme", "carol").await;
    let ack = bob
        .send_text("team", "hello-1", "hello team")
        .await
        .expect("send");
    assert_eq!(ack.seq, 2);
    for conn in [&mut alice_phone, &mut alice_laptop, &mut bob, &mut carol] {
        let got = events(conn, "team", 1).await;
        assert_eq!(
            (got[0].seq, text(&got[0]), got[0].sender.as_str()),
            (2, "hello team", "bob")
        );
    }
    // Reading on the phone moves the cursor on the laptop too.
    assert_eq!(alice_phone.mark_read("team", 2).await.expect("mark"), 2);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, alice_laptop.next_push()).await {
            Ok(Some(Push::ReadCursor(c))) => {
                assert_eq!((c.conversation.as_str(), c.read_seq), ("team", 2));
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("no read cursor on the other device: {other:?}"),
        }
    }
    let list = carol.list_conversations().await.expect("list");
    assert_eq!(
        (list[0].head_seq, list[0].read_seq, list[0].unread),
        (2, 1, 1)
    );
    // Typing reaches the others, not the typist.
    carol.typing("team").await.expect("typing");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, bob.next_push()).await {
            Ok(Some(Push::Typing(t))) => {
                assert_eq!(
                    (t.conversation.as_str(), t.user.as_str()),
                    ("team", "carol")
                );
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("no typing notice: {other:?}"),
        }
    }
    // A member added while online gets the next message without reconnecting.
    let mut dave = connect(&server, &s, "acme", "dave").await;
    alice_phone
        .add_member("team", "dave")
        .await
        .expect("add dave");
    bob.send_text("team", "hello-2", "welcome dave")
        .await
        .expect("send");
    let got = events(&mut dave, "team", 2).await;
    assert_eq!(seqs(&got), vec![3, 4]);
    assert_eq!(text(&got[1]), "welcome dave");
    // Members page in user order.
    let members = dave.list_members("team", "", 2).await.expect("members");
    let names: Vec<_> = members.iter().map(|m| m.user.as_str()).collect();
    assert_eq!(names, ["alice", "bob"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_after_missing_50_messages_syncs_exactly_those_and_history_pages_back() {
    let (s, nats) = setup();
    s.group("general");
    let server = Server::start(&s, &nats, "all", &[]);
    let alice = connect(&server, &s, "acme", "alice").await;
    let bob = connect(&server, &s, "acme", "bob").await;
    bob.send_text("general", "before", "before the gap")
        .await
        .expect("send");
    drop(bob);
    for i in 0..50 {
        alice
            .send_text("general", &format!("m{i}"), &format!("missed {i}"))
            .await
            .expect("send");
    }
    let bob = connect(&server, &s, "acme", "bob").await;
    let sync = bob
        .sync(&[("general".to_string(), 2)], 0)
        .await
        .expect("sync");
    let state = sync
        .conversations
        .iter()
        .find(|c| c.conversation == "general")
        .expect("general");
    assert_eq!(state.head_seq, 52);
    assert!(!state.truncated);
    assert_eq!(seqs(&state.events), (3..=52).collect::<Vec<_>>());
    assert_eq!(text(&state.events[0]), "missed 0");
    // Asking for fewer than are missing gives the newest, marked truncated.
    let sync = bob
        .sync(&[("general".to_string(), 2)], 10)
        .await
        .expect("sync");
    assert!(sync.conversations[0].truncated);
    assert_eq!(
        seqs(&sync.conversations[0].events),
        (43..=52).collect::<Vec<_>>()
    );
    // Older history page by page, ascending within a page.
    let page = bob.history("general", 43, 20).await.expect("history");
    assert_eq!(seqs(&page.events), (23..=42).collect::<Vec<_>>());
    let page = bob.history("general", 3, 20).await.expect("history");
    assert_eq!(seqs(&page.events), vec![1, 2]);
    // Pull fills an exact gap.
    let pulled = bob.pull("general", 10, 12).await.expect("pull");
    assert_eq!(seqs(&pulled.events), vec![10, 11, 12]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_duplicated_or_reordered_nats_messages_reach_clients_once_in_order() {
    let (s, nats) = setup();
    s.group("general");
    let server = Server::start(&s, &nats, "all", &[]);
    let alice = connect(&server, &s, "acme", "alice").await;
    let mut bob = connect(&server, &s, "acme", "bob").await;
    let first = alice
        .send_text("general", "same-id", "once")
        .await
        .expect("send");
    let retry = alice
        .send_text("general", "same-id", "once")
        .await
        .expect("retry");
    assert_eq!(
        (retry.seq, &retry.event_id, retry.duplicate),
        (first.seq, &first.event_id, true)
    );
    for i in 0..3 {
        alice
            .send_text("general", &format!("m{i}"), "x")
            .await
            .expect("send");
    }
    let got = events(&mut bob, "general", 4).await;
    assert_eq!(seqs(&got), vec![2, 3, 4, 5]);
    // Replay those events into NATS again, out of order, as a misbehaving network might.
    let nc = async_nats::connect(nats.url()).await.expect("nats");
    for e in got.iter().rev() {
        use prost::Message;
        nc.publish("tidings.ev.acme.general", e.encode_to_vec().into())
            .await
            .expect("publish");
    }
    nc.flush().await.expect("flush");
    quiet(&mut bob, Duration::from_millis(500)).await;
    alice
        .send_text("general", "after", "after the replay")
        .await
        .expect("send");
    let next = events(&mut bob, "general", 1).await;
    assert_eq!(seqs(&next), vec![6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_and_non_members_can_neither_read_nor_write() {
    let (s, nats) = setup();
    s.group("general");
    let server = Server::start(&s, &nats, "all", &[]);
    let alice = connect(&server, &s, "acme", "alice").await;
    let mut mallory = connect(&server, &s, "acme", "mallory").await;
    let mut other_tenant = connect(&server, &s, "globex", "alice").await;
    // Same conversation name, other tenant: it does not exist there.
    let err = other_tenant
        .send_text("general", "x", "hi")
        .await
        .expect_err("globex");
    assert_eq!(server_code(err), ErrorCode::NotFound);
    assert!(
        other_tenant
            .sync(&[], 0)
            .await
            .expect("sync")
            .conversations
            .is_empty()
    );
    // A non-member of the tenant's conversation.
    assert_eq!(
        server_code(
            mallory
                .send_text("general", "x", "hi")
                .await
                .expect_err("send")
        ),
        ErrorCode::NotMember
    );
    assert_eq!(
        server_code(
            mallory
                .history("general", 0, 10)
                .await
                .expect_err("history")
        ),
        ErrorCode::NotMember
    );
    assert_eq!(
        server_code(mallory.pull("general", 1, 1).await.expect_err("pull")),
        ErrorCode::NotMember
    );
    assert_eq!(
        server_code(mallory.typing("general").await.expect_err("typing")),
        ErrorCode::NotMember
    );
    assert_eq!(
        server_code(
            mallory
                .list_members("general", "", 10)
                .await
                .expect_err("members")
        ),
        ErrorCode::NotMember
    );
    assert_eq!(
        server_code(mallory.mark_read("general", 1).await.expect_err("mark")),
        ErrorCode::NotMember
    );
    assert_eq!(
        server_code(
            mallory
                .add_member("general", "mallory")
                .await
                .expect_err("add")
        ),
        ErrorCode::NotMember
    );
    alice
        .send_text("general", "secret", "members only")
        .await
        .expect("send");
    quiet(&mut mallory, Duration::from_millis(500)).await;
    quiet(&mut other_tenant, Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors_or_reasoned_closes_and_others_keep_working() {
    use tokio_tungstenite::tungstenite::Message;
    let (s, nats) = setup();
    s.group("general");
    let server = Server::start(
        &s,
        &nats,
        "all",
        &[
            ("TIDINGS_GATEWAY_MAX_FRAME_BYTES", "4096"),
            ("TIDINGS_GATEWAY_FRAMES_PER_SECOND", "20"),
            ("TIDINGS_GATEWAY_FRAME_BURST", "20"),
        ],
    );
    let alice = connect(&server, &s, "acme", "alice").await;
    let mut bob = connect(&server, &s, "acme", "bob").await;

    // Garbage, text frames, frames without an operation: typed errors, session goes on.
    bob.send_raw(Message::Binary(vec![0xff, 0x13, 0x37, 0x00, 0xde].into()))
        .await
        .expect("raw");
    bob.send_raw(Message::Text("hello?".into()))
        .await
        .expect("raw");
    bob.send_raw(Message::Binary(vec![0x08, 0x07].into()))
        .await
        .expect("raw"); // request_id 7, no op
    let mut codes = Vec::new();
    while codes.len() < 2 {
        match tokio::time::timeout(WAIT, bob.next_push()).await {
            Ok(Some(Push::Error(e))) => codes.push(ErrorCode::try_from(e.code).expect("code")),
            other => panic!("expected error pushes, got {other:?}"),
        }
    }
    assert_eq!(codes, [ErrorCode::BadFrame, ErrorCode::BadFrame]);
    // The frame with request_id 7 gets its error as a reply; nobody waits for it, so the
    // client library passes it on as a push.
    match tokio::time::timeout(WAIT, bob.next_push()).await {
        Ok(Some(Push::Error(e))) => {
            assert_eq!(ErrorCode::try_from(e.code), Ok(ErrorCode::UnknownOp))
        }
        other => panic!("expected UNKNOWN_OP, got {other:?}"),
    }
    // Invalid ids.
    assert_eq!(
        server_code(
            bob.send_text("no/slashes", "x", "hi")
                .await
                .expect_err("id")
        ),
        ErrorCode::InvalidId
    );
    assert_eq!(
        server_code(bob.send_text("general", "", "hi").await.expect_err("id")),
        ErrorCode::InvalidId
    );
    assert_eq!(
        server_code(
            bob.send_text("general", &"x".repeat(65), "hi")
                .await
                .expect_err("id")
        ),
        ErrorCode::InvalidId
    );
    bob.ping().await.expect("still serving bob");

    // Operations before Hello: closed with 4003.
    let mut early = Connection::connect(&server.url()).await.expect("connect");
    let r = early.requester();
    let _ = tokio::time::timeout(WAIT, r.ping()).await;
    assert_eq!(
        closed(&mut early).await,
        (Some(CloseReason::ProtocolViolation), Some(4003))
    );

    // Bad tokens: closed with 4001; expired ones say so.
    for token in [
        "not-a-jwt".to_string(),
        format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(
                r#"{"sub":"bob","tenant":"acme","exp":9999999999,"iss":"tidings","aud":"tidings"}"#
            )
        ),
        s.token("acme", "bob", 3600).replace('.', ".x"),
    ] {
        let mut conn = Connection::connect(&server.url()).await.expect("connect");
        let err = conn.hello(&token, "t").await.expect_err("bad token");
        assert_eq!(server_code(err), ErrorCode::AuthFailed);
        assert_eq!(
            closed(&mut conn).await,
            (Some(CloseReason::AuthFailed), Some(4001))
        );
    }

    // An oversized frame: close 1009.
    let mut big = connect(&server, &s, "acme", "bob").await;
    big.send_raw(Message::Binary(vec![0u8; 8192].into()))
        .await
        .expect("raw");
    assert_eq!(closed(&mut big).await.1, Some(1009));

    // A flood: RATE_LIMITED, then closed with 4029.
    let mut flood = connect(&server, &s, "acme", "bob").await;
    let fr = flood.requester();
    tokio::spawn(async move {
        for _ in 0..500 {
            if fr
                .send_raw(Message::Binary(ping_frame().into()))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut limited = false;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let code = loop {
        match tokio::time::timeout_at(deadline, flood.next_push()).await {
            Ok(Some(Push::Error(e))) if e.code == ErrorCode::RateLimited as i32 => {
                assert!(e.retry_after_ms > 0);
                limited = true;
            }
            Ok(Some(Push::Closed { code, .. })) => break code,
            Ok(Some(other)) => seen.push(format!("{other:?}")),
            other => panic!("flood: {other:?}"),
        }
    };
    assert!(
        limited,
        "no RATE_LIMITED before the close (code {code:?}); saw {seen:?}"
    );
    assert_eq!(code, Some(4029));

    // Through all of it, the others were served.
    let ack = alice
        .send_text("general", "still-here", "still here")
        .await
        .expect("send");
    let got = events(&mut bob, "general", 1).await;
    assert_eq!(got[0].seq, ack.seq);
}

fn b64(s: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn ping_frame() -> Vec<u8> {
    use prost::Message;
    tidings_client::client::ClientFrame {
        request_id: 0,
        op: Some(tidings_client::client::client_frame::Op::Ping(
            tidings_client::client::Ping {},
        )),
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_ends_the_session() {
    let (s, nats) = setup();
    s.group("general");
    let server = Server::start(&s, &nats, "all", &[]);
    let token = s.token("acme", "bob", 2);
    let (mut conn, welcome) = Connection::open(&server.url(), &token, "t")
        .await
        .expect("open");
    assert!(welcome.expires_at > 0);
    assert_eq!(
        closed(&mut conn).await,
        (Some(CloseReason::TokenExpired), Some(4002))
    );
    // An expiry centuries away is refused: no token outlives auth.max_token_lifetime_secs.
    let forever = s.token("acme", "bob", i64::MAX);
    let mut conn = Connection::connect(&server.url()).await.expect("connect");
    let err = conn.hello(&forever, "t").await.expect_err("too long");
    assert_eq!(server_code(err), ErrorCode::AuthFailed);
    assert_eq!(
        closed(&mut conn).await,
        (Some(CloseReason::AuthFailed), Some(4001))
    );
    // A token expired past the verifier's leeway is refused at Hello, and says why.
    let expired = s.token("acme", "bob", -3600);
    let mut conn = Connection::connect(&server.url()).await.expect("connect");
    let err = conn.hello(&expired, "t").await.expect_err("expired");
    assert_eq!(server_code(err), ErrorCode::TokenExpired);
    assert_eq!(
        closed(&mut conn).await,
        (Some(CloseReason::AuthFailed), Some(4001))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_off_and_nobody_else_notices() {
    use futures_util::SinkExt;
    use prost::Message as _;
    let (s, nats) = setup();
    s.group("general");
    let server = Server::start(
        &s,
        &nats,
        "all",
        &[
            ("TIDINGS_GATEWAY_OUTBOUND_QUEUE", "64"),
            ("TIDINGS_GATEWAY_FRAMES_PER_SECOND", "100000"),
            ("TIDINGS_GATEWAY_FRAME_BURST", "100000"),
        ],
    );
    let alice = connect(&server, &s, "acme", "alice").await;
    let mut fast = connect(&server, &s, "acme", "bob").await;
    // The slow client: a raw WebSocket that says Hello and then reads nothing at all.
    let (mut slow, _) = tokio_tungstenite::connect_async(server.url())
        .await
        .expect("connect");
    let hello = tidings_client::client::ClientFrame {
        request_id: 1,
        op: Some(tidings_client::client::client_frame::Op::Hello(
            tidings_client::client::Hello {
                token: s.token("acme", "bob", 3600),
                device: "slow".into(),
            },
        )),
    };
    slow.send(tokio_tungstenite::tungstenite::Message::Binary(
        hello.encode_to_vec().into(),
    ))
    .await
    .expect("hello");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 1000 x 16 KiB: far more than the slow client's queue and socket buffers hold.
    let text = "z".repeat(16 * 1024);
    let sender = tokio::spawn(async move {
        for i in 0..1000 {
            alice
                .send_text("general", &format!("big{i}"), &text)
                .await
                .expect("send");
        }
    });
    // 16 MiB through a debug build: 8 s on an idle machine, past WAIT when the tests beside
    // this one keep both cores busy (a CI run failed so, beside the crash test). The
    // deadline only stops a hang; what is claimed is that every event arrives, in order.
    let got = events_within(&mut fast, "general", 1000, Duration::from_secs(120)).await;
    assert_eq!(seqs(&got), (2..=1001).collect::<Vec<_>>());
    sender.await.expect("sender");
    // The slow client reads at last: what was in flight, then why it was cut off.
    let mut goodbye = None;
    let mut code = None;
    while let Ok(Some(msg)) =
        tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut slow)).await
    {
        match msg {
            Ok(tokio_tungstenite::tungstenite::Message::Binary(b)) => {
                if let Ok(f) = tidings_client::client::ServerFrame::decode(b.as_ref())
                    && let Some(tidings_client::client::server_frame::Msg::Goodbye(g)) = f.msg
                {
                    goodbye = CloseReason::try_from(g.reason).ok();
                }
            }
            Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f))) => {
                code = Some(u16::from(f.code))
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert_eq!(
        (goodbye, code),
        (Some(CloseReason::SlowConsumer), Some(4008))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_mid_conversation_loses_nothing() {
    let (s, mut nats) = setup();
    s.group("general");
    // A tiny publish backlog makes the outage drop events on the NATS side, so delivery
    // after the restart has real gaps to heal from the log.
    let server = Server::start(&s, &nats, "all", &[("TIDINGS_NATS_PUBLISH_BACKLOG", "3")]);
    let alice = connect(&server, &s, "acme", "alice").await;
    let mut bob = connect(&server, &s, "acme", "bob").await;
    alice
        .send_text("general", "before", "before")
        .await
        .expect("send");
    assert_eq!(seqs(&events(&mut bob, "general", 1).await), vec![2]);

    nats.kill();
    // Sends still commit and ack: the log is the source of truth, not NATS.
    for i in 0..10 {
        let ack = alice
            .send_text(
                "general",
                &format!("down{i}"),
                &format!("during outage {i}"),
            )
            .await
            .expect("send while NATS is down");
        assert_eq!(ack.seq, 3 + i);
    }
    nats.restart();
    let got = events(&mut bob, "general", 10).await;
    assert_eq!(seqs(&got), (3..=12).collect::<Vec<_>>());
    assert_eq!(text(&got[9]), "during outage 9");
    alice
        .send_text("general", "after", "after")
        .await
        .expect("send");
    assert_eq!(seqs(&events(&mut bob, "general", 1).await), vec![13]);
    quiet(&mut bob, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_and_log_in_separate_processes() {
    let (s, nats) = setup();
    s.group("general");
    let _log = Server::start(&s, &nats, "log", &[]);
    let gateway_a = Server::start(&s, &nats, "gateway", &[]);
    let gateway_b = Server::start(&s, &nats, "gateway", &[]);
    let mut alice = connect(&gateway_a, &s, "acme", "alice").await;
    let mut bob = connect(&gateway_b, &s, "acme", "bob").await;
    for i in 0..5 {
        alice
            .send_text("general", &format!("a{i}"), "from gateway a")
            .await
            .expect("send");
        bob.send_text("general", &format!("b{i}"), "from gateway b")
            .await
            .expect("send");
    }
    for conn in [&mut alice, &mut bob] {
        assert_eq!(
            seqs(&events(conn, "general", 10).await),
            (2..=11).collect::<Vec<_>>()
        );
    }
    let err = bob
        .send_text("nowhere", "x", "hi")
        .await
        .expect_err("remote error");
    assert_eq!(server_code(err), ErrorCode::NotFound);
    let sync = bob.sync(&[("general".into(), 9)], 0).await.expect("sync");
    assert_eq!(seqs(&sync.conversations[0].events), vec![10, 11]);
    alice
        .create_conversation("new-dm", ConversationKind::Direct, "", &["bob"])
        .await
        .expect("create");
    alice
        .send_text("new-dm", "d1", "hi bob")
        .await
        .expect("send");
    // Bob, on the other gateway, was added by the creation and gets it without reconnecting.
    let got = events(&mut bob, "new-dm", 2).await;
    assert_eq!(seqs(&got), vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_says_goodbye_to_every_session_and_exits_cleanly() {
    let (s, nats) = setup();
    s.group("general");
    let mut server = Server::start(&s, &nats, "all", &[]);
    let mut alice = connect(&server, &s, "acme", "alice").await;
    let mut bob = connect(&server, &s, "acme", "bob").await;
    alice
        .send_text("general", "m1", "before shutdown")
        .await
        .expect("send");
    assert_eq!(seqs(&events(&mut bob, "general", 1).await), vec![2]);
    let stopper = std::thread::spawn(move || server.terminate());
    for conn in [&mut alice, &mut bob] {
        assert_eq!(
            closed(conn).await,
            (Some(CloseReason::ShuttingDown), Some(4050))
        );
    }
    assert!(
        stopper.join().expect("stopper"),
        "tidings serve exits with success on SIGTERM"
    );
    // Everything acked is still there.
    assert_eq!(s.read_all("general").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_ed25519_tokens_are_accepted_and_hs256_is_then_refused() {
    let (s, nats) = setup();
    s.group("general");
    let seed = [7u8; 32];
    let public = tidings_log::crypto::hex_encode(&tidings_auth::ed25519_public_key(&seed));
    // Production setup: no development secret, one Ed25519 key with a key id.
    std::fs::write(
        s.path().join("tidings.toml"),
        format!("[auth]\nhs256_secret_file = \"absent.secret\"\ned25519_public_keys = [\"k1:{public}\"]\n"),
    )
    .expect("config");
    let server = Server::start(&s, &nats, "all", &[("TIDINGS_AUTH_HS256_ENABLED", "0")]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = tidings_auth::Claims {
        tenant: "acme".into(),
        user: "bob".into(),
        roles: vec!["member".into()],
        expires_at: now + 600,
        issued_at: now,
        jti: None,
    };
    let eddsa = tidings_auth::issue_ed25519(&seed, Some("k1"), "tidings", "tidings", &claims);
    let (conn, welcome) = Connection::open(&server.url(), &eddsa, "prod")
        .await
        .expect("EdDSA token");
    assert_eq!(welcome.user, "bob");
    conn.ping().await.expect("serving");
    // The development token (HS256) is not accepted by this server.
    let mut dev = Connection::connect(&server.url()).await.expect("connect");
    let err = dev
        .hello(&s.token("acme", "bob", 600), "dev")
        .await
        .expect_err("HS256 refused");
    assert_eq!(server_code(err), ErrorCode::AuthFailed);
    assert_eq!(
        closed(&mut dev).await,
        (Some(CloseReason::AuthFailed), Some(4001))
    );
    // Nor is an EdDSA token from another key.
    let forged = tidings_auth::issue_ed25519(&[8u8; 32], Some("k1"), "tidings", "tidings", &claims);
    let other = Connection::connect(&server.url()).await.expect("connect");
    assert_eq!(
        server_code(other.hello(&forged, "x").await.expect_err("other key")),
        ErrorCode::AuthFailed
    );
}

/// History, Pull and Sync through the gateway return archived events exactly as hot ones:
/// the server's own archiver (every second, hot window 0s) moves the conversation to Parquet
/// while clients page through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pull_and_sync_span_the_archive() {
    let (s, nats) = setup();
    s.group("arch");
    let server = Server::start(
        &s,
        &nats,
        "all",
        &[
            ("TIDINGS_ARCHIVE_INTERVAL", "1s"),
            ("TIDINGS_ARCHIVE_HOT_WINDOW", "0s"),
        ],
    );
    let alice = connect(&server, &s, "acme", "alice").await;
    for i in 0..60 {
        alice
            .send_text("arch", &format!("a{i}"), &format!("archived {i}"))
            .await
            .expect("send");
    }
    // Wait for a segment to appear, and a pass after it so it is surely indexed.
    let archive = s.data_dir().join("archive");
    let deadline = std::time::Instant::now() + WAIT;
    while common::grep_dir_names(&archive, ".parquet").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no segment was written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let bob = connect(&server, &s, "acme", "bob").await;
    let latest = bob.history("arch", 0, 30).await.expect("history");
    assert_eq!(seqs(&latest.events), (32..=61).collect::<Vec<_>>());
    let older = bob.history("arch", 32, 30).await.expect("history");
    assert_eq!(seqs(&older.events), (2..=31).collect::<Vec<_>>());
    assert_eq!(text(&older.events[0]), "archived 0");
    let all = bob.pull("arch", 1, 61).await.expect("pull");
    assert_eq!(seqs(&all.events), (1..=61).collect::<Vec<_>>());
    // Newer messages (hot) and older ones (archived) in one page.
    for i in 60..65 {
        alice
            .send_text("arch", &format!("a{i}"), &format!("archived {i}"))
            .await
            .expect("send");
    }
    let page = bob.pull("arch", 55, 66).await.expect("pull");
    assert_eq!(seqs(&page.events), (55..=66).collect::<Vec<_>>());
    let sync = bob.sync(&[("arch".into(), 0)], 10).await.expect("sync");
    let conv = sync.conversations.first().expect("the conversation");
    assert_eq!(seqs(&conv.events), (57..=66).collect::<Vec<_>>());
    drop((alice, bob));
    let mut server = server;
    assert!(server.terminate());
    let segments = s.ok(&["archive", "inspect"]);
    let rows: u64 = segments
        .iter()
        .map(|x| x["rows"].as_u64().unwrap_or(0))
        .sum();
    assert!(rows >= 61, "the archive holds {rows} rows");
}

/// A log process that does not own a conversation's partition answers `not_owner` naming
/// the owner, and the gateway's client sends the request on to the owner by name. Here the
/// only member of the queue group owns nothing, so every append is refused first and must
/// be routed to land; none is lost or doubled. With the owner gone, the client gives up
/// after its bounded tries with the typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_reaching_a_writer_that_does_not_own_them_are_routed_to_the_owner() {
    use std::sync::Arc;
    use tidings_log::crypto::MasterKey;
    use tidings_log::store::{FjallStore, KvStore};
    use tidings_log::{
        Append, ClientMsgId, ConvId, CreateConversation, Log, LogConfig, ReadRange, TenantId,
        UserId,
    };
    use tidings_log_api::LogService;
    use tidings_log_api::rpc::NatsLogService;
    use tidings_log_role::rpc_server as rpc;

    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(dir.path()).expect("store"));
    let hex = MasterKey::generate().to_hex();
    let open = |writer: &str| {
        let (store, hex, writer) = (store.clone(), hex.clone(), writer.to_string());
        async move {
            let cfg = LogConfig {
                writer_id: writer,
                ..LogConfig::default()
            };
            Log::open(store, MasterKey::from_hex(&hex).expect("hex"), cfg)
                .await
                .expect("log")
        }
    };
    let owner = open("owner.example.com-1").await;
    let other = open("other-2").await;
    assert!(other.owned_partitions().is_empty());
    let (t, c) = (
        TenantId::new("acme").expect("id"),
        ConvId::new("general").expect("id"),
    );
    let alice = UserId::new("alice").expect("id");
    owner
        .create_conversation(CreateConversation {
            tenant: t.clone(),
            conv: c.clone(),
            kind: "group".into(),
            title: "General".into(),
            creator: alice.clone(),
            members: vec![],
        })
        .await
        .expect("create");

    let client = async_nats::connect(nats.url()).await.expect("nats");
    let auth = common::identity::rpc_auth();
    let serving_other = tokio::spawn(rpc::serve(client.clone(), other.clone(), auth.clone(), 64));
    let serving_owner = tokio::spawn(rpc::serve_by_name_only(
        client.clone(),
        owner.clone(),
        auth,
        64,
    ));
    let as_alice = common::identity::user("acme", "alice");
    tokio::time::sleep(Duration::from_millis(300)).await; // subscriptions in place
    let service = NatsLogService::new(
        client.clone(),
        Duration::from_secs(5),
        tidings_log_api::bus_crypto::LogPublicKey::of_secret(&owner.log_identity_secret()),
    );
    let append = |i: usize| {
        Append::text(
            t.clone(),
            c.clone(),
            alice.clone(),
            ClientMsgId::new(format!("m{i}")).expect("id"),
            format!("routed {i}"),
        )
    };
    for i in 0..20 {
        let acked = service
            .append(&as_alice, append(i))
            .await
            .expect("routed to the owner");
        assert_eq!(acked.seq, i as u64 + 2);
        assert!(!acked.duplicate);
    }
    let read = owner
        .read(&t, &c, ReadRange::forward(1, 100))
        .await
        .expect("read");
    let seqs: Vec<u64> = read.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=21).collect::<Vec<_>>());

    serving_owner.abort();
    let refused = service
        .append(&as_alice, append(99))
        .await
        .expect_err("no owner answers");
    assert!(
        matches!(refused.code(), "not_owner" | "unavailable"),
        "{refused}"
    );
    serving_other.abort();
}
