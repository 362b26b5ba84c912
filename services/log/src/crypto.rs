//! Sealing at rest: AES-256-SIV (RFC 5297) under per-tenant data keys.
//!
//! Key hierarchy: a master key (KEK, 64 bytes, from a file or an env var, never stored in the
//! KV) wraps each tenant's data keys, stored at `kr/<tenant>/<key_id>`. Every sealed event
//! records the id of the key that sealed it, so rotation only adds a key: new events use the
//! newest, old ones still open with theirs.
//!
//! A tenant may hold a key of its own ([`TenantKey`], from a file or a command, see
//! [`TenantKeys`]): its data keys are then sealed under it first
//! (`["tidings-kr-tenant-v1", tenant, key_id]`) and wrapped by the master key around that, so
//! opening them needs both. Destroying either the tenant key or (with `shred`) the stored data
//! keys makes the tenant's history unreadable for good.
//!
//! SIV takes a vector of associated data. An event's AD is
//! `["tidings-ev-v1", tenant, conversation, key_id, seq]`, so a ciphertext copied to another
//! row (another seq, conversation or tenant) or relabelled with another key id fails to
//! open, and the same text at two positions seals to different bytes. SIV is deterministic
//! and misuse-resistant: no nonce to get wrong, and a (tenant, conversation, seq) position is
//! sealed once, ever.
//!
//! **Transport keys** seal what travels on NATS (events on the stream, log RPC calls). A
//! tenant's transport key with id `n` is `HMAC-SHA512(data key n, "tidings-transport-v1" ||
//! tenant || n)`: 64 bytes, an AES-256-SIV key of its own. It is derived, never stored, so
//! every data key id still has its transport key (events in flight across a rotation open),
//! a shredded tenant has none, and holding a transport key opens nothing at rest: HMAC is
//! one-way, so the data key cannot be recovered from it. Gateways get transport keys, never
//! data keys or the master key.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

use hmac::{Hmac, Mac};
use prost::Message;
use tidings_schemas::storage::{Shredded, WrappedKey};

use crate::error::LogError;
use crate::ids::{ConvId, TenantId};
use crate::keys;
use crate::store::{KeyRange, KvStore, Order, StoreError, Transaction};
pub use crate::tenant_keys::{TenantKey, TenantKeySource, TenantKeys};
pub use tidings_log_api::crypto::{
    INLINE_CRYPTO_BYTES, KEY_LEN, TransportKey, hex_decode, hex_encode, is_large,
    off_runtime_if_large, open_for_shared, seal_for_shared,
};
use tidings_log_api::crypto::{Secret, hmac_sha512, random_secret, secret_from_hex, siv};

/// The key-encryption key. Never written to the KV.
pub struct MasterKey(Secret);

impl MasterKey {
    /// The log's long-term X25519 secret, derived from the master key so every log process
    /// of a deployment has the same one and nothing new needs storing. Gateways pin its public
    /// half (`tidings keys log-identity`): a transport key reply that this secret did not make
    /// does not open for them, so whoever can publish on NATS cannot pose as the log.
    pub fn log_identity_secret(&self) -> [u8; 32] {
        let derived = hmac_sha512(&self.0.0, &[LOG_IDENTITY_LABEL]);
        let mut out = [0u8; 32];
        out.copy_from_slice(&derived.0[..32]);
        out
    }

    /// The Ed25519 seed of tidings's bot tokens (docs/decisions/bots.md), derived from the
    /// master key like the log identity: every process with the master key signs and checks
    /// the same bot tokens; gateways apart pin its public half (`tidings keys bot-identity`).
    pub fn bot_signing_seed(&self) -> [u8; 32] {
        let derived = hmac_sha512(&self.0.0, &[BOT_SIGNING_LABEL]);
        let mut out = [0u8; 32];
        out.copy_from_slice(&derived.0[..32]);
        out
    }

    pub fn generate() -> Self {
        MasterKey(random_secret())
    }

    /// Parses the key file format: 128 hex digits, surrounding whitespace ignored.
    pub fn from_hex(text: &str) -> Result<Self, String> {
        secret_from_hex(text).map(MasterKey)
    }

    pub fn to_hex(&self) -> String {
        hex_encode(&self.0.0)
    }

    /// Reads a key file written by `tidings keys init`.
    pub fn from_file(path: &Path) -> Result<Self, LogError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LogError::MasterKeyMissing {
                    path: path.display().to_string(),
                });
            }
            Err(e) => {
                return Err(LogError::MasterKeyMalformed {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                });
            }
        };
        Self::from_hex(&text).map_err(|reason| LogError::MasterKeyMalformed {
            path: path.display().to_string(),
            reason,
        })
    }
}

/// The key two cells share to hand each other the data keys of the tenants one replicates to
/// the other (`[cell] link_key_file`; same format as the master key). Data keys cross only
/// sealed under it, bound to tenant and key id; each cell wraps them under its own master key.
pub struct LinkKey(Secret);

