//! The log's guarantees, proven against the embedded store on real disk (fsync and all):
//! the backend-independent suite (`log_suite/`, also run on TiKV by `tests/tikv.rs`) and the
//! cases that need fjall's files (reopening, grepping the directory, a failing wrapper).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use tidings_log::crypto::MasterKey;
use tidings_log::store::{FjallStore, KvStore, Order, StoreError, Transaction};
use tidings_log::{Body, CreateConversation, Log, LogConfig, LogError, ReadRange, keys};

use crate::log_suite::{assert_contiguous, c, group, read_all, t, text, text_of, u, unread_of};

/// The suite on a fresh fjall store in a temporary directory per case.
mod suite {
    use super::*;
    log_suite!(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FjallStore::open(dir.path()).expect("open fjall");
        Ok::<_, String>((Arc::new(store) as Arc<dyn KvStore>, dir))
    });
}

struct Fixture {
    log: Log,
    store: Arc<FjallStore>,
    master_hex: String,
    dir: tempfile::TempDir,
}

async fn open_at(
    dir: &Path,
    master_hex: &str,
    cfg: LogConfig,
) -> Result<(Log, Arc<FjallStore>), LogError> {
    let store = Arc::new(FjallStore::open(dir)?);
    let master = MasterKey::from_hex(master_hex).expect("hex");
    let log = Log::open(store.clone() as Arc<dyn KvStore>, master, cfg).await?;
    Ok((log, store))
}

async fn fixture() -> Fixture {
    fixture_with(LogConfig::default()).await
}

async fn fixture_with(cfg: LogConfig) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let master_hex = MasterKey::generate().to_hex();
    let (log, store) = open_at(dir.path(), &master_hex, cfg)
        .await
        .expect("open log");
    Fixture {
        log,
        store,
        master_hex,
        dir,
    }
}

#[tokio::test]
async fn a_wrong_master_key_is_refused_and_the_right_one_reopens() {
    let f = fixture().await;
    group(&f.log, "acme", "general", "alice", &[]).await;
    f.log
        .append(text("acme", "general", "alice", "m1", "kept"))
        .await
        .expect("append");
    let Fixture {
        log,
        store,
        master_hex,
        dir,
    } = f;
    log.close().await;
    drop(store);
    let wrong = MasterKey::generate().to_hex();
    let err = open_at(dir.path(), &wrong, LogConfig::default())
        .await
        .err()
        .expect("wrong key");
    assert!(matches!(err, LogError::WrongMasterKey), "{err:?}");
    let (log, _store) = open_at(dir.path(), &master_hex, LogConfig::default())
        .await
        .expect("reopen");
    let events = read_all(&log, "acme", "general").await;
    assert_eq!(text_of(&events[1]), "kept");
}

