//! Cells: where each tenant lives, and what the log does about it
//! ([docs/decisions/cells.md](../../../docs/decisions/cells.md)).
//!
//! A **cell** is a whole tidings deployment. The **directory** (`cd/<tenant>`, a
//! [`CellPlacement`] per tenant, every cell holding all of it, the highest version winning)
//! says each tenant's home cell, its disaster-recovery (DR) cell and tier. This module is the
//! log's side of it:
//!
//! - **The fence.** The sequencer refuses a tenant's writes unless this cell is its home
//!   (`wrong_cell`, naming the home), while a planned move drains it (`unavailable`), and,
//!   for a tenant with a DR cell, until this process has compared directories with that
//!   cell since it started (a home cell that comes back after a failover must learn first
//!   that it is home no more).
//! - **The outbox.** For a tenant with a DR cell, each commit's writes of that tenant are
//!   also written, in the same transaction, as one [`ReplicaBatch`] row under
//!   `ro/partition/epoch/n`: nothing acknowledged can be committed without its replica being
//!   queued. The server's relay hands rows to the DR cell over NATS and deletes them.
//! - **Applying.** A DR cell applies a batch through its own sequencer
//!   ([`crate::Log::apply_replica`]): all of it and the `ri/source/partition` mark in one
//!   transaction, a batch at or below the mark skipped, so each applies once and in order.
//! - **Synchronous tenants.** Their sends are answered only once the relay has the DR cell's
//!   acknowledgement for the batch (or `unavailable` after `sync_timeout`).
//!
//! Tenants not in the directory are served by whichever cell they reach and not replicated.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use prost::Message;
use tidings_schemas::storage::{CellPlacement, ReplicaBatch};
use tokio::sync::{Notify, watch};

use crate::error::LogError;
use crate::ids::TenantId;
use crate::keys;
use crate::store::{KvStore, Order, Transaction};

/// The most directory entries a cell holds in memory (and loads at open, in one scan): one
/// per tenant, about 100 bytes each (10 MB at the bound).
pub const MAX_TENANTS: usize = 100_000;

/// How long a drain holds a tenant's writes back (from the placement's change time): a
/// planned move that did not finish in it leaves the tenant served by its home again, and
/// the DR cell never takes a tenant whose drain is older than half of it.
pub const DRAIN_LEASE_MS: i64 = 120_000;

/// This cell, as the log sees it.
#[derive(Clone, Debug)]
pub struct CellConfig {
    /// This cell's name (`[cell] name`): `[a-z0-9-]`, 1–32 chars.
    pub name: String,
    /// How long a synchronous tenant's send waits for the DR cell before it is answered
    /// `unavailable` (the event stays committed; a retry is deduplicated and waits again).
    pub sync_timeout: Duration,
}

/// Checks a cell name: what NATS subjects and config keys may carry.
pub fn valid_cell_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "cell name {name:?} must be 1-32 characters of a-z, 0-9 and -"
        ))
    }
}

/// What a tenant's writes need beyond the commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replication {
    pub dr: String,
    pub sync: bool,
    /// The placement's version (carried by each batch).
    pub version: u64,
}

/// A position in a partition's outbox: rows are ordered by it.
pub type Position = (u64, u64);

/// The directory in memory, and the replication state shared by the sequencer, the relay and
/// the applier.
pub struct Cells {
    pub config: CellConfig,
    directory: RwLock<HashMap<TenantId, CellPlacement>>,
    /// Peers whose directory this process has merged since it started.
    confirmed: RwLock<HashSet<String>>,
    /// Woken after each commit that wrote outbox rows.
    pub outbox_written: Notify,
    /// Per partition, the last outbox position the DR cell acknowledged.
    acknowledged: Mutex<HashMap<u32, Position>>,
    /// Bumped whenever `acknowledged` moves, for synchronous sends waiting on it.
    acknowledged_tick: watch::Sender<u64>,
}

