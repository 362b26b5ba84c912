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
//!
//! [`KvStore::purge_deleted`] is the one place that reaches below fjall's documented API;
//! see [`Inner::purge_deleted`] for what it does and why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable, Snapshot};

use super::{KeyRange, KvStore, Op, Order, Pairs, StoreError, Transaction};

#[derive(Clone)]
pub struct FjallStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    data: Keyspace,
    path: PathBuf,
    commit_lock: Mutex<()>,
    /// Held shared by every read and commit while its snapshot is open, exclusively by
    /// `purge_deleted`: compaction drops an old version only if no open snapshot can still
    /// see it, so a purge must run with none open.
    purge_gate: RwLock<()>,
}

/// fjall 3.1 rotates its journal only when a flush finds the active journal over this many
/// bytes (`worker_pool.rs`, `journal_writer.pos()? > 64_000_000`); it has no call to rotate
/// it on demand.
const JOURNAL_ROTATION_BYTES: usize = 64_000_000;

/// A key no caller uses (every key of the log starts with two ASCII letters), holding the
/// filler that pushes the journal over [`JOURNAL_ROTATION_BYTES`] during a purge.
const PURGE_FILLER_KEY: &[u8] = b"\xff\0purge-filler";

/// Longest a purge waits for fjall's workers to delete the files it made obsolete.
const PURGE_TIMEOUT: Duration = Duration::from_secs(60);

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
                purge_gate: RwLock::new(()),
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
    /// Shared hold on the purge gate for one read or commit. A poisoned gate only means a
    /// purge panicked; the data is intact.
    fn reading(&self) -> RwLockReadGuard<'_, ()> {
        self.purge_gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the latest committed value. Under the commit lock this is also the latest
    /// value, as no batch is being applied.
    fn get(&self, snapshot: &Snapshot, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(snapshot
            .get(&self.data, key)
            .map_err(backend("read a key"))?
            .map(|v| v.to_vec()))
    }

    /// Up to `limit` pairs of `range` in `order`, as of `snapshot`.
    fn scan(
        &self,
        snapshot: &Snapshot,
        range: KeyRange,
        limit: usize,
        order: Order,
    ) -> Result<Pairs, StoreError> {
        let KeyRange { start, end } = range;
        let iter = if end.is_empty() {
            snapshot.range(&self.data, start..)
        } else {
            snapshot.range(&self.data, start..end)
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
    }

    fn commit(&self, txn: Transaction) -> Result<(), StoreError> {
        // A poisoned lock only means another commit panicked; the store itself is intact
        // because that commit's batch was never written.
        let _guard = self
            .commit_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let _reading = self.reading();
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

    /// Rewrites the store so that no file holds a deleted or overwritten value.
    ///
    /// A deleted value lives on in three places: the memtable (until flushed), older tables
    /// (until a compaction drops it), and the journal (until the journal file is deleted,
    /// which fjall does only after rotating it and flushing everything it covers). fjall 3.1
    /// documents none of the calls needed; it has public but doc-hidden ones for the first
    /// two (`rotate_memtable_and_wait`, `major_compact`) and nothing for the journal, which
    /// it rotates only when a flush finds it over 64,000,000 bytes (a `flush_all` that would
    /// do this is proposed upstream, fjall PR #315, unreleased). So:
    ///
    /// 1. with no commit and no open snapshot (the commit lock and the purge gate), flush the
    ///    memtable and major-compact: every table is rewritten without the versions no
    ///    snapshot can see;
    /// 2. write an incompressible filler value of 64,000,001 bytes and delete it, then flush:
    ///    the flush worker finds the journal over its threshold, rotates it, flushes, and
    ///    deletes the old journal; the rotation also lets go of the pre-compaction tables,
    ///    whose files are deleted; the filler itself is dropped at the flush (its delete is
    ///    already visible to every snapshot);
    /// 3. wait until every journal and table file that existed before is gone, and fail
    ///    if one is not: a purge never reports success it did not achieve, even if a later
    ///    fjall changes these internals.
    ///
    /// What this cannot reach: blocks of deleted files that the filesystem or the disk has
    /// not reused yet, and copies of the directory elsewhere (backups, snapshots).
    fn purge_deleted(&self) -> Result<(), StoreError> {
        let _commits = self
            .commit_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let _no_snapshots = self.purge_gate.write().unwrap_or_else(|p| p.into_inner());
        let before = self.value_files()?;

        self.data
            .rotate_memtable_and_wait()
            .map_err(backend("flush the memtable"))?;
        self.data
            .major_compact()
            .map_err(backend("compact the store"))?;

        let mut filler = vec![0u8; JOURNAL_ROTATION_BYTES + 1];
        fastrand::Rng::new().fill(&mut filler);
        for write in [Some(filler), None] {
            let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
            match write {
                Some(value) => batch.insert(&self.data, PURGE_FILLER_KEY, value),
                None => batch.remove(&self.data, PURGE_FILLER_KEY),
            }
            batch.commit().map_err(backend("write the purge filler"))?;
        }
        self.data
            .rotate_memtable_and_wait()
            .map_err(backend("flush the memtable"))?;

        let deadline = Instant::now() + PURGE_TIMEOUT;
        loop {
            let left: Vec<&PathBuf> = before.iter().filter(|p| p.exists()).collect();
            let Some(first) = left.first() else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(StoreError::Backend {
                    action: "purge deleted values",
                    message: format!(
                        "{} file(s) that may hold deleted values are still there after {}s, \
                         e.g. {}",
                        left.len(),
                        PURGE_TIMEOUT.as_secs(),
                        first.display()
                    ),
                });
            }
            #[allow(clippy::disallowed_methods)] // runs on the blocking pool (`Store::blocking`)
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The files that can hold values: the journals (`*.jnl` at the top of the directory)
    /// and the data keyspace's tables and blob files.
    fn value_files(&self) -> Result<Vec<PathBuf>, StoreError> {
        let io = |source| StoreError::Io {
            action: "list the store's files",
            source: Arc::new(source),
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.path).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().is_some_and(|e| e == "jnl") {
                files.push(path);
            }
        }
        for dir in ["tables", "blobs"] {
            let dir = self.data.path().join(dir);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                files.push(entry.map_err(io)?.path());
            }
        }
        Ok(files)
    }
}

