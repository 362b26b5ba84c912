//! Behaviour of `tidings-auth` through its public API: every test asserts the exact outcome.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signer as _, SigningKey};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use tidings_auth::{
    AuthConfig, AuthError, BOT_ISSUER, BOT_KID, Claims, Ed25519Key, Jwks,
    MAX_BOT_TOKEN_LIFETIME_SECS, MAX_JWKS_KEYS, MAX_TOKEN_BYTES, Verifier, ed25519_public_key,
    issue_bot, issue_ed25519, issue_hs256, jwks_json, parse_jwks,
};

const SECRET: &[u8] = b"tidings-dev-secret-0123456789-abcdefgh";
const OTHER_SECRET: &[u8] = b"another-secret-that-is-long-enough-000";
const ISS: &str = "https://auth.tidings.test";
const AUD: &str = "tidings-gateway";
const COMPLIANCE_AUD: &str = "tidings-compliance";
const MAX_LIFETIME: u64 = 24 * 3600;
const NOW: u64 = 1_700_000_000;
const SEED_A: [u8; 32] = [7; 32];
const SEED_B: [u8; 32] = [42; 32];

fn claims() -> Claims {
    Claims {
        tenant: "acme".to_owned(),
        user: "alice".to_owned(),
        roles: vec!["admin".to_owned(), "member".to_owned()],
        expires_at: NOW + 3600,
        issued_at: NOW - 10,
        jti: None,
    }
}

fn config() -> AuthConfig {
    AuthConfig {
        issuer: ISS.to_owned(),
        audience: AUD.to_owned(),
        refused_audiences: vec![COMPLIANCE_AUD.to_owned()],
        hs256_secret: None,
        ed25519_public_keys: Vec::new(),
        jwks: None,
        leeway_secs: 0,
        max_lifetime_secs: MAX_LIFETIME,
    }
}

fn hs_verifier() -> Verifier {
    hs_verifier_with_leeway(0)
}

fn hs_verifier_with_leeway(leeway_secs: u64) -> Verifier {
    Verifier::new(AuthConfig {
        hs256_secret: Some(SECRET.to_vec()),
        leeway_secs,
        ..config()
    })
    .expect("valid HS256 config")
}

fn key(kid: Option<&str>, seed: &[u8; 32]) -> Ed25519Key {
    Ed25519Key {
        kid: kid.map(str::to_owned),
        public_key: ed25519_public_key(seed),
    }
}

fn ed_verifier(keys: Vec<Ed25519Key>) -> Verifier {
    Verifier::new(AuthConfig {
        ed25519_public_keys: keys,
        ..config()
    })
    .expect("valid EdDSA config")
}

