//! The gateway listener's plain HTTP: the one port answers WebSocket upgrades at `/v1/ws`
//! and a few GETs beside them, so a browser needs one origin and an operator one port.
//!
//! - `GET /healthz`, `GET /readyz` (the process's probes, [`tidings_log_api::health`]), `GET /metrics`
//!   (Prometheus text, [`tidings_log_api::metrics`]: counts and latencies, never an id).
//! - `GET /` redirects to `/app/`; `GET /app/...` the web client ([`crate::web`]), files
//!   compiled into the binary, with a strict Content-Security-Policy.
//! - `POST /app/dev-token?tenant=&user=`: a development token, only when the server accepts
//!   HS256 development tokens (`auth.hs256_enabled`); 404 otherwise.
//! - `POST /v1/bot/messages`: a bot posts a message with its token ([`crate::bot_http`]), the
//!   one route with a request body.
//!
//! The request head is read here (at most [`MAX_HEAD_BYTES`], within the handshake
//! deadline the caller sets); an upgrade to `/v1/ws` gets the bytes back through
//! [`Rewind`] and goes on to the WebSocket handshake, which checks everything else. Every
//! other answer closes the connection: no keep-alive, no request bodies, nothing to
//! pipeline, so this side needs no HTTP library.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::http_answer::{Answer, Head};
use crate::shared::Shared;

/// The largest request head read (a browser's upgrade with cookies fits in a few KiB).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// A stream whose first bytes were already read: they are read again first.
pub struct Rewind<S> {
    head: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.head.len() {
            let n = (self.head.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What one connection turned out to be.
pub enum Routed<S> {
    /// An upgrade to `/v1/ws`: the stream, head included, for the WebSocket handshake.
    WebSocket(Rewind<S>),
    /// Answered here (or not HTTP at all); the connection is done.
    Done,
}

/// Reads the request head and either answers it or hands it on to the WebSocket side.
pub async fn route<S>(
    mut stream: S,
    peer: std::net::SocketAddr,
    shared: &Shared,
) -> std::io::Result<Routed<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::with_capacity(1024);
    let end = loop {
        if let Some(end) = find_end(&buf) {
            break end;
        }
        if buf.len() >= MAX_HEAD_BYTES {
            respond(&mut stream, &Answer::error(431, "request head too large")).await?;
            return Ok(Routed::Done);
        }
        let mut chunk = [0u8; 2048];
        let want = chunk.len().min(MAX_HEAD_BYTES - buf.len());
        let n = stream.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Ok(Routed::Done);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let Some(head) = parse_head(&buf[..end]) else {
        respond(&mut stream, &Answer::error(400, "malformed request")).await?;
        return Ok(Routed::Done);
    };
    if head.path == "/v1/ws" {
        return Ok(Routed::WebSocket(Rewind {
            head: buf,
            at: 0,
            inner: stream,
        }));
    }
    let answer = if head.path == crate::bot_http::PATH {
        crate::bot_http::post(&mut stream, &head, buf[end..].to_vec(), shared).await?
    } else {
        answer(&head, peer, shared)
    };
    respond(&mut stream, &answer).await?;
    Ok(Routed::Done)
}

fn find_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn parse_head(bytes: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(bytes).ok()?;
    let line = text.lines().next()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return None;
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (mut authorization, mut content_length) = (None, None);
    for header in text.lines().skip(1) {
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse().ok()?);
        }
    }
    Some(Head {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        authorization,
        content_length,
    })
}

fn answer(head: &Head, peer: std::net::SocketAddr, shared: &Shared) -> Answer {
    let get = head.method == "GET";
    match (head.method.as_str(), head.path.as_str()) {
        (_, "/healthz") if get => Answer::ok("text/plain; charset=utf-8", "ok"),
        (_, "/readyz") if get => ready(shared),
        (_, "/metrics") if get => Answer::ok(
            tidings_log_api::metrics::CONTENT_TYPE,
            tidings_log_api::metrics::render(),
        ),
        (_, "/") if get => {
            let mut a = Answer::error(302, "the web client is at /app/");
            a.headers.push(("Location", "/app/".into()));
            a
        }
        ("POST", "/app/dev-token") => {
            crate::web::dev_token(shared.dev_tokens.get(), peer, &head.query)
        }
        (_, path) if get && path.starts_with("/app/") => crate::web::file(path),
        (_, "/healthz" | "/readyz" | "/metrics" | "/") => {
            let mut a = Answer::error(405, "only GET is allowed here");
            a.headers.push(("Allow", "GET".into()));
            a
        }
        _ => Answer::error(404, "not found"),
    }
}

fn ready(shared: &Shared) -> Answer {
    let down = shared.health.get().map(|h| h.down()).unwrap_or_default();
    if down.is_empty() {
        return Answer::ok("application/json", "{\"ready\":true}\n");
    }
    let down: serde_json::Map<String, serde_json::Value> = down
        .into_iter()
        .map(|(name, why)| (name, serde_json::Value::String(why)))
        .collect();
    let body = serde_json::json!({ "ready": false, "down": down });
    Answer {
        status: 503,
        content_type: "application/json",
        body: format!("{body}\n").into_bytes(),
        headers: Vec::new(),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

async fn respond<S: AsyncWrite + Unpin>(stream: &mut S, answer: &Answer) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\
         X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n",
        answer.status,
        reason(answer.status),
        answer.content_type,
        answer.body.len()
    );
    for (name, value) in &answer.headers {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    stream.write_all(out.as_bytes()).await?;
    stream.write_all(&answer.body).await?;
    stream.flush().await?;
    let _ = stream.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_ends_at_the_blank_line_and_the_request_line_is_checked() {
        assert_eq!(find_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest"), Some(27));
        assert_eq!(find_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        let head = parse_head(b"GET /app/?a=b HTTP/1.1\r\n\r\n").expect("parses");
        assert_eq!((head.path.as_str(), head.query.as_str()), ("/app/", "a=b"));
        assert!(parse_head(b"GET app HTTP/1.1\r\n\r\n").is_none());
        assert!(parse_head(b"GET / SPDY/3\r\n\r\n").is_none());
        assert!(parse_head(b"GET / HTTP/1.1 extra\r\n\r\n").is_none());
    }

    #[tokio::test]
    async fn rewind_gives_back_the_head_then_the_rest() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.expect("write");
        drop(a);
        let mut r = Rewind {
            head: b"hello".to_vec(),
            at: 0,
            inner: b,
        };
        let mut out = String::new();
        r.read_to_string(&mut out).await.expect("read");
        assert_eq!(out, "hello world");
    }
}
