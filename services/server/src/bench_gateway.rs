//! `tidings bench gateway`: end to end through a real `tidings serve` process and a real
//! nats-server, with the baselines measured in the same run.
//!
//! 1. Baselines: the log alone in this process, at the throughput run's concurrency and
//!    shape, before any server runs; a raw async-nats request/reply round trip (an echo
//!    responder on the same nats-server) and a raw durable store commit (one fjall batch of
//!    one value, fsync'd).
//! 2. Latency: `--users` online users in direct pairs; one message every 1/`--rate` s, sent
//!    by one side of a pair; the time from the send call to the other side's push.
//! 3. Throughput: `--senders` sessions sending as fast as their acks come back, for
//!    `--seconds`; against the log alone, with each process's CPU time per send.
//! 4. Fan-out: a group of `--fanout` members, all online (one socket each); one message; the
//!    time until the last member has it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use fjall::{Database, KeyspaceCreateOptions, PersistMode};
use futures_util::StreamExt;
use tidings_client::{ClientTls, Connection, Push};
use tidings_log::crypto::{MasterKey, TransportKey};
use tidings_log::store::{FjallStore, KvStore};
use tidings_log::{ConvId, CreateConversation, Log, TenantId, UserId};
use tidings_log_api::bus_crypto;
use tokio::sync::Semaphore;

use crate::bench::quantile;
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
    /// What the client links and NATS use.
    #[arg(long, value_enum, default_value_t = Edge::Plain)]
    pub edge: Edge,
    /// With `--edge compare`: rounds of plain and TLS, alternating which goes first; the
    /// summary is the median of the rounds' ratios.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
}

/// What the client links and NATS use. Bus payloads are sealed either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Edge {
    /// ws:// and NATS over plain TCP without credentials.
    Plain,
    /// wss:// with a private CA made for the run, NATS over TLS and closed to all but the
    /// per-role NKeys of `tidings nats init`: as deployed.
    Tls,
    /// Plain, then TLS, in the same run: latency and throughput ratios (no fan-out).
    Compare,
    /// Plain without, then with, an interceptor for the bench's tenant that allows every
    /// message (a NATS responder in the bench, docs/decisions/interceptors.md): what the
    /// pre-commit hook costs a send (no fan-out).
    Intercept,
}

/// One deployment of a run: TLS or not, with an allow-all interceptor or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Variant {
    secure: bool,
    intercept: bool,
}

impl Variant {
    pub(crate) const PLAIN: Variant = Variant {
        secure: false,
        intercept: false,
    };
    const TLS: Variant = Variant {
        secure: true,
        intercept: false,
    };
    const INTERCEPT: Variant = Variant {
        secure: false,
        intercept: true,
    };

