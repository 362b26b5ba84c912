//! Bot accounts end to end (issue 16): a real nats-server and `tidings serve`. A bot made
//! with `tidings bot create` posts through a WebSocket session like any client and through
//! `POST /v1/bot/messages`, and is the events' sender; the HTTP route refuses what it should
//! with typed JSON errors; a user token can never pose as a bot; a bot made and revoked over
//! the admin listener while serving is refused at once; every change is in the audit log.

use std::time::Duration;

use crate::common;
use crate::common::admin::Admin;
use crate::common::{Nats, Sandbox, Server};
use serde_json::{Value, json};
use tidings_client::client::ErrorCode;
use tidings_client::{ClientError, Connection, Push};

const WAIT: Duration = Duration::from_secs(20);

/// The next message bob sees in `team`: (sender, text).
async fn next_message(conn: &mut Connection) -> (String, String) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, conn.next_push()).await {
            Ok(Some(Push::Event(e))) => {
                if let Some(tidings_schemas::v1::event::Body::MessagePosted(p)) = &e.body {
                    return (e.sender.clone(), p.text.clone());
                }
            }
            Ok(Some(_)) => {}
            other => panic!("no message arrived: {other:?}"),
        }
    }
}

struct Reply {
    status: u16,
    body: Value,
    retry_after: Option<String>,
}

