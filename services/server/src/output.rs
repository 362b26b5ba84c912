//! JSON lines printed by the command-line tools.

use serde_json::{Map, Value, json};
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
    match e.chain().find_map(|c| c.downcast_ref::<LogError>()) {
        Some(log_error) => json!({"error": {
            "code": log_error.code(),
            "message": format!("{e:#}"),
            "retryable": log_error.is_retryable(),
        }})
        .to_string(),
        None => format!("error: {e:#}"),
    }
}

/// `group` / `direct`, as printed.
pub fn conversation_kind(kind: i32) -> &'static str {
    match tidings_log::ConversationKind::try_from(kind) {
        Ok(tidings_log::ConversationKind::Direct) => "direct",
        Ok(tidings_log::ConversationKind::Group) => "group",
        _ => "unspecified",
    }
}

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
/// and the kind's own fields.
pub fn event(e: &Event) -> Value {
    let mut o = Map::new();
    o.insert("tenant".into(), e.tenant.clone().into());
    o.insert("conversation".into(), e.conversation.clone().into());
    o.insert("seq".into(), e.seq.into());
    o.insert("event_id".into(), e.event_id.clone().into());
    o.insert("sender".into(), e.sender.clone().into());
    o.insert("time".into(), rfc3339_ms(e.server_time_ms).into());
    o.insert("time_ms".into(), e.server_time_ms.into());
    o.insert("client_msg_id".into(), e.client_msg_id.clone().into());
    o.insert("kind".into(), kind(e.body.as_ref()).into());
    let mut text = Value::Null;
    match &e.body {
        Some(Body::MessagePosted(p)) => {
            text = p.text.clone().into();
            if !p.mentions.is_empty() {
                o.insert("mentions".into(), p.mentions.clone().into());
            }
            if p.reply_to_seq != 0 {
                o.insert("reply_to_seq".into(), p.reply_to_seq.into());
            }
        }
        Some(Body::MessageEdited(x)) => {
            text = x.new_text.clone().into();
            o.insert("target_seq".into(), x.target_seq.into());
        }
        Some(Body::MessageRecalled(x)) => {
            o.insert("target_seq".into(), x.target_seq.into());
        }
        Some(Body::ReactionAdded(x)) => {
            o.insert("target_seq".into(), x.target_seq.into());
            o.insert("reaction".into(), x.reaction.clone().into());
        }
        Some(Body::ReactionRemoved(x)) => {
            o.insert("target_seq".into(), x.target_seq.into());
            o.insert("reaction".into(), x.reaction.clone().into());
        }
        Some(Body::MemberJoined(x)) => {
            o.insert("user".into(), x.user.clone().into());
        }
        Some(Body::MemberLeft(x)) => {
            o.insert("user".into(), x.user.clone().into());
        }
        Some(Body::ConversationCreated(x)) => {
            text = x.title.clone().into();
            o.insert("creator".into(), x.creator.clone().into());
            o.insert("members".into(), x.members.clone().into());
            o.insert("conversation_kind".into(), conversation_kind(x.kind).into());
        }
        Some(Body::ConversationRenamed(x)) => {
            text = x.title.clone().into();
        }
        None => {}
    }
    o.insert("text".into(), text);
    Value::Object(o)
}

/// `2026-11-29T20:33:25.123Z` from milliseconds since the Unix epoch (UTC).
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_984_405_123), "2026-11-29T20:33:25.123Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }
}
