//! Outgoing webhooks (issue 16, part 3; docs/decisions/webhooks.md).
//!
//! - this file: the `[webhooks]` settings, and managing subscriptions (create, list, delete,
//!   replay, dead letters) as one set of functions that the CLI (`tidings webhook ...`, on
//!   the store) and the admin listener (`/v1/admin/webhooks...`) both call, so a request is
//!   checked and audited the same way whichever door it came through.
//! - [`sign`]: the request a receiver gets: the JSON body and its HMAC-SHA256 signature.
//! - [`dispatch`]: delivery while serving: one durable JetStream consumer per subscription,
//!   cursors in the KV, retries with backoff and jitter, dead letters.
//!
//! The rows themselves (and the sealed secret) are `tidings_log::webhooks`'s: the log crate
//! owns the keyspace.

pub mod dispatch;
pub mod sign;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tidings_archive::compliance::audit::Entry;
use tidings_archive::compliance::{Actor, Compliance, ComplianceError};
use tidings_log::webhooks::Webhooks;
use tidings_log::{ConvId, LogError, TenantId};
use tidings_schemas::storage::WebhookSubscription;

/// Longest subscription URL accepted.
pub const MAX_URL_BYTES: usize = 2048;
/// Most conversations, conversation kinds or event kinds one subscription may name.
pub const MAX_FILTERS: usize = 100;
/// Most tries of one event a subscription may ask for.
pub const MAX_ATTEMPTS_CAP: u32 = 100;
/// Dead letters listed per request (oldest conversations and seqs first).
pub const DEAD_LETTERS_LISTED: usize = 1000;

/// Every event kind a subscription may name (`tidings_log::event_kind`'s names).
pub const EVENT_KINDS: &[&str] = &[
    "message_posted",
    "message_edited",
    "message_recalled",
    "reaction_added",
    "reaction_removed",
    "member_joined",
    "member_left",
    "conversation_created",
    "conversation_renamed",
    "member_role_changed",
    "display_name_set",
];

/// `[webhooks]`: delivery settings (roles all and log). Every bound is here or a named const
/// above; docs/limits.md lists them.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Run the dispatcher in this process. With several log processes on one store, keep it
    /// on in one only (each subscription's cursors are written by one dispatcher).
    pub enabled: bool,
    /// Subscriptions one tenant may have.
    pub max_per_tenant: usize,
    /// Tries of one event before it is dead-lettered, for subscriptions that do not say.
    pub default_max_attempts: u32,
    /// One request's deadline (connect, send, status line).
    pub request_timeout_ms: u64,
    /// The first retry's backoff ceiling; doubled per try up to `backoff_max_ms`. The wait
    /// is drawn uniformly below the ceiling (full jitter).
    pub backoff_first_ms: u64,
    pub backoff_max_ms: u64,
    /// How often the dispatcher re-reads the subscriptions and the replays asked for.
    pub refresh_ms: u64,
    /// JetStream's ack wait for a notice; progress acks keep a retried notice from being
    /// redelivered meanwhile.
    pub ack_wait_ms: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            enabled: true,
            max_per_tenant: 100,
            default_max_attempts: 8,
            request_timeout_ms: 10_000,
            backoff_first_ms: 500,
            backoff_max_ms: 60_000,
            refresh_ms: 1000,
            ack_wait_ms: 30_000,
        }
    }
}

