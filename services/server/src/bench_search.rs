//! `tidings bench search`: end-user search latency over the hot index, the index's size per
//! event, and what the hot indexer costs appends, in one run
//! (docs/decisions/hot-search-index.md).
//!
//! Fresh fjall stores on disk get the same chat corpus ([`crate::bench_corpus`]), in
//! `--rounds` pairs: one with the hot indexer off, then one with it running beside the
//! appends (as `serve` runs it), alternating so that a drift in the machine's load falls on
//! both sides. Appends are pipelined as in `bench append`, each log with the commit feed
//! `serve` gives it (drained here, on both sides); the ratio of the median rates is the
//! indexer's cost on this machine (its CPU competes with the sequencer's). Then, once the
//! indexer has
//! caught up, `--samples` searches by random users over all their conversations (every
//! user is in every conversation): one rare word, one common word, two words; p50 and p99
//! of `Log::search` (in process: the gateway and NATS hops are not included). The index's
//! size: the bytes of the `sx/` postings against the sealed events' bytes (`ev/`). Then the
//! whole corpus is archived (one pass, as `tidings archive run --older-than 0s`), the log
//! reads it through the archive's cold reader, and the same searches run again, now
//! answered through the segments' sealed search indexes; their size per event too.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;

use tidings_log::crypto::MasterKey;
use tidings_log::store::{FjallStore, KeyRange, KvStore, Pages};
use tidings_log::{Log, LogConfig};

use crate::bench::{median, quantile};
use crate::bench_corpus::{Corpus, append_pipelined, archive_all, chat_text, ms, vocabulary};

#[derive(Debug, clap::Args)]
pub struct SearchArgs {
    /// Messages appended (to each of the two stores).
    #[arg(long, default_value_t = 100_000)]
    pub events: usize,
    /// Group conversations the messages go to (each user is in all of them).
    #[arg(long, default_value_t = 50)]
    pub conversations: usize,
    #[arg(long, default_value_t = 20)]
    pub users: usize,
    /// Timed searches.
    #[arg(long, default_value_t = 1000)]
    pub samples: usize,
    /// Pairs of loads (without the indexer, then with it) whose rates are compared.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Directory for the scratch stores (default: the system temp directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

struct Loaded {
    log: Log,
    store: Arc<dyn KvStore>,
    rate: f64,
    corpus: Corpus,
}

async fn load(
    path: &std::path::Path,
    args: &SearchArgs,
    cfg: &LogConfig,
    indexer: bool,
) -> anyhow::Result<Loaded> {
    let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(path)?);
    let mut cfg = cfg.clone();
    cfg.search.hot_index = indexer;
    cfg.send_buffer = None;
    // The commit feed the publisher reads, as `serve` runs the log (on both sides: the
    // sequencer keeps a commit's events in the clear for it, and the indexer takes its copy
    // from the same list, so that work is not the indexer's). Drained as it fills.
    let (feed_tx, mut feed_rx) = tokio::sync::mpsc::channel(64 * 1024);
    tokio::spawn(async move { while feed_rx.recv().await.is_some() {} });
    let log = Log::open_with_feed(store.clone(), MasterKey::generate(), cfg, Some(feed_tx)).await?;
    if indexer {
        tokio::spawn(tidings_log::hot_indexer::run_indexer(log.downgrade()));
    }
    let corpus = Corpus::create(&log, args.conversations, args.users).await?;
    let vocab = vocabulary();
    let mut rng = fastrand::Rng::with_seed(7);
    let requests: Vec<anyhow::Result<_>> = (0..args.events)
        .map(|_| corpus.message(&mut rng, |r| chat_text(r, &vocab)))
        .collect();
    let started = Instant::now();
    let n = append_pipelined(&log, requests, |_, _| {}).await?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    Ok(Loaded {
        log,
        store,
        rate,
        corpus,
    })
}

/// Bytes (keys and values) under `prefix`.
async fn bytes_under(store: &dyn KvStore, prefix: Vec<u8>) -> anyhow::Result<(u64, u64)> {
    let mut pages = Pages::new(KeyRange::prefix(prefix));
    let (mut rows, mut bytes) = (0u64, 0u64);
    while let Some(page) = pages.next(store).await? {
        rows += page.len() as u64;
        bytes += page
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum::<u64>();
    }
    Ok((rows, bytes))
}

