//! The publisher: the log's commit feed, delivered to NATS.
//!
//! Each committed event goes to JetStream subject `tidings.ev.<tenant>.<conv>` with
//! `Nats-Msg-Id: <tenant>/<conv>/<seq>` (JetStream drops a re-publish of the same id inside
//! its duplicate window), **sealed** under the tenant's current transport key
//! ([`tidings_log_api::bus_crypto::seal_event`]): key id and seq in the clear, the event not. Membership
//! changes and read cursors go to the affected users' subjects `tidings.user.<tenant>.<user>`
//! on core NATS, so every gateway where the user is online can react at once; they carry ids
//! and seqs only (a conversation id and a seq), which the subject's routing reveals anyway,
//! so they are not sealed.
//!
//! NATS is not the source of truth and must never hold back a send: the log acks after its
//! commit and hands the event to this task through a bounded feed. While NATS is down, events
//! wait here in a bounded backlog and are re-published, in order, once it is back; when the
//! backlog is full the oldest are dropped (and counted). Gateways heal any loss from the log
//! by seq, so a drop delays delivery, it never loses a message.
//!
//! The stream lives in NATS's memory, so a NATS restart loses it: the publisher makes sure
//! of it again after every reconnection ([`Link::epoch`]) **before** it publishes, and does
//! not publish while disconnected. Publishing into a missing stream would reach the live
//! subscribers but never be acked, stalling every later event for the ack timeout.
//! [`probe`] says up only once the stream is there for the current connection.
//!
//! The stream keeps events in **memory** only, for a bounded window (age and bytes from
//! config), and sealed: neither NATS's memory nor a copy of the stream holds message text. The replay window serves
//! gateways and downstream consumers (notifications, bots) that reconnect.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use prost::Message;
use tidings_log::crypto::{Keyring, TransportKey};
use tidings_log::{Body, ConvId, FeedItem, TenantId, UserId};
use tidings_log_api::health::{Link, Probe};
use tidings_log_api::{bus_crypto, subjects};
use tidings_schemas::internal::{UserNotice, user_notice::Change};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// The publisher's settings. Three are settings of the server's `[nats]` section, read
/// straight into this type under the names the file gives them (`publish_backlog`,
/// `stream_max_age_secs`, `stream_max_bytes`); the others are fixed here (`#[serde(skip)]`).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct PublisherConfig {
    /// Events kept while NATS is unreachable; beyond this the oldest are dropped.
    #[serde(rename = "publish_backlog")]
    pub backlog: usize,
    /// Publishes awaiting their JetStream ack at once.
    #[serde(skip)]
    pub in_flight: usize,
    /// How long the event stream keeps events (the replay window).
    #[serde(
        rename = "stream_max_age_secs",
        with = "tidings_log_api::duration_as::secs"
    )]
    pub stream_max_age: Duration,
    /// How many bytes of events the event stream keeps.
    pub stream_max_bytes: i64,
    /// How long to wait for a JetStream ack.
    #[serde(skip)]
    pub ack_timeout: Duration,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            backlog: 100_000,
            in_flight: 256,
            stream_max_age: Duration::from_secs(600),
            stream_max_bytes: 256 * 1024 * 1024,
            ack_timeout: Duration::from_secs(2),
        }
    }
}

/// Counters for tests, benchmarks and metrics.
#[derive(Default, Debug)]
pub struct PublisherStats {
    pub published: AtomicU64,
    pub retried: AtomicU64,
    pub dropped: AtomicU64,
    /// Events waiting in the backlog, not counting the window being published (NATS down
    /// or slow; at most `backlog`).
    pub backlog: AtomicU64,
    /// The [`Link::epoch`] the event stream was last made sure of in, plus one (0: never).
    pub stream_epoch: AtomicU64,
}

/// The publisher's readiness: connected, and the stream made sure of since the last
/// (re)connection.
pub fn probe(stats: Arc<PublisherStats>, link: watch::Receiver<Link>) -> Probe {
    Arc::new(move || {
        let now = *link.borrow();
        if !now.connected {
            Some("waiting for NATS".into())
        } else if stats.stream_epoch.load(Ordering::Acquire) != now.epoch + 1 {
            Some("making sure of the event stream after a (re)connection".into())
        } else {
            None
        }
    })
}

