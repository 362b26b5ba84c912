//! Writer ownership and fencing, for real: two writers (two `Log`s with their own sequencers
//! and lease keepers) on one fjall store on disk, in one process (fjall is one process per
//! directory). A forced takeover must fence the old owner: its in-flight and later writes to
//! the partition fail with `not_owner`, the log stays contiguous, nothing acked is lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use prost::Message;
use tidings_log::crypto::MasterKey;
use tidings_log::store::{FjallStore, KeyRange, KvStore, Op, Order, StoreError, Transaction};
use tidings_log::{
    Append, ClientMsgId, Committed, ConvId, CreateConversation, Log, LogConfig, LogError,
    ReadRange, TenantId, UserId, keys,
};
use tidings_schemas::storage::{Head, Lease};

fn t(s: &str) -> TenantId {
    TenantId::new(s).expect("tenant id")
}
fn c(s: &str) -> ConvId {
    ConvId::new(s).expect("conv id")
}
fn u(s: &str) -> UserId {
    UserId::new(s).expect("user id")
}

fn text(conv: &str, id: &str) -> Append {
    let body = format!("message {id}");
    let id = ClientMsgId::new(id).expect("client msg id");
    Append::text(t("acme"), c(conv), u("alice"), id, body)
}

/// One store on disk, shared by the writers of a test.
struct Shared {
    store: Arc<FjallStore>,
    master_hex: String,
    /// Writer ids are unique per process, and the tests of this file share one with the
    /// other suites of the test binary: ids here are `lease-<name>-t<tag>`.
    tag: u64,
    _dir: tempfile::TempDir,
}

impl Shared {
    fn new() -> Self {
        static TESTS: AtomicU64 = AtomicU64::new(0);
        let dir = tempfile::tempdir().expect("tempdir");
        Shared {
            store: Arc::new(FjallStore::open(dir.path()).expect("open store")),
            master_hex: MasterKey::generate().to_hex(),
            tag: TESTS.fetch_add(1, Ordering::SeqCst),
            _dir: dir,
        }
    }

    /// This test's writer id for `name`.
    fn id(&self, name: &str) -> String {
        format!("lease-{name}-t{}", self.tag)
    }

    fn cfg(&self, name: &str) -> LogConfig {
        LogConfig {
            writer_id: self.id(name),
            ..LogConfig::default()
        }
    }

    async fn open_on(&self, store: Arc<dyn KvStore>, cfg: LogConfig) -> Result<Log, LogError> {
        let master = MasterKey::from_hex(&self.master_hex).expect("hex");
        Log::open(store, master, cfg).await
    }

    async fn writer(&self, name: &str) -> Log {
        self.open_on(self.store.clone(), self.cfg(name))
            .await
            .expect("open writer")
    }

    async fn lease(&self, partition: u32) -> Lease {
        let bytes = self
            .store
            .get(&keys::lease(partition))
            .await
            .expect("get lease")
            .expect("lease present");
        Lease::decode(bytes.as_slice()).expect("decode lease")
    }

    async fn head(&self, conv: &str) -> Head {
        let bytes = self
            .store
            .get(&keys::head(&t("acme"), &c(conv)))
            .await
            .expect("get head")
            .expect("head present");
        Head::decode(bytes.as_slice()).expect("decode head")
    }
}

/// The fjall store as one writer sees it, with a gate that holds its commits (so a batch
/// can be in flight while another writer takes the lease over) and a count of the calls
/// that touch one conversation's keys.
struct Gated {
    inner: Arc<FjallStore>,
    open: tokio::sync::watch::Sender<bool>,
    held: AtomicUsize,
    watched: Vec<u8>,
    touched: AtomicU64,
}

impl Gated {
    fn new(inner: Arc<FjallStore>, conv: &str) -> Arc<Self> {
        Arc::new(Gated {
            inner,
            open: tokio::sync::watch::channel(true).0,
            held: AtomicUsize::new(0),
            watched: format!("acme\0{conv}").into_bytes(),
            touched: AtomicU64::new(0),
        })
    }

    fn count(&self, keys: &[&[u8]]) {
        if keys
            .iter()
            .any(|k| keys::conversation_part(k) == Some(self.watched.as_slice()))
        {
            self.touched.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[async_trait]
impl KvStore for Gated {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.count(&[key]);
        self.inner.get(key).await
    }

    async fn batch_get(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.count(&keys.iter().map(Vec::as_slice).collect::<Vec<_>>());
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
        let keys: Vec<&[u8]> = txn
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { key, .. }
                | Op::PutIfAbsent { key, .. }
                | Op::Delete { key }
                | Op::Expect { key, .. } => key.as_slice(),
            })
            .collect();
        self.count(&keys);
        let mut open = self.open.subscribe();
        if !*open.borrow() {
            self.held.fetch_add(1, Ordering::SeqCst);
            let _ = open.wait_for(|open| *open).await;
        }
        self.inner.commit(txn).await
    }

