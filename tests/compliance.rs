//! Compliance as a compliance officer drives it: search and export across the hot log and
//! the archive, the audit log of every access, legal holds against retention, bad input.

#![allow(clippy::disallowed_methods)] // tests wait on processes synchronously, off any runtime's workers

use std::process::{Command, Output};

use crate::common::{Sandbox, error_line, json_lines, stderr};
use serde_json::Value;

fn post(s: &Sandbox, conv: &str, sender: &str, id: &str, text: &str) -> u64 {
    let ack = s.ok(&[
        "log",
        "append",
        "--tenant",
        "acme",
        "--conv",
        conv,
        "--sender",
        sender,
        "--client-msg-id",
        id,
        "--text",
        text,
    ]);
    ack[0]["seq"].as_u64().expect("seq")
}

fn archive_all(s: &Sandbox, env: &[(&str, &str)]) -> Value {
    let out = s
        .command(&["archive", "run", "--older-than", "0s"])
        .envs(env.iter().copied())
        .output()
        .expect("run");
    assert!(out.status.success(), "archive run: {}", stderr(&out));
    json_lines(&out.stdout).remove(0)
}

fn search(s: &Sandbox, extra: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "compliance",
        "search",
        "--tenant",
        "acme",
        "--actor",
        "officer-7",
    ];
    args.extend_from_slice(extra);
    s.ok(&args)
}

fn audit(s: &Sandbox, tenant: &str) -> Vec<Value> {
    s.ok(&["compliance", "audit", "--tenant", tenant])
}

/// (action, outcome, rows) of each audit record.
fn trail(records: &[Value]) -> Vec<(String, String, u64)> {
    records
        .iter()
        .map(|r| {
            (
                r["action"].as_str().expect("action").to_string(),
                r["outcome"].as_str().expect("outcome").to_string(),
                r["rows"].as_u64().expect("rows"),
            )
        })
        .collect()
}

fn t(action: &str, outcome: &str, rows: u64) -> (String, String, u64) {
    (action.into(), outcome.into(), rows)
}

#[test]
fn a_marker_is_found_hot_and_archived_and_every_search_is_audited() {
    let s = Sandbox::new();
    s.group("general");
    s.group("random");
    let first = post(&s, "general", "bob", "m1", "Project BLUEBIRD starts monday");
    post(&s, "general", "alice", "m2", "sounds good");
    post(&s, "random", "alice", "m3", "lunch?");

    let hot = search(&s, &["--text", "bluebird"]);
    assert_eq!(hot.len(), 1, "{hot:?}");
    assert_eq!(
        (
            &hot[0]["conversation"],
            &hot[0]["seq"],
            &hot[0]["sender"],
            &hot[0]["text"],
            &hot[0]["tier"],
            &hot[0]["matched"]
        ),
        (
            &Value::from("general"),
            &Value::from(first),
            &Value::from("bob"),
            &Value::from("Project BLUEBIRD starts monday"),
            &Value::from("hot"),
            &Value::from("original")
        )
    );

    let summary = archive_all(&s, &[]);
    assert_eq!(summary["events_archived"], 5, "{summary}");
    // A new key after archiving: the archived marker opens with key 1, the new one with 2.
    s.ok(&["keys", "rotate", "--tenant", "acme"]);
    let second = post(&s, "random", "bob", "m4", "bluebird budget is approved");

    let both = search(&s, &["--text", "BlueBird"]);
    let found: Vec<_> = both
        .iter()
        .map(|h| {
            (
                h["conversation"].as_str().expect("present"),
                h["seq"].as_u64().expect("present"),
                h["tier"].as_str().expect("present"),
            )
        })
        .collect();
    assert_eq!(
        found,
        [("general", first, "archive"), ("random", second, "hot")]
    );

    // Filters narrow it down.
    assert_eq!(
        search(&s, &["--text", "bluebird", "--sender", "alice"]).len(),
        0
    );
    let in_random = search(&s, &["--text", "bluebird", "--conv", "random"]);
    assert_eq!(in_random.len(), 1);
    assert_eq!(in_random[0]["seq"], second);
    let everything = search(&s, &[]);
    assert_eq!(
        everything.len(),
        6,
        "2 creations + 4 messages: {everything:?}"
    );

    let records = audit(&s, "acme");
    assert_eq!(
        trail(&records),
        [
            t("search", "started", 0),
            t("search", "completed", 1),
            t("rotate", "completed", 0),
            t("search", "started", 0),
            t("search", "completed", 2),
            t("search", "started", 0),
            t("search", "completed", 0),
            t("search", "started", 0),
            t("search", "completed", 1),
            t("search", "started", 0),
            t("search", "completed", 6),
        ]
    );
    assert!(records.iter().all(|r| r["via"] == "cli"));
    assert_eq!(records[2]["actor"], "operator");
    assert_eq!(records[2]["detail"], "new data key 2");
    assert!(
        records
            .iter()
            .filter(|r| r["action"] == "search")
            .all(|r| r["actor"] == "officer-7")
    );
    assert_eq!(records[3]["filters"]["text"], "BlueBird");
    assert_eq!(records[5]["filters"]["sender"], "alice");
    assert_eq!(records[0]["access_id"], records[1]["access_id"]);
    assert_ne!(records[0]["access_id"], records[3]["access_id"]);
    let seqs: Vec<u64> = records
        .iter()
        .map(|r| r["seq"].as_u64().expect("present"))
        .collect();
    assert_eq!(seqs, (1..=11).collect::<Vec<_>>());
}

