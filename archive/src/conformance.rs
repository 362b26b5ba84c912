//! The archive conformance suite: what every object store backend must do for the archive.
//! Run it with [`archive_conformance_suite!`](crate::archive_conformance_suite), giving it
//! an async block that returns the [`Objects`] and a guard kept alive for the test (its
//! temporary directory, its server).
//!
//! Each case builds a real log on the embedded store in a temporary directory, archives
//! through the backend and reads back through the log, so what it proves is the whole path.

use std::sync::Arc;

use tidings_log::crypto::MasterKey;
use tidings_log::store::{FjallStore, KeyRange, KvStore, Order};
use tidings_log::{
    Append, ConvId, CreateConversation, Event, Log, LogConfig, LogError, ReadRange, TenantId,
    UserId, keys,
};

use crate::archiver::{ArchiveConfig, Archiver, PassOptions, Summary};
use crate::reader::ColdReader;
use crate::storage::Objects;
use crate::tools;

pub struct Fixture {
    pub log: Log,
    pub store: Arc<dyn KvStore>,
    pub objects: Objects,
    pub archiver: Archiver,
    pub reader: Arc<ColdReader>,
    pub dir: tempfile::TempDir,
}

pub fn t(s: &str) -> TenantId {
    TenantId::new(s).expect("tenant id")
}
pub fn c(s: &str) -> ConvId {
    ConvId::new(s).expect("conv id")
}

impl Fixture {
    pub async fn new(objects: Objects, cfg: ArchiveConfig) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn KvStore> =
            Arc::new(FjallStore::open(&dir.path().join("kv")).expect("store"));
        let log = Log::open(store.clone(), MasterKey::generate(), LogConfig::default())
            .await
            .expect("log");
        let reader = Arc::new(ColdReader::new(
            store.clone(),
            log.keyring().clone(),
            objects.clone(),
            16 << 20,
        ));
        assert!(log.set_cold_tier(reader.clone()));
        let archiver = Archiver::new(store.clone(), log.keyring().clone(), objects.clone(), cfg)
            .expect("archiver");
        Fixture {
            log,
            store,
            objects,
            archiver,
            reader,
            dir,
        }
    }

    /// A group `conv` in `tenant` with `n` messages "`<conv> message <i>`" from alice and bob.
    pub async fn conversation(&self, tenant: &str, conv: &str, n: usize) {
        self.log
            .create_conversation(CreateConversation {
                tenant: t(tenant),
                conv: c(conv),
                kind: "group".into(),
                title: conv.into(),
                creator: UserId::new("alice").expect("id"),
                members: vec![UserId::new("bob").expect("id")],
            })
            .await
            .expect("create");
        for i in 0..n {
            let sender = if i % 2 == 0 { "alice" } else { "bob" };
            let req = Append::text(
                t(tenant),
                c(conv),
                UserId::new(sender).expect("id"),
                tidings_log::ClientMsgId::new(format!("{conv}-m{i}")).expect("id"),
                format!("{conv} message {i} about the quarterly numbers"),
            );
            self.log.append(req).await.expect("append");
        }
    }

    /// Archives everything older than now.
    pub async fn archive_all(&self) -> Summary {
        // Events appended in this very millisecond are "not older than 0s" yet.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        self.archiver
            .run_pass(
                &PassOptions {
                    older_than_ms: Some(0),
                    ..PassOptions::default()
                },
                &|_| {},
            )
            .await
            .expect("archive pass")
    }

    pub async fn read_all(&self, tenant: &str, conv: &str) -> Vec<Event> {
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            let page = self
                .log
                .read(&t(tenant), &c(conv), ReadRange::forward(from, 1000))
                .await
                .expect("read");
            let Some(last) = page.last() else { break };
            from = last.seq + 1;
            out.extend(page);
        }
        out
    }

    pub async fn hot_events(&self, tenant: &str, conv: &str) -> usize {
        self.store
            .scan(
                KeyRange::prefix(keys::event_dir(&t(tenant), &c(conv))),
                100_000,
                Order::Ascending,
            )
            .await
            .expect("scan")
            .len()
    }

    pub async fn segment_paths(&self, tenant: &str) -> Vec<String> {
        tools::inspect(&*self.store, &t(tenant))
            .await
            .expect("inspect")
            .into_iter()
            .map(|s| s.path)
            .collect()
    }
}