    fn name(self) -> &'static str {
        match (self.secure, self.intercept) {
            (false, false) => "plain",
            (true, _) => "tls",
            (false, true) => "intercept",
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// A child process killed (SIGKILL) and reaped on drop.
pub(crate) struct Child(pub(crate) std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits for a process to listen on `port`; if it never does, fails with the end of its
/// log.
pub(crate) async fn wait_port(port: u16, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() >= deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            anyhow::bail!(
                "nothing listens on port {port}; the end of {}:\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One `tidings serve --role all` and its nats-server, set up as `secure` says.
pub(crate) struct Deployment {
    nats: Child,
    server: Child,
    /// The allow-all interceptor, when the variant has one.
    hook: Option<tokio::task::JoinHandle<()>>,
    /// The gateway's WebSocket URL, and how clients verify it.
    pub(crate) url: String,
    pub(crate) client_tls: ClientTls,
    /// The gateway listener's port (`/metrics` beside `/v1/ws`).
    pub(crate) gateway_port: u16,
    /// NATS without credentials (the plain deployment only): for the raw baseline.
    open_nats_url: Option<String>,
}

/// Writes the run's keys and the conversations into `data` before a server owns it (the
/// `--fanout` group too with `fan_out_group`). Returns the seal + open time of one
/// bench-sized event on the bus (sorted samples).
async fn seed_store(
    data: &Path,
    master_hex: &str,
    tenant: &TenantId,
    pairs: usize,
    args: &GatewayArgs,
    fan_out_group: bool,
) -> anyhow::Result<Vec<Duration>> {
    let log = open_log(data, master_hex).await?;
    let mut creates = tokio::task::JoinSet::new();
    for p in 0..pairs.max(args.senders) {
        let (log, tenant) = (log.clone(), tenant.clone());
        creates.spawn(async move {
            log.create_conversation(CreateConversation {
                tenant,
                conv: ConvId::new(format!("pair{p}"))?,
                kind: "direct".into(),
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
    if fan_out_group && args.fanout > 1 {
        log.create_conversation(group(tenant, "fanout", "f", args.fanout)?)
            .await?;
    }
    let key = log.transport_key(tenant, None).await?;
    log.close().await;
    Ok(sealing_costs(&key, tenant, 2000))
}

/// The log on the embedded store at `data`, with default settings, as the bench (not a
/// server) uses it.
async fn open_log(data: &Path, master_hex: &str) -> anyhow::Result<Log> {
    let store = Arc::new(FjallStore::open(data)?);
    Ok(Log::open(
        store as Arc<dyn KvStore>,
        MasterKey::from_hex(master_hex).map_err(anyhow::Error::msg)?,
        Default::default(),
    )
    .await?)
}

/// A group `conv` of `n` members named `{prefix}0` (its creator) to `{prefix}{n - 1}`.
pub(crate) fn group(
    tenant: &TenantId,
    conv: &str,
    prefix: &str,
    n: usize,
) -> anyhow::Result<CreateConversation> {
    Ok(CreateConversation {
        tenant: tenant.clone(),
        conv: ConvId::new(conv)?,
        kind: "group".into(),
        title: String::new(),
        creator: UserId::new(format!("{prefix}0"))?,
        members: (1..n)
            .map(|i| UserId::new(format!("{prefix}{i}")))
            .collect::<Result<_, _>>()?,
    })
}

/// What sealing costs per event on the bus: the log seals each committed event once and
/// every gateway opens it once, so one seal plus one open of an event as the latency run
/// sends it.
fn sealing_costs(key: &TransportKey, tenant: &TenantId, n: usize) -> Vec<Duration> {
    use prost::Message;
    let conv = ConvId::new("pair0").expect("a valid id");
    let event = tidings_schemas::v1::Event {
        tenant: tenant.as_str().into(),
        conversation: conv.as_str().into(),
        seq: 1,
        event_id: "0123456789abcdef0123456789abcdef".into(),
        sender: "a0".into(),
        server_time_ms: 1_700_000_000_000,
        client_msg_id: "lat0".into(),
        body: Some(tidings_schemas::v1::event::Body::MessagePosted(
            tidings_schemas::v1::MessagePosted {
                text: "1234".into(),
                ..Default::default()
            },
        )),
    }
    .encode_to_vec();
    let mut out = Vec::with_capacity(n);
    for seq in 0..n as u64 {
        let t = Instant::now();
        let sealed = bus_crypto::seal_event(key, &conv, seq, &event);
        let opened =
            bus_crypto::envelope(&sealed).and_then(|env| bus_crypto::open_event(key, &conv, &env));
        out.push(t.elapsed());
        std::hint::black_box(opened.is_ok());
    }
    out.sort();
    out
}

/// A throwaway CA and a certificate for 127.0.0.1 signed by it, made with the openssl CLI:
/// (CA certificate, certificate, key).
fn make_pki(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("run the openssl CLI (apt-get install openssl)")?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {}: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=tidings bench CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    )?;
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    )?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ])?;
    Ok((
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    ))
}

/// nats-server with JetStream on loopback `port`, storing under `dir`, no credentials.
fn plain_nats_args(cmd: &mut std::process::Command, port: u16, dir: &Path) {
    cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir);
}

/// Starts a plain nats-server (see [`plain_nats_args`]) under `root`; its URL and the
/// process, killed on drop.
pub(crate) async fn start_plain_nats(root: &Path) -> anyhow::Result<(String, Child)> {
    let port = free_port()?;
    let mut cmd = std::process::Command::new("nats-server");
    plain_nats_args(&mut cmd, port, &root.join("nats"));
    let log = root.join("nats.log");
    let child = Child(
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("start nats-server (apt-get install nats-server)")?,
    );
    wait_port(port, &log).await?;
    Ok((format!("nats://127.0.0.1:{port}"), child))
}

/// Starts nats-server and `tidings serve --role all` (this same binary) on `data`, with
/// `env` set for the server. `secure`: wss:// with a private CA, NATS over TLS and closed
/// to all but the NKey identities `tidings nats init` writes; else ws:// and NATS without
/// credentials.
pub(crate) async fn deploy(
    root: &Path,
    data: &Path,
    variant: Variant,
    secrets: (&Path, &Path),
    env: &[(&str, &str)],
) -> anyhow::Result<Deployment> {
    let secure = variant.secure;
    let (master_file, jwt_file) = secrets;
    let nats_port = free_port()?;
    let nats_dir = root.join("nats");
    let mut nats = std::process::Command::new("nats-server");
    let mut server = std::process::Command::new(std::env::current_exe()?);
    let gw_port = free_port()?;
    let (scheme, client_tls, open_nats_url) = if secure {
        let (ca, cert, key) = make_pki(&root.join("pki"))?;
        crate::nats_init::init(&root.join("creds"))?;
        let conf = root.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{nats_port}\n\
                 jetstream {{ store_dir: {nats_dir:?} }}\n\
                 tls {{ cert_file: {cert:?}\n key_file: {key:?}\n timeout: 2 }}\n\
                 include \"creds/accounts.conf\"\n"
            ),
        )?;
        nats.arg("-c").arg(&conf);
        server
            .env("TIDINGS_NATS_URL", format!("tls://127.0.0.1:{nats_port}"))
            .env("TIDINGS_NATS_TLS_CA_FILE", &ca)
            .env("TIDINGS_NATS_TLS_REQUIRED", "1")
            .env("TIDINGS_NATS_NKEY_SEED_FILE", root.join("creds/all.nk"))
            .env("TIDINGS_GATEWAY_TLS_CERT_FILE", &cert)
            .env("TIDINGS_GATEWAY_TLS_KEY_FILE", &key);
        let tls = ClientTls { ca_file: Some(ca) };
        ("wss", tls, None)
    } else {
        let url = format!("nats://127.0.0.1:{nats_port}");
        plain_nats_args(&mut nats, nats_port, &nats_dir);
        server.env("TIDINGS_NATS_URL", &url);
        ("ws", ClientTls::default(), Some(url))
    };
    let nats_log = root.join("nats.log");
    let nats = Child(
        nats.stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&nats_log)?)
            .spawn()
            .context("start nats-server (apt-get install nats-server)")?,
    );
    wait_port(nats_port, &nats_log).await?;
    let hook = match (&open_nats_url, variant.intercept) {
        (Some(url), true) => {
            let config = root.join("intercept.toml");
            std::fs::write(
                &config,
                format!(
                    "[[log.interceptors]]\ntenant = \"bench\"\nsubject = \"{INTERCEPT_SUBJECT}\"\n"
                ),
            )?;
            server.env("TIDINGS_CONFIG", &config);
            Some(allow_all(url).await?)
        }
        _ => None,
    };
    let server_log = root.join("server.log");
    let server = Child(
        server
            .args(["serve", "--role", "all"])
            .env("TIDINGS_DATA_DIR", data)
            .env("TIDINGS_MASTER_KEY_FILE", master_file)
            .env("TIDINGS_AUTH_HS256_SECRET_FILE", jwt_file)
            .env("TIDINGS_AUTH_HS256_ENABLED", "1")
            .env("TIDINGS_GATEWAY_LISTEN", format!("127.0.0.1:{gw_port}"))
            // The bench needs no admin listener, and its default port may be taken.
            .env("TIDINGS_ADMIN_LISTEN", "")
            .env("TIDINGS_GATEWAY_FRAMES_PER_SECOND", "100000")
            .env("TIDINGS_GATEWAY_FRAME_BURST", "100000")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&server_log)?)
            .spawn()?,
    );
    wait_port(gw_port, &server_log).await?;
    Ok(Deployment {
        nats,
        server,
        hook,
        url: format!("{scheme}://127.0.0.1:{gw_port}/v1/ws"),
        client_tls,
        gateway_port: gw_port,
        open_nats_url,
    })
}