#[test]
fn edits_and_recalls_travel_with_the_message_they_change() {
    let s = Sandbox::new();
    s.group("general");
    let draft = post(&s, "general", "bob", "m1", "draft numbers");
    let ack = s.ok(&[
        "log",
        "append",
        "--tenant",
        "acme",
        "--conv",
        "general",
        "--sender",
        "bob",
        "--client-msg-id",
        "m2",
        "--edit",
        &draft.to_string(),
        "--text",
        "final numbers: SEVEN",
    ]);
    let edit = ack[0]["seq"].as_u64().expect("present");
    let gone = post(&s, "general", "bob", "m3", "oops, wrong chat");
    let ack = s.ok(&[
        "log",
        "append",
        "--tenant",
        "acme",
        "--conv",
        "general",
        "--sender",
        "bob",
        "--client-msg-id",
        "m4",
        "--recall",
        &gone.to_string(),
    ]);
    let recall = ack[0]["seq"].as_u64().expect("present");
    archive_all(&s, &[]);

    // Found through the edit's text; the original text comes with it.
    let hits = search(&s, &["--text", "seven"]);
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0]["seq"], draft);
    assert_eq!(hits[0]["text"], "draft numbers");
    assert_eq!(hits[0]["matched"], "edit");
    assert_eq!(hits[0]["edits"][0]["seq"], edit);
    assert_eq!(hits[0]["edits"][0]["text"], "final numbers: SEVEN");
    assert_eq!(hits[0]["recalled"], Value::Null);

    // A recalled message is still found, with its recall.
    let hits = search(&s, &["--text", "wrong chat"]);
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0]["seq"], gone);
    assert_eq!(hits[0]["recalled"]["seq"], recall);
    assert_eq!(hits[0]["recalled"]["by"], "bob");
}

fn export(s: &Sandbox, format: &str, out: &str) -> Output {
    s.run(&[
        "compliance",
        "export",
        "--tenant",
        "acme",
        "--actor",
        "officer-7",
        "--text",
        "bluebird",
        "--format",
        format,
        "--out",
        out,
    ])
}

