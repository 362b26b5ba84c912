//! The conformance suite every [`KvStore`] backend runs.
//!
//! Each case works under its own random key prefix, so the suite can run against a shared
//! cluster (TiKV) as well as a fresh embedded store. A backend runs the whole suite with
//! [`kv_conformance_suite!`](crate::kv_conformance_suite), giving it an async block that
//! returns the store and a guard kept alive for the test (e.g. its temporary directory).

use std::sync::Arc;

use super::{KeyRange, KvStore, Order, StoreError, Transaction};

/// A random prefix for one case's keys.
fn namespace() -> Vec<u8> {
    let mut ns = b"conformance\0".to_vec();
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd).expect("os randomness");
    ns.extend_from_slice(&rnd);
    ns.push(0);
    ns
}

fn k(ns: &[u8], suffix: &[u8]) -> Vec<u8> {
    [ns, suffix].concat()
}

async fn put(store: &dyn KvStore, key: Vec<u8>, value: &[u8]) {
    let mut txn = Transaction::new();
    txn.put(key, value.to_vec());
    store.commit(txn).await.expect("commit put");
}

fn assert_conflict(result: Result<(), StoreError>) {
    match result {
        Err(StoreError::Conflict { .. }) => {}
        other => panic!("expected a conflict, got {other:?}"),
    }
}

pub async fn get_of_a_missing_key_is_none(store: Arc<dyn KvStore>) {
    let ns = namespace();
    assert_eq!(store.get(&k(&ns, b"nope")).await.expect("get"), None);
}

pub async fn put_overwrites_and_delete_removes(store: Arc<dyn KvStore>) {
    let ns = namespace();
    put(&*store, k(&ns, b"a"), b"1").await;
    assert_eq!(
        store.get(&k(&ns, b"a")).await.expect("get"),
        Some(b"1".to_vec())
    );
    put(&*store, k(&ns, b"a"), b"2").await;
    assert_eq!(
        store.get(&k(&ns, b"a")).await.expect("get"),
        Some(b"2".to_vec())
    );
    let mut txn = Transaction::new();
    txn.delete(k(&ns, b"a"));
    store.commit(txn).await.expect("delete");
    assert_eq!(store.get(&k(&ns, b"a")).await.expect("get"), None);
}

pub async fn batch_get_answers_in_key_order_given(store: Arc<dyn KvStore>) {
    let ns = namespace();
    put(&*store, k(&ns, b"x"), b"X").await;
    put(&*store, k(&ns, b"z"), b"Z").await;
    let got = store
        .batch_get(vec![k(&ns, b"z"), k(&ns, b"y"), k(&ns, b"x")])
        .await
        .expect("batch_get");
    assert_eq!(got, vec![Some(b"Z".to_vec()), None, Some(b"X".to_vec())]);
}

pub async fn scan_each_answers_each_range_in_the_order_given(store: Arc<dyn KvStore>) {
    let ns = namespace();
    let mut txn = Transaction::new();
    for s in [b"a1", b"a2", b"a3", b"c1"] {
        txn.put(k(&ns, s), s.to_vec());
    }
    store.commit(txn).await.expect("commit");
    let range = |p: &[u8]| KeyRange::prefix(k(&ns, p));
    let got = store
        .scan_each(
            vec![range(b"c"), range(b"b"), range(b"a")],
            2,
            Order::Descending,
        )
        .await
        .expect("scan_each");
    let keys: Vec<Vec<Vec<u8>>> = got
        .into_iter()
        .map(|pairs| pairs.into_iter().map(|(key, _)| key).collect())
        .collect();
    assert_eq!(
        keys,
        vec![
            vec![k(&ns, b"c1")],
            vec![],
            vec![k(&ns, b"a3"), k(&ns, b"a2")]
        ]
    );
}

