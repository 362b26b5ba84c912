//! The admin listener of `tidings serve`: HTTP/1.1, over TLS when `admin.tls_cert_file` is
//! set (docs/decisions/edge-tls.md), for operators and compliance
//! officers, never for end users (they use the gateway).
//!
//! - `GET /healthz`: `200 ok` (the process answers).
//! - `GET /metrics`: Prometheus text format ([`crate::metrics`]), no token (like health:
//!   counts and latencies only, never a tenant's or a user's id).
//! - `GET /console/`: the compliance console (static files, [`crate::console`]); it calls
//!   the routes below with the officer's token.
//! - `GET /v1/compliance/export?..` (the search's filters): the hits as a JSON-lines
//!   download (`Content-Disposition: attachment`), recorded as an export.
//! - `GET /v1/compliance/holds?tenant=`, `POST /v1/compliance/holds`
//!   `{"conv"|"user"?,"from"?,"to"?,"reason"}`, `POST /v1/compliance/holds/release`
//!   `{"id"}`: legal holds, each change audited.
//! - `GET /readyz`: `200 {"ready":true}` when every supervised task is up and NATS is
//!   connected, else `503 {"ready":false,"down":{NAME:WHY,..}}` naming those down
//!   ([`tidings_log_api::health`]; no secrets, no tenant data).
//! - `GET /v1/compliance/search?tenant=&conv=&sender=&from=&to=&text=`: the hits as JSON
//!   lines, streamed, then `{"complete":true,"rows":N}` — or `{"error":{..}}` if the search
//!   failed midway. Only that last line tells a complete result from a cut one.
//! - `GET /v1/compliance/audit?tenant=`: the tenant's audit records as JSON lines, then
//!   `{"complete":true,"rows":N,"problems":[..]}`. Reading the audit log is audited too.
//! - `POST /v1/admin/tokens/revoke` with a JSON body `{"tenant":..,"jti":..}` or
//!   `{"tenant":..,"user":..,"before":"now"|RFC 3339|Unix seconds}`: records the revocation,
//!   tells every gateway (NATS `tidings.revoked.<tenant>`) and answers what it did. Needs the
//!   `admin` role in the caller's own tenant; recorded in that tenant's audit log.
//!
//! Every route but health takes `Authorization: Bearer <jwt>` whose audience is the
//! compliance audience (`auth.compliance_audience`; a chat token is refused here as
//! unauthenticated) and which is not revoked. The compliance routes need the `compliance`
//! role.
//!
//! Who may ask, and what is recorded:
//!
//! | request | answer | audit log |
//! |---|---|---|
//! | no token, malformed header, token fails verification (a chat token's audience included), revoked token | 401 | none (only a warning in the process log) |
//! | verified token without the `compliance` role | 403 | denied, in the token's tenant |
//! | compliance token of tenant A asking for tenant B | 403 | denied, in B's |
//! | malformed filters | 400 | denied, with the reason |
//! | accepted | 200 | started, then completed or failed (by [`Compliance`]) |
//!
//! An unauthenticated request is not recorded because anyone who can reach the port could
//! otherwise fill any tenant's audit log. The actor recorded is `<tenant>/<user>` from the
//! token. The token itself is never logged or echoed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Map, Value, json};
use tidings_archive::compliance::audit::{self, Entry};
use tidings_archive::compliance::export::Format;
use tidings_archive::compliance::{
    Action, Actor, Compliance, ComplianceError, Hit, HoldSpec, Progress, Query, Scope, Sink, Via,
    hit_json, hold, parse_time,
};
use tidings_auth::Verifier;
use tidings_gateway::tls::ReloadingAcceptor;
use tidings_log::{ConvId, TenantId, UserId};
use tidings_log_api::health::Health;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, error, info, warn};

mod download;
mod ops;
mod webhooks;
pub use ops::Archive;

/// The role a token needs for the compliance routes.
pub const COMPLIANCE_ROLE: &str = "compliance";
/// The role a token needs to revoke tokens.
pub const ADMIN_ROLE: &str = "admin";
/// The role a token needs to move every tenant of a tier to this cell at once
/// (`/v1/admin/cells/failover-tier`): a deployment operator's, across tenants.
pub const CELL_OPERATOR_ROLE: &str = "cell_operator";
/// The largest request body accepted (a revocation: a tenant, and a jti or a user and time).
const MAX_BODY_BYTES: usize = 4 * 1024;
/// Longest query string accepted (414 beyond).
pub const MAX_QUERY_BYTES: usize = 8 * 1024;
/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 64;
/// Compliance requests (searches and audit reads) running at once; more get 503. Each scan
/// decrypts and reads the archive, so a few at a time is what the store can carry beside
/// the live traffic.
const MAX_REQUESTS: usize = 4;
/// Lines queued between a search and its client. A slow client stops the scan here, so a
/// search holds at most this many lines in memory.
const STREAM_LINES: usize = 64;
/// A client that takes no line for this long is cut off: a search holds the archive gate
/// shared, and a stalled reader must not hold back the archiver forever.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Time a client gets to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's read and write buffer per connection (headers must fit; a JWT is at most 8 KiB).
const MAX_BUF_BYTES: usize = 64 * 1024;
/// At shutdown: time open connections get to finish, then time searches get to record
/// their outcome.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const SEARCH_DRAIN: Duration = Duration::from_secs(2);

