//! Writer ownership: partitions, leases, epochs (ARCHITECTURE.md, "Writer ownership and
//! fencing").
//!
//! A conversation belongs to partition `fnv1a64(tenant ++ 0x00 ++ conv) % partitions`
//! ([`partition_of`]). Each partition has a lease at `ls/<partition>`: `Lease{owner, epoch,
//! expires_ms}`. A writer acquires a lease that is absent, expired or its own by a
//! transaction that expects the old value and writes `epoch + 1`, so the epoch changes every
//! time the lease changes hands. The sequencer renews what it holds (in its own batches, so
//! the value it expects is always exact), expects each touched partition's lease in every
//! commit (the fence), and releases everything when it stops.
//!
//! This module holds what the sequencer and the log's handles share: the partition count and
//! which partitions this writer owns right now (`Ownership`), the acquisition transaction,
//! and a process-wide registry of live writer ids (on a store only one process can open, a
//! lease whose owner is not alive in this process belongs to a crashed process).

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use prost::Message;
use tidings_schemas::storage::{Lease, Partitions};

use crate::error::LogError;
use crate::ids::{ConvId, TenantId};
use crate::keys;
use crate::store::{KvStore, StoreError, Transaction};

/// The partition of a conversation: FNV-1a (64-bit) of `tenant ++ 0x00 ++ conv`, modulo
/// `partitions`. Stable across processes, versions and platforms (never Rust's randomized
/// hasher): a writer and every router must agree on it for the life of the store.
pub fn partition_of(tenant: &TenantId, conv: &ConvId, partitions: u32) -> u32 {
    let mut h = Fnv1a::new();
    h.write(tenant.as_str().as_bytes());
    h.write(&[0]);
    h.write(conv.as_str().as_bytes());
    h.partition(partitions)
}

/// [`partition_of`] for the `tenant\0conv` bytes of a key ([`keys::conversation_part`]).
pub(crate) fn partition_of_part(part: &[u8], partitions: u32) -> u32 {
    let mut h = Fnv1a::new();
    h.write(part);
    h.partition(partitions)
}

struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn partition(&self, partitions: u32) -> u32 {
        (self.0 % u64::from(partitions.max(1))) as u32
    }
}

/// A lease as this writer holds it: the decoded value and the exact bytes every commit
/// expects.
#[derive(Clone, Debug)]
pub(crate) struct Held {
    pub lease: Lease,
    pub bytes: Vec<u8>,
}

impl Held {
    pub fn new(lease: Lease) -> Self {
        let bytes = lease.encode_to_vec();
        Held { lease, bytes }
    }
}

/// Which partitions this writer owns right now, shared by the sequencer (the only one that
/// changes it) and every handle of the log (which refuses requests for partitions it does
/// not own before they queue).
pub(crate) struct Ownership {
    pub writer_id: String,
    pub partitions: u32,
    pub ttl_ms: i64,
    held: Vec<AtomicBool>,
    /// For partitions not held: the owner last seen, for the error.
    owners: Mutex<Vec<String>>,
    /// Set once this writer must not acquire anything (it released its leases to stop, or
    /// it was opened not to own partitions).
    retired: AtomicBool,
}

impl Ownership {
    pub fn new(writer_id: String, partitions: u32, ttl_ms: i64) -> Self {
        Ownership {
            writer_id,
            partitions,
            ttl_ms,
            held: (0..partitions).map(|_| AtomicBool::new(false)).collect(),
            owners: Mutex::new(vec![String::new(); partitions as usize]),
            retired: AtomicBool::new(false),
        }
    }

    /// From now on this writer acquires no lease.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    pub fn retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    pub fn partition(&self, tenant: &TenantId, conv: &ConvId) -> u32 {
        partition_of(tenant, conv, self.partitions)
    }

    pub fn holds(&self, partition: u32) -> bool {
        self.held
            .get(partition as usize)
            .is_some_and(|h| h.load(Ordering::Acquire))
    }

    /// `Ok` if this writer owns the partition, else the retryable `not_owner` refusal.
    pub fn check(&self, partition: u32) -> Result<(), LogError> {
        if self.holds(partition) {
            return Ok(());
        }
        Err(self.not_owner(partition))
    }

    pub fn not_owner(&self, partition: u32) -> LogError {
        let owner = self
            .owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(partition as usize)
            .cloned()
            .unwrap_or_default();
        LogError::NotOwner { partition, owner }
    }

    /// Records that this writer now holds the partition, or that `owner` does.
    pub fn set(&self, partition: u32, held: bool, owner: &str) {
        let Some(flag) = self.held.get(partition as usize) else {
            return;
        };
        if let Some(slot) = self
            .owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(partition as usize)
        {
            *slot = owner.to_string();
        }
        flag.store(held, Ordering::Release);
    }

    /// The partitions this writer owns, in order.
    pub fn owned(&self) -> Vec<u32> {
        (0..self.partitions).filter(|p| self.holds(*p)).collect()
    }

    /// The partitions this writer does not own, in order.
    pub fn not_owned(&self) -> Vec<u32> {
        (0..self.partitions).filter(|p| !self.holds(*p)).collect()
    }
}

