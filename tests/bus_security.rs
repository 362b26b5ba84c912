//! The bus is closed and encrypted: a real nats-server with the accounts `tidings nats init`
//! generates, TLS from a test CA, and `tidings serve` roles as separate processes, each
//! with its own NKey. What a NATS user without a tidings role can and cannot do, what each
//! role's credential allows, and how startup fails on a wrong credential or an untrusted
//! server certificate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common;
use crate::common::tls;
use crate::common::{Nats, Sandbox, Server};
use tidings_client::{Connection, Push};

const WAIT: Duration = Duration::from_secs(20);
/// An ordinary user of the same NATS account, with no tidings role (another application,
/// a monitoring script): it may use `public.>` and its inbox, nothing of tidings.
const OUTSIDER: &str = "outsider";
const OUTSIDER_PASSWORD: &str = "outsider-password-1";

/// A closed, TLS-only bus: the generated accounts plus the outsider, the server certificate
/// signed by `ca`.
struct Bus {
    nats: Nats,
    creds: PathBuf,
    ca: tls::TestCa,
}

fn closed_bus(s: &Sandbox) -> Bus {
    let creds = s.path().join("nats");
    let out = s.ok(&["nats", "init", "--dir", creds.to_str().expect("utf-8")]);
    assert!(
        out[0]["public_keys"]["log"]
            .as_str()
            .is_some_and(|k| k.starts_with('U'))
    );
    let accounts = std::fs::read_to_string(creds.join("accounts.conf")).expect("accounts.conf");
    // The outsider joins the TIDINGS account, so what it is refused is refused by
    // permissions, not by account isolation.
    let outsider = format!(
        "      {{ user: {OUTSIDER}, password: {OUTSIDER_PASSWORD}, permissions: {{ \
         publish: {{ allow: [\"public.>\"] }}, subscribe: {{ allow: [\"public.>\", \"_INBOX.>\"] }} }} }}\n    ]\n  }}\n}}\n"
    );
    let end = accounts
        .rfind("    ]\n  }\n}")
        .expect("the users list ends the file");
    let accounts = format!("{}{outsider}", &accounts[..end]);
    std::fs::write(creds.join("accounts-test.conf"), accounts).expect("write");
    let ca = tls::TestCa::new("tidings test CA");
    let leaf = ca.leaf("nats");
    std::fs::write(
        creds.join("server.conf"),
        format!(
            "include accounts-test.conf\n\
             tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  timeout: 2\n}}\n",
            leaf.cert.display(),
            leaf.key.display()
        ),
    )
    .expect("write server.conf");
    let nats = Nats::start_with(Some(&creds.join("server.conf")), "tls");
    Bus { nats, creds, ca }
}

/// The environment that makes a `tidings` process use `role`'s seed and trust the test CA.
fn role_env(bus: &Bus, role: &str) -> Vec<(String, String)> {
    vec![
        (
            "TIDINGS_NATS_NKEY_SEED_FILE".into(),
            bus.creds.join(format!("{role}.nk")).display().to_string(),
        ),
        (
            "TIDINGS_NATS_TLS_CA_FILE".into(),
            bus.ca.ca_cert().display().to_string(),
        ),
        ("TIDINGS_NATS_TLS_REQUIRED".into(), "true".into()),
    ]
}

fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A NATS client as the outsider (or with `seed`), and the server's complaints about it.
async fn raw_client(
    bus: &Bus,
    seed: Option<&Path>,
) -> (
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let options = match seed {
        Some(seed) => async_nats::ConnectOptions::with_nkey(
            std::fs::read_to_string(seed).expect("seed").trim().into(),
        ),
        None => async_nats::ConnectOptions::with_user_and_password(
            OUTSIDER.into(),
            OUTSIDER_PASSWORD.into(),
        ),
    };
    let client = options
        .add_root_certificates(bus.ca.ca_cert())
        .require_tls(true)
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(bus.nats.url())
        .await
        .expect("connect to the closed bus");
    (client, rx)
}

/// The next permission violation the server reports, which must name `subject`.
async fn violation(errors: &mut tokio::sync::mpsc::UnboundedReceiver<String>, subject: &str) {
    let e = tokio::time::timeout(Duration::from_secs(5), errors.recv())
        .await
        .unwrap_or_else(|_| panic!("no permission violation reported for {subject}"))
        .expect("client alive");
    let lower = e.to_lowercase();
    assert!(
        lower.contains("permissions violation") && e.contains(subject),
        "{e}"
    );
}

