//! Where tenant-held keys come from: a file, or a command the tenant's operators provide
//! (e.g. one that asks their KMS). The key is read when the keyring first needs it and kept in
//! memory only; it never reaches the KV or a log line, and error messages never quote what a
//! source returned.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::ids::TenantId;
use tidings_log_api::crypto::{Secret, hex_encode, random_secret, secret_from_hex};

/// A key the tenant holds (from a file or a command of its own): the inner layer of its data
/// keys' wrap. Kept in memory only; never written to the KV, never logged.
pub struct TenantKey(pub(crate) Secret);

impl TenantKey {
    pub fn generate() -> Self {
        TenantKey(random_secret())
    }

    /// The same format as the master key file: 128 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, String> {
        secret_from_hex(text).map(TenantKey)
    }

    pub fn to_hex(&self) -> String {
        hex_encode(&self.0.0)
    }
}

/// The most a key file or a key command's stdout is read: a key is 128 hex digits and a
/// newline; anything much longer is not one.
const MAX_KEY_TEXT: u64 = 1024;

/// The most of a failed key command's stderr quoted in the error.
const MAX_STDERR_QUOTED: usize = 200;

/// How one tenant's key is fetched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TenantKeySource {
    /// A file holding 128 hex digits (like the master key file).
    File(PathBuf),
    /// A shell command (`sh -c`) that prints 128 hex digits on stdout and exits 0 within
    /// `timeout`.
    Command { command: String, timeout: Duration },
}

/// The tenants that hold a key of their own, and where each gets it.
#[derive(Clone, Debug, Default)]
pub struct TenantKeys {
    sources: HashMap<TenantId, TenantKeySource>,
}

impl TenantKeys {
    pub fn insert(&mut self, tenant: TenantId, source: TenantKeySource) {
        self.sources.insert(tenant, source);
    }

    pub fn get(&self, tenant: &TenantId) -> Option<&TenantKeySource> {
        self.sources.get(tenant)
    }
}

impl TenantKeySource {
    /// Reads the key. The error says what went wrong in terms an operator can act on.
    pub async fn fetch(&self) -> Result<TenantKey, String> {
        let source = self.clone();
        tokio::task::spawn_blocking(move || match &source {
            TenantKeySource::File(path) => read_key_file(path),
            TenantKeySource::Command { command, timeout } => run_key_command(command, *timeout),
        })
        .await
        .map_err(|e| format!("fetching the key failed: {e}"))?
    }
}

fn read_key_file(path: &std::path::Path) -> Result<TenantKey, String> {
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("key file {} does not exist", path.display()),
        _ => format!("cannot read key file {}: {e}", path.display()),
    })?;
    let text =
        read_bounded(file).map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    TenantKey::from_hex(&text).map_err(|e| format!("key file {} is malformed: {e}", path.display()))
}

