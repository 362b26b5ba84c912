//! Two `tidings chat` processes, as two people in two terminals would run them.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use crate::common::{Nats, Sandbox, Server, input_lines, stderr};
use serde_json::Value;

fn token(s: &Sandbox, user: &str) -> String {
    let out = s
        .command(&[
            "token", "issue", "--tenant", "acme", "--user", user, "--ttl", "10m",
        ])
        .env("TIDINGS_AUTH_HS256_ENABLED", "1")
        .output()
        .expect("token issue");
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string()
}

/// A running `tidings chat`: its stdin, and its printed events as they come.
struct Chat {
    who: String,
    child: Child,
    input: Option<ChildStdin>,
    events: Receiver<Value>,
}

impl Chat {
    fn start(s: &Sandbox, server: &Server, user: &str, conv: &str, extra: &[&str]) -> Chat {
        let (url, token) = (server.url(), token(s, user));
        let mut args = vec!["chat", "--url", &url, "--token", &token, "--conv", conv];
        args.extend_from_slice(extra);
        let mut child = s
            .command(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chat");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, events) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).expect("JSON line");
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Chat {
            who: format!("{user} {extra:?}"),
            input: child.stdin.take(),
            child,
            events,
        }
    }

    fn type_line(&mut self, line: &str) {
        writeln!(self.input.as_mut().expect("stdin open"), "{line}").expect("type");
    }

    /// The next `n` events it prints.
    fn next(&self, n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| {
                self.events
                    .recv_timeout(Duration::from_secs(30))
                    .unwrap_or_else(|_| panic!("{}: saw only {i} of {n} lines", self.who))
            })
            .collect()
    }

    /// Ends its input and waits: a chat exits cleanly once every line it sent came back.
    fn finish(mut self) {
        drop(self.input.take());
        let status = self.child.wait().expect("wait");
        assert!(
            status.success(),
            "{}: chat exits cleanly at end of input",
            self.who
        );
        assert!(
            self.events.recv_timeout(Duration::from_secs(5)).is_err(),
            "{}: nothing printed after what the test read",
            self.who
        );
    }
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|v| v["seq"].as_u64().expect("seq"))
        .collect()
}

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
    let mut chats: Vec<Chat> = ["alice", "bob"]
        .iter()
        .map(|user| Chat::start(&s, &server, user, "dm", &[]))
        .collect();
    // Joining shows the history: the conversation's creation, seq 1.
    for chat in &chats {
        assert_eq!(seqs(&chat.next(1)), [1], "{}: history", chat.who);
    }
    for i in 0..100 {
        chats[0].type_line(&format!("alice says {i}"));
        chats[1].type_line(&format!("bob says {i}"));
    }
    for chat in &chats {
        let who = &chat.who;
        let seen = chat.next(200);
        assert_eq!(
            seqs(&seen),
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
    for chat in chats {
        chat.finish();
    }
}

/// A chat joining a conversation with 31 events prints the last N of them (`--history N`,
/// 20 by default) first, once, in order, then the live ones with no gap or repeat at the
/// seam — also when it joins while messages are being sent.
#[test]
fn a_joining_chat_prints_the_last_n_events_once_then_the_live_ones() {
    let s = Sandbox::new();
    let nats = Nats::start();
    s.group("team");
    let out = s.run_with_input(
        &[
            "log", "append", "--tenant", "acme", "--conv", "team", "--sender", "bob", "--stdin",
        ],
        input_lines("early-", 30).as_bytes(),
    );
    assert!(out.status.success(), "append: {}", stderr(&out));
    let server = Server::start(&s, &nats, "all", &[]);

    let mut bob = Chat::start(&s, &server, "bob", "team", &[]);
    let history = bob.next(20);
    assert_eq!(seqs(&history), (12..=31).collect::<Vec<_>>(), "default: 20");
    assert_eq!(history[0]["text"], "message early-10");
    assert_eq!(history[19]["text"], "message early-29");
    let mut alice = Chat::start(&s, &server, "alice", "team", &["--history", "5"]);
    assert_eq!(seqs(&alice.next(5)), (27..=31).collect::<Vec<_>>());

    for i in 0..20 {
        alice.type_line(&format!("alice live {i}"));
        bob.type_line(&format!("bob live {i}"));
    }
    for chat in [&alice, &bob] {
        assert_eq!(
            seqs(&chat.next(40)),
            (32..=71).collect::<Vec<_>>(),
            "{}: live after history, no gap, no repeat",
            chat.who
        );
    }

    // Join while bob sends: wherever the seam falls, each event is printed once, in order.
    for i in 0..50 {
        bob.type_line(&format!("bob during the join {i}"));
    }
    let late = Chat::start(&s, &server, "alice", "team", &["--history", "3"]);
    let mut seen = late.next(3);
    while seen.last().and_then(|v| v["seq"].as_u64()) < Some(121) {
        seen.extend(late.next(1));
    }
    let first = seqs(&seen)[0];
    assert!((69..=119).contains(&first), "history starts at {first}");
    assert_eq!(seqs(&seen), (first..=121).collect::<Vec<_>>());
    assert_eq!(seqs(&bob.next(50)), (72..=121).collect::<Vec<_>>());
    assert_eq!(seqs(&alice.next(50)), (72..=121).collect::<Vec<_>>());
    for chat in [late, alice, bob] {
        chat.finish();
    }
}
