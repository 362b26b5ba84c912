//! The `tidings` binary's library: everything `main` does, testable without a process.
//!
//! # Layout
//! - [`cli`]: the command line (clap).
//! - [`config`]: TOML file plus `TIDINGS_*` environment overrides.
//! - [`commands`]: the tool commands (`keys`, `conv`, `log`).
//! - [`bench`]: `tidings bench`, tidings against its baselines in one run.
//! - [`output`]: the JSON lines the tools print.

pub mod bench;
pub mod cli;
pub mod commands;
pub mod config;
pub mod output;
