//! Cells (issue 15): two or three cells on loopback, each with its own nats-server (joined
//! by leaf nodes in the link account only), `tidings serve`, data directory and archive.
//!
//! - The drill: a VIP tenant's users chat in cell a; a's processes are SIGKILLed; the
//!   tenant fails over to cell b (unplanned); the users go on in b, seqs continuing with no
//!   gap and no reuse of what b holds, retried sends deduplicated; the acknowledged events b
//!   lacks are counted, and when a is back it lists exactly those as lost and sends clients
//!   to b.
//! - Cut off mid-relay: a goes down while it hands a backlog to b; the rows b applied and a
//!   had not deleted yet are not listed as lost (b's mark says b has them), the rest are.
//! - A planned move with chat running, with synchronous replication, and the move back:
//!   nothing lost, nothing twice, every acknowledged send in the new home.
//! - Residency: a tenant without a DR cell stays in its home; nothing reaches a third cell.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common;
use crate::common::cells::{Cell, cells};
use serde_json::Value;
use tidings_client::{ClientError, ClientTls, Connection};

const WAIT: Duration = Duration::from_secs(30);

fn answer(out: std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "tidings cell failed: {}",
        common::stderr(&out)
    );
    common::json_lines(&out.stdout)
        .into_iter()
        .next()
        .expect("one JSON line")
}

/// Polls `check` every 50 ms until it holds, for at most [`WAIT`].
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The placement of `tenant` as `cell` knows it.
fn show(cell: &Cell, tenant: &str) -> Value {
    answer(cell.cell_cli(tenant, &["show"]))
}

/// The value of an unlabelled series at `url` (a /metrics page), if it is there.
async fn metric(url: &str, name: &str) -> Option<f64> {
    let text = common::http_client()
        .get(url)
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map(|v| v.trim().parse().expect("a number"))
}

