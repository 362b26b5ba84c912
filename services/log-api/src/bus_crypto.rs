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

use crate::crypto::{TransportKey, hex_decode, hex_encode, open_for_shared, seal_for_shared};
use crate::{ConvId, Event, LogError, TenantId};
use prost::Message;
use tidings_schemas::internal::{SealedEvent, TransportKeyReply};
use x25519_dalek::{EphemeralSecret, PublicKey, SharedSecret, StaticSecret};

const BUS_LABEL: &[u8] = b"tidings-bus-v1";
const RPC_LABEL: &[u8] = b"tidings-rpc-v1";

/// Bytes of an RPC nonce: random, so two calls never share one (2^-64 after 2^32 calls).
pub const NONCE_LEN: usize = 16;

pub use crate::crypto::{INLINE_CRYPTO_BYTES, off_runtime_if_large};

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
/// again: `tidings_gateway::hub::event_frame`).
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
    /// The public key of the identity `secret` (`tidings_log::Log::log_identity_secret`).
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
