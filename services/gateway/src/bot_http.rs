//! `POST /v1/bot/messages` on the gateway listener: a bot posts a message with its token,
//! for bots that are scripts rather than connected clients (docs/decisions/bots.md).
//!
//! ```text
//! POST /v1/bot/messages
//! Authorization: Bearer <bot token>
//! Content-Type: application/json
//! Content-Length: N
//!
//! {"conversation":"ops","client_msg_id":"alert-7731","text":"disk 91% on db-3","mentions":["alice"]}
//! ```
//!
//! The answer is the SendAck as JSON (`conversation`, `seq`, `event_id`, `server_time_ms`,
//! `duplicate`), or `{"error":{"code","message","trace_id"}}` with a status: 400 a bad body or
//! id, 401 a token refused or revoked, 403 not a bot token, not a member, not allowed or
//! rejected by the tenant's interceptor, 413 too large, 429 rate limited (with
//! `Retry-After`), 503 unavailable or busy. The append is the same as a session's
//! (`LogService::append` with the bot's token, so the log checks it again and the bot is
//! the event's sender); a retry with the same `client_msg_id` is answered with the first
//! event (`duplicate: true`).
//!
//! Limits: the body is at most `gateway.max_frame_bytes`, read within the handshake deadline
//! like every request head on this port; at most [`MAX_IN_FLIGHT`] posts at once per
//! gateway (then 503).

use serde::Deserialize;
use serde_json::json;
use tidings_log_api::{Append, Body, ClientMsgId, ConvId, TenantId, UserId};
use tidings_schemas::client::ErrorCode;
use tidings_schemas::client::server_frame::Msg;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Semaphore;

use crate::http_answer::{Answer, Head};
use crate::shared::Shared;
use tidings_log_api::service::Caller;

/// The route.
pub const PATH: &str = "/v1/bot/messages";
/// Bot posts one gateway serves at once.
pub const MAX_IN_FLIGHT: usize = 64;

static IN_FLIGHT: Semaphore = Semaphore::const_new(MAX_IN_FLIGHT);

/// The body a bot posts.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Post {
    conversation: String,
    client_msg_id: String,
    text: String,
    #[serde(default)]
    mentions: Vec<String>,
    #[serde(default)]
    reply_to_seq: u64,
}

/// Reads the body (after the head's bytes in `body`) and answers the post.
pub(crate) async fn post<S: AsyncRead + Unpin>(
    stream: &mut S,
    head: &Head,
    mut body: Vec<u8>,
    shared: &Shared,
) -> std::io::Result<Answer> {
    if head.method != "POST" {
        let mut a = failure(405, "method_not_allowed", "only POST is allowed here");
        a.headers.push(("Allow", "POST".into()));
        return Ok(a);
    }
    let Some(len) = head.content_length else {
        return Ok(failure(411, "length_required", "send a Content-Length"));
    };
    let max = shared.cfg.max_frame_bytes;
    if len > max {
        let message = format!("the body is over {max} bytes");
        return Ok(failure(413, "too_large", &message));
    }
    if body.len() < len {
        let start = body.len();
        body.resize(len, 0);
        stream.read_exact(&mut body[start..]).await?;
    }
    body.truncate(len);
    Ok(answer(shared, head, &body).await)
}

