//! Operations over HTTP while serving, for tokens with the `admin` role in their own tenant
//! (the CLI's `keys` and `archive` commands need the embedded store to themselves):
//!
//! - `POST /v1/admin/keys/rotate`, `/v1/admin/keys/wrap` `{"tenant"?}`: a new data key; the
//!   tenant's data keys sealed under its own key too. Recorded in the tenant's audit log.
//! - `POST /v1/admin/keys/shred` `{"tenant"?, "confirm": TENANT}`: destroys the tenant's data
//!   keys (its history unreadable for good); refused without `confirm` naming the tenant,
//!   and under a legal hold ([`Compliance::shred`] records it, refusals too).
//! - `POST /v1/admin/archive/run` `{"tenant"?}`: one archive pass over the tenant, with the
//!   same gate as the periodic archiver (so compliance reads never see a half-moved event);
//!   `POST /v1/admin/archive/verify` `{"tenant"?}`: every segment checked against the index.
//!   Both recorded in the tenant's audit log.
//! - `POST /v1/admin/bots/create` `{"tenant"?, "name", "days"?}`, `/v1/admin/bots/token`
//!   `{"tenant"?, "bot", "days"?}`, `/v1/admin/bots/revoke` `{"tenant"?, "bot"}`,
//!   `/v1/admin/bots/list` `{"tenant"?}`: the tenant's bot accounts ([`crate::bots`]); a
//!   token is in the answer only, never in the audit log (its `jti` is).
//! - `POST /v1/admin/cells/place` `{"tenant"?, "home", "dr"?, "tier"?, "sync"?}`: where the
//!   tenant lives; `/v1/admin/cells/failover` `{"tenant"?, "planned"?}` (on the tenant's DR
//!   cell): makes this cell its home; `/v1/admin/cells/show`, `/v1/admin/cells/lost`
//!   `{"tenant"?}` ([`crate::cells`]). Changes recorded in the tenant's audit log.
//! - `POST /v1/admin/cells/failover-tier` `{"tier", "planned"?}`, for a token with the
//!   `cell_operator` role (any tenant's: a deployment operator's): every tenant of the tier
//!   whose DR cell this is moves here, each recorded in its own audit log.

use super::*;

/// Which operation a route asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Rotate,
    Wrap,
    Shred,
    ArchiveRun,
    ArchiveVerify,
    BotCreate,
    BotToken,
    BotRevoke,
    BotList,
    CellPlace,
    CellFailover,
    CellShow,
    CellLost,
    CellFailoverTier,
}

impl Op {
    pub(super) fn from_path(path: &str) -> Option<Op> {
        Some(match path {
            "/v1/admin/keys/rotate" => Op::Rotate,
            "/v1/admin/keys/wrap" => Op::Wrap,
            "/v1/admin/keys/shred" => Op::Shred,
            "/v1/admin/archive/run" => Op::ArchiveRun,
            "/v1/admin/archive/verify" => Op::ArchiveVerify,
            "/v1/admin/bots/create" => Op::BotCreate,
            "/v1/admin/bots/token" => Op::BotToken,
            "/v1/admin/bots/revoke" => Op::BotRevoke,
            "/v1/admin/bots/list" => Op::BotList,
            "/v1/admin/cells/place" => Op::CellPlace,
            "/v1/admin/cells/failover" => Op::CellFailover,
            "/v1/admin/cells/show" => Op::CellShow,
            "/v1/admin/cells/lost" => Op::CellLost,
            "/v1/admin/cells/failover-tier" => Op::CellFailoverTier,
            _ => return None,
        })
    }

    /// One of the bot accounts' operations.
    pub(super) fn is_bots(self) -> bool {
        matches!(
            self,
            Op::BotCreate | Op::BotToken | Op::BotRevoke | Op::BotList
        )
    }

    /// One of the cell operations.
    pub(super) fn is_cells(self) -> bool {
        matches!(
            self,
            Op::CellPlace | Op::CellFailover | Op::CellShow | Op::CellLost | Op::CellFailoverTier
        )
    }

    /// The action as the audit log names it (the CLI's names for the key changes).
    pub(super) fn action(self) -> &'static str {
        match self {
            Op::Rotate => "rotate",
            Op::Wrap => "wrap",
            Op::Shred => "shred",
            Op::ArchiveRun => "archive_run",
            Op::ArchiveVerify => "archive_verify",
            Op::BotCreate => "bot_create",
            Op::BotToken => "bot_token",
            Op::BotRevoke => "bot_revoke",
            Op::BotList => "bot_list",
            Op::CellPlace => "cell_place",
            Op::CellFailover | Op::CellFailoverTier => "cell_failover",
            Op::CellShow => "cell_show",
            Op::CellLost => "cell_lost",
        }
    }
}

/// What the admin operations need beside the compliance service.
pub struct Archive {
    pub archiver: Arc<tidings_archive::Archiver>,
    pub objects: tidings_archive::Objects,
}