/// Reads at most [`MAX_KEY_TEXT`] bytes (one more to tell that there was more) as UTF-8.
fn read_bounded(input: impl Read) -> Result<String, String> {
    let mut bytes = Vec::new();
    input
        .take(MAX_KEY_TEXT + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_KEY_TEXT {
        return Err(format!(
            "more than {MAX_KEY_TEXT} bytes, which is not a key"
        ));
    }
    String::from_utf8(bytes).map_err(|_| "not text".to_string())
}

/// The only variables a `key_command` sees (when set in ours): enough for a shell script
/// to find its tools, its user's config (a KMS CLI reads `~/.aws`, `~/.config/gcloud`), and
/// to print text. Everything else, the master key (`TIDINGS_MASTER_KEY`) and the NATS
/// password first of all, stays out: a key command is often someone else's script, and it
/// has no business with our secrets. Whatever else it needs it reads from its own files, or
/// the command line sets it (`VAR=value tool ...`).
pub const KEY_COMMAND_ENV: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR"];

/// Runs `sh -c command` with the environment reduced to [`KEY_COMMAND_ENV`], waits at most
/// `timeout`, and parses its stdout as the key.
fn run_key_command(command: &str, timeout: Duration) -> Result<TenantKey, String> {
    let mut cmd = Command::new("sh");
    cmd.env_clear();
    for name in KEY_COMMAND_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    let mut child = cmd
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run key_command: {e}"))?;
    // The pipes are read on threads of their own and handed over through channels, so a
    // command that never closes them (or leaves a child holding them) cannot hold us past
    // the deadline.
    let (out_tx, out_rx) = mpsc::channel();
    let (err_tx, err_rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || out_tx.send(read_bounded(stdout)));
    }
    if let Some(stderr) = child.stderr.take() {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stderr
                .take(MAX_STDERR_QUOTED as u64)
                .read_to_end(&mut bytes);
            err_tx.send(String::from_utf8_lossy(&bytes).trim().to_string())
        });
    }
    let deadline = Instant::now() + timeout;
    let too_slow = || {
        format!(
            "key_command did not finish within {}s",
            timeout.as_secs_f32()
        )
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                #[allow(clippy::disallowed_methods)] // runs on the blocking pool (`fetch`)
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(too_slow());
            }
            Err(e) => return Err(format!("cannot wait for key_command: {e}")),
        }
    };
    let left = deadline.saturating_duration_since(Instant::now());
    // Output that is too long to be a key explains a failure best (the command was cut off
    // when we stopped reading).
    let stdout = match out_rx.recv_timeout(left) {
        Ok(read) => read.map_err(|e| format!("key_command printed {e}"))?,
        Err(_) => return Err(too_slow()),
    };
    if !status.success() {
        let stderr = err_rx.recv_timeout(left).unwrap_or_default();
        let what = match status.code() {
            Some(code) => format!("key_command exited with status {code}"),
            None => "key_command was killed by a signal".to_string(),
        };
        return Err(if stderr.is_empty() {
            what
        } else {
            format!("{what}: {stderr}")
        });
    }
    TenantKey::from_hex(&stdout).map_err(|e| format!("key_command did not print a key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(text: &str) -> TenantKeySource {
        TenantKeySource::Command {
            command: text.to_string(),
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn a_command_printing_a_key_gives_that_key() {
        let key = TenantKey::generate().to_hex();
        let got = command(&format!("echo {key}")).fetch().await.expect("key");
        assert_eq!(got.to_hex(), key);
    }

    #[tokio::test]
    async fn a_command_sees_only_the_documented_environment() {
        // Cargo sets CARGO_MANIFEST_DIR for the test process; the command must not see it,
        // as it must not see TIDINGS_MASTER_KEY, but it must see PATH.
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        let key = TenantKey::generate().to_hex();
        let got = command(&format!(
            "if [ -n \"$CARGO_MANIFEST_DIR\" ] || [ -z \"$PATH\" ]; then exit 3; fi; echo {key}"
        ))
        .fetch()
        .await
        .expect("a command in a cleared environment");
        assert_eq!(got.to_hex(), key);
    }

    #[tokio::test]
    async fn failing_slow_and_garbage_commands_are_explained_without_quoting_output() {
        let key = TenantKey::generate().to_hex();
        let half = &key[..64];
        let err = command(&format!("echo {half}"))
            .fetch()
            .await
            .err()
            .expect("short");
        assert!(err.contains("did not print a key"), "{err}");
        assert!(!err.contains(half), "never quote the output: {err}");

        let err = command("echo vault says no >&2; exit 3")
            .fetch()
            .await
            .err()
            .expect("exit 3");
        assert_eq!(err, "key_command exited with status 3: vault says no");

        let err = command("yes 0123456789abcdef")
            .fetch()
            .await
            .err()
            .expect("endless");
        assert!(err.contains("not a key"), "{err}");

        let started = Instant::now();
        let slow = TenantKeySource::Command {
            command: "sleep 5".into(),
            timeout: Duration::from_millis(200),
        };
        let err = slow.fetch().await.err().expect("slow");
        assert!(err.contains("did not finish within 0.2s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_missing_or_malformed_key_file_is_explained() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("acme.key");
        let err = TenantKeySource::File(path.clone())
            .fetch()
            .await
            .err()
            .expect("missing");
        assert!(err.contains("does not exist"), "{err}");
        std::fs::write(&path, "zz".repeat(64)).expect("write");
        let err = TenantKeySource::File(path.clone())
            .fetch()
            .await
            .err()
            .expect("garbage");
        assert!(err.contains("malformed"), "{err}");
        assert!(!err.contains("zz"), "{err}");
        let key = TenantKey::generate().to_hex();
        std::fs::write(&path, format!("{key}\n")).expect("write");
        let got = TenantKeySource::File(path).fetch().await.expect("key");
        assert_eq!(got.to_hex(), key);
    }
}