fn texts(events: &[Event]) -> Vec<(u64, String)> {
    events
        .iter()
        .map(|e| (e.seq, format!("{:?}", e.body)))
        .collect()
}

/// Everything moves, the log still returns every conversation whole and in order, the hot
/// log holds none of it, and a second pass has nothing to do.
pub async fn archive_moves_everything_and_reads_stay_whole(objects: Objects) {
    let f = Fixture::new(objects, ArchiveConfig::default()).await;
    for i in 0..5 {
        f.conversation("acme", &format!("c{i}"), 40 + i * 7).await;
    }
    let mut before = Vec::new();
    for i in 0..5 {
        before.push(f.read_all("acme", &format!("c{i}")).await);
    }
    let summary = f.archive_all().await;
    let total: usize = before.iter().map(Vec::len).sum();
    assert_eq!(summary.events_archived, total as u64);
    assert_eq!(summary.conversations, 5);
    assert_eq!(summary.segments, 1);
    for (i, events) in before.iter().enumerate() {
        let conv = format!("c{i}");
        assert_eq!(f.hot_events("acme", &conv).await, 0);
        let after = f.read_all("acme", &conv).await;
        assert_eq!(
            after, *events,
            "conversation {conv} reads the same from the archive"
        );
    }
    let again = f.archive_all().await;
    assert_eq!(again.events_archived, 0);
    assert_eq!(again.segments, 0);
    let report = tools::verify(&*f.store, f.log.keyring(), &f.objects, &t("acme"))
        .await
        .expect("verify");
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.rows, total as u64);
    assert_eq!(report.bodies_opened, total as u64);
    assert!(report.orphans.is_empty());
}

/// A conversation half archived (by the per-conversation cap) reads the same as before in
/// every page size and direction, and new appends land after the archived part.
pub async fn pages_cross_the_hot_cold_boundary_whole(objects: Objects) {
    let cfg = ArchiveConfig {
        hot_window_ms: u64::MAX / 4,
        max_hot_events: 25,
        ..ArchiveConfig::default()
    };
    let f = Fixture::new(objects, cfg).await;
    f.conversation("acme", "mixed", 99).await;
    let before = f.read_all("acme", "mixed").await;
    assert_eq!(before.len(), 100);
    let summary = f
        .archiver
        .run_pass(&PassOptions::default(), &|_| {})
        .await
        .expect("pass");
    assert_eq!(summary.events_archived, 75, "all but the newest 25");
    assert_eq!(f.hot_events("acme", "mixed").await, 25);
    for limit in [1, 7, 25, 26, 60, 1000] {
        for start in [1u64, 50, 74, 75, 76, 99, 100] {
            let fwd = f
                .log
                .read(&t("acme"), &c("mixed"), ReadRange::forward(start, limit))
                .await
                .expect("forward");
            let want: Vec<_> = before
                .iter()
                .filter(|e| e.seq >= start)
                .take(limit)
                .cloned()
                .collect();
            assert_eq!(
                texts(&fwd),
                texts(&want),
                "forward from {start} limit {limit}"
            );
            let back = f
                .log
                .read(
                    &t("acme"),
                    &c("mixed"),
                    ReadRange {
                        from: Some(start),
                        limit,
                        order: Order::Descending,
                    },
                )
                .await
                .expect("backward");
            let want: Vec<_> = before
                .iter()
                .rev()
                .filter(|e| e.seq <= start)
                .take(limit)
                .cloned()
                .collect();
            assert_eq!(
                texts(&back),
                texts(&want),
                "backward from {start} limit {limit}"
            );
        }
    }
    let latest = f
        .log
        .read(&t("acme"), &c("mixed"), ReadRange::latest(30))
        .await
        .expect("latest");
    assert_eq!(latest.first().map(|e| e.seq), Some(100));
    assert_eq!(latest.last().map(|e| e.seq), Some(71));
    // The head and seqs go on after the archived part; the dedupe of a hot message holds.
    let committed = f
        .log
        .append(Append::text(
            t("acme"),
            c("mixed"),
            UserId::new("alice").expect("id"),
            tidings_log::ClientMsgId::new("mixed-m98").expect("id"),
            "a retry of the newest message",
        ))
        .await
        .expect("retry");
    assert!(committed.duplicate);
    assert_eq!(committed.seq, 100);
}

