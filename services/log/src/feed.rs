//! What the log announces after each commit: the feed the publisher delivers to NATS.

use std::sync::Arc;

use tidings_log_api::Event;

use crate::ids::{ConvId, TenantId, UserId};

/// What the log announces after each commit, in commit order, to whoever delivers events
/// (the NATS publisher).
#[derive(Clone, Debug, PartialEq)]
pub enum FeedItem {
    /// A newly committed event, in the clear, and its bytes as encoded once by the
    /// sequencer (what it sealed; what the publisher seals for the bus).
    Event {
        event: Arc<Event>,
        encoded: Arc<[u8]>,
    },
    /// A user's read cursor moved.
    ReadCursor {
        tenant: TenantId,
        conv: ConvId,
        user: UserId,
        read_seq: u64,
    },
}
