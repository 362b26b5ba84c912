//! The bus carries no readable content and the log trusts no name in a payload
//! (docs/decisions/sealed-bus.md, docs/decisions/rpc-identity.md). Real nats-server, real log,
//! real `tidings serve` processes; a raw NATS client plays the observer and the attacker.

use std::sync::Arc;
use std::time::Duration;

use crate::common;
use crate::common::{Nats, Sandbox, Server};
use futures_util::StreamExt;
use prost::Message;
use tidings_client::{Connection, Push};
use tidings_log::crypto::MasterKey;
use tidings_log::store::{FjallStore, KvStore};
use tidings_log::{
    Append, ClientMsgId, ConvId, CreateConversation, Log, LogConfig, ReadRange, TenantId, UserId,
};
use tidings_log_api::bus_crypto::LogPublicKey;
use tidings_log_api::rpc::NatsLogService;
use tidings_log_api::{Caller, LogService, bus_crypto};
use tidings_log_role::{publisher, rpc_server as rpc};
use tidings_schemas::internal as wire;

const WAIT: Duration = Duration::from_secs(20);

/// A log in this process, serving the RPC on `nats`, with conversation `general` of
/// alice and bob in tenant `acme`.
struct LogOnNats {
    log: Log,
    _dir: tempfile::TempDir,
    serving: tokio::task::JoinHandle<Result<(), tidings_log_role::rpc_server::ServeError>>,
}

impl LogOnNats {
    /// A gateway's log service on `client`, pinning this log's identity.
    fn service(&self, client: async_nats::Client) -> NatsLogService {
        NatsLogService::new(client, Duration::from_secs(5), self.pinned())
    }

    fn pinned(&self) -> LogPublicKey {
        LogPublicKey::of_secret(&self.log.log_identity_secret())
    }
}

impl Drop for LogOnNats {
    fn drop(&mut self) {
        self.serving.abort();
    }
}

fn acme() -> (TenantId, ConvId) {
    (
        TenantId::new("acme").expect("id"),
        ConvId::new("general").expect("id"),
    )
}

fn user(name: &str) -> UserId {
    UserId::new(name).expect("id")
}

async fn log_on_nats(
    nats: &Nats,
    feed: Option<tokio::sync::mpsc::Sender<tidings_log::FeedItem>>,
) -> LogOnNats {
    log_on_nats_with(nats, feed, LogConfig::default()).await
}

async fn log_on_nats_with(
    nats: &Nats,
    feed: Option<tokio::sync::mpsc::Sender<tidings_log::FeedItem>>,
    cfg: LogConfig,
) -> LogOnNats {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(dir.path()).expect("store"));
    let log = Log::open_with_feed(store, MasterKey::generate(), cfg, feed)
        .await
        .expect("log");
    let (t, c) = acme();
    log.create_conversation(CreateConversation {
        tenant: t,
        conv: c,
        kind: "group".into(),
        title: "General".into(),
        creator: user("alice"),
        members: vec![user("bob")],
    })
    .await
    .expect("create");
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let serving = tokio::spawn(rpc::serve(
        client.clone(),
        log.clone(),
        common::identity::rpc_auth(),
        64,
    ));
    client.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(200)).await; // subscriptions in place
    LogOnNats {
        log,
        _dir: dir,
        serving,
    }
}

fn text_append(sender: &str, id: &str, text: &str) -> Append {
    let (t, c) = acme();
    Append::text(
        t,
        c,
        user(sender),
        ClientMsgId::new(id).expect("id"),
        text.to_string(),
    )
}

/// (subject, payload) of every message a [`Capture`] saw.
type Captured = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// Everything a raw subscriber receives on `subjects` from now until `stop` resolves.
struct Capture {
    payloads: Captured,
    task: tokio::task::JoinHandle<()>,
}

