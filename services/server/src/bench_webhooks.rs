//! `tidings bench webhooks`: webhook delivery throughput and lag (issue 16).
//!
//! One fresh fjall store, a real nats-server (JetStream), the log with its publisher and the
//! webhook dispatcher in this process, and a local HTTP receiver (hyper) that checks every
//! signature. `--conversations` groups are created, one subscription to all of them, then
//! `--events` messages are appended round-robin (one sender task per conversation). Reported:
//! - delivery throughput: events received / (last receipt − first append);
//! - lag: receipt time − the event's commit time (`time_ms` in the body), p50 / p99 / max;
//! - the append rate in the same run (what the dispatcher had to keep up with); `--rate`
//!   paces the appends, so the lag of a subscription that keeps up can be told from a
//!   backlog's.
//!
//! Delivery is serial per subscription (`max_ack_pending = 1`, in seq order per
//! conversation), each event a request and a cursor commit: the throughput is one
//! subscription's, the figure that bounds how fast one receiver can be fed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tidings_archive::compliance::{Actor, Compliance, Via};
use tidings_log::crypto::MasterKey;
use tidings_log::store::{FjallStore, KvStore};
use tidings_log::{Append, ClientMsgId, Log, LogConfig, TenantId, UserId};
use tidings_log_role::publisher;

use crate::bench::quantile;
use crate::webhooks::{Manage, NewSubscription, WebhooksConfig, dispatch::Dispatcher, sign};

#[derive(Debug, clap::Args)]
pub struct WebhooksArgs {
    /// Messages appended (and delivered).
    #[arg(long, default_value_t = 3000)]
    pub events: usize,
    /// Conversations they are spread over.
    #[arg(long, default_value_t = 10)]
    pub conversations: usize,
    /// Appends per second in all (0: as fast as the log takes them). Below the delivery
    /// rate the lag is a single event's; above it, a backlog's.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Directory for the scratch store (default: the system temp directory).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
}

/// The largest request body the bench's receiver takes.
const MAX_RECEIVED_BYTES: usize = 1 << 20;

/// What the receiver saw.
#[derive(Default)]
struct Received {
    /// (receipt time ms, commit time ms) per delivery.
    times: Vec<(i64, i64)>,
    bad_signatures: usize,
    last_at: Option<Instant>,
}

