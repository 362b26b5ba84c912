//! The sequencer: one task owns every write, assigns seqs and group-commits.
//!
//! Requests queue on a bounded channel. The task takes whatever has queued (up to
//! `max_batch`), reads every key the batch needs in one `batch_get`, applies the commands in
//! arrival order against that snapshot plus the batch's own earlier writes, and commits the
//! whole batch as one transaction: one fsync for many appends across many conversations.
//! Only after the commit returns are the callers answered, so an ack always means durable.
//!
//! While a commit is in flight new requests keep queueing, so the batch grows with the load:
//! one request alone commits at once, a thousand concurrent ones share a handful of fsyncs.
//!
//! Because this task is the only writer of its store, its reads are never stale, and it keeps
//! exact caches of the keys it reads for almost every request: heads (`hd/`) and memberships
//! (`mb/`). Only dedupe keys are read from the store per append. The head checks in the
//! transaction (`Expect` on every `hd/` key) guard against writes behind its back.
//!
//! Ownership (see `lease`): the sequencer only takes requests for partitions it holds the
//! lease of, and every commit expects each touched partition's lease exactly as held, so a
//! writer whose lease was taken over can never commit again: its batch fails whole, it reads
//! the leases back, drops what it lost (logged) and refuses those partitions from then on.
//! Renewals are requests on the same queue, so the lease value a batch expects is always the
//! one the batch before it wrote.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;
use tidings_schemas::storage::{
    Dedupe, Head, Lease, Membership, MembershipChange, ReplicaBatch, ReplicaWrite, SealedEvent,
    UserConversation,
};
use tidings_schemas::v1::{
    ConversationCreated, ConversationKind, ConversationRenamed, DisplayNameSet, Event,
    MemberJoined, MemberLeft, MemberRoleChanged, event::Body,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::crypto::{DataKey, Keyring};
use crate::error::LogError;
use crate::ids::{ConvId, TenantId, UserId};
use crate::keys;
use crate::lease::{Held, Ownership, Registration, partition_of_part};
use crate::log::{Append, By, Committed, CreateConversation, FeedItem, LogConfig};
use crate::outage::Outage;
use crate::policy::{self, Action, KindPolicy};
use crate::send_buffer::SendBuffer;
use crate::store::{KvStore, StoreError, Transaction};

pub(crate) enum Command {
    Create(CreateConversation),
    Append(Append),
    AddMember {
        tenant: TenantId,
        conv: ConvId,
        by: UserId,
        user: UserId,
        /// `None`: the kind's member role.
        role: Option<String>,
    },
    SetRole {
        tenant: TenantId,
        conv: ConvId,
        by: UserId,
        user: UserId,
        role: String,
    },
    SetDisplayName {
        tenant: TenantId,
        conv: ConvId,
        by: By,
        user: UserId,
        name: String,
    },
    RemoveMember {
        tenant: TenantId,
        conv: ConvId,
        by: UserId,
        user: UserId,
    },
    Rename {
        tenant: TenantId,
        conv: ConvId,
        by: UserId,
        title: String,
    },
    MarkRead {
        tenant: TenantId,
        conv: ConvId,
        user: UserId,
        seq: u64,
    },
    /// A home cell's commit of a replicated tenant, applied here (the DR cell) as it was
    /// written there (`cells`).
    Replica {
        tenant: TenantId,
        conv: ConvId,
        batch: Box<ReplicaBatch>,
    },
    /// Lease upkeep, queued like any write so it is ordered with the batches.
    Lease(LeaseOp),
}

pub(crate) enum LeaseOp {
    /// Push the expiry of every lease held; answers with the partitions found lost.
    Renew,
    /// Start taking requests for partitions the log's lease keeper just acquired.
    Adopt(Vec<(u32, Held)>),
    /// Release every lease held (a clean stop): later requests are refused.
    Release,
}

impl Command {
    /// The conversation a write is about; `None` for lease upkeep.
    pub(crate) fn tenant_conv(&self) -> Option<(&TenantId, &ConvId)> {
        match self {
            Command::Create(c) => Some((&c.tenant, &c.conv)),
            Command::Append(a) => Some((&a.tenant, &a.conv)),
            Command::AddMember { tenant, conv, .. }
            | Command::SetRole { tenant, conv, .. }
            | Command::SetDisplayName { tenant, conv, .. }
            | Command::RemoveMember { tenant, conv, .. }
            | Command::Rename { tenant, conv, .. }
            | Command::MarkRead { tenant, conv, .. }
            | Command::Replica { tenant, conv, .. } => Some((tenant, conv)),
            Command::Lease(_) => None,
        }
    }

    /// Every key `apply` may read, so the batch can fetch them in one round trip.
    pub(crate) fn reads(&self, out: &mut Vec<Vec<u8>>) {
        let Some((t, c)) = self.tenant_conv() else {
            return;
        };
        out.push(keys::head(t, c));
        match self {
            Command::Create(_) | Command::Lease(_) => {}
            Command::Append(a) => {
                out.push(keys::member(t, c, &a.sender));
                out.push(keys::dedupe(t, c, &a.sender, &a.client_msg_id));
                if crate::unread::is_message(&a.body) {
                    // The sender's own messages are kept out of their unread count.
                    out.push(keys::user_conv(t, &a.sender, c));
                }
                if let Some(target) = author_only_target(&a.body) {
                    out.push(keys::event(t, c, target));
                }
            }
            Command::AddMember { by, user, .. }
            | Command::RemoveMember { by, user, .. }
            | Command::SetRole { by, user, .. } => {
                out.push(keys::member(t, c, by));
                out.push(keys::member(t, c, user));
            }
            Command::SetDisplayName { by, user, .. } => {
                if let By::Member(by) = by {
                    out.push(keys::member(t, c, by));
                }
                out.push(keys::member(t, c, user));
            }
            Command::Rename { by, .. } => out.push(keys::member(t, c, by)),
            Command::MarkRead { user, seq, .. } => {
                out.push(keys::member(t, c, user));
                out.push(keys::user_conv(t, user, c));
                // The message count as of the new cursor (when it is not the head).
                out.push(keys::event(t, c, *seq));
            }
            Command::Replica { batch, .. } => {
                out.push(keys::replica_mark(&batch.source, batch.partition));
                // Heads are checked in the transaction; events it would replace are kept.
                out.extend(
                    batch
                        .writes
                        .iter()
                        .filter(|w| w.key.starts_with(b"hd\0") || w.key.starts_with(b"ev\0"))
                        .map(|w| w.key.clone()),
                );
            }
        }
    }
}

/// The sender of events the system makes (display names set by the operator's tools).
fn system_user() -> UserId {
    UserId::new("system").expect("a valid user id")
}

/// Edits and recalls point at a message (recalls of others' messages as the policy allows).
fn author_only_target(body: &Body) -> Option<u64> {
    match body {
        Body::MessageEdited(e) => Some(e.target_seq),
        Body::MessageRecalled(r) => Some(r.target_seq),
        _ => None,
    }
}

/// The seq a body points at, if it points at one.
fn target_seq(body: &Body) -> Option<u64> {
    match body {
        Body::MessagePosted(p) if p.reply_to_seq != 0 => Some(p.reply_to_seq),
        Body::ReactionAdded(r) => Some(r.target_seq),
        Body::ReactionRemoved(r) => Some(r.target_seq),
        other => author_only_target(other),
    }
}

pub(crate) enum Outcome {
    Committed(Committed),
    Cursor(u64),
    /// Lease upkeep done; the partitions found lost on the way.
    Leases {
        lost: Vec<u32>,
    },
    /// A replica batch: applied now, or skipped (at or below the mark: applied before).
    Replica {
        applied: bool,
    },
}

pub(crate) struct Request {
    pub cmd: Command,
    pub reply: oneshot::Sender<Result<Outcome, LogError>>,
}

/// The conversations a batch moved the heads of, with their new last seq: what the hot
/// search index is told (one notice per conversation per commit, not per event).
fn committed_heads(pending: &HashMap<Vec<u8>, Option<Vec<u8>>>) -> Vec<crate::hot_index::Notice> {
    pending
        .iter()
        .filter(|(k, _)| k.starts_with(b"hd\0"))
        .filter_map(|(k, v)| {
            let head = Head::decode(v.as_deref()?).ok()?;
            let (t, c) = keys::head_ids(k)?;
            Some((TenantId::new(t).ok()?, ConvId::new(c).ok()?, head.last_seq))
        })
        .collect()
}

/// Counters that show group commit at work (and feed the benchmark).
#[derive(Default)]
pub struct WriterStats {
    pub commits: AtomicU64,
    pub requests: AtomicU64,
    pub feed_dropped: AtomicU64,
    /// Events in the send buffer, not yet in the store (as of the last outage batch).
    pub buffered_events: AtomicU64,
    /// Events replayed from the send buffer into the store since the log opened.
    pub replayed_events: AtomicU64,
}

pub(crate) struct Writer {
    pub store: Arc<dyn KvStore>,
    pub keyring: Arc<Keyring>,
    pub cfg: LogConfig,
    pub stats: Arc<WriterStats>,
    pub cache: Cache,
    /// Random bits for event ids; seeded from the OS, no syscall per event.
    pub rng: fastrand::Rng,
    /// Where committed events and cursor moves are announced, if anyone listens.
    pub feed: Option<mpsc::Sender<FeedItem>>,
    /// Told which conversations committed, for the hot search index (`hot_index`).
    pub indexer: Option<Arc<crate::hot_index::Indexer>>,
    /// The writes of the batch whose commit is running (empty when none is).
    pub in_flight: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Which partitions this writer owns, as every handle of the log sees it.
    pub own: Arc<Ownership>,
    /// The leases held, as last committed by this writer: what a batch expects when the
    /// batch in flight does not write the lease.
    pub held: HashMap<u32, Held>,
    /// Keeps the writer id registered as alive in this process while the sequencer runs.
    pub _registration: Registration,
    /// Where appends go while the store cannot commit (`outage`); `None`: they fail.
    pub buffer: Option<Arc<SendBuffer>>,
    /// Set while the store cannot commit or buffered records wait for replay.
    pub outage: Option<Outage>,
    /// This cell and the directory (`cells`); `None`: cells are off.
    pub cells: Option<Arc<crate::cells::Cells>>,
    /// Per partition, the last outbox position written (under the lease's epoch).
    pub outbox_last: HashMap<u32, crate::cells::Position>,
}

/// The committed values of the keys only this writer writes (heads and memberships),
/// `None` meaning "absent". Exact as long as this writer is the only one; dropped whole when
/// a commit fails (the store may then differ) or when it reaches its bound.
pub(crate) struct Cache {
    entries: HashMap<Vec<u8>, Option<Vec<u8>>>,
    max_entries: usize,
}

impl Cache {
    pub fn new(max_entries: usize) -> Self {
        Cache {
            entries: HashMap::new(),
            max_entries,
        }
    }

    fn cacheable(key: &[u8]) -> bool {
        key.starts_with(b"hd\0") || key.starts_with(b"mb\0")
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.entries.get(key)
    }

    fn remember(&mut self, key: &[u8], value: Option<&Vec<u8>>) {
        if !Self::cacheable(key) {
            return;
        }
        if self.entries.len() >= self.max_entries && !self.entries.contains_key(key) {
            // Simple and exact: start over rather than track recency.
            self.entries.clear();
        }
        self.entries.insert(key.to_vec(), value.cloned());
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    /// Drops what is cached of one partition's conversations: another writer may have
    /// changed them while this one did not own it.
    pub(crate) fn forget_partition(&mut self, partition: u32, partitions: u32) {
        self.entries.retain(|key, _| {
            keys::conversation_part(key)
                .is_none_or(|part| partition_of_part(part, partitions) != partition)
        });
    }
}

/// Values read for a batch, and the batch's writes so far (`None`: deleted).
pub(crate) struct State {
    pub fetched: HashMap<Vec<u8>, Option<Vec<u8>>>,
    pub pending: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Keys written by this batch in the order first written, so the transaction is built
    /// deterministically.
    pub order: Vec<Vec<u8>>,
    /// What to announce once the batch is committed.
    pub announce: Vec<FeedItem>,
}

/// One command's view: its own writes over the batch's state. Merged into the state only if
/// the command succeeds, so a refused command leaves no trace.
struct Scratch<'a> {
    state: &'a State,
    writes: HashMap<Vec<u8>, Option<Vec<u8>>>,
    order: Vec<Vec<u8>>,
    keys: &'a HashMap<(TenantId, u32), DataKey>,
    current: Option<&'a DataKey>,
    now_ms: i64,
    rng: &'a mut fastrand::Rng,
    /// Collect feed items (only when someone listens).
    announce: Option<Vec<FeedItem>>,
    /// Epoch of the lease under which this command writes, recorded in the head.
    epoch: u64,
}

impl Scratch<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<&[u8]>, LogError> {
        if let Some(v) = self.writes.get(key) {
            return Ok(v.as_deref());
        }
        if let Some(v) = self.state.pending.get(key) {
            return Ok(v.as_deref());
        }
        match self.state.fetched.get(key) {
            Some(v) => Ok(v.as_deref()),
            None => Err(LogError::corrupt(
                key,
                "internal: key read without prefetch",
            )),
        }
    }

    fn decode<M: Message + Default>(&self, key: &[u8]) -> Result<Option<M>, LogError> {
        match self.get(key)? {
            Some(bytes) => M::decode(bytes)
                .map(Some)
                .map_err(|e| LogError::corrupt(key, e)),
            None => Ok(None),
        }
    }

    fn write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        if self.writes.insert(key.clone(), value).is_none() {
            self.order.push(key);
        }
    }

    fn put<M: Message>(&mut self, key: Vec<u8>, value: &M) {
        self.write(key, Some(value.encode_to_vec()));
    }

    fn head(&self, t: &TenantId, c: &ConvId) -> Result<Head, LogError> {
        self.decode::<Head>(&keys::head(t, c))?
            .ok_or_else(|| LogError::ConversationNotFound {
                tenant: t.to_string(),
                conversation: c.to_string(),
            })
    }

    fn membership(&self, t: &TenantId, c: &ConvId, u: &UserId) -> Result<Membership, LogError> {
        self.decode::<Membership>(&keys::member(t, c, u))?
            .ok_or_else(|| LogError::NotMember {
                user: u.to_string(),
                conversation: c.to_string(),
            })
    }

    /// Seals and writes the next event of the conversation, advancing `head` (which the
    /// caller writes back once it is done with it).
    fn push_event(
        &mut self,
        head: &mut Head,
        t: &TenantId,
        c: &ConvId,
        sender: &UserId,
        client_msg_id: &str,
        body: Body,
    ) -> Result<Committed, LogError> {
        let seq = head.last_seq + 1;
        // Times never go backwards within a conversation, even if the wall clock does.
        let time_ms = self.now_ms.max(head.last_time_ms);
        // UUIDv7: the event's own server time, then random bits.
        let mut random = [0u8; 10];
        self.rng.fill(&mut random);
        let event_id = uuid::Builder::from_unix_timestamp_millis(time_ms.max(0) as u64, &random)
            .into_uuid()
            .to_string();
        let event = Event {
            tenant: t.to_string(),
            conversation: c.to_string(),
            seq,
            event_id: event_id.clone(),
            sender: sender.to_string(),
            server_time_ms: time_ms,
            client_msg_id: client_msg_id.to_string(),
            body: Some(body),
        };
        let key = self
            .current
            .ok_or_else(|| LogError::corrupt(b"kr", "internal: no data key for the tenant"))?;
        if head.counts_messages && event.body.as_ref().is_some_and(crate::unread::is_message) {
            head.messages += 1;
        }
        let sealed = SealedEvent {
            key_id: key.id,
            ciphertext: key.seal_event(t, c, seq, &event.encode_to_vec()),
            messages: head.messages,
        };
        if let Some(announce) = self.announce.as_mut() {
            announce.push(FeedItem::Event(Arc::new(event)));
        }
        self.put(keys::event(t, c, seq), &sealed);
        debug_assert_eq!(seq, head.last_seq + 1);
        head.last_seq = seq;
        head.last_time_ms = time_ms;
        head.writer_epoch = self.epoch;
        Ok(Committed {
            seq,
            event_id,
            time_ms,
            duplicate: false,
        })
    }

    fn open_event(&self, t: &TenantId, c: &ConvId, seq: u64) -> Result<Option<Event>, LogError> {
        let key = keys::event(t, c, seq);
        let Some(sealed) = self.decode::<SealedEvent>(&key)? else {
            return Ok(None);
        };
        let data_key = self
            .keys
            .get(&(t.clone(), sealed.key_id))
            .ok_or_else(|| LogError::corrupt(&key, "internal: data key not resolved"))?;
        let plain = data_key
            .open_event(t, c, seq, &sealed.ciphertext)
            .map_err(|_| LogError::corrupt(&key, "sealed event does not open"))?;
        Event::decode(plain.as_slice())
            .map(Some)
            .map_err(|e| LogError::corrupt(&key, e))
    }

    fn apply(&mut self, cmd: &Command, cfg: &LogConfig) -> Result<Outcome, LogError> {
        match cmd {
            Command::Create(c) => self.create(c, cfg),
            Command::Append(a) => self.append(a, cfg),
            Command::AddMember {
                tenant,
                conv,
                by,
                user,
                role,
            } => self.add_member(tenant, conv, by, user, role.as_deref(), cfg),
            Command::SetRole {
                tenant,
                conv,
                by,
                user,
                role,
            } => self.set_role(tenant, conv, by, user, role, cfg),
            Command::SetDisplayName {
                tenant,
                conv,
                by,
                user,
                name,
            } => self.set_display_name(tenant, conv, by, user, name, cfg),
            Command::RemoveMember {
                tenant,
                conv,
                by,
                user,
            } => self.remove_member(tenant, conv, by, user, cfg),
            Command::Rename {
                tenant,
                conv,
                by,
                title,
            } => self.rename(tenant, conv, by, title, cfg),
            Command::MarkRead {
                tenant,
                conv,
                user,
                seq,
            } => self.mark_read(tenant, conv, user, *seq),
            Command::Replica { tenant, batch, .. } => self.replica(tenant, batch),
            Command::Lease(_) => Err(LogError::corrupt(b"ls", "internal: lease op applied")),
        }
    }

    /// Applies a home cell's batch: every write as it was made there, and the mark, unless
    /// the mark says it was applied already. An event it replaces with different bytes (this
    /// cell acknowledged it as home, and the cell that took over never got it) is kept under
    /// `rl/` for `tidings cell lost`.
    fn replica(&mut self, t: &TenantId, batch: &ReplicaBatch) -> Result<Outcome, LogError> {
        let mark_key = keys::replica_mark(&batch.source, batch.partition);
        let at = (batch.epoch, batch.n);
        if let Some(bytes) = self.get(&mark_key)?
            && crate::cells::decode_mark(bytes)
                .ok_or_else(|| LogError::corrupt(&mark_key, "not 16 bytes"))?
                >= at
        {
            return Ok(Outcome::Replica { applied: false });
        }
        for w in &batch.writes {
            if w.key.starts_with(b"ev\0")
                && let Some(old) = self.get(&w.key)?
                && Some(old) != w.value.as_deref()
                && let Some((c, seq)) = keys::event_ids(&w.key)
            {
                let old = old.to_vec();
                self.write(keys::replica_lost(t, &c, seq), Some(old));
            }
            self.write(w.key.clone(), w.value.clone());
        }
        self.write(mark_key, Some(crate::cells::encode_mark(at)));
        Ok(Outcome::Replica { applied: true })
    }

    fn create(&mut self, req: &CreateConversation, cfg: &LogConfig) -> Result<Outcome, LogError> {
        let (t, c) = (&req.tenant, &req.conv);
        let kind = cfg.kinds.get(&req.kind)?;
        if self.get(&keys::head(t, c))?.is_some() {
            return Err(LogError::ConversationExists {
                tenant: t.to_string(),
                conversation: c.to_string(),
            });
        }
        let members = req.all_members();
        let builtin = policy::builtin_kind(&kind.name);
        let mut head = Head {
            kind: builtin as i32,
            kind_name: kind.name.clone(),
            member_count: members.len() as u64,
            counts_messages: true,
            ..Head::default()
        };
        let body = Body::ConversationCreated(ConversationCreated {
            kind: builtin as i32,
            title: req.title.clone(),
            creator: req.creator.to_string(),
            members: members.iter().map(|m| m.to_string()).collect(),
            kind_name: kind.name.clone(),
        });
        let committed = self.push_event(&mut head, t, c, &req.creator, "", body)?;
        for m in &members {
            let role = if *m == req.creator {
                &kind.creator_role
            } else {
                &kind.member_role
            };
            self.join(t, c, m, role, committed.seq, &head);
        }
        head.membership_seq = committed.seq;
        self.put(keys::head(t, c), &head);
        Ok(Outcome::Committed(committed))
    }

    fn join(&mut self, t: &TenantId, c: &ConvId, user: &UserId, role: &str, seq: u64, head: &Head) {
        let membership = Membership {
            role: policy::builtin_role(role) as i32,
            role_name: role.to_string(),
            joined_seq: seq,
            display_name: String::new(),
        };
        self.put(keys::member(t, c, user), &membership);
        self.member_changed(t, c, seq, user, Some(&membership));
        // The join event itself counts as read.
        self.put(
            keys::user_conv(t, user, c),
            &crate::unread::joined(seq, head),
        );
    }

    /// The conversation's head and the policy of its kind.
    fn head_and_kind<'k>(
        &self,
        t: &TenantId,
        c: &ConvId,
        cfg: &'k LogConfig,
    ) -> Result<(Head, &'k KindPolicy), LogError> {
        let head = self.head(t, c)?;
        let kind = cfg.kinds.get(policy::kind_name(&head)).map_err(|_| {
            LogError::NotAllowed(format!(
                "{c} is of kind {:?}, which this log no longer knows",
                policy::kind_name(&head)
            ))
        })?;
        Ok((head, kind))
    }

    fn append(&mut self, a: &Append, cfg: &LogConfig) -> Result<Outcome, LogError> {
        let (t, c) = (&a.tenant, &a.conv);
        let (mut head, kind) = self.head_and_kind(t, c, cfg)?;
        // A retry answers with the original, even if the sender has left since.
        let dd_key = keys::dedupe(t, c, &a.sender, &a.client_msg_id);
        if let Some(original) = self.decode::<Dedupe>(&dd_key)? {
            return Ok(Outcome::Committed(Committed {
                seq: original.seq,
                event_id: original.event_id,
                time_ms: original.server_time_ms,
                duplicate: true,
            }));
        }
        let member = self.membership(t, c, &a.sender)?;
        let role = policy::role_name(&member);
        match &a.body {
            Body::MessagePosted(_) => kind.check(Action::Post, role)?,
            Body::MessageEdited(_) => kind.check(Action::Post, role)?,
            Body::ReactionAdded(_) | Body::ReactionRemoved(_) => {
                kind.check(Action::React, role)?;
            }
            Body::MessageRecalled(_) => {}
            _ => {
                return Err(LogError::InvalidRequest(
                    "only messages, edits, recalls and reactions are appended".into(),
                ));
            }
        }
        if let Body::MessagePosted(p) = &a.body
            && p.mention_all
        {
            kind.check(Action::MentionAll, role)?;
            // Past the threshold, a group's @all is its owners' alone, whatever the
            // configured policy allows (issue 13: @all in a 10,000-member group is a flood).
            if head.kind == ConversationKind::Group as i32
                && head.member_count >= cfg.mention_all_owners_only_from
                && role != "owner"
            {
                return Err(LogError::NotAllowed(format!(
                    "only owners may mention everyone in a group of {} members or more",
                    cfg.mention_all_owners_only_from
                )));
            }
        }
        if let Some(target) = target_seq(&a.body)
            && (target == 0 || target > head.last_seq)
        {
            return Err(LogError::NoSuchMessage {
                conversation: c.to_string(),
                seq: target,
                head: head.last_seq,
            });
        }
        if let Some(target) = author_only_target(&a.body) {
            let original = self.open_event(t, c, target)?;
            let posted = original
                .as_ref()
                .filter(|e| matches!(e.body, Some(Body::MessagePosted(_))));
            let own = posted.is_some_and(|e| e.sender == a.sender.as_str());
            match &a.body {
                Body::MessageRecalled(_) if own => {
                    kind.check(Action::RecallOwn, role)?;
                    let age = self.now_ms - posted.map_or(0, |e| e.server_time_ms);
                    if kind.recall_window_ms > 0 && age > kind.recall_window_ms as i64 {
                        return Err(LogError::NotAllowed(format!(
                            "message {target} is older than the {} ms a {} conversation allows \
                             for recalling it",
                            kind.recall_window_ms, kind.name
                        )));
                    }
                }
                Body::MessageRecalled(_) if posted.is_some() => {
                    kind.check(Action::RecallOthers, role)?;
                }
                _ if own => {}
                _ => {
                    return Err(LogError::NotAllowed(format!(
                        "only the author of message {target} may edit it, and only messages \
                         can be edited or recalled"
                    )));
                }
            }
        }
        let committed = self.push_event(
            &mut head,
            t,
            c,
            &a.sender,
            a.client_msg_id.as_str(),
            a.body.clone(),
        )?;
        let dedupe = Dedupe {
            seq: committed.seq,
            event_id: committed.event_id.clone(),
            server_time_ms: committed.time_ms,
        };
        self.put(dd_key, &dedupe);
        self.put(keys::head(t, c), &head);
        if crate::unread::is_message(&a.body) {
            self.own_message(t, c, &a.sender, committed.seq, head.messages)?;
        }
        Ok(Outcome::Committed(committed))
    }

    /// Keeps the sender's own message out of their unread count. A list entry that cannot be
    /// read (a store outage with reads down: taken as absent) is left as it is; the count
    /// then errs high by that message.
    fn own_message(
        &mut self,
        t: &TenantId,
        c: &ConvId,
        sender: &UserId,
        seq: u64,
        messages: u64,
    ) -> Result<(), LogError> {
        let key = keys::user_conv(t, sender, c);
        let Some(mut entry) = self.decode::<UserConversation>(&key)? else {
            return Ok(());
        };
        let moved = crate::unread::own_posted(&mut entry, seq, messages);
        self.put(key, &entry);
        if let (Some(read_seq), Some(announce)) = (moved, self.announce.as_mut()) {
            announce.push(FeedItem::ReadCursor {
                tenant: t.clone(),
                conv: c.clone(),
                user: sender.clone(),
                read_seq,
            });
        }
        Ok(())
    }

    fn require_changeable(kind: &KindPolicy, what: &str) -> Result<(), LogError> {
        if kind.fixed_members {
            return Err(LogError::NotAllowed(format!(
                "{what}: the members of a {} conversation are fixed",
                kind.name
            )));
        }
        Ok(())
    }

    fn add_member(
        &mut self,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
        role: Option<&str>,
        cfg: &LogConfig,
    ) -> Result<Outcome, LogError> {
        let (mut head, kind) = self.head_and_kind(t, c, cfg)?;
        Self::require_changeable(kind, "cannot add a member")?;
        let actor = self.membership(t, c, by)?;
        let actor_role = policy::role_name(&actor);
        kind.check(Action::Add, actor_role)?;
        let role = role.unwrap_or(&kind.member_role);
        if !kind.has_role(role) {
            return Err(LogError::InvalidRequest(format!(
                "{role:?} is not a role of a {} conversation (roles: {})",
                kind.name,
                kind.roles.join(", ")
            )));
        }
        if role != kind.member_role {
            kind.check(Action::SetRoles, actor_role)?;
        }
        if self.get(&keys::member(t, c, user))?.is_some() {
            return Err(LogError::AlreadyMember {
                user: user.to_string(),
                conversation: c.to_string(),
            });
        }
        if head.member_count >= cfg.max_group_members as u64 {
            return Err(LogError::NotAllowed(format!(
                "{c} already has the maximum of {} members",
                cfg.max_group_members
            )));
        }
        let body = Body::MemberJoined(MemberJoined {
            user: user.to_string(),
            role: policy::builtin_role(role) as i32,
            role_name: role.to_string(),
        });
        let committed = self.push_event(&mut head, t, c, by, "", body)?;
        self.join(t, c, user, role, committed.seq, &head);
        head.member_count += 1;
        head.membership_seq = committed.seq;
        self.put(keys::head(t, c), &head);
        Ok(Outcome::Committed(committed))
    }

    fn remove_member(
        &mut self,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
        cfg: &LogConfig,
    ) -> Result<Outcome, LogError> {
        let (mut head, kind) = self.head_and_kind(t, c, cfg)?;
        Self::require_changeable(kind, "cannot remove a member")?;
        let actor = self.membership(t, c, by)?;
        // Leaving is always allowed; removing someone else is the policy's.
        if by != user {
            kind.check(Action::Remove, policy::role_name(&actor))?;
        }
        let leaving = self.membership(t, c, user)?;
        let body = Body::MemberLeft(MemberLeft {
            user: user.to_string(),
        });
        let committed = self.push_event(&mut head, t, c, by, "", body)?;
        self.write(keys::member(t, c, user), None);
        self.write(keys::user_conv(t, user, c), None);
        // The window ends; search still finds its messages if the user rejoins.
        self.write(
            keys::user_window(t, user, c, leaving.joined_seq),
            Some(committed.seq.to_be_bytes().to_vec()),
        );
        self.member_changed(t, c, committed.seq, user, None);
        head.member_count = head.member_count.saturating_sub(1);
        head.membership_seq = committed.seq;
        self.put(keys::head(t, c), &head);
        Ok(Outcome::Committed(committed))
    }

    /// Records in the member list's change feed (mc/) what event `seq` made of `user`'s
    /// membership: the member as they now are, or `None` when removed.
    fn member_changed(
        &mut self,
        t: &TenantId,
        c: &ConvId,
        seq: u64,
        user: &UserId,
        now: Option<&Membership>,
    ) {
        let change = match now {
            Some(m) => MembershipChange {
                role: m.role,
                removed: false,
                role_name: policy::role_name(m).to_string(),
                display_name: m.display_name.clone(),
            },
            None => MembershipChange {
                removed: true,
                ..MembershipChange::default()
            },
        };
        self.put(keys::member_change(t, c, seq, user), &change);
    }

    fn rename(
        &mut self,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        title: &str,
        cfg: &LogConfig,
    ) -> Result<Outcome, LogError> {
        let (mut head, kind) = self.head_and_kind(t, c, cfg)?;
        let actor = self.membership(t, c, by)?;
        kind.check(Action::Rename, policy::role_name(&actor))?;
        let body = Body::ConversationRenamed(ConversationRenamed {
            title: title.to_string(),
        });
        let committed = self.push_event(&mut head, t, c, by, "", body)?;
        self.put(keys::head(t, c), &head);
        Ok(Outcome::Committed(committed))
    }

    fn set_role(
        &mut self,
        t: &TenantId,
        c: &ConvId,
        by: &UserId,
        user: &UserId,
        role: &str,
        cfg: &LogConfig,
    ) -> Result<Outcome, LogError> {
        let (mut head, kind) = self.head_and_kind(t, c, cfg)?;
        let actor = self.membership(t, c, by)?;
        kind.check(Action::SetRoles, policy::role_name(&actor))?;
        if !kind.has_role(role) {
            return Err(LogError::InvalidRequest(format!(
                "{role:?} is not a role of a {} conversation (roles: {})",
                kind.name,
                kind.roles.join(", ")
            )));
        }
        let mut member = self.membership(t, c, user)?;
        let body = Body::MemberRoleChanged(MemberRoleChanged {
            user: user.to_string(),
            role_name: role.to_string(),
        });
        let committed = self.push_event(&mut head, t, c, by, "", body)?;
        member.role = policy::builtin_role(role) as i32;
        member.role_name = role.to_string();
        self.put(keys::member(t, c, user), &member);
        self.member_changed(t, c, committed.seq, user, Some(&member));
        head.membership_seq = committed.seq;
        self.put(keys::head(t, c), &head);
        Ok(Outcome::Committed(committed))
    }

    fn set_display_name(
        &mut self,
        t: &TenantId,
        c: &ConvId,
        by: &By,
        user: &UserId,
        name: &str,
        cfg: &LogConfig,
    ) -> Result<Outcome, LogError> {
        let (mut head, kind) = self.head_and_kind(t, c, cfg)?;
        let sender = match by {
            By::Member(by) => {
                let actor = self.membership(t, c, by)?;
                let action = if by == user {
                    Action::SetOwnName
                } else {
                    Action::SetNames
                };
                kind.check(action, policy::role_name(&actor))?;
                by.clone()
            }
            By::System => system_user(),
        };
        let mut member = self.membership(t, c, user)?;
        let body = Body::DisplayNameSet(DisplayNameSet {
            user: user.to_string(),
            display_name: name.to_string(),
        });
        let committed = self.push_event(&mut head, t, c, &sender, "", body)?;
        member.display_name = name.to_string();
        self.put(keys::member(t, c, user), &member);
        self.member_changed(t, c, committed.seq, user, Some(&member));
        head.membership_seq = committed.seq;
        self.put(keys::head(t, c), &head);
        Ok(Outcome::Committed(committed))
    }

    fn mark_read(
        &mut self,
        t: &TenantId,
        c: &ConvId,
        user: &UserId,
        seq: u64,
    ) -> Result<Outcome, LogError> {
        let head = self.head(t, c)?;
        self.membership(t, c, user)?;
        let key = keys::user_conv(t, user, c);
        let mut entry = self
            .decode::<UserConversation>(&key)?
            .ok_or_else(|| LogError::corrupt(&key, "member without a conversation list entry"))?;
        // Cursors only move forward and never past the head.
        let target = seq.min(head.last_seq);
        if target > entry.read_seq {
            let messages_at = if target == head.last_seq {
                Some(head.messages)
            } else {
                self.decode::<SealedEvent>(&keys::event(t, c, target))?
                    .map(|e| e.messages)
            };
            crate::unread::read_to(&mut entry, target, messages_at);
            self.put(key, &entry);
            if let Some(announce) = self.announce.as_mut() {
                announce.push(FeedItem::ReadCursor {
                    tenant: t.clone(),
                    conv: c.clone(),
                    user: user.clone(),
                    read_seq: target,
                });
            }
        }
        Ok(Outcome::Cursor(entry.read_seq))
    }
}

