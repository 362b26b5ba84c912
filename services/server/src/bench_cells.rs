//! `tidings bench cells`: two cells on loopback (each its own nats-server, leaf-joined in the
//! link account, and its own `tidings serve`), as `tests/cells.rs` runs them. Per run:
//!
//! - **send latency, synchronous against asynchronous replication**, in the same run: two
//!   VIP tenants homed in cell a with DR cell b, one of each mode; their sends alternate, one
//!   at a time, so both see the same machine;
//! - **replication lag** p50/p99 in cell b (`tidings_cell_replication_lag_seconds`, from
//!   the commit in a to the replica applied in b) over those sends;
//! - **the drill**: while both tenants send as fast as acknowledged, cell a's processes are
//!   SIGKILLed, both fail over to b (unplanned); the time from the kill to the first send
//!   acknowledged in b, and the acknowledged events b lacks (the RPO) per mode.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tidings_client::{ClientTls, Connection};
use tidings_log::crypto::MasterKey;

use crate::bench::{median, quantile};
use crate::bench_gateway::{Child, free_port, wait_port};

#[derive(clap::Args, Debug)]
pub struct CellsArgs {
    /// Sends per tenant in the latency run.
    #[arg(long, default_value_t = 500)]
    pub sends: usize,
    /// Deployments made and measured (medians over them are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Where the cells' data goes (default: the system's temp directory).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
}

const TENANTS: [(&str, bool); 2] = [("async", false), ("sync", true)];

/// One cell's processes and addresses.
struct Cell {
    nats: Option<Child>,
    server: Option<Child>,
    url: String,
    admin: String,
}

/// A cell's place in the loopback leaf-node link: the hub listens on the port, the others
/// join it.
#[derive(Clone, Copy, Debug)]
pub enum Leaf {
    Hub(u16),
    Spoke(u16),
}

/// A loopback cell's nats-server config, for this bench and `tests/cells.rs`: JetStream in
/// domain `name`, the application's account `APP` (user `app`, and the default for clients
/// without a credential) and the link account `CELL` (user `cell`, password `cell`), which
/// alone the leaf node joins. `listen` and `store` when the command line does not give them.
pub fn loopback_nats_conf(
    name: &str,
    leaf: Leaf,
    listen: Option<u16>,
    store: Option<&Path>,
) -> String {
    let listen = listen.map_or(String::new(), |p| format!("listen: 127.0.0.1:{p}\n"));
    let store = store.map_or(String::new(), |s| format!(", store_dir: {s:?}"));
    let leafnodes = match leaf {
        Leaf::Hub(port) => format!(
            "leafnodes {{ listen: \"127.0.0.1:{port}\", authorization {{ users: [ {{user: leaf, password: leaf, account: CELL}} ] }} }}\n"
        ),
        Leaf::Spoke(port) => format!(
            "leafnodes {{ remotes: [ {{ url: \"nats-leaf://leaf:leaf@127.0.0.1:{port}\", account: CELL }} ], reconnect: 1 }}\n"
        ),
    };
    format!(
        "{listen}jetstream {{ domain: \"{name}\"{store} }}\n\
         accounts {{\n\
           APP: {{ jetstream: enabled, users: [ {{user: app, password: app}} ] }}\n\
           CELL: {{ jetstream: enabled, users: [ {{user: cell, password: cell}} ] }}\n\
         }}\n\
         no_auth_user: app\n\
         {leafnodes}"
    )
}

