//! Fan-out: one NATS subscription per conversation per gateway, shared by every session of
//! the gateway that is in it.
//!
//! - [`Registry`] knows which sessions are in which conversations, and which users are online
//!   here. It starts a conversation's hub when its first session joins and stops it when the
//!   last one leaves (reference counting), and watches each online user's notice subject.
//! - A hub task owns one conversation: its subscriptions (events, typing), the last seq it
//!   delivered, and its sessions. It delivers events **in seq order, each once**: a duplicate
//!   from NATS is dropped, an event ahead of the next expected one waits while the gap is read
//!   from the log. Membership changes are applied by the hub in event order, so a member
//!   added to a group gets the join event and everything after it.
//! - Events arrive sealed ([`tidings_log_api::bus_crypto`]); a hub opens each with its tenant's
//!   transport key (fetched from the log once per key id, cached in the registry). An
//!   envelope that does not open is treated as lost, never delivered: the hub heals from the
//!   log, as for any gap.
//! - Supervised: a hub's subscriptions are [`Resubscribing`]: removed by the server, they
//!   are made again and the hub heals from the log. A hub task that stopped (a bug) is
//!   found at the next join and made again for every session it had.
//! - Sessions have outbound queues bounded in frames and in bytes ([`OutboundBudget`]); a hub
//!   never waits for a session. A session whose queue is full is disconnected as a slow
//!   consumer ([`SessionHandle::push`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tidings_log_api::{Body, ConvId, Event, ReadRange, TenantId, UserId};
use tidings_schemas::client::{self as proto, server_frame::Msg};
use tidings_schemas::internal::{TypingNotice, UserNotice, user_notice::Change};
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tracing::{debug, warn};

use crate::pacing::Pacer;
use crate::resubscribe::{Delivery, Resubscribing};
use tidings_log_api::bus_crypto::{self, KeyCache};
use tidings_log_api::nats::BusEvents;
use tidings_log_api::service::{Caller, LogService};
use tidings_log_api::subjects;

/// Sessions a hub pushes an event to between yields to the runtime: a 10,000-member group's
/// event is handed out in slices, each a fraction of a millisecond of work, so the pushes of
/// small conversations on the same gateway are not queued behind the whole fan-out
/// (docs/decisions/fan-out-in-slices.md).
const FAN_OUT_SLICE: usize = 64;
/// The slice of a paced fan-out (docs/decisions/paced-fan-out.md): smaller, so the writes
/// between two waits are a quarter of a millisecond, not a whole one.
const PACED_SLICE: usize = 16;

/// Why a session is being closed by the server.
#[derive(Clone, Debug)]
pub struct CloseOrder {
    pub reason: proto::CloseReason,
    pub message: String,
}

/// A gateway's handle on one connected session.
#[derive(Clone)]
pub struct SessionHandle {
    pub id: u64,
    pub tenant: TenantId,
    pub user: UserId,
    /// The session's token: its id (`jti`) and issue time (`iat`), so a revocation can find
    /// the sessions it ends ([`Registry::close_user`]).
    pub jti: Option<Arc<str>>,
    pub issued_at: u64,
    tx: mpsc::Sender<Bytes>,
    kill: Arc<KillSwitch>,
    budget: Arc<OutboundBudget>,
}

/// The bytes a session's outbound queue may hold: frames are charged when queued (pushes by
/// hubs, replies by the session) and refunded by the writer task once written to the socket.
/// Counting frames alone let one client hold a thousand 60 KB replies; this bounds what a
/// client that stops reading can make the gateway keep.
#[derive(Debug)]
pub struct OutboundBudget {
    queued: AtomicUsize,
    limit: usize,
}

impl OutboundBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(OutboundBudget {
            queued: AtomicUsize::new(0),
            limit,
        })
    }

    /// Charges `n` bytes; false (nothing charged) if that would cross the limit.
    pub fn charge(&self, n: usize) -> bool {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                q.checked_add(n).filter(|t| *t <= self.limit)
            })
            .is_ok()
    }

    /// Gives back `n` bytes charged earlier (the frame left).
    pub fn refund(&self, n: usize) {
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(n))
            });
    }

    /// Bytes queued now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

