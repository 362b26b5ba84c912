//! The archive end to end through the `tidings` binary: a pass moves everything, reads stay
//! whole, no plaintext reaches a file, DuckDB, pyarrow, Polars and Spark read the Hive
//! partitions and count what the log wrote, and a crash at every step of a pass converges to
//! every event exactly once.

#![allow(clippy::disallowed_methods)] // tests wait on processes synchronously, off any runtime's workers

use std::collections::HashSet;
use std::process::Command;

use crate::common::{Sandbox, grep_dir, input_lines, stderr};
use serde_json::Value;

/// Fills `convs` conversations of tenant acme with `per` messages each.
fn fill(s: &Sandbox, convs: usize, per: usize) {
    for i in 0..convs {
        append_in(s, "acme", &format!("c{i}"), per);
    }
}

/// Creates group `conv` in `tenant` and appends `per` messages to it, texts
/// `message secret-<conv>-<i>`.
fn append_in(s: &Sandbox, tenant: &str, conv: &str, per: usize) {
    s.group_in(tenant, conv);
    let out = s.run_with_input(
        &[
            "log", "append", "--tenant", tenant, "--conv", conv, "--sender", "bob", "--stdin",
        ],
        input_lines(&format!("secret-{conv}-"), per).as_bytes(),
    );
    assert!(out.status.success(), "append: {}", stderr(&out));
}

/// Every event of an acme conversation, paging 1000 at a time.
fn read_conv(s: &Sandbox, conv: &str) -> Vec<Value> {
    read_conv_in(s, "acme", conv)
}

