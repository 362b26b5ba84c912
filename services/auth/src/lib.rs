//! JWT verification and issuing for the tidings WebSocket gateway.
//!
//! Clients present a compact JWS (RFC 7515) carrying JWT claims (RFC 7519) in their first
//! frame; the gateway turns it into [`Claims`] with [`Verifier::verify`]. Two algorithms are
//! supported: HS256 (HMAC-SHA256 with a shared secret, for development) and EdDSA (Ed25519
//! public keys, for production). [`issue_hs256`] and [`issue_ed25519`] mint tokens for the
//! `tidings token issue` tool and for tests.
//!
//! We implement JWT ourselves rather than pull in a JWT crate because the part that matters
//! for security is small and we want exact control over it: only the algorithms enabled in
//! the [`AuthConfig`] are accepted (never `none`, and never HS256 keyed with public key bytes),
//! the signature is checked before any claim is read, key-carrying headers (`jwk`, `jku`,
//! `x5u`, ...) are ignored, `crit` is refused, duplicate JSON members are refused, and error
//! messages never echo the token or the secret.
//!
//! # Token rules (issue 11)
//! - HS256 is a development convenience: a verifier accepts it only when its configuration
//!   carries a secret, and the binary puts one there only when `auth.hs256_enabled` says so
//!   (never because a secret file happens to exist).
//! - Audiences separate planes: the gateway's verifier requires the chat audience and
//!   refuses any token that also names the compliance audience, the admin listener's the
//!   other way round ([`AuthConfig::refused_audiences`]). A stolen compliance token cannot
//!   open a chat session, and a chat token cannot read a tenant's history.
//! - `iat` is required, may not be in the future (beyond the leeway), and `exp - iat` may
//!   not exceed [`AuthConfig::max_lifetime_secs`]: no token outlives a bounded window, which
//!   also bounds how long a revocation record must be kept.
//! - `jti` (optional, at most [`MAX_JTI_BYTES`]) names a token so it can be revoked alone;
//!   revocation itself is kept by the log (`tidings_log::revocation`), not here.
//! - Ed25519 keys come from the configuration and, optionally, from a JWKS file ([`Jwks`])
//!   that the server re-reads when it changes; a broken file keeps the keys it had.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use hmac::{Hmac, Mac as _};
use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The largest token [`Verifier::verify`] will look at, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The smallest HS256 secret a [`Verifier`] accepts, in bytes.
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// The longest `jti` accepted, in bytes: revocation records are keyed by it.
pub const MAX_JTI_BYTES: usize = 128;

/// The largest JWKS file [`Jwks`] reads, in bytes (a few hundred keys).
pub const MAX_JWKS_BYTES: u64 = 256 * 1024;

/// The most keys one JWKS file may hold.
pub const MAX_JWKS_KEYS: usize = 256;

/// Longest attacker-controlled string (alg, kid, iss, aud, ...) echoed in an error message.
const MAX_ECHO_CHARS: usize = 64;

/// Who a verified token says the caller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// Custom claim `tenant`.
    pub tenant: String,
    /// Standard claim `sub`.
    pub user: String,
    /// Custom claim `roles` (array of strings; absent means empty).
    pub roles: Vec<String>,
    /// `exp`, seconds since the Unix epoch (required).
    pub expires_at: u64,
    /// `iat`, seconds since the Unix epoch (required).
    pub issued_at: u64,
    /// `jti`, the token's id (optional; what `tidings token revoke --jti` names).
    pub jti: Option<String>,
}

/// What a [`Verifier`] accepts.
#[derive(Clone)]
pub struct AuthConfig {
    /// Required `iss` value (compared exactly).
    pub issuer: String,
    /// Required `aud` value; a token's `aud` may be this string or an array containing it.
    pub audience: String,
    /// Audiences a token may not name, even beside [`AuthConfig::audience`]: the other
    /// plane's (a chat verifier refuses the compliance audience and vice versa).
    pub refused_audiences: Vec<String>,
    /// Enables HS256 when `Some`; must be at least [`MIN_HS256_SECRET_BYTES`] long.
    pub hs256_secret: Option<Vec<u8>>,
    /// Enables EdDSA when non-empty (or when `jwks` is set).
    pub ed25519_public_keys: Vec<Ed25519Key>,
    /// More Ed25519 keys, from a JWKS file that may change while the verifier lives.
    pub jwks: Option<Arc<Jwks>>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds.
    pub leeway_secs: u64,
    /// The longest a token may live: `exp - iat` at most this, in seconds.
    pub max_lifetime_secs: u64,
}

/// Hand-written so that logging a config never prints the HS256 secret.
impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field(
                "hs256_secret",
                &self.hs256_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("refused_audiences", &self.refused_audiences)
            .field("ed25519_public_keys", &self.ed25519_public_keys)
            .field("jwks", &self.jwks)
            .field("leeway_secs", &self.leeway_secs)
            .field("max_lifetime_secs", &self.max_lifetime_secs)
            .finish()
    }
}

/// An Ed25519 public key that may verify EdDSA tokens, optionally named by a key id.
#[derive(Clone, Debug)]
pub struct Ed25519Key {
    /// Matched against the token header's `kid`.
    pub kid: Option<String>,
    /// The 32-byte compressed Edwards point.
    pub public_key: [u8; 32],
}

