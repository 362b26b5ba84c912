//! End-user search through the gateway: real nats-server, real `tidings serve` (one process
//! and split roles), the embedded store on disk, the client library.

use crate::common;
use crate::common::{Nats, Sandbox, Server, error_code, stderr};
use tidings_client::client::{ErrorCode, SearchHit, SearchResult};
use tidings_client::{Connection, Requester};
use tidings_schemas::client::Send;
use tidings_schemas::client::send::Body as SendBody;
use tidings_schemas::v1::{ConversationKind, MessageEdited, MessageRecalled};

async fn connect(server: &Server, s: &Sandbox, tenant: &str, user: &str) -> Connection {
    let token = s.token(tenant, user, 3600);
    Connection::open(&server.url(), &token, "test")
        .await
        .expect("connect and hello")
        .0
}

/// Every hit of `query` (all pages, `limit` per page), as (conversation, seq, snippet).
async fn find(c: &Requester, query: &str, limit: u32) -> Vec<(String, u64, String)> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let page: SearchResult = c.search(query, &cursor, limit).await.expect("search");
        assert!(page.hits.len() <= limit.max(1) as usize || limit == 0);
        out.extend(
            page.hits
                .iter()
                .map(|h: &SearchHit| (h.conversation.clone(), h.seq, h.snippet.clone())),
        );
        if page.next_cursor.is_empty() {
            return out;
        }
        cursor = page.next_cursor;
    }
}

fn convs(hits: &[(String, u64, String)]) -> Vec<(&str, u64)> {
    hits.iter().map(|(c, s, _)| (c.as_str(), *s)).collect()
}

async fn post(c: &Requester, conv: &str, id: &str, text: &str) -> u64 {
    c.send_text(conv, id, text).await.expect("send").seq
}

async fn send_body(c: &Requester, conv: &str, id: &str, body: SendBody) -> u64 {
    match c
        .request(tidings_schemas::client::client_frame::Op::Send(Send {
            client_msg_id: id.into(),
            conversation: conv.into(),
            body: Some(body),
        }))
        .await
        .expect("send")
    {
        tidings_schemas::client::server_frame::Msg::SendAck(a) => a.seq,
        other => panic!("expected an ack, got {other:?}"),
    }
}

/// The conversations and messages every scenario below starts from, in tenant acme (and one
/// in tenant other). Returns the seqs worth asserting on.
struct Story {
    general_bluebird: u64,
    edited: u64,
    edit: u64,
    cjk: u64,
    mixed: u64,
    late_quokka: u64,
}

async fn tell(server: &Server, s: &Sandbox) -> Story {
    let alice = connect(server, s, "acme", "alice").await;
    let carol = connect(server, s, "acme", "carol").await;
    let mallory = connect(server, s, "other", "bob").await;
    let a = alice.requester();
    a.create_conversation("general", ConversationKind::Group, "", &["bob"])
        .await
        .expect("general");
    carol
        .requester()
        .create_conversation("secret", ConversationKind::Group, "", &["alice"])
        .await
        .expect("secret");
    mallory
        .requester()
        .create_conversation("general", ConversationKind::Group, "", &[])
        .await
        .expect("other tenant's general");
    let general_bluebird = post(&a, "general", "g1", "The BLUEBIRD forecast is out").await;
    post(&carol.requester(), "secret", "s1", "bluebird secret plan").await;
    post(
        &mallory.requester(),
        "general",
        "o1",
        "bluebird in another tenant",
    )
    .await;
    // Edited: found by the new text only. Recalled: never found.
    let edited = post(&a, "general", "g2", "draft alpha wording").await;
    let edit = send_body(
        &a,
        "general",
        "g3",
        SendBody::MessageEdited(MessageEdited {
            target_seq: edited,
            new_text: "final omega wording".into(),
        }),
    )
    .await;
    let recalled = post(&a, "general", "g4", "zanzibar launch codes").await;
    send_body(
        &a,
        "general",
        "g5",
        SendBody::MessageRecalled(MessageRecalled {
            target_seq: recalled,
        }),
    )
    .await;
    let cjk = post(&a, "general", "g6", "明天的新品发布会很重要").await;
    let mixed = post(&a, "general", "g7", "新 iPhone 发布会 tomorrow").await;
    // Before and after dave joined.
    a.create_conversation("late", ConversationKind::Group, "", &[])
        .await
        .expect("late");
    post(&a, "late", "l1", "quokka before dave").await;
    a.add_member("late", "dave").await.expect("add dave");
    let late_quokka = post(&a, "late", "l2", "quokka after dave").await;
    Story {
        general_bluebird,
        edited,
        edit,
        cjk,
        mixed,
        late_quokka,
    }
}