    async fn purge_deleted(&self) -> Result<(), StoreError> {
        self.inner.purge_deleted().await
    }

    fn single_process(&self) -> bool {
        true
    }
}

async fn create_group(log: &Log, conv: &str) -> Committed {
    log.create_conversation(CreateConversation {
        tenant: t("acme"),
        conv: c(conv),
        kind: "group".into(),
        title: conv.into(),
        creator: u("alice"),
        members: vec![u("bob")],
    })
    .await
    .expect("create group")
}

/// A conversation id whose partition differs from `other`'s.
fn conv_in_another_partition(log: &Log, other: &str) -> String {
    let p = log.partition_of(&t("acme"), &c(other));
    (0..)
        .map(|i| format!("other{i}"))
        .find(|name| log.partition_of(&t("acme"), &c(name)) != p)
        .expect("some conversation hashes elsewhere")
}

fn assert_not_owner(result: Result<Committed, LogError>, partition: u32, owner: &str) {
    match result {
        Err(LogError::NotOwner {
            partition: p,
            owner: o,
        }) => {
            assert_eq!((p, o.as_str()), (partition, owner));
            let e = LogError::NotOwner {
                partition: p,
                owner: o,
            };
            assert_eq!(e.code(), "not_owner");
            assert!(e.is_retryable());
        }
        other => panic!("expected not_owner for partition {partition}, got {other:?}"),
    }
}

/// Reads the whole conversation and checks 1..=head with no gap and no duplicate, and that
/// every acked append is there with exactly its acked seq and event id.
async fn assert_contiguous_with(log: &Log, conv: &str, acked: &[(String, Committed)]) {
    let head = log
        .conversation(&t("acme"), &c(conv))
        .await
        .expect("conversation")
        .head_seq;
    let mut events = Vec::new();
    while (events.len() as u64) < head {
        let from = events.len() as u64 + 1;
        let page = log
            .read(&t("acme"), &c(conv), ReadRange::forward(from, 1000))
            .await
            .expect("read");
        assert!(!page.is_empty(), "read stopped at {from} below head {head}");
        events.extend(page);
    }
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>(), "contiguous 1..=head");
    for (client_msg_id, ack) in acked {
        let e = &events[(ack.seq - 1) as usize];
        assert_eq!(
            (&e.client_msg_id, &e.event_id),
            (client_msg_id, &ack.event_id),
            "acked seq {} holds the acked event",
            ack.seq
        );
    }
    let mut ids: Vec<&str> = acked.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), acked.len(), "each client message acked once");
}

#[tokio::test]
async fn a_second_writer_owns_nothing_while_the_first_holds_every_partition() {
    let s = Shared::new();
    let a = s.writer("writer-a").await;
    assert_eq!(a.owned_partitions(), (0..64).collect::<Vec<_>>());
    let b = s.writer("writer-b").await;
    assert!(b.owned_partitions().is_empty());

    create_group(&a, "general").await;
    let p = a.partition_of(&t("acme"), &c("general"));
    assert_not_owner(b.append(text("general", "m1")).await, p, &s.id("writer-a"));
    let ack = a
        .append(text("general", "m1"))
        .await
        .expect("owner appends");
    assert_eq!(ack.seq, 2);
    b.close().await;
    a.close().await;
}

