//! `tidings bench gateway`: end to end through a real `tidings serve` process and a real
//! nats-server, with the baselines measured in the same run.
//!
//! 1. Baselines: a raw async-nats request/reply round trip (an echo responder on the same
//!    nats-server) and a raw durable store commit (one fjall batch of one value, fsync'd).
//! 2. Latency: `--users` online users in direct pairs; one message every 1/`--rate` s, sent
//!    by one side of a pair; the time from the send call to the other side's push.
//! 3. Throughput: `--senders` sessions sending as fast as their acks come back, for
//!    `--seconds`.
//! 4. Fan-out: a group of `--fanout` members, all online (one socket each); one message; the
//!    time until the last member has it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use fjall::{Database, KeyspaceCreateOptions, PersistMode};
use futures_util::StreamExt;
use tidings_client::{Connection, Push};
use tidings_log::crypto::MasterKey;
use tidings_log::store::{FjallStore, KvStore};
use tidings_log::{ConvId, ConversationKind, CreateConversation, Log, TenantId, UserId};
use tokio::sync::Semaphore;

use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// Online users in the latency run (in pairs, one direct conversation per pair).
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Messages per second in the latency run.
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Messages measured in the latency run.
    #[arg(long, default_value_t = 3000)]
    pub messages: usize,
    /// Sessions sending as fast as acked in the throughput run.
    #[arg(long, default_value_t = 64)]
    pub senders: usize,
    /// Length of the throughput run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Members of the fan-out group (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    pub fanout: usize,
    /// Scratch directory (a real disk; default: the system temp directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "nothing listens on port {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub async fn run(args: GatewayArgs, _config: &Config) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.users >= 2 && args.rate > 0 && args.senders > 0,
        "users >= 2, rate and senders > 0"
    );
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("tidings-bench-gw-")
        .tempdir_in(&base)?;
    let root = dir.path();

    // nats-server with JetStream.
    let nats_port = free_port()?;
    let _nats = Child(
        std::process::Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &nats_port.to_string(),
                "-sd",
            ])
            .arg(root.join("nats"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("start nats-server (apt-get install nats-server)")?,
    );
    wait_port(nats_port).await?;
    let nats_url = format!("nats://127.0.0.1:{nats_port}");

    // Keys, and the conversations, written before the server owns the store.
    let master = MasterKey::generate();
    std::fs::write(root.join("master.key"), master.to_hex())?;
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
    std::fs::write(
        root.join("jwt.secret"),
        tidings_log::crypto::hex_encode(&secret),
    )?;
    let tenant = TenantId::new("bench")?;
    let pairs = args.users / 2;
    {
        let store = Arc::new(FjallStore::open(&root.join("data"))?);
        let log = Log::open(
            store as Arc<dyn KvStore>,
            MasterKey::from_hex(&master.to_hex()).map_err(anyhow::Error::msg)?,
            Default::default(),
        )
        .await?;
        let mut creates = tokio::task::JoinSet::new();
        for p in 0..pairs.max(args.senders) {
            let (log, tenant) = (log.clone(), tenant.clone());
            creates.spawn(async move {
                log.create_conversation(CreateConversation {
                    tenant,
                    conv: ConvId::new(format!("pair{p}"))?,
                    kind: ConversationKind::Direct,
                    title: String::new(),
                    creator: UserId::new(format!("a{p}"))?,
                    members: vec![UserId::new(format!("b{p}"))?],
                })
                .await?;
                anyhow::Ok(())
            });
        }
        while let Some(r) = creates.join_next().await {
            r??;
        }
        if args.fanout > 1 {
            log.create_conversation(CreateConversation {
                tenant: tenant.clone(),
                conv: ConvId::new("fanout")?,
                kind: ConversationKind::Group,
                title: String::new(),
                creator: UserId::new("f0")?,
                members: (1..args.fanout)
                    .map(|i| UserId::new(format!("f{i}")))
                    .collect::<Result<_, _>>()?,
            })
            .await?;
        }
        log.close().await;
    }

    // The server: `tidings serve`, this same binary.
    let gw_port = free_port()?;
    let _server = Child(
        std::process::Command::new(std::env::current_exe()?)
            .args(["serve", "--role", "all"])
            .env("TIDINGS_DATA_DIR", root.join("data"))
            .env("TIDINGS_MASTER_KEY_FILE", root.join("master.key"))
            .env("TIDINGS_AUTH_HS256_SECRET_FILE", root.join("jwt.secret"))
            .env("TIDINGS_AUTH_HS256_ENABLED", "1")
            .env("TIDINGS_NATS_URL", &nats_url)
            .env("TIDINGS_GATEWAY_LISTEN", format!("127.0.0.1:{gw_port}"))
            // The bench needs no admin listener, and its default port may be taken.
            .env("TIDINGS_ADMIN_LISTEN", "")
            .env("TIDINGS_GATEWAY_FRAMES_PER_SECOND", "100000")
            .env("TIDINGS_GATEWAY_FRAME_BURST", "100000")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    wait_port(gw_port).await?;
    let url = format!("ws://127.0.0.1:{gw_port}/v1/ws");
    let token = |user: &str| {
        let now = tidings_gateway::now_secs();
        tidings_auth::issue_hs256(
            &secret,
            "tidings",
            "tidings",
            &tidings_auth::Claims {
                tenant: "bench".into(),
                user: user.into(),
                roles: vec![],
                expires_at: now + 3600,
                issued_at: now,
                jti: None,
            },
        )
    };

    println!(
        "tidings bench gateway: {} cores; nats-server and `tidings serve` on loopback",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();

    // 1. Baselines.
    let nats_rtt = nats_round_trips(&nats_url, 2000).await?;
    let commits = store_commits(&root.join("raw"), 2000)?;
    println!("| baseline | p50 | p99 | p99.9 |");
    println!("|---|---:|---:|---:|");
    println!(
        "| raw NATS request/reply round trip (200 B) | {} | {} | {} |",
        ms(pct(&nats_rtt, 0.5)),
        ms(pct(&nats_rtt, 0.99)),
        ms(pct(&nats_rtt, 0.999))
    );
    println!(
        "| raw store durable commit (one 200 B value, fsync) | {} | {} | {} |",
        ms(pct(&commits, 0.5)),
        ms(pct(&commits, 0.99)),
        ms(pct(&commits, 0.999))
    );
    println!();

    // 2. Latency at a steady rate.
    // Senders keep only their request side: their own pushes are dropped unread. (A
    // Connection whose pushes nobody takes stops reading its socket once its buffer is full,
    // and the server then cuts it off as a slow consumer.)
    let mut requesters = Vec::new();
    let mut receivers = Vec::new();
    for p in 0..pairs {
        let (a, _) = Connection::open(&url, &token(&format!("a{p}")), "bench").await?;
        let (b, _) = Connection::open(&url, &token(&format!("b{p}")), "bench").await?;
        requesters.push(a.requester());
        receivers.push(b);
    }
    let sent_at: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.messages).map(|_| AtomicU64::new(0)).collect());
    let clock = Instant::now();
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut listening = tokio::task::JoinSet::new();
    for mut b in receivers {
        let (sent_at, lat_tx) = (sent_at.clone(), lat_tx.clone());
        listening.spawn(async move {
            while let Some(push) = b.next_push().await {
                if let Push::Event(e) = push
                    && let Some(tidings_schemas::v1::event::Body::MessagePosted(m)) = &e.body
                    && let Ok(i) = m.text.parse::<usize>()
                {
                    let now = clock.elapsed().as_nanos() as u64;
                    let at = sent_at[i].load(Ordering::SeqCst);
                    let _ = lat_tx.send(Duration::from_nanos(now.saturating_sub(at)));
                }
            }
        });
    }
    drop(lat_tx);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate)));
    for i in 0..args.messages {
        tick.tick().await;
        let r = requesters[i % requesters.len()].clone();
        let sent_at = sent_at.clone();
        let conv = format!("pair{}", i % requesters.len());
        tokio::spawn(async move {
            sent_at[i].store(clock.elapsed().as_nanos() as u64, Ordering::SeqCst);
            let _ = r.send_text(&conv, &format!("lat{i}"), &i.to_string()).await;
        });
    }
    let mut latencies = Vec::with_capacity(args.messages);
    while latencies.len() < args.messages {
        match tokio::time::timeout(Duration::from_secs(30), lat_rx.recv()).await {
            Ok(Some(l)) => latencies.push(l),
            _ => break,
        }
    }
    listening.abort_all();
    latencies.sort();
    let base = pct(&nats_rtt, 0.5) + pct(&commits, 0.5);
    println!(
        "| end to end, send -> other member's push | users | rate | p50 | p99 | p99.9 | delivered | p50 / (NATS rtt + commit) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| steady rate | {} | {}/s | {} | {} | {} | {}/{} | {:.1}x |",
        pairs * 2,
        args.rate,
        ms(pct(&latencies, 0.5)),
        ms(pct(&latencies, 0.99)),
        ms(pct(&latencies, 0.999)),
        latencies.len(),
        args.messages,
        pct(&latencies, 0.5).as_secs_f64() / base.as_secs_f64().max(1e-9)
    );
    println!();

    // 3. Throughput: senders as fast as acked.
    let acked = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut sending = tokio::task::JoinSet::new();
    for s in 0..args.senders {
        let p = s % pairs.max(1);
        let r = requesters.get(p).cloned();
        let acked = acked.clone();
        sending.spawn(async move {
            let Some(r) = r else { return };
            let mut i = 0u64;
            while Instant::now() < deadline {
                if r.send_text(&format!("pair{p}"), &format!("tp{s}-{i}"), "throughput")
                    .await
                    .is_ok()
                {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        });
    }
    let started = Instant::now();
    while sending.join_next().await.is_some() {}
    let per_s = acked.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    let commit_rate = 1.0 / pct(&commits, 0.5).as_secs_f64().max(1e-9);
    println!(
        "| throughput | sessions | acked sends/s | raw store commits/s (one value each) | ratio |"
    );
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| as fast as acked | {} | {:.0} | {:.0} | {:.2}x |",
        args.senders.min(pairs.max(1)),
        per_s,
        commit_rate,
        per_s / commit_rate
    );
    println!();
    drop(requesters);

    // 4. Fan-out.
    if args.fanout > 1 {
        let permits = Arc::new(Semaphore::new(64));
        let mut connecting = tokio::task::JoinSet::new();
        let started = Instant::now();
        for i in 0..args.fanout {
            let (url, token, permits) = (url.clone(), token(&format!("f{i}")), permits.clone());
            connecting.spawn(async move {
                let _p = permits.acquire_owned().await;
                Connection::open(&url, &token, "bench")
                    .await
                    .map(|(c, _)| c)
            });
        }
        let mut conns = Vec::new();
        while let Some(c) = connecting.join_next().await {
            conns.push(c??);
        }
        let connect_time = started.elapsed();
        let sender = conns.pop().context("no sessions")?.requester();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiting = tokio::task::JoinSet::new();
        for mut c in conns {
            let tx = tx.clone();
            waiting.spawn(async move {
                while let Some(p) = c.next_push().await {
                    if let Push::Event(_) = p {
                        let _ = tx.send(Instant::now());
                        let _ = c.next_push().await;
                        return;
                    }
                }
            });
        }
        drop(tx);
        let sent = Instant::now();
        sender.send_text("fanout", "fan", "hello, everyone").await?;
        let mut last = sent;
        let mut got = 0;
        while got < args.fanout - 1 {
            match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                Ok(Some(at)) => {
                    last = last.max(at);
                    got += 1;
                }
                _ => break,
            }
        }
        waiting.abort_all();
        println!(
            "| fan-out | members online | connect all | send -> last member has it | delivered |"
        );
        println!("|---|---:|---:|---:|---:|");
        println!(
            "| one message, one group | {} | {:.1} s | {} | {}/{} |",
            args.fanout,
            connect_time.as_secs_f64(),
            ms(last - sent),
            got,
            args.fanout - 1
        );
    }
    Ok(())
}

async fn nats_round_trips(url: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    let client = async_nats::connect(url).await?;
    let mut sub = client.subscribe("bench.echo").await?;
    let responder = client.clone();
    let echo = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = responder.publish(reply, m.payload).await;
            }
        }
    });
    client.flush().await?;
    let payload = bytes_of(200);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client.request("bench.echo", payload.clone().into()).await?;
        out.push(t.elapsed());
    }
    echo.abort();
    out.sort();
    Ok(out)
}

fn store_commits(path: &std::path::Path, n: usize) -> anyhow::Result<Vec<Duration>> {
    let db = Database::builder(path).open()?;
    let data = db.keyspace("data", KeyspaceCreateOptions::default)?;
    let value = bytes_of(200);
    let mut out = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let t = Instant::now();
        let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
        batch.insert(&data, i.to_be_bytes().to_vec(), value.clone());
        batch.commit()?;
        out.push(t.elapsed());
    }
    out.sort();
    Ok(out)
}

fn bytes_of(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
}
