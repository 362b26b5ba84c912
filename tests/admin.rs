//! The admin listener end to end: a real nats-server and `tidings serve`, plain HTTP from
//! reqwest. Who may search, what each refusal looks like, and what the audit log keeps.

use crate::common;
use crate::common::admin::Admin;
use crate::common::{Nats, Sandbox, Server};
use serde_json::{Value, json};

const MARKER: &str = "the quarterly marker 7f3a";

/// A sandbox whose acme/team holds one message from bob (seq 2), and a server on it.
fn setup(role: &str) -> (Sandbox, Nats, Server) {
    let s = Sandbox::new();
    s.group("team");
    s.ok(&[
        "log",
        "append",
        "--tenant",
        "acme",
        "--conv",
        "team",
        "--sender",
        "bob",
        "--client-msg-id",
        "m1",
        "--text",
        MARKER,
    ]);
    let nats = Nats::start();
    let server = Server::start(&s, &nats, role, &[]);
    (s, nats, server)
}

/// (actor, action, outcome) of each audit line, the final line left out.
fn trail(lines: &[Value]) -> Vec<(String, String, String)> {
    lines[..lines.len() - 1]
        .iter()
        .map(|r| {
            (
                r["actor"].as_str().unwrap_or("").to_string(),
                r["action"].as_str().unwrap_or("").to_string(),
                r["outcome"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn row(actor: &str, action: &str, outcome: &str) -> (String, String, String) {
    (actor.into(), action.into(), outcome.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compliance_search_finds_the_marker_and_every_refusal_is_audited_except_unauthenticated() {
    let (s, _nats, server) = setup("all");
    let admin = Admin::new(&server);
    let auditor = s.token_with_roles("acme", "auditor", &["compliance"], 3600);
    // An admin-plane token (the compliance audience) without the compliance role; a chat
    // token is not even verified here (tests/tokens.rs).
    let bob = s.token_for(common::COMPLIANCE_AUDIENCE, "acme", "bob", &[], 3600, None);
    let other_auditor = s.token_with_roles("other", "auditor", &["compliance"], 3600);
    let expired_auditor = s.token_with_roles("acme", "auditor", &["compliance"], -3600);

    // Found, with a case-insensitive, percent-encoded text filter and the tenant defaulted.
    let r = admin
        .get_as(
            "/v1/compliance/search?conv=team&text=QUARTERLY%20marker",
            &auditor,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.content_type, "application/x-ndjson");
    let lines = r.lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let hit = &lines[0];
    assert_eq!(
        (
            &hit["tenant"],
            &hit["conversation"],
            &hit["seq"],
            &hit["sender"],
            &hit["kind"],
            &hit["text"],
            &hit["tier"],
            &hit["matched"],
            &hit["edits"],
            &hit["recalled"],
        ),
        (
            &json!("acme"),
            &json!("team"),
            &json!(2),
            &json!("bob"),
            &json!("message_posted"),
            &json!(MARKER),
            &json!("hot"),
            &json!("original"),
            &json!([]),
            &Value::Null,
        ),
        "{hit}"
    );
    assert_eq!(lines[1], json!({"complete": true, "rows": 1}));

    // A verified token without the role.
    let r = admin
        .get_as("/v1/compliance/search?text=marker", &bob)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (403, "forbidden".into()),
        "{}",
        r.body
    );

    // A compliance token of another tenant.
    let r = admin
        .get_as(
            "/v1/compliance/search?tenant=acme&text=marker",
            &other_auditor,
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (403, "forbidden".into()),
        "{}",
        r.body
    );

    // Unauthenticated, in every way; the token is never echoed.
    for authorization in [
        None,
        Some("Bearer garbage".to_string()),
        Some("Bearer a.b.c".to_string()),
        Some(format!("Basic {auditor}")),
        Some(format!("Bearer {expired_auditor}")),
        Some("Bearer ".to_string()),
    ] {
        let r = admin
            .get(
                "/v1/compliance/search?text=marker",
                authorization.as_deref(),
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (401, "unauthenticated".into()),
            "{authorization:?}: {}",
            r.body
        );
        assert_eq!(
            r.headers.get("www-authenticate").map(|v| v.as_bytes()),
            Some(&b"Bearer"[..])
        );
        assert!(!r.body.contains(&auditor) && !r.body.contains(&expired_auditor));
    }
    let r = admin.get("/v1/compliance/audit", None).await;
    assert_eq!(r.status, 401, "{}", r.body);

    // A malformed filter from a compliance token.
    let r = admin
        .get_as("/v1/compliance/search?from=yesterday", &auditor)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (400, "invalid_request".into()),
        "{}",
        r.body
    );
    assert!(r.body.contains("yesterday"), "{}", r.body);

    // The audit log: exactly what a verified caller did, in order, and no trace of the
    // unauthenticated attempts.
    let r = admin.get_as("/v1/compliance/audit", &auditor).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.content_type, "application/x-ndjson");
    let lines = r.lines();
    assert_eq!(
        trail(&lines),
        vec![
            row("acme/auditor", "search", "started"),
            row("acme/auditor", "search", "completed"),
            row("acme/bob", "search", "denied"),
            row("other/auditor", "search", "denied"),
            row("acme/auditor", "search", "denied"),
            row("acme/auditor", "audit_read", "started"),
        ],
        "{lines:#?}"
    );
    assert_eq!(
        lines.last(),
        Some(&json!({"complete": true, "rows": 6, "problems": []}))
    );
    for (i, record) in lines[..6].iter().enumerate() {
        assert_eq!(record["tenant"], "acme");
        assert_eq!(record["seq"], json!(i + 1));
        assert_eq!(record["via"], "http", "{record}");
    }
    let (started, completed) = (&lines[0], &lines[1]);
    assert_eq!(started["access_id"], completed["access_id"]);
    assert_eq!(
        started["filters"],
        json!({"tenant": "acme", "conversation": "team", "sender": null, "from": null,
               "to": null, "text": "QUARTERLY marker"})
    );
    assert_eq!(completed["rows"], 1);
    assert!(
        lines[2]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("compliance role")),
        "{}",
        lines[2]
    );
    assert_eq!(
        lines[3]["detail"],
        "a token of tenant other may not read tenant acme"
    );
    assert_eq!(
        lines[3]["filters"],
        json!({"tenant": "acme", "text": "marker"})
    );
    assert!(
        lines[4]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("from") && d.contains("yesterday")),
        "{}",
        lines[4]
    );
    let audited = r.body.clone();
    assert!(!audited.contains(&auditor) && !audited.contains("garbage"));

    // Reading the audit log was itself recorded, with what it returned.
    let r = admin
        .get_as("/v1/compliance/audit?tenant=acme", &auditor)
        .await;
    let lines = r.lines();
    assert_eq!(
        trail(&lines)[5..],
        [
            row("acme/auditor", "audit_read", "started"),
            row("acme/auditor", "audit_read", "completed"),
            row("acme/auditor", "audit_read", "started"),
        ]
    );
    assert_eq!(lines[6]["rows"], 6);

    // The cross-tenant attempt went to the target's log, not the caller's.
    let r = admin.get_as("/v1/compliance/audit", &other_auditor).await;
    assert_eq!(
        trail(&r.lines()),
        vec![row("other/auditor", "audit_read", "started")]
    );

    let r = admin.get("/healthz", None).await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_role_serves_it_and_bad_requests_get_json_errors_without_audit() {
    let (s, _nats, mut server) = setup("log");
    let admin = Admin::new(&server);
    let auditor = s.token_with_roles("acme", "auditor", &["compliance"], 3600);

    let r = admin.get("/healthz", None).await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));

    let r = admin.get_as("/v1/compliance/nothing", &auditor).await;
    assert_eq!(
        (r.status, r.code()),
        (404, "not_found".into()),
        "{}",
        r.body
    );

    let r = admin
        .send(
            admin
                .client
                .post(format!("{}/v1/compliance/search", admin.base))
                .header("Authorization", format!("Bearer {auditor}")),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (405, "method_not_allowed".into()),
        "{}",
        r.body
    );
    assert_eq!(
        r.headers.get("allow").map(|v| v.as_bytes()),
        Some(&b"GET"[..])
    );

    let r = admin
        .send(
            admin
                .client
                .get(format!("{}/v1/compliance/search", admin.base))
                .header("Authorization", format!("Bearer {auditor}"))
                .body("{\"text\":\"marker\"}"),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (413, "body_not_allowed".into()),
        "{}",
        r.body
    );

    let long = "x".repeat(9 * 1024);
    let r = admin
        .get_as(&format!("/v1/compliance/search?text={long}"), &auditor)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (414, "uri_too_long".into()),
        "{}",
        r.body
    );

    // Filters the types refuse, and parameters nobody defined: 400, audited as denied.
    for query in [
        "conv=no%2Fslash",
        "sender=",
        "from=2026-11-30&to=2026-11-29",
        "text=",
        "limit=10",
        "text=%E2%28",
    ] {
        let r = admin
            .get_as(&format!("/v1/compliance/search?{query}"), &auditor)
            .await;
        assert_eq!(
            (r.status, r.code()),
            (400, "invalid_request".into()),
            "{query}: {}",
            r.body
        );
    }

    let r = admin.get_as("/v1/compliance/audit", &auditor).await;
    let lines = r.lines();
    let mut expected = vec![row("acme/auditor", "search", "denied"); 6];
    expected.push(row("acme/auditor", "audit_read", "started"));
    assert_eq!(trail(&lines), expected, "{lines:#?}");

    assert!(server.terminate(), "serve --role log exits cleanly");
}

