//! Sealing what travels on NATS, under the tenants' transport keys
//! ([`TransportKey`], derived by the log from its data keys).
//!
//! - Events on the stream (`tidings.ev.<t>.<c>`): a [`SealedEvent`] with the key id and seq
//!   in the clear and the encoded Event sealed with AD
//!   `["tidings-bus-v1", tenant, conv, seq, key_id]`, so an envelope moved to another
//!   subject, seq or key id does not open.
//! - Log RPC calls: the encoded `LogRequest` sealed with AD
//!   `["tidings-rpc-v1", tenant, "request", nonce, key_id]` and its `LogResponse` with
//!   `"reply"` in place of `"request"`: a reply answers exactly one call and can never be
//!   passed off as a call.
//! - The transport key exchange: a gateway sends an ephemeral X25519 public key; the log
//!   answers with the key sealed under HMAC-SHA512 of the secret shared between that key and
//!   the log's long-term identity key ([`TransportKey::seal_for_exchange`]). Gateways pin
//!   the identity's public half ([`LogPublicKey`]), so a party that can publish on NATS
//!   but is not a log cannot answer; a passive observer sees two public keys. The request
//!   may carry the user's token sealed for the log the same way: a tenant's first key is
//!   made only for a valid token of that tenant.
//! - [`KeyCache`]: the transport keys a gateway has fetched, bounded.
//!
//! Why here and not in the log crate: the log derives keys; what goes on the wire and in which
//! envelope is the transport's business. All primitives (HMAC, SIV) stay in
//! `tidings_log::crypto`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prost::Message;
use tidings_log::crypto::{TransportKey, hex_decode, hex_encode, open_for_shared, seal_for_shared};
use tidings_log::{ConvId, Event, LogError, TenantId};
use tidings_schemas::internal::{SealedEvent, TransportKeyReply};
use x25519_dalek::{EphemeralSecret, PublicKey, SharedSecret, StaticSecret};

const BUS_LABEL: &[u8] = b"tidings-bus-v1";
const RPC_LABEL: &[u8] = b"tidings-rpc-v1";

/// Bytes of an RPC nonce: random, so two calls never share one (2^-64 after 2^32 calls).
pub const NONCE_LEN: usize = 16;

pub use tidings_log::crypto::{INLINE_CRYPTO_BYTES, off_runtime_if_large};

/// Seals an encoded Event for `tidings.ev.<tenant>.<conv>` and returns the envelope's bytes.
pub fn seal_event(key: &TransportKey, conv: &ConvId, seq: u64, event: &[u8]) -> Vec<u8> {
    let (seq_be, id_be) = (seq.to_be_bytes(), key.id.to_be_bytes());
    let sealed = key.seal(&event_ad(key.tenant(), conv, &seq_be, &id_be), event);
    SealedEvent {
        key_id: key.id,
        seq,
        sealed,
    }
    .encode_to_vec()
}

fn event_ad<'a>(
    tenant: &'a TenantId,
    conv: &'a ConvId,
    seq: &'a [u8; 8],
    key_id: &'a [u8; 4],
) -> [&'a [u8]; 5] {
    [
        BUS_LABEL,
        tenant.as_str().as_bytes(),
        conv.as_str().as_bytes(),
        seq,
        key_id,
    ]
}

/// Why a sealed payload did not open.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("not a sealed event envelope")]
    Malformed,
    #[error("the envelope does not open under transport key {key_id}")]
    Seal { key_id: u32 },
    #[error("the sealed event does not match its envelope")]
    Mismatch,
}

/// Reads an envelope's routing metadata (without opening it).
pub fn envelope(payload: &[u8]) -> Result<SealedEvent, OpenError> {
    SealedEvent::decode(payload).map_err(|_| OpenError::Malformed)
}

