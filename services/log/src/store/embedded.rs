//! The embedded backend: fjall, an LSM tree with a write-ahead journal.
//!
//! Transactions take one process-wide commit lock, evaluate their checks against the
//! current state and write one fjall batch with `PersistMode::SyncAll`: the journal is
//! fsync'd before `commit` returns. The lock serialises check-then-write (fjall's own batches
//! do no checks); the log already funnels writes through its group-committing sequencer, so
//! the lock is taken once per group, not per message. fjall's batches publish all their
//! writes at one sequence number once all are applied; every read here goes through a
//! snapshot, so readers never see half a transaction. (fjall's plain `Keyspace::get` reads
//! the newest version, including items of a batch still being applied: a reader could see a
//! new head before the events it covers. The log's read-racing-appends test caught exactly
//! that before reads moved to snapshots.)

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable, Snapshot};

use super::{KeyRange, KvStore, Op, Order, StoreError, Transaction};

#[derive(Clone)]
pub struct FjallStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    data: Keyspace,
    path: PathBuf,
    commit_lock: Mutex<()>,
}

fn backend(action: &'static str) -> impl FnOnce(fjall::Error) -> StoreError {
    move |e| match e {
        fjall::Error::Io(source) => StoreError::Io {
            action,
            source: Arc::new(source),
        },
        other => StoreError::Backend {
            action,
            message: other.to_string(),
        },
    }
}

impl FjallStore {
    /// Longest scan served in one call; callers page for more.
    pub const MAX_SCAN_LIMIT: usize = 100_000;

    /// Opens (creating if needed) the store in `path`. Fails with [`StoreError::Locked`] if
    /// another process has it open.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path).map_err(|source| StoreError::Io {
            action: "create the data directory",
            source: Arc::new(source),
        })?;
        let db = Database::builder(path).open().map_err(|e| match e {
            fjall::Error::Locked => StoreError::Locked {
                path: path.display().to_string(),
            },
            other => backend("open the store")(other),
        })?;
        let data = db
            .keyspace("data", KeyspaceCreateOptions::default)
            .map_err(backend("open the data keyspace"))?;
        Ok(FjallStore {
            inner: Arc::new(Inner {
                db,
                data,
                path: path.to_path_buf(),
                commit_lock: Mutex::new(()),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs blocking fjall work off the async runtime's worker threads.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Backend {
                action: "run a store task",
                message: e.to_string(),
            })?
    }
}

impl Inner {
    /// Reads the latest committed value. Under the commit lock this is also the latest
    /// value, as no batch is being applied.
    fn get(&self, snapshot: &Snapshot, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(snapshot
            .get(&self.data, key)
            .map_err(backend("read a key"))?
            .map(|v| v.to_vec()))
    }

    fn commit(&self, txn: Transaction) -> Result<(), StoreError> {
        // A poisoned lock only means another commit panicked; the store itself is intact
        // because that commit's batch was never written.
        let _guard = self
            .commit_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let snapshot = self.db.snapshot();
        for op in &txn.ops {
            match op {
                Op::PutIfAbsent { key, .. } => {
                    if self.get(&snapshot, key)?.is_some() {
                        return Err(StoreError::Conflict {
                            key: crate::keys::display_key(key),
                            reason: "key already exists",
                        });
                    }
                }
                Op::Expect { key, value } => {
                    if self.get(&snapshot, key)?.as_ref() != value.as_ref() {
                        return Err(StoreError::Conflict {
                            key: crate::keys::display_key(key),
                            reason: "value changed",
                        });
                    }
                }
                Op::Put { .. } | Op::Delete { .. } => {}
            }
        }
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        for op in txn.ops {
            match op {
                Op::Put { key, value } | Op::PutIfAbsent { key, value } => {
                    batch.insert(&self.data, key, value)
                }
                Op::Delete { key } => batch.remove(&self.data, key),
                Op::Expect { .. } => {}
            }
        }
        batch.commit().map_err(backend("commit a transaction"))
    }
}

#[async_trait]
impl KvStore for FjallStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_vec();
        self.blocking(move |s| s.get(&s.db.snapshot(), &key)).await
    }

    async fn batch_get(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        // One snapshot for all keys: the answers are consistent with each other.
        self.blocking(move |s| {
            let snapshot = s.db.snapshot();
            keys.iter().map(|k| s.get(&snapshot, k)).collect()
        })
        .await
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
        self.blocking(move |s| {
            let KeyRange { start, end } = range;
            let snapshot = s.db.snapshot();
            let iter = if end.is_empty() {
                snapshot.range(&s.data, start..)
            } else {
                snapshot.range(&s.data, start..end)
            };
            let collect = |guard: fjall::Guard| {
                guard
                    .into_inner()
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(backend("scan a range"))
            };
            match order {
                Order::Ascending => iter.take(limit).map(collect).collect(),
                Order::Descending => iter.rev().take(limit).map(collect).collect(),
            }
        })
        .await
    }

    async fn commit(&self, txn: Transaction) -> Result<(), StoreError> {
        if txn.is_empty() {
            return Ok(());
        }
        self.blocking(move |s| s.commit(txn)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::kv_conformance_suite!(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FjallStore::open(dir.path()).expect("open");
        (store, dir)
    });

    #[test]
    fn a_second_open_of_the_same_directory_is_refused_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = FjallStore::open(dir.path()).expect("open");
        let err = FjallStore::open(dir.path())
            .err()
            .expect("second open must fail");
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        assert!(err.to_string().contains("in use by another process"));
    }

    #[tokio::test]
    async fn committed_writes_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = FjallStore::open(dir.path()).expect("open");
            let mut txn = Transaction::new();
            txn.put(b"k".to_vec(), b"v".to_vec());
            store.commit(txn).await.expect("commit");
        }
        let store = FjallStore::open(dir.path()).expect("reopen");
        assert_eq!(store.get(b"k").await.expect("get"), Some(b"v".to_vec()));
    }
}
