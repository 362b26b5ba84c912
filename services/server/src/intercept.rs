//! Interceptors over NATS request/reply: how `tidings serve` reaches the hooks the log's
//! [`tidings_log::interceptor`] rules name (docs/decisions/interceptors.md).
//!
//! The request is JSON, so a DLP or moderation service in any language can answer it:
//!
//! ```json
//! {"tenant":"acme","conversation":"team","kind":"group","sender":"alice",
//!  "client_msg_id":"m1","event":"message_posted","text":"...","mentions":[],
//!  "target_seq":0,"reaction":""}
//! ```
//!
//! `text` is a message's text or an edit's new text, `target_seq` what an edit or reaction
//! is about. The reply is `{"allow":true}` or `{"allow":false,"reason":"..."}`; anything
//! else (no responder, a reply over [`MAX_REPLY_BYTES`], malformed JSON) is a failure that
//! the rule's `fail` setting decides, as is no reply within its deadline.
//!
//! Subjects are under [`SUBJECT_PREFIX`], so one NATS permission covers them: the log may
//! publish there (`tidings nats init` grants it), an interceptor service's user may only
//! subscribe there and answer (its `interceptor` role). The request carries the message in
//! clear: the interceptor is the tenant's own service, and NATS's TLS protects the wire.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tidings_log::interceptor::{InterceptRequest, InterceptRule, Interceptor, Verdict};
use tidings_log::policy::Kinds;
use tidings_log::{Body, TenantId};

/// Every interceptor subject starts with this (then `.` and at least one token).
pub const SUBJECT_PREFIX: &str = "tidings.intercept";
/// A longer reply is a failure, not a verdict.
pub const MAX_REPLY_BYTES: usize = 4096;

/// One `[[log.interceptors]]` entry.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InterceptorSection {
    /// Only this tenant's messages (absent: every tenant's).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Only conversations of this kind (absent: every kind).
    #[serde(default)]
    pub kind: Option<String>,
    /// The NATS subject the hook answers on, under `tidings.intercept.`.
    pub subject: String,
    /// How long a send waits for the verdict.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// `closed` (default): a hook that fails refuses the send, retryable; `open`: the send
    /// goes on unchecked.
    #[serde(default = "default_fail")]
    pub fail: String,
}

fn default_deadline_ms() -> u64 {
    200
}

fn default_fail() -> String {
    "closed".into()
}

