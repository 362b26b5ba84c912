//! `tidings bench compliance`: text search over a tenant's archive, against scanning the
//! same events as plaintext Parquet in the same run.
//!
//! Set up once (timed, not measured): a fresh store on disk with `--events` events of one
//! tenant over `--conversations` conversations (the chat corpus of `bench archive`, 8
//! users), a rare word planted in `--markers` messages spread evenly over the corpus, one
//! edit per 200 events and one recall per 500 (so the search's pass over edits and recalls
//! has work), all appended through the log, then all archived by one `--older-than 0s`
//! pass into the local object store. Each segment is then written again as plaintext
//! Parquet (same writer, schema and row groups; body column in the clear) on the same disk.
//! Then a hot tail: `--hot` more events of the same corpus (`--hot-markers` planted, edits
//! and recalls at the same rates), left hot and indexed by the hot index, which tidings
//! searches too and the baseline does not (so the comparison leans against tidings).
//!
//! Each run measures:
//!
//! - tidings: `Compliance::search` with the word as the text filter over the whole tenant,
//!   audit records included, into a sink that timestamps the first and the last hit; it
//!   finds candidates through each segment's sealed search index;
//! - tidings without the index (`Compliance::without_index`): every text row decrypted;
//! - the baseline: read each plaintext file, decode every row group (split over the cores,
//!   as tidings splits its opening of rows), decode every body as a protobuf `Event` and
//!   test its text for the word, ignoring case;
//! - two selective searches (`--conv` of one conversation, `--sender` of one user), whose
//!   `Progress` counters show how many rows were decrypted of how many looked at.
//!
//! Both sides must find exactly the planted messages, or the run fails. Medians over
//! `--runs`, with the ratio tidings/baseline taken within each run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use prost::Message;
use serde_json::json;
use tidings_archive::ArchiveConfig;
use tidings_archive::compliance::hit::event_text;
use tidings_archive::compliance::{
    Action, Actor, Compliance, ComplianceError, Hit, Progress, Query, Sink, Via,
};
use tidings_archive::format::{self, Fetched, Footer};
use tidings_log::crypto::MasterKey;
use tidings_log::store::{FjallStore, KvStore};
use tidings_log::{Append, Body, ConvId, Event, Log, LogConfig, TenantId, UserId};
use tidings_schemas::v1::{MessageEdited, MessageRecalled};

use crate::bench::median;
use crate::bench_corpus::{
    Corpus, PlainSegment, append_pipelined, archive_all, chat_text, client_msg_id, ms, vocabulary,
};

