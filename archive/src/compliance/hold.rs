//! Legal holds: a tenant, a conversation or a user over a time range, kept whatever the
//! retention policy says and refusing a shred while active.
//!
//! Holds live at `lh/<tenant>/<hold_id>`, sealed under the store's audit key (a hold's
//! reason names litigation; it is not the tenant's to shred). Releasing a hold keeps its
//! record with who released it and when. A user hold covers every conversation the user is
//! or was a member of: current ones from the user's list (`uc/`), past ones from the
//! membership events still in the log (a conversation the user left before the held range
//! has nothing of the user's time in it to keep).

use std::collections::HashSet;
use std::sync::Arc;

use prost::Message;
use serde_json::{Value, json};
use tidings_log::crypto::Keyring;
use tidings_log::store::{KeyRange, KvStore, Transaction};
use tidings_log::{Body, ConvId, Event, LogError, TenantId, UserId, keys};
use tidings_schemas::storage::Hold;

use super::audit::Entry;
use super::scan::{Scanner, Selection, Visitor};
use super::{Actor, Compliance, ComplianceError, Progress, Tier, rfc3339_ms};
use crate::archiver::scan_all;

/// What a hold covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Tenant,
    Conversation(ConvId),
    User(UserId),
}

impl Scope {
    fn parts(&self) -> (&'static str, &str) {
        match self {
            Scope::Tenant => ("tenant", ""),
            Scope::Conversation(c) => ("conversation", c.as_str()),
            Scope::User(u) => ("user", u.as_str()),
        }
    }
}

/// A hold to create.
#[derive(Clone, Debug)]
pub struct HoldSpec {
    pub scope: Scope,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub reason: String,
}

fn ad<'a>(tenant: &'a TenantId, id: &'a str) -> [&'a [u8]; 3] {
    [b"tidings-lh-v1", tenant.as_str().as_bytes(), id.as_bytes()]
}

/// A hold as a JSON line.
pub fn hold_json(tenant: &TenantId, h: &Hold) -> Value {
    let time = |ms: i64| (ms != 0).then(|| rfc3339_ms(ms));
    json!({
        "tenant": tenant.as_str(),
        "id": h.id,
        "scope": h.scope,
        "target": (!h.target.is_empty()).then_some(&h.target),
        "from": time(h.from_ms),
        "to": time(h.to_ms),
        "reason": h.reason,
        "created_by": h.created_by,
        "created": rfc3339_ms(h.created_ms),
        "active": h.released_ms == 0,
        "released_by": (h.released_ms != 0).then_some(&h.released_by),
        "released": time(h.released_ms),
    })
}

impl Compliance {
    /// Creates a hold and records it in the audit log.
    pub async fn create_hold(
        &self,
        tenant: &TenantId,
        spec: &HoldSpec,
        actor: &Actor,
    ) -> Result<Hold, ComplianceError> {
        if let (Some(from), Some(to)) = (spec.from_ms, spec.to_ms)
            && from >= to
        {
            return Err(ComplianceError::invalid(
                "the hold's time range is empty: from is not before to",
            ));
        }
        let reason_chars = spec.reason.chars().count();
        if reason_chars == 0 || reason_chars > 1024 {
            return Err(ComplianceError::invalid(
                "a hold needs a reason of 1 to 1024 characters",
            ));
        }
        let (scope, target) = spec.scope.parts();
        let hold = Hold {
            id: uuid::Uuid::now_v7().simple().to_string(),
            scope: scope.into(),
            target: target.into(),
            from_ms: spec.from_ms.unwrap_or(0),
            to_ms: spec.to_ms.unwrap_or(0),
            reason: spec.reason.clone(),
            created_by: actor.name().into(),
            created_ms: tidings_log::now_ms(),
            ..Hold::default()
        };
        // The hold first, then its record: if recording fails the caller sees the error, and
        // the hold errs on the side of keeping data.
        let mut txn = Transaction::new();
        txn.put_if_absent(
            keys::hold(tenant, &hold.id),
            self.seal_hold(tenant, &hold).await?,
        );
        self.store().commit(txn).await.map_err(LogError::from)?;
        let mut entry = Entry::new(actor, "hold_create", "completed");
        entry.access_id = hold.id.clone();
        entry.filters = hold_json(tenant, &hold).to_string();
        self.record(tenant, &entry).await?;
        Ok(hold)
    }

