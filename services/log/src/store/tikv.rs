//! The TiKV backend: tikv-client's `TransactionClient` (Percolator transactions, optimistic).
//!
//! How each operation maps (ARCHITECTURE.md, "The TiKV store", says the same for readers):
//! - reads (`get`, `batch_get`, `scan`) run on a read-only snapshot at a fresh timestamp
//!   from PD, so one call's answers are consistent with each other; reverse scans use
//!   `scan_reverse`. Reads are idempotent, so transient failures (gRPC, region, lock) that
//!   get past the client's own retries are retried here a bounded number of times.
//! - `commit` begins an optimistic transaction, reads every key that a check names at the
//!   transaction's start timestamp (`batch_get`) and fails with [`StoreError::Conflict`] if
//!   one differs; `lock_keys` every expected key it does not write, so that a write to it
//!   by anyone after our start timestamp makes our prewrite fail (a key we write is checked
//!   the same way by its own mutation); then applies each key's last write (`put`,
//!   `delete`, or `insert` for a put-if-absent, which TiKV checks again at prewrite) and
//!   commits. A write conflict or an existing key at prewrite is a `Conflict`: the caller
//!   (the log's sequencer) decides whether to try again, as it does for the embedded store.
//! - Why `lock_keys` and not `get_for_update`: in an optimistic transaction tikv-client's
//!   `get_for_update` is exactly `lock_keys` followed by `get` (client source,
//!   `transaction.rs`), one key per call; `batch_get` then one `lock_keys` does the same for
//!   all checked keys in one round trip per region.
//! - Every key gets the configured prefix in front, and loses it in scan results; scans are
//!   bounded to the prefix ([`super::tikv_config`]).
//! - `purge_deleted` cannot purge: see its doc.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tikv_client::{
    BoundRange, CheckLevel, Config, Error as TikvError, Key, Snapshot, TransactionClient,
    TransactionOptions,
};

use super::tikv_config::{TikvConfig, prefixed, prefixed_range, unprefixed};
use super::{KeyRange, KvStore, Op, Order, StoreError, Transaction};
use crate::keys::display_key;

/// Attempts of an idempotent step (a read, beginning a transaction) on transient errors.
const ATTEMPTS: u32 = 4;
/// First pause between attempts; doubled each time, with jitter, capped at [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct TikvStore {
    client: TransactionClient,
    prefix: Vec<u8>,
}

impl TikvStore {
    /// Longest scan served in one call (the embedded store's limit too); callers page.
    pub const MAX_SCAN_LIMIT: usize = 100_000;

    /// Connects to the cluster's PD. Validates `cfg` first ([`StoreError::Config`]), then
    /// tries to connect until `cfg.connect_timeout` has passed, with backoff between
    /// attempts; if PD never answers, fails with [`StoreError::Unreachable`] naming the
    /// endpoints. Never waits much longer than the timeout.
    pub async fn connect(cfg: &TikvConfig) -> Result<Self, StoreError> {
        cfg.validate()?;
        let mut config = Config::default().with_timeout(cfg.connect_timeout);
        if let Some(tls) = &cfg.tls {
            for (name, path) in [
                ("ca_path", &tls.ca_path),
                ("cert_path", &tls.cert_path),
                ("key_path", &tls.key_path),
            ] {
                if !path.is_file() {
                    return Err(StoreError::Config(format!(
                        "store.tikv.{name} {} is not a readable file",
                        path.display()
                    )));
                }
            }
            config = config.with_security(&tls.ca_path, &tls.cert_path, &tls.key_path);
        }
        let endpoints = cfg.pd_endpoints.join(",");
        let deadline = Instant::now() + cfg.connect_timeout;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt =
                TransactionClient::new_with_config(cfg.pd_endpoints.clone(), config.clone());
            let error = match tokio::time::timeout(remaining, attempt).await {
                Ok(Ok(client)) => {
                    return Ok(TikvStore {
                        client,
                        prefix: cfg.key_prefix.clone(),
                    });
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", cfg.connect_timeout),
            };
            let pause = backoff(attempts);
            if Instant::now() + pause >= deadline {
                return Err(StoreError::Unreachable {
                    what: "TiKV's placement driver (PD)",
                    endpoints,
                    attempts,
                    message: error,
                });
            }
            tracing::warn!(
                attempt = attempts,
                endpoints = %endpoints,
                error = %error,
                "could not reach pd, retrying"
            );
            tokio::time::sleep(pause).await;
        }
    }