/// Opens an envelope that arrived on `tidings.ev.<tenant>.<conv>` with `key` (the tenant's
/// key of the envelope's id); the event inside must be the one the envelope names. Returns
/// it with its bytes as the sequencer encoded them (what a push frame carries, not encoded
/// again: [`crate::hub::event_frame`]).
pub fn open_event(
    key: &TransportKey,
    conv: &ConvId,
    env: &SealedEvent,
) -> Result<(Event, Vec<u8>), OpenError> {
    let (seq_be, id_be) = (env.seq.to_be_bytes(), env.key_id.to_be_bytes());
    if key.id != env.key_id {
        return Err(OpenError::Seal { key_id: env.key_id });
    }
    let plain = key
        .open(&event_ad(key.tenant(), conv, &seq_be, &id_be), &env.sealed)
        .map_err(|_| OpenError::Seal { key_id: env.key_id })?;
    let event = Event::decode(plain.as_slice()).map_err(|_| OpenError::Mismatch)?;
    if event.seq != env.seq
        || event.tenant != key.tenant().as_str()
        || event.conversation != conv.as_str()
    {
        return Err(OpenError::Mismatch);
    }
    Ok((event, plain))
}

/// Which way an RPC payload travels: part of its AD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Request,
    Reply,
}

impl Direction {
    fn label(self) -> &'static [u8] {
        match self {
            Direction::Request => b"request",
            Direction::Reply => b"reply",
        }
    }
}

/// A fresh random RPC nonce.
pub fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).expect("the operating system's random source failed");
    n
}

/// Seals an RPC payload (an encoded LogRequest or LogResponse).
pub fn seal_rpc(key: &TransportKey, dir: Direction, nonce: &[u8], plain: &[u8]) -> Vec<u8> {
    let id = key.id.to_be_bytes();
    key.seal(
        &[
            RPC_LABEL,
            key.tenant().as_str().as_bytes(),
            dir.label(),
            nonce,
            &id,
        ],
        plain,
    )
}

/// Opens an RPC payload sealed by [`seal_rpc`] with the same key, direction and nonce.
pub fn open_rpc(
    key: &TransportKey,
    dir: Direction,
    nonce: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, OpenError> {
    let id = key.id.to_be_bytes();
    key.open(
        &[
            RPC_LABEL,
            key.tenant().as_str().as_bytes(),
            dir.label(),
            nonce,
            &id,
        ],
        sealed,
    )
    .map_err(|_| OpenError::Seal { key_id: key.id })
}

const TOKEN_LABEL: &[u8] = b"tidings-key-request-token-v1";

/// The public half of the log's long-term X25519 identity, which gateways pin
/// (`gateway.log_public_key`; `tidings keys log-identity` prints it).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LogPublicKey([u8; 32]);

impl LogPublicKey {
    /// The public key of the identity `secret` ([`tidings_log::Log::log_identity_secret`]).
    pub fn of_secret(secret: &[u8; 32]) -> LogPublicKey {
        LogPublicKey(PublicKey::from(&StaticSecret::from(*secret)).to_bytes())
    }

    /// 64 hex digits.
    pub fn from_hex(text: &str) -> Result<LogPublicKey, String> {
        let bytes = hex_decode(text.trim())?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "a log public key is 64 hex digits (32 bytes)".to_string())?;
        Ok(LogPublicKey(key))
    }

    pub fn to_hex(&self) -> String {
        hex_encode(&self.0)
    }
}

impl std::fmt::Debug for LogPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LogPublicKey({})", self.to_hex())
    }
}

/// What a token sealed into a key request is bound to: the tenant and both public keys.
fn token_context<'a>(
    tenant: &'a TenantId,
    gateway: &'a [u8; 32],
    log: &'a [u8; 32],
) -> [&'a [u8]; 4] {
    [TOKEN_LABEL, tenant.as_str().as_bytes(), gateway, log]
}

/// The gateway's half of a transport key exchange: the secret it shares with the pinned log
/// identity, made from an ephemeral X25519 secret that is gone once made. Consumed by
/// [`Exchange::finish`].
pub struct Exchange {
    public: [u8; 32],
    log: [u8; 32],
    shared: SharedSecret,
}

