//! The end-to-end tests: one test binary (`cargo test -p tidings --test e2e`) whose modules
//! are the files beside this one, each a suite of its own (`cargo test -p tidings --test e2e
//! cli::` runs tests/cli.rs). One binary links the server and compiles `common/` once, where
//! a binary per file did it 26 times (docs/decisions/one-test-binary.md).
//!
//! The tests of every file run in one process, two at a time on two cores, as they did within
//! a file. What a process holds for all of them is shared here, so a test never counts on
//! having it alone: environment variables are passed to the child processes, never set in
//! this one; writer ids are unique per process; file descriptors for thousands of client
//! sockets are taken from [`common::hold_sockets`].
//!
//! A new file here is a new `mod` line below; nothing else runs it.

mod common;

mod admin;
mod archive;
mod bots;
mod bus_sealed;
mod bus_security;
mod cells;
mod chat;
mod cli;
mod compliance;
mod crash;
mod gateway;
mod hostile;
mod interceptors;
mod large_group;
mod member_cache;
mod metrics;
mod outage;
mod overload;
mod scale;
mod scenarios;
mod search;
mod send_buffer_stream;
mod supervision;
mod tls;
mod tokens;
mod web;
mod webhooks;
