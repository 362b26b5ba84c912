//! A webhook receiver for the tests: a real HTTP/1.1 server (hyper) on a port of its own,
//! that checks every request's signature with the subscription's secret (and with a wrong
//! one, which must fail), answers 500 when told to, and can be stopped and started again on
//! the same port.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac as _};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use sha2::Sha256;

/// How long [`Receiver::wait_for`] waits before failing (never a timed assertion).
pub const WAIT: Duration = Duration::from_secs(30);

/// A request the receiver answered 2xx.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub conversation: String,
    pub seq: u64,
    pub kind: String,
    pub text: String,
    pub event_id: String,
    pub attempt: u64,
    /// The signature checked with the subscription's secret.
    pub signed: bool,
    /// The same signature checked with another secret: a receiver holding the wrong secret
    /// must see a mismatch.
    pub signed_with_wrong_secret: bool,
    /// `X-Tidings-Event-Id` equals the body's event id.
    pub event_id_header_matches: bool,
}

#[derive(Default)]
struct Seen {
    secret: Vec<u8>,
    delivered: Vec<Delivery>,
    /// Requests answered 500 on purpose.
    refused: usize,
    /// Answer 500 to this many more requests.
    refuse_next: usize,
}

/// The test's webhook receiver: a hyper HTTP/1.1 server on a fixed port.
pub struct Receiver {
    pub port: u16,
    seen: Arc<Mutex<Seen>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn hmac_hex(secret: &[u8], message: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(message);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Verifies `t=<unix>,v1=<hex>` over `"<t>.<body>"`, as the README tells receivers to.
pub fn verify(secret: &[u8], header: &str, body: &[u8]) -> bool {
    let (mut t, mut v1) = (None, None);
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v.to_string()),
            Some(("v1", v)) => v1 = Some(v.to_string()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let mut signed = t.into_bytes();
    signed.push(b'.');
    signed.extend_from_slice(body);
    hmac_hex(secret, &signed) == v1
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Receiver {
    /// A receiver, and a subscription of tenant `acme` to it made with `tidings webhook
    /// create` (plus `args`) on the sandbox's store; the receiver knows its secret. Returns
    /// the create command's output line.
    pub async fn subscribed(s: &super::Sandbox, args: &[&str]) -> (Receiver, Value) {
        let receiver = Receiver::start().await;
        let url = receiver.url();
        let mut command = vec!["webhook", "create", "--tenant", "acme", "--url", &url];
        command.extend_from_slice(args);
        let created = s.ok(&command).remove(0);
        receiver.set_secret(created["secret"].as_str().expect("the secret, shown once"));
        (receiver, created)
    }

    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut r = Receiver {
            port,
            seen: Arc::default(),
            task: None,
        };
        r.task = Some(tokio::spawn(serve(listener, r.seen.clone())));
        r
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    pub fn set_secret(&self, secret: &str) {
        lock(&self.seen).secret = secret.as_bytes().to_vec();
    }

    pub fn refuse_next(&self, n: usize) {
        lock(&self.seen).refuse_next = n;
    }

    pub fn delivered(&self) -> Vec<Delivery> {
        lock(&self.seen).delivered.clone()
    }

    pub fn refused(&self) -> usize {
        lock(&self.seen).refused
    }

    /// Stops listening and drops every open connection.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again on the same port, keeping what it saw.
    pub async fn restart(&mut self) {
        self.stop();
        let deadline = tokio::time::Instant::now() + WAIT;
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("rebind the receiver's port: {e}"),
            }
        };
        self.task = Some(tokio::spawn(serve(listener, self.seen.clone())));
    }

    /// Waits until `n` deliveries have arrived; fails after WAIT.
    pub async fn wait_for(&self, n: usize) -> Vec<Delivery> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self.delivered();
            if got.len() >= n {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} deliveries arrived: {got:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn serve(listener: tokio::net::TcpListener, seen: Arc<Mutex<Seen>>) {
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        // As any web server does: without it, a response written in two parts waits for
        // the client's delayed ACK (40 ms a request).
        let _ = stream.set_nodelay(true);
        let seen = seen.clone();
        connections.spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    let status = receive(req, &seen).await;
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(status)
                            .body(String::from("thanks"))
                            .expect("response"),
                    )
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn receive(req: Request<Incoming>, seen: &Mutex<Seen>) -> StatusCode {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (signature, event_id) = (header("x-tidings-signature"), header("x-tidings-event-id"));
    let mut incoming = std::pin::pin!(req.into_body());
    let mut body = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| hyper::body::Body::poll_frame(incoming.as_mut(), cx)).await
    {
        if let Ok(data) = frame.expect("body frame").into_data() {
            body.extend_from_slice(&data);
        }
    }
    let mut s = lock(seen);
    if s.refuse_next > 0 {
        s.refuse_next -= 1;
        s.refused += 1;
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let v: Value = serde_json::from_slice(&body).expect("a JSON body");
    let delivery = Delivery {
        conversation: v["conversation"].as_str().unwrap_or("").into(),
        seq: v["seq"].as_u64().expect("seq"),
        kind: v["kind"].as_str().unwrap_or("").into(),
        text: v["text"].as_str().unwrap_or("").into(),
        event_id: v["event_id"].as_str().unwrap_or("").into(),
        attempt: v["attempt"].as_u64().expect("attempt"),
        signed: verify(&s.secret, &signature, &body),
        signed_with_wrong_secret: verify(b"whsec_not_the_secret", &signature, &body),
        event_id_header_matches: v["event_id"].as_str() == Some(event_id.as_str()),
    };
    s.delivered.push(delivery);
    StatusCode::OK
}