pub async fn run(args: SearchArgs, log_config: LogConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.events > 0
            && args.conversations > 0
            && args.users > 0
            && args.samples > 0
            && args.rounds > 0,
        "events, conversations, users, samples and rounds must be positive"
    );
    let (base, dir) = crate::bench::scratch_dir(args.dir.as_deref(), "search")?;
    println!(
        "tidings bench search: {} messages in {} conversations of {} users, {} searches, {} \
         cores; fjall under {}",
        args.events,
        args.conversations,
        args.users,
        args.samples,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        base.display()
    );
    println!();
    println!(
        "| round | appends/s without the indexer | with it | ratio | indexer caught up after the last append | events it read from the store |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut last = None;
    for round in 1..=args.rounds {
        let plain = load(
            &dir.path().join(format!("without-{round}")),
            &args,
            &log_config,
            false,
        )
        .await?;
        without.push(plain.rate);
        plain.log.close().await;
        drop(plain.store);
        if let Some(done) = last.take() {
            let Loaded { log, store, .. } = done;
            log.close().await;
            drop(store);
        }
        let indexed = load(
            &dir.path().join(format!("with-{round}")),
            &args,
            &log_config,
            true,
        )
        .await?;
        with.push(indexed.rate);
        // Let the indexer catch up (not timed against anything).
        let caught_up = Instant::now();
        let stats = &indexed.log.indexer().expect("indexer on").stats;
        let total = (args.events + args.conversations) as u64;
        while stats.indexed_events.load(Ordering::Relaxed) < total {
            anyhow::ensure!(
                caught_up.elapsed() < Duration::from_secs(600),
                "the indexer did not catch up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "| {round} | {:.0} | {:.0} | {:.3} | {:.0} ms | {} |",
            without[round - 1],
            with[round - 1],
            with[round - 1] / without[round - 1],
            ms(caught_up.elapsed()),
            stats.plain_dropped.load(Ordering::Relaxed)
        );
        last = Some(indexed);
    }
    let (m_without, m_with) = (median(without), median(with));
    println!(
        "| median | {m_without:.0} | {m_with:.0} | **{:.3}** | | |",
        m_with / m_without
    );
    let indexed = last.context("at least one round")?;

    let (log, store, corpus) = (&indexed.log, &indexed.store, &indexed.corpus);
    let tenant = &corpus.tenant;
    let (posting_rows, posting_bytes) = bytes_under(&**store, b"sx\0".to_vec()).await?;
    let (fate_rows, fate_bytes) = bytes_under(&**store, b"sf\0".to_vec()).await?;
    let events_dir = [b"ev\0".as_slice(), tenant.as_str().as_bytes(), b"\0"].concat();
    let (event_rows, event_bytes) = bytes_under(&**store, events_dir).await?;
    println!();
    println!("| index | rows | bytes | bytes per event | against the sealed events |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| postings (sx/) | {posting_rows} | {posting_bytes} | {:.0} | {:.2}x |",
        posting_bytes as f64 / event_rows.max(1) as f64,
        posting_bytes as f64 / event_bytes.max(1) as f64
    );
    println!(
        "| fates (sf/) | {fate_rows} | {fate_bytes} | {:.1} | {:.3}x |",
        fate_bytes as f64 / event_rows.max(1) as f64,
        fate_bytes as f64 / event_bytes.max(1) as f64
    );
    println!(
        "| sealed events (ev/) | {event_rows} | {event_bytes} | {:.0} | 1x |",
        event_bytes as f64 / event_rows.max(1) as f64
    );

    println!();
    println!("Hot (every event in the hot log, found through the postings):");
    sample(log, corpus, args.samples).await?;

    // Everything archived: the same searches through the segments' sealed indexes.
    let cfg = tidings_archive::ArchiveConfig::default();
    let total = (args.events + args.conversations) as u64;
    let (objects, took) = archive_all(store, log, &dir.path().join("archive"), &cfg, total).await?;
    let reader = tidings_archive::ColdReader::new(
        store.clone(),
        log.keyring().clone(),
        objects.clone(),
        64 << 20,
    );
    anyhow::ensure!(log.set_cold_tier(Arc::new(reader)), "a cold tier was set");
    let mut index_bytes = 0u64;
    let mut segments = 0;
    for seg in tidings_archive::tools::inspect(&**store, tenant).await? {
        let path =
            tidings_archive::storage::search_index_path(&seg.path).context("a segment path")?;
        index_bytes += objects.search_indexes().get(&path).await?.len() as u64;
        segments += 1;
    }
    println!();
    println!(
        "Archived in {:.1} s into {segments} segments; their sealed search indexes: {index_bytes} \
         bytes, {:.1} per event",
        took.as_secs_f64(),
        index_bytes as f64 / total as f64
    );
    println!("Archived (found through the segments' sealed indexes):");
    sample(log, corpus, args.samples).await?;
    indexed.log.close().await;
    Ok(())
}

/// `samples` searches by random users: a rare word, a common one, two words of a real
/// message; prints p50 and p99 per kind and over all.
async fn sample(log: &Log, corpus: &Corpus, samples: usize) -> anyhow::Result<()> {
    let tenant = &corpus.tenant;
    let vocab = vocabulary();
    let mut rng = fastrand::Rng::with_seed(11);
    let mut kinds: Vec<(&str, Vec<Duration>, usize)> = vec![
        ("rare word", Vec::new(), 0),
        ("common word", Vec::new(), 0),
        ("two words", Vec::new(), 0),
    ];
    for i in 0..samples {
        let kind = i % 3;
        let query = match kind {
            0 => vocab[vocab.len() - 1 - rng.usize(..2000)].clone(),
            1 => vocab[rng.usize(..20)].clone(),
            _ => {
                let text = chat_text(&mut rng, &vocab);
                let words: Vec<&str> = text.split(' ').collect();
                let at = rng.usize(..words.len().saturating_sub(1).max(1));
                words[at..(at + 2).min(words.len())].join(" ")
            }
        };
        let user = &corpus.users[rng.usize(..corpus.users.len())];
        let t0 = Instant::now();
        let page = log.search(tenant, user, &query, "", 20).await?;
        kinds[kind].1.push(t0.elapsed());
        kinds[kind].2 += page.hits.len();
    }
    println!();
    println!("| query | searches | mean hits per page | p50 | p99 |");
    println!("|---|---:|---:|---:|---:|");
    let mut all = Vec::new();
    for (name, mut times, hits) in kinds {
        times.sort_unstable();
        let n = times.len().max(1);
        println!(
            "| {name} | {} | {:.1} | {:.2} ms | {:.2} ms |",
            times.len(),
            hits as f64 / n as f64,
            ms(quantile(&times, 0.5)),
            ms(quantile(&times, 0.99))
        );
        all.extend(times);
    }
    all.sort_unstable();
    println!(
        "| all | {} | | {:.2} ms | {:.2} ms |",
        all.len(),
        ms(quantile(&all, 0.5)),
        ms(quantile(&all, 0.99))
    );
    Ok(())
}
