//! JSON lines printed by the command-line tools.

use std::io::Write;

use anyhow::Context;
use serde_json::{Value, json};
use tidings_archive::ArchiveError;
use tidings_archive::compliance::ComplianceError;
use tidings_log::{Body, Committed, Event, LogError};

/// An append's ack: `{"seq":N,"event_id":"...","duplicate":false}`.
pub fn ack(c: &Committed) -> Value {
    json!({"seq": c.seq, "event_id": c.event_id, "duplicate": c.duplicate})
}

/// A failed request: `{"error":{"code":"not_member","message":"...","retryable":false}}`.
pub fn error(e: &LogError) -> Value {
    json!({"error": {"code": e.code(), "message": e.to_string(), "retryable": e.is_retryable()}})
}

/// What `keys shred` destroyed:
/// `{"tenant":"acme","shredded":true,"key_versions_destroyed":2,"key_ids":[1,2],
/// "already_shredded":false,"purged":true}`.
pub fn shred_report(r: &tidings_log::crypto::ShredReport) -> Value {
    json!({
        "tenant": r.tenant.as_str(),
        "shredded": true,
        "key_versions_destroyed": r.key_ids.len(),
        "key_ids": r.key_ids,
        "already_shredded": r.already_shredded,
        "purged": true,
    })
}

/// A failed command, for stderr: the JSON error line of the log error it came from (with
/// the whole context chain as its message), or `error: ...` for anything else.
pub fn failure(e: &anyhow::Error) -> String {
    let typed = e.chain().find_map(|c| {
        if let Some(x) = c.downcast_ref::<LogError>() {
            Some((x.code(), x.is_retryable()))
        } else if let Some(x) = c.downcast_ref::<ComplianceError>() {
            Some((x.code(), x.is_retryable()))
        } else if let Some(x) = c.downcast_ref::<crate::webhooks::WebhookError>() {
            Some((x.code(), x.is_retryable()))
        } else {
            c.downcast_ref::<ArchiveError>()
                .map(|x| (x.code(), x.is_retryable()))
        }
    });
    match typed {
        Some((code, retryable)) => json!({"error": {
            "code": code,
            "message": format!("{e:#}"),
            "retryable": retryable,
        }})
        .to_string(),
        None => format!("error: {e:#}"),
    }
}

/// `group` / `direct`, as printed.
pub use tidings_archive::compliance::hit::conversation_kind;
/// `2026-11-29T20:33:25.123Z` from milliseconds since the Unix epoch (UTC).
pub use tidings_archive::compliance::rfc3339_ms;

/// `owner` / `member`, as printed.
pub fn member_role(role: tidings_log::MemberRole) -> &'static str {
    match role {
        tidings_log::MemberRole::Owner => "owner",
        tidings_log::MemberRole::Member => "member",
        tidings_log::MemberRole::Unspecified => "unspecified",
    }
}

/// The name of an event body's kind, as printed and as clients see it.
pub fn kind(body: Option<&Body>) -> &'static str {
    tidings_log::event_kind(body)
}

/// One event as a JSON object: the envelope, `kind`, `text` (null when the kind has none)
/// and the kind's own fields; compliance results add to the same object.
pub fn event(e: &Event) -> Value {
    Value::Object(tidings_archive::compliance::event_json(e))
}

/// Prints one JSON line. A closed stdout (the reader went away) is an error, not a panic.
pub fn emit(value: &serde_json::Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}").context("write to stdout")?;
    out.flush().context("flush stdout")
}
