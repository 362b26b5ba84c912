//! The compliance layer against the embedded store on real disk: the audit log's integrity
//! checks, "no record, no read", and concurrent audit writers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tidings_archive::archiver::ArchiveConfig;
use tidings_archive::compliance::audit::{self, Entry};
use tidings_archive::compliance::{
    Action, Actor, Compliance, ComplianceError, Hit, Progress, Query, Sink, Via,
};
use tidings_archive::conformance::{Fixture, t};
use tidings_archive::{Objects, StorageConfig};
use tidings_log::keys;
use tidings_log::store::{KeyRange, KvStore, Op, Order, StoreError, Transaction};

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = Objects::open(&StorageConfig::Local {
        root: dir.path().join("archive"),
    })
    .expect("objects");
    // The fixture keeps its own temp dir for the store; the archive dir lives as long as
    // the test process's temp directory does.
    std::mem::forget(dir);
    Fixture::new(objects, ArchiveConfig::default()).await
}

fn service(f: &Fixture, store: Arc<dyn KvStore>) -> Compliance {
    Compliance::new(
        store,
        f.log.keyring().clone(),
        Some(f.objects.clone()),
        Arc::default(),
    )
}

fn entry(n: u64) -> Entry {
    let actor = Actor::new("officer-7", Via::Cli).expect("actor");
    let mut e = Entry::new(&actor, "search", "completed");
    e.rows = n;
    e
}

async fn problems(f: &Fixture) -> Vec<String> {
    audit::read(&*f.store, f.log.keyring(), &t("acme"))
        .await
        .expect("read")
        .problems
}