pub(super) async fn request(
    state: &Arc<Plane>,
    peer: SocketAddr,
    op: Op,
    headers: &HeaderMap,
    body: Incoming,
) -> Response<Body> {
    let action = op.action();
    if op == Op::CellFailoverTier {
        return failover_tier(state, peer, headers, body).await;
    }
    let posted = match authorized_post(state, peer, headers, body, action, ADMIN_ROLE).await {
        Ok(posted) => posted,
        Err(response) => return response,
    };
    let refusal = posted.refusal(state, action);
    let (caller, bytes) = (&posted.caller, &posted.bytes);
    let (fields, tenant) = match own_tenant_body(&refusal, caller, bytes).await {
        Ok(parsed) => parsed,
        Err(response) => return response,
    };
    let text = |name: &str| fields.get(name).and_then(Value::as_str);
    let actor = &caller.actor;
    let answer = match op {
        Op::Rotate => match state.log.keyring().rotate(&tenant).await {
            Ok(key_id) => {
                record(
                    state,
                    &tenant,
                    actor,
                    action,
                    format!("new data key {key_id}"),
                )
                .await;
                json!({"tenant": tenant.as_str(), "key_id": key_id})
            }
            Err(e) => return log_failure(&e),
        },
        Op::Wrap => match state.log.keyring().wrap_with_tenant_key(&tenant).await {
            Ok(report) => {
                let detail = format!("data keys {:?} sealed under the tenant key", report.wrapped);
                record(state, &tenant, actor, action, detail).await;
                json!({
                    "tenant": tenant.as_str(),
                    "wrapped_key_ids": report.wrapped,
                    "already_wrapped_key_ids": report.already_wrapped,
                    "purged": true,
                })
            }
            Err(e) => return log_failure(&e),
        },
        Op::Shred => {
            if text("confirm") != Some(tenant.as_str()) {
                let reason = format!(
                    "shredding destroys {tenant}'s data keys and its history can never be read \
                     again; send \"confirm\": \"{tenant}\" to do it"
                );
                return refusal.invalid(&tenant, &reason).await;
            }
            match state.compliance.shred(&tenant, actor).await {
                Ok(report) => {
                    let mut answer = crate::output::shred_report(&report);
                    // The tenant's copies in other cells are shredded when they learn it.
                    if let Some(link) = &state.cells {
                        match link.shredded(&tenant, actor.name()).await {
                            Ok(told) => answer["other_cells_told"] = json!(told),
                            Err(e) => {
                                warn!(%tenant, error = %e, "could not tell the other cells of a shred");
                                answer["other_cells_told"] = json!(false);
                            }
                        }
                    }
                    answer
                }
                Err(e) => return failure(&e),
            }
        }
        // Listing changes nothing: not an operation to record.
        Op::BotList => match crate::bots::list(&state.log, &tenant).await {
            Ok(bots) => json!({"tenant": tenant.as_str(), "bots": bots}),
            Err(e) => return log_failure(&e),
        },
        Op::BotCreate | Op::BotToken | Op::BotRevoke => {
            let days = fields.get("days").and_then(Value::as_u64);
            let audience = state.chat_audience.as_str();
            let done = match op {
                Op::BotCreate => {
                    let name = text("name").unwrap_or_default();
                    crate::bots::create(&state.log, audience, &tenant, name, actor.name(), days)
                        .await
                }
                Op::BotToken => {
                    let bot = text("bot").unwrap_or_default();
                    crate::bots::token(&state.log, audience, &tenant, bot, days).await
                }
                _ => {
                    let bot = text("bot").unwrap_or_default();
                    crate::bots::revoke(&state.log, state.nats.as_ref(), &tenant, bot).await
                }
            };
            match done {
                Ok((answer, detail)) => {
                    record(state, &tenant, actor, action, detail).await;
                    answer
                }
                Err(e) if e.code() == "invalid_request" || e.code() == "invalid_id" => {
                    return refusal.invalid(&tenant, &e.to_string()).await;
                }
                Err(e) => return log_failure(&e),
            }
        }
        // Served above, before a tenant's body is read (`failover_tier`).
        Op::CellFailoverTier => {
            return error(StatusCode::NOT_FOUND, "not_found", "no such route");
        }
        Op::CellPlace | Op::CellFailover | Op::CellShow | Op::CellLost => {
            let Some(link) = &state.cells else {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "cells are off in this process ([cell] name)",
                );
            };
            let done = match op {
                Op::CellShow => Ok(link.show(&tenant)),
                Op::CellLost => link.lost(&tenant).await,
                Op::CellPlace => link
                    .place(
                        &tenant,
                        text("home").unwrap_or_default(),
                        text("dr").unwrap_or_default(),
                        text("tier").unwrap_or("standard"),
                        fields.get("sync").and_then(Value::as_bool).unwrap_or(false),
                        actor.name(),
                    )
                    .await
                    .map(|p| json!({"tenant": tenant.as_str(), "home": p.home, "dr": p.dr, "tier": p.tier, "sync": p.sync, "version": p.version})),
                _ => {
                    let planned = fields.get("planned").and_then(Value::as_bool).unwrap_or(true);
                    link.failover(&tenant, planned, actor.name()).await
                }
            };
            match done {
                Ok(answer) => {
                    if matches!(op, Op::CellPlace | Op::CellFailover) {
                        record(state, &tenant, actor, action, answer.to_string()).await;
                    }
                    answer
                }
                Err(crate::cells::CellError::Invalid(reason)) => {
                    return refusal.invalid(&tenant, &reason).await;
                }
                Err(crate::cells::CellError::Unavailable(reason)) => {
                    return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &reason);
                }
                Err(crate::cells::CellError::Log(e)) => return log_failure(&e),
            }
        }
        Op::ArchiveRun | Op::ArchiveVerify => {
            let Some(archive) = &state.archive else {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "this process has no archive configured",
                );
            };
            match archive_op(state, archive, op, &tenant).await {
                Ok((answer, detail)) => {
                    record(state, &tenant, actor, action, detail).await;
                    answer
                }
                Err(e) => {
                    warn!(%tenant, code = e.code(), error = %e, "archive request failed");
                    let status = if e.is_retryable() {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::INTERNAL_SERVER_ERROR
                    };
                    return error(status, e.code(), &e.to_string());
                }
            }
        }
    };
    info!(%tenant, actor = actor.name(), action, "admin operation done");
    full(StatusCode::OK, "application/json", format!("{answer}\n"))
}