    /// Releases an active hold; its record stays, marked released. Audited.
    pub async fn release_hold(
        &self,
        tenant: &TenantId,
        id: &str,
        actor: &Actor,
    ) -> Result<Hold, ComplianceError> {
        let key = keys::hold(tenant, id);
        let Some(sealed) = self.store().get(&key).await.map_err(LogError::from)? else {
            return Err(ComplianceError::NoSuchHold(id.to_string()));
        };
        let mut hold = open_hold(self.keyring(), tenant, id, &sealed).await?;
        if hold.released_ms != 0 {
            return Err(ComplianceError::invalid(format!(
                "hold {id} was already released by {} at {}",
                hold.released_by,
                rfc3339_ms(hold.released_ms)
            )));
        }
        hold.released_by = actor.name().into();
        hold.released_ms = tidings_log::now_ms();
        // Releasing lets retention delete: recorded before it takes effect, and after.
        let mut entry = Entry::new(actor, "hold_release", "started");
        entry.access_id = hold.id.clone();
        entry.filters = hold_json(tenant, &hold).to_string();
        self.record(tenant, &entry).await?;
        let mut txn = Transaction::new();
        txn.expect(key.clone(), Some(sealed))
            .put(key, self.seal_hold(tenant, &hold).await?);
        let result = self.store().commit(txn).await.map_err(LogError::from);
        entry.outcome = if result.is_ok() {
            "completed"
        } else {
            "failed"
        }
        .into();
        self.record(tenant, &entry).await?;
        result?;
        Ok(hold)
    }

    /// Crypto-shreds a tenant ([`Keyring::shred`]) unless a legal hold is active, which is
    /// refused and recorded. The attempt is recorded before the keys go, the outcome after.
    pub async fn shred(
        &self,
        tenant: &TenantId,
        actor: &Actor,
    ) -> Result<tidings_log::crypto::ShredReport, ComplianceError> {
        let mut entry = Entry::new(actor, "shred", "started");
        entry.access_id = uuid::Uuid::now_v7().to_string();
        let holds = active(&**self.store(), self.keyring(), tenant).await?;
        if !holds.is_empty() {
            let ids: Vec<&str> = holds.iter().map(|h| h.id.as_str()).collect();
            let reason = format!(
                "tenant {tenant} is under {} active legal hold(s) ({}); release them first",
                holds.len(),
                ids.join(", ")
            );
            entry.outcome = "refused".into();
            entry.detail = reason.clone();
            self.record(tenant, &entry).await?;
            return Err(ComplianceError::Held(reason));
        }
        self.record(tenant, &entry).await?;
        let result = self.keyring().shred(tenant).await;
        match &result {
            Ok(report) => {
                entry.outcome = "completed".into();
                entry.detail = format!("destroyed data keys {:?}", report.key_ids);
            }
            Err(e) => {
                entry.outcome = "failed".into();
                entry.detail = format!("{}: {e}", e.code());
            }
        }
        self.record(tenant, &entry).await?;
        Ok(result?)
    }

    async fn seal_hold(&self, tenant: &TenantId, hold: &Hold) -> Result<Vec<u8>, LogError> {
        let key = self.keyring().audit_key().await?;
        Ok(key.seal(&ad(tenant, &hold.id), &hold.encode_to_vec()))
    }
}

async fn open_hold(
    keyring: &Keyring,
    tenant: &TenantId,
    id: &str,
    sealed: &[u8],
) -> Result<Hold, LogError> {
    let key = keyring.audit_key().await?;
    let k = keys::hold(tenant, id);
    let plain = key
        .open(&ad(tenant, id), sealed)
        .map_err(|_| LogError::corrupt(&k, "hold record fails authentication"))?;
    Hold::decode(plain.as_slice()).map_err(|e| LogError::corrupt(&k, e))
}

/// Every hold of a tenant, active and released, oldest first.
pub async fn list(
    store: &dyn KvStore,
    keyring: &Keyring,
    tenant: &TenantId,
) -> Result<Vec<Hold>, ComplianceError> {
    let dir = keys::hold_dir(tenant);
    let mut holds = Vec::new();
    for (key, sealed) in scan_all(store, KeyRange::prefix(dir.clone())).await? {
        let id = keys::last_part(&dir, &key).ok_or_else(|| LogError::corrupt(&key, "bad key"))?;
        holds.push(open_hold(keyring, tenant, &id, &sealed).await?);
    }
    Ok(holds)
}

