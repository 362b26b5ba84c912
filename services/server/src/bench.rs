//! `tidings bench append`: durable appends through the log, against the raw store in the
//! same run, on the configured backend (`store.backend`).
//!
//! For each conversation count, each run makes a fresh store on disk and drives `--messages`
//! appends of `--size`-byte texts from `--concurrency` tasks, each waiting for its ack
//! (durable) before sending the next: appends/s and ack latency. The baseline then writes the
//! same number of values of the same size, under the same kind of keys, straight into fjall
//! in batches of the mean group size tidings reached in that run, each batch fsync'd
//! (`PersistMode::SyncAll`) as tidings' are. The ratio tidings/raw is what the log's
//! sequencing, dedupe, sealing and bookkeeping cost over the bare store. Medians over
//! `--runs`.
//!
//! With `store.backend = "tikv"` each run works under a fresh key prefix
//! (`<key_prefix>bench-<random>/`) on the configured cluster, and the baseline is raw TiKV
//! optimistic transactions of plain puts (no checks, no reads), one per batch of the same
//! size, under another fresh prefix. The benchmark's keys are left in the cluster.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use fjall::{Database, KeyspaceCreateOptions, PersistMode};
use tidings_log::crypto::MasterKey;
use tidings_log::store::{FjallStore, KvStore, Transaction};
use tidings_log::{
    Append, ClientMsgId, ConvId, CreateConversation, Log, LogConfig, TenantId, UserId,
};

use crate::config::{Backend, Config};

/// Where the runs' stores come from.
enum Target {
    /// A fresh fjall store per run in a scratch directory; the baseline is raw fjall.
    Embedded(PathBuf),
    /// Fresh key prefixes on the configured cluster; the baseline is raw TiKV puts.
    #[cfg(feature = "tikv")]
    Tikv(tidings_log::store::TikvConfig),
}

