//! What each command does to a batch's state: the policy checks, seqs, sealing, membership
//! and read cursors of one command, apart from how batches are read, fenced and committed.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;
use tidings_schemas::storage::{
    Dedupe, Head, Membership, MembershipChange, ReplicaBatch, SealedEvent, UserConversation,
};
use tidings_schemas::v1::{
    ConversationCreated, ConversationKind, ConversationRenamed, DisplayNameSet, Event,
    MemberJoined, MemberLeft, MemberRoleChanged, event::Body,
};

use super::command::{author_only_target, target_seq};
use super::{Command, Outcome, State};
use crate::config::LogConfig;
use crate::crypto::DataKey;
use crate::error::LogError;
use crate::feed::FeedItem;
use crate::ids::{ConvId, TenantId, UserId};
use crate::keys;
use crate::policy::{self, Action, KindPolicy};
use crate::{Append, By, Committed, CreateConversation};

/// The sender of events the system makes (display names set by the operator's tools).
fn system_user() -> UserId {
    UserId::new("system").expect("a valid user id")
}

/// A new event applied but not yet sealed: what sealing it needs.
pub(crate) struct Unsealed {
    key: DataKey,
    tenant: TenantId,
    conv: ConvId,
    seq: u64,
    /// The encoded Event (encoded once: the feed carries the same bytes).
    pub(super) plain: Arc<[u8]>,
    /// The conversation's message count up to and including it.
    messages: u64,
}

impl Unsealed {
    /// What the batch holds at the event's key until it is sealed: the row without its
    /// ciphertext (a read cursor in the same batch needs only `messages`).
    fn placeholder(&self) -> SealedEvent {
        SealedEvent {
            key_id: self.key.id,
            ciphertext: Vec::new(),
            messages: self.messages,
        }
    }

    /// The stored row.
    pub(super) fn seal(self) -> Vec<u8> {
        SealedEvent {
            key_id: self.key.id,
            ciphertext: self
                .key
                .seal_event(&self.tenant, &self.conv, self.seq, &self.plain),
            messages: self.messages,
        }
        .encode_to_vec()
    }
}

/// One command's view: its own writes over the batch's state. Merged into the state only if
/// the command succeeds, so a refused command leaves no trace.
pub(super) struct Scratch<'a> {
    pub(super) state: &'a State,
    pub(super) writes: HashMap<Vec<u8>, Option<Vec<u8>>>,
    pub(super) order: Vec<Vec<u8>>,
    /// This command's new events, sealed with the batch's.
    pub(super) unsealed: HashMap<Vec<u8>, Unsealed>,
    pub(super) keys: &'a HashMap<(TenantId, u32), DataKey>,
    pub(super) current: Option<&'a DataKey>,
    pub(super) now_ms: i64,
    pub(super) rng: &'a mut fastrand::Rng,
    /// Collect feed items (only when someone listens).
    pub(super) announce: Option<Vec<FeedItem>>,
    /// Epoch of the lease under which this command writes, recorded in the head.
    pub(super) epoch: u64,
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

    /// Writes the next event of the conversation (sealed with the batch, see
    /// [`Unsealed`]), advancing `head` (which the caller writes back once it is done with
    /// it).
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
        let unsealed = Unsealed {
            key: key.clone(),
            tenant: t.clone(),
            conv: c.clone(),
            seq,
            plain: event.encode_to_vec().into(),
            messages: head.messages,
        };
        if let Some(announce) = self.announce.as_mut() {
            announce.push(FeedItem::Event {
                event: Arc::new(event),
                encoded: unsealed.plain.clone(),
            });
        }
        let row = keys::event(t, c, seq);
        self.put(row.clone(), &unsealed.placeholder());
        self.unsealed.insert(row, unsealed);
        debug_assert_eq!(seq, head.last_seq + 1);
        head.last_seq = seq;
        head.last_time_ms = time_ms;
        head.writer_epoch = self.epoch;
        Ok(Committed {
            seq,
            event_id,
            time_ms,
            duplicate: false,
            members: head.member_count,
        })
    }

    fn open_event(&self, t: &TenantId, c: &ConvId, seq: u64) -> Result<Option<Event>, LogError> {
        let key = keys::event(t, c, seq);
        // Written by this batch: still in the clear.
        if let Some(new) = self
            .unsealed
            .get(&key)
            .or_else(|| self.state.unsealed.get(&key))
        {
            return Event::decode(&new.plain[..])
                .map(Some)
                .map_err(|e| LogError::corrupt(&key, e));
        }
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

    pub(super) fn apply(&mut self, cmd: &Command, cfg: &LogConfig) -> Result<Outcome, LogError> {
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
                members: 0,
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