/// The running listener. [`Admin::stop`] ends it.
pub struct Admin {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// What the listener serves from: always health, readiness and metrics; the compliance and
/// admin plane only where this process has one (not `--role archiver`).
struct State {
    health: Health,
    plane: Option<Arc<Plane>>,
}

/// The compliance and admin routes' services.
struct Plane {
    verifier: Verifier,
    compliance: Compliance,
    requests: Arc<Semaphore>,
    /// Revocation records (checked for every token, written by the revoke route).
    log: tidings_log::Log,
    /// Where revocation notices go; `None` when this process has no NATS connection.
    nats: Option<async_nats::Client>,
    /// The archiver and object store the admin operations use (`None`: no archive here).
    archive: Option<Archive>,
    /// Where CSV and Parquet downloads are written whole before they are sent.
    spool: PathBuf,
    /// The chat audience, for the bot tokens this listener issues.
    chat_audience: String,
    /// The webhook routes' bounds and defaults.
    webhooks: crate::webhooks::WebhooksConfig,
    /// The link to the other cells (`None`: cells are off).
    cells: Option<Arc<crate::cells::Link>>,
}

/// What the listener serves with.
pub struct Services {
    /// The admin plane's verifier (the compliance audience).
    pub verifier: Verifier,
    pub compliance: Compliance,
    /// Revocation records (checked for every token, written by the revoke route).
    pub log: tidings_log::Log,
    /// Where revocation notices go; `None` when this process has no NATS connection.
    pub nats: Option<async_nats::Client>,
    /// The archiver and object store the admin operations use.
    pub archive: Option<Archive>,
    /// A directory of this listener's own for CSV and Parquet downloads, each written whole
    /// there (then unlinked while it is sent); emptied at start.
    pub spool: PathBuf,
    /// The chat audience (`auth.audience`), for bot tokens.
    pub chat_audience: String,
    /// The webhook routes' bounds and defaults (`[webhooks]`).
    pub webhooks: crate::webhooks::WebhooksConfig,
    /// The link to the other cells, for `/v1/admin/cells/*` (`None`: cells are off).
    pub cells: Option<Arc<crate::cells::Link>>,
}

impl Admin {
    /// Binds `listen` and serves until [`Admin::stop`]: HTTPS when `tls` is given
    /// (certificate reloaded from disk), plain HTTP otherwise. Health, readiness and
    /// metrics always; the compliance and admin routes with `services` (a process without
    /// them, `--role archiver`, answers 404 there).
    pub async fn start(
        listen: SocketAddr,
        tls: Option<ReloadingAcceptor>,
        health: Health,
        services: Option<Services>,
    ) -> std::io::Result<Admin> {
        let plane = match services {
            None => None,
            Some(services) => {
                download::clear_spool(&services.spool)?;
                Some(Arc::new(Plane {
                    verifier: services.verifier,
                    compliance: services.compliance,
                    requests: Arc::new(Semaphore::new(MAX_REQUESTS)),
                    log: services.log,
                    nats: services.nats,
                    archive: services.archive,
                    spool: services.spool,
                    chat_audience: services.chat_audience,
                    webhooks: services.webhooks,
                    cells: services.cells,
                }))
            }
        };
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State { health, plane });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(listener, state, tls, stopped));
        Ok(Admin { addr, stop, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets open requests finish for a few seconds, cuts off the rest and
    /// gives their searches a moment to record the outcome.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            warn!(error = %e, "admin listener ended abnormally");
        }
    }
}

async fn run(
    listener: TcpListener,
    state: Arc<State>,
    tls: Option<ReloadingAcceptor>,
    mut stopped: watch::Receiver<bool>,
) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut tasks = JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stopping(&mut stopped) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "admin listener failed to accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopping(&mut stopped) => break,
        };
        let state = state.clone();
        let stopped = stopped.clone();
        let tls = tls.clone();
        tasks.spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(stream, peer, state, stopped).await,
                // The handshake has its own deadline (the header read timeout starts after).
                Some(tls) => match tls.accept(stream, peer).await {
                    Ok(stream) => serve_connection(stream, peer, state, stopped).await,
                    Err(e) => debug!(error = %e, "admin tls handshake failed"),
                },
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        // Dropping a response stream makes its search fail at the next line, which it records.
        warn!(
            connections = tasks.len(),
            "admin connections still busy at shutdown; cutting them off"
        );
        tasks.abort_all();
    }
    if let Some(plane) = &state.plane {
        let _ = tokio::time::timeout(
            SEARCH_DRAIN,
            plane.requests.acquire_many(MAX_REQUESTS as u32),
        )
        .await;
    }
}

/// Serves HTTP/1.1 on one connection, plain or TLS, until it ends or stop is asked for.
async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    state: Arc<State>,
    mut stopped: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(&state, peer, req).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_BYTES);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = stopping(&mut stopped) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "admin connection ended with an error");
    }
}

/// Resolves once stop is asked for (or the [`Admin`] is gone).
async fn stopping(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Health,
    Ready,
    Metrics,
    Search,
    Export,
    Audit,
    Holds,
    HoldRelease,
    Revoke,
    Console,
    Admin(ops::Op),
    Webhooks(webhooks::Op),
}

impl Route {
    /// The action as the audit log names it.
    fn action(self) -> &'static str {
        match self {
            Route::Health => "healthz",
            Route::Ready => "readyz",
            Route::Metrics => "metrics",
            Route::Search => "search",
            Route::Export => "export",
            Route::Audit => "audit_read",
            Route::Holds => "holds",
            Route::HoldRelease => "hold_release",
            Route::Revoke => "token_revoke",
            Route::Console => "console",
            Route::Admin(op) => op.action(),
            Route::Webhooks(_) => "webhooks",
        }
    }

    /// The route as `tidings_admin_requests_total` counts it: its action, the bot
    /// operations as one (the label has a bounded set of values).
    fn metric_label(self) -> &'static str {
        match self {
            Route::Admin(op) if op.is_bots() => "bots",
            Route::Admin(op) if op.is_cells() => "cells",
            route => route.action(),
        }
    }

    /// The query parameters the route takes.
    fn parameters(self) -> &'static [&'static str] {
        match self {
            Route::Health | Route::Ready | Route::Metrics => &[],
            Route::Search => &["tenant", "conv", "sender", "from", "to", "text"],
            Route::Export => &["tenant", "conv", "sender", "from", "to", "text", "format"],
            Route::Audit | Route::Holds => &["tenant"],
            Route::Webhooks(op) => op.parameters(),
            Route::Revoke | Route::HoldRelease | Route::Console | Route::Admin(_) => &[],
        }
    }
}

