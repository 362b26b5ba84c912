//! Two `tidings chat` processes, as two people in two terminals would run them.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Duration;

use common::{Nats, Sandbox, Server};

#[test]
fn two_chat_processes_exchange_100_messages_each_way_once_in_order() {
    let s = Sandbox::new();
    let nats = Nats::start();
    s.ok(&[
        "conv",
        "create",
        "--tenant",
        "acme",
        "--conv",
        "dm",
        "--kind",
        "direct",
        "--by",
        "alice",
        "--members",
        "bob",
    ]);
    let server = Server::start(&s, &nats, "all", &[]);
    let token = |user: &str| {
        let out = s
            .command(&[
                "token", "issue", "--tenant", "acme", "--user", user, "--ttl", "10m",
            ])
            .env("TIDINGS_AUTH_HS256_ENABLED", "1")
            .output()
            .expect("token issue");
        assert!(out.status.success(), "{}", common::stderr(&out));
        String::from_utf8(out.stdout)
            .expect("utf8")
            .trim()
            .to_string()
    };
    let mut chats: Vec<_> = ["alice", "bob"]
        .iter()
        .map(|user| {
            s.command(&[
                "chat",
                "--url",
                &server.url(),
                "--token",
                &token(user),
                "--conv",
                "dm",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chat")
        })
        .collect();
    // Each chat's printed events, collected as they come.
    let readers: Vec<_> = chats
        .iter_mut()
        .map(|c| {
            let out = BufReader::new(c.stdout.take().expect("stdout"));
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in out.lines().map_while(Result::ok) {
                    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            });
            rx
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500)); // both connected and synced
    let mut inputs: Vec<_> = chats
        .iter_mut()
        .map(|c| c.stdin.take().expect("stdin"))
        .collect();
    for i in 0..100 {
        writeln!(inputs[0], "alice says {i}").expect("type");
        writeln!(inputs[1], "bob says {i}").expect("type");
    }
    for (who, rx) in ["alice", "bob"].iter().zip(&readers) {
        let mut seen = Vec::new();
        while seen.len() < 200 {
            let v = rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("{who} saw only {} lines", seen.len()));
            seen.push(v);
        }
        let seqs: Vec<u64> = seen
            .iter()
            .map(|v| v["seq"].as_u64().expect("seq"))
            .collect();
        assert_eq!(
            seqs,
            (2..=201).collect::<Vec<_>>(),
            "{who}: contiguous, in order, once"
        );
        for sender in ["alice", "bob"] {
            let texts: Vec<String> = seen
                .iter()
                .filter(|v| v["sender"] == sender)
                .map(|v| v["text"].as_str().expect("text").to_string())
                .collect();
            let expected: Vec<String> = (0..100).map(|i| format!("{sender} says {i}")).collect();
            assert_eq!(
                texts, expected,
                "{who} sees {sender}'s lines once, in order"
            );
        }
    }
    drop(inputs);
    for mut c in chats {
        let status = c.wait().expect("wait");
        assert!(status.success(), "chat exits cleanly at end of input");
    }
}