impl Cells {
    /// Loads the directory from the store.
    pub async fn open(store: &dyn KvStore, config: CellConfig) -> Result<Cells, LogError> {
        valid_cell_name(&config.name).map_err(LogError::InvalidRequest)?;
        let rows = store
            .scan(keys::cell_directory(), MAX_TENANTS, Order::Ascending)
            .await?;
        let mut directory = HashMap::with_capacity(rows.len());
        for (key, value) in rows {
            let Some(tenant) = keys::tenant_of(&key).and_then(|t| TenantId::new(t).ok()) else {
                return Err(LogError::corrupt(&key, "not a tenant's placement"));
            };
            let placement =
                CellPlacement::decode(value.as_slice()).map_err(|e| LogError::corrupt(&key, e))?;
            directory.insert(tenant, placement);
        }
        Ok(Cells {
            config,
            directory: RwLock::new(directory),
            confirmed: RwLock::new(HashSet::new()),
            outbox_written: Notify::new(),
            acknowledged: Mutex::new(HashMap::new()),
            acknowledged_tick: watch::channel(0).0,
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn placement(&self, tenant: &TenantId) -> Option<CellPlacement> {
        self.directory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .cloned()
    }

    /// Every placement, ordered by tenant (what a peer asking for the directory gets).
    pub fn directory(&self) -> Vec<(TenantId, CellPlacement)> {
        let mut all: Vec<_> = self
            .directory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(t, p)| (t.clone(), p.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Records that this process has merged `peer`'s directory.
    pub fn confirm(&self, peer: &str) {
        self.confirmed
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer.to_string());
    }

    pub fn is_confirmed(&self, peer: &str) -> bool {
        self.confirmed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(peer)
    }

    /// Whether this cell may take the tenant's writes now, and what they need if so.
    pub fn admit(&self, tenant: &TenantId) -> Result<Option<Replication>, LogError> {
        self.serves(tenant)?;
        let Some(p) = self.placement(tenant) else {
            return Ok(None);
        };
        if p.draining && crate::now_ms() - p.changed_ms < DRAIN_LEASE_MS {
            return Err(LogError::Unavailable {
                reason: format!("the tenant is moving to cell {}; try again shortly", p.dr),
            });
        }
        if p.dr.is_empty() {
            return Ok(None);
        }
        if !self.is_confirmed(&p.dr) {
            return Err(LogError::Unavailable {
                reason: format!(
                    "this cell has not yet compared its directory with cell {} since it \
                     started; try again shortly",
                    p.dr
                ),
            });
        }
        Ok(Some(Replication {
            dr: p.dr,
            sync: p.sync,
            version: p.version,
        }))
    }

    /// `Err(wrong_cell)` if the directory homes the tenant in another cell.
    pub fn serves(&self, tenant: &TenantId) -> Result<(), LogError> {
        match self.placement(tenant) {
            Some(p) if p.home != self.config.name => Err(LogError::WrongCell { cell: p.home }),
            _ => Ok(()),
        }
    }

    /// Whether this cell's directory is older than placement `version` of the tenant (a
    /// replica written under it waits for it to arrive).
    pub fn behind(&self, tenant: &TenantId, version: u64) -> bool {
        self.placement(tenant).map_or(0, |p| p.version) < version
    }

    /// Whether a replica from `source` of the tenant, written under placement `version`,
    /// may be applied here: `source` must be the tenant's home and this cell its DR cell.
    /// A directory older than the batch's is `directory_behind` (retryable: wait for it).
    pub fn admit_replica(
        &self,
        tenant: &TenantId,
        source: &str,
        version: u64,
    ) -> Result<(), LogError> {
        if self.behind(tenant, version) {
            return Err(LogError::Unavailable {
                reason: format!(
                    "the directory is behind: placement version {version} of tenant {tenant} \
                     is not here yet"
                ),
            });
        }
        match self.placement(tenant) {
            Some(p) if p.home == source && p.dr == self.config.name => Ok(()),
            Some(p) => Err(LogError::NotAllowed(format!(
                "a replica of tenant {tenant} from cell {source}, whose home is {} and DR cell \
                 {:?}",
                p.home, p.dr
            ))),
            None => Err(LogError::NotAllowed(format!(
                "a replica of tenant {tenant}, which the directory does not list"
            ))),
        }
    }

    /// Writes `next` as the tenant's placement if its version is above the stored one
    /// (`Ok(false)`: it was not). Used for changes made here and for peers' changes alike.
    pub async fn store_placement(
        &self,
        store: &dyn KvStore,
        tenant: &TenantId,
        next: CellPlacement,
    ) -> Result<bool, LogError> {
        let key = keys::cell_placement(tenant);
        let stored = store.get(&key).await?;
        let current = match &stored {
            Some(bytes) => Some(
                CellPlacement::decode(bytes.as_slice()).map_err(|e| LogError::corrupt(&key, e))?,
            ),
            None => None,
        };
        // The highest version wins; two cells that changed a placement at once (the same
        // version) settle on the later change, then on the names, so every cell agrees.
        let newer = |c: &CellPlacement| {
            (next.version, next.changed_ms, &next.home, &next.dr)
                > (c.version, c.changed_ms, &c.home, &c.dr)
        };
        if current.as_ref().is_some_and(|c| !newer(c)) {
            // What is stored may be newer than what memory says (another process).
            if let Some(c) = current {
                self.remember(tenant, c);
            }
            return Ok(false);
        }
        let mut txn = Transaction::new();
        txn.expect(key.clone(), stored);
        txn.put(key, next.encode_to_vec());
        store.commit(txn).await?;
        self.remember(tenant, next);
        Ok(true)
    }

    fn remember(&self, tenant: &TenantId, placement: CellPlacement) {
        let mut directory = self.directory.write().unwrap_or_else(|p| p.into_inner());
        if directory.len() < MAX_TENANTS || directory.contains_key(tenant) {
            directory.insert(tenant.clone(), placement);
        }
    }

    /// The relay: the DR cell acknowledged the outbox of `partition` through `at`.
    pub fn acknowledge(&self, partition: u32, at: Position) {
        {
            let mut acked = self.acknowledged.lock().unwrap_or_else(|p| p.into_inner());
            let slot = acked.entry(partition).or_insert(at);
            if at > *slot {
                *slot = at;
            }
        }
        self.acknowledged_tick.send_modify(|t| *t += 1);
    }

    fn acknowledged_through(&self, partition: u32, at: Position) -> bool {
        self.acknowledged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&partition)
            .is_some_and(|done| *done >= at)
    }

    /// Waits until the DR cell acknowledged `partition`'s outbox through `at`, for at most
    /// `sync_timeout`. `Err(unavailable)` if it did not.
    pub async fn await_acknowledged(&self, partition: u32, at: Position) -> Result<(), LogError> {
        let mut tick = self.acknowledged_tick.subscribe();
        let wait = async {
            loop {
                if self.acknowledged_through(partition, at) {
                    return;
                }
                if tick.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(self.config.sync_timeout, wait)
            .await
            .map_err(|_| LogError::Unavailable {
                reason: "committed here, but the disaster-recovery cell has not confirmed it \
                         yet (synchronous replication); retry with the same client_msg_id"
                    .into(),
            })
    }
}

/// A commit of the tenant's that its DR cell never got, kept here (`rl/`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostEvent {
    pub conversation: String,
    pub seq: u64,
}

/// Rows the relay reads from one partition's outbox at a time.
pub const OUTBOX_PAGE: usize = 256;

impl crate::Log {
    /// Up to `limit` outbox rows of `partition`, oldest first, decoded.
    pub async fn outbox_page(
        &self,
        partition: u32,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, ReplicaBatch)>, LogError> {
        let range = crate::store::KeyRange::prefix(keys::outbox_dir(partition));
        self.outbox_rows(range, limit).await
    }

    /// Up to `limit` outbox rows of every partition at or after key `from` (ordered by
    /// partition, then oldest first), decoded.
    pub async fn outbox_page_from(
        &self,
        from: Vec<u8>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, ReplicaBatch)>, LogError> {
        let all = crate::store::KeyRange::prefix(keys::outbox_all());
        let range = crate::store::KeyRange {
            start: from.max(all.start),
            end: all.end,
        };
        self.outbox_rows(range, limit).await
    }

    async fn outbox_rows(
        &self,
        range: crate::store::KeyRange,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, ReplicaBatch)>, LogError> {
        let rows = self.store().scan(range, limit, Order::Ascending).await?;
        rows.into_iter()
            .map(|(key, value)| {
                let batch = ReplicaBatch::decode(value.as_slice())
                    .map_err(|e| LogError::corrupt(&key, e))?;
                Ok((key, batch))
            })
            .collect()
    }

    /// Through which position this cell applied `source`'s replicas of `partition` (its
    /// `ri/` mark), `None` if it applied none. An old home that comes back after an
    /// unplanned failover asks the cell that took over: an outbox row at or below the mark
    /// reached it (the old home went down before deleting the row), one above never did.
    pub async fn replica_applied_through(
        &self,
        source: &str,
        partition: u32,
    ) -> Result<Option<Position>, LogError> {
        let key = keys::replica_mark(source, partition);
        match self.store().get(&key).await? {
            None => Ok(None),
            Some(bytes) => decode_mark(&bytes)
                .map(Some)
                .ok_or_else(|| LogError::corrupt(&key, "not 16 bytes")),
        }
    }

    /// Deletes outbox rows the DR cell acknowledged.
    pub async fn outbox_remove(&self, rows: Vec<Vec<u8>>) -> Result<(), LogError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut txn = Transaction::new();
        for key in rows {
            txn.delete(key);
        }
        Ok(self.store().commit(txn).await?)
    }

    /// An outbox row that can no longer be delivered (the tenant moved home while it waited:
    /// an unplanned failover): its events are kept under `rl/` as acknowledged here and never
    /// replicated, and the row is deleted, in one transaction.
    pub async fn outbox_keep_lost(
        &self,
        row: Vec<u8>,
        batch: &ReplicaBatch,
    ) -> Result<usize, LogError> {
        let tenant = TenantId::new(&batch.tenant)?;
        let mut txn = Transaction::new();
        let mut kept = 0;
        for w in &batch.writes {
            if let (Some((c, seq)), Some(v)) = (keys::event_ids(&w.key), &w.value) {
                txn.put(keys::replica_lost(&tenant, &c, seq), v.clone());
                kept += 1;
            }
        }
        txn.delete(row);
        self.store().commit(txn).await?;
        Ok(kept)
    }

    /// The tenant's kept lost events (`rl/`): acknowledged by this cell as the tenant's home
    /// and never replicated before another cell took over, oldest first, at most `limit`.
    pub async fn lost_events(
        &self,
        tenant: &TenantId,
        limit: usize,
    ) -> Result<Vec<LostEvent>, LogError> {
        let rows = self
            .store()
            .scan(keys::replica_lost_dir(tenant), limit, Order::Ascending)
            .await?;
        let mut lost = Vec::with_capacity(rows.len());
        for (key, _) in rows {
            // rl/tenant/conv/seq: the same layout as an event key below its prefix.
            let mut as_event = b"ev".to_vec();
            as_event.extend_from_slice(&key[2..]);
            if let Some((c, seq)) = keys::event_ids(&as_event) {
                lost.push(LostEvent {
                    conversation: c.to_string(),
                    seq,
                });
            }
        }
        Ok(lost)
    }

    /// Each of the tenant's conversations and its last seq here, at most `limit`.
    pub async fn tenant_heads(
        &self,
        tenant: &TenantId,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, LogError> {
        let rows = self
            .store()
            .scan(
                crate::store::KeyRange::prefix(keys::head_dir(Some(tenant))),
                limit,
                Order::Ascending,
            )
            .await?;
        let mut heads = Vec::with_capacity(rows.len());
        for (key, value) in rows {
            let head = tidings_schemas::storage::Head::decode(value.as_slice())
                .map_err(|e| LogError::corrupt(&key, e))?;
            if let Some((_, c)) = keys::head_ids(&key) {
                heads.push((c, head.last_seq));
            }
        }
        Ok(heads)
    }
}

/// The label of a replica batch's MAC under the link key.
pub const BATCH_MAC: &[u8] = b"tidings-cell-batch-v1";
/// The label of a directory entry's MAC under the link key.
pub const PLACEMENT_MAC: &[u8] = b"tidings-cell-placement-v1";
/// The label of a cell's answer for its mark (what it applied of a peer's partition) under
/// the link key.
pub const MARK_MAC: &[u8] = b"tidings-cell-mark-v1";

/// What a mark answer's MAC covers: who answers, whose partition, which one, the mark, and
/// the asker's nonce (so an old answer cannot be replayed to a later question).
pub fn mark_signed_bytes(
    answering: &str,
    source: &str,
    partition: u32,
    at: Option<Position>,
    nonce: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + answering.len() + source.len() + nonce.len());
    for part in [answering.as_bytes(), source.as_bytes(), nonce] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(&partition.to_be_bytes());
    match at {
        None => out.push(0),
        Some((epoch, n)) => {
            out.push(1);
            out.extend_from_slice(&epoch.to_be_bytes());
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
    out
}

/// Splits an outbox key into (partition, epoch, n).
pub fn outbox_position(key: &[u8]) -> Option<(u32, Position)> {
    let rest = key.strip_prefix(b"ro\0".as_slice())?;
    if rest.len() != 20 {
        return None;
    }
    let p = u32::from_be_bytes(rest[0..4].try_into().ok()?);
    let epoch = u64::from_be_bytes(rest[4..12].try_into().ok()?);
    let n = u64::from_be_bytes(rest[12..20].try_into().ok()?);
    Some((p, (epoch, n)))
}

/// The 16-byte value of an `ri/` mark.
pub fn encode_mark(at: Position) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&at.0.to_be_bytes());
    v.extend_from_slice(&at.1.to_be_bytes());
    v
}

pub fn decode_mark(bytes: &[u8]) -> Option<Position> {
    if bytes.len() != 16 {
        return None;
    }
    Some((
        u64::from_be_bytes(bytes[0..8].try_into().ok()?),
        u64::from_be_bytes(bytes[8..16].try_into().ok()?),
    ))
}

/// Checks a batch from a peer before it reaches the sequencer: its writes may only be the
/// tenant's conversation rows (events, heads, dedupe, memberships, their change feed, the
/// users' lists), never another tenant's or any other prefix.
pub fn check_batch(batch: &ReplicaBatch) -> Result<TenantId, LogError> {
    let tenant = TenantId::new(&batch.tenant)?;
    for w in &batch.writes {
        let allowed = keys::SEQUENCED_PREFIXES
            .iter()
            .any(|p| w.key.starts_with(p))
            && keys::tenant_of(&w.key) == Some(tenant.as_str());
        if !allowed {
            return Err(LogError::NotAllowed(format!(
                "a replica of tenant {tenant} writes a key outside its conversations"
            )));
        }
    }
    Ok(tenant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_keys_order_by_epoch_then_n_and_split_back() {
        let a = keys::outbox(3, 1, 900);
        let b = keys::outbox(3, 2, 1);
        assert!(a < b);
        assert_eq!(outbox_position(&b), Some((3, (2, 1))));
        assert_eq!(decode_mark(&encode_mark((7, 9))), Some((7, 9)));
    }

    /// A mark answer's MAC holds for its own question only: another nonce (a replay),
    /// another mark, partition or answering cell, or another key, and it does not verify.
    #[test]
    fn a_mark_answer_verifies_for_its_own_question_only() {
        let key = crate::crypto::LinkKey::from_hex(&"ab".repeat(64)).expect("a key");
        let nonce = [7u8; 16];
        let signed = mark_signed_bytes("b", "a", 3, Some((2, 40)), &nonce);
        let tag = key.mac(MARK_MAC, &signed);
        assert!(key.verify(MARK_MAC, &signed, &tag));
        for other in [
            mark_signed_bytes("b", "a", 3, Some((2, 40)), &[8u8; 16]),
            mark_signed_bytes("b", "a", 3, Some((2, 41)), &nonce),
            mark_signed_bytes("b", "a", 3, None, &nonce),
            mark_signed_bytes("b", "a", 4, Some((2, 40)), &nonce),
            mark_signed_bytes("c", "a", 3, Some((2, 40)), &nonce),
            mark_signed_bytes("b", "c", 3, Some((2, 40)), &nonce),
        ] {
            assert!(!key.verify(MARK_MAC, &other, &tag));
        }
        assert!(
            !key.verify(PLACEMENT_MAC, &signed, &tag),
            "bound to its label"
        );
        let stranger = crate::crypto::LinkKey::from_hex(&"cd".repeat(64)).expect("a key");
        assert!(!stranger.verify(MARK_MAC, &signed, &tag));
    }

    #[test]
    fn cell_names_are_subject_safe() {
        assert!(valid_cell_name("dr-2").is_ok());
        assert!(valid_cell_name("").is_err());
        assert!(valid_cell_name("a.b").is_err());
        assert!(valid_cell_name("A").is_err());
    }

    #[test]
    fn a_batch_may_not_write_outside_its_tenant() {
        let t = TenantId::new("acme").expect("id");
        let c = crate::ids::ConvId::new("c1").expect("id");
        let other = TenantId::new("acme2").expect("id");
        let write = |key: Vec<u8>| tidings_schemas::storage::ReplicaWrite {
            key,
            value: Some(vec![1]),
        };
        let mut batch = ReplicaBatch {
            tenant: "acme".into(),
            writes: vec![write(keys::event(&t, &c, 1)), write(keys::head(&t, &c))],
            ..ReplicaBatch::default()
        };
        assert!(check_batch(&batch).is_ok());
        batch.writes.push(write(keys::head(&other, &c)));
        assert!(check_batch(&batch).is_err());
        batch.writes.pop();
        batch.writes.push(write(keys::lease(1)));
        assert!(check_batch(&batch).is_err());
        batch.writes.pop();
        batch.writes.push(write(keys::cell_placement(&t)));
        assert!(check_batch(&batch).is_err());
    }
}