impl WebhooksConfig {
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("webhooks.max_per_tenant", self.max_per_tenant as u64),
            ("webhooks.request_timeout_ms", self.request_timeout_ms),
            ("webhooks.backoff_first_ms", self.backoff_first_ms),
            ("webhooks.backoff_max_ms", self.backoff_max_ms),
            ("webhooks.refresh_ms", self.refresh_ms),
            ("webhooks.ack_wait_ms", self.ack_wait_ms),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !(1..=MAX_ATTEMPTS_CAP).contains(&self.default_max_attempts) {
            return Err(format!(
                "webhooks.default_max_attempts must be 1 to {MAX_ATTEMPTS_CAP}"
            ));
        }
        if self.backoff_first_ms > self.backoff_max_ms {
            return Err("webhooks.backoff_first_ms is over webhooks.backoff_max_ms".into());
        }
        if self.request_timeout_ms >= self.ack_wait_ms {
            return Err(
                "webhooks.request_timeout_ms must be below webhooks.ack_wait_ms (a request \
                 outliving the ack wait would see its notice redelivered)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Why a management request failed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The request is malformed (400).
    #[error("{0}")]
    Invalid(String),
    /// No such subscription in the caller's tenant (404).
    #[error("tenant {tenant} has no webhook subscription {id}")]
    NotFound { tenant: String, id: String },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Audit(#[from] ComplianceError),
}

impl WebhookError {
    pub fn code(&self) -> &'static str {
        match self {
            WebhookError::Invalid(_) => "invalid_request",
            WebhookError::NotFound { .. } => "not_found",
            WebhookError::Log(e) => e.code(),
            WebhookError::Audit(e) => e.code(),
        }
    }

    /// Whether the same request may succeed later (the store was unavailable).
    pub fn is_retryable(&self) -> bool {
        match self {
            WebhookError::Invalid(_) | WebhookError::NotFound { .. } => false,
            WebhookError::Log(e) => e.is_retryable(),
            WebhookError::Audit(e) => e.is_retryable(),
        }
    }
}

/// What a new subscription asks for, checked.
#[derive(Clone, Debug, Default)]
pub struct NewSubscription {
    pub url: String,
    pub conversations: Vec<ConvId>,
    pub conversation_kinds: Vec<String>,
    pub event_kinds: Vec<String>,
    pub max_attempts: Option<u32>,
}

impl NewSubscription {
    /// From a JSON body: `{"url", "conversations"?: [..], "conversation_kinds"?: [..],
    /// "event_kinds"?: [..], "max_attempts"?: N}`.
    pub fn from_json(fields: &Map<String, Value>) -> Result<Self, String> {
        let list = |name: &str| -> Result<Vec<String>, String> {
            match fields.get(name) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| format!("{name} holds strings only"))
                    })
                    .collect(),
                Some(_) => Err(format!("{name} is a list of strings")),
            }
        };
        let url = fields
            .get("url")
            .and_then(Value::as_str)
            .ok_or("url is required")?
            .to_string();
        let conversations = list("conversations")?
            .into_iter()
            .map(|c| ConvId::new(c).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let max_attempts = match fields.get("max_attempts") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or("max_attempts is a whole number")?,
            ),
        };
        Ok(NewSubscription {
            url,
            conversations,
            conversation_kinds: list("conversation_kinds")?,
            event_kinds: list("event_kinds")?,
            max_attempts,
        })
    }

    /// Checks the URL (http or https, no credentials in it, bounded) and the filters.
    pub fn check(&self) -> Result<(), String> {
        check_url(&self.url)?;
        if self.conversations.len() > MAX_FILTERS
            || self.conversation_kinds.len() > MAX_FILTERS
            || self.event_kinds.len() > MAX_FILTERS
        {
            return Err(format!(
                "a subscription names at most {MAX_FILTERS} of each filter"
            ));
        }
        for kind in &self.conversation_kinds {
            tidings_log::ids::validate_id("conversation kind", kind).map_err(|e| e.to_string())?;
        }
        for kind in &self.event_kinds {
            if !EVENT_KINDS.contains(&kind.as_str()) {
                return Err(format!(
                    "unknown event kind {kind:?}; one of {}",
                    EVENT_KINDS.join(", ")
                ));
            }
        }
        if let Some(n) = self.max_attempts
            && !(1..=MAX_ATTEMPTS_CAP).contains(&n)
        {
            return Err(format!("max_attempts must be 1 to {MAX_ATTEMPTS_CAP}"));
        }
        Ok(())
    }
}

/// A receiver's URL: `http://` or `https://`, a host, no user or password, at most
/// [`MAX_URL_BYTES`].
pub fn check_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_URL_BYTES {
        return Err(format!("url is over {MAX_URL_BYTES} bytes"));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("url: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("url must be http:// or https://".into());
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("url has no host".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("url may not hold a user or password (it is listed and audited)".into());
    }
    Ok(())
}

/// A subscription as listed: never its secret.
pub fn subscription_json(tenant: &TenantId, s: &WebhookSubscription) -> Value {
    json!({
        "tenant": tenant.as_str(),
        "id": s.id,
        "url": s.url,
        "conversations": s.conversations,
        "conversation_kinds": s.conversation_kinds,
        "event_kinds": s.event_kinds,
        "max_attempts": s.max_attempts,
        "created": tidings_archive::compliance::rfc3339_ms(s.created_ms),
        "created_by": s.created_by,
    })
}

/// A fresh signing secret: 32 random bytes, hex, with a prefix that says what it is. The
/// receiver keys HMAC-SHA256 with the string's bytes as shown.
fn new_secret() -> Result<String, WebhookError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| WebhookError::Invalid(format!("no random source for a secret: {e}")))?;
    Ok(format!("whsec_{}", tidings_log::crypto::hex_encode(&bytes)))
}