/// Nothing arrives on `sub` within `within`.
async fn silent(sub: &mut async_nats::Subscriber, within: Duration) {
    use futures_util::StreamExt;
    if let Ok(Some(m)) = tokio::time::timeout(within, sub.next()).await {
        panic!("{} delivered a message: {:?}", m.subject, m.payload);
    }
}

async fn connect_user(server: &Server, s: &Sandbox, user: &str) -> Connection {
    let token = s.token("acme", user, 3600);
    let (conn, _) = Connection::open(&server.url(), &token, "test")
        .await
        .expect("connect and hello");
    conn
}

/// Waits for the event with `text` in conv `team`.
async fn receive(conn: &mut Connection, text: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, conn.next_push()).await {
            Ok(Some(Push::Event(e))) if e.conversation == "team" => {
                if let Some(tidings_schemas::v1::event::Body::MessagePosted(p)) = &e.body
                    && p.text == text
                {
                    return;
                }
            }
            Ok(Some(Push::Closed { code, reason })) => panic!("closed {code:?} {reason}"),
            Ok(_) => {}
            Err(_) => panic!("{text:?} did not arrive"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_with_their_own_keys_work_and_an_outsider_gets_nothing() {
    let s = Sandbox::new();
    s.group("team");
    let bus = closed_bus(&s);
    // acme's interceptor, connected with the `interceptor` key: it takes the log's requests
    // and answers them, and may do nothing else.
    std::fs::write(
        s.path().join("tidings.toml"),
        "[[log.interceptors]]\ntenant = \"acme\"\nsubject = \"tidings.intercept.acme\"\n",
    )
    .expect("config");
    let (hook, mut hook_errors) =
        raw_client(&bus, Some(bus.creds.join("interceptor.nk").as_path())).await;
    let mut checks = hook.subscribe("tidings.intercept.acme").await.expect("sub");
    hook.flush().await.expect("flush");
    let checked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = checked.clone();
    let answering = hook.clone();
    tokio::spawn(async move {
        use futures_util::StreamExt;
        while let Some(msg) = checks.next().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Some(reply) = msg.reply {
                let _ = answering.publish(reply, r#"{"allow":true}"#.into()).await;
            }
        }
    });
    // The log keeps its send buffer on JetStream (as with TiKV), which its permissions must
    // allow: it adopts every partition there at startup.
    let mut log_env = role_env(&bus, "log");
    log_env.push(("TIDINGS_LOG_SEND_BUFFER_MEDIUM".into(), "jetstream".into()));
    // A webhook: the log's permissions must let its dispatcher make, pull from and ack a
    // consumer of the event stream.
    let (receiver, _) = common::receiver::Receiver::subscribed(&s, &[]).await;
    let log = Server::start(&s, &bus.nats, "log", &as_refs(&log_env));
    let gateway = Server::start(
        &s,
        &bus.nats,
        "gateway",
        &as_refs(&role_env(&bus, "gateway")),
    );

    // The roles work end to end: a message through the gateway, over the log, back out.
    let alice = connect_user(&gateway, &s, "alice").await;
    let mut bob = connect_user(&gateway, &s, "bob").await;
    alice
        .send_text("team", "m1", "over the closed bus")
        .await
        .expect("send through gateway and log");
    receive(&mut bob, "over the closed bus").await;
    assert_eq!(
        checked.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the interceptor checked the message"
    );
    // The interceptor's key reads no events and publishes nothing of its own.
    let _events = hook.subscribe("tidings.ev.>").await.expect("sub");
    violation(&mut hook_errors, "tidings.ev.>").await;
    hook.publish("tidings.ev.acme.team", "forged".into())
        .await
        .expect("publish");
    violation(&mut hook_errors, "tidings.ev.acme.team").await;
    let hooked = receiver.wait_for(1).await;
    assert_eq!(
        (hooked[0].text.as_str(), hooked[0].signed),
        ("over the closed bus", true)
    );

    // The outsider cannot read committed events, cannot answer for the log...
    let (outsider, mut errors) = raw_client(&bus, None).await;
    let mut events = outsider.subscribe("tidings.ev.>").await.expect("sub");
    violation(&mut errors, "tidings.ev.>").await;
    let mut rpc = outsider.subscribe("tidings.rpc.log").await.expect("sub");
    violation(&mut errors, "tidings.rpc.log").await;
    // ...and cannot call it: the request is refused and nobody answers.
    let answer = tokio::time::timeout(
        Duration::from_secs(3),
        outsider.request("tidings.rpc.log", "forged".into()),
    )
    .await;
    violation(&mut errors, "tidings.rpc.log").await;
    assert!(
        !matches!(answer, Ok(Ok(_))),
        "the outsider got an answer from the log"
    );
    alice
        .send_text("team", "m2", "still private")
        .await
        .expect("send");
    receive(&mut bob, "still private").await;
    silent(&mut events, Duration::from_millis(500)).await;
    silent(&mut rpc, Duration::from_millis(100)).await;

    // A gateway's key cannot answer for the log or publish events as if committed.
    let (gw, mut gw_errors) = raw_client(&bus, Some(bus.creds.join("gateway.nk").as_path())).await;
    let _rpc = gw.subscribe("tidings.rpc.log").await.expect("sub");
    violation(&mut gw_errors, "tidings.rpc.log").await;
    gw.publish("tidings.ev.acme.team", "forged".into())
        .await
        .expect("publish");
    violation(&mut gw_errors, "tidings.ev.acme.team").await;
    // Nor read another role's replies.
    let _inbox = gw.subscribe("_INBOX.log.>").await.expect("sub");
    violation(&mut gw_errors, "_INBOX.log.>").await;
    // Nor forge records into the log's send buffer, which the outsider cannot read either.
    gw.publish("tidings.sendbuf.p00000", "forged".into())
        .await
        .expect("publish");
    violation(&mut gw_errors, "tidings.sendbuf.p00000").await;
    let _buffer = outsider.subscribe("tidings.sendbuf.>").await.expect("sub");
    violation(&mut errors, "tidings.sendbuf.>").await;
    drop(log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_fails_startup_with_a_clear_error() {
    let s = Sandbox::new();
    let bus = closed_bus(&s);
    // A well-formed seed the server does not know.
    let stranger = s.path().join("stranger");
    s.ok(&["nats", "init", "--dir", stranger.to_str().expect("utf-8")]);
    let mut env = role_env(&bus, "log");
    env[0].1 = stranger.join("log.nk").display().to_string();
    let started = std::time::Instant::now();
    let mut cmd = s.command(&["serve", "--role", "log"]);
    cmd.env("TIDINGS_AUTH_HS256_ENABLED", "1");
    cmd.env("TIDINGS_NATS_URL", bus.nats.url())
        .env("TIDINGS_ADMIN_LISTEN", "")
        .env("TIDINGS_NATS_CONNECT_WAIT", "10s");
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run");
    let err = common::stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("refused the credential"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "a refused credential is not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_server_certificate_fails_startup_with_a_clear_error() {
    let s = Sandbox::new();
    let bus = closed_bus(&s);
    let other = tls::TestCa::new("some other CA");
    let mut env = role_env(&bus, "gateway");
    env[1].1 = other.ca_cert().display().to_string();
    let mut cmd = s.command(&["serve", "--role", "gateway"]);
    cmd.env("TIDINGS_AUTH_HS256_ENABLED", "1")
        .env("TIDINGS_GATEWAY_LOG_PUBLIC_KEY", s.log_public_key());
    cmd.env("TIDINGS_NATS_URL", bus.nats.url())
        .env("TIDINGS_GATEWAY_LISTEN", "127.0.0.1:0")
        .env("TIDINGS_NATS_CONNECT_WAIT", "10s");
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let started = std::time::Instant::now();
    let out = cmd.output().expect("run");
    let err = common::stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("TLS with NATS"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(8), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_never_reaches_the_output() {
    // User/password auth with the password in the environment and in the URL: startup
    // fails (wrong password) and neither copy is printed.
    let s = Sandbox::new();
    let bus = closed_bus(&s);
    let secret = "pw-that-must-not-leak-9c1e";
    let url = bus
        .nats
        .url()
        .replacen("tls://", &format!("tls://{OUTSIDER}:{secret}@"), 1);
    let mut cmd = s.command(&["serve", "--role", "log"]);
    cmd.env("TIDINGS_AUTH_HS256_ENABLED", "1");
    cmd.env("TIDINGS_NATS_URL", &url)
        .env("TIDINGS_ADMIN_LISTEN", "")
        .env("TIDINGS_NATS_TLS_CA_FILE", bus.ca.ca_cert());
    let out = cmd.output().expect("run");
    let all = format!(
        "{}{}",
        common::stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!out.status.success());
    assert!(all.contains("refused the credential"), "{all}");
    assert!(!all.contains(secret), "{all}");
}
