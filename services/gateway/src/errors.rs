//! What a client is told when the log refuses or fails a request: an error code, a fixed
//! message, and for the server's own failures a trace id instead of the detail.

use tidings_log_api::LogError;
use tidings_schemas::client as proto;
use tidings_schemas::client::{ErrorCode, server_frame::Msg};
use tracing::{debug, warn};

/// Longest piece of the client's own input echoed back in an error message.
const MAX_ECHO: usize = 200;

/// The client-facing error for a log error: its code and a fixed, safe message.
///
/// Only errors about the client's own request (an invalid id, a body over the limit, a
/// malformed request) keep their detail: it describes what the client sent and helps it fix
/// that. Everything else — store keys, writer ids, archive paths, tenant key sources — stays
/// in the server's log, under a trace id the client gets so an operator can find it.
pub fn log_error(e: &LogError, session: u64, request_id: u64) -> Msg {
    let client_detail = |fallback: &str| {
        let text = e.to_string();
        if text.is_empty() {
            fallback.to_string()
        } else {
            text.chars().take(MAX_ECHO).collect()
        }
    };
    let (code, message, traced) = match e.code() {
        "invalid_id" => (ErrorCode::InvalidId, client_detail("invalid id"), false),
        "too_large" => (ErrorCode::TooLarge, client_detail("too large"), false),
        "invalid_request" => (
            ErrorCode::InvalidRequest,
            client_detail("invalid request"),
            false,
        ),
        "no_such_message" => (
            ErrorCode::InvalidRequest,
            "no such message in this conversation".into(),
            false,
        ),
        "conversation_not_found" => (ErrorCode::NotFound, "no such conversation".into(), false),
        "conversation_exists" => (
            ErrorCode::AlreadyExists,
            "the conversation already exists".into(),
            false,
        ),
        "already_member" => (
            ErrorCode::AlreadyExists,
            "already a member of the conversation".into(),
            false,
        ),
        "not_member" => (
            ErrorCode::NotMember,
            "not a member of the conversation".into(),
            false,
        ),
        // Permission refusals say what rule refused (fixed text made by the log), never
        // whose data it was.
        "not_allowed" => (ErrorCode::NotAllowed, client_detail("not allowed"), false),
        // The tenant's own check said why; its words are for the sender.
        "rejected" => (ErrorCode::Rejected, client_detail("rejected"), false),
        // A shredded tenant's history is gone for good: refused, not an outage.
        "tenant_shredded" => (
            ErrorCode::NotAllowed,
            "this tenant's history was destroyed".into(),
            false,
        ),
        "rate_limited" => (
            ErrorCode::RateLimited,
            client_detail("too many requests; slow down"),
            false,
        ),
        // The session adds where to go (`redirect_url`) from the gateway's cell list.
        "wrong_cell" => (
            ErrorCode::WrongCell,
            "this tenant is served by another cell".into(),
            false,
        ),
        "conflict"
        | "store_locked"
        | "store_error"
        | "shutting_down"
        | "unavailable"
        | "not_owner"
        | "archive_unavailable"
        | "tenant_key_unavailable" => (
            ErrorCode::Unavailable,
            "temporarily unavailable; try again later".into(),
            true,
        ),
        _ => (ErrorCode::Internal, "internal error".into(), true),
    };
    let trace_id = if traced {
        let id = uuid::Uuid::now_v7().simple().to_string();
        warn!(trace_id = %id, session, request_id, code = e.code(), error = %e, "request failed");
        id
    } else {
        debug!(session, request_id, code = e.code(), error = %e, "request refused");
        String::new()
    };
    Msg::Error(proto::Error {
        code: code as i32,
        message,
        retry_after_ms: e.retry_after_ms(),
        retryable: e.is_retryable(),
        trace_id,
        redirect_url: String::new(),
    })
}

/// `msg` with the URL of the cell a `wrong_cell` error names, from `cell_urls`.
pub fn with_redirect(
    mut msg: Msg,
    e: &LogError,
    cell_urls: &std::collections::HashMap<String, String>,
) -> Msg {
    if let (Msg::Error(err), LogError::WrongCell { cell }) = (&mut msg, e) {
        err.redirect_url = cell_urls.get(cell).cloned().unwrap_or_default();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(e: &LogError) -> (i32, String, String) {
        match log_error(e, 7, 9) {
            Msg::Error(e) => (e.code, e.message, e.trace_id),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn client_errors_carry_no_internal_text_and_internal_ones_a_trace_id() {
        let internal = [
            LogError::NotOwner {
                partition: 3,
                owner: "host-1234-deadbeef".into(),
            },
            LogError::corrupt(b"ev/acme/general/42", "bad tag"),
            LogError::Archive {
                reason: "/srv/tidings/archive/acme/seg-1.parquet: not found".into(),
                retryable: true,
            },
            LogError::remote(
                "store_error",
                "store key hd/acme/general: io error".into(),
                true,
            ),
            LogError::TenantKeyUnavailable {
                tenant: "acme".into(),
                reason: "/etc/keys/acme: permission denied".into(),
            },
        ];
        for e in &internal {
            let (_, text, trace) = message(e);
            for leak in [
                "host-1234",
                "acme",
                "general",
                "/srv",
                "/etc",
                "parquet",
                "hd/",
            ] {
                assert!(!text.contains(leak), "{leak:?} leaked from {e:?}: {text:?}");
            }
            assert_eq!(trace.len(), 32, "a trace id for {e:?}");
        }
        let not_member = LogError::NotMember {
            user: "mallory".into(),
            conversation: "general".into(),
        };
        let (code, text, trace) = message(&not_member);
        assert_eq!(code, ErrorCode::NotMember as i32);
        assert!(!text.contains("mallory") && !text.contains("general"));
        assert!(trace.is_empty());
        // The client's own input is explained.
        let too_large = LogError::TooLarge {
            what: "message body",
            size: 70_000,
            limit: 65_536,
        };
        let (code, text, _) = message(&too_large);
        assert_eq!(code, ErrorCode::TooLarge as i32);
        assert!(text.contains("70000") && text.contains("65536"), "{text}");
    }
}
