//! Helpers shared by the end-to-end tests: run the real `tidings` binary in a scratch
//! directory of its own (data directory and master key file included).

#![allow(dead_code)] // each test file uses its own subset

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
        self.ok(&[
            "conv",
            "create",
            "--tenant",
            "acme",
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
