//! A KV outage does not stop sending (issue 14): real nats-server, real `tidings serve`,
//! real WebSockets, the store taken away by the fault-injecting wrapper
//! (`TIDINGS_STORE_FAULTS_FILE`). While the store is out, sends are acknowledged from the
//! send buffer and delivered live; afterwards every acknowledged event is in the store,
//! contiguous, exactly once, at its acknowledged seq. The chat outage lasts 30 s, as the
//! issue asks, with a 3 s lease: buffering outlasts the lease ten times over.
//!
//! Two writers around a takeover are proven in process (services/log/tests/outage.rs):
//! one embedded store cannot be opened by two server processes.

#![allow(clippy::disallowed_methods)] // tests wait on processes synchronously, off any runtime's workers

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common;
use crate::common::{Nats, Sandbox, Server};
use futures_util::TryStreamExt;
use tidings_client::client::ErrorCode;
use tidings_client::{Connection, Push};
use tidings_schemas::v1::{ConversationKind, Event};

const WAIT: Duration = Duration::from_secs(30);
const OUTAGE: Duration = Duration::from_secs(30);

fn faults(s: &Sandbox) -> PathBuf {
    s.path().join("faults")
}

fn set_fault(s: &Sandbox, fault: &str) {
    std::fs::write(faults(s), format!("{fault}\n")).expect("write the fault file");
    // The wrapper reads it every 50 ms.
    std::thread::sleep(Duration::from_millis(150));
}

fn start(s: &Sandbox, nats: &Nats, extra: &[(&str, &str)]) -> Server {
    let file = faults(s);
    let file = file.to_str().expect("utf-8 path");
    let mut env = vec![
        ("TIDINGS_STORE_FAULTS_FILE", file),
        ("TIDINGS_LOG_LEASE_TTL_MS", "3000"),
    ];
    env.extend_from_slice(extra);
    Server::start(s, nats, "all", &env)
}

async fn connect(server: &Server, s: &Sandbox, user: &str) -> Connection {
    let token = s.token("acme", user, 3600);
    Connection::open(&server.url(), &token, "test")
        .await
        .expect("connect")
        .0
}

/// Sends until acknowledged, retrying `unavailable` with the same client_msg_id (as a
/// client does); other errors fail the test.
async fn send(conn: &Connection, conv: &str, id: &str, text: &str) -> u64 {
    for _ in 0..50 {
        match conn.send_text(conv, id, text).await {
            Ok(ack) => return ack.seq,
            Err(e) if common::error_code(&e) == Some(ErrorCode::Unavailable) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("send {id}: {e}"),
        }
    }
    panic!("send {id}: still unavailable after 50 tries");
}

/// Takes pushes until `n` events of `conv` have arrived.
async fn events(conn: &mut Connection, conv: &str, n: usize) -> Vec<Event> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, conn.next_push()).await {
            Ok(Some(Push::Event(e))) if e.conversation == conv => got.push(e),
            Ok(Some(_)) => {}
            Ok(None) => panic!("connection closed after {} events", got.len()),
            Err(_) => panic!("only {} of {n} events arrived", got.len()),
        }
    }
    got
}

