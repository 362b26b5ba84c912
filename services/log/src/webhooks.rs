//! Outgoing webhook subscriptions as the store keeps them (docs/decisions/webhooks.md): the
//! subscription rows (`wh/`), their per-conversation delivery cursors (`wc/`), the replays
//! asked for (`wr/`) and the dead letters (`wd/`). This crate owns the keyspace, so every row
//! is read and written here; checking a request and delivering are the server's
//! (`services/server/src/webhooks/`).
//!
//! The signing secret is sealed under the tenant's current data key, bound to its row (AD:
//! label, tenant, subscription id, key id). It is opened only by the dispatcher, to sign; no
//! listing returns it. Shredding the tenant makes it unopenable, which ends delivery.

use std::sync::Arc;

use prost::Message;
use tidings_schemas::storage::{WebhookDeadLetter, WebhookSubscription};

use crate::crypto::Keyring;
use crate::error::LogError;
use crate::ids::{ConvId, TenantId};
use crate::keys;
use crate::store::{KeyRange, KvStore, Order, Transaction};

/// The label every sealed webhook secret's AD starts with.
const SECRET_LABEL: &[u8] = b"tidings-wh-v1";

/// Rows deleted per transaction when a subscription goes (its cursors, replays and dead
/// letters): bounded transactions whatever the subscription accumulated.
const DELETE_PAGE: usize = 1000;

/// Most dead letters a subscription keeps. Past it, nothing more is dead-lettered: the event
/// that would be stays undelivered (its cursor does not move), so the subscription stops
/// there, retrying, its lag growing (the lag alert fires) until its receiver works again or
/// it is deleted. Nothing is dropped and the rows stay bounded.
pub const MAX_DEAD_LETTERS: usize = 10_000;

/// The store side of webhooks.
#[derive(Clone)]
pub struct Webhooks {
    store: Arc<dyn KvStore>,
    keyring: Arc<Keyring>,
}

/// A dead-lettered event, as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    pub conversation: String,
    pub seq: u64,
    pub letter: WebhookDeadLetter,
}

fn secret_ad<'a>(t: &'a TenantId, id: &'a str, key_id: &'a [u8; 4]) -> [&'a [u8]; 4] {
    [SECRET_LABEL, t.as_str().as_bytes(), id.as_bytes(), key_id]
}

fn decode<M: Message + Default>(key: &[u8], bytes: &[u8]) -> Result<M, LogError> {
    M::decode(bytes).map_err(|e| LogError::corrupt(key, e))
}

fn seq_value(key: &[u8], bytes: &[u8]) -> Result<u64, LogError> {
    let raw: [u8; 8] = bytes.try_into().map_err(|_| LogError::Corrupt {
        key: keys::display_key(key),
        reason: "a webhook seq is 8 bytes".into(),
    })?;
    Ok(u64::from_be_bytes(raw))
}

impl Webhooks {
    pub fn new(store: Arc<dyn KvStore>, keyring: Arc<Keyring>) -> Self {
        Webhooks { store, keyring }
    }

    /// Writes a new subscription with `secret` sealed into it (`sub.id` must be new and
    /// `sub.sealed_secret` empty), unless the tenant has `max_per_tenant` already.
    pub async fn create(
        &self,
        tenant: &TenantId,
        mut sub: WebhookSubscription,
        secret: &[u8],
        max_per_tenant: usize,
    ) -> Result<WebhookSubscription, LogError> {
        crate::ids::validate_id("webhook id", &sub.id)?;
        let existing = self.list(Some(tenant), max_per_tenant + 1).await?;
        if existing.len() >= max_per_tenant {
            return Err(LogError::NotAllowed(format!(
                "tenant {tenant} has {max_per_tenant} webhook subscriptions, the most allowed \
                 (webhooks.max_per_tenant)"
            )));
        }
        let key = self.keyring.current(tenant).await?;
        let key_id = key.id.to_be_bytes();
        sub.secret_key_id = key.id;
        sub.sealed_secret = key.seal(&secret_ad(tenant, &sub.id, &key_id), secret);
        let mut txn = Transaction::new();
        txn.put_if_absent(keys::webhook(tenant, &sub.id), sub.encode_to_vec());
        self.store.commit(txn).await?;
        Ok(sub)
    }

