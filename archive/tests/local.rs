//! The archive on the local filesystem: the conformance suite, and faults only a local
//! directory can stage.

use tidings_archive::archiver::{ArchiveConfig, PassOptions};
use tidings_archive::conformance::{Fixture, t};
use tidings_archive::{ArchiveError, Objects, StorageConfig};

async fn local() -> Option<(Objects, tempfile::TempDir)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = Objects::open(&StorageConfig::Local {
        root: dir.path().join("archive"),
    })
    .expect("objects");
    Some((objects, dir))
}

tidings_archive::archive_conformance_suite!(local());

/// An object store that cannot be written fails the pass with a clear error, and nothing
/// leaves the hot log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_store_fails_the_pass_and_keeps_hot_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("archive");
    let objects = Objects::open(&StorageConfig::Local { root: root.clone() }).expect("objects");
    let f = Fixture::new(objects, ArchiveConfig::default()).await;
    f.conversation("acme", "c", 20).await;
    // Replace the tenant's partition directory with a file: every write under it fails
    // (whatever the user's permissions, root included).
    std::fs::write(root.join("tenant=acme"), b"not a directory").expect("write");
    let err = f
        .archiver
        .run_pass(
            &PassOptions {
                older_than_ms: Some(0),
                ..PassOptions::default()
            },
            &|_| {},
        )
        .await
        .expect_err("pass must fail");
    assert!(matches!(err, ArchiveError::ObjectStore(_)), "{err:?}");
    assert_eq!(f.hot_events("acme", "c").await, 21);
    assert_eq!(f.read_all("acme", "c").await.len(), 21);
    assert!(f.segment_paths("acme").await.is_empty());
}

/// Without a cold tier, reading archived seqs is a typed error, not a silent short page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_reads_without_an_archive_are_refused() {
    use std::sync::Arc;
    use tidings_log::store::{FjallStore, KvStore};
    use tidings_log::{Log, LogConfig, ReadRange, crypto::MasterKey};

    let (objects, dir) = local().await.expect("local");
    let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(&dir.path().join("kv")).expect("kv"));
    let log = Log::open(store.clone(), MasterKey::generate(), LogConfig::default())
        .await
        .expect("log");
    let archiver = tidings_archive::Archiver::new(
        store,
        log.keyring().clone(),
        objects,
        ArchiveConfig::default(),
    )
    .expect("archiver");
    log.create_conversation(tidings_log::CreateConversation {
        tenant: t("acme"),
        conv: tidings_archive::conformance::c("c"),
        kind: "group".into(),
        title: "c".into(),
        creator: tidings_log::UserId::new("alice").expect("id"),
        members: vec![],
    })
    .await
    .expect("create");
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    let summary = archiver
        .run_pass(
            &PassOptions {
                older_than_ms: Some(0),
                ..PassOptions::default()
            },
            &|_| {},
        )
        .await
        .expect("pass");
    assert_eq!(summary.events_archived, 1);
    let err = log
        .read(
            &t("acme"),
            &tidings_archive::conformance::c("c"),
            ReadRange::forward(1, 10),
        )
        .await
        .expect_err("no archive configured");
    assert_eq!(err.code(), "archive_unavailable");
    assert!(err.to_string().contains("no archive configured"), "{err}");
}

/// A conversation with more aged events than one segment holds is archived in several
/// segments, each flush resuming above the last; reads stay whole across them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_conversations_span_several_segments() {
    let (objects, _dir) = local().await.expect("local");
    let cfg = ArchiveConfig {
        segment_max_events: 50,
        row_group_events: 16,
        ..ArchiveConfig::default()
    };
    let f = Fixture::new(objects, cfg).await;
    f.conversation("acme", "big", 229).await;
    f.conversation("acme", "small", 9).await;
    let before = f.read_all("acme", "big").await;
    let summary = f.archive_all().await;
    assert_eq!(summary.events_archived, 240);
    // Segments fill to exactly 50: big's 230 events make four of 50, and its last 30 share
    // the fifth with small's 10.
    assert_eq!(summary.segments, 5, "{summary:?}");
    let mut rows: Vec<u64> = Vec::new();
    for (_, value) in tidings_archive::archiver::scan_all(
        &*f.store,
        tidings_log::store::KeyRange::prefix(tidings_log::keys::segment_dir(&t("acme"))),
    )
    .await
    .expect("segments")
    {
        let record: tidings_schemas::storage::ArchiveSegment =
            prost::Message::decode(value.as_slice()).expect("record");
        rows.push(record.rows);
    }
    rows.sort_unstable();
    assert_eq!(rows, [40, 50, 50, 50, 50]);
    assert_eq!(f.hot_events("acme", "big").await, 0);
    assert_eq!(f.read_all("acme", "big").await, before);
    assert_eq!(f.read_all("acme", "small").await.len(), 10);
    let report = tidings_archive::tools::verify(&*f.store, f.log.keyring(), &f.objects, &t("acme"))
        .await
        .expect("verify");
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.rows, 240);
}
