//! Revoked tokens at the gateway.
//!
//! Three mechanisms, because each one alone has a gap:
//! - **At Hello** a verified token is checked against the revocation records
//!   ([`Revocations::is_revoked`]): the store's, when this process has the log (role `all`),
//!   and the notices this gateway has seen. A refused token closes with
//!   [`CloseReason::Revoked`](tidings_schemas::client::CloseReason::Revoked).
//! - **Notices** on `tidings.revoked.<tenant>` ([`Notice`], published by whoever records a
//!   revocation, after recording it) end the matching live sessions at once, on every
//!   gateway ([`crate::revocation_watch`]). Core NATS is at-most-once: a gateway cut off from NATS at that
//!   moment misses the notice.
//! - **A periodic re-check** of every live session against the store (every
//!   `auth.revocation_recheck_secs`, and at each NATS reconnection) bounds what a missed
//!   notice costs: a revoked session lives at most that long. It needs the store, so it runs
//!   where the log is in-process; a separate gateway relies on the log refusing revoked
//!   tokens on its RPC (the log verifies the caller's token on every user request).
//!
//! A failed check refuses the Hello (fail closed): an unavailable store must not let a
//! revoked token in.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings_log_api::{LogError, TenantId, UserId};
use tidings_log_api::{RevocationStore, TokenRef, subjects};

/// The largest notice accepted, in bytes (a 128-byte jti or a 64-byte user id, in JSON).
pub const MAX_NOTICE_BYTES: usize = 1024;

/// Notices remembered by a gateway (so a Hello racing a notice is still refused even where
/// the store is not at hand). Each holds a tenant and a jti or user id: at most ~300 bytes,
/// so about 1.2 MiB.
pub const MAX_REMEMBERED: usize = 4096;

/// What a revocation notice says: one token id, or one user's cutoff.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notice {
    /// A revoked token id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// A user whose tokens issued at or before `before` are revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Unix seconds; with `user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<u64>,
}

/// A notice, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Jti(String),
    UserBefore { user: UserId, before: u64 },
}

impl Notice {
    pub fn jti(jti: &str) -> Notice {
        Notice {
            jti: Some(jti.to_owned()),
            user: None,
            before: None,
        }
    }

    pub fn user_before(user: &UserId, before: u64) -> Notice {
        Notice {
            jti: None,
            user: Some(user.to_string()),
            before: Some(before),
        }
    }

    pub fn target(&self) -> Result<Target, String> {
        match (&self.jti, &self.user, self.before) {
            (Some(jti), None, None) if !jti.is_empty() => Ok(Target::Jti(jti.clone())),
            (None, Some(user), Some(before)) => Ok(Target::UserBefore {
                user: UserId::new(user.as_str()).map_err(|e| e.to_string())?,
                before,
            }),
            _ => Err("a notice names a jti, or a user and a time".into()),
        }
    }
}

