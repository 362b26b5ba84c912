//! The tidings log served on NATS (`tidings serve --role log`, and the log half of one
//! process): what turns the log library into the service gateways call.
//!
//! # Layout
//! - [`publisher`]: the log's commit feed, sealed, delivered to JetStream and to users'
//!   notice subjects.
//! - [`rpc_server`]: the log's side of [`tidings_log_api::rpc`]: calls opened, checked and
//!   executed against the log, replies sealed.
//! - [`rpc_identity`]: the log's check of who a call acts for: the user's token, verified
//!   (and cached), never a name in the payload.
//! - [`send_buffer_stream`]: the log's send buffer on a JetStream stream, for writers on
//!   several hosts (the KV-outage path; the local-file medium is in `tidings_log`).

pub mod publisher;
pub mod rpc_identity;
pub mod rpc_server;
pub mod send_buffer_stream;

#[cfg(test)]
mod bus_crypto_tests;
