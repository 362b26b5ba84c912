//! The gateway's member cache end to end (real nats-server, real `tidings serve` processes,
//! real sockets): a 50,000-member group's first page, @-list prefix search and membership
//! check answered with no store read once the list is warm, with the log and the gateway in
//! one process and apart (over NATS); the cache's byte bound; a removed member never
//! answered from the cache, including removals delivered while the list is being filled.
//!
//! "No store read" is counted by the log's `tidings_store_reads_total{space}` (the store
//! wrapped in a counting `MeteredStore`), per keyspace: `mb` (members) and `mc` (the member
//! list's change feed). Other keyspaces move for other reasons (hubs read heads to heal,
//! History reads events).

use std::sync::Arc;
use std::time::Duration;

use crate::common;
use crate::common::prom::{Page, scrape};
use crate::common::{Nats, Sandbox, Server};
use tidings_client::client::{ErrorCode, ListMembers, Member};
use tidings_client::{Connection, Push, Requester};
use tidings_log::crypto::MasterKey;
use tidings_log::store::{FjallStore, KvStore};
use tidings_log::{Body, ConvId, CreateConversation, Log, LogConfig, TenantId, UserId};

const MEMBERS: usize = 50_000;
/// Waiting for a list to be filled or an event to arrive; a deadline, not an assertion.
const WAIT: Duration = Duration::from_secs(120);

/// Member `i`'s id: ids sort as their numbers do.
fn id(i: usize) -> String {
    format!("m{i:05}")
}

/// Creates the groups `(conv, members)` in tenant acme in the sandbox's store, owned by
/// m00000, before any server runs (one creation each: the test's own log, closed after).
async fn seed(s: &Sandbox, groups: &[(&str, usize)]) {
    let store: Arc<dyn KvStore> = Arc::new(FjallStore::open(&s.data_dir()).expect("store"));
    let key = MasterKey::from_file(&s.path().join("tidings-master.key")).expect("master key");
    let log = Log::open(store, key, LogConfig::default())
        .await
        .expect("log");
    for (conv, n) in groups {
        log.create_conversation(CreateConversation {
            tenant: TenantId::new("acme").expect("id"),
            conv: ConvId::new(conv.to_string()).expect("id"),
            kind: "group".into(),
            title: String::new(),
            creator: UserId::new(id(0)).expect("id"),
            members: (1..*n).map(|i| UserId::new(id(i)).expect("id")).collect(),
        })
        .await
        .expect("create");
    }
    log.close().await;
}

fn http() -> reqwest::Client {
    common::http_client()
}

/// Store reads of the members (`mb`) and change-feed (`mc`) keyspaces so far.
fn member_reads(log_page: &Page) -> (f64, f64) {
    let reads = |space| log_page.value("tidings_store_reads_total", &[("space", space)]);
    (reads("mb"), reads("mc"))
}

/// The gateway's member cache figures: (complete lists, bytes, bound, lists evicted).
fn cache_figures(gateway_page: &Page) -> (f64, f64, f64, f64) {
    (
        gateway_page.value("tidings_gateway_member_lists", &[]),
        gateway_page.value("tidings_gateway_member_cache_bytes", &[]),
        gateway_page.value("tidings_gateway_member_cache_max_bytes", &[]),
        gateway_page.value(
            "tidings_gateway_member_cache_evictions_total",
            &[("what", "list")],
        ),
    )
}

