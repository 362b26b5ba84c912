//! The gateway's settings: the server's `[gateway]` section, read straight into
//! [`GatewayConfig`].

use std::time::Duration;

/// Limits and defaults of the gateway. Every queue and frame is bounded.
///
/// The server's `[gateway]` section is read straight into this type, each field under the
/// name the file gives it (`hello_timeout_ms` for `hello_timeout`): a setting's doc, type
/// and default are here only. `read_limit` and `cell_urls` are not settings of the section
/// (`#[serde(skip)]`): the server fills them in from `log.max_read_limit` and `[cell]`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Where the WebSocket endpoint (`/v1/ws`) listens (the server binds it).
    pub listen: String,
    /// Serve `wss://` with this certificate chain and key (PEM; both or neither), reloaded
    /// when the files change ([`crate::tls`]). Without them the listener is plain `ws://`.
    pub tls_cert_file: Option<std::path::PathBuf>,
    pub tls_key_file: Option<std::path::PathBuf>,
    /// The log's public identity key (64 hex digits; `tidings keys log-identity` prints it).
    /// A gateway running apart from the log (`--role gateway`) needs it: only a log with
    /// that identity can answer its transport key requests ([`tidings_log_api::bus_crypto`]).
    pub log_public_key: String,
    /// Largest WebSocket frame/message accepted; larger ones close the connection (1009).
    pub max_frame_bytes: usize,
    /// Frames queued for one session before it is disconnected as a slow consumer.
    pub outbound_queue: usize,
    /// Bytes queued for one session (replies and pushes not yet written to its socket)
    /// before it is disconnected as a slow consumer: the real bound on a session's memory.
    pub outbound_queue_bytes: usize,
    /// Largest reply the gateway builds, roughly (History, Pull, Sync and list pages are
    /// cut before the entry that would cross it; one entry always goes).
    pub max_reply_bytes: usize,
    /// Conversations in one Sync answer when the client does not say (and at most).
    pub sync_page_conversations: usize,
    /// Events per conversation in a Sync answer when the client does not say.
    pub sync_latest: usize,
    /// Most events or entries one read returns (History, Pull, lists): the log's
    /// `max_read_limit`, not a setting of its own.
    #[serde(skip)]
    pub read_limit: usize,
    /// Time allowed for the WebSocket handshake (from accept to the upgrade's answer).
    #[serde(
        rename = "handshake_timeout_ms",
        with = "tidings_log_api::duration_as::millis"
    )]
    pub handshake_timeout: Duration,
    /// Time allowed between connecting and Hello.
    #[serde(
        rename = "hello_timeout_ms",
        with = "tidings_log_api::duration_as::millis"
    )]
    pub hello_timeout: Duration,
    /// How often the server pings each session.
    #[serde(
        rename = "ping_interval_ms",
        with = "tidings_log_api::duration_as::millis"
    )]
    pub ping_interval: Duration,
    /// A session from which nothing arrives (no frame, no pong) for this long is closed.
    #[serde(
        rename = "idle_timeout_ms",
        with = "tidings_log_api::duration_as::millis"
    )]
    pub idle_timeout: Duration,
    /// Connections served at once (authenticated or not), from one IP address, and
    /// sessions of one user (see [`crate::admission`]).
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_sessions_per_user: usize,
    /// Frames a session may send per second, and in a burst.
    pub frames_per_second: u32,
    pub frame_burst: u32,
    /// Origins browsers may connect from ("*" for any); clients without Origin are allowed.
    pub allowed_origins: Vec<String>,
    /// Conversations one session follows at most.
    pub max_conversations_per_session: usize,
    /// Typing notices are not relayed in conversations with more members than this: in a
    /// big group they would be noise to everyone and a NATS message per keystroke burst.
    pub typing_max_members: u64,
    /// Bytes of membership answers and member lists the gateway keeps (`members.rs`); past
    /// it the least recently used lists, then the answers, are dropped and asked again.
    pub member_cache_bytes: usize,
    /// Members read per log call while filling a conversation's member list.
    pub member_fill_page: usize,
    /// Pushes a second per core this gateway spends on big groups' fan-outs, all together
    /// (0: not paced), and how many sessions here make a group big (`pacing.rs`).
    pub fan_out_pushes_per_core: u64,
    pub fan_out_paced_sessions: usize,
    /// How often an idle conversation hub checks the log for events NATS did not bring.
    #[serde(
        rename = "heal_interval_ms",
        with = "tidings_log_api::duration_as::millis"
    )]
    pub heal_interval: Duration,
    /// Search (docs/limits.md): the longest query in bytes, its most terms (words and CJK
    /// bigrams), hits per page (the default and the most), searches per session a minute.
    pub search_max_query_bytes: usize,
    pub search_max_terms: usize,
    pub search_page_hits: usize,
    pub search_per_minute: u32,
    /// Where each cell's clients connect (`[[cell.peers]]` and this cell): the URL a
    /// `wrong_cell` error sends a client to. Not a setting of the section: the server
    /// fills it in from `[cell]`.
    #[serde(skip)]
    pub cell_urls: std::collections::HashMap<String, String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:7300".into(),
            tls_cert_file: None,
            tls_key_file: None,
            log_public_key: String::new(),
            max_frame_bytes: 128 * 1024,
            outbound_queue: 1024,
            // 4 MiB: eight full replies, or a burst of large pushes; 10,000 sessions that
            // all let their queues fill would hold 40 GB, so the frame count (and the
            // per-user and global caps) still matter.
            outbound_queue_bytes: 4 << 20,
            // 512 KiB: half of NATS's default max_payload (1 MiB), so a page read through
            // the log RPC fits with its envelope and sealing overhead to spare.
            max_reply_bytes: 512 << 10,
            sync_page_conversations: 100,
            sync_latest: 100,
            read_limit: 1000,
            handshake_timeout: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            max_connections: 100_000,
            // Offices behind one NAT address are many users: generous, but not the whole
            // global cap.
            max_connections_per_ip: 10_000,
            // Phones, desktops, browser tabs: a dozen devices is plenty.
            max_sessions_per_user: 16,
            frames_per_second: 200,
            frame_burst: 400,
            allowed_origins: Vec::new(),
            max_conversations_per_session: 10_000,
            typing_max_members: 100,
            // 64 MiB: about a million answers.
            member_cache_bytes: 64 << 20,
            member_fill_page: 1000,
            // Measured on 2 cores (BENCHMARKS.md, "Floods in big groups"): the gateway and
            // its clients there carry about 33,000 pushes a second per core; half of that
            // for big groups leaves the rest of the traffic its latency.
            fan_out_pushes_per_core: 15_000,
            // A group this big online here is a burst of a few milliseconds of writes.
            fan_out_paced_sessions: 1000,
            heal_interval: Duration::from_secs(30),
            // 256 bytes: a sentence, or 85 CJK characters.
            search_max_query_bytes: 256,
            search_max_terms: 16,
            search_page_hits: 20,
            // A search can open thousands of events: a person types a few a minute.
            search_per_minute: 60,
            cell_urls: std::collections::HashMap::new(),
        }
    }
}