fn duckdb_required() -> bool {
    let probe = Command::new("python3")
        .args(["-c", "import duckdb"])
        .output();
    if probe.is_ok_and(|o| o.status.success()) {
        return true;
    }
    assert!(
        std::env::var("TIDINGS_REQUIRE_DUCKDB").as_deref() != Ok("1"),
        "DuckDB is required (TIDINGS_REQUIRE_DUCKDB=1) but `python3 -c 'import duckdb'` failed"
    );
    eprintln!(
        "SKIPPED the DuckDB check of the Parquet export: python3 module duckdb not installed"
    );
    false
}

#[test]
fn exports_in_each_format_are_whole_decrypted_and_audited() {
    let s = Sandbox::new();
    s.group("general");
    let old = post(
        &s,
        "general",
        "bob",
        "m1",
        "bluebird, \"quoted\", with a comma",
    );
    post(&s, "general", "alice", "m2", "unrelated");
    archive_all(&s, &[]);
    let new = post(&s, "general", "alice", "m3", "Bluebird\nsecond line");
    let lines = search(&s, &["--text", "bluebird"]);
    assert_eq!(lines.len(), 2);

    let out = export(&s, "jsonl", "hits.jsonl");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json_lines(&out.stdout)[0]["exported"], 2);
    let exported = json_lines(&std::fs::read(s.path().join("hits.jsonl")).expect("present"));
    assert_eq!(exported, lines);

    let out = export(&s, "csv", "hits.csv");
    assert!(out.status.success(), "{}", stderr(&out));
    let csv = std::fs::read_to_string(s.path().join("hits.csv")).expect("present");
    assert!(
        csv.starts_with("tenant,conversation,seq,event_id,sender,time,kind,text,"),
        "{csv}"
    );
    assert!(
        csv.contains("\"bluebird, \"\"quoted\"\", with a comma\""),
        "{csv}"
    );
    assert!(csv.contains("\"Bluebird\nsecond line\""), "{csv}");

    let out = export(&s, "parquet", "hits.parquet");
    assert!(out.status.success(), "{}", stderr(&out));
    if duckdb_required() {
        let script = "import duckdb, json, sys\n\
            rows = duckdb.sql(\"select seq, sender, text, tier from read_parquet('\" + sys.argv[1] + \"') order by seq\").fetchall()\n\
            print(json.dumps(rows))";
        let out = Command::new("python3")
            .args([
                "-c",
                script,
                s.path().join("hits.parquet").to_str().expect("present"),
            ])
            .output()
            .expect("python3");
        assert!(out.status.success(), "duckdb: {}", stderr(&out));
        let rows: Value = serde_json::from_slice(&out.stdout).expect("present");
        assert_eq!(
            rows,
            serde_json::json!([
                [old, "bob", "bluebird, \"quoted\", with a comma", "archive"],
                [new, "alice", "Bluebird\nsecond line", "hot"]
            ])
        );
    }

    // An existing file is never overwritten; a path that cannot be created is refused.
    let before = std::fs::read(s.path().join("hits.csv")).expect("present");
    let out = export(&s, "csv", "hits.csv");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("hits.csv"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(s.path().join("hits.csv")).expect("present"),
        before
    );
    let out = export(&s, "jsonl", "no-such-dir/hits.jsonl");
    assert!(!out.status.success());
    assert!(!s.path().join("no-such-dir").exists());
    let names: Vec<String> = std::fs::read_dir(s.path())
        .expect("present")
        .map(|e| {
            e.expect("present")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.contains("hits"))
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(
        names,
        ["hits.csv", "hits.jsonl", "hits.parquet"],
        "no partial files"
    );

    let records = audit(&s, "acme");
    let exports: Vec<_> = records.iter().filter(|r| r["action"] == "export").collect();
    assert_eq!(
        trail(&exports.iter().map(|r| (*r).clone()).collect::<Vec<_>>()),
        [
            t("export", "started", 0),
            t("export", "completed", 2),
            t("export", "started", 0),
            t("export", "completed", 2),
            t("export", "started", 0),
            t("export", "completed", 2),
            t("export", "denied", 0),
            t("export", "denied", 0),
        ]
    );
    assert!(
        exports[1]["destination"]
            .as_str()
            .expect("present")
            .contains("hits.jsonl")
    );
    assert!(
        exports[5]["destination"]
            .as_str()
            .expect("present")
            .contains("parquet")
    );
}

