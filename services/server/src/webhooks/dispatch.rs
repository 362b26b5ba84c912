//! Delivery: the dispatcher of `tidings serve` (roles all and log, `webhooks.enabled`).
//!
//! - [`Dispatcher::run`] (supervised, restarted on failure) re-reads the subscriptions every
//!   `webhooks.refresh_ms` and keeps one worker per subscription in a `JoinSet`: a new
//!   subscription gets one, a deleted one's worker is aborted and its JetStream consumer
//!   deleted, a worker that panicked is counted and made again at the next look.
//! - A worker owns one durable pull consumer `tidings-wh-<id>` on `TIDINGS_EVENTS`, filtered
//!   to the tenant (`tidings.ev.<tenant>.>`), explicit ack, `max_ack_pending = 1`: one notice
//!   at a time, so delivery is serial per subscription and in seq order per conversation.
//! - A notice says only "(tenant, conversation, seq) committed" (its subject and
//!   `Nats-Msg-Id`); the event is read from the log, the source of truth. The KV keeps a
//!   cursor per (subscription, conversation): a seq at or below it is acked and skipped (a
//!   redelivered notice is not delivered twice); a seq past cursor + 1 delivers the gap from
//!   the log first (the memory stream loses notices when NATS restarts).
//! - A first notice in a conversation delivers the events committed since the subscription
//!   was created (walking back from the notice, at most [`MAX_FIRST_WALK`]).
//! - A failed request is retried after a full-jitter backoff, with progress acks so the
//!   notice is not redelivered meanwhile; after `max_attempts` the event is dead-lettered
//!   (`wd/`) and the cursor moves past it.
//! - Replays asked for (`wr/`) are taken up between notices: the cursor goes below the seq
//!   and the conversation is delivered up to its head, by the same worker, so a replay is
//!   serialised with live delivery.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures_util::StreamExt;
use tidings_log::webhooks::Webhooks;
use tidings_log::{ConvId, Event, Log, ReadRange, TenantId};
use tidings_log_api::subjects;
use tidings_schemas::storage::{WebhookDeadLetter, WebhookSubscription};
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, info, warn};

use super::WebhooksConfig;
use super::sign;
use crate::metrics as m;

