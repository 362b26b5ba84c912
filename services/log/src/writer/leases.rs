//! The leases this writer holds, and its fence: which partitions it takes requests for,
//! renewing, adopting, releasing, and finding out after a failed commit which were lost.

use std::collections::BTreeSet;

use prost::Message;
use tidings_schemas::storage::Lease;
use tracing::{debug, warn};

use super::{Command, State, Writer};
use crate::error::LogError;
use crate::keys;
use crate::lease::Held;
use crate::store::Transaction;

impl Writer {
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

    /// Writes a renewal of every lease held into the batch: same owner and epoch, expiry
    /// pushed to now + ttl.
    pub(super) fn renew(&self, state: &mut State, touched: &mut BTreeSet<u32>, now_ms: i64) {
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
    pub(super) fn release_in(&mut self, state: &mut State, fence: &mut Vec<(Vec<u8>, Vec<u8>)>) {
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
