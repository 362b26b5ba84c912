//! Helpers shared by the end-to-end tests: run the real `tidings` binary in a scratch
//! directory of its own (data directory and master key file included).

#![allow(clippy::disallowed_methods)] // synchronous helpers around processes, off any runtime

pub mod admin;
pub mod browser;
pub mod cells;
pub mod identity;
pub mod prom;
pub mod receiver;
pub mod tls;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    /// A scratch directory with a master key already made by `tidings keys init`.
    pub fn new() -> Sandbox {
        let sandbox = Sandbox::bare();
        let out = sandbox.run(&["keys", "init"]);
        assert!(out.status.success(), "keys init: {}", stderr(&out));
        sandbox
    }

    /// A scratch directory with nothing in it.
    pub fn bare() -> Sandbox {
        Sandbox {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path().join("tidings-data")
    }

    /// `tidings ARGS` in the sandbox, with no TIDINGS_* variables from outside.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidings"));
        cmd.args(args).current_dir(self.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("TIDINGS_") {
                cmd.env_remove(k);
            }
        }
        cmd
    }

    /// The log identity a gateway of this sandbox pins (`tidings keys log-identity`).
    pub fn log_public_key(&self) -> String {
        let identity = self.ok(&["keys", "log-identity"]);
        identity[0]["log_public_key"]
            .as_str()
            .expect("log_public_key")
            .to_string()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tidings")
    }

    /// Runs and requires success; returns stdout's JSON lines.
    pub fn ok(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "tidings {args:?} failed: {}",
            stderr(&out)
        );
        json_lines(&out.stdout)
    }

    /// `tidings ARGS` fed `input` on stdin.
    pub fn run_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self.spawn_piped(args);
        let mut stdin = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().expect("wait");
        writer.join().expect("writer");
        out
    }

    pub fn spawn_piped(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tidings")
    }

    /// Creates group `conv` in tenant `acme`, owned by alice, with bob.
    pub fn group(&self, conv: &str) {
        self.group_in("acme", conv);
    }

    /// Creates group `conv` in `tenant`, owned by alice, with bob.
    pub fn group_in(&self, tenant: &str, conv: &str) {
        self.ok(&[
            "conv",
            "create",
            "--tenant",
            tenant,
            "--conv",
            conv,
            "--kind",
            "group",
            "--by",
            "alice",
            "--members",
            "bob",
        ]);
    }

    /// Every event of the conversation, in order.
    pub fn read_all(&self, conv: &str) -> Vec<serde_json::Value> {
        self.ok(&["log", "read", "--tenant", "acme", "--conv", conv])
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The JSON error line a refused command prints on stderr (the last one).
pub fn error_line(out: &Output) -> serde_json::Value {
    let text = stderr(out);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON error line in {text:?}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
}

pub fn json_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// `{"client_msg_id":"ID","text":"TEXT"}` lines for ids `prefix0..prefixN`.
pub fn input_lines(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            format!("{{\"client_msg_id\":\"{prefix}{i}\",\"text\":\"message {prefix}{i}\"}}\n")
        })
        .collect()
}

/// Files under `dir` (recursively; none if it does not exist) whose names end in `suffix`.
pub fn grep_dir_names(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return hits;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            hits.extend(grep_dir_names(&path, suffix));
        } else if path.to_string_lossy().ends_with(suffix) {
            hits.push(path);
        }
    }
    hits
}

