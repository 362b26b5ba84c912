//! `tidings bench overload --through-gateway`: the flood of `tidings bench overload`, end to
//! end. A real nats-server and `tidings serve --role all` on a fresh store; a group of
//! `--members` members, **all online** (one WebSocket session each), some of whom flood it
//! at `--hot-factor` × the writer's capacity; `--conversations` small conversations of two
//! online members each, sending steadily. Phase 1: the small conversations alone (the group's
//! members online and idle); phase 2, same run: plus the flood.
//!
//! Measured per small message: from the send call to the other member's push (send→push);
//! and the flood's own send→push at its senders' sessions (what pacing costs the group).
//! The small conversations' clients run on a runtime thread of their own, as people on other
//! devices would: otherwise the measurement would wait behind the bench's own 10,000 group
//! clients reading their pushes, which is the client machine's cost, not the server's.
//!
//! The group's capacity here is a few messages a second, not the in-process bench's 2,000:
//! each admitted message to a group of 10,000 online members is 10,000 pushes, and on the
//! machine this runs on the gateway, the server and the 12,000 client sessions share two
//! cores. The writer's capacity is configured to what the deployment carries.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context;
use tidings_client::{ClientError, Connection, Push, Requester};
use tidings_log::crypto::MasterKey;
use tidings_log::store::{FjallStore, KvStore};
use tidings_log::{ConvId, CreateConversation, Log, TenantId, UserId};
use tidings_schemas::client::ErrorCode;
use tokio::sync::{Semaphore, watch};

use crate::bench::{peak_rss_kib, quantile};
use crate::bench_gateway::{Deployment, Secrets, Tokens, Variant, deploy};
use crate::bench_overload::OverloadArgs;

/// The clock every phase ticks on: sends are issued open-loop, whatever the acks do.
const TICK: Duration = Duration::from_millis(10);

/// Sessions opened at once while connecting the group's members.
const CONNECTING_AT_ONCE: usize = 64;

/// Which phase of which round a small message was sent in: round `r`'s phase 1 is slot
/// `2r`, its phase 2 (the flood) slot `2r + 1`.
type Slot = usize;

fn is_flood(slot: Slot) -> bool {
    slot % 2 == 1
}

/// What the small conversations' thread measured, per slot.
#[derive(Default)]
struct Small {
    /// send→push latencies, sorted.
    latencies: Vec<Vec<Duration>>,
    sent: Vec<u64>,
    /// What became of the sends.
    counts: Arc<Vec<Counts>>,
    elapsed: Vec<Duration>,
}

/// The flood's send→push latency, as the senders' own sessions see it: the 100 senders are
/// members too, at places in the fan-out's order that nothing chose, so their pushes sample
/// how long the group's members wait for a message (what pacing costs the big group).
#[derive(Clone, Default)]
struct GroupClock {
    clock: Arc<std::sync::OnceLock<Instant>>,
    latencies: Arc<std::sync::Mutex<Vec<Duration>>>,
}

impl GroupClock {
    fn now_ns(&self) -> u64 {
        self.clock.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }

    /// A push of a flood message: `hot:{ns}` on the clock.
    fn arrived(&self, text: &str) {
        if let Some(at) = text
            .strip_prefix("hot:")
            .and_then(|t| t.parse::<u64>().ok())
        {
            let latency = Duration::from_nanos(self.now_ns().saturating_sub(at));
            self.latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(latency);
        }
    }
}

/// What one round's flood got.
#[derive(Default)]
struct Hot {
    sends: Counts,
    time: Duration,
    /// Group pushes received while it ran.
    pushes: u64,
}