/// Why a token (or a configuration) was rejected.
///
/// Messages are meant for operators. They never contain the token or the secret; strings
/// taken from a token (algorithm, key id, issuer, audience) are quoted, escaped and truncated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token is not a well-formed JWT, or a required claim is missing or has the wrong type.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The header names `none`, an unknown algorithm, or one not enabled in the configuration.
    #[error("unsupported token algorithm: {0}")]
    UnsupportedAlgorithm(String),
    /// The signature does not match the header and payload under any configured key.
    #[error("token signature is invalid")]
    BadSignature,
    /// An EdDSA token names a key id that no configured key has.
    #[error("token key id {0} matches no configured Ed25519 key")]
    UnknownKey(String),
    /// `exp` (plus leeway) is in the past.
    #[error("token expired at {expired_at} (Unix seconds)")]
    Expired {
        /// The token's `exp`.
        expired_at: u64,
    },
    /// `nbf` (minus leeway) is in the future.
    #[error("token is not valid before {not_before} (Unix seconds)")]
    NotYetValid {
        /// The token's `nbf`.
        not_before: u64,
    },
    /// `iss` is not the configured issuer.
    #[error("token issuer {0} is not the configured issuer")]
    WrongIssuer(String),
    /// `aud` does not name the configured audience, or names a refused one.
    #[error("token audience {0} does not include the configured audience")]
    WrongAudience(String),
    /// `exp - iat` is over the configured maximum lifetime.
    #[error("token lifetime of {lifetime_secs} s is over the {max_secs} s maximum")]
    LifetimeTooLong {
        /// The token's `exp - iat`.
        lifetime_secs: u64,
        /// The configured maximum.
        max_secs: u64,
    },
    /// `iat` (minus leeway) is in the future.
    #[error("token is issued in the future ({issued_at}, Unix seconds)")]
    IssuedInFuture {
        /// The token's `iat`.
        issued_at: u64,
    },
    /// The token was revoked (by its `jti`, or all of its user's tokens issued up to a time).
    /// Never produced by [`Verifier::verify`]: revocation lives in the log; callers that
    /// consult it report this variant so the code is the same everywhere.
    #[error("token has been revoked")]
    Revoked,
    /// The [`AuthConfig`] cannot be used.
    #[error("invalid auth configuration: {0}")]
    InvalidConfig(String),
}

impl AuthError {
    /// Stable snake_case name of the variant, for metrics and close-frame reasons.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Malformed(_) => "malformed",
            AuthError::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            AuthError::BadSignature => "bad_signature",
            AuthError::UnknownKey(_) => "unknown_key",
            AuthError::Expired { .. } => "expired",
            AuthError::NotYetValid { .. } => "not_yet_valid",
            AuthError::WrongIssuer(_) => "wrong_issuer",
            AuthError::WrongAudience(_) => "wrong_audience",
            AuthError::LifetimeTooLong { .. } => "lifetime_too_long",
            AuthError::IssuedInFuture { .. } => "issued_in_future",
            AuthError::Revoked => "revoked",
            AuthError::InvalidConfig(_) => "invalid_config",
        }
    }
}

/// A configured Ed25519 key, already decompressed and checked.
struct VerifierKey {
    kid: Option<String>,
    key: VerifyingKey,
}

/// Algorithms we know; which of them a verifier accepts depends on its config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Algorithm {
    Hs256,
    EdDsa,
}

/// The header fields we use.
struct Header {
    alg: Algorithm,
    kid: Option<String>,
}

/// The issuer of bot tokens: tidings itself ([`Verifier::with_bot_key`]).
pub const BOT_ISSUER: &str = "tidings-bots";
/// The `kid` a bot token's header names.
pub const BOT_KID: &str = "tidings-bots";
/// Every bot's user id starts with this; no other token may claim such an id.
pub const BOT_USER_PREFIX: &str = "bot-";
/// The role every bot token carries.
pub const BOT_ROLE: &str = "bot";
/// The longest a bot token may live (bots do not sign in again every day).
pub const MAX_BOT_TOKEN_LIFETIME_SECS: u64 = 366 * 24 * 3600;

/// Verifies tokens against one [`AuthConfig`]. Cheap to share (`&self` only).
pub struct Verifier {
    issuer: String,
    audience: String,
    refused_audiences: Vec<String>,
    hs256_secret: Option<Vec<u8>>,
    ed25519_keys: Vec<VerifierKey>,
    jwks: Option<Arc<Jwks>>,
    leeway_secs: u64,
    max_lifetime_secs: u64,
    /// Tidings's own key for bot tokens, if this verifier takes them.
    bot_key: Option<VerifyingKey>,
}

/// Hand-written so that logging a verifier never prints the HS256 secret.
impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<Option<&str>> = self.ed25519_keys.iter().map(|k| k.kid.as_deref()).collect();
        f.debug_struct("Verifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("refused_audiences", &self.refused_audiences)
            .field("hs256_enabled", &self.hs256_secret.is_some())
            .field("ed25519_kids", &kids)
            .field("jwks", &self.jwks)
            .field("leeway_secs", &self.leeway_secs)
            .field("max_lifetime_secs", &self.max_lifetime_secs)
            .field("accepts_bots", &self.bot_key.is_some())
            .finish()
    }
}