/// Serves one request and counts it (`tidings_admin_*`).
async fn handle(state: &State, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let response = route(state, peer, req).await;
    let refused = match response.status().as_u16() {
        200..=399 => None,
        401 => Some("401"),
        403 => Some("403"),
        400 => Some("400"),
        503 => Some("503"),
        _ => Some("other"),
    };
    if let Some(status) = refused {
        crate::metrics::ADMIN_REFUSED.inc(status);
    }
    response
}

async fn route(state: &State, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let route = match req.uri().path() {
        "/healthz" => Route::Health,
        "/readyz" => Route::Ready,
        "/metrics" => Route::Metrics,
        "/v1/compliance/search" => Route::Search,
        "/v1/compliance/export" => Route::Export,
        "/v1/compliance/audit" => Route::Audit,
        "/v1/compliance/holds" => Route::Holds,
        "/v1/compliance/holds/release" => Route::HoldRelease,
        "/v1/admin/tokens/revoke" => Route::Revoke,
        path if path == "/console" || path.starts_with("/console/") => Route::Console,
        path => match (ops::Op::from_path(path), webhooks::Op::from_path(path)) {
            (Some(op), _) => Route::Admin(op),
            (None, Some(op)) => Route::Webhooks(op),
            (None, None) => {
                crate::metrics::ADMIN_REQUESTS.inc("other");
                return error(StatusCode::NOT_FOUND, "not_found", "no such route");
            }
        },
    };
    crate::metrics::ADMIN_REQUESTS.inc(route.metric_label());
    if matches!(route, Route::Health | Route::Ready | Route::Metrics) {
        if req.method() != Method::GET {
            return method_not_allowed("GET");
        }
        return match route {
            Route::Ready => ready(&state.health),
            Route::Metrics => full(
                StatusCode::OK,
                tidings_log::metrics::CONTENT_TYPE,
                tidings_log::metrics::render(),
            ),
            _ => full(StatusCode::OK, "text/plain; charset=utf-8", "ok".into()),
        };
    }
    let Some(state) = &state.plane else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this process serves health, readiness and metrics only",
        );
    };
    if route == Route::Revoke {
        if req.method() != Method::POST {
            return method_not_allowed("POST");
        }
        let (parts, body) = req.into_parts();
        return revoke_request(state, peer, &parts.headers, body).await;
    }
    if let Route::Admin(op) = route {
        if req.method() != Method::POST {
            return method_not_allowed("POST");
        }
        let (parts, body) = req.into_parts();
        return ops::request(state, peer, op, &parts.headers, body).await;
    }
    if let Route::Webhooks(op) = route {
        return webhooks::request(state, peer, op, req).await;
    }
    if route == Route::Console {
        return match req.method() {
            &Method::GET => crate::console::file(req.uri().path()),
            _ => method_not_allowed("GET"),
        };
    }
    if route == Route::HoldRelease || (route == Route::Holds && req.method() == Method::POST) {
        if req.method() != Method::POST {
            return method_not_allowed("POST");
        }
        let (parts, body) = req.into_parts();
        return hold_request(state, peer, route, &parts.headers, body).await;
    }
    if req.method() != Method::GET {
        return method_not_allowed("GET");
    }
    if !hyper::body::Body::is_end_stream(req.body()) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_not_allowed",
            "requests to the admin listener carry no body",
        );
    }
    let raw_query = req.uri().query().unwrap_or("");
    if raw_query.len() > MAX_QUERY_BYTES {
        return error(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            &format!("the query string is over {MAX_QUERY_BYTES} bytes"),
        );
    }
    match route {
        Route::Search | Route::Export | Route::Audit | Route::Holds => {
            compliance_request(state, peer, route, req.headers(), raw_query).await
        }
        Route::Health
        | Route::Ready
        | Route::Metrics
        | Route::Revoke
        | Route::HoldRelease
        | Route::Console
        | Route::Admin(_)
        | Route::Webhooks(_) => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    }
}

/// 405 with the one method the route takes.
fn method_not_allowed(allowed: &'static str) -> Response<Body> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("only {allowed} is allowed here"),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    response
}

/// Who a verified token says is asking.
struct Caller {
    tenant: TenantId,
    actor: Actor,
    compliance: bool,
    admin: bool,
    /// May move every tenant of a tier to this cell (`CELL_OPERATOR_ROLE`).
    cell_operator: bool,
}

impl Caller {
    /// Whether the token carries `role` (one of the roles above).
    fn holds(&self, role: &str) -> bool {
        match role {
            ADMIN_ROLE => self.admin,
            CELL_OPERATOR_ROLE => self.cell_operator,
            _ => self.compliance,
        }
    }
}

/// Checks the bearer token, then that it is not revoked. The error is for the process log
/// and the 401 answer; it never contains the token.
async fn authenticate(state: &Plane, headers: &HeaderMap) -> Result<Caller, String> {
    let (caller, claims) = verify_bearer(&state.verifier, headers)?;
    let user = UserId::new(claims.user.as_str()).map_err(|e| format!("token user: {e}"))?;
    let token = tidings_log::revocation::TokenRef {
        tenant: &caller.tenant,
        user: &user,
        jti: claims.jti.as_deref(),
        issued_at: claims.issued_at,
    };
    match state.log.is_revoked(token).await {
        Ok(false) => Ok(caller),
        Ok(true) => Err(tidings_auth::AuthError::Revoked.to_string()),
        // Fail closed: a token whose revocation cannot be checked is not served.
        Err(e) => Err(format!(
            "the token's revocation cannot be checked ({})",
            e.code()
        )),
    }
}