#[derive(Debug, clap::Args)]
pub struct ComplianceArgs {
    /// Events of the tenant, all archived: conversation creations, messages, edits, recalls.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    #[arg(long, default_value_t = 2_000)]
    pub conversations: usize,
    /// Messages carrying the searched word, spread evenly over the corpus.
    #[arg(long, default_value_t = 100)]
    pub markers: usize,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Events appended after the archive pass and left hot (indexed by the hot index).
    #[arg(long, default_value_t = 20_000)]
    pub hot: usize,
    /// Messages of the hot tail carrying the searched word.
    #[arg(long, default_value_t = 10)]
    pub hot_markers: usize,
    /// Directory for the scratch store and files (default: the system temp directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// The planted word, in mixed case; searched for in lowercase. No generated word contains
/// it (the count check would catch one that did). Public, with [`append_corpus`], for the
/// end-to-end scale tests (tests/scale.rs), which seed a tenant the same way.
pub const MARKER: &str = "WyvernFjord";
const USERS: usize = 8;
/// One edit per this many events, one recall per [`RECALL_EVERY`].
const EDIT_EVERY: usize = 200;
const RECALL_EVERY: usize = 500;

/// What one side found in one run.
#[derive(Clone, Copy, Debug)]
struct Timing {
    hits: u64,
    first: Duration,
    /// Until the search returned (for tidings: the completion audit record written).
    last: Duration,
}

impl Timing {
    fn events_per_s(&self, events: u64) -> f64 {
        events as f64 / self.last.as_secs_f64()
    }
}

/// A selective search: how long, and what its counters say.
#[derive(Clone, Copy, Debug)]
struct Selective {
    timing: Timing,
    scanned: u64,
    opened: u64,
}

struct Run {
    tidings: Timing,
    /// The whole-tenant search without the search indexes.
    unindexed: Selective,
    baseline: Timing,
    whole: Selective,
    by_conv: Selective,
    by_sender: Selective,
}

/// The store, its compliance service, the plaintext files, and what was planted where.
struct Setup {
    log: Log,
    tenant: TenantId,
    compliance: Compliance,
    unindexed: Compliance,
    /// Bytes of the segments' search indexes.
    index_bytes: u64,
    plain_files: Vec<PathBuf>,
    events: u64,
    segments: usize,
    archive_bytes: u64,
    plain_bytes: u64,
    /// A conversation and a sender holding planted messages, with how many each holds.
    conv: (ConvId, u64),
    sender: (UserId, u64),
    /// Seconds spent appending, archiving, writing the plaintext files, and on the hot tail.
    setup_s: [f64; 4],
}

pub async fn run(args: ComplianceArgs) -> anyhow::Result<()> {
    let edits = args.events / EDIT_EVERY;
    let recalls = args.events / RECALL_EVERY;
    anyhow::ensure!(
        args.conversations > 0 && args.markers > 0 && args.runs > 0,
        "conversations, markers and runs must be positive"
    );
    anyhow::ensure!(
        args.events >= args.conversations + edits + recalls + 2 * args.markers,
        "--events must leave room for the conversations, their edits and recalls, and \
         twice --markers messages"
    );
    anyhow::ensure!(
        args.hot >= args.hot / EDIT_EVERY + args.hot / RECALL_EVERY + 2 * args.hot_markers,
        "--hot must leave room for its edits and recalls and twice --hot-markers messages"
    );
    let (_, dir) = crate::bench::scratch_dir(args.dir.as_deref(), "compliance")?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "tidings bench compliance: {} events over {} conversations ({} planted, {edits} edits, \
         {recalls} recalls), {} runs, {workers} cores",
        args.events, args.conversations, args.markers, args.runs
    );
    let setup = set_up(&args, dir.path(), edits, recalls).await?;
    let needle = MARKER.to_lowercase();

    let mut runs = Vec::new();
    for i in 0..args.runs {
        eprintln!("measuring run {}", i + 1);
        let c = &setup.compliance;
        let whole = search(c, &setup, None, None, &needle).await?;
        let baseline = scan_plain(&setup.plain_files, &needle, workers)?;
        let unindexed = search(&setup.unindexed, &setup, None, None, &needle).await?;
        let by_conv = search(c, &setup, Some(&setup.conv.0), None, &needle).await?;
        let by_sender = search(c, &setup, None, Some(&setup.sender.0), &needle).await?;
        let planted = (args.markers + args.hot_markers) as u64;
        for (what, found, want) in [
            ("tidings", whole.timing.hits, planted),
            ("tidings without the index", unindexed.timing.hits, planted),
            // The plaintext copy is of the archive only.
            ("the baseline", baseline.hits, args.markers as u64),
            ("tidings with --conv", by_conv.timing.hits, setup.conv.1),
            (
                "tidings with --sender",
                by_sender.timing.hits,
                setup.sender.1,
            ),
        ] {
            anyhow::ensure!(found == want, "{what} found {found} messages, not {want}");
        }
        let run = Run {
            tidings: whole.timing,
            unindexed,
            baseline,
            whole,
            by_conv,
            by_sender,
        };
        eprintln!(
            "run {}: tidings {:.0} events/s (first {:.1} ms, last {:.1} ms), baseline {:.0} \
             events/s (first {:.1} ms, last {:.1} ms)",
            i + 1,
            run.tidings.events_per_s(setup.events),
            ms(run.tidings.first),
            ms(run.tidings.last),
            run.baseline.events_per_s(setup.events),
            ms(run.baseline.first),
            ms(run.baseline.last),
        );
        runs.push(run);
    }
    report(&args, &setup, &runs);
    setup.log.close().await;
    Ok(())
}