/// What bob, carol and dave find: the exact outcomes every index state must give.
async fn check_story(server: &Server, s: &Sandbox, story: &Story) {
    let bob = connect(server, s, "acme", "bob").await;
    let b = bob.requester();
    assert_eq!(
        convs(&find(&b, "bluebird", 0).await),
        [("general", story.general_bluebird)],
        "bob finds his conversation's message, not carol's secret nor the other tenant's"
    );
    assert_eq!(find(&b, "alpha", 0).await, [], "the old text of an edit");
    let omega = b.search("omega", "", 0).await.expect("omega");
    assert_eq!(omega.hits.len(), 1);
    assert_eq!(
        (omega.hits[0].seq, omega.hits[0].text_seq),
        (story.edited, story.edit)
    );
    assert_eq!(omega.hits[0].snippet, "final omega wording");
    let h = &omega.hits[0].highlights[0];
    assert_eq!(
        &omega.hits[0].snippet[h.start as usize..h.end as usize],
        "omega"
    );
    assert_eq!(find(&b, "zanzibar", 0).await, [], "recalled");
    assert_eq!(find(&b, "cast", 0).await, [], "part of a word");
    // CJK substrings and mixed scripts, newest first.
    assert_eq!(
        convs(&find(&b, "发布会", 0).await),
        [("general", story.mixed), ("general", story.cjk)]
    );
    assert_eq!(
        convs(&find(&b, "ｉｐｈｏｎｅ 发布", 0).await),
        [("general", story.mixed)]
    );
    assert_eq!(find(&b, "发会", 0).await, []);
    assert_eq!(find(&b, "quokka", 0).await, [], "bob is not in `late`");
    let dave = connect(server, s, "acme", "dave").await;
    assert_eq!(
        convs(&find(&dave.requester(), "quokka", 0).await),
        [("late", story.late_quokka)],
        "dave finds nothing from before he joined"
    );
    let carol = connect(server, s, "acme", "carol").await;
    assert_eq!(
        find(&carol.requester(), "bluebird", 0)
            .await
            .into_iter()
            .map(|(c, _, snippet)| (c, snippet))
            .collect::<Vec<_>>(),
        [("secret".to_string(), "bluebird secret plan".to_string())]
    );
}

/// Archives every event (`tidings archive run --older-than 0s`, the server stopped) and
/// starts the server again.
fn archive_everything(s: &Sandbox, nats: &Nats) -> Server {
    let out = s
        .command(&["archive", "run", "--older-than", "0s"])
        .output()
        .expect("archive");
    assert!(out.status.success(), "archive run: {}", stderr(&out));
    Server::start(s, nats, "all", &[])
}