    /// The prefix in front of every key of this deployment.
    pub fn key_prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// A read-only snapshot at a fresh timestamp. Nothing to roll back, so no drop check.
    async fn snapshot(&self) -> Result<Snapshot, TikvError> {
        let ts = self.client.current_timestamp().await?;
        let options = TransactionOptions::new_optimistic().drop_check(CheckLevel::None);
        Ok(self.client.snapshot(ts, options))
    }

    fn key(&self, key: &[u8]) -> Key {
        Key::from(prefixed(&self.prefix, key))
    }

    /// The caller's key of a key the cluster returned.
    fn strip(&self, stored: Key) -> Result<Vec<u8>, StoreError> {
        let stored: Vec<u8> = stored.into();
        match unprefixed(&self.prefix, &stored) {
            Some(key) => Ok(key.to_vec()),
            None => Err(StoreError::Backend {
                action: "scan a range",
                message: format!(
                    "the cluster returned key {} outside the prefix {}",
                    display_key(&stored),
                    display_key(&self.prefix)
                ),
            }),
        }
    }

    /// One attempt of a commit. `Err(Attempt::Again)` only where nothing was sent that
    /// could have written (beginning the transaction, reading its checks).
    async fn try_commit(&self, plan: &Plan) -> Result<(), Attempt> {
        let options = TransactionOptions::new_optimistic().drop_check(CheckLevel::Warn);
        let mut txn = self
            .client
            .begin_with_options(options)
            .await
            .map_err(|e| Attempt::from_read("begin a transaction", e))?;
        match self.checks_and_writes(&mut txn, plan).await {
            Ok(()) => {}
            Err(failure) => {
                // Nothing was prewritten yet: a failed rollback leaves nothing behind.
                let _ = txn.rollback().await;
                return Err(failure);
            }
        }
        match txn.commit().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let error = commit_error(&self.prefix, e);
                if !matches!(error, StoreError::Backend { action, .. } if action == UNDETERMINED) {
                    // Releases whatever prewrite locks did land, instead of leaving them to
                    // expire; refused harmlessly if the primary was committed.
                    let _ = txn.rollback().await;
                }
                Err(Attempt::Final(error))
            }
        }
    }

    async fn checks_and_writes(
        &self,
        txn: &mut tikv_client::Transaction,
        plan: &Plan,
    ) -> Result<(), Attempt> {
        if !plan.checks.is_empty() {
            let keys: Vec<Key> = plan
                .checks
                .iter()
                .map(|(k, _)| Key::from(k.clone()))
                .collect();
            let found: HashMap<Vec<u8>, Vec<u8>> = txn
                .batch_get(keys)
                .await
                .map_err(|e| Attempt::from_read("read a transaction's checked keys", e))?
                .map(|pair| {
                    let (key, value): (Key, Vec<u8>) = pair.into();
                    (key.into(), value)
                })
                .collect();
            for (key, check) in &plan.checks {
                let current = found.get(key);
                let (ok, reason) = match check {
                    Check::Absent => (current.is_none(), "key already exists"),
                    Check::Equals(expected) => (current == expected.as_ref(), "value changed"),
                };
                if !ok {
                    return Err(Attempt::Final(StoreError::Conflict {
                        key: display_key(unprefixed(&self.prefix, key).unwrap_or(key)),
                        reason,
                    }));
                }
            }
        }
        let buffer = |e| Attempt::Final(backend("buffer a transaction's writes", e));
        if !plan.locks.is_empty() {
            txn.lock_keys(plan.locks.iter().cloned().map(Key::from))
                .await
                .map_err(buffer)?;
        }
        for (key, write) in &plan.writes {
            let key = Key::from(key.clone());
            match write {
                Write::Put(value) => txn.put(key, value.clone()).await,
                Write::Insert(value) => txn.insert(key, value.clone()).await,
                Write::Delete => txn.delete(key).await,
            }
            .map_err(buffer)?;
        }
        Ok(())
    }
}

/// What a commit must check and write, in stored keys: built from the [`Transaction`] with
/// the embedded store's semantics (every check against the state before the transaction;
/// writes in order, the last write to a key wins).
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    checks: Vec<(Vec<u8>, Check)>,
    /// Expected keys the transaction does not write: locked so that a concurrent write to
    /// them fails our prewrite.
    locks: Vec<Vec<u8>>,
    writes: BTreeMap<Vec<u8>, Write>,
}