impl Exchange {
    /// Starts an exchange with the log whose identity is `log`.
    pub fn new(log: &LogPublicKey) -> Result<Exchange, LogError> {
        let secret = EphemeralSecret::random();
        let public = PublicKey::from(&secret).to_bytes();
        let shared = secret.diffie_hellman(&PublicKey::from(log.0));
        if !shared.was_contributory() {
            return Err(LogError::InvalidRequest(
                "the configured log public key is a low-order point".into(),
            ));
        }
        Ok(Exchange {
            public,
            log: log.0,
            shared,
        })
    }

    /// What the gateway sends: its public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// `token` sealed so that only the log can read it, bound to `tenant` and this exchange.
    pub fn seal_token(&self, tenant: &TenantId, token: &str) -> Vec<u8> {
        seal_for_shared(
            self.shared.as_bytes(),
            &token_context(tenant, &self.public, &self.log),
            token.as_bytes(),
        )
    }

    /// Opens the log's answer. Fails unless it names the pinned identity and was sealed with
    /// it for this exchange.
    pub fn finish(
        self,
        tenant: &TenantId,
        reply: &TransportKeyReply,
    ) -> Result<TransportKey, LogError> {
        let bad = |why: &str| {
            LogError::remote(
                "store_error",
                format!("bad transport key reply: {why}"),
                false,
            )
        };
        if reply.public_key.as_slice() != self.log.as_slice() {
            return Err(bad("it is not from the log identity this gateway pins"));
        }
        TransportKey::open_from_exchange(
            tenant,
            reply.key_id,
            self.shared.as_bytes(),
            &[self.public.as_slice(), self.log.as_slice()],
            &reply.sealed_key,
        )
        .map_err(|_| bad("the sealed key does not open"))
    }
}

/// The log's half, with its long-term identity secret.
pub struct LogIdentity {
    secret: StaticSecret,
    public: [u8; 32],
}

impl LogIdentity {
    pub fn new(secret: [u8; 32]) -> LogIdentity {
        let secret = StaticSecret::from(secret);
        let public = PublicKey::from(&secret).to_bytes();
        LogIdentity { secret, public }
    }

    pub fn public_key(&self) -> LogPublicKey {
        LogPublicKey(self.public)
    }

    fn shared_with(&self, gateway_public: &[u8]) -> Result<([u8; 32], SharedSecret), LogError> {
        let theirs: [u8; 32] = gateway_public
            .try_into()
            .map_err(|_| LogError::InvalidRequest("an X25519 public key is 32 bytes".into()))?;
        let shared = self.secret.diffie_hellman(&PublicKey::from(theirs));
        if !shared.was_contributory() {
            return Err(LogError::InvalidRequest(
                "a low-order X25519 public key".into(),
            ));
        }
        Ok((theirs, shared))
    }

    /// Opens a token a gateway sealed into its key request for `tenant`.
    pub fn open_token(
        &self,
        tenant: &TenantId,
        gateway_public: &[u8],
        sealed: &[u8],
    ) -> Result<String, LogError> {
        let (theirs, shared) = self.shared_with(gateway_public)?;
        let plain = open_for_shared(
            shared.as_bytes(),
            &token_context(tenant, &theirs, &self.public),
            sealed,
        )
        .map_err(|_| LogError::InvalidRequest("the sealed token does not open".into()))?;
        String::from_utf8(plain)
            .map_err(|_| LogError::InvalidRequest("the token is not text".into()))
    }

    /// Answers a gateway's public key with `key`, sealed for that gateway alone.
    pub fn answer(
        &self,
        key: &TransportKey,
        gateway_public: &[u8],
    ) -> Result<TransportKeyReply, LogError> {
        let (theirs, shared) = self.shared_with(gateway_public)?;
        Ok(TransportKeyReply {
            key_id: key.id,
            public_key: self.public.to_vec(),
            sealed_key: key.seal_for_exchange(
                shared.as_bytes(),
                &[theirs.as_slice(), self.public.as_slice()],
            ),
        })
    }
}

