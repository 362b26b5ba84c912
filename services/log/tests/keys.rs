//! Crypto-shredding and tenant-held keys, against the embedded store on real disk: what a
//! shred destroys (and that no file keeps a copy), what it leaves alone, and what a tenant
//! key adds to the wrap of a tenant's data keys.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tidings_log::crypto::{Keyring, MasterKey, TenantKey, TenantKeySource, TenantKeys};
use tidings_log::store::{FjallStore, KvStore};
use tidings_log::{
    Append, Body, ClientMsgId, ConvId, CreateConversation, Log, LogConfig, LogError, ReadRange,
    TenantId, UserId, keys,
};
use tidings_schemas::storage::WrappedKey;

fn t(s: &str) -> TenantId {
    TenantId::new(s).expect("tenant id")
}
fn c(s: &str) -> ConvId {
    ConvId::new(s).expect("conv id")
}
fn u(s: &str) -> UserId {
    UserId::new(s).expect("user id")
}

/// A data directory and its master key, opened and reopened as a test needs.
struct Dir {
    dir: tempfile::TempDir,
    master_hex: String,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            dir: tempfile::tempdir().expect("tempdir"),
            master_hex: MasterKey::generate().to_hex(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Opens the log with these tenant-held key sources.
    async fn open_with(&self, tenant_keys: TenantKeys) -> Result<Log, LogError> {
        let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(&self.path().join("data"))?);
        let master = MasterKey::from_hex(&self.master_hex).expect("hex");
        let keyring = Keyring::open(store.clone(), master)
            .await?
            .with_tenant_keys(tenant_keys);
        Log::open_with_keyring(store, keyring, LogConfig::default(), None).await
    }

    async fn open(&self) -> Log {
        self.open_with(TenantKeys::default()).await.expect("open")
    }

    fn data(&self) -> PathBuf {
        self.path().join("data")
    }
}

async fn create(log: &Log, tenant: &str, conv: &str) -> Result<(), LogError> {
    log.create_conversation(CreateConversation {
        tenant: t(tenant),
        conv: c(conv),
        kind: "group".into(),
        title: format!("{conv} title"),
        creator: u("alice"),
        members: vec![u("bob")],
    })
    .await
    .map(|_| ())
}

fn post(tenant: &str, conv: &str, id: &str, text: &str) -> Append {
    Append::text(
        t(tenant),
        c(conv),
        u("alice"),
        ClientMsgId::new(id).expect("client msg id"),
        text,
    )
}

/// Creates `general` in the tenant with two messages.
async fn some_history(log: &Log, tenant: &str) {
    create(log, tenant, "general").await.expect("create");
    for i in 0..2 {
        log.append(post(
            tenant,
            "general",
            &format!("m{i}"),
            &format!("{tenant} {i}"),
        ))
        .await
        .expect("append");
    }
}

async fn read_texts(log: &Log, tenant: &str, conv: &str) -> Result<Vec<String>, LogError> {
    let events = log
        .read(&t(tenant), &c(conv), ReadRange::forward(1, 100))
        .await?;
    Ok(events
        .iter()
        .filter_map(|e| match &e.body {
            Some(Body::MessagePosted(p)) => Some(p.text.clone()),
            _ => None,
        })
        .collect())
}

fn expect_shredded<T: std::fmt::Debug>(result: Result<T, LogError>, tenant: &str) {
    match result {
        Err(e @ LogError::TenantShredded { .. }) => {
            assert_eq!(e.code(), "tenant_shredded");
            assert!(!e.is_retryable());
            assert!(e.to_string().contains(tenant), "{e}");
            assert!(e.to_string().contains("can never be opened"), "{e}");
        }
        other => panic!("expected TenantShredded for {tenant}, got {other:?}"),
    }
}

/// The stored wrap of a tenant's data key.
async fn wrapped_key(log: &Log, tenant: &str, key_id: u32) -> Option<WrappedKey> {
    log.store()
        .get(&keys::data_key(&t(tenant), key_id))
        .await
        .expect("get")
        .map(|raw| WrappedKey::decode(raw.as_slice()).expect("decode"))
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

fn key_file(dir: &Path, name: &str, key: &TenantKey) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", key.to_hex())).expect("write key file");
    path
}