#[tokio::test]
async fn a_corrupted_or_moved_value_is_reported_not_returned() {
    let f = fixture().await;
    let (acme, general) = (t("acme"), c("general"));
    group(&f.log, "acme", "general", "alice", &[]).await;
    for i in 0..3 {
        f.log
            .append(text("acme", "general", "alice", &format!("m{i}"), "secret"))
            .await
            .expect("append");
    }
    // Copy seq 2's sealed bytes over seq 3: same tenant and key, wrong row.
    let two = f
        .store
        .get(&keys::event(&acme, &general, 2))
        .await
        .expect("get")
        .expect("seq 2");
    let mut txn = Transaction::new();
    txn.put(keys::event(&acme, &general, 3), two.clone());
    f.store.commit(txn).await.expect("tamper");
    let err = f
        .log
        .read(&acme, &general, ReadRange::forward(3, 1))
        .await
        .expect_err("moved");
    assert!(matches!(err, LogError::Corrupt { .. }), "{err:?}");
    // Flip one bit of seq 4's ciphertext (the row's message count beside it is a hint for
    // unread counts, not sealed: see docs/decisions/unread-counts.md).
    let four = f
        .store
        .get(&keys::event(&acme, &general, 4))
        .await
        .expect("get")
        .expect("seq 4");
    use prost::Message as _;
    let mut four =
        tidings_schemas::storage::SealedEvent::decode(four.as_slice()).expect("sealed row");
    let last = four.ciphertext.len() - 1;
    four.ciphertext[last] ^= 0x01;
    let mut txn = Transaction::new();
    txn.put(keys::event(&acme, &general, 4), four.encode_to_vec());
    f.store.commit(txn).await.expect("tamper");
    let err = f
        .log
        .read(&acme, &general, ReadRange::forward(4, 1))
        .await
        .expect_err("flipped");
    assert!(matches!(err, LogError::Corrupt { .. }), "{err:?}");
    // The untouched event still reads.
    let two = f
        .log
        .read(&acme, &general, ReadRange::forward(2, 1))
        .await
        .expect("seq 2");
    assert_eq!(text_of(&two[0]), "secret");
    // Garbage written into a head behind the sequencer's back. Its first batch still
    // works from the head it cached, so the commit's head check (the fence) refuses the
    // whole batch; the retry reads the store afresh and reports the corruption.
    let mut txn = Transaction::new();
    txn.put(keys::head(&acme, &general), vec![0xff; 7]);
    f.store.commit(txn).await.expect("tamper");
    let err = f
        .log
        .append(text("acme", "general", "alice", "m9", "x"))
        .await
        .expect_err("fenced");
    assert!(
        matches!(err, LogError::Store(StoreError::Conflict { .. })),
        "{err:?}"
    );
    assert!(err.is_retryable());
    let err = f
        .log
        .append(text("acme", "general", "alice", "m9", "x"))
        .await
        .expect_err("bad head");
    assert!(matches!(err, LogError::Corrupt { .. }), "{err:?}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn no_plaintext_reaches_the_data_directory() {
    let f = fixture().await;
    let marker = "MARKER-7f3a9c-unique-plaintext";
    let title_marker = "TITLE-5d1e22-unique";
    f.log
        .create_conversation(CreateConversation {
            tenant: t("acme"),
            conv: c("general"),
            kind: "group".into(),
            title: title_marker.into(),
            creator: u("alice"),
            members: vec![],
        })
        .await
        .expect("create");
    for i in 0..50 {
        f.log
            .append(text(
                "acme",
                "general",
                "alice",
                &format!("m{i}"),
                &format!("{marker} {i}"),
            ))
            .await
            .expect("append");
    }
    f.log
        .rename(&t("acme"), &c("general"), &u("alice"), title_marker)
        .await
        .expect("rename");
    let Fixture {
        log, store, dir, ..
    } = f;
    log.close().await;
    drop(store);
    for needle in [marker, title_marker] {
        let hits = grep_dir(dir.path(), needle.as_bytes());
        assert!(hits.is_empty(), "{needle} found in {hits:?}");
    }
    // The test can fail: the same search finds the id, which is stored in the clear in keys.
    assert!(!grep_dir(dir.path(), b"general").is_empty());
}

fn grep_dir(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            hits.extend(grep_dir(&path, needle));
        } else {
            let bytes = std::fs::read(&path).expect("read file");
            if bytes.windows(needle.len()).any(|w| w == needle) {
                hits.push(path.display().to_string());
            }
        }
    }
    hits
}

#[tokio::test]
async fn rotated_keys_seal_new_events_and_old_ones_still_open() {
    let f = fixture().await;
    let (acme, general) = (t("acme"), c("general"));
    group(&f.log, "acme", "general", "alice", &[]).await;
    f.log
        .append(text("acme", "general", "alice", "old", "before rotation"))
        .await
        .expect("append");
    assert_eq!(f.log.keyring().rotate(&acme).await.expect("rotate"), 2);
    f.log
        .append(text("acme", "general", "alice", "new", "after rotation"))
        .await
        .expect("append");
    let key_id = |seq| {
        let store = f.store.clone();
        let (acme, general) = (acme.clone(), general.clone());
        async move {
            let raw = store
                .get(&keys::event(&acme, &general, seq))
                .await
                .expect("get")
                .expect("event");
            <tidings_schemas::storage::SealedEvent as prost::Message>::decode(raw.as_slice())
                .expect("decode")
                .key_id
        }
    };
    assert_eq!(key_id(2).await, 1);
    assert_eq!(key_id(3).await, 2);
    let texts: Vec<_> = read_all(&f.log, "acme", "general")
        .await
        .iter()
        .map(|e| text_of(e).to_string())
        .collect();
    assert_eq!(texts, vec!["", "before rotation", "after rotation"]);
}