async fn answer(shared: &Shared, head: &Head, body: &[u8]) -> Answer {
    let Some(token) = head
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        return failure(
            401,
            "not_authenticated",
            "send Authorization: Bearer <bot token>",
        );
    };
    let claims = match shared.verifier.verify(token, tidings_log_api::now_secs()) {
        Ok(claims) => claims,
        Err(e) => return failure(401, "auth_failed", &format!("token refused: {e}")),
    };
    if !claims.roles.iter().any(|r| r == tidings_auth::BOT_ROLE) {
        return failure(
            403,
            "not_allowed",
            "this route takes bot tokens; users send over /v1/ws",
        );
    }
    let (Ok(tenant), Ok(bot)) = (
        TenantId::new(claims.tenant.as_str()),
        UserId::new(claims.user.as_str()),
    ) else {
        return failure(
            401,
            "auth_failed",
            "the token names an invalid tenant or bot",
        );
    };
    let revoked = shared
        .revocations
        .is_revoked(tidings_log_api::TokenRef {
            tenant: &tenant,
            user: &bot,
            jti: claims.jti.as_deref(),
            issued_at: claims.issued_at,
        })
        .await;
    match revoked {
        Ok(false) => {}
        Ok(true) => return failure(401, "auth_failed", "token refused: it has been revoked"),
        Err(_) => {
            return failure(
                503,
                "unavailable",
                "cannot check the token now; try again later",
            );
        }
    }
    let Ok(_permit) = IN_FLIGHT.try_acquire() else {
        return failure(503, "busy", "too many bot posts at once; try again shortly");
    };
    let post: Post = match serde_json::from_slice(body) {
        Ok(post) => post,
        Err(e) => {
            let message = format!(
                "the body is not {{\"conversation\",\"client_msg_id\",\"text\",\"mentions\"?,\"reply_to_seq\"?}}: {e}"
            );
            return failure(400, "invalid_request", &message);
        }
    };
    let ids = ConvId::new(post.conversation)
        .and_then(|conv| ClientMsgId::new(post.client_msg_id).map(|id| (conv, id)));
    let (conv, client_msg_id) = match ids {
        Ok(ids) => ids,
        Err(e) => return log_failure(&e),
    };
    let append = Append {
        tenant: tenant.clone(),
        conv: conv.clone(),
        sender: bot,
        client_msg_id: client_msg_id.clone(),
        body: Body::MessagePosted(tidings_schemas::v1::MessagePosted {
            text: post.text,
            mentions: post.mentions,
            reply_to_seq: post.reply_to_seq,
            mention_all: false,
        }),
    };
    let now = std::time::Instant::now();
    if let Err(e) = shared.shed.check(&tenant, &conv, now) {
        return log_failure(&e);
    }
    let caller = Caller::user(claims, token.to_string());
    match shared.log.append(&caller, append).await {
        Ok(c) => Answer::ok(
            "application/json",
            format!(
                "{}\n",
                json!({
                    "conversation": conv.as_str(),
                    "client_msg_id": client_msg_id.as_str(),
                    "seq": c.seq,
                    "event_id": c.event_id,
                    "server_time_ms": c.time_ms,
                    "duplicate": c.duplicate,
                })
            ),
        ),
        Err(e) => {
            shared
                .shed
                .refused(&tenant, &conv, &e, std::time::Instant::now());
            log_failure(&e)
        }
    }
}

/// A log error as the sessions would word it (no internals), with its HTTP status.
fn log_failure(e: &tidings_log_api::LogError) -> Answer {
    let Msg::Error(err) = crate::errors::log_error(e, 0, 0) else {
        return failure(500, "internal", "internal error");
    };
    let code = ErrorCode::try_from(err.code).unwrap_or(ErrorCode::Internal);
    let status = match code {
        ErrorCode::InvalidId | ErrorCode::InvalidRequest => 400,
        ErrorCode::TooLarge => 413,
        ErrorCode::NotMember | ErrorCode::NotAllowed | ErrorCode::Rejected => 403,
        ErrorCode::NotFound => 404,
        ErrorCode::AlreadyExists => 409,
        ErrorCode::RateLimited => 429,
        ErrorCode::Unavailable => 503,
        // The tenant is served by another cell: the bot posts there.
        ErrorCode::WrongCell => 421,
        _ => 500,
    };
    let name = code
        .as_str_name()
        .trim_start_matches("ERROR_CODE_")
        .to_ascii_lowercase();
    let mut answer = error_answer(status, &name, &err.message, &err.trace_id);
    if err.retry_after_ms > 0 {
        let secs = err.retry_after_ms.div_ceil(1000);
        answer.headers.push(("Retry-After", secs.to_string()));
    }
    answer
}

fn failure(status: u16, code: &str, message: &str) -> Answer {
    error_answer(status, code, message, "")
}

fn error_answer(status: u16, code: &str, message: &str, trace_id: &str) -> Answer {
    let mut error = json!({"code": code, "message": message});
    if !trace_id.is_empty() {
        error["trace_id"] = json!(trace_id);
    }
    Answer {
        status,
        content_type: "application/json",
        body: format!("{}\n", json!({ "error": error })).into_bytes(),
        headers: Vec::new(),
    }
}
