//! Bot accounts: what `tidings bot ...` and `POST /v1/admin/bots/*` share
//! (docs/decisions/bots.md). Each returns its answer and the line the caller records in the
//! tenant's audit log.

use serde_json::{Value, json};
use tidings_log::bots::{self, BotAccount};
use tidings_log::{Log, LogError, TenantId, UserId};

/// A bot token lives this many days unless asked otherwise...
pub const DEFAULT_TOKEN_DAYS: u64 = 90;
/// ...and at most this many (`tidings_auth::MAX_BOT_TOKEN_LIFETIME_SECS`).
pub const MAX_TOKEN_DAYS: u64 = tidings_auth::MAX_BOT_TOKEN_LIFETIME_SECS / 86_400;

/// `days` checked: 1 to [`MAX_TOKEN_DAYS`], [`DEFAULT_TOKEN_DAYS`] when absent.
pub fn token_days(days: Option<u64>) -> Result<u64, LogError> {
    match days.unwrap_or(DEFAULT_TOKEN_DAYS) {
        d @ 1..=MAX_TOKEN_DAYS => Ok(d),
        d => Err(LogError::InvalidRequest(format!(
            "a bot token lives 1 to {MAX_TOKEN_DAYS} days, not {d}"
        ))),
    }
}

fn account_json(tenant: &TenantId, a: &BotAccount) -> Value {
    json!({
        "tenant": tenant.as_str(),
        "bot": a.id.as_str(),
        "created": crate::output::rfc3339_ms(a.created_ms),
        "created_by": a.created_by,
        "revoked": a.revoked_ms.map(crate::output::rfc3339_ms),
    })
}

/// The tenant's bot `bot`, if it is registered and live.
async fn live(log: &Log, tenant: &TenantId, bot: &UserId) -> Result<BotAccount, LogError> {
    let account = bots::get(&**log.store(), tenant, bot)
        .await?
        .ok_or_else(|| LogError::InvalidRequest(format!("tenant {tenant} has no bot {bot}")))?;
    if account.revoked_ms.is_some() {
        return Err(LogError::NotAllowed(format!(
            "bot {bot} was revoked; create another"
        )));
    }
    Ok(account)
}

/// Signs a token for the live bot `account`, for the chat `audience`.
fn issue(
    log: &Log,
    audience: &str,
    tenant: &TenantId,
    account: &BotAccount,
    days: u64,
) -> (Value, String) {
    let bot = &account.id;
    let now = tidings_log_api::now_secs();
    let jti = uuid::Uuid::now_v7().to_string();
    let token = tidings_auth::issue_bot(
        &log.keyring().bot_signing_seed(),
        audience,
        tenant.as_str(),
        bot.as_str(),
        now,
        days * 86_400,
        &jti,
    );
    let expires = crate::output::rfc3339_ms(((now + days * 86_400) * 1000) as i64);
    let detail = format!("token {jti} issued to {bot}, valid until {expires}");
    let mut answer = account_json(tenant, account);
    answer["token"] = json!(token);
    answer["jti"] = json!(jti);
    answer["expires"] = json!(expires);
    (answer, detail)
}

/// Registers bot `name` (`bot-<name>`) and issues its first token.
pub async fn create(
    log: &Log,
    audience: &str,
    tenant: &TenantId,
    name: &str,
    created_by: &str,
    days: Option<u64>,
) -> Result<(Value, String), LogError> {
    let days = token_days(days)?;
    let bot = bots::bot_id(name)?;
    let account = bots::create(
        &**log.store(),
        tenant,
        &bot,
        created_by,
        tidings_log::now_ms(),
    )
    .await?;
    let (answer, issued) = issue(log, audience, tenant, &account, days);
    Ok((answer, format!("bot {bot} created; {issued}")))
}

/// Another token for a live bot (the old ones stay valid until revoked or expired).
pub async fn token(
    log: &Log,
    audience: &str,
    tenant: &TenantId,
    bot: &str,
    days: Option<u64>,
) -> Result<(Value, String), LogError> {
    let days = token_days(days)?;
    let account = live(log, tenant, &bots::bot_id(bot)?).await?;
    Ok(issue(log, audience, tenant, &account, days))
}

/// Marks the bot revoked and revokes every token it was issued (announced on `nats`).
pub async fn revoke(
    log: &Log,
    nats: Option<&async_nats::Client>,
    tenant: &TenantId,
    bot: &str,
) -> Result<(Value, String), LogError> {
    let bot = bots::bot_id(bot)?;
    let account = bots::mark_revoked(&**log.store(), tenant, &bot, tidings_log::now_ms())
        .await?
        .ok_or_else(|| LogError::InvalidRequest(format!("tenant {tenant} has no bot {bot}")))?;
    let request = crate::revoke::Request {
        tenant: tenant.clone(),
        target: crate::revoke::Target::UserBefore {
            user: bot.clone(),
            before: tidings_log_api::now_secs(),
        },
    };
    let outcome = crate::revoke::revoke(log, nats, &request).await?;
    let mut answer = account_json(tenant, &account);
    answer["notified"] = json!(outcome.notified.is_ok());
    Ok((answer, format!("bot {bot} revoked; {}", outcome.describe())))
}

/// The tenant's bots.
pub async fn list(log: &Log, tenant: &TenantId) -> Result<Vec<Value>, LogError> {
    Ok(bots::list(&**log.store(), tenant)
        .await?
        .iter()
        .map(|a| account_json(tenant, a))
        .collect())
}