#[async_trait]
impl KvStore for FjallStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_vec();
        self.blocking(move |s| {
            let _reading = s.reading();
            s.get(&s.db.snapshot(), &key)
        })
        .await
    }

    async fn batch_get(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        // One snapshot for all keys: the answers are consistent with each other.
        self.blocking(move |s| {
            let _reading = s.reading();
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
            let _reading = s.reading();
            s.scan(&s.db.snapshot(), range, limit, order)
        })
        .await
    }

    async fn scan_each(
        &self,
        ranges: Vec<KeyRange>,
        limit: usize,
        order: Order,
    ) -> Result<Vec<Pairs>, StoreError> {
        if limit.saturating_mul(ranges.len()) > Self::MAX_SCAN_LIMIT {
            return Err(StoreError::InvalidRequest(format!(
                "{} scans of {limit} are over the maximum of {} pairs",
                ranges.len(),
                Self::MAX_SCAN_LIMIT
            )));
        }
        // One snapshot for all ranges: the answers are consistent with each other.
        self.blocking(move |s| {
            let _reading = s.reading();
            let snapshot = s.db.snapshot();
            ranges
                .into_iter()
                .map(|range| s.scan(&snapshot, range, limit, order))
                .collect()
        })
        .await
    }

    async fn commit(&self, txn: Transaction) -> Result<(), StoreError> {
        if txn.is_empty() {
            return Ok(());
        }
        self.blocking(move |s| s.commit(txn)).await
    }

    async fn purge_deleted(&self) -> Result<(), StoreError> {
        self.blocking(|s| s.purge_deleted()).await
    }

    /// fjall locks the directory: no other process can have it open.
    fn single_process(&self) -> bool {
        true
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

    /// Files under `dir` whose bytes contain `needle`.
    fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
        let mut hits = Vec::new();
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                hits.extend(files_containing(&path, needle));
            } else if std::fs::read(&path)
                .expect("read")
                .windows(needle.len())
                .any(|w| w == needle)
            {
                hits.push(path);
            }
        }
        hits
    }

    fn random_value() -> Vec<u8> {
        let mut v = vec![0u8; 48];
        getrandom::fill(&mut v).expect("os randomness");
        v
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purge_leaves_no_deleted_value_in_any_file_and_keeps_live_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (deleted, overwritten, live) = (random_value(), random_value(), random_value());
        {
            let store = FjallStore::open(dir.path()).expect("open");
            let mut txn = Transaction::new();
            txn.put(b"gone".to_vec(), deleted.clone())
                .put(b"changed".to_vec(), overwritten.clone())
                .put(b"kept".to_vec(), live.clone());
            store.commit(txn).await.expect("commit");
            // Some of it in tables, some only in the journal and memtable.
            store.inner.data.rotate_memtable_and_wait().expect("flush");
            let mut txn = Transaction::new();
            txn.delete(b"gone".to_vec())
                .put(b"changed".to_vec(), b"new".to_vec());
            store.commit(txn).await.expect("commit");
            for needle in [&deleted, &overwritten, &live] {
                assert!(!files_containing(dir.path(), needle).is_empty());
            }

            store.purge_deleted().await.expect("purge");
            for needle in [&deleted, &overwritten] {
                let left = files_containing(dir.path(), needle);
                assert!(left.is_empty(), "still in {left:?}");
            }
            assert!(!files_containing(dir.path(), &live).is_empty());
            assert_eq!(store.get(b"gone").await.expect("get"), None);
            assert_eq!(store.get(b"kept").await.expect("get"), Some(live.clone()));
            // The store keeps working.
            let mut txn = Transaction::new();
            txn.put(b"after".to_vec(), b"x".to_vec());
            store.commit(txn).await.expect("commit after purge");
        }
        let store = FjallStore::open(dir.path()).expect("reopen");
        assert_eq!(store.get(b"gone").await.expect("get"), None);
        assert_eq!(
            store.get(b"changed").await.expect("get"),
            Some(b"new".to_vec())
        );
        assert_eq!(store.get(b"kept").await.expect("get"), Some(live.clone()));
        assert_eq!(store.get(b"after").await.expect("get"), Some(b"x".to_vec()));
        for needle in [&deleted, &overwritten] {
            assert!(files_containing(dir.path(), needle).is_empty());
        }
    }
}