/// Most transport keys a gateway keeps: one per tenant and key id it has seen traffic of.
/// An entry is ~200 bytes (the key, the tenant id, map overhead), so 10,000 is ~2 MB; past it
/// the oldest are forgotten and fetched again when needed.
pub const KEY_CACHE_ENTRIES: usize = 10_000;

/// How long a gateway keeps using a tenant's "current" key id before asking again: a
/// rotation is picked up within this time (older ids keep working meanwhile).
pub const CURRENT_KEY_TTL: Duration = Duration::from_secs(60);

/// Transport keys by (tenant, id), and which id is current per tenant. Bounded by
/// [`KEY_CACHE_ENTRIES`]; fetches happen one at a time, so a burst of events of a new key id
/// costs one exchange, not one per event.
pub struct KeyCache {
    state: Mutex<CacheState>,
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct CacheState {
    keys: HashMap<(TenantId, u32), TransportKey>,
    order: VecDeque<(TenantId, u32)>,
    current: HashMap<TenantId, (u32, Instant)>,
}

impl Default for KeyCache {
    fn default() -> Self {
        KeyCache {
            state: Mutex::new(CacheState::default()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }
}

impl KeyCache {
    fn lookup(&self, tenant: &TenantId, id: Option<u32>) -> Option<TransportKey> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let id = match id {
            Some(id) => id,
            None => match state.current.get(tenant) {
                Some((id, at)) if at.elapsed() < CURRENT_KEY_TTL => *id,
                _ => return None,
            },
        };
        state.keys.get(&(tenant.clone(), id)).cloned()
    }

    fn insert(&self, key: &TransportKey, current: bool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let entry = (key.tenant().clone(), key.id);
        if state.keys.insert(entry.clone(), key.clone()).is_none() {
            state.order.push_back(entry);
        }
        while state.keys.len() > KEY_CACHE_ENTRIES {
            match state.order.pop_front() {
                Some(old) => {
                    state.keys.remove(&old);
                }
                None => break,
            }
        }
        if current {
            if state.current.len() >= KEY_CACHE_ENTRIES {
                state.current.clear();
            }
            state
                .current
                .insert(key.tenant().clone(), (key.id, Instant::now()));
        }
    }

    /// Forgets a tenant (its keys no longer open anything, e.g. it was shredded).
    pub fn forget(&self, tenant: &TenantId) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.keys.retain(|(t, _), _| t != tenant);
        state.order.retain(|(t, _)| t != tenant);
        state.current.remove(tenant);
    }

    /// The tenant's key `id` (or current one), from the cache or from `fetch`.
    pub async fn get<F, Fut>(
        &self,
        tenant: &TenantId,
        id: Option<u32>,
        fetch: F,
    ) -> Result<TransportKey, LogError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<TransportKey, LogError>>,
    {
        if let Some(key) = self.lookup(tenant, id) {
            return Ok(key);
        }
        let _one_at_a_time = self.fetching.lock().await;
        if let Some(key) = self.lookup(tenant, id) {
            return Ok(key);
        }
        let key = fetch().await?;
        if key.tenant() != tenant || id.is_some_and(|id| id != key.id) {
            return Err(LogError::remote(
                "store_error",
                "the log answered with another transport key than asked for".into(),
                false,
            ));
        }
        self.insert(&key, id.is_none());
        Ok(key)
    }

    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings_log::crypto::{Keyring, MasterKey};
    use tidings_log::store::FjallStore;

    async fn keys() -> (Keyring, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tmp");
        let store = FjallStore::open(dir.path()).expect("store");
        let ring = Keyring::open(std::sync::Arc::new(store), MasterKey::generate())
            .await
            .expect("keyring");
        (ring, dir)
    }

    fn ids() -> (TenantId, ConvId) {
        (
            TenantId::new("acme").expect("id"),
            ConvId::new("general").expect("id"),
        )
    }