async fn set_up(
    args: &ComplianceArgs,
    dir: &Path,
    edits: usize,
    recalls: usize,
) -> anyhow::Result<Setup> {
    let started = Instant::now();
    let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(&dir.join("kv"))?);
    let log = Log::open(store.clone(), MasterKey::generate(), LogConfig::default()).await?;
    let corpus = Corpus::create(&log, args.conversations, USERS).await?;
    let mut rng = fastrand::Rng::with_seed(7);
    let vocabulary = vocabulary();
    let messages = args.events - args.conversations - edits - recalls;
    let mut markers = append_corpus(
        &log,
        &corpus,
        [messages, args.markers, edits, recalls],
        &mut rng,
        &vocabulary,
    )
    .await?;
    let appended = started.elapsed();

    let cfg = ArchiveConfig::default();
    let (objects, archived) =
        archive_all(&store, &log, &dir.join("archive"), &cfg, args.events as u64).await?;

    let started = Instant::now();
    let segments = tidings_archive::tools::inspect(&*store, &corpus.tenant).await?;
    let plain_dir = dir.join("plain");
    std::fs::create_dir_all(&plain_dir)?;
    let mut plain_files = Vec::new();
    let mut plain_bytes = 0;
    for (i, seg) in segments.iter().enumerate() {
        let plain = PlainSegment::read(&objects, &seg.path, &corpus.tenant, log.keyring())
            .await?
            .write_plain(&cfg)?;
        let path = plain_dir.join(format!("{i:03}.parquet"));
        std::fs::write(&path, &plain).with_context(|| format!("write {}", path.display()))?;
        plain_bytes += plain.len() as u64;
        plain_files.push(path);
    }
    let written = started.elapsed();

    // The hot tail, indexed by the hot index as the indexer would.
    let started = Instant::now();
    let (hot_edits, hot_recalls) = (args.hot / EDIT_EVERY, args.hot / RECALL_EVERY);
    let hot_messages = args.hot - hot_edits - hot_recalls;
    markers.extend(
        append_corpus(
            &log,
            &corpus,
            [hot_messages, args.hot_markers, hot_edits, hot_recalls],
            &mut rng,
            &vocabulary,
        )
        .await?,
    );
    for conv in &corpus.convs {
        let head = log.conversation(&corpus.tenant, conv).await?.head_seq;
        log.index_conversation(&corpus.tenant, conv, head).await?;
    }
    let hot_s = started.elapsed();
    let setup_s = [appended, archived, written, hot_s].map(|d| d.as_secs_f64());
    println!(
        "set up (not measured) in {:.1} s: appended {} events through the log in {:.1} s, \
         archived them into {} segments ({} rows) in {:.1} s, wrote them as plaintext Parquet \
         in {:.1} s; appended and indexed a hot tail of {} events in {:.1} s",
        setup_s.iter().sum::<f64>(),
        args.events,
        setup_s[0],
        segments.len(),
        segments
            .iter()
            .map(|s| s.rows.to_string())
            .collect::<Vec<_>>()
            .join("+"),
        setup_s[1],
        setup_s[2],
        args.hot,
        setup_s[3]
    );

    let count =
        |pick: &dyn Fn(&(ConvId, UserId)) -> bool| markers.iter().filter(|m| pick(m)).count();
    let (conv, sender) = markers[0].clone();
    let conv_hits = count(&|m| m.0 == conv) as u64;
    let sender_hits = count(&|m| m.1 == sender) as u64;
    let mut index_bytes = 0;
    for seg in &segments {
        let path =
            tidings_archive::storage::search_index_path(&seg.path).context("a segment path")?;
        index_bytes += objects.search_indexes().get(&path).await?.len() as u64;
    }
    let compliance = Compliance::new(
        store.clone(),
        log.keyring().clone(),
        Some(objects.clone()),
        Arc::default(),
    );
    let unindexed = Compliance::new(
        store.clone(),
        log.keyring().clone(),
        Some(objects),
        Arc::default(),
    )
    .without_index();
    Ok(Setup {
        log,
        tenant: corpus.tenant.clone(),
        compliance,
        unindexed,
        index_bytes,
        plain_files,
        events: args.events as u64,
        segments: segments.len(),
        archive_bytes: segments.iter().map(|s| s.bytes).sum(),
        plain_bytes,
        conv: (conv, conv_hits),
        sender: (sender, sender_hits),
        setup_s,
    })
}

