//! The archive end to end through the `tidings` binary: a pass moves everything, reads stay
//! whole, no plaintext reaches a file, DuckDB reads the Hive partitions, and a crash at
//! every step of a pass converges to every event exactly once.

mod common;

use std::collections::HashSet;
use std::process::Command;

use common::{Sandbox, grep_dir, input_lines, stderr};
use serde_json::Value;

/// Fills `convs` conversations of tenant acme with `per` messages each.
fn fill(s: &Sandbox, convs: usize, per: usize) {
    for i in 0..convs {
        let conv = format!("c{i}");
        s.group(&conv);
        let out = s.run_with_input(
            &[
                "log", "append", "--tenant", "acme", "--conv", &conv, "--sender", "bob", "--stdin",
            ],
            input_lines(&format!("secret-{conv}-"), per).as_bytes(),
        );
        assert!(out.status.success(), "append: {}", stderr(&out));
    }
}

/// Every event of a conversation, paging 1000 at a time.
fn read_conv(s: &Sandbox, conv: &str) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let from = all.len() + 1;
        let page = s.ok(&[
            "log",
            "read",
            "--tenant",
            "acme",
            "--conv",
            conv,
            "--from",
            &from.to_string(),
            "--limit",
            "1000",
        ]);
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

/// Asserts each conversation reads back 1..=per+1 exactly once and in order, with the
/// texts written.
fn assert_complete(s: &Sandbox, convs: usize, per: usize) {
    for i in 0..convs {
        let conv = format!("c{i}");
        let events = read_conv(s, &conv);
        let seqs: Vec<u64> = events
            .iter()
            .map(|e| e["seq"].as_u64().expect("seq"))
            .collect();
        let want: Vec<u64> = (1..=per as u64 + 1).collect();
        assert_eq!(seqs, want, "conversation {conv}");
        for (j, e) in events.iter().skip(1).enumerate() {
            assert_eq!(e["text"], format!("message secret-{conv}-{j}"));
        }
    }
}

fn archive_run(s: &Sandbox, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["archive", "run", "--older-than", "0s"];
    args.extend_from_slice(extra);
    // Events appended in this very millisecond are not yet older than 0s.
    std::thread::sleep(std::time::Duration::from_millis(5));
    s.run(&args)
}

