//! The `tidings` binary's library: everything `main` does, testable without a process.
//!
//! # Layout
//! - [`cli`]: the command line (clap); it imports nothing else of the crate.
//! - [`config`]: TOML file plus `TIDINGS_*` environment overrides.
//! - [`commands`]: the tool commands (`keys`, `conv`, `log`).
//! - [`serve`]: `tidings serve --role all|log|gateway|archiver`.
//! - [`supervise`]: the tasks of `serve`, owned, restarted or fatal, and `/readyz`.
//! - [`admin`]: the admin HTTP listener of `serve`: health, compliance search, audit log.
//! - [`metrics`]: `/metrics`: the archiver's and admin listener's metrics and the collectors
//!   that read a running log, publisher and gateway.
//! - [`console`]: the compliance console's files, served by the admin listener.
//! - [`archive`]: `tidings archive run|inspect|verify` and the periodic archiver of `serve`.
//! - [`chat`]: `tidings chat`, a terminal client.
//! - [`open`]: opening the store and the log as every command and role does (the tools,
//!   `serve`, the compliance commands), so none of them imports another to get there.
//! - [`nats_init`]: `tidings nats init`: a NATS identity per role and its permissions.
//! - [`bench`](mod@bench), [`bench_gateway`], [`bench_archive`], [`bench_compliance`],
//!   [`bench_outage`], [`bench_overload`], [`bench_members`], [`bench_search`], [`bench_webhooks`]: `tidings bench`,
//!   tidings against its baselines in one run; [`bench_corpus`]: the chat corpus and
//!   plaintext Parquet baseline they share.
//! - [`output`]: the JSON lines the tools print.
//! - [`revoke`]: token revocation, shared by `tidings token revoke` and the admin listener.
//! - [`webhooks`]: outgoing webhooks: managing subscriptions (CLI and admin listener), the
//!   signed request, and the dispatcher of `serve`.

pub mod admin;
pub mod archive;
pub mod bench;
pub mod bench_archive;
pub mod bench_cells;
pub mod bench_compliance;
pub mod bench_corpus;
pub mod bench_gateway;
pub mod bench_members;
pub mod bench_outage;
pub mod bench_overload;
pub mod bench_overload_gateway;
pub mod bench_search;
pub mod bench_webhooks;
pub mod bots;
pub mod cells;
pub mod chat;
pub mod cli;
pub mod commands;
pub mod compliance;
pub mod config;
pub mod console;
pub mod intercept;
pub mod metrics;
pub mod nats_init;
pub mod open;
pub mod output;
pub mod revoke;
pub mod serve;
pub mod supervise;
pub mod webhooks;