impl Verifier {
    /// Checks `config` and builds a verifier.
    ///
    /// Fails with [`AuthError::InvalidConfig`] when no algorithm is enabled, the HS256 secret is
    /// shorter than [`MIN_HS256_SECRET_BYTES`] (or equals one of the public keys), a public key
    /// is not a valid (or is a small-order) Ed25519 point, a `kid` is empty, or the issuer or
    /// audience is empty.
    pub fn new(config: AuthConfig) -> Result<Verifier, AuthError> {
        let invalid = |msg: String| Err(AuthError::InvalidConfig(msg));
        if config.issuer.is_empty() {
            return invalid("issuer must not be empty".to_owned());
        }
        if config.audience.is_empty() {
            return invalid("audience must not be empty".to_owned());
        }
        if config.refused_audiences.contains(&config.audience) {
            return invalid("the audience must not also be a refused audience".to_owned());
        }
        if config.max_lifetime_secs == 0 {
            return invalid("the maximum token lifetime must be positive".to_owned());
        }
        if config.hs256_secret.is_none()
            && config.ed25519_public_keys.is_empty()
            && config.jwks.is_none()
        {
            return invalid(
                "no algorithm enabled: configure an HS256 secret, an Ed25519 public key or a JWKS file"
                    .to_owned(),
            );
        }
        if let Some(secret) = &config.hs256_secret {
            if secret.len() < MIN_HS256_SECRET_BYTES {
                return invalid(format!(
                    "HS256 secret is too short ({} bytes; at least {MIN_HS256_SECRET_BYTES} required)",
                    secret.len()
                ));
            }
            if config
                .ed25519_public_keys
                .iter()
                .any(|k| k.public_key.as_slice() == secret.as_slice())
            {
                return invalid(
                    "HS256 secret must not be the bytes of a configured Ed25519 public key"
                        .to_owned(),
                );
            }
        }
        let ed25519_keys = checked_keys(&config.ed25519_public_keys)?;
        Ok(Verifier {
            issuer: config.issuer,
            audience: config.audience,
            refused_audiences: config.refused_audiences,
            hs256_secret: config.hs256_secret,
            ed25519_keys,
            jwks: config.jwks,
            leeway_secs: config.leeway_secs,
            max_lifetime_secs: config.max_lifetime_secs,
            bot_key: None,
        })
    }

    /// Also accepts bot tokens: EdDSA under `public_key` (tidings's own bot key), header
    /// `kid` [`BOT_KID`], issuer [`BOT_ISSUER`], this verifier's audience, a subject starting
    /// with [`BOT_USER_PREFIX`], the [`BOT_ROLE`] role, living at most
    /// [`MAX_BOT_TOKEN_LIFETIME_SECS`]. Tokens from the configured issuers may never claim
    /// a bot's id, with or without this.
    pub fn with_bot_key(mut self, public_key: &[u8; 32]) -> Result<Verifier, AuthError> {
        let Ok(key) = VerifyingKey::from_bytes(public_key) else {
            return Err(AuthError::InvalidConfig(
                "the bot public key is not a valid Ed25519 point".to_owned(),
            ));
        };
        if key.is_weak() {
            return Err(AuthError::InvalidConfig(
                "the bot public key is a weak (small-order) Ed25519 point".to_owned(),
            ));
        }
        self.bot_key = Some(key);
        Ok(self)
    }

    /// Whether bot tokens are accepted.
    pub fn accepts_bots(&self) -> bool {
        self.bot_key.is_some()
    }

    /// Whether HS256 tokens are accepted.
    pub fn hs256_enabled(&self) -> bool {
        self.hs256_secret.is_some()
    }

