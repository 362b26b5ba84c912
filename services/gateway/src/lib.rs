//! The tidings gateway: clients over WebSocket, events over NATS. It reaches the log only
//! through [`tidings_log_api`] (the `LogService` interface, in this process or over NATS),
//! so a gateway build has no store and no sequencer in it.
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
//! - [`shed`]: sends to a conversation the log is limiting (overload) refused at the edge
//!   until its window ends.
//! - [`revocation`]: revoked tokens at the gateway: the Hello check, the notices on
//!   `tidings.revoked.<tenant>` that end live sessions at once, and a periodic re-check.
//! - [`resubscribe`]: a core NATS subscription made again when the server removes it.
//! - [`metrics`]: the gateway's Prometheus metrics (send and fan-out latency, sessions,
//!   rate limiting, admission).
//! - [`tls`]: TLS for the edge listeners (wss://, https://), reloaded from disk.
//!
//! The protocol itself is documented in `schemas/proto/tidings/client/v1/client.proto`.

pub mod admission;
pub mod bot_http;
pub mod http;
pub mod hub;
pub mod member_list;
pub mod members;
pub mod metrics;
pub mod pacing;
pub mod resubscribe;
pub mod revocation;
pub mod server;
pub mod session;
pub mod shed;
pub mod tls;
pub mod web;

pub use server::{GatewayConfig, Shared, run};
