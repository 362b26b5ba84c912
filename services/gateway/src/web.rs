//! The web client's files, compiled into the binary (`services/gateway/web/`: plain
//! JavaScript, no build step), and the development sign-in.
//!
//! Every file is served with a Content-Security-Policy that allows scripts, styles and
//! connections from this origin only and nothing inline: a message body that holds markup
//! can at worst be shown as text (the client renders bodies with `textContent`, never as
//! HTML), and even a bug that put it into the page could not run a script.

use std::net::SocketAddr;

use crate::http_answer::Answer;

/// The policy every page and file of the client is served with.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                       connect-src 'self'; img-src 'self'; base-uri 'none'; \
                       form-action 'none'; frame-ancestors 'none'";

/// The client's files: path under `/app/`, content type, content.
const FILES: &[(&str, &str, &str)] = &[
    (
        "",
        "text/html; charset=utf-8",
        include_str!("../web/index.html"),
    ),
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../web/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../web/app.js"),
    ),
    (
        "proto.js",
        "text/javascript; charset=utf-8",
        include_str!("../web/proto.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../web/style.css"),
    ),
];

/// `GET /app/<name>`.
pub fn file(path: &str) -> Answer {
    let name = path.strip_prefix("/app/").unwrap_or("");
    let Some((_, content_type, body)) = FILES.iter().find(|(n, _, _)| *n == name) else {
        return Answer::error(404, "not found");
    };
    let mut answer = Answer::ok(content_type, *body);
    secure(&mut answer);
    answer
}

/// The headers every answer of the client carries.
fn secure(answer: &mut Answer) {
    answer.headers.push(("Content-Security-Policy", CSP.into()));
    answer.headers.push(("X-Frame-Options", "DENY".into()));
    answer.headers.push(("Cache-Control", "no-cache".into()));
}

/// What the development sign-in issues tokens with; set only when the server accepts HS256
/// development tokens.
#[derive(Clone)]
pub struct DevTokens {
    pub secret: Vec<u8>,
    pub issuer: String,
    pub audience: String,
    pub ttl_secs: u64,
}

impl std::fmt::Debug for DevTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevTokens")
            .field("secret", &"<redacted>")
            .field("issuer", &self.issuer)
            .finish()
    }
}

/// `POST /app/dev-token?tenant=T&user=U`: a chat token for anyone who asks, so only in
/// development mode (404 otherwise) and only to a client on this machine (403 otherwise):
/// a development server on a shared network must not hand out every user's identity.
pub fn dev_token(dev: Option<&DevTokens>, peer: SocketAddr, query: &str) -> Answer {
    let Some(dev) = dev else {
        return Answer::error(404, "not found");
    };
    if !peer.ip().is_loopback() {
        return Answer::error(
            403,
            "development tokens are issued to loopback clients only",
        );
    }
    let mut tenant = None;
    let mut user = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("tenant", v)) => tenant = Some(v),
            Some(("user", v)) => user = Some(v),
            _ => {}
        }
    }
    let (Some(tenant), Some(user)) = (tenant, user) else {
        return Answer::error(400, "tenant and user are required");
    };
    // Ids are plain ASCII (no escapes needed); anything else is refused by the id check.
    let (tenant, user) = match (
        tidings_log_api::TenantId::new(tenant),
        tidings_log_api::UserId::new(user),
    ) {
        (Ok(t), Ok(u)) => (t, u),
        (Err(e), _) | (_, Err(e)) => return Answer::error(400, &e.to_string()),
    };
    let now = tidings_log_api::now_secs();
    let claims = tidings_auth::Claims {
        tenant: tenant.to_string(),
        user: user.to_string(),
        roles: Vec::new(),
        expires_at: now + dev.ttl_secs,
        issued_at: now,
        jti: Some(uuid::Uuid::now_v7().to_string()),
    };
    let token = tidings_auth::issue_hs256(&dev.secret, &dev.issuer, &dev.audience, &claims);
    let mut answer = Answer::ok(
        "application/json",
        format!("{}\n", serde_json::json!({ "token": token })),
    );
    secure(&mut answer);
    answer.headers[2].1 = "no-store".into();
    answer
}
