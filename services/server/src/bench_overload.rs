//! `tidings bench overload`: one hot group flooding far past the log writer's capacity
//! while many small conversations send steadily, against the same small conversations alone
//! in the same run (docs/decisions/overload-admission.md).
//!
//! One fresh fjall store on disk and one log with `capacity_per_sec` configured. Sends are
//! open-loop (issued on a 10 ms clock whatever the acks do, as independent users would):
//! phase 1, the small conversations alone at `--small-rate` messages/s in all; phase 2, the
//! same plus one hot group at `--hot-factor` × the capacity. Reported: the small
//! conversations' send→ack p50/p99 in both phases and their ratio, what the hot group got
//! through and how much was refused, total goodput against the capacity, and the process's
//! peak RSS. The log in process, no gateway and no online sessions, so latency is send→ack;
//! `--through-gateway` runs the setup end to end instead (`bench_overload_gateway`).

use crate::bench::{peak_rss_kib, quantile};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tidings_log::crypto::MasterKey;
use tidings_log::overload::OverloadConfig;
use tidings_log::store::{FjallStore, KvStore};
use tidings_log::{
    Append, ClientMsgId, ConvId, CreateConversation, Log, LogConfig, LogError, TenantId, UserId,
};

#[derive(Debug, clap::Args)]
pub struct OverloadArgs {
    /// The writer's configured capacity, appends/s [default: 2000; through the gateway 55].
    #[arg(long)]
    pub capacity: Option<u32>,
    /// The hot group's send rate, as a multiple of the capacity.
    #[arg(long, default_value_t = 3.0)]
    pub hot_factor: f64,
    /// Small conversations.
    #[arg(long, default_value_t = 1000)]
    pub conversations: usize,
    /// Messages a second of all the small conversations together [default: 500; through
    /// the gateway 50].
    #[arg(long)]
    pub small_rate: Option<f64>,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Directory for the scratch store (default: the system temp directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// End to end: a real `tidings serve` and nats-server, the hot group's members all
    /// online as WebSocket sessions, latency from send to the other member's push
    /// (`bench_overload_gateway`).
    #[arg(long)]
    pub through_gateway: bool,
    /// Through the gateway: members of the hot group, all online.
    #[arg(long, default_value_t = 10_000)]
    pub members: usize,
    /// Through the gateway: members of the hot group who send the flood.
    #[arg(long, default_value_t = 100)]
    pub hot_senders: usize,
    /// Through the gateway: appends a second any conversation keeps however overloaded the
    /// writer is (`log.overload_floor_per_sec`; in process the config's).
    #[arg(long, default_value_t = 1)]
    pub floor: u32,
    /// Through the gateway: pushes a second the deployment carries
    /// (`log.overload_fanout_per_sec`: an append to the group is `--members` pushes); 0: the
    /// fan-out is not weighed, only appends count.
    #[arg(long, default_value_t = 20_000)]
    pub fanout: u64,
    /// Through the gateway: pushes a second per core the gateway spends on big groups'
    /// fan-outs (`gateway.fan_out_pushes_per_core`; 0: not paced) [default: the gateway's].
    #[arg(long)]
    pub pace: Option<u64>,
    /// Through the gateway: rounds of the two phases on the same deployment; the summary is
    /// the median of the rounds' ratios.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

#[derive(Default)]
struct Phase {
    small: Vec<Duration>,
    small_limited: usize,
    hot_acked: usize,
    hot_limited: usize,
    errors: usize,
    elapsed: Duration,
}

enum Outcome {
    Small(Result<Duration, LogError>),
    Hot(Result<Duration, LogError>),
}

impl Phase {
    fn record(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Small(Ok(latency)) => self.small.push(latency),
            Outcome::Small(Err(e)) if e.code() == "rate_limited" => self.small_limited += 1,
            Outcome::Hot(Ok(_)) => self.hot_acked += 1,
            Outcome::Hot(Err(e)) if e.code() == "rate_limited" => self.hot_limited += 1,
            Outcome::Small(Err(_)) | Outcome::Hot(Err(_)) => self.errors += 1,
        }
    }
}

impl OverloadArgs {
    /// What both runs (in process and through the gateway) need of their arguments.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.capacity != Some(0) && self.conversations > 0 && self.seconds > 0,
            "capacity, conversations and seconds must be positive"
        );
        Ok(())
    }
}