/// Queues `frame` on a session's outbound queue without waiting, charging its budget. Over
/// the budget or the frame count, the session is closed as a slow consumer and false is
/// returned. Shared by pushes ([`SessionHandle::push`]) and the session's own replies.
pub fn queue_frame(
    tx: &mpsc::Sender<Bytes>,
    budget: &OutboundBudget,
    kill: &KillSwitch,
    frame: Bytes,
) -> bool {
    let slow = |what: &str| {
        kill.fire(CloseOrder {
            reason: proto::CloseReason::SlowConsumer,
            message: format!("outbound queue full ({what}): the client is not reading fast enough"),
        });
        false
    };
    let n = frame.len();
    if !budget.charge(n) {
        return slow("bytes");
    }
    match tx.try_send(frame) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            budget.refund(n);
            slow("frames")
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            budget.refund(n);
            false
        }
    }
}

/// Tells a session's connection task to close, once.
#[derive(Default)]
pub struct KillSwitch {
    fired: AtomicBool,
    order: Mutex<Option<CloseOrder>>,
    pub notify: Notify,
}

impl KillSwitch {
    pub fn fire(&self, order: CloseOrder) {
        if !self.fired.swap(true, Ordering::SeqCst) {
            *self.order.lock().unwrap_or_else(|p| p.into_inner()) = Some(order);
            self.notify.notify_one();
        }
    }

    pub fn order(&self) -> Option<CloseOrder> {
        self.order.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl SessionHandle {
    pub fn new(
        id: u64,
        tenant: TenantId,
        user: UserId,
        tx: mpsc::Sender<Bytes>,
        kill: Arc<KillSwitch>,
        budget: Arc<OutboundBudget>,
    ) -> Self {
        SessionHandle {
            id,
            tenant,
            user,
            jti: None,
            issued_at: 0,
            tx,
            kill,
            budget,
        }
    }

    /// Records the session's token id and issue time.
    pub fn with_token(mut self, jti: Option<&str>, issued_at: u64) -> Self {
        self.jti = jti.map(Arc::from);
        self.issued_at = issued_at;
        self
    }

    /// Tells the session to close (once; later orders are ignored).
    pub fn close(&self, order: CloseOrder) {
        self.kill.fire(order);
    }

    /// Queues a frame without waiting. A full queue (in frames or bytes) means the client is
    /// not reading: it is disconnected rather than allowed to grow the gateway's memory.
    pub fn push(&self, frame: Bytes) -> bool {
        queue_frame(&self.tx, &self.budget, &self.kill, frame)
    }
}

/// The push frame of an event from its encoded bytes, without decoding and encoding it
/// again: a `ServerFrame` with request id 0 (not on the wire) and `msg` the event, which is
/// the event field's key, its length and the bytes (`event_frame_is_the_encoded_push`).
pub fn event_frame(event: &[u8]) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint};
    /// `ServerFrame.event` in client.proto.
    const EVENT_FIELD: u32 = 12;
    let mut frame = Vec::with_capacity(event.len() + 8);
    encode_key(EVENT_FIELD, WireType::LengthDelimited, &mut frame);
    encode_varint(event.len() as u64, &mut frame);
    frame.extend_from_slice(event);
    Bytes::from(frame)
}

pub fn push_frame(msg: Msg) -> Bytes {
    Bytes::from(
        proto::ServerFrame {
            request_id: 0,
            msg: Some(msg),
        }
        .encode_to_vec(),
    )
}

/// Settings of the fan-out.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Most events one log read returns (the log's read limit).
    pub read_limit: usize,
    /// Events held while a gap is being filled; beyond this the hub re-reads from the log.
    pub max_pending: usize,
    /// How often an idle hub checks the log's head, to heal losses nothing else revealed.
    pub heal_interval: Duration,
    /// Bytes of membership answers and member lists kept for the conversations hubs run for
    /// (`members.rs`).
    pub member_cache_bytes: usize,
    /// Members read per log call while filling a member list (at most `read_limit`): a
    /// 50,000-member list is 50 bounded reads at 1,000.
    pub member_fill_page: usize,
    /// Pushes a second this gateway spends on big groups' fan-outs, all of them together
    /// (0: not paced), and how many sessions here make a group big
    /// (docs/decisions/paced-fan-out.md).
    pub fan_out_pushes_per_sec: u64,
    pub fan_out_paced_sessions: usize,
}

/// Joins queued for one hub. A join beyond this waits (the joining session's request, or
/// the user-notice watcher) instead of growing the queue: a hub catches newcomers up from
/// the log, so a burst of a large group's members coming online at once is served in
/// turn, never held in memory without bound.
const HUB_COMMANDS: usize = 256;