/// Every event of a conversation of `tenant`, paging 1000 at a time.
fn read_conv_in(s: &Sandbox, tenant: &str, conv: &str) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let from = all.len() + 1;
        let page = s.ok(&[
            "log",
            "read",
            "--tenant",
            tenant,
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

/// The archive the data-tool tests read: two tenants (two Hive partitions), conversations
/// of different lengths so that per-conversation counts tell them apart.
const DATA_TOOL_ARCHIVE: [(&str, &[usize]); 2] =
    [("acme", &[30, 45, 60, 75]), ("globex", &[20, 25])];

/// What no sealed body may hold: the start of every message text written.
const PLAINTEXT: &str = "message secret-";

/// Fills [`DATA_TOOL_ARCHIVE`], archives all of it, and returns the summary every data tool
/// must reproduce, computed from what the log itself reads back (`tidings log read`): per
/// tenant, rows, conversations, seq range, dates (UTC) and time range; per conversation,
/// rows and seq range; rows per kind.
fn archive_for_data_tools(s: &Sandbox) -> Value {
    let mut tenants = serde_json::Map::new();
    let mut conversations = Vec::new();
    let mut kinds = serde_json::Map::new();
    for (tenant, lengths) in DATA_TOOL_ARCHIVE {
        for (i, per) in lengths.iter().enumerate() {
            append_in(s, tenant, &format!("c{i}"), *per);
        }
    }
    let out = archive_run(s, &[]);
    assert!(out.status.success(), "archive run: {}", stderr(&out));
    for (tenant, lengths) in DATA_TOOL_ARCHIVE {
        let mut events = Vec::new();
        for i in 0..lengths.len() {
            let conv = format!("c{i}");
            let read = read_conv_in(s, tenant, &conv);
            let seqs: Vec<u64> = read.iter().filter_map(|e| e["seq"].as_u64()).collect();
            conversations.push(serde_json::json!([
                tenant,
                conv,
                read.len(),
                seqs.iter().min(),
                seqs.iter().max()
            ]));
            events.extend(read);
        }
        let seqs = events.iter().filter_map(|e| e["seq"].as_u64());
        let times = events.iter().filter_map(|e| e["time_ms"].as_i64());
        let dates: std::collections::BTreeSet<&str> = events
            .iter()
            .filter_map(|e| e["time"].as_str()?.get(..10))
            .collect();
        for e in &events {
            let kind = e["kind"].as_str().expect("kind");
            let n = kinds.get(kind).and_then(Value::as_u64).unwrap_or(0);
            kinds.insert(kind.to_string(), (n + 1).into());
        }
        tenants.insert(
            tenant.to_string(),
            serde_json::json!({
                "rows": events.len(),
                "conversations": lengths.len(),
                "min_seq": seqs.clone().min(),
                "max_seq": seqs.max(),
                "dates": dates,
                "min_time_ms": times.clone().min(),
                "max_time_ms": times.max(),
            }),
        );
    }
    conversations.sort_by_key(|c| (c[0].to_string(), c[1].to_string()));
    serde_json::json!({"tenants": tenants, "conversations": conversations, "kinds": kinds})
}

/// A data tool reads the archive root (Hive partitions) with its script in
/// tests/data_tools/, which prints the summary [`archive_for_data_tools`] computes from the
/// log; every figure must match. The README's claim is checked too: the metadata columns are
/// plain strings, integers and a timestamp, the sealed body is binary and no body holds the
/// plaintext. Skipped (with a line saying what is missing) when a probe in `needs` fails,
/// unless `require_var`=1.
fn data_tool_reads_the_archive(
    test: &str,
    script: &str,
    needs: &[(&[&str], &str)],
    require_var: &str,
) {
    for (probe, why) in needs {
        let found = Command::new(probe[0])
            .args(&probe[1..])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            assert!(
                std::env::var(require_var).as_deref() != Ok("1"),
                "{test}: required ({require_var}=1) but {why}"
            );
            eprintln!("SKIPPED {test}: {why} (ops/install-test-deps installs it)");
            return;
        }
    }
    let s = Sandbox::new();
    let want = archive_for_data_tools(&s);
    let script =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data_tools/").to_string() + script;
    let archive = s.data_dir().join("archive");
    let started = std::time::Instant::now();
    let out = Command::new("python3")
        .arg(&script)
        .arg(&archive)
        .arg(PLAINTEXT)
        .current_dir(s.path())
        .output()
        .expect("python3");
    assert!(out.status.success(), "{test}: {script}: {}", stderr(&out));
    let got: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{test}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    let tool = got["tool"].as_str().unwrap_or("?");
    eprintln!("{test}: {tool} read the archive in {:?}", started.elapsed());

    assert_eq!(got["tenants"], want["tenants"], "{tool}: per tenant");
    assert_eq!(
        got["conversations"], want["conversations"],
        "{tool}: per conversation"
    );
    assert_eq!(got["kinds"], want["kinds"], "{tool}: per kind");

    let columns = got["columns"].as_object().expect("columns");
    let is = |c: &str| columns.get(c).map(|t| t["is"].as_str().unwrap_or("?"));
    for (column, want_is) in [
        ("tenant", "string"),
        ("conversation", "string"),
        ("seq", "int"),
        ("event_id", "string"),
        ("sender", "string"),
        ("time", "timestamp"),
        ("kind", "string"),
        ("key_id", "int"),
        ("body_size", "int"),
        ("body", "binary"),
        ("client_msg_id", "string"),
    ] {
        assert_eq!(
            is(column),
            Some(want_is),
            "{tool}: column {column} in {columns:?}"
        );
    }
    // The partition column: a string or (type inference) a date, depending on the tool.
    assert!(
        matches!(is("date"), Some("string" | "date")),
        "{tool}: date in {columns:?}"
    );
    assert_eq!(columns.len(), 12, "{tool}: no other columns: {columns:?}");
    let rows: u64 = DATA_TOOL_ARCHIVE
        .iter()
        .map(|(_, lengths)| lengths.iter().map(|n| *n as u64 + 1).sum::<u64>())
        .sum();
    assert_eq!(
        got["bodies_as_bytes"], rows,
        "{tool}: every body comes back as bytes"
    );
    assert_eq!(
        got["bodies_with_plaintext"], 0,
        "{tool}: a body holds {PLAINTEXT:?}"
    );
}

#[test]
fn duckdb_reads_the_hive_partitions() {
    data_tool_reads_the_archive(
        "duckdb_reads_the_hive_partitions",
        "duckdb_read.py",
        &[(
            &["python3", "-c", "import duckdb"],
            "python3 module duckdb not installed",
        )],
        "TIDINGS_REQUIRE_DUCKDB",
    );
}

#[test]
fn pyarrow_dataset_reads_the_hive_partitions() {
    data_tool_reads_the_archive(
        "pyarrow_dataset_reads_the_hive_partitions",
        "pyarrow_read.py",
        &[(
            &["python3", "-c", "import pyarrow.dataset"],
            "python3 module pyarrow not installed",
        )],
        "TIDINGS_REQUIRE_DATATOOLS",
    );
}

#[test]
fn polars_scan_parquet_reads_the_hive_partitions() {
    data_tool_reads_the_archive(
        "polars_scan_parquet_reads_the_hive_partitions",
        "polars_read.py",
        &[(
            &["python3", "-c", "import polars"],
            "python3 module polars not installed",
        )],
        "TIDINGS_REQUIRE_DATATOOLS",
    );
}

#[test]
fn spark_reads_the_hive_partitions() {
    data_tool_reads_the_archive(
        "spark_reads_the_hive_partitions",
        "spark_read.py",
        &[
            (
                &["python3", "-c", "import pyspark"],
                "python3 module pyspark not installed",
            ),
            (&["java", "-version"], "no java runtime (Spark runs on one)"),
        ],
        "TIDINGS_REQUIRE_DATATOOLS",
    );
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