impl Writer {
    /// The sequencer loop, pipelined: batch N+1 is read, applied and sealed while batch N's
    /// commit (and fsync) runs; N+1 is committed only after N succeeded, so commits keep
    /// their order. N+1's reads see N's writes through `in_flight`; if N fails, N+1 was built
    /// on writes that never happened, so it is failed too (and the cache dropped).
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let max = self.cfg.max_batch;
        let mut batch = Vec::with_capacity(max);
        let mut committing: Option<(tokio::task::JoinHandle<Result<(), StoreError>>, Prepared)> =
            None;
        loop {
            let received = if let Some(probe_at) = self.probe_at() {
                // The store cannot commit: appends go to the send buffer (see `outage`).
                if let Some((handle, prev)) = committing.take() {
                    let done = handle.await;
                    self.finish(prev, done).await;
                    continue;
                }
                let n = tokio::select! {
                    biased;
                    n = rx.recv_many(&mut batch, max) => n,
                    () = tokio::time::sleep_until(probe_at) => {
                        self.probe().await;
                        continue;
                    }
                };
                if n > 0 {
                    if tokio::time::Instant::now() >= probe_at {
                        self.probe().await;
                    }
                    if self.outage.is_some() {
                        self.buffer_batch(std::mem::take(&mut batch)).await;
                        continue;
                    }
                }
                n
            } else {
                match committing.as_mut() {
                    Some((handle, _)) => tokio::select! {
                        biased;
                        done = handle => {
                            if let Some((_, prev)) = committing.take() {
                                self.finish(prev, done).await;
                            }
                            continue;
                        }
                        n = rx.recv_many(&mut batch, max) => n,
                    },
                    None => rx.recv_many(&mut batch, max).await,
                }
            };
            if received == 0 {
                if let Some((handle, prev)) = committing.take() {
                    let done = handle.await;
                    self.finish(prev, done).await;
                }
                self.release().await;
                debug!("sequencer stopped: every handle to the log is gone");
                return;
            }
            crate::metrics::COMMIT_GROUP_SIZE.observe(batch.len() as f64);
            let Some(mut next) = self.prepare(std::mem::take(&mut batch)).await else {
                continue;
            };
            if let Some((handle, prev)) = committing.take() {
                let done = handle.await;
                if !self.finish(prev, done).await {
                    // Built on a batch that did not commit.
                    if self.outage.is_none() {
                        self.cache.clear();
                    }
                    let error = StoreError::Conflict {
                        key: "the previous batch".into(),
                        reason: "it failed to commit, and this batch was built on it",
                    };
                    self.complete(next, Err(error)).await;
                    continue;
                }
            }
            let txn = next.txn.take().unwrap_or_default();
            // The next batch reads these until the commit is done (moved back in `finish`).
            self.in_flight = std::mem::take(&mut next.state.pending);
            let store = self.store.clone();
            committing = Some((
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    let result = store.commit(txn).await;
                    crate::metrics::COMMIT_SECONDS.observe_duration(started.elapsed());
                    if result.is_err() {
                        crate::metrics::COMMIT_FAILURES.inc();
                    }
                    result
                }),
                next,
            ));
        }
    }

    /// Completes the committed batch; returns whether it committed.
    async fn finish(
        &mut self,
        mut batch: Prepared,
        done: Result<Result<(), StoreError>, tokio::task::JoinError>,
    ) -> bool {
        batch.state.pending = std::mem::take(&mut self.in_flight);
        // A panic in the commit is a broken invariant, not a failed write: the sequencer
        // panics too, and the log's watcher makes the process exit saying why.
        let done = done.map_err(|e| match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => e,
        });
        let result = done.unwrap_or_else(|e| {
            Err(StoreError::Backend {
                action: "run a commit",
                message: e.to_string(),
            })
        });
        let ok = result.is_ok();
        self.complete(batch, result).await;
        ok
    }

    /// The partition of a write if this writer owns it, the `not_owner` refusal if not;
    /// `None` for lease upkeep.
    pub(crate) fn owned_partition(&self, cmd: &Command) -> Option<Result<u32, LogError>> {
        let (t, c) = cmd.tenant_conv()?;
        let p = self.own.partition(t, c);
        Some(if self.held.contains_key(&p) {
            Ok(p)
        } else {
            Err(self.own.not_owner(p))
        })
    }

    /// The lease value a batch prepared now must expect: the one the batch in flight writes,
    /// if it writes one, else the one last committed.
    pub(crate) fn expected_lease(&self, partition: u32) -> Option<Vec<u8>> {
        if let Some(Some(bytes)) = self.in_flight.get(&keys::lease(partition)) {
            return Some(bytes.clone());
        }
        self.held.get(&partition).map(|h| h.bytes.clone())
    }

    /// Starts taking requests for partitions just acquired. What was cached of them may be
    /// stale (another writer owned them meanwhile), so it is dropped. What the previous
    /// owner left in the send buffer is loaded first (and replayed before anything else
    /// commits), so no seq it handed out is handed out again; a partition whose buffer
    /// cannot be read is not taken.
    pub(crate) async fn adopt(&mut self, acquired: &[(u32, Held)]) {
        if self.own.retired() {
            return;
        }
        for (p, held) in acquired {
            if self.held.contains_key(p) {
                continue;
            }
            if !self.load_buffered(*p, held.lease.epoch).await {
                continue;
            }
            self.cache.forget_partition(*p, self.own.partitions);
            self.held.insert(*p, held.clone());
            self.own.set(*p, true, &self.own.writer_id);
        }
    }

    /// After a failed commit: reads back every lease held and drops those that are no
    /// longer this writer's (taken over). Returns the partitions lost.
    pub(crate) async fn detect_loss(&mut self) -> BTreeSet<u32> {
        let mut lost = BTreeSet::new();
        if self.held.is_empty() {
            return lost;
        }
        let partitions: Vec<u32> = self.held.keys().copied().collect();
        let keys: Vec<Vec<u8>> = partitions.iter().map(|p| keys::lease(*p)).collect();
        let values = match self.store.batch_get(keys).await {
            Ok(values) => values,
            Err(e) => {
                warn!(error = %e, "failed to read the leases back after a failed commit");
                return lost;
            }
        };
        for (p, value) in partitions.into_iter().zip(values) {
            let Some(held) = self.held.get(&p) else {
                continue;
            };
            if value.as_deref() == Some(held.bytes.as_slice()) {
                continue;
            }
            let stored = value.and_then(|bytes| Lease::decode(bytes.as_slice()).ok());
            match stored {
                // A renewal whose commit reported failure but landed: still ours.
                Some(l) if l.owner == self.own.writer_id && l.epoch == held.lease.epoch => {
                    self.held.insert(p, Held::new(l));
                }
                other => {
                    let (taken_by, taken_epoch) =
                        other.map_or((String::new(), 0), |l| (l.owner, l.epoch));
                    warn!(
                        partition = p,
                        epoch = held.lease.epoch,
                        taken_by = %taken_by,
                        taken_epoch,
                        "lost the lease of a partition: refusing its writes from now on"
                    );
                    self.held.remove(&p);
                    self.own.set(p, false, &taken_by);
                    self.cache.forget_partition(p, self.own.partitions);
                    if let Some(buffer) = &self.buffer {
                        // Its next owner loads the records from the file.
                        buffer.drop_partition(p);
                    }
                    lost.insert(p);
                }
            }
        }
        lost
    }

    /// Releases every lease held (expiry 0, same epoch), so the next writer takes them at
    /// once instead of waiting for them to expire.
    pub(crate) async fn release(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut txn = Transaction::new();
        for (p, held) in &self.held {
            let key = keys::lease(*p);
            let released = Lease {
                expires_ms: 0,
                ..held.lease.clone()
            };
            txn.expect(key.clone(), Some(held.bytes.clone()));
            txn.put(key, released.encode_to_vec());
        }
        match self.store.commit(txn).await {
            Ok(()) => debug!(partitions = self.held.len(), "released the leases"),
            Err(e) => {
                warn!(error = %e, "failed to release the leases; they expire on their own")
            }
        }
        for p in self.held.keys() {
            self.own.set(*p, false, "");
        }
        self.held.clear();
    }

    /// Data keys the batch needs: each tenant's current key (to seal) and the keys of any
    /// stored events it must open. A tenant whose keys cannot be had (shredded, its tenant
    /// key unavailable) gets its error; the other tenants' requests in the batch go on.
    async fn resolve_keys(
        &self,
        reqs: &[Request],
        fetched: &HashMap<Vec<u8>, Option<Vec<u8>>>,
    ) -> BatchKeys {
        let mut keys = BatchKeys::default();
        for r in reqs {
            let Some((t, _)) = r.cmd.tenant_conv() else {
                continue;
            };
            if keys.refused.contains_key(t)
                || !matches!(self.owned_partition(&r.cmd), Some(Ok(_)))
                || matches!(r.cmd, Command::Replica { .. })
            {
                continue;
            }
            if let Some(cells) = &self.cells
                && !keys.replicate.contains_key(t)
            {
                // Before any key is made: a cell that is not the tenant's home must never
                // create a data key of its own for it.
                match cells.admit(t) {
                    Ok(Some(replication)) => {
                        keys.replicate.insert(t.clone(), replication);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        keys.refused.insert(t.clone(), e);
                        continue;
                    }
                }
            }
            if let Err(e) = self.resolve_request_keys(r, t, fetched, &mut keys).await {
                keys.refused.insert(t.clone(), e);
            }
        }
        keys
    }

    async fn resolve_request_keys(
        &self,
        r: &Request,
        t: &TenantId,
        fetched: &HashMap<Vec<u8>, Option<Vec<u8>>>,
        keys: &mut BatchKeys,
    ) -> Result<(), LogError> {
        if !keys.current.contains_key(t) {
            let k = self.keyring.current(t).await?;
            keys.all.insert((t.clone(), k.id), k.clone());
            keys.current.insert(t.clone(), k);
        }
        if let Command::Append(a) = &r.cmd
            && let Some(target) = author_only_target(&a.body)
        {
            let key = keys::event(&a.tenant, &a.conv, target);
            if let Some(Some(bytes)) = fetched.get(&key) {
                let sealed = SealedEvent::decode(bytes.as_slice())
                    .map_err(|e| LogError::corrupt(&key, e))?;
                if let std::collections::hash_map::Entry::Vacant(slot) =
                    keys.all.entry((a.tenant.clone(), sealed.key_id))
                {
                    slot.insert(self.keyring.key(&a.tenant, sealed.key_id).await?);
                }
            }
        }
        Ok(())
    }

    /// Reads what the batch needs: cached keys from the cache, the rest in one `batch_get`.
    /// Requests for partitions this writer does not own read nothing (they are refused).
    async fn fetch(
        &self,
        reqs: &[Request],
    ) -> Result<HashMap<Vec<u8>, Option<Vec<u8>>>, StoreError> {
        let wanted = batch_reads(
            reqs.iter()
                .filter(|r| matches!(self.owned_partition(&r.cmd), Some(Ok(_)))),
        );
        let mut fetched = HashMap::with_capacity(wanted.len());
        let mut missing = Vec::new();
        for key in wanted {
            // The batch being committed right now first: its writes are not in the store yet.
            if let Some(value) = self.in_flight.get(&key) {
                fetched.insert(key, value.clone());
                continue;
            }
            match self.cache.get(&key) {
                Some(value) => {
                    fetched.insert(key, value.clone());
                }
                None => missing.push(key),
            }
        }
        if !missing.is_empty() {
            let values = self.store.batch_get(missing.clone()).await?;
            fetched.extend(missing.into_iter().zip(values));
        }
        Ok(fetched)
    }

    /// Writes a renewal of every lease held into the batch: same owner and epoch, expiry
    /// pushed to now + ttl.
    fn renew(&self, state: &mut State, touched: &mut BTreeSet<u32>, now_ms: i64) {
        for (p, held) in &self.held {
            let renewed = Lease {
                expires_ms: now_ms + self.own.ttl_ms,
                ..held.lease.clone()
            };
            let key = keys::lease(*p);
            if state
                .pending
                .insert(key.clone(), Some(renewed.encode_to_vec()))
                .is_none()
            {
                state.order.push(key);
            }
            touched.insert(*p);
        }
    }

    /// Writes the release of every lease held into the batch (same epoch, expiry 0) and stops
    /// holding them at once, so requests after it are refused.
    fn release_in(&mut self, state: &mut State, fence: &mut Vec<(Vec<u8>, Vec<u8>)>) {
        let partitions: Vec<u32> = self.held.keys().copied().collect();
        for p in partitions {
            let key = keys::lease(p);
            if let Some(expected) = self.expected_lease(p) {
                fence.push((key.clone(), expected));
            }
            let Some(held) = self.held.remove(&p) else {
                continue;
            };
            let released = Lease {
                expires_ms: 0,
                ..held.lease
            };
            if state
                .pending
                .insert(key.clone(), Some(released.encode_to_vec()))
                .is_none()
            {
                state.order.push(key);
            }
            self.own.set(p, false, "");
        }
    }

    /// Reads, applies and seals a batch: everything but the commit. `None` when the batch
    /// failed before anything could be applied (its callers have been answered).
    async fn prepare(&mut self, reqs: Vec<Request>) -> Option<Prepared> {
        // Partitions acquired since the last batch first, so their requests in this batch
        // are read and applied.
        for r in &reqs {
            if let Command::Lease(LeaseOp::Adopt(acquired)) = &r.cmd {
                self.adopt(acquired).await;
            }
        }
        let fetched = match self.fetch(&reqs).await {
            Ok(fetched) => fetched,
            Err(e) if self.is_outage_error(&e) => {
                self.enter_outage(&e);
                fail_all(reqs, self.unavailable(&e));
                return None;
            }
            Err(e) => {
                fail_all(reqs, LogError::Store(e));
                return None;
            }
        };
        Some(self.apply_batch(reqs, fetched).await)
    }

    /// Applies and seals a batch over the values read for it: everything but the commit.
    pub(crate) async fn apply_batch(
        &mut self,
        reqs: Vec<Request>,
        fetched: HashMap<Vec<u8>, Option<Vec<u8>>>,
    ) -> Prepared {
        let BatchKeys {
            current,
            all: data_keys,
            refused,
            replicate,
        } = self.resolve_keys(&reqs, &fetched).await;
        // Each replicated tenant's writes of this batch, per conversation: one outbox row each.
        let mut outbox = Outbox::new();

        let mut state = State {
            fetched,
            pending: HashMap::new(),
            order: Vec::new(),
            announce: Vec::new(),
        };
        let now_ms = crate::now_ms();
        let mut results = Vec::with_capacity(reqs.len());
        let mut partitions = Vec::with_capacity(reqs.len());
        let mut touched = BTreeSet::new();
        // Releases expect the lease as held, like any commit, though they stop holding it.
        let mut fence: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for r in &reqs {
            let partition = match self.owned_partition(&r.cmd) {
                None => {
                    match r.cmd {
                        Command::Lease(LeaseOp::Renew) => {
                            self.renew(&mut state, &mut touched, now_ms);
                        }
                        Command::Lease(LeaseOp::Release) => {
                            self.release_in(&mut state, &mut fence);
                        }
                        _ => {}
                    }
                    partitions.push(None);
                    results.push(Ok(Outcome::Leases { lost: Vec::new() }));
                    continue;
                }
                Some(Err(not_owner)) => {
                    partitions.push(None);
                    results.push(Err(not_owner));
                    continue;
                }
                Some(Ok(p)) => p,
            };
            partitions.push(Some(partition));
            let Some((t, _)) = r.cmd.tenant_conv() else {
                results.push(Err(LogError::corrupt(
                    b"",
                    "internal: write without a conversation",
                )));
                continue;
            };
            if let Some(e) = refused.get(t) {
                results.push(Err(e.clone()));
                continue;
            }
            let epoch = self.held.get(&partition).map_or(0, |h| h.lease.epoch);
            let mut scratch = Scratch {
                state: &state,
                writes: HashMap::new(),
                order: Vec::new(),
                keys: &data_keys,
                current: current.get(t),
                now_ms,
                rng: &mut self.rng,
                // Committed events in the clear: for the feed, and for the hot indexer.
                announce: (self.feed.is_some() || self.indexer.is_some()).then(Vec::new),
                epoch,
            };
            let result = scratch.apply(&r.cmd, &self.cfg);
            if result.is_ok() {
                let Scratch {
                    mut writes,
                    order,
                    announce,
                    ..
                } = scratch;
                state.announce.extend(announce.unwrap_or_default());
                if !order.is_empty() {
                    touched.insert(partition);
                }
                if replicate.contains_key(t)
                    && !order.is_empty()
                    && let Some((_, c)) = r.cmd.tenant_conv()
                {
                    outbox
                        .entry((partition, t.clone(), c.clone()))
                        .or_default()
                        .extend(order.iter().cloned());
                }
                for key in order {
                    let value = writes.remove(&key).flatten();
                    if state.pending.insert(key.clone(), value).is_none() {
                        state.order.push(key);
                    }
                }
            }
            results.push(result);
        }
        let positions = self.write_outbox(&mut state, outbox, &replicate, now_ms);
        // The fence: each touched partition's lease exactly as this writer holds it.
        fence.extend(
            touched
                .iter()
                .filter_map(|p| Some((keys::lease(*p), self.expected_lease(*p)?))),
        );
        let txn = transaction(&state, fence);
        // What a synchronous tenant's answer waits for: its partition's newest outbox row,
        // the one this batch wrote or (a duplicate) the last one written before.
        let sync_waits = reqs
            .iter()
            .zip(&partitions)
            .map(|(r, p)| {
                let (t, _) = r.cmd.tenant_conv()?;
                let p = (*p)?;
                if !replicate.get(t)?.sync {
                    return None;
                }
                positions
                    .get(&(p, t.clone()))
                    .copied()
                    .or_else(|| self.outbox_last.get(&p).copied())
                    .map(|at| (p, at))
            })
            .collect();
        Prepared {
            reqs,
            results,
            partitions,
            state,
            txn: Some(txn),
            sync_waits,
            wrote_outbox: !positions.is_empty(),
        }
    }

    /// Writes one outbox row per conversation of a replicated tenant the batch wrote, holding
    /// those writes as the batch made them; returns each (partition, tenant)'s newest row.
    fn write_outbox(
        &mut self,
        state: &mut State,
        outbox: Outbox,
        replicate: &HashMap<TenantId, crate::cells::Replication>,
        now_ms: i64,
    ) -> HashMap<(u32, TenantId), crate::cells::Position> {
        let mut positions = HashMap::new();
        let Some(cells) = &self.cells else {
            return positions;
        };
        for ((p, t, c), keys_written) in outbox {
            let (Some(epoch), Some(replication)) =
                (self.held.get(&p).map(|h| h.lease.epoch), replicate.get(&t))
            else {
                continue;
            };
            let n = match self.outbox_last.get(&p) {
                Some((e, n)) if *e == epoch => n + 1,
                _ => 1,
            };
            let batch = ReplicaBatch {
                source: cells.name().to_string(),
                tenant: t.to_string(),
                conversation: c.to_string(),
                partition: p,
                partitions: self.own.partitions,
                epoch,
                n,
                writes: keys_written
                    .into_iter()
                    .map(|key| {
                        let value = state.pending.get(&key).cloned().flatten();
                        ReplicaWrite { key, value }
                    })
                    .collect(),
                keys: Vec::new(),
                dr: replication.dr.clone(),
                time_ms: now_ms,
                placement_version: replication.version,
                mac: Vec::new(),
            };
            let key = keys::outbox(p, epoch, n);
            if state
                .pending
                .insert(key.clone(), Some(batch.encode_to_vec()))
                .is_none()
            {
                state.order.push(key);
            }
            self.outbox_last.insert(p, (epoch, n));
            positions.insert((p, t), (epoch, n));
        }
        positions
    }

    /// Answers a batch after its commit: on success updates the cache and the leases held,
    /// announces and replies; on failure drops what it believed, reads the leases back and
    /// fails the batch's writes (with `not_owner` where the partition was lost).
    async fn complete(&mut self, batch: Prepared, committed: Result<(), StoreError>) {
        let Prepared {
            reqs,
            results,
            partitions,
            state,
            sync_waits,
            wrote_outbox,
            ..
        } = batch;
        if let Err(e) = committed {
            warn!(error = %e, requests = reqs.len(), "failed to commit a batch");
            if self.is_outage_error(&e) || self.outage.is_some() {
                // Not applied (an outage error): the cache still holds what the store
                // holds, and the send buffer builds on it.
                self.enter_outage(&e);
                let answer = self.unavailable(&e);
                for (r, result) in reqs.into_iter().zip(results) {
                    let _ = r.reply.send(match result {
                        Ok(Outcome::Leases { .. }) => Ok(Outcome::Leases { lost: Vec::new() }),
                        Ok(_) => Err(answer.clone()),
                        refused => refused,
                    });
                }
                return;
            }
            // What the store holds now is unknown to us: read it afresh next time.
            self.cache.clear();
            let lost = self.detect_loss().await;
            for ((r, result), partition) in reqs.into_iter().zip(results).zip(partitions) {
                let answer = match (result, partition) {
                    (Ok(Outcome::Leases { .. }), _) => Ok(Outcome::Leases {
                        lost: lost.iter().copied().collect(),
                    }),
                    // Lost now, or before (a batch built on the one that found out).
                    (Ok(_), Some(p)) if lost.contains(&p) || !self.held.contains_key(&p) => {
                        Err(self.own.not_owner(p))
                    }
                    (Ok(_), _) => Err(LogError::Store(e.clone())),
                    (refused, _) => refused,
                };
                let _ = r.reply.send(answer);
            }
            return;
        }
        for (key, value) in &state.fetched {
            if !state.pending.contains_key(key) {
                self.cache.remember(key, value.as_ref());
            }
        }
        for (key, value) in &state.pending {
            if key.starts_with(b"ls\0") {
                self.remember_lease(key, value.as_deref());
            } else {
                self.cache.remember(key, value.as_ref());
            }
        }
        if !state.pending.is_empty() {
            self.stats.commits.fetch_add(1, Ordering::Relaxed);
        }
        // The indexer's copy of the batch's events (shared, not copied).
        let plain: Vec<Arc<Event>> = match &self.indexer {
            None => Vec::new(),
            Some(_) => state
                .announce
                .iter()
                .filter_map(|item| match item {
                    FeedItem::Event(e) => Some(e.clone()),
                    FeedItem::ReadCursor { .. } => None,
                })
                .collect(),
        };
        if let Some(feed) = &self.feed {
            for item in state.announce {
                if feed.try_send(item).is_err() {
                    self.stats.feed_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.stats
            .requests
            .fetch_add(reqs.len() as u64, Ordering::Relaxed);
        if let Some(cells) = &self.cells
            && wrote_outbox
        {
            cells.outbox_written.notify_one();
        }
        for ((r, result), wait) in reqs.into_iter().zip(results).zip(sync_waits) {
            match (wait, &self.cells) {
                // A synchronous tenant's commit is answered once its DR cell has it.
                (Some((p, at)), Some(cells)) if matches!(result, Ok(Outcome::Committed(_))) => {
                    let cells = cells.clone();
                    tokio::spawn(async move {
                        let answer = match cells.await_acknowledged(p, at).await {
                            Ok(()) => result,
                            Err(e) => Err(e),
                        };
                        let _ = r.reply.send(answer);
                    });
                }
                // The caller may have given up waiting; the write stands either way.
                _ => {
                    let _ = r.reply.send(result);
                }
            }
        }
        // After the replies: the index is never what an append waits for.
        if let Some(indexer) = &self.indexer {
            indexer.offer(plain, committed_heads(&state.pending));
        }
    }

    /// A renewal committed: the value later batches expect.
    pub(crate) fn remember_lease(&mut self, key: &[u8], value: Option<&[u8]>) {
        let Some(p) = key
            .get(3..)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
        else {
            return;
        };
        let Some(lease) = value.and_then(|v| Lease::decode(v).ok()) else {
            return;
        };
        if let Some(held) = self.held.get_mut(&p)
            && held.lease.epoch == lease.epoch
        {
            *held = Held::new(lease);
        }
    }
}

/// A batch's writes of replicated tenants, per (partition, tenant, conversation): the keys
/// written (`write_outbox` makes one outbox row of each, so a send buffered during a store
/// outage carries its own row, `outage::records_of`).
type Outbox = std::collections::BTreeMap<(u32, TenantId, ConvId), Vec<Vec<u8>>>;

/// The data keys a batch uses, and the tenants whose keys could not be had.
#[derive(Default)]
struct BatchKeys {
    /// Each tenant's newest key, which seals its new events.
    current: HashMap<TenantId, DataKey>,
    /// Every key the batch opens or seals with.
    all: HashMap<(TenantId, u32), DataKey>,
    /// Tenants whose requests are refused with this error.
    refused: HashMap<TenantId, LogError>,
    /// Tenants whose writes are replicated to a DR cell (`cells`).
    replicate: HashMap<TenantId, crate::cells::Replication>,
}

/// A batch applied and sealed, waiting for (or in) its commit.
pub(crate) struct Prepared {
    pub reqs: Vec<Request>,
    pub results: Vec<Result<Outcome, LogError>>,
    /// Each request's partition, where it is a write this writer owns.
    pub partitions: Vec<Option<u32>>,
    pub state: State,
    pub txn: Option<Transaction>,
    /// Per request: the outbox position a synchronous tenant's answer waits for.
    pub sync_waits: Vec<Option<(u32, crate::cells::Position)>>,
    /// The batch wrote outbox rows (the relay is woken once it commits).
    pub wrote_outbox: bool,
}

/// The batch as one transaction: first the fence (each touched partition's lease as this
/// writer holds it), then every head it moves is checked against the value the batch read,
/// then everything is written as decided. Events need no check of their own: an event key
/// above a head is only ever written together with that head, so a head that still holds the
/// value we read proves the seqs we assign are free.
fn transaction(state: &State, fence: Vec<(Vec<u8>, Vec<u8>)>) -> Transaction {
    let mut txn = Transaction::new();
    for (key, value) in fence {
        txn.expect(key, Some(value));
    }
    for key in &state.order {
        let value = state.pending.get(key).cloned().flatten();
        if key.starts_with(b"hd\0") {
            let read = state.fetched.get(key).cloned().flatten();
            txn.expect(key.clone(), read);
        }
        match value {
            Some(v) => txn.put(key.clone(), v),
            None => txn.delete(key.clone()),
        };
    }
    txn
}

/// Every key the commands of `reqs` read, sorted and once each.
pub(crate) fn batch_reads<'a>(reqs: impl Iterator<Item = &'a Request>) -> Vec<Vec<u8>> {
    let mut wanted = Vec::new();
    for r in reqs {
        r.cmd.reads(&mut wanted);
    }
    wanted.sort_unstable();
    wanted.dedup();
    wanted
}

pub(crate) fn fail_all(reqs: Vec<Request>, e: LogError) {
    warn!(error = %e, requests = reqs.len(), "failed to prepare a batch");
    for r in reqs {
        let _ = r.reply.send(Err(e.clone()));
    }
}