pub async fn run(args: &OverloadArgs) -> anyhow::Result<()> {
    args.check()?;
    anyhow::ensure!(
        args.members >= 2 && args.hot_senders >= 1 && args.hot_senders <= args.members,
        "--members must be at least 2 and --hot-senders between 1 and --members"
    );
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let capacity = args.capacity.unwrap_or(55);
    let small_rate = args.small_rate.unwrap_or(50.0);
    let (base, dir) = crate::bench::scratch_dir(args.dir.as_deref(), "overload-gw")?;
    let root = dir.path();
    let master = MasterKey::generate();
    let Secrets {
        master_file,
        jwt_file,
        tokens,
    } = Secrets::write(root, &master.to_hex())?;
    let tokens = Arc::new(tokens);
    let data = root.join("data");
    seed(&data, &master, args).await?;

    let capacity_env = capacity.to_string();
    let floor_env = args.floor.to_string();
    let fanout_env = args.fanout.to_string();
    let sessions_env = (args.members + 2 * args.conversations + 16).to_string();
    let pace = args
        .pace
        .unwrap_or(tidings_gateway::GatewayConfig::default().fan_out_pushes_per_core);
    let pace_env = pace.to_string();
    let dep = deploy(
        root,
        &data,
        Variant::PLAIN,
        (&master_file, &jwt_file),
        &[
            ("TIDINGS_LOG_CAPACITY_PER_SEC", &capacity_env),
            ("TIDINGS_LOG_OVERLOAD_FLOOR_PER_SEC", &floor_env),
            ("TIDINGS_LOG_OVERLOAD_FANOUT_PER_SEC", &fanout_env),
            ("TIDINGS_GATEWAY_FAN_OUT_PUSHES_PER_CORE", &pace_env),
            ("TIDINGS_GATEWAY_MAX_CONNECTIONS_PER_IP", &sessions_env),
        ],
    )
    .await?;
    println!(
        "tidings bench overload --through-gateway: capacity {capacity}/s (floor {}/s), fan-out \
         budget {} pushes/s, big groups' fan-outs paced at {pace} pushes/s per core, a group of {} members all online, {} of them flooding it at {}x, {} small conversations at \
         {small_rate}/s in all, {} rounds of {} s without and {} s with the flood, {} cores; \
         data under {}",
        args.floor,
        args.fanout,
        args.members,
        args.hot_senders,
        args.hot_factor,
        args.conversations,
        args.rounds,
        args.seconds,
        args.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        base.display()
    );

    let started = Instant::now();
    let pushes = Arc::new(AtomicU64::new(0));
    let group = GroupClock::default();
    let senders = connect_group(&dep, args, &tokens, &pushes, &group).await?;
    println!(
        "{} group members online in {:.1} s",
        args.members,
        started.elapsed().as_secs_f64()
    );

    // The small conversations on a thread of their own; it says when each flood starts and
    // stops, and hands back what it measured.
    let (phase_tx, mut phase_rx) = watch::channel(None::<Slot>);
    let small = {
        let (url, tls, tokens) = (dep.url.clone(), dep.client_tls.clone(), tokens.clone());
        let plan = Plan {
            conversations: args.conversations,
            rate: small_rate,
            seconds: args.seconds,
            rounds: args.rounds,
        };
        std::thread::Builder::new()
            .name("small-conversations".into())
            .spawn(move || -> anyhow::Result<Small> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(small_conversations(&url, &tls, &tokens, &plan, &phase_tx))
            })?
    };

    let hot_rate = args.hot_factor * f64::from(capacity);
    let mut floods = Vec::new();
    loop {
        if phase_rx.changed().await.is_err() {
            break; // the small thread ended (its result says how)
        }
        let now = *phase_rx.borrow_and_update();
        if now.is_some_and(is_flood) {
            let before = pushes.load(Relaxed);
            let began = Instant::now();
            let mut hot = flood(&senders, hot_rate, &mut phase_rx, &group).await;
            hot.time = began.elapsed();
            hot.pushes = pushes.load(Relaxed) - before;
            floods.push(hot);
        }
    }
    let small = small
        .join()
        .map_err(|_| anyhow::anyhow!("the small conversations' thread panicked"))??;
    // What the group's members still had on the way when the last flood stopped: counted
    // until nothing more arrives for a second (30 s at most).
    let mut delivered = pushes.load(Relaxed);
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = pushes.load(Relaxed);
        if now == delivered {
            break;
        }
        delivered = now;
    }
    let group = std::mem::take(&mut *group.latencies.lock().unwrap_or_else(|e| e.into_inner()));
    report(args, capacity, &small, &floods, delivered, &dep, group);
    Ok(())
}

