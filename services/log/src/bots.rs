//! Bot accounts of a tenant (docs/decisions/bots.md).
//!
//! A bot is a user id starting with `bot-` that tidings itself vouches for: its tokens are
//! signed by a key derived from the master key (`tidings_auth::issue_bot`), which every
//! verifier of the deployment knows, and no other token may claim a `bot-` id. This registry
//! says which bots a tenant has, who created them and whether they were revoked: tokens are
//! issued only for a registered bot that is not revoked, and revoking a bot also revokes
//! every token it was issued (a user cutoff in [`crate::revocation`]).
//!
//! Value: created (8-byte BE ms), revoked (8-byte BE ms, 0: not), then who created it (UTF-8).

use crate::error::LogError;
use crate::ids::{TenantId, UserId};
use crate::keys;
use crate::store::{KvStore, Order, Transaction};

/// Most bots a tenant may have (and what one listing returns at most).
pub const MAX_BOTS_PER_TENANT: usize = 1000;
/// The prefix of every bot's id (`tidings_auth::BOT_USER_PREFIX`).
pub const BOT_PREFIX: &str = "bot-";

/// One bot of a tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BotAccount {
    pub id: UserId,
    pub created_ms: i64,
    /// When it was revoked; `None`: it is live.
    pub revoked_ms: Option<i64>,
    pub created_by: String,
}

impl BotAccount {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.created_by.len());
        v.extend_from_slice(&self.created_ms.to_be_bytes());
        v.extend_from_slice(&self.revoked_ms.unwrap_or(0).to_be_bytes());
        v.extend_from_slice(self.created_by.as_bytes());
        v
    }

    fn decode(id: UserId, key: &[u8], v: &[u8]) -> Result<BotAccount, LogError> {
        let bad = |why: &str| LogError::corrupt(key, why);
        if v.len() < 16 {
            return Err(bad("a bot record is at least 16 bytes"));
        }
        let number = |b: &[u8]| i64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
        let revoked = number(&v[8..16]);
        Ok(BotAccount {
            id,
            created_ms: number(&v[..8]),
            revoked_ms: (revoked != 0).then_some(revoked),
            created_by: String::from_utf8(v[16..].to_vec())
                .map_err(|_| bad("a bot's creator is not UTF-8"))?,
        })
    }
}

/// A bot's id from its name: `bot-<name>`, checked as a user id.
pub fn bot_id(name: &str) -> Result<UserId, LogError> {
    let id = if name.starts_with(BOT_PREFIX) {
        name.to_string()
    } else {
        format!("{BOT_PREFIX}{name}")
    };
    if id.len() == BOT_PREFIX.len() {
        return Err(LogError::InvalidRequest("a bot needs a name".into()));
    }
    UserId::new(id.as_str())
}

/// Registers `bot` in `tenant`; refused if it exists (live or revoked: an id is never
/// reused, so old events keep meaning one bot) or the tenant has
/// [`MAX_BOTS_PER_TENANT`].
pub async fn create(
    store: &dyn KvStore,
    tenant: &TenantId,
    bot: &UserId,
    created_by: &str,
    now_ms: i64,
) -> Result<BotAccount, LogError> {
    if !bot.as_str().starts_with(BOT_PREFIX) {
        return Err(LogError::InvalidRequest(format!(
            "a bot's id starts with {BOT_PREFIX:?}"
        )));
    }
    if list(store, tenant).await?.len() >= MAX_BOTS_PER_TENANT {
        return Err(LogError::InvalidRequest(format!(
            "a tenant has at most {MAX_BOTS_PER_TENANT} bots"
        )));
    }
    let account = BotAccount {
        id: bot.clone(),
        created_ms: now_ms,
        revoked_ms: None,
        created_by: created_by.to_string(),
    };
    let key = keys::bot(tenant, bot);
    let mut txn = Transaction::new();
    txn.put_if_absent(key, account.encode());
    store.commit(txn).await.map_err(|e| match e {
        crate::store::StoreError::Conflict { .. } => LogError::InvalidRequest(format!(
            "bot {bot} already exists in tenant {tenant} (ids are never reused)"
        )),
        e => e.into(),
    })?;
    Ok(account)
}

