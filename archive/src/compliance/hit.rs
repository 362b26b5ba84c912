//! What a compliance search finds, and how it is printed.
//!
//! A search result is one event. A posted message also carries what happened to it later:
//! its edits (each with the new text) and its recall, so a reviewer sees the original text
//! and its fate in one line even when the author changed or withdrew it.

use serde_json::{Map, Value, json};
use tidings_log::{Body, Event};

/// Where an event was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Hot,
    Archive,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Hot => "hot",
            Tier::Archive => "archive",
        }
    }
}

/// A later edit of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edit {
    pub seq: u64,
    pub time_ms: i64,
    pub sender: String,
    pub text: String,
}

/// A message's recall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recall {
    pub seq: u64,
    pub time_ms: i64,
    pub sender: String,
}

/// Everything that happened to a message after it was posted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fate {
    pub edits: Vec<Edit>,
    pub recall: Option<Recall>,
}

/// One search result.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub event: Event,
    pub tier: Tier,
    /// For a posted message: its edits and recall (empty when none). `None` for other kinds.
    pub fate: Option<Fate>,
    /// Which text matched the search's text filter: `original` or `edit` (`None` without one).
    pub matched: Option<&'static str>,
}

/// The text an event carries, if its kind has one: a message's text, an edit's new text, a
/// conversation's title, a member's display name.
pub fn event_text(e: &Event) -> Option<&str> {
    match &e.body {
        Some(Body::MessagePosted(p)) => Some(&p.text),
        Some(Body::MessageEdited(x)) => Some(&x.new_text),
        Some(Body::ConversationCreated(x)) => Some(&x.title),
        Some(Body::ConversationRenamed(x)) => Some(&x.title),
        Some(Body::DisplayNameSet(x)) => Some(&x.display_name),
        _ => None,
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

/// One event as a JSON object: the envelope, `kind`, `text` (null when the kind has none)
/// and the kind's own fields. The tools' `log read` lines and compliance results share it.
pub fn event_json(e: &Event) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("tenant".into(), e.tenant.clone().into());
    o.insert("conversation".into(), e.conversation.clone().into());
    o.insert("seq".into(), e.seq.into());
    o.insert("event_id".into(), e.event_id.clone().into());
    o.insert("sender".into(), e.sender.clone().into());
    o.insert("time".into(), rfc3339_ms(e.server_time_ms).into());
    o.insert("time_ms".into(), e.server_time_ms.into());
    o.insert("client_msg_id".into(), e.client_msg_id.clone().into());
    o.insert(
        "kind".into(),
        tidings_log::event_kind(e.body.as_ref()).into(),
    );
    match &e.body {
        Some(Body::MessagePosted(p)) => {
            if !p.mentions.is_empty() {
                o.insert("mentions".into(), p.mentions.clone().into());
            }
            if p.reply_to_seq != 0 {
                o.insert("reply_to_seq".into(), p.reply_to_seq.into());
            }
        }
        Some(Body::MessageEdited(x)) => {
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
            if !x.role_name.is_empty() {
                o.insert("role".into(), x.role_name.clone().into());
            }
        }
        Some(Body::MemberRoleChanged(x)) => {
            o.insert("user".into(), x.user.clone().into());
            o.insert("role".into(), x.role_name.clone().into());
        }
        Some(Body::DisplayNameSet(x)) => {
            o.insert("user".into(), x.user.clone().into());
        }
        Some(Body::MemberLeft(x)) => {
            o.insert("user".into(), x.user.clone().into());
        }
        Some(Body::ConversationCreated(x)) => {
            o.insert("creator".into(), x.creator.clone().into());
            o.insert("members".into(), x.members.clone().into());
            let kind = if x.kind_name.is_empty() {
                conversation_kind(x.kind)
            } else {
                x.kind_name.as_str()
            };
            o.insert("conversation_kind".into(), kind.into());
        }
        Some(Body::ConversationRenamed(_)) | None => {}
    }
    o.insert(
        "text".into(),
        event_text(e).map_or(Value::Null, Value::from),
    );
    o
}

/// A search result as a JSON object: [`event_json`] plus `tier`, and for a posted message
/// `edits` (oldest first), `recalled` (null if not) and `matched` when a text filter was given.
pub fn hit_json(hit: &Hit) -> Value {
    let mut o = event_json(&hit.event);
    o.insert("tier".into(), hit.tier.as_str().into());
    if let Some(fate) = &hit.fate {
        let edits: Vec<Value> = fate
            .edits
            .iter()
            .map(|e| {
                json!({"seq": e.seq, "time": rfc3339_ms(e.time_ms), "sender": e.sender,
                       "text": e.text})
            })
            .collect();
        o.insert("edits".into(), edits.into());
        o.insert(
            "recalled".into(),
            fate.recall.as_ref().map_or(
                Value::Null,
                |r| json!({"seq": r.seq, "time": rfc3339_ms(r.time_ms), "by": r.sender}),
            ),
        );
    }
    if let Some(m) = hit.matched {
        o.insert("matched".into(), m.into());
    }
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

/// Days since the Unix epoch of a civil date (inverse of `civil_from_days`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses a time filter: an RFC 3339 date-time (`2026-11-29T20:33:25Z`, fractional seconds
/// and `+hh:mm` offsets allowed) or a bare date (`2026-11-29`, midnight UTC). Returns
/// milliseconds since the Unix epoch.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let bad =
        || format!("{text:?} is not an RFC 3339 time (e.g. 2026-11-29 or 2026-11-29T08:30:00Z)");
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let s = b.get(r).ok_or_else(bad)?;
        if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        std::str::from_utf8(s)
            .map_err(|_| bad())?
            .parse()
            .map_err(|_| bad())
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let month_days = [
        31,
        if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) {
            29
        } else {
            28
        },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo) || d < 1 || d > month_days[(mo - 1) as usize] {
        return Err(bad());
    }
    let day_ms = days_from_civil(y, mo, d) * 86_400_000;
    if b.len() == 10 {
        return Ok(day_ms);
    }
    if !matches!(b[10], b'T' | b't' | b' ') || b.len() < 20 || b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if h > 23 || mi > 59 || s > 60 {
        return Err(bad());
    }
    let mut i = 19;
    let mut frac_ms = 0;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
        let digits = &text[start..i.min(start + 3)];
        frac_ms = digits.parse::<i64>().map_err(|_| bad())? * 10_i64.pow(3 - digits.len() as u32);
    }
    let offset_ms = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            let off = (oh * 60 + om) * 60_000;
            if *sign == b'+' { off } else { -off }
        }
        _ => return Err(bad()),
    };
    Ok(day_ms + ((h * 60 + mi) * 60 + s) * 1000 + frac_ms - offset_ms)
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

    #[test]
    fn parses_what_it_formats_and_common_forms() {
        for ms in [0, 951_782_400_000, 1_795_984_405_123] {
            assert_eq!(parse_time(&rfc3339_ms(ms)), Ok(ms));
        }
        assert_eq!(parse_time("2026-11-29"), Ok(1_795_910_400_000));
        assert_eq!(parse_time("2026-11-29T20:33:25Z"), Ok(1_795_984_405_000));
        assert_eq!(
            parse_time("2026-11-29T21:33:25.5+01:00"),
            Ok(1_795_984_405_500)
        );
        assert_eq!(
            parse_time("2026-11-29T19:33:25-01:00"),
            Ok(1_795_984_405_000)
        );
    }

    #[test]
    fn rejects_malformed_times() {
        for bad in [
            "",
            "yesterday",
            "2026-13-01",
            "2026-02-30",
            "2026-11-29T25:00:00Z",
            "2026-11-29T20:33:25",
            "2026-11-29T20:33Z",
            "2026-11-29T20:33:25.Z",
            "1795984405123",
            "2026-11-29T20:33:25+0100",
            "２０２６-11-29",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?} parsed");
        }
    }
}