/// No message text appears in any object: bodies are sealed, dictionaries too.
pub async fn no_plaintext_in_objects(objects: Objects) {
    let f = Fixture::new(objects, ArchiveConfig::default()).await;
    f.conversation("acme", "secret", 600).await;
    f.archive_all().await;
    let paths = f.segment_paths("acme").await;
    assert!(!paths.is_empty());
    for path in paths {
        let bytes = f.objects.get(&path).await.expect("get");
        for needle in ["quarterly", "message 17 about", "secret message"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{path} contains {needle:?} in plaintext"
            );
        }
    }
}

/// A missing segment and a corrupted one are typed errors on read and verify; nothing else
/// breaks, and the other tenant's history is untouched.
pub async fn missing_and_corrupt_segments_are_typed_errors(objects: Objects) {
    let f = Fixture::new(objects, ArchiveConfig::default()).await;
    f.conversation("acme", "a", 30).await;
    f.conversation("globex", "g", 30).await;
    f.archive_all().await;
    let acme = f.segment_paths("acme").await;
    let path = acme.first().expect("a segment").clone();
    let original = f.objects.get(&path).await.expect("get");

    // Corrupt one byte in the middle (inside the row data).
    let mut bad = original.to_vec();
    let mid = bad.len() / 3;
    bad[mid] ^= 0x5a;
    f.objects.put(&path, bad.into()).await.expect("put");
    let fresh = ColdReader::new(
        f.store.clone(),
        f.log.keyring().clone(),
        f.objects.clone(),
        1 << 20,
    );
    let err = tidings_log::cold::ColdTier::read(&fresh, &t("acme"), &c("a"), 1, 31)
        .await
        .expect_err("corrupt segment");
    assert!(matches!(err, LogError::Corrupt { .. }), "{err:?}");
    let report = tools::verify(&*f.store, f.log.keyring(), &f.objects, &t("acme"))
        .await
        .expect("verify runs");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].problem.contains("SHA-256"));

    // Gone altogether.
    f.objects.delete(&path).await.expect("delete");
    let fresh = ColdReader::new(
        f.store.clone(),
        f.log.keyring().clone(),
        f.objects.clone(),
        1 << 20,
    );
    let err = tidings_log::cold::ColdTier::read(&fresh, &t("acme"), &c("a"), 1, 5)
        .await
        .expect_err("missing segment");
    assert_eq!(err.code(), "archive_unavailable", "{err:?}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("missing"), "{err}");

    // Another tenant's segment put in its place does not open as this tenant's.
    let globex = f.segment_paths("globex").await;
    let theirs = f.objects.get(&globex[0]).await.expect("get");
    f.objects.put(&path, theirs).await.expect("put");
    let err = tidings_log::cold::ColdTier::read(&fresh, &t("acme"), &c("a"), 1, 5)
        .await
        .expect_err("foreign segment");
    assert!(matches!(err, LogError::Corrupt { .. }), "{err:?}");
    assert_eq!(f.read_all("globex", "g").await.len(), 31);
}

#[macro_export]
macro_rules! archive_conformance_suite {
    ($make:expr) => {
        $crate::archive_conformance_suite!(@cases $make;
            archive_moves_everything_and_reads_stay_whole,
            pages_cross_the_hot_cold_boundary_whole,
            no_plaintext_in_objects,
            missing_and_corrupt_segments_are_typed_errors,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some((objects, _guard)) = $make.await else { return };
                    $crate::conformance::$case(objects).await;
                }
            )*
        }
    };
}