impl LinkKey {
    pub fn from_hex(text: &str) -> Result<Self, String> {
        secret_from_hex(text).map(LinkKey)
    }

    /// Reads a key file (128 hex digits; `tidings keys init --file` writes one).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the cell link key {}: {e}", path.display()))?;
        Self::from_hex(&text).map_err(|e| format!("cell link key {}: {e}", path.display()))
    }

    /// HMAC-SHA256 of `data` under the link key, bound to `label`: what proves a replica
    /// batch or a directory entry comes from a cell that holds the key, not merely from
    /// someone who can publish on the link account.
    pub fn mac(&self, label: &[u8], data: &[u8]) -> Vec<u8> {
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.0.0)
            .expect("HMAC takes keys of any length");
        mac.update(&(label.len() as u32).to_be_bytes());
        mac.update(label);
        mac.update(data);
        mac.finalize().into_bytes().to_vec()
    }

    /// Checks a [`LinkKey::mac`] in constant time.
    pub fn verify(&self, label: &[u8], data: &[u8], tag: &[u8]) -> bool {
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.0.0)
            .expect("HMAC takes keys of any length");
        mac.update(&(label.len() as u32).to_be_bytes());
        mac.update(label);
        mac.update(data);
        mac.verify_slice(tag).is_ok()
    }

    fn ad(tenant: &TenantId, key_id: u32) -> [Vec<u8>; 3] {
        [
            b"tidings-cell-key-v1".to_vec(),
            tenant.as_str().as_bytes().to_vec(),
            key_id.to_be_bytes().to_vec(),
        ]
    }
}

/// A tenant data key.
#[derive(Clone)]
pub struct DataKey {
    pub id: u32,
    secret: Arc<Secret>,
}

/// Shows the id only, never the key.
impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

const KEY_CHECK_PLAINTEXT: &[u8] = b"tidings master key check, version 1";

/// The associated-data vector of an event: its row and key. Numbers are big-endian; the
/// caller keeps them alive on its stack.
fn event_ad<'a>(
    tenant: &'a TenantId,
    conv: &'a ConvId,
    key_id: &'a [u8; 4],
    seq: &'a [u8; 8],
) -> [&'a [u8]; 5] {
    [
        b"tidings-ev-v1",
        tenant.as_str().as_bytes(),
        conv.as_str().as_bytes(),
        key_id,
        seq,
    ]
}

impl DataKey {
    /// Seals `plain` bound to the associated-data vector `ad`. Every kind of sealed value
    /// starts its AD with its own label (`tidings-ev-v1`, ...), so one kind can never be
    /// opened as another.
    pub fn seal(&self, ad: &[&[u8]], plain: &[u8]) -> Vec<u8> {
        self.secret.seal(ad, plain)
    }

    /// Opens a value sealed by [`DataKey::seal`] with the same AD; fails if anything differs
    /// or the bytes were altered.
    pub fn open(&self, ad: &[&[u8]], sealed: &[u8]) -> Result<Vec<u8>, aes_siv::Error> {
        self.secret.open(ad, sealed)
    }

    /// Seals an encoded event for its row.
    pub fn seal_event(&self, tenant: &TenantId, conv: &ConvId, seq: u64, plain: &[u8]) -> Vec<u8> {
        let (key_id, seq) = (self.id.to_be_bytes(), seq.to_be_bytes());
        self.seal(&event_ad(tenant, conv, &key_id, &seq), plain)
    }

    /// Opens a sealed event; fails if it was sealed for another row or key, or was altered.
    pub fn open_event(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        seq: u64,
        sealed: &[u8],
    ) -> Result<Vec<u8>, aes_siv::Error> {
        let (key_id, seq) = (self.id.to_be_bytes(), seq.to_be_bytes());
        self.open(&event_ad(tenant, conv, &key_id, &seq), sealed)
    }
}

/// The label every search key derivation starts with.
const SEARCH_LABEL: &[u8] = b"tidings-search-v1";

impl DataKey {
    /// The tenant's key for search term tags of this id: the first 32 bytes of
    /// `HMAC-SHA512(data key, "tidings-search-v1" || tenant || id)`. Derived, never stored:
    /// shredding the data key leaves no way to compute a tag, and a search key opens nothing
    /// (HMAC is one-way).
    pub fn search_key(&self, tenant: &TenantId) -> crate::search::SearchKey {
        let id = self.id.to_be_bytes();
        let derived = hmac_sha512(
            &self.secret.0,
            &[SEARCH_LABEL, tenant.as_str().as_bytes(), &id],
        );
        crate::search::SearchKey::from_secret(self.id, &derived.0[..32])
    }