/// Resolves when the link changes; never if nobody can change it any more.
async fn changed(link: &mut watch::Receiver<Link>) {
    if link.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One message to send.
#[derive(Clone)]
struct Outgoing {
    subject: String,
    /// Set for events: they go through JetStream with this dedupe id.
    msg_id: Option<String>,
    payload: Bytes,
}

/// Most feed items sealed in one go: a bound on the work done between two publishes (and on
/// the time one blocking-pool job takes).
const SEAL_BATCH: usize = 1024;

/// Creates the stream if it does not exist (idempotent: an existing stream is kept as is).
pub async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &PublisherConfig,
) -> Result<(), async_nats::Error> {
    js.get_or_create_stream(jetstream::stream::Config {
        name: subjects::STREAM.to_string(),
        subjects: vec![subjects::STREAM_SUBJECTS.to_string()],
        storage: jetstream::stream::StorageType::Memory,
        max_age: cfg.stream_max_age,
        max_bytes: cfg.stream_max_bytes,
        duplicate_window: Duration::from_secs(120).min(cfg.stream_max_age),
        ..Default::default()
    })
    .await?;
    Ok(())
}

fn notice(t: &TenantId, user: &str, conv: &str, change: Change) -> Option<Outgoing> {
    let user = UserId::new(user).ok()?;
    Some(Outgoing {
        subject: subjects::user(t, &user),
        msg_id: None,
        payload: Bytes::from(
            UserNotice {
                conversation: conv.to_string(),
                change: Some(change),
            }
            .encode_to_vec(),
        ),
    })
}

/// What to send for a batch of feed items, events sealed. Keys are looked up once per tenant
/// per batch; a large batch is sealed on the blocking pool. An event whose tenant has no
/// transport key (shredded since it committed) is not sent: there is nobody to read it.
async fn outgoing_batch(keyring: &Keyring, items: Vec<FeedItem>) -> Vec<Outgoing> {
    let mut keys: HashMap<String, Option<TransportKey>> = HashMap::new();
    let mut bytes = 0;
    for item in &items {
        if let FeedItem::Event { event, encoded } = item {
            bytes += encoded.len();
            if !keys.contains_key(&event.tenant) {
                let key = match TenantId::new(event.tenant.clone()) {
                    Ok(t) => match keyring.transport_key(&t, None).await {
                        Ok(key) => Some(key),
                        Err(e) => {
                            warn!(error = %e, tenant = %t, "failed to get a transport key; events not published");
                            None
                        }
                    },
                    Err(_) => None,
                };
                keys.insert(event.tenant.clone(), key);
            }
        }
    }
    bus_crypto::off_runtime_if_large(bytes, move || {
        items
            .into_iter()
            .flat_map(|item| outgoing(item, &keys))
            .collect()
    })
    .await
}

/// What to send for one feed item: the event itself and any user notices it implies.
fn outgoing(item: FeedItem, keys: &HashMap<String, Option<TransportKey>>) -> Vec<Outgoing> {
    match item {
        FeedItem::ReadCursor {
            tenant,
            conv,
            user,
            read_seq,
        } => notice(
            &tenant,
            user.as_str(),
            conv.as_str(),
            Change::ReadSeq(read_seq),
        )
        .into_iter()
        .collect(),
        FeedItem::Event { event, encoded } => {
            let (Ok(t), Ok(c)) = (
                TenantId::new(event.tenant.clone()),
                ConvId::new(event.conversation.clone()),
            ) else {
                return Vec::new();
            };
            let Some(Some(key)) = keys.get(&event.tenant) else {
                return Vec::new();
            };
            let seq = event.seq;
            let mut out = vec![Outgoing {
                subject: subjects::events(&t, &c),
                msg_id: Some(subjects::msg_id(t.as_str(), c.as_str(), seq)),
                // The sequencer's bytes, not encoded again.
                payload: Bytes::from(bus_crypto::seal_event(key, &c, seq, &encoded)),
            }];
            match &event.body {
                Some(Body::ConversationCreated(created)) => out.extend(
                    created
                        .members
                        .iter()
                        .filter_map(|m| notice(&t, m, c.as_str(), Change::JoinedSeq(seq))),
                ),
                Some(Body::MemberJoined(j)) => {
                    out.extend(notice(&t, &j.user, c.as_str(), Change::JoinedSeq(seq)))
                }
                Some(Body::MemberLeft(l)) => {
                    out.extend(notice(&t, &l.user, c.as_str(), Change::LeftSeq(seq)))
                }
                _ => {}
            }
            out
        }
    }
}

/// Starts the publisher, for a connection whose state nobody reports (tests): see
/// [`run`].
pub fn spawn(
    client: async_nats::Client,
    feed: mpsc::Receiver<FeedItem>,
    keyring: Arc<Keyring>,
    cfg: PublisherConfig,
) -> (tokio::task::JoinHandle<()>, Arc<PublisherStats>) {
    let stats = Arc::new(PublisherStats::default());
    let link = watch::channel(Link {
        connected: true,
        epoch: 0,
    })
    .1;
    let handle = tokio::spawn(run(client, feed, keyring, cfg, link, stats.clone()));
    (handle, stats)
}

