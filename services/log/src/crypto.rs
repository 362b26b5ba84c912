//! Sealing at rest: AES-256-SIV (RFC 5297) under per-tenant data keys.
//!
//! Key hierarchy: a master key (KEK, 64 bytes, from a file or an env var, never stored in the
//! KV) wraps each tenant's data keys, stored at `kr/<tenant>/<key_id>`. Every sealed event
//! records the id of the key that sealed it, so rotation only adds a key: new events use the
//! newest, old ones still open with theirs.
//!
//! SIV takes a vector of associated data. An event's AD is
//! `["tidings-ev-v1", tenant, conversation, key_id, seq]`, so a ciphertext copied to another
//! row (another seq, conversation or tenant) or relabelled with another key id fails to
//! open, and the same text at two positions seals to different bytes. SIV is deterministic
//! and misuse-resistant: no nonce to get wrong, and a (tenant, conversation, seq) position is
//! sealed once, ever.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

use aes_siv::KeyInit;
use aes_siv::siv::Aes256Siv;
use prost::Message;
use tidings_schemas::storage::WrappedKey;

use crate::error::LogError;
use crate::ids::{ConvId, TenantId};
use crate::keys;
use crate::store::{KeyRange, KvStore, Order, StoreError, Transaction};

/// AES-256-SIV keys are 64 bytes: a 256-bit MAC key and a 256-bit CTR key.
pub const KEY_LEN: usize = 64;

/// Bytes that are wiped when dropped. Best effort: it keeps keys out of freed heap memory,
/// not out of every register or copy the compiler makes.
struct Secret([u8; KEY_LEN]);

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // black_box keeps the compiler from dropping the wipe as a dead store
            *b = std::hint::black_box(0);
        }
    }
}

fn random_secret() -> Secret {
    let mut bytes = [0u8; KEY_LEN];
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    Secret(bytes)
}

fn siv(key: &Secret) -> Aes256Siv {
    Aes256Siv::new_from_slice(&key.0).expect("AES-256-SIV keys are 64 bytes")
}

/// Lowercase hex, the text form of every key and secret file.
pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses hex (either case); surrounding whitespace is the caller's to trim.
pub fn hex_decode(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err("hex text has an odd number of digits".into());
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{:?} is not hex", String::from_utf8_lossy(pair)))
        })
        .collect()
}

/// The key-encryption key. Never written to the KV.
pub struct MasterKey(Secret);

impl MasterKey {
    pub fn generate() -> Self {
        MasterKey(random_secret())
    }

    /// Parses the key file format: 128 hex digits, surrounding whitespace ignored.
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.len() != KEY_LEN * 2 {
            return Err(format!(
                "expected {} hex digits, found {} characters",
                KEY_LEN * 2,
                text.len()
            ));
        }
        let mut bytes = [0u8; KEY_LEN];
        bytes.copy_from_slice(&hex_decode(text)?);
        Ok(MasterKey(Secret(bytes)))
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

/// A tenant data key.
#[derive(Clone)]
pub struct DataKey {
    pub id: u32,
    secret: Arc<Secret>,
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
        siv(&self.secret)
            .encrypt(ad, plain)
            .expect("AES-SIV encryption of an in-memory buffer cannot fail")
    }

    /// Opens a value sealed by [`DataKey::seal`] with the same AD; fails if anything differs
    /// or the bytes were altered.
    pub fn open(&self, ad: &[&[u8]], sealed: &[u8]) -> Result<Vec<u8>, aes_siv::Error> {
        siv(&self.secret).decrypt(ad, sealed)
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

/// Data keys of all tenants, unwrapped on first use and cached.
pub struct Keyring {
    master: MasterKey,
    store: Arc<dyn KvStore>,
    tenants: RwLock<HashMap<TenantId, BTreeMap<u32, DataKey>>>,
    audit: tokio::sync::OnceCell<DataKey>,
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
        })
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

    fn wrap_ad(tenant: &TenantId, key_id: u32) -> [Vec<u8>; 3] {
        [
            b"tidings-kr-v1".to_vec(),
            tenant.as_str().as_bytes().to_vec(),
            key_id.to_be_bytes().to_vec(),
        ]
    }

    fn cached(&self, tenant: &TenantId) -> Option<BTreeMap<u32, DataKey>> {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .cloned()
    }

    /// Loads and unwraps every key of the tenant from the store.
    async fn load(&self, tenant: &TenantId) -> Result<BTreeMap<u32, DataKey>, LogError> {
        let rows = self
            .store
            .scan(
                KeyRange::prefix(keys::data_key_dir(tenant)),
                u16::MAX as usize,
                Order::Ascending,
            )
            .await?;
        let mut found = BTreeMap::new();
        for (key, value) in rows {
            let id = keys::data_key_id(&key)
                .ok_or_else(|| LogError::corrupt(&key, "key id is not 4 bytes"))?;
            let wrapped =
                WrappedKey::decode(value.as_slice()).map_err(|e| LogError::corrupt(&key, e))?;
            let raw = siv(&self.master.0)
                .decrypt(Self::wrap_ad(tenant, id), &wrapped.wrapped)
                .map_err(|_| LogError::WrongMasterKey)?;
            let bytes: [u8; KEY_LEN] = raw
                .as_slice()
                .try_into()
                .map_err(|_| LogError::corrupt(&key, "data key is not 64 bytes"))?;
            found.insert(
                id,
                DataKey {
                    id,
                    secret: Arc::new(Secret(bytes)),
                },
            );
        }
        self.tenants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.clone(), found.clone());
        Ok(found)
    }

    /// The key an event sealed with `key_id` opens with.
    pub async fn key(&self, tenant: &TenantId, key_id: u32) -> Result<DataKey, LogError> {
        if let Some(k) = self.cached(tenant).and_then(|m| m.get(&key_id).cloned()) {
            return Ok(k);
        }
        let keys = self.load(tenant).await?;
        keys.get(&key_id).cloned().ok_or_else(|| LogError::Corrupt {
            key: format!("kr/{tenant}/{key_id}"),
            reason: "the data key an event names does not exist".into(),
        })
    }

    /// The tenant's newest key, creating the first one if the tenant has none.
    pub async fn current(&self, tenant: &TenantId) -> Result<DataKey, LogError> {
        if let Some(k) = self
            .cached(tenant)
            .and_then(|m| m.last_key_value().map(|(_, k)| k.clone()))
        {
            return Ok(k);
        }
        if let Some((_, k)) = self.load(tenant).await?.last_key_value() {
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

    /// Writes key `id` unless it exists (two racing creators agree on whichever landed).
    async fn add_key(&self, tenant: &TenantId, id: u32) -> Result<(), LogError> {
        let secret = random_secret();
        let wrapped = siv(&self.master.0)
            .encrypt(Self::wrap_ad(tenant, id), &secret.0)
            .expect("sealing in memory cannot fail");
        let record = WrappedKey {
            wrapped,
            created_ms: crate::now_ms(),
        };
        let mut txn = Transaction::new();
        txn.put_if_absent(keys::data_key(tenant, id), record.encode_to_vec());
        match self.store.commit(txn).await {
            Ok(()) | Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
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
    fn master_key_hex_round_trips_and_rejects_garbage() {
        let m = MasterKey::generate();
        let again = MasterKey::from_hex(&format!("  {}\n", m.to_hex())).expect("parse");
        assert_eq!(again.to_hex(), m.to_hex());
        assert!(MasterKey::from_hex("abcd").is_err());
        assert!(MasterKey::from_hex(&"zz".repeat(KEY_LEN)).is_err());
    }
}
