//! tidings wire and storage formats.
//!
//! # Layout
//! - `proto/tidings/v1/events.proto`: the event envelope and its bodies ([`v1`]).
//! - `proto/tidings/storage/v1/storage.proto`: values the log keeps in the KV ([`storage`]).
//! - `proto/tidings/client/v1/client.proto`: the gateway's client protocol ([`client`]);
//!   its header comment is the protocol's documentation.
//! - `proto/tidings/internal/v1/delivery.proto`: what tidings processes send each other over
//!   NATS ([`internal`]).
//! - `src/gen/`: prost code generated from them by `cargo run -p tidings-codegen` and
//!   committed, so no `protoc` is needed to build; a test checks it is current.

#![allow(clippy::all)] // generated code

/// The generated code, nested as the protobuf packages are (prost refers across packages by
/// relative paths such as `super::super::v1::Event`). Its docs are the .proto files'
/// comments, which write keys as `ev/<tenant>/<conv>`: not HTML.
#[allow(rustdoc::invalid_html_tags)]
pub mod tidings {
    /// Events: the immutable records of the log.
    pub mod v1 {
        include!("gen/tidings.v1.rs");
    }
    pub mod storage {
        /// Values stored in the KV by the log.
        pub mod v1 {
            include!("gen/tidings.storage.v1.rs");
        }
    }
    pub mod client {
        /// The WebSocket client protocol.
        pub mod v1 {
            include!("gen/tidings.client.v1.rs");
        }
    }
    pub mod internal {
        /// Messages between tidings processes over NATS.
        pub mod v1 {
            include!("gen/tidings.internal.v1.rs");
        }
    }
}

pub use tidings::client::v1 as client;
pub use tidings::internal::v1 as internal;
pub use tidings::storage::v1 as storage;
pub use tidings::v1;
