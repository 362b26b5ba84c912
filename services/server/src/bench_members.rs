//! `tidings bench members`: a big group's first member page, @-list prefix search and
//! membership check, from the caches against reading the KV, in one run
//! (docs/decisions/gateway-membership-cache.md, versioned-member-lists.md).
//!
//! One fresh fjall store on disk, one group of `--members` members (created, then grown by
//! concurrent adds). Timed, `--samples` times each, p50 and p99:
//! - membership check: the log's KV read (`Log::is_member`) against the gateway's
//!   membership cache ([`tidings_gateway::members::MemberCache`]) once warm;
//! - first page (`--page` members) and prefix search: the log's bounded range read
//!   (`Log::member_page`) against the client library's versioned cache, loaded once;
//! - the client cache's load (the whole list, 1,000 per read) and a refresh with no change;
//! - the gateway's member list ([`MemberCache`] filled as a gateway fills it, 1,000 per
//!   read): first page, prefix search and check from it.
//!
//! Those are in process, without the gateway's socket and NATS hops: the costs the caches
//! remove. Then, unless `--in-process-only`, the same store is served by `tidings serve
//! --role all` three times, one after the other: with `gateway.member_cache_bytes = 0`
//! (every answer from the KV, through the log), with the default cache (warm), and without
//! it again (so the order of the servers shows); a client asks
//! through the WebSocket: first page, prefix search, and a membership check (a History of
//! one event: the check plus one event read, the same on both sides).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tidings_client::Connection;
use tidings_client::client::ListMembers;
use tidings_gateway::members::MemberCache;

use crate::bench::quantile;
use crate::bench_gateway::{Secrets, deploy};
use tidings_log::crypto::MasterKey;
use tidings_log::store::{FjallStore, KvStore};
use tidings_log::{ConvId, CreateConversation, Log, LogConfig, MembersQuery, TenantId, UserId};

#[derive(Debug, clap::Args)]
pub struct MembersArgs {
    /// Members of the group.
    #[arg(long, default_value_t = 50_000)]
    pub members: usize,
    /// Members per first page.
    #[arg(long, default_value_t = 100)]
    pub page: usize,
    /// Timed repetitions of each operation.
    #[arg(long, default_value_t = 2000)]
    pub samples: usize,
    /// Directory for the scratch store (default: the system temp directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Skip the runs through the gateway (no nats-server or server process).
    #[arg(long)]
    pub in_process_only: bool,
}

