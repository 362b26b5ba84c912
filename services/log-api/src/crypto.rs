//! The crypto both sides of the bus share: AES-256-SIV secrets, HMAC-SHA512 derivations,
//! sealing for an X25519 shared secret, and tenants' transport keys (what travels on NATS is
//! sealed under them). The data keys they derive from, and everything kept in the store,
//! are the log's (`tidings_log::crypto`).

use std::sync::Arc;

use aes_siv::KeyInit;
use aes_siv::siv::Aes256Siv;
use hmac::{Hmac, Mac};

use crate::ids::TenantId;

/// AES-256-SIV keys are 64 bytes: a 256-bit MAC key and a 256-bit CTR key.
pub const KEY_LEN: usize = 64;

/// Bytes that are wiped when dropped (the field is public for the log's key handling, which
/// builds keys from files and unwraps them; nothing else should touch it). Best effort: it keeps keys out of freed heap memory,
/// not out of every register or copy the compiler makes.
pub struct Secret(pub [u8; KEY_LEN]);

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // black_box keeps the compiler from dropping the wipe as a dead store
            *b = std::hint::black_box(0);
        }
    }
}

impl Secret {
    /// AES-256-SIV under this key, bound to `ad`.
    pub fn seal(&self, ad: &[&[u8]], plain: &[u8]) -> Vec<u8> {
        siv(self)
            .encrypt(ad, plain)
            .expect("AES-SIV encryption of an in-memory buffer cannot fail")
    }

    pub fn open(&self, ad: &[&[u8]], sealed: &[u8]) -> Result<Vec<u8>, aes_siv::Error> {
        siv(self).decrypt(ad, sealed)
    }
}

pub fn random_secret() -> Secret {
    let mut bytes = [0u8; KEY_LEN];
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    Secret(bytes)
}

pub fn siv(key: &Secret) -> Aes256Siv {
    Aes256Siv::new_from_slice(&key.0).expect("AES-256-SIV keys are 64 bytes")
}

/// Parses the key file format: 128 hex digits, surrounding whitespace ignored. Errors never
/// quote the text: it is meant to be a key.
pub fn secret_from_hex(text: &str) -> Result<Secret, String> {
    let text = text.trim();
    if text.len() != KEY_LEN * 2 {
        return Err(format!(
            "expected {} hex digits, found {} characters",
            KEY_LEN * 2,
            text.len()
        ));
    }
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "expected {} hex digits, found other characters",
            KEY_LEN * 2
        ));
    }
    let mut bytes = [0u8; KEY_LEN];
    bytes.copy_from_slice(&hex_decode(text)?);
    Ok(Secret(bytes))
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

/// Payloads larger than this are sealed or opened on the blocking pool rather than on an
/// async worker: at AES-SIV's ~1 GB/s, 64 KiB is ~60 µs, about where a task should yield.
pub const INLINE_CRYPTO_BYTES: usize = 64 * 1024;

/// Whether [`off_runtime_if_large`] runs work on `bytes` on the blocking pool.
pub fn is_large(bytes: usize) -> bool {
    bytes >= INLINE_CRYPTO_BYTES
}

/// Runs `f` inline for small payloads and on the blocking pool for large ones (a panic in
/// `f` is the caller's panic).
pub async fn off_runtime_if_large<T: Send + 'static>(
    bytes: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    if !is_large(bytes) {
        return f();
    }
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The label every transport key derivation starts with.
const TRANSPORT_LABEL: &[u8] = b"tidings-transport-v1";

/// The label of a transport key sealed for a gateway during the key exchange.
const EXCHANGE_LABEL: &[u8] = b"tidings-transport-exchange-v1";

/// HMAC-SHA512 of `parts` (concatenated) under `key`: 64 bytes, an AES-256-SIV key.
/// Seals `plain` for whoever shares `shared` (an X25519 shared secret) with us: AES-SIV under
/// HMAC-SHA512(shared, context), with `context` (labels, ids, the exchange's public keys) as
/// associated data, so it opens only for the same secret and the same context.
pub fn seal_for_shared(shared: &[u8], context: &[&[u8]], plain: &[u8]) -> Vec<u8> {
    siv(&hmac_sha512(shared, context))
        .encrypt(context, plain)
        .expect("AES-SIV encryption of an in-memory buffer cannot fail")
}

/// Opens what [`seal_for_shared`] sealed with the same secret and context.
pub fn open_for_shared(
    shared: &[u8],
    context: &[&[u8]],
    sealed: &[u8],
) -> Result<Vec<u8>, aes_siv::Error> {
    siv(&hmac_sha512(shared, context)).decrypt(context, sealed)
}