/// Appends `messages` messages of the corpus (`markers_n` of them with the planted word,
/// spread evenly), then `edits` edits and `recalls` recalls of earlier ones by their authors.
/// Returns where the planted word went.
pub async fn append_corpus(
    log: &Log,
    corpus: &Corpus,
    [messages, markers_n, edits, recalls]: [usize; 4],
    rng: &mut fastrand::Rng,
    vocabulary: &[String],
) -> anyhow::Result<Vec<(ConvId, UserId)>> {
    let fates = edits + recalls;
    // Message i is planted if it is the middle of its marker stride, and becomes the target
    // of an edit or a recall if it is a third into its fate stride.
    let (marker_stride, fate_stride) = (messages / markers_n.max(1), messages / fates.max(1));
    let planted =
        |i: usize| i % marker_stride == marker_stride / 2 && i / marker_stride < markers_n;
    let targeted =
        |i: usize| fates > 0 && i % fate_stride == fate_stride / 3 && i / fate_stride < fates;

    let mut markers: Vec<(ConvId, UserId)> = Vec::with_capacity(markers_n);
    let mut targets: Vec<(ConvId, UserId)> = Vec::with_capacity(fates);
    let mut target_seqs: Vec<u64> = Vec::with_capacity(fates);
    let requests = (0..messages).map(|i| {
        let req = corpus.message(rng, |rng| {
            let text = chat_text(rng, vocabulary);
            if !planted(i) {
                return text;
            }
            let mut words: Vec<&str> = text.split(' ').collect();
            words.insert(rng.usize(..=words.len()), MARKER);
            words.join(" ")
        })?;
        if planted(i) {
            markers.push((req.conv.clone(), req.sender.clone()));
        }
        if targeted(i) {
            targets.push((req.conv.clone(), req.sender.clone()));
        }
        Ok(req)
    });
    append_pipelined(log, requests, |i, committed| {
        if targeted(i) {
            target_seqs.push(committed.seq);
        }
    })
    .await?;
    anyhow::ensure!(
        markers.len() == markers_n && targets.len() == fates,
        "planted {} of {} markers and {} of {fates} targets",
        markers.len(),
        markers_n,
        targets.len()
    );
    // Later edits and recalls by the authors, recalls spread evenly among them.
    let later = targets.into_iter().zip(target_seqs).enumerate().map(
        |(j, ((conv, sender), target_seq))| {
            let recall = (j + 1) * recalls / fates != j * recalls / fates;
            let body = if recall {
                Body::MessageRecalled(MessageRecalled { target_seq })
            } else {
                Body::MessageEdited(MessageEdited {
                    target_seq,
                    new_text: chat_text(rng, vocabulary),
                })
            };
            Ok(Append {
                tenant: corpus.tenant.clone(),
                conv,
                sender,
                client_msg_id: client_msg_id()?,
                body,
            })
        },
    );
    append_pipelined(log, later, |_, _| {}).await?;

    Ok(markers)
}

/// A sink that keeps only when the first and the last hit arrived.
struct Timed {
    started: Instant,
    first: Option<Duration>,
    last: Option<Duration>,
    hits: u64,
}

#[async_trait::async_trait]
impl Sink for Timed {
    async fn hit(&mut self, _hit: Hit) -> Result<(), ComplianceError> {
        let at = self.started.elapsed();
        self.first.get_or_insert(at);
        self.last = Some(at);
        self.hits += 1;
        Ok(())
    }
}