pub async fn run(args: WebhooksArgs, config: &crate::config::Config) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.events > 0 && args.conversations > 0,
        "events and conversations must be positive"
    );
    let (base, dir) = crate::bench::scratch_dir(args.dir.as_deref(), "webhooks")?;
    let (nats_url, _nats) = crate::bench_gateway::start_plain_nats(dir.path()).await?;
    let nats = async_nats::connect(&nats_url)
        .await
        .context("connect to nats-server")?;
    let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(&dir.path().join("kv"))?);
    let (feed_tx, feed_rx) = tokio::sync::mpsc::channel(64 * 1024);
    let cfg = LogConfig {
        send_buffer: None,
        ..config.log_config()
    };
    let log = Log::open_with_feed(store, MasterKey::generate(), cfg, Some(feed_tx)).await?;
    let (publisher, _) = publisher::spawn(
        nats.clone(),
        feed_rx,
        log.keyring().clone(),
        publisher::PublisherConfig::default(),
    );

    let tenant = TenantId::new("bench")?;
    let owner = UserId::new("alice")?;
    let convs = crate::bench::groups(&log, &tenant, &owner, args.conversations).await?;
    // The subscription starts after the conversations' creation events.
    tokio::time::sleep(Duration::from_millis(5)).await;

    let received = Arc::new(Mutex::new(Received::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let compliance = Compliance::new(
        log.store().clone(),
        log.keyring().clone(),
        None,
        Arc::default(),
    );
    let manage = Manage {
        compliance: &compliance,
        max_per_tenant: 1,
        default_max_attempts: 8,
    };
    let created = manage
        .create(
            &tenant,
            NewSubscription {
                url: format!("http://{addr}/hook"),
                ..Default::default()
            },
            &Actor::new("bench", Via::Cli)?,
        )
        .await?;
    let secret = created["secret"]
        .as_str()
        .context("a new subscription shows its secret")?
        .as_bytes()
        .to_vec();
    let receiver = tokio::spawn(serve_receiver(listener, secret, received.clone()));
    let webhooks = WebhooksConfig {
        refresh_ms: 100,
        ..config.webhooks.clone()
    };
    let dispatcher = tokio::spawn(Dispatcher::new(log.clone(), nats.clone(), webhooks)?.run());

    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for (c, conv) in convs.iter().enumerate() {
        let n =
            args.events / args.conversations + usize::from(c < args.events % args.conversations);
        let (log, tenant, conv, owner) = (log.clone(), tenant.clone(), conv.clone(), owner.clone());
        // Each conversation's sender paces itself to its share of --rate.
        let every = (args.rate > 0)
            .then(|| Duration::from_secs_f64(args.conversations as f64 / args.rate as f64));
        senders.spawn(async move {
            let mut pace = every.map(tokio::time::interval);
            for i in 0..n {
                if let Some(pace) = &mut pace {
                    pace.tick().await;
                }
                log.append(Append::text(
                    tenant.clone(),
                    conv.clone(),
                    owner.clone(),
                    ClientMsgId::new(format!("m{i}"))?,
                    format!("bench message {i} of {conv}"),
                ))
                .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = senders.join_next().await {
        done??;
    }
    let appended = started.elapsed();
    // Every event, or a minute without progress.
    let mut last_count = 0;
    let mut stalled = Instant::now();
    loop {
        let count = lock(&received).times.len();
        if count >= args.events {
            break;
        }
        if count != last_count {
            last_count = count;
            stalled = Instant::now();
        } else if stalled.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("delivery stalled at {count} of {} events", args.events);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    dispatcher.abort();
    receiver.abort();
    let r = std::mem::take(&mut *lock(&received));
    let last = r.last_at.context("the receiver saw events")?;
    let delivery_secs = last.duration_since(started).as_secs_f64();
    let mut lags: Vec<i64> = r.times.iter().map(|(at, t)| at - t).collect();
    lags.sort_unstable();
    let report = json!({
        "bench": "webhooks",
        "dir": base.display().to_string(),
        "events": args.events,
        "conversations": args.conversations,
        "rate": args.rate,
        "received": r.times.len(),
        "bad_signatures": r.bad_signatures,
        "append_events_per_sec": (args.events as f64 / appended.as_secs_f64()).round(),
        "delivery_events_per_sec": (r.times.len() as f64 / delivery_secs).round(),
        "lag_ms_p50": quantile(&lags, 0.50),
        "lag_ms_p99": quantile(&lags, 0.99),
        "lag_ms_max": lags.last().copied().unwrap_or(0),
    });
    crate::output::emit(&report)?;
    drop(compliance);
    log.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), publisher).await;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The bench's receiver: answers 200 to every POST, recording when it came and whether its
/// signature holds.
async fn serve_receiver(
    listener: tokio::net::TcpListener,
    secret: Vec<u8>,
    received: Arc<Mutex<Received>>,
) {
    let secret = Arc::new(secret);
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        // As any web server does: without it, a response written in two parts waits for
        // the client's delayed ACK (40 ms a request).
        let _ = stream.set_nodelay(true);
        let (secret, received) = (secret.clone(), received.clone());
        connections.spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let (secret, received) = (secret.clone(), received.clone());
                async move {
                    record(req, &secret, &received).await;
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(StatusCode::OK)
                            .body(String::new())
                            .unwrap_or_default(),
                    )
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn record(req: Request<Incoming>, secret: &[u8], received: &Mutex<Received>) {
    let signature = req
        .headers()
        .get(sign::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut incoming = std::pin::pin!(req.into_body());
    let mut body = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| hyper::body::Body::poll_frame(incoming.as_mut(), cx)).await
    {
        let Ok(frame) = frame else { return };
        if let Ok(data) = frame.into_data() {
            if body.len() + data.len() > MAX_RECEIVED_BYTES {
                return;
            }
            body.extend_from_slice(&data);
        }
    }
    let at = tidings_log::now_ms();
    let ok = sign::verify(secret, &signature, &body);
    let time_ms = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["time_ms"].as_i64())
        .unwrap_or(at);
    let mut r = lock(received);
    if !ok {
        r.bad_signatures += 1;
    }
    r.times.push((at, time_ms));
    r.last_at = Some(Instant::now());
}
