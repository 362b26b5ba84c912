//! Interceptors end to end (issue 16): a real nats-server, a real `tidings serve`, and the
//! tenants' hooks as NATS responders in the test. A hook that rejects (the sender gets
//! REJECTED with its reason, nothing is committed), one that allows (and sees the JSON
//! request), and hooks that never answer, fail-closed (the send is refused UNAVAILABLE,
//! retryable, nothing committed) and fail-open (the send goes through).

use std::time::Duration;

use crate::common;
use crate::common::{Nats, Sandbox, Server};
use futures_util::StreamExt;
use serde_json::Value;
use tidings_client::client::{self as proto, client_frame::Op};
use tidings_client::{ClientError, Connection, Requester};

const WAIT: Duration = Duration::from_secs(20);

const CONFIG: &str = r#"
[[log.interceptors]]
tenant = "acme"
subject = "tidings.intercept.acme"
deadline_ms = 2000

[[log.interceptors]]
tenant = "closed"
subject = "tidings.intercept.silent"
deadline_ms = 300
fail = "closed"

[[log.interceptors]]
tenant = "open"
subject = "tidings.intercept.silent"
deadline_ms = 300
fail = "open"
"#;

/// The acme hook: rejects any text with "SECRET" in it, allows the rest, and hands every
/// request it saw to the test.
async fn acme_hook(nats: &Nats) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let mut requests = client
        .subscribe("tidings.intercept.acme")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            let request: Value = serde_json::from_slice(&msg.payload).expect("JSON request");
            let text = request["text"].as_str().unwrap_or("").to_string();
            let _ = tx.send(request);
            let verdict = if text.contains("SECRET") {
                r#"{"allow":false,"reason":"contains a secret\u0007 marker"}"#
            } else {
                r#"{"allow":true}"#
            };
            if let Some(reply) = msg.reply {
                client.publish(reply, verdict.into()).await.expect("reply");
            }
        }
    });
    rx
}

/// A hook that takes requests and never answers; the count of requests it took.
async fn silent_hook(nats: &Nats) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let mut requests = client
        .subscribe("tidings.intercept.silent")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        let _client = client;
        while requests.next().await.is_some() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    seen
}

fn refused(result: Result<proto::SendAck, ClientError>) -> (proto::ErrorCode, String) {
    match result {
        Err(ClientError::Server { code, message, .. }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn head(r: &Requester, conv: &str) -> Vec<String> {
    r.history(conv, 0, 100)
        .await
        .expect("history")
        .events
        .iter()
        .filter_map(|e| match &e.body {
            Some(tidings_schemas::v1::event::Body::MessagePosted(p)) => Some(p.text.clone()),
            _ => None,
        })
        .collect()
}

async fn edit(
    r: &Requester,
    conv: &str,
    id: &str,
    target_seq: u64,
    text: &str,
) -> Result<proto::SendAck, ClientError> {
    let op = Op::Send(proto::Send {
        client_msg_id: id.into(),
        conversation: conv.into(),
        body: Some(proto::send::Body::MessageEdited(
            tidings_schemas::v1::MessageEdited {
                target_seq,
                new_text: text.into(),
            },
        )),
    });
    match r.request(op).await? {
        proto::server_frame::Msg::SendAck(a) => Ok(a),
        other => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_allow_reject_and_fail_open_or_closed_by_config() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s = Sandbox::new();
    std::fs::write(s.path().join("tidings.toml"), CONFIG).expect("config");
    for tenant in ["acme", "closed", "open"] {
        s.group_in(tenant, "team");
    }
    let nats = Nats::start();
    let mut seen = acme_hook(&nats).await;
    let silent = silent_hook(&nats).await;
    let server = Server::start(&s, &nats, "all", &[]);

    let (alice, _) = Connection::open(&server.url(), &s.token("acme", "alice", 600), "t")
        .await
        .expect("alice");
    let r = alice.requester();

    // Allowed: committed, and the hook saw what was sent, with the conversation's kind.
    let ack = r
        .send_text("team", "m1", "hello team")
        .await
        .expect("allowed");
    let request = tokio::time::timeout(WAIT, seen.recv())
        .await
        .expect("the hook was asked")
        .expect("request");
    assert_eq!(request["tenant"], "acme");
    assert_eq!(request["conversation"], "team");
    assert_eq!(request["kind"], "group");
    assert_eq!(request["sender"], "alice");
    assert_eq!(request["event"], "message_posted");
    assert_eq!(request["text"], "hello team");

    // Rejected: a typed error with the hook's reason (its control character dropped);
    // nothing committed. An edit to a secret is rejected the same way.
    let (code, message) = refused(r.send_text("team", "m2", "the SECRET plan").await);
    assert_eq!(code, proto::ErrorCode::Rejected);
    assert_eq!(message, "rejected: contains a secret marker");
    let (code, _) = refused(edit(&r, "team", "m3", ack.seq, "now with a SECRET").await);
    assert_eq!(code, proto::ErrorCode::Rejected);
    assert_eq!(head(&r, "team").await, vec!["hello team".to_string()]);
    let events = r.history("team", 0, 100).await.expect("history").events;
    assert!(
        events.iter().all(|e| !matches!(
            e.body,
            Some(tidings_schemas::v1::event::Body::MessageEdited(_))
        )),
        "a rejected edit was committed: {events:?}"
    );
    drop(alice);

    // A hook that never answers: fail-closed refuses (retryable), nothing committed...
    let (closed, _) = Connection::open(&server.url(), &s.token("closed", "alice", 600), "t")
        .await
        .expect("closed tenant");
    let r = closed.requester();
    match r.send_text("team", "c1", "hello").await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, proto::ErrorCode::Unavailable),
        other => panic!("fail-closed let a send through: {other:?}"),
    }
    assert!(head(&r, "team").await.is_empty());
    // ...and fail-open lets it through unchecked.
    let (open, _) = Connection::open(&server.url(), &s.token("open", "alice", 600), "t")
        .await
        .expect("open tenant");
    let r = open.requester();
    r.send_text("team", "o1", "hello anyway")
        .await
        .expect("fail-open");
    assert_eq!(head(&r, "team").await, vec!["hello anyway".to_string()]);
    assert_eq!(
        silent.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the silent hook was asked once per tenant"
    );
}

/// A configuration whose rule cannot be right is refused at start, saying which.
#[test]
fn a_bad_rule_stops_the_server_from_starting() {
    let s = Sandbox::new();
    std::fs::write(
        s.path().join("tidings.toml"),
        "[[log.interceptors]]\nsubject = \"tidings.ev.acme\"\n",
    )
    .expect("config");
    let out = s.run(&["serve"]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(
        err.contains("log.interceptors[0]") && err.contains("tidings.intercept."),
        "{err}"
    );
}