fn hold(s: &Sandbox, args: &[&str]) -> Value {
    let mut all = vec![
        "compliance",
        "hold",
        "create",
        "--tenant",
        "acme",
        "--actor",
        "counsel",
        "--reason",
        "Matter 42",
    ];
    all.extend_from_slice(args);
    s.ok(&all).remove(0)
}

/// One archive pass with a retention of `retention` (e.g. "1s").
fn retention_pass(s: &Sandbox, retention: &str) -> Value {
    let out = s
        .command(&["archive", "run"])
        .env("TIDINGS_ARCHIVE_RETENTION", retention)
        .output()
        .expect("run");
    assert!(out.status.success(), "archive run: {}", stderr(&out));
    json_lines(&out.stdout).remove(0)
}

#[test]
fn retention_deletes_what_aged_out_except_what_a_hold_covers() {
    let s = Sandbox::new();
    for conv in ["general", "random", "project", "lunch"] {
        s.group(conv);
    }
    s.ok(&[
        "conv",
        "add-member",
        "--tenant",
        "acme",
        "--conv",
        "project",
        "--by",
        "alice",
        "--user",
        "dave",
    ]);
    for (conv, n) in [("general", 3), ("random", 4), ("project", 2), ("lunch", 2)] {
        for i in 0..n {
            post(
                &s,
                conv,
                "bob",
                &format!("{conv}{i}"),
                &format!("{conv} message {i}"),
            );
        }
    }
    // Dave left project; a hold on dave still covers it.
    s.ok(&[
        "conv",
        "remove-member",
        "--tenant",
        "acme",
        "--conv",
        "project",
        "--by",
        "alice",
        "--user",
        "dave",
    ]);
    let conv_hold = hold(&s, &["--conv", "general"]);
    hold(&s, &["--user", "dave"]);
    assert_eq!(
        s.ok(&["compliance", "hold", "list", "--tenant", "acme"])
            .len(),
        2
    );
    let before: Vec<usize> = ["general", "project"]
        .iter()
        .map(|c| s.read_all(c).len())
        .collect();
    // A 3 s retention: old enough after the sleep, and a message posted just before the
    // second pass below stays young even on a slow machine.
    std::thread::sleep(std::time::Duration::from_millis(3200));

    let summary = retention_pass(&s, "3s");
    // random: creation + 4; lunch: creation + 2.
    assert_eq!(summary["events_purged"], 5 + 3, "{summary}");
    assert!(s.read_all("random").is_empty());
    assert!(s.read_all("lunch").is_empty());
    let after: Vec<usize> = ["general", "project"]
        .iter()
        .map(|c| s.read_all(c).len())
        .collect();
    assert_eq!(after, before, "held conversations are whole");
    let verify = s.ok(&["archive", "verify"]);
    assert_eq!(verify[0]["ok"], true, "{verify:?}");
    // Deleted history is gone for compliance too; held history is still searchable.
    assert_eq!(search(&s, &["--text", "random message"]).len(), 0);
    assert_eq!(search(&s, &["--text", "general message"]).len(), 3);

    // The conversation lives on above its deleted history.
    let next = post(&s, "random", "bob", "random-new", "after retention");
    assert_eq!(next, 6);
    let read = s.read_all("random");
    assert_eq!(read.len(), 1);
    assert_eq!(read[0]["seq"], 6);

    // Released, the conversation's aged events go on the next pass.
    s.ok(&[
        "compliance",
        "hold",
        "release",
        "--tenant",
        "acme",
        "--actor",
        "counsel",
        "--id",
        conv_hold["id"].as_str().expect("present"),
    ]);
    let summary = retention_pass(&s, "3s");
    assert_eq!(
        summary["events_purged"], 4,
        "general has 4; random's new message is young: {summary}"
    );
    assert!(s.read_all("general").is_empty());
    assert_eq!(s.read_all("random").len(), 1);
    assert_eq!(s.read_all("project").len(), before[1]);

    let records = audit(&s, "acme");
    let retention: Vec<_> = records
        .iter()
        .filter(|r| r["action"] == "retention")
        .cloned()
        .collect();
    assert_eq!(
        trail(&retention),
        [
            t("retention", "completed", 8),
            t("retention", "refused", before[0] as u64 + before[1] as u64),
            t("retention", "completed", 4),
            t("retention", "refused", before[1] as u64),
        ]
    );
    assert!(
        retention
            .iter()
            .all(|r| r["actor"] == "archiver" && r["via"] == "archiver")
    );
    let holds: Vec<_> = records
        .iter()
        .filter(|r| r["action"].as_str().expect("present").starts_with("hold_"))
        .collect();
    assert_eq!(
        holds.len(),
        4,
        "two creates, a release started and completed"
    );
}

