//! Crash safety: `tidings log append --stdin` killed with SIGKILL at random moments.
//!
//! Each round feeds a conversation a fixed input, kills the appender one to three times at
//! random moments, then replays the whole input to completion. It proves, for every round:
//! every ack printed before a kill names the event that is there now (same seq, same id);
//! seqs are exactly 1..=head; every input line is in the log exactly once, in input order.
//! All rounds share one data directory, so the store also recovers from crash after crash.
//!
//! The seed is printed; `TIDINGS_CRASH_SEED=N` replays a run.

#![allow(clippy::disallowed_methods)] // tests wait on processes synchronously, off any runtime's workers

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{Sandbox, input_lines, json_lines, stderr};

/// When to send SIGKILL.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// After this long (catches start-up and store recovery).
    After(Duration),
    /// Right after the appender has printed this many acks (mid-stream, with appends in
    /// flight behind it).
    AtAck(usize),
    /// Never: run to completion.
    Never,
}

/// What one appender process acknowledged before it died or finished.
fn run_and_maybe_kill(s: &Sandbox, conv: &str, input: &str, kill: Kill) -> Vec<serde_json::Value> {
    let mut child = s.spawn_piped(&[
        "log", "append", "--tenant", "acme", "--conv", conv, "--sender", "bob", "--stdin",
    ]);
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let input = input.to_string();
    let feeder = std::thread::spawn(move || {
        // Fails with a broken pipe once the child is killed; that is the point.
        let _ = stdin.write_all(input.as_bytes());
    });
    let seen = Arc::new(AtomicUsize::new(0));
    let seen_by_reader = seen.clone();
    let reader = std::thread::spawn(move || {
        let mut acks = Vec::new();
        let mut out = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match out.read_line(&mut line) {
                Ok(0) | Err(_) => return acks,
                // A line cut short by the kill was never a complete ack.
                Ok(_) if !line.ends_with('\n') => return acks,
                Ok(_) => {
                    acks.push(serde_json::from_str::<serde_json::Value>(&line).expect("ack JSON"));
                    seen_by_reader.store(acks.len(), Ordering::SeqCst);
                }
            }
        }
    });
    let kill_now = |child: &mut std::process::Child| {
        // If it already exited, kill fails harmlessly and wait reaps it.
        let _ = child.kill();
        child.wait().expect("reap");
    };
    match kill {
        Kill::After(delay) => {
            std::thread::sleep(delay);
            kill_now(&mut child);
        }
        Kill::AtAck(n) => {
            let deadline = Instant::now() + Duration::from_secs(60);
            while seen.load(Ordering::SeqCst) < n
                && child.try_wait().expect("try_wait").is_none()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            kill_now(&mut child);
        }
        Kill::Never => {
            let status = child.wait().expect("wait");
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            assert!(status.success(), "appender failed: {err}");
        }
    }
    feeder.join().expect("feeder");
    reader.join().expect("reader")
}

#[test]
fn killed_appenders_lose_no_acked_event_and_replays_add_no_duplicates() {
    let seed = std::env::var("TIDINGS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("crash test seed: {seed} (TIDINGS_CRASH_SEED={seed} replays it)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let s = Sandbox::new();
    // Many smaller rounds, and a last one of 10,000 lines as in the acceptance run.
    let mut sizes = vec![2_000; 10];
    sizes.push(10_000);
    let mut kills = 0;
    let mut acked_before_kill = 0;
    let mut committed_unacked = 0;
    for (round, lines) in sizes.into_iter().enumerate() {
        let conv = format!("crash{round}");
        s.group(&conv);
        let input = input_lines(&format!("r{round}-"), lines);
        let mut acked: HashMap<String, (u64, String)> = HashMap::new();
        for _ in 0..rng.usize(1..=3) {
            let kill = if rng.usize(0..3) == 0 {
                Kill::After(Duration::from_millis(rng.u64(0..80)))
            } else {
                Kill::AtAck(rng.usize(0..lines))
            };
            for ack in run_and_maybe_kill(&s, &conv, &input, kill) {
                assert!(ack.get("error").is_none(), "unexpected error ack: {ack}");
                let id = ack["client_msg_id"].as_str().expect("id").to_string();
                let now = (
                    ack["seq"].as_u64().expect("seq"),
                    ack["event_id"].as_str().expect("event id").to_string(),
                );
                if let Some(before) = acked.insert(id.clone(), now.clone()) {
                    assert_eq!(before, now, "{id} was acked twice with different results");
                }
            }
            kills += 1;
        }
        acked_before_kill += acked.len();

        let replay = run_and_maybe_kill(&s, &conv, &input, Kill::Never);
        assert_eq!(replay.len(), lines, "one ack per input line");
        for (i, ack) in replay.iter().enumerate() {
            let id = format!("r{round}-{i}");
            assert_eq!(ack["client_msg_id"], id.as_str());
            // Lines are appended in input order: line i is seq i + 2 (seq 1 creates the group).
            assert_eq!(ack["seq"], i as u64 + 2, "round {round}: {id}");
            if let Some((seq, event_id)) = acked.get(&id) {
                assert_eq!(ack["seq"], *seq, "acked seq changed after the crash");
                assert_eq!(
                    ack["event_id"],
                    event_id.as_str(),
                    "acked event changed after the crash"
                );
                assert_eq!(ack["duplicate"], true, "an acked append was written again");
            } else if ack["duplicate"] == true {
                // Committed but killed before its ack was printed: the replay found it.
                committed_unacked += 1;
            }
        }

        let events = s.ok(&["log", "read", "--tenant", "acme", "--conv", &conv]);
        assert_eq!(
            events.len(),
            lines + 1,
            "exactly one event per input line, plus the creation"
        );
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e["seq"], i as u64 + 1, "seqs are exactly 1..=head");
            if i > 0 {
                assert_eq!(e["client_msg_id"], format!("r{round}-{}", i - 1));
                assert_eq!(e["text"], format!("message r{round}-{}", i - 1));
            }
        }
    }
    println!(
        "{kills} kills, {acked_before_kill} acks printed before a kill (all kept), \
         {committed_unacked} appends committed but unacked when killed (deduped on replay)"
    );
    assert!(
        acked_before_kill > 0,
        "no kill landed after an ack: the test proved nothing"
    );
}

#[test]
fn appender_killed_before_reading_any_input_leaves_the_store_usable() {
    let s = Sandbox::new();
    s.group("early");
    for _ in 0..3 {
        run_and_maybe_kill(
            &s,
            "early",
            &input_lines("e", 10),
            Kill::After(Duration::ZERO),
        );
    }
    let out = s.run_with_input(
        &[
            "log", "append", "--tenant", "acme", "--conv", "early", "--sender", "bob", "--stdin",
        ],
        input_lines("e", 10).as_bytes(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json_lines(&out.stdout).len(), 10);
    assert_eq!(s.read_all("early").len(), 11);
}