#[derive(Debug, PartialEq, Eq)]
enum Check {
    Absent,
    Equals(Option<Vec<u8>>),
}

#[derive(Debug, PartialEq, Eq)]
enum Write {
    Put(Vec<u8>),
    /// A put-if-absent that is the key's last write: TiKV's `insert`, refused at prewrite if
    /// the key exists by then.
    Insert(Vec<u8>),
    Delete,
}

impl Plan {
    fn of(prefix: &[u8], txn: Transaction) -> Plan {
        let mut checks = Vec::new();
        let mut writes = BTreeMap::new();
        for op in txn.ops {
            match op {
                Op::Put { key, value } => {
                    writes.insert(prefixed(prefix, &key), Write::Put(value));
                }
                Op::Delete { key } => {
                    writes.insert(prefixed(prefix, &key), Write::Delete);
                }
                Op::PutIfAbsent { key, value } => {
                    let key = prefixed(prefix, &key);
                    checks.push((key.clone(), Check::Absent));
                    writes.insert(key, Write::Insert(value));
                }
                Op::Expect { key, value } => {
                    checks.push((prefixed(prefix, &key), Check::Equals(value)));
                }
            }
        }
        let mut locks: Vec<Vec<u8>> = checks
            .iter()
            .map(|(key, _)| key.clone())
            .filter(|key| !writes.contains_key(key))
            .collect();
        locks.sort();
        locks.dedup();
        Plan {
            checks,
            locks,
            writes,
        }
    }
}

/// How one commit attempt failed.
enum Attempt {
    /// Transient, and nothing could have been written: the whole attempt may run again.
    Again {
        action: &'static str,
        error: TikvError,
    },
    Final(StoreError),
}

impl Attempt {
    fn from_read(action: &'static str, error: TikvError) -> Attempt {
        if is_transient(&error) {
            Attempt::Again { action, error }
        } else {
            Attempt::Final(backend(action, error))
        }
    }
}

const UNDETERMINED: &str = "commit a transaction (outcome unknown: it may or may not have applied)";

/// Exponential backoff with full jitter: a random pause in [d/2, d], d = base * 2^(n-1).
fn backoff(attempt: u32) -> Duration {
    let exp = BASE_BACKOFF.saturating_mul(1 << attempt.saturating_sub(1).min(16));
    let d = exp.min(MAX_BACKOFF);
    d / 2 + d.mul_f64(fastrand::f64() / 2.0)
}

/// Runs an idempotent step, retrying transient errors with backoff, [`ATTEMPTS`] in all.
async fn retried<T, F, Fut>(action: &'static str, mut step: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, TikvError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match step().await {
            Ok(value) => return Ok(value),
            Err(e) if attempt < ATTEMPTS && is_transient(&e) => {
                tracing::warn!(action, attempt, error = %e, "tikv request failed, retrying");
                tokio::time::sleep(backoff(attempt)).await;
            }
            Err(e) => return Err(backend(action, e)),
        }
    }
}

/// Errors worth another try of an idempotent step: the network, a region that moved or
/// lost its leader, a lock that could not be resolved yet. (The client already retries
/// region errors and resolves locks with its own backoff; these got past that.)
fn is_transient(error: &TikvError) -> bool {
    match error {
        TikvError::Grpc(_)
        | TikvError::GrpcAPI(_)
        | TikvError::Io(_)
        | TikvError::RegionError(_)
        | TikvError::LeaderNotFound { .. }
        | TikvError::RegionForKeyNotFound { .. }
        | TikvError::RegionForRangeNotFound { .. }
        | TikvError::RegionNotFoundInResponse { .. }
        | TikvError::EntryNotFoundInRegionCache
        | TikvError::NoCurrentRegions
        | TikvError::ResolveLockError(_) => true,
        TikvError::KeyError(key_error) => key_error.locked.is_some(),
        TikvError::ExtractedErrors(errors) | TikvError::MultipleKeyErrors(errors) => {
            !errors.is_empty() && errors.iter().all(is_transient)
        }
        _ => false,
    }
}

fn backend(action: &'static str, error: TikvError) -> StoreError {
    StoreError::Backend {
        action,
        message: error.to_string(),
    }
}