impl Target {
    async fn fresh_tikv_store(&self, role: &str) -> anyhow::Result<Arc<dyn KvStore>> {
        match self {
            #[cfg(feature = "tikv")]
            Target::Tikv(cfg) => {
                let mut cfg = cfg.clone();
                cfg.key_prefix.extend_from_slice(
                    format!("bench-{:016x}/{role}/", fastrand::u64(..)).as_bytes(),
                );
                let store = tidings_log::store::TikvStore::connect(&cfg)
                    .await
                    .context("connect to the TiKV cluster")?;
                Ok(Arc::new(store))
            }
            _ => {
                let _ = role;
                anyhow::bail!("not a TiKV target")
            }
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct AppendArgs {
    /// Appends per run.
    #[arg(long, default_value_t = 20_000)]
    pub messages: usize,
    /// Conversation counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 100, 10_000])]
    pub conversations: Vec<usize>,
    /// Appenders running at once, each waiting for its ack before the next append.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Runs per conversation count; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Directory for the scratch stores; must be a real disk, since fsync is what is
    /// measured (default: the system temp directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

struct Run {
    appends_per_s: f64,
    p50: Duration,
    p99: Duration,
    mean_group: f64,
    raw_per_s: f64,
}

pub async fn append(args: AppendArgs, config: &Config) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.messages > 0 && args.concurrency > 0 && args.runs > 0,
        "messages, concurrency and runs must be positive"
    );
    let target = match config.backend()? {
        Backend::Embedded => {
            let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
            std::fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
            println!(
                "backend: embedded (fjall, a fresh store per run under {}); baseline: raw fjall \
                 batches, fsync'd",
                base.display()
            );
            Target::Embedded(base)
        }
        #[cfg(feature = "tikv")]
        Backend::Tikv => {
            let cfg = config.tikv_config()?;
            println!(
                "backend: tikv (PD {}, a fresh key prefix per run under {:?}); baseline: raw \
                 TiKV optimistic transactions of puts",
                cfg.pd_endpoints.join(","),
                String::from_utf8_lossy(&cfg.key_prefix)
            );
            Target::Tikv(cfg)
        }
        #[cfg(not(feature = "tikv"))]
        Backend::Tikv => anyhow::bail!(
            "store.backend is \"tikv\" but this tidings was built without TiKV support; \
             rebuild it with `cargo build --release --features tikv`"
        ),
    };
    let raw_name = match target {
        Target::Embedded(_) => "raw fjall inserts/s",
        #[cfg(feature = "tikv")]
        Target::Tikv(_) => "raw tikv puts/s",
    };
    println!(
        "tidings bench append: {} appends of {} bytes, {} appenders, {} runs per row, {} cores",
        args.messages,
        args.size,
        args.concurrency,
        args.runs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!(
        "| conversations | tidings appends/s | ack p50 | ack p99 | mean group | {raw_name} | ratio |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for &convs in &args.conversations {
        anyhow::ensure!(convs > 0, "conversation counts must be positive");
        let mut runs = Vec::new();
        for _ in 0..args.runs {
            runs.push(one_run(&args, convs, &target, config.log_config()).await?);
        }
        let median_of = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
        println!(
            "| {convs} | {:.0} | {:.2} ms | {:.2} ms | {:.0} | {:.0} | {:.2}x |",
            median_of(&|r| r.appends_per_s),
            median_of(&|r| r.p50.as_secs_f64() * 1e3),
            median_of(&|r| r.p99.as_secs_f64() * 1e3),
            median_of(&|r| r.mean_group),
            median_of(&|r| r.raw_per_s),
            median_of(&|r| r.appends_per_s / r.raw_per_s),
        );
    }
    Ok(())
}

fn text_of(size: usize, i: usize) -> String {
    // Varied, incompressible-ish ASCII so neither side benefits from repetition.
    let mut state = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (b'a' + (state % 26) as u8) as char
        })
        .collect()
}

async fn one_run(
    args: &AppendArgs,
    convs: usize,
    target: &Target,
    log_config: LogConfig,
) -> anyhow::Result<Run> {
    let dir = match target {
        Target::Embedded(base) => Some(
            tempfile::Builder::new()
                .prefix("tidings-bench-")
                .tempdir_in(base)
                .context("create scratch dir")?,
        ),
        #[cfg(feature = "tikv")]
        Target::Tikv(_) => None,
    };
    let tenant = TenantId::new("bench")?;
    let user = UserId::new("writer")?;
    let conv_ids: Arc<Vec<ConvId>> = Arc::new(
        (0..convs)
            .map(|i| ConvId::new(format!("c{i}")))
            .collect::<Result<_, _>>()?,
    );

    let store: Arc<dyn KvStore> = match &dir {
        Some(dir) => Arc::new(FjallStore::open(&dir.path().join("tidings"))?),
        None => target.fresh_tikv_store("log").await?,
    };
    let log = Log::open(store, MasterKey::generate(), log_config).await?;
    let mut creates = tokio::task::JoinSet::new();
    for conv in conv_ids.iter().cloned() {
        let (log, tenant, user) = (log.clone(), tenant.clone(), user.clone());
        creates.spawn(async move {
            log.create_conversation(CreateConversation {
                tenant,
                conv,
                kind: "group".into(),
                title: String::new(),
                creator: user,
                members: vec![],
            })
            .await
        });
    }
    while let Some(r) = creates.join_next().await {
        r??;
    }

    // Requests are made before the clock starts, as the baseline's values are.
    let reqs: Arc<Vec<Append>> = Arc::new(
        (0..args.messages)
            .map(|i| {
                Ok(Append::text(
                    tenant.clone(),
                    conv_ids[i % conv_ids.len()].clone(),
                    user.clone(),
                    ClientMsgId::new(format!("m{i}"))?,
                    text_of(args.size, i),
                ))
            })
            .collect::<anyhow::Result<_>>()?,
    );
    let (commits0, requests0) = log.stats();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (log, reqs, next) = (log.clone(), reqs.clone(), next.clone());
        workers.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(req) = reqs.get(i) else {
                    return anyhow::Ok(latencies);
                };
                let t0 = Instant::now();
                log.append(req.clone()).await?;
                latencies.push(t0.elapsed());
            }
        });
    }
    let mut latencies = Vec::with_capacity(args.messages);
    while let Some(r) = workers.join_next().await {
        latencies.extend(r??);
    }
    let elapsed = started.elapsed();
    let (commits, requests) = log.stats();
    log.close().await;
    latencies.sort();
    let mean_group = (requests - requests0) as f64 / (commits - commits0).max(1) as f64;

    let group = mean_group.round().max(1.0) as usize;
    let raw_per_s = match &dir {
        Some(dir) => raw_fjall(
            &dir.path().join("raw"),
            args.messages,
            args.size,
            convs,
            group,
        )?,
        None => {
            let raw = target.fresh_tikv_store("raw").await?;
            raw_store_puts(&*raw, args.messages, args.size, convs, group).await?
        }
    };
    Ok(Run {
        appends_per_s: args.messages as f64 / elapsed.as_secs_f64(),
        p50: quantile(&latencies, 0.50),
        p99: quantile(&latencies, 0.99),
        mean_group,
        raw_per_s,
    })
}