impl Capture {
    async fn start(nats: &Nats, subjects: &[&str]) -> Capture {
        let client = async_nats::connect(nats.url()).await.expect("nats");
        let mut subs = Vec::new();
        for s in subjects {
            subs.push(client.subscribe(s.to_string()).await.expect("subscribe"));
        }
        client.flush().await.expect("flush");
        let mut all = futures_util::stream::select_all(subs);
        let payloads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = payloads.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            while let Some(msg) = all.next().await {
                sink.lock()
                    .expect("lock")
                    .push((msg.subject.to_string(), msg.payload.to_vec()));
            }
        });
        Capture { payloads, task }
    }

    fn take(&self) -> Vec<(String, Vec<u8>)> {
        std::mem::take(&mut *self.payloads.lock().expect("lock"))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_refuses_a_forged_sender_and_a_write_without_a_token() {
    let nats = Nats::start();
    let served = log_on_nats(&nats, None).await;
    // The attacker holds a working gateway connection to NATS and alice's valid token.
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let service = served.service(client);
    let as_alice = common::identity::user("acme", "alice");

    let forged = service
        .append(&as_alice, text_append("bob", "forged-1", "I am bob"))
        .await
        .expect_err("alice's token cannot send as bob");
    assert_eq!(forged.code(), "not_allowed", "{forged}");
    let anonymous = service
        .append(&Caller::Gateway, text_append("bob", "forged-2", "no token"))
        .await
        .expect_err("a write without a token");
    assert_eq!(anonymous.code(), "not_allowed", "{anonymous}");
    let (t, c) = acme();
    let added = service
        .add_member(&as_alice, &t, &c, &user("bob"), &user("mallory"), None)
        .await
        .expect_err("alice cannot act as bob adding someone");
    assert_eq!(added.code(), "not_allowed", "{added}");
    let globex = common::identity::user("globex", "alice");
    let cross = service
        .append(
            &globex,
            text_append("alice", "cross-1", "other tenant's token"),
        )
        .await
        .expect_err("a token of another tenant");
    assert_eq!(cross.code(), "not_allowed", "{cross}");

    // Nothing of those was written: only the creation is in the conversation.
    let events = served
        .log
        .read(&t, &c, ReadRange::forward(1, 100))
        .await
        .expect("read");
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1]);

    // Alice as herself works; the gateway's own read works without a token.
    let ok = service
        .append(&as_alice, text_append("alice", "real-1", "hello"))
        .await
        .expect("alice as alice");
    assert_eq!(ok.seq, 2);
    let read = service
        .read(&Caller::Gateway, &t, &c, ReadRange::forward(1, 10))
        .await
        .expect("gateway read");
    assert_eq!(read.len(), 2);

    // A request in the old, unsealed form is not even opened.
    let raw = async_nats::connect(nats.url()).await.expect("nats");
    let plain = wire::LogRequest {
        tenant: "acme".into(),
        call: Some(wire::log_request::Call::Append(wire::Append {
            conversation: "general".into(),
            sender: "bob".into(),
            client_msg_id: "plain-1".into(),
            body: None,
        })),
        ..Default::default()
    };
    let reply = raw
        .request(
            tidings_log_api::subjects::LOG_RPC,
            plain.encode_to_vec().into(),
        )
        .await
        .expect("reply");
    let reply = wire::RpcReply::decode(reply.payload.as_ref()).expect("reply decodes");
    assert!(
        matches!(reply.body, Some(wire::rpc_reply::Body::Refused(ref e)) if e.code == "invalid_request"),
        "{reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transport_key_never_travels_in_the_clear() {
    let nats = Nats::start();
    let served = log_on_nats(&nats, None).await;
    let capture = Capture::start(&nats, &[">"]).await;
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let service = served.service(client.clone());
    let (t, _) = acme();
    let got = service.transport_key(&t, None).await.expect("exchange");
    let real = served.log.transport_key(&t, None).await.expect("key");
    assert!(got.same_secret(&real), "the gateway got the tenant's key");
    assert_eq!(got.id, real.id);
    client.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = capture.take();
    assert!(
        seen.len() >= 2,
        "the exchange went over NATS: {:?}",
        seen.iter().map(|(s, _)| s).collect::<Vec<_>>()
    );
    let key = real.secret_bytes_for_tests();
    for (subject, payload) in &seen {
        // No 16-byte piece of the key, anywhere.
        for piece in key.chunks(16) {
            assert!(!contains(payload, piece), "key bytes on {subject}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_on_the_stream_are_sealed_and_bound_to_their_place() {
    let nats = Nats::start();
    let (feed_tx, feed_rx) = tokio::sync::mpsc::channel(1024);
    let served = log_on_nats(&nats, Some(feed_tx)).await;
    let capture = Capture::start(&nats, &["tidings.ev.>"]).await;
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let (publisher, _stats) = publisher::spawn(
        client,
        feed_rx,
        served.log.keyring().clone(),
        publisher::PublisherConfig::default(),
    );
    let marker = "marker-3f9c2e-in-the-clear";
    served
        .log
        .append(text_append("alice", "m1", marker))
        .await
        .expect("append");
    // The creation (seq 1) was fed too: wait for the message's envelope (seq 2).
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    let env = loop {
        seen.extend(capture.take());
        if let Some(env) = seen
            .iter()
            .filter(|(s, _)| s == "tidings.ev.acme.general")
            .filter_map(|(_, p)| bus_crypto::envelope(p).ok())
            .find(|env| env.seq == 2)
        {
            break env;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no event on the stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (subject, payload) in &seen {
        assert!(
            !contains(payload, marker.as_bytes()),
            "text in the clear on {subject}"
        );
    }
    let (t, c) = acme();
    let key = served
        .log
        .transport_key(&t, Some(env.key_id))
        .await
        .expect("key");
    let (event, _) = bus_crypto::open_event(&key, &c, &env).expect("opens with the tenant's key");
    assert_eq!(event.seq, 2);
    assert!(matches!(
        event.body,
        Some(tidings_log::Body::MessagePosted(ref p)) if p.text == marker
    ));
    // The same envelope under another conversation's subject does not open.
    let elsewhere = ConvId::new("random").expect("id");
    assert!(bus_crypto::open_event(&key, &elsewhere, &env).is_err());
    publisher.abort();
}

/// The user-facing path with the roles apart: messages flow, and a raw subscriber to every
/// subject and every reply inbox captures no message text and no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_on_nats_cannot_hand_a_gateway_a_key() {
    let nats = Nats::start();
    // The real log exists (the gateway pins its identity) but is not serving: an attacker
    // who can subscribe to the RPC subject answers instead, with a key of its own making.
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(dir.path()).expect("store"));
    let real = Log::open(store, MasterKey::generate(), LogConfig::default())
        .await
        .expect("log");
    let pinned = LogPublicKey::of_secret(&real.log_identity_secret());
    // A log of the attacker's own (its own master key, so its own identity and keys), which
    // answers every request on the RPC subject.
    let impostor = log_on_nats(&nats, None).await;
    let (t, _) = acme();

    let client = async_nats::connect(nats.url()).await.expect("nats");
    let service = NatsLogService::new(client, Duration::from_secs(5), pinned);
    let err = service
        .transport_key(&t, None)
        .await
        .expect_err("a key from an unpinned identity");
    assert!(
        err.to_string()
            .contains("not from the log identity this gateway pins"),
        "{err}"
    );
    // A user's write is never sealed under the impostor's key: it fails instead.
    let err = service
        .append(
            &common::identity::user("acme", "alice"),
            text_append("alice", "m-impostor", "secret plans"),
        )
        .await
        .expect_err("no key, no call");
    assert!(
        err.to_string().contains("not from the log identity"),
        "{err}"
    );
    drop(impostor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_alone_cannot_make_the_log_create_keys_for_a_made_up_tenant() {
    let nats = Nats::start();
    let served = log_on_nats(&nats, None).await;
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let service = served.service(client);
    let made_up = TenantId::new("made-up-tenant").expect("id");
    let err = service
        .transport_key(&made_up, None)
        .await
        .expect_err("no keys for a tenant nobody started");
    assert_eq!(err.code(), "not_allowed", "{err}");
    let has_key = async || {
        served
            .log
            .existing_transport_key(&made_up)
            .await
            .expect("read")
            .is_some()
    };
    assert!(!has_key().await, "the log wrote no key");
    // A token of another tenant does not start it either.
    let err = service
        .conversations(
            &common::identity::user("acme", "mallory"),
            &made_up,
            &UserId::new("mallory").expect("id"),
            None,
            10,
        )
        .await
        .expect_err("another tenant's token");
    assert_eq!(err.code(), "not_allowed", "{err}");
    assert!(!has_key().await, "the log wrote no key");
    // A user of the new tenant does: its first call makes the key and runs.
    let carol = common::identity::user("made-up-tenant", "carol");
    let created = service
        .create_conversation(
            &carol,
            CreateConversation {
                tenant: made_up.clone(),
                conv: ConvId::new("first").expect("id"),
                kind: "group".into(),
                title: "First".into(),
                creator: UserId::new("carol").expect("id"),
                members: Vec::new(),
            },
        )
        .await
        .expect("the tenant's first user starts it");
    assert_eq!(created.seq, 1);
    assert!(has_key().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_keeps_its_retry_after_across_processes() {
    let nats = Nats::start();
    let cfg = LogConfig {
        max_conversations_created_per_user_per_hour: 1,
        ..LogConfig::default()
    };
    let served = log_on_nats_with(&nats, None, cfg).await;
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let service = served.service(client);
    let (t, _) = acme();
    let carol = common::identity::user("acme", "carol");
    let create = |conv: &str| CreateConversation {
        tenant: t.clone(),
        conv: ConvId::new(conv).expect("id"),
        kind: "group".into(),
        title: String::new(),
        creator: user("carol"),
        members: Vec::new(),
    };
    service
        .create_conversation(&carol, create("one"))
        .await
        .expect("the first of the hour");
    let err = service
        .create_conversation(&carol, create("two"))
        .await
        .expect_err("over the hourly cap");
    assert_eq!(err.code(), "rate_limited", "{err}");
    assert!(err.is_retryable());
    let after = err.retry_after_ms();
    assert!(
        (1..=3_600_000).contains(&after),
        "retry_after_ms {after} survives the trip over NATS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_log_and_gateway_processes_put_no_text_on_nats() {
    let s = Sandbox::new();
    let nats = Nats::start();
    s.group("general");
    let capture = Capture::start(&nats, &["tidings.>", "_INBOX.>", "$JS.>"]).await;
    let _log = Server::start(&s, &nats, "log", &[]);
    let gateway = Server::start(&s, &nats, "gateway", &[]);
    let (alice_token, bob_token) = (s.token("acme", "alice", 3600), s.token("acme", "bob", 3600));
    let (alice, _) = Connection::open(&gateway.url(), &alice_token, "test")
        .await
        .expect("alice");
    let (mut bob, _) = Connection::open(&gateway.url(), &bob_token, "test")
        .await
        .expect("bob");
    let marker = "zq-unique-marker-7d41";
    let acked = alice
        .send_text("general", "m1", &format!("{marker} one"))
        .await
        .expect("send");
    assert_eq!(acked.seq, 2);
    let event = next_event(&mut bob).await;
    assert_eq!(event.seq, 2);
    assert_eq!(text(&event), format!("{marker} one"));

    // A forged envelope for the next seq is never delivered; the real event after it is.
    let raw = async_nats::connect(nats.url()).await.expect("nats");
    let forged = wire::SealedEvent {
        key_id: 1,
        seq: 3,
        sealed: b"not sealed at all, just text".to_vec(),
    };
    raw.publish("tidings.ev.acme.general", forged.encode_to_vec().into())
        .await
        .expect("publish");
    raw.flush().await.expect("flush");
    let quiet = tokio::time::timeout(Duration::from_millis(500), bob.next_push()).await;
    assert!(
        !matches!(quiet, Ok(Some(Push::Event(_)))),
        "a forged envelope was delivered: {quiet:?}"
    );
    alice
        .send_text("general", "m2", &format!("{marker} two"))
        .await
        .expect("send");
    let event = next_event(&mut bob).await;
    assert_eq!(
        (event.seq, text(&event)),
        (3, format!("{marker} two").as_str())
    );
    let history = bob.history("general", 0, 10).await.expect("history");
    assert_eq!(history.events.len(), 3);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = capture.take();
    let subjects: std::collections::BTreeSet<String> = seen
        .iter()
        .map(|(s, _)| s.split('.').take(2).collect::<Vec<_>>().join("."))
        .collect();
    assert!(
        subjects.contains("tidings.ev") && subjects.contains("tidings.rpc"),
        "the capture saw the traffic: {subjects:?}"
    );
    for (subject, payload) in &seen {
        assert!(
            !contains(payload, marker.as_bytes()),
            "message text in the clear on {subject}"
        );
        for token in [&alice_token, &bob_token] {
            // The signature part alone identifies the token.
            let signature = token.rsplit('.').next().expect("jws");
            assert!(
                !contains(payload, signature.as_bytes()),
                "a user token in the clear on {subject}"
            );
        }
    }
}

async fn next_event(conn: &mut Connection) -> tidings_schemas::v1::Event {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, conn.next_push()).await {
            Ok(Some(Push::Event(e))) => return e,
            Ok(Some(_)) => {}
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

fn text(e: &tidings_schemas::v1::Event) -> &str {
    match &e.body {
        Some(tidings_schemas::v1::event::Body::MessagePosted(p)) => &p.text,
        _ => "",
    }
}