fn parquet_files(s: &Sandbox) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![s.data_dir().join("archive")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

fn inspect_rows(s: &Sandbox) -> u64 {
    s.ok(&["archive", "inspect"])
        .iter()
        .map(|seg| seg["rows"].as_u64().expect("rows"))
        .sum()
}

#[test]
fn archive_run_moves_everything_and_log_read_stays_whole() {
    let s = Sandbox::new();
    let (convs, per) = (20, 150);
    fill(&s, convs, per);
    let out = archive_run(&s, &[]);
    assert!(out.status.success(), "archive run: {}", stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).expect("summary JSON");
    let total = (convs * (per + 1)) as u64;
    assert_eq!(summary["events_archived"], total);
    assert_eq!(summary["conversations"], convs as u64);
    assert_eq!(summary["segments"], 1);
    assert!(summary["bytes"].as_u64().expect("bytes") > 0);

    assert_complete(&s, convs, per);
    assert_eq!(inspect_rows(&s), total);
    let verify = s.ok(&["archive", "verify"]);
    assert_eq!(verify[0]["ok"], true, "{verify:?}");
    assert_eq!(verify[0]["bodies_opened"], total);
    assert!(
        grep_dir(s.path(), b"message secret-c1").is_empty(),
        "message text on disk in plaintext"
    );

    // Nothing left to do; appends go on after the archived seqs.
    let again = archive_run(&s, &[]);
    let again: Value = serde_json::from_slice(&again.stdout).expect("summary JSON");
    assert_eq!(again["events_archived"], 0);
    let ack = s.ok(&[
        "log",
        "append",
        "--tenant",
        "acme",
        "--conv",
        "c0",
        "--sender",
        "bob",
        "--client-msg-id",
        "after",
        "--text",
        "after the archive",
    ]);
    assert_eq!(ack[0]["seq"], per as u64 + 2);
}

/// DuckDB reads the archive as data tools do: Hive partitions, plain metadata columns.
/// Skipped (with a line saying so) when the Python module is missing, unless
/// TIDINGS_REQUIRE_DUCKDB=1 (ops/test sets it).
#[test]
fn duckdb_reads_the_hive_partitions() {
    let probe = Command::new("python3")
        .args(["-c", "import duckdb"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var("TIDINGS_REQUIRE_DUCKDB").as_deref() != Ok("1"),
            "DuckDB is required (TIDINGS_REQUIRE_DUCKDB=1) but `python3 -c 'import duckdb'` failed"
        );
        eprintln!(
            "SKIPPED duckdb_reads_the_hive_partitions: python3 module duckdb not installed (ops/install-deps installs it)"
        );
        return;
    }
    let s = Sandbox::new();
    let (convs, per) = (7, 90);
    fill(&s, convs, per);
    let out = archive_run(&s, &[]);
    assert!(out.status.success(), "archive run: {}", stderr(&out));
    let script = r#"
import duckdb, json, sys
rel = "read_parquet('" + sys.argv[1] + "/**/*.parquet', hive_partitioning = true)"
rows = duckdb.sql(f"select count(*), count(distinct conversation), min(seq), max(seq), count(distinct date), any_value(tenant) from {rel}").fetchall()[0]
kinds = dict(duckdb.sql(f"select kind, count(*) from {rel} group by kind").fetchall())
per_conv = duckdb.sql(f"select conversation, count(*), max(seq) from {rel} where tenant = 'acme' group by conversation order by conversation").fetchall()
cols = [c[0] for c in duckdb.sql(f"describe select * from {rel}").fetchall()]
print(json.dumps({"count": rows[0], "convs": rows[1], "min_seq": rows[2], "max_seq": rows[3], "dates": rows[4], "tenant": rows[5], "kinds": kinds, "per_conv": per_conv, "columns": cols}))
"#;
    let archive = s.data_dir().join("archive");
    let out = Command::new("python3")
        .args(["-c", script, archive.to_str().expect("utf-8 path")])
        .output()
        .expect("python3");
    assert!(out.status.success(), "duckdb: {}", stderr(&out));
    let got: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(got["count"], (convs * (per + 1)) as u64);
    assert_eq!(got["convs"], convs as u64);
    assert_eq!(got["min_seq"], 1);
    assert_eq!(got["max_seq"], per as u64 + 1);
    assert_eq!(got["dates"], 1);
    assert_eq!(got["tenant"], "acme");
    assert_eq!(got["kinds"]["message_posted"], (convs * per) as u64);
    assert_eq!(got["kinds"]["conversation_created"], convs as u64);
    for row in got["per_conv"].as_array().expect("rows") {
        assert_eq!(row[1], per as u64 + 1);
        assert_eq!(row[2], per as u64 + 1);
    }
    let columns: Vec<&str> = got["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for c in [
        "tenant",
        "conversation",
        "seq",
        "event_id",
        "sender",
        "time",
        "kind",
        "key_id",
        "body_size",
        "body",
        "date",
    ] {
        assert!(columns.contains(&c), "column {c} missing from {columns:?}");
    }
}

/// Kill the archiver at every step of a pass (failpoints abort the process), then run it
/// again: every event is exactly once, hot or archived, the index verifies, and the
/// leftovers of the crash are swept.
#[test]
fn a_crash_at_every_step_converges_to_exactly_once() {
    let (convs, per) = (3, 120);
    for point in [
        "archive-before-upload",
        "archive-partial-upload",
        "archive-after-upload",
        "archive-after-verify",
        "archive-after-commit",
    ] {
        let s = Sandbox::new();
        fill(&s, convs, per);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let crashed = s
            .command(&["archive", "run", "--older-than", "0s"])
            .env("TIDINGS_FAILPOINT", point)
            .output()
            .expect("run");
        assert!(
            !crashed.status.success(),
            "{point}: the failpoint did not fire"
        );
        assert!(
            stderr(&crashed).contains(point),
            "{point}: {}",
            stderr(&crashed)
        );

        // Right after the crash, every event reads back exactly once from one tier.
        assert_complete(&s, convs, per);
        let committed = point == "archive-after-commit";
        let indexed = inspect_rows(&s);
        assert_eq!(
            indexed,
            if committed {
                (convs * (per + 1)) as u64
            } else {
                0
            },
            "{point}"
        );
        let files = parquet_files(&s);
        let uploaded = !matches!(point, "archive-before-upload");
        assert_eq!(files.len(), usize::from(uploaded), "{point}: {files:?}");
        let verify = s.run(&["archive", "verify"]);
        let report: Value = serde_json::from_slice(&verify.stdout).expect("verify JSON");
        assert_eq!(report["ok"], true, "{point}: {report}");
        let orphans = report["orphans"].as_array().expect("orphans").len();
        assert_eq!(
            orphans,
            usize::from(uploaded && !committed),
            "{point}: {report}"
        );

        // The re-run finishes the job and sweeps what the crash left.
        let out = archive_run(&s, &["--orphan-grace", "0s"]);
        assert!(out.status.success(), "{point}: re-run: {}", stderr(&out));
        let summary: Value = serde_json::from_slice(&out.stdout).expect("summary");
        let total = (convs * (per + 1)) as u64;
        assert_eq!(
            summary["events_archived"],
            if committed { 0 } else { total },
            "{point}"
        );
        assert_eq!(summary["orphans_removed"], orphans as u64, "{point}");
        assert_complete(&s, convs, per);
        assert_eq!(inspect_rows(&s), total, "{point}");
        assert_eq!(parquet_files(&s).len(), 1, "{point}");
        let verify = s.ok(&["archive", "verify"]);
        assert_eq!(verify[0]["ok"], true, "{point}: {:?}", verify[0]);
        assert_eq!(verify[0]["orphans"].as_array().map(Vec::len), Some(0));
        let seen: HashSet<String> = (0..convs)
            .flat_map(|i| read_conv(&s, &format!("c{i}")))
            .map(|e| e["event_id"].as_str().expect("id").to_string())
            .collect();
        assert_eq!(seen.len() as u64, total, "{point}: event ids are unique");
    }
}
