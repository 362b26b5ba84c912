//! Token revocation: what `tidings token revoke` and `POST /v1/admin/tokens/revoke` share.
//!
//! A revocation is recorded in the store first (every process that verifies tokens reads
//! it there), then announced on NATS (`tidings.revoked.<tenant>`) so every gateway ends the
//! matching live sessions at once. If the announcement fails the revocation still stands:
//! gateways refuse the token at the next Hello and end live sessions at their next periodic
//! check (`auth.revocation_recheck_secs`).

use std::time::Duration;

use serde_json::{Value, json};
use tidings_gateway::revocation::Notice;
use tidings_log::{Log, LogError, TenantId, UserId};
use tracing::warn;

/// How long a revoker waits for NATS to take its notice.
pub const NOTIFY_TIMEOUT: Duration = Duration::from_secs(2);

/// What to revoke.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// One token, by its `jti`.
    Jti(String),
    /// Every token of the user issued at or before `before` (Unix seconds).
    UserBefore { user: UserId, before: u64 },
}

/// A revocation asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub tenant: TenantId,
    pub target: Target,
}

/// `now`, an RFC 3339 time (or a date), or Unix seconds: a user cutoff.
pub fn parse_before(text: &str, now_secs: u64) -> Result<u64, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("now") {
        return Ok(now_secs);
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(secs);
    }
    let ms = tidings_archive::compliance::parse_time(text)
        .map_err(|e| format!("before: {e} (or \"now\")"))?;
    u64::try_from(ms / 1000).map_err(|_| "before: a time before 1970".to_string())
}

impl Request {
    /// From the admin route's JSON body.
    pub fn from_json(bytes: &[u8], now_secs: u64) -> Result<Request, String> {
        let body: Value = serde_json::from_slice(bytes)
            .map_err(|e| format!("the body is not JSON ({e}): {{\"tenant\",\"jti\"}} or {{\"tenant\",\"user\",\"before\"}}"))?;
        let Value::Object(fields) = body else {
            return Err("the body is not a JSON object".into());
        };
        for name in fields.keys() {
            if !["tenant", "jti", "user", "before"].contains(&name.as_str()) {
                return Err(format!(
                    "unknown field {name:?} (known: tenant, jti, user, before)"
                ));
            }
        }
        let text = |name: &str| -> Result<Option<&str>, String> {
            match fields.get(name) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(format!("{name} must be a string")),
            }
        };
        let tenant = TenantId::new(text("tenant")?.ok_or("tenant is required")?)
            .map_err(|e| e.to_string())?;
        let before = match fields.get("before") {
            None => None,
            Some(Value::Number(n)) => Some(n.as_u64().ok_or("before must be Unix seconds")?),
            Some(Value::String(s)) => Some(parse_before(s, now_secs)?),
            Some(_) => return Err("before must be a string or Unix seconds".into()),
        };
        let target = match (text("jti")?, text("user")?, before) {
            (Some(jti), None, None) => Target::Jti(check_jti(jti)?),
            (None, Some(user), before) => Target::UserBefore {
                user: UserId::new(user).map_err(|e| e.to_string())?,
                before: before.unwrap_or(now_secs),
            },
            _ => {
                return Err("name a jti, or a user (with an optional before), not both".into());
            }
        };
        Ok(Request { tenant, target })
    }

    /// The JSON body the admin route takes.
    pub fn to_json(&self) -> Value {
        match &self.target {
            Target::Jti(jti) => json!({"tenant": self.tenant.as_str(), "jti": jti}),
            Target::UserBefore { user, before } => {
                json!({"tenant": self.tenant.as_str(), "user": user.as_str(), "before": before})
            }
        }
    }
}

/// A jti as a verifier would accept it.
pub fn check_jti(jti: &str) -> Result<String, String> {
    if jti.is_empty() || jti.len() > tidings_auth::MAX_JTI_BYTES {
        return Err(format!(
            "a jti is 1 to {} bytes",
            tidings_auth::MAX_JTI_BYTES
        ));
    }
    Ok(jti.to_owned())
}

/// What a revocation did.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub request: Request,
    /// For a user: the cutoff in force (a later one recorded before wins).
    pub cutoff: Option<u64>,
    /// Whether the gateways were told at once; `Err` says why not.
    pub notified: Result<(), String>,
}

impl Outcome {
    pub fn to_json(&self) -> Value {
        let mut out = self.request.to_json();
        if let (Value::Object(fields), Some(cutoff)) = (&mut out, self.cutoff) {
            fields.insert("before".into(), json!(cutoff));
            fields.insert(
                "before_time".into(),
                json!(crate::output::rfc3339_ms(cutoff.saturating_mul(1000) as i64)),
            );
        }
        if let Value::Object(fields) = &mut out {
            fields.insert("revoked".into(), json!(true));
            fields.insert("notified".into(), json!(self.notified.is_ok()));
            if let Err(why) = &self.notified {
                fields.insert("notify_error".into(), json!(why));
            }
        }
        out
    }

    /// One line for the audit log.
    pub fn describe(&self) -> String {
        match (&self.request.target, self.cutoff) {
            (Target::Jti(jti), _) => format!("token {jti:?} revoked"),
            (Target::UserBefore { user, .. }, Some(cutoff)) => {
                format!("tokens of {user} issued at or before {cutoff} (Unix seconds) revoked")
            }
            (Target::UserBefore { user, before }, None) => {
                format!("tokens of {user} issued at or before {before} (Unix seconds) revoked")
            }
        }
    }
}