/// Checks the bearer token's signature and claims.
fn verify_bearer(
    verifier: &Verifier,
    headers: &HeaderMap,
) -> Result<(Caller, tidings_auth::Claims), String> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or("no Authorization header")?;
    if values.next().is_some() {
        return Err("more than one Authorization header".into());
    }
    let value = value
        .to_str()
        .map_err(|_| "the Authorization header is not visible ASCII")?;
    let token = match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => return Err("the Authorization header is not `Bearer <token>`".into()),
    };
    let claims = verifier
        .verify(token, tidings_log_api::now_secs())
        .map_err(|e| e.to_string())?;
    let tenant = TenantId::new(claims.tenant.as_str()).map_err(|e| format!("token tenant: {e}"))?;
    let user = UserId::new(claims.user.as_str()).map_err(|e| format!("token user: {e}"))?;
    // Two ids of up to 64 characters and a slash can be one over the actor limit; a request
    // that cannot be recorded under its actor is not served.
    let actor = Actor::new(&format!("{tenant}/{user}"), Via::Http)
        .map_err(|e| format!("token tenant and user as an actor: {e}"))?;
    let caller = Caller {
        tenant,
        actor,
        compliance: claims.roles.iter().any(|r| r == COMPLIANCE_ROLE),
        admin: claims.roles.iter().any(|r| r == ADMIN_ROLE),
        cell_operator: claims.roles.iter().any(|r| r == CELL_OPERATOR_ROLE),
    };
    Ok((caller, claims))
}

/// The 401 answer. Not in any audit log: an unauthenticated caller could fill any tenant's.
fn unauthenticated(peer: SocketAddr, action: &str, reason: &str) -> Response<Body> {
    warn!(%peer, action, %reason, "admin request refused: unauthenticated");
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        &format!("a valid bearer token is required ({reason})"),
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Reads a request body of at most [`MAX_BODY_BYTES`], within [`HEADER_READ_TIMEOUT`].
async fn read_body(body: Incoming) -> Result<Vec<u8>, Response<Body>> {
    let mut body = std::pin::pin!(body);
    let mut bytes = Vec::new();
    let read = async {
        while let Some(frame) =
            std::future::poll_fn(|cx| hyper::body::Body::poll_frame(body.as_mut(), cx)).await
        {
            let frame = frame.map_err(|_| {
                error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "the request body could not be read",
                )
            })?;
            if let Ok(data) = frame.into_data() {
                if bytes.len() + data.len() > MAX_BODY_BYTES {
                    return Err(error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too_large",
                        &format!("the request body is over {MAX_BODY_BYTES} bytes"),
                    ));
                }
                bytes.extend_from_slice(&data);
            }
        }
        Ok(())
    };
    let result = tokio::time::timeout(HEADER_READ_TIMEOUT, read).await;
    match result {
        Ok(Ok(())) => Ok(bytes),
        Ok(Err(response)) => Err(response),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "the request body did not arrive in time",
        )),
    }
}

/// A POST from a verified caller holding `role`, with its body (bounded). Unauthenticated:
/// 401, not recorded; without the role: 403, recorded in the caller's tenant.
async fn authorized_post(
    state: &Arc<Plane>,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: Incoming,
    action: &'static str,
    role: &'static str,
) -> Result<Posted, Response<Body>> {
    let caller = authenticate(state, headers)
        .await
        .map_err(|reason| unauthenticated(peer, action, &reason))?;
    let bytes = read_body(body).await?;
    let holds_role = caller.holds(role);
    let posted = Posted {
        filters: body_filters(&bytes),
        caller,
        bytes,
    };
    if !holds_role {
        let reason = format!("the token does not carry the {role} role");
        let refusal = posted.refusal(state, action);
        return Err(refusal.forbidden(&posted.caller.tenant, &reason).await);
    }
    Ok(posted)
}

/// A POST [`authorized_post`] let through: who sent it, its body, and the body as a refusal
/// records it.
struct Posted {
    caller: Caller,
    bytes: Vec<u8>,
    filters: String,
}

impl Posted {
    fn refusal<'a>(&'a self, state: &'a Plane, action: &'static str) -> Refusal<'a> {
        Refusal {
            state,
            actor: &self.caller.actor,
            action,
            filters: &self.filters,
        }
    }
}

/// A POST body's JSON object (an empty body is an empty object) and the tenant it names
/// (`"tenant"`, by default the caller's), which must be the caller's own. Refusals are
/// recorded: a malformed body in the caller's tenant, another tenant in that tenant's.
async fn own_tenant_body(
    refusal: &Refusal<'_>,
    caller: &Caller,
    bytes: &[u8],
) -> Result<(Map<String, Value>, TenantId), Response<Body>> {
    let fields = if bytes.is_empty() {
        Map::new()
    } else {
        match serde_json::from_slice(bytes) {
            Ok(Value::Object(fields)) => fields,
            _ => {
                let reason = "the body is not a JSON object";
                return Err(refusal.invalid(&caller.tenant, reason).await);
            }
        }
    };
    let named = fields.get("tenant").and_then(Value::as_str);
    let tenant = match named.map(TenantId::new).transpose() {
        Ok(t) => t.unwrap_or_else(|| caller.tenant.clone()),
        Err(e) => return Err(refusal.invalid(&caller.tenant, &e.to_string()).await),
    };
    if tenant != caller.tenant {
        let reason = format!(
            "a token of tenant {} may not {} for tenant {tenant}",
            caller.tenant, refusal.action
        );
        return Err(refusal.forbidden(&tenant, &reason).await);
    }
    Ok((fields, tenant))
}

