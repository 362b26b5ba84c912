//! A real Garage S3 server (https://garagehq.deuxfleurs.fr) for the integration tests: one
//! single-node server per `Garage`, on loopback ports of its own, with its metadata, data,
//! configuration and log in a temporary directory that goes away with it.
//!
//! Garage (2.3 or newer) configures itself: `garage server --single-node --default-bucket`
//! applies a one-node layout and creates the access key and the bucket given in
//! `GARAGE_DEFAULT_*` before its S3 API starts listening, so the server is ready as soon as
//! its process listens on the S3 port, and a restart on the same directory finds them again.
//!
//! Talking to it with `object_store` 0.14 (`AmazonS3Builder`): the endpoint is plain HTTP,
//! so `with_allow_http(true)`, and path-style requests
//! (`with_virtual_hosted_style_request(false)`, the default). Two traps: `with_client_options`
//! replaces all client options, `allow_http` included, so call it before `with_allow_http`;
//! and with reqwest's `rustls-no-provider` feature, building the client panics unless a
//! rustls crypto provider was installed first, even for http:// endpoints
//! (`let _ = rustls::crypto::ring::default_provider().install_default();`).
//!
//! `Garage::start` blocks (it polls with `std::thread::sleep`); from a `#[tokio::test]` call
//! it before anything else or inside `tokio::task::spawn_blocking`.
//!
//! Environment:
//! - `TIDINGS_REQUIRE_GARAGE=1`: panic, instead of skipping, when garage is not installed.
//! - `TIDINGS_GARAGE_BIN=/path/to/garage`: the binary to run (else `garage` on PATH, else
//!   `$CARGO_HOME/bin/garage` or `~/.cargo/bin/garage`).

#![allow(dead_code)] // each test file uses its own subset
#![allow(clippy::disallowed_methods)] // synchronous helpers around processes, off any runtime

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How many times `start` tries again with new ports when the ones it picked were taken.
const START_ATTEMPTS: usize = 4;
/// How long one start of the server may take before the harness gives up on it.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);
/// Lines of the server's log quoted in a panic message.
const LOG_TAIL_LINES: usize = 40;

/// Where and how to reach the bucket of a running `Garage`.
#[derive(Clone, Debug)]
pub struct S3Target {
    /// `http://127.0.0.1:PORT` (path-style requests; virtual hosted style is not set up).
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// A running (or, after `stop`, stopped) single-node Garage server.
pub struct Garage {
    child: Option<Child>,
    binary: PathBuf,
    s3_port: u16,
    rpc_port: u16,
    target: S3Target,
    // Last, so that the directory outlives the process it serves (fields drop in order).
    dir: tempfile::TempDir,
}

/// Why one attempt to run the server failed.
enum StartError {
    /// A port we picked was taken by someone else before the server bound it: try others.
    PortTaken(String),
    /// Anything else: give up.
    Fatal(String),
}

impl Garage {
    /// Starts a fresh server with one bucket and one key that may read, write and own it.
    ///
    /// Returns `None`, after saying so on stderr, when the `garage` binary is not installed,
    /// unless `TIDINGS_REQUIRE_GARAGE=1`, in which case it panics. Panics if the server
    /// does not come up.
    pub fn start() -> Option<Garage> {
        let Some(binary) = find_garage() else {
            if std::env::var("TIDINGS_REQUIRE_GARAGE").is_ok_and(|v| v == "1") {
                panic!(
                    "TIDINGS_REQUIRE_GARAGE=1 but the `garage` binary was found neither on PATH \
                     nor in ~/.cargo/bin (nor at $TIDINGS_GARAGE_BIN): run ops/install-deps"
                );
            }
            eprintln!("SKIPPED: garage not installed (run ops/install-deps)");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("tidings-garage-")
            .tempdir()
            .expect("tempdir for garage");
        let target = S3Target {
            endpoint: String::new(),
            region: "garage".to_owned(),
            bucket: "tidings-test".to_owned(),
            // Garage's own format (GK + 24 hex digits, 64-hex-digit secret), though any
            // id of 8+ and secret of 16+ characters would be accepted on import.
            access_key_id: format!("GK{}", random_hex(12)),
            secret_access_key: random_hex(32),
        };
        let mut garage = Garage {
            child: None,
            binary,
            s3_port: 0,
            rpc_port: 0,
            target,
            dir,
        };
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let (s3_port, rpc_port) = free_ports();
            garage.s3_port = s3_port;
            garage.rpc_port = rpc_port;
            garage.target.endpoint = format!("http://127.0.0.1:{s3_port}");
            garage.write_config();
            match garage.spawn_and_wait() {
                Ok(()) => return Some(garage),
                Err(StartError::PortTaken(why)) => last = why,
                Err(StartError::Fatal(why)) => garage.fail(&why),
            }
        }
        garage.fail(&format!(
            "no free ports after {START_ATTEMPTS} attempts; last: {last}"
        ))
    }