/// Waits until every send buffer file is empty (the replay is done).
fn until_replayed(s: &Sandbox) {
    let dir = s.data_dir().join("send-buffer");
    let deadline = Instant::now() + WAIT;
    loop {
        let sizes: u64 = wal_bytes(&dir);
        if sizes == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{sizes} bytes never replayed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wal_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "wal"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Reads the conversation from the store (the server stopped) and checks: seqs exactly
/// 1..=head, each acknowledged send at its seq, every client_msg_id once.
fn assert_stored(s: &Sandbox, conv: &str, acked: &[(String, u64)]) -> u64 {
    let events = s.read_all(conv);
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    let head = seqs.len() as u64;
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>(), "contiguous");
    let mut ids: HashMap<&str, u64> = HashMap::new();
    for e in &events {
        let id = e["client_msg_id"].as_str().unwrap_or("");
        if !id.is_empty() {
            let seq = e["seq"].as_u64().expect("seq");
            assert!(ids.insert(id, seq).is_none(), "{id} stored twice");
        }
    }
    for (id, seq) in acked {
        assert_eq!(
            ids.get(id.as_str()),
            Some(seq),
            "acked {id} is stored at {seq}"
        );
    }
    // Acknowledgement order is seq order.
    let acked_seqs: Vec<u64> = acked.iter().map(|(_, seq)| *seq).collect();
    let mut sorted = acked_seqs.clone();
    sorted.sort_unstable();
    assert_eq!(acked_seqs, sorted, "acked in seq order");
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_outage_while_clients_chat_keeps_sends_acked_and_live_then_replays_them_once() {
    let s = Sandbox::new();
    let nats = Nats::start();
    s.group("general");
    let mut server = start(&s, &nats, &[]);
    let alice = connect(&server, &s, "alice").await;
    let mut bob = connect(&server, &s, "bob").await;
    // Both write before the outage: with the store's reads down too, the writer buffers
    // for conversations and senders it has in memory (see the decision).
    let mut acked = Vec::new();
    for i in 0..5 {
        let id = format!("before-{i}");
        let from = if i == 4 { &bob } else { &alice };
        acked.push((id.clone(), send(from, "general", &id, "before").await));
    }
    events(&mut bob, "general", 5).await;

    set_fault(&s, "unavailable");
    let started = Instant::now();
    let mut during = 0usize;
    let mut i = 0;
    let mut reads_back = false;
    while started.elapsed() < OUTAGE {
        // The second half: reads work again, commits still fail (a store that serves reads
        // from followers, say).
        if !reads_back && started.elapsed() >= OUTAGE / 2 {
            set_fault(&s, "commit-unavailable");
            reads_back = true;
        }
        let (from, name) = if i % 2 == 0 {
            (&alice, "alice")
        } else {
            (&bob, "bob")
        };
        let id = format!("during-{name}-{i}");
        acked.push((id.clone(), send(from, "general", &id, "during").await));
        during += 1;
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(during > 50, "only {during} sends in the outage");
    // Delivered live, in order, while the store is still out.
    let live = events(&mut bob, "general", during).await;
    let live_seqs: Vec<u64> = live.iter().map(|e| e.seq).collect();
    assert_eq!(live_seqs, (7..7 + during as u64).collect::<Vec<_>>());
    // History joins the store and the buffer (its membership check needs store reads).
    let page = bob.history("general", 0, 10).await.expect("history");
    assert_eq!(page.events.len(), 10);
    assert_eq!(page.events[0].seq, 6 + during as u64 - 9);
    // Sync reports the buffered head and the latest events from the buffer.
    let synced = bob
        .sync(&[("general".to_string(), 5)], 3)
        .await
        .expect("sync");
    let general = &synced.conversations[0];
    assert_eq!(general.head_seq, 6 + during as u64);
    assert_eq!(
        general.events.last().map(|e| e.seq),
        Some(6 + during as u64)
    );
    // What cannot be buffered is refused as unavailable, retryably.
    let err = alice
        .create_conversation("new", ConversationKind::Group, "new", &["bob"])
        .await
        .expect_err("create during the outage");
    assert_eq!(
        common::error_code(&err),
        Some(ErrorCode::Unavailable),
        "{err}"
    );

    set_fault(&s, "ok");
    until_replayed(&s);
    let after = send(&alice, "general", "after", "after").await;
    assert_eq!(after, 7 + during as u64);
    acked.push(("after".into(), after));
    alice
        .create_conversation("new", ConversationKind::Group, "new", &["bob"])
        .await
        .expect("create after the outage");
    assert!(server.terminate(), "clean exit");
    assert_eq!(assert_stored(&s, "general", &acked), after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_an_outage_then_restart_replays_the_buffer_and_loses_nothing() {
    sigkill_during_an_outage(Medium::Files).await;
}

/// The same with the buffer on a JetStream stream (`log.send_buffer_medium = "jetstream"`, as
/// TiKV deployments have by default): nothing of it is on the writer's disk, so a writer on
/// another host could take over from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_an_outage_with_the_buffer_on_jetstream_replays_from_the_stream() {
    sigkill_during_an_outage(Medium::Stream).await;
}

#[derive(Clone, Copy, PartialEq)]
enum Medium {
    Files,
    Stream,
}

/// Records waiting in the JetStream send buffer: every message of its subjects except the
/// one epoch marker each partition keeps after a trim.
async fn stream_records(nats: &Nats) -> u64 {
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(tidings_log_role::send_buffer_stream::STREAM)
        .await
        .expect("the send buffer stream exists");
    let mut subjects = stream
        .info_with_subjects(format!(
            "{}.>",
            tidings_log_role::send_buffer_stream::SUBJECT_PREFIX
        ))
        .await
        .expect("stream info");
    let mut records = 0;
    while let Some((_, n)) = subjects.try_next().await.expect("subjects") {
        records += (n as u64).saturating_sub(1);
    }
    records
}

async fn sigkill_during_an_outage(medium: Medium) {
    let s = Sandbox::new();
    let nats = Nats::start();
    s.group("general");
    let env: &[(&str, &str)] = match medium {
        Medium::Files => &[],
        Medium::Stream => &[("TIDINGS_LOG_SEND_BUFFER_MEDIUM", "jetstream")],
    };
    let server = start(&s, &nats, env);
    let alice = connect(&server, &s, "alice").await;
    let mut acked = Vec::new();
    acked.push((
        "before".to_string(),
        send(&alice, "general", "before", "x").await,
    ));
    set_fault(&s, "unavailable");
    for i in 0..30 {
        let id = format!("during-{i}");
        acked.push((id.clone(), send(&alice, "general", &id, "x").await));
    }
    drop(alice);
    drop(server); // SIGKILL
    let buffer_dir = s.data_dir().join("send-buffer");
    match medium {
        Medium::Files => assert!(wal_bytes(&buffer_dir) > 0),
        Medium::Stream => {
            assert_eq!(
                wal_bytes(&buffer_dir),
                0,
                "nothing buffered on the writer's disk"
            );
            assert!(
                stream_records(&nats).await > 0,
                "the stream holds the sends"
            );
        }
    }

    set_fault(&s, "ok");
    let mut server = start(&s, &nats, env);
    match medium {
        Medium::Files => until_replayed(&s),
        Medium::Stream => {
            let deadline = Instant::now() + WAIT;
            while stream_records(&nats).await > 0 {
                assert!(Instant::now() < deadline, "the stream was never replayed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let alice = connect(&server, &s, "alice").await;
    // A retry of a send acked before the kill answers the original.
    assert_eq!(send(&alice, "general", "during-7", "x").await, acked[8].1);
    let next = send(&alice, "general", "next", "x").await;
    assert_eq!(next, 33);
    acked.push(("next".into(), next));
    assert!(server.terminate(), "clean exit");
    assert_eq!(assert_stored(&s, "general", &acked), 33);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_past_the_buffer_limit_fails_unavailable_and_loses_nothing_acked() {
    let s = Sandbox::new();
    let nats = Nats::start();
    s.group("general");
    let mut server = start(
        &s,
        &nats,
        &[("TIDINGS_LOG_SEND_BUFFER_MAX_BYTES", "1048576")],
    );
    let alice = connect(&server, &s, "alice").await;
    let mut acked = vec![(
        "first".to_string(),
        send(&alice, "general", "first", "x").await,
    )];
    set_fault(&s, "unavailable");
    let big = "y".repeat(50_000);
    let mut refused = 0;
    for i in 0..40 {
        let id = format!("big-{i}");
        match alice.send_text("general", &id, &big).await {
            Ok(ack) => acked.push((id, ack.seq)),
            // The send whose commit met the outage fails; the others are buffered or refused.
            Err(e) if i == 0 => {
                assert_eq!(common::error_code(&e), Some(ErrorCode::Unavailable), "{e}")
            }
            Err(e) => {
                assert_eq!(common::error_code(&e), Some(ErrorCode::Unavailable), "{e}");
                refused += 1;
            }
        }
    }
    assert!(acked.len() >= 11, "only {} buffered", acked.len());
    assert!(refused >= 10, "the limit refused only {refused}");
    set_fault(&s, "ok");
    until_replayed(&s);
    // Refused sends were never written: retried now, they commit after the buffered ones.
    let retry = send(&alice, "general", "big-39", &big).await;
    assert_eq!(retry, 1 + acked.len() as u64 + 1);
    acked.push(("big-39".into(), retry));
    assert!(server.terminate(), "clean exit");
    assert_stored(&s, "general", &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_and_nats_down_together_give_clear_errors_and_lose_nothing_acked() {
    let s = Sandbox::new();
    let mut nats = Nats::start();
    s.group("general");
    let mut server = start(&s, &nats, &[]);
    let alice = connect(&server, &s, "alice").await;
    let mut bob = connect(&server, &s, "bob").await;
    let mut acked = vec![(
        "before".to_string(),
        send(&alice, "general", "before", "x").await,
    )];
    events(&mut bob, "general", 1).await;

    set_fault(&s, "unavailable");
    nats.kill();
    for i in 0..20 {
        let id = format!("both-{i}");
        acked.push((id.clone(), send(&alice, "general", &id, "x").await));
    }
    let err = alice
        .create_conversation("new", ConversationKind::Group, "new", &["bob"])
        .await
        .expect_err("create with the store down");
    assert_eq!(
        common::error_code(&err),
        Some(ErrorCode::Unavailable),
        "{err}"
    );

    nats.restart();
    set_fault(&s, "ok");
    until_replayed(&s);
    // Bob's hub heals from the log: every event, once, in order.
    let got = events(&mut bob, "general", 20).await;
    assert_eq!(
        got.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (3..=22).collect::<Vec<_>>()
    );
    assert!(server.terminate(), "clean exit");
    assert_stored(&s, "general", &acked);
}

/// With the buffer on JetStream, the KV and NATS down together leave nowhere to keep a
/// message: sends fail `unavailable` (retryable, nothing acked); once NATS is back they are
/// buffered there while the KV is still out, and replayed when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_and_nats_down_together_with_the_buffer_on_jetstream_refuse_sends_clearly() {
    let s = Sandbox::new();
    let mut nats = Nats::start();
    s.group("general");
    let env = [("TIDINGS_LOG_SEND_BUFFER_MEDIUM", "jetstream")];
    let mut server = start(&s, &nats, &env);
    let alice = connect(&server, &s, "alice").await;
    let mut acked = vec![(
        "before".to_string(),
        send(&alice, "general", "before", "x").await,
    )];

    set_fault(&s, "unavailable");
    nats.kill();
    for i in 0..3 {
        let err = alice
            .send_text("general", &format!("refused-{i}"), "x")
            .await
            .expect_err("nowhere to keep it");
        assert_eq!(
            common::error_code(&err),
            Some(ErrorCode::Unavailable),
            "{err}"
        );
    }

    nats.restart();
    for i in 0..10 {
        let id = format!("buffered-{i}");
        acked.push((id.clone(), send(&alice, "general", &id, "x").await));
    }
    assert!(stream_records(&nats).await > 0, "buffered on the stream");
    set_fault(&s, "ok");
    let deadline = Instant::now() + WAIT;
    while stream_records(&nats).await > 0 {
        assert!(Instant::now() < deadline, "the stream was never replayed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.terminate(), "clean exit");
    // The refused sends were never stored; the buffered ones are, each once, in order.
    assert_eq!(assert_stored(&s, "general", &acked), 12);
}