fn from_file(tenant: &str, path: &Path) -> TenantKeys {
    let mut keys = TenantKeys::default();
    keys.insert(t(tenant), TenantKeySource::File(path.to_path_buf()));
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shredded_tenant_is_refused_every_read_while_another_reads_fine() {
    let d = Dir::new();
    let log = d.open().await;
    some_history(&log, "acme").await;
    some_history(&log, "globex").await;
    log.keyring().rotate(&t("acme")).await.expect("rotate");

    let report = log.keyring().shred(&t("acme")).await.expect("shred");
    assert_eq!(report.key_ids, vec![1, 2], "both versions destroyed");
    assert!(!report.already_shredded);

    expect_shredded(read_texts(&log, "acme", "general").await, "acme");
    expect_shredded(log.keyring().key(&t("acme"), 1).await, "acme");
    expect_shredded(log.keyring().current(&t("acme")).await, "acme");
    expect_shredded(log.keyring().rotate(&t("acme")).await, "acme");
    assert_eq!(
        read_texts(&log, "globex", "general").await.expect("globex"),
        ["globex 0", "globex 1"]
    );

    // Again: nothing left to destroy, and says so.
    let again = log.keyring().shred(&t("acme")).await.expect("shred again");
    assert!(again.already_shredded);
    assert!(again.key_ids.is_empty());
    log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_and_creates_of_a_shredded_tenant_are_refused_and_write_nothing() {
    let d = Dir::new();
    let log = d.open().await;
    some_history(&log, "acme").await;
    some_history(&log, "globex").await;
    log.keyring().shred(&t("acme")).await.expect("shred");

    expect_shredded(
        log.append(post("acme", "general", "late", "x")).await,
        "acme",
    );
    expect_shredded(create(&log, "acme", "fresh").await, "acme");
    // In one batch with another tenant's append: only acme's is refused.
    let refused = log
        .enqueue(post("acme", "general", "batched", "x"))
        .await
        .expect("queue");
    let accepted = log
        .enqueue(post("globex", "general", "batched", "y"))
        .await
        .expect("queue");
    expect_shredded(refused.wait().await, "acme");
    assert_eq!(accepted.wait().await.expect("globex append").seq, 4);

    let head = log
        .conversation(&t("acme"), &c("general"))
        .await
        .expect("head");
    assert_eq!(head.head_seq, 3, "no event was written");
    assert!(
        log.conversation(&t("acme"), &c("fresh")).await.is_err(),
        "no conversation was created"
    );
    assert_eq!(
        wrapped_key(&log, "acme", 1).await,
        None,
        "no fresh key 1 either"
    );
    log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_reopened_after_a_shred_still_refuses_the_tenant() {
    let d = Dir::new();
    let log = d.open().await;
    some_history(&log, "acme").await;
    some_history(&log, "globex").await;
    log.keyring().shred(&t("acme")).await.expect("shred");
    log.close().await;

    let log = d.open().await;
    expect_shredded(read_texts(&log, "acme", "general").await, "acme");
    expect_shredded(
        log.append(post("acme", "general", "late", "x")).await,
        "acme",
    );
    expect_shredded(log.keyring().current(&t("acme")).await, "acme");
    assert!(log.keyring().is_shredded(&t("acme")).await.expect("marker"));
    assert!(
        !log.keyring()
            .is_shredded(&t("globex"))
            .await
            .expect("marker")
    );
    assert_eq!(
        read_texts(&log, "globex", "general").await.expect("globex"),
        ["globex 0", "globex 1"]
    );
    log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_file_keeps_a_shredded_tenants_wrapped_keys() {
    let d = Dir::new();
    let log = d.open().await;
    some_history(&log, "acme").await;
    some_history(&log, "globex").await;
    let acme = wrapped_key(&log, "acme", 1)
        .await
        .expect("acme key")
        .wrapped;
    let globex = wrapped_key(&log, "globex", 1)
        .await
        .expect("globex key")
        .wrapped;
    assert!(
        !files_containing(&d.data(), &acme).is_empty(),
        "the search finds the key before the shred"
    );

    log.keyring().shred(&t("acme")).await.expect("shred");
    let left = files_containing(&d.data(), &acme);
    assert!(left.is_empty(), "acme's wrapped key is still in {left:?}");
    assert!(!files_containing(&d.data(), &globex).is_empty());
    log.close().await;

    // Nor after a reopen (which replays the journal), and globex still opens.
    let log = d.open().await;
    assert!(files_containing(&d.data(), &acme).is_empty());
    assert_eq!(
        read_texts(&log, "globex", "general").await.expect("globex"),
        ["globex 0", "globex 1"]
    );
    log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_key_still_opens_after_a_shred() {
    let d = Dir::new();
    let log = d.open().await;
    some_history(&log, "acme").await;
    let ad: [&[u8]; 2] = [b"test-audit-v1", b"acme"];
    let sealed = log
        .keyring()
        .audit_key()
        .await
        .expect("audit key")
        .seal(&ad, b"alice read acme/general");
    log.keyring().shred(&t("acme")).await.expect("shred");
    log.close().await;

    let log = d.open().await;
    let audit = log.keyring().audit_key().await.expect("audit key after");
    assert_eq!(
        audit.open(&ad, &sealed).expect("opens"),
        b"alice read acme/general"
    );
    log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_under_a_tenant_key_reads_with_it_and_is_refused_without_it_or_with_another() {
    let d = Dir::new();
    let key = TenantKey::generate();
    let file = key_file(d.path(), "acme.key", &key);
    let log = d.open_with(from_file("acme", &file)).await.expect("open");
    some_history(&log, "acme").await;
    some_history(&log, "globex").await;
    log.keyring().rotate(&t("acme")).await.expect("rotate");
    for id in [1, 2] {
        let stored = wrapped_key(&log, "acme", id).await.expect("acme key");
        assert!(stored.tenant_layer, "acme key {id} is double-wrapped");
    }
    assert!(
        !wrapped_key(&log, "globex", 1)
            .await
            .expect("key")
            .tenant_layer
    );
    log.close().await;

    let log = d.open_with(from_file("acme", &file)).await.expect("open");
    assert_eq!(
        read_texts(&log, "acme", "general")
            .await
            .expect("with the key"),
        ["acme 0", "acme 1"]
    );
    log.close().await;

    let log = d.open().await;
    match read_texts(&log, "acme", "general").await {
        Err(e @ LogError::TenantKeyUnavailable { .. }) => {
            assert_eq!(e.code(), "tenant_key_unavailable");
            assert!(e.to_string().contains("no tenant key is configured"), "{e}");
        }
        other => panic!("expected TenantKeyUnavailable, got {other:?}"),
    }
    assert_eq!(
        read_texts(&log, "globex", "general").await.expect("globex"),
        ["globex 0", "globex 1"]
    );
    log.close().await;

    let other = key_file(d.path(), "other.key", &TenantKey::generate());
    let log = d.open_with(from_file("acme", &other)).await.expect("open");
    match read_texts(&log, "acme", "general").await {
        Err(e @ LogError::WrongTenantKey { .. }) => assert_eq!(e.code(), "wrong_tenant_key"),
        other => panic!("expected WrongTenantKey, got {other:?}"),
    }
    match log.append(post("acme", "general", "m9", "x")).await {
        Err(LogError::WrongTenantKey { .. }) => {}
        other => panic!("expected WrongTenantKey, got {other:?}"),
    }
    log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapping_existing_keys_then_destroying_the_tenant_key_makes_history_unreadable() {
    let d = Dir::new();
    let log = d.open().await;
    some_history(&log, "acme").await;
    let single = wrapped_key(&log, "acme", 1).await.expect("key");
    assert!(!single.tenant_layer);
    log.close().await;

    let file = key_file(d.path(), "acme.key", &TenantKey::generate());
    let log = d.open_with(from_file("acme", &file)).await.expect("open");
    let report = log
        .keyring()
        .wrap_with_tenant_key(&t("acme"))
        .await
        .expect("wrap");
    assert_eq!(report.wrapped, vec![1]);
    assert!(report.already_wrapped.is_empty());
    let double = wrapped_key(&log, "acme", 1).await.expect("key");
    assert!(double.tenant_layer);
    let left = files_containing(&d.data(), &single.wrapped);
    assert!(
        left.is_empty(),
        "the single-wrapped copy is still in {left:?}"
    );
    // The data key did not change: old events open, new ones seal with it.
    log.append(post("acme", "general", "m2", "acme 2"))
        .await
        .expect("append");
    assert_eq!(
        read_texts(&log, "acme", "general").await.expect("read"),
        ["acme 0", "acme 1", "acme 2"]
    );
    let again = log
        .keyring()
        .wrap_with_tenant_key(&t("acme"))
        .await
        .expect("wrap again");
    assert_eq!(
        (again.wrapped, again.already_wrapped),
        (vec![], vec![1]),
        "a second wrap changes nothing"
    );
    log.close().await;

    std::fs::remove_file(&file).expect("destroy the tenant key");
    let log = d.open_with(from_file("acme", &file)).await.expect("open");
    match read_texts(&log, "acme", "general").await {
        Err(e @ LogError::TenantKeyUnavailable { .. }) => {
            assert!(e.to_string().contains("does not exist"), "{e}");
            assert!(!e.is_retryable());
        }
        other => panic!("expected TenantKeyUnavailable, got {other:?}"),
    }
    log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrap_refuses_a_tenant_without_a_tenant_key_and_a_key_other_than_the_one_used() {
    let d = Dir::new();
    let file = key_file(d.path(), "acme.key", &TenantKey::generate());
    let log = d.open_with(from_file("acme", &file)).await.expect("open");
    some_history(&log, "acme").await;
    some_history(&log, "globex").await;
    match log.keyring().wrap_with_tenant_key(&t("globex")).await {
        Err(e @ LogError::TenantKeyUnavailable { .. }) => {
            assert!(e.to_string().contains("[keys.tenants.globex]"), "{e}")
        }
        other => panic!("expected TenantKeyUnavailable, got {other:?}"),
    }
    assert!(
        !wrapped_key(&log, "globex", 1)
            .await
            .expect("key")
            .tenant_layer
    );
    log.close().await;

    let other = key_file(d.path(), "other.key", &TenantKey::generate());
    let log = d.open_with(from_file("acme", &other)).await.expect("open");
    match log.keyring().wrap_with_tenant_key(&t("acme")).await {
        Err(LogError::WrongTenantKey { .. }) => {}
        other => panic!("expected WrongTenantKey, got {other:?}"),
    }
    log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_key_from_a_command_seals_and_opens() {
    let d = Dir::new();
    let key = TenantKey::generate();
    let mut sources = TenantKeys::default();
    sources.insert(
        t("acme"),
        TenantKeySource::Command {
            command: format!("printf '%s\\n' {}", key.to_hex()),
            timeout: Duration::from_secs(10),
        },
    );
    let log = d.open_with(sources.clone()).await.expect("open");
    some_history(&log, "acme").await;
    assert!(
        wrapped_key(&log, "acme", 1)
            .await
            .expect("key")
            .tenant_layer
    );
    log.close().await;
    let log = d.open_with(sources).await.expect("open");
    assert_eq!(
        read_texts(&log, "acme", "general").await.expect("read"),
        ["acme 0", "acme 1"]
    );
    log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shred_needs_no_tenant_key_and_destroys_double_wrapped_keys_too() {
    let d = Dir::new();
    let file = key_file(d.path(), "acme.key", &TenantKey::generate());
    let log = d.open_with(from_file("acme", &file)).await.expect("open");
    some_history(&log, "acme").await;
    let wrapped = wrapped_key(&log, "acme", 1).await.expect("key").wrapped;
    log.close().await;

    std::fs::remove_file(&file).expect("the tenant key is gone already");
    let log = d.open().await;
    let report = log.keyring().shred(&t("acme")).await.expect("shred");
    assert_eq!(report.key_ids, vec![1]);
    assert!(files_containing(&d.data(), &wrapped).is_empty());
    expect_shredded(read_texts(&log, "acme", "general").await, "acme");
    log.close().await;
}