/// The same values under the same keys as [`raw_fjall`], as plain puts, one store
/// transaction per batch of `group` (on TiKV: one optimistic transaction, no checks).
async fn raw_store_puts(
    store: &dyn KvStore,
    messages: usize,
    size: usize,
    convs: usize,
    group: usize,
) -> anyhow::Result<f64> {
    let values = baseline_values(messages, size, convs);
    let started = Instant::now();
    for chunk in values.chunks(group) {
        let mut txn = Transaction::new();
        for (k, v) in chunk {
            txn.put(k.clone(), v.as_bytes().to_vec());
        }
        store.commit(txn).await?;
    }
    Ok(messages as f64 / started.elapsed().as_secs_f64())
}

fn baseline_values(messages: usize, size: usize, convs: usize) -> Vec<(Vec<u8>, String)> {
    (0..messages)
        .map(|i| {
            let mut key = format!("ev\0bench\0c{}\0", i % convs).into_bytes();
            key.extend_from_slice(&((i / convs) as u64 + 2).to_be_bytes());
            (key, text_of(size, i))
        })
        .collect()
}

/// The baseline: the same values under `ev`-shaped keys, in fsync'd batches of `group`.
fn raw_fjall(
    path: &std::path::Path,
    messages: usize,
    size: usize,
    convs: usize,
    group: usize,
) -> anyhow::Result<f64> {
    let db = Database::builder(path).open()?;
    let data = db.keyspace("data", KeyspaceCreateOptions::default)?;
    let values = baseline_values(messages, size, convs);
    let started = Instant::now();
    for chunk in values.chunks(group) {
        let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
        for (k, v) in chunk {
            batch.insert(&data, k.as_slice(), v.as_bytes());
        }
        batch.commit()?;
    }
    Ok(messages as f64 / started.elapsed().as_secs_f64())
}

/// `count` groups `c0`, `c1`, ... of `tenant`, created by `creator` alone.
pub async fn groups(
    log: &tidings_log::Log,
    tenant: &tidings_log::TenantId,
    creator: &tidings_log::UserId,
    count: usize,
) -> anyhow::Result<Vec<tidings_log::ConvId>> {
    let mut convs = Vec::with_capacity(count);
    for i in 0..count {
        let conv = tidings_log::ConvId::new(format!("c{i}"))?;
        log.create_conversation(tidings_log::CreateConversation {
            tenant: tenant.clone(),
            conv: conv.clone(),
            kind: "group".into(),
            title: String::new(),
            creator: creator.clone(),
            members: Vec::new(),
        })
        .await?;
        convs.push(conv);
    }
    Ok(convs)
}

/// A fresh scratch directory `tidings-bench-<name>-…` under `dir` (default: the system temp
/// directory), removed when dropped; and the directory it is under, for the report.
pub fn scratch_dir(
    dir: Option<&std::path::Path>,
    name: &str,
) -> anyhow::Result<(std::path::PathBuf, tempfile::TempDir)> {
    use anyhow::Context as _;
    let base = dir.map_or_else(std::env::temp_dir, std::path::Path::to_path_buf);
    std::fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix(&format!("tidings-bench-{name}-"))
        .tempdir_in(&base)
        .context("create scratch dir")?;
    Ok((base, scratch))
}

/// The median of `v`: its [`quantile`] 0.5 (the lower middle of an even count; zero for none).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    quantile(&v, 0.5)
}

/// The `q`-quantile (0 to 1) of sorted samples by nearest rank: the smallest sample with at
/// least a `q` share of all samples at or below it (of 1..=100, p50 is 50 and p99 is 99; of
/// 1..=4, the median is 2). Every bench prints its percentiles and medians with this one rule,
/// so their figures compare. `T::default()` (zero) for no samples.
pub(crate) fn quantile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    let n = sorted.len();
    if n == 0 {
        return T::default();
    }
    // The rank is ceil(q * n), 1-based; the small margin keeps float error (0.07 * 100 =
    // 7.000000000000001) from moving it up by one.
    let rank = (q.clamp(0.0, 1.0) * n as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// This process's peak resident set (VmHWM), KiB; 0 where /proc is not there.
pub(crate) fn peak_rss_kib() -> u64 {
    peak_rss_kib_of("self")
}

/// The peak resident set (VmHWM) of process `pid` ("self": this one), KiB; 0 where /proc is
/// not there.
pub(crate) fn peak_rss_kib_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let hundred: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&hundred, 0.5), 50);
        assert_eq!(quantile(&hundred, 0.99), 99);
        assert_eq!(quantile(&hundred, 0.999), 100);
        assert_eq!(quantile(&hundred, 1.0), 100);
        assert_eq!(quantile(&hundred, 0.0), 1);
        // 0.07 * 100 is 7.000000000000001 in floating point: still the 7th.
        assert_eq!(quantile(&hundred, 0.07), 7);
        assert_eq!(quantile(&[7u32], 0.99), 7);
        assert_eq!(quantile::<u32>(&[], 0.5), 0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(Vec::new()), 0.0);
    }
}
