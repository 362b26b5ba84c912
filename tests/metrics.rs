//! `/metrics` end to end: a log role and a gateway role (real nats-server, real processes;
//! the gateway's `/healthz` and `/readyz` on its own port), scraped before and after
//! traffic, each page parsed by a strict text-format parser; and the alert rules and
//! dashboard in ops/ checked against what the pages expose.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::prom::{self, Page};
use crate::common::{Nats, Sandbox, Server};
use tidings_client::{Connection, Push};

const WAIT: Duration = Duration::from_secs(20);
const MESSAGES: u64 = 20;

async fn scrape(client: &reqwest::Client, port: u16) -> (Page, String) {
    let resp = client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().expect("ascii");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let text = resp.text().await.expect("body");
    let page = prom::parse(&text).unwrap_or_else(|e| panic!("{e}\n--- page ---\n{text}"));
    (page, text)
}

/// Polls `{base}/readyz` until it answers `200 {"ready":true}`; anything but that or a 503
/// fails.
async fn wait_ready(http: &reqwest::Client, base: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ready = http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .expect("readyz");
        let status = ready.status();
        let body = ready.text().await.expect("body");
        if status == 200 {
            assert_eq!(body, "{\"ready\":true}\n");
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every `tidings_*` name in the `expr` lines of a rule file or the `"expr"` fields of a
/// dashboard.
fn names_in_expressions(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines().filter(|l| l.contains("expr")) {
        let mut rest = line;
        while let Some(i) = rest.find("tidings_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            names.insert(name);
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_strictly_move_with_traffic_and_cover_the_alerts_on_log_and_gateway_roles() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s = Sandbox::new();
    s.group("team");
    let nats = Nats::start();
    let log = Server::start(&s, &nats, "log", &[]);
    let gateway = Server::start(&s, &nats, "gateway", &[]);
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");

    // The gateway role has no admin listener: its own port answers health and readiness.
    let base = format!("http://127.0.0.1:{}", gateway.port);
    let health = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    wait_ready(&http, &base).await;

    let (log_before, _) = scrape(&http, log.admin_port).await;
    let (gw_before, _) = scrape(&http, gateway.port).await;
    let requests_before = log_before.value("tidings_log_requests_total", &[]);
    let sends_before = gw_before.value("tidings_gateway_send_seconds_count", &[]);

    let (alice, _) = Connection::open(&gateway.url(), &s.token("acme", "alice", 600), "t")
        .await
        .expect("alice");
    let (mut bob, _) = Connection::open(&gateway.url(), &s.token("acme", "bob", 600), "t")
        .await
        .expect("bob");
    let requester = alice.requester();
    for i in 0..MESSAGES {
        requester
            .send_text("team", &format!("m{i}"), &format!("hello {i}"))
            .await
            .expect("send");
    }
    // Bob sees every message: fan-out happened on the gateway.
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen < MESSAGES {
        match tokio::time::timeout_at(deadline, bob.next_push()).await {
            Ok(Some(Push::Event(e))) if e.conversation == "team" => seen += 1,
            Ok(Some(_)) => {}
            other => panic!("bob saw {seen} of {MESSAGES} messages: {other:?}"),
        }
    }

    // The log role: its sequencer answered the appends, its publisher published them (the
    // publisher's acks may trail the pushes by a moment: wait for them with a deadline).
    let deadline = tokio::time::Instant::now() + WAIT;
    let (log_after, log_text) = loop {
        let (page, text) = scrape(&http, log.admin_port).await;
        if page.value("tidings_publisher_published_total", &[]) >= MESSAGES as f64 {
            break (page, text);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the publisher's count never reached {MESSAGES}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        log_after.value("tidings_log_requests_total", &[]) >= requests_before + MESSAGES as f64
    );
    assert!(log_after.value("tidings_log_commits_total", &[]) >= 1.0);
    assert!(log_after.value("tidings_log_append_seconds_count", &[]) >= MESSAGES as f64);
    assert!(log_after.value("tidings_log_commit_seconds_count", &[]) >= 1.0);
    assert!(log_after.value("tidings_log_commit_group_size_count", &[]) >= 1.0);
    assert_eq!(log_after.value("tidings_log_send_buffer_events", &[]), 0.0);
    assert_eq!(log_after.value("tidings_publisher_backlog", &[]), 0.0);
    assert_eq!(log_after.value("tidings_publisher_dropped_total", &[]), 0.0);
    assert_eq!(
        log_after.families["tidings_log_append_seconds"].kind,
        "histogram"
    );
    // The scrape itself is counted by route.
    assert!(log_after.value("tidings_admin_requests_total", &[("route", "metrics")]) >= 2.0);

    // The gateway role: acks timed, fan-out timed, sessions counted.
    let (gw_after, gw_text) = scrape(&http, gateway.port).await;
    assert!(
        gw_after.value("tidings_gateway_send_seconds_count", &[]) >= sends_before + MESSAGES as f64
    );
    assert!(gw_after.value("tidings_gateway_fanout_seconds_count", &[]) >= MESSAGES as f64);
    assert_eq!(gw_after.value("tidings_gateway_sessions", &[]), 2.0);
    assert!(gw_after.value("tidings_gateway_sessions_opened_total", &[]) >= 2.0);
    assert_eq!(
        gw_after.value("tidings_gateway_rate_limited_total", &[("limit", "frames")]),
        0.0
    );

    // Bounded labels: no tenant, user or conversation id appears anywhere in either page.
    for text in [&log_text, &gw_text] {
        for id in ["acme", "alice", "bob", "team"] {
            assert!(!text.contains(id), "the page names {id}:\n{text}");
        }
    }

    // Every metric the alert rules and the dashboard query is exposed by some role.
    let mut exposed = log_after.series_names();
    exposed.extend(gw_after.series_names());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for file in ["ops/prometheus/alerts.yml", "ops/grafana/tidings.json"] {
        let text = std::fs::read_to_string(root.join(file)).expect(file);
        let names = names_in_expressions(&text);
        assert!(names.len() >= 10, "{file} names only {names:?}");
        let missing: Vec<_> = names.difference(&exposed).collect();
        assert!(
            missing.is_empty(),
            "{file} names metrics nobody exposes: {missing:?}"
        );
    }
    drop(alice);
}

/// The parser the test above trusts refuses what Prometheus would refuse.
#[test]
fn the_strict_parser_refuses_malformed_pages() {
    let good = "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v\\\"\"} 1\n";
    assert!(prom::parse(good).is_ok());
    for bad in [
        "# TYPE a counter\na 1\n", // a counter without _total
        "# TYPE a_total counter\na_total 1\na_total 2\n", // the same series twice
        "a_total 1\n",             // no TYPE
        "# TYPE a_total counter\na_total{k=\"v} 1\n", // unterminated label
        "# TYPE a_total counter\na_total -1\n", // negative counter
        "# TYPE a_total counter\nb_total 1\n", // outside its family
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", // no +Inf
        "# TYPE g gauge\ng 1",                                            // no final newline
    ] {
        assert!(prom::parse(bad).is_err(), "accepted {bad:?}");
    }
}

/// `--role archiver` has no compliance plane and verifies no tokens: its admin port answers
/// health, readiness and metrics (its passes counted, as the alert rules expect) and
/// nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archiver_role_serves_health_readiness_and_its_own_metrics_only() {
    let s = Sandbox::new();
    let nats = Nats::start();
    let archiver = Server::start(&s, &nats, "archiver", &[("TIDINGS_ARCHIVE_INTERVAL", "1s")]);
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let base = format!("http://127.0.0.1:{}", archiver.admin_port);

    // Passes run and are counted; the last success is stamped for the lag alert.
    let deadline = tokio::time::Instant::now() + WAIT;
    let page = loop {
        let (page, text) = scrape(&http, archiver.admin_port).await;
        if page.value("tidings_archive_passes_total", &[("outcome", "ok")]) >= 2.0 {
            break page;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no two archive passes counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        page.value("tidings_archive_passes_total", &[("outcome", "failed")]),
        0.0
    );
    assert!(page.value("tidings_archive_pass_seconds_count", &[]) >= 2.0);
    assert!(page.value("tidings_archive_last_success_timestamp_seconds", &[]) > 0.0);

    wait_ready(&http, &base).await;
    let health = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);

    // The compliance and admin routes are not there at all (not merely refused).
    for path in ["/v1/compliance/search?text=x", "/console/"] {
        let r = http.get(format!("{base}{path}")).send().await.expect("get");
        assert_eq!(r.status(), 404, "{path}");
        let body = r.text().await.expect("body");
        assert!(body.contains("\"not_found\""), "{path}: {body}");
    }
    let r = http
        .post(format!("{base}/v1/admin/tokens/revoke"))
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 404);
    let r = http
        .post(format!("{base}/metrics"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 405, "metrics takes GET only");
}