/// Where the bench's interceptor answers.
const INTERCEPT_SUBJECT: &str = "tidings.intercept.bench";

/// An interceptor that allows every message, as a tenant's DLP service would when nothing
/// is wrong: the hook's round trip is what is measured.
async fn allow_all(url: &str) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let client = async_nats::connect(url).await?;
    let mut requests = client.subscribe(INTERCEPT_SUBJECT).await?;
    client.flush().await?;
    Ok(tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            if let Some(reply) = msg.reply {
                let _ = client.publish(reply, r#"{"allow":true}"#.into()).await;
            }
        }
    }))
}

impl Deployment {
    /// The server process's peak resident set so far, KiB.
    pub(crate) fn server_peak_rss_kib(&self) -> u64 {
        crate::bench::peak_rss_kib_of(&self.server.0.id().to_string())
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if let Some(hook) = self.hook.take() {
            hook.abort();
        }
    }
}

/// Issues the bench's user tokens (tenant `bench`).
pub(crate) struct Tokens {
    pub(crate) secret: [u8; 32],
}

/// What a benched server is started with: the master key's file and a fresh HS256 secret's.
pub(crate) struct Secrets {
    pub(crate) master_file: PathBuf,
    pub(crate) jwt_file: PathBuf,
    pub(crate) tokens: Tokens,
}

