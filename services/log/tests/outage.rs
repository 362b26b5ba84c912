//! The KV-outage suite (`outage_suite/`) with the send buffer in files on this machine's
//! disk; `tests/send_buffer_stream.rs` runs it on a JetStream stream.

use crate::outage_suite;

outage_suite!(async { (outage_suite::files(), ()) });
