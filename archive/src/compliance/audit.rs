//! The audit log: one per tenant, in the KV, immutable.
//!
//! Records are numbered 1, 2, 3, ... per tenant (`au/<tenant>/<seq>`), written with
//! put-if-absent in the same transaction as the head (`ah/<tenant>`), whose old value the
//! transaction expects, so two writers never both take a seq and a record is never
//! overwritten. Each record is sealed (AES-256-SIV under the store's audit key, bound to its
//! tenant and seq) and carries the SHA-256 of the previous sealed record: [`read`] detects a
//! changed record (seal), a moved one (AD), a deleted or reordered one (seq and hash chain)
//! and a cut tail (head).

use prost::Message;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tidings_log::crypto::{DataKey, Keyring};
use tidings_log::store::{KvStore, StoreError, Transaction};
use tidings_log::{LogError, TenantId, keys};
use tidings_schemas::storage::{AuditHead, AuditRecord};

use super::{Actor, rfc3339_ms};
use crate::archiver::Pages;
use crate::error::ArchiveError;
use tidings_log::store::KeyRange;

/// What a caller records; the log adds seq, time and the chain.
#[derive(Clone, Debug, Default)]
pub struct Entry {
    pub access_id: String,
    pub actor: String,
    pub via: String,
    pub action: String,
    pub outcome: String,
    pub filters: String,
    pub rows: u64,
    pub destination: String,
    pub detail: String,
}

impl Entry {
    pub fn new(actor: &Actor, action: &str, outcome: &str) -> Self {
        Entry {
            actor: actor.name().to_string(),
            via: actor.via.as_str().to_string(),
            action: action.to_string(),
            outcome: outcome.to_string(),
            ..Entry::default()
        }
    }
}

fn ad<'a>(tenant: &'a TenantId, seq: &'a [u8; 8]) -> [&'a [u8]; 3] {
    [b"tidings-au-v1", tenant.as_str().as_bytes(), seq]
}

/// Appends a record and returns its seq. Retries when another writer took the seq first.
pub async fn append(
    store: &dyn KvStore,
    keyring: &Keyring,
    tenant: &TenantId,
    entry: &Entry,
) -> Result<u64, LogError> {
    append_all(store, keyring, tenant, std::slice::from_ref(entry)).await
}