    fn event(t: &TenantId, c: &ConvId, seq: u64) -> Event {
        Event {
            tenant: t.to_string(),
            conversation: c.to_string(),
            seq,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn sealed_event_opens_only_for_its_tenant_conversation_seq_and_key() {
        let (ring, _dir) = keys().await;
        let (t, c) = ids();
        let key = ring.transport_key(&t, None).await.expect("key");
        let bytes = event(&t, &c, 7).encode_to_vec();
        let payload = seal_event(&key, &c, 7, &bytes);
        let env = envelope(&payload).expect("envelope");
        assert_eq!((env.key_id, env.seq), (key.id, 7));
        let (opened, plain) = open_event(&key, &c, &env).expect("opens");
        assert_eq!(opened, event(&t, &c, 7));
        assert_eq!(plain, bytes, "the sealed bytes, as they were");

        let other_conv = ConvId::new("random").expect("id");
        assert!(open_event(&key, &other_conv, &env).is_err(), "other conv");
        let mut moved = env.clone();
        moved.seq = 8;
        assert!(open_event(&key, &c, &moved).is_err(), "other seq");
        let globex = TenantId::new("globex").expect("id");
        let globex_key = ring.transport_key(&globex, None).await.expect("key");
        assert!(open_event(&globex_key, &c, &env).is_err(), "other tenant");
        let rotated = ring.rotate(&t).await.expect("rotate");
        let new_key = ring.transport_key(&t, Some(rotated)).await.expect("key");
        let mut relabelled = env.clone();
        relabelled.key_id = rotated;
        assert!(
            open_event(&new_key, &c, &relabelled).is_err(),
            "other key id"
        );
        // The old id is still derivable after rotation: events in flight still open.
        let old = ring.transport_key(&t, Some(key.id)).await.expect("old key");
        assert!(open_event(&old, &c, &env).is_ok());
        let mut flipped = env.clone();
        flipped.sealed[0] ^= 1;
        assert!(open_event(&key, &c, &flipped).is_err(), "altered");
    }

    #[tokio::test]
    async fn rpc_payload_opens_only_with_its_nonce_direction_and_tenant() {
        let (ring, _dir) = keys().await;
        let (t, _) = ids();
        let key = ring.transport_key(&t, None).await.expect("key");
        let n = nonce();
        let sealed = seal_rpc(&key, Direction::Request, &n, b"a call");
        assert_eq!(
            open_rpc(&key, Direction::Request, &n, &sealed).expect("open"),
            b"a call"
        );
        assert!(open_rpc(&key, Direction::Reply, &n, &sealed).is_err());
        assert!(open_rpc(&key, Direction::Request, &nonce(), &sealed).is_err());
        let globex = TenantId::new("globex").expect("id");
        let globex_key = ring.transport_key(&globex, None).await.expect("key");
        assert!(open_rpc(&globex_key, Direction::Request, &n, &sealed).is_err());
    }

    #[tokio::test]
    async fn exchange_delivers_the_key_to_the_gateway_only() {
        let (ring, _dir) = keys().await;
        let (t, _) = ids();
        let key = ring.transport_key(&t, None).await.expect("key");
        let log = LogIdentity::new(ring.log_identity_secret());
        let pinned = LogPublicKey::of_secret(&ring.log_identity_secret());
        assert_eq!(log.public_key(), pinned);
        let gateway = Exchange::new(&pinned).expect("exchange");
        let reply = log.answer(&key, &gateway.public_key()).expect("answer");
        let raw = key.secret_bytes_for_tests();
        let wire = reply.encode_to_vec();
        assert!(!wire.windows(16).any(|w| raw.windows(16).any(|r| r == w)));
        // Someone else's exchange cannot open it.
        let eavesdropper = Exchange::new(&pinned).expect("exchange");
        assert!(eavesdropper.finish(&t, &reply).is_err());
        let got = gateway.finish(&t, &reply).expect("finish");
        assert!(got.same_secret(&key));
        assert_eq!(got.id, key.id);
        // A low-order point is refused.
        assert!(log.answer(&key, &[0u8; 32]).is_err());
    }

    #[tokio::test]
    async fn only_the_pinned_log_can_answer_an_exchange() {
        let (ring, _dir) = keys().await;
        let (t, _) = ids();
        let pinned = LogPublicKey::of_secret(&ring.log_identity_secret());
        // An impostor who can publish on NATS, with a key of its own making, answers with
        // its own identity: refused for not being pinned.
        let impostor = LogIdentity::new([9u8; 32]);
        let (other_ring, _other_dir) = keys().await;
        let fake = other_ring.transport_key(&t, None).await.expect("key");
        let gateway = Exchange::new(&pinned).expect("exchange");
        let reply = impostor
            .answer(&fake, &gateway.public_key())
            .expect("answer");
        let err = gateway.finish(&t, &reply).expect_err("not pinned");
        assert!(
            err.to_string().contains("not from the log identity"),
            "{err}"
        );
        // ...and claiming the pinned public key does not help: the key does not open.
        let gateway = Exchange::new(&pinned).expect("exchange");
        let mut reply = impostor
            .answer(&fake, &gateway.public_key())
            .expect("answer");
        reply.public_key = hex_decode(&pinned.to_hex()).expect("hex");
        let err = gateway.finish(&t, &reply).expect_err("does not open");
        assert!(err.to_string().contains("does not open"), "{err}");
    }

    #[tokio::test]
    async fn a_sealed_token_opens_for_the_log_and_only_for_its_tenant() {
        let (ring, _dir) = keys().await;
        let (t, _) = ids();
        let log = LogIdentity::new(ring.log_identity_secret());
        let gateway = Exchange::new(&log.public_key()).expect("exchange");
        let sealed = gateway.seal_token(&t, "header.claims.signature");
        assert!(!sealed.windows(6).any(|w| w == b"claims"));
        assert_eq!(
            log.open_token(&t, &gateway.public_key(), &sealed)
                .expect("open"),
            "header.claims.signature"
        );
        let globex = TenantId::new("globex").expect("id");
        assert!(
            log.open_token(&globex, &gateway.public_key(), &sealed)
                .is_err()
        );
        let other = Exchange::new(&log.public_key()).expect("exchange");
        assert!(log.open_token(&t, &other.public_key(), &sealed).is_err());
        assert!(
            LogIdentity::new([9u8; 32])
                .open_token(&t, &gateway.public_key(), &sealed)
                .is_err()
        );
    }

    #[test]
    fn log_public_keys_parse_from_hex_only() {
        let k = LogPublicKey::of_secret(&[5u8; 32]);
        assert_eq!(LogPublicKey::from_hex(&k.to_hex()).expect("parse"), k);
        assert!(LogPublicKey::from_hex("abcd").is_err());
        assert!(LogPublicKey::from_hex(&"zz".repeat(32)).is_err());
    }

    #[tokio::test]
    async fn shredded_tenant_has_no_transport_key() {
        let (ring, _dir) = keys().await;
        let (t, _) = ids();
        ring.transport_key(&t, None).await.expect("key");
        ring.shred(&t).await.expect("shred");
        let err = ring.transport_key(&t, None).await.expect_err("shredded");
        assert_eq!(err.code(), "tenant_shredded");
        let err = ring.transport_key(&t, Some(1)).await.expect_err("shredded");
        assert_eq!(err.code(), "tenant_shredded");
    }

    #[tokio::test]
    async fn key_cache_is_bounded_and_fetches_once() {
        let cache = KeyCache::default();
        let (ring, _dir) = keys().await;
        let (t, _) = ids();
        let fetches = std::sync::atomic::AtomicUsize::new(0);
        for _ in 0..3 {
            cache
                .get(&t, None, || async {
                    fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    ring.transport_key(&t, None).await
                })
                .await
                .expect("key");
        }
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
        let wrong = cache
            .get(&t, Some(9), || async { ring.transport_key(&t, None).await })
            .await;
        assert!(wrong.is_err(), "a key of another id than asked is refused");
        assert_eq!(cache.len(), 1);
    }
}
