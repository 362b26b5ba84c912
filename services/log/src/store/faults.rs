//! A `KvStore` that wraps another and fails on demand: how tests (and an operator rehearsing
//! an outage) make the store unreachable, refuse commits, or panic a commit, without a flag
//! inside any backend. It adds behaviour by wrapping, as object_store's layers do.
//!
//! The fault is read from a small control file, polled every [`POLL`]: its first word is one
//! of the [`Fault`] names (`ok`, `unavailable`, `commit-unavailable`, `panic-on-commit`). A
//! missing or empty file means `ok`; an unknown word is logged once and treated as `ok`.
//! The server wraps its store in one only when the debug setting `store.faults_file` names
//! a file; nothing else enables it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tracing::warn;

use super::{KeyRange, KvStore, Order, Pairs, StoreError, Transaction};

/// How often the control file is read.
pub const POLL: Duration = Duration::from_millis(50);

/// What the wrapper does to the calls it passes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Every call goes through.
    Ok = 0,
    /// Every call fails as an unreachable cluster does (retryable).
    Unavailable = 1,
    /// Reads go through; commits fail as unreachable (retryable).
    CommitUnavailable = 2,
    /// Commits panic (a bug in the store's client, say); reads go through.
    PanicOnCommit = 3,
}

impl Fault {
    /// The fault a control file's text names; `None` for an unknown word.
    pub fn parse(text: &str) -> Option<Fault> {
        match text.split_whitespace().next().unwrap_or("ok") {
            "ok" => Some(Fault::Ok),
            "unavailable" => Some(Fault::Unavailable),
            "commit-unavailable" => Some(Fault::CommitUnavailable),
            "panic-on-commit" => Some(Fault::PanicOnCommit),
            _ => None,
        }
    }

    fn from_u8(v: u8) -> Fault {
        match v {
            1 => Fault::Unavailable,
            2 => Fault::CommitUnavailable,
            3 => Fault::PanicOnCommit,
            _ => Fault::Ok,
        }
    }
}

/// The switch a [`FaultyStore`] reads on every call; set directly (in-process tests) or by
/// [`FaultSwitch::watch`] from a control file.
#[derive(Debug, Default)]
pub struct FaultSwitch(AtomicU8);

impl FaultSwitch {
    pub fn set(&self, fault: Fault) {
        self.0.store(fault as u8, Ordering::SeqCst);
    }

    pub fn get(&self) -> Fault {
        Fault::from_u8(self.0.load(Ordering::SeqCst))
    }

    /// Follows `path` every [`POLL`] until the switch is dropped everywhere else. The task
    /// holds only a weak reference, so it ends with the store it drives.
    pub fn watch(self: &Arc<Self>, path: PathBuf) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut warned = String::new();
            loop {
                let Some(switch) = weak.upgrade() else { return };
                let text = read_control(&path).await;
                match Fault::parse(&text) {
                    Some(fault) => {
                        if fault != switch.get() {
                            warn!(?fault, file = %path.display(), "store fault injection");
                        }
                        switch.set(fault);
                    }
                    None if warned != text => {
                        warn!(file = %path.display(), text = %text.trim(), "unknown store fault; ignored");
                        warned = text;
                    }
                    None => {}
                }
                drop(switch);
                tokio::time::sleep(POLL).await;
            }
        })
    }
}

async fn read_control(path: &Path) -> String {
    tokio::fs::read_to_string(path).await.unwrap_or_default()
}

/// Wraps a store and applies the fault its switch names.
pub struct FaultyStore {
    inner: Arc<dyn KvStore>,
    switch: Arc<FaultSwitch>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn KvStore>, switch: Arc<FaultSwitch>) -> FaultyStore {
        FaultyStore { inner, switch }
    }

    fn check_read(&self) -> Result<(), StoreError> {
        match self.switch.get() {
            Fault::Unavailable => Err(unreachable()),
            _ => Ok(()),
        }
    }

    fn check_commit(&self) -> Result<(), StoreError> {
        match self.switch.get() {
            Fault::Ok => Ok(()),
            Fault::Unavailable | Fault::CommitUnavailable => Err(unreachable()),
            Fault::PanicOnCommit => panic!("injected store fault: panic-on-commit"),
        }
    }
}

fn unreachable() -> StoreError {
    StoreError::Unreachable {
        what: "the store",
        endpoints: "(fault injection)".into(),
        attempts: 1,
        message: "injected outage".into(),
    }
}

#[async_trait]
impl KvStore for FaultyStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.check_read()?;
        self.inner.get(key).await
    }

    async fn batch_get(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.check_read()?;
        self.inner.batch_get(keys).await
    }

    async fn scan(
        &self,
        range: KeyRange,
        limit: usize,
        order: Order,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.check_read()?;
        self.inner.scan(range, limit, order).await
    }

    async fn scan_each(
        &self,
        ranges: Vec<KeyRange>,
        limit: usize,
        order: Order,
    ) -> Result<Vec<Pairs>, StoreError> {
        self.check_read()?;
        self.inner.scan_each(ranges, limit, order).await
    }

    async fn commit(&self, txn: Transaction) -> Result<(), StoreError> {
        self.check_commit()?;
        self.inner.commit(txn).await
    }

    async fn purge_deleted(&self) -> Result<(), StoreError> {
        self.check_commit()?;
        self.inner.purge_deleted().await
    }

    fn single_process(&self) -> bool {
        self.inner.single_process()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FjallStore;

    #[test]
    fn control_words_parse() {
        assert_eq!(Fault::parse(""), Some(Fault::Ok));
        assert_eq!(Fault::parse("ok\n"), Some(Fault::Ok));
        assert_eq!(Fault::parse("unavailable"), Some(Fault::Unavailable));
        assert_eq!(
            Fault::parse(" commit-unavailable "),
            Some(Fault::CommitUnavailable)
        );
        assert_eq!(Fault::parse("panic-on-commit"), Some(Fault::PanicOnCommit));
        assert_eq!(Fault::parse("unavailble"), None);
    }

    #[tokio::test]
    async fn faults_apply_and_clear() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner: Arc<dyn KvStore> = Arc::new(FjallStore::open(dir.path()).expect("open store"));
        let switch = Arc::new(FaultSwitch::default());
        let store = FaultyStore::new(inner, switch.clone());
        let mut txn = Transaction::new();
        txn.put(b"k".to_vec(), b"v".to_vec());
        store.commit(txn.clone()).await.expect("commit");

        switch.set(Fault::CommitUnavailable);
        assert_eq!(store.get(b"k").await.expect("get"), Some(b"v".to_vec()));
        let err = store.commit(txn.clone()).await.expect_err("commit refused");
        assert!(err.is_retryable(), "{err}");

        switch.set(Fault::Unavailable);
        assert!(
            store
                .get(b"k")
                .await
                .expect_err("get refused")
                .is_retryable()
        );

        switch.set(Fault::Ok);
        assert_eq!(store.get(b"k").await.expect("get"), Some(b"v".to_vec()));
    }

    #[tokio::test]
    async fn the_control_file_drives_the_switch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("faults");
        let switch = Arc::new(FaultSwitch::default());
        let _watch = switch.watch(file.clone());
        std::fs::write(&file, "unavailable\n").expect("write control");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while switch.get() != Fault::Unavailable {
            assert!(tokio::time::Instant::now() < deadline, "never saw the file");
            tokio::time::sleep(POLL).await;
        }
        std::fs::remove_file(&file).expect("remove control");
        while switch.get() != Fault::Ok {
            assert!(tokio::time::Instant::now() < deadline, "never saw it go");
            tokio::time::sleep(POLL).await;
        }
    }
}