impl Secrets {
    /// Writes `master_hex` and a new random token secret under `root`.
    pub(crate) fn write(root: &Path, master_hex: &str) -> anyhow::Result<Secrets> {
        let master_file = root.join("master.key");
        std::fs::write(&master_file, master_hex)?;
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
        let jwt_file = root.join("jwt.secret");
        std::fs::write(&jwt_file, tidings_log::crypto::hex_encode(&secret))?;
        Ok(Secrets {
            master_file,
            jwt_file,
            tokens: Tokens { secret },
        })
    }
}

impl Tokens {
    pub(crate) fn of(&self, user: &str) -> String {
        let now = tidings_log_api::now_secs();
        tidings_auth::issue_hs256(
            &self.secret,
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
    }
}

/// What the latency and throughput runs measured on one deployment.
struct Measured {
    latencies: Vec<Duration>,
    sends_per_s: f64,
    sessions: usize,
    /// CPU time of `tidings serve` and of nats-server per acked send in the throughput run:
    /// what the server side pays, whatever the bench's own clients cost on the same cores.
    server_cpu_per_send: Duration,
    nats_cpu_per_send: Duration,
    /// This process's CPU time per acked send in the throughput run: the bench's clients,
    /// which share the cores with the server.
    client_cpu_per_send: Duration,
}

/// The log alone, in this process, at the throughput run's concurrency and shape.
struct LogAlone {
    appends_per_s: f64,
    cpu_per_append: Duration,
}

/// CPU time (user + system) a process has used so far, from /proc/PID/stat (Linux; in
/// USER_HZ ticks, 100 per second). Zero where it cannot be read.
fn cpu_time(child: &Child) -> Duration {
    cpu_time_of(child.0.id())
}

/// [`cpu_time`] of any process, by id.
fn cpu_time_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let field = |i: usize| -> u64 {
        rest.split_whitespace()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    Duration::from_millis((field(11) + field(12)) * 10)
}

pub async fn run(args: GatewayArgs, _config: &Config) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.users >= 2 && args.rate > 0 && args.senders > 0,
        "users >= 2, rate and senders > 0"
    );
    let (_, dir) = crate::bench::scratch_dir(args.dir.as_deref(), "gw")?;
    let root = dir.path();

    let master = MasterKey::generate();
    let Secrets {
        master_file,
        jwt_file,
        tokens,
    } = Secrets::write(root, &master.to_hex())?;
    let tenant = TenantId::new("bench")?;
    let pairs = args.users / 2;

    println!(
        "tidings bench gateway: {} cores; nats-server and `tidings serve` on loopback; edge: {:?}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.edge
    );
    println!();

    // Compare: plain and the other variant in each round, alternating which goes first.
    let other = match args.edge {
        Edge::Intercept => Variant::INTERCEPT,
        _ => Variant::TLS,
    };
    let rounds: Vec<Vec<Variant>> = match args.edge {
        Edge::Plain => vec![vec![Variant::PLAIN]],
        Edge::Tls => vec![vec![Variant::TLS]],
        Edge::Compare | Edge::Intercept => (0..args.rounds.max(1))
            .map(|r| {
                if r % 2 == 0 {
                    vec![Variant::PLAIN, other]
                } else {
                    vec![other, Variant::PLAIN]
                }
            })
            .collect(),
    };
    let comparing = matches!(args.edge, Edge::Compare | Edge::Intercept);
    let mut ratios = Vec::new();
    for (round, variants) in rounds.iter().enumerate() {
        let (mut plain, mut measured, mut sealing) = (None, None, Vec::new());
        for &variant in variants {
            let alone = if !comparing && round == 0 {
                Some(
                    log_alone(
                        &root.join("log-alone"),
                        &master.to_hex(),
                        &tenant,
                        pairs,
                        &args,
                    )
                    .await?,
                )
            } else {
                None
            };
            let here = root.join(format!("{}-{round}", variant.name()));
            let data = here.join("data");
            sealing = seed_store(&data, &master.to_hex(), &tenant, pairs, &args, true).await?;
            // Dropped at the end of this iteration: one deployment runs at a time.
            let dep = deploy(&here, &data, variant, (&master_file, &jwt_file), &[]).await?;
            let baseline = match &dep.open_nats_url {
                Some(url) if round == 0 && !variant.intercept => {
                    Some(baselines(url, &root.join("raw")).await?)
                }
                _ => None,
            };
            let m = measure(&dep, &args, pairs, &tokens).await?;
            if !comparing {
                print_single(&m, &args, pairs, baseline.as_ref(), alone.as_ref());
                if args.fanout > 1 {
                    fan_out(&dep, &args, &tokens).await?;
                }
            }
            *(if variant == Variant::PLAIN {
                &mut plain
            } else {
                &mut measured
            }) = Some(m);
        }
        if let (Some(plain), Some(measured)) = (&plain, &measured) {
            println!("round {} of {}:", round + 1, rounds.len());
            ratios.push(print_comparison(plain, measured, other, &sealing));
        }
    }
    if ratios.len() > 1 {
        let median = |i: usize| {
            let mut v: Vec<f64> = ratios.iter().map(|r: &[f64; 4]| r[i]).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "median of {} rounds, {} / plain: p50 {:.2}x, p99 {:.2}x, acked sends/s {:.2}x, \
             server CPU per send {:.2}x",
            ratios.len(),
            other.name(),
            median(0),
            median(1),
            median(2),
            median(3)
        );
    }
    Ok(())
}

