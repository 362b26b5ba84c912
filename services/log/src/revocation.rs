//! Revoked tokens.
//!
//! Two kinds of record, in the store so that every process that verifies tokens sees them
//! (`keys::revoked_jti`, `keys::revoked_user`):
//! - a token id (`jti`) revoked: that one token is refused from now on;
//! - a user's cutoff: every token of that user issued at or before it (`iat <= cutoff`) is
//!   refused. A cutoff only moves forward; revoking "before" an earlier time than the one
//!   recorded changes nothing.
//!
//! Checks go through a small cache: a token is checked at every Hello, at every admin
//! request and (once the log verifies callers) at every RPC, and almost every answer is
//! "not revoked". Entries live [`CACHE_TTL`]; a revocation made through this process updates
//! its cache at once, one made through another process is seen here within [`CACHE_TTL`]
//! (live sessions are ended sooner than that by the NATS notice the revoker publishes).
//!
//! Records are never deleted: a jti record is ~100 bytes and a user has one cutoff. Once
//! `auth.max_token_lifetime_secs` has passed since a jti was revoked the token has expired
//! anyway, so pruning those is possible (not done yet).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::LogError;
use crate::ids::{TenantId, UserId};
use crate::keys;
use crate::store::{KvStore, StoreError, Transaction};

/// How long a cached answer is trusted. Bounds how late a revocation made through another
/// log process is seen by this one.
pub const CACHE_TTL: Duration = Duration::from_secs(5);

/// Most cached answers. A key is at most ~210 bytes (prefix, a 64-byte tenant, a 64-byte
/// user or a 128-byte jti) and an entry ~300 bytes with the map's overhead: about 5 MiB.
pub const CACHE_ENTRIES: usize = 16 * 1024;

/// The longest token id accepted (the same bound as `tidings_auth::MAX_JTI_BYTES`).
pub const MAX_JTI_BYTES: usize = 128;

/// Conflicting updates of one user's cutoff retried before giving up.
const CUTOFF_RETRIES: usize = 8;

/// Revoked tokens of one store, behind a cache. Reached through [`crate::Log::revocations`].
pub struct Revocations {
    store: Arc<dyn KvStore>,
    cache: Mutex<HashMap<Vec<u8>, Cached>>,
}

#[derive(Clone, Copy)]
struct Cached {
    /// The record's number (revocation time of a jti, cutoff of a user), if there is one.
    value: Option<u64>,
    at: Instant,
}

pub use tidings_log_api::TokenRef;

fn check_jti(jti: &str) -> Result<(), LogError> {
    if jti.is_empty() || jti.len() > MAX_JTI_BYTES {
        return Err(LogError::InvalidRequest(format!(
            "a token id (jti) is 1 to {MAX_JTI_BYTES} bytes"
        )));
    }
    Ok(())
}

