//! A 10,000-member group with every member online: one message is one event write and one
//! NATS message for the gateway, however many receive it. Real sockets, one per session
//! (the test process holds 10,000 client ends, the server process the other 10,000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common;
use crate::common::{Nats, Sandbox, Server};
use futures_util::StreamExt;
use tidings_client::{Connection, Push};
use tokio::sync::Semaphore;

/// Members online. `TIDINGS_LARGE_GROUP` overrides it (e.g. on a machine with fewer file
/// descriptors); the default is the 10,000.
fn members() -> usize {
    std::env::var("TIDINGS_LARGE_GROUP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// A group `conv` of tenant acme with `n` members, u0 (its creator) to u{n - 1}.
fn create_group(s: &Sandbox, conv: &str, n: usize) -> Vec<String> {
    let users: Vec<String> = (0..n).map(|i| format!("u{i}")).collect();
    let list = users[1..].join(",");
    s.ok(&[
        "conv",
        "create",
        "--tenant",
        "acme",
        "--conv",
        conv,
        "--kind",
        "group",
        "--by",
        &users[0],
        "--members",
        &list,
    ]);
    users
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_to_a_10000_member_group_is_one_write_and_one_nats_message() {
    let n = members();
    // One client socket per member, and a few for NATS.
    let _sockets = common::hold_sockets(n as u32 + 100).await;
    let s = Sandbox::new();
    let nats = Nats::start();
    let users = create_group(&s, "big", n);
    let server = Server::start(&s, &nats, "all", &[]);

    // Count what NATS carries for the conversation.
    let nc = async_nats::connect(nats.url()).await.expect("nats");
    let mut on_subject = nc
        .subscribe("tidings.ev.acme.big")
        .await
        .expect("subscribe");
    nc.flush().await.expect("flush");

    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(64));
    let mut connecting = tokio::task::JoinSet::new();
    for user in &users {
        let (url, token, permits) = (server.url(), s.token("acme", user, 3600), permits.clone());
        connecting.spawn(async move {
            let _permit = permits.acquire_owned().await.expect("permit");
            Connection::open(&url, &token, "load")
                .await
                .expect("connect")
                .0
        });
    }
    let mut conns = Vec::with_capacity(n);
    while let Some(c) = connecting.join_next().await {
        conns.push(c.expect("connect task"));
    }
    println!("{n} sessions online in {:?}", started.elapsed());

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sender = conns.pop().expect("a sender").requester();
    let mut waiting = tokio::task::JoinSet::new();
    for mut conn in conns {
        let tx = tx.clone();
        waiting.spawn(async move {
            loop {
                match tokio::time::timeout(Duration::from_secs(60), conn.next_push()).await {
                    Ok(Some(Push::Event(e))) => {
                        let _ = tx.send((Instant::now(), e.seq));
                        // Hold the connection open until every session has reported.
                        let _ = conn.next_push().await;
                        return;
                    }
                    Ok(Some(_)) => {}
                    other => panic!("session ended without the event: {other:?}"),
                }
            }
        });
    }
    drop(tx);
    let sent = Instant::now();
    let ack = sender
        .send_text("big", "hello-all", "hello, everyone")
        .await
        .expect("send");
    assert_eq!(ack.seq, 2, "one event after the creation");
    let mut last = sent;
    for _ in 0..n - 1 {
        let (at, seq) = rx.recv().await.expect("a receipt");
        assert_eq!(seq, 2);
        last = last.max(at);
    }
    println!(
        "one message to {n} online members: last one had it {:?} after the send",
        last - sent
    );

    // Exactly one event was written: the head moved by one.
    let sync = sender.sync(&[("big".into(), 2)], 0).await.expect("sync");
    assert_eq!(sync.conversations[0].head_seq, 2);
    // Exactly one message crossed NATS for the conversation.
    let first = tokio::time::timeout(Duration::from_secs(5), on_subject.next())
        .await
        .expect("the event on NATS")
        .expect("message");
    assert!(!first.payload.is_empty());
    let more = tokio::time::timeout(Duration::from_millis(500), on_subject.next()).await;
    assert!(more.is_err(), "a second NATS message for one send");
    waiting.abort_all();
}

/// A group larger than a hub's fan-out slice (64 sessions): the hub yields to the runtime
/// between slices, and nothing else of the hub runs meanwhile, so a burst of events still
/// reaches every session once and in seq order, and a member removed in the middle of the
/// burst gets everything up to its own leave event and nothing after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_in_a_group_larger_than_a_fan_out_slice_reaches_everyone_once_in_order() {
    use tidings_schemas::v1::event::Body;
    const MEMBERS: usize = 300;
    const BURST: usize = 40;
    let s = Sandbox::new();
    let nats = Nats::start();
    let users = create_group(&s, "slices", MEMBERS);
    let server = Server::start(&s, &nats, "all", &[]);
    let mut conns = Vec::with_capacity(MEMBERS);
    for user in &users {
        let token = s.token("acme", user, 3600);
        let (conn, _) = Connection::open(&server.url(), &token, "slices")
            .await
            .expect("connect");
        conns.push(conn);
    }
    let owner = conns[0].requester();
    // Each session's events, until the burst is over (its own leave, for the removed one)
    // and then one quiet second.
    let mut collecting = tokio::task::JoinSet::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        collecting.spawn(async move {
            let mut got: Vec<(u64, bool)> = Vec::new();
            loop {
                match tokio::time::timeout(Duration::from_secs(2), conn.next_push()).await {
                    Ok(Some(Push::Event(e))) => {
                        let left = matches!(&e.body, Some(Body::MemberLeft(l)) if l.user == "u1");
                        got.push((e.seq, left));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("session {i} ended"),
                    Err(_) if got.len() > BURST || got.iter().any(|(_, left)| *left) => {
                        return (i, got);
                    }
                    Err(_) => {}
                }
            }
        });
    }
    // Half the burst at once, the removal, the other half at once.
    let send_all = |from: usize| {
        let owner = owner.clone();
        async move {
            let mut sends = tokio::task::JoinSet::new();
            for k in from..from + BURST / 2 {
                let owner = owner.clone();
                sends.spawn(async move {
                    owner
                        .send_text("slices", &format!("m{k}"), "burst")
                        .await
                        .expect("send")
                });
            }
            while let Some(r) = sends.join_next().await {
                r.expect("send task");
            }
        }
    };
    send_all(0).await;
    let removed = owner.remove_member("slices", "u1").await.expect("remove");
    send_all(BURST / 2).await;
    let last = 1 + BURST as u64 + 1; // creation, the burst, the leave
    let mut sessions = 0;
    while let Some(done) = collecting.join_next().await {
        let (i, got) = done.expect("collector");
        let seqs: Vec<u64> = got.iter().map(|(seq, _)| *seq).collect();
        if i == 1 {
            let upto = removed.seq;
            assert_eq!(seqs, (2..=upto).collect::<Vec<_>>(), "the removed member");
            assert_eq!(
                got.last().map(|(_, left)| *left),
                Some(true),
                "its own leave last"
            );
        } else {
            assert_eq!(seqs, (2..=last).collect::<Vec<_>>(), "session {i}");
        }
        sessions += 1;
    }
    assert_eq!(sessions, MEMBERS);
}