/// Publishes a notice for `tenant` and waits until NATS has it (bounded by `timeout`).
pub async fn publish(
    nats: &async_nats::Client,
    tenant: &TenantId,
    notice: &Notice,
    timeout: Duration,
) -> Result<(), String> {
    let payload = serde_json::to_vec(notice).map_err(|e| e.to_string())?;
    tokio::time::timeout(timeout, async {
        nats.publish(subjects::revoked(tenant), payload.into())
            .await
            .map_err(|e| e.to_string())?;
        nats.flush().await.map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| format!("NATS did not take the notice within {timeout:?}"))?
}

/// What the gateway knows about revoked tokens.
#[derive(Default)]
pub struct Revocations {
    store: OnceLock<Arc<dyn RevocationStore>>,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    jtis: HashSet<(TenantId, String)>,
    cutoffs: HashMap<(TenantId, UserId), u64>,
    /// Insertion order, to forget the oldest first.
    order: VecDeque<Remembered>,
}

enum Remembered {
    Jti(TenantId, String),
    Cutoff(TenantId, UserId),
}

impl Revocations {
    /// Checks tokens against `store` from now on (set once; later calls are ignored).
    pub fn set_store(&self, store: Arc<dyn RevocationStore>) {
        let _ = self.store.set(store);
    }

    pub fn has_store(&self) -> bool {
        self.store.get().is_some()
    }

    /// Remembers a notice.
    pub fn note(&self, tenant: &TenantId, target: &Target) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        while seen.order.len() >= MAX_REMEMBERED {
            match seen.order.pop_front() {
                Some(Remembered::Jti(t, j)) => {
                    seen.jtis.remove(&(t, j));
                }
                Some(Remembered::Cutoff(t, u)) => {
                    seen.cutoffs.remove(&(t, u));
                }
                None => break,
            }
        }
        match target {
            Target::Jti(jti) => {
                if seen.jtis.insert((tenant.clone(), jti.clone())) {
                    seen.order
                        .push_back(Remembered::Jti(tenant.clone(), jti.clone()));
                }
            }
            Target::UserBefore { user, before } => {
                let key = (tenant.clone(), user.clone());
                match seen.cutoffs.get_mut(&key) {
                    Some(cutoff) => *cutoff = (*cutoff).max(*before),
                    None => {
                        seen.cutoffs.insert(key, *before);
                        seen.order
                            .push_back(Remembered::Cutoff(tenant.clone(), user.clone()));
                    }
                }
            }
        }
    }

    fn seen_revoked(&self, token: &TokenRef<'_>) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(jti) = token.jti
            && seen.jtis.contains(&(token.tenant.clone(), jti.to_owned()))
        {
            return true;
        }
        seen.cutoffs
            .get(&(token.tenant.clone(), token.user.clone()))
            .is_some_and(|cutoff| token.issued_at <= *cutoff)
    }

    /// Whether the token is revoked, as far as this gateway can tell.
    pub async fn is_revoked(&self, token: TokenRef<'_>) -> Result<bool, LogError> {
        if self.seen_revoked(&token) {
            return Ok(true);
        }
        match self.store.get() {
            Some(store) => store.is_revoked(token).await,
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip_and_malformed_ones_are_refused() {
        let bob = UserId::new("bob").expect("id");
        let n = Notice::user_before(&bob, 42);
        let json = serde_json::to_string(&n).expect("json");
        assert_eq!(json, r#"{"user":"bob","before":42}"#);
        let back: Notice = serde_json::from_str(&json).expect("parse");
        assert_eq!(
            back.target(),
            Ok(Target::UserBefore {
                user: bob,
                before: 42
            })
        );
        assert_eq!(
            serde_json::to_string(&Notice::jti("j1")).expect("json"),
            r#"{"jti":"j1"}"#
        );
        for bad in [
            r#"{}"#,
            r#"{"jti":""}"#,
            r#"{"user":"bob"}"#,
            r#"{"jti":"j","user":"bob","before":1}"#,
            r#"{"user":"a/b","before":1}"#,
        ] {
            let parsed = serde_json::from_str::<Notice>(bad).expect("shape");
            assert!(parsed.target().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<Notice>(r#"{"jti":"j","x":1}"#).is_err());
    }

    #[test]
    fn remembered_notices_are_bounded_and_cutoffs_only_move_forward() {
        let r = Revocations::default();
        let t = TenantId::new("acme").expect("id");
        let bob = UserId::new("bob").expect("id");
        r.note(
            &t,
            &Target::UserBefore {
                user: bob.clone(),
                before: 100,
            },
        );
        r.note(
            &t,
            &Target::UserBefore {
                user: bob.clone(),
                before: 50,
            },
        );
        let token = |iat| TokenRef {
            tenant: &t,
            user: &bob,
            jti: None,
            issued_at: iat,
        };
        assert!(r.seen_revoked(&token(100)));
        assert!(!r.seen_revoked(&token(101)));
        for i in 0..(MAX_REMEMBERED + 5) {
            r.note(&t, &Target::Jti(format!("j{i}")));
        }
        let seen = r.seen.lock().expect("lock");
        assert!(seen.order.len() <= MAX_REMEMBERED);
        assert_eq!(seen.jtis.len() + seen.cutoffs.len(), seen.order.len());
    }
}
