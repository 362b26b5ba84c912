//! The web client served by the gateway, end to end: its HTTP answers (CSP, development
//! sign-in), then two headless Chromium browsers chatting through one `tidings serve` (real
//! nats-server, real disk): each sees the other's messages; edits, recalls, reactions,
//! typing, @-completion, unread counts, read cursors; a hostile body shown as text; history
//! paged back across the archive boundary; a dropped connection caught up by Sync; the
//! compliance console finding, exporting, holding, rotating a key and refusing an unconfirmed
//! shred, its audit log showing each. Then the
//! timings of a 10,000-message conversation are printed (BENCHMARKS.md). Screenshots go to
//! target/tmp/web-screenshots/ (the path is printed).

use std::path::PathBuf;
use std::time::Instant;

use crate::common::browser::{Browser, Driver};
use crate::common::{Nats, Sandbox, Server, input_lines, stderr};
use serde_json::json;

/// Events of `team` moved to the archive before the server starts, and appended after.
const ARCHIVED: usize = 120;
const HOT: usize = 30;
const BIG: usize = 10_000;
const HOSTILE: &str = "<img src=x onerror=\"window.__xss=1\"><script>window.__xss=2</script>";

fn append(s: &Sandbox, conv: &str, sender: &str, prefix: &str, n: usize) {
    let out = s.run_with_input(
        &[
            "log", "append", "--tenant", "acme", "--conv", conv, "--sender", sender, "--stdin",
        ],
        input_lines(prefix, n).as_bytes(),
    );
    assert!(out.status.success(), "append: {}", stderr(&out));
}

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-screenshots")
}

async fn get(http: &reqwest::Client, url: &str) -> reqwest::Response {
    http.get(url).send().await.expect("GET")
}

/// Signs in through the development form and waits for the conversation list.
async fn sign_in(b: &Browser, base: &str, user: &str) -> f64 {
    b.goto(&format!("{base}/app/")).await;
    b.wait(
        "the development form",
        "return !document.getElementById('dev-form').hidden",
    )
    .await;
    b.clear("#dev-tenant").await;
    b.type_into("#dev-tenant", "acme").await;
    b.type_into("#dev-user", user).await;
    b.click("#dev-signin").await;
    b.wait(
        "the conversation list",
        "return document.querySelectorAll('#convs li').length >= 2",
    )
    .await;
    let t = b
        .exec(
            "const t = window.tidings.timings; return t.conversations - t.signIn;",
            json!([]),
        )
        .await;
    t.as_f64().unwrap_or(f64::NAN)
}

async fn open_conv(b: &Browser, conv: &str) {
    b.click(&format!("#convs li[data-conv='{conv}']")).await;
    b.wait(
        "the conversation to open",
        &format!("return document.getElementById('conv-title').textContent === '{conv}'"),
    )
    .await;
}

/// Waits until a message whose text is `text` is shown.
async fn wait_text(b: &Browser, who: &str, text: &str) {
    b.wait(
        &format!("{who} to show {text:?}"),
        &format!(
            "return [...document.querySelectorAll('#messages .text')].some(e => e.textContent === {})",
            json!(text)
        ),
    )
    .await;
}

async fn send(b: &Browser, text: &str) {
    b.type_into("#compose", text).await;
    b.click("#send").await;
}

