//! Interceptors: the core's pre-commit extension point (docs/decisions/interceptors.md).
//!
//! A tenant (or a conversation kind) may have a hook that sees each user's message, edit and
//! reaction before it is queued, and allows it or rejects it with a reason: DLP, moderation.
//! The log knows only the rules and the [`Interceptor`] trait; how a hook is reached (NATS
//! request/reply in `tidings serve`) is the caller's.
//!
//! - **Which rule.** The first [`InterceptRule`] whose tenant (if it names one) and kind (if
//!   it names one) match; none: the append goes on unasked. Membership and conversation
//!   events, recalls and reaction removals are never intercepted: they carry no content of
//!   their own.
//! - **Deadline.** A hook gets [`InterceptRule::deadline`]; late, unreachable or answering
//!   nonsense, it has *failed*, and the rule's `fail_open` says what happens: the append goes
//!   on (open: availability first) or is refused `unavailable`, retryable (closed: nothing
//!   unchecked is ever committed).
//! - **Rejection** is [`LogError::Rejected`] with the hook's reason (cut to
//!   [`MAX_REASON_CHARS`], control characters dropped): the sender sees it; nothing is
//!   committed.
//! - **Cost.** Only appends a rule matches wait for a hook; the tenants a rule could match
//!   also pay a read of the conversation's head (its kind, which the hook is told).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Body, ClientMsgId, ConvId, LogError, TenantId, UserId};

/// Longest reason from a hook passed on to the sender.
pub const MAX_REASON_CHARS: usize = 200;
/// Longest deadline a rule may have: a send waits this long at most for its hook.
pub const MAX_DEADLINE: Duration = Duration::from_secs(10);

/// One hook and what it applies to.
#[derive(Clone, Debug)]
pub struct InterceptRule {
    /// Only this tenant's appends (`None`: every tenant's).
    pub tenant: Option<TenantId>,
    /// Only conversations of this kind (`None`: every kind).
    pub kind: Option<String>,
    /// Where the hook is (for `tidings serve`, a NATS subject).
    pub target: String,
    /// How long an append waits for the hook's verdict.
    pub deadline: Duration,
    /// A hook that fails (late, unreachable, malformed answer) lets the append through;
    /// otherwise the append is refused `unavailable`.
    pub fail_open: bool,
}

impl InterceptRule {
    fn matches_tenant(&self, tenant: &TenantId) -> bool {
        self.tenant.as_ref().is_none_or(|t| t == tenant)
    }

    fn matches(&self, tenant: &TenantId, kind: &str) -> bool {
        self.matches_tenant(tenant) && self.kind.as_deref().is_none_or(|k| k == kind)
    }
}

/// What a hook is asked about.
#[derive(Clone, Debug)]
pub struct InterceptRequest {
    pub tenant: TenantId,
    pub conv: ConvId,
    /// The conversation's kind by name ("group", "class", ...).
    pub kind: String,
    pub sender: UserId,
    pub client_msg_id: ClientMsgId,
    /// A message, an edit or a reaction.
    pub body: Body,
}

/// A hook's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused, with the reason the sender is shown.
    Reject(String),
}

/// Reaches a hook. `Err` says why it could not answer (unreachable, no responder,
/// malformed reply); the caller applies the deadline.
#[async_trait::async_trait]
pub trait Interceptor: Send + Sync + 'static {
    async fn check(&self, target: &str, req: &InterceptRequest) -> Result<Verdict, String>;
}

/// The rules and the way to their hooks, as a [`crate::Log`] holds them.
#[derive(Clone)]
pub struct Interceptors {
    rules: Vec<InterceptRule>,
    hooks: Arc<dyn Interceptor>,
}

impl Interceptors {
    /// Refuses a rule with an empty target or a deadline of zero or over [`MAX_DEADLINE`].
    pub fn new(rules: Vec<InterceptRule>, hooks: Arc<dyn Interceptor>) -> Result<Self, String> {
        for (i, rule) in rules.iter().enumerate() {
            if rule.target.is_empty() {
                return Err(format!("interceptor {i}: the target is empty"));
            }
            if rule.deadline.is_zero() || rule.deadline > MAX_DEADLINE {
                return Err(format!(
                    "interceptor {i}: the deadline must be over 0 and at most {} ms",
                    MAX_DEADLINE.as_millis()
                ));
            }
        }
        Ok(Interceptors { rules, hooks })
    }

    /// Whether an append of `body` to `tenant` may have a hook at all (before its
    /// conversation's kind is known).
    pub(crate) fn may_apply(&self, tenant: &TenantId, body: &Body) -> bool {
        intercepted(body) && self.rules.iter().any(|r| r.matches_tenant(tenant))
    }

    /// Asks the first matching rule's hook about `req`; `Ok` lets the append go on.
    pub(crate) async fn check(&self, req: &InterceptRequest) -> Result<(), LogError> {
        if !intercepted(&req.body) {
            return Ok(());
        }
        let Some(rule) = self
            .rules
            .iter()
            .find(|r| r.matches(&req.tenant, &req.kind))
        else {
            return Ok(());
        };
        let started = Instant::now();
        let answer = tokio::time::timeout(rule.deadline, self.hooks.check(&rule.target, req)).await;
        crate::metrics::INTERCEPT_SECONDS.observe(started.elapsed().as_secs_f64());
        let failure = match answer {
            Ok(Ok(Verdict::Allow)) => {
                crate::metrics::INTERCEPTS.inc("allowed");
                return Ok(());
            }
            Ok(Ok(Verdict::Reject(reason))) => {
                crate::metrics::INTERCEPTS.inc("rejected");
                return Err(LogError::Rejected {
                    reason: clean_reason(&reason),
                });
            }
            Ok(Err(why)) => why,
            Err(_) => format!("no verdict within {} ms", rule.deadline.as_millis()),
        };
        if rule.fail_open {
            crate::metrics::INTERCEPTS.inc("failed_open");
            tracing::warn!(tenant = %req.tenant, target = rule.target, failure, "interceptor failed; letting the append through (fail-open)");
            Ok(())
        } else {
            crate::metrics::INTERCEPTS.inc("failed_closed");
            tracing::warn!(tenant = %req.tenant, target = rule.target, failure, "interceptor failed; refusing the append (fail-closed)");
            Err(LogError::Unavailable {
                reason: "the tenant's message check did not answer; try again later".into(),
            })
        }
    }
}

