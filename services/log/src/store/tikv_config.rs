//! What the TiKV backend needs to connect, and the key prefix it puts in front of every key.
//!
//! Compiled with or without the `tikv` feature: the binary validates a `[store.tikv]`
//! section (and tests check the refusals) even when it was built without the client, and
//! the prefix arithmetic is pure and tested here without a cluster.

use std::path::PathBuf;
use std::time::Duration;

use super::{KeyRange, StoreError, prefix_end};

/// Connection settings of `TikvStore` (`store/tikv.rs`, feature `tikv`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TikvConfig {
    /// PD endpoints as `host:port` (no scheme: the client picks http or https from the TLS
    /// settings). Give all of them: the client fails over between them.
    pub pd_endpoints: Vec<String>,
    /// Put in front of every key, so several deployments can share one cluster; scans never
    /// leave it. May be empty (the deployment owns the whole keyspace).
    pub key_prefix: Vec<u8>,
    /// TLS towards PD and TiKV: all three paths, or none (plaintext).
    pub tls: Option<TlsPaths>,
    /// Bounds connecting at start (every retry included) and each request to PD or TiKV.
    pub connect_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    pub ca_path: PathBuf,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// The longest key prefix accepted: it is repeated in every key.
pub const MAX_KEY_PREFIX_BYTES: usize = 256;

impl TikvConfig {
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Plaintext, the default timeout.
    pub fn new(pd_endpoints: Vec<String>, key_prefix: impl Into<Vec<u8>>) -> Self {
        TikvConfig {
            pd_endpoints,
            key_prefix: key_prefix.into(),
            tls: None,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Refuses what cannot work before any connection is tried: no endpoints, an endpoint
    /// that is not `host:port`, a zero timeout, an oversized prefix.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.pd_endpoints.is_empty() {
            return Err(StoreError::Config(
                "store.tikv.pd_endpoints is empty: give the PD endpoints as host:port".into(),
            ));
        }
        for endpoint in &self.pd_endpoints {
            check_endpoint(endpoint)?;
        }
        if self.connect_timeout.is_zero() {
            return Err(StoreError::Config(
                "store.tikv.connect_timeout must be more than zero".into(),
            ));
        }
        if self.key_prefix.len() > MAX_KEY_PREFIX_BYTES {
            return Err(StoreError::Config(format!(
                "store.tikv.key_prefix is {} bytes; at most {MAX_KEY_PREFIX_BYTES}",
                self.key_prefix.len()
            )));
        }
        Ok(())
    }

    /// The TLS paths from three optional settings: all three or none.
    pub fn tls_from_parts(
        ca_path: Option<PathBuf>,
        cert_path: Option<PathBuf>,
        key_path: Option<PathBuf>,
    ) -> Result<Option<TlsPaths>, StoreError> {
        match (ca_path, cert_path, key_path) {
            (None, None, None) => Ok(None),
            (Some(ca_path), Some(cert_path), Some(key_path)) => Ok(Some(TlsPaths {
                ca_path,
                cert_path,
                key_path,
            })),
            (ca, cert, key) => {
                let missing: Vec<&str> =
                    [("ca_path", &ca), ("cert_path", &cert), ("key_path", &key)]
                        .into_iter()
                        .filter(|(_, v)| v.is_none())
                        .map(|(name, _)| name)
                        .collect();
                Err(StoreError::Config(format!(
                    "store.tikv TLS needs ca_path, cert_path and key_path together, or none of \
                     them; missing: {}",
                    missing.join(", ")
                )))
            }
        }
    }
}

/// `host:port` with a non-empty host (a name, an IPv4 address or a bracketed IPv6 address)
/// and a port in 1..=65535.
fn check_endpoint(endpoint: &str) -> Result<(), StoreError> {
    let bad = |why: &str| {
        Err(StoreError::Config(format!(
            "store.tikv.pd_endpoints: {endpoint:?} {why}; expected host:port, e.g. 127.0.0.1:2379"
        )))
    };
    if endpoint.contains("://") {
        return bad("has a scheme (the client chooses http or https from the TLS settings)");
    }
    let Some((host, port)) = endpoint.rsplit_once(':') else {
        return bad("has no port");
    };
    if host.is_empty() {
        return bad("has no host");
    }
    let bracketed = host.starts_with('[') && host.ends_with(']');
    if host.contains(':') && !bracketed {
        return bad("is an IPv6 address without brackets");
    }
    if host.contains(|c: char| c.is_whitespace() || c == '/') {
        return bad("has a malformed host");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => bad("has no valid port (1-65535)"),
        Ok(_) => Ok(()),
    }
}

/// The key as stored: `prefix` then `key`.
pub fn prefixed(prefix: &[u8], key: &[u8]) -> Vec<u8> {
    [prefix, key].concat()
}

/// The caller's key of a stored key, `None` if it is outside the prefix (which a scan bounded
/// by [`prefixed_range`] never returns; a caller treats it as corruption of the cluster's
/// data, not as a key of ours).
pub fn unprefixed<'a>(prefix: &[u8], stored: &'a [u8]) -> Option<&'a [u8]> {
    stored.strip_prefix(prefix)
}