    /// The audience tokens must name.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Verifies `token` at time `now_secs` (Unix seconds) and returns its claims.
    ///
    /// Order: size and shape → header → algorithm enabled? → signature → claims. No claim is
    /// read before the signature has been checked.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed(format!(
                "token is {} bytes, over the {MAX_TOKEN_BYTES}-byte limit",
                token.len()
            )));
        }
        let dots = token.bytes().filter(|&b| b == b'.').count();
        if dots != 2 {
            return Err(AuthError::Malformed(format!(
                "token has {} dot-separated parts; a JWT has exactly 3",
                dots + 1
            )));
        }
        let mut parts = token.splitn(3, '.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed(
                "token does not have exactly 3 dot-separated parts".to_owned(),
            ));
        };
        let header_bytes = decode_part(header_b64, "header")?;
        let payload_bytes = decode_part(payload_b64, "payload")?;
        let signature = decode_part(signature_b64, "signature")?;

        let header = self.parse_header(&header_bytes)?;
        let signing_input = &token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()];
        let bot_key = match (&header.alg, header.kid.as_deref(), &self.bot_key) {
            (Algorithm::EdDsa, Some(BOT_KID), Some(key)) => Some(key),
            _ => None,
        };
        match (header.alg, bot_key) {
            (Algorithm::EdDsa, Some(key)) => {
                let signature =
                    Signature::from_slice(&signature).map_err(|_| AuthError::BadSignature)?;
                key.verify_strict(signing_input, &signature)
                    .map_err(|_| AuthError::BadSignature)?;
            }
            (Algorithm::Hs256, _) => self.check_hs256(signing_input, &signature)?,
            (Algorithm::EdDsa, None) => {
                self.check_eddsa(header.kid.as_deref(), signing_input, &signature)?;
            }
        }

        // Only now, with the signature verified, do we look at the claims.
        let payload = parse_object(&payload_bytes, "payload")?;
        if bot_key.is_some() {
            let claims =
                self.check_claims(&payload, now_secs, BOT_ISSUER, MAX_BOT_TOKEN_LIFETIME_SECS)?;
            if !claims.user.starts_with(BOT_USER_PREFIX)
                || !claims.roles.iter().any(|r| r == BOT_ROLE)
            {
                return Err(AuthError::Malformed(format!(
                    "a bot token's subject starts with {BOT_USER_PREFIX:?} and it carries the {BOT_ROLE:?} role"
                )));
            }
            return Ok(claims);
        }
        let claims = self.check_claims(&payload, now_secs, &self.issuer, self.max_lifetime_secs)?;
        if claims.user.starts_with(BOT_USER_PREFIX) || claims.roles.iter().any(|r| r == BOT_ROLE) {
            return Err(AuthError::Malformed(format!(
                "user ids starting with {BOT_USER_PREFIX:?} and the {BOT_ROLE:?} role are tidings's bots' own"
            )));
        }
        Ok(claims)
    }

    fn parse_header(&self, bytes: &[u8]) -> Result<Header, AuthError> {
        let header = parse_object(bytes, "header")?;
        if header.contains_key("crit") {
            return Err(AuthError::Malformed(
                "header has a \"crit\" parameter; no critical extensions are supported".to_owned(),
            ));
        }
        if let Some(typ) = header.get("typ") {
            match typ.as_str() {
                Some("JWT") => {}
                Some(other) => {
                    return Err(AuthError::Malformed(format!(
                        "header \"typ\" is {}, expected \"JWT\"",
                        echo(other)
                    )));
                }
                None => {
                    return Err(AuthError::Malformed(
                        "header \"typ\" must be a string".to_owned(),
                    ));
                }
            }
        }
        let alg = match header.get("alg") {
            None => {
                return Err(AuthError::Malformed("header is missing \"alg\"".to_owned()));
            }
            Some(Value::String(alg)) => self.enabled_algorithm(alg)?,
            Some(_) => {
                return Err(AuthError::Malformed(
                    "header \"alg\" must be a string".to_owned(),
                ));
            }
        };
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(kid)) => Some(kid.clone()),
            Some(_) => {
                return Err(AuthError::Malformed(
                    "header \"kid\" must be a string".to_owned(),
                ));
            }
        };
        Ok(Header { alg, kid })
    }

    /// Maps the header's `alg` to an algorithm this verifier has keys for.
    fn enabled_algorithm(&self, alg: &str) -> Result<Algorithm, AuthError> {
        if alg.eq_ignore_ascii_case("none") {
            return Err(AuthError::UnsupportedAlgorithm(
                "\"none\" (unsigned tokens) is never accepted".to_owned(),
            ));
        }
        match alg {
            "HS256" if self.hs256_secret.is_some() => Ok(Algorithm::Hs256),
            "HS256" => Err(AuthError::UnsupportedAlgorithm(
                "HS256 is not enabled in this configuration (only EdDSA is)".to_owned(),
            )),
            "EdDSA"
                if !self.ed25519_keys.is_empty()
                    || self.jwks.is_some()
                    || self.bot_key.is_some() =>
            {
                Ok(Algorithm::EdDsa)
            }
            "EdDSA" => Err(AuthError::UnsupportedAlgorithm(
                "EdDSA is not enabled in this configuration (only HS256 is)".to_owned(),
            )),
            other => Err(AuthError::UnsupportedAlgorithm(format!(
                "{} is not supported (only HS256 and EdDSA are)",
                echo(other)
            ))),
        }
    }

    fn check_hs256(&self, signing_input: &[u8], signature: &[u8]) -> Result<(), AuthError> {
        let Some(secret) = &self.hs256_secret else {
            return Err(AuthError::UnsupportedAlgorithm(
                "HS256 is not enabled in this configuration".to_owned(),
            ));
        };
        let mut mac = HmacSha256::new_from_slice(secret).map_err(|_| {
            AuthError::InvalidConfig("HS256 secret cannot key HMAC-SHA256".to_owned())
        })?;
        mac.update(signing_input);
        // Constant-time comparison (and length check) inside `verify_slice`.
        mac.verify_slice(signature)
            .map_err(|_| AuthError::BadSignature)
    }

    fn check_eddsa(
        &self,
        kid: Option<&str>,
        signing_input: &[u8],
        signature: &[u8],
    ) -> Result<(), AuthError> {
        // A snapshot of the JWKS keys: a reload in the middle does not change this check.
        let file_keys = self.jwks.as_ref().map(|j| j.keys()).unwrap_or_default();
        let all = || self.ed25519_keys.iter().chain(file_keys.iter());
        let candidates: Vec<&VerifierKey> = match kid {
            None => all().collect(),
            Some(kid) => {
                let named: Vec<&VerifierKey> =
                    all().filter(|k| k.kid.as_deref() == Some(kid)).collect();
                if named.is_empty() {
                    // Keys configured without a kid accept any token; keys with a kid only
                    // accept tokens naming it.
                    all().filter(|k| k.kid.is_none()).collect()
                } else {
                    named
                }
            }
        };
        if candidates.is_empty() {
            return Err(AuthError::UnknownKey(echo(kid.unwrap_or_default())));
        }
        let signature = Signature::from_slice(signature).map_err(|_| AuthError::BadSignature)?;
        if candidates
            .iter()
            .any(|k| k.key.verify_strict(signing_input, &signature).is_ok())
        {
            Ok(())
        } else {
            Err(AuthError::BadSignature)
        }
    }

    /// The claims, checked against `expected_issuer` and `max_lifetime_secs` (the
    /// configured ones, or the bots').
    fn check_claims(
        &self,
        payload: &Map<String, Value>,
        now_secs: u64,
        expected_issuer: &str,
        max_lifetime_secs: u64,
    ) -> Result<Claims, AuthError> {
        // Shape first, so a malformed token is reported as such whatever its other claims say.
        let issuer = required_string(payload, "iss")?;
        let audience = payload
            .get("aud")
            .ok_or_else(|| missing("aud"))
            .and_then(Audience::from_json)?;
        let user = required_non_empty(payload, "sub")?;
        let tenant = required_non_empty(payload, "tenant")?;
        let expires_at = optional_time(payload, "exp")?.ok_or_else(|| missing("exp"))?;
        let not_before = optional_time(payload, "nbf")?;
        let issued_at = optional_time(payload, "iat")?.ok_or_else(|| missing("iat"))?;
        let roles = roles(payload)?;
        let jti = jti(payload)?;
        if expires_at < issued_at {
            return Err(AuthError::Malformed(
                "claim \"exp\" is before claim \"iat\"".to_owned(),
            ));
        }

        if issuer != expected_issuer {
            return Err(AuthError::WrongIssuer(echo(issuer)));
        }
        if !audience.contains(&self.audience)
            || self
                .refused_audiences
                .iter()
                .any(|refused| audience.contains(refused))
        {
            return Err(AuthError::WrongAudience(audience.describe()));
        }
        let lifetime_secs = expires_at - issued_at;
        if lifetime_secs > max_lifetime_secs {
            return Err(AuthError::LifetimeTooLong {
                lifetime_secs,
                max_secs: max_lifetime_secs,
            });
        }
        if now_secs.saturating_add(self.leeway_secs) < issued_at {
            return Err(AuthError::IssuedInFuture { issued_at });
        }
        if now_secs > expires_at.saturating_add(self.leeway_secs) {
            return Err(AuthError::Expired {
                expired_at: expires_at,
            });
        }
        if let Some(not_before) = not_before
            && now_secs.saturating_add(self.leeway_secs) < not_before
        {
            return Err(AuthError::NotYetValid { not_before });
        }
        Ok(Claims {
            tenant: tenant.to_owned(),
            user: user.to_owned(),
            roles,
            expires_at,
            issued_at,
            jti,
        })
    }
}