/// Managing subscriptions: the CLI's and the admin listener's one implementation. Every
/// change is recorded in the tenant's audit log before it is answered.
pub struct Manage<'a> {
    pub compliance: &'a Compliance,
    pub max_per_tenant: usize,
    pub default_max_attempts: u32,
}

impl Manage<'_> {
    fn hooks(&self) -> Webhooks {
        Webhooks::new(
            self.compliance.store().clone(),
            self.compliance.keyring().clone(),
        )
    }

    /// Records a change done. The change stands if recording fails (logged): a subscription
    /// made but reported as failed would have its secret shown to nobody.
    async fn record(&self, tenant: &TenantId, actor: &Actor, action: &str, detail: String) {
        let mut entry = Entry::new(actor, action, "completed");
        entry.access_id = uuid::Uuid::now_v7().to_string();
        entry.detail = detail;
        if let Err(e) = self.compliance.record(tenant, &entry).await {
            tracing::error!(%tenant, action, error = %e, "failed to record a webhook change");
        }
    }

    /// Creates a subscription; the answer holds the secret, the only time it is shown.
    pub async fn create(
        &self,
        tenant: &TenantId,
        new: NewSubscription,
        actor: &Actor,
    ) -> Result<Value, WebhookError> {
        new.check().map_err(WebhookError::Invalid)?;
        let secret = new_secret()?;
        let sub = WebhookSubscription {
            id: uuid::Uuid::now_v7().simple().to_string(),
            url: new.url,
            conversations: new.conversations.iter().map(|c| c.to_string()).collect(),
            conversation_kinds: new.conversation_kinds,
            event_kinds: new.event_kinds,
            max_attempts: new.max_attempts.unwrap_or(self.default_max_attempts),
            created_ms: tidings_log::now_ms(),
            created_by: actor.name().to_string(),
            ..Default::default()
        };
        let sub = self
            .hooks()
            .create(tenant, sub, secret.as_bytes(), self.max_per_tenant)
            .await?;
        let detail = format!("webhook {} to {}", sub.id, sub.url);
        self.record(tenant, actor, "webhook_create", detail).await;
        let mut answer = subscription_json(tenant, &sub);
        answer["secret"] = json!(secret);
        Ok(answer)
    }

    /// The tenant's subscriptions (at most `max_per_tenant`), without secrets.
    pub async fn list(&self, tenant: &TenantId) -> Result<Vec<Value>, WebhookError> {
        let subs = self.hooks().list(Some(tenant), self.max_per_tenant).await?;
        Ok(subs.iter().map(|s| subscription_json(tenant, s)).collect())
    }

    /// Deletes a subscription of the tenant with everything it left.
    pub async fn delete(
        &self,
        tenant: &TenantId,
        id: &str,
        actor: &Actor,
    ) -> Result<Value, WebhookError> {
        let hooks = self.hooks();
        let sub = self.existing(&hooks, tenant, id).await?;
        hooks.delete(tenant, &sub.id).await?;
        let detail = format!("webhook {} to {}", sub.id, sub.url);
        self.record(tenant, actor, "webhook_delete", detail).await;
        Ok(json!({"tenant": tenant.as_str(), "id": sub.id, "deleted": true}))
    }

    /// Asks for the conversation's events from `from_seq` on to be delivered again (the
    /// dispatcher lowers the cursor and delivers them, in order, before later events).
    pub async fn replay(
        &self,
        tenant: &TenantId,
        id: &str,
        conv: &ConvId,
        from_seq: u64,
        actor: &Actor,
    ) -> Result<Value, WebhookError> {
        if from_seq == 0 {
            return Err(WebhookError::Invalid("from_seq starts at 1".into()));
        }
        let hooks = self.hooks();
        let sub = self.existing(&hooks, tenant, id).await?;
        hooks.ask_replay(tenant, &sub.id, conv, from_seq).await?;
        let detail = format!("webhook {} conversation {conv} from seq {from_seq}", sub.id);
        self.record(tenant, actor, "webhook_replay", detail).await;
        Ok(json!({
            "tenant": tenant.as_str(),
            "id": sub.id,
            "conversation": conv.as_str(),
            "from_seq": from_seq,
            "replay": "asked",
        }))
    }

    /// The subscription's dead letters (at most [`DEAD_LETTERS_LISTED`]).
    pub async fn dead_letters(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Vec<Value>, WebhookError> {
        let hooks = self.hooks();
        let sub = self.existing(&hooks, tenant, id).await?;
        let letters = hooks
            .dead_letters(tenant, &sub.id, DEAD_LETTERS_LISTED)
            .await?;
        Ok(letters
            .into_iter()
            .map(|d| {
                json!({
                    "tenant": tenant.as_str(),
                    "id": sub.id,
                    "conversation": d.conversation,
                    "seq": d.seq,
                    "event_id": d.letter.event_id,
                    "attempts": d.letter.attempts,
                    "last_error": d.letter.last_error,
                    "time": tidings_archive::compliance::rfc3339_ms(d.letter.time_ms),
                })
            })
            .collect())
    }

    async fn existing(
        &self,
        hooks: &Webhooks,
        tenant: &TenantId,
        id: &str,
    ) -> Result<WebhookSubscription, WebhookError> {
        let not_found = || WebhookError::NotFound {
            tenant: tenant.to_string(),
            id: id.chars().take(80).collect(),
        };
        if tidings_log::ids::validate_id("webhook id", id).is_err() {
            return Err(not_found());
        }
        hooks.get(tenant, id).await?.ok_or_else(not_found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_kind_the_log_names_can_be_subscribed_to() {
        use tidings_log::Body;
        use tidings_schemas::v1 as ev;
        let bodies = [
            Body::MessagePosted(ev::MessagePosted::default()),
            Body::MessageEdited(ev::MessageEdited::default()),
            Body::MessageRecalled(ev::MessageRecalled::default()),
            Body::ReactionAdded(ev::ReactionAdded::default()),
            Body::ReactionRemoved(ev::ReactionRemoved::default()),
            Body::MemberJoined(ev::MemberJoined::default()),
            Body::MemberLeft(ev::MemberLeft::default()),
            Body::ConversationCreated(ev::ConversationCreated::default()),
            Body::ConversationRenamed(ev::ConversationRenamed::default()),
            Body::MemberRoleChanged(ev::MemberRoleChanged::default()),
            Body::DisplayNameSet(ev::DisplayNameSet::default()),
        ];
        for body in &bodies {
            let name = tidings_log::event_kind(Some(body));
            assert!(EVENT_KINDS.contains(&name), "{name}");
        }
        assert_eq!(bodies.len(), EVENT_KINDS.len());
    }

    #[test]
    fn urls_are_http_or_https_without_credentials_and_bounded() {
        assert!(check_url("https://hooks.example.com/tidings").is_ok());
        assert!(check_url("http://127.0.0.1:8080/x?y=1").is_ok());
        for bad in [
            "ftp://example.com/",
            "file:///etc/passwd",
            "https://user:pw@example.com/",
            "not a url",
            "http://",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_BYTES));
        assert!(check_url(&long).is_err());
    }

    #[test]
    fn a_body_is_read_strictly() {
        let body = |v: Value| NewSubscription::from_json(v.as_object().expect("object"));
        let ok = body(
            json!({"url": "https://x.example/h", "conversations": ["team"],
            "event_kinds": ["message_posted"], "max_attempts": 3}),
        )
        .expect("valid");
        assert_eq!(ok.conversations, vec![ConvId::new("team").expect("id")]);
        assert_eq!(ok.max_attempts, Some(3));
        assert!(ok.check().is_ok());
        assert!(body(json!({})).is_err());
        assert!(body(json!({"url": "https://x.example", "conversations": "team"})).is_err());
        assert!(body(json!({"url": "https://x.example", "conversations": ["a b"]})).is_err());
        let unknown =
            body(json!({"url": "https://x.example", "event_kinds": ["typing"]})).expect("parsed");
        assert!(unknown.check().is_err());
        let zero = body(json!({"url": "https://x.example", "max_attempts": 0})).expect("parsed");
        assert!(zero.check().is_err());
    }
}