#[tokio::test]
async fn the_feed_announces_commits_in_order_and_never_holds_appends_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(FjallStore::open(dir.path()).expect("open"));
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let log = Log::open_with_feed(
        store as Arc<dyn KvStore>,
        MasterKey::generate(),
        LogConfig::default(),
        Some(tx),
    )
    .await
    .expect("open");
    group(&log, "acme", "general", "alice", &["bob"]).await;
    log.append(text("acme", "general", "alice", "m1", "one"))
        .await
        .expect("append");
    log.mark_read(&t("acme"), &c("general"), &u("bob"), 2)
        .await
        .expect("mark");
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(rx.recv().await.expect("feed item"));
    }
    match &got[0] {
        tidings_log::FeedItem::Event { event: e, encoded } => {
            assert!(matches!(e.body, Some(Body::ConversationCreated(_))) && e.seq == 1);
            // The bytes the feed carries are the event's, encoded once.
            assert_eq!(&encoded[..], &prost::Message::encode_to_vec(&**e)[..]);
        }
        other => panic!("{other:?}"),
    }
    match &got[1] {
        tidings_log::FeedItem::Event { event: e, .. } => {
            assert_eq!((e.seq, text_of(e)), (2, "one"))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        got[2],
        tidings_log::FeedItem::ReadCursor {
            tenant: t("acme"),
            conv: c("general"),
            user: u("bob"),
            read_seq: 2
        }
    );
    // Nobody reads the feed now: appends still complete, and the overflow is counted.
    for i in 0..10 {
        log.append(text("acme", "general", "alice", &format!("x{i}"), "x"))
            .await
            .expect("append");
    }
    assert_eq!(log.feed_dropped(), 10 - 4);
}

/// A store whose commits can be held at a gate, and fail once on demand.
struct FailOnce {
    inner: FjallStore,
    armed: std::sync::atomic::AtomicBool,
    gate: tokio::sync::RwLock<()>,
}

#[async_trait::async_trait]
impl KvStore for FailOnce {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }
    async fn batch_get(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.inner.batch_get(keys).await
    }
    async fn scan(
        &self,
        range: tidings_log::store::KeyRange,
        limit: usize,
        order: Order,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.inner.scan(range, limit, order).await
    }
    async fn commit(&self, txn: Transaction) -> Result<(), StoreError> {
        let _open = self.gate.read().await;
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Io {
                action: "commit a transaction",
                source: Arc::new(std::io::Error::other("injected failure")),
            });
        }
        self.inner.commit(txn).await
    }
    async fn purge_deleted(&self) -> Result<(), StoreError> {
        self.inner.purge_deleted().await
    }
}