/// Checks configured keys: valid, not weak, kid absent or non-empty.
fn checked_keys(keys: &[Ed25519Key]) -> Result<Vec<VerifierKey>, AuthError> {
    let invalid = |msg: String| Err(AuthError::InvalidConfig(msg));
    let mut checked = Vec::with_capacity(keys.len());
    for (index, configured) in keys.iter().enumerate() {
        let name = match &configured.kid {
            Some(kid) => format!("Ed25519 public key #{index} (kid {})", echo(kid)),
            None => format!("Ed25519 public key #{index}"),
        };
        if configured.kid.as_deref() == Some("") {
            return invalid(format!("{name}: kid must not be empty (omit it instead)"));
        }
        let Ok(key) = VerifyingKey::from_bytes(&configured.public_key) else {
            return invalid(format!("{name} is not a valid Ed25519 point"));
        };
        if key.is_weak() {
            return invalid(format!("{name} is a weak (small-order) Ed25519 point"));
        }
        checked.push(VerifierKey {
            kid: configured.kid.clone(),
            key,
        });
    }
    Ok(checked)
}

/// What identifies a version of a file on disk: a replaced file (new inode), a rewritten one
/// (new mtime or length) both count as changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> std::io::Result<FileStamp> {
    let meta = std::fs::metadata(path)?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Ok(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode,
    })
}

/// Ed25519 public keys from a JWKS file (RFC 7517, keys of type OKP, RFC 8037), re-read by
/// [`Jwks::reload_if_changed`] when the file changes.
///
/// A file that cannot be read or parsed keeps the keys loaded before (and the caller logs a
/// warning): a half-written file during a rotation must not lock every user out. Keys of
/// other types are skipped; a key carrying a private part (`d`) makes the whole file invalid,
/// since whoever published it has leaked a signing key.
pub struct Jwks {
    path: PathBuf,
    state: RwLock<JwksState>,
}

struct JwksState {
    stamp: Option<FileStamp>,
    keys: Arc<Vec<VerifierKey>>,
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<Option<String>> = self.keys().iter().map(|k| k.kid.clone()).collect();
        f.debug_struct("Jwks")
            .field("path", &self.path)
            .field("kids", &kids)
            .finish()
    }
}

