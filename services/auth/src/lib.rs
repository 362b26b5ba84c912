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

use std::fmt;

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
    /// `iat`, seconds since the Unix epoch (optional when verifying: 0 if absent).
    pub issued_at: u64,
}

/// What a [`Verifier`] accepts.
#[derive(Clone)]
pub struct AuthConfig {
    /// Required `iss` value (compared exactly).
    pub issuer: String,
    /// Required `aud` value; a token's `aud` may be this string or an array containing it.
    pub audience: String,
    /// Enables HS256 when `Some`; must be at least [`MIN_HS256_SECRET_BYTES`] long.
    pub hs256_secret: Option<Vec<u8>>,
    /// Enables EdDSA when non-empty.
    pub ed25519_public_keys: Vec<Ed25519Key>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
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
            .field("ed25519_public_keys", &self.ed25519_public_keys)
            .field("leeway_secs", &self.leeway_secs)
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
    /// `aud` does not name the configured audience.
    #[error("token audience {0} does not include the configured audience")]
    WrongAudience(String),
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

/// Verifies tokens against one [`AuthConfig`]. Cheap to share (`&self` only).
pub struct Verifier {
    issuer: String,
    audience: String,
    hs256_secret: Option<Vec<u8>>,
    ed25519_keys: Vec<VerifierKey>,
    leeway_secs: u64,
}

/// Hand-written so that logging a verifier never prints the HS256 secret.
impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<Option<&str>> = self.ed25519_keys.iter().map(|k| k.kid.as_deref()).collect();
        f.debug_struct("Verifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("hs256_enabled", &self.hs256_secret.is_some())
            .field("ed25519_kids", &kids)
            .field("leeway_secs", &self.leeway_secs)
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
        if config.hs256_secret.is_none() && config.ed25519_public_keys.is_empty() {
            return invalid(
                "no algorithm enabled: configure an HS256 secret or at least one Ed25519 public key"
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
        let mut ed25519_keys = Vec::with_capacity(config.ed25519_public_keys.len());
        for (index, configured) in config.ed25519_public_keys.iter().enumerate() {
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
            ed25519_keys.push(VerifierKey {
                kid: configured.kid.clone(),
                key,
            });
        }
        Ok(Verifier {
            issuer: config.issuer,
            audience: config.audience,
            hs256_secret: config.hs256_secret,
            ed25519_keys,
            leeway_secs: config.leeway_secs,
        })
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
        match header.alg {
            Algorithm::Hs256 => self.check_hs256(signing_input, &signature)?,
            Algorithm::EdDsa => {
                self.check_eddsa(header.kid.as_deref(), signing_input, &signature)?;
            }
        }

        // Only now, with the signature verified, do we look at the claims.
        let payload = parse_object(&payload_bytes, "payload")?;
        self.check_claims(&payload, now_secs)
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
            "EdDSA" if !self.ed25519_keys.is_empty() => Ok(Algorithm::EdDsa),
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
        let candidates: Vec<&VerifierKey> = match kid {
            None => self.ed25519_keys.iter().collect(),
            Some(kid) => {
                let named: Vec<&VerifierKey> = self
                    .ed25519_keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .collect();
                if named.is_empty() {
                    // Keys configured without a kid accept any token; keys with a kid only
                    // accept tokens naming it.
                    self.ed25519_keys
                        .iter()
                        .filter(|k| k.kid.is_none())
                        .collect()
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

    fn check_claims(
        &self,
        payload: &Map<String, Value>,
        now_secs: u64,
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
        let issued_at = optional_time(payload, "iat")?.unwrap_or(0);
        let roles = roles(payload)?;

        if issuer != self.issuer {
            return Err(AuthError::WrongIssuer(echo(issuer)));
        }
        if !audience.contains(&self.audience) {
            return Err(AuthError::WrongAudience(audience.describe()));
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
        })
    }
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
    serde_json::json!({
        "iss": issuer,
        "aud": audience,
        "sub": claims.user,
        "tenant": claims.tenant,
        "roles": claims.roles,
        "iat": claims.issued_at,
        "exp": claims.expires_at,
    })
}

/// Signs claims with HS256. Used by `tidings token issue` (development) and tests.
///
/// The payload holds `iss`, `aud` (a string), `sub`, `tenant`, `roles`, `iat` and `exp`.
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