pub async fn scan_is_ordered_bounded_and_limited_both_ways(store: Arc<dyn KvStore>) {
    let ns = namespace();
    // Binary suffixes, including 0x00 and 0xff, must sort bytewise.
    let suffixes: [&[u8]; 5] = [b"\x00", b"a", b"a\x00", b"b", b"\xff"];
    let mut txn = Transaction::new();
    for s in suffixes {
        txn.put(k(&ns, s), s.to_vec());
    }
    store.commit(txn).await.expect("commit");

    let all = KeyRange::prefix(ns.clone());
    let asc = store
        .scan(all.clone(), 100, Order::Ascending)
        .await
        .expect("scan");
    let asc_keys: Vec<_> = asc.iter().map(|(key, _)| key.clone()).collect();
    let expected: Vec<_> = suffixes.iter().map(|s| k(&ns, s)).collect();
    assert_eq!(asc_keys, expected);
    assert!(asc.iter().all(|(key, v)| key.ends_with(v)));

    let desc = store
        .scan(all.clone(), 2, Order::Descending)
        .await
        .expect("scan");
    let desc_keys: Vec<_> = desc.into_iter().map(|(key, _)| key).collect();
    assert_eq!(desc_keys, vec![k(&ns, b"\xff"), k(&ns, b"b")]);

    // Start is inclusive, end exclusive.
    let mid = KeyRange {
        start: k(&ns, b"a"),
        end: k(&ns, b"b"),
    };
    let got: Vec<_> = store
        .scan(mid.clone(), 100, Order::Ascending)
        .await
        .expect("scan")
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(got, vec![k(&ns, b"a"), k(&ns, b"a\x00")]);
    let got_rev: Vec<_> = store
        .scan(mid, 100, Order::Descending)
        .await
        .expect("scan")
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(got_rev, vec![k(&ns, b"a\x00"), k(&ns, b"a")]);

    assert!(
        store
            .scan(all, 0, Order::Ascending)
            .await
            .expect("scan")
            .is_empty()
    );
}

pub async fn scan_never_leaves_its_prefix(store: Arc<dyn KvStore>) {
    let ns = namespace();
    let inner = k(&ns, b"p");
    let mut txn = Transaction::new();
    txn.put(k(&ns, b"o\xff"), b"before".to_vec())
        .put(k(&ns, b"p"), b"in".to_vec())
        .put(k(&ns, b"p\xff\xff"), b"in".to_vec())
        .put(k(&ns, b"q"), b"after".to_vec());
    store.commit(txn).await.expect("commit");
    for order in [Order::Ascending, Order::Descending] {
        let got = store
            .scan(KeyRange::prefix(inner.clone()), 100, order)
            .await
            .expect("scan");
        assert_eq!(got.len(), 2, "{order:?}");
        assert!(got.iter().all(|(_, v)| v == b"in"), "{order:?}");
    }
}

pub async fn put_if_absent_conflict_writes_nothing(store: Arc<dyn KvStore>) {
    let ns = namespace();
    let mut first = Transaction::new();
    first.put_if_absent(k(&ns, b"once"), b"first".to_vec());
    store.commit(first).await.expect("first insert");

    let mut second = Transaction::new();
    second
        .put(k(&ns, b"other"), b"should not land".to_vec())
        .put_if_absent(k(&ns, b"once"), b"second".to_vec());
    assert_conflict(store.commit(second).await);
    assert_eq!(
        store.get(&k(&ns, b"once")).await.expect("get"),
        Some(b"first".to_vec())
    );
    assert_eq!(store.get(&k(&ns, b"other")).await.expect("get"), None);
}

pub async fn expect_guards_the_whole_transaction(store: Arc<dyn KvStore>) {
    let ns = namespace();
    put(&*store, k(&ns, b"head"), b"1").await;

    let mut stale = Transaction::new();
    stale
        .expect(k(&ns, b"head"), Some(b"0".to_vec()))
        .put(k(&ns, b"head"), b"2".to_vec())
        .put(k(&ns, b"event"), b"e".to_vec());
    assert_conflict(store.commit(stale).await);
    assert_eq!(
        store.get(&k(&ns, b"head")).await.expect("get"),
        Some(b"1".to_vec())
    );
    assert_eq!(store.get(&k(&ns, b"event")).await.expect("get"), None);

    let mut absent = Transaction::new();
    absent
        .expect(k(&ns, b"head"), None)
        .put(k(&ns, b"x"), b"x".to_vec());
    assert_conflict(store.commit(absent).await);

    let mut fresh = Transaction::new();
    fresh
        .expect(k(&ns, b"head"), Some(b"1".to_vec()))
        .expect(k(&ns, b"never"), None)
        .put(k(&ns, b"head"), b"2".to_vec())
        .put(k(&ns, b"event"), b"e".to_vec());
    store
        .commit(fresh)
        .await
        .expect("commit with matching checks");
    let got = store
        .batch_get(vec![k(&ns, b"head"), k(&ns, b"event")])
        .await
        .expect("batch_get");
    assert_eq!(got, vec![Some(b"2".to_vec()), Some(b"e".to_vec())]);
}

pub async fn empty_transaction_commits(store: Arc<dyn KvStore>) {
    store
        .commit(Transaction::new())
        .await
        .expect("empty commit");
}