#[test]
fn malformed_requests_are_refused_clearly_and_audited() {
    let s = Sandbox::new();
    s.group("general");
    for (args, expect) in [
        (vec!["--from", "yesterday"], "--from"),
        (
            vec!["--from", "2026-11-29", "--to", "2026-11-28"],
            "time range is empty",
        ),
        (vec!["--text", ""], "text filter"),
    ] {
        let mut all = vec![
            "compliance",
            "search",
            "--tenant",
            "acme",
            "--actor",
            "officer-7",
        ];
        all.extend_from_slice(&args);
        let out = s.run(&all);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "nothing printed for {args:?}");
    }
    let denied: Vec<_> = audit(&s, "acme");
    assert_eq!(
        trail(&denied),
        [
            t("search", "denied", 0),
            t("search", "denied", 0),
            t("search", "denied", 0)
        ]
    );
    assert!(
        denied[0]["detail"]
            .as_str()
            .expect("present")
            .contains("yesterday")
    );

    // Not even an audit record without a valid tenant id or actor: nothing ran.
    let out = s.run(&["compliance", "search", "--tenant", "ac me", "--actor", "x"]);
    assert!(!out.status.success());
    let out = s.run(&[
        "compliance",
        "search",
        "--tenant",
        "acme",
        "--actor",
        "bad\u{7}actor",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("actor"), "{}", stderr(&out));
    assert_eq!(audit(&s, "acme").len(), 3);

    // A hold needs a reason and a real range; releasing an unknown hold says so.
    let out = s.run(&[
        "compliance",
        "hold",
        "create",
        "--tenant",
        "acme",
        "--actor",
        "c",
        "--reason",
        "",
    ]);
    assert!(!out.status.success());
    let out = s.run(&[
        "compliance",
        "hold",
        "release",
        "--tenant",
        "acme",
        "--actor",
        "c",
        "--id",
        "nope",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no such legal hold"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn one_tenants_search_never_returns_or_records_anothers_data() {
    let s = Sandbox::new();
    s.group("general");
    post(&s, "general", "bob", "m1", "acme's BLUEBIRD");
    s.ok(&[
        "conv",
        "create",
        "--tenant",
        "globex",
        "--conv",
        "general",
        "--kind",
        "group",
        "--by",
        "hank",
        "--members",
        "mona",
    ]);
    s.ok(&[
        "log",
        "append",
        "--tenant",
        "globex",
        "--conv",
        "general",
        "--sender",
        "hank",
        "--client-msg-id",
        "g1",
        "--text",
        "globex's BLUEBIRD",
    ]);
    archive_all(&s, &[]);
    let hits = search(&s, &["--text", "bluebird"]);
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0]["tenant"], "acme");
    assert_eq!(audit(&s, "acme").len(), 2);
    assert!(audit(&s, "globex").is_empty());
}

