//! The compliance console: static files on the admin listener at `/console/`, compiled into
//! the binary (`services/server/console/`), plain JavaScript over the admin API. The page
//! holds no power of its own: every request carries the officer's compliance token and is
//! checked and audited by [`crate::admin`] exactly as from curl.

use hyper::Response;
use hyper::StatusCode;
use hyper::header::{self, HeaderValue};

use crate::admin::{Body, full_response};

const FILES: &[(&str, &str, &str)] = &[
    (
        "/console",
        "text/html; charset=utf-8",
        include_str!("../console/index.html"),
    ),
    (
        "/console/",
        "text/html; charset=utf-8",
        include_str!("../console/index.html"),
    ),
    (
        "/console/console.js",
        "text/javascript; charset=utf-8",
        include_str!("../console/console.js"),
    ),
    (
        "/console/style.css",
        "text/css; charset=utf-8",
        include_str!("../console/style.css"),
    ),
];

/// `GET /console/...`, with the web client's strict Content-Security-Policy.
pub fn file(path: &str) -> Response<Body> {
    let Some((_, content_type, text)) = FILES.iter().find(|(p, _, _)| *p == path) else {
        return full_response(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".into(),
        );
    };
    let mut response = full_response(StatusCode::OK, content_type, (*text).into());
    let headers = response.headers_mut();
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(tidings_gateway::web::CSP),
    );
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