/// A GET [`authorized_get`] let through: who asked, the query, the tenant it is about (the
/// caller's own) and the query as a refusal records it.
struct Got {
    caller: Caller,
    params: Params,
    tenant: TenantId,
    filters: String,
}

/// A GET from a verified caller holding `role`, its query parameters (only `allowed`) and
/// its `tenant` (by default the caller's), which must be the caller's own. Unauthenticated:
/// 401, not recorded; without the role: 403 in the caller's tenant; malformed: 400; another
/// tenant: 403 recorded where it was aimed (that tenant is the one that needs to know).
async fn authorized_get(
    state: &Arc<Plane>,
    peer: SocketAddr,
    headers: &HeaderMap,
    raw_query: &str,
    action: &'static str,
    allowed: &[&str],
    role: &'static str,
) -> Result<Got, Response<Body>> {
    let caller = authenticate(state, headers)
        .await
        .map_err(|reason| unauthenticated(peer, action, &reason))?;
    let params = parse_query(raw_query, allowed);
    let filters = match &params {
        Ok(params) => params_json(params),
        Err(_) => json!({ "query": raw_query }),
    }
    .to_string();
    let refusal = Refusal {
        state,
        actor: &caller.actor,
        action,
        filters: &filters,
    };
    let holds_role = caller.holds(role);
    if !holds_role {
        let reason = format!("the token does not carry the {role} role");
        return Err(refusal.forbidden(&caller.tenant, &reason).await);
    }
    let params = match params {
        Ok(params) => params,
        Err(reason) => return Err(refusal.invalid(&caller.tenant, &reason).await),
    };
    let tenant = match params.get("tenant") {
        None => caller.tenant.clone(),
        Some(t) => match TenantId::new(t.as_str()) {
            Ok(t) => t,
            Err(e) => return Err(refusal.invalid(&caller.tenant, &e.to_string()).await),
        },
    };
    if tenant != caller.tenant {
        let reason = format!(
            "a token of tenant {} may not read tenant {tenant}",
            caller.tenant
        );
        return Err(refusal.forbidden(&tenant, &reason).await);
    }
    Ok(Got {
        caller,
        params,
        tenant,
        filters,
    })
}

/// A request body as the audit log records it with a refusal (bounded).
fn body_filters(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).chars().take(1024).collect()
}

/// `POST /v1/admin/tokens/revoke`.
async fn revoke_request(
    state: &Arc<Plane>,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: Incoming,
) -> Response<Body> {
    let action = Route::Revoke.action();
    let posted = match authorized_post(state, peer, headers, body, action, ADMIN_ROLE).await {
        Ok(posted) => posted,
        Err(response) => return response,
    };
    let refusal = posted.refusal(state, action);
    let (caller, bytes) = (&posted.caller, &posted.bytes);
    let request = match crate::revoke::Request::from_json(bytes, tidings_log_api::now_secs()) {
        Ok(request) => request,
        Err(reason) => return refusal.invalid(&caller.tenant, &reason).await,
    };
    if request.tenant != caller.tenant {
        let reason = format!(
            "a token of tenant {} may not revoke tokens of tenant {}",
            caller.tenant, request.tenant
        );
        return refusal.forbidden(&request.tenant, &reason).await;
    }
    let outcome = match crate::revoke::revoke(&state.log, state.nats.as_ref(), &request).await {
        Ok(outcome) => outcome,
        Err(e) => {
            warn!(tenant = %request.tenant, code = e.code(), error = %e, "token revocation failed");
            let status = if e.is_retryable() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            return error(status, e.code(), "the revocation could not be recorded");
        }
    };
    let mut entry = Entry::new(&caller.actor, action, "completed");
    entry.access_id = uuid::Uuid::now_v7().to_string();
    entry.filters = posted.filters.clone();
    entry.detail = outcome.describe();
    if let Err(e) = state.compliance.record(&request.tenant, &entry).await {
        // The revocation stands; only its record is missing.
        error!(tenant = %request.tenant, error = %e, "failed to record a token revocation");
    }
    info!(tenant = %request.tenant, actor = caller.actor.name(), detail = %entry.detail, "tokens revoked");
    full(
        StatusCode::OK,
        "application/json",
        format!("{}\n", outcome.to_json()),
    )
}

/// `GET /v1/compliance/holds?tenant=`: the tenant's holds, active and released, as JSON
/// lines (hold records, no message content).
async fn list_holds(state: &Arc<Plane>, tenant: &TenantId) -> Response<Body> {
    match hold::list(
        &**state.compliance.store(),
        state.compliance.keyring(),
        tenant,
    )
    .await
    {
        Ok(holds) => {
            let lines: Vec<Value> = holds.iter().map(|h| hold::hold_json(tenant, h)).collect();
            json_lines(&lines)
        }
        Err(e) => failure(&e),
    }
}

/// `POST /v1/compliance/holds` `{"tenant"?, "conv"? | "user"?, "from"?, "to"?, "reason"}`
/// places a hold; `POST /v1/compliance/holds/release` `{"tenant"?, "id"}` releases one. The
/// compliance role, in the caller's own tenant; each recorded in the audit log (by
/// [`Compliance::create_hold`] and [`Compliance::release_hold`]), refusals too.
async fn hold_request(
    state: &Arc<Plane>,
    peer: SocketAddr,
    route: Route,
    headers: &HeaderMap,
    body: Incoming,
) -> Response<Body> {
    let action = if route == Route::HoldRelease {
        "hold_release"
    } else {
        "hold_create"
    };
    let posted = match authorized_post(state, peer, headers, body, action, COMPLIANCE_ROLE).await {
        Ok(posted) => posted,
        Err(response) => return response,
    };
    let refusal = posted.refusal(state, action);
    let (caller, bytes) = (&posted.caller, &posted.bytes);
    let (fields, target) = match own_tenant_body(&refusal, caller, bytes).await {
        Ok(parsed) => parsed,
        Err(response) => return response,
    };
    let text = |name: &str| fields.get(name).and_then(Value::as_str);
    let done = if route == Route::HoldRelease {
        let Some(id) = text("id") else {
            return refusal.invalid(&target, "id is required").await;
        };
        state
            .compliance
            .release_hold(&target, id, &caller.actor)
            .await
    } else {
        let spec = match hold_spec(&fields) {
            Ok(spec) => spec,
            Err(reason) => return refusal.invalid(&target, &reason).await,
        };
        state
            .compliance
            .create_hold(&target, &spec, &caller.actor)
            .await
    };
    match done {
        Ok(h) => full(
            StatusCode::OK,
            "application/json",
            format!("{}\n", hold::hold_json(&target, &h)),
        ),
        Err(ComplianceError::Invalid(reason)) => refusal.invalid(&target, &reason).await,
        Err(e) => failure(&e),
    }
}