/// The raw baselines: a NATS request/reply round trip and a durable store commit.
async fn baselines(nats_url: &str, raw: &Path) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let nats_rtt = nats_round_trips(nats_url, 2000).await?;
    let commits = store_commits(raw, 2000)?;
    println!("| baseline | p50 | p99 | p99.9 |");
    println!("|---|---:|---:|---:|");
    println!(
        "| raw NATS request/reply round trip (200 B) | {} | {} | {} |",
        ms(quantile(&nats_rtt, 0.5)),
        ms(quantile(&nats_rtt, 0.99)),
        ms(quantile(&nats_rtt, 0.999))
    );
    println!(
        "| raw store durable commit (one 200 B value, fsync) | {} | {} | {} |",
        ms(quantile(&commits, 0.5)),
        ms(quantile(&commits, 0.99)),
        ms(quantile(&commits, 0.999))
    );
    println!();
    Ok((nats_rtt, commits))
}

/// Latency at a steady rate, then throughput with senders as fast as acked.
async fn measure(
    dep: &Deployment,
    args: &GatewayArgs,
    pairs: usize,
    tokens: &Tokens,
) -> anyhow::Result<Measured> {
    // Senders keep only their request side: their own pushes are dropped unread. (A
    // Connection whose pushes nobody takes stops reading its socket once its buffer is full,
    // and the server then cuts it off as a slow consumer.)
    let open = |user: String| {
        let (url, tls, token) = (dep.url.clone(), dep.client_tls.clone(), tokens.of(&user));
        async move {
            Connection::open_with(&url, &tls, &token, "bench")
                .await
                .map(|(c, _)| c)
                .with_context(|| format!("open a session for {user} at {url}"))
        }
    };
    let mut requesters = Vec::new();
    let mut receivers = Vec::new();
    for p in 0..pairs {
        requesters.push(open(format!("a{p}")).await?.requester());
        receivers.push(open(format!("b{p}")).await?);
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
    let cpu_before = (
        cpu_time(&dep.server),
        cpu_time(&dep.nats),
        cpu_time_of(std::process::id()),
    );
    while sending.join_next().await.is_some() {}
    let sends = acked.load(Ordering::Relaxed);
    let per_send = |d: Duration| d / u32::try_from(sends.max(1)).unwrap_or(u32::MAX);
    Ok(Measured {
        latencies,
        sends_per_s: sends as f64 / started.elapsed().as_secs_f64(),
        sessions: args.senders.min(pairs.max(1)),
        server_cpu_per_send: per_send(cpu_time(&dep.server).saturating_sub(cpu_before.0)),
        nats_cpu_per_send: per_send(cpu_time(&dep.nats).saturating_sub(cpu_before.1)),
        client_cpu_per_send: per_send(cpu_time_of(std::process::id()).saturating_sub(cpu_before.2)),
    })
}

/// The throughput run without the gateway: `--senders` tasks of this process appending as
/// fast as acked to a [`Log`] of their own (fresh store, same conversations, same senders,
/// same text), for `--seconds`, before any server runs. What the path around the log is
/// weighed against: `bench append`'s measure, in this run and this workload.
async fn log_alone(
    data: &Path,
    master_hex: &str,
    tenant: &TenantId,
    pairs: usize,
    args: &GatewayArgs,
) -> anyhow::Result<LogAlone> {
    seed_store(data, master_hex, tenant, pairs, args, false).await?;
    let log = open_log(data, master_hex).await?;
    let acked = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut sending = tokio::task::JoinSet::new();
    for s in 0..args.senders {
        let p = s % pairs.max(1);
        let (log, tenant, acked) = (log.clone(), tenant.clone(), acked.clone());
        sending.spawn(async move {
            let (conv, sender) = (
                ConvId::new(format!("pair{p}"))?,
                UserId::new(format!("a{p}"))?,
            );
            let mut i = 0u64;
            while Instant::now() < deadline {
                let id = tidings_log::ClientMsgId::new(format!("tp{s}-{i}"))?;
                let req = tidings_log::Append::text(
                    tenant.clone(),
                    conv.clone(),
                    sender.clone(),
                    id,
                    "throughput",
                );
                if log.append_for_user(req).await.is_ok() {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
            anyhow::Ok(())
        });
    }
    let started = Instant::now();
    let cpu_before = cpu_time_of(std::process::id());
    while let Some(r) = sending.join_next().await {
        r??;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time_of(std::process::id()).saturating_sub(cpu_before);
    log.close().await;
    let appends = acked.load(Ordering::Relaxed);
    Ok(LogAlone {
        appends_per_s: appends as f64 / elapsed.as_secs_f64(),
        cpu_per_append: cpu / u32::try_from(appends.max(1)).unwrap_or(u32::MAX),
    })
}

fn print_single(
    m: &Measured,
    args: &GatewayArgs,
    pairs: usize,
    baseline: Option<&(Vec<Duration>, Vec<Duration>)>,
    alone: Option<&LogAlone>,
) {
    let lat = &m.latencies;
    let vs_base =
        |d: Duration, b: Duration| format!("{:.1}x", d.as_secs_f64() / b.as_secs_f64().max(1e-9));
    println!(
        "| end to end, send -> other member's push | users | rate | p50 | p99 | p99.9 | delivered | p50 / (NATS rtt + commit) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| steady rate | {} | {}/s | {} | {} | {} | {}/{} | {} |",
        pairs * 2,
        args.rate,
        ms(quantile(lat, 0.5)),
        ms(quantile(lat, 0.99)),
        ms(quantile(lat, 0.999)),
        lat.len(),
        args.messages,
        baseline.map_or("-".into(), |(rtt, c)| vs_base(
            quantile(lat, 0.5),
            quantile(rtt, 0.5) + quantile(c, 0.5)
        ))
    );
    println!();
    let commit_rate = baseline.map(|(_, c)| 1.0 / quantile(c, 0.5).as_secs_f64().max(1e-9));
    println!(
        "| throughput | sessions | acked sends/s | raw store commits/s (one value each) | ratio |"
    );
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| as fast as acked | {} | {:.0} | {} | {} |",
        m.sessions,
        m.sends_per_s,
        commit_rate.map_or("-".into(), |r| format!("{r:.0}")),
        commit_rate.map_or("-".into(), |r| format!("{:.2}x", m.sends_per_s / r))
    );
    println!();
    if let Some(alone) = alone {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "| the same senders, conversations and text | acked/s | CPU per send: tidings | nats-server | bench clients | total |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        println!(
            "| the log alone, in process (no gateway, no NATS) | {:.0} | {:.0} µs | - | - | {:.0} µs |",
            alone.appends_per_s,
            us(alone.cpu_per_append),
            us(alone.cpu_per_append)
        );
        println!(
            "| through the gateway (tidings serve, nats-server) | {:.0} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs |",
            m.sends_per_s,
            us(m.server_cpu_per_send),
            us(m.nats_cpu_per_send),
            us(m.client_cpu_per_send),
            us(m.server_cpu_per_send + m.nats_cpu_per_send + m.client_cpu_per_send)
        );
        println!(
            "| **gateway / log alone** | **{:.2}x** | | | | {:.2}x |",
            m.sends_per_s / alone.appends_per_s.max(1e-9),
            (m.server_cpu_per_send + m.nats_cpu_per_send + m.client_cpu_per_send).as_secs_f64()
                / alone.cpu_per_append.as_secs_f64().max(1e-9)
        );
        println!();
    }
}

/// TLS on every link (wss, NATS TLS with NKeys) against the same run without it; the bus is
/// sealed in both (there is no unsealed bus), so what sealing costs is measured in-process.
/// Returns the ratios secure / plain: [p50, p99, acked sends/s, server CPU per send].
fn print_comparison(
    plain: &Measured,
    tls: &Measured,
    other: Variant,
    sealing: &[Duration],
) -> [f64; 4] {
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!(
        "| deployment | p50 | p99 | p99.9 | delivered | acked sends/s | CPU per send: tidings + nats-server |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let other_name = if other.intercept {
        "intercept: plain, every send checked by an allow-all interceptor over NATS"
    } else {
        "secure: wss://, NATS over TLS with the role's NKey"
    };
    for (name, m) in [
        ("plain: ws://, NATS without TLS or credentials", plain),
        (other_name, tls),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} | {:.0} | {:.0} + {:.0} µs |",
            ms(quantile(&m.latencies, 0.5)),
            ms(quantile(&m.latencies, 0.99)),
            ms(quantile(&m.latencies, 0.999)),
            m.latencies.len(),
            m.sends_per_s,
            m.server_cpu_per_send.as_secs_f64() * 1e6,
            m.nats_cpu_per_send.as_secs_f64() * 1e6
        );
    }
    let ratios = [
        ratio(
            quantile(&tls.latencies, 0.5),
            quantile(&plain.latencies, 0.5),
        ),
        ratio(
            quantile(&tls.latencies, 0.99),
            quantile(&plain.latencies, 0.99),
        ),
        tls.sends_per_s / plain.sends_per_s.max(1e-9),
        ratio(
            tls.server_cpu_per_send + tls.nats_cpu_per_send,
            plain.server_cpu_per_send + plain.nats_cpu_per_send,
        ),
    ];
    println!(
        "| **{} / plain** | **{:.2}x** | **{:.2}x** | {:.2}x | | **{:.2}x** | {:.2}x |",
        other.name(),
        ratios[0],
        ratios[1],
        ratio(
            quantile(&tls.latencies, 0.999),
            quantile(&plain.latencies, 0.999)
        ),
        ratios[2],
        ratios[3]
    );
    println!();
    let seal = quantile(sealing, 0.5);
    println!(
        "bus sealing (both runs): seal + open of one event, median {:.1} µs, p99 {:.1} µs = {:.2}% of the plain p50",
        seal.as_secs_f64() * 1e6,
        quantile(sealing, 0.99).as_secs_f64() * 1e6,
        100.0 * ratio(seal, quantile(&plain.latencies, 0.5))
    );
    println!();
    ratios
}

/// One message to a group of `--fanout` members, all online.
async fn fan_out(dep: &Deployment, args: &GatewayArgs, tokens: &Tokens) -> anyhow::Result<()> {
    let permits = Arc::new(Semaphore::new(64));
    let mut connecting = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..args.fanout {
        let (url, tls, token, permits) = (
            dep.url.clone(),
            dep.client_tls.clone(),
            tokens.of(&format!("f{i}")),
            permits.clone(),
        );
        connecting.spawn(async move {
            let _p = permits.acquire_owned().await;
            Connection::open_with(&url, &tls, &token, "bench")
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
    println!("| fan-out | members online | connect all | send -> last member has it | delivered |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| one message, one group | {} | {:.1} s | {} | {}/{} |",
        args.fanout,
        connect_time.as_secs_f64(),
        ms(last - sent),
        got,
        args.fanout - 1
    );
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
