//! The tidings gateway: clients over WebSocket, events over NATS. It reaches the log only
//! through [`tidings_log_api`] (the `LogService` interface, in this process or over NATS),
//! so a gateway build has no store and no sequencer in it.
//!
//! # Layout
//! - [`config`]: [`GatewayConfig`], the `[gateway]` settings.
//! - [`shared`]: the state every session shares (settings, the log, NATS, the registry of
//!   sessions and hubs, admission, revocations) and the metrics read from it.
//! - [`server`]: the listener: accepts connections and hands each to a session.
//! - [`http`]: the listener's plain HTTP beside `/v1/ws`: health, readiness, metrics and
//!   the web client ([`web`]: its files compiled in, the development sign-in), bots' posts
//!   ([`bot_http`]); [`http_answer`] is the request head and answer they share.
//! - [`admission`]: the global, per-IP and per-user caps on connections and sessions, held
//!   by RAII permits.
//! - [`session`]: one connection — handshake, Hello, then requests in order; typed errors and
//!   close codes for bad input.
//! - [`errors`]: what a client is told when the log refuses or fails a request (a code, a
//!   fixed message, a trace id for the server's own failures).
//! - [`hub`]: per-conversation fan-out: one NATS subscription per conversation per gateway,
//!   reference counted; events delivered in seq order, once, gaps filled from the log.
//! - [`members`]: the member cache of the conversations followed here (membership answers
//!   and [`member_list`]s: pages and @-list search from memory), kept true by their hubs in
//!   seq order, bounded in bytes.
//! - [`shed`]: sends to a conversation the log is limiting (overload) refused at the edge
//!   until its window ends.
//! - [`revocation`]: revoked tokens at the gateway: the records the Hello check reads and
//!   the notices on `tidings.revoked.<tenant>`; [`revocation_watch`] ends live sessions on
//!   a notice at once, and re-checks them periodically.
//! - [`resubscribe`]: a core NATS subscription made again when the server removes it.
//! - [`metrics`]: the gateway's Prometheus metrics (send and fan-out latency, sessions,
//!   rate limiting, admission).
//! - [`tls`]: TLS for the edge listeners (wss://, https://), reloaded from disk.
//!
//! The protocol itself is documented in `schemas/proto/tidings/client/v1/client.proto`.

pub mod admission;
pub mod bot_http;
pub mod config;
pub mod errors;
pub mod http;
pub mod http_answer;
pub mod hub;
pub mod member_list;
pub mod members;
pub mod metrics;
pub mod pacing;
pub mod resubscribe;
pub mod revocation;
pub mod revocation_watch;
pub mod server;
pub mod session;
pub mod shared;
pub mod shed;
pub mod tls;
pub mod web;

pub use config::GatewayConfig;
pub use server::run;
pub use shared::Shared;