/// Retention rewrites a segment through the archiver's write path; killed at each step of
/// it, a re-run converges: held rows all there, expired ones gone, no orphan, verify clean.
#[test]
fn retention_killed_at_every_step_of_a_rewrite_converges() {
    for failpoint in [
        "archive-before-upload",
        "archive-after-upload",
        "archive-after-verify",
        "archive-after-commit",
    ] {
        let s = Sandbox::new();
        s.group("general");
        s.group("random");
        for i in 0..5 {
            post(
                &s,
                "general",
                "bob",
                &format!("g{i}"),
                &format!("general {i}"),
            );
            post(
                &s,
                "random",
                "bob",
                &format!("r{i}"),
                &format!("random {i}"),
            );
        }
        hold(&s, &["--conv", "general"]);
        archive_all(&s, &[]);
        std::thread::sleep(std::time::Duration::from_millis(1200));

        let out = s
            .command(&["archive", "run"])
            .env("TIDINGS_ARCHIVE_RETENTION", "1s")
            .env("TIDINGS_FAILPOINT", failpoint)
            .output()
            .expect("run");
        assert!(!out.status.success(), "{failpoint}: the pass was to abort");
        assert!(stderr(&out).contains(failpoint), "{}", stderr(&out));

        let out = s
            .command(&["archive", "run", "--orphan-grace", "0s"])
            .env("TIDINGS_ARCHIVE_RETENTION", "1s")
            .output()
            .expect("run");
        assert!(out.status.success(), "{failpoint}: {}", stderr(&out));
        let general: Vec<u64> = s
            .read_all("general")
            .iter()
            .map(|e| e["seq"].as_u64().expect("seq"))
            .collect();
        assert_eq!(general, (1..=6).collect::<Vec<_>>(), "{failpoint}");
        assert!(s.read_all("random").is_empty(), "{failpoint}");
        let verify = s.ok(&["archive", "verify"]);
        assert_eq!(verify[0]["ok"], true, "{failpoint}: {verify:?}");
        assert_eq!(verify[0]["orphans"], serde_json::json!([]), "{failpoint}");
        assert_eq!(verify[0]["rows"], 6, "{failpoint}");
    }
}

/// The code of the JSON error line a failed command prints on stderr.
fn error_code(out: &Output) -> String {
    error_line(out)["error"]["code"]
        .as_str()
        .expect("code")
        .to_string()
}

