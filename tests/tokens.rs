//! Token rules end to end (issue 11): a real nats-server, real `tidings serve` processes,
//! real WebSockets and HTTP. Revocation by jti and by user (recorded offline or through the
//! admin listener, ending live sessions with 4011 within a second), HS256 only when
//! enabled, the maximum lifetime, separate chat and compliance audiences, and Ed25519 keys
//! rotated by replacing the JWKS file.

use std::time::{Duration, Instant};

use crate::common;
use crate::common::{COMPLIANCE_AUDIENCE, Nats, Sandbox, Server, closed};
use serde_json::{Value, json};
use tidings_client::client::{CloseReason, ErrorCode};
use tidings_client::{ClientError, Connection};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Hello with `token` is refused: the error code, then the close.
async fn refused(url: &str, token: &str) -> (ErrorCode, (Option<CloseReason>, Option<u16>)) {
    let mut conn = Connection::connect(url).await.expect("connect");
    let code = match conn.hello(token, "test").await {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("expected the Hello to be refused, got {other:?}"),
    };
    (code, closed(&mut conn).await)
}

async fn open(url: &str, token: &str) -> Connection {
    let (conn, _) = Connection::open(url, token, "test")
        .await
        .expect("connect and hello");
    conn
}

fn http() -> reqwest::Client {
    common::http_client()
}

/// POST /v1/admin/tokens/revoke: status and JSON answer.
async fn revoke_over_http(server: &Server, token: &str, body: &Value) -> (u16, Value) {
    let resp = http()
        .post(format!(
            "http://127.0.0.1:{}/v1/admin/tokens/revoke",
            server.admin_port
        ))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    (status, json)
}

