//! Sending through a store outage (issue 14), in process: `Log`s on one fjall store on disk
//! wrapped in the `FaultyStore`, with a send buffer on the medium the including test names
//! (`outage_suite!(places)`: files here, a JetStream stream in `tests/send_buffer_stream.rs`).
//! What the cases claim:
//! appends are acknowledged while the store is out, reads see them, recovery lands every
//! event in the store contiguous and exactly once, a replay that runs twice duplicates
//! nothing, the limits refuse with `unavailable`, and two writers around a takeover never
//! hand out one seq twice.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost::Message;
use tidings_log::crypto::MasterKey;
use tidings_log::send_buffer::local::LocalFiles;
use tidings_log::send_buffer::{AppendRefused, BufferPlace, Medium, SendBufferConfig};
use tidings_log::store::{Fault, FaultSwitch, FaultyStore, FjallStore, KvStore, Order};
use tidings_log::{
    Append, ClientMsgId, Committed, ConvId, CreateConversation, Log, LogConfig, LogError,
    ReadRange, TenantId, UserId, keys,
};
use tidings_schemas::storage::{Head, SealedEvent};

fn t() -> TenantId {
    TenantId::new("acme").expect("tenant id")
}
fn c(s: &str) -> ConvId {
    ConvId::new(s).expect("conv id")
}
fn u(s: &str) -> UserId {
    UserId::new(s).expect("user id")
}

fn text(conv: &str, id: &str) -> Append {
    Append::text(
        t(),
        c(conv),
        u("alice"),
        ClientMsgId::new(id).expect("client msg id"),
        format!("message {id}"),
    )
}

/// Makes the buffer's place for one writer (called once per `Log` opened; the path is the
/// rig's scratch directory).
pub type Places =
    Arc<dyn Fn(&Path) -> Pin<Box<dyn Future<Output = BufferPlace> + Send>> + Send + Sync>;

/// The send buffer in files under the rig's directory.
#[allow(dead_code)] // not every includer uses it
pub fn files() -> Places {
    Arc::new(|dir: &Path| {
        let dir = dir.join("send-buffer");
        Box::pin(async move { BufferPlace::Dir(dir) })
    })
}

/// Runs every case below as its own test, with the buffer where `$places` (an async
/// expression giving `(Places, guard)`; the guard lives as long as the case) puts it.
#[macro_export]
macro_rules! outage_suite {
    ($places:expr) => {
        $crate::outage_suite!(@cases $places;
            appends_during_an_outage_are_acked_read_and_replayed_exactly_once,
            with_reads_up_history_joins_the_store_and_the_buffer,
            a_replay_that_runs_again_lands_nothing_twice,
            past_the_byte_limit_sends_fail_unavailable_and_nothing_acked_is_lost,
            two_writers_around_a_takeover_never_hand_out_one_seq_twice,
            a_writer_reopened_after_a_crash_replays_what_its_predecessor_buffered,
            a_replicated_tenants_sends_during_an_outage_reach_its_outbox,
        );
    };
    (@cases $places:expr; $($case:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (places, _guard) = $places.await;
                outage_suite::$case(outage_suite::Rig::new(places)).await;
            }
        )*
    };
}

/// The medium behind a place.
fn medium_of(place: BufferPlace) -> Arc<dyn Medium> {
    match place {
        BufferPlace::Dir(dir) => Arc::new(LocalFiles::open(dir).expect("open the buffer dir")),
        BufferPlace::Medium(m) => m,
    }
}

/// A medium whose trims are lost (as in a crash right before them).
struct TrimLost(Arc<dyn Medium>);

