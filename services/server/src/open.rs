//! Opening the store and the log as every command and role does: the master key checked
//! first, the configured backend (metered, and wrapped for fault injection when asked), the
//! send buffer's medium, and the archive as the cold tier.

use std::sync::Arc;

use anyhow::Context;
use tidings_log::Log;
use tidings_log::crypto::Keyring;
use tidings_log::send_buffer::BufferPlace;
use tidings_log::store::{Fault, FaultSwitch, FaultyStore, FjallStore, KvStore, MeteredStore};
use tidings_log_role::send_buffer_stream::{StreamBuffer, StreamBufferConfig};
use tokio::sync::mpsc;
use tracing::warn;

use crate::config::{Config, SendBufferMedium};

pub(crate) fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Opens the log on the configured data directory. The master key is checked first, so a
/// missing key never leaves an empty data directory behind.
pub async fn open_log(config: &Config) -> anyhow::Result<Log> {
    open_log_with_feed(config, None, None).await
}

/// Opens the log and announces its commits on `feed` (for the NATS publisher).
pub async fn open_log_with_feed(
    config: &Config,
    feed: Option<mpsc::Sender<tidings_log::FeedItem>>,
    nats: Option<async_nats::Client>,
) -> anyhow::Result<Log> {
    open_log_owning(config, feed, true, nats).await
}

/// Opens the log; with `own_partitions` false it takes no partition lease (a process that
/// reads and archives but never writes through the sequencer, which must not hold the
/// partitions the writers need). A send buffer on JetStream uses `nats`, or a connection of
/// its own when none is given (a writer must load what the buffer holds before it assigns
/// a seq, so a command that owns partitions cannot go without it).
pub async fn open_log_owning(
    config: &Config,
    feed: Option<mpsc::Sender<tidings_log::FeedItem>>,
    own_partitions: bool,
    nats: Option<async_nats::Client>,
) -> anyhow::Result<Log> {
    let master = config.master_key(env)?;
    let tenant_keys = config.tenant_keys()?;
    let store = open_store(config).await?;
    let keyring = Keyring::open(store.clone(), master)
        .await?
        .with_tenant_keys(tenant_keys);
    let mut log_config = tidings_log::LogConfig {
        own_partitions,
        ..config.log_config()
    };
    if own_partitions
        && let Some(SendBufferMedium::Stream { replicas }) = config.send_buffer_medium()?
    {
        let client = match nats {
            Some(c) => c,
            None => crate::nats_init::connect(config, "log").await?.0,
        };
        let stream = StreamBuffer::open(
            client,
            StreamBufferConfig {
                replicas,
                // Room for several writers' buffers; each bounds its own by max_bytes.
                max_bytes: config.log.send_buffer_limits.max_bytes.saturating_mul(4) as i64,
                ack_timeout: std::time::Duration::from_secs(5),
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("open the send buffer's JetStream stream: {e}"))?;
        log_config.send_buffer =
            Some(config.send_buffer_with(BufferPlace::Medium(Arc::new(stream))));
    }
    let log = Log::open_with_keyring(store, keyring, log_config, feed).await?;
    // Reads below the hot floor come from the archive.
    let objects = crate::archive::objects(config)?;
    let reader = tidings_archive::ColdReader::new(
        log.store().clone(),
        log.keyring().clone(),
        objects,
        config.archive.cache_bytes,
    );
    log.set_cold_tier(Arc::new(reader));
    Ok(log)
}

/// Opens the configured store: fjall in the data directory, or the TiKV cluster; wrapped in
/// a [`FaultyStore`] when the debug setting `store.faults_file` names a control file.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn KvStore>> {
    // Reads counted by keyspace (tidings_store_reads_total), whichever backend.
    let store: Arc<dyn KvStore> = Arc::new(MeteredStore::new(open_backend(config).await?));
    if config.store.faults_file.as_os_str().is_empty() {
        return Ok(store);
    }
    warn!(
        file = %config.store.faults_file.display(),
        "store fault injection is on (store.faults_file): a debug setting, not for production"
    );
    let switch = Arc::new(FaultSwitch::default());
    if let Ok(text) = tokio::fs::read_to_string(&config.store.faults_file).await {
        switch.set(Fault::parse(&text).unwrap_or(Fault::Ok));
    }
    // The watcher holds the switch weakly and ends with the store.
    drop(switch.watch(config.store.faults_file.clone()));
    Ok(Arc::new(FaultyStore::new(store, switch)))
}

async fn open_backend(config: &Config) -> anyhow::Result<Arc<dyn KvStore>> {
    match config.backend()? {
        crate::config::Backend::Embedded => Ok(Arc::new(
            FjallStore::open(&config.data_dir)
                .with_context(|| format!("open the store in {}", config.data_dir.display()))?,
        )),
        crate::config::Backend::Tikv => open_tikv(config).await,
    }
}

#[cfg(feature = "tikv")]
async fn open_tikv(config: &Config) -> anyhow::Result<Arc<dyn KvStore>> {
    let cfg = config.tikv_config()?;
    let store = tidings_log::store::TikvStore::connect(&cfg)
        .await
        .context("connect to the TiKV cluster")?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "tikv"))]
async fn open_tikv(_config: &Config) -> anyhow::Result<Arc<dyn KvStore>> {
    anyhow::bail!(
        "store.backend is \"tikv\" but this tidings was built without TiKV support; \
         rebuild it with `cargo build --release --features tikv`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Built without the feature, the TiKV backend is refused with the way out, before any
    /// connection is tried; built with it, an unreachable cluster is a clear error.
    #[tokio::test]
    async fn the_tikv_backend_is_refused_clearly_when_not_built_or_not_reachable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("t.toml");
        std::fs::write(
            &file,
            "[store]\nbackend = \"tikv\"\n[store.tikv]\npd_endpoints = [\"127.0.0.1:1\"]\n\
             connect_timeout = \"1s\"\n",
        )
        .expect("write");
        let config = Config::load(Some(&file), |_| None).expect("config");
        let err = match open_store(&config).await {
            Ok(_) => panic!("opened a store on a closed port"),
            Err(e) => format!("{e:#}"),
        };
        if cfg!(feature = "tikv") {
            assert!(
                err.contains("could not reach") && err.contains("127.0.0.1:1"),
                "{err}"
            );
        } else {
            assert!(err.contains("--features tikv"), "{err}");
        }
    }
}