pub async fn run(args: MembersArgs, log_config: LogConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.members >= 2 && args.page > 0 && args.samples > 0,
        "members must be at least 2; page and samples positive"
    );
    let (base, dir) = crate::bench::scratch_dir(args.dir.as_deref(), "members")?;
    let data = dir.path().join("kv");
    let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(&data)?);
    let master = MasterKey::generate();
    let master_hex = master.to_hex();
    let cfg = LogConfig {
        max_group_members: log_config.max_group_members.max(args.members),
        send_buffer: None,
        ..log_config
    };
    let log = Log::open(store, master, cfg).await?;
    let (tenant, conv) = (TenantId::new("bench")?, ConvId::new("big")?);
    let owner = UserId::new("u0000000")?;
    let users: Vec<UserId> = (0..args.members)
        .map(|i| UserId::new(format!("u{i:07}")))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    log.create_conversation(CreateConversation {
        tenant: tenant.clone(),
        conv: conv.clone(),
        kind: "group".into(),
        title: String::new(),
        creator: owner.clone(),
        members: users[1..users.len().min(1000)].to_vec(),
    })
    .await?;
    let mut adds = tokio::task::JoinSet::new();
    for chunk in users[users.len().min(1000)..].chunks(users.len().div_ceil(64).max(1)) {
        let (log, tenant, conv, owner) = (log.clone(), tenant.clone(), conv.clone(), owner.clone());
        let chunk = chunk.to_vec();
        adds.spawn(async move {
            for u in &chunk {
                log.add_member(&tenant, &conv, &owner, u).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = adds.join_next().await {
        done.context("an adder panicked")??;
    }
    println!(
        "tidings bench members: a group of {} members (made in {:.1} s), pages of {}, {} samples \
         each, {} cores; fjall under {}",
        args.members,
        started.elapsed().as_secs_f64(),
        args.page,
        args.samples,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        base.display()
    );

    // Membership checks of members spread over the whole list.
    let probe = |i: usize| &users[(i * 7919) % users.len()];
    let kv_check = time(args.samples, |i| {
        let (log, tenant, conv, u) = (&log, &tenant, &conv, probe(i));
        async move {
            anyhow::ensure!(log.is_member(tenant, conv, u).await?, "not a member");
            Ok(())
        }
    })
    .await?;
    let cache = MemberCache::new(64 << 20);
    cache.track(&tenant, &conv);
    for i in 0..args.samples {
        if let Some(ticket) = cache.ticket(&tenant, &conv) {
            cache.remember(&tenant, &conv, probe(i), true, ticket);
        }
    }
    let cached_check = time(args.samples, |i| {
        let (cache, tenant, conv, u) = (&cache, &tenant, &conv, probe(i));
        async move {
            anyhow::ensure!(cache.lookup(tenant, conv, u) == Some(true), "not cached");
            Ok(())
        }
    })
    .await?;

    // The first page and a prefix search (an @-list query matching 100 members of 50,000).
    let prefix = format!("u{:05}", (args.members / 2) / 100);
    let page_query = MembersQuery {
        limit: args.page,
        ..MembersQuery::default()
    };
    let prefix_query = MembersQuery {
        limit: args.page,
        prefix: prefix.clone(),
        ..MembersQuery::default()
    };
    let kv_page = time(args.samples, |_| {
        let (log, tenant, conv, q) = (&log, &tenant, &conv, &page_query);
        async move {
            anyhow::ensure!(log.member_page(tenant, conv, q).await?.members.len() == q.limit);
            Ok(())
        }
    })
    .await?;
    let kv_prefix = time(args.samples, |_| {
        let (log, tenant, conv, q) = (&log, &tenant, &conv, &prefix_query);
        async move {
            anyhow::ensure!(!log.member_page(tenant, conv, q).await?.members.is_empty());
            Ok(())
        }
    })
    .await?;
    // The client's cache: the whole list, read 1,000 at a time, once.
    let load_started = Instant::now();
    let mut list: BTreeMap<String, ()> = BTreeMap::new();
    let mut after = None;
    loop {
        let q = MembersQuery {
            after: after.clone(),
            limit: 1000,
            ..MembersQuery::default()
        };
        let page = log.member_page(&tenant, &conv, &q).await?;
        let Some(last) = page.members.last() else {
            break;
        };
        after = Some(last.user.clone());
        list.extend(page.members.iter().map(|m| (m.user.to_string(), ())));
    }
    let load = load_started.elapsed();
    anyhow::ensure!(list.len() == args.members, "loaded {} members", list.len());
    let version = log.member_page(&tenant, &conv, &page_query).await?.version;
    let refresh = time(args.samples, |_| {
        let (log, tenant, conv) = (&log, &tenant, &conv);
        async move {
            let q = MembersQuery {
                limit: 1000,
                since_version: Some(version),
                ..MembersQuery::default()
            };
            anyhow::ensure!(log.member_page(tenant, conv, &q).await?.changes.is_empty());
            Ok(())
        }
    })
    .await?;
    let mem_page = time(args.samples, |_| {
        let (list, n) = (&list, args.page);
        async move {
            anyhow::ensure!(list.keys().take(n).count() == n);
            Ok(())
        }
    })
    .await?;
    let mem_prefix = time(args.samples, |_| {
        let (list, prefix, n) = (&list, &prefix, args.page);
        async move {
            let found = list
                .range(prefix.clone()..)
                .take_while(|(u, _)| u.starts_with(prefix.as_str()))
                .take(n)
                .count();
            anyhow::ensure!(found > 0);
            Ok(())
        }
    })
    .await?;

    // The gateway's member list, filled as a gateway fills it.
    let lists = MemberCache::new(64 << 20);
    lists.track(&tenant, &conv);
    let fill_started = Instant::now();
    let fill = lists
        .begin_fill(&tenant, &conv)
        .context("start a member list fill")?;
    while let Some(after) = lists.next_after(&tenant, &conv, fill) {
        let q = MembersQuery {
            after,
            limit: 1000,
            ..MembersQuery::default()
        };
        let page = log.member_page(&tenant, &conv, &q).await?;
        let last = page.members.len() < q.limit;
        if !lists.add_page(&tenant, &conv, fill, page.version, page.members, last) {
            break;
        }
    }
    let fill_time = fill_started.elapsed();
    let gw_page = time(args.samples, |_| {
        let (lists, tenant, conv, n) = (&lists, &tenant, &conv, args.page);
        async move {
            let page = lists
                .page(tenant, conv, None, "", n, 0)
                .context("not cached")?;
            anyhow::ensure!(page.members.len() == n);
            Ok(())
        }
    })
    .await?;
    let gw_prefix = time(args.samples, |_| {
        let (lists, tenant, conv, prefix, n) = (&lists, &tenant, &conv, &prefix, args.page);
        async move {
            let page = lists
                .page(tenant, conv, None, prefix, n, 0)
                .context("not cached")?;
            anyhow::ensure!(!page.members.is_empty());
            Ok(())
        }
    })
    .await?;
    let gw_check = time(args.samples, |i| {
        let (lists, tenant, conv, u) = (&lists, &tenant, &conv, probe(i));
        async move {
            anyhow::ensure!(lists.lookup(tenant, conv, u) == Some(true), "not cached");
            Ok(())
        }
    })
    .await?;

    println!();
    println!("In process:");
    println!();
    print_table(&[
        ("membership check (gateway answers)", kv_check, cached_check),
        ("membership check (gateway list)", kv_check, gw_check),
        ("first page (gateway list)", kv_page, gw_page),
        ("prefix search (gateway list)", kv_prefix, gw_prefix),
        ("first page (client cache)", kv_page, mem_page),
        ("prefix search (client cache)", kv_prefix, mem_prefix),
    ]);
    println!();
    println!(
        "gateway list: filled in {:.0} ms ({} reads of 1,000), {} KiB for {} members",
        fill_time.as_secs_f64() * 1e3,
        args.members.div_ceil(1000),
        lists.bytes() / 1024,
        args.members
    );
    println!(
        "client cache: load of {} members {:.0} ms (once); a refresh with no change p50 {} / \
         p99 {}; gateway cache of {} answers: {} KiB",
        list.len(),
        load.as_secs_f64() * 1e3,
        us(refresh.0),
        us(refresh.1),
        args.samples.min(args.members),
        cache.bytes() / 1024
    );
    log.close().await;
    if !args.in_process_only {
        through_gateway(&args, dir.path(), &data, &master_hex, &prefix).await?;
    }
    Ok(())
}

/// The same store served by `tidings serve --role all`, with the gateway's cache off (every
/// answer from the KV through the log) and on (warm), asked through a WebSocket.
async fn through_gateway(
    args: &MembersArgs,
    root: &Path,
    data: &Path,
    master_hex: &str,
    prefix: &str,
) -> anyhow::Result<()> {
    let Secrets {
        master_file,
        jwt_file,
        tokens,
    } = Secrets::write(root, master_hex)?;
    let owner = "u0000000";
    let samples = args.samples;
    let mut rows = Vec::new();
    // The KV side runs again last: the order of the two servers is not what is measured.
    for (n, cache_bytes) in ["0", "67108864", "0"].into_iter().enumerate() {
        let here = root.join(format!("serve-{n}"));
        std::fs::create_dir_all(&here)?;
        let dep = deploy(
            &here,
            data,
            crate::bench_gateway::Variant::PLAIN,
            (&master_file, &jwt_file),
            &[("TIDINGS_GATEWAY_MEMBER_CACHE_BYTES", cache_bytes)],
        )
        .await?;
        let (conn, _) =
            Connection::open_with(&dep.url, &dep.client_tls, &tokens.of(owner), "bench")
                .await
                .context("connect to the gateway")?;
        let r = conn.requester();
        let ask = |prefix: &str, limit: u32| ListMembers {
            conversation: "big".into(),
            limit,
            prefix: prefix.into(),
            ..ListMembers::default()
        };
        // The first page starts the gateway's fill; wait for the list (cache on).
        r.member_page(ask("", 1)).await?;
        if cache_bytes != "0" {
            wait_for_list(dep.gateway_port).await?;
        }
        let page = time(samples, |_| {
            let (r, q) = (&r, ask("", args.page as u32));
            async move {
                anyhow::ensure!(r.member_page(q).await?.members.len() == args.page);
                Ok(())
            }
        })
        .await?;
        let search = time(samples, |_| {
            let (r, q) = (&r, ask(prefix, args.page as u32));
            async move {
                anyhow::ensure!(!r.member_page(q).await?.members.is_empty());
                Ok(())
            }
        })
        .await?;
        let check = time(samples, |_| {
            let r = &r;
            async move {
                anyhow::ensure!(r.history("big", 0, 1).await?.events.len() == 1);
                Ok(())
            }
        })
        .await?;
        rows.push((page, search, check));
    }
    let (kv, mem, kv_again) = (rows[0], rows[1], rows[2]);
    println!();
    println!(
        "Through the gateway (`serve --role all`, a WebSocket client on loopback), the cache \
         off (KV) and on (warm), one after the other on the same store:"
    );
    println!();
    print_table(&[
        ("first page", kv.0, mem.0),
        ("prefix search", kv.1, mem.1),
        ("membership check + one event (History)", kv.2, mem.2),
    ]);
    println!();
    println!(
        "the KV side again, after the memory run: first page p50 {} / p99 {}, prefix search \
         {} / {}, History {} / {}",
        us(kv_again.0.0),
        us(kv_again.0.1),
        us(kv_again.1.0),
        us(kv_again.1.1),
        us(kv_again.2.0),
        us(kv_again.2.1)
    );
    Ok(())
}

/// Waits until the gateway on `port` holds a complete member list (its `/metrics`).
async fn wait_for_list(port: u16) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // A plain HTTP/1.0 GET: the page ends with the connection.
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        let lists = text
            .lines()
            .find_map(|l| l.strip_prefix("tidings_gateway_member_lists "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if lists >= 1.0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the gateway never filled the list"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Timed = (Duration, Duration);

/// One row per operation: KV against memory, p50 / p99, and the p50 ratio.
fn print_table(rows: &[(&str, Timed, Timed)]) {
    println!("| operation | from the KV p50 / p99 | from memory p50 / p99 | p50 ratio |");
    println!("|---|---:|---:|---:|");
    for (name, kv, mem) in rows {
        println!(
            "| {name} | {} / {} | {} / {} | {:.0}x |",
            us(kv.0),
            us(kv.1),
            us(mem.0),
            us(mem.1),
            kv.0.as_secs_f64() / mem.0.as_secs_f64().max(1e-9)
        );
    }
}

/// p50 and p99 of `n` runs of `op(i)`, one after another.
async fn time<F, Fut>(n: usize, mut op: F) -> anyhow::Result<(Duration, Duration)>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut all = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        op(i).await?;
        all.push(t0.elapsed());
    }
    all.sort_unstable();
    Ok((quantile(&all, 0.50), quantile(&all, 0.99)))
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}
