//! tidings-log's integration tests: one test binary (`cargo test -p tidings-log --test it`)
//! whose modules are the files beside this one (`cargo test -p tidings-log --test it
//! lease::` runs tests/lease.rs). One binary links the log and its store once, where a binary
//! per file did it five times (docs/decisions/one-test-binary.md). The TiKV suite is a
//! binary of its own, `tests/tikv.rs`: it is built with the `tikv` feature only.
//!
//! The modules' tests share one process: writer ids, which a process keeps unique, carry
//! their suite's name.
//!
//! Cargo does not discover test files here (`autotests = false`): a new file is a new `mod`
//! line below.

// The suites shared with other test binaries come first, so their macros are in scope for
// the modules after them.
#[macro_use]
mod log_suite;
#[macro_use]
mod outage_suite;

mod keys;
mod kinds;
mod lease;
mod log;
mod outage;
