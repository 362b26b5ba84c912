//! `tidings bench archive`: the archive against plaintext Parquet in the same run.
//!
//! Each run fills a fresh log on disk with `--messages` chat messages over
//! `--conversations` conversations (2 to 30 words drawn Zipf-like from a vocabulary of
//! common words and 4,000 made-up ones, so they compress like chat rather than like noise or
//! like repeated text), then measures:
//!
//! - archive throughput: one `--older-than 0s` pass, events/s;
//! - bytes per event: the hot store (logical key and value bytes of each event's `ev/` and
//!   `dd/` rows), the archive (segment bytes), and the baseline: the same rows written as
//!   plaintext Parquet with ZSTD by the same writer, body column in the clear;
//! - history page latency (50 latest events of a conversation): from the hot log before the
//!   pass, from the archive after it with a cold cache, and with a warm one;
//! - a point lookup of one (conversation, seq) in a segment: through the archive index and
//!   page index; through bloom filters and page index without the index; and with neither
//!   (decode every row group's keys, then every page up to the row).
//!
//! Medians over `--runs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tidings_archive::format::{self, Fetched, Footer, col};
use tidings_archive::{ArchiveConfig, ColdReader};
use tidings_log::crypto::MasterKey;
use tidings_log::store::{FjallStore, KeyRange, KvStore};
use tidings_log::{ConvId, Log, LogConfig, ReadRange, TenantId};

use crate::bench::median;
use crate::bench_corpus::{
    Corpus, PlainSegment, append_pipelined, archive_all, chat_text, ms, vocabulary,
};