/// A hold's scope, time range and reason from a request body.
fn hold_spec(fields: &Map<String, Value>) -> Result<HoldSpec, String> {
    let text = |name: &str| fields.get(name).and_then(Value::as_str);
    let time = |name: &str| {
        text(name)
            .map(|t| parse_time(t).map_err(|e| format!("{name}: {e}")))
            .transpose()
    };
    let scope = match (text("conv"), text("user")) {
        (Some(_), Some(_)) => return Err("a hold names a conv or a user, not both".into()),
        (Some(c), None) => Scope::Conversation(ConvId::new(c).map_err(|e| e.to_string())?),
        (None, Some(u)) => Scope::User(UserId::new(u).map_err(|e| e.to_string())?),
        (None, None) => Scope::Tenant,
    };
    Ok(HoldSpec {
        scope,
        from_ms: time("from")?,
        to_ms: time("to")?,
        reason: text("reason").unwrap_or("").to_string(),
    })
}

async fn compliance_request(
    state: &Arc<Plane>,
    peer: SocketAddr,
    route: Route,
    headers: &HeaderMap,
    raw_query: &str,
) -> Response<Body> {
    let action = route.action();
    let got = match authorized_get(
        state,
        peer,
        headers,
        raw_query,
        action,
        route.parameters(),
        COMPLIANCE_ROLE,
    )
    .await
    {
        Ok(got) => got,
        Err(response) => return response,
    };
    let Got {
        caller,
        params,
        tenant: target,
        filters,
    } = got;
    let refusal = Refusal {
        state,
        actor: &caller.actor,
        action,
        filters: &filters,
    };
    match route {
        Route::Search => match search_query(&params, target.clone()) {
            Ok(query) => search(state, query, caller.actor.clone(), Action::Search),
            Err(reason) => refusal.invalid(&target, &reason).await,
        },
        Route::Export => {
            let query = search_query(&params, target.clone());
            match (query, download::format(&params)) {
                (Ok(query), Ok(Format::Jsonl)) => {
                    // The download is the destination the audit log names.
                    let action = Action::Export {
                        destination: "http download (jsonl)".into(),
                    };
                    let mut response = search(state, query, caller.actor.clone(), action);
                    if response.status() == StatusCode::OK {
                        let disposition =
                            format!("attachment; filename=\"tidings-{target}.jsonl\"");
                        if let Ok(value) = HeaderValue::from_str(&disposition) {
                            response
                                .headers_mut()
                                .insert(header::CONTENT_DISPOSITION, value);
                        }
                    }
                    response
                }
                (Ok(query), Ok(format)) => {
                    download::whole(state, query, caller.actor.clone(), format).await
                }
                (Err(reason), _) | (_, Err(reason)) => refusal.invalid(&target, &reason).await,
            }
        }
        Route::Audit => read_audit(state, target, caller.actor.clone(), filters.clone()).await,
        Route::Holds => list_holds(state, &target).await,
        Route::Health
        | Route::Ready
        | Route::Metrics
        | Route::Revoke
        | Route::HoldRelease
        | Route::Console
        | Route::Admin(_)
        | Route::Webhooks(_) => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    }
}

/// Refuses a verified caller's request and records it in a tenant's audit log. The refusal
/// stands even if it cannot be recorded.
struct Refusal<'a> {
    state: &'a Plane,
    actor: &'a Actor,
    action: &'static str,
    filters: &'a str,
}

impl Refusal<'_> {
    async fn forbidden(&self, tenant: &TenantId, reason: &str) -> Response<Body> {
        self.refuse(tenant, StatusCode::FORBIDDEN, "forbidden", reason)
            .await
    }

    async fn invalid(&self, tenant: &TenantId, reason: &str) -> Response<Body> {
        self.refuse(tenant, StatusCode::BAD_REQUEST, "invalid_request", reason)
            .await
    }

    async fn refuse(
        &self,
        tenant: &TenantId,
        status: StatusCode,
        code: &str,
        reason: &str,
    ) -> Response<Body> {
        let actor = self.actor.name();
        let action = self.action;
        info!(%tenant, actor, action, code, reason, "compliance request refused");
        if let Err(e) = self
            .state
            .compliance
            .deny(tenant, self.actor, action, self.filters.to_string(), reason)
            .await
        {
            error!(%tenant, actor, action, error = %e, "failed to record a refused compliance request");
        }
        error(status, code, reason)
    }
}

/// The search's filters, each checked with the type that will carry it.
fn search_query(params: &Params, tenant: TenantId) -> Result<Query, String> {
    let get = |name: &str| params.get(name).map(String::as_str);
    let time = |name: &str| {
        get(name)
            .map(|t| parse_time(t).map_err(|e| format!("{name}: {e}")))
            .transpose()
    };
    let query = Query {
        tenant: Some(tenant),
        conv: get("conv")
            .map(ConvId::new)
            .transpose()
            .map_err(|e| e.to_string())?,
        sender: get("sender")
            .map(UserId::new)
            .transpose()
            .map_err(|e| e.to_string())?,
        from_ms: time("from")?,
        to_ms: time("to")?,
        text: get("text").map(str::to_string),
    };
    match query.validate() {
        Ok(_) => Ok(query),
        Err(ComplianceError::Invalid(reason)) => Err(reason),
        Err(e) => Err(e.to_string()),
    }
}

