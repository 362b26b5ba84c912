//! A core that watches itself (issue 12): real nats-server, real `tidings serve` processes.
//! Each test makes one failure happen for real and checks what the process does about it:
//! - a NATS restart: `/readyz` names NATS while it is gone, and once the process says it is
//!   ready again, live delivery is back at once (20 messages, each within 200 ms);
//! - the server removes a hub's subscription (a permission reload, as an operator's mistake
//!   would): the hub subscribes again and the next message still arrives live;
//! - the server removes the log service's subscription: the service is restarted (down in
//!   `/readyz` meanwhile), and when it cannot be, the process exits non-zero saying why;
//! - a panic in the sequencer (the store's injected `panic-on-commit`): the process exits
//!   non-zero with the reason instead of answering `shutting_down` forever.

#![allow(clippy::disallowed_methods)] // tests wait on processes synchronously, off any runtime's workers

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{Nats, Sandbox, Server};
use serde_json::Value;
use tidings_client::{Connection, Push};

const WAIT: Duration = Duration::from_secs(20);
/// The bound on live delivery once NATS is back.
const LIVE: Duration = Duration::from_millis(200);
const USER: &str = "tidings";
const PASSWORD: &str = "supervision-test-password";

async fn connect(port: u16, s: &Sandbox, user: &str) -> Connection {
    let token = s.token("acme", user, 3600);
    let url = format!("ws://127.0.0.1:{port}/v1/ws");
    let (conn, _) = Connection::open(&url, &token, "test")
        .await
        .expect("connect and hello");
    conn
}

/// Sends one message and waits for it to reach `to`; returns how long that took.
async fn round_trip(from: &Connection, to: &mut Connection, id: &str) -> Duration {
    let start = Instant::now();
    let ack = from.send_text("team", id, id).await.expect("send");
    loop {
        match tokio::time::timeout(WAIT, to.next_push()).await {
            Ok(Some(Push::Event(e))) if e.conversation == "team" && e.seq == ack.seq => {
                return start.elapsed();
            }
            Ok(Some(Push::Event(_) | Push::ReadCursor(_) | Push::Typing(_))) => {}
            other => panic!("waiting for {id}: {other:?}"),
        }
    }
}

/// `GET /readyz` on the admin listener: the status and the JSON body.
async fn readyz(admin_port: u16) -> (u16, Value) {
    // reqwest is built without a crypto provider of its own (plain http:// here).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let reply = reqwest::get(format!("http://127.0.0.1:{admin_port}/readyz"))
        .await
        .expect("GET /readyz");
    let status = reply.status().as_u16();
    let text = reply.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, body)
}

/// Polls `/readyz` until it answers `status`; returns the body.
async fn until_ready_is(admin_port: u16, status: u16) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (now, body) = readyz(admin_port).await;
        if now == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never answered {status}; last {now} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A nats-server config with one user for every tidings role, allowed everything but the
/// subscriptions `deny`.
fn write_nats_config(path: &Path, deny: &[&str]) {
    let deny = if deny.is_empty() {
        String::new()
    } else {
        let quoted: Vec<String> = deny.iter().map(|d| format!("\"{d}\"")).collect();
        format!(", deny: [{}]", quoted.join(", "))
    };
    std::fs::write(
        path,
        format!(
            "authorization {{\n  users = [\n    {{ user: {USER}, password: \"{PASSWORD}\", \
             permissions: {{ publish: {{ allow: [\">\"] }}, subscribe: {{ allow: [\">\"]{deny} }} }} }}\n  ]\n}}\n"
        ),
    )
    .expect("write nats config");
}

/// A nats-server with a password and permissions the test changes by reloading.
fn nats_with_permissions(s: &Sandbox) -> (Nats, PathBuf) {
    let config = s.path().join("nats.conf");
    write_nats_config(&config, &[]);
    (Nats::start_with(Some(&config), "nats"), config)
}

const NATS_LOGIN: [(&str, &str); 2] = [
    ("TIDINGS_NATS_USER", USER),
    ("TIDINGS_NATS_PASSWORD", PASSWORD),
];

/// A `tidings serve` whose stderr this test keeps (to read why it exited), killed on drop.
struct Process {
    child: Child,
    stderr: Arc<Mutex<String>>,
    admin_port: u16,
    gateway_port: u16,
}