pub async fn run(args: OverloadArgs, log_config: LogConfig) -> anyhow::Result<()> {
    args.check()?;
    let capacity = args.capacity.unwrap_or(2000);
    let small_rate = args.small_rate.unwrap_or(500.0);
    let (base, dir) = crate::bench::scratch_dir(args.dir.as_deref(), "overload")?;
    let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(&dir.path().join("kv"))?);
    let cfg = LogConfig {
        overload: OverloadConfig {
            capacity_per_sec: capacity,
            ..log_config.overload.clone()
        },
        send_buffer: None,
        ..log_config
    };
    let log = Log::open(store, MasterKey::generate(), cfg).await?;
    let tenant = TenantId::new("bench")?;
    let sender = UserId::new("alice")?;
    let small: Vec<ConvId> = (0..args.conversations)
        .map(|i| ConvId::new(format!("s{i}")))
        .collect::<Result<_, _>>()?;
    let hot = ConvId::new("hot")?;
    for conv in small.iter().chain([&hot]) {
        log.create_conversation(CreateConversation {
            tenant: tenant.clone(),
            conv: conv.clone(),
            kind: "group".into(),
            title: String::new(),
            creator: sender.clone(),
            members: Vec::new(),
        })
        .await?;
    }
    println!(
        "tidings bench overload: capacity {}/s, hot group at {}x, {} small conversations at \
         {}/s in all, {} s per phase, {} cores; fjall under {}",
        capacity,
        args.hot_factor,
        args.conversations,
        small_rate,
        args.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        base.display()
    );
    let ctx = Ctx {
        log: log.clone(),
        tenant,
        sender,
        small,
        hot,
    };
    // One unmeasured append in each small conversation first: the writer's first append to a
    // conversation reads its head from the store, a cost of neither phase.
    for (i, conv) in ctx.small.iter().enumerate() {
        let id = ClientMsgId::new(format!("w{i}"))?;
        let req = Append::text(
            ctx.tenant.clone(),
            conv.clone(),
            ctx.sender.clone(),
            id,
            "w",
        );
        ctx.log.append(req).await?;
    }
    let baseline = drive(&ctx, &args, small_rate, 0.0, "b").await?;
    // Two idle windows: the flood starts from a writer that limits nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hot_rate = args.hot_factor * f64::from(capacity);
    let flood = drive(&ctx, &args, small_rate, hot_rate, "f").await?;
    let stats = log.overload_stats();
    use std::sync::atomic::Ordering::Relaxed;
    println!();
    println!(
        "| phase | small sends | small limited | small p50 | small p99 | hot acked/s | hot \
         limited/s | goodput/s | errors |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, p) in [("small only", &baseline), ("small + hot flood", &flood)] {
        let secs = p.elapsed.as_secs_f64();
        println!(
            "| {name} | {} | {} | {:.2} ms | {:.2} ms | {:.0} | {:.0} | {:.0} | {} |",
            p.small.len(),
            p.small_limited,
            quantile(&p.small, 0.50).as_secs_f64() * 1e3,
            quantile(&p.small, 0.99).as_secs_f64() * 1e3,
            p.hot_acked as f64 / secs,
            p.hot_limited as f64 / secs,
            (p.small.len() + p.hot_acked) as f64 / secs,
            p.errors
        );
    }
    let ratio = quantile(&flood.small, 0.99).as_secs_f64()
        / quantile(&baseline.small, 0.99).as_secs_f64().max(1e-9);
    let goodput =
        (flood.small.len() + flood.hot_acked) as f64 / flood.elapsed.as_secs_f64().max(1e-9);
    println!();
    println!(
        "small p99 under the flood / without it: {ratio:.2}x (target <= 2x); goodput {:.0}/s = \
         {:.0}% of the capacity (target >= 90%); limited: {} standard, {} vip, in {} windows; \
         peak RSS {} MiB",
        goodput,
        100.0 * goodput / f64::from(capacity),
        stats.limited_standard.load(Relaxed),
        stats.limited_vip.load(Relaxed),
        stats.limiting_windows.load(Relaxed),
        peak_rss_kib() / 1024
    );
    // The context holds a handle of the log: while it lives, the sequencer waits for more
    // commands and `close` would wait for ever.
    drop(ctx);
    log.close().await;
    Ok(())
}

struct Ctx {
    log: Log,
    tenant: TenantId,
    sender: UserId,
    small: Vec<ConvId>,
    hot: ConvId,
}

/// One phase: small sends at `small_rate`, hot sends at `hot_rate`, open-loop on a
/// 10 ms clock, each send its own task; then every outstanding send is awaited.
async fn drive(
    ctx: &Ctx,
    args: &OverloadArgs,
    small_rate: f64,
    hot_rate: f64,
    tag: &str,
) -> anyhow::Result<Phase> {
    const TICK: Duration = Duration::from_millis(10);
    let text = "x".repeat(100);
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (mut small_owed, mut hot_owed) = (0.0f64, 0.0f64);
    let (mut next_small, mut next_hot) = (0usize, 0usize);
    let mut phase = Phase::default();
    let started = Instant::now();
    let end = started + Duration::from_secs(args.seconds);
    while Instant::now() < end {
        tick.tick().await;
        // Finished sends are collected as they finish: a task kept until the phase ends
        // holds its whole future, and 60,000 of them made the generator's page faults, not
        // the log, the largest cost of the run (and its peak RSS).
        while let Some(done) = tasks.try_join_next() {
            phase.record(done.context("a sender panicked")?);
        }
        small_owed += small_rate * TICK.as_secs_f64();
        hot_owed += hot_rate * TICK.as_secs_f64();
        while small_owed >= 1.0 {
            small_owed -= 1.0;
            let conv = ctx.small[next_small % ctx.small.len()].clone();
            let id = ClientMsgId::new(format!("{tag}s{next_small}"))?;
            next_small += 1;
            let req = Append::text(ctx.tenant.clone(), conv, ctx.sender.clone(), id, &text);
            let log = ctx.log.clone();
            tasks.spawn(async move { Outcome::Small(timed(&log, req).await) });
        }
        while hot_owed >= 1.0 {
            hot_owed -= 1.0;
            let id = ClientMsgId::new(format!("{tag}h{next_hot}"))?;
            next_hot += 1;
            let req = Append::text(
                ctx.tenant.clone(),
                ctx.hot.clone(),
                ctx.sender.clone(),
                id,
                &text,
            );
            let log = ctx.log.clone();
            tasks.spawn(async move { Outcome::Hot(timed(&log, req).await) });
        }
    }
    while let Some(done) = tasks.join_next().await {
        phase.record(done.context("a sender panicked")?);
    }
    phase.elapsed = started.elapsed();
    phase.small.sort_unstable();
    Ok(phase)
}

async fn timed(log: &Log, req: Append) -> Result<Duration, LogError> {
    let t0 = Instant::now();
    log.append_for_user(req).await.map(|_| t0.elapsed())
}