/// Starts the search beside the response: the response body reads the channel as the client
/// takes bytes, and a full channel pauses the scan. The status is 200 from here on; the
/// last line says how it ended.
fn search(state: &Arc<Plane>, query: Query, actor: Actor, action: Action) -> Response<Body> {
    let Ok(permit) = state.requests.clone().try_acquire_owned() else {
        return busy();
    };
    let (tx, rx) = mpsc::channel(STREAM_LINES);
    let state = state.clone();
    tokio::spawn(async move {
        let mut sink = LineSink { tx };
        let progress = Progress::default();
        let last = match state
            .compliance
            .search(&query, &actor, &action, &progress, &mut sink)
            .await
        {
            Ok(rows) => {
                crate::metrics::COMPLIANCE_QUERIES.inc("complete");
                json!({ "complete": true, "rows": rows })
            }
            Err(e) => {
                crate::metrics::COMPLIANCE_QUERIES.inc("failed");
                warn!(actor = actor.name(), code = e.code(), error = %e, "compliance search failed");
                error_json(e.code(), &e.to_string())
            }
        };
        // If the client is gone there is nobody to tell; the audit log has the outcome.
        let _ = sink.send(&last).await;
        drop(permit);
    });
    ndjson(rx)
}

/// Records the read (nothing is read if that fails), then streams the records as they are
/// read and checked, a page at a time (memory bounded by a page and the line channel,
/// however long the log), then records the outcome. As for a search, the status is 200
/// from the first record on and the last line says how it ended.
async fn read_audit(
    state: &Arc<Plane>,
    tenant: TenantId,
    actor: Actor,
    filters: String,
) -> Response<Body> {
    let Ok(permit) = state.requests.clone().try_acquire_owned() else {
        return busy();
    };
    let mut entry = Entry::new(&actor, Route::Audit.action(), "started");
    entry.access_id = uuid::Uuid::now_v7().to_string();
    entry.filters = filters;
    if let Err(e) = state.compliance.record(&tenant, &entry).await {
        return failure(&e);
    }
    let (tx, rx) = mpsc::channel(STREAM_LINES);
    let state = state.clone();
    tokio::spawn(async move {
        let compliance = &state.compliance;
        let sink = LineSink { tx };
        // Why the client stopped taking lines, if it did (set inside the reader's callback).
        let cut: std::sync::Mutex<Option<ComplianceError>> = std::sync::Mutex::default();
        let result = audit::read_each(
            &**compliance.store(),
            compliance.keyring(),
            &tenant,
            |record| {
                let line = audit::record_json(&tenant, &record);
                let (sink, cut) = (&sink, &cut);
                async move {
                    match sink.send(&line).await {
                        Ok(()) => true,
                        Err(e) => {
                            *cut.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                            false
                        }
                    }
                }
            },
        )
        .await
        .map_err(ComplianceError::from);
        let cut = cut.into_inner().unwrap_or_else(|p| p.into_inner());
        let result = match (result, cut) {
            (Ok(checked), None) => Ok(checked),
            (Ok(_), Some(e)) | (Err(e), _) => Err(e),
        };
        match &result {
            Ok(checked) => {
                crate::metrics::COMPLIANCE_QUERIES.inc("complete");
                entry.outcome = "completed".into();
                entry.rows = checked.rows;
            }
            Err(e) => {
                crate::metrics::COMPLIANCE_QUERIES.inc("failed");
                entry.outcome = "failed".into();
                entry.detail = format!("{}: {e}", e.code());
            }
        }
        let recorded = compliance.record(&tenant, &entry).await;
        drop(permit);
        let last = match (result, recorded) {
            (Ok(checked), Ok(_)) => json!({
                "complete": true,
                "rows": checked.rows,
                "problems": checked.problems,
            }),
            (Err(e), _) | (Ok(_), Err(e)) => {
                warn!(actor = actor.name(), code = e.code(), error = %e, "audit log read failed");
                error_json(e.code(), &e.to_string())
            }
        };
        let _ = sink.send(&last).await;
    });
    ndjson(rx)
}

/// Hits as JSON lines into the response's channel.
struct LineSink {
    tx: mpsc::Sender<Bytes>,
}

impl LineSink {
    async fn send(&self, value: &Value) -> Result<(), ComplianceError> {
        let mut line = value.to_string();
        line.push('\n');
        let gone = |reason: &str| ComplianceError::Delivery {
            to: "the HTTP client".into(),
            reason: reason.into(),
        };
        match tokio::time::timeout(SEND_TIMEOUT, self.tx.send(Bytes::from(line))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(gone(
                "it was closed (the client went away, or the server is shutting down)",
            )),
            Err(_) => Err(gone(&format!(
                "the client took nothing for {} s",
                SEND_TIMEOUT.as_secs()
            ))),
        }
    }
}

#[async_trait::async_trait]
impl Sink for LineSink {
    async fn hit(&mut self, hit: Hit) -> Result<(), ComplianceError> {
        self.send(&hit_json(&hit)).await
    }
}

/// Decoded query parameters, each at most once, only those a route takes.
type Params = std::collections::BTreeMap<String, String>;

fn parse_query(raw: &str, allowed: &[&str]) -> Result<Params, String> {
    let mut params = Params::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(name)?;
        let value = percent_decode(value)?;
        if !allowed.contains(&name.as_str()) {
            return Err(format!(
                "unknown parameter {name:?} (known: {})",
                allowed.join(", ")
            ));
        }
        if params.contains_key(&name) {
            return Err(format!("parameter {name:?} is given more than once"));
        }
        params.insert(name, value);
    }
    Ok(params)
}

