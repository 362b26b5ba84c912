//! Who a log RPC call acts for, as the log checks it (docs/decisions/rpc-identity.md).
//!
//! The log does not take identity from the payload on trust. A call that acts for a user
//! carries the user's JWT inside the sealed request; the log verifies it with the same
//! [`Verifier`] configuration as the gateways, takes tenant and user from the claims, and
//! refuses (`not_allowed`) a payload whose sender, creator, `by` or user is someone else.
//! Calls without a token are the gateway's own (gap-fill reads, heads) and may only read.
//!
//! Verifying a signature on every call would cost more than the call, so verified tokens are
//! kept in a [`TokenCache`] keyed by the SHA-256 of the token, each valid until the token's
//! `exp`, bounded in entries and bytes.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use tidings_auth::{Claims, Verifier};
use tidings_log_api::{LogError, TenantId};
use tidings_schemas::internal::log_request::Call;

/// Most verified tokens the log keeps. A user with several devices has several tokens; 100,000
/// covers the sessions of a large deployment's gateways between token renewals.
pub const TOKEN_CACHE_ENTRIES: usize = 100_000;

/// Most bytes of claims the cache holds (tenant, user and roles strings plus the fixed part
/// of an entry): 32 MiB whatever the tokens carry.
pub const TOKEN_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// What one cache entry costs besides its strings: the key, the expiry, map and queue slots.
const ENTRY_OVERHEAD_BYTES: usize = 160;

struct Entry {
    claims: Claims,
    bytes: usize,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<[u8; 32], Entry>,
    /// Insertion order, for eviction (oldest first).
    order: VecDeque<[u8; 32]>,
    bytes: usize,
}

/// Verified tokens, by SHA-256 of the token. An entry is used only until its token's `exp`.
pub struct TokenCache {
    verifier: Verifier,
    state: Mutex<CacheState>,
    max_entries: usize,
    max_bytes: usize,
}

impl TokenCache {
    pub fn new(verifier: Verifier) -> TokenCache {
        Self::with_bounds(verifier, TOKEN_CACHE_ENTRIES, TOKEN_CACHE_BYTES)
    }

    pub fn with_bounds(verifier: Verifier, max_entries: usize, max_bytes: usize) -> TokenCache {
        TokenCache {
            verifier,
            state: Mutex::new(CacheState::default()),
            max_entries,
            max_bytes,
        }
    }

    /// The token's claims, verified now or earlier (and not expired since).
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Claims, LogError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match state.entries.get(&digest) {
                Some(e) if e.claims.expires_at > now_secs => return Ok(e.claims.clone()),
                Some(_) => {
                    if let Some(e) = state.entries.remove(&digest) {
                        state.bytes -= e.bytes;
                    }
                }
                None => {}
            }
        }
        let claims = self
            .verifier
            .verify(token, now_secs)
            .map_err(|e| LogError::NotAllowed(format!("token refused: {}", e.code())))?;
        let bytes = ENTRY_OVERHEAD_BYTES
            + claims.tenant.len()
            + claims.user.len()
            + claims.roles.iter().map(|r| r.len() + 24).sum::<usize>();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if bytes <= self.max_bytes && !state.entries.contains_key(&digest) {
            while state.entries.len() >= self.max_entries || state.bytes + bytes > self.max_bytes {
                let Some(old) = state.order.pop_front() else {
                    break;
                };
                if let Some(e) = state.entries.remove(&old) {
                    state.bytes -= e.bytes;
                }
            }
            state.entries.insert(
                digest,
                Entry {
                    claims: claims.clone(),
                    bytes,
                },
            );
            state.order.push_back(digest);
            state.bytes += bytes;
            // The queue may hold digests of entries that expired and were removed: drop them
            // when they outnumber live entries, so it stays bounded too.
            if state.order.len() > 2 * state.entries.len() + 16 {
                let CacheState { entries, order, .. } = &mut *state;
                order.retain(|d| entries.contains_key(d));
            }
        }
        Ok(claims)
    }

    /// (entries, bytes) held.
    pub fn usage(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (state.entries.len(), state.bytes)
    }
}

/// Whether a call only reads: the calls a gateway may make for itself, without a user token.
pub fn read_only(call: &Call) -> bool {
    match call {
        Call::Read(_)
        | Call::ListConversations(_)
        | Call::ListMembers(_)
        | Call::IsMember(_)
        | Call::ConversationInfo(_) => true,
        // A search reads only the acting user's conversations: it needs their token.
        Call::Search(_)
        | Call::Append(_)
        | Call::Create(_)
        | Call::AddMember(_)
        | Call::RemoveMember(_)
        | Call::SetRole(_)
        | Call::SetDisplayName(_)
        | Call::MarkRead(_) => false,
    }
}

