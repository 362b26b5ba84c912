//! The sealed search index of archived segments, against the embedded store and a local
//! archive on real disk: compliance search gives the same results with and without it while
//! opening fewer rows, in any script; the index holds no plaintext; a segment without an
//! index is scanned; retention deletes the index with its segment; a shredded tenant's index
//! answers nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tidings_archive::archiver::{ArchiveConfig, Archiver, PassOptions, TenantPolicy};
use tidings_archive::compliance::{
    Action, Actor, Compliance, ComplianceError, Hit, Progress, Query, Sink, Via,
};
use tidings_archive::conformance::{Fixture, c, t};
use tidings_archive::{Objects, StorageConfig, storage};
use tidings_log::cold::ColdTier;
use tidings_log::search::Needle;
use tidings_log::{Append, Body, ClientMsgId, UserId};

#[derive(Default)]
struct Collect(Vec<Hit>);

#[async_trait::async_trait]
impl Sink for Collect {
    async fn hit(&mut self, hit: Hit) -> Result<(), ComplianceError> {
        self.0.push(hit);
        Ok(())
    }
}

/// What a hit says, compared across the two ways of searching.
type Found = Vec<(String, u64, Option<&'static str>, usize, bool)>;

async fn search(c: &Compliance, text: &str) -> (Found, u64) {
    let query = Query {
        text: Some(text.to_string()),
        ..Query::for_tenant(t("acme"))
    };
    let actor = Actor::new("officer-7", Via::Cli).expect("actor");
    let progress = Progress::default();
    let mut sink = Collect::default();
    c.search(&query, &actor, &Action::Search, &progress, &mut sink)
        .await
        .expect("search");
    let found = sink
        .0
        .iter()
        .map(|h| {
            let fate = h.fate.clone().unwrap_or_default();
            (
                h.event.conversation.clone(),
                h.event.seq,
                h.matched,
                fate.edits.len(),
                fate.recall.is_some(),
            )
        })
        .collect();
    (found, progress.opened.load(Ordering::Relaxed))
}

async fn send(f: &Fixture, conv: &str, id: &str, body: Body) -> u64 {
    let mut req = Append::text(
        t("acme"),
        c(conv),
        UserId::new("alice").expect("id"),
        ClientMsgId::new(id).expect("id"),
        String::new(),
    );
    req.body = body;
    f.log.append(req).await.expect("append").seq
}

async fn edit(f: &Fixture, conv: &str, id: &str, target_seq: u64, text: &str) -> u64 {
    let body = Body::MessageEdited(tidings_schemas::v1::MessageEdited {
        target_seq,
        new_text: text.into(),
    });
    send(f, conv, id, body).await
}

async fn recall(f: &Fixture, conv: &str, id: &str, target_seq: u64) -> u64 {
    let body = Body::MessageRecalled(tidings_schemas::v1::MessageRecalled { target_seq });
    send(f, conv, id, body).await
}

async fn post(f: &Fixture, conv: &str, id: &str, text: &str) -> u64 {
    let req = Append::text(
        t("acme"),
        c(conv),
        UserId::new("alice").expect("id"),
        ClientMsgId::new(id).expect("id"),
        text.to_string(),
    );
    f.log.append(req).await.expect("append").seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_gives_the_scans_results_opening_fewer_rows_and_holds_no_plaintext() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = Objects::open(&StorageConfig::Local {
        root: dir.path().join("archive"),
    })
    .expect("objects");
    let cfg = ArchiveConfig {
        row_group_events: 50,
        ..ArchiveConfig::default()
    };
    let f = Fixture::new(objects.clone(), cfg.clone()).await;
    // Filler in two conversations, and in another tenant with the same words.
    f.conversation("acme", "general", 240).await;
    f.conversation("acme", "random", 120).await;
    f.conversation("globex", "general", 60).await;
    let en1 = post(&f, "general", "en-1", "The Bluebird FORECAST is final").await;
    let en2 = post(&f, "general", "en-2", "a forecaster is not a forecast").await;
    post(&f, "random", "zh-1", "新品发布会在三点").await;
    post(&f, "random", "ja-1", "明日の会議は３時から").await;
    post(&f, "random", "ko-1", "회의 시작합니다").await;
    post(&f, "random", "mix-1", "新 iPhone 发布会 tomorrow").await;
    let edited = post(&f, "general", "ed-1", "draft numbers").await;
    edit(&f, "general", "ed-2", edited, "final numbers: ＳＥＶＥＮ").await;
    let recalled = post(&f, "general", "rc-1", "bluebird leak, please ignore").await;
    recall(&f, "general", "rc-2", recalled).await;
    f.archive_all().await;
    // A user's search asks the cold reader: the segments' indexes name exactly the seqs
    // whose text holds every term, within the range asked.
    let candidates = |query: &str, from: u64, to: u64| {
        let needle = Needle::new(query).expect("query");
        let reader = f.reader.clone();
        async move {
            let mut found = reader
                .search_candidates(&t("acme"), &[(c("general"), from..=to)], &needle)
                .await
                .expect("candidates");
            found.pop().expect("one answer per range asked")
        }
    };
    assert_eq!(
        candidates("bluebird", 1, recalled).await,
        [en1..=en1, recalled..=recalled]
    );
    assert_eq!(candidates("forecast", 1, recalled).await, [en1..=en2]);
    assert_eq!(candidates("forecast", en2, recalled).await, [en2..=en2]);
    assert_eq!(candidates("kingfisher", 1, recalled).await, []);
    // A hot tail: a new conversation (its title is text too), an edit, a recall, all
    // covered by the hot index; then events above its watermark, one an edit of a message
    // below it.
    // More hot events than compliance opens without asking the postings (256).
    f.conversation("acme", "hotline", 300).await;
    let hot = post(&f, "general", "hot-1", "hot bluebird forecast").await;
    edit(
        &f,
        "general",
        "hot-2",
        hot,
        "hot bluebird forecast, revised: kingfisher",
    )
    .await;
    let rumour = post(&f, "general", "hot-3", "hot bluebird rumour").await;
    let recall = recall(&f, "general", "hot-4", rumour).await;
    // Their heads: general's recall, hotline's creation and 300 messages.
    for (conv, head) in [("general", recall), ("hotline", 301)] {
        let n = f
            .log
            .index_conversation(&t("acme"), &c(conv), head)
            .await
            .expect("index");
        assert!(n > 0, "{conv}");
    }
    let tail = post(&f, "general", "tail-1", "tail bluebird").await;
    edit(
        &f,
        "general",
        "tail-2",
        hot,
        "hot bluebird forecast, revised again: osprey",
    )
    .await;

    let indexed = Compliance::new(
        f.store.clone(),
        f.log.keyring().clone(),
        Some(objects.clone()),
        Arc::default(),
    );
    let scanning = Compliance::new(
        f.store.clone(),
        f.log.keyring().clone(),
        Some(objects.clone()),
        Arc::default(),
    )
    .without_index();

    let expected: BTreeMap<&str, usize> = [
        ("bluebird", 5),   // en-1, the recalled one, hot-1, hot-3 (recalled), tail-1
        ("kingfisher", 1), // hot-1 by its edit below the watermark
        ("osprey", 1),     // hot-1 by its edit above it
        ("FORECAST", 3),   // en-1, en-2 (its last word) and hot-1
        ("cast", 0),       // part of a word
        ("seven", 1),      // the edit, full-width in the text
        ("quarterly numbers", 660),
        ("hotline", 301), // its title and its messages, all hot
        ("发布", 2),
        ("布", 2),
        ("iphone 发布会", 1),
        ("会議", 1),
        ("회의", 1),
        ("random message 7", 1),
    ]
    .into_iter()
    .collect();
    for (query, n) in &expected {
        let (with, opened_with) = search(&indexed, query).await;
        let (without, opened_without) = search(&scanning, query).await;
        assert_eq!(with, without, "{query}: the index changed the results");
        assert_eq!(with.len(), *n, "{query}: {with:?}");
        if *n < 10 {
            assert!(
                opened_with * 4 < opened_without,
                "{query}: opened {opened_with} with the index, {opened_without} without"
            );
        }
    }
    // As many terms as a query may have, here CJK bigrams (each of the hotline's posting
    // pages asks them all): read in as few round trips as one scan's limit allows, never
    // refused.
    let most: String = (0..=tidings_log::search::MAX_QUERY_TERMS as u32)
        .filter_map(|i| char::from_u32(0x4E00 + i))
        .collect();
    assert_eq!(search(&indexed, &most).await.0, Vec::new());
    let (bluebird, _) = search(&indexed, "bluebird").await;
    assert!(
        bluebird.iter().any(|h| h.1 == recalled && h.4),
        "recall travels"
    );
    assert!(
        bluebird.iter().any(|h| h.1 == rumour && h.4),
        "a hot recall travels through the hot index"
    );
    assert!(bluebird.iter().any(|h| h.1 == tail));
    let (osprey, _) = search(&indexed, "osprey").await;
    assert_eq!(
        osprey,
        [("general".to_string(), hot, Some("edit"), 2, false)],
        "both edits travel with the message"
    );
    let (seven, _) = search(&indexed, "seven").await;
    assert_eq!(
        seven[0].1, edited,
        "an archived message found by its archived edit"
    );
    assert_eq!(seven[0].2, Some("edit"));

    // The index objects hold no word of any text.
    let paths = f.segment_paths("acme").await;
    assert!(!paths.is_empty());
    for path in &paths {
        let index = storage::search_index_path(path).expect("segment path");
        let bytes = objects
            .search_indexes()
            .get(&index)
            .await
            .expect("every segment has an index");
        for marker in [
            "bluebird",
            "forecast",
            "quarterly",
            "发布",
            "会議",
            "회의",
            "draft",
        ] {
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
                "{index} holds {marker:?}"
            );
        }
    }

    let report = tidings_archive::tools::verify(&*f.store, f.log.keyring(), &objects, &t("acme"))
        .await
        .expect("verify");
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.search_indexes, paths.len() as u64);

    // A changed byte is an error, never a silently shorter answer.
    let first = storage::search_index_path(&paths[0]).expect("path");
    let indexes = objects.search_indexes();
    let original = indexes.get(&first).await.expect("index");
    let mut damaged = original.to_vec();
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    indexes.put(&first, damaged.into()).await.expect("put");
    let query = Query {
        text: Some("bluebird".into()),
        ..Query::for_tenant(t("acme"))
    };
    let actor = Actor::new("officer-7", Via::Cli).expect("actor");
    let err = indexed
        .search(
            &query,
            &actor,
            &Action::Search,
            &Progress::default(),
            &mut Collect::default(),
        )
        .await
        .expect_err("a damaged index");
    assert_eq!(err.code(), "segment_corrupt", "{err}");
    let report = tidings_archive::tools::verify(&*f.store, f.log.keyring(), &objects, &t("acme"))
        .await
        .expect("verify");
    assert!(!report.ok(), "verify must see the damaged index");

    // A segment without an index (written before indexes existed) is scanned instead.
    indexes.delete(&first).await.expect("delete");
    assert_eq!(
        search(&indexed, "bluebird").await.0,
        search(&scanning, "bluebird").await.0
    );

    // Retention deletes each index with its segment.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let purge = Archiver::new(
        f.store.clone(),
        f.log.keyring().clone(),
        objects.clone(),
        ArchiveConfig {
            tenants: [(
                "acme".to_string(),
                TenantPolicy {
                    retention_ms: Some(1),
                    ..TenantPolicy::default()
                },
            )]
            .into_iter()
            .collect(),
            ..cfg
        },
    )
    .expect("archiver");
    purge
        .run_pass(
            &PassOptions {
                older_than_ms: Some(0),
                ..PassOptions::default()
            },
            &|_| {},
        )
        .await
        .expect("retention pass");
    let left = objects.list("tenant=acme/").await.expect("list");
    assert!(left.is_empty(), "{left:?}");
    let left = indexes.list("tenant=acme/").await.expect("list");
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(search(&indexed, "bluebird").await.0, Vec::new());
    // The other tenant's segments have their own indexes; after its keys are shredded,
    // nothing of it is found.
    let globex = |text: &str| Query {
        text: Some(text.to_string()),
        ..Query::for_tenant(t("globex"))
    };
    let actor = Actor::new("officer-7", Via::Cli).expect("actor");
    let mut sink = Collect::default();
    let n = indexed
        .search(
            &globex("quarterly"),
            &actor,
            &Action::Search,
            &Progress::default(),
            &mut sink,
        )
        .await
        .expect("search globex");
    assert_eq!(n, 60);
    f.log.keyring().shred(&t("globex")).await.expect("shred");
    let mut sink = Collect::default();
    let outcome = indexed
        .search(
            &globex("quarterly"),
            &actor,
            &Action::Search,
            &Progress::default(),
            &mut sink,
        )
        .await;
    assert!(sink.0.is_empty());
    assert!(outcome.is_err(), "{outcome:?}");
}

