//! Users and the log's token check for tests that call the log service over NATS directly
//! (without a gateway): an HS256 test secret, the log side's [`RpcAuth`] and [`Caller`]s.

use std::sync::Arc;

use tidings_auth::{AuthConfig, Claims, Verifier};
use tidings_log_api::Caller;
use tidings_log_role::rpc_server::RpcAuth;

const SECRET: &[u8] = b"tests-only-hs256-secret-of-32-bytes!";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A verifier for tokens made by [`token`].
pub fn verifier() -> Verifier {
    Verifier::new(AuthConfig {
        issuer: "tidings".into(),
        audience: "tidings".into(),
        refused_audiences: Vec::new(),
        hs256_secret: Some(SECRET.to_vec()),
        ed25519_public_keys: Vec::new(),
        jwks: None,
        leeway_secs: 0,
        max_lifetime_secs: 86_400,
    })
    .expect("verifier")
}

/// The log service's check of calls, with [`verifier`].
pub fn rpc_auth() -> Arc<RpcAuth> {
    RpcAuth::new(verifier())
}

/// A valid token of `user` in `tenant` and what it says.
pub fn token(tenant: &str, user: &str) -> (String, Claims) {
    let claims = Claims {
        tenant: tenant.into(),
        user: user.into(),
        roles: Vec::new(),
        expires_at: now() + 3600,
        issued_at: now(),
        jti: None,
    };
    let token = tidings_auth::issue_hs256(SECRET, "tidings", "tidings", &claims);
    (token, claims)
}

/// A caller acting as `user` with a valid token.
pub fn user(tenant: &str, user: &str) -> Caller {
    let (token, claims) = token(tenant, user);
    Caller::user(claims, token)
}