#[async_trait::async_trait]
impl Medium for TrimLost {
    fn describe(&self) -> String {
        format!("{}, trims lost", self.0.describe())
    }
    async fn adopt(&self, partition: u32, epoch: u64) -> std::io::Result<Vec<Vec<u8>>> {
        self.0.adopt(partition, epoch).await
    }
    async fn append(
        &self,
        partition: u32,
        epoch: u64,
        records: Vec<Vec<u8>>,
    ) -> Result<(), AppendRefused> {
        self.0.append(partition, epoch, records).await
    }
    async fn trim(&self, _partition: u32, _epoch: u64) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Rig {
    inner: Arc<FjallStore>,
    store: Arc<dyn KvStore>,
    switch: Arc<FaultSwitch>,
    master_hex: String,
    tag: u64,
    places: Places,
    dir: tempfile::TempDir,
}

impl Rig {
    pub fn new(places: Places) -> Rig {
        static TESTS: AtomicU64 = AtomicU64::new(0);
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = Arc::new(FjallStore::open(&dir.path().join("kv")).expect("open store"));
        let switch = Arc::new(FaultSwitch::default());
        let store: Arc<dyn KvStore> = Arc::new(FaultyStore::new(inner.clone(), switch.clone()));
        Rig {
            inner,
            store,
            switch,
            master_hex: MasterKey::generate().to_hex(),
            tag: TESTS.fetch_add(1, Ordering::SeqCst),
            places,
            dir,
        }
    }

    async fn cfg(&self, name: &str) -> LogConfig {
        LogConfig {
            // Unique in the process, which other suites' writers share: `outage-<name>-t<tag>`.
            writer_id: format!("outage-{name}-t{}", self.tag),
            partitions: 4,
            send_buffer: Some(SendBufferConfig {
                place: (self.places)(self.dir.path()).await,
                max_bytes: 64 << 20,
                max_age: Duration::from_secs(600),
            }),
            ..LogConfig::default()
        }
    }

    async fn open(&self, cfg: LogConfig) -> Log {
        let master = MasterKey::from_hex(&self.master_hex).expect("hex");
        Log::open(self.store.clone(), master, cfg)
            .await
            .expect("open log")
    }

    async fn group(&self, log: &Log, conv: &str) {
        log.create_conversation(CreateConversation {
            tenant: t(),
            conv: c(conv),
            kind: "group".into(),
            title: conv.into(),
            creator: u("alice"),
            members: vec![u("bob")],
        })
        .await
        .expect("create");
    }