/// An edit or a recall archived before the hot indexer saw it (here it never runs) still
/// decides what a user's search finds: the archiver records the message's fate with the
/// segment, so the old text of an edited message and a recalled message are not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_and_recalls_archived_before_indexing_still_hide_the_old_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = Objects::open(&StorageConfig::Local {
        root: dir.path().join("archive"),
    })
    .expect("objects");
    let f = Fixture::new(objects, ArchiveConfig::default()).await;
    f.conversation("acme", "general", 3).await;
    let edited = post(&f, "general", "ed-1", "kestrel sighting at noon").await;
    let edit = edit(&f, "general", "ed-2", edited, "osprey sighting at noon").await;
    let recalled = post(&f, "general", "rc-1", "kestrel rumour, osprey too").await;
    recall(&f, "general", "rc-2", recalled).await;
    let kept = post(&f, "general", "ok-1", "a kestrel, for real").await;
    f.archive_all().await;
    assert_eq!(f.hot_events("acme", "general").await, 0, "all archived");

    let alice = UserId::new("alice").expect("id");
    let found = |query: &'static str| {
        let (log, alice) = (&f.log, &alice);
        async move {
            let page = log
                .search(&t("acme"), alice, query, "", 20)
                .await
                .expect("search");
            page.hits
                .iter()
                .map(|h| (h.seq, h.text_seq))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        found("kestrel").await,
        [(kept, kept)],
        "old text and recalled"
    );
    assert_eq!(found("osprey").await, [(edited, edit)], "by its edit only");
}
