//! Configuration: one TOML file plus `TIDINGS_*` environment overrides.
//!
//! Precedence, lowest first: built-in defaults (everything on one machine, under the working
//! directory), the TOML file (`--config`, `TIDINGS_CONFIG`, or `./tidings.toml` if present),
//! environment variables, command-line flags. `ops/tidings.example.toml` documents every
//! field. Each setting is declared once, as a field of a section below or of the library
//! config type a section is read into (`[gateway]`: `tidings_gateway::GatewayConfig`;
//! `[log]`: `tidings_log::LogConfig` with its overload and search settings and the send
//! buffer's bounds; the publisher's settings of `[nats]`; `[webhooks]`, `[cell]`), under the
//! name the file gives it (docs/decisions/config-types-read-directly.md). Its variable
//! (`TIDINGS_SECTION_FIELD`) is derived from its path ([`env`]).

pub mod cells;
mod env;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tidings_log::crypto::{MasterKey, TenantKeySource, TenantKeys};
use tidings_log::{LogConfig, TenantId};
use tidings_log_api::duration_as::whole_millis as millis;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the embedded store keeps its files.
    pub data_dir: PathBuf,
    /// The master key file (`tidings keys init` writes it). `TIDINGS_MASTER_KEY` (128 hex
    /// digits) takes precedence when set.
    pub master_key_file: PathBuf,
    pub keys: KeysSection,
    pub log: LogSection,
    /// The gateway library's own settings type, read straight from `[gateway]`.
    pub gateway: tidings_gateway::GatewayConfig,
    pub nats: NatsSection,
    pub auth: AuthSection,
    pub archive: ArchiveSection,
    pub admin: AdminSection,
    pub store: StoreSection,
    /// Outgoing webhooks' delivery (the library's own settings type).
    pub webhooks: crate::webhooks::WebhooksConfig,
    /// This cell and its peers (`crate::cells`); off while `cell.name` is empty.
    pub cell: cells::CellsConfig,
}

/// Which `KvStore` holds the log: the embedded fjall store under `data_dir`, or a TiKV
/// cluster (the binary must be built with `--features tikv`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// "embedded" or "tikv".
    pub backend: String,
    pub tikv: TikvSection,
    /// Debug only: a control file whose first word injects a store fault (`ok`,
    /// `unavailable`, `commit-unavailable`, `panic-on-commit`), for tests and outage
    /// rehearsals. Empty (the default) = the store is used as it is.
    pub faults_file: PathBuf,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            backend: "embedded".into(),
            tikv: TikvSection::default(),
            faults_file: PathBuf::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TikvSection {
    /// PD endpoints, host:port.
    pub pd_endpoints: Vec<String>,
    /// In front of every key; deployments sharing a cluster need prefixes of which none is a
    /// prefix of another (end each in "/").
    pub key_prefix: String,
    /// TLS towards PD and TiKV: all three paths or none (empty = none).
    pub ca_path: String,
    pub cert_path: String,
    pub key_path: String,
    /// Bounds connecting at start (retries included) and each request: 10s, 1m.
    pub connect_timeout: String,
}

impl Default for TikvSection {
    fn default() -> Self {
        TikvSection {
            pd_endpoints: vec!["127.0.0.1:2379".into()],
            key_prefix: "tidings/".into(),
            ca_path: String::new(),
            cert_path: String::new(),
            key_path: String::new(),
            connect_timeout: "10s".into(),
        }
    }
}

/// Where the send buffer lives (`log.send_buffer_medium`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendBufferMedium {
    Files(PathBuf),
    Stream { replicas: usize },
}

/// The configured store backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Tikv,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Where the admin HTTP listener (health, compliance search, audit log) listens, in
    /// `serve` roles all and log; empty disables it. Plain HTTP unless a certificate is
    /// set below: keep a plain listener on loopback.
    pub listen: String,
    /// Serve `https://` with this certificate chain and key (PEM; both or neither),
    /// reloaded when the files change.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: "127.0.0.1:7180".into(),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// A listener's certificate and key: both, or neither (plain).
pub fn edge_tls(
    section: &str,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) -> Result<Option<tidings_gateway::tls::TlsFiles>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(tidings_gateway::tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        })),
        (None, None) => Ok(None),
        _ => Err(ConfigError::Invalid(format!(
            "{section}.tls_cert_file and {section}.tls_key_file go together"
        ))),
    }
}

/// Tenant-held keys: a tenant listed here has its data keys sealed under a key of its own
/// before the master key wraps them (ARCHITECTURE.md, "Sealing at rest").
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysSection {
    /// Longest a key_command may run: 10s, 1m.
    pub command_timeout: String,
    pub tenants: std::collections::BTreeMap<String, TenantKeySection>,
}

impl Default for KeysSection {
    fn default() -> Self {
        KeysSection {
            command_timeout: "10s".into(),
            tenants: Default::default(),
        }
    }
}

/// Where one tenant's key comes from: exactly one of the two.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantKeySection {
    /// A file of 128 hex digits, like the master key file.
    pub key_file: Option<PathBuf>,
    /// A shell command (`sh -c`) that prints the 128 hex digits on stdout.
    pub key_command: Option<String>,
}

/// The longest `auth.max_token_lifetime_secs` may be: revocation records must outlive the
/// tokens they name, and a month is already long for a bearer credential.
const MAX_TOKEN_LIFETIME_SECS: u64 = 30 * 86_400;

/// The longest `keys.command_timeout` may be: a key fetch holds up the first read of a tenant.
const MAX_KEY_COMMAND_TIMEOUT_SECS: u64 = 300;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveSection {
    /// Run the archiver in `tidings serve` (roles all and archiver).
    pub enabled: bool,
    /// How often the archiver runs a pass: 90s, 30m, 1h, 2d.
    pub interval: String,
    /// Events older than this move to the archive (per tenant below).
    pub hot_window: String,
    /// Keep at most this many hot events per conversation; 0 for no cap.
    pub max_hot_events: u64,
    /// "local" (a directory) or "s3".
    pub storage: String,
    /// The local archive directory (default: `archive` under the data directory).
    pub path: Option<PathBuf>,
    pub s3: S3Section,
    pub segment_max_events: usize,
    pub row_group_events: usize,
    pub zstd_level: i32,
    /// Bytes of fetched row groups the cold reader keeps.
    pub cache_bytes: usize,
    /// Unindexed objects older than this are crash leftovers and are deleted.
    pub orphan_grace: String,
    /// Delete events older than this from both tiers, legal holds excepted (e.g. 365d).
    /// Empty keeps history forever.
    pub retention: String,
    /// Per-tenant overrides of hot_window, max_hot_events and retention.
    pub tenants: std::collections::BTreeMap<String, TenantArchiveSection>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantArchiveSection {
    pub hot_window: Option<String>,
    pub max_hot_events: Option<u64>,
    /// This tenant's retention ("" keeps its history forever whatever the default).
    pub retention: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Section {
    /// Endpoint of an S3-compatible server; AWS when empty.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub prefix: String,
    pub allow_http: bool,
    pub retry_timeout: String,
}

impl Default for S3Section {
    fn default() -> Self {
        S3Section {
            endpoint: String::new(),
            bucket: String::new(),
            region: "us-east-1".into(),
            prefix: String::new(),
            allow_http: false,
            retry_timeout: "60s".into(),
        }
    }
}

impl Default for ArchiveSection {
    fn default() -> Self {
        let d = tidings_archive::ArchiveConfig::default();
        ArchiveSection {
            enabled: true,
            interval: "10m".into(),
            hot_window: "30d".into(),
            retention: String::new(),
            max_hot_events: d.max_hot_events,
            storage: "local".into(),
            path: None,
            s3: S3Section::default(),
            segment_max_events: d.segment_max_events,
            row_group_events: d.row_group_events,
            zstd_level: d.zstd_level,
            cache_bytes: 64 << 20,
            orphan_grace: "1h".into(),
            tenants: Default::default(),
        }
    }
}

/// A duration like 0s, 90s, 30m, 1h, 2d, in seconds.
pub fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 30m, 1h, 2d"))?;
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        other => return Err(format!("{text:?}: unknown unit {other:?} (s, m, h, d)")),
    };
    n.checked_mul(scale)
        .filter(|s| *s <= 100 * 365 * 86_400)
        .ok_or_else(|| format!("{text:?} is longer than a century"))
}

/// The NATS link: where, with which credential, over TLS or not
/// (docs/decisions/nats-identity-and-permissions.md). At most one credential kind may be
/// set. Secrets are never in this file itself: they come from files (mode 0600) or from
/// `TIDINGS_NATS_PASSWORD` / `TIDINGS_NATS_TOKEN`; `Debug` redacts them and the URL's
/// userinfo. Unknown keys are refused by `Config::load` (the publisher's settings are
/// flattened in, which serde's `deny_unknown_fields` does not allow).
#[derive(Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct NatsSection {
    pub url: String,
    pub request_timeout_ms: u64,
    /// The event stream and the publisher (`publish_backlog`, `stream_max_age_secs`,
    /// `stream_max_bytes`): the log role's own settings type, read from this table.
    #[serde(flatten)]
    pub publisher: tidings_log_role::publisher::PublisherConfig,
    /// Log requests one log process serves at once (`--role log`).
    pub rpc_in_flight: usize,
    /// User name for user/password authentication; the password comes from
    /// `password_file` or `TIDINGS_NATS_PASSWORD`.
    pub user: String,
    pub password_file: Option<PathBuf>,
    /// A file holding an authorization token (or `TIDINGS_NATS_TOKEN`).
    pub token_file: Option<PathBuf>,
    /// A file holding this role's NKey user seed (`tidings nats init` writes one per role).
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (user JWT + seed) for a server in operator/JWT mode.
    pub creds_file: Option<PathBuf>,
    /// The CA (PEM) that signed the NATS server's certificate.
    pub tls_ca_file: Option<PathBuf>,
    /// A client certificate and key (PEM), when the server verifies clients.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Refuse a server that does not speak TLS.
    pub tls_required: bool,
    /// How long the first connection waits for a server that is not up yet: 30s, 2m.
    /// A refused credential or an untrusted certificate fails at once.
    pub connect_wait: String,
    /// From `TIDINGS_NATS_PASSWORD`, never from the file.
    #[serde(skip)]
    pub password_env: Option<String>,
    /// From `TIDINGS_NATS_TOKEN`, never from the file.
    #[serde(skip)]
    pub token_env: Option<String>,
}

impl std::fmt::Debug for NatsSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("NatsSection")
            .field("url", &tidings_log_api::nats::redact_url(&self.url))
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("publisher", &self.publisher)
            .field("rpc_in_flight", &self.rpc_in_flight)
            .field("user", &self.user)
            .field("password_file", &self.password_file)
            .field("token_file", &self.token_file)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("creds_file", &self.creds_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_required", &self.tls_required)
            .field("connect_wait", &self.connect_wait)
            .field("password_env", &redacted(&self.password_env))
            .field("token_env", &redacted(&self.token_env))
            .finish()
    }
}