/// Appends `entries` in order in one transaction (one commit, one fsync) and returns the
/// seq of the last; of none, the head's. Retries when another writer took a seq first. For
/// tools and tests that write many records at once; keep a batch to a few thousand records,
/// as a transaction is held in memory whole.
pub async fn append_all(
    store: &dyn KvStore,
    keyring: &Keyring,
    tenant: &TenantId,
    entries: &[Entry],
) -> Result<u64, LogError> {
    let key = keyring.audit_key().await?;
    let head_key = keys::audit_head(tenant);
    for _ in 0..64 {
        let old = store.get(&head_key).await?;
        let mut head = match &old {
            Some(bytes) => {
                AuditHead::decode(bytes.as_slice()).map_err(|e| LogError::corrupt(&head_key, e))?
            }
            None => AuditHead::default(),
        };
        if entries.is_empty() {
            return Ok(head.last_seq);
        }
        let mut txn = Transaction::new();
        txn.expect(head_key.clone(), old);
        for entry in entries {
            let seq = head.last_seq + 1;
            let record = AuditRecord {
                seq,
                time_ms: tidings_log::now_ms(),
                access_id: entry.access_id.clone(),
                actor: entry.actor.clone(),
                via: entry.via.clone(),
                action: entry.action.clone(),
                outcome: entry.outcome.clone(),
                filters: entry.filters.clone(),
                rows: entry.rows,
                destination: entry.destination.clone(),
                detail: entry.detail.clone(),
                prev_hash: head.last_hash,
            };
            let sealed = key.seal(&ad(tenant, &seq.to_be_bytes()), &record.encode_to_vec());
            head = AuditHead {
                last_seq: seq,
                last_hash: Sha256::digest(&sealed).to_vec(),
            };
            txn.put_if_absent(keys::audit(tenant, seq), sealed);
        }
        txn.put(head_key.clone(), head.encode_to_vec());
        match store.commit(txn).await {
            Ok(()) => return Ok(head.last_seq),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(LogError::Store(StoreError::Conflict {
        key: keys::display_key(&head_key),
        reason: "the audit log head kept changing under 64 attempts",
    }))
}

/// A tenant's audit log as read back, with anything that breaks its integrity.
#[derive(Debug, Default)]
pub struct Listing {
    pub records: Vec<AuditRecord>,
    pub problems: Vec<String>,
}

/// What a streaming read ([`read_each`]) found besides the records.
#[derive(Debug, Default)]
pub struct Checked {
    /// Records handed over.
    pub rows: u64,
    /// Integrity problems, at most [`MAX_PROBLEMS`] (then one line counting the rest).
    pub problems: Vec<String>,
    /// False if the reader stopped the read early.
    pub complete: bool,
}

/// Most integrity problems listed by one read: a log damaged throughout must not make the
/// report as large as the log; the count of the rest is kept.
pub const MAX_PROBLEMS: usize = 100;

impl Checked {
    fn problem(&mut self, dropped: &mut u64, text: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(text);
        } else {
            *dropped += 1;
        }
    }
}

/// Reads and checks a tenant's whole audit log (collected: for tools and tests; servers
/// use [`read_each`]).
pub async fn read(
    store: &dyn KvStore,
    keyring: &Keyring,
    tenant: &TenantId,
) -> Result<Listing, ArchiveError> {
    let mut records = Vec::new();
    let checked = read_each(store, keyring, tenant, |record| {
        records.push(record);
        std::future::ready(true)
    })
    .await?;
    Ok(Listing {
        records,
        problems: checked.problems,
    })
}

/// Reads and checks a tenant's audit log a page at a time, handing each record to `each`
/// as it goes (it returns false to stop): memory is bounded by a page, however long the
/// log. The chain is checked across pages; the head is checked at the end of a complete
/// read.
pub async fn read_each<F, Fut>(
    store: &dyn KvStore,
    keyring: &Keyring,
    tenant: &TenantId,
    mut each: F,
) -> Result<Checked, ArchiveError>
where
    F: FnMut(AuditRecord) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let key = keyring.audit_key().await?;
    let mut checked = Checked::default();
    let mut dropped = 0u64;
    let mut prev_hash: Vec<u8> = Vec::new();
    let mut expected = 1u64;
    let mut pages = Pages::new(KeyRange::prefix(keys::audit_dir(tenant)));
    while let Some(page) = pages.next(store).await? {
        for (k, sealed) in page {
            let Some(seq) = keys::event_seq(&k) else {
                checked.problem(
                    &mut dropped,
                    format!("unreadable key {}", keys::display_key(&k)),
                );
                continue;
            };
            if seq != expected {
                checked.problem(
                    &mut dropped,
                    format!("records {expected}..{seq} are missing"),
                );
            }
            expected = seq + 1;
            match open(&key, tenant, seq, &sealed) {
                Ok(record) => {
                    if record.prev_hash != prev_hash {
                        checked.problem(
                            &mut dropped,
                            format!(
                                "record {seq} does not follow the record before it (hash chain broken)"
                            ),
                        );
                    }
                    checked.rows += 1;
                    if !each(record).await {
                        return Ok(checked);
                    }
                }
                Err(reason) => checked.problem(&mut dropped, format!("record {seq}: {reason}")),
            }
            prev_hash = Sha256::digest(&sealed).to_vec();
        }
    }
    let head_key = keys::audit_head(tenant);
    let head = match store.get(&head_key).await.map_err(LogError::from)? {
        Some(bytes) => {
            AuditHead::decode(bytes.as_slice()).map_err(|e| LogError::corrupt(&head_key, e))?
        }
        None => AuditHead::default(),
    };
    if head.last_seq != expected - 1 || head.last_hash != prev_hash {
        checked.problem(
            &mut dropped,
            format!(
                "the audit head names record {} but the log ends at {}",
                head.last_seq,
                expected - 1
            ),
        );
    }
    if dropped > 0 {
        checked
            .problems
            .push(format!("and {dropped} more problems not listed"));
    }
    checked.complete = true;
    Ok(checked)
}

fn open(key: &DataKey, tenant: &TenantId, seq: u64, sealed: &[u8]) -> Result<AuditRecord, String> {
    let plain = key
        .open(&ad(tenant, &seq.to_be_bytes()), sealed)
        .map_err(|_| {
            "fails authentication (altered, or moved from another position)".to_string()
        })?;
    let record = AuditRecord::decode(plain.as_slice()).map_err(|e| e.to_string())?;
    if record.seq != seq {
        return Err(format!("names seq {}", record.seq));
    }
    Ok(record)
}

/// An audit record as a JSON line.
pub fn record_json(tenant: &TenantId, r: &AuditRecord) -> Value {
    let filters: Value = serde_json::from_str(&r.filters).unwrap_or(Value::Null);
    json!({
        "tenant": tenant.as_str(),
        "seq": r.seq,
        "time": rfc3339_ms(r.time_ms),
        "access_id": r.access_id,
        "actor": r.actor,
        "via": r.via,
        "action": r.action,
        "outcome": r.outcome,
        "filters": filters,
        "rows": r.rows,
        "destination": r.destination,
        "detail": r.detail,
    })
}