/// Add sessions. With `from`, first send them the events from that seq up to what the hub
/// has delivered (a member added while online). Acked once they are in. (Leaves need no
/// message: the registry's set is the truth, see [`HubHandle::left`].)
struct HubCommand {
    sessions: Vec<SessionHandle>,
    from: Option<u64>,
    done: Option<oneshot::Sender<()>>,
    /// Catch up with the log now (a member left: deliver their leave event, which also takes
    /// their sessions out).
    heal: bool,
}

struct HubHandle {
    commands: mpsc::Sender<HubCommand>,
    /// The sessions in the conversation here: the truth the hub follows.
    sessions: HashSet<u64>,
    /// Wakes the hub when sessions left: it drops those no longer in `sessions`. A leave
    /// is a flag, not a queued message, so it needs no queue and never waits.
    left: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

struct UserEntry {
    sessions: HashMap<u64, SessionHandle>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    hubs: HashMap<(TenantId, ConvId), HubHandle>,
    users: HashMap<(TenantId, UserId), UserEntry>,
    /// Conversations each session is in, for cleanup when it goes.
    session_convs: HashMap<u64, HashSet<ConvId>>,
}

trait RemoveIfFinished {
    fn remove_if_finished(&mut self, key: &(TenantId, ConvId)) -> Option<HubHandle>;
}

impl RemoveIfFinished for HashMap<(TenantId, ConvId), HubHandle> {
    fn remove_if_finished(&mut self, key: &(TenantId, ConvId)) -> Option<HubHandle> {
        if self.get(key).is_some_and(|h| h.task.is_finished()) {
            self.remove(key)
        } else {
            None
        }
    }
}

/// Which sessions are in which conversations, on this gateway.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<RegistryInner>,
}

struct RegistryInner {
    state: Mutex<State>,
    log: Arc<dyn LogService>,
    /// Transport keys that open the events of the conversations followed here.
    keys: KeyCache,
    nats: async_nats::Client,
    cfg: HubConfig,
    /// Fires when the NATS connection is (re)established: hubs then check for missed events;
    /// and names the subscriptions the server removed.
    bus: BusEvents,
    /// Subscriptions of hubs and user watches that are missing now (being made again).
    missing: Arc<AtomicUsize>,
    /// Membership answers for the conversations hubs run for (`members.rs`).
    members: crate::members::MemberCache,
    /// The budget big groups' fan-outs share.
    pacer: Pacer,
}

impl Registry {
    pub fn new(
        log: Arc<dyn LogService>,
        nats: async_nats::Client,
        cfg: HubConfig,
        bus: BusEvents,
    ) -> Self {
        let members = crate::members::MemberCache::new(cfg.member_cache_bytes);
        let pacer = Pacer::new(cfg.fan_out_pushes_per_sec);
        Registry {
            inner: Arc::new(RegistryInner {
                pacer,
                state: Mutex::new(State::default()),
                log,
                keys: KeyCache::default(),
                nats,
                cfg,
                bus,
                missing: Arc::default(),
                members,
            }),
        }
    }

    /// Seconds big groups' fan-outs have waited for the pacing budget since start.
    pub fn fan_out_paced_seconds(&self) -> f64 {
        self.inner.pacer.waited_seconds()
    }

    /// The membership cache the hubs keep true.
    pub fn members(&self) -> &crate::members::MemberCache {
        &self.inner.members
    }

    /// A page of the conversation's members (or a prefix search) from memory, when its list
    /// is complete here and at least at version `floor`; else `None` (ask the log), and the
    /// list starts filling if it can.
    pub fn member_page(
        &self,
        t: &TenantId,
        c: &ConvId,
        q: &tidings_log_api::MembersQuery,
        floor: u64,
    ) -> Option<tidings_log_api::MemberPage> {
        let cache = &self.inner.members;
        let page = cache.page(t, c, q.after.as_ref(), &q.prefix, q.limit, floor);
        if page.is_none()
            && let Some(fill) = cache.begin_fill(t, c)
        {
            let (registry, tenant, conv) = (self.clone(), t.clone(), c.clone());
            // Owned by the list's slot: aborted when the list goes (hub stopped, evicted).
            let task =
                tokio::spawn(async move { registry.fill_members(&tenant, &conv, fill).await });
            cache.attach(t, c, fill, task.abort_handle());
        }
        page
    }

