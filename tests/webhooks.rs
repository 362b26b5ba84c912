//! Outgoing webhooks end to end (issue 16, part 3): a real nats-server, a real `tidings
//! serve`, messages sent through the gateway, and a real HTTP receiver in this test that
//! checks every signature with the subscription's secret (and with a wrong one, which must
//! fail), answers 500 when told to, and is stopped and started again.

use std::collections::HashSet;
use std::time::Duration;

use crate::common;
use crate::common::admin::Admin;
use crate::common::receiver::{Delivery, Receiver, WAIT};
use crate::common::{Nats, Sandbox, Server};
use serde_json::{Value, json};
use tidings_client::Connection;

/// Fast retries, so failures and recoveries take milliseconds.
const FAST: &[(&str, &str)] = &[
    ("TIDINGS_WEBHOOKS_BACKOFF_FIRST_MS", "20"),
    ("TIDINGS_WEBHOOKS_BACKOFF_MAX_MS", "200"),
    ("TIDINGS_WEBHOOKS_REFRESH_MS", "100"),
    ("TIDINGS_WEBHOOKS_REQUEST_TIMEOUT_MS", "2000"),
    ("TIDINGS_WEBHOOKS_ACK_WAIT_MS", "5000"),
];

async fn connect(server: &Server, s: &Sandbox, user: &str) -> Connection {
    let token = s.token("acme", user, 3600);
    Connection::open(&server.url(), &token, "test")
        .await
        .expect("connect and hello")
        .0
}

/// Sends `text` to `conv`; its seq.
async fn send(conn: &Connection, conv: &str, id: &str, text: &str) -> u64 {
    conn.requester()
        .send_text(conv, id, text)
        .await
        .expect("send")
        .seq
}

/// Every delivery once (no seq twice), in seq order per conversation, each signed.
fn assert_once_in_order_signed(got: &[Delivery]) {
    let mut seen = HashSet::new();
    let mut ids = HashSet::new();
    let mut last: std::collections::HashMap<&str, u64> = Default::default();
    for d in got {
        assert!(
            seen.insert((d.conversation.clone(), d.seq)),
            "delivered twice: {d:?}"
        );
        let before = last.insert(&d.conversation, d.seq).unwrap_or(0);
        assert!(d.seq > before, "out of order: {d:?} after seq {before}");
        assert!(d.signed, "signature does not verify: {d:?}");
        assert!(
            !d.signed_with_wrong_secret,
            "a wrong secret must not verify: {d:?}"
        );
        assert!(d.event_id_header_matches, "{d:?}");
        assert!(ids.insert(d.event_id.clone()), "event id twice: {d:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_once_in_order_signed_through_500s_and_a_receiver_restart() {
    let s = Sandbox::new();
    s.group("team");
    s.group("other");
    // Made with the CLI on the store before the server runs; only messages of `team`.
    let (mut receiver, created) = Receiver::subscribed(
        &s,
        &[
            "--conv",
            "team",
            "--event-kind",
            "message_posted",
            // Enough tries to outlast the receiver's restart below (backoff at most 200 ms).
            "--max-attempts",
            "100",
            "--actor",
            "ops-1",
        ],
    )
    .await;
    let secret = created["secret"].as_str().expect("secret shown once");
    assert!(secret.starts_with("whsec_"), "{secret}");
    let listed = s.ok(&["webhook", "list", "--tenant", "acme"]);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], created["id"]);
    assert!(listed[0].get("secret").is_none());
    assert!(!listed[0].to_string().contains(secret));

    let nats = Nats::start();
    let server = Server::start(&s, &nats, "all", FAST);
    let alice = connect(&server, &s, "alice").await;

    // Five messages, one in a conversation not subscribed, one event of a kind not
    // subscribed in between.
    let mut seqs = Vec::new();
    for i in 0..3 {
        seqs.push(send(&alice, "team", &format!("a{i}"), &format!("hello {i}")).await);
    }
    send(&alice, "other", "o1", "not for the hook").await;
    alice
        .requester()
        .add_member("team", "carol")
        .await
        .expect("add carol");
    for i in 3..5 {
        seqs.push(send(&alice, "team", &format!("a{i}"), &format!("hello {i}")).await);
    }
    let got = receiver.wait_for(5).await;
    assert_eq!(
        got.iter().map(|d| d.seq).collect::<Vec<_>>(),
        seqs,
        "exactly the subscribed events, in order"
    );
    assert!(got.iter().all(|d| d.conversation == "team"));
    assert!(got.iter().all(|d| d.kind == "message_posted"));
    assert_eq!(
        got.iter().map(|d| d.text.as_str()).collect::<Vec<_>>(),
        ["hello 0", "hello 1", "hello 2", "hello 3", "hello 4"]
    );
    assert!(got.iter().all(|d| d.attempt == 1));
    assert_once_in_order_signed(&got);

    // The receiver answers 500 twice, then recovers: the event comes on the third try.
    receiver.refuse_next(2);
    seqs.push(send(&alice, "team", "a5", "after two refusals").await);
    let got = receiver.wait_for(6).await;
    assert_eq!(receiver.refused(), 2);
    assert_eq!((got[5].seq, got[5].attempt), (seqs[5], 3));

    // The receiver goes away; events sent meanwhile arrive once it is back, once each.
    receiver.stop();
    for i in 6..9 {
        seqs.push(send(&alice, "team", &format!("a{i}"), &format!("while down {i}")).await);
    }
    // Let the dispatcher fail against the closed port a few times.
    tokio::time::sleep(Duration::from_millis(300)).await;
    receiver.restart().await;
    let got = receiver.wait_for(9).await;
    assert_eq!(got.iter().map(|d| d.seq).collect::<Vec<_>>(), seqs);
    assert_once_in_order_signed(&got);

    // Nothing more comes: one more event, and exactly it follows.
    seqs.push(send(&alice, "team", "a9", "last").await);
    let got = receiver.wait_for(10).await;
    assert_eq!(got.iter().map(|d| d.seq).collect::<Vec<_>>(), seqs);
    assert_once_in_order_signed(&got);

    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", server.admin_port))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /metrics"))
    };
    assert_eq!(value("tidings_webhook_delivered_total"), 10.0);
    assert!(value("tidings_webhook_retries_total") >= 2.0);
    assert_eq!(value("tidings_webhook_dead_letters_total"), 0.0);
    assert_eq!(value("tidings_webhook_subscriptions"), 1.0);
}