/// Most subscriptions one dispatcher runs (all tenants); beyond, the rest wait (warned).
pub const MAX_DISPATCHED: usize = 10_000;
/// Events read from the log per page while delivering (and per cursor commit).
const READ_PAGE: usize = 100;
/// Pages one notice delivers past its own seq while the conversation has more (then the
/// worker takes the next notice, so one busy conversation cannot hold the others for long).
const DRAIN_PAGES: usize = 10;
/// Most events a first notice in a conversation walks back over to find where the
/// subscription began; past it only the newest are delivered (warned).
pub const MAX_FIRST_WALK: usize = 10_000;
/// Conversation kinds remembered per worker for the kind filter (cleared when full).
const KIND_CACHE: usize = 10_000;
/// Replays taken up per look.
const REPLAYS_PER_LOOK: usize = 100;
/// Most bytes of a failed answer's reason kept in a dead letter.
const MAX_ERROR_CHARS: usize = 300;
/// Wait before a worker makes its consumer again after a failure; doubled to the max.
const SESSION_BACKOFF: Duration = Duration::from_millis(100);
const SESSION_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A durable consumer nobody pulls from for this long is removed by NATS (a subscription
/// deleted while no dispatcher ran); the cursors make a re-made one lose nothing.
const CONSUMER_INACTIVE: Duration = Duration::from_secs(3600);

/// How long past its expiry a pull is waited for before it is taken as lost.
const PULL_SLACK: Duration = Duration::from_secs(2);

/// The durable consumer's name of a subscription.
pub fn consumer_name(id: &str) -> String {
    format!("tidings-wh-{id}")
}

/// What every worker shares.
struct Shared {
    log: Log,
    hooks: Webhooks,
    js: jetstream::Context,
    http: reqwest::Client,
    cfg: WebhooksConfig,
    /// Per running worker, the commit time (ms) of the event it is delivering (0: idle):
    /// the lag gauge's source.
    in_flight: std::sync::Mutex<HashMap<String, Arc<AtomicI64>>>,
}

/// The dispatcher; cheap to clone (the supervisor makes its run again after a failure).
#[derive(Clone)]
pub struct Dispatcher(Arc<Shared>);

impl Dispatcher {
    pub fn new(log: Log, nats: async_nats::Client, cfg: WebhooksConfig) -> anyhow::Result<Self> {
        let tls = tidings_client::ClientTls { ca_file: None }
            .rustls_config()
            .map_err(anyhow::Error::msg)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_millis(cfg.request_timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.request_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_max_idle_per_host(4)
            .tcp_nodelay(true)
            .build()
            .context("make the webhook HTTP client")?;
        let hooks = Webhooks::new(log.store().clone(), log.keyring().clone());
        let shared = Arc::new(Shared {
            log,
            hooks,
            js: jetstream::new(nats),
            http,
            cfg,
            in_flight: std::sync::Mutex::default(),
        });
        let weak = Arc::downgrade(&shared);
        m::register_webhooks(Arc::new(move || {
            weak.upgrade()
                .map_or((0, None), |s| (s.workers(), s.oldest()))
        }));
        Ok(Dispatcher(shared))
    }

    /// Runs until aborted (the supervisor's shutdown) or a failure to read the
    /// subscriptions that waiting will not cure (a corrupt row), which the supervisor reports
    /// and restarts; a store that cannot be reached now is looked at again at the next tick.
    pub async fn run(self) -> anyhow::Result<()> {
        let shared = self.0;
        let mut workers: JoinSet<()> = JoinSet::new();
        let mut running: HashMap<(String, String), AbortHandle> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(shared.cfg.refresh_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(done) = workers.join_next() => {
                    if let Err(e) = done && e.is_panic() {
                        m::WEBHOOK_WORKER_PANICS.inc();
                        warn!(error = %e, "a webhook worker panicked; made again at the next look");
                    }
                    continue;
                }
            }
            let subs = match shared
                .hooks
                .list_with_tenants(None, MAX_DISPATCHED + 1)
                .await
            {
                Ok(subs) => subs,
                // The store is out (an outage the send buffer rides through): the workers
                // that run keep waiting on it themselves, and the list is read again at the
                // next tick. Failing here would restart the dispatcher until the supervisor
                // gave up, taking the whole process down with the KV.
                Err(e) if e.is_retryable() => {
                    warn!(error = %e, "cannot read the webhook subscriptions now; looking again at the next tick");
                    continue;
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context("read the webhook subscriptions"));
                }
            };
            if subs.len() > MAX_DISPATCHED {
                warn!(
                    max = MAX_DISPATCHED,
                    "more webhook subscriptions than one dispatcher runs; the rest wait"
                );
            }
            let wanted: HashSet<(String, String)> = subs
                .iter()
                .take(MAX_DISPATCHED)
                .map(|(t, s)| (t.to_string(), s.id.clone()))
                .collect();
            // Gone: stop the worker and remove its consumer.
            let gone: Vec<_> = running
                .keys()
                .filter(|k| !wanted.contains(*k))
                .cloned()
                .collect();
            for key in gone {
                if let Some(handle) = running.remove(&key) {
                    handle.abort();
                }
                lock(&shared.in_flight).remove(&key.1);
                if let Ok(stream) = shared.js.get_stream(subjects::STREAM).await {
                    let _ = stream.delete_consumer(&consumer_name(&key.1)).await;
                }
                info!(tenant = %key.0, subscription = %key.1, "webhook subscription gone; its delivery stopped");
            }
            running.retain(|_, handle| !handle.is_finished());
            for (tenant, sub) in subs.into_iter().take(MAX_DISPATCHED) {
                let key = (tenant.to_string(), sub.id.clone());
                if running.contains_key(&key) {
                    continue;
                }
                let pending = Arc::new(AtomicI64::new(0));
                lock(&shared.in_flight).insert(sub.id.clone(), pending.clone());
                let worker = Worker {
                    shared: shared.clone(),
                    tenant,
                    sub,
                    secret: Vec::new(),
                    kinds: HashMap::new(),
                    pending,
                };
                running.insert(key, workers.spawn(worker.run()));
            }
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// The oldest commit time (ms) a worker is delivering now, if one is: the lag's source.
    fn oldest(&self) -> Option<i64> {
        lock(&self.in_flight)
            .values()
            .map(|t| t.load(Ordering::Relaxed))
            .filter(|&t| t > 0)
            .min()
    }

    /// Workers running (one per subscription).
    fn workers(&self) -> usize {
        lock(&self.in_flight).len()
    }
}

/// One subscription's delivery.
struct Worker {
    shared: Arc<Shared>,
    tenant: TenantId,
    sub: WebhookSubscription,
    /// Opened at the start of each session (a shredded tenant's does not open: no delivery).
    secret: Vec<u8>,
    /// Conversation kinds seen, for the kind filter (a conversation's kind never changes).
    kinds: HashMap<ConvId, String>,
    /// The commit time of the event being delivered (0: idle).
    pending: Arc<AtomicI64>,
}

impl Worker {
    /// Sessions, made again with backoff after each failure, until aborted.
    async fn run(mut self) {
        let mut backoff = SESSION_BACKOFF;
        loop {
            match self.session().await {
                Ok(()) => backoff = SESSION_BACKOFF,
                Err(e) => {
                    warn!(tenant = %self.tenant, subscription = %self.sub.id, error = %format!("{e:#}"), "webhook delivery interrupted; resuming");
                    tokio::time::sleep(backoff.mul_f64(1.0 + fastrand::f64())).await;
                    backoff = (backoff * 2).min(SESSION_BACKOFF_MAX);
                }
            }
        }
    }

    /// One consumer session: make sure of the consumer, then take notices and replays.
    async fn session(&mut self) -> anyhow::Result<()> {
        self.secret = self
            .shared
            .hooks
            .secret(&self.tenant, &self.sub)
            .await
            .context("open the webhook secret")?;
        let stream = self
            .shared
            .js
            .get_stream(subjects::STREAM)
            .await
            .context("find the event stream")?;
        let name = consumer_name(&self.sub.id);
        let mut consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: format!("tidings.ev.{}.>", self.tenant),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_millis(self.shared.cfg.ack_wait_ms),
                    max_ack_pending: 1,
                    deliver_policy: jetstream::consumer::DeliverPolicy::All,
                    inactive_threshold: CONSUMER_INACTIVE,
                    ..Default::default()
                },
            )
            .await
            .context("make the webhook consumer")?;
        // One pull request per notice, each waiting at most `refresh_ms`: a pull that is
        // never dropped midway (a message handed to a dropped pull would wait out the ack
        // wait), and a regular turn for the replays asked for.
        let every = Duration::from_millis(self.shared.cfg.refresh_ms);
        let mut replays_seen = tokio::time::Instant::now();
        loop {
            let pulled = tokio::time::Instant::now();
            let mut batch = consumer
                .batch()
                .max_messages(1)
                .expires(every)
                .messages()
                .await
                .map_err(|e| anyhow::anyhow!(e).context("pull from the webhook consumer"))?;
            let mut taken = 0;
            // The server ends a pull at its expiry; one it never answers was lost (NATS
            // restarted with it).
            let lost = loop {
                match tokio::time::timeout(every + PULL_SLACK, batch.next()).await {
                    Err(_) => break true,
                    Ok(None) => break false,
                    Ok(Some(next)) => {
                        let msg = next.map_err(|e| anyhow::anyhow!(e).context("pull a notice"))?;
                        self.notice(&msg).await?;
                        msg.ack()
                            .await
                            .map_err(|e| anyhow::anyhow!(e).context("ack a notice"))?;
                        taken += 1;
                    }
                }
            };
            // A lost pull, or an empty one that ended long before its expiry, was not served
            // by the consumer: it may be gone (a NATS restart loses the memory stream and its
            // consumers). Ask; if it is, the session ends and the next makes it again.
            let early = taken == 0 && pulled.elapsed() < every / 2;
            if lost || early {
                consumer
                    .info()
                    .await
                    .map_err(|e| anyhow::anyhow!(e).context("find the webhook consumer"))?;
            }
            if early {
                tokio::time::sleep(every / 2).await;
            }
            if replays_seen.elapsed() >= every {
                self.replays().await?;
                replays_seen = tokio::time::Instant::now();
            }
        }
    }

    /// One notice: deliver the conversation up to its seq.
    async fn notice(&mut self, msg: &jetstream::Message) -> anyhow::Result<()> {
        let Some((conv, seq)) = notice_of(&self.tenant, msg) else {
            warn!(subject = %msg.subject, "a notice without a conversation and seq; skipped");
            return Ok(());
        };
        self.deliver_through(&conv, seq, Some(msg)).await
    }

    /// Takes up the replays asked for: the cursor goes below the seq, then the
    /// conversation is delivered to its head.
    async fn replays(&mut self) -> anyhow::Result<()> {
        let asked = self
            .shared
            .hooks
            .replays(&self.tenant, &self.sub.id, REPLAYS_PER_LOOK)
            .await?;
        for (conv, from) in asked {
            let hooks = &self.shared.hooks;
            hooks
                .start_replay(&self.tenant, &self.sub.id, &conv, from)
                .await?;
            let head = match self.shared.log.conversation(&self.tenant, &conv).await {
                Ok(info) => info.head_seq,
                Err(tidings_log::LogError::ConversationNotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            info!(tenant = %self.tenant, subscription = %self.sub.id, conversation = %conv, from, head, "webhook replay");
            self.deliver_through(&conv, head, None).await?;
        }
        Ok(())
    }

    /// Whether the subscription's conversation filters let `conv` through.
    async fn selects(&mut self, conv: &ConvId) -> anyhow::Result<bool> {
        let sub = &self.sub;
        if !sub.conversations.is_empty() && !sub.conversations.iter().any(|c| c == conv.as_str()) {
            return Ok(false);
        }
        if sub.conversation_kinds.is_empty() {
            return Ok(true);
        }
        let kind = match self.kinds.get(conv) {
            Some(kind) => kind.clone(),
            None => {
                let info = self.shared.log.conversation(&self.tenant, conv).await?;
                if self.kinds.len() >= KIND_CACHE {
                    self.kinds.clear();
                }
                self.kinds.insert(conv.clone(), info.kind_name.clone());
                info.kind_name
            }
        };
        Ok(self.sub.conversation_kinds.contains(&kind))
    }

    /// Delivers the conversation's undelivered events in seq order: up to `seq` (the
    /// notice's), and on while the log has more, up to [`DRAIN_PAGES`] pages. A busy
    /// conversation is so delivered a page per cursor commit, not an event per notice: the
    /// notices that follow find their seqs delivered and are acked at once.
    async fn deliver_through(
        &mut self,
        conv: &ConvId,
        seq: u64,
        notice: Option<&jetstream::Message>,
    ) -> anyhow::Result<()> {
        if !self.selects(conv).await? {
            return Ok(());
        }
        let hooks = &self.shared.hooks;
        let cursor = match hooks.cursor(&self.tenant, &self.sub.id, conv).await? {
            Some(cursor) => cursor,
            None => {
                let start = self.first_cursor(conv, seq).await?;
                if seq <= start {
                    // From before the subscription: remembered, so the stream window's older
                    // notices of this conversation cost a key read, not a log read.
                    hooks
                        .set_cursor(&self.tenant, &self.sub.id, conv, start)
                        .await?;
                }
                start
            }
        };
        if seq <= cursor {
            return Ok(()); // delivered already (a redelivered or drained notice)
        }
        debug!(conversation = %conv, seq, cursor, "webhook delivery");
        let mut next = cursor + 1;
        let mut pages = 0;
        while next <= seq || pages < DRAIN_PAGES {
            let events = self
                .shared
                .log
                .read(&self.tenant, conv, ReadRange::forward(next, READ_PAGE))
                .await?;
            let Some(last) = events.last().map(|e| e.seq) else {
                break; // the head, or retention took them: nothing left to deliver
            };
            for event in &events {
                self.deliver(conv, event, notice).await?;
            }
            // One cursor commit per page, not per event: a crash delivers at most a page
            // again (at least once), and a busy subscription is not held to one fsync per
            // event.
            hooks
                .set_cursor(&self.tenant, &self.sub.id, conv, last)
                .await?;
            next = last + 1;
            pages += 1;
            if events.len() < READ_PAGE && next > seq {
                break; // the head
            }
        }
        Ok(())
    }

    /// The cursor of a conversation this subscription has not delivered in yet: the seq
    /// before the first event committed since the subscription was created.
    async fn first_cursor(&self, conv: &ConvId, upto: u64) -> anyhow::Result<u64> {
        // Most often the notice's own event tells (a new subscription's consumer starts with
        // the stream window, all of it older): one event read, not a page.
        let own = self
            .shared
            .log
            .read(&self.tenant, conv, ReadRange::forward(upto, 1))
            .await?;
        if own
            .first()
            .is_some_and(|e| e.seq == upto && e.server_time_ms < self.sub.created_ms)
        {
            return Ok(upto);
        }
        let mut from = upto;
        let mut walked = 0;
        while from > 0 {
            let page = self
                .shared
                .log
                .read(
                    &self.tenant,
                    conv,
                    ReadRange {
                        from: Some(from),
                        limit: READ_PAGE,
                        order: tidings_log::store::Order::Descending,
                    },
                )
                .await?;
            for e in &page {
                if e.server_time_ms < self.sub.created_ms {
                    return Ok(e.seq);
                }
                walked += 1;
                if walked >= MAX_FIRST_WALK {
                    warn!(tenant = %self.tenant, subscription = %self.sub.id, conversation = %conv, max = MAX_FIRST_WALK, "a conversation's first delivery walked back its most; older events not delivered");
                    return Ok(e.seq.saturating_sub(1));
                }
            }
            match page.last() {
                Some(e) if e.seq > 1 && page.len() == READ_PAGE => from = e.seq - 1,
                _ => break,
            }
        }
        Ok(0)
    }

    /// Delivers one event (or skips it by the event-kind filter); the caller moves the
    /// cursor (a dead letter moves it at once, with its record).
    async fn deliver(
        &self,
        conv: &ConvId,
        event: &Event,
        notice: Option<&jetstream::Message>,
    ) -> anyhow::Result<()> {
        let kind = tidings_log::event_kind(event.body.as_ref());
        let hooks = &self.shared.hooks;
        if !self.sub.event_kinds.is_empty() && !self.sub.event_kinds.iter().any(|k| k == kind) {
            return Ok(());
        }
        self.pending
            .store(event.server_time_ms.max(1), Ordering::Relaxed);
        let cfg = &self.shared.cfg;
        let attempts = self.sub.max_attempts.max(1);
        let mut last_error = String::new();
        for attempt in 1..=attempts {
            if let Some(msg) = notice {
                // Keep the notice ours while we work on it.
                let _ = msg.ack_with(AckKind::Progress).await;
            }
            match self.post(event, attempt).await {
                Ok(()) => {
                    m::WEBHOOK_DELIVERED.inc();
                    let lag_ms = (tidings_log::now_ms() - event.server_time_ms).max(0);
                    m::WEBHOOK_DELIVERY_SECONDS.observe(lag_ms as f64 / 1000.0);
                    self.pending.store(0, Ordering::Relaxed);
                    return Ok(());
                }
                Err(why) => last_error = why,
            }
            if attempt == attempts {
                break;
            }
            m::WEBHOOK_RETRIES.inc();
            let wait = backoff(cfg.backoff_first_ms, cfg.backoff_max_ms, attempt);
            self.wait_with_progress(wait, notice).await;
        }
        warn!(tenant = %self.tenant, subscription = %self.sub.id, conversation = %conv, seq = event.seq, attempts, error = %last_error, "webhook event dead-lettered");
        let letter = WebhookDeadLetter {
            event_id: event.event_id.clone(),
            attempts,
            last_error,
            time_ms: tidings_log::now_ms(),
        };
        hooks
            .dead_letter(&self.tenant, &self.sub.id, conv, event.seq, &letter)
            .await?;
        m::WEBHOOK_DEAD_LETTERS.inc();
        self.pending.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Sleeps `wait`, acking progress on the notice often enough that JetStream keeps it.
    async fn wait_with_progress(&self, wait: Duration, notice: Option<&jetstream::Message>) {
        let every =
            Duration::from_millis(self.shared.cfg.ack_wait_ms / 3).max(Duration::from_millis(10));
        let until = tokio::time::Instant::now() + wait;
        loop {
            let now = tokio::time::Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep((until - now).min(every)).await;
            if let Some(msg) = notice {
                let _ = msg.ack_with(AckKind::Progress).await;
            }
        }
    }

    /// One try: `Ok` on a 2xx answer, else why not (bounded).
    async fn post(&self, event: &Event, attempt: u32) -> Result<(), String> {
        let body = sign::body(&self.sub.id, attempt, event);
        let t = tidings_log_api::now_secs();
        let answer = self
            .shared
            .http
            .post(&self.sub.url)
            .header("content-type", "application/json")
            .header(
                sign::SIGNATURE_HEADER,
                sign::signature(&self.secret, t, &body),
            )
            .header(sign::EVENT_ID_HEADER, &event.event_id)
            .body(body)
            .send()
            .await;
        // The answer's body is never read: its status is all that counts.
        match answer {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
            Err(e) => Err(bounded(&format!("{e:#}"))),
        }
    }
}

/// At most [`MAX_ERROR_CHARS`] characters of a reason.
fn bounded(text: &str) -> String {
    text.chars().take(MAX_ERROR_CHARS).collect()
}

/// The wait before try `attempt + 1`: uniform in [0, min(max, first × 2^(attempt-1))] (full
/// jitter: many subscriptions failing at once do not retry in step).
pub fn backoff(first_ms: u64, max_ms: u64, attempt: u32) -> Duration {
    let ceiling = first_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(32))
        .min(max_ms);
    Duration::from_millis(fastrand::u64(0..=ceiling))
}

/// The conversation and seq a notice names: `Nats-Msg-Id: <tenant>/<conv>/<seq>` of the
/// subscription's tenant.
fn notice_of(tenant: &TenantId, msg: &jetstream::Message) -> Option<(ConvId, u64)> {
    let id = msg.headers.as_ref()?.get("Nats-Msg-Id")?.as_str();
    let mut parts = id.split('/');
    let (t, c, seq) = (parts.next()?, parts.next()?, parts.next()?);
    if t != tenant.as_str() || parts.next().is_some() {
        return None;
    }
    Some((ConvId::new(c).ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_ceiling() {
        for _ in 0..200 {
            assert!(backoff(500, 60_000, 1) <= Duration::from_millis(500));
            assert!(backoff(500, 60_000, 3) <= Duration::from_millis(2000));
            assert!(backoff(500, 60_000, 40) <= Duration::from_millis(60_000));
        }
    }
}