/// The publisher's loop. It runs until the feed closes (the log is gone) and its backlog is
/// empty or NATS stays unreachable. `keyring` is the log's ([`tidings_log::Log::keyring`]):
/// events are sealed under its tenants' transport keys. `link` is the connection's state
/// ([`tidings_log_api::nats::BusEvents::link`]): nothing is published while it is down, and the
/// stream is made sure of again after each reconnection.
pub async fn run(
    client: async_nats::Client,
    mut feed: mpsc::Receiver<FeedItem>,
    keyring: Arc<Keyring>,
    cfg: PublisherConfig,
    mut link: watch::Receiver<Link>,
    stats: Arc<PublisherStats>,
) {
    let js = jetstream::ContextBuilder::new()
        .timeout(cfg.ack_timeout)
        .build(client.clone());
    let mut backlog: VecDeque<Outgoing> = VecDeque::new();
    let mut backoff = Duration::from_millis(50);
    let mut feed_open = true;
    let mut items = Vec::new();
    // Make sure of the stream at once, not at the first event: readiness waits for it.
    link.mark_changed();
    loop {
        if !feed_open && backlog.is_empty() && items.is_empty() {
            return; // the log is gone and everything it committed was handed over
        }
        // Take what the log has committed, waiting only when there is nothing to send and
        // the stream is there for this connection (else it is made sure of first, below).
        let now = *link.borrow_and_update();
        let stream_ok =
            now.connected && stats.stream_epoch.load(Ordering::Acquire) == now.epoch + 1;
        if backlog.is_empty() && items.is_empty() && stream_ok {
            if !feed_open {
                return;
            }
            tokio::select! {
                item = feed.recv() => match item {
                    Some(item) => items.push(item),
                    None => return,
                },
                _ = changed(&mut link) => {}
            }
        }
        while feed_open && items.len() < SEAL_BATCH {
            match feed.try_recv() {
                Ok(item) => items.push(item),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => feed_open = false,
            }
        }
        if !items.is_empty() {
            let batch = std::mem::take(&mut items);
            backlog.extend(outgoing_batch(&keyring, batch).await);
        }
        while backlog.len() > cfg.backlog {
            backlog.pop_front();
            stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        stats.backlog.store(backlog.len() as u64, Ordering::Relaxed);

        let now = *link.borrow_and_update();
        if !now.connected {
            // Keep taking the feed (the backlog bound applies) until NATS is back.
            tokio::select! {
                item = feed.recv(), if feed_open => match item {
                    Some(item) => items.push(item),
                    None => feed_open = false,
                },
                _ = changed(&mut link) => {}
            }
            continue;
        }
        if stats.stream_epoch.load(Ordering::Acquire) != now.epoch + 1 {
            match ensure_stream(&js, &cfg).await {
                Ok(()) => {
                    info!(
                        stream = subjects::STREAM,
                        epoch = now.epoch,
                        "jetstream stream ready"
                    );
                    stats.stream_epoch.store(now.epoch + 1, Ordering::Release);
                    backoff = Duration::from_millis(50);
                }
                Err(e) => {
                    warn!(error = %e, backlog = backlog.len(), "failed to set up the event stream; will retry");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        if backlog.is_empty() {
            continue;
        }

        let window: Vec<Outgoing> = backlog.drain(..backlog.len().min(cfg.in_flight)).collect();
        stats.backlog.store(backlog.len() as u64, Ordering::Relaxed);
        let mut failed = Vec::new();
        let mut acks = Vec::with_capacity(window.len());
        for out in window {
            match &out.msg_id {
                Some(id) => {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", id.as_str());
                    match js
                        .publish_with_headers(out.subject.clone(), headers, out.payload.clone())
                        .await
                    {
                        Ok(ack) => acks.push((out, Some(ack))),
                        Err(e) => {
                            warn!(error = %e, "failed to publish an event");
                            failed.push(out);
                        }
                    }
                }
                None => {
                    // Notices are hints; the log has the state. Best effort.
                    if client
                        .publish(out.subject.clone(), out.payload.clone())
                        .await
                        .is_ok()
                    {
                        acks.push((out, None));
                    }
                }
            }
        }
        for (out, ack) in acks {
            match ack {
                None => {
                    stats.published.fetch_add(1, Ordering::Relaxed);
                }
                Some(ack) => match ack.await {
                    Ok(_) => {
                        stats.published.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        warn!(error = %e, subject = %out.subject, "no ack for an event; will re-publish");
                        failed.push(out);
                    }
                },
            }
        }
        if failed.is_empty() {
            backoff = Duration::from_millis(50);
        } else {
            stats
                .retried
                .fetch_add(failed.len() as u64, Ordering::Relaxed);
            for out in failed.into_iter().rev() {
                backlog.push_front(out);
            }
            stats.backlog.store(backlog.len() as u64, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}