    /// The tenant's transport key of this id (what travels on NATS is sealed under it).
    pub fn transport_key(&self, tenant: &TenantId) -> TransportKey {
        TransportKey::derive(tenant, self.id, &self.secret)
    }
}

/// Domain separation of the log identity derived from the master key.
const LOG_IDENTITY_LABEL: &[u8] = b"tidings-log-identity-v1";
const BOT_SIGNING_LABEL: &[u8] = b"tidings-bot-tokens-v1";

/// One tenant's keys, as this process knows them.
#[derive(Clone)]
enum TenantState {
    Keys(BTreeMap<u32, DataKey>),
    /// `ks/<tenant>` exists: the keys were destroyed.
    Shredded,
}

/// What [`Keyring::shred`] destroyed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShredReport {
    pub tenant: TenantId,
    /// The ids of the data key versions deleted by this call (empty if an earlier shred
    /// already had).
    pub key_ids: Vec<u32>,
    /// The tenant had been shredded before this call.
    pub already_shredded: bool,
}

/// What [`Keyring::wrap_with_tenant_key`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrapReport {
    pub tenant: TenantId,
    /// Key versions that gained the tenant layer.
    pub wrapped: Vec<u32>,
    /// Key versions that had it already.
    pub already_wrapped: Vec<u32>,
}

/// How many times a shred or wrap re-reads the tenant's keys after losing a race with a
/// concurrent key creation before it gives up.
const KEY_RACE_RETRIES: usize = 10;

/// Data keys of all tenants, unwrapped on first use and cached.
pub struct Keyring {
    master: MasterKey,
    store: Arc<dyn KvStore>,
    tenants: RwLock<HashMap<TenantId, TenantState>>,
    audit: tokio::sync::OnceCell<DataKey>,
    /// Where each tenant with a tenant-held key gets it.
    sources: TenantKeys,
    /// Tenant-held keys fetched so far. Never written anywhere.
    tenant_keys: RwLock<HashMap<TenantId, Arc<TenantKey>>>,
    /// One fetch of a tenant's key at a time (a key command runs once, not once per waiting
    /// reader).
    fetching: tokio::sync::Mutex<()>,
}