#[tokio::test]
async fn a_takeover_fences_the_old_writer_in_flight_and_after_and_nothing_acked_is_lost() {
    let s = Shared::new();
    let gated = Gated::new(s.store.clone(), "general");
    let a = s
        .open_on(gated.clone(), s.cfg("writer-a"))
        .await
        .expect("open a");
    let b = s.writer("writer-b").await;

    // (1) A owns everything and appends.
    let mut acked: Vec<(String, Committed)> = Vec::new();
    create_group(&a, "general").await;
    let other = conv_in_another_partition(&a, "general");
    create_group(&a, &other).await;
    for i in 0..20 {
        let id = format!("a{i}");
        acked.push((id.clone(), a.append(text("general", &id)).await.expect("a")));
    }
    let p = a.partition_of(&t("acme"), &c("general"));
    let epoch_a = s.lease(p).await.epoch;
    assert_eq!(s.head("general").await.writer_epoch, epoch_a);

    // (2) A's commits are held while 50 appends queue up; then B takes the partition over.
    gated.open.send_replace(false);
    let mut in_flight = Vec::new();
    for i in 0..50 {
        let id = format!("f{i}");
        in_flight.push((
            id.clone(),
            a.enqueue(text("general", &id)).await.expect("queued"),
        ));
    }
    for _ in 0..200 {
        if gated.held.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        gated.held.load(Ordering::SeqCst) > 0,
        "a commit of A is in flight"
    );
    let epoch_b = b.take_over(p).await.expect("take over");
    assert_eq!(epoch_b, epoch_a + 1);
    assert_eq!(s.lease(p).await.owner, s.id("writer-b"));
    gated.open.send_replace(true);

    // (3) Every in-flight append of A fails with not_owner: none of them was written.
    let mut failed = Vec::new();
    for (id, pending) in in_flight {
        assert_not_owner(pending.wait().await, p, &s.id("writer-b"));
        failed.push(id);
    }
    // Later appends are refused at once, without touching the store.
    let before = gated.touched.load(Ordering::SeqCst);
    assert_not_owner(
        a.append(text("general", "late")).await,
        p,
        &s.id("writer-b"),
    );
    assert!(matches!(
        a.enqueue(text("general", "late")).await,
        Err(LogError::NotOwner { .. })
    ));
    assert_eq!(
        gated.touched.load(Ordering::SeqCst),
        before,
        "refused without a read"
    );
    assert!(!a.owned_partitions().contains(&p));
    // A keeps the partitions it was not fenced from.
    a.append(text(&other, "still-a"))
        .await
        .expect("a's other partition");

    // B's appends succeed, and the client's retries of A's refused appends land once each.
    for id in failed.iter().chain([&"late".to_string()]) {
        let ack = b.append(text("general", id)).await.expect("b appends");
        assert!(!ack.duplicate, "{id} was never written by A");
        acked.push((id.clone(), ack));
    }
    let retry = b.append(text("general", "f0")).await.expect("retry");
    assert!(retry.duplicate);
    assert_eq!(s.head("general").await.writer_epoch, epoch_b);

    // (4) Contiguous 1..=head, every ack readable as acked, from either writer.
    assert_eq!(
        b.conversation(&t("acme"), &c("general"))
            .await
            .expect("info")
            .head_seq,
        1 + 20 + 51
    );
    assert_contiguous_with(&a, "general", &acked).await;
    assert_contiguous_with(&b, "general", &acked).await;
    b.close().await;
    a.close().await;
}

#[tokio::test]
async fn a_renewal_notices_a_lost_lease_at_once() {
    let s = Shared::new();
    let a = s.writer("writer-a").await;
    let b = s.writer("writer-b").await;
    create_group(&a, "general").await;
    let p = a.partition_of(&t("acme"), &c("general"));
    b.take_over(p).await.expect("take over");
    // A has not committed since: it does not know yet.
    assert!(a.owned_partitions().contains(&p));
    assert_eq!(a.renew_leases().await.expect("renew"), vec![p]);
    assert!(!a.owned_partitions().contains(&p));
    assert_eq!(
        a.owned_partitions().len(),
        63,
        "the other leases were renewed"
    );
    assert_not_owner(a.append(text("general", "m")).await, p, &s.id("writer-b"));
    assert_eq!(
        a.renew_leases().await.expect("renew again"),
        Vec::<u32>::new()
    );
    b.close().await;
    a.close().await;
}