    /// The bucket and the credentials to reach it.
    pub fn target(&self) -> &S3Target {
        &self.target
    }

    /// The temporary directory that holds the server's configuration, metadata, data and
    /// log (`garage.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the server process is running (it was not stopped and has not died).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit; from then on its
    /// port refuses connections. Does nothing if it is already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports and the same data (stopping it first if it
    /// runs), with the same bucket, key and endpoint. Panics if it does not come back.
    pub fn restart(&mut self) {
        self.stop();
        // The ports were ours a moment ago, but another process may have taken one since;
        // that does not wear off, but a socket on its way out can: allow it a little time.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(StartError::PortTaken(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(StartError::PortTaken(why) | StartError::Fatal(why)) => {
                    self.fail(&format!("restart on the same ports: {why}"))
                }
            }
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("garage.toml")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("garage.log")
    }

    fn write_config(&self) {
        let dir = self.dir.path();
        let config = format!(
            r#"# written by tests/common/garage.rs
metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1

rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"
bootstrap_peers = []

[s3_api]
s3_region = "{region}"
api_bind_addr = "127.0.0.1:{s3}"
"#,
            meta = toml_path(&dir.join("meta")),
            data = toml_path(&dir.join("data")),
            rpc = self.rpc_port,
            s3 = self.s3_port,
            secret = random_hex(32),
            region = self.target.region,
        );
        fs::write(self.config_path(), config).expect("write garage.toml");
    }

    /// Runs `garage server` and waits until it listens on the S3 port.
    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| StartError::Fatal(format!("open garage.log: {e}")))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = writeln!(
            log,
            "==== tests/common/garage.rs: starting {} (S3 port {}, RPC port {})",
            self.binary.display(),
            self.s3_port,
            self.rpc_port
        );
        let stderr = log
            .try_clone()
            .map_err(|e| StartError::Fatal(format!("clone log handle: {e}")))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-c")
            .arg(self.config_path())
            .args(["server", "--single-node", "--default-bucket"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        // Nothing from the caller's environment may reconfigure the server.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("GARAGE_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("GARAGE_DEFAULT_ACCESS_KEY", &self.target.access_key_id)
            .env("GARAGE_DEFAULT_SECRET_KEY", &self.target.secret_access_key)
            .env("GARAGE_DEFAULT_BUCKET", &self.target.bucket)
            .env("RUST_LOG", "netapp=info,garage=info")
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1");
        let child = cmd
            .spawn()
            .map_err(|e| StartError::Fatal(format!("spawn {}: {e}", self.binary.display())))?;
        let pid = child.id();
        self.child = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let new_log = read_from(&self.log_path(), log_start);
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(if mentions_port_taken(&new_log) {
                    StartError::PortTaken(format!("garage exited ({status}): address in use"))
                } else if new_log.contains("--single-node") {
                    StartError::Fatal(format!(
                        "garage exited during startup ({status}): it seems too old; the \
                         harness needs garage 2.3 or newer (`server --single-node \
                         --default-bucket`): cargo install garage --locked --force"
                    ))
                } else {
                    StartError::Fatal(format!("garage exited during startup ({status})"))
                });
            }
            // The S3 server failing to bind leaves the process running without it.
            if new_log.contains("S3 API server exited with error") {
                self.stop();
                return Err(if mentions_port_taken(&new_log) {
                    StartError::PortTaken("S3 port already in use".to_owned())
                } else {
                    StartError::Fatal("the S3 API server exited with an error".to_owned())
                });
            }
            // Ready once it listens on both ports: it has bound the RPC port (failing that,
            // it aborts, possibly after binding the S3 port) and the S3 API is up, which it
            // starts only after setting up the layout, the key and the bucket.
            let listening = match (
                listens_on(pid, self.s3_port),
                listens_on(pid, self.rpc_port),
            ) {
                (Some(s3), Some(rpc)) => s3 && rpc,
                // No /proc to ask: settle for the log and the S3 port answering.
                _ => {
                    new_log.contains(&format!("Listening on 127.0.0.1:{}", self.rpc_port))
                        && new_log.contains("S3 API server listening")
                        && TcpStream::connect_timeout(
                            &SocketAddr::from(([127, 0, 0, 1], self.s3_port)),
                            Duration::from_millis(200),
                        )
                        .is_ok()
                }
            };
            if listening {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(StartError::Fatal(format!(
                    "garage did not listen on 127.0.0.1:{} within {READY_TIMEOUT:?}",
                    self.s3_port
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Panics with `why`, the server's configuration and the tail of its log, after
    /// stopping it.
    fn fail(&mut self, why: &str) -> ! {
        self.stop();
        // The temporary directory goes away as the panic unwinds: quote what it held.
        let config = fs::read_to_string(self.config_path()).unwrap_or_default();
        let log = read_from(&self.log_path(), 0);
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        panic!(
            "garage test server: {why}\nbinary: {}\n---- {} ----\n{config}---- last \
             {LOG_TAIL_LINES} lines of garage.log ----\n{tail}\n----",
            self.binary.display(),
            self.config_path().display(),
        );
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `garage` binary: $TIDINGS_GARAGE_BIN (which must exist), else on PATH, else in cargo's
/// bin directory.
fn find_garage() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("TIDINGS_GARAGE_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            is_executable(&bin),
            "TIDINGS_GARAGE_BIN={} is not an executable file",
            bin.display()
        );
        return Some(bin);
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("garage"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(cargo_home) = std::env::var_os("CARGO_HOME") {
        candidates.push(PathBuf::from(cargo_home).join("bin/garage"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/garage"));
    }
    candidates.into_iter().find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Two distinct ports that were free on 127.0.0.1 a moment ago.
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = |l: &TcpListener| l.local_addr().expect("local_addr").port();
    (port(&a), port(&b))
}

fn mentions_port_taken(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("AddrInUse")
}

/// Whether process `pid` has a socket listening on 127.0.0.1:`port` (or on any address),
/// read from /proc; `None` where /proc cannot tell.
fn listens_on(pid: u32, port: u16) -> Option<bool> {
    let mut tables = String::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = fs::read_to_string(table) {
            tables.push_str(&text);
        }
    }
    if tables.is_empty() {
        return None;
    }
    let suffix = format!(":{port:04X}");
    // Columns: sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
    let inodes: Vec<String> = tables
        .lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.len() > 9 && cols[1].ends_with(&suffix) && cols[3] == "0A")
                .then(|| format!("socket:[{}]", cols[9]))
        })
        .collect();
    if inodes.is_empty() {
        return Some(false);
    }
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(fds.flatten().any(|fd| {
        fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    }))
}

/// The text of `path` from byte `offset` on (empty if it cannot be read).
fn read_from(path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = File::open(path) {
        use std::io::{Seek, SeekFrom};
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = file.read_to_end(&mut bytes);
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `n` random bytes as lowercase hex, from /dev/urandom (or, failing that, std's hasher
/// seeds mixed with the time and the process id).
fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    let from_urandom = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if from_urandom.is_err() {
        use std::hash::{BuildHasher, Hasher};
        for chunk in bytes.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            h.write_u32(std::process::id());
            let word = h.finish().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A path as a TOML basic string's contents.
fn toml_path(path: &Path) -> String {
    path.display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
}