/// Starts cells a (the leaf hub) and b.
async fn start(root: &Path, jwt_file: &Path, link_file: &Path) -> anyhow::Result<(Cell, Cell)> {
    let leaf_port = free_port()?;
    let names = ["a", "b"];
    let gw: Vec<u16> = names
        .iter()
        .map(|_| free_port())
        .collect::<Result<_, _>>()?;
    let mut cells = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        let nats_port = free_port()?;
        let leaf = if i == 0 {
            Leaf::Hub(leaf_port)
        } else {
            Leaf::Spoke(leaf_port)
        };
        let conf = dir.join("nats.conf");
        let text = loopback_nats_conf(name, leaf, Some(nats_port), Some(&dir.join("js")));
        std::fs::write(&conf, text)?;
        let nats_log = dir.join("nats.log");
        let nats = Child(
            std::process::Command::new("nats-server")
                .arg("-c")
                .arg(&conf)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&nats_log)?)
                .spawn()
                .context("start nats-server (apt-get install nats-server)")?,
        );
        wait_port(nats_port, &nats_log).await?;
        let master = dir.join("master.key");
        std::fs::write(&master, MasterKey::generate().to_hex())?;
        let admin_port = free_port()?;
        let other = names[1 - i];
        let server_log = dir.join("server.log");
        let server = Child(
            std::process::Command::new(std::env::current_exe()?)
                .args(["serve", "--role", "all"])
                .env("TIDINGS_DATA_DIR", dir.join("data"))
                .env("TIDINGS_MASTER_KEY_FILE", &master)
                .env("TIDINGS_AUTH_HS256_SECRET_FILE", jwt_file)
                .env("TIDINGS_AUTH_HS256_ENABLED", "1")
                .env("TIDINGS_NATS_URL", format!("nats://127.0.0.1:{nats_port}"))
                .env("TIDINGS_GATEWAY_LISTEN", format!("127.0.0.1:{}", gw[i]))
                .env("TIDINGS_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
                .env("TIDINGS_GATEWAY_FRAMES_PER_SECOND", "100000")
                .env("TIDINGS_GATEWAY_FRAME_BURST", "100000")
                .env("TIDINGS_CELL_NAME", name)
                .env(
                    "TIDINGS_CELL_URL",
                    format!("ws://127.0.0.1:{}/v1/ws", gw[i]),
                )
                .env("TIDINGS_CELL_LINK_KEY_FILE", link_file)
                .env(
                    "TIDINGS_CELL_NATS_URL",
                    format!("nats://127.0.0.1:{nats_port}"),
                )
                .env("TIDINGS_CELL_NATS_USER", "cell")
                .env("TIDINGS_CELL_NATS_PASSWORD", "cell")
                .env(
                    "TIDINGS_CELL_PEERS",
                    format!("{other}=ws://127.0.0.1:{}/v1/ws", gw[1 - i]),
                )
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&server_log)?)
                .spawn()?,
        );
        wait_port(gw[i], &server_log).await?;
        wait_port(admin_port, &server_log).await?;
        cells.push(Cell {
            nats: Some(nats),
            server: Some(server),
            url: format!("ws://127.0.0.1:{}/v1/ws", gw[i]),
            admin: format!("http://127.0.0.1:{admin_port}"),
        });
    }
    let b = cells.pop().context("cell b")?;
    let a = cells.pop().context("cell a")?;
    Ok((a, b))
}

fn token(secret: &[u8], tenant: &str, user: &str, audience: &str, roles: &[&str]) -> String {
    let now = tidings_log_api::now_secs();
    tidings_auth::issue_hs256(
        secret,
        "tidings",
        audience,
        &tidings_auth::Claims {
            tenant: tenant.into(),
            user: user.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            expires_at: now + 3600,
            issued_at: now,
            jti: None,
        },
    )
}

async fn admin(cell: &Cell, secret: &[u8], path: &str, body: Value) -> anyhow::Result<Value> {
    let tenant = body["tenant"].as_str().unwrap_or_default().to_string();
    let token = token(secret, &tenant, "ops", "tidings-compliance", &["admin"]);
    let (status, answer) =
        crate::revoke::post_admin(&cell.admin, path, &token, &ClientTls::default(), body).await?;
    anyhow::ensure!(status == 200, "{path}: {status} {answer}");
    Ok(answer)
}

/// The p-quantile of a Prometheus histogram on `url` (the upper bound of its bucket).
async fn histogram_quantile(url: &str, name: &str, p: f64) -> anyhow::Result<f64> {
    let client = crate::revoke::http_client(&ClientTls::default())?;
    let text = client.get(url).send().await?.text().await?;
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{le=\"")) else {
            continue;
        };
        let Some((le, count)) = rest.split_once("\"} ") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse()?
        };
        buckets.push((le, count.trim().parse()?));
    }
    let total = buckets.last().map_or(0.0, |b| b.1);
    anyhow::ensure!(total > 0.0, "no observations of {name}");
    Ok(buckets
        .iter()
        .find(|(_, count)| *count >= total * p)
        .map_or(f64::INFINITY, |b| b.0))
}

struct Run {
    send_ms: [Vec<f64>; 2],
    lag_p50: f64,
    lag_p99: f64,
    first_send_s: f64,
    lost: [u64; 2],
    acked: [u64; 2],
}

