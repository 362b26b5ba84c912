//! The tidings gateway: clients over WebSocket, events over NATS.
//!
//! # Layout
//! - [`server`]: the listener, [`GatewayConfig`](server::GatewayConfig), the shared state,
//!   and the NATS connection with reconnect notifications.
//! - [`http`]: the listener's plain HTTP beside `/v1/ws`: health, readiness, metrics and
//!   the web client ([`web`]: its files compiled in, the development sign-in).
//! - [`admission`]: the global, per-IP and per-user caps on connections and sessions, held
//!   by RAII permits.
//! - [`session`]: one connection — handshake, Hello, then requests in order; typed errors and
//!   close codes for bad input.
//! - [`hub`]: per-conversation fan-out: one NATS subscription per conversation per gateway,
//!   reference counted; events delivered in seq order, once, gaps filled from the log.
//! - [`members`]: the member cache of the conversations followed here (membership answers
//!   and [`member_list`]s: pages and @-list search from memory), kept true by their hubs in
//!   seq order, bounded in bytes.
//! - [`service`]: the [`LogService`](service::LogService) interface and its in-process
//!   implementation over [`tidings_log::Log`].
//! - [`rpc`]: the same interface over NATS request/reply, client and server sides; calls and
//!   replies sealed.
//! - [`rpc_identity`]: the log's check of who a call acts for: the user's token, verified
//!   (and cached), never a name in the payload.
//! - [`bus_crypto`]: sealing on NATS under tenant transport keys (event envelopes, RPC
//!   payloads, the X25519 key exchange) and the gateway's bounded key cache.
//! - [`publisher`]: the log's commit feed, sealed, delivered to JetStream and to users'
//!   notice subjects.
//! - [`shed`]: sends to a conversation the log is limiting (overload) refused at the edge
//!   until its window ends.
//! - [`revocation`]: revoked tokens at the gateway: the Hello check, the notices on
//!   `tidings.revoked.<tenant>` that end live sessions at once, and a periodic re-check.
//! - [`send_buffer_stream`]: the log's send buffer on a JetStream stream, for writers on
//!   several hosts (the KV-outage path; the local-file medium is in `tidings_log`).
//! - [`resubscribe`]: a core NATS subscription made again when the server removes it.
//! - [`health`]: the named probes `/readyz` reports.
//! - [`metrics`]: the gateway's Prometheus metrics (send and fan-out latency, sessions,
//!   rate limiting, admission).
//! - [`subjects`]: NATS subject names.
//! - [`nats`]: connecting to NATS with a role's credential and TLS; URL redaction.
//! - [`tls`]: TLS for the edge listeners (wss://, https://), reloaded from disk.
//!
//! The protocol itself is documented in `schemas/proto/tidings/client/v1/client.proto`.

pub mod admission;
pub mod bot_http;
pub mod bus_crypto;
pub mod health;
pub mod http;
pub mod hub;
pub mod member_list;
pub mod members;
pub mod metrics;
pub mod nats;
pub mod pacing;
pub mod publisher;
pub mod resubscribe;
pub mod revocation;
pub mod rpc;
pub mod rpc_identity;
pub mod send_buffer_stream;
pub mod server;
pub mod service;
pub mod session;
pub mod shed;
pub mod subjects;
pub mod tls;
pub mod web;

pub use nats::{BusEvents, NatsAuth, NatsConnect, connect_nats, redact_url};
pub use server::{GatewayConfig, Shared, run};
pub use service::{Caller, LogService};

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