/// One audited search of the whole tenant for `needle`, optionally in one conversation or
/// from one sender.
async fn search(
    compliance: &Compliance,
    setup: &Setup,
    conv: Option<&ConvId>,
    sender: Option<&UserId>,
    needle: &str,
) -> anyhow::Result<Selective> {
    let query = Query {
        conv: conv.cloned(),
        sender: sender.cloned(),
        text: Some(needle.to_string()),
        ..Query::for_tenant(setup.tenant.clone())
    };
    let actor = Actor::new("bench", Via::Cli)?;
    let progress = Progress::default();
    let mut sink = Timed {
        started: Instant::now(),
        first: None,
        last: None,
        hits: 0,
    };
    let hits = compliance
        .search(&query, &actor, &Action::Search, &progress, &mut sink)
        .await?;
    let done = sink.started.elapsed();
    anyhow::ensure!(
        hits == sink.hits,
        "the search counted {hits} hits, the sink {}",
        sink.hits
    );
    Ok(Selective {
        timing: Timing {
            hits,
            first: sink.first.unwrap_or(done),
            last: done,
        },
        scanned: progress.scanned.load(Ordering::Relaxed),
        opened: progress.opened.load(Ordering::Relaxed),
    })
}

/// The baseline: every plaintext file read and every row group decoded, split over
/// `workers` threads; every body decoded and its text tested for `needle` (lowercase).
fn scan_plain(files: &[PathBuf], needle: &str, workers: usize) -> anyhow::Result<Timing> {
    let started = Instant::now();
    let mut hits = 0;
    let mut first: Option<Duration> = None;
    for path in files {
        let data = Fetched::whole(
            std::fs::read(path)
                .with_context(|| format!("read {}", path.display()))?
                .into(),
        );
        let footer = Footer::parse(&data)?;
        let next = AtomicUsize::new(0);
        let found = std::thread::scope(|scope| {
            let tasks: Vec<_> = (0..workers)
                .map(|_| scope.spawn(|| scan_row_groups(&footer, &data, &next, needle, started)))
                .collect();
            tasks
                .into_iter()
                .map(|t| {
                    t.join()
                        .map_err(|_| anyhow::anyhow!("a scan thread panicked"))?
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        for (n, at) in found {
            hits += n;
            first = match (first, at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
    let last = started.elapsed();
    Ok(Timing {
        hits,
        first: first.unwrap_or(last),
        last,
    })
}

/// Takes row groups from `next` until none is left; returns the matches and when the
/// first was found.
fn scan_row_groups(
    footer: &Footer,
    data: &Fetched,
    next: &AtomicUsize,
    needle: &str,
    started: Instant,
) -> anyhow::Result<(u64, Option<Duration>)> {
    let mut hits = 0;
    let mut first = None;
    loop {
        let rg = next.fetch_add(1, Ordering::Relaxed);
        if rg >= footer.meta.num_row_groups() {
            return Ok((hits, first));
        }
        let n = footer.meta.row_group(rg).num_rows() as usize;
        for row in format::read_rows(footer, data, rg, 0, n, false)? {
            let event = Event::decode(row.body.as_slice()).context("decode a plaintext body")?;
            if event_text(&event).is_some_and(|t| contains_folded(t, needle)) {
                hits += 1;
                first.get_or_insert_with(|| started.elapsed());
            }
        }
    }
}

/// Whether `text` contains `needle` (lowercase), ignoring case: ASCII folded in place,
/// other text lowercased first.
fn contains_folded(text: &str, needle: &str) -> bool {
    if !text.is_ascii() {
        return text.to_lowercase().contains(needle);
    }
    !needle.is_empty()
        && text
            .as_bytes()
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

fn report(args: &ComplianceArgs, setup: &Setup, runs: &[Run]) {
    let events = setup.events;
    let m = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    println!();
    println!(
        "search indexes: {} bytes, {:.1} per event (the sealed segments: {} bytes, {:.1} per \
         event)",
        setup.index_bytes,
        setup.index_bytes as f64 / events as f64,
        setup.archive_bytes,
        setup.archive_bytes as f64 / events as f64
    );
    println!(
        "| run | tidings events/s | baseline events/s | ratio | tidings first ms | baseline first \
         ms | ratio | tidings last ms | baseline last ms | ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    // Per run: events/s, first and last, each tidings, baseline and their ratio.
    let figures = |r: &Run| {
        let (t, b) = (r.tidings, r.baseline);
        [
            t.events_per_s(events),
            b.events_per_s(events),
            t.events_per_s(events) / b.events_per_s(events),
            ms(t.first),
            ms(b.first),
            t.first.as_secs_f64() / b.first.as_secs_f64(),
            ms(t.last),
            ms(b.last),
            t.last.as_secs_f64() / b.last.as_secs_f64(),
        ]
    };
    let row = |label: &str, f: [f64; 9]| {
        println!(
            "| {label} | {:.0} | {:.0} | {:.3} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.2} |",
            f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8]
        );
    };
    for (i, r) in runs.iter().enumerate() {
        row(&(i + 1).to_string(), figures(r));
    }
    let medians: [f64; 9] = std::array::from_fn(|k| m(&|r| figures(r)[k]));
    row("median", medians);

    println!();
    println!(
        "| search (text = the planted word) | hits | median ms | rows looked at (`scanned`) | rows decrypted (`opened`) |"
    );
    println!("|---|---:|---:|---:|---:|");
    type Pick = fn(&Run) -> Selective;
    let searches: [(String, Pick); 4] = [
        ("whole tenant".into(), |r| r.whole),
        ("whole tenant, without the index".into(), |r| r.unindexed),
        (format!("--conv {}", setup.conv.0), |r| r.by_conv),
        (format!("--sender {}", setup.sender.0), |r| r.by_sender),
    ];
    let mut selective = Vec::new();
    for (label, pick) in &searches {
        let s = pick(&runs[0]);
        let t = m(&|r| ms(pick(r).timing.last));
        println!(
            "| {label} | {} | {t:.1} | {} | {} |",
            s.timing.hits, s.scanned, s.opened
        );
        selective.push(json!({
            "search": label, "hits": s.timing.hits, "median_ms": t,
            "scanned": s.scanned, "opened": s.opened,
        }));
    }
    println!();
    println!(
        "{}",
        json!({
            "bench": "compliance",
            "events": events,
            "conversations": args.conversations,
            "planted": args.markers,
            "hot": args.hot,
            "hot_planted": args.hot_markers,
            "runs": runs.len(),
            "segments": setup.segments,
            "archive_bytes": setup.archive_bytes,
            "plain_bytes": setup.plain_bytes,
            "index_bytes": setup.index_bytes,
            "index_bytes_per_event": setup.index_bytes as f64 / events as f64,
            "setup_s": {
                "append": setup.setup_s[0],
                "archive": setup.setup_s[1],
                "plaintext": setup.setup_s[2],
                "hot": setup.setup_s[3],
            },
            "tidings": {
                "events_per_s": medians[0],
                "first_ms": medians[3],
                "last_ms": medians[6],
            },
            "baseline": {
                "events_per_s": medians[1],
                "first_ms": medians[4],
                "last_ms": medians[7],
            },
            "ratio": {
                "events_per_s": medians[2],
                "first": medians[5],
                "last": medians[8],
            },
            "selective": selective,
        })
    );
}

#[cfg(test)]
mod tests {
    use super::contains_folded;

    #[test]
    fn baseline_text_match_ignores_case() {
        assert!(contains_folded("see WyvernFjord now", "wyvernfjord"));
        assert!(!contains_folded("wyvern fjord", "wyvernfjord"));
        assert!(contains_folded("Ärger über WYVERNFJORD", "wyvernfjord"));
        assert!(!contains_folded("", "x"));
    }
}