/// Waits until the gateway's figures satisfy `done`, and returns them.
async fn wait_for(
    http: &reqwest::Client,
    port: u16,
    what: &str,
    done: impl Fn((f64, f64, f64, f64)) -> bool,
) -> (f64, f64, f64, f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let figures = cache_figures(&scrape(http, port).await);
        if done(figures) {
            return figures;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still {figures:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn members(r: &Requester, conv: &str, after: &str, prefix: &str, limit: u32) -> Vec<Member> {
    r.member_page(ListMembers {
        conversation: conv.into(),
        after: after.into(),
        limit,
        prefix: prefix.into(),
        ..Default::default()
    })
    .await
    .expect("ListMembers")
    .members
}

fn ids(members: &[Member]) -> Vec<String> {
    members.iter().map(|m| m.user.clone()).collect()
}

fn range(from: usize, to_inclusive: usize) -> Vec<String> {
    (from..=to_inclusive).map(id).collect()
}

async fn session(s: &Sandbox, server: &Server, user: &str) -> Connection {
    Connection::open(&server.url(), &s.token("acme", user, 3600), "test")
        .await
        .expect("connect")
        .0
}

/// Whether `user` passes the gateway's membership check (a History of one event).
async fn passes_check(r: &Requester, conv: &str) -> bool {
    match r.history(conv, 0, 1).await {
        Ok(_) => true,
        Err(e) if common::error_code(&e) == Some(ErrorCode::NotMember) => false,
        Err(e) => panic!("History: {e}"),
    }
}

/// Waits on `conn` for the first pushed event `wanted` accepts.
async fn wait_for_event(conn: &mut Connection, what: &str, wanted: impl Fn(&Body) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, conn.next_push()).await {
            Ok(Some(Push::Event(e))) if e.body.as_ref().is_some_and(&wanted) => return,
            Ok(Some(_)) => {}
            other => panic!("no {what}: {other:?}"),
        }
    }
}

async fn wait_for_removal(conn: &mut Connection, user: &str) {
    wait_for_event(
        conn,
        "removal",
        |b| matches!(b, Body::MemberLeft(l) if l.user == user),
    )
    .await;
}

/// The log's and the gateway's servers: one `all` process, or a `log` and a `gateway`.
struct Deployment {
    log: Server,
    gateway: Option<Server>,
}

impl Deployment {
    fn start(s: &Sandbox, nats: &Nats, apart: bool, gateway_env: &[(&str, &str)]) -> Self {
        if apart {
            Deployment {
                log: Server::start(s, nats, "log", &[]),
                gateway: Some(Server::start(s, nats, "gateway", gateway_env)),
            }
        } else {
            Deployment {
                log: Server::start(s, nats, "all", gateway_env),
                gateway: None,
            }
        }
    }

    fn gateway(&self) -> &Server {
        self.gateway.as_ref().unwrap_or(&self.log)
    }
}

async fn first_page_prefix_and_check_read_nothing_once_warm(apart: bool) {
    let s = Sandbox::new();
    seed(&s, &[("big", MEMBERS)]).await;
    let nats = Nats::start();
    let d = Deployment::start(&s, &nats, apart, &[]);
    let (gw, http) = (d.gateway(), http());
    let owner = session(&s, gw, &id(0)).await;
    let others = [
        session(&s, gw, &id(1)).await,
        session(&s, gw, &id(25_000)).await,
        session(&s, gw, &id(49_999)).await,
    ];
    let outsider = session(&s, gw, "x1").await;
    let r = owner.requester();

    // Cold: the first page is the log's, and the list starts filling.
    assert_eq!(ids(&members(&r, "big", "", "", 100).await), range(0, 99));
    let (lists, bytes, max, _) = wait_for(&http, gw.port, "the list filled", |f| f.0 == 1.0).await;
    assert_eq!(lists, 1.0);
    assert!(bytes <= max, "{bytes} > {max}");

    let before = member_reads(&scrape(&http, d.log.admin_port).await);
    // The first page, a later page, and @-list prefix searches.
    assert_eq!(ids(&members(&r, "big", "", "", 100).await), range(0, 99));
    assert_eq!(
        ids(&members(&r, "big", &id(100), "", 50).await),
        range(101, 150)
    );
    assert_eq!(
        ids(&members(&r, "big", "", "m4999", 100).await),
        range(49_990, 49_999)
    );
    assert_eq!(
        ids(&members(&r, "big", "", "m1", 5).await),
        range(10_000, 10_004)
    );
    assert_eq!(
        ids(&members(&r, "big", &id(10_004), "m1", 3).await),
        range(10_005, 10_007)
    );
    assert!(members(&r, "big", "", "x", 10).await.is_empty());
    // Membership checks, of members and of someone who is not one.
    for conn in others.iter().chain([&owner]) {
        assert!(passes_check(&conn.requester(), "big").await);
    }
    let after = member_reads(&scrape(&http, d.log.admin_port).await);
    assert_eq!(after, before, "(mb, mc) store reads once warm");
    // Someone the list does not hold is asked of the log (a join may not be here yet).
    assert!(!passes_check(&outsider.requester(), "big").await);

    let page = scrape(&http, gw.port).await;
    let from = |kind, from| {
        page.value(
            "tidings_gateway_member_cache_requests_total",
            &[("kind", kind), ("from", from)],
        )
    };
    assert_eq!(from("page", "memory"), 6.0);
    assert_eq!(from("page", "log"), 1.0, "only the cold first page");
    assert!(from("check", "memory") >= 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50000_member_groups_page_prefix_search_and_check_read_no_store_once_warm_roles_apart() {
    first_page_prefix_and_check_read_nothing_once_warm(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50000_member_groups_page_prefix_search_and_check_read_no_store_once_warm_in_one_process()
{
    first_page_prefix_and_check_read_nothing_once_warm(false).await;
}

/// Room for two lists of 300 members (about 34 KB each), not three, nor the big one.
const SMALL_BOUND: &str = "100000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_bound_holds_and_answers_stay_exact_after_eviction() {
    let s = Sandbox::new();
    seed(
        &s,
        &[("big", MEMBERS), ("s1", 300), ("s2", 300), ("s3", 300)],
    )
    .await;
    let nats = Nats::start();
    let d = Deployment::start(
        &s,
        &nats,
        false,
        &[("TIDINGS_GATEWAY_MEMBER_CACHE_BYTES", SMALL_BOUND)],
    );
    let (gw, http) = (d.gateway(), http());
    let owner = session(&s, gw, &id(0)).await;
    let r = owner.requester();
    let within = |(_, bytes, max, _): (f64, f64, f64, f64)| {
        assert!(bytes <= max, "{bytes} bytes held, bound {max}");
    };

    for (n, conv) in ["s1", "s2"].into_iter().enumerate() {
        assert_eq!(ids(&members(&r, conv, "", "", 10).await), range(0, 9));
        let lists = n as f64 + 1.0;
        within(wait_for(&http, gw.port, conv, |f| f.0 == lists).await);
    }
    // The big list does not fit: it is dropped as it fills, evicting nothing else, and its
    // pages are the log's, exact.
    assert_eq!(ids(&members(&r, "big", "", "", 10).await), range(0, 9));
    let figures = wait_for(&http, gw.port, "big refused", |f| f.3 == 1.0).await;
    within(figures);
    assert_eq!(figures.0, 2.0, "s1 and s2 still held");
    assert_eq!(
        ids(&members(&r, "big", "", "m4999", 100).await),
        range(49_990, 49_999)
    );
    assert_eq!(
        ids(&members(&r, "big", &id(20_000), "", 3).await),
        range(20_001, 20_003)
    );
    // s2 used after s1: a third list evicts s1.
    assert_eq!(
        ids(&members(&r, "s2", "", "m0029", 100).await),
        range(290, 299)
    );
    assert_eq!(ids(&members(&r, "s3", "", "", 10).await), range(0, 9));
    let figures = wait_for(&http, gw.port, "s3 filled", |f| f.3 == 2.0 && f.0 == 2.0).await;
    within(figures);
    let page = scrape(&http, gw.port).await;
    let before = page.value(
        "tidings_gateway_member_cache_requests_total",
        &[("kind", "page"), ("from", "log")],
    );
    assert_eq!(
        ids(&members(&r, "s1", "", "m0029", 100).await),
        range(290, 299)
    );
    assert!(passes_check(&r, "s1").await);
    let page = scrape(&http, gw.port).await;
    let after = page.value(
        "tidings_gateway_member_cache_requests_total",
        &[("kind", "page"), ("from", "log")],
    );
    assert_eq!(after, before + 1.0, "s1 was evicted: asked of the log");
    within(cache_figures(&page));
}

/// Removed while the list fills (pages of 10: 5,000 log calls over NATS) and after: never
/// answered from the cache, by check, page or prefix search.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_is_never_answered_from_the_cache() {
    let s = Sandbox::new();
    seed(&s, &[("big", MEMBERS)]).await;
    let nats = Nats::start();
    let d = Deployment::start(
        &s,
        &nats,
        true,
        &[("TIDINGS_GATEWAY_MEMBER_FILL_PAGE", "10")],
    );
    let (gw, http) = (d.gateway(), http());
    let mut owner = session(&s, gw, &id(0)).await;
    let r = owner.requester();
    let removed_while_filling = [10_000, 20_000, 30_000, 40_000, 49_999];
    let removed_after = 25_000;
    let mut victims = Vec::new();
    for i in removed_while_filling.iter().chain([&removed_after]) {
        victims.push((*i, session(&s, gw, &id(*i)).await));
    }

    // The first page starts the fill.
    assert_eq!(ids(&members(&r, "big", "", "", 10).await), range(0, 9));
    let mut during_fill = 0;
    for i in removed_while_filling {
        r.remove_member("big", &id(i)).await.expect("remove");
        wait_for_removal(&mut owner, &id(i)).await;
        // Read after the removal was applied: a list not complete now was not then.
        let (lists, ..) = cache_figures(&scrape(&http, gw.port).await);
        if lists == 0.0 {
            during_fill += 1;
        }
    }
    println!(
        "{during_fill} of {} removals reached the gateway while its list was filling",
        removed_while_filling.len()
    );
    assert!(
        during_fill >= 1,
        "no removal reached the gateway while its list was filling"
    );
    wait_for(&http, gw.port, "the list filled", |f| f.0 == 1.0).await;

    // Removals and renames read members in the sequencer; pages, prefix searches and
    // members' checks read nothing. A user the list does not hold is asked of the log (they
    // may have joined at a seq not delivered here yet), so the removed are refused by the
    // log, never answered "member" from memory.
    let reads = || async { member_reads(&scrape(&http, d.log.admin_port).await) };
    let check_all = |victims: &[(usize, Connection)], gone: &[usize]| {
        let victims: Vec<(usize, Requester)> =
            victims.iter().map(|(i, c)| (*i, c.requester())).collect();
        let gone = gone.to_vec();
        let r = r.clone();
        let reads = &reads;
        async move {
            let before = reads().await;
            for (i, v) in &victims {
                let member = !gone.contains(i);
                if member {
                    assert!(passes_check(v, "big").await, "check of {}", id(*i));
                }
                // Its neighbourhood by prefix, and the page that starts before it.
                let prefix = &id(*i)[..5];
                let expected: Vec<String> = (0..10)
                    .map(|k| format!("{prefix}{k}"))
                    .filter(|u| *u != id(*i) || member)
                    .collect();
                assert_eq!(ids(&members(&r, "big", "", prefix, 100).await), expected);
                let page = ids(&members(&r, "big", &id(*i - 1), "", 1).await);
                assert_eq!(page.contains(&id(*i)), member, "page after {}", id(*i - 1));
            }
            assert_eq!(reads().await, before, "(mb, mc) store reads once warm");
            for (i, v) in &victims {
                if gone.contains(i) {
                    assert!(!passes_check(v, "big").await, "check of {}", id(*i));
                }
            }
        }
    };
    check_all(&victims, &removed_while_filling).await;

    // Removed once the list is complete; and a display name changed.
    r.remove_member("big", &id(removed_after))
        .await
        .expect("remove");
    wait_for_removal(&mut owner, &id(removed_after)).await;
    let mut gone = removed_while_filling.to_vec();
    gone.push(removed_after);
    check_all(&victims, &gone).await;
    r.set_display_name("big", &id(2), "Two")
        .await
        .expect("set display name");
    wait_for_event(
        &mut owner,
        "display name",
        |b| matches!(b, Body::DisplayNameSet(d) if d.user == id(2)),
    )
    .await;
    let before = reads().await;
    let two = members(&r, "big", "", &id(2), 1).await;
    assert_eq!(two[0].display_name, "Two");
    assert_eq!(reads().await, before, "(mb, mc) store reads once warm");
}