#[tokio::test]
async fn the_lease_keeper_notices_a_takeover_within_a_renewal_period() {
    let s = Shared::new();
    let short = |name: &str| LogConfig {
        lease_ttl: Duration::from_millis(300),
        ..s.cfg(name)
    };
    let a = s
        .open_on(s.store.clone(), short("writer-a"))
        .await
        .expect("a");
    let b = s
        .open_on(s.store.clone(), short("writer-b"))
        .await
        .expect("b");
    create_group(&a, "general").await;
    let p = a.partition_of(&t("acme"), &c("general"));
    b.take_over(p).await.expect("take over");
    let mut noticed = false;
    for _ in 0..50 {
        if !a.owned_partitions().contains(&p) {
            noticed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(noticed, "A's renewals (every 100 ms) found the loss");
    assert_not_owner(a.append(text("general", "m")).await, p, &s.id("writer-b"));
    b.append(text("general", "m")).await.expect("b appends");
    b.close().await;
    a.close().await;
}

#[tokio::test]
async fn a_writer_reopening_after_a_clean_release_gets_its_partitions_back_with_a_higher_epoch() {
    let s = Shared::new();
    let a = s.writer("writer-a").await;
    create_group(&a, "general").await;
    let p = a.partition_of(&t("acme"), &c("general"));
    let before = s.lease(p).await;
    assert_eq!(s.head("general").await.writer_epoch, before.epoch);
    a.close().await;

    let released = s.lease(p).await;
    assert_eq!(
        (released.owner, released.epoch, released.expires_ms),
        (s.id("writer-a"), before.epoch, 0)
    );

    // A fresh writer id (as after a restart): no waiting for expiry after a release.
    let a = s.writer("writer-a2").await;
    assert_eq!(a.owned_partitions().len(), 64);
    for q in 0..64 {
        let l = s.lease(q).await;
        assert_eq!((l.owner, l.epoch), (s.id("writer-a2"), before.epoch + 1));
    }
    let ack = a.append(text("general", "m")).await.expect("append");
    assert_eq!(ack.seq, 2);
    assert_eq!(s.head("general").await.writer_epoch, before.epoch + 1);

    // A second writer that was waiting takes them over from the keeper once released.
    let short = |name: &str| LogConfig {
        lease_ttl: Duration::from_millis(300),
        ..s.cfg(name)
    };
    a.close().await;
    let a = s
        .open_on(s.store.clone(), short("writer-a3"))
        .await
        .expect("a3");
    let b = s
        .open_on(s.store.clone(), short("writer-b"))
        .await
        .expect("b");
    assert!(b.owned_partitions().is_empty());
    a.close().await;
    for _ in 0..50 {
        if b.owned_partitions().len() == 64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.owned_partitions().len(), 64);
    assert_eq!(s.lease(p).await.epoch, before.epoch + 3);
    b.close().await;
}

#[tokio::test]
async fn releasing_the_leases_hands_every_partition_over_at_once_and_refuses_later_writes() {
    let s = Shared::new();
    let a = s.writer("writer-a").await;
    // A reader that owns nothing (like `serve --role archiver`) takes no lease.
    let reader = s
        .open_on(
            s.store.clone(),
            LogConfig {
                own_partitions: false,
                ..s.cfg("reader")
            },
        )
        .await
        .expect("reader");
    assert!(reader.owned_partitions().is_empty());
    let b = s
        .open_on(
            s.store.clone(),
            LogConfig {
                lease_ttl: Duration::from_millis(300),
                ..s.cfg("writer-b")
            },
        )
        .await
        .expect("b");
    create_group(&a, "general").await;
    let p = a.partition_of(&t("acme"), &c("general"));
    let epoch = s.lease(p).await.epoch;

    a.release_leases().await.expect("release");
    assert!(a.owned_partitions().is_empty());
    assert_not_owner(a.append(text("general", "m")).await, p, "");
    for _ in 0..50 {
        if b.owned_partitions().len() == 64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.owned_partitions().len(), 64, "B's keeper took them all");
    assert!(reader.owned_partitions().is_empty());
    assert_eq!(s.lease(p).await.epoch, epoch + 1);
    b.append(text("general", "m")).await.expect("b appends");
    // Reads go on through the released writer.
    assert_eq!(
        a.conversation(&t("acme"), &c("general"))
            .await
            .expect("read")
            .head_seq,
        2
    );
    reader.close().await;
    b.close().await;
    a.close().await;
}

#[tokio::test]
async fn a_lease_left_by_a_crashed_process_is_taken_at_once_on_the_embedded_store() {
    let s = Shared::new();
    // What a killed process leaves: a live lease whose owner runs nowhere in this process.
    let ghost = Lease {
        owner: "ghost-1234-deadbeef".into(),
        epoch: 7,
        expires_ms: tidings_log::now_ms() + 3_600_000,
    };
    let mut txn = Transaction::new();
    txn.put(keys::lease(5), ghost.encode_to_vec());
    s.store.commit(txn).await.expect("write ghost lease");

    let a = s.writer("writer-a").await;
    assert_eq!(a.owned_partitions().len(), 64);
    let l = s.lease(5).await;
    assert_eq!((l.owner, l.epoch), (s.id("writer-a"), 8));
    a.close().await;
}

#[tokio::test]
async fn the_partition_count_is_fixed_for_the_life_of_a_store() {
    let s = Shared::new();
    let a = s.writer("writer-a").await;
    a.close().await;
    let err = s
        .open_on(
            s.store.clone(),
            LogConfig {
                partitions: 32,
                ..s.cfg("writer-b")
            },
        )
        .await
        .err()
        .expect("a different count is refused");
    assert!(matches!(
        err,
        LogError::PartitionsMismatch {
            stored: 64,
            configured: 32
        }
    ));
    assert_eq!(err.code(), "partitions_mismatch");
    assert!(!err.is_retryable());
    let b = s.writer("writer-b").await;
    assert_eq!(b.owned_partitions().len(), 64);
    b.close().await;
}

#[tokio::test]
async fn two_writers_in_one_process_cannot_share_an_id() {
    let s = Shared::new();
    let a = s.writer("writer-same").await;
    let err = s
        .open_on(s.store.clone(), s.cfg("writer-same"))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), "invalid_request");
    a.close().await;
}