/// Reads a secret file, trimmed; a file others can read is refused, so a seed or password
/// left world-readable is found at startup rather than by someone else.
fn read_secret_file(what: &str, path: &Path) -> Result<String, ConfigError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(ConfigError::Invalid(format!(
                "{what} {} is readable by other users (mode {:o}); chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            )));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let text = text.trim().to_string();
    if text.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "{what} {} is empty",
            path.display()
        )));
    }
    Ok(text)
}

impl NatsSection {
    /// The credential and TLS settings, secrets read from their files; what
    /// [`tidings_log_api::nats::connect_nats`] takes. Exactly one credential kind, or none.
    pub fn connect(&self) -> Result<tidings_log_api::nats::NatsConnect, ConfigError> {
        use tidings_log_api::nats::NatsAuth;
        let password = match (&self.password_env, &self.password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(f)) => Some(read_secret_file("nats.password_file", f)?),
            (None, None) => None,
        };
        let token = match (&self.token_env, &self.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(read_secret_file("nats.token_file", f)?),
            (None, None) => None,
        };
        let mut kinds = Vec::new();
        if !self.user.is_empty() || password.is_some() {
            kinds.push("user/password");
        }
        if token.is_some() {
            kinds.push("token");
        }
        if self.nkey_seed_file.is_some() {
            kinds.push("nkey_seed_file");
        }
        if self.creds_file.is_some() {
            kinds.push("creds_file");
        }
        if kinds.len() > 1 {
            return Err(ConfigError::Invalid(format!(
                "nats: more than one credential is set ({}); keep one",
                kinds.join(", ")
            )));
        }
        let auth = if let Some(t) = token {
            NatsAuth::Token(t)
        } else if let Some(f) = &self.nkey_seed_file {
            NatsAuth::NKeySeed(read_secret_file("nats.nkey_seed_file", f)?)
        } else if let Some(f) = &self.creds_file {
            NatsAuth::Creds(read_secret_file("nats.creds_file", f)?)
        } else if !self.user.is_empty() || password.is_some() {
            match (self.user.is_empty(), password) {
                (false, Some(password)) => NatsAuth::UserPassword {
                    user: self.user.clone(),
                    password,
                },
                _ => {
                    return Err(ConfigError::Invalid(
                        "nats.user needs a password (nats.password_file or \
                         TIDINGS_NATS_PASSWORD), and a password needs nats.user"
                            .into(),
                    ));
                }
            }
        } else {
            NatsAuth::None
        };
        let tls_client_cert = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "nats.tls_cert_file and nats.tls_key_file go together".into(),
                ));
            }
        };
        let wait = parse_duration_secs(&self.connect_wait)
            .map_err(|e| ConfigError::Invalid(format!("nats.connect_wait: {e}")))?;
        Ok(tidings_log_api::nats::NatsConnect {
            url: self.url.clone(),
            auth,
            tls_ca_file: self.tls_ca_file.clone(),
            tls_client_cert,
            tls_required: self.tls_required,
            initial_wait: std::time::Duration::from_secs(wait),
            inbox_prefix: None,
        })
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    pub issuer: String,
    /// The audience of chat tokens (the gateway's).
    pub audience: String,
    /// The audience of compliance and admin tokens (the admin listener's). Each side refuses
    /// the other's, so a chat token never reads history and a compliance token never chats.
    pub compliance_audience: String,
    /// Accept HS256 tokens signed with `hs256_secret_file` (development only). Off unless
    /// set: a secret file lying around enables nothing.
    pub hs256_enabled: bool,
    /// HS256 secret for development tokens (`tidings keys init` writes it, `tidings token
    /// issue` signs with it). Read only when `hs256_enabled`.
    pub hs256_secret_file: PathBuf,
    /// Ed25519 public keys for production tokens (EdDSA), as 64 hex digits, optionally
    /// prefixed by a key id: "kid:hex".
    pub ed25519_public_keys: Vec<String>,
    /// A JWKS file of Ed25519 public keys (OKP), used beside `ed25519_public_keys` and
    /// re-read when it changes; empty for none.
    pub jwks_file: PathBuf,
    /// How often the JWKS file is checked for changes, in milliseconds.
    pub jwks_poll_ms: u64,
    /// Clock skew allowed on exp, nbf and iat.
    pub leeway_secs: u64,
    /// The longest a token may live (exp - iat).
    pub max_token_lifetime_secs: u64,
    /// How often a gateway with the log in-process re-checks its live sessions' tokens
    /// against the revocation records (a missed NATS notice costs at most this long).
    pub revocation_recheck_secs: u64,
    /// The public key of tidings's bot tokens (64 hex digits; `tidings keys bot-identity`
    /// prints it), for a gateway without the master key. Empty: derived from the master key
    /// where there is one; a gateway with neither refuses bot tokens.
    pub bot_public_key: String,
}

impl Default for NatsSection {
    fn default() -> Self {
        NatsSection {
            url: "nats://127.0.0.1:4222".into(),
            request_timeout_ms: 5000,
            publisher: tidings_log_role::publisher::PublisherConfig::default(),
            rpc_in_flight: 1024,
            user: String::new(),
            password_file: None,
            token_file: None,
            nkey_seed_file: None,
            creds_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
            connect_wait: "30s".into(),
            password_env: None,
            token_env: None,
        }
    }
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            issuer: "tidings".into(),
            audience: "tidings".into(),
            compliance_audience: "tidings-compliance".into(),
            hs256_enabled: false,
            hs256_secret_file: PathBuf::from("tidings-jwt.secret"),
            ed25519_public_keys: Vec::new(),
            jwks_file: PathBuf::new(),
            jwks_poll_ms: 5000,
            leeway_secs: 30,
            max_token_lifetime_secs: 24 * 3600,
            revocation_recheck_secs: 30,
            bot_public_key: String::new(),
        }
    }
}

/// `[log]`: the log library's own settings type ([`LogConfig`], which holds the overload and
/// search settings too), its send buffer's bounds, and what only the server reads: where the
/// send buffer lives, the configured kinds and interceptors. One flat table in the file, as
/// ever: the library types are flattened into it (docs/decisions/config-types-read-directly.md),
/// so unknown keys are refused by `Config::load`, not by serde.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default)]
pub struct LogSection {
    #[serde(flatten)]
    pub config: LogConfig,
    /// Keep accepting messages while the store cannot commit, in a write-ahead buffer on
    /// disk outside it (docs/decisions/send-buffer.md).
    pub send_buffer: bool,
    /// Where the buffer lives: `files` (a directory on this machine), `jetstream` (a file
    /// stream on NATS, replicated in a cluster: for writers on several hosts), or `auto`:
    /// `files` with the embedded store or when `send_buffer_dir` is set, else `jetstream`.
    pub send_buffer_medium: String,
    /// The `files` directory; every writer of a store must share it. Empty: `send-buffer`
    /// under `data_dir`.
    pub send_buffer_dir: PathBuf,
    /// Copies the `jetstream` buffer's stream keeps (1 to 5; 3 in a NATS cluster, so it
    /// survives losing a server).
    pub send_buffer_replicas: usize,
    /// How much the buffer may hold (`send_buffer_max_bytes`, `send_buffer_max_age_ms`):
    /// the library's type, its place set where the buffer is made (`send_buffer_with`).
    #[serde(flatten)]
    pub send_buffer_limits: tidings_log::send_buffer::SendBufferConfig,
    /// Conversation kinds beyond the built-in ones (`[[log.kinds]]`).
    pub kinds: Vec<KindSection>,
    /// Pre-commit hooks on users' messages (`[[log.interceptors]]`,
    /// docs/decisions/interceptors.md).
    pub interceptors: Vec<crate::intercept::InterceptorSection>,
}

/// One configured conversation kind (docs/decisions/kinds-and-roles.md).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KindSection {
    pub name: String,
    pub roles: Vec<String>,
    pub creator_role: String,
    pub member_role: String,
    #[serde(default)]
    pub fixed_members: bool,
    #[serde(default)]
    pub recall_window_ms: u64,
    /// Action name (post, react, recall_own, ...) to the roles that may.
    #[serde(default)]
    pub allow: std::collections::BTreeMap<String, Vec<String>>,
}