impl Jwks {
    /// Reads the file; it must be valid now (a server does not start on a broken key file).
    pub fn load(path: impl Into<PathBuf>) -> Result<Jwks, AuthError> {
        let path = path.into();
        let stamp = stamp(&path)
            .map_err(|e| AuthError::InvalidConfig(format!("JWKS file {}: {e}", path.display())))?;
        let keys = read_jwks(&path)?;
        Ok(Jwks {
            path,
            state: RwLock::new(JwksState {
                stamp: Some(stamp),
                keys: Arc::new(keys),
            }),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file if it changed since the last (successful or failed) look:
    /// `Ok(Some(n))` with the number of keys now in use, `Ok(None)` if unchanged. On an
    /// error the keys in use stay as they were, and the same broken version is not retried
    /// (nor reported again) until the file changes once more.
    pub fn reload_if_changed(&self) -> Result<Option<usize>, AuthError> {
        let now = stamp(&self.path).ok();
        {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            if now.is_some() && state.stamp == now {
                return Ok(None);
            }
        }
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if now.is_some() && state.stamp == now {
            return Ok(None);
        }
        let missing = now.is_none() && state.stamp.is_none();
        state.stamp = now;
        if missing {
            // Still gone: reported once already.
            return Ok(None);
        }
        let keys = read_jwks(&self.path)?;
        let n = keys.len();
        state.keys = Arc::new(keys);
        Ok(Some(n))
    }

    fn keys(&self) -> Arc<Vec<VerifierKey>> {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys
            .clone()
    }

    /// The key ids in use (`None` for a key without one).
    pub fn kids(&self) -> Vec<Option<String>> {
        self.keys().iter().map(|k| k.kid.clone()).collect()
    }
}

fn read_jwks(path: &Path) -> Result<Vec<VerifierKey>, AuthError> {
    use std::io::Read as _;
    let name = path.display();
    let bad = |msg: String| AuthError::InvalidConfig(format!("JWKS file {name}: {msg}"));
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_JWKS_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > MAX_JWKS_BYTES {
        return Err(bad(format!("larger than {MAX_JWKS_BYTES} bytes")));
    }
    let keys = parse_jwks(&bytes).map_err(|e| match e {
        AuthError::InvalidConfig(msg) => bad(msg),
        other => other,
    })?;
    checked_keys(&keys).map_err(|e| match e {
        AuthError::InvalidConfig(msg) => bad(msg),
        other => other,
    })
}

/// The Ed25519 keys of a JWKS document (`{"keys":[{"kty":"OKP","crv":"Ed25519","kid":..,
/// "x":..}]}`). Keys of other types and curves are skipped; the document must hold at least
/// one Ed25519 key, at most [`MAX_JWKS_KEYS`] keys in all, and no private key.
pub fn parse_jwks(bytes: &[u8]) -> Result<Vec<Ed25519Key>, AuthError> {
    let invalid = |msg: &str| AuthError::InvalidConfig(msg.to_owned());
    let doc = parse_object(bytes, "JWKS").map_err(|e| AuthError::InvalidConfig(e.to_string()))?;
    let Some(Value::Array(entries)) = doc.get("keys") else {
        return Err(invalid("no \"keys\" array"));
    };
    if entries.len() > MAX_JWKS_KEYS {
        return Err(AuthError::InvalidConfig(format!(
            "{} keys, over the {MAX_JWKS_KEYS}-key limit",
            entries.len()
        )));
    }
    let mut keys = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let Value::Object(jwk) = entry else {
            return Err(AuthError::InvalidConfig(format!(
                "key #{index} is not an object"
            )));
        };
        if jwk.contains_key("d") {
            return Err(AuthError::InvalidConfig(format!(
                "key #{index} carries a private key (\"d\"); publish public keys only"
            )));
        }
        let text = |name: &str| jwk.get(name).and_then(Value::as_str);
        if text("kty") != Some("OKP") || text("crv") != Some("Ed25519") {
            continue;
        }
        if let Some(usage) = text("use")
            && usage != "sig"
        {
            continue;
        }
        let x = text("x")
            .ok_or_else(|| AuthError::InvalidConfig(format!("key #{index} has no \"x\"")))?;
        let public_key: [u8; 32] = URL_SAFE_NO_PAD
            .decode(x)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                AuthError::InvalidConfig(format!(
                    "key #{index}: \"x\" is not 32 bytes of unpadded base64url"
                ))
            })?;
        let kid = match jwk.get("kid") {
            None => None,
            Some(Value::String(kid)) => Some(kid.clone()),
            Some(_) => {
                return Err(AuthError::InvalidConfig(format!(
                    "key #{index}: \"kid\" must be a string"
                )));
            }
        };
        keys.push(Ed25519Key { kid, public_key });
    }
    if keys.is_empty() {
        return Err(invalid("no Ed25519 (OKP) key"));
    }
    Ok(keys)
}

/// A JWKS document holding these public keys (for tests and tools).
pub fn jwks_json(keys: &[Ed25519Key]) -> String {
    let keys: Vec<Value> = keys
        .iter()
        .map(|k| {
            let mut jwk = serde_json::json!({
                "kty": "OKP",
                "crv": "Ed25519",
                "use": "sig",
                "alg": "EdDSA",
                "x": URL_SAFE_NO_PAD.encode(k.public_key),
            });
            if let (Some(kid), Value::Object(fields)) = (&k.kid, &mut jwk) {
                fields.insert("kid".to_owned(), Value::String(kid.clone()));
            }
            jwk
        })
        .collect();
    serde_json::json!({ "keys": keys }).to_string()
}

