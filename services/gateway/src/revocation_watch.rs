//! Ending the live sessions of revoked tokens: following the notices on
//! `tidings.revoked.<tenant>` and re-checking every session against the store
//! ([`crate::revocation`] has the records and the notices themselves).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tidings_log_api::{TenantId, TokenRef, subjects};
use tidings_schemas::client::CloseReason;
use tracing::{debug, info, warn};

use crate::hub::{CloseOrder, SessionHandle};
use crate::revocation::{MAX_NOTICE_BYTES, Notice, Target};
use crate::shared::Shared;

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
