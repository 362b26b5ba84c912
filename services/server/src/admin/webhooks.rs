//! Webhook subscriptions over HTTP, for tokens with the `admin` role in their own tenant
//! (the CLI's `tidings webhook` needs the embedded store to itself). The same functions as
//! the CLI ([`crate::webhooks::Manage`]): each change recorded in the tenant's audit log,
//! refusals too; a token of tenant A never sees or touches tenant B's subscriptions (403,
//! recorded in B's log).
//!
//! - `GET /v1/admin/webhooks?tenant=`: the subscriptions as JSON lines (never a secret),
//!   then `{"complete":true,"rows":N}`.
//! - `POST /v1/admin/webhooks` `{"tenant"?, "url", "conversations"?, "conversation_kinds"?,
//!   "event_kinds"?, "max_attempts"?}`: the new subscription with its `secret`, shown once.
//! - `POST /v1/admin/webhooks/delete` `{"tenant"?, "id"}`.
//! - `POST /v1/admin/webhooks/replay` `{"tenant"?, "id", "conv", "from_seq"}`.
//! - `GET /v1/admin/webhooks/dead?tenant=&id=`: the dead letters as JSON lines, then
//!   `{"complete":true,"rows":N}`.

use super::*;
use crate::webhooks::{Manage, NewSubscription, WebhookError};

/// Which webhook route a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    /// `/v1/admin/webhooks`: GET lists, POST creates.
    Subscriptions,
    Delete,
    Replay,
    Dead,
}

impl Op {
    pub(super) fn from_path(path: &str) -> Option<Op> {
        Some(match path {
            "/v1/admin/webhooks" => Op::Subscriptions,
            "/v1/admin/webhooks/delete" => Op::Delete,
            "/v1/admin/webhooks/replay" => Op::Replay,
            "/v1/admin/webhooks/dead" => Op::Dead,
            _ => return None,
        })
    }

    /// The query parameters a GET takes.
    pub(super) fn parameters(self) -> &'static [&'static str] {
        match self {
            Op::Subscriptions => &["tenant"],
            Op::Dead => &["tenant", "id"],
            Op::Delete | Op::Replay => &[],
        }
    }
}

pub(super) async fn request(
    state: &Arc<Plane>,
    peer: SocketAddr,
    op: Op,
    req: Request<Incoming>,
) -> Response<Body> {
    let method = req.method().clone();
    let (parts, body) = req.into_parts();
    let manage = Manage {
        compliance: &state.compliance,
        max_per_tenant: state.webhooks.max_per_tenant,
        default_max_attempts: state.webhooks.default_max_attempts,
    };
    match (op, method) {
        (Op::Subscriptions | Op::Dead, Method::GET) => {
            let raw_query = parts.uri.query().unwrap_or("");
            if raw_query.len() > MAX_QUERY_BYTES {
                return error(
                    StatusCode::URI_TOO_LONG,
                    "uri_too_long",
                    &format!("the query string is over {MAX_QUERY_BYTES} bytes"),
                );
            }
            let action = if op == Op::Dead {
                "webhook_dead_letters"
            } else {
                "webhook_list"
            };
            let got = match authorized_get(
                state,
                peer,
                &parts.headers,
                raw_query,
                action,
                op.parameters(),
                ADMIN_ROLE,
            )
            .await
            {
                Ok(got) => got,
                Err(response) => return response,
            };
            let lines = if op == Op::Dead {
                let Some(id) = got.params.get("id") else {
                    let refusal = Refusal {
                        state,
                        actor: &got.caller.actor,
                        action,
                        filters: &got.filters,
                    };
                    return refusal.invalid(&got.tenant, "id is required").await;
                };
                manage.dead_letters(&got.tenant, id).await
            } else {
                manage.list(&got.tenant).await
            };
            match lines {
                Ok(lines) => json_lines(&lines),
                Err(e) => failed(&e),
            }
        }
        (Op::Subscriptions | Op::Delete | Op::Replay, Method::POST) => {
            change(state, peer, op, &manage, &parts.headers, body).await
        }
        (Op::Subscriptions, _) => method_not_allowed("GET, POST"),
        (Op::Dead, _) => method_not_allowed("GET"),
        (Op::Delete | Op::Replay, _) => method_not_allowed("POST"),
    }
}

/// A create, delete or replay: the caller's own tenant, the body checked, recorded.
async fn change(
    state: &Arc<Plane>,
    peer: SocketAddr,
    op: Op,
    manage: &Manage<'_>,
    headers: &HeaderMap,
    body: Incoming,
) -> Response<Body> {
    let action = match op {
        Op::Delete => "webhook_delete",
        Op::Replay => "webhook_replay",
        Op::Subscriptions | Op::Dead => "webhook_create",
    };
    let posted = match authorized_post(state, peer, headers, body, action, ADMIN_ROLE).await {
        Ok(posted) => posted,
        Err(response) => return response,
    };
    let refusal = posted.refusal(state, action);
    let (fields, tenant) = match own_tenant_body(&refusal, &posted.caller, &posted.bytes).await {
        Ok(parsed) => parsed,
        Err(response) => return response,
    };
    let actor = &posted.caller.actor;
    let text = |name: &str| fields.get(name).and_then(Value::as_str);
    let done = match op {
        Op::Subscriptions | Op::Dead => match NewSubscription::from_json(&fields) {
            Ok(new) => manage.create(&tenant, new, actor).await,
            Err(reason) => return refusal.invalid(&tenant, &reason).await,
        },
        Op::Delete => {
            let Some(id) = text("id") else {
                return refusal.invalid(&tenant, "id is required").await;
            };
            manage.delete(&tenant, id, actor).await
        }
        Op::Replay => {
            let (Some(id), Some(conv), Some(from)) = (
                text("id"),
                text("conv"),
                fields.get("from_seq").and_then(Value::as_u64),
            ) else {
                let reason = "id, conv and from_seq (a whole number) are required";
                return refusal.invalid(&tenant, reason).await;
            };
            let conv = match ConvId::new(conv) {
                Ok(conv) => conv,
                Err(e) => return refusal.invalid(&tenant, &e.to_string()).await,
            };
            manage.replay(&tenant, id, &conv, from, actor).await
        }
    };
    match done {
        Ok(answer) => {
            info!(%tenant, actor = actor.name(), action, "webhook change done");
            full(StatusCode::OK, "application/json", format!("{answer}\n"))
        }
        Err(WebhookError::Invalid(reason)) => refusal.invalid(&tenant, &reason).await,
        Err(e) => failed(&e),
    }
}

fn failed(e: &WebhookError) -> Response<Body> {
    let status = match e {
        WebhookError::Invalid(_) => StatusCode::BAD_REQUEST,
        WebhookError::NotFound { .. } => StatusCode::NOT_FOUND,
        _ if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
        WebhookError::Log(e) if matches!(e.code(), "not_allowed" | "tenant_shredded") => {
            StatusCode::FORBIDDEN
        }
        WebhookError::Log(_) | WebhookError::Audit(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    warn!(code = e.code(), error = %e, "webhook request failed");
    error(status, e.code(), &e.to_string())
}
