//! TLS at the edge, end to end with a test CA made by the openssl CLI: `wss://` through the
//! gateway with the client library, `https://` on the admin listener, and a certificate
//! replaced on disk served to new connections without a restart.

use std::path::Path;
use std::time::Duration;

use crate::common;
use crate::common::tls;
use crate::common::{Nats, Sandbox, Server};
use tidings_client::{ClientTls, Connection, Push};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

/// Copies a leaf's files to the paths the server is configured with.
fn install(leaf: &tls::Leaf, cert: &Path, key: &Path) {
    // Key first, then the certificate: a poll between the two sees a mismatched pair, which
    // must be refused (and retried), never served.
    std::fs::copy(&leaf.key, key).expect("copy key");
    std::fs::copy(&leaf.cert, cert).expect("copy cert");
}

fn tls_env(s: &Sandbox, section: &str) -> Vec<(String, String)> {
    let upper = section.to_uppercase();
    vec![
        (
            format!("TIDINGS_{upper}_TLS_CERT_FILE"),
            s.path()
                .join(format!("{section}.pem"))
                .display()
                .to_string(),
        ),
        (
            format!("TIDINGS_{upper}_TLS_KEY_FILE"),
            s.path()
                .join(format!("{section}.key"))
                .display()
                .to_string(),
        ),
    ]
}

fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

async fn open(url: &str, ca: &Path, s: &Sandbox, user: &str) -> Connection {
    let tls = ClientTls {
        ca_file: Some(ca.to_path_buf()),
    };
    let (conn, welcome) = Connection::open_with(url, &tls, &s.token("acme", user, 3600), "t")
        .await
        .expect("wss connect and hello");
    assert_eq!(welcome.user, user);
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_carries_a_conversation_end_to_end_with_a_private_ca() {
    let s = Sandbox::new();
    s.group("team");
    let ca = tls::TestCa::new("tidings edge CA");
    let leaf = ca.leaf("gateway");
    install(
        &leaf,
        &s.path().join("gateway.pem"),
        &s.path().join("gateway.key"),
    );
    let nats = Nats::start();
    let server = Server::start(&s, &nats, "all", &as_refs(&tls_env(&s, "gateway")));
    let url = format!("wss://127.0.0.1:{}/v1/ws", server.port);

    let alice = open(&url, &ca.ca_cert(), &s, "alice").await;
    let mut bob = open(&url, &ca.ca_cert(), &s, "bob").await;
    let sent = alice
        .send_text("team", "m1", "over wss")
        .await
        .expect("send over wss");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, bob.next_push()).await {
            Ok(Some(Push::Event(e))) if e.seq == sent.seq => break,
            Ok(Some(_)) => {}
            other => panic!("bob did not receive the message: {other:?}"),
        }
    }

    // A client that trusts another CA refuses the server; a plain client gets nowhere.
    let other = tls::TestCa::new("another CA");
    let refused = Connection::connect_with(
        &url,
        &ClientTls {
            ca_file: Some(other.ca_cert()),
        },
    )
    .await
    .err()
    .expect("an untrusted certificate is refused");
    assert!(refused.to_string().contains("TLS"), "{refused}");
    let plain = format!("ws://127.0.0.1:{}/v1/ws", server.port);
    assert!(
        tokio::time::timeout(Duration::from_secs(15), Connection::connect(&plain))
            .await
            .map_or(true, |r| r.is_err()),
        "plain ws:// must not work on a TLS listener"
    );
}

/// `GET /healthz` over TLS trusting `ca`: the status line and body.
async fn healthz(port: u16, ca: &Path) -> String {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut stream = tokio_rustls::TlsConnector::from(tls::client_config(ca))
        .connect(name, tcp)
        .await
        .expect("https handshake");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    // The server may close without close_notify; what arrived before counts.
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply).await;
    String::from_utf8_lossy(&reply).into_owned()
}

/// A log process whose admin listener serves https with a certificate of a new private CA.
fn admin_over_https() -> (Sandbox, tls::TestCa, Nats, Server) {
    let s = Sandbox::new();
    let ca = tls::TestCa::new("tidings admin CA");
    install(
        &ca.leaf("admin"),
        &s.path().join("admin.pem"),
        &s.path().join("admin.key"),
    );
    let nats = Nats::start();
    let server = Server::start(&s, &nats, "log", &as_refs(&tls_env(&s, "admin")));
    (s, ca, nats, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_https_with_a_private_ca() {
    let (_s, ca, _nats, server) = admin_over_https();
    let reply = healthz(server.admin_port, &ca.ca_cert()).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.ends_with("ok") || reply.contains("\r\n\r\nok"),
        "{reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_revoke_reaches_an_https_admin_listener_it_trusts_and_no_other() {
    let (s, ca, _nats, server) = admin_over_https();
    let admin = s.token_with_roles("acme", "root", &["admin"], 3600);
    let url = format!("https://127.0.0.1:{}", server.admin_port);
    let revoke = |extra: &[&str]| {
        let mut args = vec![
            "token", "revoke", "--tenant", "acme", "--jti", "lost-1", "--server", &url, "--token",
            &admin,
        ];
        args.extend_from_slice(extra);
        s.run(&args)
    };
    // Without the private CA the server is not trusted: nothing is sent.
    let out = revoke(&[]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains(&format!("call {url}")),
        "{}",
        common::stderr(&out)
    );
    // Another CA's file: refused too.
    let other = tls::TestCa::new("another CA");
    let other_ca = other.ca_cert().display().to_string();
    assert!(!revoke(&["--ca-file", &other_ca]).status.success());
    // With it, the revocation lands.
    let ca_file = ca.ca_cert().display().to_string();
    let out = revoke(&["--ca-file", &ca_file]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let answer = &common::json_lines(&out.stdout)[0];
    assert_eq!(answer["revoked"], serde_json::json!(true), "{answer}");
    assert_eq!(answer["jti"], serde_json::json!("lost-1"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_on_disk_is_served_without_a_restart() {
    let s = Sandbox::new();
    let ca = tls::TestCa::new("tidings rotation CA");
    let (first, second) = (ca.leaf("first"), ca.leaf("second"));
    let (cert, key) = (s.path().join("gateway.pem"), s.path().join("gateway.key"));
    install(&first, &cert, &key);
    let nats = Nats::start();
    let server = Server::start(&s, &nats, "all", &as_refs(&tls_env(&s, "gateway")));
    assert_eq!(
        tls::served_cert(server.port, &ca.ca_cert()).await,
        tls::cert_der(&first.cert)
    );

    // A broken replacement is refused: the old certificate stays in service.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").expect("write");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        tls::served_cert(server.port, &ca.ca_cert()).await,
        tls::cert_der(&first.cert)
    );

    // A good one is picked up within a few polls, for new connections.
    install(&second, &cert, &key);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if tls::served_cert(server.port, &ca.ca_cert()).await == tls::cert_der(&second.cert) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
