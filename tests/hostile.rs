//! Hostile clients cannot exhaust the server (issue 11): real nats-server, real `tidings
//! serve`, real sockets. Memory under a reply flood, idle connections and a handshake flood,
//! the connection and session caps, the idle cutoff, Sync pagination with a failing
//! conversation, and typed, safe errors for bad input.

#![allow(clippy::disallowed_methods)] // tests wait on processes synchronously, off any runtime's workers

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common;
use crate::common::{Nats, Sandbox, Server};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tidings_client::client::{
    self as proto, ClientFrame, CloseReason, ErrorCode, client_frame::Op, server_frame::Msg,
};
use tidings_client::{ClientError, Connection, Push};
use tidings_schemas::v1::ConversationKind;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

type Raw = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A sandbox with group `conv` (alice, bob), a nats-server and `tidings serve` with `env`.
fn serve(conv: &str, env: &[(&str, &str)]) -> (Sandbox, Nats, Server) {
    let s = Sandbox::new();
    s.group(conv);
    let nats = Nats::start();
    let server = Server::start(&s, &nats, "all", env);
    (s, nats, server)
}

async fn connect(server: &Server, s: &Sandbox, user: &str) -> Connection {
    let token = s.token("acme", user, 3600);
    let (conn, _) = Connection::open(&server.url(), &token, "test")
        .await
        .expect("connect and hello");
    conn
}

/// A TCP connection to the gateway from the local address `ip` (any of 127.0.0.0/8).
async fn tcp_from(server: &Server, ip: &str) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{ip}:0").parse().expect("address"))?;
    socket
        .connect(
            format!("127.0.0.1:{}", server.port)
                .parse()
                .expect("address"),
        )
        .await
}

/// A raw WebSocket from `ip`; Err when the server refused it (closed before the handshake).
async fn raw_from(server: &Server, ip: &str) -> Result<Raw, String> {
    let stream = tcp_from(server, ip).await.map_err(|e| e.to_string())?;
    tokio_tungstenite::client_async(server.url(), stream)
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| e.to_string())
}

async fn send_op(ws: &mut Raw, request_id: u64, op: Op) {
    let frame = ClientFrame {
        request_id,
        op: Some(op),
    };
    ws.send(Message::Binary(frame.encode_to_vec().into()))
        .await
        .expect("send a frame");
}

fn hello(token: String) -> Op {
    Op::Hello(proto::Hello {
        token,
        device: "raw".into(),
    })
}

/// Everything a raw connection receives until it ends: the ServerFrames, the Goodbye's
/// reason and the close code.
struct Ending {
    frames: Vec<proto::ServerFrame>,
    goodbye: Option<CloseReason>,
    code: Option<u16>,
}