fn params_json(params: &Params) -> Value {
    Value::Object(
        params
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect::<Map<_, _>>(),
    )
}

/// `%XX` escapes and `+` for a space (as HTML forms and most clients encode queries); the
/// result must be UTF-8. Anything malformed is refused, never guessed at.
fn percent_decode(text: &str) -> Result<String, String> {
    let bad = || format!("{text:?} is not a well-formed percent-encoded query value");
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
                let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} does not decode to UTF-8"))
}

/// A response body: all at once, or lines as a task produces them.
pub enum Body {
    Full(Option<Bytes>),
    Lines(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Lines(rx) => rx
                .poll_recv(cx)
                .map(|line| line.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Lines(_) => SizeHint::default(),
        }
    }
}

fn response(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Compliance answers carry message content; no cache on the way may keep them.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `/readyz`: 200 when every probe is up, 503 naming those down and why.
fn ready(health: &Health) -> Response<Body> {
    let down = health.down();
    if down.is_empty() {
        return full(
            StatusCode::OK,
            "application/json",
            "{\"ready\":true}\n".into(),
        );
    }
    let down: Map<String, Value> = down
        .into_iter()
        .map(|(name, why)| (name, Value::String(why)))
        .collect();
    full(
        StatusCode::SERVICE_UNAVAILABLE,
        "application/json",
        format!("{}\n", json!({ "ready": false, "down": down })),
    )
}

fn full(status: StatusCode, content_type: &'static str, text: String) -> Response<Body> {
    response(status, content_type, Body::Full(Some(Bytes::from(text))))
}

/// A whole answer (for the console's files).
pub(crate) fn full_response(
    status: StatusCode,
    content_type: &'static str,
    text: String,
) -> Response<Body> {
    full(status, content_type, text)
}

fn ndjson(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    response(StatusCode::OK, "application/x-ndjson", Body::Lines(rx))
}

/// JSON lines, then `{"complete":true,"rows":N}` (a whole, small answer).
fn json_lines(lines: &[Value]) -> Response<Body> {
    let mut text = String::new();
    for line in lines {
        text.push_str(&line.to_string());
        text.push('\n');
    }
    text.push_str(&format!(
        "{}\n",
        json!({ "complete": true, "rows": lines.len() })
    ));
    full(StatusCode::OK, "application/x-ndjson", text)
}

fn error_json(code: &str, message: &str) -> Value {
    json!({ "error": { "code": code, "message": message } })
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    full(
        status,
        "application/json",
        format!("{}\n", error_json(code, message)),
    )
}

fn busy() -> Response<Body> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
        &format!("{MAX_REQUESTS} compliance requests are running; try again shortly"),
    )
}

/// A failure before any line was sent.
fn failure(e: &ComplianceError) -> Response<Body> {
    let status = match e {
        ComplianceError::Invalid(_) => StatusCode::BAD_REQUEST,
        ComplianceError::Forbidden(_) | ComplianceError::Held(_) => StatusCode::FORBIDDEN,
        _ if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    warn!(code = e.code(), error = %e, "compliance request failed");
    error(status, e.code(), &e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_a_value_of_the_request_counter() {
        for route in [
            Route::Health,
            Route::Ready,
            Route::Metrics,
            Route::Search,
            Route::Export,
            Route::Audit,
            Route::Holds,
            Route::HoldRelease,
            Route::Revoke,
            Route::Console,
            Route::Admin(ops::Op::Rotate),
            Route::Admin(ops::Op::Wrap),
            Route::Admin(ops::Op::Shred),
            Route::Admin(ops::Op::ArchiveRun),
            Route::Admin(ops::Op::ArchiveVerify),
            Route::Webhooks(webhooks::Op::Subscriptions),
            Route::Webhooks(webhooks::Op::Dead),
        ] {
            assert!(
                crate::metrics::ADMIN_REQUESTS.knows(route.action()),
                "{route:?}"
            );
        }
    }

    #[test]
    fn query_values_are_percent_decoded_strictly() {
        let p = parse_query(
            "tenant=acme&text=caf%C3%A9+au+lait%2B&from=2026-11-29T08%3A30%3A00Z&&conv=",
            Route::Search.parameters(),
        )
        .expect("parses");
        assert_eq!(p["tenant"], "acme");
        assert_eq!(p["text"], "café au lait+");
        assert_eq!(p["from"], "2026-11-29T08:30:00Z");
        assert_eq!(p["conv"], "");
        for bad in [
            "text=%",
            "text=%4",
            "text=%zz",
            "text=%FF",
            "tenant=a&tenant=b",
            "limit=3",
        ] {
            assert!(
                parse_query(bad, Route::Search.parameters()).is_err(),
                "{bad:?} parsed"
            );
        }
        assert!(parse_query("conv=x", Route::Audit.parameters()).is_err());
    }

    #[test]
    fn filters_are_checked_with_the_id_and_time_types() {
        let tenant = TenantId::new("acme").expect("id");
        let params = |q: &str| parse_query(q, Route::Search.parameters()).expect("parses");
        let q = search_query(
            &params("conv=team&sender=bob&from=2026-11-29&to=2026-11-30&text=x"),
            tenant.clone(),
        )
        .expect("valid");
        assert_eq!(q.conv.as_ref().map(ConvId::as_str), Some("team"));
        assert_eq!(q.from_ms, Some(1_795_910_400_000));
        for bad in [
            "conv=a%2Fb",
            "sender=",
            "from=yesterday",
            "from=2026-11-30&to=2026-11-29",
            "text=",
        ] {
            assert!(
                search_query(&params(bad), tenant.clone()).is_err(),
                "{bad:?} accepted"
            );
        }
    }
}