/// A token's `aud`: one string or an array of strings.
enum Audience<'a> {
    One(&'a str),
    Many(Vec<&'a str>),
}

impl<'a> Audience<'a> {
    fn from_json(value: &'a Value) -> Result<Audience<'a>, AuthError> {
        let bad = || {
            AuthError::Malformed("claim \"aud\" must be a string or an array of strings".to_owned())
        };
        match value {
            Value::String(s) => Ok(Audience::One(s)),
            Value::Array(items) => items
                .iter()
                .map(|item| item.as_str().ok_or_else(bad))
                .collect::<Result<Vec<_>, _>>()
                .map(Audience::Many),
            _ => Err(bad()),
        }
    }

    fn contains(&self, wanted: &str) -> bool {
        match self {
            Audience::One(s) => *s == wanted,
            Audience::Many(items) => items.contains(&wanted),
        }
    }

    /// Short, escaped rendering for error messages.
    fn describe(&self) -> String {
        const MAX_ITEMS: usize = 4;
        match self {
            Audience::One(s) => echo(s),
            Audience::Many(items) => {
                let mut shown: Vec<String> =
                    items.iter().take(MAX_ITEMS).map(|s| echo(s)).collect();
                if items.len() > MAX_ITEMS {
                    shown.push(format!("… {} more", items.len() - MAX_ITEMS));
                }
                format!("[{}]", shown.join(", "))
            }
        }
    }
}

fn missing(claim: &str) -> AuthError {
    AuthError::Malformed(format!("missing required claim \"{claim}\""))
}

/// A required string claim.
fn required_string<'a>(payload: &'a Map<String, Value>, claim: &str) -> Result<&'a str, AuthError> {
    match payload.get(claim) {
        None => Err(missing(claim)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(AuthError::Malformed(format!(
            "claim \"{claim}\" must be a string"
        ))),
    }
}

/// A required, non-empty string claim.
fn required_non_empty<'a>(
    payload: &'a Map<String, Value>,
    claim: &str,
) -> Result<&'a str, AuthError> {
    let value = required_string(payload, claim)?;
    if value.is_empty() {
        return Err(AuthError::Malformed(format!(
            "claim \"{claim}\" must not be empty"
        )));
    }
    Ok(value)
}

/// An optional NumericDate claim; we accept only non-negative integers.
fn optional_time(payload: &Map<String, Value>, claim: &str) -> Result<Option<u64>, AuthError> {
    match payload.get(claim) {
        None => Ok(None),
        Some(value) => value.as_u64().map(Some).ok_or_else(|| {
            AuthError::Malformed(format!(
                "claim \"{claim}\" must be a non-negative integer (seconds since the Unix epoch)"
            ))
        }),
    }
}

fn jti(payload: &Map<String, Value>) -> Result<Option<String>, AuthError> {
    match payload.get("jti") {
        None => Ok(None),
        Some(Value::String(jti)) if !jti.is_empty() && jti.len() <= MAX_JTI_BYTES => {
            Ok(Some(jti.clone()))
        }
        Some(_) => Err(AuthError::Malformed(format!(
            "claim \"jti\" must be a non-empty string of at most {MAX_JTI_BYTES} bytes"
        ))),
    }
}

fn roles(payload: &Map<String, Value>) -> Result<Vec<String>, AuthError> {
    let bad = || AuthError::Malformed("claim \"roles\" must be an array of strings".to_owned());
    match payload.get("roles") {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// Decodes one base64url (no padding, canonical) part of the token.
fn decode_part(part: &str, what: &str) -> Result<Vec<u8>, AuthError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AuthError::Malformed(format!("{what} is not unpadded base64url")))
}

/// Parses a JSON object, refusing duplicate members (a classic JWT parser-differential trick).
fn parse_object(bytes: &[u8], what: &str) -> Result<Map<String, Value>, AuthError> {
    // Checked up front so serde never builds an "invalid type" message that quotes the input.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(AuthError::Malformed(format!("{what} is not a JSON object")));
    }
    match serde_json::from_slice::<UniqueObject>(bytes) {
        Ok(UniqueObject(map)) => Ok(map),
        Err(err) if err.is_data() => {
            // Our only data errors are duplicate members (already escaped) and numbers out of
            // range; neither quotes the input beyond a member name.
            Err(AuthError::Malformed(format!("{what} JSON rejected: {err}")))
        }
        Err(err) => Err(AuthError::Malformed(format!(
            "{what} is not valid JSON (error at line {} column {})",
            err.line(),
            err.column()
        ))),
    }
}

/// A top-level JSON object whose member names are unique.
struct UniqueObject(Map<String, Value>);

impl<'de> Deserialize<'de> for UniqueObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(UniqueObjectVisitor)
    }
}

struct UniqueObjectVisitor;

impl<'de> Visitor<'de> for UniqueObjectVisitor {
    type Value = UniqueObject;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<UniqueObject, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate member {}",
                    echo(&key)
                )));
            }
            let value: Value = access.next_value()?;
            map.insert(key, value);
        }
        Ok(UniqueObject(map))
    }
}

/// Quotes, escapes and truncates a string taken from a token for use in an error message.
fn echo(s: &str) -> String {
    let mut chars = s.chars();
    let head: String = chars.by_ref().take(MAX_ECHO_CHARS).collect();
    if chars.next().is_some() {
        format!("{head:?}…")
    } else {
        format!("{head:?}")
    }
}

fn encode_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