    /// The store's own view of a conversation (past the fault wrapper): its head and the
    /// client_msg_id of every event row, by seq.
    async fn stored(&self, conv: &str, log: &Log) -> (u64, BTreeMap<u64, String>) {
        let head = self
            .inner
            .get(&keys::head(&t(), &c(conv)))
            .await
            .expect("head")
            .map(|b| Head::decode(b.as_slice()).expect("head").last_seq)
            .unwrap_or(0);
        let rows = self
            .inner
            .scan(
                keys::event_range(&t(), &c(conv), 1, u64::MAX),
                10_000,
                Order::Ascending,
            )
            .await
            .expect("scan");
        let mut events = BTreeMap::new();
        for (key, value) in rows {
            let seq = keys::event_seq(&key).expect("seq");
            let sealed = SealedEvent::decode(value.as_slice()).expect("sealed");
            let dk = log
                .keyring()
                .key(&t(), sealed.key_id)
                .await
                .expect("data key");
            let plain = dk
                .open_event(&t(), &c(conv), seq, &sealed.ciphertext)
                .expect("open");
            let event = tidings_log::Event::decode(plain.as_slice()).expect("event");
            assert!(
                events.insert(seq, event.client_msg_id).is_none(),
                "seq {seq} twice"
            );
        }
        (head, events)
    }
}

/// Appends to `g`, once more if refused retryably: the batch whose commit meets the outage
/// fails (as clients see it), and the retry is buffered.
async fn send(log: &Log, id: &str) -> Result<Committed, LogError> {
    match log.append(text("g", id)).await {
        Err(e) if e.is_retryable() => log.append(text("g", id)).await,
        other => other,
    }
}

async fn until_replayed(log: &Log) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while log.send_buffer_stats().expect("buffer").events > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the buffer was never replayed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every acked append is in the store at its acked seq, and the stored seqs are exactly
/// 1..=head.
fn assert_complete(acked: &HashMap<String, u64>, head: u64, stored: &BTreeMap<u64, String>) {
    let seqs: Vec<u64> = stored.keys().copied().collect();
    assert_eq!(
        seqs,
        (1..=head).collect::<Vec<_>>(),
        "stored seqs are 1..=head"
    );
    for (id, seq) in acked {
        assert_eq!(
            stored.get(seq),
            Some(id),
            "acked {id} at seq {seq} is in the store"
        );
    }
}

pub async fn appends_during_an_outage_are_acked_read_and_replayed_exactly_once(rig: Rig) {
    let log = rig.open(rig.cfg("a").await).await;
    rig.group(&log, "g").await;
    let mut acked = HashMap::new();
    for i in 0..3 {
        let id = format!("before-{i}");
        acked.insert(
            id.clone(),
            log.append(text("g", &id)).await.expect("append").seq,
        );
    }

    rig.switch.set(Fault::Unavailable);
    for i in 0..20 {
        let id = format!("during-{i}");
        let ok = send(&log, &id).await.expect("acked during the outage");
        acked.insert(id, ok.seq);
    }
    // A retry of a buffered send answers the original.
    let again = log.append(text("g", "during-5")).await.expect("retry");
    assert!(again.duplicate);
    assert_eq!(again.seq, acked["during-5"]);
    // Reads see the buffered events, though the store does not even read.
    let latest = log
        .read(&t(), &c("g"), ReadRange::latest(5))
        .await
        .expect("read the buffer");
    assert_eq!(
        latest.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![24, 23, 22, 21, 20]
    );
    assert_eq!(
        log.conversation(&t(), &c("g"))
            .await
            .expect("head")
            .head_seq,
        24
    );
    // What cannot be buffered is refused, retryably, as unavailable.
    match log
        .add_member(&t(), &c("g"), &u("alice"), &u("carol"))
        .await
    {
        Err(e @ LogError::Unavailable { .. }) => assert!(e.is_retryable()),
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert_eq!(log.send_buffer_stats().expect("buffer").events, 20);

    rig.switch.set(Fault::Ok);
    until_replayed(&log).await;
    let (head, stored) = rig.stored("g", &log).await;
    assert_eq!(head, 24);
    assert_complete(&acked, head, &stored);
    // Reads join the store's part and (nothing left in) the buffer.
    let all = log
        .read(&t(), &c("g"), ReadRange::forward(1, 100))
        .await
        .expect("read");
    assert_eq!(all.len(), 24);
    // And the writer commits as usual again.
    let next = log.append(text("g", "after")).await.expect("append");
    assert_eq!(next.seq, 25);
    assert_eq!(log.send_buffer_stats().expect("buffer").replayed, 20);
}

pub async fn with_reads_up_history_joins_the_store_and_the_buffer(rig: Rig) {
    let log = rig.open(rig.cfg("a").await).await;
    rig.group(&log, "g").await;
    for i in 0..5 {
        log.append(text("g", &format!("s{i}")))
            .await
            .expect("append");
    }
    rig.switch.set(Fault::CommitUnavailable);
    let mut seqs = Vec::new();
    for i in 0..5 {
        let id = format!("b{i}");
        let r = send(&log, &id).await;
        seqs.push(r.expect("buffered").seq);
    }
    assert_eq!(seqs, vec![7, 8, 9, 10, 11]);
    let page = log
        .read(&t(), &c("g"), ReadRange::forward(4, 6))
        .await
        .expect("read");
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![4, 5, 6, 7, 8, 9]
    );
    let back = log
        .read(
            &t(),
            &c("g"),
            ReadRange {
                from: Some(8),
                limit: 4,
                order: Order::Descending,
            },
        )
        .await
        .expect("read back");
    assert_eq!(
        back.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![8, 7, 6, 5]
    );
    rig.switch.set(Fault::Ok);
    until_replayed(&log).await;
    assert_eq!(rig.stored("g", &log).await.0, 11);
}

/// A crash after the replay committed but before the trim leaves the buffer as it was: the
/// first writer's medium loses its trims.
pub async fn a_replay_that_runs_again_lands_nothing_twice(rig: Rig) {
    let mut cfg = rig.cfg("a").await;
    if let Some(b) = cfg.send_buffer.as_mut() {
        b.place = BufferPlace::Medium(Arc::new(TrimLost(medium_of(b.place.clone()))));
    }
    let log = rig.open(cfg).await;
    rig.group(&log, "g").await;
    rig.switch.set(Fault::Unavailable);
    let mut acked = HashMap::new();
    for i in 0..10 {
        let id = format!("m{i}");
        let r = send(&log, &id).await;
        acked.insert(id, r.expect("buffered").seq);
    }
    rig.switch.set(Fault::Ok);
    until_replayed(&log).await;
    log.close().await;
    // The next writer loads the records and replays them again: every one is skipped.
    let log = rig.open(rig.cfg("b").await).await;
    until_replayed(&log).await;
    assert_eq!(
        log.send_buffer_stats().expect("buffer").replayed,
        10,
        "the next writer found the ten records again"
    );
    let (head, stored) = rig.stored("g", &log).await;
    assert_eq!(head, 11);
    assert_complete(&acked, head, &stored);
    assert_eq!(log.append(text("g", "next")).await.expect("append").seq, 12);
}

pub async fn past_the_byte_limit_sends_fail_unavailable_and_nothing_acked_is_lost(rig: Rig) {
    let mut cfg = rig.cfg("a").await;
    if let Some(b) = cfg.send_buffer.as_mut() {
        b.max_bytes = 1 << 20;
    }
    let log = rig.open(cfg).await;
    rig.group(&log, "g").await;
    rig.switch.set(Fault::Unavailable);
    let big = "x".repeat(60_000);
    let mut acked = HashMap::new();
    let mut refused = 0;
    for i in 0..40 {
        let id = format!("m{i}");
        let req = |id: &str| {
            Append::text(
                t(),
                c("g"),
                u("alice"),
                ClientMsgId::new(id).expect("id"),
                big.clone(),
            )
        };
        let r = match log.append(req(&id)).await {
            Err(e) if i == 0 && e.is_retryable() => log.append(req(&id)).await,
            other => other,
        };
        match r {
            Ok(ok) => {
                acked.insert(id, ok.seq);
            }
            Err(e @ LogError::Unavailable { .. }) => {
                assert!(e.is_retryable());
                refused += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(acked.len() >= 10, "only {} buffered", acked.len());
    assert!(refused > 0, "the limit never refused");
    rig.switch.set(Fault::Ok);
    until_replayed(&log).await;
    let (head, stored) = rig.stored("g", &log).await;
    assert_complete(&acked, head, &stored);
    assert_eq!(head, 1 + acked.len() as u64);
}

/// Two writers around a takeover during an outage: A buffers, the store comes back, B takes
/// the partition by force at once (before A could replay), A keeps sending. Every acked seq
/// is unique per conversation and in the store.
pub async fn two_writers_around_a_takeover_never_hand_out_one_seq_twice(rig: Rig) {
    let mut cfg_a = rig.cfg("a").await;
    cfg_a.partitions = 1;
    cfg_a.lease_ttl = Duration::from_millis(600);
    let mut cfg_b = rig.cfg("b").await;
    cfg_b.partitions = 1;
    cfg_b.lease_ttl = Duration::from_millis(600);
    let a = rig.open(cfg_a).await;
    rig.group(&a, "g").await;
    let b = rig.open(cfg_b).await;
    assert_eq!(a.owned_partitions(), vec![0]);
    assert!(b.owned_partitions().is_empty());

    rig.switch.set(Fault::Unavailable);
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut seen: HashMap<u64, String> = HashMap::new();
    let mut record = |id: String, ok: Committed| {
        if let Some(other) = seen.insert(ok.seq, id.clone()) {
            assert_eq!(other, id, "seq {} handed out twice", ok.seq);
        }
        acked.insert(id, ok.seq);
    };
    for i in 0..10 {
        let id = format!("a{i}");
        let r = send(&a, &id).await;
        record(id, r.expect("A buffers"));
    }
    // Outlast A's lease: it cannot renew while the store is out.
    tokio::time::sleep(Duration::from_millis(900)).await;
    rig.switch.set(Fault::Ok);
    b.take_over(0).await.expect("B takes over");
    // Both keep sending; whoever does not own the partition says not_owner.
    for i in 0..30 {
        for (name, log) in [("a", &a), ("b", &b)] {
            let id = format!("{name}-after-{i}");
            match log.append(text("g", &id)).await {
                Ok(ok) => record(id, ok),
                Err(e) => assert!(e.is_retryable(), "{e}"),
            }
        }
    }
    until_replayed(&b).await;
    let (head, stored) = rig.stored("g", &b).await;
    assert_complete(&acked, head, &stored);
    assert!(
        acked.keys().any(|k| k.starts_with("b-after")),
        "B never sent"
    );
    // A's ten buffered events were replayed by exactly one of them: B, which loaded them
    // when it adopted the partition (nearly always), or A, if its probe came first.
    let replayed = (
        a.send_buffer_stats().expect("buffer").replayed,
        b.send_buffer_stats().expect("buffer").replayed,
    );
    assert!(
        replayed == (0, 10) || replayed == (10, 0),
        "replayed by A, B: {replayed:?}"
    );
}

pub async fn a_writer_reopened_after_a_crash_replays_what_its_predecessor_buffered(rig: Rig) {
    let log = rig.open(rig.cfg("a").await).await;
    rig.group(&log, "g").await;
    rig.switch.set(Fault::Unavailable);
    let mut acked = HashMap::new();
    for i in 0..8 {
        let id = format!("m{i}");
        let r = send(&log, &id).await;
        acked.insert(id, r.expect("buffered").seq);
    }
    // The "crash": the writer stops while the store is out (its release fails too).
    log.close().await;
    rig.switch.set(Fault::Ok);
    let log = rig.open(rig.cfg("b").await).await;
    until_replayed(&log).await;
    let (head, stored) = rig.stored("g", &log).await;
    assert_eq!(head, 9);
    assert_complete(&acked, head, &stored);
}

/// Cells: a tenant with a DR cell keeps a replica of every commit in the outbox, sends
/// buffered during the outage included (each carries its outbox row into the buffer and the
/// replay lands it): the outbox holds every event of the conversation, each once.
pub async fn a_replicated_tenants_sends_during_an_outage_reach_its_outbox(rig: Rig) {
    let mut cfg = rig.cfg("a").await;
    cfg.cell = Some(tidings_log::cells::CellConfig {
        name: "home".into(),
        sync_timeout: Duration::from_secs(5),
    });
    let log = rig.open(cfg).await;
    let cells = log.cells().expect("cells on").clone();
    let placement = tidings_schemas::storage::CellPlacement {
        home: "home".into(),
        dr: "dr".into(),
        tier: "vip".into(),
        version: 1,
        ..Default::default()
    };
    assert!(
        cells
            .store_placement(&*rig.store, &t(), placement)
            .await
            .expect("place")
    );
    cells.confirm("dr");
    rig.group(&log, "g").await;
    for i in 0..3 {
        log.append(text("g", &format!("before-{i}")))
            .await
            .expect("append");
    }
    rig.switch.set(Fault::Unavailable);
    for i in 0..10 {
        send(&log, &format!("during-{i}"))
            .await
            .expect("acked during the outage");
    }
    rig.switch.set(Fault::Ok);
    until_replayed(&log).await;
    let (head, _) = rig.stored("g", &log).await;
    assert_eq!(head, 14);
    let mut replicated = Vec::new();
    for p in 0..4 {
        for (_, batch) in log.outbox_page(p, 1000).await.expect("outbox") {
            assert_eq!((batch.tenant.as_str(), batch.dr.as_str()), ("acme", "dr"));
            replicated.extend(
                batch
                    .writes
                    .iter()
                    .filter(|w| w.key.starts_with(b"ev\0"))
                    .filter_map(|w| keys::event_seq(&w.key)),
            );
        }
    }
    replicated.sort_unstable();
    assert_eq!(replicated, (1..=14).collect::<Vec<_>>(), "every event once");
}
