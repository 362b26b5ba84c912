//! The command line, declared with clap. Parsing only; `commands` does the work.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tidings_log::{ClientMsgId, ConvId, TenantId, UserId};

#[derive(Debug, Parser)]
#[command(
    name = "tidings",
    version,
    about = "tidings: the message store of an enterprise instant-messaging system",
    long_about = "tidings: the message store of an enterprise instant-messaging system.\n\n\
        Every chat message is an immutable event in a per-conversation log, sealed with \
        AES-SIV under a per-tenant key. Tool commands work on the data directory directly \
        when no server holds it."
)]
pub struct Cli {
    /// TOML config file (default: $TIDINGS_CONFIG, else ./tidings.toml if present).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Data directory of the embedded store (default: ./tidings-data, or $TIDINGS_DATA_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the master key and tenant data keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Create conversations and manage their members and read cursors.
    #[command(subcommand)]
    Conv(ConvCommand),
    /// Append to and read from a conversation's log.
    #[command(subcommand)]
    Log(LogCommand),
    /// Move aged events to the archive, and inspect or verify it.
    #[command(subcommand)]
    Archive(ArchiveCommand),
    /// Search and export a tenant's history, read its audit log, manage legal holds.
    /// Every search and export is recorded in the tenant's audit log.
    #[command(subcommand)]
    Compliance(ComplianceCommand),
    /// Measure tidings against its baselines.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run the server: log, gateway, or both.
    Serve {
        #[arg(long, value_enum, default_value = "all")]
        role: Role,
        /// Gateway listen address (default: gateway.listen, 127.0.0.1:7300).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Issue development tokens; revoke tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// A tenant's bot accounts: create (with a token), new tokens, revoke, list. Each change
    /// is recorded in the tenant's audit log. Works on the store (while `tidings serve` holds
    /// an embedded store, use the admin listener's `/v1/admin/bots/*`).
    #[command(subcommand)]
    Bot(BotCommand),
    /// Chat in a terminal: prints the conversation's latest events, then sends each stdin
    /// line and prints every new event of the conversation, all as JSON lines.
    Chat {
        /// The gateway, e.g. ws://127.0.0.1:7300/v1/ws
        #[arg(long)]
        url: String,
        /// A token (`tidings token issue`).
        #[arg(long)]
        token: String,
        #[arg(long)]
        conv: ConvId,
        /// How many of the conversation's latest events to print on joining (0: none).
        #[arg(long, value_name = "N", default_value_t = 20,
              value_parser = clap::value_parser!(u32).range(0..=MAX_CHAT_HISTORY))]
        history: u32,
        /// For wss://: trust only the CA certificates in this PEM file (default: the
        /// system's roots).
        #[arg(long, env = "TIDINGS_CA_FILE", value_name = "FILE")]
        ca_file: Option<PathBuf>,
    },
    /// NATS credentials for the roles.
    #[command(subcommand)]
    Nats(NatsCommand),
    /// Outgoing webhook subscriptions (on the store; while `tidings serve` runs, use the
    /// admin listener's /v1/admin/webhooks routes). Every change is recorded in the tenant's
    /// audit log.
    #[command(subcommand)]
    Webhook(WebhookCommand),
    /// Cells (docs/decisions/cells.md): where a tenant lives, moving it to its DR cell, and
    /// what a move lost. Acts on a running cell through its admin listener.
    Cell {
        #[command(subcommand)]
        op: CellOp,
        /// The cell's admin listener, e.g. https://admin-a:7180 or http://127.0.0.1:7180.
        #[arg(long, global = true, value_name = "URL")]
        server: Option<String>,
        /// An admin-role token of the tenant (compliance audience).
        #[arg(long, global = true)]
        token: Option<String>,
        /// Trust only the CA certificates in this PEM file for an https:// --server.
        #[arg(long, global = true, value_name = "PEM")]
        ca_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CellOp {
    /// Sets the tenant's home cell, DR cell and tier (a new version, announced to every cell).
    Place {
        #[arg(long)]
        tenant: TenantId,
        #[arg(long)]
        home: String,
        /// The disaster-recovery cell its writes are replicated to (none if absent).
        #[arg(long, default_value = "")]
        dr: String,
        /// vip or standard.
        #[arg(long, default_value = "standard")]
        tier: String,
        /// Acknowledge a send only once the DR cell has it (RPO 0).
        #[arg(long)]
        sync: bool,
    },
    /// Run on the tenant's DR cell: makes it the tenant's home. Planned (the default) drains
    /// the home first; --unplanned does not ask it (it is gone) and reports what arrived.
    /// With --tier instead of --tenant: every tenant of the tier whose DR cell this is, in
    /// one action (a token with the `cell_operator` role).
    Failover {
        #[arg(long, required_unless_present = "tier", conflicts_with = "tier")]
        tenant: Option<TenantId>,
        #[arg(long)]
        tier: Option<String>,
        #[arg(long)]
        unplanned: bool,
    },
    /// The tenant's placement as this cell knows it.
    Show {
        #[arg(long)]
        tenant: TenantId,
    },
    /// Events this cell acknowledged as the tenant's home that never reached the cell that
    /// took it over.
    Lost {
        #[arg(long)]
        tenant: TenantId,
    },
}

#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// Subscribe a URL to a tenant's events; prints the subscription with its signing
    /// secret, shown this once.
    Create {
        #[arg(long)]
        tenant: TenantId,
        /// http:// or https:// (no user or password in it).
        #[arg(long)]
        url: String,
        /// Only these conversations (repeatable; default: all).
        #[arg(long = "conv")]
        conversations: Vec<ConvId>,
        /// Only conversations of these kinds (repeatable; default: all).
        #[arg(long = "conv-kind")]
        conversation_kinds: Vec<String>,
        /// Only these event kinds, e.g. message_posted (repeatable; default: all).
        #[arg(long = "event-kind")]
        event_kinds: Vec<String>,
        /// Tries of one event before it is dead-lettered (default:
        /// webhooks.default_max_attempts).
        #[arg(long)]
        max_attempts: Option<u32>,
        /// Who does it (recorded in the tenant's audit log).
        #[arg(long, default_value = "operator")]
        actor: String,
    },
    /// The tenant's subscriptions, one JSON line each (never their secrets).
    List {
        #[arg(long)]
        tenant: TenantId,
    },
    /// Delete a subscription with its cursors and dead letters.
    Delete {
        #[arg(long)]
        tenant: TenantId,
        #[arg(long)]
        id: String,
        #[arg(long, default_value = "operator")]
        actor: String,
    },
    /// Deliver a conversation's events again from a seq (taken up by the running
    /// dispatcher, in order, before later events of the conversation).
    Replay {
        #[arg(long)]
        tenant: TenantId,
        #[arg(long)]
        id: String,
        #[arg(long)]
        conv: ConvId,
        #[arg(long, value_name = "SEQ")]
        from: u64,
        #[arg(long, default_value = "operator")]
        actor: String,
    },
    /// The events a subscription gave up on, one JSON line each.
    DeadLetters {
        #[arg(long)]
        tenant: TenantId,
        #[arg(long)]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum NatsCommand {
    /// Generates one NKey per role (log, gateway, all) into DIR (seeds mode 0600) and a
    /// nats-server include with their public keys and subject permissions
    /// (DIR/accounts.conf). Existing seeds are kept, so it is safe to run again.
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

/// Most events `tidings chat --history` prints: it holds them all before printing the
/// first, oldest first.
pub const MAX_CHAT_HISTORY: i64 = 10_000;

#[derive(Debug, Subcommand)]
pub enum ArchiveCommand {
    /// One archive pass: events older than the hot window (archive.hot_window, per tenant)
    /// become sealed Parquet segments; prints a JSON summary.
    Run {
        /// Archive everything older than this instead (0s: everything).
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<TenantId>,
        /// Delete unindexed objects (crash leftovers) older than this (default:
        /// archive.orphan_grace).
        #[arg(long, value_name = "DURATION")]
        orphan_grace: Option<String>,
    },
    /// One JSON line per segment: path, date, rows, bytes, key id, time range.
    Inspect {
        #[arg(long)]
        tenant: Option<TenantId>,
    },
    /// Check every indexed segment: it exists, matches its index and checksum, and every
    /// body opens. Exits 1 if anything is wrong.
    Verify {
        #[arg(long)]
        tenant: Option<TenantId>,
    },
}

/// What a compliance search or export selects.
#[derive(Debug, Args)]
pub struct QueryArgs {
    #[arg(long)]
    pub tenant: TenantId,
    /// Who is asking (recorded in the audit log), e.g. an employee id or email.
    #[arg(long)]
    pub actor: String,
    #[arg(long)]
    pub conv: Option<ConvId>,
    #[arg(long)]
    pub sender: Option<UserId>,
    /// Events at or after this time: 2026-11-29 or 2026-11-29T08:30:00Z (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// Events before this time.
    #[arg(long, value_name = "TIME")]
    pub to: Option<String>,
    /// Whole words (case- and width-folded) or CJK characters of a message's text (original
    /// or any edit) or a title.
    #[arg(long)]
    pub text: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Csv,
    Parquet,
}

#[derive(Debug, Subcommand)]
pub enum ComplianceCommand {
    /// Print matching events (hot and archived) as JSON lines, messages with their edits
    /// and recall.
    Search(QueryArgs),
    /// Write matching events, decrypted, to a file; the file appears only when complete.
    Export {
        #[command(flatten)]
        query: QueryArgs,
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// The file to create (refused if it exists).
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
    /// Print the tenant's audit log, checking its integrity; exits 1 if it was tampered with.
    Audit {
        #[arg(long)]
        tenant: TenantId,
    },
    /// Legal holds: what retention and shredding must never delete.
    #[command(subcommand)]
    Hold(HoldCommand),
}

#[derive(Debug, Subcommand)]
pub enum HoldCommand {
    /// Hold a whole tenant, one conversation (--conv) or one user's conversations (--user),
    /// optionally only over a time range.
    Create {
        #[arg(long)]
        tenant: TenantId,
        #[arg(long)]
        actor: String,
        #[arg(long, conflicts_with = "user")]
        conv: Option<ConvId>,
        #[arg(long)]
        user: Option<UserId>,
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        #[arg(long, value_name = "TIME")]
        to: Option<String>,
        /// Why (e.g. the matter's name); recorded with the hold.
        #[arg(long)]
        reason: String,
    },
    /// Every hold of the tenant, active and released.
    List {
        #[arg(long)]
        tenant: TenantId,
    },
    /// Release a hold; its record stays.
    Release {
        #[arg(long)]
        tenant: TenantId,
        #[arg(long)]
        actor: String,
        #[arg(long)]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a development token signed with the HS256 secret (auth.hs256_secret_file).
    /// Refused unless auth.hs256_enabled is set. Tokens with the compliance or admin role
    /// get the compliance audience (the admin listener's); others the chat audience.
    Issue {
        #[arg(long)]
        tenant: TenantId,
        #[arg(long)]
        user: UserId,
        /// Lifetime: 90s, 30m, 1h, 2d (at most auth.max_token_lifetime_secs).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Roles to put in the token (repeatable).
        #[arg(long)]
        role: Vec<String>,
    },
    /// Revoke one token (--jti) or every token of a user issued at or before a time
    /// (--user, --before). Live sessions of those tokens are closed (code 4011). Works on
    /// the store when no server runs; with --server, through a running server's admin
    /// listener (an admin-role token of the tenant).
    Revoke {
        #[arg(long)]
        tenant: TenantId,
        /// The token's id (its `jti` claim).
        #[arg(long, required_unless_present = "user", conflicts_with = "user")]
        jti: Option<String>,
        #[arg(long)]
        user: Option<UserId>,
        /// With --user: "now" (default), an RFC 3339 time, or Unix seconds.
        #[arg(long, requires = "user", value_name = "TIME")]
        before: Option<String>,
        /// The admin listener of a running server, e.g. https://admin-1:7180 or
        /// http://127.0.0.1:7180.
        #[arg(long, requires = "token", value_name = "URL")]
        server: Option<String>,
        /// Trust only the CA certificates in this PEM file for an https:// --server (default:
        /// the system's roots).
        #[arg(long, requires = "server", value_name = "PEM")]
        ca_file: Option<PathBuf>,
        /// An admin-role token (compliance audience) for --server.
        #[arg(long, requires = "server")]
        token: Option<String>,
        /// Who does it, recorded in the tenant's audit log (without --server; with it, the
        /// token's user is).
        #[arg(long, default_value = "operator")]
        actor: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a master key file for development (64 random bytes, hex, mode 0600).
    Init {
        /// Where to write it (default: master_key_file from the config, ./tidings-master.key).
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// Replace an existing key file. Data sealed under the old key becomes unreadable.
        #[arg(long)]
        force: bool,
    },
    /// Print the log's public identity key (derived from the master key). Gateways running
    /// apart from the log pin it (`gateway.log_public_key`), so only a log holding this
    /// master key can hand them transport keys.
    LogIdentity,
    /// Print the public key of tidings's bot tokens (derived from the master key), for
    /// gateways running without the master key (`auth.bot_public_key`).
    BotIdentity,
    /// Add a new data key for a tenant; new events are sealed with it, old ones still open.
    Rotate {
        #[arg(long)]
        tenant: TenantId,
        /// Who does it (recorded in the tenant's audit log).
        #[arg(long, default_value = "operator")]
        actor: String,
    },
    /// Crypto-shred a tenant: destroy all its data keys, so its history (hot and archived)
    /// can never be opened again, and purge the store so no file keeps a copy. Irreversible.
    Shred {
        #[arg(long)]
        tenant: TenantId,
        /// The tenant id again, to confirm.
        #[arg(long, value_name = "TENANT")]
        confirm: Option<String>,
        /// Who does it (recorded in the tenant's audit log). Refused while a legal hold is
        /// active.
        #[arg(long)]
        actor: String,
    },
    /// Seal a tenant's existing data keys under its tenant-held key (`[keys.tenants.<tenant>]`)
    /// too, then purge the store of the copies without it. The data keys do not change;
    /// nothing is re-sealed.
    Wrap {
        #[arg(long)]
        tenant: TenantId,
        /// Who does it (recorded in the tenant's audit log).
        #[arg(long, default_value = "operator")]
        actor: String,
    },
}

#[derive(Debug, Args)]
pub struct Target {
    #[arg(long)]
    pub tenant: TenantId,
    #[arg(long)]
    pub conv: ConvId,
}

#[derive(Debug, Subcommand)]
pub enum ConvCommand {
    /// Create a conversation; the creator (--by) takes the kind's creator role (a group's
    /// owner, a class's teacher), the members its member role.
    Create {
        #[command(flatten)]
        target: Target,
        /// direct, group, announcement, class, or a kind of `[[log.kinds]]`.
        #[arg(long)]
        kind: String,
        /// The creating user.
        #[arg(long)]
        by: UserId,
        /// Other members, comma separated (the creator is always a member).
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        members: Vec<UserId>,
        #[arg(long, default_value = "")]
        title: String,
    },
    /// Add a member (--by must hold a role the kind lets add).
    AddMember {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        by: UserId,
        #[arg(long)]
        user: UserId,
        /// One of the kind's roles (default: its member role).
        #[arg(long)]
        role: Option<String>,
    },
    /// Give a member another of the kind's roles (--by must hold a role that may).
    SetRole {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        by: UserId,
        #[arg(long)]
        user: UserId,
        #[arg(long)]
        role: String,
    },
    /// Set a member's display name in the conversation (empty clears it). Without --by the
    /// system sets it, past the kind's policy ("Xiaoming's dad" in a class).
    SetName {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        by: Option<UserId>,
        #[arg(long)]
        user: UserId,
        #[arg(long)]
        name: String,
    },
    /// Remove a member (--by must hold a role the kind lets remove, or be the member leaving).
    RemoveMember {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        by: UserId,
        #[arg(long)]
        user: UserId,
    },
    /// Rename a conversation (--by must hold a role the kind lets rename).
    Rename {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        by: UserId,
        #[arg(long)]
        title: String,
    },
    /// Show a conversation's kind, head and member count.
    Show {
        #[command(flatten)]
        target: Target,
    },
    /// List a conversation's members, one JSON line each, in user id order.
    Members {
        #[command(flatten)]
        target: Target,
        /// Start after this user id (paging).
        #[arg(long)]
        after: Option<UserId>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// List a user's conversations with head, read cursor and unread count.
    List {
        #[arg(long)]
        tenant: TenantId,
        #[arg(long)]
        user: UserId,
        #[arg(long)]
        after: Option<ConvId>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Move a member's read cursor forward.
    MarkRead {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        user: UserId,
        #[arg(long)]
        seq: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Append a message. Prints {"seq":N,"event_id":"...","duplicate":false} once durable.
    ///
    /// With --stdin, reads JSON lines {"client_msg_id":"...","text":"..."} and prints one
    /// line per input, in input order, each only once that event is durable. Appends are
    /// pipelined, so they share store commits.
    Append {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        sender: UserId,
        #[arg(long, required_unless_present = "stdin", conflicts_with = "stdin")]
        client_msg_id: Option<ClientMsgId>,
        #[arg(
            long,
            required_unless_present_any = ["stdin", "recall"],
            conflicts_with_all = ["stdin", "recall"]
        )]
        text: Option<String>,
        /// With --text: edit the message at this seq (its author only) instead of posting.
        #[arg(long, value_name = "SEQ", conflicts_with = "stdin")]
        edit: Option<u64>,
        /// Recall (withdraw) the message at this seq (its author only).
        #[arg(long, value_name = "SEQ", conflicts_with_all = ["stdin", "edit"])]
        recall: Option<u64>,
        #[arg(long)]
        stdin: bool,
    },
    /// Print events as JSON lines: forward from --from (default 1), or with --reverse
    /// backward from --from (default the head).
    Read {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        from: Option<u64>,
        /// Print at most this many events (default: all).
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        reverse: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Durable appends/s and ack latency, against raw fjall batched inserts of the same bytes.
    Append(crate::bench::AppendArgs),
    /// End-to-end latency and throughput through the gateway, against raw NATS and the raw
    /// store; and the 10,000-member fan-out. Needs `nats-server` on the PATH.
    Gateway(crate::bench_gateway::GatewayArgs),
    /// Two cells on loopback: send latency with synchronous against asynchronous
    /// replication, replication lag, and a drill (home cell killed, unplanned failover):
    /// time to the first send in the DR cell and the acknowledged events lost. Needs
    /// `nats-server` on the PATH.
    Cells(crate::bench_cells::CellsArgs),
    /// Archive throughput, bytes per event (hot, archive, plaintext Parquet), history page
    /// latency hot vs cold, and point lookups with and without the indexes.
    Archive(crate::bench_archive::ArchiveArgs),
    /// Compliance text search over a tenant's archive (events/s, time to first and last
    /// result), against scanning the same events as plaintext Parquet; and how selective
    /// filters prune.
    Compliance(crate::bench_compliance::ComplianceArgs),
    /// Sending through a KV outage: appends/s and ack latency with the store up and with it
    /// unavailable (acks from the send buffer), in one run; then the replay rate.
    Outage(crate::bench_outage::OutageArgs),
    /// One hot group far past the log writer's capacity while small conversations send
    /// steadily: their latency against the same load without the flood, in one run; goodput
    /// against the capacity; peak RSS.
    Overload(crate::bench_overload::OverloadArgs),
    /// A big group's first member page, prefix search and membership check from the caches,
    /// against reading the KV, in one run.
    Members(crate::bench_members::MembersArgs),
    /// Webhook delivery to a local receiver through a real nats-server: events/s and lag
    /// (commit to receipt). Needs `nats-server` on the PATH.
    Webhooks(crate::bench_webhooks::WebhooksArgs),
    /// End-user search over the hot index: p50/p99, the index's size per event, and the
    /// indexer's cost to append throughput (with and without it), in one run.
    Search(crate::bench_search::SearchArgs),
}

#[derive(Debug, Subcommand)]
pub enum BotCommand {
    /// Register bot NAME (its id is bot-NAME) and print its first token, shown once.
    Create {
        #[arg(long)]
        tenant: TenantId,
        #[arg(long)]
        name: String,
        /// The token's lifetime in days (1 to 366).
        #[arg(long)]
        days: Option<u64>,
        /// Who does it, for the audit log.
        #[arg(long)]
        actor: String,
    },
    /// Print another token for a live bot (its older tokens stay valid).
    Token {
        #[arg(long)]
        tenant: TenantId,
        #[arg(long)]
        bot: String,
        #[arg(long)]
        days: Option<u64>,
        #[arg(long)]
        actor: String,
    },
    /// Revoke a bot: every token it has is refused from now on, its live sessions end, and
    /// its id is never given out again.
    Revoke {
        #[arg(long)]
        tenant: TenantId,
        #[arg(long)]
        bot: String,
        #[arg(long)]
        actor: String,
    },
    /// The tenant's bots.
    List {
        #[arg(long)]
        tenant: TenantId,
    },
}

/// What `tidings serve` runs in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    All,
    Log,
    Gateway,
    Archiver,
}
