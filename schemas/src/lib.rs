//! tidings wire and storage formats.
//!
//! # Layout
//! - `proto/tidings/v1/events.proto`: the event envelope and its bodies ([`v1`]).
//! - `proto/tidings/storage/v1/storage.proto`: values the log keeps in the KV ([`storage`]).
//! - `src/gen/`: prost code generated from them by `cargo run -p tidings-codegen` and
//!   committed, so no `protoc` is needed to build; a test checks it is current.

#![allow(clippy::all)] // generated code

/// Events: the immutable records of the log.
pub mod v1 {
    include!("gen/tidings.v1.rs");
}

/// Values stored in the KV by the log.
pub mod storage {
    include!("gen/tidings.storage.v1.rs");
}