/// The stored range of a caller's range: `[prefix+start, prefix+end)`, and where the caller's
/// range is unbounded above, the end of the prefix itself, so a scan never leaves it. `None`
/// as the end means unbounded (only with an empty prefix, or one of all 0xff bytes).
pub fn prefixed_range(prefix: &[u8], range: &KeyRange) -> (Vec<u8>, Option<Vec<u8>>) {
    let start = prefixed(prefix, &range.start);
    let end = if range.end.is_empty() {
        prefix_end(prefix)
    } else {
        prefixed(prefix, &range.end)
    };
    (start, (!end.is_empty()).then_some(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_error(result: Result<(), StoreError>) -> String {
        match result {
            Err(StoreError::Config(message)) => message,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn endpoints_must_be_host_and_port() {
        let with = |endpoints: &[&str]| {
            TikvConfig::new(endpoints.iter().map(|e| e.to_string()).collect(), "t/").validate()
        };
        assert!(with(&["127.0.0.1:2379"]).is_ok());
        assert!(with(&["pd-0.pd:2379", "pd-1.pd:2379", "[::1]:2379"]).is_ok());
        assert!(config_error(with(&[])).contains("pd_endpoints is empty"));
        for bad in [
            "127.0.0.1",
            ":2379",
            "pd:0",
            "pd:99999",
            "pd:port",
            "http://pd:2379",
            "::1:2379",
            "pd host:2379",
            "",
        ] {
            let message = config_error(with(&["127.0.0.1:2379", bad]));
            assert!(message.contains(&format!("{bad:?}")), "{bad}: {message}");
            assert!(message.contains("host:port"), "{bad}: {message}");
        }
    }

    #[test]
    fn zero_timeout_and_oversized_prefix_are_refused() {
        let mut cfg = TikvConfig::new(vec!["127.0.0.1:2379".into()], "t/");
        cfg.connect_timeout = Duration::ZERO;
        assert!(config_error(cfg.validate()).contains("connect_timeout"));
        let cfg = TikvConfig::new(vec!["127.0.0.1:2379".into()], vec![b'p'; 257]);
        assert!(config_error(cfg.validate()).contains("key_prefix"));
    }

    #[test]
    fn tls_needs_all_three_paths_or_none() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(
            TikvConfig::tls_from_parts(None, None, None).ok(),
            Some(None)
        );
        assert!(matches!(
            TikvConfig::tls_from_parts(p("ca"), p("cert"), p("key")),
            Ok(Some(_))
        ));
        match TikvConfig::tls_from_parts(p("ca"), None, p("key")) {
            Err(StoreError::Config(message)) => {
                assert!(message.contains("missing: cert_path"), "{message}")
            }
            other => panic!("expected a config error, got {other:?}"),
        }
        match TikvConfig::tls_from_parts(None, None, p("key")) {
            Err(StoreError::Config(message)) => {
                assert!(message.contains("missing: ca_path, cert_path"), "{message}")
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn keys_get_the_prefix_and_lose_it_again() {
        let stored = prefixed(b"tidings/prod/", b"hd\0acme\0general");
        assert_eq!(stored, b"tidings/prod/hd\0acme\0general");
        assert_eq!(
            unprefixed(b"tidings/prod/", &stored),
            Some(&b"hd\0acme\0general"[..])
        );
        assert_eq!(unprefixed(b"tidings/prod/", b"tidings/test/hd"), None);
        assert_eq!(prefixed(b"", b"k"), b"k");
        assert_eq!(unprefixed(b"", b"k"), Some(&b"k"[..]));
    }

    #[test]
    fn scan_ranges_stay_inside_the_prefix() {
        let range = KeyRange::prefix(b"ev\0acme\0".to_vec());
        assert_eq!(
            prefixed_range(b"p/", &range),
            (b"p/ev\0acme\0".to_vec(), Some(b"p/ev\0acme\x01".to_vec()))
        );
        // Unbounded above: bounded by the end of the prefix, not the end of the keyspace.
        let all = KeyRange {
            start: Vec::new(),
            end: Vec::new(),
        };
        assert_eq!(
            prefixed_range(b"p/", &all),
            (b"p/".to_vec(), Some(b"p0".to_vec()))
        );
        let tail = KeyRange {
            start: b"\xff".to_vec(),
            end: Vec::new(),
        };
        assert_eq!(
            prefixed_range(b"p\xff", &tail),
            (b"p\xff\xff".to_vec(), Some(b"q".to_vec()))
        );
        // No prefix: the caller's range as it is.
        assert_eq!(prefixed_range(b"", &all), (Vec::new(), None));
        // A deployment's range never covers a longer deployment prefix's keys: "t/" and
        // "t/x/" would overlap, which is why prefixes should end in a separator that no
        // other prefix extends (documented in the config).
        let (start, end) = prefixed_range(b"a/", &all);
        let end = end.expect("bounded");
        assert!(
            b"a/anything".as_slice() >= start.as_slice()
                && b"a/anything".as_slice() < end.as_slice()
        );
        assert!(b"b/x".as_slice() >= end.as_slice());
        assert!(b"a.x".as_slice() < start.as_slice());
    }
}