/// Bodies with content of their own: a message, an edit's new text, a reaction.
fn intercepted(body: &Body) -> bool {
    matches!(
        body,
        Body::MessagePosted(_) | Body::MessageEdited(_) | Body::ReactionAdded(_)
    )
}

/// A hook's reason as the sender may see it: no control characters, at most
/// [`MAX_REASON_CHARS`], never empty.
fn clean_reason(reason: &str) -> String {
    let text: String = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_REASON_CHARS)
        .collect();
    let text = text.trim();
    if text.is_empty() {
        "refused by the tenant's message check".into()
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Result<Verdict, String>, Duration);

    #[async_trait::async_trait]
    impl Interceptor for Fixed {
        async fn check(&self, _: &str, _: &InterceptRequest) -> Result<Verdict, String> {
            tokio::time::sleep(self.1).await;
            self.0.clone()
        }
    }

    fn rule(tenant: Option<&str>, kind: Option<&str>, fail_open: bool) -> InterceptRule {
        InterceptRule {
            tenant: tenant.map(|t| TenantId::new(t).expect("valid")),
            kind: kind.map(str::to_string),
            target: "hook".into(),
            deadline: Duration::from_millis(50),
            fail_open,
        }
    }

    fn request(tenant: &str, kind: &str, body: Body) -> InterceptRequest {
        InterceptRequest {
            tenant: TenantId::new(tenant).expect("valid"),
            conv: ConvId::new("c").expect("valid"),
            kind: kind.into(),
            sender: UserId::new("u").expect("valid"),
            client_msg_id: ClientMsgId::new("m").expect("valid"),
            body,
        }
    }

    fn text(t: &str) -> Body {
        Body::MessagePosted(tidings_schemas::v1::MessagePosted {
            text: t.into(),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn rules_match_by_tenant_and_kind_and_verdicts_become_errors() {
        let reject = Arc::new(Fixed(
            Ok(Verdict::Reject("no\u{7}  secrets".into())),
            Duration::ZERO,
        ));
        let hooks = Interceptors::new(vec![rule(Some("acme"), Some("class"), false)], reject)
            .expect("valid");
        assert!(hooks.may_apply(&TenantId::new("acme").expect("valid"), &text("x")));
        assert!(!hooks.may_apply(&TenantId::new("other").expect("valid"), &text("x")));
        // Another kind, another tenant: not asked.
        assert!(
            hooks
                .check(&request("acme", "group", text("x")))
                .await
                .is_ok()
        );
        assert!(
            hooks
                .check(&request("other", "class", text("x")))
                .await
                .is_ok()
        );
        let err = hooks
            .check(&request("acme", "class", text("x")))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), "rejected");
        assert_eq!(err.to_string(), "rejected: no  secrets");
        // A recall carries no content: never asked.
        let recall = Body::MessageRecalled(tidings_schemas::v1::MessageRecalled { target_seq: 1 });
        assert!(hooks.check(&request("acme", "class", recall)).await.is_ok());
    }

    #[tokio::test]
    async fn a_hook_past_its_deadline_fails_open_or_closed_as_configured() {
        let slow = Arc::new(Fixed(Ok(Verdict::Allow), Duration::from_secs(5)));
        let open = Interceptors::new(vec![rule(None, None, true)], slow.clone()).expect("valid");
        assert!(
            open.check(&request("acme", "group", text("x")))
                .await
                .is_ok()
        );
        let closed = Interceptors::new(vec![rule(None, None, false)], slow).expect("valid");
        let err = closed
            .check(&request("acme", "group", text("x")))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), "unavailable");
        assert!(err.is_retryable());
        let broken = Arc::new(Fixed(Err("no responders".into()), Duration::ZERO));
        let closed = Interceptors::new(vec![rule(None, None, false)], broken).expect("valid");
        assert_eq!(
            closed
                .check(&request("acme", "group", text("x")))
                .await
                .expect_err("refused")
                .code(),
            "unavailable"
        );
    }

    #[test]
    fn rules_with_no_target_or_a_bad_deadline_are_refused() {
        let hooks: Arc<dyn Interceptor> = Arc::new(Fixed(Ok(Verdict::Allow), Duration::ZERO));
        let mut bad = rule(None, None, true);
        bad.target.clear();
        assert!(Interceptors::new(vec![bad], hooks.clone()).is_err());
        let mut bad = rule(None, None, true);
        bad.deadline = Duration::ZERO;
        assert!(Interceptors::new(vec![bad], hooks.clone()).is_err());
        let mut bad = rule(None, None, true);
        bad.deadline = MAX_DEADLINE + Duration::from_millis(1);
        assert!(Interceptors::new(vec![bad], hooks).is_err());
    }
}