/// A log on a fjall store whose commits wait at `gate` (and fail once when `armed`).
async fn gated_log(cfg: LogConfig) -> (tempfile::TempDir, Arc<FailOnce>, Log) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(FailOnce {
        inner: FjallStore::open(dir.path()).expect("open"),
        armed: std::sync::atomic::AtomicBool::new(false),
        gate: tokio::sync::RwLock::new(()),
    });
    let log = Log::open(
        store.clone() as Arc<dyn KvStore>,
        MasterKey::generate(),
        cfg,
    )
    .await
    .expect("open");
    (dir, store, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_fails_its_batch_and_the_batch_built_on_it_and_retries_heal() {
    let (_dir, store, log) = gated_log(LogConfig {
        max_batch: 50,
        ..LogConfig::default()
    })
    .await;
    group(&log, "acme", "general", "alice", &[]).await;
    // Hold commits: the first batch's commit waits at the gate while the sequencer prepares
    // the next batch on top of it. Then that first commit fails.
    let hold = store.gate.write().await;
    store.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let append = |i: usize| {
        text(
            "acme",
            "general",
            "alice",
            &format!("m{i}"),
            &format!("t{i}"),
        )
    };
    // The first batch is exactly one append: enqueued alone, taken before the others exist.
    let mut pending = vec![log.enqueue(append(0)).await.expect("enqueue")];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while log.queued() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sequencer never took the first batch"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for i in 1..400 {
        pending.push(log.enqueue(append(i)).await.expect("enqueue"));
    }
    // Wait until the sequencer has taken a second batch (of any size, however fast the
    // appends arrived) while the first waits at the gate: once taken, it is built on the
    // first (prepare runs before the first commit is awaited), and nothing more is taken.
    while log.queued() >= 399 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sequencer never took a second batch"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    drop(hold);
    let mut acked = Vec::new();
    let mut failed = Vec::new();
    for (i, p) in pending.into_iter().enumerate() {
        match p.wait().await {
            Ok(c) => acked.push((i, c.seq)),
            Err(e) => {
                assert!(e.is_retryable(), "{e:?}");
                failed.push(i);
            }
        }
    }
    // One commit failed, of one append; more failures mean the batch prepared on top of it
    // (while it was committing) was failed too, as it must be: the first appends, in order.
    assert!(failed.len() > 1, "only {} appends failed", failed.len());
    assert_eq!(failed, (0..failed.len()).collect::<Vec<_>>());
    // Acked appends hold seqs 2.. contiguously, in queue order; nothing failed was written.
    for (n, (_, seq)) in acked.iter().enumerate() {
        assert_eq!(*seq, n as u64 + 2);
    }
    let events = read_all(&log, "acme", "general").await;
    assert_contiguous(&events);
    assert_eq!(events.len(), 1 + acked.len());
    for (i, seq) in &acked {
        assert_eq!(events[(*seq - 1) as usize].client_msg_id, format!("m{i}"));
    }
    // Retrying the failed ones fills in after, with no gap and no duplicate.
    for i in &failed {
        let c = log
            .append(text(
                "acme",
                "general",
                "alice",
                &format!("m{i}"),
                &format!("t{i}"),
            ))
            .await
            .expect("retry");
        assert!(!c.duplicate);
    }
    let events = read_all(&log, "acme", "general").await;
    assert_contiguous(&events);
    assert_eq!(events.len(), 401);
    let ids: HashSet<_> = events[1..]
        .iter()
        .map(|e| e.client_msg_id.clone())
        .collect();
    assert_eq!(ids.len(), 400);
}

/// Every seq of acme/general the hot postings list for `query` in `1..=head`, in `order`,
/// `page` postings per term at a time.
async fn listed(f: &Fixture, query: &str, head: u64, order: Order, page: usize) -> Vec<u64> {
    use tidings_log::hot_index::Postings;
    let needle = tidings_log::search::Needle::new(query).expect("query");
    let terms: Vec<_> = needle.terms().iter().collect();
    let (acme, general) = (t("acme"), c("general"));
    let mut postings = Postings::new(f.log.keyring(), &acme, &terms, 1, head, order)
        .await
        .expect("postings");
    let mut seqs = Vec::new();
    while !postings.done() {
        let (page, bytes) = postings
            .next(&*f.store, &acme, &general, page)
            .await
            .expect("page");
        assert!(bytes > 0);
        seqs.extend(page.into_iter().map(|(seq, _)| seq));
    }
    seqs
}