/// Records the revocation, then tells the gateways over `nats` (if given).
pub async fn revoke(
    log: &Log,
    nats: Option<&async_nats::Client>,
    request: &Request,
) -> Result<Outcome, LogError> {
    let tenant = &request.tenant;
    let (notice, cutoff) = match &request.target {
        Target::Jti(jti) => {
            log.revoke_jti(tenant, jti, tidings_log_api::now_secs())
                .await?;
            (Notice::jti(jti), None)
        }
        Target::UserBefore { user, before } => {
            let cutoff = log.revoke_user_before(tenant, user, *before).await?;
            (Notice::user_before(user, cutoff), Some(cutoff))
        }
    };
    let notified = match nats {
        Some(nats) => {
            tidings_gateway::revocation::publish(nats, tenant, &notice, NOTIFY_TIMEOUT).await
        }
        None => Err("no NATS connection".to_string()),
    };
    if let Err(why) = &notified {
        warn!(%tenant, reason = %why, "revocation recorded but not announced; gateways apply it at their next check");
    }
    Ok(Outcome {
        request: request.clone(),
        cutoff,
        notified,
    })
}

/// The longest answer read from an admin listener.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// How long a call to an admin listener may take (a planned cell move drains first).
const CALL_TIMEOUT: Duration = Duration::from_secs(90);

/// `POST /v1/admin/tokens/revoke` on a running server's admin listener (`https://host:port`,
/// or `http://` on loopback), verifying an https server as `tls` says: the answer's status and
/// JSON body.
pub async fn call_server(
    server: &str,
    token: &str,
    tls: &tidings_client::ClientTls,
    request: &Request,
) -> anyhow::Result<(u16, Value)> {
    post_admin(
        server,
        "/v1/admin/tokens/revoke",
        token,
        tls,
        request.to_json(),
    )
    .await
}

/// The HTTP client the CLI calls admin listeners with: `tls` verification (ring), no
/// redirects, `CALL_TIMEOUT`.
pub fn http_client(tls: &tidings_client::ClientTls) -> anyhow::Result<reqwest::Client> {
    use anyhow::Context as _;
    let config = tls.rustls_config().map_err(anyhow::Error::msg)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .timeout(CALL_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("make the HTTP client")
}

/// POSTs `body` to `path` on the admin listener at `server` with the admin token: the CLI's
/// way to act on a running process (whose embedded store it cannot open).
pub async fn post_admin(
    server: &str,
    path: &str,
    token: &str,
    tls: &tidings_client::ClientTls,
    body: Value,
) -> anyhow::Result<(u16, Value)> {
    use anyhow::Context as _;
    let base = server.trim_end_matches('/');
    let authority = base
        .strip_prefix("https://")
        .or_else(|| base.strip_prefix("http://"))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--server must be https://host:port or http://host:port (the admin listener)"
            )
        })?;
    anyhow::ensure!(
        !authority.is_empty() && !authority.contains('/'),
        "--server must be https://host:port or http://host:port, without a path"
    );
    let client = http_client(tls)?;
    let mut answer = client
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .with_context(|| format!("call {base}"))?;
    let status = answer.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = answer
        .chunk()
        .await
        .with_context(|| format!("read the answer of {base}"))?
    {
        anyhow::ensure!(
            body.len() + chunk.len() <= MAX_RESPONSE_BYTES,
            "{base} answered with more than {MAX_RESPONSE_BYTES} bytes"
        );
        body.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&body);
    let json = serde_json::from_str(text.trim())
        .unwrap_or_else(|_| json!({"error": {"code": "bad_answer", "message": text.trim()}}));
    Ok((status, json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_a_jti_or_a_user_and_a_time() {
        let now = 1_800_000_000;
        let r = Request::from_json(br#"{"tenant":"acme","jti":"j1"}"#, now).expect("jti");
        assert_eq!(r.target, Target::Jti("j1".into()));
        let r = Request::from_json(br#"{"tenant":"acme","user":"bob"}"#, now).expect("user");
        assert_eq!(
            r.target,
            Target::UserBefore {
                user: UserId::new("bob").expect("id"),
                before: now
            }
        );
        let r = Request::from_json(
            br#"{"tenant":"acme","user":"bob","before":"2026-11-30T00:00:00Z"}"#,
            now,
        )
        .expect("time");
        assert!(matches!(
            r.target,
            Target::UserBefore {
                before: 1_795_996_800,
                ..
            }
        ));
        let r =
            Request::from_json(br#"{"tenant":"acme","user":"bob","before":5}"#, now).expect("secs");
        assert!(matches!(r.target, Target::UserBefore { before: 5, .. }));
        assert_eq!(
            Request::from_json(&serde_json::to_vec(&r.to_json()).expect("json"), now),
            Ok(r)
        );
        for bad in [
            &br#"{"tenant":"acme"}"#[..],
            br#"{"tenant":"acme","jti":"j","user":"bob"}"#,
            br#"{"tenant":"acme","jti":"j","before":"now"}"#,
            br#"{"tenant":"acme","jti":""}"#,
            br#"{"jti":"j"}"#,
            br#"{"tenant":"a/b","jti":"j"}"#,
            br#"{"tenant":"acme","user":"bob","before":"yesterday"}"#,
            br#"{"tenant":"acme","jti":"j","extra":1}"#,
            br#"[]"#,
            b"not json",
        ] {
            assert!(
                Request::from_json(bad, now).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