fn both_verifier() -> Verifier {
    Verifier::new(AuthConfig {
        hs256_secret: Some(SECRET.to_vec()),
        ed25519_public_keys: vec![key(None, &SEED_A)],
        ..config()
    })
    .expect("valid config with both algorithms")
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs arbitrary header/payload JSON text with HMAC-SHA256 under `secret`.
fn sign_hs(secret: &[u8], header: &str, payload: &str) -> String {
    let input = format!("{}.{}", b64(header), b64(payload));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(input.as_bytes());
    format!("{input}.{}", b64(mac.finalize().into_bytes()))
}

/// Signs arbitrary header/payload JSON text with Ed25519 under `seed`.
fn sign_ed(seed: &[u8; 32], header: &str, payload: &str) -> String {
    let input = format!("{}.{}", b64(header), b64(payload));
    let signature = SigningKey::from_bytes(seed).sign(input.as_bytes());
    format!("{input}.{}", b64(signature.to_bytes()))
}

const HS_HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
const ED_HEADER: &str = r#"{"alg":"EdDSA","typ":"JWT"}"#;

/// A payload with every claim present, plus `extra` members (e.g. `,"nbf":1`).
fn payload_with(extra: &str) -> String {
    format!(
        r#"{{"iss":"{ISS}","aud":"{AUD}","sub":"alice","tenant":"acme","exp":{},"iat":{}{extra}}}"#,
        NOW + 3600,
        NOW - 10
    )
}

/// Asserts an error's Display and Debug leak neither the token (nor its signature) nor a secret.
fn assert_clean(err: &AuthError, token: &str) {
    let rendered = [err.to_string(), format!("{err:?}")];
    let secrets = [SECRET, OTHER_SECRET];
    for text in &rendered {
        if token.len() >= 8 {
            assert!(!text.contains(token), "error leaks the token: {text}");
        }
        if let Some(signature) = token.rsplit('.').next()
            && signature.len() >= 8
        {
            assert!(
                !text.contains(signature),
                "error leaks the signature: {text}"
            );
        }
        for secret in secrets {
            let secret = std::str::from_utf8(secret).expect("test secrets are UTF-8");
            assert!(!text.contains(secret), "error leaks a secret: {text}");
            assert!(!text.contains(&b64(secret)), "error leaks a secret: {text}");
        }
    }
}

/// Verifies, expects an error, checks it is clean, and returns it.
fn reject(verifier: &Verifier, token: &str, now: u64) -> AuthError {
    let err = verifier
        .verify(token, now)
        .expect_err("token should be rejected");
    assert_clean(&err, token);
    err
}

fn malformed(msg: &str) -> AuthError {
    AuthError::Malformed(msg.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

#[test]
fn round_trip_hs256() {
    let token = issue_hs256(SECRET, ISS, AUD, &claims());
    assert_eq!(hs_verifier().verify(&token, NOW), Ok(claims()));
    assert_eq!(both_verifier().verify(&token, NOW), Ok(claims()));
}

#[test]
fn round_trip_eddsa_with_and_without_kid() {
    let with_kid = issue_ed25519(&SEED_A, Some("k1"), ISS, AUD, &claims());
    let without_kid = issue_ed25519(&SEED_A, None, ISS, AUD, &claims());

    let keyed = ed_verifier(vec![key(Some("k0"), &SEED_B), key(Some("k1"), &SEED_A)]);
    assert_eq!(keyed.verify(&with_kid, NOW), Ok(claims()));
    // No kid in the token: every configured key is tried.
    assert_eq!(keyed.verify(&without_kid, NOW), Ok(claims()));

    let unkeyed = ed_verifier(vec![key(None, &SEED_B), key(None, &SEED_A)]);
    assert_eq!(unkeyed.verify(&with_kid, NOW), Ok(claims()));
    assert_eq!(unkeyed.verify(&without_kid, NOW), Ok(claims()));

    assert_eq!(both_verifier().verify(&without_kid, NOW), Ok(claims()));
}

#[test]
fn optional_claims_default() {
    // No roles, no jti; aud as an array; unknown claims ignored.
    let payload = format!(
        r#"{{"iss":"{ISS}","aud":["x","{AUD}"],"sub":"bob","tenant":"t1","exp":{},"iat":{NOW},"extra":{{"a":[1,2]}}}}"#,
        NOW + 1
    );
    let token = sign_hs(SECRET, r#"{"alg":"HS256"}"#, &payload);
    assert_eq!(
        hs_verifier().verify(&token, NOW),
        Ok(Claims {
            tenant: "t1".to_owned(),
            user: "bob".to_owned(),
            roles: Vec::new(),
            expires_at: NOW + 1,
            issued_at: NOW,
            jti: None,
        })
    );
}

#[test]
fn issued_payload_has_the_documented_claims() {
    let token = issue_hs256(SECRET, ISS, AUD, &claims());
    let payload = token.split('.').nth(1).expect("three parts");
    let json: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url"))
            .expect("JSON payload");
    assert_eq!(
        json,
        serde_json::json!({
            "iss": ISS, "aud": AUD, "sub": "alice", "tenant": "acme",
            "roles": ["admin", "member"], "iat": NOW - 10, "exp": NOW + 3600,
        })
    );
    let ed = issue_ed25519(&SEED_A, Some("k1"), ISS, AUD, &claims());
    let header = ed.split('.').next().expect("three parts");
    let json: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).expect("base64url"))
            .expect("JSON header");
    assert_eq!(
        json,
        serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": "k1"})
    );
}

// ---------------------------------------------------------------------------------------------
// Algorithms
// ---------------------------------------------------------------------------------------------

#[test]
fn alg_none_is_rejected() {
    let never =
        AuthError::UnsupportedAlgorithm("\"none\" (unsigned tokens) is never accepted".to_owned());
    let payload = b64(payload_with(""));
    let verifiers = [
        hs_verifier(),
        ed_verifier(vec![key(None, &SEED_A)]),
        both_verifier(),
    ];
    for alg in ["none", "None", "NONE", "nOnE"] {
        for header in [
            format!(r#"{{"alg":"{alg}"}}"#),
            format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#),
        ] {
            let unsigned = format!("{}.{payload}.", b64(&header));
            // Even carrying a valid HS256 MAC over the same input does not help.
            let mac_signed = sign_hs(SECRET, &header, &payload_with(""));
            for verifier in &verifiers {
                assert_eq!(reject(verifier, &unsigned, NOW), never);
                assert_eq!(reject(verifier, &mac_signed, NOW), never);
            }
        }
    }
}

#[test]
fn wrong_algorithm_is_rejected() {
    let ed_only = ed_verifier(vec![key(None, &SEED_A)]);
    let hs_disabled = AuthError::UnsupportedAlgorithm(
        "HS256 is not enabled in this configuration (only EdDSA is)".to_owned(),
    );
    let ed_disabled = AuthError::UnsupportedAlgorithm(
        "EdDSA is not enabled in this configuration (only HS256 is)".to_owned(),
    );

    // An honest HS256 token against an Ed25519-only verifier.
    let hs_token = issue_hs256(SECRET, ISS, AUD, &claims());
    assert_eq!(reject(&ed_only, &hs_token, NOW), hs_disabled);

    // The classic confusion attack: HMAC keyed with the verifier's public key bytes.
    let public = ed25519_public_key(&SEED_A);
    let confused = issue_hs256(&public, ISS, AUD, &claims());
    assert_eq!(reject(&ed_only, &confused, NOW), hs_disabled);
    let confused_with_kid = sign_hs(
        &public,
        r#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#,
        &payload_with(""),
    );
    let ed_only_keyed = ed_verifier(vec![key(Some("k1"), &SEED_A)]);
    assert_eq!(reject(&ed_only_keyed, &confused_with_kid, NOW), hs_disabled);

    // EdDSA against an HS256-only verifier.
    let ed_token = issue_ed25519(&SEED_A, None, ISS, AUD, &claims());
    assert_eq!(reject(&hs_verifier(), &ed_token, NOW), ed_disabled);

    // Unknown algorithms, including case variants of supported ones.
    for alg in ["RS256", "ES256", "HS512", "hs256", "EDDSA", "Ed25519", ""] {
        let token = sign_hs(SECRET, &format!(r#"{{"alg":"{alg}"}}"#), &payload_with(""));
        assert_eq!(
            reject(&both_verifier(), &token, NOW),
            AuthError::UnsupportedAlgorithm(format!(
                "\"{alg}\" is not supported (only HS256 and EdDSA are)"
            ))
        );
    }
}

#[test]
fn header_is_checked() {
    let v = hs_verifier();
    let payload = payload_with("");
    let cases = [
        (r#"{"typ":"JWT"}"#, "header is missing \"alg\""),
        (r#"{"alg":256}"#, "header \"alg\" must be a string"),
        (r#"{"alg":null}"#, "header \"alg\" must be a string"),
        (
            r#"{"alg":"HS256","typ":"JWS"}"#,
            "header \"typ\" is \"JWS\", expected \"JWT\"",
        ),
        (
            r#"{"alg":"HS256","typ":1}"#,
            "header \"typ\" must be a string",
        ),
        (
            r#"{"alg":"HS256","kid":7}"#,
            "header \"kid\" must be a string",
        ),
        (
            r#"{"alg":"HS256","crit":["exp"],"exp":1}"#,
            "header has a \"crit\" parameter; no critical extensions are supported",
        ),
        (r#"["HS256"]"#, "header is not a JSON object"),
        ("", "header is not a JSON object"),
    ];
    for (header, expected) in cases {
        let token = sign_hs(SECRET, header, &payload);
        assert_eq!(reject(&v, &token, NOW), malformed(expected), "{header}");
    }
    // Duplicate "alg": a parser that keeps the first and one that keeps the last disagree.
    let token = sign_hs(SECRET, r#"{"alg":"HS256","alg":"none"}"#, &payload);
    let err = reject(&v, &token, NOW);
    assert!(
        matches!(&err, AuthError::Malformed(m) if m.starts_with("header JSON rejected: duplicate member \"alg\"")),
        "{err:?}"
    );
    // Key-carrying headers are ignored: the configured secret still decides.
    let token = sign_hs(
        SECRET,
        r#"{"alg":"HS256","jwk":{"kty":"oct","k":"AAAA"},"jku":"https://evil.test"}"#,
        &payload,
    );
    assert!(v.verify(&token, NOW).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Signatures
// ---------------------------------------------------------------------------------------------

/// Replaces the character at `index` with a different base64url character.
fn flip_char(token: &str, index: usize) -> String {
    let mut bytes = token.as_bytes().to_vec();
    bytes[index] = if bytes[index] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).expect("ASCII token")
}

#[test]
fn bad_signatures_are_rejected() {
    let hs = hs_verifier();
    let ed = ed_verifier(vec![key(Some("k1"), &SEED_A)]);
    let hs_token = issue_hs256(SECRET, ISS, AUD, &claims());
    let ed_token = issue_ed25519(&SEED_A, Some("k1"), ISS, AUD, &claims());

    for (verifier, token) in [(&hs, &hs_token), (&ed, &ed_token)] {
        let sig_start = token.rfind('.').expect("three parts") + 1;
        // Flip a character in the middle of the signature (not the last one, whose low bits
        // may be non-canonical base64 and be reported as malformed instead).
        let middle = sig_start + (token.len() - sig_start) / 2;
        assert_eq!(
            reject(verifier, &flip_char(token, middle), NOW),
            AuthError::BadSignature
        );
        assert_eq!(
            reject(verifier, &flip_char(token, sig_start), NOW),
            AuthError::BadSignature
        );
        // Empty and shortened signatures.
        assert_eq!(
            reject(verifier, &token[..sig_start], NOW),
            AuthError::BadSignature
        );
        assert_eq!(
            // 40 characters: a canonical base64url encoding of 30 bytes.
            reject(verifier, &token[..sig_start + 40], NOW),
            AuthError::BadSignature
        );
        // A flipped payload character.
        assert_eq!(
            reject(
                verifier,
                &flip_char(token, token.find('.').expect("dot") + 5),
                NOW
            ),
            AuthError::BadSignature
        );
    }

    // Signed with another secret / another key.
    let other = issue_hs256(OTHER_SECRET, ISS, AUD, &claims());
    assert_eq!(reject(&hs, &other, NOW), AuthError::BadSignature);
    let other_ed = issue_ed25519(&SEED_B, Some("k1"), ISS, AUD, &claims());
    assert_eq!(reject(&ed, &other_ed, NOW), AuthError::BadSignature);
    let other_ed_no_kid = issue_ed25519(&SEED_B, None, ISS, AUD, &claims());
    assert_eq!(reject(&ed, &other_ed_no_kid, NOW), AuthError::BadSignature);

    // Payload swapped between two validly signed tokens.
    let mallory = Claims {
        user: "mallory".to_owned(),
        roles: vec!["admin".to_owned()],
        ..claims()
    };
    for (verifier, a, b) in [
        (
            &hs,
            issue_hs256(SECRET, ISS, AUD, &claims()),
            issue_hs256(SECRET, ISS, AUD, &mallory),
        ),
        (
            &ed,
            issue_ed25519(&SEED_A, Some("k1"), ISS, AUD, &claims()),
            issue_ed25519(&SEED_A, Some("k1"), ISS, AUD, &mallory),
        ),
    ] {
        let a_parts: Vec<&str> = a.split('.').collect();
        let b_parts: Vec<&str> = b.split('.').collect();
        let swapped = format!("{}.{}.{}", a_parts[0], b_parts[1], a_parts[2]);
        assert_eq!(reject(verifier, &swapped, NOW), AuthError::BadSignature);
    }
}

#[test]
fn signature_is_checked_before_claims() {
    // Garbage claims with a wrong signature must say "bad signature", not "malformed"/"expired".
    let hs = hs_verifier();
    for payload in [
        r#"{"exp":1}"#.to_owned(),
        r#"{}"#.to_owned(),
        "not json".to_owned(),
        format!(r#"{{"iss":"evil","aud":"{AUD}","sub":"a","tenant":"b","exp":1}}"#),
    ] {
        let token = sign_hs(OTHER_SECRET, HS_HEADER, &payload);
        assert_eq!(
            reject(&hs, &token, NOW),
            AuthError::BadSignature,
            "{payload}"
        );
    }
    let ed = ed_verifier(vec![key(None, &SEED_A)]);
    let token = sign_ed(&SEED_B, ED_HEADER, "[]");
    assert_eq!(reject(&ed, &token, NOW), AuthError::BadSignature);
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_kid_is_rejected() {
    let ed = ed_verifier(vec![key(Some("k1"), &SEED_A), key(Some("k2"), &SEED_B)]);
    let token = issue_ed25519(&SEED_A, Some("k3"), ISS, AUD, &claims());
    assert_eq!(
        reject(&ed, &token, NOW),
        AuthError::UnknownKey("\"k3\"".to_owned())
    );
    // A hostile kid is escaped and truncated in the message.
    let hostile = format!("evil\n{}", "x".repeat(500));
    let token = issue_ed25519(&SEED_A, Some(&hostile), ISS, AUD, &claims());
    let err = reject(&ed, &token, NOW);
    assert_eq!(
        err,
        AuthError::UnknownKey(format!("\"evil\\n{}\"…", "x".repeat(59)))
    );
    assert!(!err.to_string().contains('\n'));

    // A known kid, but signed by the other key.
    let token = issue_ed25519(&SEED_B, Some("k1"), ISS, AUD, &claims());
    assert_eq!(reject(&ed, &token, NOW), AuthError::BadSignature);

    // Keys configured without a kid accept tokens naming any kid.
    let mixed = ed_verifier(vec![key(Some("k1"), &SEED_B), key(None, &SEED_A)]);
    let token = issue_ed25519(&SEED_A, Some("rotated"), ISS, AUD, &claims());
    assert_eq!(mixed.verify(&token, NOW), Ok(claims()));
}

#[test]
fn invalid_configs_are_rejected() {
    let invalid = |cfg: AuthConfig| match Verifier::new(cfg) {
        Err(err) => {
            assert_eq!(err.code(), "invalid_config");
            assert_clean(&err, "");
            err
        }
        Ok(_) => panic!("config should be rejected"),
    };

    // Secret shorter than 32 bytes (31), and exactly 32 is fine.
    let short = SECRET[..31].to_vec();
    assert_eq!(
        invalid(AuthConfig {
            hs256_secret: Some(short.clone()),
            ..config()
        }),
        AuthError::InvalidConfig(
            "HS256 secret is too short (31 bytes; at least 32 required)".to_owned()
        )
    );
    let err = invalid(AuthConfig {
        hs256_secret: Some(short.clone()),
        ..config()
    });
    let short_text = std::str::from_utf8(&short).expect("UTF-8");
    assert!(!err.to_string().contains(short_text));
    assert!(
        Verifier::new(AuthConfig {
            hs256_secret: Some(SECRET[..32].to_vec()),
            ..config()
        })
        .is_ok()
    );

    assert_eq!(
        invalid(config()),
        AuthError::InvalidConfig(
            "no algorithm enabled: configure an HS256 secret, an Ed25519 public key or a JWKS file"
                .to_owned()
        )
    );

    // y = 2 is not the y-coordinate of any point on edwards25519.
    let mut not_a_point = [0u8; 32];
    not_a_point[0] = 2;
    assert_eq!(
        invalid(AuthConfig {
            ed25519_public_keys: vec![
                key(None, &SEED_A),
                Ed25519Key {
                    kid: Some("bad".to_owned()),
                    public_key: not_a_point,
                },
            ],
            ..config()
        }),
        AuthError::InvalidConfig(
            "Ed25519 public key #1 (kid \"bad\") is not a valid Ed25519 point".to_owned()
        )
    );

    // The identity point is valid but of small order: it would make forgery trivial.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    assert_eq!(
        invalid(AuthConfig {
            ed25519_public_keys: vec![Ed25519Key {
                kid: None,
                public_key: identity,
            }],
            ..config()
        }),
        AuthError::InvalidConfig(
            "Ed25519 public key #0 is a weak (small-order) Ed25519 point".to_owned()
        )
    );

    assert_eq!(
        invalid(AuthConfig {
            ed25519_public_keys: vec![key(Some(""), &SEED_A)],
            ..config()
        }),
        AuthError::InvalidConfig(
            "Ed25519 public key #0 (kid \"\"): kid must not be empty (omit it instead)".to_owned()
        )
    );

    let public = ed25519_public_key(&SEED_A);
    assert_eq!(
        invalid(AuthConfig {
            hs256_secret: Some(public.to_vec()),
            ed25519_public_keys: vec![key(None, &SEED_A)],
            ..config()
        }),
        AuthError::InvalidConfig(
            "HS256 secret must not be the bytes of a configured Ed25519 public key".to_owned()
        )
    );

    assert_eq!(
        invalid(AuthConfig {
            issuer: String::new(),
            hs256_secret: Some(SECRET.to_vec()),
            ..config()
        }),
        AuthError::InvalidConfig("issuer must not be empty".to_owned())
    );
    assert_eq!(
        invalid(AuthConfig {
            audience: String::new(),
            hs256_secret: Some(SECRET.to_vec()),
            ..config()
        }),
        AuthError::InvalidConfig("audience must not be empty".to_owned())
    );
}

#[test]
fn debug_output_redacts_the_secret() {
    let cfg = AuthConfig {
        hs256_secret: Some(SECRET.to_vec()),
        ..config()
    };
    let secret = std::str::from_utf8(SECRET).expect("UTF-8");
    let cfg_debug = format!("{cfg:?}");
    assert!(!cfg_debug.contains(secret), "{cfg_debug}");
    assert!(!cfg_debug.contains("116, 105"), "secret bytes: {cfg_debug}");
    assert!(cfg_debug.contains("<redacted>"), "{cfg_debug}");
    let verifier_debug = format!("{:?}", Verifier::new(cfg).expect("valid"));
    assert!(!verifier_debug.contains(secret), "{verifier_debug}");
    assert!(!verifier_debug.contains("116, 105"), "{verifier_debug}");
}

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------

#[test]
fn expiry_and_leeway() {
    let expiring = |exp: u64| {
        issue_hs256(
            SECRET,
            ISS,
            AUD,
            &Claims {
                expires_at: exp,
                issued_at: exp.saturating_sub(10),
                ..claims()
            },
        )
    };
    let strict = hs_verifier();
    assert_eq!(
        reject(&strict, &expiring(NOW - 1), NOW),
        AuthError::Expired {
            expired_at: NOW - 1
        }
    );
    // Valid through the exp second itself.
    assert!(strict.verify(&expiring(NOW), NOW).is_ok());

    let lenient = hs_verifier_with_leeway(60);
    assert!(lenient.verify(&expiring(NOW - 60), NOW).is_ok());
    assert_eq!(
        reject(&lenient, &expiring(NOW - 61), NOW),
        AuthError::Expired {
            expired_at: NOW - 61
        }
    );
    // No overflow at the end of time.
    assert!(
        hs_verifier_with_leeway(u64::MAX)
            .verify(&expiring(u64::MAX), u64::MAX)
            .is_ok()
    );
    assert_eq!(
        AuthError::Expired { expired_at: 5 }.to_string(),
        "token expired at 5 (Unix seconds)"
    );
}

#[test]
fn not_before_in_the_future() {
    let token = sign_hs(
        SECRET,
        HS_HEADER,
        &payload_with(&format!(r#","nbf":{}"#, NOW + 100)),
    );
    assert_eq!(
        reject(&hs_verifier(), &token, NOW),
        AuthError::NotYetValid {
            not_before: NOW + 100
        }
    );
    assert_eq!(
        reject(&hs_verifier_with_leeway(99), &token, NOW),
        AuthError::NotYetValid {
            not_before: NOW + 100
        }
    );
    assert!(hs_verifier_with_leeway(100).verify(&token, NOW).is_ok());
    assert!(hs_verifier().verify(&token, NOW + 100).is_ok());
    let now_nbf = sign_hs(
        SECRET,
        HS_HEADER,
        &payload_with(&format!(r#","nbf":{NOW}"#)),
    );
    assert!(hs_verifier().verify(&now_nbf, NOW).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Issuer and audience
// ---------------------------------------------------------------------------------------------

#[test]
fn wrong_issuer() {
    let token = issue_hs256(SECRET, "https://evil.test", AUD, &claims());
    assert_eq!(
        reject(&hs_verifier(), &token, NOW),
        AuthError::WrongIssuer("\"https://evil.test\"".to_owned())
    );
    // Exact comparison: no trailing slash, no case folding.
    for iss in [format!("{ISS}/"), ISS.to_uppercase(), String::new()] {
        let token = issue_hs256(SECRET, &iss, AUD, &claims());
        assert_eq!(
            reject(&hs_verifier(), &token, NOW),
            AuthError::WrongIssuer(format!("{iss:?}"))
        );
    }
    assert_eq!(
        AuthError::WrongIssuer("\"x\"".to_owned()).to_string(),
        "token issuer \"x\" is not the configured issuer"
    );
}

#[test]
fn wrong_audience() {
    let v = hs_verifier();
    let token = issue_hs256(SECRET, ISS, "other-service", &claims());
    assert_eq!(
        reject(&v, &token, NOW),
        AuthError::WrongAudience("\"other-service\"".to_owned())
    );

    let aud_payload = |aud: &str| {
        format!(
            r#"{{"iss":"{ISS}","aud":{aud},"sub":"alice","tenant":"acme","exp":{},"iat":{NOW}}}"#,
            NOW + 60
        )
    };
    let token = sign_hs(SECRET, HS_HEADER, &aud_payload(r#"["a","b"]"#));
    assert_eq!(
        reject(&v, &token, NOW),
        AuthError::WrongAudience("[\"a\", \"b\"]".to_owned())
    );
    let token = sign_hs(SECRET, HS_HEADER, &aud_payload("[]"));
    assert_eq!(
        reject(&v, &token, NOW),
        AuthError::WrongAudience("[]".to_owned())
    );
    let token = sign_hs(
        SECRET,
        HS_HEADER,
        &aud_payload(r#"["1","2","3","4","5","6"]"#),
    );
    assert_eq!(
        reject(&v, &token, NOW),
        AuthError::WrongAudience("[\"1\", \"2\", \"3\", \"4\", … 2 more]".to_owned())
    );

    // An array containing the audience passes.
    let token = sign_hs(
        SECRET,
        HS_HEADER,
        &aud_payload(&format!(r#"["a","{AUD}"]"#)),
    );
    assert!(v.verify(&token, NOW).is_ok());
    let token = sign_hs(SECRET, HS_HEADER, &aud_payload(&format!(r#"["{AUD}"]"#)));
    assert!(v.verify(&token, NOW).is_ok());

    // Wrong types.
    for aud in ["5", "null", r#"["a",5]"#, r#"{"aud":"x"}"#] {
        let token = sign_hs(SECRET, HS_HEADER, &aud_payload(aud));
        assert_eq!(
            reject(&v, &token, NOW),
            malformed("claim \"aud\" must be a string or an array of strings"),
            "{aud}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Claim shapes
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_and_mistyped_claims_are_malformed() {
    let v = hs_verifier();
    let full = serde_json::json!({
        "iss": ISS, "aud": AUD, "sub": "alice", "tenant": "acme",
        "roles": ["r"], "iat": NOW, "exp": NOW + 60,
    });
    let token_without = |claim: &str| {
        let mut payload = full.clone();
        payload
            .as_object_mut()
            .expect("object")
            .remove(claim)
            .expect("claim present");
        sign_hs(SECRET, HS_HEADER, &payload.to_string())
    };
    for claim in ["sub", "tenant", "exp", "iat", "iss", "aud"] {
        assert_eq!(
            reject(&v, &token_without(claim), NOW),
            malformed(&format!("missing required claim \"{claim}\"")),
        );
    }

    let token_with = |claim: &str, value: serde_json::Value| {
        let mut payload = full.clone();
        payload
            .as_object_mut()
            .expect("object")
            .insert(claim.to_owned(), value);
        sign_hs(SECRET, HS_HEADER, &payload.to_string())
    };
    use serde_json::json;
    let cases = [
        ("sub", json!(""), "claim \"sub\" must not be empty"),
        ("tenant", json!(""), "claim \"tenant\" must not be empty"),
        ("sub", json!(17), "claim \"sub\" must be a string"),
        ("tenant", json!(null), "claim \"tenant\" must be a string"),
        ("iss", json!(["x"]), "claim \"iss\" must be a string"),
        (
            "exp",
            json!("1700000000"),
            "claim \"exp\" must be a non-negative integer (seconds since the Unix epoch)",
        ),
        (
            "exp",
            json!(-1),
            "claim \"exp\" must be a non-negative integer (seconds since the Unix epoch)",
        ),
        (
            "exp",
            json!(1.5),
            "claim \"exp\" must be a non-negative integer (seconds since the Unix epoch)",
        ),
        (
            "nbf",
            json!(true),
            "claim \"nbf\" must be a non-negative integer (seconds since the Unix epoch)",
        ),
        (
            "iat",
            json!(null),
            "claim \"iat\" must be a non-negative integer (seconds since the Unix epoch)",
        ),
        (
            "roles",
            json!("admin"),
            "claim \"roles\" must be an array of strings",
        ),
        (
            "roles",
            json!(["a", 1]),
            "claim \"roles\" must be an array of strings",
        ),
        (
            "roles",
            json!(null),
            "claim \"roles\" must be an array of strings",
        ),
        (
            "jti",
            json!(""),
            "claim \"jti\" must be a non-empty string of at most 128 bytes",
        ),
        (
            "jti",
            json!("j".repeat(129)),
            "claim \"jti\" must be a non-empty string of at most 128 bytes",
        ),
        (
            "jti",
            json!(7),
            "claim \"jti\" must be a non-empty string of at most 128 bytes",
        ),
        (
            "exp",
            json!(NOW - 1),
            "claim \"exp\" is before claim \"iat\"",
        ),
    ];
    for (claim, value, expected) in cases {
        assert_eq!(
            reject(&v, &token_with(claim, value.clone()), NOW),
            malformed(expected),
            "{claim} = {value}"
        );
    }

    // Duplicate claims are refused rather than resolved one way or the other.
    let payload = payload_with(r#","sub":"root""#);
    let token = sign_hs(SECRET, HS_HEADER, &payload);
    let err = reject(&v, &token, NOW);
    assert!(
        matches!(&err, AuthError::Malformed(m) if m.starts_with("payload JSON rejected: duplicate member \"sub\"")),
        "{err:?}"
    );

    // Payloads that are not JSON objects.
    for payload in ["[]", "\"x\"", "", "{", "{\"sub\":\"a\"} x"] {
        let token = sign_hs(SECRET, HS_HEADER, payload);
        assert_eq!(reject(&v, &token, NOW).code(), "malformed", "{payload:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Size, shape and garbage
// ---------------------------------------------------------------------------------------------

fn token_with_roles(n: usize) -> String {
    let many = Claims {
        roles: (0..n).map(|i| format!("role-{i:05}")).collect(),
        ..claims()
    };
    issue_hs256(SECRET, ISS, AUD, &many)
}

#[test]
fn oversize_tokens_are_malformed() {
    let v = hs_verifier();
    // Find the largest role list that still fits, then add one.
    let mut n = 0;
    while token_with_roles(n + 1).len() <= MAX_TOKEN_BYTES {
        n += 1;
    }
    let fits = token_with_roles(n);
    assert!(fits.len() <= MAX_TOKEN_BYTES);
    assert_eq!(v.verify(&fits, NOW).map(|c| c.roles.len()), Ok(n));

    let too_big = token_with_roles(n + 1);
    assert_eq!(
        reject(&v, &too_big, NOW),
        malformed(&format!(
            "token is {} bytes, over the 8192-byte limit",
            too_big.len()
        ))
    );
    let huge = "a".repeat(10 * 1024 * 1024);
    assert_eq!(
        reject(&v, &huge, NOW),
        malformed("token is 10485760 bytes, over the 8192-byte limit")
    );
}

#[test]
fn wrong_number_of_parts_is_malformed() {
    let v = hs_verifier();
    let token = issue_hs256(SECRET, ISS, AUD, &claims());
    let parts: Vec<&str> = token.split('.').collect();
    let cases = [
        (String::new(), 1),
        (parts[0].to_owned(), 1),
        (format!("{}.{}", parts[0], parts[1]), 2),
        (format!("{token}.{}", parts[2]), 4),
        (format!("{token}."), 4),
        ("....".to_owned(), 5),
    ];
    for (input, count) in cases {
        assert_eq!(
            reject(&v, &input, NOW),
            malformed(&format!(
                "token has {count} dot-separated parts; a JWT has exactly 3"
            )),
            "{input}"
        );
    }
    // Three parts, but not base64url.
    let cases = [
        (format!("{}=.{}.{}", parts[0], parts[1], parts[2]), "header"),
        (
            format!("{}.{}==.{}", parts[0], parts[1], parts[2]),
            "payload",
        ),
        (
            format!("{}.{}.{}+", parts[0], parts[1], parts[2]),
            "signature",
        ),
        (format!(" {token}"), "header"),
        (format!("{token}\n"), "signature"),
        ("..".to_owned(), "header"),
    ];
    for (input, part) in cases {
        let err = reject(&v, &input, NOW);
        if part == "header" && input == ".." {
            // An empty header decodes to nothing, which is not a JSON object.
            assert_eq!(err, malformed("header is not a JSON object"));
        } else {
            assert_eq!(
                err,
                malformed(&format!("{part} is not unpadded base64url")),
                "{input}"
            );
        }
    }
}

/// A tiny deterministic PRNG (xorshift64*), so the fuzz-ish tests need no extra crates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn garbage_never_panics() {
    let verifiers = [
        hs_verifier(),
        ed_verifier(vec![key(Some("k1"), &SEED_A), key(None, &SEED_B)]),
        both_verifier(),
    ];
    let check = |input: &str| {
        for v in &verifiers {
            if let Err(err) = v.verify(input, NOW) {
                assert_clean(&err, input);
            }
        }
    };
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);

    // Random bytes, forced through lossy UTF-8 (the verifier takes &str).
    for _ in 0..2_000 {
        let len = rng.below(300);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        check(&String::from_utf8_lossy(&bytes));
    }
    // Random strings over the base64url alphabet plus '.', '=' and a few odd characters.
    let alphabet: Vec<char> =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_..=+/ é\u{0}\u{feff}"
            .chars()
            .collect();
    for _ in 0..2_000 {
        let len = rng.below(200);
        let s: String = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();
        check(&s);
    }
    // Three random base64url parts decoding to random bytes (non-UTF-8 JSON included).
    for _ in 0..2_000 {
        let part = |rng: &mut Rng| {
            let len = rng.below(80);
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            b64(bytes)
        };
        let s = format!("{}.{}.{}", part(&mut rng), part(&mut rng), part(&mut rng));
        check(&s);
    }

    // Truncations and single-character mutations of valid tokens never verify.
    let tokens = [
        issue_hs256(SECRET, ISS, AUD, &claims()),
        issue_ed25519(&SEED_A, Some("k1"), ISS, AUD, &claims()),
        issue_ed25519(&SEED_B, None, ISS, AUD, &claims()),
    ];
    for token in &tokens {
        for end in 0..token.len() {
            for v in &verifiers {
                let err = v
                    .verify(&token[..end], NOW)
                    .expect_err("a truncated token must not verify");
                assert_clean(&err, &token[..end]);
            }
        }
        for index in 0..token.len() {
            for replacement in ['A', '_', '.', '=', 'é'] {
                let mut mutated: String = token[..index].to_owned();
                mutated.push(replacement);
                mutated.push_str(&token[index + 1..]);
                if mutated == *token {
                    continue;
                }
                for v in &verifiers {
                    if let Ok(claims) = v.verify(&mutated, NOW) {
                        panic!("mutation at {index} to {replacement:?} verified: {claims:?}");
                    }
                }
            }
        }
    }

    // Non-UTF-8 JSON, deep nesting and huge numbers in validly signed tokens.
    let deep = format!(
        r#"{{"alg":"HS256","x":{}1{}}}"#,
        "[".repeat(4000),
        "]".repeat(4000)
    );
    let cases: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (
            b"{\"alg\":\"HS\xff256\"}".to_vec(),
            payload_with("").into_bytes(),
        ),
        (
            HS_HEADER.as_bytes().to_vec(),
            b"{\"sub\":\"\xc3\x28\"}".to_vec(),
        ),
        (deep.clone().into_bytes(), payload_with("").into_bytes()),
        (
            HS_HEADER.as_bytes().to_vec(),
            payload_with(r#","x":1e999"#).into_bytes(),
        ),
        (
            HS_HEADER.as_bytes().to_vec(),
            payload_with(r#","nbf":184467440737095516160"#).into_bytes(),
        ),
    ];
    for (header, payload) in cases {
        let input = format!("{}.{}", b64(&header), b64(&payload));
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).expect("any key length");
        mac.update(input.as_bytes());
        let token = format!("{input}.{}", b64(mac.finalize().into_bytes()));
        let err = reject(&hs_verifier(), &token, NOW);
        assert_eq!(err.code(), "malformed", "{err}");
    }
}

#[test]
fn errors_never_contain_the_token_or_secret() {
    // A token whose every string claim is long: messages must still not quote the token.
    let long = "s".repeat(1000);
    let hostile = Claims {
        tenant: long.clone(),
        user: long.clone(),
        ..claims()
    };
    let v = hs_verifier();
    let tokens = [
        issue_hs256(SECRET, &long, AUD, &hostile),
        issue_hs256(SECRET, ISS, &long, &hostile),
        issue_hs256(OTHER_SECRET, ISS, AUD, &hostile),
        issue_hs256(
            SECRET,
            ISS,
            AUD,
            &Claims {
                expires_at: 1,
                ..hostile.clone()
            },
        ),
        sign_hs(SECRET, &format!(r#"{{"alg":"{long}"}}"#), &payload_with("")),
        sign_hs(
            SECRET,
            &format!(r#"{{"alg":"HS256","typ":"{long}"}}"#),
            &payload_with(""),
        ),
    ];
    for token in &tokens {
        let err = reject(&v, token, NOW);
        let text = err.to_string();
        assert!(text.len() < 200, "message too long: {text}");
        assert!(!text.contains(&long), "{text}");
    }
    // A secret-bearing verifier's rejection of a token signed with that secret's sibling.
    let err = reject(&v, &issue_hs256(OTHER_SECRET, ISS, AUD, &claims()), NOW);
    assert_eq!(err.to_string(), "token signature is invalid");
}

#[test]
fn error_codes_are_stable() {
    let cases = [
        (AuthError::Malformed(String::new()), "malformed"),
        (
            AuthError::UnsupportedAlgorithm(String::new()),
            "unsupported_algorithm",
        ),
        (AuthError::BadSignature, "bad_signature"),
        (AuthError::UnknownKey(String::new()), "unknown_key"),
        (AuthError::Expired { expired_at: 0 }, "expired"),
        (AuthError::NotYetValid { not_before: 0 }, "not_yet_valid"),
        (AuthError::WrongIssuer(String::new()), "wrong_issuer"),
        (AuthError::WrongAudience(String::new()), "wrong_audience"),
        (
            AuthError::LifetimeTooLong {
                lifetime_secs: 0,
                max_secs: 0,
            },
            "lifetime_too_long",
        ),
        (
            AuthError::IssuedInFuture { issued_at: 0 },
            "issued_in_future",
        ),
        (AuthError::Revoked, "revoked"),
        (AuthError::InvalidConfig(String::new()), "invalid_config"),
    ];
    for (err, code) in cases {
        assert_eq!(err.code(), code);
    }
}

// ---------------------------------------------------------------------------------------------
// Token rules of issue 11: HS256 explicit, audiences, lifetime, iat, jti, JWKS reload
// ---------------------------------------------------------------------------------------------

#[test]
fn hs256_tokens_are_refused_when_no_secret_is_configured() {
    // What `auth.hs256_enabled = false` produces: an EdDSA-only verifier, whatever files exist.
    let ed_only = ed_verifier(vec![key(None, &SEED_A)]);
    assert!(!ed_only.hs256_enabled());
    let token = issue_hs256(SECRET, ISS, AUD, &claims());
    assert_eq!(
        reject(&ed_only, &token, NOW),
        AuthError::UnsupportedAlgorithm(
            "HS256 is not enabled in this configuration (only EdDSA is)".to_owned()
        )
    );
    assert!(hs_verifier().hs256_enabled());
}

fn compliance_verifier() -> Verifier {
    Verifier::new(AuthConfig {
        audience: COMPLIANCE_AUD.to_owned(),
        refused_audiences: vec![AUD.to_owned()],
        hs256_secret: Some(SECRET.to_vec()),
        ..config()
    })
    .expect("valid compliance config")
}

#[test]
fn chat_and_compliance_audiences_are_separate() {
    let chat = hs_verifier();
    let compliance = compliance_verifier();
    let chat_token = issue_hs256(SECRET, ISS, AUD, &claims());
    let compliance_token = issue_hs256(SECRET, ISS, COMPLIANCE_AUD, &claims());
    assert_eq!(chat.verify(&chat_token, NOW), Ok(claims()));
    assert_eq!(compliance.verify(&compliance_token, NOW), Ok(claims()));
    assert_eq!(
        reject(&chat, &compliance_token, NOW),
        AuthError::WrongAudience(format!("{COMPLIANCE_AUD:?}"))
    );
    assert_eq!(
        reject(&compliance, &chat_token, NOW),
        AuthError::WrongAudience(format!("{AUD:?}"))
    );
    // A token naming both planes is refused by both.
    let payload = format!(
        r#"{{"iss":"{ISS}","aud":["{AUD}","{COMPLIANCE_AUD}"],"sub":"a","tenant":"t","exp":{},"iat":{NOW}}}"#,
        NOW + 60
    );
    let both = sign_hs(SECRET, HS_HEADER, &payload);
    for verifier in [&chat, &compliance] {
        assert_eq!(reject(verifier, &both, NOW).code(), "wrong_audience");
    }
    // A configuration cannot require an audience it refuses.
    let err = Verifier::new(AuthConfig {
        refused_audiences: vec![AUD.to_owned()],
        hs256_secret: Some(SECRET.to_vec()),
        ..config()
    })
    .expect_err("audience refused by its own verifier");
    assert_eq!(err.code(), "invalid_config");
}

#[test]
fn lifetime_is_bounded() {
    let v = hs_verifier();
    let living = |lifetime: u64| {
        issue_hs256(
            SECRET,
            ISS,
            AUD,
            &Claims {
                issued_at: NOW - 10,
                expires_at: NOW - 10 + lifetime,
                ..claims()
            },
        )
    };
    assert!(v.verify(&living(MAX_LIFETIME), NOW).is_ok());
    assert_eq!(
        reject(&v, &living(MAX_LIFETIME + 1), NOW),
        AuthError::LifetimeTooLong {
            lifetime_secs: MAX_LIFETIME + 1,
            max_secs: MAX_LIFETIME
        }
    );
    // A century-long token is refused however valid its signature.
    assert_eq!(
        reject(&v, &living(100 * 365 * 86_400), NOW).code(),
        "lifetime_too_long"
    );
    let err = Verifier::new(AuthConfig {
        max_lifetime_secs: 0,
        hs256_secret: Some(SECRET.to_vec()),
        ..config()
    })
    .expect_err("zero lifetime");
    assert_eq!(err.code(), "invalid_config");
}

#[test]
fn iat_may_not_be_in_the_future_beyond_the_leeway() {
    let issued = |iat: u64| {
        issue_hs256(
            SECRET,
            ISS,
            AUD,
            &Claims {
                issued_at: iat,
                expires_at: iat + 60,
                ..claims()
            },
        )
    };
    assert!(hs_verifier().verify(&issued(NOW), NOW).is_ok());
    assert_eq!(
        reject(&hs_verifier(), &issued(NOW + 1), NOW),
        AuthError::IssuedInFuture { issued_at: NOW + 1 }
    );
    let lenient = hs_verifier_with_leeway(30);
    assert!(lenient.verify(&issued(NOW + 30), NOW).is_ok());
    assert_eq!(
        reject(&lenient, &issued(NOW + 31), NOW),
        AuthError::IssuedInFuture {
            issued_at: NOW + 31
        }
    );
}

#[test]
fn jti_round_trips() {
    let named = Claims {
        jti: Some("0193a5c2-7b7e-7000-8000-000000000001".to_owned()),
        ..claims()
    };
    let token = issue_hs256(SECRET, ISS, AUD, &named);
    assert_eq!(hs_verifier().verify(&token, NOW), Ok(named.clone()));
    let token = issue_ed25519(&SEED_A, None, ISS, AUD, &named);
    assert_eq!(
        ed_verifier(vec![key(None, &SEED_A)]).verify(&token, NOW),
        Ok(named)
    );
}

/// Writes `text` to `path` the way a rotation should: a new file renamed over the old one.
fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[test]
fn jwks_keys_are_reloaded_when_the_file_changes_and_a_broken_file_keeps_the_old_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    replace_file(&path, &jwks_json(&[key(Some("k1"), &SEED_A)]));
    let jwks = std::sync::Arc::new(Jwks::load(&path).expect("load"));
    let v = Verifier::new(AuthConfig {
        jwks: Some(jwks.clone()),
        ..config()
    })
    .expect("JWKS-only verifier");
    let token_a = issue_ed25519(&SEED_A, Some("k1"), ISS, AUD, &claims());
    let token_b = issue_ed25519(&SEED_B, Some("k2"), ISS, AUD, &claims());
    assert_eq!(v.verify(&token_a, NOW), Ok(claims()));
    assert_eq!(
        reject(&v, &token_b, NOW),
        AuthError::UnknownKey("\"k2\"".to_owned())
    );
    assert_eq!(jwks.reload_if_changed(), Ok(None), "unchanged");

    // Rotation: k2 in, k1 out.
    replace_file(&path, &jwks_json(&[key(Some("k2"), &SEED_B)]));
    assert_eq!(jwks.reload_if_changed(), Ok(Some(1)));
    assert_eq!(jwks.kids(), vec![Some("k2".to_owned())]);
    assert_eq!(v.verify(&token_b, NOW), Ok(claims()));
    assert_eq!(reject(&v, &token_a, NOW).code(), "unknown_key");

    // A broken file is reported once and changes nothing.
    replace_file(&path, "{\"keys\": [");
    let err = jwks.reload_if_changed().expect_err("broken file");
    assert_eq!(err.code(), "invalid_config");
    assert_eq!(jwks.reload_if_changed(), Ok(None), "reported once");
    assert_eq!(v.verify(&token_b, NOW), Ok(claims()));

    // So is a file that publishes a private key, or one gone missing.
    replace_file(
        &path,
        r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AAAA","d":"AAAA"}]}"#,
    );
    let err = jwks.reload_if_changed().expect_err("private key");
    assert!(err.to_string().contains("private key"), "{err}");
    std::fs::remove_file(&path).expect("remove");
    assert!(jwks.reload_if_changed().is_err());
    assert_eq!(jwks.reload_if_changed(), Ok(None));
    assert_eq!(v.verify(&token_b, NOW), Ok(claims()));

    // And a good file again is picked up.
    replace_file(
        &path,
        &jwks_json(&[key(Some("k1"), &SEED_A), key(Some("k2"), &SEED_B)]),
    );
    assert_eq!(jwks.reload_if_changed(), Ok(Some(2)));
    assert_eq!(v.verify(&token_a, NOW), Ok(claims()));
}

#[test]
fn jwks_parsing_is_strict_about_ed25519_keys_and_skips_others() {
    let x = URL_SAFE_NO_PAD.encode(ed25519_public_key(&SEED_A));
    let doc = format!(
        r#"{{"keys":[{{"kty":"RSA","n":"xx","e":"AQAB"}},{{"kty":"OKP","crv":"X25519","x":"{x}"}},{{"kty":"OKP","crv":"Ed25519","use":"enc","x":"{x}"}},{{"kty":"OKP","crv":"Ed25519","kid":"a","x":"{x}"}}]}}"#
    );
    let keys = parse_jwks(doc.as_bytes()).expect("parses");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].kid.as_deref(), Some("a"));
    assert_eq!(keys[0].public_key, ed25519_public_key(&SEED_A));
    for bad in [
        r#"{"keys":[]}"#.to_owned(),
        r#"{"keys":[{"kty":"RSA"}]}"#.to_owned(),
        r#"{"nokeys":1}"#.to_owned(),
        r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AAAA"}]}"#.to_owned(),
        format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":5,"x":"{x}"}}]}}"#),
        "[]".to_owned(),
    ] {
        let err = parse_jwks(bad.as_bytes()).expect_err(&bad);
        assert_eq!(err.code(), "invalid_config", "{bad}");
    }
    let too_many = format!(
        r#"{{"keys":[{}]}}"#,
        vec![format!(r#"{{"kty":"OKP","crv":"Ed25519","x":"{x}"}}"#); MAX_JWKS_KEYS + 1].join(",")
    );
    assert!(parse_jwks(too_many.as_bytes()).is_err());
}

const BOT_SEED: [u8; 32] = [99; 32];

fn bot_verifier() -> Verifier {
    hs_verifier()
        .with_bot_key(&ed25519_public_key(&BOT_SEED))
        .expect("valid bot key")
}

fn bot_claims(user: &str, roles: &[&str], lifetime: u64) -> Claims {
    Claims {
        tenant: "acme".to_owned(),
        user: user.to_owned(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        expires_at: NOW + lifetime,
        issued_at: NOW,
        jti: Some("b1".to_owned()),
    }
}

#[test]
fn bot_tokens_are_accepted_only_from_the_bot_key_and_for_bot_ids() {
    let v = bot_verifier();
    assert!(v.accepts_bots());
    let token = issue_bot(&BOT_SEED, AUD, "acme", "bot-alerts", NOW, 90 * 86400, "b1");
    let claims = v.verify(&token, NOW + 1).expect("a bot token");
    assert_eq!(claims.user, "bot-alerts");
    assert_eq!(claims.tenant, "acme");
    assert_eq!(claims.roles, vec!["bot".to_owned()]);
    assert_eq!(claims.jti.as_deref(), Some("b1"));

    // Another key naming the bot kid: a bad signature, not a user token.
    let forged = issue_bot(&SEED_A, AUD, "acme", "bot-alerts", NOW, 3600, "b2");
    assert_eq!(v.verify(&forged, NOW + 1), Err(AuthError::BadSignature));
    // A verifier without the bot key refuses it (no key for EdDSA at all here).
    assert!(matches!(
        hs_verifier().verify(&token, NOW + 1),
        Err(AuthError::UnsupportedAlgorithm(_))
    ));
    // Signed by the bot key but not a bot: no bot- prefix, or no bot role.
    for claims in [
        bot_claims("alice", &["bot"], 3600),
        bot_claims("bot-x", &[], 3600),
    ] {
        let t = issue_ed25519(&BOT_SEED, Some(BOT_KID), BOT_ISSUER, AUD, &claims);
        assert!(
            matches!(v.verify(&t, NOW + 1), Err(AuthError::Malformed(_))),
            "{claims:?}"
        );
    }
    // The bot issuer is required, and the bots' own lifetime bound.
    let t = issue_ed25519(
        &BOT_SEED,
        Some(BOT_KID),
        ISS,
        AUD,
        &bot_claims("bot-x", &["bot"], 60),
    );
    assert!(matches!(
        v.verify(&t, NOW + 1),
        Err(AuthError::WrongIssuer(_))
    ));
    let t = issue_bot(
        &BOT_SEED,
        AUD,
        "acme",
        "bot-x",
        NOW,
        MAX_BOT_TOKEN_LIFETIME_SECS + 1,
        "b3",
    );
    assert!(matches!(
        v.verify(&t, NOW + 1),
        Err(AuthError::LifetimeTooLong { .. })
    ));
    // The compliance audience is refused for bots as for users.
    let t = issue_bot(&BOT_SEED, COMPLIANCE_AUD, "acme", "bot-x", NOW, 60, "b4");
    assert!(matches!(
        v.verify(&t, NOW + 1),
        Err(AuthError::WrongAudience(_))
    ));
}

#[test]
fn a_user_token_may_never_claim_a_bot_id_or_role() {
    let v = bot_verifier();
    for (user, roles) in [("bot-alerts", vec![]), ("alice", vec!["bot".to_owned()])] {
        let claims = Claims {
            user: user.to_owned(),
            roles,
            ..claims()
        };
        let t = issue_hs256(SECRET, ISS, AUD, &claims);
        assert!(
            matches!(v.verify(&t, NOW), Err(AuthError::Malformed(_))),
            "{user}"
        );
        // Refused by a verifier without the bot key too: the ids are reserved everywhere.
        assert!(
            matches!(hs_verifier().verify(&t, NOW), Err(AuthError::Malformed(_))),
            "{user}"
        );
    }
}

#[test]
fn a_weak_or_invalid_bot_key_is_refused() {
    assert!(matches!(
        hs_verifier().with_bot_key(&[0; 32]),
        Err(AuthError::InvalidConfig(_))
    ));
}
