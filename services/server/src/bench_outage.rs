//! `tidings bench outage`: sending through a KV outage, against normal operation in the same
//! run (docs/decisions/send-buffer.md).
//!
//! One fresh fjall store on disk wrapped in the fault-injecting store, a send buffer next to
//! it. `--conversations` groups get one append each (so the writer has them in memory), then
//! `--messages` appends of `--size` bytes from `--concurrency` tasks, each waiting for its
//! ack: first with the store up (group commits), then with the store unavailable (reads and
//! commits refused: every ack comes from the send buffer's fsync). Then the store comes back
//! and the replay is timed until the buffer is empty: events replayed per second.
//!
//! `--medium jetstream` keeps the buffer on a JetStream file stream of a nats-server the
//! bench starts on loopback (the medium of writers on several hosts) instead of files.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tidings_log::crypto::MasterKey;
use tidings_log::send_buffer::{BufferPlace, SendBufferConfig};
use tidings_log::store::{Fault, FaultSwitch, FaultyStore, FjallStore, KvStore};
use tidings_log::{Append, ClientMsgId, ConvId, Log, LogConfig, TenantId, UserId};
use tidings_log_role::send_buffer_stream::{StreamBuffer, StreamBufferConfig};

use crate::bench::quantile;

#[derive(Debug, clap::Args)]
pub struct OutageArgs {
    /// Appends per phase (normal, outage).
    #[arg(long, default_value_t = 20_000)]
    pub messages: usize,
    /// Conversations the appends spread over.
    #[arg(long, default_value_t = 100)]
    pub conversations: usize,
    /// Appenders running at once, each waiting for its ack before the next append.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Where the send buffer lives: `files` (fsynced, on `--dir`'s disk) or `jetstream` (a
    /// file stream, R1, of a nats-server the bench starts, storing on the same disk).
    #[arg(long, value_enum, default_value_t = BufferMedium::Files)]
    pub medium: BufferMedium,
    /// Directory for the scratch store and buffer; a real disk, since fsync is measured
    /// (default: the system temp directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BufferMedium {
    Files,
    Jetstream,
}

struct Phase {
    per_s: f64,
    p50: Duration,
    p99: Duration,
    /// Appends refused (retryably) and sent again.
    retries: usize,
}

pub async fn run(args: OutageArgs, log_config: LogConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.messages > 0 && args.concurrency > 0 && args.conversations > 0,
        "messages, concurrency and conversations must be positive"
    );
    let (base, dir) = crate::bench::scratch_dir(args.dir.as_deref(), "outage")?;
    let inner: Arc<dyn KvStore> = Arc::new(FjallStore::open(&dir.path().join("kv"))?);
    let switch = Arc::new(FaultSwitch::default());
    let store: Arc<dyn KvStore> = Arc::new(FaultyStore::new(inner, switch.clone()));
    let (place, _nats) = match args.medium {
        BufferMedium::Files => (BufferPlace::Dir(dir.path().join("send-buffer")), None),
        BufferMedium::Jetstream => {
            let (url, child) = crate::bench_gateway::start_plain_nats(dir.path()).await?;
            let client = async_nats::connect(&url).await?;
            let stream = StreamBuffer::open(
                client,
                StreamBufferConfig {
                    replicas: 1,
                    max_bytes: -1,
                    ack_timeout: Duration::from_secs(10),
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("open the send buffer stream: {e}"))?;
            (BufferPlace::Medium(Arc::new(stream)), Some(child))
        }
    };
    let cfg = LogConfig {
        send_buffer: Some(SendBufferConfig {
            place,
            // Room for the whole outage phase.
            max_bytes: (args.messages as u64 * (args.size as u64 + 512)).max(256 << 20),
            max_age: Duration::from_secs(3600),
        }),
        ..log_config
    };
    let log = Log::open(store, MasterKey::generate(), cfg).await?;
    let tenant = TenantId::new("bench")?;
    let sender = UserId::new("alice")?;
    let convs = crate::bench::groups(&log, &tenant, &sender, args.conversations).await?;
    for conv in &convs {
        log.append(Append::text(
            tenant.clone(),
            conv.clone(),
            sender.clone(),
            ClientMsgId::new("warm")?,
            "warm",
        ))
        .await?;
    }
    println!(
        "tidings bench outage: {} appends of {} bytes per phase over {} conversations, {} \
         appenders, {} cores; fjall and the send buffer ({:?}) under {}",
        args.messages,
        args.size,
        args.conversations,
        args.concurrency,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.medium,
        base.display()
    );
    let normal = drive(&log, &args, &tenant, &sender, &convs, "n").await?;
    switch.set(Fault::Unavailable);
    let outage = drive(&log, &args, &tenant, &sender, &convs, "o").await?;
    let buffered = log.send_buffer_stats().map_or(0, |s| s.events);
    switch.set(Fault::Ok);
    let started = Instant::now();
    while log.send_buffer_stats().is_some_and(|s| s.events > 0) {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the buffer was not replayed in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let replay = started.elapsed();
    println!();
    println!("| phase | appends/s | ack p50 | ack p99 | retried |");
    println!("|---|---:|---:|---:|---:|");
    for (name, p) in [("store up", &normal), ("store unavailable", &outage)] {
        println!(
            "| {name} | {:.0} | {:.2} ms | {:.2} ms | {} |",
            p.per_s,
            p.p50.as_secs_f64() * 1e3,
            p.p99.as_secs_f64() * 1e3,
            p.retries
        );
    }
    println!();
    println!(
        "replay: {buffered} events in {:.2} s after the store came back (probe every 200 ms): \
         {:.0} events/s",
        replay.as_secs_f64(),
        buffered as f64 / replay.as_secs_f64().max(1e-9)
    );
    log.close().await;
    Ok(())
}

/// `args.messages` appends from `args.concurrency` tasks; retryable refusals are sent again
/// (the batch that meets the outage fails whole, as clients see).
async fn drive(
    log: &Log,
    args: &OutageArgs,
    tenant: &TenantId,
    sender: &UserId,
    convs: &[ConvId],
    tag: &str,
) -> anyhow::Result<Phase> {
    let next = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let text: String = "x".repeat(args.size);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (log, next, retries, text) = (log.clone(), next.clone(), retries.clone(), text.clone());
        let (tenant, sender, convs) = (tenant.clone(), sender.clone(), convs.to_vec());
        let (total, tag) = (args.messages, tag.to_string());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(latencies);
                }
                let conv = convs[i % convs.len()].clone();
                let id = ClientMsgId::new(format!("{tag}{i}"))?;
                let t0 = Instant::now();
                loop {
                    let req = Append::text(
                        tenant.clone(),
                        conv.clone(),
                        sender.clone(),
                        id.clone(),
                        text.clone(),
                    );
                    match log.append(req).await {
                        Ok(_) => break,
                        Err(e) if e.is_retryable() => {
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                latencies.push(t0.elapsed());
            }
        });
    }
    let mut all = Vec::with_capacity(args.messages);
    while let Some(done) = tasks.join_next().await {
        all.extend(done.context("an appender panicked")??);
    }
    let elapsed = started.elapsed();
    all.sort_unstable();
    Ok(Phase {
        per_s: args.messages as f64 / elapsed.as_secs_f64(),
        p50: quantile(&all, 0.50),
        p99: quantile(&all, 0.99),
        retries: retries.load(Ordering::Relaxed),
    })
}