async fn read_to_end(ws: &mut Raw, within: Duration) -> Ending {
    let mut end = Ending {
        frames: Vec::new(),
        goodbye: None,
        code: None,
    };
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("the server did not close the connection in {within:?}"),
            Ok(None) | Ok(Some(Err(_))) => return end,
            Ok(Some(Ok(Message::Binary(b)))) => {
                let frame = proto::ServerFrame::decode(b.as_ref()).expect("a ServerFrame");
                if let Some(Msg::Goodbye(g)) = &frame.msg {
                    end.goodbye = CloseReason::try_from(g.reason).ok();
                }
                // Replies are dropped as they come: an attacker's can be megabytes.
                if !matches!(frame.msg, Some(Msg::Events(_))) {
                    end.frames.push(frame);
                }
            }
            Ok(Some(Ok(Message::Close(f)))) => {
                end.code = f.map(|f| u16::from(f.code));
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

fn server_error(err: ClientError) -> (ErrorCode, String) {
    match err {
        ClientError::Server { code, message, .. } => (code, message),
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// Sends one message and waits for it to reach `to`; returns how long that took.
async fn round_trip(from: &Connection, to: &mut Connection, conv: &str, id: &str) -> Duration {
    let start = Instant::now();
    let ack = from.send_text(conv, id, id).await.expect("send");
    loop {
        match tokio::time::timeout(WAIT, to.next_push()).await {
            Ok(Some(Push::Event(e))) if e.conversation == conv && e.seq == ack.seq => {
                return start.elapsed();
            }
            Ok(Some(Push::Event(_) | Push::ReadCursor(_) | Push::Typing(_))) => {}
            other => panic!("waiting for {id}: {other:?}"),
        }
    }
}

/// The attack: one user, 8 sessions asking for History pages of 60 KB messages and
/// never reading. The gateway's memory stays within 256 MiB of idle, every attacking
/// session is cut off with 4008, and the others are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_that_never_read_their_history_pages_are_cut_off_and_memory_stays_bounded() {
    let (s, _nats, server) = serve(
        "big",
        &[
            ("TIDINGS_GATEWAY_FRAMES_PER_SECOND", "100000"),
            ("TIDINGS_GATEWAY_FRAME_BURST", "100000"),
            // The attackers are bob's 8 sessions: a freed place shows one was cut off.
            ("TIDINGS_GATEWAY_MAX_SESSIONS_PER_USER", "8"),
        ],
    );
    let alice = connect(&server, &s, "alice").await;
    let text = "x".repeat(60_000);
    for chunk in 0..6 {
        let sends = (0..50).map(|i| {
            let id = format!("m{}", chunk * 50 + i);
            let (alice, text) = (&alice, &text);
            async move { alice.send_text("big", &id, text).await.expect("post") }
        });
        futures_util::future::join_all(sends).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = server.rss_bytes();

    let peak = Arc::new(AtomicU64::new(idle));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop, pid) = (peak.clone(), stop.clone(), server.pid());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    && let Some(kb) = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    peak.fetch_max(kb * 1024, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut attackers = Vec::new();
    for _ in 0..8 {
        // A small receive buffer, as an attacker would set: without it loopback autotunes
        // tens of MB of kernel buffer per socket, which only delays the cutoff.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
        let stream = socket
            .connect(
                format!("127.0.0.1:{}", server.port)
                    .parse()
                    .expect("address"),
            )
            .await
            .expect("connect");
        let (mut ws, _) = tokio_tungstenite::client_async(server.url(), stream)
            .await
            .expect("handshake");
        send_op(&mut ws, 1, hello(s.token("acme", "bob", 3600))).await;
        attackers.push(ws);
    }
    // 300 pages each of up to 1,000 60 KB messages, none read: ~150 MB asked per session.
    for ws in &mut attackers {
        for i in 0..300u64 {
            let op = Op::History(proto::History {
                conversation: "big".into(),
                before_seq: 0,
                limit: 1000,
            });
            let frame = ClientFrame {
                request_id: 2 + i,
                op: Some(op),
            };
            if ws
                .feed(Message::Binary(frame.encode_to_vec().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = ws.flush().await;
    }
    // Meanwhile the others are served. Not at full speed: the attack costs CPU (each page
    // is read and decrypted until the kernel's socket buffers and then the session's 4 MiB
    // fill), and this machine's 2 cores are shared; the bound asserted here is memory, and
    // that the session is served at all.
    let mut alice2 = connect(&server, &s, "alice").await;
    let took = round_trip(&alice, &mut alice2, "big", "during").await;
    eprintln!("a round trip during the attack took {took:?}");
    // Wait until every attacker is cut off, without reading them: each one cut off frees
    // a place under bob's cap of 8 sessions.
    let mut bobs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while bobs.len() < 8 {
        assert!(
            Instant::now() < deadline,
            "only {} of the 8 attackers were cut off",
            bobs.len()
        );
        match Connection::open(&server.url(), &s.token("acme", "bob", 3600), "t").await {
            Ok((conn, _)) => bobs.push(conn),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    // The attackers read at last: what was in flight, then why they were cut off (when
    // they read within the server's 20 s close grace; after it, only the reset).
    let endings = futures_util::future::join_all(
        attackers
            .iter_mut()
            .map(|ws| read_to_end(ws, Duration::from_secs(15))),
    )
    .await;
    let told = endings.iter().filter(|e| e.goodbye.is_some()).count();
    assert!(told > 0, "no attacker was told why");
    for end in &endings {
        if end.goodbye.is_some() {
            assert_eq!(
                (end.goodbye, end.code),
                (Some(CloseReason::SlowConsumer), Some(4008))
            );
        }
    }
    let grew = peak.load(Ordering::Relaxed).saturating_sub(idle);
    assert!(
        grew < 256 << 20,
        "rss grew by {} MiB over idle ({} MiB)",
        grew >> 20,
        idle >> 20
    );

    // A client that reads pages History back through every message, page by page: each
    // page cut at the reply budget says there is more.
    let mut before = 0;
    let mut seen = Vec::new();
    loop {
        let page = bobs[0].history("big", before, 1000).await.expect("history");
        assert!(page.events.len() < 1000, "a page of 60 KB messages is cut");
        let first = page.events.first().map_or(1, |e| e.seq);
        seen.extend(page.events.iter().rev().map(|e| e.seq));
        if !page.more {
            break;
        }
        before = first;
    }
    seen.reverse();
    assert_eq!(seen, (1..=302).collect::<Vec<_>>());
}

/// 10,000 TCP connections that send nothing, connections that stall in the handshake and a
/// stream of handshakes that go nowhere: an existing session still sends and receives in
/// its normal time, and the stalled connections are shed at the handshake deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_and_a_handshake_flood_leave_existing_sessions_working() {
    // 10,000 idle, 500 stalled, the flood's one at a time and the sessions.
    let _sockets = common::hold_sockets(10_600).await;
    let (s, _nats, server) = serve(
        "general",
        &[
            ("TIDINGS_GATEWAY_HANDSHAKE_TIMEOUT_MS", "1000"),
            ("TIDINGS_GATEWAY_MAX_CONNECTIONS", "30000"),
            ("TIDINGS_GATEWAY_MAX_CONNECTIONS_PER_IP", "30000"),
        ],
    );
    let alice = connect(&server, &s, "alice").await;
    let mut bob = connect(&server, &s, "bob").await;
    for i in 0..3 {
        round_trip(&alice, &mut bob, "general", &format!("before{i}")).await;
    }
    // What the server holds with its two sessions: the flood must come back to this.
    let baseline_sockets = server.open_sockets();

    let port = server.port;
    let mut idle = Vec::new();
    // Batches small enough for the listener's accept queue (1,024).
    for _ in 0..50 {
        let batch = (0..200).map(|_| tokio::net::TcpStream::connect(("127.0.0.1", port)));
        for stream in futures_util::future::join_all(batch).await {
            idle.push(stream.expect("an idle connection"));
        }
    }
    assert_eq!(idle.len(), 10_000);
    // Half a handshake, then silence.
    let mut stalled = Vec::new();
    for _ in 0..500 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        stream
            .write_all(b"GET /v1/ws HTTP/1.1\r\nHost: localhost\r\n")
            .await
            .expect("write");
        stalled.push(stream);
    }
    // Complete handshakes, dropped at once, while the session works.
    let url = server.url();
    let flood = tokio::spawn(async move {
        for _ in 0..300 {
            let _ = tokio_tungstenite::connect_async(url.as_str()).await;
        }
    });
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        slowest = slowest.max(round_trip(&alice, &mut bob, "general", &format!("during{i}")).await);
    }
    assert!(
        slowest < Duration::from_secs(2),
        "a round trip under the flood took {slowest:?}"
    );
    flood.await.expect("flood");

    // Past the handshake deadline, the server has closed the idle and the stalled ones:
    // counted by the server's own sockets, not by the client's sockets. (A connect that
    // found the kernel's accept queue full looks open to the client though the server never
    // had it; the old client-side count tripped on those under load.)
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut held = server.open_sockets();
    while held > baseline_sockets && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        held = server.open_sockets();
    }
    assert!(
        held <= baseline_sockets,
        "the server still holds {} sockets more than before the flood ({held} against {baseline_sockets})",
        held - baseline_sockets
    );
    drop((idle, stalled));
    round_trip(&alice, &mut bob, "general", "after").await;
}

/// The per-IP cap closes a connection before its handshake; another address is not
/// affected; the per-user cap refuses a Hello with NOT_ALLOWED and 4014; places come back
/// when connections go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_per_ip_and_per_user_refuse_with_their_codes_and_free_their_places() {
    let (s, _nats, server) = serve(
        "general",
        &[
            ("TIDINGS_GATEWAY_MAX_CONNECTIONS_PER_IP", "3"),
            ("TIDINGS_GATEWAY_MAX_SESSIONS_PER_USER", "2"),
        ],
    );
    let bob1 = connect(&server, &s, "bob").await;
    let bob2 = connect(&server, &s, "bob").await;
    // A third session of bob: refused at Hello, with the reason.
    let mut third = raw_from(&server, "127.0.0.1").await.expect("connect");
    send_op(&mut third, 1, hello(s.token("acme", "bob", 3600))).await;
    let end = read_to_end(&mut third, WAIT).await;
    let refusal = end
        .frames
        .iter()
        .find_map(|f| match &f.msg {
            Some(Msg::Error(e)) if f.request_id == 1 => Some(e.clone()),
            _ => None,
        })
        .expect("an error answers the Hello");
    assert_eq!(ErrorCode::try_from(refusal.code), Ok(ErrorCode::NotAllowed));
    assert!(refusal.message.contains("max 2"), "{}", refusal.message);
    assert_eq!(
        (end.goodbye, end.code),
        (Some(CloseReason::TooManySessions), Some(4014))
    );
    // Another user is not affected.
    let alice = connect(&server, &s, "alice").await;
    // 127.0.0.1 now holds 3 connections: a fourth is closed before its handshake.
    let refused = raw_from(&server, "127.0.0.1").await;
    assert!(refused.is_err(), "a fourth connection from one address");
    // Another address still gets in.
    let mut carol = raw_from(&server, "127.0.0.2")
        .await
        .expect("another address");
    send_op(&mut carol, 1, hello(s.token("acme", "carol", 3600))).await;
    match tokio::time::timeout(WAIT, carol.next()).await {
        Ok(Some(Ok(Message::Binary(b)))) => {
            let f = proto::ServerFrame::decode(b.as_ref()).expect("frame");
            assert!(matches!(f.msg, Some(Msg::Welcome(_))), "{f:?}");
        }
        other => panic!("carol: {other:?}"),
    }
    // Places come back when their connections go.
    drop(bob1);
    let deadline = Instant::now() + WAIT;
    let bob3 = loop {
        let token = s.token("acme", "bob", 3600);
        match Connection::open(&server.url(), &token, "t").await {
            Ok((conn, _)) => break conn,
            Err(e) => {
                assert!(Instant::now() < deadline, "no place came back: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    bob3.ping().await.expect("the freed place serves");
    bob2.ping().await.expect("bob2 untouched");
    alice.ping().await.expect("alice untouched");
}

/// The server pings; a client that answers (its library pongs while it reads) stays,
/// one that neither sends nor pongs is closed with 4012. One that never says Hello is closed
/// at the Hello deadline (4003), pings answered or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_session_is_cut_off_at_the_idle_timeout_and_a_ponging_one_stays() {
    let (s, _nats, server) = serve(
        "general",
        &[
            ("TIDINGS_GATEWAY_PING_INTERVAL_MS", "200"),
            ("TIDINGS_GATEWAY_IDLE_TIMEOUT_MS", "1000"),
            ("TIDINGS_GATEWAY_HELLO_TIMEOUT_MS", "1500"),
        ],
    );
    let mut quiet = connect(&server, &s, "alice").await;
    let mut silent = raw_from(&server, "127.0.0.1").await.expect("connect");
    send_op(&mut silent, 1, hello(s.token("acme", "bob", 3600))).await;
    // Anonymous, but reading (so its library pongs): the Hello deadline still holds.
    let mut anonymous = raw_from(&server, "127.0.0.1").await.expect("connect");
    let anonymous = tokio::spawn(async move {
        let started = Instant::now();
        let end = read_to_end(&mut anonymous, WAIT).await;
        (end.goodbye, end.code, started.elapsed())
    });
    let start = Instant::now();
    // The quiet client sends nothing for 3 idle timeouts; its library answers the pings.
    while start.elapsed() < Duration::from_secs(3) {
        match tokio::time::timeout(Duration::from_millis(100), quiet.next_push()).await {
            Ok(Some(Push::Goodbye(g))) => panic!("the quiet client was closed: {g:?}"),
            Ok(Some(Push::Closed { code, .. })) => panic!("the quiet client was closed: {code:?}"),
            Err(_) | Ok(_) => {}
        }
    }
    quiet
        .ping()
        .await
        .expect("the quiet client is still served");
    let end = read_to_end(&mut silent, WAIT).await;
    assert_eq!(
        (end.goodbye, end.code),
        (Some(CloseReason::IdleTimeout), Some(4012))
    );
    let (goodbye, code, after) = anonymous.await.expect("anonymous");
    assert_eq!(
        (goodbye, code),
        (Some(CloseReason::ProtocolViolation), Some(4003))
    );
    assert!(after < Duration::from_secs(3), "closed after {after:?}");
}

/// Sync comes in pages of at most `sync_page_conversations`, each with a cursor to go on;
/// the client library walks them. A conversation whose archived history is gone gets an
/// error entry of its own (with a trace id and no internal text); the rest of the Sync is
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_is_paginated_and_one_unreadable_conversation_does_not_fail_it() {
    let s = Sandbox::new();
    for c in ["c1", "c2", "c3", "c4", "c5"] {
        s.group(c);
    }
    let nats = Nats::start();
    let mut server = Server::start(
        &s,
        &nats,
        "all",
        &[
            ("TIDINGS_GATEWAY_SYNC_PAGE_CONVERSATIONS", "2"),
            ("TIDINGS_ARCHIVE_ENABLED", "false"),
        ],
    );
    let alice = connect(&server, &s, "alice").await;
    for c in ["c1", "c2", "c3", "c4", "c5"] {
        for i in 0..3 {
            alice
                .send_text(c, &format!("{c}-{i}"), "hi")
                .await
                .expect("send");
        }
    }
    let bob = connect(&server, &s, "bob").await;
    let mut cursors = Vec::new();
    let mut covered = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = bob.sync_page(&[], 2, &cursor, 0).await.expect("sync page");
        assert!(page.conversations.len() <= 2);
        for c in &page.conversations {
            assert!(c.error.is_none());
            assert_eq!(c.head_seq, 4);
            let seqs: Vec<u64> = c.events.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, vec![3, 4]);
            assert!(c.truncated);
            covered.push(c.conversation.clone());
        }
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
        cursors.push(cursor.clone());
    }
    assert_eq!(covered, ["c1", "c2", "c3", "c4", "c5"]);
    assert_eq!(cursors, ["c2", "c4"]);
    let all = bob.sync(&[("c2".into(), 4)], 10).await.expect("sync");
    assert_eq!(all.conversations.len(), 5);
    assert!(all.conversations[1].events.is_empty());
    // A bad cursor is the client's own mistake, and says so.
    let (code, _) = server_error(
        bob.sync_page(&[], 1, "no/such id", 0)
            .await
            .expect_err("bad cursor"),
    );
    assert_eq!(code, ErrorCode::InvalidId);
    drop((alice, bob));
    assert!(server.terminate());

    // Archive everything, then lose the archive's files: c3's history cannot be read.
    let server = Server::start(
        &s,
        &nats,
        "all",
        &[
            ("TIDINGS_GATEWAY_SYNC_PAGE_CONVERSATIONS", "2"),
            ("TIDINGS_ARCHIVE_INTERVAL", "1s"),
            ("TIDINGS_ARCHIVE_HOT_WINDOW", "0s"),
        ],
    );
    let archive = s.data_dir().join("archive");
    let deadline = Instant::now() + WAIT;
    while common::grep_dir_names(&archive, ".parquet").is_empty() {
        assert!(Instant::now() < deadline, "no segment was written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for file in common::grep_dir_names(&archive, ".parquet") {
        std::fs::remove_file(file).expect("remove a segment");
    }
    let bob = connect(&server, &s, "bob").await;
    let known: Vec<(String, u64)> = ["c1", "c2", "c4", "c5"]
        .iter()
        .map(|c| (c.to_string(), 4))
        .collect();
    let sync = bob
        .sync(&known, 10)
        .await
        .expect("the Sync as a whole succeeds");
    let names: Vec<&str> = sync
        .conversations
        .iter()
        .map(|c| c.conversation.as_str())
        .collect();
    assert_eq!(names, ["c1", "c2", "c3", "c4", "c5"]);
    for c in &sync.conversations {
        if c.conversation == "c3" {
            let e = c.error.as_ref().expect("c3 has an error entry");
            assert_eq!(ErrorCode::try_from(e.code), Ok(ErrorCode::Unavailable));
            assert!(!e.trace_id.is_empty(), "an operator can find the cause");
            let data_dir = s.data_dir().display().to_string();
            for leak in ["parquet", "archive", "acme", data_dir.as_str()] {
                assert!(!e.message.contains(leak), "{leak:?} in {:?}", e.message);
            }
            assert!(c.events.is_empty());
        } else {
            assert!(c.error.is_none(), "{c:?}");
            assert_eq!(c.head_seq, 4);
        }
    }
    // History on it: the same safe error, as a reply.
    let (code, message) = server_error(bob.history("c3", 0, 10).await.expect_err("history"));
    assert_eq!(code, ErrorCode::Unavailable);
    assert_eq!(message, "temporarily unavailable; try again later");
    bob.ping().await.expect("the session goes on");
}

/// Every bad input gets its typed error, with a message that names no internals, and
/// another session loses nothing: the member-list cap per request, the conversation
/// creation rate, non-members, bad ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_safe_errors_and_another_session_loses_nothing() {
    let (s, _nats, server) = serve(
        "general",
        &[
            ("TIDINGS_LOG_MAX_MEMBERS_PER_REQUEST", "5"),
            (
                "TIDINGS_LOG_MAX_CONVERSATIONS_CREATED_PER_USER_PER_HOUR",
                "3",
            ),
        ],
    );
    let mut alice = connect(&server, &s, "alice").await;
    let mallory = connect(&server, &s, "mallory").await;
    let bob = connect(&server, &s, "bob").await;

    // Too many members in one request: TOO_LARGE, naming the client's own numbers.
    let six = ["u1", "u2", "u3", "u4", "u5", "u6"];
    let (code, message) = server_error(
        mallory
            .create_conversation("big", ConversationKind::Group, "", &six)
            .await
            .expect_err("six members"),
    );
    assert_eq!(code, ErrorCode::TooLarge);
    assert!(message.contains("6") && message.contains("5"), "{message}");
    // An existing conversation: no tenant in the message.
    let (code, message) = server_error(
        mallory
            .create_conversation("general", ConversationKind::Group, "", &[])
            .await
            .expect_err("exists"),
    );
    assert_eq!(code, ErrorCode::AlreadyExists);
    assert!(!message.contains("acme"), "{message}");
    // Conversations created per hour: three, then RATE_LIMITED with a wait. (The refused
    // create above counted: every attempt costs the log a command.)
    for i in 0..2 {
        mallory
            .create_conversation(&format!("m{i}"), ConversationKind::Group, "", &["u1"])
            .await
            .expect("within the rate");
    }
    match mallory
        .create_conversation("m3", ConversationKind::Group, "", &["u1"])
        .await
        .expect_err("over the rate")
    {
        ClientError::Server {
            code,
            retry_after_ms,
            ..
        } => {
            assert_eq!(code, ErrorCode::RateLimited);
            assert!(retry_after_ms > 1000, "{retry_after_ms}");
        }
        other => panic!("{other:?}"),
    }
    // Another user's quota is untouched.
    bob.create_conversation("b0", ConversationKind::Group, "", &["alice"])
        .await
        .expect("bob's own quota");
    // Not a member: a fixed message that names neither user nor tenant.
    let (code, message) = server_error(
        mallory
            .send_text("general", "x1", "let me in")
            .await
            .expect_err("not a member"),
    );
    assert_eq!(code, ErrorCode::NotMember);
    for leak in ["mallory", "acme", "general"] {
        assert!(!message.contains(leak), "{leak:?} in {message:?}");
    }
    let (code, _) = server_error(
        mallory
            .history("general", 0, 10)
            .await
            .expect_err("not a member"),
    );
    assert_eq!(code, ErrorCode::NotMember);
    // Bad ids and a bad Pull: typed, and the session goes on.
    let (code, _) = server_error(mallory.pull("general", 5, 1).await.expect_err("bad range"));
    assert!(matches!(
        code,
        ErrorCode::NotMember | ErrorCode::InvalidRequest
    ));
    let (code, _) = server_error(
        mallory
            .send_text("bad id", "x2", "hi")
            .await
            .expect_err("bad id"),
    );
    assert_eq!(code, ErrorCode::InvalidId);
    mallory.ping().await.expect("mallory is still served");

    // Through all of it, bob's messages reach alice, each once, in order.
    for i in 0..5 {
        bob.send_text("general", &format!("b{i}"), "still here")
            .await
            .expect("send");
    }
    let mut seqs = Vec::new();
    while seqs.len() < 5 {
        match tokio::time::timeout(WAIT, alice.next_push()).await {
            Ok(Some(Push::Event(e))) if e.conversation == "general" => seqs.push(e.seq),
            Ok(Some(_)) => {}
            other => panic!("alice: {other:?}"),
        }
    }
    assert_eq!(seqs, vec![2, 3, 4, 5, 6]);
}
