//! Validated identifiers.
//!
//! Tenant, conversation, user and client message ids are 1-64 chars of `[A-Za-z0-9_-]`: safe
//! as KV key parts (they never contain the 0x00 separator) and as NATS subject tokens. Every
//! id is checked once, where it enters tidings; past that point the types carry the proof.

use std::fmt;

use crate::error::LogError;

/// Longest id accepted anywhere.
pub const MAX_ID_LEN: usize = 64;

/// Checks the id rules; `field` names the id in the error ("tenant", "conversation", ...).
pub fn validate_id(field: &'static str, value: &str) -> Result<(), LogError> {
    let reason = if value.is_empty() {
        "is empty"
    } else if value.len() > MAX_ID_LEN {
        "is longer than 64 characters"
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        "may only contain A-Z, a-z, 0-9, '_' and '-'"
    } else {
        return Ok(());
    };
    Err(LogError::InvalidId {
        field,
        value: shorten(value),
        reason,
    })
}

/// Keeps error messages bounded whatever the caller sent.
fn shorten(value: &str) -> String {
    const KEEP: usize = 80;
    if value.len() <= KEEP {
        return value.to_string();
    }
    let mut end = KEEP;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &value[..end])
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` against the id rules.
            pub fn new(value: impl Into<String>) -> Result<Self, LogError> {
                let value = value.into();
                validate_id($field, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        /// Maps keyed by an id can be searched by a `&str` (ranges of ids by prefix).
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = LogError;
            fn from_str(s: &str) -> Result<Self, LogError> {
                Self::new(s)
            }
        }
    };
}

id_type!(
    /// A tenant: the unit of isolation and of encryption keys.
    TenantId,
    "tenant"
);
id_type!(
    /// A conversation within a tenant.
    ConvId,
    "conversation"
);
id_type!(
    /// A user within a tenant.
    UserId,
    "user"
);
id_type!(
    /// A client's idempotency key for one append.
    ClientMsgId,
    "client_msg_id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_full_alphabet_and_64_chars() {
        assert!(TenantId::new("acme_Corp-01").is_ok());
        assert!(UserId::new("a".repeat(64)).is_ok());
    }

    #[test]
    fn rejects_empty_long_and_foreign_characters() {
        for bad in [
            "",
            &"a".repeat(65),
            "a b",
            "a/b",
            "a.b",
            "é",
            "a\0b",
            "a\nb",
            "tenant*",
        ] {
            let err = ConvId::new(bad).expect_err(bad);
            assert!(
                matches!(
                    err,
                    LogError::InvalidId {
                        field: "conversation",
                        ..
                    }
                ),
                "{bad:?} gave {err:?}"
            );
        }
    }

    #[test]
    fn error_echo_is_bounded() {
        let err = UserId::new("x".repeat(10_000)).expect_err("too long");
        assert!(err.to_string().len() < 300, "{err}");
    }
}