    /// The subscription, if the tenant has it.
    pub async fn get(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<WebhookSubscription>, LogError> {
        let key = keys::webhook(tenant, id);
        match self.store.get(&key).await? {
            Some(bytes) => Ok(Some(decode(&key, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Up to `limit` subscriptions of one tenant, or of every tenant, with their tenant, in
    /// key order.
    pub async fn list(
        &self,
        tenant: Option<&TenantId>,
        limit: usize,
    ) -> Result<Vec<WebhookSubscription>, LogError> {
        Ok(self
            .list_with_tenants(tenant, limit)
            .await?
            .into_iter()
            .map(|(_, s)| s)
            .collect())
    }

    /// [`Webhooks::list`] with each subscription's tenant.
    pub async fn list_with_tenants(
        &self,
        tenant: Option<&TenantId>,
        limit: usize,
    ) -> Result<Vec<(TenantId, WebhookSubscription)>, LogError> {
        self.rows(keys::webhook_dir(tenant), limit, |key, value| {
            let (t, _) = keys::webhook_ids(key)?;
            Some(TenantId::new(t).and_then(|t| Ok((t, decode(key, value)?))))
        })
        .await
    }

    /// Up to `limit` rows under `dir`, in key order, each made into a `T` by `parse` (rows
    /// it returns `None` for are left out; an error ends the read).
    async fn rows<T>(
        &self,
        dir: Vec<u8>,
        limit: usize,
        parse: impl Fn(&[u8], &[u8]) -> Option<Result<T, LogError>>,
    ) -> Result<Vec<T>, LogError> {
        let rows = self
            .store
            .scan(KeyRange::prefix(dir), limit, Order::Ascending)
            .await?;
        rows.iter()
            .filter_map(|(key, value)| parse(key, value))
            .collect()
    }

    /// The subscription's signing secret, opened.
    pub async fn secret(
        &self,
        tenant: &TenantId,
        sub: &WebhookSubscription,
    ) -> Result<Vec<u8>, LogError> {
        let key = self.keyring.key(tenant, sub.secret_key_id).await?;
        let key_id = sub.secret_key_id.to_be_bytes();
        key.open(&secret_ad(tenant, &sub.id, &key_id), &sub.sealed_secret)
            .map_err(|_| LogError::Corrupt {
                key: keys::display_key(&keys::webhook(tenant, &sub.id)),
                reason: "the webhook secret does not open with its data key".into(),
            })
    }

    /// Deletes the subscription and every row it left (cursors, replays, dead letters).
    /// Whether it existed.
    pub async fn delete(&self, tenant: &TenantId, id: &str) -> Result<bool, LogError> {
        let key = keys::webhook(tenant, id);
        if self.store.get(&key).await?.is_none() {
            return Ok(false);
        }
        // The subscription first, so the dispatcher stops; then what it left, page by page.
        let mut txn = Transaction::new();
        txn.delete(key);
        self.store.commit(txn).await?;
        for kind in [b"wc", b"wr", b"wd"] {
            let range = KeyRange::prefix(keys::webhook_rows(kind, tenant, id));
            loop {
                let rows = self
                    .store
                    .scan(range.clone(), DELETE_PAGE, Order::Ascending)
                    .await?;
                if rows.is_empty() {
                    break;
                }
                let mut txn = Transaction::new();
                for (k, _) in rows {
                    txn.delete(k);
                }
                self.store.commit(txn).await?;
            }
        }
        Ok(true)
    }

    /// The last seq delivered (or dead-lettered) in a conversation; `None` before the first.
    pub async fn cursor(
        &self,
        tenant: &TenantId,
        id: &str,
        conv: &ConvId,
    ) -> Result<Option<u64>, LogError> {
        let key = keys::webhook_cursor(tenant, id, conv);
        match self.store.get(&key).await? {
            Some(bytes) => Ok(Some(seq_value(&key, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Moves the cursor to `seq` (down too: a replay lowers it).
    pub async fn set_cursor(
        &self,
        tenant: &TenantId,
        id: &str,
        conv: &ConvId,
        seq: u64,
    ) -> Result<(), LogError> {
        self.put_seq(keys::webhook_cursor(tenant, id, conv), seq)
            .await
    }

    /// Writes an 8-byte big-endian seq value.
    async fn put_seq(&self, key: Vec<u8>, seq: u64) -> Result<(), LogError> {
        let mut txn = Transaction::new();
        txn.put(key, seq.to_be_bytes().to_vec());
        Ok(self.store.commit(txn).await?)
    }

    /// Records a dead letter and moves the cursor past it, in one transaction; refused
    /// (`unavailable`, the cursor unmoved) once the subscription holds [`MAX_DEAD_LETTERS`].
    pub async fn dead_letter(
        &self,
        tenant: &TenantId,
        id: &str,
        conv: &ConvId,
        seq: u64,
        letter: &WebhookDeadLetter,
    ) -> Result<(), LogError> {
        let held = self
            .store
            .scan(
                KeyRange::prefix(keys::webhook_rows(b"wd", tenant, id)),
                MAX_DEAD_LETTERS,
                Order::Ascending,
            )
            .await?
            .len();
        if held >= MAX_DEAD_LETTERS {
            return Err(LogError::Unavailable {
                reason: format!(
                    "subscription {id} holds {MAX_DEAD_LETTERS} dead letters; it waits at seq \
                     {seq} of {conv} until its receiver answers or it is deleted"
                ),
            });
        }
        let mut txn = Transaction::new();
        txn.put(
            keys::webhook_dead(tenant, id, conv, seq),
            letter.encode_to_vec(),
        );
        txn.put(
            keys::webhook_cursor(tenant, id, conv),
            seq.to_be_bytes().to_vec(),
        );
        Ok(self.store.commit(txn).await?)
    }

    /// Up to `limit` dead letters of a subscription, by conversation then seq.
    pub async fn dead_letters(
        &self,
        tenant: &TenantId,
        id: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, LogError> {
        let dir = keys::webhook_rows(b"wd", tenant, id);
        self.rows(dir.clone(), limit, |key, value| {
            let (conversation, seq) = keys::webhook_dead_parts(&dir, key)?;
            Some(decode(key, value).map(|letter| DeadLetter {
                conversation,
                seq,
                letter,
            }))
        })
        .await
    }

    /// Asks for the conversation's events from `from_seq` on to be delivered again; the
    /// dispatcher takes it up ([`Webhooks::replays`]) between live events.
    pub async fn ask_replay(
        &self,
        tenant: &TenantId,
        id: &str,
        conv: &ConvId,
        from_seq: u64,
    ) -> Result<(), LogError> {
        self.put_seq(keys::webhook_replay(tenant, id, conv), from_seq)
            .await
    }

    /// Up to `limit` replays asked for: (conversation, from seq).
    pub async fn replays(
        &self,
        tenant: &TenantId,
        id: &str,
        limit: usize,
    ) -> Result<Vec<(ConvId, u64)>, LogError> {
        let dir = keys::webhook_rows(b"wr", tenant, id);
        self.rows(dir.clone(), limit, |key, value| {
            let conv = keys::last_part(&dir, key)?;
            Some(ConvId::new(conv).and_then(|c| Ok((c, seq_value(key, value)?))))
        })
        .await
    }

    /// Takes a replay up: the cursor goes down to `from_seq - 1` (never up: a replay from
    /// past what was delivered has nothing to deliver again) and the request is gone, in one
    /// transaction, unless the request changed meanwhile (then it stays for the next look).
    pub async fn start_replay(
        &self,
        tenant: &TenantId,
        id: &str,
        conv: &ConvId,
        from_seq: u64,
    ) -> Result<(), LogError> {
        let below = from_seq.saturating_sub(1);
        let cursor = self
            .cursor(tenant, id, conv)
            .await?
            .map_or(below, |c| c.min(below));
        let key = keys::webhook_replay(tenant, id, conv);
        let mut txn = Transaction::new();
        txn.expect(key.clone(), Some(from_seq.to_be_bytes().to_vec()));
        txn.delete(key);
        txn.put(
            keys::webhook_cursor(tenant, id, conv),
            cursor.to_be_bytes().to_vec(),
        );
        Ok(self.store.commit(txn).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;
    use crate::store::FjallStore;

    #[tokio::test]
    async fn dead_letters_stop_at_their_bound_without_moving_the_cursor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(dir.path()).expect("store"));
        let keyring = Keyring::open(store.clone(), MasterKey::generate())
            .await
            .expect("keyring");
        let hooks = Webhooks::new(store.clone(), Arc::new(keyring));
        let tenant = TenantId::new("acme").expect("id");
        let conv = ConvId::new("c").expect("id");
        let letter = WebhookDeadLetter {
            event_id: "e".into(),
            attempts: 1,
            last_error: "500".into(),
            time_ms: 1,
        };
        let mut txn = Transaction::new();
        for seq in 1..MAX_DEAD_LETTERS as u64 {
            txn.put(
                keys::webhook_dead(&tenant, "s", &conv, seq),
                letter.encode_to_vec(),
            );
        }
        store.commit(txn).await.expect("fill");
        // One place left: taken, and the cursor moves with it.
        let last = MAX_DEAD_LETTERS as u64;
        hooks
            .dead_letter(&tenant, "s", &conv, last, &letter)
            .await
            .expect("the last place");
        assert_eq!(
            hooks.cursor(&tenant, "s", &conv).await.expect("cursor"),
            Some(last)
        );
        // Full: refused, retryable, and the cursor stays where it was.
        let refused = hooks
            .dead_letter(&tenant, "s", &conv, last + 1, &letter)
            .await
            .expect_err("full");
        assert_eq!(refused.code(), "unavailable");
        assert_eq!(
            hooks.cursor(&tenant, "s", &conv).await.expect("cursor"),
            Some(last)
        );
        // Another subscription's bound is its own.
        hooks
            .dead_letter(&tenant, "t", &conv, 1, &letter)
            .await
            .expect("another subscription");
    }
}