async fn put(f: &Fixture, key: Vec<u8>, value: Option<Vec<u8>>) {
    let mut txn = Transaction::new();
    match value {
        Some(v) => txn.put(key, v),
        None => txn.delete(key),
    };
    f.store.commit(txn).await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_reports_a_changed_moved_deleted_or_cut_record() {
    let f = fixture().await;
    let c = service(&f, f.store.clone());
    let acme = t("acme");
    for n in 1..=5 {
        assert_eq!(c.record(&acme, &entry(n)).await.expect("record"), n);
    }
    let listing = audit::read(&*f.store, f.log.keyring(), &acme)
        .await
        .expect("read");
    assert!(listing.problems.is_empty(), "{:?}", listing.problems);
    let rows: Vec<u64> = listing.records.iter().map(|r| r.rows).collect();
    assert_eq!(rows, [1, 2, 3, 4, 5]);
    let original: Vec<Vec<u8>> = {
        let mut v = Vec::new();
        for seq in 1..=5 {
            v.push(
                f.store
                    .get(&keys::audit(&acme, seq))
                    .await
                    .expect("get")
                    .expect("record"),
            );
        }
        v
    };

    // A changed byte.
    let mut changed = original[2].clone();
    changed[10] ^= 1;
    put(&f, keys::audit(&acme, 3), Some(changed)).await;
    let p = problems(&f).await;
    assert!(
        p.iter()
            .any(|p| p.starts_with("record 3: fails authentication")),
        "{p:?}"
    );
    put(&f, keys::audit(&acme, 3), Some(original[2].clone())).await;
    assert!(problems(&f).await.is_empty());

    // A record moved to another position (valid bytes, wrong place).
    put(&f, keys::audit(&acme, 3), Some(original[3].clone())).await;
    let p = problems(&f).await;
    assert!(
        p.iter()
            .any(|p| p.starts_with("record 3: fails authentication")),
        "{p:?}"
    );
    put(&f, keys::audit(&acme, 3), Some(original[2].clone())).await;

    // A record deleted from the middle.
    put(&f, keys::audit(&acme, 2), None).await;
    let p = problems(&f).await;
    assert!(p.contains(&"records 2..3 are missing".to_string()), "{p:?}");
    assert!(
        p.iter().any(|p| p.contains("record 3 does not follow")),
        "{p:?}"
    );
    put(&f, keys::audit(&acme, 2), Some(original[1].clone())).await;
    assert!(problems(&f).await.is_empty());

    // The newest record deleted: the head still names it.
    put(&f, keys::audit(&acme, 5), None).await;
    let p = problems(&f).await;
    assert_eq!(p, ["the audit head names record 5 but the log ends at 4"]);
    put(&f, keys::audit(&acme, 5), Some(original[4].clone())).await;
    assert!(problems(&f).await.is_empty());

    // Another tenant's log is its own.
    assert!(
        audit::read(&*f.store, f.log.keyring(), &t("globex"))
            .await
            .expect("read")
            .records
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_keep_the_audit_log_contiguous_and_chained() {
    let f = fixture().await;
    let c = Arc::new(service(&f, f.store.clone()));
    let acme = t("acme");
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let (c, acme) = (c.clone(), acme.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                c.record(&acme, &entry(w * 100 + i)).await.expect("record");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let listing = audit::read(&*f.store, f.log.keyring(), &acme)
        .await
        .expect("read");
    assert!(listing.problems.is_empty(), "{:?}", listing.problems);
    let seqs: Vec<u64> = listing.records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
    let mut rows: Vec<u64> = listing.records.iter().map(|r| r.rows).collect();
    rows.sort_unstable();
    let mut expected: Vec<u64> = (0..4)
        .flat_map(|w| (0..25).map(move |i| w * 100 + i))
        .collect();
    expected.sort_unstable();
    assert_eq!(rows, expected, "every record once");
}

/// A store whose commits fail while `fail_audit` is set and the transaction writes the
/// audit head: the audit log cannot be written.
struct NoAudit {
    inner: Arc<dyn KvStore>,
    fail_audit: AtomicBool,
}

#[async_trait::async_trait]
impl KvStore for NoAudit {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }
    async fn batch_get(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.inner.batch_get(keys).await
    }
    async fn scan(
        &self,
        range: KeyRange,
        limit: usize,
        order: Order,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.inner.scan(range, limit, order).await
    }
    async fn commit(&self, txn: Transaction) -> Result<(), StoreError> {
        let audit = txn.ops.iter().any(|op| match op {
            Op::Put { key, .. } | Op::PutIfAbsent { key, .. } => key.starts_with(b"ah\0"),
            _ => false,
        });
        if audit && self.fail_audit.load(Ordering::SeqCst) {
            return Err(StoreError::Backend {
                action: "commit",
                message: "injected: the disk is full".into(),
            });
        }
        self.inner.commit(txn).await
    }
    async fn purge_deleted(&self) -> Result<(), StoreError> {
        self.inner.purge_deleted().await
    }
}

#[derive(Default)]
struct Collect(Vec<Hit>);

#[async_trait::async_trait]
impl Sink for Collect {
    async fn hit(&mut self, hit: Hit) -> Result<(), ComplianceError> {
        self.0.push(hit);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_audit_record_no_read() {
    let f = fixture().await;
    f.conversation("acme", "general", 10).await;
    let store = Arc::new(NoAudit {
        inner: f.store.clone(),
        fail_audit: AtomicBool::new(true),
    });
    let c = service(&f, store.clone());
    let query = Query::for_tenant(t("acme"));
    let actor = Actor::new("officer-7", Via::Cli).expect("actor");
    let progress = Progress::default();
    let mut sink = Collect::default();
    let err = c
        .search(&query, &actor, &Action::Search, &progress, &mut sink)
        .await
        .expect_err("a search that cannot be recorded must not run");
    assert_eq!(err.code(), "store_error", "{err}");
    assert!(err.to_string().contains("the disk is full"), "{err}");
    assert!(sink.0.is_empty(), "nothing was handed out");
    assert_eq!(
        progress.opened.load(Ordering::Relaxed),
        0,
        "nothing was decrypted"
    );

    store.fail_audit.store(false, Ordering::SeqCst);
    let n = c
        .search(&query, &actor, &Action::Search, &progress, &mut sink)
        .await
        .expect("search");
    assert_eq!(n, 11);
    assert_eq!(sink.0.len(), 11);
}
