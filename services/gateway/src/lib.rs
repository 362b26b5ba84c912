//! The tidings gateway: clients over WebSocket, events over NATS.
//!
//! # Layout
//! - [`server`]: the listener, [`GatewayConfig`](server::GatewayConfig), the shared state,
//!   and the NATS connection with reconnect notifications.
//! - [`session`]: one connection — handshake, Hello, then requests in order; typed errors and
//!   close codes for bad input.
//! - [`hub`]: per-conversation fan-out: one NATS subscription per conversation per gateway,
//!   reference counted; events delivered in seq order, once, gaps filled from the log.
//! - [`service`]: the [`LogService`](service::LogService) interface and its in-process
//!   implementation over [`tidings_log::Log`].
//! - [`rpc`]: the same interface over NATS request/reply, client and server sides.
//! - [`publisher`]: the log's commit feed delivered to JetStream and to users' notice
//!   subjects.
//! - [`revocation`]: revoked tokens at the gateway: the Hello check, the notices on
//!   `tidings.revoked.<tenant>` that end live sessions at once, and a periodic re-check.
//! - [`subjects`]: NATS subject names.
//!
//! The protocol itself is documented in `schemas/proto/tidings/client/v1/client.proto`.

pub mod hub;
pub mod publisher;
pub mod revocation;
pub mod rpc;
pub mod server;
pub mod service;
pub mod session;
pub mod subjects;

pub use server::{GatewayConfig, Shared, connect_nats, run};
pub use service::LogService;

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