impl Process {
    fn start(s: &Sandbox, nats: &Nats, role: &str, env: &[(&str, &str)]) -> Process {
        let mut cmd = Server::command(s, nats, role, env);
        let mut child = cmd.spawn().expect("spawn tidings serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let pipe = child.stderr.take().expect("stderr piped");
        let kept = stderr.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                if std::env::var_os("TIDINGS_TEST_VERBOSE").is_some() {
                    eprintln!("[tidings] {line}");
                }
                kept.lock().expect("lock").push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        let port_after = |line: &str, marker: &str| -> Option<u16> {
            let rest = &line[line.find(marker)? + marker.len()..];
            let rest = rest.split_whitespace().next()?.trim_end_matches("/v1/ws");
            rest.rsplit(':').next()?.parse().ok()
        };
        let (mut admin_port, mut gateway_port) = (None, None);
        let gateway = role != "log";
        let deadline = Instant::now() + WAIT;
        while admin_port.is_none() || (gateway && gateway_port.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "tidings serve did not become ready: {}",
                    stderr.lock().expect("lock")
                )
            });
            admin_port = admin_port.or(port_after(&line, "admin on http://"));
            gateway_port = gateway_port.or(port_after(&line, "gateway on ws://"));
        }
        Process {
            child,
            stderr,
            admin_port: admin_port.unwrap_or(0),
            gateway_port: gateway_port.unwrap_or(0),
        }
    }

    /// Waits for the process to exit on its own; its status and everything it printed.
    fn exit(&mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return (status, self.stderr.lock().expect("lock").clone());
            }
            assert!(
                Instant::now() < deadline,
                "tidings serve did not exit: {}",
                self.stderr.lock().expect("lock")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_nats_restart_readyz_says_when_live_delivery_is_back_and_it_is_at_once() {
    let s = Sandbox::new();
    s.group("team");
    let mut nats = Nats::start();
    let server = Server::start(&s, &nats, "all", &[]);
    assert_eq!(until_ready_is(server.admin_port, 200).await["ready"], true);
    let alice = connect(server.port, &s, "alice").await;
    let mut bob = connect(server.port, &s, "bob").await;
    round_trip(&alice, &mut bob, "before").await;

    nats.kill();
    let down = until_ready_is(server.admin_port, 503).await;
    assert!(down["down"]["nats"].is_string(), "{down}");
    nats.restart();
    // Ready means: connected again, and the event stream NATS lost made again.
    until_ready_is(server.admin_port, 200).await;
    for i in 0..20 {
        let took = round_trip(&alice, &mut bob, &format!("after-{i}")).await;
        assert!(
            took <= LIVE,
            "message {i} after the restart took {took:?} (bound {LIVE:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_whose_subscription_the_server_removed_subscribes_again_and_the_next_message_arrives_live()
 {
    let s = Sandbox::new();
    s.group("team");
    let (nats, config) = nats_with_permissions(&s);
    // No periodic heal within the test: only the hub's own resubscription can deliver.
    let mut env = NATS_LOGIN.to_vec();
    env.push(("TIDINGS_GATEWAY_HEAL_INTERVAL_MS", "3600000"));
    let server = Server::start(&s, &nats, "all", &env);
    let alice = connect(server.port, &s, "alice").await;
    let mut bob = connect(server.port, &s, "bob").await;
    round_trip(&alice, &mut bob, "before").await;

    // An operator's reload takes the gateway's event subscriptions away: the server
    // removes bob's hub's subscription (the client's stream stays open, silent).
    write_nats_config(&config, &["tidings.ev.>"]);
    nats.reload();
    let down = until_ready_is(server.admin_port, 503).await;
    assert!(down["down"]["subscriptions"].is_string(), "{down}");
    // Fixed by the next reload.
    write_nats_config(&config, &[]);
    nats.reload();
    until_ready_is(server.admin_port, 200).await;

    round_trip(&alice, &mut bob, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_service_is_restarted_when_its_subscription_is_removed_and_exits_saying_why_when_it_cannot_be()
 {
    let s = Sandbox::new();
    s.group("team");
    let (nats, config) = nats_with_permissions(&s);
    let mut log = Process::start(&s, &nats, "log", &NATS_LOGIN);
    let gateway = Server::start(&s, &nats, "gateway", &NATS_LOGIN);
    until_ready_is(log.admin_port, 200).await;
    let alice = connect(gateway.port, &s, "alice").await;
    let mut bob = connect(gateway.port, &s, "bob").await;
    round_trip(&alice, &mut bob, "before").await;

    // The server removes the log service's request subscription: the service ends and is
    // restarted, down in /readyz while the server refuses it.
    write_nats_config(&config, &["tidings.rpc.log"]);
    nats.reload();
    let down = until_ready_is(log.admin_port, 503).await;
    let why = down["down"]["log service"].as_str().unwrap_or_default();
    assert!(why.contains("tidings.rpc.log"), "{down}");
    write_nats_config(&config, &[]);
    nats.reload();
    until_ready_is(log.admin_port, 200).await;
    round_trip(&alice, &mut bob, "restarted").await;

    // Refused for good: after a bounded number of restarts the process exits, saying why.
    write_nats_config(&config, &["tidings.rpc.log"]);
    nats.reload();
    let (status, stderr) = log.exit();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("log service failed: NATS removed the subscription to tidings.rpc.log")
            && stderr.contains("gave up after"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_sequencer_makes_the_process_exit_with_the_reason() {
    let s = Sandbox::new();
    s.group("team");
    let nats = Nats::start();
    let faults = s.path().join("faults");
    std::fs::write(&faults, "ok").expect("write faults file");
    let faults_env = faults.display().to_string();
    let mut server = Process::start(
        &s,
        &nats,
        "all",
        &[("TIDINGS_STORE_FAULTS_FILE", faults_env.as_str())],
    );
    let alice = connect(server.gateway_port, &s, "alice").await;
    let mut bob = connect(server.gateway_port, &s, "bob").await;
    round_trip(&alice, &mut bob, "before").await;

    std::fs::write(&faults, "panic-on-commit").expect("write faults file");
    // Sends until one is refused (the control file is polled): the commit panics.
    let deadline = Instant::now() + WAIT;
    for i in 0.. {
        if alice
            .send_text("team", &format!("m{i}"), "hello")
            .await
            .is_err()
        {
            break;
        }
        assert!(Instant::now() < deadline, "no send was refused");
    }
    let (status, stderr) = server.exit();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("sequencer panicked: injected store fault: panic-on-commit"),
        "{stderr}"
    );
}