/// Compare-and-swap increments from many tasks: every success must be counted exactly once,
/// which only holds if check-then-write is atomic.
pub async fn concurrent_checked_increments_lose_nothing(store: Arc<dyn KvStore>) {
    let ns = namespace();
    let counter = k(&ns, b"counter");
    put(&*store, counter.clone(), &0u64.to_be_bytes()).await;
    const TASKS: u64 = 8;
    const EACH: u64 = 10;
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let store = store.clone();
        let counter = counter.clone();
        handles.push(tokio::spawn(async move {
            let mut done = 0;
            while done < EACH {
                let current = store.get(&counter).await.expect("get").expect("counter");
                let n = u64::from_be_bytes(current.as_slice().try_into().expect("8 bytes"));
                let mut txn = Transaction::new();
                txn.expect(counter.clone(), Some(current))
                    .put(counter.clone(), (n + 1).to_be_bytes().to_vec());
                match store.commit(txn).await {
                    Ok(()) => done += 1,
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => panic!("commit: {e}"),
                }
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    let end = store.get(&counter).await.expect("get").expect("counter");
    assert_eq!(end, (TASKS * EACH).to_be_bytes().to_vec());
}

/// A purge changes nothing a reader can see: live values stay, deleted ones stay deleted,
/// and the store takes commits afterwards.
pub async fn purge_deleted_keeps_what_is_live(store: Arc<dyn KvStore>) {
    let ns = namespace();
    put(&*store, k(&ns, b"kept"), b"live").await;
    put(&*store, k(&ns, b"gone"), b"dead").await;
    put(&*store, k(&ns, b"changed"), b"old").await;
    let mut txn = Transaction::new();
    txn.delete(k(&ns, b"gone"))
        .put(k(&ns, b"changed"), b"new".to_vec());
    store.commit(txn).await.expect("commit");

    store.purge_deleted().await.expect("purge");
    let got = store
        .batch_get(vec![k(&ns, b"kept"), k(&ns, b"gone"), k(&ns, b"changed")])
        .await
        .expect("batch_get");
    assert_eq!(
        got,
        vec![Some(b"live".to_vec()), None, Some(b"new".to_vec())]
    );
    let all = store
        .scan(KeyRange::prefix(ns.clone()), 100, Order::Ascending)
        .await
        .expect("scan");
    assert_eq!(all.len(), 2);
    put(&*store, k(&ns, b"after"), b"x").await;
    assert_eq!(
        store.get(&k(&ns, b"after")).await.expect("get"),
        Some(b"x".to_vec())
    );
}

/// Says on stderr, past the test harness's capture so it shows in every run, that a case did
/// not run and why. The line is `SKIPPED <case>: <reason>`.
pub fn report_skip(case: &str, reason: &str) {
    use std::io::Write;
    // One write of the whole line, so parallel cases do not interleave mid-line.
    let line = format!("SKIPPED {case}: {reason}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Generates one `#[tokio::test]` per conformance case for a backend. `$make` is an async
/// block returning `(store, guard)`; the guard lives until the case ends.
///
/// `kv_conformance_suite!(optional $make)`: `$make` returns `Result<(store, guard), String>`;
/// `Err(reason)` skips the case with one `SKIPPED <case>: <reason>` line (a backend that
/// needs an external cluster, gated on an environment variable).
#[macro_export]
macro_rules! kv_conformance_suite {
    (optional $make:expr) => {
        $crate::kv_conformance_suite!(@each optional $make);
    };
    ($make:expr) => {
        $crate::kv_conformance_suite!(@each required $make);
    };
    (@each $mode:ident $make:expr) => {
        $crate::kv_conformance_suite!(@cases $mode $make;
            get_of_a_missing_key_is_none,
            put_overwrites_and_delete_removes,
            batch_get_answers_in_key_order_given,
            scan_each_answers_each_range_in_the_order_given,
            scan_is_ordered_bounded_and_limited_both_ways,
            scan_never_leaves_its_prefix,
            put_if_absent_conflict_writes_nothing,
            expect_guards_the_whole_transaction,
            empty_transaction_commits,
            concurrent_checked_increments_lose_nothing,
            purge_deleted_keeps_what_is_live,
        );
    };
    (@cases required $make:expr; $($case:ident),* $(,)?) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, _guard) = $make.await;
                    $crate::store::conformance::$case(std::sync::Arc::new(store)).await;
                }
            )*
        }
    };
    (@cases optional $make:expr; $($case:ident),* $(,)?) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, _guard) = match $make.await {
                        Ok(made) => made,
                        Err(reason) => {
                            $crate::store::conformance::report_skip(stringify!($case), &reason);
                            return;
                        }
                    };
                    $crate::store::conformance::$case(std::sync::Arc::new(store)).await;
                }
            )*
        }
    };
}
