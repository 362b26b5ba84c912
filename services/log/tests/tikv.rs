//! The TiKV backend: what can be checked without a cluster (PD unreachable, bad
//! configuration), and, when `TIDINGS_TIKV_PD` names PD endpoints (comma-separated
//! `host:port`), the store conformance suite and the log suite against that cluster. Without
//! it each cluster case prints `SKIPPED <case>: TIDINGS_TIKV_PD is not set (no TiKV cluster)`
//! and passes.
//!
//! Each cluster case works under its own random key prefix (`tidings-test/<random>/`), so
//! runs never see each other's data; the data is left to the cluster (nothing deletes it).
//!
//! The suite needs the `tikv` feature (`cargo test -p tidings-log --features tikv --test
//! tikv`; ops/test runs it so when `TIDINGS_TIKV_PD` is set). Built without it, this binary
//! holds one test that says so; CI checks the feature's code with clippy in a step of its own.

/// Says, past the harness's capture so every run shows it, that the suite did not run.
#[cfg(not(feature = "tikv"))]
#[test]
fn tikv_suite_is_skipped_without_the_tikv_feature() {
    use std::io::Write;
    let _ = std::io::stderr().write_all(
        b"SKIPPED: built without the tikv feature, so no TiKV test ran \
          (cargo test -p tidings-log --features tikv --test tikv; TIDINGS_TIKV_PD=host:port \
          for the cluster cases)\n",
    );
}

#[cfg(feature = "tikv")]
#[macro_use]
mod log_suite;

#[cfg(feature = "tikv")]
use std::sync::Arc;
#[cfg(feature = "tikv")]
use std::time::{Duration, Instant};

#[cfg(feature = "tikv")]
use tidings_log::store::{KvStore, StoreError, TikvConfig, TikvStore};

#[cfg(feature = "tikv")]
const SKIP_REASON: &str = "TIDINGS_TIKV_PD is not set (no TiKV cluster)";

/// A store on the cluster named by `TIDINGS_TIKV_PD` under a fresh prefix, or why not.
#[cfg(feature = "tikv")]
async fn cluster_store() -> Result<(TikvStore, ()), String> {
    let endpoints = match std::env::var("TIDINGS_TIKV_PD") {
        Ok(v) if !v.trim().is_empty() => v,
        _ => return Err(SKIP_REASON.to_string()),
    };
    let mut cfg = TikvConfig::new(
        endpoints.split(',').map(|e| e.trim().to_string()).collect(),
        format!("tidings-test/{:016x}/", fastrand::u64(..)),
    );
    cfg.connect_timeout = Duration::from_secs(20);
    // A set variable means a cluster is meant to be there: failing to reach it fails the test.
    let store = TikvStore::connect(&cfg)
        .await
        .expect("connect to TIDINGS_TIKV_PD");
    Ok((store, ()))
}

#[cfg(feature = "tikv")]
tidings_log::kv_conformance_suite!(optional cluster_store());

#[cfg(feature = "tikv")]
mod log {
    use super::*;
    log_suite!(async {
        cluster_store()
            .await
            .map(|(store, guard)| (Arc::new(store) as Arc<dyn KvStore>, guard))
    });
}

/// A port nothing listens on: bound, then closed.
#[cfg(feature = "tikv")]
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

#[cfg(feature = "tikv")]
#[tokio::test]
async fn unreachable_pd_is_a_typed_error_naming_the_endpoints_not_a_hang() {
    let closed = format!("127.0.0.1:{}", closed_port());
    let mut cfg = TikvConfig::new(vec!["127.0.0.1:1".into(), closed.clone()], "t/");
    cfg.connect_timeout = Duration::from_secs(2);
    let started = Instant::now();
    // The outer bound only keeps a broken implementation from hanging the test run.
    let result = tokio::time::timeout(Duration::from_secs(60), TikvStore::connect(&cfg))
        .await
        .expect("connect returned");
    match result {
        Err(StoreError::Unreachable {
            endpoints,
            attempts,
            ..
        }) => {
            assert!(endpoints.contains("127.0.0.1:1"), "{endpoints}");
            assert!(endpoints.contains(&closed), "{endpoints}");
            assert!(attempts >= 1);
        }
        Err(other) => panic!("expected Unreachable, got {other}"),
        Ok(_) => panic!("connected to a closed port"),
    }
    let err = StoreError::Unreachable {
        what: "x",
        endpoints: String::new(),
        attempts: 1,
        message: String::new(),
    };
    assert!(err.is_retryable(), "an unreachable cluster may come back");
    eprintln!("connect gave up after {:?}", started.elapsed());
}

#[cfg(feature = "tikv")]
#[tokio::test]
async fn misconfigured_endpoints_are_refused_before_connecting() {
    for endpoints in [
        vec![],
        vec!["pd".to_string()],
        vec!["http://pd:2379".to_string()],
    ] {
        let cfg = TikvConfig::new(endpoints.clone(), "t/");
        match TikvStore::connect(&cfg).await {
            Err(StoreError::Config(message)) => {
                assert!(message.contains("pd_endpoints"), "{message}")
            }
            Err(other) => panic!("{endpoints:?}: expected a config error, got {other}"),
            Ok(_) => panic!("{endpoints:?}: connected"),
        }
    }
}

#[cfg(feature = "tikv")]
#[tokio::test]
async fn tls_files_that_do_not_exist_are_refused_before_connecting() {
    let mut cfg = TikvConfig::new(vec!["127.0.0.1:2379".into()], "t/");
    cfg.tls = TikvConfig::tls_from_parts(
        Some("/nonexistent/ca.pem".into()),
        Some("/nonexistent/cert.pem".into()),
        Some("/nonexistent/key.pem".into()),
    )
    .expect("all three");
    match TikvStore::connect(&cfg).await {
        Err(StoreError::Config(message)) => {
            assert!(
                message.contains("ca_path") && message.contains("/nonexistent/ca.pem"),
                "{message}"
            )
        }
        Err(other) => panic!("expected a config error, got {other}"),
        Ok(_) => panic!("connected"),
    }
}