impl InterceptorSection {
    pub fn rule(&self, kinds: &Kinds) -> Result<InterceptRule, String> {
        let tenant = self
            .tenant
            .as_deref()
            .map(TenantId::new)
            .transpose()
            .map_err(|e| e.to_string())?;
        if let Some(kind) = &self.kind {
            kinds.get(kind).map_err(|e| e.to_string())?;
        }
        let tokens = self
            .subject
            .strip_prefix(SUBJECT_PREFIX)
            .and_then(|rest| rest.strip_prefix('.'));
        let valid = tokens.is_some_and(|rest| {
            rest.split('.').all(|token| {
                !token.is_empty()
                    && token
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
        });
        if !valid {
            return Err(format!(
                "subject {:?} must be {SUBJECT_PREFIX}.<token>[.<token>..], tokens of \
                 [A-Za-z0-9_-] (no wildcards)",
                self.subject
            ));
        }
        let fail_open = match self.fail.as_str() {
            "open" => true,
            "closed" => false,
            other => return Err(format!("fail is \"open\" or \"closed\", not {other:?}")),
        };
        let deadline = Duration::from_millis(self.deadline_ms);
        if deadline.is_zero() || deadline > tidings_log::interceptor::MAX_DEADLINE {
            return Err(format!(
                "deadline_ms must be 1 to {}",
                tidings_log::interceptor::MAX_DEADLINE.as_millis()
            ));
        }
        Ok(InterceptRule {
            tenant,
            kind: self.kind.clone(),
            target: self.subject.clone(),
            deadline,
            fail_open,
        })
    }
}

/// The hooks, reached over this process's NATS connection.
pub struct NatsHooks {
    pub client: async_nats::Client,
}

#[async_trait]
impl Interceptor for NatsHooks {
    async fn check(&self, subject: &str, req: &InterceptRequest) -> Result<Verdict, String> {
        let payload = request_json(req).to_string();
        let reply = self
            .client
            .request(subject.to_string(), payload.into())
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        verdict(&reply.payload)
    }
}

/// The request a hook gets.
pub fn request_json(req: &InterceptRequest) -> Value {
    let (text, mentions, target_seq, reaction) = match &req.body {
        Body::MessagePosted(p) => (p.text.as_str(), p.mentions.clone(), 0, ""),
        Body::MessageEdited(e) => (e.new_text.as_str(), Vec::new(), e.target_seq, ""),
        Body::ReactionAdded(r) => ("", Vec::new(), r.target_seq, r.reaction.as_str()),
        _ => ("", Vec::new(), 0, ""),
    };
    json!({
        "tenant": req.tenant.as_str(),
        "conversation": req.conv.as_str(),
        "kind": req.kind,
        "sender": req.sender.as_str(),
        "client_msg_id": req.client_msg_id.as_str(),
        "event": tidings_log::event_kind(Some(&req.body)),
        "text": text,
        "mentions": mentions,
        "target_seq": target_seq,
        "reaction": reaction,
    })
}

/// A hook's reply as a verdict, or why it is none.
pub fn verdict(reply: &[u8]) -> Result<Verdict, String> {
    if reply.len() > MAX_REPLY_BYTES {
        return Err(format!(
            "the reply is {} bytes, over {MAX_REPLY_BYTES}",
            reply.len()
        ));
    }
    #[derive(Deserialize)]
    struct Reply {
        allow: bool,
        #[serde(default)]
        reason: String,
    }
    let reply: Reply =
        serde_json::from_slice(reply).map_err(|e| format!("the reply is not a verdict: {e}"))?;
    Ok(if reply.allow {
        Verdict::Allow
    } else {
        Verdict::Reject(reply.reason)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(subject: &str) -> InterceptorSection {
        InterceptorSection {
            tenant: Some("acme".into()),
            kind: None,
            subject: subject.into(),
            deadline_ms: 200,
            fail: "closed".into(),
        }
    }

    #[test]
    fn sections_are_checked_before_they_become_rules() {
        let kinds = Kinds::new(Vec::new()).expect("built in");
        let rule = section("tidings.intercept.acme-dlp")
            .rule(&kinds)
            .expect("valid");
        assert!(!rule.fail_open);
        assert_eq!(rule.deadline, Duration::from_millis(200));
        for bad in [
            "tidings.intercept",
            "tidings.intercept.",
            "tidings.intercept.>",
            "tidings.intercept.a.*",
            "tidings.ev.acme",
            "other.subject",
            "tidings.intercept.a b",
        ] {
            assert!(section(bad).rule(&kinds).is_err(), "{bad}");
        }
        let mut s = section("tidings.intercept.x");
        s.kind = Some("no-such-kind".into());
        assert!(s.rule(&kinds).is_err());
        let mut s = section("tidings.intercept.x");
        s.fail = "sometimes".into();
        assert!(s.rule(&kinds).is_err());
        let mut s = section("tidings.intercept.x");
        s.deadline_ms = 0;
        assert!(s.rule(&kinds).is_err());
        let mut s = section("tidings.intercept.x");
        s.tenant = Some("bad tenant!".into());
        assert!(s.rule(&kinds).is_err());
    }

    #[test]
    fn replies_become_verdicts_or_failures() {
        assert_eq!(verdict(br#"{"allow":true}"#), Ok(Verdict::Allow));
        assert_eq!(
            verdict(br#"{"allow":false,"reason":"contains a card number"}"#),
            Ok(Verdict::Reject("contains a card number".into()))
        );
        assert!(verdict(b"yes").is_err());
        assert!(verdict(br#"{"reason":"x"}"#).is_err());
        assert!(verdict(&vec![b' '; MAX_REPLY_BYTES + 1]).is_err());
    }
}