/// (actor, action, outcome) of each webhook record of an audit log's lines.
fn webhook_trail(audit: &[Value]) -> Vec<(String, String, String)> {
    let text = |l: &Value, field: &str| l[field].as_str().unwrap_or("").to_string();
    audit
        .iter()
        .filter(|l| text(l, "action").starts_with("webhook"))
        .map(|l| (text(l, "actor"), text(l, "action"), text(l, "outcome")))
        .collect()
}

fn row(actor: &str, action: &str, outcome: &str) -> (String, String, String) {
    (actor.to_string(), action.to_string(), outcome.to_string())
}

fn lines(text: &str) -> Vec<Value> {
    common::json_lines(text.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_replay_isolation_and_audit_over_http() {
    let s = Sandbox::new();
    s.group("team");
    let receiver = Receiver::start().await;
    let nats = Nats::start();
    let server = Server::start(&s, &nats, "all", FAST);
    let admin = Admin::new(&server);
    let acme = s.token_with_roles("acme", "ops", &["admin", "compliance"], 3600);

    let (status, created) = admin
        .post_json(
            "/v1/admin/webhooks",
            &acme,
            json!({"url": receiver.url(), "conversations": ["team"], "max_attempts": 2}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().expect("id").to_string();
    let secret = created["secret"].as_str().expect("secret").to_string();
    receiver.set_secret(&secret);
    let (status, listed) = admin.get_text("/v1/admin/webhooks", &acme).await;
    assert_eq!(status, 200);
    let listed = lines(&listed);
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["id"], json!(id));
    assert_eq!(listed[0]["max_attempts"], json!(2));
    assert!(listed[0].get("secret").is_none() && !listed[0].to_string().contains(&secret));
    assert_eq!(listed[1], json!({"complete": true, "rows": 1}));

    // Refused twice each (max_attempts 2): both events dead-lettered, in order.
    receiver.refuse_next(4);
    let alice = connect(&server, &s, "alice").await;
    let first = send(&alice, "team", "d1", "doomed 1").await;
    let second = send(&alice, "team", "d2", "doomed 2").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let dead = loop {
        let (status, text) = admin
            .get_text(&format!("/v1/admin/webhooks/dead?id={id}"), &acme)
            .await;
        assert_eq!(status, 200, "{text}");
        let dead = lines(&text);
        if dead.len() == 3 {
            break dead;
        }
        assert!(tokio::time::Instant::now() < deadline, "{dead:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(receiver.refused(), 4);
    assert!(receiver.delivered().is_empty());
    assert_eq!(
        dead[..2]
            .iter()
            .map(|d| (d["seq"].as_u64(), d["attempts"].as_u64()))
            .collect::<Vec<_>>(),
        [(Some(first), Some(2)), (Some(second), Some(2))]
    );
    assert_eq!(dead[0]["last_error"], json!("HTTP 500"));

    // A replay from the first dead seq delivers both, in order, once the receiver is well.
    let (status, replay) = admin
        .post_json(
            "/v1/admin/webhooks/replay",
            &acme,
            json!({"id": id, "conv": "team", "from_seq": first}),
        )
        .await;
    assert_eq!(status, 200, "{replay}");
    let got = receiver.wait_for(2).await;
    assert_eq!(
        got.iter().map(|d| d.seq).collect::<Vec<_>>(),
        [first, second]
    );
    assert_once_in_order_signed(&got);
    // Live delivery goes on after the replay.
    let third = send(&alice, "team", "d3", "alive").await;
    let got = receiver.wait_for(3).await;
    assert_eq!(
        got.iter().map(|d| d.seq).collect::<Vec<_>>(),
        [first, second, third]
    );
    // A replay from past the head delivers nothing again and skips nothing after.
    let (status, _) = admin
        .post_json(
            "/v1/admin/webhooks/replay",
            &acme,
            json!({"id": id, "conv": "team", "from_seq": 1000}),
        )
        .await;
    assert_eq!(status, 200);
    // Taken up within a refresh (100 ms); a later event must still come, and alone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fourth = send(&alice, "team", "d4", "still alive").await;
    let got = receiver.wait_for(4).await;
    assert_eq!(
        got.iter().map(|d| d.seq).collect::<Vec<_>>(),
        [first, second, third, fourth]
    );

    // Tenant isolation: beta's admin sees and touches none of acme's subscriptions.
    let beta = s.token_with_roles("beta", "intruder", &["admin"], 3600);
    let (status, _) = admin
        .get_text("/v1/admin/webhooks?tenant=acme", &beta)
        .await;
    assert_eq!(status, 403);
    let (status, _) = admin
        .post_json(
            "/v1/admin/webhooks/delete",
            &beta,
            json!({"tenant": "acme", "id": id}),
        )
        .await;
    assert_eq!(status, 403);
    let (status, answer) = admin
        .post_json("/v1/admin/webhooks/delete", &beta, json!({"id": id}))
        .await;
    assert_eq!(status, 404, "{answer}");
    let (status, text) = admin
        .get_text(&format!("/v1/admin/webhooks/dead?id={id}"), &beta)
        .await;
    assert_eq!(status, 404, "{text}");
    let (status, listed) = admin.get_text("/v1/admin/webhooks", &beta).await;
    assert_eq!((status, lines(&listed).len()), (200, 1));
    // Without the admin role: refused.
    let officer = s.token_with_roles("acme", "officer", &["compliance"], 3600);
    let (status, _) = admin.get_text("/v1/admin/webhooks", &officer).await;
    assert_eq!(status, 403);
    // Malformed: refused with the reason.
    let (status, answer) = admin
        .post_json(
            "/v1/admin/webhooks",
            &acme,
            json!({"url": "ftp://example.com/"}),
        )
        .await;
    assert_eq!(status, 400, "{answer}");

    let (status, deleted) = admin
        .post_json("/v1/admin/webhooks/delete", &acme, json!({"id": id}))
        .await;
    assert_eq!((status, &deleted["deleted"]), (200, &json!(true)));
    let (_, listed) = admin.get_text("/v1/admin/webhooks", &acme).await;
    assert_eq!(lines(&listed), [json!({"complete": true, "rows": 0})]);

    // The audit log: each change, and the refusals, where they were aimed.
    let (status, audit) = admin.get_text("/v1/compliance/audit", &acme).await;
    assert_eq!(status, 200);
    let trail = webhook_trail(&lines(&audit));
    assert_eq!(
        trail,
        [
            row("acme/ops", "webhook_create", "completed"),
            row("acme/ops", "webhook_replay", "completed"),
            row("acme/ops", "webhook_replay", "completed"),
            row("beta/intruder", "webhook_list", "denied"),
            row("beta/intruder", "webhook_delete", "denied"),
            row("acme/officer", "webhook_list", "denied"),
            row("acme/ops", "webhook_create", "denied"),
            row("acme/ops", "webhook_delete", "completed"),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_loses_the_memory_stream_but_no_event() {
    let s = Sandbox::new();
    s.group("team");
    let (receiver, _) = Receiver::subscribed(&s, &[]).await;
    let mut nats = Nats::start();
    let server = Server::start(&s, &nats, "all", FAST);
    let alice = connect(&server, &s, "alice").await;
    let mut seqs = vec![send(&alice, "team", "n1", "before").await];
    receiver.wait_for(1).await;

    // The stream and its consumers live in NATS's memory: a restart loses them. The
    // publisher makes the stream again, the dispatcher its consumer; the cursor says where
    // delivery stood.
    nats.restart();
    for i in 2..5 {
        seqs.push(send(&alice, "team", &format!("n{i}"), "after").await);
    }
    let got = receiver.wait_for(4).await;
    assert_eq!(got.iter().map(|d| d.seq).collect::<Vec<_>>(), seqs);
    assert_once_in_order_signed(&got);
}

#[test]
fn the_cli_manages_subscriptions_on_the_store_and_audits_each_change() {
    let s = Sandbox::new();
    let created = s.ok(&[
        "webhook",
        "create",
        "--tenant",
        "acme",
        "--url",
        "https://hooks.example.com/t",
        "--conv-kind",
        "class",
        "--event-kind",
        "member_joined",
        "--actor",
        "ops-1",
    ]);
    let id = created[0]["id"].as_str().expect("id");
    assert_eq!(created[0]["conversation_kinds"], json!(["class"]));
    assert_eq!(created[0]["max_attempts"], json!(8));
    s.ok(&[
        "webhook", "replay", "--tenant", "acme", "--id", id, "--conv", "team", "--from", "3",
        "--actor", "ops-1",
    ]);
    assert!(
        s.ok(&["webhook", "dead-letters", "--tenant", "acme", "--id", id])
            .is_empty()
    );
    // Another tenant does not have it; bad input is refused before anything is written.
    let out = s.run(&["webhook", "delete", "--tenant", "beta", "--id", id]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("not_found"),
        "{}",
        common::stderr(&out)
    );
    for bad in [
        vec!["--url", "ftp://example.com/"],
        vec!["--url", "https://example.com/", "--event-kind", "typing"],
        vec!["--url", "https://example.com/", "--max-attempts", "0"],
    ] {
        let mut args = vec!["webhook", "create", "--tenant", "acme"];
        args.extend(bad);
        assert!(!s.run(&args).status.success(), "{args:?}");
    }
    s.ok(&[
        "webhook", "delete", "--tenant", "acme", "--id", id, "--actor", "ops-2",
    ]);
    assert!(s.ok(&["webhook", "list", "--tenant", "acme"]).is_empty());
    let audit = s.ok(&["compliance", "audit", "--tenant", "acme"]);
    let changes = webhook_trail(&audit);
    assert_eq!(
        changes,
        [
            row("ops-1", "webhook_create", "completed"),
            row("ops-1", "webhook_replay", "completed"),
            row("ops-2", "webhook_delete", "completed"),
        ]
    );
}