    /// Reads the conversation's whole member list into the cache, a page at a time.
    async fn fill_members(&self, t: &TenantId, c: &ConvId, fill: crate::members::Fill) {
        let cache = &self.inner.members;
        let cfg = &self.inner.cfg;
        let limit = cfg.member_fill_page.min(cfg.read_limit).max(1);
        while let Some(after) = cache.next_after(t, c, fill) {
            let q = tidings_log_api::MembersQuery {
                after,
                limit,
                prefix: String::new(),
                since_version: None,
            };
            match self.inner.log.members(&Caller::Gateway, t, c, &q).await {
                Ok(page) => {
                    let last = page.members.len() < limit;
                    if !cache.add_page(t, c, fill, page.version, page.members, last) {
                        return;
                    }
                }
                Err(e) => {
                    warn!(error = %e, tenant = %t, conv = %c, "failed to fill a member list");
                    cache.abandon(t, c, fill);
                    return;
                }
            }
        }
    }

    /// How many of the fan-out's subscriptions are missing now (being made again); 0 when
    /// every conversation and user followed here is subscribed.
    pub fn missing_subscriptions(&self) -> usize {
        self.inner.missing.load(Ordering::Relaxed)
    }

    async fn watch(&self, subject: String) -> Resubscribing {
        Resubscribing::new(
            self.inner.nats.clone(),
            subject,
            self.inner.bus.lost.subscribe(),
            self.inner.missing.clone(),
        )
        .await
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells every session to close (graceful shutdown); returns how many there were.
    pub fn close_all(&self, order: CloseOrder) -> usize {
        let state = self.state();
        let mut n = 0;
        for user in state.users.values() {
            for s in user.sessions.values() {
                s.kill.fire(order.clone());
                n += 1;
            }
        }
        n
    }

    /// Tells every session of `user` for which `matches` holds to close; returns how many.
    /// What a revocation uses: `matches` looks at the session's `jti` and `issued_at`.
    pub fn close_user(
        &self,
        tenant: &TenantId,
        user: &UserId,
        matches: impl Fn(&SessionHandle) -> bool,
        order: CloseOrder,
    ) -> usize {
        let state = self.state();
        let Some(entry) = state.users.get(&(tenant.clone(), user.clone())) else {
            return 0;
        };
        let mut n = 0;
        for s in entry.sessions.values().filter(|s| matches(s)) {
            s.kill.fire(order.clone());
            n += 1;
        }
        n
    }

    /// Like [`Registry::close_user`] for every user of `tenant` (a revoked `jti` does not
    /// say whose it is).
    pub fn close_tenant_sessions(
        &self,
        tenant: &TenantId,
        matches: impl Fn(&SessionHandle) -> bool,
        order: CloseOrder,
    ) -> usize {
        let state = self.state();
        let mut n = 0;
        for ((t, _), entry) in &state.users {
            if t != tenant {
                continue;
            }
            for s in entry.sessions.values().filter(|s| matches(s)) {
                s.kill.fire(order.clone());
                n += 1;
            }
        }
        n
    }

    /// Every registered session (for periodic checks of their tokens).
    pub fn sessions(&self) -> Vec<SessionHandle> {
        self.state()
            .users
            .values()
            .flat_map(|u| u.sessions.values().cloned())
            .collect()
    }

    /// Fires on every NATS (re)connection.
    pub fn reconnections(&self) -> broadcast::Receiver<()> {
        self.inner.bus.reconnected.subscribe()
    }

    /// Sessions still registered.
    pub fn session_count(&self) -> usize {
        self.state().session_convs.len()
    }

    /// Number of conversations with a live subscription here (for tests and metrics).
    pub fn hub_count(&self) -> usize {
        self.state().hubs.len()
    }

    /// Registers an authenticated session: its user's notices are watched from now on.
    pub fn add_session(&self, session: &SessionHandle) {
        let mut state = self.state();
        let key = (session.tenant.clone(), session.user.clone());
        let entry = state.users.entry(key).or_insert_with(|| UserEntry {
            sessions: HashMap::new(),
            task: tokio::spawn(watch_user(
                self.clone(),
                session.tenant.clone(),
                session.user.clone(),
            )),
        });
        entry.sessions.insert(session.id, session.clone());
        state.session_convs.entry(session.id).or_default();
    }

    /// Puts sessions into a conversation's hub (starting it if needed). Resolves once the hub
    /// has them: every event it delivers after that reaches them.
    pub async fn join(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        sessions: Vec<SessionHandle>,
        from: Option<u64>,
    ) {
        let (done, wait) = oneshot::channel();
        let (commands, join) = {
            let mut state = self.state();
            let sessions: Vec<_> = sessions
                .into_iter()
                .filter(|s| state.session_convs.contains_key(&s.id))
                .collect();
            if sessions.is_empty() {
                return;
            }
            for s in &sessions {
                state
                    .session_convs
                    .entry(s.id)
                    .or_default()
                    .insert(conv.clone());
            }
            let key = (tenant.clone(), conv.clone());
            let mut sessions = sessions;
            if let Some(dead) = state.hubs.remove_if_finished(&key) {
                // A hub task that stopped (it should not) would leave its sessions without
                // pushes until they all left: make it again, with them.
                warn!(%tenant, %conv, sessions = dead.sessions.len(), "a conversation's hub had stopped; made again");
                let known: HashSet<u64> = sessions.iter().map(|s| s.id).collect();
                sessions.extend(
                    state
                        .users
                        .iter()
                        .filter(|((t, _), _)| t == tenant)
                        .flat_map(|(_, u)| u.sessions.values())
                        .filter(|s| dead.sessions.contains(&s.id) && !known.contains(&s.id))
                        .cloned(),
                );
            }
            let hub = state.hubs.entry(key).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(HUB_COMMANDS);
                let left = Arc::new(Notify::new());
                HubHandle {
                    commands: tx,
                    sessions: HashSet::new(),
                    left: left.clone(),
                    task: tokio::spawn(run_hub(
                        self.clone(),
                        tenant.clone(),
                        conv.clone(),
                        rx,
                        left,
                        from.map(|f| f.saturating_sub(1)),
                    )),
                }
            });
            hub.sessions.extend(sessions.iter().map(|s| s.id));
            let join = HubCommand {
                sessions,
                from,
                done: Some(done),
                heal: false,
            };
            (hub.commands.clone(), join)
        };
        // Sent outside the lock: a full queue makes this join wait, nothing else. If the
        // hub stops meanwhile (everyone left), `wait` resolves at once.
        let _ = commands.send(join).await;
        let _ = wait.await;
    }

    /// Asks the conversation's hub to catch up with the log now; `false` when there is no
    /// hub or its command queue is full.
    fn heal_hub(&self, tenant: &TenantId, conv: &ConvId) -> bool {
        let state = self.state();
        let Some(hub) = state.hubs.get(&(tenant.clone(), conv.clone())) else {
            return false;
        };
        hub.commands
            .try_send(HubCommand {
                sessions: Vec::new(),
                from: None,
                done: None,
                heal: true,
            })
            .is_ok()
    }

    /// Takes sessions out of a conversation; stops its hub when none are left.
    fn leave(&self, tenant: &TenantId, conv: &ConvId, ids: &[u64]) {
        let mut state = self.state();
        for id in ids {
            if let Some(convs) = state.session_convs.get_mut(id) {
                convs.remove(conv);
            }
        }
        let key = (tenant.clone(), conv.clone());
        let empty = match state.hubs.get_mut(&key) {
            Some(hub) => {
                for id in ids {
                    hub.sessions.remove(id);
                }
                hub.left.notify_one();
                hub.sessions.is_empty()
            }
            None => false,
        };
        if empty && let Some(hub) = state.hubs.remove(&key) {
            hub.task.abort();
        }
    }

    /// The online sessions of a user on this gateway.
    fn user_sessions(&self, tenant: &TenantId, user: &UserId) -> Vec<SessionHandle> {
        self.state()
            .users
            .get(&(tenant.clone(), user.clone()))
            .map(|u| u.sessions.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets a session: out of every conversation, and its user unwatched if it was the
    /// user's last session here.
    pub fn remove_session(&self, session: &SessionHandle) {
        let convs: Vec<ConvId> = {
            let mut state = self.state();
            let convs = state.session_convs.remove(&session.id).unwrap_or_default();
            let key = (session.tenant.clone(), session.user.clone());
            if let Some(user) = state.users.get_mut(&key) {
                user.sessions.remove(&session.id);
                if user.sessions.is_empty()
                    && let Some(user) = state.users.remove(&key)
                {
                    user.task.abort();
                }
            }
            convs.into_iter().collect()
        };
        for conv in convs {
            self.leave(&session.tenant, &conv, &[session.id]);
        }
    }
}

/// Follows one user's notices: joins and leaves made elsewhere, read cursors moved on other
/// devices.
async fn watch_user(registry: Registry, tenant: TenantId, user: UserId) {
    let mut sub = registry.watch(subjects::user(&tenant, &user)).await;
    loop {
        // Notices missed while resubscribing are hints only: a join is also seen by the
        // hub's own heal, and the next read cursor supersedes a lost one.
        let Delivery::Message(msg) = sub.next().await else {
            continue;
        };
        let Ok(notice) = UserNotice::decode(msg.payload.as_ref()) else {
            continue;
        };
        let Ok(conv) = ConvId::new(notice.conversation) else {
            continue;
        };
        match notice.change {
            Some(Change::JoinedSeq(seq)) => {
                let sessions = registry.user_sessions(&tenant, &user);
                registry.join(&tenant, &conv, sessions, Some(seq)).await;
            }
            // The hub delivers the leave event to the leaver, then drops their sessions
            // (`fan_out`): ask it to catch up now rather than drop them here, which could
            // overtake the event on the conversation's subject and leave the leaver without
            // it. Only if the hub cannot take the request are they dropped here at once.
            Some(Change::LeftSeq(_)) if !registry.heal_hub(&tenant, &conv) => {
                let ids: Vec<u64> = registry
                    .user_sessions(&tenant, &user)
                    .iter()
                    .map(|s| s.id)
                    .collect();
                registry.leave(&tenant, &conv, &ids);
            }
            Some(Change::LeftSeq(_)) => {}
            Some(Change::ReadSeq(read_seq)) => {
                let frame = push_frame(Msg::ReadCursor(proto::ReadCursor {
                    conversation: conv.to_string(),
                    read_seq,
                }));
                for s in registry.user_sessions(&tenant, &user) {
                    s.push(frame.clone());
                }
            }
            None => {}
        }
    }
}

/// One conversation's delivery state.
struct Hub {
    registry: Registry,
    tenant: TenantId,
    conv: ConvId,
    /// The last seq delivered to the sessions.
    delivered: u64,
    /// Events that arrived ahead of `delivered + 1`, with their push frames.
    pending: BTreeMap<u64, (Event, Bytes)>,
    sessions: HashMap<u64, SessionHandle>,
}

impl Hub {
    fn log(&self) -> &dyn LogService {
        &*self.registry.inner.log
    }

    async fn fan_out(&mut self, event: &Event, frame: Bytes) {
        // Before any session sees it: a leaver is no longer answered "member" from memory.
        self.registry
            .inner
            .members
            .apply(&self.tenant, &self.conv, event);
        let inner = &self.registry.inner;
        let paced =
            inner.pacer.enabled() && self.sessions.len() >= inner.cfg.fan_out_paced_sessions;
        let slice = if paced { PACED_SLICE } else { FAN_OUT_SLICE };
        for (i, s) in self.sessions.values().enumerate() {
            if i % slice == 0 {
                // A big group's slice waits for the gateway's pacing budget, if it must.
                let wait = if paced {
                    let n = slice.min(self.sessions.len() - i);
                    inner.pacer.reserve(n, std::time::Instant::now())
                } else {
                    None
                };
                if let Some(wait) = wait {
                    tokio::time::sleep(wait).await;
                } else if i > 0 {
                    // The sessions woken so far, and every other conversation's pushes, go
                    // first: a small conversation waits behind one slice of a big group's
                    // fan-out, not all of it. Nothing else of this hub runs meanwhile, so
                    // its events still reach each session in order.
                    tokio::task::yield_now().await;
                }
            }
            s.push(frame.clone());
        }
        let age_ms = tidings_log_api::now_ms()
            .saturating_sub(event.server_time_ms)
            .max(0);
        crate::metrics::FANOUT_SECONDS.observe(age_ms as f64 / 1000.0);
        self.delivered = event.seq;
        // Membership follows the log: the leaver gets its own leave event, then no more.
        if let Some(Body::MemberLeft(left)) = &event.body
            && let Ok(user) = UserId::new(left.user.clone())
        {
            let ids: Vec<u64> = self
                .sessions
                .values()
                .filter(|s| s.user == user)
                .map(|s| s.id)
                .collect();
            for id in &ids {
                self.sessions.remove(id);
            }
            self.registry.leave(&self.tenant, &self.conv, &ids);
        }
    }

    /// Delivers an event from NATS: in order, once, gaps filled from the log.
    async fn accept(&mut self, event: Event, frame: Bytes) {
        if event.seq <= self.delivered || self.pending.contains_key(&event.seq) {
            return; // duplicate
        }
        if event.seq == self.delivered + 1 {
            self.fan_out(&event, frame).await;
        } else {
            self.pending.insert(event.seq, (event, frame));
            if self.pending.len() > self.registry.inner.cfg.max_pending {
                self.pending.clear();
            }
            let upto = self
                .pending
                .keys()
                .next()
                .map_or(self.delivered, |first| first - 1);
            self.fill(upto).await;
        }
        self.drain_pending().await;
    }

    async fn drain_pending(&mut self) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() <= self.delivered {
                entry.remove();
            } else if *entry.key() == self.delivered + 1 {
                let (event, frame) = entry.remove();
                self.fan_out(&event, frame).await;
            } else {
                break;
            }
        }
    }

    /// One page of events `from..=upto` from the log (at most the read limit).
    async fn page(&self, from: u64, upto: u64) -> Result<Vec<Event>, tidings_log_api::LogError> {
        let limit = ((upto - from + 1) as usize).min(self.registry.inner.cfg.read_limit);
        self.log()
            .read(
                &Caller::Gateway,
                &self.tenant,
                &self.conv,
                ReadRange::forward(from, limit),
            )
            .await
    }

    /// Reads and delivers everything after `delivered` up to `upto` from the log.
    async fn fill(&mut self, upto: u64) {
        while self.delivered < upto {
            let before = self.delivered;
            match self.page(self.delivered + 1, upto).await {
                Ok(events) => {
                    for e in &events {
                        if e.seq == self.delivered + 1 {
                            self.fan_out(e, push_frame(Msg::Event(e.clone()))).await;
                        }
                    }
                    if self.delivered == before {
                        return; // nothing usable: try again on the next event or heal
                    }
                }
                Err(e) => {
                    warn!(error = %e, tenant = %self.tenant, conv = %self.conv, "failed to fill a gap from the log");
                    return;
                }
            }
        }
    }

    /// Catches up with the log's head (after a reconnect, or periodically).
    async fn heal(&mut self) {
        match self
            .log()
            .conversation(&Caller::Gateway, &self.tenant, &self.conv)
            .await
        {
            Ok(info) if info.head_seq > self.delivered => {
                debug!(tenant = %self.tenant, conv = %self.conv, from = self.delivered, to = info.head_seq, "healing a gap from the log");
                self.fill(info.head_seq).await;
                self.drain_pending().await;
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "failed to read a head while healing"),
        }
    }

    /// The sessions the registry has in this conversation now (the truth; see
    /// [`HubHandle::left`]).
    fn registered(&self) -> HashSet<u64> {
        self.registry
            .state()
            .hubs
            .get(&(self.tenant.clone(), self.conv.clone()))
            .map(|h| h.sessions.clone())
            .unwrap_or_default()
    }

    /// Drops the sessions that left.
    fn reconcile(&mut self) {
        let registered = self.registered();
        self.sessions.retain(|id, _| registered.contains(id));
    }

    async fn command(&mut self, cmd: HubCommand) {
        let HubCommand {
            mut sessions,
            from,
            done,
            heal,
        } = cmd;
        // A session that left before its join arrived is not added.
        let registered = self.registered();
        sessions.retain(|s| registered.contains(&s.id));
        if let Some(from) = from.filter(|f| *f <= self.delivered) {
            // Catch the newcomers up to where the others are.
            let mut next = from;
            while next <= self.delivered {
                match self.page(next, self.delivered).await {
                    Ok(events) if !events.is_empty() => {
                        for e in &events {
                            let frame = push_frame(Msg::Event(e.clone()));
                            for s in &sessions {
                                s.push(frame.clone());
                            }
                            next = e.seq + 1;
                        }
                    }
                    _ => break,
                }
            }
        }
        for s in sessions {
            self.sessions.insert(s.id, s);
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
        if from.is_some() || heal {
            // A member was added or left: deliver whatever the hub has not seen yet, now.
            self.heal().await;
        }
    }

    /// Opens an envelope from the stream. One that does not open (forged, damaged, or of a
    /// tenant whose keys are gone) is never delivered: `None`, and the caller heals from the
    /// log, which has the real event if there is one.
    async fn open(&self, payload: &[u8]) -> Option<(Event, Bytes)> {
        let env = match bus_crypto::envelope(payload) {
            Ok(env) => env,
            Err(e) => {
                warn!(error = %e, tenant = %self.tenant, conv = %self.conv, "failed to read an event envelope");
                return None;
            }
        };
        let registry = &self.registry.inner;
        let key = registry
            .keys
            .get(&self.tenant, Some(env.key_id), || {
                registry.log.transport_key(&self.tenant, Some(env.key_id))
            })
            .await;
        let opened = match key {
            Ok(key) => {
                let conv = self.conv.clone();
                bus_crypto::off_runtime_if_large(env.sealed.len(), move || {
                    bus_crypto::open_event(&key, &conv, &env)
                })
                .await
            }
            Err(e) => {
                warn!(error = %e, tenant = %self.tenant, key_id = env.key_id, "failed to get a transport key");
                return None;
            }
        };
        match opened {
            Ok((event, plain)) => Some((event, event_frame(&plain))),
            Err(e) => {
                warn!(error = %e, tenant = %self.tenant, conv = %self.conv, "an event envelope did not open; treated as lost");
                None
            }
        }
    }

    fn typing(&self, notice: TypingNotice) {
        let frame = push_frame(Msg::Typing(proto::TypingNotice {
            conversation: notice.conversation,
            user: notice.user.clone(),
        }));
        for s in self
            .sessions
            .values()
            .filter(|s| s.user.as_str() != notice.user)
        {
            s.push(frame.clone());
        }
    }
}