/// The value of an unlabelled counter on `cell`'s admin listener.
async fn counter(cell: &Cell, name: &str) -> f64 {
    let url = format!("http://127.0.0.1:{}/metrics", cell.server().admin_port);
    metric(&url, name)
        .await
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Polls `cell`'s counter `name` every 50 ms until it is at least `n`, for at most
/// [`WAIT`]; `what` says what it waits for if it never gets there.
async fn counter_reaches(cell: &Cell, name: &str, n: f64, what: &str) {
    let deadline = Instant::now() + WAIT;
    while counter(cell, name).await < n {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The seqs `tidings cell lost` lists on `cell`, sorted, once each.
fn lost_seqs(cell: &Cell, tenant: &str) -> Vec<u64> {
    let lost = answer(cell.cell_cli(tenant, &["lost"]));
    let mut seqs: Vec<u64> = lost["lost"]
        .as_array()
        .expect("lost")
        .iter()
        .map(|l| l["seq"].as_u64().expect("seq"))
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    seqs
}

/// The last seq of `conv` in a failover's report: what the new home holds of it.
fn reported_head(report: &Value, conv: &str) -> u64 {
    report["conversations"]
        .as_array()
        .expect("conversations")
        .iter()
        .find(|c| c["conversation"] == conv)
        .and_then(|c| c["last_seq"].as_u64())
        .expect("the new home holds the conversation")
}

/// `a` has compared directories with its DR cell `b` since it started: it serves the
/// tenant, and its relay hands rows over.
async fn confirmed(a: &Cell) {
    eventually("a has compared directories with b", || {
        show(a, "vip")["dr_confirmed"] == true
    })
    .await;
}

/// Creates group `conv` with `member`, through `conn`.
async fn group(conn: &Connection, conv: &str, member: &str) {
    conn.create_conversation(
        conv,
        tidings_schemas::v1::ConversationKind::Group,
        conv,
        &[member],
    )
    .await
    .unwrap_or_else(|e| panic!("create {conv}: {e}"));
}

async fn open(url: &str, token: &str) -> Connection {
    Connection::open_with(url, &ClientTls::default(), token, "cells-test")
        .await
        .map(|(conn, _)| conn)
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// Every event of `conv` as (seq, event id), read through `conn`.
async fn events(conn: &Connection, conv: &str) -> BTreeMap<u64, String> {
    let mut all = BTreeMap::new();
    let mut from = 1;
    loop {
        let page = conn.pull(conv, from, from + 499).await.expect("pull");
        if page.events.is_empty() {
            return all;
        }
        for e in &page.events {
            all.insert(e.seq, e.event_id.clone());
            from = e.seq + 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vip_tenant_survives_losing_its_home_cell() {
    drill(false).await;
}

/// An old home that went down in the middle of handing a backlog to its DR cell lists as
/// lost exactly what the DR cell never applied. The rows it had handed over were not
/// deleted yet (a relay pass deletes at its end), and they are not lost: when it comes back
/// it asks the new home for its mark, and drops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_home_cut_off_mid_relay_lists_only_what_never_arrived() {
    // Fewer than a relay page (256 rows): the pass hands them all before it deletes any.
    const BACKLOG: usize = 200;
    let mut cs = cells(&["a", "b"], &[]);
    for c in &mut cs {
        c.start();
    }
    let (a, b) = cs.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    answer(a.cell_cli(
        "vip",
        &["place", "--home", "a", "--dr", "b", "--tier", "vip"],
    ));
    eventually("b learns the placement", || show(b, "vip")["version"] == 1).await;
    confirmed(a).await;
    let token = a.sandbox.token("vip", "alice", 3600);
    let alice = open(&a.url(), &token).await;
    group(&alice, "team", "bob").await;
    counter_reaches(
        b,
        "tidings_cell_replicas_applied_total",
        1.0,
        "b applies the group's creation",
    )
    .await;
    let sent_before = counter(a, "tidings_cell_replicas_sent_total").await;

    // b's nats-server hangs: a acknowledges the sends (asynchronous replication) and its
    // relay cannot hand them over, so they wait in a's outbox.
    b.nats.pause();
    let mut acked = Vec::new();
    for i in 0..BACKLOG {
        let ack = alice
            .send_text("team", &format!("m{i}"), &format!("backlog {i}"))
            .await
            .expect("send in a");
        acked.push(ack.seq);
    }
    drop(alice);
    b.nats.resume();
    // a is cut off once its relay has handed 10 of them over. The pass that was stuck on
    // the first send (its page read before the others existed: one or two rows) ends and
    // deletes what it handed; the next pass has the rest on its page, hands them one by one
    // and deletes none of them before it ends, a few hundred ms later.
    let deadline = Instant::now() + WAIT;
    while counter(a, "tidings_cell_replicas_sent_total").await < sent_before + 10.0 {
        assert!(Instant::now() < deadline, "a never handed its backlog over");
    }
    a.kill();

    let report = answer(b.cell_cli("vip", &["failover", "--unplanned"]));
    assert_eq!(report["home"], "b");
    let b_head = reported_head(&report, "team");
    let missing: Vec<u64> = acked.iter().copied().filter(|s| *s > b_head).collect();
    let arrived = BACKLOG - missing.len();
    println!(
        "cut off mid-relay: of {BACKLOG} sends acknowledged in a, b applied {arrived} before a went down"
    );
    assert!(arrived > 0, "b applied some of the backlog");

    a.nats.restart();
    a.start();
    eventually("a learns the failover", || show(a, "vip")["home"] == "b").await;
    // a's relay drops the rows it had handed over and not deleted (b's mark covers them)
    // and keeps the others as lost: exactly those b never got.
    let deadline = Instant::now() + WAIT;
    loop {
        let arrived = counter(a, "tidings_cell_arrived_events_total").await;
        let lost = counter(a, "tidings_cell_lost_events_total").await;
        if arrived > 0.0 && lost >= missing.len() as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for a's relay: {arrived} events arrived, {lost} lost (b never got {})",
            missing.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        lost_seqs(a, "vip"),
        missing,
        "lost: exactly what b never got"
    );
    // Still exactly those after a few more passes of the relay, and final: nothing of the
    // tenant waits in a's outbox.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(lost_seqs(a, "vip"), missing);
    assert_eq!(
        counter(a, "tidings_cell_lost_events_total").await,
        missing.len() as f64
    );
    assert_eq!(answer(a.cell_cli("vip", &["lost"]))["undecided"], 0);
}

/// With synchronous replication nothing acknowledged is lost (RPO 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_vip_tenant_loses_nothing_with_its_home_cell() {
    let missing = drill(true).await;
    assert_eq!(missing, Vec::<u64>::new(), "RPO 0");
}

/// The drill: chat in a, SIGKILL a, unplanned failover to b, chat on; a comes back. Returns
/// the acknowledged seqs b lacked.
async fn drill(sync: bool) -> Vec<u64> {
    let mut cs = cells(&["a", "b"], &[]);
    for c in &mut cs {
        c.start();
    }
    let (a, b) = cs.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);

    let mut place = vec!["place", "--home", "a", "--dr", "b", "--tier", "vip"];
    if sync {
        place.push("--sync");
    }
    let placed = answer(a.cell_cli("vip", &place));
    assert_eq!(
        (placed["home"].as_str(), placed["dr"].as_str()),
        (Some("a"), Some("b"))
    );
    // Two more tenants with b as DR cell: another VIP one, and a standard one.
    answer(a.cell_cli(
        "vip2",
        &["place", "--home", "a", "--dr", "b", "--tier", "vip"],
    ));
    answer(a.cell_cli("std", &["place", "--home", "a", "--dr", "b"]));
    eventually("b learns the placements", || {
        ["vip", "vip2", "std"]
            .iter()
            .all(|t| show(b, t)["version"] == 1)
    })
    .await;
    confirmed(a).await;

    // A client's first connect may go to any cell: b sends alice to a.
    let alice_token = a.sandbox.token("vip", "alice", 3600);
    let alice = open(&b.url(), &alice_token).await;
    group(&alice, "team", "bob").await;
    let gateway_metrics = format!("http://127.0.0.1:{}/metrics", b.gateway_port);
    let redirects = metric(&gateway_metrics, "tidings_gateway_cell_redirects_total").await;
    assert_eq!(redirects, Some(1.0), "b sent the first connect to a");

    let mut acked = BTreeMap::new();
    for i in 0..40 {
        let ack = alice
            .send_text("team", &format!("m{i}"), &format!("before the storm {i}"))
            .await
            .expect("send in a");
        acked.insert(ack.seq, (format!("m{i}"), ack.event_id.clone()));
    }
    let before_kill = events(&alice, "team").await;
    drop(alice);

    // Cell a is lost: its tidings process and its nats-server, SIGKILLed.
    a.kill();
    let lost_at = Instant::now();
    // The synchronous drill moves the tenant alone; the asynchronous one moves every VIP
    // tenant of b's in one action, as a deployment operator (the standard tenant stays).
    let report = if sync {
        answer(b.cell_cli("vip", &["failover", "--unplanned"]))
    } else {
        tier_failover(b)
    };
    let failover_took = lost_at.elapsed();
    assert_eq!(report["home"], "b");
    assert_eq!(report["planned"], false);
    // Synchronous replication waits for nobody once the old home is gone.
    assert_eq!(report["sync"], false);
    let b_head = reported_head(&report, "team");

    // Alice goes on in b.
    let alice = open(&b.url(), &alice_token).await;
    let first = alice
        .send_text("team", "after-0", "after the storm")
        .await
        .expect("send in b");
    let time_to_first_send = lost_at.elapsed();
    assert_eq!(first.seq, b_head + 1, "seqs continue after what b holds");
    assert!(!first.duplicate);

    // What b holds is exactly a's history up to its head: same seqs, same event ids.
    let in_b = events(&alice, "team").await;
    for (seq, id) in &before_kill {
        if *seq <= b_head {
            assert_eq!(in_b.get(seq), Some(id), "seq {seq} in b is a's event");
        }
    }
    let missing: Vec<u64> = acked.keys().copied().filter(|s| *s > b_head).collect();
    println!(
        "drill ({}): time to first send in b {:.2} s (failover command {:.2} s); acknowledged in a and missing in b: {} of {}",
        if sync { "synchronous" } else { "asynchronous" },
        time_to_first_send.as_secs_f64(),
        failover_took.as_secs_f64(),
        missing.len(),
        acked.len()
    );
    // What b commits now waits for a in b's outbox (a is gone): the gauge says so.
    let deadline = Instant::now() + WAIT;
    while counter(b, "tidings_cell_outbox_age_seconds").await == 0.0 {
        assert!(Instant::now() < deadline, "b's outbox age never grew");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A send retried across the move is deduplicated, when b has it.
    let (seq, (client_msg_id, event_id)) = acked
        .iter()
        .find(|(s, _)| **s <= b_head)
        .expect("b holds some of a's sends");
    let again = alice
        .send_text("team", client_msg_id, "retried")
        .await
        .expect("retry in b");
    assert!(again.duplicate);
    assert_eq!((&again.seq, &again.event_id), (seq, event_id));

    // Cell a comes back: it learns it is home no more, sends clients to b, and lists exactly
    // what it acknowledged that b never got.
    a.nats.restart();
    a.start();
    eventually("a learns the failover", || show(a, "vip")["home"] == "b").await;
    let via_a = open(&a.url(), &alice_token).await;
    let ack = via_a
        .send_text("team", "after-1", "through a, to b")
        .await
        .expect("a sends alice to b");
    assert_eq!(ack.seq, first.seq + 1);
    // The old home's relay keeps them once it has compared directories with b.
    let deadline = Instant::now() + WAIT;
    loop {
        let listed = lost_seqs(a, "vip");
        if listed == missing {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting: a lists exactly what b never got: {listed:?}, not {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And b's waiting replicas reach a, now its DR cell.
    let deadline = Instant::now() + WAIT;
    while counter(b, "tidings_cell_outbox_age_seconds").await > 0.0 {
        assert!(Instant::now() < deadline, "b's outbox never emptied into a");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // (after-0 and after-1, each its own commit in b.)
    while counter(a, "tidings_cell_replicas_applied_total").await < 2.0 {
        assert!(
            Instant::now() < deadline,
            "a never applied b's replicas (refused {})",
            counter(a, "tidings_cell_replicas_refused_total").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still exactly those, now that a has been running a while as b's DR cell; final.
    assert_eq!(lost_seqs(a, "vip"), missing);
    assert_eq!(answer(a.cell_cli("vip", &["lost"]))["undecided"], 0);
    missing
}

/// `tidings cell failover --tier vip --unplanned` on `cell` as a deployment operator: refused
/// for a tenant's admin token, done for a `cell_operator` one. Returns the report of tenant
/// `vip`, after checking that `vip2` moved too and `std` did not.
fn tier_failover(cell: &Cell) -> Value {
    let admin = format!("http://127.0.0.1:{}", cell.server().admin_port);
    let run = |token: &str| {
        cell.sandbox.run(&[
            "cell",
            "failover",
            "--tier",
            "vip",
            "--unplanned",
            "--server",
            &admin,
            "--token",
            token,
        ])
    };
    let refused = run(&cell.admin_token("vip"));
    assert!(!refused.status.success());
    assert!(
        common::stderr(&refused).contains("(403)"),
        "{}",
        common::stderr(&refused)
    );
    let operator = cell.sandbox.token_for(
        common::COMPLIANCE_AUDIENCE,
        "ops",
        "oncall",
        &["cell_operator"],
        3600,
        None,
    );
    let moved = answer(run(&operator));
    let tenants = moved["tenants"].as_array().expect("tenants");
    let mut names: Vec<&str> = tenants
        .iter()
        .filter_map(|t| t["tenant"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["vip", "vip2"]);
    assert_eq!(show(cell, "std")["home"], "a");
    assert_eq!(show(cell, "vip2")["home"], cell.name.as_str());
    tenants
        .iter()
        .find(|t| t["tenant"] == "vip")
        .cloned()
        .expect("vip moved")
}

/// Sends `count` messages through a client that follows the tenant wherever it moves: an
/// `unavailable` (draining) is retried with the same id, a `wrong_cell` reconnects. Returns
/// every ack as client_msg_id -> seq.
async fn chat_through_moves(
    start_url: String,
    token: String,
    prefix: &'static str,
    count: usize,
) -> BTreeMap<String, u64> {
    let mut conn = open(&start_url, &token).await;
    let mut acks = BTreeMap::new();
    for i in 0..count {
        let id = format!("{prefix}{i}");
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "send {id} never went through");
            match conn.send_text("team", &id, "moving").await {
                Ok(ack) => {
                    acks.insert(id, ack.seq);
                    break;
                }
                Err(ClientError::WrongCell { url }) => conn = open(&url, &token).await,
                Err(ClientError::Server { .. }) | Err(ClientError::Closed { .. }) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if conn.ping().await.is_err() {
                        conn = open(&start_url, &token).await;
                    }
                }
                Err(e) => panic!("send {id}: {e}"),
            }
        }
    }
    acks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_move_and_back_loses_nothing_and_nothing_reaches_a_third_cell() {
    let mut cs = cells(&["a", "b", "c"], &[]);
    for c in &mut cs {
        c.start();
    }
    let (a, rest) = cs.split_at_mut(1);
    let (b, c) = rest.split_at_mut(1);
    let (a, b, c) = (&mut a[0], &mut b[0], &mut c[0]);

    answer(a.cell_cli(
        "vip",
        &[
            "place", "--home", "a", "--dr", "b", "--tier", "vip", "--sync",
        ],
    ));
    answer(a.cell_cli("local", &["place", "--home", "a"]));
    for cell in [&*b, &*c] {
        eventually("every cell learns the placements", || {
            show(cell, "vip")["version"] == 1 && show(cell, "local")["version"] == 1
        })
        .await;
    }
    confirmed(a).await;

    let token = a.sandbox.token("vip", "alice", 3600);
    let alice = open(&a.url(), &token).await;
    group(&alice, "team", "bob").await;
    // Memberships and read cursors replicate too: a member joins and leaves, bob reads.
    alice.add_member("team", "erin").await.expect("add erin");
    alice
        .remove_member("team", "erin")
        .await
        .expect("remove erin");
    let bob = open(&a.url(), &a.sandbox.token("vip", "bob", 3600)).await;
    assert_eq!(bob.mark_read("team", 2).await.expect("bob reads"), 2);
    drop((alice, bob));
    let local_token = a.sandbox.token("local", "carol", 3600);
    let carol = open(&a.url(), &local_token).await;
    group(&carol, "desk", "dave").await;
    for i in 0..10 {
        carol
            .send_text("desk", &format!("l{i}"), "stays home")
            .await
            .expect("local send");
    }
    // A tenant homed in a is refused by b, which sends its clients back to a: by b's
    // `--role all` process and by a gateway of b's apart from its log.
    let via_b = open(&b.url(), &local_token).await;
    via_b.ping().await.expect("redirected to a");
    let gateway = b.start_gateway();
    let via_b_gateway = open(&gateway.url(), &local_token).await;
    via_b_gateway
        .send_text("desk", "l-via-gateway", "through b's gateway, to a")
        .await
        .expect("redirected to a");

    // Chat runs while the tenant moves to b, synchronously replicated.
    let chatting = tokio::spawn(chat_through_moves(a.url(), token.clone(), "p", 150));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let moved = answer(b.cell_cli("vip", &["failover"]));
    assert_eq!(
        (moved["home"].as_str(), moved["planned"].as_bool()),
        (Some("b"), Some(true))
    );
    let acks = chatting.await.expect("chat task");
    let conn = open(&b.url(), &token).await;
    let in_b = events(&conn, "team").await;
    // Bob's cursor came along to b: his unread count there counts from it.
    let bob_in_b = open(&b.url(), &a.sandbox.token("vip", "bob", 3600)).await;
    let list = bob_in_b.list_conversations().await.expect("bob's list");
    let team = list
        .iter()
        .find(|c| c.conversation == "team")
        .expect("team");
    assert_eq!(team.read_seq, 2);
    let seqs: Vec<u64> = in_b.keys().copied().collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "no gap in b"
    );
    for (id, seq) in &acks {
        assert!(in_b.contains_key(seq), "acknowledged {id} at {seq} is in b");
    }
    let distinct: std::collections::BTreeSet<u64> = acks.values().copied().collect();
    assert_eq!(distinct.len(), acks.len(), "every send committed once");

    // And back to a, chat running again.
    let chatting = tokio::spawn(chat_through_moves(b.url(), token.clone(), "q", 150));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let back = answer(a.cell_cli("vip", &["failover"]));
    assert_eq!(back["home"], "a");
    let acks_back = chatting.await.expect("chat task");
    let conn = open(&a.url(), &token).await;
    let in_a = events(&conn, "team").await;
    let seqs: Vec<u64> = in_a.keys().copied().collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "no gap in a"
    );
    for (seq, id) in &in_b {
        assert_eq!(in_a.get(seq), Some(id), "a holds b's event {seq}");
    }
    for seq in acks_back.values() {
        assert!(in_a.contains_key(seq));
    }
    assert_eq!(
        in_a.len(),
        3 + acks.len() + acks_back.len(),
        "the conversation's creation, erin's join and leave, and every send, each once"
    );
    // Every replica was the DR cell's to apply: nothing refused either way.
    assert_eq!(counter(b, "tidings_cell_replicas_refused_total").await, 0.0);
    assert_eq!(counter(a, "tidings_cell_replicas_refused_total").await, 0.0);

    // The tenant is shredded in its home: its copy in the DR cell is shredded too.
    let admin_a = common::admin::Admin::new(a.server());
    let (status, shred) = admin_a
        .post_json(
            "/v1/admin/keys/shred",
            &a.admin_token("vip"),
            serde_json::json!({"tenant": "vip", "confirm": "vip"}),
        )
        .await;
    assert_eq!(status, 200, "{shred}");
    assert_eq!(shred["other_cells_told"], true);
    for cell in [&*b, &*c] {
        eventually("every cell learns of the shred", || {
            show(cell, "vip")["shredded"] == true
        })
        .await;
    }

    // Residency: the third cell never got anything; b never got the local tenant.
    assert_eq!(counter(c, "tidings_cell_replicas_applied_total").await, 0.0);
    assert_eq!(counter(c, "tidings_cell_replicas_refused_total").await, 0.0);
    assert!(counter(b, "tidings_cell_replicas_applied_total").await > 0.0);

    // Operators' mistakes are refused: placing from a cell that is not the home, and a DR
    // cell for a tenant that already has history (copying it over is not built).
    let elsewhere = b.cell_cli("newcomer", &["place", "--home", "a"]);
    assert!(!elsewhere.status.success());
    assert!(common::stderr(&elsewhere).contains("home cell"));
    let late = a.cell_cli("local", &["place", "--home", "a", "--dr", "b"]);
    assert!(!late.status.success());
    assert!(common::stderr(&late).contains("already has conversations"));

    // A hostile peer on the link: a batch for a tenant c does not replicate, one writing
    // another tenant's keys, and bytes that are no batch at all are refused and counted;
    // nothing is applied.
    let link = async_nats::ConnectOptions::with_user_and_password("cell".into(), "cell".into())
        .connect(format!("nats://127.0.0.1:{}", c.nats.port))
        .await
        .expect("connect to c's link account");
    let js = async_nats::jetstream::new(link.clone());
    let forged = tidings_schemas::storage::ReplicaBatch {
        source: "a".into(),
        tenant: "vip".into(),
        conversation: "team".into(),
        partitions: 16,
        epoch: 99,
        n: 1,
        dr: "c".into(),
        writes: vec![tidings_schemas::storage::ReplicaWrite {
            key: b"hd\0local\0desk".to_vec(),
            value: Some(vec![1, 2, 3]),
        }],
        ..Default::default()
    };
    for payload in [
        prost::Message::encode_to_vec(&forged),
        b"not a batch".to_vec(),
    ] {
        js.publish("tidings.cell.c.in.a.0", payload.into())
            .await
            .expect("publish")
            .await
            .expect("c's stream takes it");
    }
    counter_reaches(
        c,
        "tidings_cell_replicas_refused_total",
        2.0,
        "c refuses the forged batches",
    )
    .await;
    assert_eq!(counter(c, "tidings_cell_replicas_applied_total").await, 0.0);

    // Without the cells' link key nobody can pass for a cell: a batch b would take from a
    // (the right tenant, source and DR cell, but no MAC), and a directory entry moving the
    // local tenant to c, are refused; b's directory is unchanged.
    let unsigned = tidings_schemas::storage::ReplicaBatch {
        dr: "b".into(),
        writes: Vec::new(),
        ..forged
    };
    js.publish(
        "tidings.cell.b.in.a.0",
        prost::Message::encode_to_vec(&unsigned).into(),
    )
    .await
    .expect("publish")
    .await
    .expect("b's stream takes it");
    let moved = tidings_schemas::storage::CellPlacement {
        home: "c".into(),
        version: 99,
        ..Default::default()
    };
    let entry = serde_json::json!([{
        "tenant": "local",
        "placement": tidings_log::crypto::hex_encode(&prost::Message::encode_to_vec(&moved)),
        "mac": "00".repeat(32),
    }]);
    link.publish("tidings.cell.dir.changed", entry.to_string().into())
        .await
        .expect("publish");
    link.flush().await.expect("flush");
    counter_reaches(
        b,
        "tidings_cell_replicas_refused_total",
        2.0,
        "b refuses the forgeries",
    )
    .await;
    assert_eq!(show(b, "local")["home"], "a");
    assert_eq!(show(b, "local")["version"], 1);
    b.server = None;
    let read = b
        .sandbox
        .run(&["log", "read", "--tenant", "local", "--conv", "desk"]);
    assert!(
        !read.status.success(),
        "b has no conversation of the local tenant"
    );
    assert_eq!(
        common::error_line(&read)["error"]["code"],
        "conversation_not_found"
    );
    // b's copy of the shredded tenant opens no more, as b's audit log records.
    let read = b
        .sandbox
        .run(&["log", "read", "--tenant", "vip", "--conv", "team"]);
    assert!(!read.status.success(), "b's copy of vip is shredded");
    assert_eq!(
        common::error_line(&read)["error"]["code"],
        "tenant_shredded"
    );
    let shreds = |cell: &Cell| -> Vec<Value> {
        let out = cell
            .sandbox
            .run(&["compliance", "audit", "--tenant", "vip"]);
        assert!(out.status.success(), "audit: {}", common::stderr(&out));
        common::json_lines(&out.stdout)
            .into_iter()
            .filter(|r| r["action"] == "shred" && r["outcome"] == "completed")
            .collect()
    };
    let in_b = shreds(b);
    assert_eq!(in_b.len(), 1, "{in_b:?}");
    assert_eq!(in_b[0]["via"], "cell");
    // The third cell held no copy: it shredded nothing.
    c.server = None;
    assert_eq!(shreds(c), Vec::<Value>::new());
}

/// The browser client, signed in at a cell that does not serve the tenant, opens the web
/// client of the cell that does (it may only talk to its own origin).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_client_opens_the_tenants_own_cell() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(driver) = common::browser::Driver::start("cells::browser_redirect").await else {
        return;
    };
    let mut cs = cells(&["a", "b"], &[]);
    for c in &mut cs {
        c.start();
    }
    let (a, b) = (&cs[0], &cs[1]);
    answer(a.cell_cli("acme", &["place", "--home", "a"]));
    eventually("b learns the placement", || show(b, "acme")["version"] == 1).await;
    let page = driver.browser().await;
    page.goto(&format!("http://127.0.0.1:{}/app/", b.gateway_port))
        .await;
    page.wait(
        "the development form",
        "return !document.getElementById('dev-form').hidden",
    )
    .await;
    page.clear("#dev-tenant").await;
    page.type_into("#dev-tenant", "acme").await;
    page.type_into("#dev-user", "alice").await;
    page.click("#dev-signin").await;
    let home = format!("http://127.0.0.1:{}", a.gateway_port);
    page.wait(
        "the page to move to cell a",
        &format!("return location.origin === '{home}' && location.pathname === '/app/'"),
    )
    .await;
    page.quit().await;
}