fn payload_json(issuer: &str, audience: &str, claims: &Claims) -> Value {
    let mut payload = serde_json::json!({
        "iss": issuer,
        "aud": audience,
        "sub": claims.user,
        "tenant": claims.tenant,
        "roles": claims.roles,
        "iat": claims.issued_at,
        "exp": claims.expires_at,
    });
    if let (Some(jti), Value::Object(fields)) = (&claims.jti, &mut payload) {
        fields.insert("jti".to_owned(), Value::String(jti.clone()));
    }
    payload
}

/// Signs claims with HS256. Used by `tidings token issue` (development) and tests.
///
/// The payload holds `iss`, `aud` (a string), `sub`, `tenant`, `roles`, `iat`, `exp` and,
/// when the claims have one, `jti`.
/// The secret is not length-checked here; a [`Verifier`] requires at least
/// [`MIN_HS256_SECRET_BYTES`].
pub fn issue_hs256(secret: &[u8], issuer: &str, audience: &str, claims: &Claims) -> String {
    let header = serde_json::json!({ "alg": "HS256", "typ": "JWT" });
    let signing_input = format!(
        "{}.{}",
        encode_json(&header),
        encode_json(&payload_json(issuer, audience, claims))
    );
    // HMAC accepts keys of any length (long keys are hashed), so this cannot fail.
    let mut mac =
        HmacSha256::new_from_slice(secret).expect("HMAC-SHA256 accepts keys of any length");
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

/// Signs claims with EdDSA (Ed25519) from a 32-byte secret seed, with an optional `kid`
/// header. For tests and tools. The payload is the same as [`issue_hs256`]'s.
pub fn issue_ed25519(
    seed: &[u8; 32],
    kid: Option<&str>,
    issuer: &str,
    audience: &str,
    claims: &Claims,
) -> String {
    let mut header = serde_json::json!({ "alg": "EdDSA", "typ": "JWT" });
    if let (Some(kid), Value::Object(fields)) = (kid, &mut header) {
        fields.insert("kid".to_owned(), Value::String(kid.to_owned()));
    }
    let signing_input = format!(
        "{}.{}",
        encode_json(&header),
        encode_json(&payload_json(issuer, audience, claims))
    );
    let signature = SigningKey::from_bytes(seed).sign(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.to_bytes())
    )
}

/// A bot token: `bot` (starting with [`BOT_USER_PREFIX`]) of `tenant`, for `audience`,
/// signed with tidings's bot key `seed`, living `lifetime_secs` from `now_secs`, with `jti`
/// so it can be revoked alone.
pub fn issue_bot(
    seed: &[u8; 32],
    audience: &str,
    tenant: &str,
    bot: &str,
    now_secs: u64,
    lifetime_secs: u64,
    jti: &str,
) -> String {
    let claims = Claims {
        tenant: tenant.to_owned(),
        user: bot.to_owned(),
        roles: vec![BOT_ROLE.to_owned()],
        expires_at: now_secs + lifetime_secs,
        issued_at: now_secs,
        jti: Some(jti.to_owned()),
    };
    issue_ed25519(seed, Some(BOT_KID), BOT_ISSUER, audience, &claims)
}

/// The Ed25519 public key of a seed (for configuring a [`Verifier`] in tests).
pub fn ed25519_public_key(seed: &[u8; 32]) -> [u8; 32] {
    SigningKey::from_bytes(seed).verifying_key().to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_quotes_escapes_and_truncates() {
        assert_eq!(echo("abc"), "\"abc\"");
        assert_eq!(echo("a\nb\u{202e}"), "\"a\\nb\\u{202e}\"");
        let long = "x".repeat(200);
        let echoed = echo(&long);
        assert_eq!(echoed, format!("\"{}\"…", "x".repeat(MAX_ECHO_CHARS)));
    }

    #[test]
    fn parse_object_rejects_duplicates_and_non_objects() {
        let err = parse_object(br#"{"alg":"HS256","alg":"none"}"#, "header")
            .expect_err("duplicate alg must be rejected");
        assert!(
            matches!(&err, AuthError::Malformed(m) if m.contains("duplicate member \"alg\"")),
            "{err:?}"
        );
        for input in [&b"[\"HS256\"]"[..], b"\"HS256\"", b"5", b"", b"  ", b"null"] {
            assert_eq!(
                parse_object(input, "header"),
                Err(AuthError::Malformed(
                    "header is not a JSON object".to_owned()
                ))
            );
        }
        let err = parse_object(b"{\"a\":1} trailing", "payload").expect_err("trailing data");
        assert_eq!(err.code(), "malformed");
        let err = parse_object(b"{\"a\":\"\xff\"}", "payload").expect_err("invalid UTF-8");
        assert_eq!(err.code(), "malformed");
        let map = parse_object(br#" {"a":1,"b":[1,2]} "#, "payload").expect("valid object");
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn base64_is_strict() {
        assert!(decode_part("eyJ9", "x").is_ok());
        assert!(decode_part("eyJ9==", "x").is_err(), "padding");
        assert!(decode_part("ey+/", "x").is_err(), "standard alphabet");
        assert_eq!(decode_part("eyI", "x"), Ok(b"{\"".to_vec()));
        assert!(
            decode_part("eyJ", "x").is_err(),
            "non-canonical trailing bits"
        );
        assert!(decode_part("e", "x").is_err(), "impossible length");
    }
}