/// The seqs the client holds for `conv` (posts, edits, reactions, joins...), ascending.
async fn held_seqs(b: &Browser, conv: &str) -> Vec<u64> {
    let v = b
        .exec(
            "return [...window.tidings.convs.get(arguments[0]).events.keys()].sort((a, b) => a - b)",
            json!([conv]),
        )
        .await;
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s.as_u64().expect("seq"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_chat_page_into_the_archive_and_stay_safe_from_hostile_text() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s = Sandbox::new();
    s.group("team");
    s.group("side");
    s.group("big");
    append(&s, "team", "bob", "old-", ARCHIVED);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await; // "older than 0s" is strict
    let out = s.run(&["archive", "run", "--older-than", "0s"]);
    assert!(out.status.success(), "archive: {}", stderr(&out));
    append(&s, "team", "bob", "hot-", HOT);
    append(&s, "big", "bob", "big-", BIG);
    let nats = Nats::start();
    let server = Server::start(&s, &nats, "all", &[]);
    let base = format!("http://127.0.0.1:{}", server.port);
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");

    // Plain HTTP on the gateway's port: the client's files with a strict policy.
    let page = get(&http, &format!("{base}/app/")).await;
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"));
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    assert!(!page.text().await.expect("body").contains("<script>"));
    assert_eq!(
        get(&http, &format!("{base}/app/nope.js")).await.status(),
        404
    );
    assert_eq!(get(&http, &format!("{base}/nope")).await.status(), 404);
    let root = http.get(format!("{base}/")).send().await.expect("GET /");
    assert_eq!(root.url().path(), "/app/", "/ redirects to the client");
    let no_user = http
        .post(format!("{base}/app/dev-token"))
        .send()
        .await
        .expect("POST");
    assert_eq!(no_user.status(), 400, "development mode is on in the tests");
    let bad_id = http
        .post(format!("{base}/app/dev-token?tenant=acme&user=a%20b"))
        .send()
        .await
        .expect("POST");
    assert_eq!(bad_id.status(), 400);

    let Some(driver) = Driver::start("web::two_browsers_chat").await else {
        return;
    };
    let dir = screenshots();
    let alice = driver.browser().await;
    let bob = driver.browser().await;
    sign_in(&alice, &base, "alice").await;
    sign_in(&bob, &base, "bob").await;
    open_conv(&alice, "team").await;
    open_conv(&bob, "team").await;

    // Each sees the other's messages.
    send(&alice, "hello from alice").await;
    wait_text(&bob, "bob", "hello from alice").await;
    send(&bob, "hello from bob").await;
    wait_text(&alice, "alice", "hello from bob").await;

    // A hostile body is shown as text: no element made, no script run.
    let client = tidings_client::Connection::open(&server.url(), &s.token("acme", "bob", 600), "t")
        .await
        .expect("bob's client")
        .0;
    let requester = client.requester();
    requester
        .send_text("team", "hostile-1", HOSTILE)
        .await
        .expect("send");
    wait_text(&alice, "alice", HOSTILE).await;
    let xss = alice
        .exec(
            "return [window.__xss === undefined, document.querySelectorAll('#messages img, #messages script').length]",
            json!([]),
        )
        .await;
    assert_eq!(
        xss,
        json!([true, 0]),
        "the hostile body made elements or ran"
    );

    // Typing shows on the other side; @-completion from the member list.
    bob.type_into("#compose", "@al").await;
    alice
        .wait(
            "bob typing",
            "return document.getElementById('typing').textContent.includes('bob')",
        )
        .await;
    bob.wait(
        "the mention suggestions",
        "return !document.getElementById('mentions').hidden",
    )
    .await;
    bob.type_into("#compose", "\u{E004}").await; // Tab takes the first suggestion
    let value = bob
        .exec("return document.getElementById('compose').value", json!([]))
        .await;
    assert_eq!(value, "@alice ");
    bob.type_into("#compose", "look").await;
    bob.click("#send").await;
    alice
        .wait(
            "the mention highlighted",
            "return [...document.querySelectorAll('#messages li.mention .text')].some(e => e.textContent === '@alice look')",
        )
        .await;

    // Edit, react, recall: alice acts on her message, bob sees each.
    let seq = alice
        .exec(
            "return [...document.querySelectorAll('#messages li')].find(li => li.querySelector('.text')?.textContent === 'hello from alice').dataset.seq",
            json!([]),
        )
        .await;
    let seq = seq.as_str().expect("seq").to_string();
    let row = format!("#messages li[data-seq='{seq}']");
    alice.click(&format!("{row} button.edit")).await;
    alice.clear(&format!("{row} .edit-input")).await;
    alice
        .type_into(&format!("{row} .edit-input"), "hello, edited\n")
        .await;
    wait_text(&bob, "bob", "hello, edited").await;
    alice.click(&format!("{row} button.react")).await;
    bob.wait(
        "the reaction",
        &format!(
            "return document.querySelector(\"{row} .reactions button\")?.textContent === '👍 1'"
        ),
    )
    .await;
    let _ = bob.screenshot(&dir, "bob-after-edit-and-reaction").await;
    alice.click(&format!("{row} button.recall")).await;
    bob.wait(
        "the recall",
        &format!("return document.querySelector(\"{row}\").classList.contains('recalled')"),
    )
    .await;

    // Unread counts: bob writes in `side` while alice reads `team`; opening it clears them.
    let unread = "return Number(document.querySelector(\"#convs li[data-conv='side'] .unread\").textContent || 0)";
    let before = alice.exec(unread, json!([])).await.as_u64().expect("count");
    requester
        .send_text("side", "side-1", "over here")
        .await
        .expect("send");
    alice
        .wait(
            "an unread count on side",
            &format!("{unread} === {}", before + 1),
        )
        .await;
    let _ = alice.screenshot(&dir, "alice-unread").await;
    open_conv(&alice, "side").await;
    wait_text(&alice, "alice", "over here").await;
    alice
        .wait(
            "the unread count cleared",
            "return document.querySelector(\"#convs li[data-conv='side'] .unread\").textContent === ''",
        )
        .await;

    // History pages back across the archive boundary, to seq 1, with no gap.
    open_conv(&alice, "team").await;
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let seqs = held_seqs(&alice, "team").await;
        if seqs.first() == Some(&1) {
            let head = *seqs.last().expect("events");
            assert_eq!(seqs, (1..=head).collect::<Vec<_>>(), "contiguous from 1");
            assert!(head as usize > ARCHIVED + HOT);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "paging back stalled at {:?}",
            seqs.first()
        );
        alice.click("#older").await;
        alice
            .wait(
                "the older page",
                &format!(
                    "return Math.min(...window.tidings.convs.get('team').events.keys()) < {}",
                    seqs.first().copied().unwrap_or(u64::MAX)
                ),
            )
            .await;
    }
    wait_text(&alice, "alice", "message old-0").await; // archived, seq 2
    let path = alice
        .screenshot(&dir, "alice-history-from-the-archive")
        .await;

    // A dropped connection: a message sent while alice is away arrives by Sync.
    alice
        .exec(
            "window.tidings.reconnectMs = 3000; window.tidings.ws.close(); return true",
            json!([]),
        )
        .await;
    alice
        .wait(
            "alice to notice",
            "return document.getElementById('status').dataset.state === 'reconnecting'",
        )
        .await;
    requester
        .send_text("team", "while-away", "sent while alice was away")
        .await
        .expect("send");
    wait_text(&alice, "alice", "sent while alice was away").await;
    alice
        .wait(
            "connected again",
            "return document.getElementById('status').dataset.state === 'connected'",
        )
        .await;

    // The compliance console on the admin listener: an officer finds bob's hostile message
    // (shown as text there too), exports it, places a hold, and the audit log shows each.
    let admin = format!("http://127.0.0.1:{}", server.admin_port);
    let console = get(&http, &format!("{admin}/console/")).await;
    assert_eq!(console.status(), 200);
    assert!(
        console.headers()["content-security-policy"]
            .to_str()
            .expect("ascii")
            .contains("script-src 'self'")
    );
    let officer = driver.browser().await;
    officer.goto(&format!("{admin}/console/")).await;
    let token = s.token_with_roles("acme", "officer", &["compliance", "admin"], 600);
    officer.type_into("#token", &token).await;
    officer.click("#signin-button").await;
    officer.type_into("#q-text", "onerror").await;
    officer.type_into("#q-conv", "team").await;
    officer.click("#search").await;
    officer
        .wait(
            "the hit",
            &format!(
                "return [...document.querySelectorAll('#hits tr.hit td')].some(td => td.textContent === {})",
                json!(HOSTILE)
            ),
        )
        .await;
    assert_eq!(
        officer
            .exec("return [window.__xss === undefined, document.querySelectorAll('#hits img, #hits script').length]", json!([]))
            .await,
        json!([true, 0])
    );
    officer.click("#export").await;
    officer
        .wait(
            "the export",
            "return document.getElementById('search-status').textContent.startsWith('exported 1')",
        )
        .await;
    // The same hit as CSV: written whole on the server, handed over as a file.
    officer
        .exec(
            "document.getElementById('export-format').value = 'csv'; document.getElementById('search-status').textContent = ''",
            json!([]),
        )
        .await;
    officer.click("#export").await;
    officer
        .wait(
            "the CSV export",
            "return document.getElementById('download').download === 'tidings-export.csv' && document.getElementById('search-status').textContent.startsWith('exported 1')",
        )
        .await;
    officer.type_into("#h-conv", "team").await;
    officer.type_into("#h-reason", "case 42").await;
    officer.click("#hold").await;
    officer
        .wait(
            "the hold listed",
            "return [...document.querySelectorAll('#holds tr.hold td')].some(td => td.textContent === 'case 42')",
        )
        .await;
    // Operations with confirmation: a key rotation, an archive check, a shred refused for a
    // confirmation that does not name the tenant.
    officer.click("#op-rotate").await;
    officer
        .wait(
            "the rotation",
            "return document.getElementById('op-result').textContent.includes('key_id')",
        )
        .await;
    officer.click("#op-archive-verify").await;
    officer
        .wait(
            "the archive check",
            "return document.getElementById('op-result').textContent.includes('\"ok\": true')",
        )
        .await;
    officer.type_into("#shred-confirm", "acm").await;
    officer.click("#op-shred").await;
    officer
        .wait(
            "the shred refused",
            "return document.getElementById('op-result').textContent.startsWith('400')",
        )
        .await;
    officer.click("#audit").await;
    let actions = officer
        .wait(
            "the audit log",
            "const a = [...document.querySelectorAll('#audit-log tr.record')].map(tr => tr.dataset.action); return ['export', 'hold_create', 'rotate', 'archive_verify', 'shred'].every(x => a.includes(x)) && a",
        )
        .await;
    assert!(
        actions
            .as_array()
            .expect("actions")
            .contains(&json!("search")),
        "{actions}"
    );
    officer
        .wait(
            "the chain checked",
            "return document.getElementById('audit-status').textContent.includes('chain intact')",
        )
        .await;
    officer.screenshot(&dir, "compliance-console").await;
    officer.quit().await;

    // Timings of a 10,000-message conversation, in a fresh browser (printed, not asserted):
    // `big` sorts first, so it is the conversation the client opens on signing in.
    let fresh = driver.browser().await;
    let to_list = sign_in(&fresh, &base, "alice").await;
    let to_first_page = fresh
        .wait(
            "the first page of big",
            "const t = window.tidings.timings; return window.tidings.selected === 'big' && t.firstPage && t.firstPage - t.signIn",
        )
        .await
        .as_f64()
        .unwrap_or(f64::NAN);
    wait_text(&fresh, "fresh", &format!("message big-{}", BIG - 1)).await;
    let before = held_seqs(&fresh, "big").await[0];
    let paged = Instant::now();
    fresh.click("#older").await;
    fresh
        .wait(
            "an older page of big",
            &format!(
                "return Math.min(...window.tidings.convs.get('big').events.keys()) < {before}"
            ),
        )
        .await;
    let older_page = paged.elapsed().as_secs_f64() * 1000.0;
    println!(
        "web client, {BIG}-message conversation: sign-in to conversation list {to_list:.0} ms; \
         sign-in to its first page shown {to_first_page:.0} ms; one older page (History, \
         50, clicked to shown) {older_page:.0} ms"
    );
    fresh.screenshot(&dir, "big-conversation").await;
    println!("screenshots: {} (e.g. {})", dir.display(), path.display());
    drop(client);
    for b in [alice, bob, fresh] {
        b.quit().await;
    }
}
