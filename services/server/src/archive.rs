//! `tidings archive run|inspect|verify`, and the archiver inside `tidings serve`.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tidings_archive::{Archiver, Objects, PassOptions, Summary, tools};
use tidings_log::{Log, TenantId};

use crate::cli::ArchiveCommand;
use crate::config::{Config, parse_duration_secs};
use crate::output::emit;

/// The configured object store.
pub fn objects(config: &Config) -> anyhow::Result<Objects> {
    let storage = config.archive_storage()?;
    Objects::open(&storage).context("open the archive's object store")
}

/// The configured archiver over `log`'s store and keys.
pub(crate) fn archiver(config: &Config, log: &Log) -> anyhow::Result<Archiver> {
    Ok(Archiver::new(
        log.store().clone(),
        log.keyring().clone(),
        objects(config)?,
        config.archive_config()?,
    )?)
}

/// Tenants named on the command line, or every tenant with a conversation.
async fn tenants(log: &Log, one: Option<TenantId>) -> anyhow::Result<Vec<TenantId>> {
    Ok(match one {
        Some(t) => vec![t],
        None => tidings_archive::archiver::tenants(&**log.store()).await?,
    })
}

/// Runs an archive command. Returns whether everything checked out.
pub async fn command(cmd: ArchiveCommand, log: &Log, config: &Config) -> anyhow::Result<bool> {
    match cmd {
        ArchiveCommand::Run {
            older_than,
            tenant,
            orphan_grace,
        } => {
            let secs = |text: Option<String>, what: &str| -> anyhow::Result<Option<u64>> {
                text.map(|t| parse_duration_secs(&t).map(|s| s * 1000))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--{what}: {e}"))
            };
            let opts = PassOptions {
                older_than_ms: secs(older_than, "older-than")?,
                orphan_grace_ms: secs(orphan_grace, "orphan-grace")?,
                tenant,
            };
            let bar = std::io::stderr().is_terminal();
            let progress = move |s: &Summary| {
                if bar {
                    eprint!(
                        "\rarchived {} events in {} segments, {:.1} MiB",
                        s.events_archived,
                        s.segments,
                        s.bytes as f64 / (1 << 20) as f64
                    );
                }
            };
            let result = archiver(config, log)?.run_pass(&opts, &progress).await;
            if bar {
                eprintln!();
            }
            let summary = result.context("archive pass")?;
            emit(&serde_json::to_value(&summary)?)?;
            Ok(true)
        }
        ArchiveCommand::Inspect { tenant } => {
            for t in tenants(log, tenant).await? {
                for segment in tools::inspect(&**log.store(), &t).await? {
                    emit(&serde_json::to_value(&segment)?)?;
                }
            }
            Ok(true)
        }
        ArchiveCommand::Verify { tenant } => {
            let objects = objects(config)?;
            let mut ok = true;
            for t in tenants(log, tenant).await? {
                let report = tools::verify(&**log.store(), log.keyring(), &objects, &t).await?;
                ok &= report.ok();
                let mut value = serde_json::to_value(&report)?;
                value["tenant"] = json!(t.as_str());
                value["ok"] = json!(report.ok());
                emit(&value)?;
            }
            Ok(ok)
        }
    }
}

/// The archiver of `tidings serve`: a pass every `archive.interval`, logged. A failed pass
/// is logged and retried at the next interval; it never takes the server down.
pub fn spawn_periodic(
    config: &Config,
    log: Log,
    gate: Arc<tokio::sync::RwLock<()>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let archiver = Arc::new(archiver(config, &log)?.with_gate(gate));
    let every = Duration::from_secs(
        parse_duration_secs(&config.archive.interval).map_err(anyhow::Error::msg)?,
    );
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let started = std::time::Instant::now();
            let pass = archiver.run_pass(&PassOptions::default(), &|_| {}).await;
            crate::metrics::archive_pass(
                started.elapsed().as_secs_f64(),
                pass.as_ref().ok().map(|s| s.events_archived),
            );
            match pass {
                Ok(s)
                    if s.events_archived > 0
                        || s.orphans_removed > 0
                        || s.events_purged > 0
                        || s.events_held > 0 =>
                {
                    tracing::info!(
                        events = s.events_archived,
                        segments = s.segments,
                        bytes = s.bytes,
                        orphans_removed = s.orphans_removed,
                        purged = s.events_purged,
                        kept_for_holds = s.events_held,
                        ms = s.duration_ms,
                        "archive pass"
                    )
                }
                Ok(_) => tracing::debug!("archive pass: nothing to archive"),
                Err(e) => {
                    tracing::warn!(error = %e, retryable = e.is_retryable(), "archive pass failed")
                }
            }
        }
    }))
}