/// Files under `dir` whose bytes contain `needle`.
pub fn grep_dir(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            hits.extend(grep_dir(&path, needle));
        } else if std::fs::read(&path)
            .expect("read")
            .windows(needle.len())
            .any(|w| w == needle)
        {
            hits.push(path);
        }
    }
    hits
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not start listening on {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits for a line of `child`'s stderr containing `marker` and returns what follows it;
/// the rest of stderr is drained in the background (echoed with TIDINGS_TEST_VERBOSE).
fn wait_for_line(child: &mut Child, marker: &'static str, what: &str) -> String {
    wait_for_lines(child, &[marker], what).remove(0)
}

/// Like [`wait_for_line`], for several markers in any order: what follows each, in the
/// order of `markers`.
fn wait_for_lines(child: &mut Child, markers: &[&'static str], what: &str) -> Vec<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let tag = what.to_string();
    let wanted = markers.to_vec();
    // The last lines, for the panic message if the process never gets ready.
    let tail = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
    let lines_seen = tail.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(mut t) = lines_seen.lock() {
                if t.len() == 20 {
                    t.pop_front();
                }
                t.push_back(line.clone());
            }
            for (n, marker) in wanted.iter().enumerate() {
                if let Some(i) = line.find(marker) {
                    let _ = tx.send((n, line[i + marker.len()..].to_string()));
                }
            }
            if std::env::var_os("TIDINGS_TEST_VERBOSE").is_some() {
                eprintln!("[{tag}] {line}");
            }
        }
    });
    let mut found: Vec<Option<String>> = vec![None; markers.len()];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while found.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((n, rest)) => found[n] = Some(rest),
            Err(_) => {
                let last: Vec<String> = tail
                    .lock()
                    .map(|t| t.iter().cloned().collect())
                    .unwrap_or_default();
                panic!(
                    "{what} did not become ready ({}); its last lines:\n{}",
                    match child.try_wait() {
                        Ok(Some(status)) => format!("it exited: {status}"),
                        _ => "still running".to_string(),
                    },
                    last.join("\n")
                )
            }
        }
    }
    found.into_iter().flatten().collect()
}

/// A port free now (bound and released): for listeners whose address must be known before
/// they start (a cell's URL is in its peers' config, chromedriver's port, a NATS cluster's
/// routes). Taken below the kernel's ephemeral range (32768 on), so no listener on port 0
/// and no outgoing connection of the tests running beside this one can take it before the
/// server binds it (a port from `bind(0)` could, and a cells test once failed so in CI).
pub fn free_port() -> u16 {
    loop {
        let port = fastrand::u16(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// File descriptors kept for everything else a test process opens (its servers' pipes, NATS
/// clients, files): what [`hold_sockets`] never hands out.
const FDS_KEPT: u32 = 1_000;

/// Reserves `n` of this process's file descriptors for client sockets, until the permit is
/// dropped. Tests that hold thousands of sockets at once (10,000 idle connections, a
/// 10,000-member group online) take them from here first: all the tests run in one process
/// and share its open-file limit (RLIMIT_NOFILE, 20,000 on the CI machine), which two such
/// tests at once would pass. Where the limit is high enough they run side by side; where not,
/// one waits for the other. A test asking for more than there is gets all of it.
pub async fn hold_sockets(n: u32) -> tokio::sync::SemaphorePermit<'static> {
    static BUDGET: std::sync::OnceLock<(tokio::sync::Semaphore, u32)> = std::sync::OnceLock::new();
    let (budget, size) = BUDGET.get_or_init(|| {
        let size = open_files_limit().saturating_sub(FDS_KEPT).max(1);
        (tokio::sync::Semaphore::new(size as usize), size)
    });
    budget
        .acquire_many(n.min(*size))
        .await
        .expect("the socket budget is never closed")
}

/// This process's soft limit on open files ("Max open files" in /proc/self/limits); 1,024,
/// the usual default, where it cannot be read.
fn open_files_limit() -> u32 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            let soft = line
                .trim_start_matches("Max open files")
                .split_whitespace()
                .next()?;
            // "unlimited" does not parse: far more than any test asks for.
            Some(soft.parse().unwrap_or(u32::MAX))
        })
        .unwrap_or(1_024)
}

/// The port at the end of `host:port...`.
fn port_in(text: &str) -> u16 {
    let digits: String = text
        .rsplit(':')
        .next()
        .unwrap_or("")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no port in {text:?}"))
}

/// A real nats-server with JetStream, killed on drop. It picks its own free port (so
/// parallel tests never race for one) and keeps it across restarts.
pub struct Nats {
    pub port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
    /// A server config file (accounts, TLS); its `listen`/`port` are overridden.
    config: Option<PathBuf>,
    /// The URL scheme clients use: `nats` or `tls`.
    scheme: &'static str,
}

impl Nats {
    pub fn start() -> Nats {
        Nats::start_with(None, "nats")
    }