/// `failover-tier`: every tenant of a tier whose DR cell this is, moved here, each recorded
/// in its own tenant's audit log under the operator's name.
async fn failover_tier(
    state: &Arc<Plane>,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: Incoming,
) -> Response<Body> {
    let action = "cell_failover";
    let posted = match authorized_post(state, peer, headers, body, action, CELL_OPERATOR_ROLE).await
    {
        Ok(posted) => posted,
        Err(response) => return response,
    };
    let refusal = posted.refusal(state, action);
    let caller = &posted.caller;
    let fields: Map<String, Value> = match serde_json::from_slice(&posted.bytes) {
        Ok(Value::Object(fields)) => fields,
        _ => {
            return refusal
                .invalid(&caller.tenant, "the body is not a JSON object")
                .await;
        }
    };
    let Some(tier) = fields.get("tier").and_then(Value::as_str) else {
        return refusal.invalid(&caller.tenant, "tier is required").await;
    };
    let planned = fields
        .get("planned")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let Some(link) = &state.cells else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "cells are off in this process ([cell] name)",
        );
    };
    let actor = &caller.actor;
    let mut moved = Vec::new();
    for (tenant, outcome) in link.failover_tier(tier, planned, actor.name()).await {
        match outcome {
            Ok(report) => {
                record(state, &tenant, actor, action, report.to_string()).await;
                moved.push(report);
            }
            Err(e) => moved.push(json!({"tenant": tenant.as_str(), "error": e.to_string()})),
        }
    }
    info!(
        tier,
        actor = actor.name(),
        tenants = moved.len(),
        "tier failover done"
    );
    full(
        StatusCode::OK,
        "application/json",
        format!(
            "{}\n",
            json!({"tier": tier, "planned": planned, "tenants": moved})
        ),
    )
}

async fn archive_op(
    state: &Plane,
    archive: &Archive,
    op: Op,
    tenant: &TenantId,
) -> Result<(Value, String), tidings_archive::ArchiveError> {
    if op == Op::ArchiveRun {
        let opts = tidings_archive::PassOptions {
            tenant: Some(tenant.clone()),
            ..Default::default()
        };
        let summary = archive.archiver.run_pass(&opts, &|_| {}).await?;
        let detail = format!(
            "{} events archived in {} segments",
            summary.events_archived, summary.segments
        );
        let value = serde_json::to_value(&summary).unwrap_or(Value::Null);
        return Ok((value, detail));
    }
    let report = tidings_archive::tools::verify(
        &**state.log.store(),
        state.log.keyring(),
        &archive.objects,
        tenant,
    )
    .await?;
    let mut value = serde_json::to_value(&report).unwrap_or(Value::Null);
    value["tenant"] = json!(tenant.as_str());
    value["ok"] = json!(report.ok());
    Ok((value, format!("verified: ok={}", report.ok())))
}

/// Records a completed operation. The operation stands if recording fails (logged).
async fn record(state: &Plane, tenant: &TenantId, actor: &Actor, action: &str, detail: String) {
    let mut entry = Entry::new(actor, action, "completed");
    entry.access_id = uuid::Uuid::now_v7().to_string();
    entry.detail = detail;
    if let Err(e) = state.compliance.record(tenant, &entry).await {
        error!(%tenant, action, error = %e, "failed to record an admin operation");
    }
}

fn log_failure(e: &tidings_log::LogError) -> Response<Body> {
    warn!(code = e.code(), error = %e, "admin operation failed");
    let status = match e.code() {
        _ if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
        "tenant_shredded" | "not_allowed" => StatusCode::FORBIDDEN,
        "invalid_id" | "invalid_request" => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.code(), &e.to_string())
}