/// Writer ids alive in this process (their sequencer runs).
static LIVE_WRITERS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// A writer id registered as alive in this process; unregistered on drop (when the
/// sequencer stops).
pub(crate) struct Registration(String);

impl Registration {
    /// Refuses an id that is already alive here: two writers with one id would both take
    /// the other's leases as their own.
    pub fn new(writer_id: &str) -> Result<Self, LogError> {
        let mut live = LIVE_WRITERS.lock().unwrap_or_else(|p| p.into_inner());
        if !live.insert(writer_id.to_string()) {
            return Err(LogError::InvalidRequest(format!(
                "log writer id {writer_id:?} is already in use in this process"
            )));
        }
        Ok(Registration(writer_id.to_string()))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        LIVE_WRITERS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

fn is_live(writer_id: &str) -> bool {
    LIVE_WRITERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(writer_id)
}

/// Records the partition count at the first open of a store; refuses a different count on
/// any later open.
pub(crate) async fn check_partitions(store: &dyn KvStore, configured: u32) -> Result<(), LogError> {
    for _ in 0..3 {
        if let Some(bytes) = store.get(keys::PARTITIONS).await? {
            let stored = Partitions::decode(bytes.as_slice())
                .map_err(|e| LogError::corrupt(keys::PARTITIONS, e))?
                .count;
            if stored != configured {
                return Err(LogError::PartitionsMismatch { stored, configured });
            }
            return Ok(());
        }
        let mut txn = Transaction::new();
        let value = Partitions { count: configured }.encode_to_vec();
        txn.put_if_absent(keys::PARTITIONS.to_vec(), value);
        match store.commit(txn).await {
            Ok(()) => return Ok(()),
            // Another writer recorded it first: read what it wrote.
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(LogError::corrupt(
        keys::PARTITIONS,
        "the partition count could not be recorded",
    ))
}

/// What an acquisition got, and who holds the rest.
#[derive(Default)]
pub(crate) struct Acquired {
    pub got: Vec<(u32, Held)>,
    pub others: Vec<(u32, String)>,
}

/// Tries to acquire `wanted` in one transaction: each lease that is absent, expired, this
/// writer's own, held by a writer known to be gone, or any at all with `force`. Every
/// acquisition expects the value it read and writes `epoch + 1`, so of two writers racing
/// for a partition exactly one wins (the other's transaction conflicts and it reads again).
pub(crate) async fn acquire(
    store: &dyn KvStore,
    own: &Ownership,
    wanted: &[u32],
    force: bool,
) -> Result<Acquired, LogError> {
    const ATTEMPTS: usize = 4;
    for attempt in 1..=ATTEMPTS {
        let keys: Vec<Vec<u8>> = wanted.iter().map(|p| keys::lease(*p)).collect();
        let values = store.batch_get(keys.clone()).await?;
        let now = crate::now_ms();
        let mut out = Acquired::default();
        let mut txn = Transaction::new();
        for ((p, key), value) in wanted.iter().zip(keys).zip(values) {
            let old = match &value {
                Some(bytes) => {
                    Some(Lease::decode(bytes.as_slice()).map_err(|e| LogError::corrupt(&key, e))?)
                }
                None => None,
            };
            let free = match &old {
                None => true,
                Some(l) => {
                    force
                        || l.expires_ms <= now
                        || l.owner == own.writer_id
                        || (store.single_process() && !is_live(&l.owner))
                }
            };
            if !free {
                out.others
                    .push((*p, old.map(|l| l.owner).unwrap_or_default()));
                continue;
            }
            let held = Held::new(Lease {
                owner: own.writer_id.clone(),
                epoch: old.as_ref().map_or(0, |l| l.epoch) + 1,
                expires_ms: now + own.ttl_ms,
            });
            txn.expect(key.clone(), value);
            txn.put(key, held.bytes.clone());
            out.got.push((*p, held));
        }
        if out.got.is_empty() {
            return Ok(out);
        }
        match store.commit(txn).await {
            Ok(()) => return Ok(out),
            Err(StoreError::Conflict { .. }) if attempt < ATTEMPTS => {
                tracing::debug!(
                    attempt,
                    "lease acquisition raced another writer; reading again"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Acquired::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_hash_is_fnv1a_of_tenant_nul_conv() {
        // Pinned: changing the hash moves conversations between leases on existing stores.
        let t = TenantId::new("acme").expect("id");
        let c = ConvId::new("general").expect("id");
        let mut h = Fnv1a::new();
        h.write(b"acme\0general");
        assert_eq!(h.0, 0x3f4a_0c0a_37ae_f953);
        assert_eq!(partition_of(&t, &c, 64), 19);
        assert_eq!(partition_of_part(b"acme\0general", 64), 19);
        assert_eq!(partition_of(&t, &c, 1), 0);
    }
}