/// The active holds of a tenant.
pub async fn active(
    store: &dyn KvStore,
    keyring: &Keyring,
    tenant: &TenantId,
) -> Result<Vec<Hold>, ComplianceError> {
    let mut holds = list(store, keyring, tenant).await?;
    holds.retain(|h| h.released_ms == 0);
    Ok(holds)
}

/// Active holds resolved to what they cover: is an event of a conversation at a time held?
#[derive(Debug, Default)]
pub struct HoldSet {
    /// (conversation, or `None` for all; from; to; hold id)
    ranges: Vec<(Option<String>, i64, i64, String)>,
}

impl HoldSet {
    /// Resolves the tenant's active holds; user holds become the user's conversations.
    pub(crate) async fn resolve(
        store: &dyn KvStore,
        keyring: &Arc<Keyring>,
        objects: Option<&crate::storage::Objects>,
        tenant: &TenantId,
    ) -> Result<HoldSet, ComplianceError> {
        let mut set = HoldSet::default();
        for hold in active(store, keyring, tenant).await? {
            let from = hold.from_ms;
            let to = if hold.to_ms == 0 {
                i64::MAX
            } else {
                hold.to_ms
            };
            match hold.scope.as_str() {
                "tenant" => set.ranges.push((None, from, to, hold.id)),
                "conversation" => set.ranges.push((Some(hold.target), from, to, hold.id)),
                "user" => {
                    let user = UserId::new(hold.target.as_str())?;
                    for conv in user_conversations(store, keyring, objects, tenant, &user).await? {
                        set.ranges.push((Some(conv), from, to, hold.id.clone()));
                    }
                }
                other => {
                    return Err(LogError::corrupt(
                        &keys::hold(tenant, &hold.id),
                        format!("unknown hold scope {other}"),
                    )
                    .into());
                }
            }
        }
        Ok(set)
    }

    /// The id of a hold covering an event of `conv` at `time_ms`, if any.
    pub fn holding(&self, conv: &str, time_ms: i64) -> Option<&str> {
        self.ranges
            .iter()
            .find(|(c, from, to, _)| {
                c.as_deref().is_none_or(|c| c == conv) && time_ms >= *from && time_ms < *to
            })
            .map(|(.., id)| id.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// Every conversation `user` is in now or appears in through membership events.
async fn user_conversations(
    store: &dyn KvStore,
    keyring: &Arc<Keyring>,
    objects: Option<&crate::storage::Objects>,
    tenant: &TenantId,
    user: &UserId,
) -> Result<HashSet<String>, ComplianceError> {
    let dir = keys::user_conv_dir(tenant, user);
    let mut found = Members {
        user: user.as_str().to_string(),
        convs: HashSet::new(),
    };
    for (key, _) in scan_all(store, KeyRange::prefix(dir.clone())).await? {
        if let Some(conv) = keys::last_part(&dir, &key) {
            found.convs.insert(conv);
        }
    }
    let progress = Progress::default();
    let scanner = Scanner {
        store,
        keyring,
        objects,
        progress: &progress,
    };
    let sel = Selection {
        kinds: Some(&["conversation_created", "member_joined", "member_left"]),
        ..Selection::default()
    };
    scanner.scan(tenant, sel, &mut found).await?;
    Ok(found.convs)
}

struct Members {
    user: String,
    convs: HashSet<String>,
}

#[async_trait::async_trait]
impl Visitor for Members {
    async fn visit(&mut self, events: Vec<Event>, _tier: Tier) -> Result<(), ComplianceError> {
        for e in events {
            let member = match &e.body {
                Some(Body::ConversationCreated(x)) => {
                    x.creator == self.user || x.members.contains(&self.user)
                }
                Some(Body::MemberJoined(x)) => x.user == self.user,
                Some(Body::MemberLeft(x)) => x.user == self.user,
                _ => false,
            };
            if member {
                self.convs.insert(e.conversation);
            }
        }
        Ok(())
    }
}