/// The user a call's payload says it acts as (sender, creator, by, user), if it names one.
fn acting_user(call: &Call) -> Option<&str> {
    match call {
        Call::Append(a) => Some(&a.sender),
        Call::Create(c) => Some(&c.creator),
        Call::AddMember(m) | Call::RemoveMember(m) | Call::SetRole(m) => Some(&m.by),
        Call::SetDisplayName(m) => Some(&m.by),
        Call::MarkRead(m) => Some(&m.user),
        Call::ListConversations(l) => Some(&l.user),
        Call::IsMember(m) => Some(&m.user),
        Call::Search(q) => Some(&q.user),
        Call::Read(_) | Call::ListMembers(_) | Call::ConversationInfo(_) => None,
    }
}

/// Checks that `call`, for `tenant`, may run with `token` (empty: the gateway's own call).
/// Returns the token's claims when the call carries one, so the caller can also check them
/// against the revocation records (which live in the log, not here).
pub fn authorize(
    tokens: &TokenCache,
    tenant: &TenantId,
    token: &str,
    call: &Call,
    now_secs: u64,
) -> Result<Option<Claims>, LogError> {
    if token.is_empty() {
        return if read_only(call) {
            Ok(None)
        } else {
            Err(LogError::NotAllowed(
                "a call that writes must carry the user's token".into(),
            ))
        };
    }
    let claims = tokens.verify(token, now_secs)?;
    if claims.tenant != tenant.as_str() {
        return Err(LogError::NotAllowed(
            "the token is for another tenant".into(),
        ));
    }
    match acting_user(call) {
        Some(user) if user != claims.user => Err(LogError::NotAllowed(
            "the call acts as another user than its token's".into(),
        )),
        _ => Ok(Some(claims)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings_auth::AuthConfig;
    use tidings_schemas::internal as wire;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn verifier() -> Verifier {
        Verifier::new(AuthConfig {
            issuer: "tidings".into(),
            audience: "tidings".into(),
            refused_audiences: Vec::new(),
            hs256_secret: Some(SECRET.to_vec()),
            ed25519_public_keys: Vec::new(),
            jwks: None,
            leeway_secs: 0,
            max_lifetime_secs: 86_400,
        })
        .expect("verifier")
    }

    fn token(user: &str, exp: u64) -> String {
        tidings_auth::issue_hs256(
            SECRET,
            "tidings",
            "tidings",
            &Claims {
                tenant: "acme".into(),
                user: user.into(),
                roles: Vec::new(),
                expires_at: exp,
                issued_at: 1_000,
                jti: None,
            },
        )
    }

    fn append(sender: &str) -> Call {
        Call::Append(wire::Append {
            conversation: "general".into(),
            sender: sender.into(),
            ..Default::default()
        })
    }

    #[test]
    fn a_write_as_someone_else_or_without_a_token_is_refused() {
        let cache = TokenCache::new(verifier());
        let acme = TenantId::new("acme").expect("id");
        let alice = token("alice", 10_000);
        assert!(authorize(&cache, &acme, &alice, &append("alice"), 2_000).is_ok());
        let forged = authorize(&cache, &acme, &alice, &append("bob"), 2_000).expect_err("forged");
        assert_eq!(forged.code(), "not_allowed");
        let anonymous =
            authorize(&cache, &acme, "", &append("alice"), 2_000).expect_err("no token");
        assert_eq!(anonymous.code(), "not_allowed");
        let globex = TenantId::new("globex").expect("id");
        assert_eq!(
            authorize(&cache, &globex, &alice, &append("alice"), 2_000)
                .expect_err("other tenant")
                .code(),
            "not_allowed"
        );
        let read = Call::Read(wire::Read::default());
        assert!(
            authorize(&cache, &acme, "", &read, 2_000).is_ok(),
            "gateway reads"
        );
        assert!(authorize(&cache, &acme, "not a token", &read, 2_000).is_err());
    }

    #[test]
    fn cached_tokens_expire_with_the_token_and_the_cache_is_bounded() {
        let cache = TokenCache::with_bounds(verifier(), 3, 1_000_000);
        let t = token("alice", 5_000);
        assert!(cache.verify(&t, 4_000).is_ok());
        assert_eq!(cache.usage().0, 1);
        assert_eq!(
            cache.verify(&t, 5_001).expect_err("expired").code(),
            "not_allowed"
        );
        assert_eq!(cache.usage().0, 0, "an expired entry is dropped");
        for i in 0..10 {
            cache
                .verify(&token(&format!("u{i}"), 9_000), 4_000)
                .expect("ok");
        }
        assert_eq!(cache.usage().0, 3);
        let small = TokenCache::with_bounds(verifier(), 100, 2 * ENTRY_OVERHEAD_BYTES + 20);
        for i in 0..10 {
            small
                .verify(&token(&format!("u{i}"), 9_000), 4_000)
                .expect("ok");
        }
        let (n, bytes) = small.usage();
        assert!(
            n <= 2 && bytes <= 2 * ENTRY_OVERHEAD_BYTES + 20,
            "{n} {bytes}"
        );
    }
}
