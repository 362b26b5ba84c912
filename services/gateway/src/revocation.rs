//! Revoked tokens at the gateway.
//!
//! Three mechanisms, because each one alone has a gap:
//! - **At Hello** a verified token is checked against the revocation records
//!   ([`Revocations::is_revoked`]): the store's, when this process has the log (role `all`),
//!   and the notices this gateway has seen. A refused token closes with
//!   [`CloseReason::Revoked`].
//! - **Notices** on `tidings.revoked.<tenant>` ([`Notice`], published by whoever records a
//!   revocation, after recording it) end the matching live sessions at once, on every
//!   gateway ([`spawn`]). Core NATS is at-most-once: a gateway cut off from NATS at that
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

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tidings_log_api::{LogError, TenantId, UserId};
use tidings_log_api::{RevocationStore, TokenRef};
use tidings_schemas::client::CloseReason;
use tracing::{debug, info, warn};

use crate::hub::{CloseOrder, SessionHandle};
use crate::server::Shared;
use tidings_log_api::subjects;

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

fn revoked_order() -> CloseOrder {
    CloseOrder {
        reason: CloseReason::Revoked,
        message: "the session's token was revoked".into(),
    }
}

/// Ends the sessions a notice names; returns how many.
pub fn apply(shared: &Shared, tenant: &TenantId, target: &Target) -> usize {
    shared.revocations.note(tenant, target);
    let registry = &shared.registry;
    match target {
        Target::Jti(jti) => registry.close_tenant_sessions(
            tenant,
            |s| s.jti.as_deref() == Some(jti.as_str()),
            revoked_order(),
        ),
        Target::UserBefore { user, before } => {
            registry.close_user(tenant, user, |s| s.issued_at <= *before, revoked_order())
        }
    }
}

/// Follows revocation notices and re-checks live sessions every `recheck` (when the store
/// is at hand), until the gateway's NATS client goes.
pub fn spawn(shared: Arc<Shared>, recheck: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(shared, recheck))
}

async fn run(shared: Arc<Shared>, recheck: Duration) {
    let mut notices = match shared.nats.subscribe(subjects::REVOKED_ALL).await {
        Ok(sub) => sub,
        Err(e) => {
            // Without notices, the Hello check and the periodic re-check still hold.
            warn!(error = %e, "failed to subscribe to revocation notices");
            return;
        }
    };
    let mut reconnected = shared.registry.reconnections();
    let mut timer = tokio::time::interval(recheck);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer.tick().await;
    loop {
        tokio::select! {
            msg = notices.next() => match msg {
                Some(msg) => on_notice(&shared, &msg.subject, &msg.payload),
                None => return,
            },
            _ = timer.tick() => recheck_sessions(&shared).await,
            changed = reconnected.recv() => match changed {
                // A notice may have been missed while NATS was away.
                Ok(()) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    recheck_sessions(&shared).await;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
            },
        }
    }
}

fn on_notice(shared: &Shared, subject: &str, payload: &[u8]) {
    let tenant = subject
        .strip_prefix(subjects::REVOKED_PREFIX)
        .and_then(|rest| rest.strip_prefix('.'))
        .and_then(|t| TenantId::new(t).ok());
    let Some(tenant) = tenant else {
        warn!(
            subject,
            "revocation notice on an unexpected subject ignored"
        );
        return;
    };
    if payload.len() > MAX_NOTICE_BYTES {
        warn!(%tenant, bytes = payload.len(), "oversized revocation notice ignored");
        return;
    }
    let target = serde_json::from_slice::<Notice>(payload)
        .map_err(|e| e.to_string())
        .and_then(|n| n.target());
    match target {
        Ok(target) => {
            let closed = apply(shared, &tenant, &target);
            info!(%tenant, ?target, closed, "revocation notice applied");
        }
        Err(e) => warn!(%tenant, error = %e, "malformed revocation notice ignored"),
    }
}

/// Checks every live session's token against the store; closes the revoked ones.
async fn recheck_sessions(shared: &Shared) {
    if !shared.revocations.has_store() {
        return;
    }
    let sessions: Vec<SessionHandle> = shared.registry.sessions();
    let mut closed = 0;
    for s in &sessions {
        let token = TokenRef {
            tenant: &s.tenant,
            user: &s.user,
            jti: s.jti.as_deref(),
            issued_at: s.issued_at,
        };
        match shared.revocations.is_revoked(token).await {
            Ok(true) => {
                s.close(revoked_order());
                closed += 1;
            }
            Ok(false) => {}
            // Not fatal for the session: the next check, or the next Hello, decides.
            Err(e) => debug!(error = %e, "failed to re-check a session's token"),
        }
    }
    if closed > 0 {
        info!(
            closed,
            checked = sessions.len(),
            "revoked sessions found by the periodic check"
        );
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