/// The hot index's postings page in either order, exactly the seqs holding every term, and
/// a watermark of an older index format counts as nothing indexed (it is built again).
#[tokio::test]
async fn hot_postings_page_both_ways_and_an_older_index_format_is_rebuilt() {
    use tidings_log::hot_index::{INDEX_VERSION, Postings, watermark};
    use tidings_log::search::kind_term;
    let f = fixture().await;
    let (acme, general) = (t("acme"), c("general"));
    group(&f.log, "acme", "general", "alice", &[]).await;
    let mut rare = Vec::new();
    for i in 0..40 {
        let body = if i % 3 == 0 {
            "rare heron"
        } else {
            "common heron"
        };
        let seq = f
            .log
            .append(text("acme", "general", "alice", &format!("m{i}"), body))
            .await
            .expect("append")
            .seq;
        if i % 3 == 0 {
            rare.push(seq);
        }
    }
    let head = rare.last().copied().expect("seqs").max(41);
    assert_eq!(
        f.log
            .index_conversation(&acme, &general, head)
            .await
            .expect("index"),
        head
    );
    assert_eq!(
        watermark(&*f.store, &acme, &general).await.expect("wm"),
        head
    );
    for order in [Order::Ascending, Order::Descending] {
        let got = listed(&f, "heron rare", head, order, 4).await;
        let mut want = rare.clone();
        if order == Order::Descending {
            want.reverse();
        }
        assert_eq!(got, want, "{order:?}");
    }
    // No text has a kind's term.
    let edited = kind_term("message_edited");
    let mut none = Postings::new(
        f.log.keyring(),
        &acme,
        &[&edited],
        1,
        head,
        Order::Ascending,
    )
    .await
    .expect("postings");
    assert_eq!(
        none.next(&*f.store, &acme, &general, 4)
            .await
            .expect("page")
            .0,
        []
    );
    // Version 1 stored the seq alone; an unknown version is corrupt.
    let key = keys::search_watermark(&acme, &general);
    let mut txn = Transaction::new();
    txn.put(key.clone(), head.to_be_bytes().to_vec());
    f.store.commit(txn).await.expect("commit");
    assert_eq!(watermark(&*f.store, &acme, &general).await.expect("wm"), 0);
    assert_eq!(
        f.log
            .index_conversation(&acme, &general, head)
            .await
            .expect("index again"),
        head,
        "every hot event indexed again"
    );
    assert_eq!(
        watermark(&*f.store, &acme, &general).await.expect("wm"),
        head
    );
    let mut txn = Transaction::new();
    let mut future = head.to_be_bytes().to_vec();
    future.push(INDEX_VERSION + 1);
    txn.put(key, future);
    f.store.commit(txn).await.expect("commit");
    assert!(watermark(&*f.store, &acme, &general).await.is_err());
}

/// The indexer takes the sequencer's plaintext where its byte-bounded queue holds it and
/// reads the store where it does not: the same postings either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_indexer_gives_the_same_postings_from_the_sequencers_plaintext_or_the_store() {
    use std::sync::atomic::Ordering;
    use tidings_log::hot_index::watermark;
    use tidings_log::hot_indexer::run_indexer;
    let mut found = Vec::new();
    for queue_bytes in [8 << 20, 1] {
        let mut cfg = LogConfig::default();
        cfg.search.indexer_queue_bytes = queue_bytes;
        let f = fixture_with(cfg).await;
        let indexer = tokio::spawn(run_indexer(f.log.downgrade()));
        let (acme, general) = (t("acme"), c("general"));
        group(&f.log, "acme", "general", "alice", &[]).await;
        let mut head = 0;
        for i in 0..30 {
            let body = if i % 4 == 0 {
                "rare egret"
            } else {
                "common egret"
            };
            head = f
                .log
                .append(text("acme", "general", "alice", &format!("m{i}"), body))
                .await
                .expect("append")
                .seq;
        }
        // Waits for the indexer without asserting on time.
        while watermark(&*f.store, &acme, &general).await.expect("wm") < head {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let stats = &f.log.indexer().expect("indexer").stats;
        let dropped = stats.plain_dropped.load(Ordering::Relaxed);
        if queue_bytes == 1 {
            assert_eq!(dropped, 31, "every event read from the store");
        } else {
            assert_eq!(dropped, 0, "every event handed over in the clear");
        }
        found.push(listed(&f, "rare egret", head, Order::Ascending, 100).await);
        f.log.close().await;
        indexer.await.expect("indexer task").expect("indexer");
    }
    assert_eq!(found[0], [2, 6, 10, 14, 18, 22, 26, 30]);
    assert_eq!(found[0], found[1]);
}