impl Keyring {
    /// Checks that `master` is the key this store was first used with (recording it on a
    /// fresh store), so a wrong key fails at once with [`LogError::WrongMasterKey`] rather than
    /// at the first read.
    pub async fn open(store: Arc<dyn KvStore>, master: MasterKey) -> Result<Self, LogError> {
        let ad = [b"tidings-key-check".as_slice()];
        match store.get(keys::KEY_CHECK).await? {
            Some(sealed) => {
                let plain = siv(&master.0)
                    .decrypt(ad, &sealed)
                    .map_err(|_| LogError::WrongMasterKey)?;
                if plain != KEY_CHECK_PLAINTEXT {
                    return Err(LogError::WrongMasterKey);
                }
            }
            None => {
                let sealed = siv(&master.0)
                    .encrypt(ad, KEY_CHECK_PLAINTEXT)
                    .expect("sealing in memory cannot fail");
                let mut txn = Transaction::new();
                txn.put_if_absent(keys::KEY_CHECK.to_vec(), sealed);
                match store.commit(txn).await {
                    // Another opener recorded its key first: check ours against it.
                    Err(StoreError::Conflict { .. }) => {
                        return Box::pin(Self::open(store, master)).await;
                    }
                    other => other?,
                }
            }
        }
        Ok(Keyring {
            master,
            store,
            tenants: RwLock::new(HashMap::new()),
            audit: tokio::sync::OnceCell::new(),
            sources: TenantKeys::default(),
            tenant_keys: RwLock::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// The log's long-term X25519 secret ([`MasterKey::log_identity_secret`]).
    pub fn log_identity_secret(&self) -> [u8; 32] {
        self.master.log_identity_secret()
    }

    /// The bot tokens' signing seed ([`MasterKey::bot_signing_seed`]).
    pub fn bot_signing_seed(&self) -> [u8; 32] {
        self.master.bot_signing_seed()
    }

    /// Where tenants with a tenant-held key get it. New data keys of those tenants are
    /// sealed under it before the master key wraps them; their existing double-wrapped keys
    /// need it to open.
    pub fn with_tenant_keys(mut self, sources: TenantKeys) -> Self {
        self.sources = sources;
        self
    }

    /// The store-wide audit key (`sy/audit_key`, wrapped by the master key, created on first
    /// use). It seals audit records and legal holds: they belong to no tenant's data key, so
    /// shredding a tenant leaves the record of who looked and what was held readable.
    pub async fn audit_key(&self) -> Result<DataKey, LogError> {
        self.audit
            .get_or_try_init(|| async {
                let ad = [b"tidings-audit-key-v1".as_slice()];
                loop {
                    if let Some(wrapped) = self.store.get(keys::AUDIT_KEY).await? {
                        let raw = siv(&self.master.0)
                            .decrypt(ad, &wrapped)
                            .map_err(|_| LogError::WrongMasterKey)?;
                        let bytes: [u8; KEY_LEN] = raw.as_slice().try_into().map_err(|_| {
                            LogError::corrupt(keys::AUDIT_KEY, "audit key is not 64 bytes")
                        })?;
                        return Ok(DataKey {
                            id: 0,
                            secret: Arc::new(Secret(bytes)),
                        });
                    }
                    let secret = random_secret();
                    let wrapped = siv(&self.master.0)
                        .encrypt(ad, &secret.0)
                        .expect("sealing in memory cannot fail");
                    let mut txn = Transaction::new();
                    txn.put_if_absent(keys::AUDIT_KEY.to_vec(), wrapped);
                    match self.store.commit(txn).await {
                        // Another opener created it first: use theirs.
                        Ok(()) | Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            })
            .await
            .cloned()
    }

    /// The AD of the master key's wrap. A double-wrapped key says so in it, so flipping the
    /// stored `tenant_layer` flag makes the wrap fail to open instead of misreading it.
    fn wrap_ad(tenant: &TenantId, key_id: u32, tenant_layer: bool) -> Vec<Vec<u8>> {
        let mut ad = vec![
            b"tidings-kr-v1".to_vec(),
            tenant.as_str().as_bytes().to_vec(),
            key_id.to_be_bytes().to_vec(),
        ];
        if tenant_layer {
            ad.push(b"tenant-layer".to_vec());
        }
        ad
    }

    /// The AD of the tenant key's seal, the inner layer of a double-wrapped data key.
    fn tenant_layer_ad(tenant: &TenantId, key_id: u32) -> [Vec<u8>; 3] {
        [
            b"tidings-kr-tenant-v1".to_vec(),
            tenant.as_str().as_bytes().to_vec(),
            key_id.to_be_bytes().to_vec(),
        ]
    }

    fn shredded_error(tenant: &TenantId) -> LogError {
        LogError::TenantShredded {
            tenant: tenant.to_string(),
        }
    }

    fn cached(&self, tenant: &TenantId) -> Option<TenantState> {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .cloned()
    }

    /// Every data key the tenant has (none created), oldest first: what a search computes
    /// term tags under, since postings made under older keys remain.
    pub async fn all_keys(&self, tenant: &TenantId) -> Result<Vec<DataKey>, LogError> {
        Ok(self.keys_of(tenant).await?.into_values().collect())
    }

    /// The tenant's data keys, from the cache or the store.
    async fn keys_of(&self, tenant: &TenantId) -> Result<BTreeMap<u32, DataKey>, LogError> {
        match self.cached(tenant) {
            Some(TenantState::Keys(keys)) => Ok(keys),
            Some(TenantState::Shredded) => Err(Self::shredded_error(tenant)),
            None => self.load(tenant).await,
        }
    }

    /// Whether the tenant was shredded (checked in the store unless known).
    pub async fn is_shredded(&self, tenant: &TenantId) -> Result<bool, LogError> {
        match self.cached(tenant) {
            Some(TenantState::Shredded) => Ok(true),
            Some(TenantState::Keys(_)) => Ok(false),
            None => Ok(self.store.get(&keys::shredded(tenant)).await?.is_some()),
        }
    }

    /// The tenant's data key rows as stored.
    async fn stored_keys(&self, tenant: &TenantId) -> Result<Vec<(u32, WrappedKey)>, LogError> {
        let rows = self
            .store
            .scan(
                KeyRange::prefix(keys::data_key_dir(tenant)),
                u16::MAX as usize,
                Order::Ascending,
            )
            .await?;
        rows.into_iter()
            .map(|(key, value)| {
                let id = keys::data_key_id(&key)
                    .ok_or_else(|| LogError::corrupt(&key, "key id is not 4 bytes"))?;
                let wrapped =
                    WrappedKey::decode(value.as_slice()).map_err(|e| LogError::corrupt(&key, e))?;
                Ok((id, wrapped))
            })
            .collect()
    }

    /// Loads and unwraps every key of the tenant from the store. Refuses a shredded tenant:
    /// the marker is checked here, on every cache miss, so a process that opened the store
    /// after a shred refuses too.
    async fn load(&self, tenant: &TenantId) -> Result<BTreeMap<u32, DataKey>, LogError> {
        if self.store.get(&keys::shredded(tenant)).await?.is_some() {
            self.remember(tenant, TenantState::Shredded);
            return Err(Self::shredded_error(tenant));
        }
        let mut found = BTreeMap::new();
        for (id, wrapped) in self.stored_keys(tenant).await? {
            let secret = self.unwrap_key(tenant, id, &wrapped).await?;
            found.insert(
                id,
                DataKey {
                    id,
                    secret: Arc::new(secret),
                },
            );
        }
        let mut tenants = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        // A shred that landed while we read must win over what we read before it.
        if let Some(TenantState::Shredded) = tenants.get(tenant) {
            return Err(Self::shredded_error(tenant));
        }
        // A tenant with no keys is not remembered: ids anyone can make up must not grow the
        // cache (it is read again next time, which is one scan of nothing).
        if !found.is_empty() {
            tenants.insert(tenant.clone(), TenantState::Keys(found.clone()));
        }
        Ok(found)
    }

    fn remember(&self, tenant: &TenantId, state: TenantState) {
        self.tenants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.clone(), state);
    }

    /// Opens a stored data key: the master key's wrap, then (for a double-wrapped key) the
    /// tenant key's seal. The master key was checked when the keyring opened, so a wrap that
    /// does not open is damage; an inner seal that does not open (the outer one having
    /// authenticated its bytes) means the tenant key is not the one that sealed it.
    async fn unwrap_key(
        &self,
        tenant: &TenantId,
        id: u32,
        wrapped: &WrappedKey,
    ) -> Result<Secret, LogError> {
        let row = keys::data_key(tenant, id);
        let outer = siv(&self.master.0)
            .decrypt(
                Self::wrap_ad(tenant, id, wrapped.tenant_layer),
                &wrapped.wrapped,
            )
            .map_err(|_| {
                LogError::corrupt(
                    &row,
                    "the wrapped data key does not open under the master key",
                )
            })?;
        let raw = if wrapped.tenant_layer {
            let tenant_key = self.tenant_key(tenant).await?;
            siv(&tenant_key.0)
                .decrypt(Self::tenant_layer_ad(tenant, id), &outer)
                .map_err(|_| LogError::WrongTenantKey {
                    tenant: tenant.to_string(),
                })?
        } else {
            outer
        };
        let bytes: [u8; KEY_LEN] = raw
            .as_slice()
            .try_into()
            .map_err(|_| LogError::corrupt(&row, "data key is not 64 bytes"))?;
        Ok(Secret(bytes))
    }

    /// Wraps a data key for storage: under the tenant key first if the tenant has one
    /// configured, then under the master key.
    async fn wrap_key(
        &self,
        tenant: &TenantId,
        id: u32,
        secret: &Secret,
    ) -> Result<WrappedKey, LogError> {
        let tenant_layer = self.sources.get(tenant).is_some();
        let inner = if tenant_layer {
            let tenant_key = self.tenant_key(tenant).await?;
            siv(&tenant_key.0)
                .encrypt(Self::tenant_layer_ad(tenant, id), &secret.0)
                .expect("sealing in memory cannot fail")
        } else {
            secret.0.to_vec()
        };
        let wrapped = siv(&self.master.0)
            .encrypt(Self::wrap_ad(tenant, id, tenant_layer), &inner)
            .expect("sealing in memory cannot fail");
        Ok(WrappedKey {
            wrapped,
            created_ms: crate::now_ms(),
            tenant_layer,
        })
    }

    /// The tenant-held key, fetched from its configured source on first use and kept in
    /// memory only.
    async fn tenant_key(&self, tenant: &TenantId) -> Result<Arc<TenantKey>, LogError> {
        let cached = || {
            self.tenant_keys
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(tenant)
                .cloned()
        };
        if let Some(key) = cached() {
            return Ok(key);
        }
        let unavailable = |reason: String| LogError::TenantKeyUnavailable {
            tenant: tenant.to_string(),
            reason,
        };
        let source = self.sources.get(tenant).ok_or_else(|| {
            unavailable(format!(
                "no tenant key is configured for it (set key_file or key_command in \
                 [keys.tenants.{tenant}])"
            ))
        })?;
        let _one_at_a_time = self.fetching.lock().await;
        if let Some(key) = cached() {
            return Ok(key);
        }
        let key = Arc::new(source.fetch().await.map_err(unavailable)?);
        self.tenant_keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.clone(), key.clone());
        Ok(key)
    }

    /// Data key `key_id` of the tenant sealed under the cells' link key, for its DR cell.
    pub async fn export_linked(
        &self,
        tenant: &TenantId,
        key_id: u32,
        link: &LinkKey,
    ) -> Result<Vec<u8>, LogError> {
        let key = self.key(tenant, key_id).await?;
        Ok(siv(&link.0)
            .encrypt(LinkKey::ad(tenant, key_id), &key.secret.0)
            .expect("sealing in memory cannot fail"))
    }

    /// Stores a data key a home cell sent sealed under the link key, wrapped under this
    /// cell's master key (and the tenant's own key, if one is configured here), unless the
    /// tenant has it already.
    pub async fn import_linked(
        &self,
        tenant: &TenantId,
        key_id: u32,
        sealed: &[u8],
        link: &LinkKey,
    ) -> Result<(), LogError> {
        if self
            .keys_of(tenant)
            .await
            .is_ok_and(|k| k.contains_key(&key_id))
        {
            return Ok(());
        }
        let raw = siv(&link.0)
            .decrypt(LinkKey::ad(tenant, key_id), sealed)
            .map_err(|_| {
                LogError::NotAllowed("a data key that the cell link key does not open".into())
            })?;
        let bytes: [u8; KEY_LEN] = raw
            .as_slice()
            .try_into()
            .map_err(|_| LogError::InvalidRequest("a linked data key is not 64 bytes".into()))?;
        let record = self.wrap_key(tenant, key_id, &Secret(bytes)).await?;
        let mut txn = Transaction::new();
        txn.expect(keys::shredded(tenant), None)
            .put_if_absent(keys::data_key(tenant, key_id), record.encode_to_vec());
        match self.store.commit(txn).await {
            Ok(()) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        // Read again next time, with the new key.
        self.tenants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
        Ok(())
    }

    /// The key an event sealed with `key_id` opens with.
    pub async fn key(&self, tenant: &TenantId, key_id: u32) -> Result<DataKey, LogError> {
        if let Some(TenantState::Keys(keys)) = self.cached(tenant)
            && let Some(k) = keys.get(&key_id)
        {
            return Ok(k.clone());
        }
        if let Some(TenantState::Shredded) = self.cached(tenant) {
            return Err(Self::shredded_error(tenant));
        }
        let keys = self.load(tenant).await?;
        if let Some(k) = keys.get(&key_id) {
            return Ok(k.clone());
        }
        // A shred between our marker check and our scan leaves no keys and the marker.
        if self.store.get(&keys::shredded(tenant)).await?.is_some() {
            self.remember(tenant, TenantState::Shredded);
            return Err(Self::shredded_error(tenant));
        }
        Err(LogError::Corrupt {
            key: format!("kr/{tenant}/{key_id}"),
            reason: "the data key an event names does not exist".into(),
        })
    }

    /// The tenant's transport key with `key_id`, or of its newest data key (created if the
    /// tenant has none yet). A shredded tenant has none ([`LogError::TenantShredded`]); an id
    /// the tenant never had is [`LogError::InvalidRequest`].
    pub async fn transport_key(
        &self,
        tenant: &TenantId,
        key_id: Option<u32>,
    ) -> Result<TransportKey, LogError> {
        let data = match key_id {
            None => self.current(tenant).await?,
            Some(id) => {
                let keys = self.keys_of(tenant).await?;
                match keys.get(&id) {
                    Some(k) => k.clone(),
                    // Maybe created by another process since we cached the tenant's keys.
                    None => self.load(tenant).await?.get(&id).cloned().ok_or_else(|| {
                        LogError::InvalidRequest(format!(
                            "tenant {tenant} has no transport key {id}"
                        ))
                    })?,
                }
            }
        };
        Ok(data.transport_key(tenant))
    }

    /// The tenant's current transport key if the tenant has a data key already; `None` if
    /// it has none (nothing is created: a gateway asking for a made-up tenant's key must not
    /// make the log write one).
    pub async fn existing_transport_key(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<TransportKey>, LogError> {
        // A tenant without keys is never cached, so this sees keys another process made.
        Ok(self
            .keys_of(tenant)
            .await?
            .last_key_value()
            .map(|(_, k)| k.transport_key(tenant)))
    }

    /// The tenant's newest key, creating the first one if the tenant has none.
    pub async fn current(&self, tenant: &TenantId) -> Result<DataKey, LogError> {
        if let Some((_, k)) = self.keys_of(tenant).await?.last_key_value() {
            return Ok(k.clone());
        }
        self.add_key(tenant, 1).await?;
        self.current_after_add(tenant).await
    }

    async fn current_after_add(&self, tenant: &TenantId) -> Result<DataKey, LogError> {
        self.load(tenant)
            .await?
            .last_key_value()
            .map(|(_, k)| k.clone())
            .ok_or_else(|| LogError::Corrupt {
                key: format!("kr/{tenant}"),
                reason: "a data key just written cannot be read back".into(),
            })
    }

    /// Adds a new newest key for the tenant and returns its id. Events already sealed keep
    /// opening with their own keys.
    pub async fn rotate(&self, tenant: &TenantId) -> Result<u32, LogError> {
        let next = self
            .load(tenant)
            .await?
            .last_key_value()
            .map_or(1, |(id, _)| id + 1);
        self.add_key(tenant, next).await?;
        Ok(self.current_after_add(tenant).await?.id)
    }

    /// Writes key `id` unless it exists (two racing creators agree on whichever landed) or
    /// the tenant was shredded meanwhile (the caller's reload then reports it).
    async fn add_key(&self, tenant: &TenantId, id: u32) -> Result<(), LogError> {
        let secret = random_secret();
        let record = self.wrap_key(tenant, id, &secret).await?;
        let mut txn = Transaction::new();
        txn.expect(keys::shredded(tenant), None)
            .put_if_absent(keys::data_key(tenant, id), record.encode_to_vec());
        match self.store.commit(txn).await {
            Ok(()) | Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Crypto-shreds the tenant: deletes every one of its data keys and writes the `ks/`
    /// marker in one transaction, then purges the store so no file keeps a copy of the
    /// deleted keys. Everything sealed under them (hot events, archived segments) can never
    /// be opened again; [`Keyring::key`] and [`Keyring::current`] refuse the tenant with
    /// [`LogError::TenantShredded`] from now on, here and in every process that opens the
    /// store later. Other tenants and the audit key are untouched. Running it again on a
    /// shredded tenant only purges again.
    pub async fn shred(&self, tenant: &TenantId) -> Result<ShredReport, LogError> {
        let mut attempts = 0;
        let report = loop {
            let marker = self.store.get(&keys::shredded(tenant)).await?;
            let ids: Vec<u32> = self
                .stored_keys(tenant)
                .await?
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            let mut txn = Transaction::new();
            for id in &ids {
                txn.delete(keys::data_key(tenant, *id));
            }
            // A key created after our scan would outlive the shred: it is always the next
            // id, so its absence is part of what we commit on.
            let next = ids.last().map_or(1, |id| id + 1);
            txn.expect(keys::data_key(tenant, next), None);
            match &marker {
                Some(bytes) => txn.expect(keys::shredded(tenant), Some(bytes.clone())),
                None => txn.put(
                    keys::shredded(tenant),
                    Shredded {
                        time_ms: crate::now_ms(),
                        key_versions: ids.len() as u32,
                    }
                    .encode_to_vec(),
                ),
            };
            match self.store.commit(txn).await {
                Ok(()) => {
                    break ShredReport {
                        tenant: tenant.clone(),
                        key_ids: ids,
                        already_shredded: marker.is_some(),
                    };
                }
                Err(StoreError::Conflict { .. }) if attempts < KEY_RACE_RETRIES => attempts += 1,
                Err(e) => return Err(e.into()),
            }
        };
        self.remember(tenant, TenantState::Shredded);
        self.tenant_keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
        self.store.purge_deleted().await?;
        Ok(report)
    }

    /// Gives every data key of the tenant the tenant layer: each is sealed under the tenant
    /// key, then wrapped by the master key again. The data keys themselves do not change, so
    /// nothing sealed under them is touched. Then purges the store so the single-wrapped
    /// copies are gone from its files: from then on, destroying the tenant key makes the
    /// tenant's history unreadable. Refuses a tenant with no tenant key configured, and a
    /// tenant key that does not open keys already wrapped with one.
    pub async fn wrap_with_tenant_key(&self, tenant: &TenantId) -> Result<WrapReport, LogError> {
        let tenant_key = self.tenant_key(tenant).await?;
        let mut attempts = 0;
        let report = loop {
            if self.store.get(&keys::shredded(tenant)).await?.is_some() {
                self.remember(tenant, TenantState::Shredded);
                return Err(Self::shredded_error(tenant));
            }
            let stored = self.stored_keys(tenant).await?;
            let mut txn = Transaction::new();
            txn.expect(keys::shredded(tenant), None);
            let (mut wrapped, mut already_wrapped) = (Vec::new(), Vec::new());
            for (id, record) in &stored {
                // Opening every key also checks a tenant key against keys wrapped before.
                let secret = self.unwrap_key(tenant, *id, record).await?;
                if record.tenant_layer {
                    already_wrapped.push(*id);
                    continue;
                }
                let inner = siv(&tenant_key.0)
                    .encrypt(Self::tenant_layer_ad(tenant, *id), &secret.0)
                    .expect("sealing in memory cannot fail");
                let outer = siv(&self.master.0)
                    .encrypt(Self::wrap_ad(tenant, *id, true), &inner)
                    .expect("sealing in memory cannot fail");
                let row = keys::data_key(tenant, *id);
                txn.expect(row.clone(), Some(record.encode_to_vec()));
                txn.put(
                    row,
                    WrappedKey {
                        wrapped: outer,
                        created_ms: record.created_ms,
                        tenant_layer: true,
                    }
                    .encode_to_vec(),
                );
                wrapped.push(*id);
            }
            let next = stored.last().map_or(1, |(id, _)| id + 1);
            txn.expect(keys::data_key(tenant, next), None);
            match self.store.commit(txn).await {
                Ok(()) => {
                    break WrapReport {
                        tenant: tenant.clone(),
                        wrapped,
                        already_wrapped,
                    };
                }
                Err(StoreError::Conflict { .. }) if attempts < KEY_RACE_RETRIES => attempts += 1,
                Err(e) => return Err(e.into()),
            }
        };
        self.store.purge_deleted().await?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (TenantId, ConvId) {
        (
            TenantId::new("acme").expect("id"),
            ConvId::new("general").expect("id"),
        )
    }

    fn key(id: u32) -> DataKey {
        DataKey {
            id,
            secret: Arc::new(random_secret()),
        }
    }

    #[test]
    fn sealed_event_opens_only_at_its_own_row() {
        let (t, c) = ids();
        let k = key(1);
        let sealed = k.seal_event(&t, &c, 7, b"hello world");
        assert_eq!(
            k.open_event(&t, &c, 7, &sealed).expect("open"),
            b"hello world"
        );
        assert!(
            k.open_event(&t, &c, 8, &sealed).is_err(),
            "moved to another seq"
        );
        let other_conv = ConvId::new("random").expect("id");
        assert!(k.open_event(&t, &other_conv, 7, &sealed).is_err());
        let other_tenant = TenantId::new("globex").expect("id");
        assert!(k.open_event(&other_tenant, &c, 7, &sealed).is_err());
        let relabelled = DataKey {
            id: 2,
            secret: k.secret.clone(),
        };
        assert!(
            relabelled.open_event(&t, &c, 7, &sealed).is_err(),
            "other key id"
        );
    }

    #[test]
    fn same_text_at_two_positions_seals_differently() {
        let (t, c) = ids();
        let k = key(1);
        assert_ne!(
            k.seal_event(&t, &c, 1, b"same text"),
            k.seal_event(&t, &c, 2, b"same text")
        );
    }

    #[test]
    fn tampered_ciphertext_fails_to_open() {
        let (t, c) = ids();
        let k = key(1);
        let mut sealed = k.seal_event(&t, &c, 1, b"do not touch");
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(k.open_event(&t, &c, 1, &sealed).is_err());
    }

    #[test]
    fn transport_keys_are_per_tenant_and_id_and_differ_from_the_data_key() {
        let (t, c) = ids();
        let data = key(1);
        let tk = data.transport_key(&t);
        assert_eq!(tk.id, 1);
        assert!(tk.same_secret(&data.transport_key(&t)), "deterministic");
        let other_tenant = TenantId::new("globex").expect("id");
        assert!(!tk.same_secret(&data.transport_key(&other_tenant)));
        let relabelled = DataKey {
            id: 2,
            secret: data.secret.clone(),
        };
        assert!(!tk.same_secret(&relabelled.transport_key(&t)));
        assert_ne!(tk.secret_bytes_for_tests(), data.secret.0);
        // A transport key does not open what the data key sealed.
        let at_rest = data.seal_event(&t, &c, 1, b"stored");
        let (id, seq) = (1u32.to_be_bytes(), 1u64.to_be_bytes());
        assert!(tk.open(&event_ad(&t, &c, &id, &seq), &at_rest).is_err());
    }

    #[test]
    fn exchanged_transport_key_opens_only_with_the_same_secret_and_transcript() {
        let (t, _) = ids();
        let tk = key(3).transport_key(&t);
        let shared = [7u8; 32];
        let transcript: [&[u8]; 2] = [b"gateway-public", b"log-public"];
        let sealed = tk.seal_for_exchange(&shared, &transcript);
        let raw = tk.secret_bytes_for_tests();
        assert!(
            !sealed.windows(16).any(|w| raw.windows(16).any(|r| r == w)),
            "the sealed key must not contain the key"
        );
        let opened =
            TransportKey::open_from_exchange(&t, 3, &shared, &transcript, &sealed).expect("open");
        assert!(opened.same_secret(&tk));
        assert!(TransportKey::open_from_exchange(&t, 3, &[8u8; 32], &transcript, &sealed).is_err());
        assert!(TransportKey::open_from_exchange(&t, 4, &shared, &transcript, &sealed).is_err());
        let globex = TenantId::new("globex").expect("id");
        assert!(
            TransportKey::open_from_exchange(&globex, 3, &shared, &transcript, &sealed).is_err()
        );
        let other: [&[u8]; 2] = [b"gateway-public", b"mallory-public"];
        assert!(TransportKey::open_from_exchange(&t, 3, &shared, &other, &sealed).is_err());
    }

    #[test]
    fn master_key_hex_round_trips_and_rejects_garbage() {
        let m = MasterKey::generate();
        let again = MasterKey::from_hex(&format!("  {}\n", m.to_hex())).expect("parse");
        assert_eq!(again.to_hex(), m.to_hex());
        assert!(MasterKey::from_hex("abcd").is_err());
        assert!(MasterKey::from_hex(&"zz".repeat(KEY_LEN)).is_err());
        // A key file with one bad digit must not have its other digits quoted back.
        let almost = format!("{}g", &m.to_hex()[1..]);
        let err = TenantKey::from_hex(&almost).err().expect("bad digit");
        assert!(!err.contains(&almost[..8]), "{err}");
    }
}
