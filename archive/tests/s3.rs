//! The archive on S3: the same conformance suite as the local directory, against a real
//! Garage server the test starts on loopback ports, and what happens when the store goes
//! away. Skipped (saying so) when garage is not installed, unless TIDINGS_REQUIRE_GARAGE=1.

#[path = "../../tests/common/garage.rs"]
mod garage;

use std::time::Duration;

use garage::Garage;
use tidings_archive::archiver::{ArchiveConfig, PassOptions};
use tidings_archive::conformance::Fixture;
use tidings_archive::{ArchiveError, Objects, S3Config, StorageConfig};

fn s3_objects(g: &Garage, prefix: &str, retry_timeout: Duration) -> Objects {
    let t = g.target();
    Objects::open(&StorageConfig::S3(S3Config {
        endpoint: Some(t.endpoint.clone()),
        bucket: t.bucket.clone(),
        region: t.region.clone(),
        prefix: prefix.into(),
        allow_http: true,
        retry_timeout,
        credentials: Some((t.access_key_id.clone(), t.secret_access_key.clone())),
    }))
    .expect("S3 objects")
}

async fn garage() -> Option<(Objects, Garage)> {
    let g = tokio::task::spawn_blocking(Garage::start)
        .await
        .expect("start garage")?;
    let objects = s3_objects(&g, "tidings", Duration::from_secs(10));
    Some((objects, g))
}

tidings_archive::archive_conformance_suite!(garage());

/// The store unreachable: the pass fails with a typed, retryable error after its bounded
/// retries, nothing leaves the hot log; once the store is back the next pass archives all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_store_fails_the_pass_and_keeps_hot_events() {
    let Some(mut g) = tokio::task::spawn_blocking(Garage::start)
        .await
        .expect("start garage")
    else {
        return;
    };
    let objects = s3_objects(&g, "faults", Duration::from_secs(2));
    let f = Fixture::new(objects, ArchiveConfig::default()).await;
    f.conversation("acme", "c", 30).await;
    let g = tokio::task::spawn_blocking(move || {
        g.stop();
        g
    })
    .await
    .expect("stop");
    let pass = PassOptions {
        older_than_ms: Some(0),
        ..PassOptions::default()
    };
    tokio::time::sleep(Duration::from_millis(2)).await;
    let err = f
        .archiver
        .run_pass(&pass, &|_| {})
        .await
        .expect_err("store is down");
    assert!(matches!(err, ArchiveError::ObjectStore(_)), "{err:?}");
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(f.hot_events("acme", "c").await, 31);
    assert_eq!(f.read_all("acme", "c").await.len(), 31);

    let _g = tokio::task::spawn_blocking(move || {
        let mut g = g;
        g.restart();
        g
    })
    .await
    .expect("restart");
    let summary = f.archiver.run_pass(&pass, &|_| {}).await.expect("pass");
    assert_eq!(summary.events_archived, 31);
    assert_eq!(f.hot_events("acme", "c").await, 0);
    assert_eq!(f.read_all("acme", "c").await.len(), 31);
}