#[derive(Debug, clap::Args)]
pub struct ArchiveArgs {
    /// Messages per run.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    #[arg(long, default_value_t = 1_000)]
    pub conversations: usize,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// History pages and point lookups timed per run.
    #[arg(long, default_value_t = 200)]
    pub probes: usize,
    /// Directory for the scratch stores (default: the system temp directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

struct Run {
    archive_events_per_s: f64,
    plain_write_events_per_s: f64,
    hot_bytes: f64,
    archive_bytes: f64,
    plain_bytes: f64,
    page_hot_ms: f64,
    page_cold_ms: f64,
    page_warm_ms: f64,
    lookup_index_us: f64,
    lookup_bloom_us: f64,
    lookup_scan_us: f64,
}

pub async fn run(args: ArchiveArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.messages > 0 && args.conversations > 0 && args.runs > 0 && args.probes > 0,
        "messages, conversations, runs and probes must be positive"
    );
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
    println!(
        "tidings bench archive: {} messages over {} conversations, {} runs, {} cores",
        args.messages,
        args.conversations,
        args.runs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut runs = Vec::new();
    for i in 0..args.runs {
        let run = one_run(&args, &base, i as u64).await?;
        eprintln!(
            "run {}: {:.0} events/s archived, {:.1} B/event archive vs {:.1} plaintext",
            i + 1,
            run.archive_events_per_s,
            run.archive_bytes,
            run.plain_bytes
        );
        runs.push(run);
    }
    let m = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    type Measure = fn(&Run) -> f64;
    let rows: [(&str, Measure, Measure); 7] = [
        (
            "archive pass, events/s (baseline: writing plaintext Parquet only)",
            |r| r.archive_events_per_s,
            |r| r.plain_write_events_per_s,
        ),
        (
            "bytes/event, archive vs plaintext Parquet+ZSTD",
            |r| r.archive_bytes,
            |r| r.plain_bytes,
        ),
        (
            "bytes/event, hot store (logical keys+values) vs archive",
            |r| r.hot_bytes,
            |r| r.archive_bytes,
        ),
        (
            "history page (50 latest), ms: cold tier, cold cache vs hot",
            |r| r.page_cold_ms,
            |r| r.page_hot_ms,
        ),
        (
            "history page (50 latest), ms: cold tier, warm cache vs hot",
            |r| r.page_warm_ms,
            |r| r.page_hot_ms,
        ),
        (
            "point lookup, µs: index + page index vs no bloom, no page index",
            |r| r.lookup_index_us,
            |r| r.lookup_scan_us,
        ),
        (
            "point lookup, µs: bloom + page index (no index) vs neither",
            |r| r.lookup_bloom_us,
            |r| r.lookup_scan_us,
        ),
    ];
    println!();
    println!("| measure | tidings | baseline | ratio |");
    println!("|---|---:|---:|---:|");
    for (label, ours, base) in rows {
        println!(
            "| {label} | {:.3} | {:.3} | {:.3} |",
            m(&ours),
            m(&base),
            m(&|r| ours(r) / base(r))
        );
    }
    Ok(())
}

async fn one_run(args: &ArchiveArgs, base: &std::path::Path, seed: u64) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir_in(base)?;
    let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(&dir.path().join("kv"))?);
    let log = Log::open(store.clone(), MasterKey::generate(), LogConfig::default()).await?;
    let corpus = Corpus::create(&log, args.conversations, 8).await?;
    let (tenant, convs) = (&corpus.tenant, &corpus.convs);
    let mut rng = fastrand::Rng::with_seed(seed);
    let vocabulary = vocabulary();
    let messages =
        (0..args.messages).map(|_| corpus.message(&mut rng, |rng| chat_text(rng, &vocabulary)));
    append_pipelined(&log, messages, |_, _| {}).await?;
    let events = (args.messages + args.conversations) as u64;

    // Hot bytes: every ev/ and dd/ row of the tenant, keys and values.
    let mut hot = 0u64;
    for prefix in [b"ev".as_slice(), b"dd"] {
        let mut dir = prefix.to_vec();
        dir.push(0);
        dir.extend_from_slice(b"bench\0");
        let rows = tidings_archive::archiver::scan_all(&*store, KeyRange::prefix(dir)).await?;
        hot += rows
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum::<u64>();
    }

    // History pages from the hot tier.
    let probes: Vec<&ConvId> = (0..args.probes)
        .map(|_| &convs[rng.usize(..convs.len())])
        .collect();
    let page_hot = time_pages(&log, tenant, &probes).await?;

    // The archive pass.
    let cfg = ArchiveConfig {
        segment_max_events: events as usize + 1,
        ..ArchiveConfig::default()
    };
    let (objects, archive_time) =
        archive_all(&store, &log, &dir.path().join("archive"), &cfg, events).await?;
    let archive_secs = archive_time.as_secs_f64();

    // History pages from the cold tier: a fresh reader per page (cold cache), then one
    // reader for all (warm after the first touch of each row group).
    let mut cold = Vec::new();
    for conv in &probes {
        let reader = ColdReader::new(
            store.clone(),
            log.keyring().clone(),
            objects.clone(),
            64 << 20,
        );
        let log2 = log.clone();
        let reader: Arc<dyn tidings_log::cold::ColdTier> = Arc::new(reader);
        let t = Instant::now();
        let page = read_latest(&log2, tenant, conv, Some(&reader)).await?;
        cold.push(ms(t.elapsed()));
        anyhow::ensure!(page == 50.min(page), "short page");
    }
    let warm_reader: Arc<dyn tidings_log::cold::ColdTier> = Arc::new(ColdReader::new(
        store.clone(),
        log.keyring().clone(),
        objects.clone(),
        256 << 20,
    ));
    for conv in &probes {
        read_latest(&log, tenant, conv, Some(&warm_reader)).await?;
    }
    let mut warm = Vec::new();
    for conv in &probes {
        let t = Instant::now();
        read_latest(&log, tenant, conv, Some(&warm_reader)).await?;
        warm.push(ms(t.elapsed()));
    }

    // The segment, and the plaintext baseline of the same events.
    let segments = tidings_archive::tools::inspect(&*store, tenant).await?;
    let archive_bytes: u64 = segments.iter().map(|s| s.bytes).sum();
    let path = &segments.first().context("no segment")?.path;
    let plain_segment = PlainSegment::read(&objects, path, tenant, log.keyring()).await?;
    let (footer, data, plain_rows) = (
        &plain_segment.segment.footer,
        &plain_segment.data,
        &plain_segment.rows,
    );
    let started = Instant::now();
    let plain = plain_segment.write_plain(&cfg)?;
    let plain_secs = started.elapsed().as_secs_f64();

    // Point lookups.
    let targets: Vec<(String, u64)> = (0..args.probes)
        .map(|_| {
            let r = &plain_rows[rng.usize(..plain_rows.len())];
            (r.conversation.clone(), r.seq)
        })
        .collect();
    let mut by_index = Vec::new();
    for (conv, seq) in &targets {
        let reader = ColdReader::new(
            store.clone(),
            log.keyring().clone(),
            objects.clone(),
            1 << 20,
        );
        let conv = ConvId::new(conv.as_str())?;
        let t = Instant::now();
        let got = tidings_log::cold::ColdTier::read(&reader, tenant, &conv, *seq, *seq).await?;
        by_index.push(t.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(got.len() == 1 && got[0].seq == *seq, "index lookup");
    }
    let mut by_bloom = Vec::new();
    let mut by_scan = Vec::new();
    for (conv, seq) in &targets {
        let t = Instant::now();
        let row = lookup_without_index(footer, data, conv, *seq, true)?;
        by_bloom.push(t.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(row.seq == *seq, "bloom lookup");
        let t = Instant::now();
        let row = lookup_without_index(footer, data, conv, *seq, false)?;
        by_scan.push(t.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(row.seq == *seq, "scan lookup");
    }
    log.close().await;
    Ok(Run {
        archive_events_per_s: events as f64 / archive_secs,
        plain_write_events_per_s: events as f64 / plain_secs,
        hot_bytes: hot as f64 / events as f64,
        archive_bytes: archive_bytes as f64 / events as f64,
        plain_bytes: plain.len() as f64 / events as f64,
        page_hot_ms: median(page_hot),
        page_cold_ms: median(cold),
        page_warm_ms: median(warm),
        lookup_index_us: median(by_index),
        lookup_bloom_us: median(by_bloom),
        lookup_scan_us: median(by_scan),
    })
}

async fn read_latest(
    log: &Log,
    tenant: &TenantId,
    conv: &ConvId,
    cold: Option<&Arc<dyn tidings_log::cold::ColdTier>>,
) -> anyhow::Result<usize> {
    match cold {
        // All events are archived: read them as the log would, straight from the tier.
        Some(cold) => {
            let head = log.conversation(tenant, conv).await?.head_seq;
            let from = head.saturating_sub(49).max(1);
            Ok(cold.read(tenant, conv, from, head).await?.len())
        }
        None => Ok(log.read(tenant, conv, ReadRange::latest(50)).await?.len()),
    }
}

async fn time_pages(log: &Log, tenant: &TenantId, probes: &[&ConvId]) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(probes.len());
    for conv in probes {
        let t = Instant::now();
        read_latest(log, tenant, conv, None).await?;
        out.push(ms(t.elapsed()));
    }
    Ok(out)
}

/// Finds one row without the archive index: row groups whose statistics (and bloom filter,
/// with `indexes`) may hold the conversation, their keys decoded to find the row, then the
/// row read (through the page index, with `indexes`).
fn lookup_without_index(
    footer: &Footer,
    data: &Fetched,
    conv: &str,
    seq: u64,
    indexes: bool,
) -> anyhow::Result<format::Row> {
    for rg in 0..footer.meta.num_row_groups() {
        if indexes && !format::bloom_may_contain(footer, data, rg, col::CONVERSATION, conv)? {
            continue;
        }
        let keys = format::read_keys(footer, data, rg)?;
        if let Some(offset) = keys.iter().position(|(c, s)| c == conv && *s == seq) {
            let mut rows = format::read_rows(footer, data, rg, offset, 1, indexes)?;
            return rows.pop().context("row");
        }
    }
    anyhow::bail!("({conv}, {seq}) not found")
}