#[test]
fn a_hold_blocks_shredding_and_a_shredded_tenant_opens_nowhere_while_others_do() {
    let s = Sandbox::new();
    for tenant in ["acme", "globex"] {
        s.group_in(tenant, "general");
        s.ok(&[
            "log",
            "append",
            "--tenant",
            tenant,
            "--conv",
            "general",
            "--sender",
            "bob",
            "--client-msg-id",
            "m1",
            "--text",
            "archived BLUEBIRD",
        ]);
    }
    archive_all(&s, &[]);
    for tenant in ["acme", "globex"] {
        s.ok(&[
            "log",
            "append",
            "--tenant",
            tenant,
            "--conv",
            "general",
            "--sender",
            "bob",
            "--client-msg-id",
            "m2",
            "--text",
            "hot BLUEBIRD",
        ]);
    }
    let shred = [
        "keys",
        "shred",
        "--tenant",
        "acme",
        "--confirm",
        "acme",
        "--actor",
        "dpo",
    ];

    // Under a hold: refused, recorded, nothing destroyed.
    let held = hold(&s, &[]);
    let out = s.run(&shred);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(error_code(&out), "held");
    assert!(
        stderr(&out).contains(held["id"].as_str().expect("id")),
        "{}",
        stderr(&out)
    );
    assert_eq!(search(&s, &["--text", "bluebird"]).len(), 2);

    s.ok(&[
        "compliance",
        "hold",
        "release",
        "--tenant",
        "acme",
        "--actor",
        "counsel",
        "--id",
        held["id"].as_str().expect("id"),
    ]);
    let report = s.ok(&shred);
    assert_eq!(report[0]["key_ids"], serde_json::json!([1]));

    // Nothing of acme opens: the log, search, export, the archive check.
    for args in [
        vec!["log", "read", "--tenant", "acme", "--conv", "general"],
        vec![
            "compliance",
            "search",
            "--tenant",
            "acme",
            "--actor",
            "officer-7",
            "--text",
            "bluebird",
        ],
        vec![
            "compliance",
            "export",
            "--tenant",
            "acme",
            "--actor",
            "officer-7",
            "--format",
            "jsonl",
            "--out",
            "acme.jsonl",
        ],
    ] {
        let out = s.run(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            error_code(&out),
            "tenant_shredded",
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(out.stdout.is_empty(), "{args:?} printed something");
    }
    assert!(!s.path().join("acme.jsonl").exists(), "no partial export");
    let verify = s.run(&["archive", "verify", "--tenant", "acme"]);
    assert!(!verify.status.success());

    // globex is untouched, hot and archived.
    let hits = s.ok(&[
        "compliance",
        "search",
        "--tenant",
        "globex",
        "--actor",
        "officer-7",
        "--text",
        "bluebird",
    ]);
    let tiers: Vec<&str> = hits
        .iter()
        .map(|h| h["tier"].as_str().expect("tier"))
        .collect();
    assert_eq!(tiers, ["archive", "hot"]);
    assert_eq!(
        s.ok(&["archive", "verify", "--tenant", "globex"])[0]["ok"],
        true
    );

    // The audit log survives the shred and tells the story.
    let records = audit(&s, "acme");
    let story: Vec<_> = trail(&records)
        .into_iter()
        .filter(|(action, ..)| action != "search")
        .collect();
    assert_eq!(
        story,
        [
            t("hold_create", "completed", 0),
            t("shred", "refused", 0),
            t("hold_release", "started", 0),
            t("hold_release", "completed", 0),
            t("shred", "started", 0),
            t("shred", "completed", 0),
            t("export", "started", 0),
            t("export", "failed", 0),
        ]
    );
    let last_search = records
        .iter()
        .rev()
        .find(|r| r["action"] == "search")
        .expect("search");
    assert_eq!(last_search["outcome"], "failed");
    assert!(
        last_search["detail"]
            .as_str()
            .expect("detail")
            .starts_with("tenant_shredded")
    );
}

#[test]
fn a_hold_keeps_only_its_time_range() {
    let s = Sandbox::new();
    s.group("general");
    s.group("random");
    for i in 0..3 {
        post(&s, "general", "bob", &format!("g{i}"), "general");
        post(&s, "random", "bob", &format!("r{i}"), "random");
    }
    // A hold on general that ended in 2020 and one on random from 2020 on.
    hold(
        &s,
        &[
            "--conv",
            "general",
            "--from",
            "2020-01-01",
            "--to",
            "2020-02-01",
        ],
    );
    hold(&s, &["--conv", "random", "--from", "2020-01-01"]);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let summary = retention_pass(&s, "1s");
    assert_eq!(summary["events_purged"], 4, "{summary}");
    assert_eq!(summary["events_held"], 4, "{summary}");
    assert!(s.read_all("general").is_empty());
    assert_eq!(s.read_all("random").len(), 4);
    let holds = s.ok(&["compliance", "hold", "list", "--tenant", "acme"]);
    assert_eq!(holds[0]["from"], "2020-01-01T00:00:00.000Z");
    assert_eq!(holds[0]["to"], "2020-02-01T00:00:00.000Z");
    assert_eq!(holds[1]["to"], Value::Null);
}