/// The bot, if the tenant has it.
pub async fn get(
    store: &dyn KvStore,
    tenant: &TenantId,
    bot: &UserId,
) -> Result<Option<BotAccount>, LogError> {
    let key = keys::bot(tenant, bot);
    match store.get(&key).await? {
        None => Ok(None),
        Some(v) => BotAccount::decode(bot.clone(), &key, &v).map(Some),
    }
}

/// The tenant's bots, in id order (at most [`MAX_BOTS_PER_TENANT`]).
pub async fn list(store: &dyn KvStore, tenant: &TenantId) -> Result<Vec<BotAccount>, LogError> {
    let rows = store
        .scan(keys::bots(tenant), MAX_BOTS_PER_TENANT, Order::Ascending)
        .await?;
    rows.iter()
        .map(|(k, v)| {
            let name = k.rsplit(|b| *b == 0).next().unwrap_or_default();
            let id = UserId::new(String::from_utf8_lossy(name).as_ref())?;
            BotAccount::decode(id, k, v)
        })
        .collect()
}

/// Marks the bot revoked (its tokens are revoked by the caller, through
/// [`crate::revocation`]); `None` if the tenant has no such bot.
pub async fn mark_revoked(
    store: &dyn KvStore,
    tenant: &TenantId,
    bot: &UserId,
    now_ms: i64,
) -> Result<Option<BotAccount>, LogError> {
    let key = keys::bot(tenant, bot);
    let Some(old) = store.get(&key).await? else {
        return Ok(None);
    };
    let mut account = BotAccount::decode(bot.clone(), &key, &old)?;
    if account.revoked_ms.is_some() {
        return Ok(Some(account));
    }
    account.revoked_ms = Some(now_ms);
    let mut txn = Transaction::new();
    txn.expect(key.clone(), Some(old))
        .put(key, account.encode());
    store.commit(txn).await?;
    Ok(Some(account))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FjallStore;

    #[tokio::test]
    async fn bots_are_created_once_listed_per_tenant_and_revoked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FjallStore::open(dir.path()).expect("store");
        let (acme, other) = (
            TenantId::new("acme").expect("id"),
            TenantId::new("other").expect("id"),
        );
        let alerts = bot_id("alerts").expect("id");
        assert_eq!(alerts.as_str(), "bot-alerts");
        assert_eq!(bot_id("bot-alerts").expect("id"), alerts);
        assert!(bot_id("").is_err() && bot_id("bot-").is_err() && bot_id("a b").is_err());

        let made = create(&store, &acme, &alerts, "acme/root", 5)
            .await
            .expect("create");
        assert_eq!(made.revoked_ms, None);
        let again = create(&store, &acme, &alerts, "acme/root", 6).await;
        assert_eq!(again.expect_err("exists").code(), "invalid_request");
        let plain = UserId::new("alice").expect("id");
        assert!(create(&store, &acme, &plain, "x", 1).await.is_err());
        assert_eq!(list(&store, &acme).await.expect("list"), vec![made.clone()]);
        assert!(list(&store, &other).await.expect("list").is_empty());
        assert_eq!(get(&store, &other, &alerts).await.expect("get"), None);

        let revoked = mark_revoked(&store, &acme, &alerts, 9)
            .await
            .expect("revoke")
            .expect("exists");
        assert_eq!(revoked.revoked_ms, Some(9));
        assert_eq!(
            get(&store, &acme, &alerts).await.expect("get"),
            Some(revoked)
        );
        assert_eq!(
            mark_revoked(&store, &other, &alerts, 9)
                .await
                .expect("revoke"),
            None
        );
        // A revoked id is never made again.
        assert!(
            create(&store, &acme, &alerts, "acme/root", 10)
                .await
                .is_err()
        );
    }
}