/// Holds, key operations and archive runs over HTTP while `serve` holds the store (the CLI
/// cannot open it then): each needs its role in its own tenant, shredding needs the tenant
/// named twice and no hold, and the audit log records every step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_keys_and_archive_operations_run_while_serving_and_are_audited() {
    let (s, _nats, server) = setup("all");
    let admin = Admin::new(&server);
    let root = s.token_with_roles("acme", "root", &["admin"], 3600);
    let officer = s.token_with_roles("acme", "officer", &["compliance"], 3600);
    let other_root = s.token_with_roles("other", "root", &["admin"], 3600);

    let r = admin
        .post_as("/v1/admin/keys/rotate", &root, json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.lines()[0]["key_id"].as_u64().is_some(), "{}", r.body);
    let r = admin
        .post_as("/v1/admin/keys/rotate", &officer, json!({}))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (403, "forbidden".into()),
        "the admin role is needed"
    );
    let r = admin
        .post_as(
            "/v1/admin/keys/rotate",
            &other_root,
            json!({"tenant": "acme"}),
        )
        .await;
    assert_eq!(r.status, 403, "another tenant's admin");
    assert_eq!(
        admin.get_as("/v1/admin/keys/rotate", &root).await.status,
        405
    );

    let r = admin
        .post_as("/v1/admin/archive/run", &root, json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.lines()[0].get("events_archived").is_some(), "{}", r.body);
    let r = admin
        .post_as("/v1/admin/archive/verify", &root, json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.lines()[0]["ok"], true, "{}", r.body);

    // A hold stops a shred; the hold's release lets it through; the export still worked.
    let r = admin
        .post_as(
            "/v1/compliance/holds",
            &officer,
            json!({"conv": "team", "reason": "case 7"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let hold = r.lines()[0]["id"].as_str().expect("hold id").to_string();
    let r = admin.get_as("/v1/compliance/holds", &officer).await;
    assert_eq!(r.lines().len(), 2, "{}", r.body);
    let r = admin
        .get_as("/v1/compliance/export?conv=team&text=quarterly", &officer)
        .await;
    assert_eq!(r.status, 200);
    assert!(
        r.headers["content-disposition"]
            .to_str()
            .expect("ascii")
            .starts_with("attachment"),
    );
    assert_eq!(r.lines().len(), 2, "one hit and the end line: {}", r.body);
    // CSV and Parquet: written whole on the server, then sent with their length.
    let r = admin
        .get_as(
            "/v1/compliance/export?conv=team&text=quarterly&format=csv",
            &officer,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.content_type, "text/csv; charset=utf-8");
    assert_eq!(r.headers["x-tidings-rows"], "1");
    assert_eq!(
        r.headers["content-length"],
        r.bytes.len().to_string().as_str()
    );
    assert_eq!(
        r.headers["content-disposition"],
        "attachment; filename=\"tidings-acme.csv\""
    );
    let rows: Vec<&str> = r.body.lines().collect();
    assert_eq!(rows.len(), 2, "a header and one row: {}", r.body);
    assert!(rows[0].starts_with("tenant,conversation,seq,event_id,sender,time,kind,text,"));
    assert!(
        rows[1].starts_with("acme,team,") && rows[1].contains(MARKER),
        "{}",
        r.body
    );
    let r = admin
        .get_as(
            "/v1/compliance/export?conv=team&text=quarterly&format=parquet",
            &officer,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.content_type, "application/vnd.apache.parquet");
    assert_eq!(r.headers["x-tidings-rows"], "1");
    assert_eq!(
        r.headers["content-length"],
        r.bytes.len().to_string().as_str()
    );
    {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let file = SerializedFileReader::new(hyper::body::Bytes::from(r.bytes.clone()))
            .expect("a whole Parquet file");
        let meta = file.metadata().file_metadata();
        assert_eq!(meta.num_rows(), 1);
        let columns: Vec<&str> = meta
            .schema_descr()
            .columns()
            .iter()
            .map(|c| c.name())
            .collect();
        assert!(
            columns.starts_with(&["tenant", "conversation", "seq"]) && columns.contains(&"text"),
            "{columns:?}"
        );
    }
    // An unknown format is refused and recorded; the spool keeps nothing.
    let r = admin
        .get_as("/v1/compliance/export?conv=team&format=xlsx", &officer)
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.code(), "invalid_request");
    assert!(r.body.contains("jsonl, csv and parquet"), "{}", r.body);
    let spool = s.data_dir().join("export-spool");
    assert_eq!(
        std::fs::read_dir(&spool)
            .unwrap_or_else(|e| panic!("{}: {e}", spool.display()))
            .count(),
        0,
        "the spool is empty once the downloads are sent"
    );
    let r = admin
        .post_as("/v1/admin/keys/shred", &root, json!({}))
        .await;
    assert_eq!(r.status, 400, "shredding without confirm: {}", r.body);
    let r = admin
        .post_as("/v1/admin/keys/shred", &root, json!({"confirm": "acme"}))
        .await;
    assert_eq!(r.status, 403, "held: {}", r.body);
    let r = admin
        .post_as(
            "/v1/compliance/holds/release",
            &officer,
            json!({"id": hold}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = admin
        .post_as("/v1/admin/keys/shred", &root, json!({"confirm": "acme"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.lines()[0]["shredded"], true);

    let audit = admin.get_as("/v1/compliance/audit", &officer).await;
    // Each download names its format as the destination, with the rows it held.
    for format in ["jsonl", "csv", "parquet"] {
        let destination = format!("http download ({format})");
        assert!(
            audit.lines().iter().any(|r| r["action"] == "export"
                && r["outcome"] == "completed"
                && r["destination"] == destination.as_str()
                && r["rows"] == 1),
            "no completed export to {destination}: {}",
            audit.body
        );
    }
    let actions: Vec<(String, String)> = trail(&audit.lines())
        .into_iter()
        .map(|(_, action, outcome)| (action, outcome))
        .collect();
    for expected in [
        ("rotate", "completed"),
        ("rotate", "denied"),
        ("archive_run", "completed"),
        ("archive_verify", "completed"),
        ("hold_create", "completed"),
        ("export", "completed"),
        ("export", "denied"),
        ("shred", "denied"),
        ("hold_release", "completed"),
        ("shred", "completed"),
    ] {
        assert!(
            actions.contains(&(expected.0.into(), expected.1.into())),
            "{expected:?} not in {actions:?}"
        );
    }
}