/// The store before the server owns it: the group and the small conversations.
async fn seed(data: &Path, master: &MasterKey, args: &OverloadArgs) -> anyhow::Result<()> {
    let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(data)?);
    let master = MasterKey::from_hex(&master.to_hex()).map_err(anyhow::Error::msg)?;
    let log = Log::open(store, master, Default::default()).await?;
    let tenant = TenantId::new("bench")?;
    log.create_conversation(crate::bench_gateway::group(
        &tenant,
        "hot",
        "h",
        args.members,
    )?)
    .await?;
    for i in 0..args.conversations {
        log.create_conversation(CreateConversation {
            tenant: tenant.clone(),
            conv: ConvId::new(format!("s{i}"))?,
            kind: "direct".into(),
            title: String::new(),
            creator: UserId::new(format!("a{i}"))?,
            members: vec![UserId::new(format!("b{i}"))?],
        })
        .await?;
    }
    log.close().await;
    Ok(())
}

/// Every member of the group online; each session's pushes counted and dropped. Returns the
/// request sides of the members who flood.
async fn connect_group(
    dep: &Deployment,
    args: &OverloadArgs,
    tokens: &Arc<Tokens>,
    pushes: &Arc<AtomicU64>,
    group: &GroupClock,
) -> anyhow::Result<Vec<Requester>> {
    let permits = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    let mut connecting = tokio::task::JoinSet::new();
    for i in 0..args.members {
        let (url, tls, token, permits) = (
            dep.url.clone(),
            dep.client_tls.clone(),
            tokens.of(&format!("h{i}")),
            permits.clone(),
        );
        let (sender, pushes) = (i < args.hot_senders, pushes.clone());
        connecting.spawn(async move {
            let _p = permits.acquire_owned().await;
            if sender {
                let (c, _) = Connection::open_with(&url, &tls, &token, "bench").await?;
                anyhow::Ok(Some(c))
            } else {
                listen(&url, &token, pushes).await?;
                Ok(None)
            }
        });
    }
    let mut senders = Vec::new();
    while let Some(opened) = connecting.join_next().await {
        let Some(mut conn) = opened?.context("open a group member's session")? else {
            continue; // a listener only: it counts on its own
        };
        senders.push(conn.requester());
        let (pushes, group) = (pushes.clone(), group.clone());
        // Detached: the sessions live until the process ends.
        tokio::spawn(async move {
            while let Some(push) = conn.next_push().await {
                if let Push::Event(e) = push {
                    pushes.fetch_add(1, Relaxed);
                    if let Some(tidings_schemas::v1::event::Body::MessagePosted(m)) = &e.body {
                        group.arrived(&m.text);
                    }
                }
            }
        });
    }
    Ok(senders)
}

/// A group member who only listens, as cheap as a client can be: the Hello, then every
/// binary frame counted and not decoded (the bench sends these members nothing but the
/// group's events: no typing, no read cursors). The full client decodes each push and hands
/// it over a channel; with 10,000 of them that cost more of the two cores than the server's
/// whole fan-out, and the bench measured itself. Detached: it lives until the process ends.
async fn listen(url: &str, token: &str, pushes: Arc<AtomicU64>) -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use prost::Message as _;
    use tidings_schemas::client::{ClientFrame, Hello, ServerFrame, client_frame::Op};
    use tokio_tungstenite::tungstenite::Message;

    // tungstenite's default read buffer is 128 KiB a connection: 1.3 GB for 10,000
    // listeners whose frames are a few hundred bytes.
    let config =
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true).await?;
    let hello = ClientFrame {
        request_id: 1,
        op: Some(Op::Hello(Hello {
            token: token.to_string(),
            device: "bench".into(),
        })),
    };
    ws.send(Message::Binary(hello.encode_to_vec().into()))
        .await?;
    loop {
        match ws.next().await.context("closed before the welcome")?? {
            Message::Binary(b) => {
                let frame = ServerFrame::decode(b.as_ref())?;
                anyhow::ensure!(
                    frame.request_id == 1
                        && matches!(
                            frame.msg,
                            Some(tidings_schemas::client::server_frame::Msg::Welcome(_))
                        ),
                    "the hello was refused: {frame:?}"
                );
                break;
            }
            Message::Close(c) => anyhow::bail!("closed before the welcome: {c:?}"),
            _ => {}
        }
    }
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_binary() {
                pushes.fetch_add(1, Relaxed);
            }
        }
    });
    Ok(())
}