async fn post(http: &reqwest::Client, url: &str, token: Option<&str>, body: &str) -> Reply {
    let mut req = http
        .post(url)
        .header("Content-Type", "application/json")
        .body(body.to_string());
    if let Some(token) = token {
        req = req.header("Authorization", format!("Bearer {token}"));
    }
    let resp = req.send().await.expect("post");
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().expect("ascii").to_string());
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
    Reply {
        status,
        body,
        retry_after,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_posts_through_both_paths_and_is_refused_once_revoked() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s = Sandbox::new();
    s.group("team");
    s.group("private");
    let made = s.ok(&[
        "bot", "create", "--tenant", "acme", "--name", "alerts", "--actor", "ops-1", "--days", "30",
    ]);
    assert_eq!(made[0]["bot"], "bot-alerts");
    let token = made[0]["token"].as_str().expect("a token").to_string();
    // The bot is added to a conversation like any member; it is not in `private`.
    s.ok(&[
        "conv",
        "add-member",
        "--tenant",
        "acme",
        "--conv",
        "team",
        "--by",
        "alice",
        "--user",
        "bot-alerts",
    ]);
    // A second create of the same name is refused; the list shows one bot.
    let again = s.run(&[
        "bot", "create", "--tenant", "acme", "--name", "alerts", "--actor", "ops-1",
    ]);
    assert!(!again.status.success());
    assert!(
        common::stderr(&again).contains("already exists"),
        "{}",
        common::stderr(&again)
    );
    let listed = s.ok(&["bot", "list", "--tenant", "acme"]);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["revoked"], Value::Null);
    assert!(s.ok(&["bot", "list", "--tenant", "other"]).is_empty());

    let nats = Nats::start();
    let server = Server::start(&s, &nats, "all", &[]);
    let (mut bob, _) = Connection::open(&server.url(), &s.token("acme", "bob", 600), "t")
        .await
        .expect("bob");

    // Path 1: the bot's own WebSocket session.
    let (bot, _) = Connection::open(&server.url(), &token, "alerts-bot")
        .await
        .expect("the bot connects like any client");
    bot.requester()
        .send_text("team", "ws-1", "disk 91% on db-3")
        .await
        .expect("the bot sends");
    assert_eq!(
        next_message(&mut bob).await,
        ("bot-alerts".to_string(), "disk 91% on db-3".to_string())
    );

    // Path 2: HTTP, with its answer; a retry is the same event.
    let http = common::http_client();
    let url = format!("http://127.0.0.1:{}/v1/bot/messages", server.port);
    let body = r#"{"conversation":"team","client_msg_id":"http-1","text":"db-3 restarted"}"#;
    let first = post(&http, &url, Some(&token), body).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.body["conversation"], "team");
    assert_eq!(first.body["duplicate"], false);
    assert_eq!(
        next_message(&mut bob).await,
        ("bot-alerts".to_string(), "db-3 restarted".to_string())
    );
    let retry = post(&http, &url, Some(&token), body).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.body["duplicate"], true);
    assert_eq!(retry.body["seq"], first.body["seq"]);

    // What the route refuses, each with its status and code.
    let alice = s.token("acme", "alice", 600);
    for (token, body, status, code) in [
        (None, body, 401, "not_authenticated"),
        (Some("not-a-token"), body, 401, "auth_failed"),
        (Some(alice.as_str()), body, 403, "not_allowed"),
        (Some(token.as_str()), "{not json", 400, "invalid_request"),
        (
            Some(token.as_str()),
            r#"{"conversation":"team","client_msg_id":"x","text":"hi","sender":"alice"}"#,
            400,
            "invalid_request",
        ),
        (
            Some(token.as_str()),
            r#"{"conversation":"bad id!","client_msg_id":"x","text":"hi"}"#,
            400,
            "invalid_id",
        ),
        (
            Some(token.as_str()),
            r#"{"conversation":"private","client_msg_id":"x","text":"hi"}"#,
            403,
            "not_member",
        ),
        (
            Some(token.as_str()),
            r#"{"conversation":"team","client_msg_id":"x","text":""}"#,
            400,
            "invalid_request",
        ),
    ] {
        let r = post(&http, &url, token, body).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert_eq!(r.body["error"]["code"], code, "{body}: {}", r.body);
        assert!(r.retry_after.is_none());
    }
    let huge = format!(
        r#"{{"conversation":"team","client_msg_id":"big","text":"{}"}}"#,
        "x".repeat(200_000)
    );
    assert_eq!(post(&http, &url, Some(&token), &huge).await.status, 413);
    let get = http.get(&url).send().await.expect("get");
    assert_eq!(get.status(), 405);

    // A user token can never pose as a bot, on either path.
    let posing = s.token("acme", "bot-alerts", 600);
    assert!(matches!(
        Connection::open(&server.url(), &posing, "t").await,
        Err(ClientError::Server {
            code: ErrorCode::AuthFailed,
            ..
        })
    ));
    assert_eq!(post(&http, &url, Some(&posing), body).await.status, 401);

    // While serving, over the admin listener: another bot, then the first one revoked.
    let admin = Admin::new(&server);
    let root = s.token_with_roles("acme", "root", &["admin"], 600);
    let (status, reminders) = admin
        .post_json("/v1/admin/bots/create", &root, json!({"name": "reminders"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(reminders["bot"], "bot-reminders");
    assert!(reminders["token"].as_str().is_some_and(|t| t.len() > 100));
    let (status, _) = admin
        .post_json("/v1/admin/bots/create", &root, json!({"name": "reminders"}))
        .await;
    assert_eq!(status, 400, "a bot id is never made twice");
    let (_, bots) = admin
        .post_json("/v1/admin/bots/list", &root, json!({}))
        .await;
    assert_eq!(bots["bots"].as_array().map(Vec::len), Some(2), "{bots}");
    let (status, _) = admin
        .post_json("/v1/admin/bots/revoke", &root, json!({"bot": "alerts"}))
        .await;
    assert_eq!(status, 200);
    let r = post(
        &http,
        &url,
        Some(&token),
        r#"{"conversation":"team","client_msg_id":"after","text":"still here?"}"#,
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);
    let (status, _) = admin
        .post_json("/v1/admin/bots/token", &root, json!({"bot": "alerts"}))
        .await;
    assert_eq!(status, 403, "a revoked bot gets no new token");
    // Another tenant's admin cannot touch acme's bots.
    let other = s.token_with_roles("other", "root", &["admin"], 600);
    let (status, _) = admin
        .post_json("/v1/admin/bots/list", &other, json!({"tenant": "acme"}))
        .await;
    assert_eq!(status, 403);

    // The audit log has each change, by whom.
    let officer = s.token_with_roles("acme", "officer", &["compliance"], 600);
    let (_, audit) = admin.get_text("/v1/compliance/audit", &officer).await;
    let records = common::json_lines(audit.as_bytes());
    let has = |actor: &str, action: &str| {
        records
            .iter()
            .any(|r| r["actor"] == actor && r["action"] == action && r["outcome"] == "completed")
    };
    assert!(has("ops-1", "bot_create"), "{audit}");
    assert!(has("acme/root", "bot_create"), "{audit}");
    assert!(has("acme/root", "bot_revoke"), "{audit}");
    assert!(
        !audit.contains(&token),
        "a bot token must never be in the audit log"
    );
}