/// The conflict inside a commit error, if there is one: a write conflict or an existing key
/// found at prewrite, anywhere in the (possibly nested) errors.
fn conflict_in(prefix: &[u8], error: &TikvError) -> Option<StoreError> {
    let conflict = |key: &[u8], reason| StoreError::Conflict {
        key: display_key(unprefixed(prefix, key).unwrap_or(key)),
        reason,
    };
    match error {
        TikvError::KeyError(e) => {
            if let Some(c) = &e.conflict {
                Some(conflict(&c.key, "written by a concurrent transaction"))
            } else if let Some(a) = &e.already_exist {
                Some(conflict(&a.key, "key already exists"))
            } else if !e.retryable.is_empty() {
                Some(conflict(
                    b"",
                    "the cluster asked for the transaction to be retried",
                ))
            } else {
                None
            }
        }
        TikvError::DuplicateKeyInsertion => Some(conflict(b"", "key already exists")),
        TikvError::ExtractedErrors(errors) | TikvError::MultipleKeyErrors(errors) => {
            errors.iter().find_map(|e| conflict_in(prefix, e))
        }
        TikvError::PessimisticLockError { inner, .. } => conflict_in(prefix, inner),
        _ => None,
    }
}

fn commit_error(prefix: &[u8], error: TikvError) -> StoreError {
    if let TikvError::UndeterminedError(inner) = &error {
        return StoreError::Backend {
            action: UNDETERMINED,
            message: inner.to_string(),
        };
    }
    conflict_in(prefix, &error).unwrap_or_else(|| backend("commit a transaction", error))
}

