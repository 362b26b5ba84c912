//! What a receiver gets: a JSON body and its signature.
//!
//! `X-Tidings-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, the
//! secret being the `whsec_...` string shown once at creation, as bytes. A receiver
//! recomputes the HMAC over the exact bytes it received, compares in constant time, and
//! refuses a `t` too far from its clock (replayed requests); `X-Tidings-Event-Id` lets it
//! drop a redelivery it has already handled (delivery is at least once). The README's
//! webhook section shows it in a few lines.

use hmac::{Hmac, Mac as _};
use serde_json::{Value, json};
use sha2::Sha256;
use tidings_log::Event;

type HmacSha256 = Hmac<Sha256>;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-tidings-signature";
/// The header carrying the event's id (the receiver's dedupe key).
pub const EVENT_ID_HEADER: &str = "x-tidings-event-id";

/// The HMAC-SHA256 of `"<t>.<body>"` under `secret`, not finalised.
fn mac(secret: &[u8], t: u64, body: &[u8]) -> HmacSha256 {
    let mut mac =
        HmacSha256::new_from_slice(secret).expect("HMAC-SHA256 accepts keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The hex HMAC-SHA256 of `"<t>.<body>"` under `secret`.
pub fn mac_hex(secret: &[u8], t: u64, body: &[u8]) -> String {
    tidings_log::crypto::hex_encode(&mac(secret, t, body).finalize().into_bytes())
}

/// The `X-Tidings-Signature` value for `body` sent at `t`.
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    format!("t={t},v1={}", mac_hex(secret, t, body))
}

/// Whether `header` signs `body` under `secret` (what a receiver does; the tests' and the
/// bench's receivers use it too).
pub fn verify(secret: &[u8], header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.parse::<u64>().ok(),
            Some(("v1", value)) => v1 = tidings_log::crypto::hex_decode(value).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    mac(secret, t, body).verify_slice(&v1).is_ok()
}

/// The JSON body for one event: the event as the tools print it (envelope, `kind`, `text`,
/// the kind's fields) plus the subscription and the try.
pub fn body(subscription: &str, attempt: u32, event: &Event) -> Vec<u8> {
    let mut value = crate::output::event(event);
    if let Value::Object(o) = &mut value {
        o.insert("subscription".into(), json!(subscription));
        o.insert("attempt".into(), json!(attempt));
    }
    value.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_with_its_secret_only() {
        let body = br#"{"seq":1}"#;
        let header = signature(b"whsec_right", 1_800_000_000, body);
        assert!(header.starts_with("t=1800000000,v1="));
        assert!(verify(b"whsec_right", &header, body));
        assert!(!verify(b"whsec_wrong", &header, body));
        assert!(!verify(b"whsec_right", &header, br#"{"seq":2}"#));
        let shifted = header.replace("t=1800000000", "t=1800000001");
        assert!(!verify(b"whsec_right", &shifted, body));
        assert!(!verify(b"whsec_right", "v1=00", body));
    }
}