pub fn hmac_sha512(key: &[u8], parts: &[&[u8]]) -> Secret {
    let mut mac =
        <Hmac<sha2::Sha512> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    let mut bytes = [0u8; KEY_LEN];
    bytes.copy_from_slice(&mac.finalize().into_bytes());
    Secret(bytes)
}

/// A tenant's key for what travels on NATS, derived from the data key of the same id (see
/// the module documentation). Cheap to clone; the bytes are wiped with the last clone.
#[derive(Clone)]
pub struct TransportKey {
    pub id: u32,
    tenant: TenantId,
    secret: Arc<Secret>,
}

/// Shows the tenant and id, never the key.
impl std::fmt::Debug for TransportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportKey")
            .field("tenant", &self.tenant)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl TransportKey {
    /// The transport key of data key `id` (whose secret is `data`) for `tenant`.
    pub fn derive(tenant: &TenantId, id: u32, data: &Secret) -> TransportKey {
        let key_id = id;
        let id = id.to_be_bytes();
        TransportKey {
            id: key_id,
            tenant: tenant.clone(),
            secret: Arc::new(hmac_sha512(
                &data.0,
                &[TRANSPORT_LABEL, tenant.as_str().as_bytes(), &id],
            )),
        }
    }

    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// Seals `plain` bound to `ad`. Callers start `ad` with their own label
    /// (`tidings-bus-v1`, `tidings-rpc-v1`), so a value of one kind never opens as another.
    pub fn seal(&self, ad: &[&[u8]], plain: &[u8]) -> Vec<u8> {
        self.secret.seal(ad, plain)
    }

    /// Opens a value sealed by [`TransportKey::seal`] with the same AD.
    pub fn open(&self, ad: &[&[u8]], sealed: &[u8]) -> Result<Vec<u8>, aes_siv::Error> {
        self.secret.open(ad, sealed)
    }

    /// The exchange key: HMAC-SHA512 of an ECDH shared secret, bound to the tenant, the key
    /// id and both public keys (`transcript`), so a sealed key answers one request only.
    fn exchange_key(
        shared: &[u8],
        tenant: &TenantId,
        id: u32,
        transcript: &[&[u8]],
    ) -> (Secret, [u8; 4]) {
        let id = id.to_be_bytes();
        let mut parts: Vec<&[u8]> = vec![EXCHANGE_LABEL, tenant.as_str().as_bytes(), &id];
        parts.extend_from_slice(transcript);
        (hmac_sha512(shared, &parts), id)
    }

    /// Seals this key for the party that shares `shared` (an X25519 shared secret) with us.
    /// `transcript` is what both sides saw of the exchange (the two public keys).
    pub fn seal_for_exchange(&self, shared: &[u8], transcript: &[&[u8]]) -> Vec<u8> {
        let (kek, id) = Self::exchange_key(shared, &self.tenant, self.id, transcript);
        siv(&kek)
            .encrypt(
                [EXCHANGE_LABEL, self.tenant.as_str().as_bytes(), &id],
                &self.secret.0,
            )
            .expect("AES-SIV encryption of an in-memory buffer cannot fail")
    }

    /// Opens a key sealed by [`TransportKey::seal_for_exchange`]; fails if the shared secret,
    /// tenant, id or transcript differ, or the bytes were altered.
    pub fn open_from_exchange(
        tenant: &TenantId,
        id: u32,
        shared: &[u8],
        transcript: &[&[u8]],
        sealed: &[u8],
    ) -> Result<TransportKey, aes_siv::Error> {
        let (kek, id_bytes) = Self::exchange_key(shared, tenant, id, transcript);
        let raw = siv(&kek).decrypt(
            [EXCHANGE_LABEL, tenant.as_str().as_bytes(), &id_bytes],
            sealed,
        )?;
        let bytes: [u8; KEY_LEN] = raw.as_slice().try_into().map_err(|_| aes_siv::Error)?;
        Ok(TransportKey {
            id,
            tenant: tenant.clone(),
            secret: Arc::new(Secret(bytes)),
        })
    }

    /// Whether two keys are the same bytes (for tests; not constant time).
    #[doc(hidden)]
    pub fn same_secret(&self, other: &TransportKey) -> bool {
        self.secret.0 == other.secret.0
    }

    /// The raw key, for tests that check it never travels in the clear.
    #[doc(hidden)]
    pub fn secret_bytes_for_tests(&self) -> [u8; KEY_LEN] {
        self.secret.0
    }
}