fn number(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

impl Revocations {
    pub(crate) fn new(store: Arc<dyn KvStore>) -> Revocations {
        Revocations {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn remember(&self, key: Vec<u8>, value: Option<u64>) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES && !cache.contains_key(&key) {
            cache.retain(|_, c| c.at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_ENTRIES {
                // Still full of fresh entries: start over rather than grow. Costs a few
                // store reads, never memory.
                cache.clear();
            }
        }
        cache.insert(
            key,
            Cached {
                value,
                at: Instant::now(),
            },
        );
    }

    fn cached(&self, key: &[u8]) -> Option<Option<u64>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|c| c.at.elapsed() < CACHE_TTL)
            .map(|c| c.value)
    }

    /// Revokes one token by its id; `now_secs` is recorded as when. Revoking it again is
    /// harmless.
    pub async fn revoke_jti(
        &self,
        tenant: &TenantId,
        jti: &str,
        now_secs: u64,
    ) -> Result<(), LogError> {
        check_jti(jti)?;
        let key = keys::revoked_jti(tenant, jti);
        let mut txn = Transaction::new();
        txn.put(key.clone(), now_secs.to_be_bytes().to_vec());
        self.store.commit(txn).await?;
        self.remember(key, Some(now_secs));
        Ok(())
    }

    /// Revokes every token of `user` issued at or before `before` (Unix seconds). Returns
    /// the cutoff now in force: `before`, or a later one recorded earlier.
    pub async fn revoke_user_before(
        &self,
        tenant: &TenantId,
        user: &UserId,
        before: u64,
    ) -> Result<u64, LogError> {
        let key = keys::revoked_user(tenant, user);
        for _ in 0..CUTOFF_RETRIES {
            let current = self.store.get(&key).await?;
            let recorded = current.as_deref().and_then(number);
            if let Some(recorded) = recorded
                && recorded >= before
            {
                self.remember(key, Some(recorded));
                return Ok(recorded);
            }
            let mut txn = Transaction::new();
            txn.expect(key.clone(), current)
                .put(key.clone(), before.to_be_bytes().to_vec());
            match self.store.commit(txn).await {
                Ok(()) => {
                    self.remember(key, Some(before));
                    return Ok(before);
                }
                // Someone else moved the cutoff meanwhile: read it again.
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(LogError::Store(StoreError::Conflict {
            key: keys::display_key(&key),
            reason: "the user's revocation cutoff kept changing",
        }))
    }

    /// The user's cutoff, if any token of theirs was revoked by time.
    pub async fn user_cutoff(
        &self,
        tenant: &TenantId,
        user: &UserId,
    ) -> Result<Option<u64>, LogError> {
        let key = keys::revoked_user(tenant, user);
        if let Some(value) = self.cached(&key) {
            return Ok(value);
        }
        let value = self.store.get(&key).await?.as_deref().and_then(number);
        self.remember(key, value);
        Ok(value)
    }

    /// Whether the token is revoked, by its id or by its user's cutoff.
    pub async fn is_revoked(&self, token: TokenRef<'_>) -> Result<bool, LogError> {
        let user_key = keys::revoked_user(token.tenant, token.user);
        let jti_key = match token.jti {
            Some(jti) if check_jti(jti).is_ok() => Some(keys::revoked_jti(token.tenant, jti)),
            // A verifier never lets such a jti through; refuse rather than guess.
            Some(_) => return Ok(true),
            None => None,
        };
        let mut answers = Vec::with_capacity(2);
        let mut missing = Vec::new();
        for key in std::iter::once(&user_key).chain(jti_key.as_ref()) {
            match self.cached(key) {
                Some(value) => answers.push((key.clone(), value)),
                None => missing.push(key.clone()),
            }
        }
        if !missing.is_empty() {
            let values = self.store.batch_get(missing.clone()).await?;
            for (key, value) in missing.into_iter().zip(values) {
                let value = value.as_deref().and_then(number);
                self.remember(key.clone(), value);
                answers.push((key, value));
            }
        }
        Ok(answers.iter().any(|(key, value)| match value {
            None => false,
            Some(cutoff) if *key == user_key => token.issued_at <= *cutoff,
            Some(_) => true,
        }))
    }
}

impl crate::Log {
    /// See [`Revocations::revoke_jti`].
    pub async fn revoke_jti(
        &self,
        tenant: &TenantId,
        jti: &str,
        now_secs: u64,
    ) -> Result<(), LogError> {
        self.revocations().revoke_jti(tenant, jti, now_secs).await
    }

    /// See [`Revocations::revoke_user_before`].
    pub async fn revoke_user_before(
        &self,
        tenant: &TenantId,
        user: &UserId,
        before: u64,
    ) -> Result<u64, LogError> {
        self.revocations()
            .revoke_user_before(tenant, user, before)
            .await
    }

    /// See [`Revocations::is_revoked`].
    pub async fn is_revoked(&self, token: TokenRef<'_>) -> Result<bool, LogError> {
        self.revocations().is_revoked(token).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FjallStore;

    fn ids() -> (TenantId, UserId, UserId) {
        (
            TenantId::new("acme").expect("id"),
            UserId::new("bob").expect("id"),
            UserId::new("carol").expect("id"),
        )
    }

    fn tok<'a>(
        tenant: &'a TenantId,
        user: &'a UserId,
        jti: Option<&'a str>,
        issued_at: u64,
    ) -> TokenRef<'a> {
        TokenRef {
            tenant,
            user,
            jti,
            issued_at,
        }
    }

    async fn revoked(r: &Revocations, token: TokenRef<'_>) -> bool {
        r.is_revoked(token).await.expect("check")
    }

    #[tokio::test]
    async fn jti_and_user_cutoffs_revoke_exactly_what_they_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(dir.path()).expect("store"));
        let r = Revocations::new(store.clone());
        let (t, bob, carol) = ids();
        let (bob, carol) = (&bob, &carol);
        assert!(!revoked(&r, tok(&t, bob, Some("j1"), 100)).await);

        r.revoke_jti(&t, "j1", 150).await.expect("revoke jti");
        assert!(revoked(&r, tok(&t, bob, Some("j1"), 100)).await);
        assert!(!revoked(&r, tok(&t, bob, Some("j2"), 100)).await);
        assert!(!revoked(&r, tok(&t, bob, None, 100)).await);

        assert_eq!(
            r.revoke_user_before(&t, bob, 200).await.expect("cutoff"),
            200
        );
        assert!(revoked(&r, tok(&t, bob, None, 200)).await);
        assert!(revoked(&r, tok(&t, bob, Some("j2"), 199)).await);
        assert!(!revoked(&r, tok(&t, bob, Some("j2"), 201)).await);
        assert!(!revoked(&r, tok(&t, carol, None, 100)).await);
        // A cutoff never moves back.
        assert_eq!(
            r.revoke_user_before(&t, bob, 150).await.expect("cutoff"),
            200
        );
        assert_eq!(r.user_cutoff(&t, bob).await.expect("cutoff"), Some(200));

        // Another process (a fresh cache on the same store) sees the records.
        let fresh = Revocations::new(store);
        assert!(revoked(&fresh, tok(&t, bob, Some("j1"), 300)).await);
        assert!(revoked(&fresh, tok(&t, bob, None, 200)).await);
        assert!(!revoked(&fresh, tok(&t, carol, Some("j3"), 1)).await);
        // And refuses ids no verifier would pass.
        assert!(r.revoke_jti(&t, "", 1).await.is_err());
        assert!(r.revoke_jti(&t, &"x".repeat(129), 1).await.is_err());
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(dir.path()).expect("store"));
        let r = Revocations::new(store);
        for i in 0..(CACHE_ENTRIES + 10) {
            r.remember(format!("k{i}").into_bytes(), None);
            assert!(r.cache.lock().expect("lock").len() <= CACHE_ENTRIES);
        }
    }
}