    /// A nats-server run with `-c config` (accounts, permissions, TLS), JetStream on, on a
    /// free port. `scheme` is what [`Nats::url`] says (`tls` for a TLS-only server).
    pub fn start_with(config: Option<&Path>, scheme: &'static str) -> Nats {
        let mut nats = Nats {
            port: 0,
            store: tempfile::tempdir().expect("tempdir"),
            child: None,
            config: config.map(Path::to_path_buf),
            scheme,
        };
        nats.spawn();
        nats
    }

    fn spawn(&mut self) {
        // -1: any free port, reported in the log.
        let port = if self.port == 0 {
            "-1".to_string()
        } else {
            self.port.to_string()
        };
        let mut cmd = Command::new("nats-server");
        if let Some(config) = &self.config {
            cmd.arg("-c").arg(config);
        }
        let mut child = cmd
            .args(["-js", "-a", "127.0.0.1", "-p", &port, "-sd"])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect(
                "nats-server must be installed (apt-get install nats-server); ops/test does it",
            );
        let rest = wait_for_line(
            &mut child,
            "Listening for client connections on ",
            "nats-server",
        );
        self.port = port_in(&rest);
        self.child = Some(child);
        wait_for_port(self.port, "nats-server");
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Makes the server re-read its config file (SIGHUP), as an operator's reload does:
    /// changed permissions apply to connected clients at once.
    pub fn reload(&self) {
        self.signal("-HUP");
    }

    /// Freezes the server (SIGSTOP) until [`Nats::resume`]: its connections stay open and
    /// nothing on them is answered, as with a hung server or a partitioned link.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("nats-server running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} nats-server");
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `tidings serve` process, killed on drop.
pub struct Server {
    pub port: u16,
    /// The admin listener's port (roles all and log; health, readiness and metrics only on
    /// role archiver; 0 when it is off).
    pub admin_port: u16,
    child: Child,
}

impl Server {
    /// The `tidings serve --role ROLE` command [`Server::start`] runs (stderr piped, listeners
    /// on ports of their own choosing), for a test that runs the process itself.
    pub fn command(s: &Sandbox, nats: &Nats, role: &str, env: &[(&str, &str)]) -> Command {
        let mut cmd = s.command(&["serve", "--role", role]);
        // The tests sign development (HS256) tokens: enabled explicitly, as `ops/run` does.
        // A test that wants it off passes TIDINGS_AUTH_HS256_ENABLED=0 in `env`.
        cmd.env("TIDINGS_NATS_URL", nats.url())
            .env("TIDINGS_AUTH_HS256_ENABLED", "1")
            .env("TIDINGS_GATEWAY_LISTEN", "127.0.0.1:0")
            .env("TIDINGS_ADMIN_LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // A gateway apart from the log pins the log's identity, as an operator would set it
        // from `tidings keys log-identity`.
        if role == "gateway" {
            cmd.env("TIDINGS_GATEWAY_LOG_PUBLIC_KEY", s.log_public_key());
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts `tidings serve --role ROLE` in the sandbox against `nats`. The gateway and the
    /// admin listener bind ports of their own choosing and say which; the log role is ready
    /// when it says so.
    pub fn start(s: &Sandbox, nats: &Nats, role: &str, env: &[(&str, &str)]) -> Server {
        let mut cmd = Server::command(s, nats, role, env);
        let admin = matches!(role, "all" | "log" | "archiver")
            && !env
                .iter()
                .any(|(k, v)| *k == "TIDINGS_ADMIN_LISTEN" && v.is_empty());
        let mut child = cmd.spawn().expect("spawn tidings serve");
        // "on ws" and "on http" match the TLS listeners (wss://, https://) too.
        let ready = match role {
            "log" => "log service on NATS",
            "archiver" => "archiver every",
            _ => "gateway on ws",
        };
        let mut markers = vec![ready];
        if admin {
            markers.push("admin on http");
        }
        let found = wait_for_lines(&mut child, &markers, "tidings serve");
        let port = if matches!(role, "log" | "archiver") {
            0
        } else {
            let port = port_in(found[0].trim_end_matches("/v1/ws"));
            wait_for_port(port, "tidings serve");
            port
        };
        let admin_port = if admin {
            let port = port_in(&found[1]);
            wait_for_port(port, "tidings serve (admin)");
            port
        } else {
            0
        };
        Server {
            port,
            admin_port,
            child,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/ws", self.port)
    }

    /// The server's process id (to read its memory from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident set size now, in bytes (VmRSS in /proc/PID/status).
    /// Sockets the process holds open (its descriptors that are sockets, from /proc/PID/fd).
    pub fn open_sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read /proc/PID/fd")
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count()
    }

    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kb * 1024
    }

    /// SIGTERM, as a service manager stops it; waits for it to exit and returns success.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sandbox {
    /// A token signed with the sandbox's development secret, valid for `ttl_secs` from now
    /// (negative: already expired).
    pub fn token(&self, tenant: &str, user: &str, ttl_secs: i64) -> String {
        self.token_with_roles(tenant, user, &[], ttl_secs)
    }

    /// [`Sandbox::token`] carrying `roles`. With the compliance or admin role the token is
    /// for the admin listener (the compliance audience), as `tidings token issue` makes it.
    pub fn token_with_roles(
        &self,
        tenant: &str,
        user: &str,
        roles: &[&str],
        ttl_secs: i64,
    ) -> String {
        let audience = if roles.iter().any(|r| *r == "compliance" || *r == "admin") {
            COMPLIANCE_AUDIENCE
        } else {
            CHAT_AUDIENCE
        };
        self.token_for(audience, tenant, user, roles, ttl_secs, None)
    }

    /// A token signed with the sandbox's development secret for `audience`, issued now,
    /// valid for `ttl_secs` (negative: already expired), with an optional `jti`.
    pub fn token_for(
        &self,
        audience: &str,
        tenant: &str,
        user: &str,
        roles: &[&str],
        ttl_secs: i64,
        jti: Option<&str>,
    ) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        // An expired token was issued before it expired (exp is never before iat).
        let issued_at = if ttl_secs < 0 {
            now.saturating_add_signed(ttl_secs - 60)
        } else {
            now
        };
        self.sign(
            audience,
            &tidings_auth::Claims {
                tenant: tenant.into(),
                user: user.into(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
                expires_at: now.saturating_add_signed(ttl_secs),
                issued_at,
                jti: jti.map(str::to_owned),
            },
        )
    }

    /// `claims` signed with the sandbox's development secret for `audience`.
    pub fn sign(&self, audience: &str, claims: &tidings_auth::Claims) -> String {
        let hex = std::fs::read_to_string(self.path().join("tidings-jwt.secret")).expect("secret");
        let secret = tidings_log::crypto::hex_decode(hex.trim()).expect("hex secret");
        tidings_auth::issue_hs256(&secret, "tidings", audience, claims)
    }
}

/// The default audiences (`auth.audience`, `auth.compliance_audience`).
pub const CHAT_AUDIENCE: &str = "tidings";
pub const COMPLIANCE_AUDIENCE: &str = "tidings-compliance";

/// Waits (at most 20 s) for the connection to end; returns the Goodbye's reason and the
/// close code.
pub async fn closed(
    conn: &mut tidings_client::Connection,
) -> (Option<tidings_client::client::CloseReason>, Option<u16>) {
    use tidings_client::Push;
    let mut goodbye = None;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, conn.next_push()).await {
            Ok(Some(Push::Goodbye(g))) => {
                goodbye = tidings_client::client::CloseReason::try_from(g.reason).ok();
            }
            Ok(Some(Push::Closed { code, .. })) => return (goodbye, code),
            Ok(None) => return (goodbye, None),
            Ok(Some(_)) => {}
            Err(_) => panic!("the server did not close the connection"),
        }
    }
}

/// An HTTP client for the servers' listeners (loopback, never through a proxy), with the
/// process's TLS provider installed.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("http client")
}

/// The error code of a server's refusal (`None` for any other client error).
pub fn error_code(e: &tidings_client::ClientError) -> Option<tidings_client::client::ErrorCode> {
    match e {
        tidings_client::ClientError::Server { code, .. } => Some(*code),
        _ => None,
    }
}