/// GET a compliance search: the status.
async fn search_status(server: &Server, token: &str) -> u16 {
    http()
        .get(format!(
            "http://127.0.0.1:{}/v1/compliance/search?text=x",
            server.admin_port
        ))
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

/// `tidings ARGS` in the sandbox with extra environment; stdout's JSON lines or the error.
fn tidings(s: &Sandbox, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = s.command(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(std::process::Stdio::null())
        .output()
        .expect("run tidings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_are_refused_and_a_users_live_sessions_end_within_a_second() {
    let s = Sandbox::new();
    s.group("team");
    let nats = Nats::start();
    let chat = |user: &str, jti: Option<&str>| {
        s.token_for(common::CHAT_AUDIENCE, "acme", user, &[], 3600, jti)
    };

    // Recorded on the store while no server runs.
    let out = tidings(
        &s,
        &["token", "revoke", "--tenant", "acme", "--jti", "lost-phone"],
        &[("TIDINGS_NATS_URL", &nats.url())],
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    let answer = &common::json_lines(&out.stdout)[0];
    assert_eq!(
        (&answer["tenant"], &answer["jti"], &answer["revoked"]),
        (&json!("acme"), &json!("lost-phone"), &json!(true))
    );

    let server = Server::start(&s, &nats, "all", &[]);
    let url = server.url();
    // A revoked jti is refused at Hello, with its own close code.
    assert_eq!(
        refused(&url, &chat("bob", Some("lost-phone"))).await,
        (
            ErrorCode::AuthFailed,
            (Some(CloseReason::Revoked), Some(4011))
        )
    );

    // Revoked by jti while serving, through the CLI and the admin listener: that session
    // ends, bob's other one stays.
    let admin = s.token_with_roles("acme", "root", &["admin"], 3600);
    let mut bob_phone = open(&url, &chat("bob", Some("bob-phone"))).await;
    let bob_laptop = open(&url, &chat("bob", Some("bob-laptop"))).await;
    let admin_url = format!("http://127.0.0.1:{}", server.admin_port);
    let out = tidings(
        &s,
        &[
            "token",
            "revoke",
            "--tenant",
            "acme",
            "--jti",
            "bob-phone",
            "--server",
            &admin_url,
            "--token",
            &admin,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(
        common::json_lines(&out.stdout)[0]["notified"],
        json!(true),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        closed(&mut bob_phone).await,
        (Some(CloseReason::Revoked), Some(4011))
    );
    bob_laptop.ping().await.expect("bob's other session is up");

    // Every token of alice issued up to now: her three live sessions end within a second;
    // bob's session stays up.
    let mut alice: Vec<Connection> = Vec::new();
    for device in ["a", "b", "c"] {
        alice.push(open(&url, &chat("alice", Some(device))).await);
    }
    let started = Instant::now();
    let (status, answer) = revoke_over_http(
        &server,
        &admin,
        &json!({"tenant": "acme", "user": "alice", "before": "now"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (&answer["user"], &answer["notified"]),
        (&json!("alice"), &json!(true))
    );
    let cutoff = answer["before"].as_u64().expect("cutoff");
    for conn in &mut alice {
        assert_eq!(closed(conn).await, (Some(CloseReason::Revoked), Some(4011)));
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "alice's sessions took {took:?} to end"
    );
    bob_laptop.ping().await.expect("bob's session is still up");
    // Her tokens issued up to the cutoff are refused at Hello; one issued after it works.
    let issued_at = |iat: u64| {
        s.sign(
            common::CHAT_AUDIENCE,
            &tidings_auth::Claims {
                tenant: "acme".into(),
                user: "alice".into(),
                roles: vec![],
                expires_at: iat + 3600,
                issued_at: iat,
                jti: None,
            },
        )
    };
    assert_eq!(
        refused(&url, &issued_at(cutoff)).await.1,
        (Some(CloseReason::Revoked), Some(4011))
    );
    open(&url, &issued_at(cutoff + 1))
        .await
        .ping()
        .await
        .expect("a fresh token works");

    // The admin listener: only an admin of the tenant may revoke, and it refuses revoked
    // tokens too.
    let officer = s.token_with_roles("acme", "officer", &["compliance"], 3600);
    let (status, answer) =
        revoke_over_http(&server, &officer, &json!({"tenant": "acme", "jti": "x"})).await;
    assert_eq!(
        (status, &answer["error"]["code"]),
        (403, &json!("forbidden"))
    );
    let (status, answer) =
        revoke_over_http(&server, &admin, &json!({"tenant": "other", "jti": "x"})).await;
    assert_eq!(
        (status, &answer["error"]["code"]),
        (403, &json!("forbidden"))
    );
    let (status, answer) =
        revoke_over_http(&server, &admin, &json!({"tenant": "acme", "jti": ""})).await;
    assert_eq!(
        (status, &answer["error"]["code"]),
        (400, &json!("invalid_request"))
    );
    let officer_2 = s.token_for(
        COMPLIANCE_AUDIENCE,
        "acme",
        "officer",
        &["compliance"],
        3600,
        Some("officer-2"),
    );
    assert_eq!(search_status(&server, &officer_2).await, 200);
    let (status, _) = revoke_over_http(
        &server,
        &admin,
        &json!({"tenant": "acme", "jti": "officer-2"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(search_status(&server, &officer_2).await, 401);

    // Each revocation through the listener is in the tenant's audit log.
    let audit = http()
        .get(format!("{admin_url}/v1/compliance/audit"))
        .bearer_auth(&officer)
        .send()
        .await
        .expect("audit")
        .text()
        .await
        .expect("body");
    let revocations: Vec<(String, String)> = common::json_lines(audit.as_bytes())
        .iter()
        .filter(|r| r["action"] == "token_revoke")
        .map(|r| {
            (
                r["actor"].as_str().unwrap_or("").to_string(),
                r["outcome"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let row = |actor: &str, outcome: &str| (actor.to_string(), outcome.to_string());
    assert_eq!(
        revocations,
        vec![
            // The offline revocation, by the CLI's --actor.
            row("operator", "completed"),
            row("acme/root", "completed"),
            row("acme/root", "completed"),
            row("acme/officer", "denied"),
            // (The refusal aimed at tenant "other" is in other's log.)
            row("acme/root", "denied"),
            row("acme/root", "completed"),
        ],
        "{audit}"
    );
}

/// `[auth]` with HS256 off (the secret file `keys init` wrote is still there), an Ed25519
/// key from a JWKS file, and a one-hour maximum lifetime.
fn production(jwks: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        ("TIDINGS_AUTH_HS256_ENABLED", "0".to_string()),
        ("TIDINGS_AUTH_JWKS_FILE", jwks.display().to_string()),
        ("TIDINGS_AUTH_JWKS_POLL_MS", "100".to_string()),
        ("TIDINGS_AUTH_MAX_TOKEN_LIFETIME_SECS", "3600".to_string()),
    ]
}

fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_lifetime_audiences_and_jwks_rotation_are_enforced() {
    let s = Sandbox::new();
    s.group("team");
    let (seed_a, seed_b) = ([7u8; 32], [9u8; 32]);
    let key = |kid: &str, seed: &[u8; 32]| tidings_auth::Ed25519Key {
        kid: Some(kid.into()),
        public_key: tidings_auth::ed25519_public_key(seed),
    };
    let jwks = s.path().join("jwks.json");
    replace_file(&jwks, &tidings_auth::jwks_json(&[key("k1", &seed_a)]));
    let env = production(&jwks);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // `token issue` refuses clearly when HS256 is not enabled...
    let out = tidings(
        &s,
        &["token", "issue", "--tenant", "acme", "--user", "bob"],
        &env,
    );
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("auth.hs256_enabled"),
        "{}",
        common::stderr(&out)
    );
    // ...and with it, a compliance token gets the compliance audience and a jti, and no
    // token may outlive the maximum.
    let out = tidings(
        &s,
        &[
            "token",
            "issue",
            "--tenant",
            "acme",
            "--user",
            "officer",
            "--role",
            "compliance",
        ],
        &[("TIDINGS_AUTH_HS256_ENABLED", "1")],
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    let issued = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string();
    let secret = std::fs::read_to_string(s.path().join("tidings-jwt.secret")).expect("secret");
    let verifier = tidings_auth::Verifier::new(tidings_auth::AuthConfig {
        issuer: "tidings".into(),
        audience: COMPLIANCE_AUDIENCE.into(),
        refused_audiences: vec![common::CHAT_AUDIENCE.into()],
        hs256_secret: Some(tidings_log::crypto::hex_decode(secret.trim()).expect("hex")),
        ed25519_public_keys: vec![],
        jwks: None,
        leeway_secs: 0,
        max_lifetime_secs: 86_400,
    })
    .expect("verifier");
    let claims = verifier.verify(&issued, now()).expect("a compliance token");
    assert_eq!(claims.roles, vec!["compliance".to_string()]);
    assert_eq!(claims.jti.as_deref().map(str::len), Some(36), "a UUID");
    let out = tidings(
        &s,
        &[
            "token", "issue", "--tenant", "acme", "--user", "bob", "--ttl", "2d",
        ],
        &[("TIDINGS_AUTH_HS256_ENABLED", "1")],
    );
    assert!(!out.status.success());
    assert!(common::stderr(&out).contains("max_token_lifetime_secs"));

    let nats = Nats::start();
    let server = Server::start(&s, &nats, "all", &env);
    let url = server.url();
    let eddsa = |seed: &[u8; 32], kid: &str, audience: &str, roles: &[&str], lifetime: u64| {
        let iat = now();
        tidings_auth::issue_ed25519(
            seed,
            Some(kid),
            "tidings",
            audience,
            &tidings_auth::Claims {
                tenant: "acme".into(),
                user: "bob".into(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
                expires_at: iat + lifetime,
                issued_at: iat,
                jti: None,
            },
        )
    };
    let chat_a = eddsa(&seed_a, "k1", common::CHAT_AUDIENCE, &[], 600);
    open(&url, &chat_a).await.ping().await.expect("EdDSA works");
    let auth_failed = (
        ErrorCode::AuthFailed,
        (Some(CloseReason::AuthFailed), Some(4001)),
    );

    // HS256 is refused although its secret file exists: it is not enabled.
    assert_eq!(
        refused(&url, &s.token("acme", "bob", 600)).await,
        auth_failed
    );
    let hs_officer = s.token_with_roles("acme", "officer", &["compliance"], 600);
    assert_eq!(search_status(&server, &hs_officer).await, 401);

    // Over the maximum lifetime.
    let long = eddsa(&seed_a, "k1", common::CHAT_AUDIENCE, &[], 3601);
    assert_eq!(refused(&url, &long).await, auth_failed);

    // A compliance token cannot open a chat session; a chat token cannot search.
    let officer_a = eddsa(&seed_a, "k1", COMPLIANCE_AUDIENCE, &["compliance"], 600);
    assert_eq!(refused(&url, &officer_a).await, auth_failed);
    assert_eq!(search_status(&server, &officer_a).await, 200);
    let chat_with_role = eddsa(&seed_a, "k1", common::CHAT_AUDIENCE, &["compliance"], 600);
    assert_eq!(search_status(&server, &chat_with_role).await, 401);

    // Rotation: replace the file; k2 is accepted within the poll interval, k1 no longer.
    let chat_b = eddsa(&seed_b, "k2", common::CHAT_AUDIENCE, &[], 600);
    assert_eq!(refused(&url, &chat_b).await, auth_failed);
    replace_file(&jwks, &tidings_auth::jwks_json(&[key("k2", &seed_b)]));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Connection::open(&url, &chat_b, "test").await {
            Ok((conn, _)) => {
                conn.ping().await.expect("k2 works");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "k2 never accepted: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(refused(&url, &chat_a).await, auth_failed);

    // A broken file keeps the keys in use.
    replace_file(&jwks, "{\"keys\": [");
    tokio::time::sleep(Duration::from_millis(400)).await;
    open(&url, &chat_b)
        .await
        .ping()
        .await
        .expect("k2 still works");
}