/// Sealing is done once per batch, after its commands are applied (on the blocking pool when
/// the batch is large): commands later in the same batch still read its new events — an edit
/// checks the author of a message sent just before it, a read cursor counts its messages —
/// and what is stored opens as what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_sealed_at_once_and_its_later_commands_read_its_new_events() {
    use tidings_schemas::v1::MessageEdited;
    let (_dir, store, log) = gated_log(LogConfig::default()).await;
    group(&log, "acme", "general", "alice", &["bob"]).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let taken = |log: &Log| {
        let log = log.clone();
        async move {
            while log.queued() > 0 {
                assert!(tokio::time::Instant::now() < deadline, "never taken");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    };
    // Commits wait at the gate: batch 1 commits (held), batch 2 is prepared on it and the
    // sequencer waits for batch 1; everything queued after that is one batch.
    let hold = store.gate.write().await;
    let first = log
        .enqueue(text("acme", "general", "alice", "f1", "first"))
        .await
        .expect("enqueue");
    taken(&log).await;
    let second = log
        .enqueue(text("acme", "general", "alice", "f2", "second"))
        .await
        .expect("enqueue");
    taken(&log).await;
    let edit = |sender: &str, id: &str| {
        let mut a = text("acme", "general", sender, id, "");
        a.body = Body::MessageEdited(MessageEdited {
            target_seq: 4,
            new_text: "edited".into(),
        });
        a
    };
    // 48 KiB each: the batch's 20 messages are 960 KiB to seal, past the inline bound.
    let big = "x".repeat(48 * 1024);
    let mut batch = vec![
        log.enqueue(text("acme", "general", "alice", "m", "sent"))
            .await
            .expect("enqueue"), // seq 4
        log.enqueue(edit("bob", "not-his")).await.expect("enqueue"),
        log.enqueue(edit("alice", "hers")).await.expect("enqueue"), // seq 5
    ];
    for i in 0..20 {
        batch.push(
            log.enqueue(text("acme", "general", "alice", &format!("big{i}"), &big))
                .await
                .expect("enqueue"),
        );
    }
    // Bob's read cursor to alice's edit, in the same batch: it reads the edit's row (still
    // unsealed) for the conversation's message count there.
    let cursor = {
        let log = log.clone();
        tokio::spawn(async move { log.mark_read(&t("acme"), &c("general"), &u("bob"), 5).await })
    };
    while log.queued() < 24 {
        assert!(tokio::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let off_runtime_before = log.batches_sealed_off_runtime();
    drop(hold);
    assert_eq!(first.wait().await.expect("first").seq, 2);
    assert_eq!(second.wait().await.expect("second").seq, 3);
    let mut outcomes = Vec::new();
    for p in batch {
        outcomes.push(p.wait().await.map(|c| c.seq));
    }
    assert_eq!(outcomes[0].as_ref().expect("sent"), &4);
    assert!(
        matches!(&outcomes[1], Err(LogError::NotAllowed(_))),
        "bob may not edit alice's message sent in the same batch: {:?}",
        outcomes[1]
    );
    assert_eq!(outcomes[2].as_ref().expect("alice's edit"), &5);
    for (i, o) in outcomes[3..].iter().enumerate() {
        assert_eq!(o.as_ref().expect("big"), &(6 + i as u64));
    }
    assert_eq!(log.batches_sealed_off_runtime(), off_runtime_before + 1);
    assert_eq!(cursor.await.expect("task").expect("mark read"), 5);
    // Messages: alice's 2, 3, 4 and the 20 big ones (the edit is not one); bob has read to
    // 5, so the 20 are unread.
    assert_eq!(unread_of(&log, "acme", "bob", "general").await, 20);
    let events = read_all(&log, "acme", "general").await;
    assert_contiguous(&events);
    assert_eq!(events.len(), 25);
    assert_eq!(text_of(&events[3]), "sent");
    for e in &events[5..] {
        assert_eq!(text_of(e), big);
    }
}