/// The hub's conversation tracked by the membership cache while the hub runs (dropped on
/// every way out, a panic included).
struct Tracked {
    registry: Registry,
    tenant: TenantId,
    conv: ConvId,
}

impl Tracked {
    fn new(hub: &Hub) -> Self {
        hub.registry.inner.members.track(&hub.tenant, &hub.conv);
        Tracked {
            registry: hub.registry.clone(),
            tenant: hub.tenant.clone(),
            conv: hub.conv.clone(),
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.registry
            .inner
            .members
            .untrack(&self.tenant, &self.conv);
    }
}

async fn run_hub(
    registry: Registry,
    tenant: TenantId,
    conv: ConvId,
    mut commands: mpsc::Receiver<HubCommand>,
    left: Arc<Notify>,
    start_after: Option<u64>,
) {
    // Subscribe before reading the head: nothing committed after the read can be missed.
    let mut events = registry.watch(subjects::events(&tenant, &conv)).await;
    let mut typing = registry.watch(subjects::typing(&tenant, &conv)).await;
    let mut reconnected = registry.inner.bus.reconnected.subscribe();
    let heal_every = registry.inner.cfg.heal_interval;
    let head = registry
        .inner
        .log
        .conversation(&Caller::Gateway, &tenant, &conv)
        .await
        .map_or(0, |i| i.head_seq);
    let mut hub = Hub {
        registry,
        tenant,
        conv,
        delivered: start_after.map_or(head, |s| s.min(head)),
        pending: BTreeMap::new(),
        sessions: HashMap::new(),
    };
    // From here every membership change reaches the cache in seq order, until the hub stops.
    let _tracked = Tracked::new(&hub);
    let mut heal_timer = tokio::time::interval(heal_every);
    heal_timer.tick().await;
    loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(cmd) => hub.command(cmd).await,
                None => return,
            },
            _ = left.notified() => hub.reconcile(),
            delivery = events.next() => match delivery {
                Delivery::Message(msg) => match hub.open(&msg.payload).await {
                    Some((event, frame)) => hub.accept(event, frame).await,
                    None => hub.heal().await,
                },
                // Subscribed again: what was published meanwhile is in the log.
                Delivery::Resubscribed => hub.heal().await,
            },
            delivery = typing.next() => {
                if let Delivery::Message(msg) = delivery
                    && let Ok(notice) = TypingNotice::decode(msg.payload.as_ref())
                {
                    hub.typing(notice);
                }
            }
            _ = reconnected.recv() => hub.heal().await,
            _ = heal_timer.tick() => hub.heal().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings_schemas::v1::MessagePosted;

    #[test]
    fn event_frame_is_the_encoded_push() {
        for text in ["", "hi", &"x".repeat(300), &"y".repeat(70_000)] {
            let event = Event {
                tenant: "acme".into(),
                conversation: "general".into(),
                seq: 300,
                event_id: "0190".into(),
                sender: "alice".into(),
                server_time_ms: 1_700_000_000_000,
                client_msg_id: "m1".into(),
                body: Some(Body::MessagePosted(MessagePosted {
                    text: text.to_string(),
                    ..Default::default()
                })),
            };
            let frame = event_frame(&event.encode_to_vec());
            assert_eq!(
                frame,
                push_frame(Msg::Event(event.clone())),
                "{}",
                text.len()
            );
            let decoded = proto::ServerFrame::decode(frame).expect("a client decodes it");
            assert_eq!(decoded.request_id, 0);
            assert_eq!(decoded.msg, Some(Msg::Event(event)));
        }
    }
}