#[async_trait]
impl KvStore for TikvStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.key(key);
        retried("read a key", || async {
            self.snapshot().await?.get(key.clone()).await
        })
        .await
    }

    async fn batch_get(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let stored: Vec<Key> = keys.iter().map(|k| self.key(k)).collect();
        let mut found: HashMap<Vec<u8>, Vec<u8>> = retried("read keys", || async {
            let pairs = self.snapshot().await?.batch_get(stored.clone()).await?;
            Ok(pairs
                .map(|pair| {
                    let (key, value): (Key, Vec<u8>) = pair.into();
                    (key.into(), value)
                })
                .collect())
        })
        .await?;
        Ok(keys
            .iter()
            .map(|k| found.remove(&prefixed(&self.prefix, k)))
            .collect())
    }

    async fn scan(
        &self,
        range: KeyRange,
        limit: usize,
        order: Order,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        if limit > Self::MAX_SCAN_LIMIT {
            return Err(StoreError::InvalidRequest(format!(
                "scan limit {limit} is over the maximum of {}",
                Self::MAX_SCAN_LIMIT
            )));
        }
        let (start, end) = prefixed_range(&self.prefix, &range);
        if limit == 0 || end.as_ref().is_some_and(|end| start >= *end) {
            return Ok(Vec::new());
        }
        let bound: BoundRange = (Key::from(start), end.map(Key::from)).into();
        // limit <= MAX_SCAN_LIMIT, which fits in u32.
        let limit32 = limit as u32;
        let pairs: Vec<(Key, Vec<u8>)> = retried("scan a range", || async {
            let mut snapshot = self.snapshot().await?;
            let pairs: Vec<(Key, Vec<u8>)> = match order {
                Order::Ascending => snapshot
                    .scan(bound.clone(), limit32)
                    .await?
                    .map(Into::into)
                    .collect(),
                Order::Descending => snapshot
                    .scan_reverse(bound.clone(), limit32)
                    .await?
                    .map(Into::into)
                    .collect(),
            };
            Ok(pairs)
        })
        .await?;
        let mut out = pairs
            .into_iter()
            .map(|(key, value)| Ok((self.strip(key)?, value)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        // The client merges per-region answers; order and the limit are ours to guarantee.
        match order {
            Order::Ascending => out.sort_unstable_by(|a, b| a.0.cmp(&b.0)),
            Order::Descending => out.sort_unstable_by(|a, b| b.0.cmp(&a.0)),
        }
        out.truncate(limit);
        Ok(out)
    }

    async fn commit(&self, txn: Transaction) -> Result<(), StoreError> {
        if txn.is_empty() {
            return Ok(());
        }
        let plan = Plan::of(&self.prefix, txn);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_commit(&plan).await {
                Ok(()) => return Ok(()),
                Err(Attempt::Final(error)) => return Err(error),
                Err(Attempt::Again { action, error }) if attempt < ATTEMPTS => {
                    tracing::warn!(action, attempt, error = %error, "tikv request failed, retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(Attempt::Again { action, error }) => return Err(backend(action, error)),
            }
        }
    }

    /// Does not purge, and says so in the log. A delete on TiKV writes a tombstone version;
    /// the old value stays readable by snapshots older than the delete until the cluster's
    /// GC safepoint passes it (its GC life time, 10 minutes by default, if a GC worker such
    /// as TiDB's or `tikv-ctl`-driven GC advances it), and stays in RocksDB files until
    /// compaction after that. The safepoint is cluster-wide: advancing it from here
    /// (tikv-client's `gc`) would cut short snapshot reads of every deployment sharing the
    /// cluster, and would still not force compaction. So this returns `Ok` once it has
    /// logged that, and ARCHITECTURE.md tells the operator to keep the GC life time short
    /// if shredding must take effect in the cluster's files within a bound.
    async fn purge_deleted(&self) -> Result<(), StoreError> {
        tracing::warn!(
            "purge on tikv: deleted values stay in the cluster until its gc safepoint passes \
             them and compaction runs; nothing was rewritten"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_checks_before_state_and_keeps_each_keys_last_write() {
        let mut txn = Transaction::new();
        txn.expect(b"hd".to_vec(), Some(b"1".to_vec()))
            .put(b"hd".to_vec(), b"2".to_vec())
            .expect(b"mb".to_vec(), None)
            .put_if_absent(b"ev".to_vec(), b"e".to_vec())
            .put(b"x".to_vec(), b"1".to_vec())
            .delete(b"x".to_vec());
        let plan = Plan::of(b"p/", txn);
        assert_eq!(
            plan.checks,
            vec![
                (b"p/hd".to_vec(), Check::Equals(Some(b"1".to_vec()))),
                (b"p/mb".to_vec(), Check::Equals(None)),
                (b"p/ev".to_vec(), Check::Absent),
            ]
        );
        // Written keys are checked at prewrite by their own mutation; only `mb` needs a lock.
        assert_eq!(plan.locks, vec![b"p/mb".to_vec()]);
        let writes: Vec<_> = plan.writes.into_iter().collect();
        assert_eq!(
            writes,
            vec![
                (b"p/ev".to_vec(), Write::Insert(b"e".to_vec())),
                (b"p/hd".to_vec(), Write::Put(b"2".to_vec())),
                (b"p/x".to_vec(), Write::Delete),
            ]
        );
    }

    #[test]
    fn write_conflicts_and_existing_keys_are_conflicts_without_the_prefix() {
        let mut key_error = tikv_client::ProtoKeyError {
            conflict: Some(Default::default()),
            ..Default::default()
        };
        if let Some(c) = key_error.conflict.as_mut() {
            c.key = b"p/hd\0acme".to_vec();
        }
        let nested = TikvError::ExtractedErrors(vec![TikvError::KeyError(Box::new(key_error))]);
        match commit_error(b"p/", nested) {
            StoreError::Conflict { key, .. } => assert_eq!(key, "hd/acme"),
            other => panic!("expected a conflict, got {other:?}"),
        }
        let exists = tikv_client::ProtoKeyError {
            already_exist: Some(Default::default()),
            ..Default::default()
        };
        assert!(matches!(
            commit_error(b"p/", TikvError::KeyError(Box::new(exists))),
            StoreError::Conflict {
                reason: "key already exists",
                ..
            }
        ));
        let undetermined =
            TikvError::UndeterminedError(Box::new(TikvError::StringError("timeout".into())));
        assert!(matches!(
            commit_error(b"p/", undetermined),
            StoreError::Backend {
                action: UNDETERMINED,
                ..
            }
        ));
        assert!(matches!(
            commit_error(b"p/", TikvError::StringError("boom".into())),
            StoreError::Backend {
                action: "commit a transaction",
                ..
            }
        ));
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for attempt in 1..10 {
            let d = BASE_BACKOFF
                .saturating_mul(1 << (attempt - 1))
                .min(MAX_BACKOFF);
            let got = backoff(attempt);
            assert!(got >= d / 2 && got <= d, "{attempt}: {got:?}");
        }
        assert!(backoff(40) <= MAX_BACKOFF);
    }
}