/// Waits (without asserting on time) until the hot index has indexed `n` events.
async fn indexed(server: &Server, n: u64) {
    let url = format!("http://127.0.0.1:{}/metrics", server.admin_port);
    for _ in 0..400 {
        let page = reqwest_get(&url).await;
        let got = page
            .lines()
            .find_map(|l| l.strip_prefix("tidings_log_search_indexed_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        if got >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the hot index never indexed {n} events");
}

async fn reqwest_get(url: &str) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match reqwest::get(url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_find_their_own_messages_exactly_with_and_without_the_index_and_archive() {
    let (s, nats) = (Sandbox::new(), Nats::start());
    let mut server = Server::start(&s, &nats, "all", &[]);
    let story = tell(&server, &s).await;
    // Searched at once: whatever the indexer has reached, results are exact.
    check_story(&server, &s, &story).await;
    // general: create, 7 events; late: create, l1, join, l2; secret, other: 2 each.
    indexed(&server, 16).await;
    check_story(&server, &s, &story).await;
    // The index and the store hold no word of any message.
    for word in [
        b"bluebird".as_slice(),
        b"omega",
        "发布".as_bytes(),
        b"quokka",
    ] {
        assert_eq!(
            common::grep_dir(&s.data_dir(), word),
            Vec::<std::path::PathBuf>::new()
        );
    }
    // Without the hot index: every hot event opened, the same results.
    assert!(server.terminate());
    let server = Server::start(&s, &nats, "all", &[("TIDINGS_LOG_SEARCH_HOT_INDEX", "0")]);
    check_story(&server, &s, &story).await;
    drop(server);
    // Archived: read back through the archive, the same results; the hot postings of the
    // archived events are gone.
    let server = archive_everything(&s, &nats);
    check_story(&server, &s, &story).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_follow_a_cursor_newest_first_and_bad_input_is_a_typed_error() {
    let (s, nats) = (Sandbox::new(), Nats::start());
    let server = Server::start(
        &s,
        &nats,
        "all",
        &[("TIDINGS_GATEWAY_SEARCH_PER_MINUTE", "20")],
    );
    let alice = connect(&server, &s, "acme", "alice").await;
    let a = alice.requester();
    a.create_conversation("one", ConversationKind::Group, "", &[])
        .await
        .expect("one");
    a.create_conversation("two", ConversationKind::Group, "", &[])
        .await
        .expect("two");
    let mut expected = Vec::new();
    for i in 0..5 {
        let conv = if i % 2 == 0 { "one" } else { "two" };
        let seq = post(&a, conv, &format!("p{i}"), &format!("pager number {i}")).await;
        expected.push((conv.to_string(), seq, format!("pager number {i}")));
    }
    expected.reverse();
    let first = a.search("pager", "", 2).await.expect("page 1");
    assert_eq!(first.hits.len(), 2);
    assert!(!first.next_cursor.is_empty());
    assert_eq!(find(&a, "pager", 2).await, expected);
    assert_eq!(find(&a, "pager", 0).await, expected);
    // Bad input: typed errors, nothing internal.
    let code = |r: Result<SearchResult, tidings_client::ClientError>| {
        error_code(&r.expect_err("refused")).expect("a server error")
    };
    assert_eq!(
        code(a.search(&"x".repeat(257), "", 0).await),
        ErrorCode::TooLarge
    );
    assert_eq!(
        code(a.search("   ", "", 0).await),
        ErrorCode::InvalidRequest
    );
    let many: Vec<String> = (0..17).map(|i| format!("w{i}")).collect();
    assert_eq!(
        code(a.search(&many.join(" "), "", 0).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(a.search("pager", "not-a-cursor", 0).await),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(a.search("other words", &first.next_cursor, 0).await),
        ErrorCode::InvalidRequest,
        "a cursor of another query"
    );
    // The session's search rate: 20 a minute (this session has made 10 so far).
    let mut refused = None;
    for _ in 0..30 {
        if let Err(e) = a.search("pager", "", 1).await {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("the rate limit refuses");
    assert_eq!(error_code(&e), Some(ErrorCode::RateLimited));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_works_with_the_gateway_and_the_log_apart() {
    let (s, nats) = (Sandbox::new(), Nats::start());
    let _log = Server::start(&s, &nats, "log", &[]);
    let gateway = Server::start(&s, &nats, "gateway", &[]);
    let story = tell(&gateway, &s).await;
    check_story(&gateway, &s, &story).await;
    let bob = connect(&gateway, &s, "acme", "bob").await;
    let e = bob
        .requester()
        .search("bluebird", "00ff", 0)
        .await
        .expect_err("bad cursor");
    assert_eq!(error_code(&e), Some(ErrorCode::InvalidRequest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_retention_and_after_shredding_nothing_is_found() {
    let (s, nats) = (Sandbox::new(), Nats::start());
    let mut server = Server::start(&s, &nats, "all", &[]);
    let story = tell(&server, &s).await;
    indexed(&server, 16).await;
    check_story(&server, &s, &story).await;
    assert!(server.terminate());
    // Everything ages out (a 1 s retention after 1.5 s).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let out = s
        .command(&["archive", "run", "--older-than", "0s"])
        .env("TIDINGS_ARCHIVE_RETENTION", "1s")
        .output()
        .expect("retention");
    assert!(out.status.success(), "archive run: {}", stderr(&out));
    let mut server = Server::start(&s, &nats, "all", &[]);
    let bob = connect(&server, &s, "acme", "bob").await;
    for q in ["bluebird", "omega", "发布会"] {
        assert_eq!(
            find(&bob.requester(), q, 0).await,
            [],
            "{q} after retention"
        );
    }
    drop(bob);
    // A new message after retention is found; then the tenant's keys are shredded.
    let alice = connect(&server, &s, "acme", "alice").await;
    post(&alice.requester(), "general", "n1", "bluebird again").await;
    let bob = connect(&server, &s, "acme", "bob").await;
    assert_eq!(find(&bob.requester(), "bluebird", 0).await.len(), 1);
    drop((alice, bob));
    assert!(server.terminate());
    s.ok(&[
        "keys",
        "shred",
        "--tenant",
        "acme",
        "--confirm",
        "acme",
        "--actor",
        "dpo",
    ]);
    let server = Server::start(&s, &nats, "all", &[]);
    let bob = connect(&server, &s, "acme", "bob").await;
    let e = bob
        .requester()
        .search("bluebird", "", 0)
        .await
        .expect_err("nothing to search after shredding");
    assert_eq!(error_code(&e), Some(ErrorCode::NotAllowed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_matches_page_through_the_index_newest_first() {
    let (s, nats) = (Sandbox::new(), Nats::start());
    let server = Server::start(&s, &nats, "all", &[]);
    let alice = connect(&server, &s, "acme", "alice").await;
    let a = alice.requester();
    a.create_conversation("busy", ConversationKind::Group, "", &[])
        .await
        .expect("busy");
    let (mut all, mut rare) = (Vec::new(), Vec::new());
    for i in 0..150 {
        let text = if i % 10 == 0 {
            format!("rare pager number {i}")
        } else {
            format!("pager number {i}")
        };
        let seq = post(&a, "busy", &format!("m{i}"), &text).await;
        all.push(("busy".to_string(), seq, text.clone()));
        if i % 10 == 0 {
            rare.push(("busy".to_string(), seq, text));
        }
    }
    all.reverse();
    rare.reverse();
    // Before and after the indexer caught up: the same pages.
    assert_eq!(find(&a, "pager", 50).await, all);
    indexed(&server, 151).await;
    assert_eq!(find(&a, "pager", 50).await, all);
    assert_eq!(find(&a, "pager", 7).await, all);
    assert_eq!(find(&a, "rare pager", 0).await, rare);
    assert_eq!(find(&a, "number 42", 0).await.len(), 1);
    // Archived: the same pages, the candidates now from the segment's sealed index.
    drop(alice);
    let mut server = server;
    assert!(server.terminate());
    let server = archive_everything(&s, &nats);
    let alice = connect(&server, &s, "acme", "alice").await;
    let a = alice.requester();
    assert_eq!(find(&a, "pager", 7).await, all);
    assert_eq!(find(&a, "rare pager", 3).await, rare);
    assert_eq!(find(&a, "number 42", 0).await.len(), 1);
}

/// What erin finds for "heron" in `windows`, newest first.
async fn herons(server: &Server, s: &Sandbox) -> Vec<(String, u64, String)> {
    let erin = connect(server, s, "acme", "erin").await;
    find(&erin.requester(), "heron", 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_left_and_rejoined_finds_each_window_and_nothing_between() {
    let (s, nats) = (Sandbox::new(), Nats::start());
    let mut server = Server::start(&s, &nats, "all", &[]);
    let alice = connect(&server, &s, "acme", "alice").await;
    let a = alice.requester();
    a.create_conversation("windows", ConversationKind::Group, "", &[])
        .await
        .expect("windows");
    post(&a, "windows", "w0", "heron before erin joined").await;
    a.add_member("windows", "erin").await.expect("erin joins");
    let first = post(&a, "windows", "w1", "heron in the first window").await;
    {
        let erin = connect(&server, &s, "acme", "erin").await;
        erin.requester()
            .remove_member("windows", "erin")
            .await
            .expect("erin leaves");
    }
    post(&a, "windows", "w2", "heron while erin was away").await;
    assert_eq!(
        herons(&server, &s).await,
        [],
        "a conversation one left is not searched"
    );
    a.add_member("windows", "erin").await.expect("erin rejoins");
    let second = post(&a, "windows", "w3", "heron in the second window").await;
    // Removed by someone else: the second window ends there.
    a.remove_member("windows", "erin")
        .await
        .expect("erin removed");
    post(&a, "windows", "w4", "heron after erin was removed").await;
    a.add_member("windows", "erin").await.expect("erin back");
    let third = post(&a, "windows", "w5", "heron in the third window").await;
    let expected = vec![
        (
            "windows".to_string(),
            third,
            "heron in the third window".to_string(),
        ),
        (
            "windows".to_string(),
            second,
            "heron in the second window".to_string(),
        ),
        (
            "windows".to_string(),
            first,
            "heron in the first window".to_string(),
        ),
    ];
    assert_eq!(herons(&server, &s).await, expected, "before indexing");
    // create, w0, join, w1, leave, w2, join, w3, remove, w4, join, w5
    indexed(&server, 12).await;
    assert_eq!(herons(&server, &s).await, expected, "through the hot index");
    // Archived: the segments' indexes name the candidates; the windows are the same.
    drop(alice);
    assert!(server.terminate());
    let server = archive_everything(&s, &nats);
    assert_eq!(herons(&server, &s).await, expected, "from the archive");
}