impl KindSection {
    fn policy(&self) -> Result<tidings_log::policy::KindPolicy, String> {
        let mut allow = std::collections::HashMap::new();
        for (action, roles) in &self.allow {
            let action = tidings_log::policy::Action::from_name(action)
                .map_err(|e| format!("kind {}: {e}", self.name))?;
            allow.insert(action, roles.clone());
        }
        Ok(tidings_log::policy::KindPolicy {
            name: self.name.clone(),
            roles: self.roles.clone(),
            creator_role: self.creator_role.clone(),
            member_role: self.member_role.clone(),
            fixed_members: self.fixed_members,
            allow,
            recall_window_ms: self.recall_window_ms,
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("tidings-data"),
            master_key_file: PathBuf::from("tidings-master.key"),
            keys: KeysSection::default(),
            log: LogSection::default(),
            gateway: tidings_gateway::GatewayConfig::default(),
            nats: NatsSection::default(),
            auth: AuthSection::default(),
            archive: ArchiveSection::default(),
            admin: AdminSection::default(),
            store: StoreSection::default(),
            webhooks: crate::webhooks::WebhooksConfig::default(),
            cell: cells::CellsConfig::default(),
        }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            config: LogConfig::default(),
            send_buffer: true,
            send_buffer_medium: "auto".into(),
            send_buffer_dir: PathBuf::new(),
            send_buffer_replicas: 1,
            send_buffer_limits: Default::default(),
            kinds: Vec::new(),
            interceptors: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    Env {
        name: String,
        value: String,
        reason: String,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads the file (if any), then applies environment overrides from `env`, then
    /// validates.
    pub fn load(
        explicit: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let path = explicit
            .map(Path::to_path_buf)
            .or_else(|| env("TIDINGS_CONFIG").map(PathBuf::from))
            .or_else(|| {
                let local = PathBuf::from("tidings.toml");
                local.is_file().then_some(local)
            });
        let config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                let parse = |message: String| ConfigError::Parse {
                    path: path.display().to_string(),
                    message,
                };
                let table: toml::Table = toml::from_str(&text).map_err(|e| parse(e.to_string()))?;
                let config: Config = toml::from_str(&text).map_err(|e| {
                    let message = e.to_string();
                    // A library type flattened into its table (`[log]`, `[nats]`) has a bad
                    // value reported at the table, not at its key: name the key.
                    match env::refused_value(&table) {
                        Some((path, reason))
                            if !path
                                .rsplit('.')
                                .next()
                                .is_some_and(|key| message.contains(key)) =>
                        {
                            parse(format!("{path}: {reason}"))
                        }
                        _ => parse(message),
                    }
                })?;
                // Nor can such a table refuse unknown keys through serde: every key of the
                // file is checked against the settings the defaults' tree shows.
                env::refuse_unknown_keys(&table).map_err(parse)?;
                config
            }
            None => Config::default(),
        };
        let config = env::apply(&config, env)?;
        config.validate()?;
        Ok(config)
    }

    /// Warns about each variable of this process that looks like a setting
    /// (`TIDINGS_<SECTION>_...`) but names none: a typo is otherwise ignored without a word.
    /// Not an error: scripts and tests set other `TIDINGS_*` variables of their own.
    pub fn warn_unknown_env() {
        let present: Vec<String> = std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .collect();
        for name in env::unknown(present.iter().map(String::as_str)) {
            tracing::warn!(name, "environment variable names no setting; ignored");
        }
    }

    /// `[gateway]` with the two values it takes from other sections: the read limit
    /// (`log.max_read_limit`) and the cells' URLs (`[cell]`).
    pub fn gateway_config(&self) -> tidings_gateway::GatewayConfig {
        tidings_gateway::GatewayConfig {
            read_limit: self.log.config.max_read_limit,
            cell_urls: self.cell.urls(),
            ..self.gateway.clone()
        }
    }

    pub fn publisher_config(&self) -> tidings_log_role::publisher::PublisherConfig {
        self.nats.publisher.clone()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.log_config()
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("log.{e}")))?;
        self.webhooks.validate().map_err(ConfigError::Invalid)?;
        self.cell.validate().map_err(ConfigError::Invalid)?;
        let g = &self.gateway;
        let positive = [
            ("gateway.max_frame_bytes", g.max_frame_bytes as u64),
            ("gateway.outbound_queue", g.outbound_queue as u64),
            ("gateway.sync_latest", g.sync_latest as u64),
            ("gateway.hello_timeout_ms", millis(g.hello_timeout)),
            ("gateway.frames_per_second", u64::from(g.frames_per_second)),
            ("gateway.frame_burst", u64::from(g.frame_burst)),
            (
                "gateway.max_conversations_per_session",
                g.max_conversations_per_session as u64,
            ),
            ("gateway.heal_interval_ms", millis(g.heal_interval)),
            (
                "gateway.search_max_query_bytes",
                g.search_max_query_bytes as u64,
            ),
            ("gateway.search_max_terms", g.search_max_terms as u64),
            ("gateway.search_page_hits", g.search_page_hits as u64),
            ("gateway.search_per_minute", u64::from(g.search_per_minute)),
            ("gateway.handshake_timeout_ms", millis(g.handshake_timeout)),
            ("gateway.ping_interval_ms", millis(g.ping_interval)),
            ("gateway.idle_timeout_ms", millis(g.idle_timeout)),
            ("gateway.max_connections", g.max_connections as u64),
            (
                "gateway.max_connections_per_ip",
                g.max_connections_per_ip as u64,
            ),
            (
                "gateway.max_sessions_per_user",
                g.max_sessions_per_user as u64,
            ),
            (
                "gateway.outbound_queue_bytes",
                g.outbound_queue_bytes as u64,
            ),
            ("gateway.max_reply_bytes", g.max_reply_bytes as u64),
            (
                "gateway.sync_page_conversations",
                g.sync_page_conversations as u64,
            ),
            ("nats.request_timeout_ms", self.nats.request_timeout_ms),
            (
                "nats.stream_max_age_secs",
                self.nats.publisher.stream_max_age.as_secs(),
            ),
            ("nats.publish_backlog", self.nats.publisher.backlog as u64),
            ("nats.rpc_in_flight", self.nats.rpc_in_flight as u64),
            ("auth.jwks_poll_ms", self.auth.jwks_poll_ms),
            (
                "auth.max_token_lifetime_secs",
                self.auth.max_token_lifetime_secs,
            ),
            (
                "auth.revocation_recheck_secs",
                self.auth.revocation_recheck_secs,
            ),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be greater than 0"
                )));
            }
        }
        // A queue that cannot hold two full replies would cut off clients that read fine.
        if g.outbound_queue_bytes < 2 * g.max_reply_bytes {
            return Err(ConfigError::Invalid(format!(
                "gateway.outbound_queue_bytes ({}) must be at least twice gateway.max_reply_bytes ({})",
                g.outbound_queue_bytes, g.max_reply_bytes
            )));
        }
        // A reply must hold the largest message (the log returns one event at least).
        let l = &self.log.config;
        if g.max_reply_bytes < l.max_body_bytes + 4096 {
            return Err(ConfigError::Invalid(format!(
                "gateway.max_reply_bytes ({}) must exceed log.max_body_bytes ({}) by 4096",
                g.max_reply_bytes, l.max_body_bytes
            )));
        }
        if g.sync_page_conversations >= l.max_read_limit {
            return Err(ConfigError::Invalid(format!(
                "gateway.sync_page_conversations ({}) must be below log.max_read_limit ({})",
                g.sync_page_conversations, l.max_read_limit
            )));
        }
        if g.member_fill_page == 0 || g.member_fill_page > l.max_read_limit {
            return Err(ConfigError::Invalid(format!(
                "gateway.member_fill_page ({}) must be 1 to log.max_read_limit ({})",
                g.member_fill_page, l.max_read_limit
            )));
        }
        if g.idle_timeout <= g.ping_interval {
            return Err(ConfigError::Invalid(format!(
                "gateway.idle_timeout_ms ({}) must exceed gateway.ping_interval_ms ({})",
                millis(g.idle_timeout),
                millis(g.ping_interval)
            )));
        }
        self.validate_auth()?;
        self.kinds()?;
        self.intercept_rules()?;
        if self.send_buffer_medium()?.is_some() {
            let place = tidings_log::send_buffer::BufferPlace::Dir(PathBuf::from("-"));
            self.send_buffer_with(place)
                .validate()
                .map_err(|e| ConfigError::Invalid(format!("log.{e}")))?;
        }
        self.archive_config()?;
        self.archive_storage()?;
        self.log_public_key()?;
        edge_tls("gateway", &g.tls_cert_file, &g.tls_key_file)?;
        edge_tls("admin", &self.admin.tls_cert_file, &self.admin.tls_key_file)?;
        parse_duration_secs(&self.nats.connect_wait)
            .map_err(|e| ConfigError::Invalid(format!("nats.connect_wait: {e}")))?;
        self.tenant_keys()?;
        if self.backend()? == Backend::Tikv {
            self.tikv_config()?;
        }
        if g.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "gateway.listen {:?} is not an address like 127.0.0.1:7300",
                g.listen
            )));
        }
        if !self.admin.listen.is_empty()
            && self.admin.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(ConfigError::Invalid(format!(
                "admin.listen {:?} is not an address like 127.0.0.1:7180 (empty disables it)",
                self.admin.listen
            )));
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        if a.issuer.is_empty() || a.audience.is_empty() || a.compliance_audience.is_empty() {
            return Err(ConfigError::Invalid(
                "auth.issuer, auth.audience and auth.compliance_audience must not be empty".into(),
            ));
        }
        if a.audience == a.compliance_audience {
            return Err(ConfigError::Invalid(format!(
                "auth.audience and auth.compliance_audience are both {:?}: chat and compliance \
                 tokens must have audiences of their own",
                a.audience
            )));
        }
        if a.max_token_lifetime_secs > MAX_TOKEN_LIFETIME_SECS {
            return Err(ConfigError::Invalid(format!(
                "auth.max_token_lifetime_secs is at most {MAX_TOKEN_LIFETIME_SECS} (30 days)"
            )));
        }
        Ok(())
    }

    pub fn backend(&self) -> Result<Backend, ConfigError> {
        match self.store.backend.as_str() {
            "embedded" => Ok(Backend::Embedded),
            "tikv" => Ok(Backend::Tikv),
            other => Err(ConfigError::Invalid(format!(
                "store.backend {other:?} is not \"embedded\" or \"tikv\""
            ))),
        }
    }

    /// The TiKV connection settings, validated (endpoints, TLS all-or-none, timeout).
    pub fn tikv_config(&self) -> Result<tidings_log::store::TikvConfig, ConfigError> {
        let t = &self.store.tikv;
        let path = |p: &String| (!p.trim().is_empty()).then(|| PathBuf::from(p));
        let invalid = |e: tidings_log::store::StoreError| ConfigError::Invalid(e.to_string());
        let secs = parse_duration_secs(&t.connect_timeout)
            .map_err(|e| ConfigError::Invalid(format!("store.tikv.connect_timeout: {e}")))?;
        let cfg = tidings_log::store::TikvConfig {
            pd_endpoints: t.pd_endpoints.clone(),
            key_prefix: t.key_prefix.clone().into_bytes(),
            tls: tidings_log::store::TikvConfig::tls_from_parts(
                path(&t.ca_path),
                path(&t.cert_path),
                path(&t.key_path),
            )
            .map_err(invalid)?,
            connect_timeout: std::time::Duration::from_secs(secs),
        };
        cfg.validate().map_err(invalid)?;
        Ok(cfg)
    }

    /// `[log]` with what the log takes from elsewhere: the send buffer (its place resolved),
    /// the kinds, this cell; search asks the postings only while the hot index is on.
    pub fn log_config(&self) -> LogConfig {
        let mut config = LogConfig {
            own_partitions: true,
            send_buffer: self.send_buffer(),
            // Checked when the configuration was loaded (`validate`).
            kinds: self.kinds().unwrap_or_default(),
            cell: self.cell.log_config(),
            ..self.log.config.clone()
        };
        // Without the hot index, search opens every hot event (same results): the postings
        // a past run left are not trusted to be current.
        config.search.use_index = config.search.hot_index;
        config
    }

    /// The interceptor rules (`[[log.interceptors]]`), checked: each names a known kind if
    /// any, a subject under `tidings.intercept.`, a deadline in range.
    pub fn intercept_rules(
        &self,
    ) -> Result<Vec<tidings_log::interceptor::InterceptRule>, ConfigError> {
        let kinds = self.kinds()?;
        self.log
            .interceptors
            .iter()
            .enumerate()
            .map(|(i, section)| {
                section
                    .rule(&kinds)
                    .map_err(|e| ConfigError::Invalid(format!("log.interceptors[{i}]: {e}")))
            })
            .collect()
    }

    /// The conversation kinds: built in, and `[[log.kinds]]`.
    pub fn kinds(&self) -> Result<tidings_log::policy::Kinds, ConfigError> {
        let invalid = |e: String| ConfigError::Invalid(format!("log.kinds: {e}"));
        let extra = self
            .log
            .kinds
            .iter()
            .map(KindSection::policy)
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        tidings_log::policy::Kinds::new(extra).map_err(invalid)
    }

    /// Where the send buffer lives; `None` when it is off.
    pub fn send_buffer_medium(&self) -> Result<Option<SendBufferMedium>, ConfigError> {
        let s = &self.log;
        if !s.send_buffer {
            return Ok(None);
        }
        let files = || {
            SendBufferMedium::Files(if s.send_buffer_dir.as_os_str().is_empty() {
                self.data_dir.join("send-buffer")
            } else {
                s.send_buffer_dir.clone()
            })
        };
        let stream = || -> Result<SendBufferMedium, ConfigError> {
            if !(1..=5).contains(&s.send_buffer_replicas) {
                return Err(ConfigError::Invalid(format!(
                    "log.send_buffer_replicas must be 1 to 5 (JetStream's range), not {}",
                    s.send_buffer_replicas
                )));
            }
            Ok(SendBufferMedium::Stream {
                replicas: s.send_buffer_replicas,
            })
        };
        Ok(Some(match s.send_buffer_medium.as_str() {
            "files" => files(),
            "jetstream" => stream()?,
            "auto" | "" => {
                if self.backend()? == Backend::Embedded || !s.send_buffer_dir.as_os_str().is_empty()
                {
                    files()
                } else {
                    // Writers on several hosts: a place every one of them reaches.
                    stream()?
                }
            }
            other => {
                return Err(ConfigError::Invalid(format!(
                    "log.send_buffer_medium must be auto, files or jetstream, not {other:?}"
                )));
            }
        }))
    }

    /// The send buffer's settings when it lives in files; `None` when it is off or on
    /// JetStream (which needs the NATS connection: `open::open_log_owning` makes it).
    pub fn send_buffer(&self) -> Option<tidings_log::send_buffer::SendBufferConfig> {
        match self.send_buffer_medium().ok()?? {
            SendBufferMedium::Files(dir) => {
                Some(self.send_buffer_with(tidings_log::send_buffer::BufferPlace::Dir(dir)))
            }
            SendBufferMedium::Stream { .. } => None,
        }
    }

    /// The send buffer's settings with its place.
    pub fn send_buffer_with(
        &self,
        place: tidings_log::send_buffer::BufferPlace,
    ) -> tidings_log::send_buffer::SendBufferConfig {
        tidings_log::send_buffer::SendBufferConfig {
            place,
            ..self.log.send_buffer_limits.clone()
        }
    }

    /// The archiver's settings.
    pub fn archive_config(&self) -> Result<tidings_archive::ArchiveConfig, ConfigError> {
        let a = &self.archive;
        let ms = |name: &str, text: &str| {
            parse_duration_secs(text)
                .map(|s| s * 1000)
                .map_err(|e| ConfigError::Invalid(format!("archive.{name}: {e}")))
        };
        let retention = |name: &str, text: &str| -> Result<Option<u64>, ConfigError> {
            if text.is_empty() {
                return Ok(None);
            }
            match ms(name, text)? {
                0 => Err(ConfigError::Invalid(format!(
                    "archive.{name} must be positive (or empty to keep history forever)"
                ))),
                n => Ok(Some(n)),
            }
        };
        let mut tenants = std::collections::BTreeMap::new();
        for (tenant, t) in &a.tenants {
            let hot_window_ms = match &t.hot_window {
                Some(w) => Some(ms(&format!("tenants.{tenant}.hot_window"), w)?),
                None => None,
            };
            let retention_ms = match &t.retention {
                Some(r) => retention(&format!("tenants.{tenant}.retention"), r)?,
                None => None,
            };
            tenants.insert(
                tenant.clone(),
                tidings_archive::TenantPolicy {
                    hot_window_ms,
                    max_hot_events: t.max_hot_events,
                    // A tenant's "" means "forever", overriding the default.
                    retention_ms: t
                        .retention
                        .as_ref()
                        .map(|_| retention_ms.unwrap_or(u64::MAX)),
                },
            );
        }
        let cfg = tidings_archive::ArchiveConfig {
            hot_window_ms: ms("hot_window", &a.hot_window)?,
            max_hot_events: a.max_hot_events,
            tenants,
            retention_ms: retention("retention", &a.retention)?,
            segment_max_events: a.segment_max_events,
            row_group_events: a.row_group_events,
            zstd_level: a.zstd_level,
            orphan_grace_ms: ms("orphan_grace", &a.orphan_grace)?,
            ..tidings_archive::ArchiveConfig::default()
        };
        if ms("interval", &a.interval)? == 0 {
            return Err(ConfigError::Invalid(
                "archive.interval must be positive".into(),
            ));
        }
        if a.cache_bytes == 0 {
            return Err(ConfigError::Invalid(
                "archive.cache_bytes must be positive".into(),
            ));
        }
        cfg.validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(cfg)
    }

    /// Where archive segments are stored.
    pub fn archive_storage(&self) -> Result<tidings_archive::StorageConfig, ConfigError> {
        let a = &self.archive;
        match a.storage.as_str() {
            "local" => Ok(tidings_archive::StorageConfig::Local {
                root: a
                    .path
                    .clone()
                    .unwrap_or_else(|| self.data_dir.join("archive")),
            }),
            "s3" => {
                if a.s3.bucket.is_empty() {
                    return Err(ConfigError::Invalid(
                        "archive.storage is \"s3\" but archive.s3.bucket is empty".into(),
                    ));
                }
                let retry = parse_duration_secs(&a.s3.retry_timeout)
                    .map_err(|e| ConfigError::Invalid(format!("archive.s3.retry_timeout: {e}")))?;
                Ok(tidings_archive::StorageConfig::S3(
                    tidings_archive::S3Config {
                        endpoint: (!a.s3.endpoint.is_empty()).then(|| a.s3.endpoint.clone()),
                        bucket: a.s3.bucket.clone(),
                        region: a.s3.region.clone(),
                        prefix: a.s3.prefix.clone(),
                        allow_http: a.s3.allow_http,
                        retry_timeout: std::time::Duration::from_secs(retry),
                        // From AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, never the file.
                        credentials: None,
                    },
                ))
            }
            other => Err(ConfigError::Invalid(format!(
                "archive.storage {other:?} is neither \"local\" nor \"s3\""
            ))),
        }
    }

    /// Where each tenant with a tenant-held key gets it (`[keys.tenants.<tenant>]`).
    pub fn tenant_keys(&self) -> Result<TenantKeys, ConfigError> {
        let k = &self.keys;
        let timeout = parse_duration_secs(&k.command_timeout)
            .map_err(|e| ConfigError::Invalid(format!("keys.command_timeout: {e}")))?;
        if timeout == 0 || timeout > MAX_KEY_COMMAND_TIMEOUT_SECS {
            return Err(ConfigError::Invalid(format!(
                "keys.command_timeout must be between 1s and {MAX_KEY_COMMAND_TIMEOUT_SECS}s"
            )));
        }
        let mut keys = TenantKeys::default();
        for (tenant, t) in &k.tenants {
            let id = TenantId::new(tenant.as_str())
                .map_err(|e| ConfigError::Invalid(format!("keys.tenants: {e}")))?;
            let source = match (&t.key_file, &t.key_command) {
                (Some(path), None) => TenantKeySource::File(path.clone()),
                (None, Some(command)) if !command.trim().is_empty() => TenantKeySource::Command {
                    command: command.clone(),
                    timeout: std::time::Duration::from_secs(timeout),
                },
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "keys.tenants.{tenant} needs exactly one of key_file and key_command"
                    )));
                }
            };
            keys.insert(id, source);
        }
        Ok(keys)
    }

    /// The pinned log identity (`gateway.log_public_key`), if set.
    pub fn log_public_key(
        &self,
    ) -> Result<Option<tidings_log_api::bus_crypto::LogPublicKey>, ConfigError> {
        let text = self.gateway.log_public_key.trim();
        if text.is_empty() {
            return Ok(None);
        }
        tidings_log_api::bus_crypto::LogPublicKey::from_hex(text)
            .map(Some)
            .map_err(|e| ConfigError::Invalid(format!("gateway.log_public_key: {e}")))
    }

    /// The master key: `TIDINGS_MASTER_KEY` if set, else the key file.
    /// The public key bot tokens are checked with: `auth.bot_public_key`, else the one the
    /// master key derives (if this process has the master key), else none.
    pub fn bot_public_key(&self) -> Result<Option<[u8; 32]>, ConfigError> {
        let text = self.auth.bot_public_key.trim();
        if !text.is_empty() {
            let bytes = tidings_log::crypto::hex_decode(text)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    ConfigError::Invalid(
                        "auth.bot_public_key is 64 hex digits (`tidings keys bot-identity`)".into(),
                    )
                })?;
            return Ok(Some(bytes));
        }
        let env = |name: &str| std::env::var(name).ok();
        Ok(self
            .master_key(env)
            .ok()
            .map(|master| tidings_auth::ed25519_public_key(&master.bot_signing_seed())))
    }

    pub fn master_key(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<MasterKey, tidings_log::LogError> {
        if let Some(hex) = env("TIDINGS_MASTER_KEY") {
            return MasterKey::from_hex(&hex).map_err(|reason| {
                tidings_log::LogError::MasterKeyMalformed {
                    path: "TIDINGS_MASTER_KEY".into(),
                    reason,
                }
            });
        }
        MasterKey::from_file(&self.master_key_file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// Every `TIDINGS_*` name the configuration answered to before the overrides were derived
    /// from the config tree (the old `apply_env` tables), a valid value for each (all valid
    /// together), the setting it lands in and what it reads there (JSON), one per line. A
    /// name that stops working, or lands elsewhere, fails here.
    const NAMES_THAT_WORKED_BEFORE_DERIVATION: &str = r#"
TIDINGS_DATA_DIR | /srv/t | data_dir | "/srv/t"
TIDINGS_MASTER_KEY_FILE | /k/master.key | master_key_file | "/k/master.key"
TIDINGS_KEYS_COMMAND_TIMEOUT | 20s | keys.command_timeout | "20s"
TIDINGS_GATEWAY_LISTEN | 127.0.0.1:7301 | gateway.listen | "127.0.0.1:7301"
TIDINGS_NATS_URL | nats://nats-1:4222 | nats.url | "nats://nats-1:4222"
TIDINGS_NATS_USER | gw | nats.user | "gw"
TIDINGS_NATS_PASSWORD_FILE | /s/nats.password | nats.password_file | "/s/nats.password"
TIDINGS_NATS_TOKEN_FILE | /s/nats.token | nats.token_file | "/s/nats.token"
TIDINGS_NATS_NKEY_SEED_FILE | /s/log.nk | nats.nkey_seed_file | "/s/log.nk"
TIDINGS_NATS_CREDS_FILE | /s/log.creds | nats.creds_file | "/s/log.creds"
TIDINGS_NATS_TLS_CA_FILE | /s/ca.pem | nats.tls_ca_file | "/s/ca.pem"
TIDINGS_NATS_TLS_CERT_FILE | /s/nats.crt | nats.tls_cert_file | "/s/nats.crt"
TIDINGS_NATS_TLS_KEY_FILE | /s/nats.key | nats.tls_key_file | "/s/nats.key"
TIDINGS_NATS_TLS_REQUIRED | yes | nats.tls_required | true
TIDINGS_NATS_CONNECT_WAIT | 2m | nats.connect_wait | "2m"
TIDINGS_NATS_PUBLISH_BACKLOG | 9000 | nats.publish_backlog | 9000
TIDINGS_NATS_REQUEST_TIMEOUT_MS | 3000 | nats.request_timeout_ms | 3000
TIDINGS_GATEWAY_TLS_CERT_FILE | /s/gw.crt | gateway.tls_cert_file | "/s/gw.crt"
TIDINGS_GATEWAY_TLS_KEY_FILE | /s/gw.key | gateway.tls_key_file | "/s/gw.key"
TIDINGS_ADMIN_TLS_CERT_FILE | /s/admin.crt | admin.tls_cert_file | "/s/admin.crt"
TIDINGS_ADMIN_TLS_KEY_FILE | /s/admin.key | admin.tls_key_file | "/s/admin.key"
TIDINGS_ADMIN_LISTEN | 127.0.0.1:7181 | admin.listen | "127.0.0.1:7181"
TIDINGS_GATEWAY_LOG_PUBLIC_KEY | abababababababababababababababababababababababababababababababab | gateway.log_public_key | "abababababababababababababababababababababababababababababababab"
TIDINGS_STORE_BACKEND | tikv | store.backend | "tikv"
TIDINGS_STORE_FAULTS_FILE | /run/faults | store.faults_file | "/run/faults"
TIDINGS_TIKV_PD | pd-0:2379, pd-1:2379, | store.tikv.pd_endpoints | ["pd-0:2379","pd-1:2379"]
TIDINGS_TIKV_KEY_PREFIX | tidings/test/ | store.tikv.key_prefix | "tidings/test/"
TIDINGS_ARCHIVE_ENABLED | false | archive.enabled | false
TIDINGS_ARCHIVE_STORAGE | s3 | archive.storage | "s3"
TIDINGS_ARCHIVE_HOT_WINDOW | 7d | archive.hot_window | "7d"
TIDINGS_ARCHIVE_RETENTION | 365d | archive.retention | "365d"
TIDINGS_ARCHIVE_INTERVAL | 5m | archive.interval | "5m"
TIDINGS_ARCHIVE_ORPHAN_GRACE | 2h | archive.orphan_grace | "2h"
TIDINGS_ARCHIVE_PATH | /srv/archive | archive.path | "/srv/archive"
TIDINGS_ARCHIVE_S3_ENDPOINT | http://garage:3900 | archive.s3.endpoint | "http://garage:3900"
TIDINGS_ARCHIVE_S3_BUCKET | chat | archive.s3.bucket | "chat"
TIDINGS_ARCHIVE_S3_REGION | garage | archive.s3.region | "garage"
TIDINGS_ARCHIVE_S3_PREFIX | prod/ | archive.s3.prefix | "prod/"
TIDINGS_ARCHIVE_S3_ALLOW_HTTP | true | archive.s3.allow_http | true
TIDINGS_AUTH_HS256_ENABLED | on | auth.hs256_enabled | true
TIDINGS_AUTH_HS256_SECRET_FILE | /s/jwt.secret | auth.hs256_secret_file | "/s/jwt.secret"
TIDINGS_AUTH_JWKS_FILE | /s/jwks.json | auth.jwks_file | "/s/jwks.json"
TIDINGS_AUTH_JWKS_POLL_MS | 7000 | auth.jwks_poll_ms | 7000
TIDINGS_AUTH_BOT_PUBLIC_KEY | cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd | auth.bot_public_key | "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"
TIDINGS_AUTH_LEEWAY_SECS | 5 | auth.leeway_secs | 5
TIDINGS_AUTH_MAX_TOKEN_LIFETIME_SECS | 3600 | auth.max_token_lifetime_secs | 3600
TIDINGS_AUTH_REVOCATION_RECHECK_SECS | 15 | auth.revocation_recheck_secs | 15
TIDINGS_GATEWAY_MAX_FRAME_BYTES | 65536 | gateway.max_frame_bytes | 65536
TIDINGS_GATEWAY_OUTBOUND_QUEUE | 512 | gateway.outbound_queue | 512
TIDINGS_GATEWAY_SYNC_LATEST | 60 | gateway.sync_latest | 60
TIDINGS_GATEWAY_HELLO_TIMEOUT_MS | 8000 | gateway.hello_timeout_ms | 8000
TIDINGS_GATEWAY_FRAMES_PER_SECOND | 150 | gateway.frames_per_second | 150
TIDINGS_GATEWAY_FRAME_BURST | 300 | gateway.frame_burst | 300
TIDINGS_GATEWAY_TYPING_MAX_MEMBERS | 50 | gateway.typing_max_members | 50
TIDINGS_GATEWAY_MEMBER_CACHE_BYTES | 1048576 | gateway.member_cache_bytes | 1048576
TIDINGS_GATEWAY_MEMBER_FILL_PAGE | 700 | gateway.member_fill_page | 700
TIDINGS_GATEWAY_FAN_OUT_PUSHES_PER_CORE | 30000 | gateway.fan_out_pushes_per_core | 30000
TIDINGS_GATEWAY_FAN_OUT_PACED_SESSIONS | 500 | gateway.fan_out_paced_sessions | 500
TIDINGS_GATEWAY_HEAL_INTERVAL_MS | 25000 | gateway.heal_interval_ms | 25000
TIDINGS_GATEWAY_SEARCH_MAX_QUERY_BYTES | 300 | gateway.search_max_query_bytes | 300
TIDINGS_GATEWAY_SEARCH_MAX_TERMS | 12 | gateway.search_max_terms | 12
TIDINGS_GATEWAY_SEARCH_PAGE_HITS | 25 | gateway.search_page_hits | 25
TIDINGS_GATEWAY_SEARCH_PER_MINUTE | 30 | gateway.search_per_minute | 30
TIDINGS_GATEWAY_HANDSHAKE_TIMEOUT_MS | 4000 | gateway.handshake_timeout_ms | 4000
TIDINGS_GATEWAY_PING_INTERVAL_MS | 15000 | gateway.ping_interval_ms | 15000
TIDINGS_GATEWAY_IDLE_TIMEOUT_MS | 45000 | gateway.idle_timeout_ms | 45000
TIDINGS_GATEWAY_MAX_CONNECTIONS | 5000 | gateway.max_connections | 5000
TIDINGS_GATEWAY_MAX_CONNECTIONS_PER_IP | 500 | gateway.max_connections_per_ip | 500
TIDINGS_GATEWAY_MAX_SESSIONS_PER_USER | 8 | gateway.max_sessions_per_user | 8
TIDINGS_GATEWAY_OUTBOUND_QUEUE_BYTES | 8388608 | gateway.outbound_queue_bytes | 8388608
TIDINGS_GATEWAY_MAX_REPLY_BYTES | 1048576 | gateway.max_reply_bytes | 1048576
TIDINGS_GATEWAY_SYNC_PAGE_CONVERSATIONS | 50 | gateway.sync_page_conversations | 50
TIDINGS_LOG_MAX_BODY_BYTES | 32768 | log.max_body_bytes | 32768
TIDINGS_LOG_MAX_TITLE_BYTES | 512 | log.max_title_bytes | 512
TIDINGS_LOG_MAX_BATCH | 1024 | log.max_batch | 1024
TIDINGS_LOG_QUEUE_DEPTH | 8192 | log.queue_depth | 8192
TIDINGS_LOG_MAX_READ_LIMIT | 800 | log.max_read_limit | 800
TIDINGS_LOG_MAX_READ_BYTES | 600000 | log.max_read_bytes | 600000
TIDINGS_LOG_MAX_GROUP_MEMBERS | 50000 | log.max_group_members | 50000
TIDINGS_LOG_MAX_MEMBERS_PER_REQUEST | 500 | log.max_members_per_request | 500
TIDINGS_LOG_MAX_CONVERSATIONS_CREATED_PER_USER_PER_HOUR | 77 | log.max_conversations_created_per_user_per_hour | 77
TIDINGS_LOG_WRITER_CACHE_ENTRIES | 200000 | log.writer_cache_entries | 200000
TIDINGS_LOG_PARTITIONS | 32 | log.partitions | 32
TIDINGS_LOG_WRITER_ID | w-1 | log.writer_id | "w-1"
TIDINGS_LOG_LEASE_TTL_MS | 5000 | log.lease_ttl_ms | 5000
TIDINGS_LOG_SEND_BUFFER | false | log.send_buffer | false
TIDINGS_LOG_SEND_BUFFER_MEDIUM | jetstream | log.send_buffer_medium | "jetstream"
TIDINGS_LOG_SEND_BUFFER_DIR | /shared/buf | log.send_buffer_dir | "/shared/buf"
TIDINGS_LOG_SEND_BUFFER_REPLICAS | 3 | log.send_buffer_replicas | 3
TIDINGS_LOG_SEND_BUFFER_MAX_BYTES | 2097152 | log.send_buffer_max_bytes | 2097152
TIDINGS_LOG_SEND_BUFFER_MAX_AGE_MS | 60000 | log.send_buffer_max_age_ms | 60000
TIDINGS_LOG_CAPACITY_PER_SEC | 5000 | log.capacity_per_sec | 5000
TIDINGS_LOG_OVERLOAD_LEARN | 1 | log.overload_learn | true
TIDINGS_LOG_OVERLOAD_TRACKED_CONVERSATIONS | 2048 | log.overload_tracked_conversations | 2048
TIDINGS_LOG_OVERLOAD_FLOOR_PER_SEC | 7 | log.overload_floor_per_sec | 7
TIDINGS_LOG_OVERLOAD_FANOUT_PER_SEC | 40000 | log.overload_fanout_per_sec | 40000
TIDINGS_LOG_VIP_TENANTS | gold, silver, | log.vip_tenants | ["gold","silver"]
TIDINGS_LOG_MENTION_ALL_OWNERS_ONLY_FROM | 250 | log.mention_all_owners_only_from | 250
TIDINGS_LOG_SEARCH_HOT_INDEX | off | log.search_hot_index | false
TIDINGS_LOG_SEARCH_INDEXER_QUEUE | 4000 | log.search_indexer_queue | 4000
TIDINGS_LOG_SEARCH_INDEXER_BATCH | 300 | log.search_indexer_batch | 300
TIDINGS_LOG_SEARCH_INDEXER_QUEUE_BYTES | 9000000 | log.search_indexer_queue_bytes | 9000000
TIDINGS_LOG_SEARCH_BUDGET_BYTES | 7000000 | log.search_budget_bytes | 7000000
TIDINGS_LOG_SEARCH_MAX_PAGE_HITS | 40 | log.search_max_page_hits | 40
TIDINGS_WEBHOOKS_ENABLED | 0 | webhooks.enabled | false
TIDINGS_WEBHOOKS_MAX_PER_TENANT | 10 | webhooks.max_per_tenant | 10
TIDINGS_WEBHOOKS_DEFAULT_MAX_ATTEMPTS | 5 | webhooks.default_max_attempts | 5
TIDINGS_WEBHOOKS_REQUEST_TIMEOUT_MS | 5000 | webhooks.request_timeout_ms | 5000
TIDINGS_WEBHOOKS_BACKOFF_FIRST_MS | 250 | webhooks.backoff_first_ms | 250
TIDINGS_WEBHOOKS_BACKOFF_MAX_MS | 30000 | webhooks.backoff_max_ms | 30000
TIDINGS_WEBHOOKS_REFRESH_MS | 2000 | webhooks.refresh_ms | 2000
TIDINGS_WEBHOOKS_ACK_WAIT_MS | 20000 | webhooks.ack_wait_ms | 20000
TIDINGS_CELL_NAME | a | cell.name | "a"
TIDINGS_CELL_URL | wss://a/v1/ws | cell.url | "wss://a/v1/ws"
TIDINGS_CELL_LINK_KEY_FILE | /s/link.key | cell.link_key_file | "/s/link.key"
TIDINGS_CELL_NATS_URL | nats://link:4222 | cell.nats.url | "nats://link:4222"
TIDINGS_CELL_NATS_USER | link | cell.nats.user | "link"
TIDINGS_CELL_SYNC_TIMEOUT_MS | 3000 | cell.sync_timeout_ms | 3000
TIDINGS_CELL_PEERS | b=wss://b/v1/ws, c=wss://c/v1/ws | cell.peers | [{"name":"b","url":"wss://b/v1/ws"},{"name":"c","url":"wss://c/v1/ws"}]
"#;

    fn names_that_worked_before_derivation()
    -> Vec<(&'static str, &'static str, &'static str, serde_json::Value)> {
        NAMES_THAT_WORKED_BEFORE_DERIVATION
            .lines()
            .filter(|line| !line.is_empty())
            .map(|line| {
                let fields: Vec<&str> = line.split(" | ").collect();
                let [name, value, path, expected] = fields[..] else {
                    panic!("{line:?} is not name | value | path | expected");
                };
                let expected = serde_json::from_str(expected).expect("expected is JSON");
                (name, value, path, expected)
            })
            .collect()
    }

    /// The setting at `path` (`section.field`) as the config tree shows it.
    fn setting(cfg: &Config, path: &str) -> serde_json::Value {
        let tree = serde_json::to_value(cfg).expect("a config serialises");
        path.split('.')
            .try_fold(&tree, |node, key| node.get(key))
            .unwrap_or_else(|| panic!("no setting {path}"))
            .clone()
    }

    #[test]
    fn every_name_that_worked_before_derivation_still_lands_in_its_setting() {
        let cases = names_that_worked_before_derivation();
        let secrets = [
            ("TIDINGS_NATS_PASSWORD", "hunter2"),
            ("TIDINGS_NATS_TOKEN", "t0k"),
            ("TIDINGS_CELL_NATS_PASSWORD", "link-pw"),
        ];
        let vars: Vec<(&str, &str)> = cases
            .iter()
            .map(|(name, value, _, _)| (*name, *value))
            .chain(secrets)
            .collect();
        let cfg = Config::load(None, env(&vars)).expect("every name with a valid value");
        let defaults = Config::default();
        for (name, _, path, expected) in &cases {
            assert_ne!(
                &setting(&defaults, path),
                expected,
                "{name}: pick a value that is not the default"
            );
            assert_eq!(&setting(&cfg, path), expected, "{name} lands in {path}");
        }
        assert_eq!(cfg.nats.password_env.as_deref(), Some("hunter2"));
        assert_eq!(cfg.nats.token_env.as_deref(), Some("t0k"));
        assert_eq!(cfg.cell.nats.password_env.as_deref(), Some("link-pw"));
        // Each name on its own, too: no name leans on another to be read.
        for (name, value, path, expected) in &cases {
            if let Ok(cfg) = Config::load(None, env(&[(*name, *value)])) {
                assert_eq!(
                    &setting(&cfg, path),
                    expected,
                    "{name} alone lands in {path}"
                );
            }
        }
    }

    #[test]
    fn every_variable_the_example_file_names_is_read() {
        let example = include_str!("../../../ops/tidings.example.toml");
        // Stream names the comments mention, not variables.
        let streams = ["TIDINGS_SEND_BUFFER", "TIDINGS_EVENTS"];
        let known = env::names();
        let mut named = 0;
        for word in example.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("TIDINGS_") && !streams.contains(&word) {
                assert!(known.iter().any(|k| k == word), "{word} is read by nothing");
                named += 1;
            }
        }
        assert!(named > 100, "only {named} variables found in the example");
    }

    #[test]
    fn a_field_has_its_variable_without_code_and_bad_values_name_it() {
        let cfg = Config::load(
            None,
            env(&[
                ("TIDINGS_NATS_RPC_IN_FLIGHT", "64"),
                (
                    "TIDINGS_GATEWAY_ALLOWED_ORIGINS",
                    "https://a.example, https://b.example",
                ),
                ("TIDINGS_STORE_TIKV_CONNECT_TIMEOUT", "3s"),
                ("TIDINGS_ARCHIVE_S3_RETRY_TIMEOUT", "90s"),
                ("TIDINGS_CELL_NATS_TLS_CA_FILE", "/s/link-ca.pem"),
                ("TIDINGS_STORE_TIKV_PD_ENDPOINTS", "pd-9:2379"),
            ]),
        )
        .expect("load");
        assert_eq!(cfg.nats.rpc_in_flight, 64);
        assert_eq!(
            cfg.gateway.allowed_origins,
            vec!["https://a.example".to_string(), "https://b.example".into()]
        );
        assert_eq!(cfg.store.tikv.connect_timeout, "3s");
        assert_eq!(cfg.archive.s3.retry_timeout, "90s");
        assert_eq!(
            cfg.cell.nats.tls_ca_file,
            Some(PathBuf::from("/s/link-ca.pem"))
        );
        assert_eq!(cfg.store.tikv.pd_endpoints, vec!["pd-9:2379".to_string()]);
        let both = Config::load(
            None,
            env(&[
                ("TIDINGS_STORE_TIKV_PD_ENDPOINTS", "pd-9:2379"),
                ("TIDINGS_TIKV_PD", "pd-0:2379"),
            ]),
        )
        .expect("load");
        assert_eq!(
            both.store.tikv.pd_endpoints,
            vec!["pd-0:2379".to_string()],
            "the alias wins"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("t.toml");
        std::fs::write(
            &file,
            "[gateway]\ntls_cert_file = \"/a\"\ntls_key_file = \"/b\"\n",
        )
        .expect("write");
        let cfg = Config::load(
            Some(&file),
            env(&[
                ("TIDINGS_GATEWAY_TLS_CERT_FILE", ""),
                ("TIDINGS_GATEWAY_TLS_KEY_FILE", ""),
            ]),
        )
        .expect("an empty path unsets it");
        assert_eq!(
            (cfg.gateway.tls_cert_file, cfg.gateway.tls_key_file),
            (None, None)
        );

        for (name, value) in [
            ("TIDINGS_LOG_PARTITIONS", "-1"),
            ("TIDINGS_GATEWAY_FRAMES_PER_SECOND", "5000000000"),
            ("TIDINGS_LOG_MAX_BATCH", "lots"),
            ("TIDINGS_ARCHIVE_ENABLED", "maybe"),
            ("TIDINGS_WEBHOOKS_DEFAULT_MAX_ATTEMPTS", "-5"),
            ("TIDINGS_CELL_PEERS", "b"),
        ] {
            let err = Config::load(None, env(&[(name, value)])).expect_err(name);
            assert!(
                matches!(&err, ConfigError::Env { name: n, .. } if n == name),
                "{name}={value}: {err}"
            );
        }
    }

    #[test]
    fn the_example_file_parses_to_the_defaults() {
        let example = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../ops/tidings.example.toml"
        );
        let cfg = Config::load(Some(Path::new(example)), env(&[])).expect("example");
        let d = Config::default();
        assert_eq!(cfg.data_dir, d.data_dir);
        assert_eq!(cfg.master_key_file, d.master_key_file);
        // Every setting of the file, as the tree shows it (`LogConfig`'s `Debug` holds the
        // kinds' hash maps, in no fixed order).
        assert_eq!(
            serde_json::to_value(&cfg).expect("tree"),
            serde_json::to_value(&d).expect("tree")
        );
        assert_eq!(format!("{:?}", cfg.archive), format!("{:?}", d.archive));
        assert_eq!(format!("{:?}", cfg.gateway), format!("{:?}", d.gateway));
        assert_eq!(format!("{:?}", cfg.nats), format!("{:?}", d.nats));
        assert_eq!(format!("{:?}", cfg.auth), format!("{:?}", d.auth));
        assert_eq!(format!("{:?}", cfg.admin), format!("{:?}", d.admin));
        assert_eq!(format!("{:?}", cfg.keys), format!("{:?}", d.keys));
        assert_eq!(format!("{:?}", cfg.store), format!("{:?}", d.store));
        assert_eq!(format!("{:?}", cfg.cell), format!("{:?}", d.cell));
    }

    #[test]
    fn cells_come_from_env_and_refuse_bad_names() {
        let cfg = Config::load(
            None,
            env(&[
                ("TIDINGS_CELL_NAME", "a"),
                ("TIDINGS_CELL_URL", "wss://a/v1/ws"),
                ("TIDINGS_CELL_PEERS", "b=wss://b/v1/ws, c=wss://c/v1/ws"),
            ]),
        )
        .expect("cells");
        assert_eq!(cfg.cell.urls().len(), 3);
        assert_eq!(cfg.cell.urls()["c"], "wss://c/v1/ws");
        assert_eq!(cfg.log_config().cell.map(|c| c.name), Some("a".into()));
        for bad in [
            vec![("TIDINGS_CELL_NAME", "A.1")],
            vec![
                ("TIDINGS_CELL_NAME", "a"),
                ("TIDINGS_CELL_PEERS", "a=wss://x"),
            ],
            vec![("TIDINGS_CELL_NAME", "a"), ("TIDINGS_CELL_PEERS", "b")],
        ] {
            assert!(Config::load(None, env(&bad)).is_err(), "{bad:?}");
        }
        assert!(
            Config::load(None, env(&[]))
                .expect("default")
                .log_config()
                .cell
                .is_none()
        );
    }

    #[test]
    fn nats_credentials_come_from_files_or_env_one_kind_only_and_never_show_in_debug() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seed = dir.path().join("log.nk");
        std::fs::write(&seed, "SUSEEDSECRET\n").expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&seed, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let cfg = Config::load(
                None,
                env(&[("TIDINGS_NATS_NKEY_SEED_FILE", seed.to_str().expect("utf-8"))]),
            )
            .expect("load");
            let err = cfg.nats.connect().expect_err("a world-readable seed");
            assert!(err.to_string().contains("chmod 600"), "{err}");
            std::fs::set_permissions(&seed, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let cfg = Config::load(
            None,
            env(&[
                ("TIDINGS_NATS_NKEY_SEED_FILE", seed.to_str().expect("utf-8")),
                ("TIDINGS_NATS_URL", "nats://u:hunter2@127.0.0.1:4222"),
            ]),
        )
        .expect("load");
        let c = cfg.nats.connect().expect("connect options");
        assert!(
            matches!(&c.auth, tidings_log_api::nats::NatsAuth::NKeySeed(s) if s == "SUSEEDSECRET")
        );
        for shown in [format!("{:?}", cfg.nats), format!("{c:?}")] {
            assert!(
                !shown.contains("SUSEEDSECRET") && !shown.contains("hunter2"),
                "{shown}"
            );
        }

        let cfg = Config::load(
            None,
            env(&[
                ("TIDINGS_NATS_USER", "gw"),
                ("TIDINGS_NATS_PASSWORD", "hunter2"),
            ]),
        )
        .expect("load");
        assert!(!format!("{cfg:?}").contains("hunter2"));
        assert!(matches!(
            cfg.nats.connect().expect("user/password").auth,
            tidings_log_api::nats::NatsAuth::UserPassword { .. }
        ));
        let cfg = Config::load(
            None,
            env(&[
                ("TIDINGS_NATS_TOKEN", "t0k"),
                ("TIDINGS_NATS_NKEY_SEED_FILE", seed.to_str().expect("utf-8")),
            ]),
        )
        .expect("load");
        let err = cfg.nats.connect().expect_err("two kinds");
        assert!(
            err.to_string().contains("more than one credential"),
            "{err}"
        );
        let cfg = Config::load(None, env(&[("TIDINGS_NATS_PASSWORD", "p")])).expect("load");
        assert!(cfg.nats.connect().is_err(), "a password without a user");
    }

    #[test]
    fn the_tikv_backend_is_configured_by_file_and_env_and_validated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("t.toml");
        std::fs::write(
            &file,
            "[store]\nbackend = \"tikv\"\n[store.tikv]\npd_endpoints = [\"pd-0:2379\"]\n\
             key_prefix = \"tidings/prod/\"\nconnect_timeout = \"3s\"\n",
        )
        .expect("write");
        let cfg = Config::load(Some(&file), env(&[])).expect("load");
        assert_eq!(cfg.backend().expect("backend"), Backend::Tikv);
        let tikv = cfg.tikv_config().expect("tikv");
        assert_eq!(tikv.pd_endpoints, vec!["pd-0:2379".to_string()]);
        assert_eq!(tikv.key_prefix, b"tidings/prod/");
        assert_eq!(tikv.connect_timeout, std::time::Duration::from_secs(3));
        assert_eq!(tikv.tls, None);

        let cfg = Config::load(
            Some(&file),
            env(&[("TIDINGS_TIKV_PD", "10.0.0.1:2379, 10.0.0.2:2379")]),
        )
        .expect("env");
        assert_eq!(
            cfg.store.tikv.pd_endpoints,
            vec!["10.0.0.1:2379".to_string(), "10.0.0.2:2379".to_string()]
        );

        let refused = |vars: &[(&str, &str)]| match Config::load(Some(&file), env(vars)) {
            Err(ConfigError::Invalid(message)) => message,
            other => panic!("{vars:?}: expected an invalid configuration, got {other:?}"),
        };
        assert!(refused(&[("TIDINGS_TIKV_PD", "")]).contains("pd_endpoints is empty"));
        assert!(refused(&[("TIDINGS_TIKV_PD", "pd-0")]).contains("host:port"));
        assert!(refused(&[("TIDINGS_STORE_BACKEND", "tikvv")]).contains("store.backend"));

        std::fs::write(
            &file,
            "[store]\nbackend = \"tikv\"\n[store.tikv]\nca_path = \"/etc/ca.pem\"\n",
        )
        .expect("write");
        let message = refused(&[]);
        assert!(
            message.contains("missing: cert_path, key_path"),
            "{message}"
        );
        std::fs::write(&file, "[store.tikv]\npd = [\"x\"]\n").expect("write");
        assert!(matches!(
            Config::load(Some(&file), env(&[])),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn hs256_is_off_unless_enabled_and_audiences_must_differ() {
        let cfg = Config::load(None, env(&[])).expect("defaults");
        assert!(!cfg.auth.hs256_enabled);
        assert_eq!(cfg.auth.compliance_audience, "tidings-compliance");
        for on in ["1", "true", "yes", "on"] {
            let cfg = Config::load(None, env(&[("TIDINGS_AUTH_HS256_ENABLED", on)])).expect("on");
            assert!(cfg.auth.hs256_enabled, "{on}");
        }
        let err = Config::load(None, env(&[("TIDINGS_AUTH_HS256_ENABLED", "maybe")]))
            .expect_err("not a flag");
        assert!(
            matches!(&err, ConfigError::Env { name, .. } if name == "TIDINGS_AUTH_HS256_ENABLED"),
            "{err}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("t.toml");
        std::fs::write(&file, "[auth]\ncompliance_audience = \"tidings\"\n").expect("write");
        let err = Config::load(Some(&file), env(&[])).expect_err("same audience");
        assert!(err.to_string().contains("audiences of their own"), "{err}");
        std::fs::write(&file, "[auth]\nmax_token_lifetime_secs = 0\n").expect("write");
        assert!(Config::load(Some(&file), env(&[])).is_err());
        std::fs::write(&file, "[auth]\nmax_token_lifetime_secs = 31536000\n").expect("write");
        assert!(Config::load(Some(&file), env(&[])).is_err());
    }

    #[test]
    fn the_admin_listener_can_be_moved_or_disabled_but_not_misspelt() {
        let cfg = Config::load(None, env(&[("TIDINGS_ADMIN_LISTEN", "127.0.0.1:0")])).expect("env");
        assert_eq!(cfg.admin.listen, "127.0.0.1:0");
        let cfg = Config::load(None, env(&[("TIDINGS_ADMIN_LISTEN", "")])).expect("disabled");
        assert_eq!(cfg.admin.listen, "");
        let err =
            Config::load(None, env(&[("TIDINGS_ADMIN_LISTEN", "localhost")])).expect_err("no port");
        assert!(err.to_string().contains("admin.listen"), "{err}");
    }

    #[test]
    fn tenant_keys_come_from_a_file_or_a_command_never_both() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("t.toml");
        std::fs::write(
            &file,
            "[keys]\ncommand_timeout = \"3s\"\n\
             [keys.tenants.acme]\nkey_file = \"/keys/acme.key\"\n\
             [keys.tenants.globex]\nkey_command = \"vault read -field=key kv/globex\"\n",
        )
        .expect("write");
        let keys = Config::load(Some(&file), env(&[]))
            .expect("load")
            .tenant_keys()
            .expect("tenant keys");
        let acme = TenantId::new("acme").expect("id");
        let globex = TenantId::new("globex").expect("id");
        assert_eq!(
            keys.get(&acme),
            Some(&TenantKeySource::File(PathBuf::from("/keys/acme.key")))
        );
        assert_eq!(
            keys.get(&globex),
            Some(&TenantKeySource::Command {
                command: "vault read -field=key kv/globex".into(),
                timeout: std::time::Duration::from_secs(3),
            })
        );
        let overridden = Config::load(Some(&file), env(&[("TIDINGS_KEYS_COMMAND_TIMEOUT", "20s")]))
            .expect("load")
            .tenant_keys()
            .expect("tenant keys");
        assert!(matches!(
            overridden.get(&globex),
            Some(TenantKeySource::Command { timeout, .. }) if timeout.as_secs() == 20
        ));

        for bad in [
            "[keys.tenants.acme]\nkey_file = \"a\"\nkey_command = \"b\"\n",
            "[keys.tenants.acme]\n",
            "[keys.tenants.\"a/b\"]\nkey_file = \"a\"\n",
            "[keys]\ncommand_timeout = \"0s\"\n",
        ] {
            std::fs::write(&file, bad).expect("write");
            let err = Config::load(Some(&file), env(&[])).expect_err(bad);
            assert!(matches!(err, ConfigError::Invalid(_)), "{bad}: {err}");
        }
        std::fs::write(&file, "[keys.tenants.acme]\nkey_fiel = \"a\"\n").expect("write");
        let err = Config::load(Some(&file), env(&[])).expect_err("typo");
        assert!(err.to_string().contains("key_fiel"), "{err}");
    }

    #[test]
    fn overload_settings_come_from_the_environment_and_are_validated() {
        let cfg = Config::load(
            None,
            env(&[
                ("TIDINGS_LOG_CAPACITY_PER_SEC", "5000"),
                ("TIDINGS_LOG_VIP_TENANTS", "gold, silver,"),
                ("TIDINGS_LOG_OVERLOAD_FANOUT_PER_SEC", "40000"),
            ]),
        )
        .expect("load");
        let o = cfg.log_config().overload;
        assert_eq!(o.capacity_per_sec, 5000);
        assert_eq!(
            o.vip_tenants,
            vec!["gold".to_string(), "silver".to_string()]
        );
        assert_eq!(o.floor_per_sec, 5);
        assert_eq!(o.fanout_per_sec, 40_000);
        for bad in [
            ("TIDINGS_LOG_VIP_TENANTS", "not a tenant"),
            ("TIDINGS_LOG_OVERLOAD_TRACKED_CONVERSATIONS", "0"),
            ("TIDINGS_LOG_OVERLOAD_FLOOR_PER_SEC", "0"),
            ("TIDINGS_LOG_OVERLOAD_FANOUT_PER_SEC", "2"),
        ] {
            let err = Config::load(None, env(&[bad])).expect_err(bad.0);
            assert!(matches!(err, ConfigError::Invalid(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_send_buffer_is_in_files_with_the_embedded_store_and_on_jetstream_with_tikv() {
        let cfg = Config::load(None, env(&[])).expect("defaults");
        assert_eq!(
            cfg.send_buffer_medium().expect("valid"),
            Some(SendBufferMedium::Files(cfg.data_dir.join("send-buffer")))
        );
        let b = cfg.send_buffer().expect("on by default");
        assert_eq!(b.max_bytes, 256 << 20);
        let off = Config::load(None, env(&[("TIDINGS_LOG_SEND_BUFFER", "false")])).expect("off");
        assert!(off.send_buffer().is_none());
        let tikv = Config {
            store: StoreSection {
                backend: "tikv".into(),
                ..StoreSection::default()
            },
            ..Config::default()
        };
        assert_eq!(
            tikv.send_buffer_medium().expect("valid"),
            Some(SendBufferMedium::Stream { replicas: 1 }),
            "TiKV's writers share a JetStream stream"
        );
        assert!(
            tikv.send_buffer().is_none(),
            "made with the NATS connection"
        );
        let shared = Config {
            log: LogSection {
                send_buffer_dir: "/shared/buffer".into(),
                ..LogSection::default()
            },
            ..tikv.clone()
        };
        assert_eq!(
            shared.send_buffer_medium().expect("valid"),
            Some(SendBufferMedium::Files("/shared/buffer".into()))
        );
        for (medium, replicas) in [("paper", 1), ("jetstream", 0), ("jetstream", 7)] {
            let bad = Config::load(
                None,
                env(&[
                    ("TIDINGS_LOG_SEND_BUFFER_MEDIUM", medium),
                    ("TIDINGS_LOG_SEND_BUFFER_REPLICAS", &replicas.to_string()),
                ]),
            );
            assert!(bad.is_err(), "{medium} with {replicas} replicas is refused");
        }
        let small = Config::load(None, env(&[("TIDINGS_LOG_SEND_BUFFER_MAX_BYTES", "1000")]));
        assert!(small.is_err(), "a buffer under 1 MiB is refused");
    }

    #[test]
    fn file_then_env_override_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("t.toml");
        std::fs::write(
            &file,
            "data_dir = \"/srv/tidings\"\n[log]\nmax_body_bytes = 1000\nmax_batch = 7\n",
        )
        .expect("write");
        let cfg = Config::load(Some(&file), env(&[("TIDINGS_LOG_MAX_BATCH", "9")])).expect("load");
        assert_eq!(cfg.data_dir, PathBuf::from("/srv/tidings"));
        assert_eq!(cfg.log.config.max_body_bytes, 1000);
        assert_eq!(cfg.log.config.max_batch, 9);
        assert_eq!(cfg.log.config.queue_depth, LogConfig::default().queue_depth);
    }

    #[test]
    fn library_config_types_read_their_settings_straight_from_the_file_and_env() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("t.toml");
        std::fs::write(
            &file,
            "[log]\nmax_read_limit = 800\nlease_ttl_ms = 5000\noverload_learn = true\n\
             search_hot_index = false\nsend_buffer_max_age_ms = 60000\n\
             [gateway]\nhello_timeout_ms = 8000\nlisten = \"127.0.0.1:7301\"\nmember_fill_page = 800\n\
             [nats]\nstream_max_age_secs = 120\npublish_backlog = 9\n",
        )
        .expect("write");
        let cfg = Config::load(
            Some(&file),
            env(&[
                ("TIDINGS_GATEWAY_PING_INTERVAL_MS", "7000"),
                ("TIDINGS_LOG_CAPACITY_PER_SEC", "5000"),
            ]),
        )
        .expect("load");
        let secs = std::time::Duration::from_secs;
        let g = cfg.gateway_config();
        assert_eq!(g.hello_timeout, secs(8));
        assert_eq!(g.ping_interval, secs(7));
        assert_eq!(g.listen, "127.0.0.1:7301");
        assert_eq!(g.read_limit, 800, "from log.max_read_limit");
        let l = cfg.log_config();
        assert_eq!(l.lease_ttl, secs(5));
        assert!(l.overload.learn);
        assert_eq!(l.overload.capacity_per_sec, 5000);
        assert!(!l.search.hot_index && !l.search.use_index);
        assert_eq!(l.send_buffer.expect("on").max_age, secs(60));
        let p = cfg.publisher_config();
        assert_eq!((p.stream_max_age, p.backlog), (secs(120), 9));
        // Read back as the file spells them.
        assert_eq!(setting(&cfg, "gateway.hello_timeout_ms"), 8000);
        assert_eq!(setting(&cfg, "log.lease_ttl_ms"), 5000);
        assert_eq!(setting(&cfg, "nats.stream_max_age_secs"), 120);
        let tree = serde_json::to_value(&cfg).expect("tree");
        for computed in ["read_limit", "cell_urls"] {
            assert!(tree["gateway"].get(computed).is_none(), "{computed}");
        }
        for computed in ["own_partitions", "use_index", "cell", "place"] {
            assert!(tree["log"].get(computed).is_none(), "{computed}");
        }
    }

    #[test]
    fn keys_of_flattened_tables_are_checked_like_the_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("t.toml");
        let refused = |text: &str| {
            std::fs::write(&file, text).expect("write");
            match Config::load(Some(&file), env(&[])) {
                Err(ConfigError::Parse { message, .. }) => message,
                other => panic!("{text}: expected a parse error, got {other:?}"),
            }
        };
        for (text, names) in [
            ("[log]\noverload_lern = true\n", "`overload_lern` in [log]"),
            ("[log]\nlearn = true\n", "`learn` in [log]"),
            ("[log]\nuse_index = false\n", "`use_index` in [log]"),
            (
                "[log]\nown_partitions = false\n",
                "`own_partitions` in [log]",
            ),
            ("[gateway]\nread_limit = 5\n", "read_limit"),
            ("[gateway]\nhello_timeout = 5\n", "hello_timeout"),
            ("[nats]\npublish_backlg = 5\n", "`publish_backlg` in [nats]"),
            ("[nats]\nin_flight = 5\n", "`in_flight` in [nats]"),
            ("[cell.nats]\nurll = \"x\"\n", "`urll` in [cell.nats]"),
            ("[[log.kinds]]\nname = \"x\"\nrolez = []\n", "rolez"),
            ("[archive.tenants.acme]\nhot_windw = \"1d\"\n", "hot_windw"),
        ] {
            let message = refused(text);
            assert!(message.contains(names), "{text}: {message}");
        }
        // A bad value in a flattened table is named by its key, not by its table.
        for (text, names) in [
            (
                "[log]\nmax_batch = \"lots\"\n",
                "log.max_batch: invalid type",
            ),
            (
                "[log]\nbatch_max = 1\nmax_batch = \"lots\"\n",
                "log.max_batch: invalid type",
            ),
            (
                "[log]\nlease_ttl_ms = -5\n",
                "log.lease_ttl_ms: invalid value",
            ),
            (
                "[log]\nsearch_hot_index = 5\n",
                "log.search_hot_index: invalid type",
            ),
            (
                "[nats]\nstream_max_age_secs = true\n",
                "nats.stream_max_age_secs:",
            ),
        ] {
            let message = refused(text);
            assert!(message.contains(names), "{text}: {message}");
        }
        // Tables keyed by data take any key.
        std::fs::write(
            &file,
            "[archive.tenants.acme]\nhot_window = \"1d\"\n[keys.tenants.globex]\n\
             key_file = \"/k\"\n",
        )
        .expect("write");
        Config::load(Some(&file), env(&[])).expect("tenant tables");
    }

    #[test]
    fn validation_names_settings_as_the_file_spells_them() {
        let invalid = |vars: &[(&str, &str)]| match Config::load(None, env(vars)) {
            Err(ConfigError::Invalid(message)) => message,
            other => panic!("{vars:?}: expected an invalid configuration, got {other:?}"),
        };
        for (vars, message) in [
            (
                &[("TIDINGS_GATEWAY_HELLO_TIMEOUT_MS", "0")][..],
                "gateway.hello_timeout_ms must be greater than 0",
            ),
            (
                &[("TIDINGS_GATEWAY_HEAL_INTERVAL_MS", "0")][..],
                "gateway.heal_interval_ms must be greater than 0",
            ),
            (
                &[
                    ("TIDINGS_GATEWAY_PING_INTERVAL_MS", "5000"),
                    ("TIDINGS_GATEWAY_IDLE_TIMEOUT_MS", "5000"),
                ][..],
                "gateway.idle_timeout_ms (5000) must exceed gateway.ping_interval_ms (5000)",
            ),
            (
                &[("TIDINGS_NATS_STREAM_MAX_AGE_SECS", "0")][..],
                "nats.stream_max_age_secs must be greater than 0",
            ),
            (
                &[("TIDINGS_NATS_PUBLISH_BACKLOG", "0")][..],
                "nats.publish_backlog must be greater than 0",
            ),
            (
                &[("TIDINGS_LOG_LEASE_TTL_MS", "10")][..],
                "log.lease_ttl_ms must be between 50 and 3600000",
            ),
            (
                &[("TIDINGS_LOG_MAX_TITLE_BYTES", "0")][..],
                "log.max_title_bytes must be greater than 0",
            ),
            (
                &[("TIDINGS_LOG_SEARCH_BUDGET_BYTES", "0")][..],
                "log.search_budget_bytes must be greater than 0",
            ),
            (
                &[("TIDINGS_LOG_OVERLOAD_FLOOR_PER_SEC", "0")][..],
                "log.overload_floor_per_sec must be greater than 0",
            ),
            (
                &[("TIDINGS_LOG_SEND_BUFFER_MAX_AGE_MS", "999")][..],
                "log.send_buffer_max_age_ms must be at least 1000",
            ),
        ] {
            let got = invalid(vars);
            assert!(got.contains(message), "{vars:?}: {got}");
        }
    }

    #[test]
    fn unknown_fields_bad_values_and_zero_limits_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("t.toml");
        std::fs::write(&file, "data_dri = \"x\"\n").expect("write");
        let err = Config::load(Some(&file), env(&[])).expect_err("typo");
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("data_dri"), "{err}");

        let err = Config::load(None, env(&[("TIDINGS_LOG_MAX_BATCH", "lots")])).expect_err("nan");
        assert!(
            matches!(&err, ConfigError::Env { name, .. } if name == "TIDINGS_LOG_MAX_BATCH"),
            "{err}"
        );

        let err = Config::load(None, env(&[("TIDINGS_LOG_MAX_BATCH", "0")])).expect_err("zero");
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");

        let missing = dir.path().join("missing.toml");
        let err = Config::load(Some(&missing), env(&[])).expect_err("missing");
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }

    #[test]
    fn master_key_env_wins_over_file_and_missing_key_is_explained() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = Config {
            master_key_file: dir.path().join("none.key"),
            ..Config::default()
        };
        let err = cfg.master_key(env(&[])).err().expect("missing");
        assert!(err.to_string().contains("tidings keys init"), "{err}");
        let hex = MasterKey::generate().to_hex();
        let key = cfg
            .master_key(env(&[("TIDINGS_MASTER_KEY", &hex)]))
            .expect("env key");
        assert_eq!(key.to_hex(), hex);
        let err = cfg
            .master_key(env(&[("TIDINGS_MASTER_KEY", "nothex")]))
            .err()
            .expect("bad");
        assert_eq!(err.code(), "master_key_malformed");
    }
}