/// The flood: `rate` sends a second spread over the group's senders, open-loop, until the
/// small thread says the phase is over. A refusal is counted and not retried: the flood is
/// many people, each sending once.
async fn flood(
    senders: &[Requester],
    rate: f64,
    phase: &mut watch::Receiver<Option<Slot>>,
    group: &GroupClock,
) -> Hot {
    let hot = Arc::new(Hot::default());
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let (mut owed, mut next) = (0.0f64, 0usize);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = phase.changed() => break,
        }
        while tasks.try_join_next().is_some() {}
        owed += rate * TICK.as_secs_f64();
        while owed >= 1.0 {
            owed -= 1.0;
            let r = senders[next % senders.len()].clone();
            let hot = hot.clone();
            let id = format!("hot{}", fastrand::u64(..));
            next += 1;
            let text = format!("hot:{}", group.now_ns());
            tasks.spawn(async move {
                hot.sends.record(&r.send_text("hot", &id, &text).await);
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    Arc::try_unwrap(hot).unwrap_or_default()
}

/// The small conversations' schedule.
struct Plan {
    conversations: usize,
    rate: f64,
    seconds: u64,
    rounds: usize,
}

/// The small conversations' side, on its own thread: connect both members of each, then
/// each round's two phases, telling the flood when its phase starts and ends.
async fn small_conversations(
    url: &str,
    tls: &tidings_client::ClientTls,
    tokens: &Tokens,
    plan: &Plan,
    phase: &watch::Sender<Option<Slot>>,
) -> anyhow::Result<Small> {
    let slots = 2 * plan.rounds;
    let clock = Instant::now();
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel::<(Slot, Duration)>();
    let mut requesters = Vec::with_capacity(plan.conversations);
    for i in 0..plan.conversations {
        let open = |user: String| async move {
            Connection::open_with(url, tls, &tokens.of(&user), "bench")
                .await
                .map(|(c, _)| c)
                .with_context(|| format!("open a session for {user}"))
        };
        requesters.push(open(format!("a{i}")).await?.requester());
        let mut receiver = open(format!("b{i}")).await?;
        let lat_tx = lat_tx.clone();
        tokio::spawn(async move {
            while let Some(push) = receiver.next_push().await {
                if let Push::Event(e) = push
                    && let Some(tidings_schemas::v1::event::Body::MessagePosted(m)) = &e.body
                    && let Some((slot, at)) = m.text.split_once(':')
                    && let (Ok(slot), Ok(at)) = (slot.parse::<Slot>(), at.parse::<u64>())
                {
                    let now = clock.elapsed().as_nanos() as u64;
                    let _ = lat_tx.send((slot, Duration::from_nanos(now.saturating_sub(at))));
                }
            }
        });
    }
    drop(lat_tx);
    // One unmeasured message in each conversation first: the writer's first append to a
    // conversation reads its head from the store, and that cold read belongs to neither phase.
    // Itself past the capacity, so: retried when refused, and two idle windows after it.
    for (i, r) in requesters.iter().enumerate() {
        let retry = tidings_client::RetryPolicy::default();
        r.send_text_with_retry(&format!("s{i}"), "warm-up", "warm-up", retry)
            .await
            .context("a warm-up send")?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counts: Arc<Vec<Counts>> = Arc::new((0..slots).map(|_| Counts::default()).collect());
    let mut out = Small {
        latencies: vec![Vec::new(); slots],
        sent: vec![0; slots],
        elapsed: vec![Duration::ZERO; slots],
        ..Small::default()
    };
    for slot in 0..slots {
        if is_flood(slot) {
            // Two idle windows first: the flood starts from a writer that limits nothing.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let _ = phase.send(Some(slot));
        let began = Instant::now();
        out.sent[slot] = send_small(&requesters, plan, slot, clock, &counts).await;
        out.elapsed[slot] = began.elapsed();
        let _ = phase.send(None);
        if is_flood(slot) {
            // The flood's last pushes drain before the next round measures without it.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    }
    // Every push still on its way (30 s at most).
    let deadline = Instant::now() + Duration::from_secs(30);
    let expected: u64 = counts.iter().map(|c| c.acked.load(Relaxed)).sum();
    let mut got = 0;
    while got < expected {
        let Ok(Some((slot, latency))) =
            tokio::time::timeout_at(deadline.into(), lat_rx.recv()).await
        else {
            break;
        };
        got += 1;
        if let Some(v) = out.latencies.get_mut(slot) {
            v.push(latency);
        }
    }
    for v in &mut out.latencies {
        v.sort_unstable();
    }
    out.counts = counts;
    Ok(out)
}

/// What became of a set of sends: acknowledged, refused as rate limited, or failed
/// otherwise.
#[derive(Default)]
struct Counts {
    acked: AtomicU64,
    limited: AtomicU64,
    errors: AtomicU64,
}

impl Counts {
    fn record<T>(&self, sent: &Result<T, ClientError>) {
        let counter = match sent {
            Ok(_) => &self.acked,
            Err(ClientError::Server {
                code: ErrorCode::RateLimited,
                ..
            }) => &self.limited,
            Err(_) => &self.errors,
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// One phase of small sends: `plan.rate` a second over the conversations, open-loop.
/// Returns how many were sent.
async fn send_small(
    requesters: &[Requester],
    plan: &Plan,
    slot: Slot,
    clock: Instant,
    counts: &Arc<Vec<Counts>>,
) -> u64 {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let (mut owed, mut sent) = (0.0f64, 0u64);
    let end = Instant::now() + Duration::from_secs(plan.seconds);
    while Instant::now() < end {
        tick.tick().await;
        while tasks.try_join_next().is_some() {}
        owed += plan.rate * TICK.as_secs_f64();
        while owed >= 1.0 {
            owed -= 1.0;
            let i = sent as usize % requesters.len();
            let r = requesters[i].clone();
            let counts = counts.clone();
            let id = format!("{slot}-{sent}");
            sent += 1;
            tasks.spawn(async move {
                let at = clock.elapsed().as_nanos() as u64;
                let text = format!("{slot}:{at}");
                counts[slot].record(&r.send_text(&format!("s{i}"), &id, &text).await);
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    sent
}

/// The table (a row per phase per round), the ratios (per round, their median, and of the
/// pooled p99s) and the totals.
fn report(
    args: &OverloadArgs,
    capacity: u32,
    small: &Small,
    floods: &[Hot],
    delivered: u64,
    dep: &Deployment,
    mut group: Vec<Duration>,
) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!();
    println!(
        "| round | phase | small sent | small acked | small limited | small send->push p50 | \
         p99 | pushes received | hot acked/s | hot limited/s | goodput/s |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    let mut goodputs = Vec::new();
    // Pushes a second the admitted sends make: a small conversation's 2 members, the group's.
    let mut push_goodputs = Vec::new();
    for slot in 0..small.latencies.len() {
        let round = slot / 2;
        let lat = &small.latencies[slot];
        let c = &small.counts[slot];
        let small_per_s =
            c.acked.load(Relaxed) as f64 / small.elapsed[slot].as_secs_f64().max(1e-9);
        let (hot_acked_s, hot_limited_s) = match floods.get(round).filter(|_| is_flood(slot)) {
            Some(h) => {
                let secs = h.time.as_secs_f64().max(1e-9);
                (
                    h.sends.acked.load(Relaxed) as f64 / secs,
                    h.sends.limited.load(Relaxed) as f64 / secs,
                )
            }
            None => (0.0, 0.0),
        };
        if is_flood(slot) {
            let alone = ms(quantile(&small.latencies[slot - 1], 0.99));
            ratios.push(ms(quantile(lat, 0.99)) / alone.max(1e-9));
            goodputs.push(small_per_s + hot_acked_s);
            push_goodputs.push(2.0 * small_per_s + args.members as f64 * hot_acked_s);
        }
        println!(
            "| {} | {} | {} | {} | {} | {:.2} ms | {:.2} ms | {} | {:.1} | {:.1} | {:.1} |",
            round + 1,
            if is_flood(slot) {
                "small + flood"
            } else {
                "small only"
            },
            small.sent[slot],
            c.acked.load(Relaxed),
            c.limited.load(Relaxed),
            ms(quantile(lat, 0.50)),
            ms(quantile(lat, 0.99)),
            lat.len(),
            hot_acked_s,
            hot_limited_s,
            small_per_s + hot_acked_s,
        );
    }
    let pooled = |flood: bool| {
        let mut all: Vec<Duration> = (0..small.latencies.len())
            .filter(|&s| is_flood(s) == flood)
            .flat_map(|s| small.latencies[s].iter().copied())
            .collect();
        all.sort_unstable();
        ms(quantile(&all, 0.99))
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let hot_acked: u64 = floods.iter().map(|h| h.sends.acked.load(Relaxed)).sum();
    let flood_secs: f64 = floods.iter().map(|h| h.time.as_secs_f64()).sum();
    let flood_pushes: u64 = floods.iter().map(|h| h.pushes).sum();
    let expected = hot_acked * args.members as u64;
    let ratio = median(ratios.clone());
    let goodput = median(goodputs);
    let push_goodput = median(push_goodputs);
    let fanout_share = if args.fanout == 0 {
        "no fan-out budget".to_string()
    } else {
        format!(
            "{:.0}% of the fan-out budget",
            100.0 * push_goodput / args.fanout as f64
        )
    };
    println!();
    println!(
        "small send->push p99 under the flood / without it: median of the rounds {ratio:.2}x \
         (rounds: {}), pooled {:.2} / {:.2} ms = {:.2}x (target <= 2x); goodput median \
         {goodput:.1}/s = {:.0}% of the capacity (target >= 90%), making {push_goodput:.0} \
         pushes/s = {fanout_share}; group pushes during the \
         floods {:.0}/s, received in all {delivered} of {expected} ({hot_acked} acked x {} \
         members, the sender's own session included); errors: small {}, hot {}; peak RSS: \
         server {} MiB, bench {} MiB",
        ratios
            .iter()
            .map(|r| format!("{r:.2}x"))
            .collect::<Vec<_>>()
            .join(", "),
        pooled(true),
        pooled(false),
        pooled(true) / pooled(false).max(1e-9),
        100.0 * goodput / f64::from(capacity),
        flood_pushes as f64 / flood_secs.max(1e-9),
        args.members,
        small
            .counts
            .iter()
            .map(|c| c.errors.load(Relaxed))
            .sum::<u64>(),
        floods
            .iter()
            .map(|h| h.sends.errors.load(Relaxed))
            .sum::<u64>(),
        dep.server_peak_rss_kib() / 1024,
        peak_rss_kib() / 1024,
    );
    group.sort_unstable();
    println!(
        "the group's own send->push, sampled at its {} senders' sessions ({} pushes): p50 \
         {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        args.hot_senders,
        group.len(),
        ms(quantile(&group, 0.50)),
        ms(quantile(&group, 0.99)),
        ms(group.last().copied().unwrap_or_default()),
    );
}