async fn one_run(root: &Path, args: &CellsArgs) -> anyhow::Result<Run> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
    let jwt_file = root.join("jwt.secret");
    std::fs::write(&jwt_file, tidings_log::crypto::hex_encode(&secret))?;
    let link_file = root.join("link.key");
    std::fs::write(&link_file, MasterKey::generate().to_hex())?;
    let (mut a, b) = start(root, &jwt_file, &link_file).await?;

    for (tenant, sync) in TENANTS {
        let body = json!({"tenant": tenant, "home": "a", "dr": "b", "tier": "vip", "sync": sync});
        admin(&a, &secret, "/v1/admin/cells/place", body).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let shown = admin(
            &a,
            &secret,
            "/v1/admin/cells/show",
            json!({"tenant": "sync"}),
        )
        .await?;
        if shown["dr_confirmed"] == json!(true) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "a never compared directories with b"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut conns = Vec::new();
    for (tenant, _) in TENANTS {
        let t = token(&secret, tenant, "alice", "tidings", &[]);
        let (conn, _) = Connection::open_with(&a.url, &ClientTls::default(), &t, "bench").await?;
        conn.create_conversation(
            "team",
            tidings_schemas::v1::ConversationKind::Group,
            "team",
            &["bob"],
        )
        .await?;
        conns.push(conn);
    }

    // Latency: the two modes alternate, one send at a time.
    let mut send_ms = [Vec::new(), Vec::new()];
    for i in 0..args.sends {
        for (m, conn) in conns.iter().enumerate() {
            let started = Instant::now();
            conn.send_text("team", &format!("l{i}"), "latency")
                .await
                .context("send")?;
            send_ms[m].push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    let metrics = format!("{}/metrics", b.admin);
    // Everything sent so far is replicated once the DR cell's applier has applied it; wait
    // until the histogram has stopped growing a moment (the lag is of what applied).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lag_p50 = histogram_quantile(&metrics, "tidings_cell_replication_lag_seconds", 0.5).await?;
    let lag_p99 =
        histogram_quantile(&metrics, "tidings_cell_replication_lag_seconds", 0.99).await?;

    // The drill: both tenants send as fast as acknowledged; a is killed under them.
    let mut senders = Vec::new();
    for (m, conn) in conns.into_iter().enumerate() {
        senders.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0.. {
                match conn.send_text("team", &format!("d{i}"), "drill").await {
                    Ok(ack) => acked.push(ack.seq),
                    Err(_) => break,
                }
            }
            (m, acked)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.server = None;
    a.nats = None;
    let killed = Instant::now();
    let mut acked = [Vec::new(), Vec::new()];
    for s in senders {
        let (m, seqs) = s.await?;
        acked[m] = seqs;
    }
    let mut lost = [0u64; 2];
    let mut first_send_s = f64::NAN;
    for (m, (tenant, _)) in TENANTS.iter().enumerate() {
        let body = json!({"tenant": tenant, "planned": false});
        let report = admin(&b, &secret, "/v1/admin/cells/failover", body).await?;
        let head = report["conversations"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["conversation"] == "team"))
            .and_then(|c| c["last_seq"].as_u64())
            .unwrap_or(0);
        lost[m] = acked[m].iter().filter(|s| **s > head).count() as u64;
        if m == 0 {
            let t = token(&secret, tenant, "alice", "tidings", &[]);
            let (conn, _) =
                Connection::open_with(&b.url, &ClientTls::default(), &t, "bench").await?;
            conn.send_text("team", "after", "after the drill").await?;
            first_send_s = killed.elapsed().as_secs_f64();
        }
    }
    Ok(Run {
        send_ms,
        lag_p50,
        lag_p99,
        first_send_s,
        lost,
        acked: [acked[0].len() as u64, acked[1].len() as u64],
    })
}

pub async fn run(args: CellsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.sends > 0 && args.runs > 0, "sends and runs above 0");
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    println!(
        "tidings bench cells: {} cores; two cells on loopback, {} sends per mode, {} runs",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.sends,
        args.runs
    );
    println!();
    println!(
        "| run | send p50 async / sync | send p99 async / sync | p50 ratio sync/async | lag p50 / p99 (bucket) | kill -> first send in b | lost async (of acked) | lost sync (of acked) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    let mut firsts = Vec::new();
    for r in 0..args.runs {
        let dir = tempfile::Builder::new()
            .prefix("tidings-bench-cells-")
            .tempdir_in(&base)?;
        let mut run = one_run(dir.path(), &args).await?;
        for v in &mut run.send_ms {
            v.sort_by(f64::total_cmp);
        }
        let p50 = [
            quantile(&run.send_ms[0], 0.5),
            quantile(&run.send_ms[1], 0.5),
        ];
        let p99 = [
            quantile(&run.send_ms[0], 0.99),
            quantile(&run.send_ms[1], 0.99),
        ];
        ratios.push(p50[1] / p50[0]);
        firsts.push(run.first_send_s);
        println!(
            "| {} | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.2} | {:.3} / {:.3} s | {:.2} s | {} ({}) | {} ({}) |",
            r + 1,
            p50[0],
            p50[1],
            p99[0],
            p99[1],
            p50[1] / p50[0],
            run.lag_p50,
            run.lag_p99,
            run.first_send_s,
            run.lost[0],
            run.acked[0],
            run.lost[1],
            run.acked[1],
        );
    }
    println!();
    println!(
        "median over runs: sync/async send p50 ratio {:.2}; kill -> first send in b {:.2} s",
        median(ratios),
        median(firsts)
    );
    Ok(())
}
