//! The `tidings` binary as a user drives it: keys, conversations, appends and reads on a
//! real data directory.

use std::io::{BufRead, BufReader, Write};

use crate::common::{Sandbox, error_line, grep_dir, input_lines, json_lines, stderr};

#[test]
fn keys_init_writes_a_private_key_and_never_overwrites_it() {
    let s = Sandbox::bare();
    let out = s.ok(&["keys", "init"]);
    assert_eq!(out[0]["created"], true);
    let key_file = s.path().join("tidings-master.key");
    let first = std::fs::read_to_string(&key_file).expect("key file");
    assert_eq!(first.trim().len(), 128);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let again = s.run(&["keys", "init"]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read_to_string(&key_file).expect("key file"), first);
}

#[test]
fn append_then_read_prints_the_documented_json() {
    let s = Sandbox::new();
    let created = s.ok(&[
        "conv",
        "create",
        "--tenant",
        "acme",
        "--conv",
        "general",
        "--kind",
        "group",
        "--by",
        "alice",
        "--members",
        "bob,carol",
        "--title",
        "General",
    ]);
    assert_eq!(created[0]["seq"], 1);
    let ack = s.ok(&[
        "log",
        "append",
        "--tenant",
        "acme",
        "--conv",
        "general",
        "--sender",
        "bob",
        "--client-msg-id",
        "m-1",
        "--text",
        "hello, world",
    ]);
    assert_eq!(ack.len(), 1);
    let keys: Vec<_> = ack[0]
        .as_object()
        .expect("object")
        .keys()
        .cloned()
        .collect();
    assert_eq!(keys, ["seq", "event_id", "duplicate"]);
    assert_eq!(
        (ack[0]["seq"].as_u64(), ack[0]["duplicate"].as_bool()),
        (Some(2), Some(false))
    );
    let retry = s.ok(&[
        "log",
        "append",
        "--tenant",
        "acme",
        "--conv",
        "general",
        "--sender",
        "bob",
        "--client-msg-id",
        "m-1",
        "--text",
        "hello, world",
    ]);
    assert_eq!(retry[0]["seq"], 2);
    assert_eq!(retry[0]["event_id"], ack[0]["event_id"]);
    assert_eq!(retry[0]["duplicate"], true);

    let events = s.read_all("general");
    assert_eq!(events.len(), 2);
    let e = &events[1];
    assert_eq!(e["seq"], 2);
    assert_eq!(e["event_id"], ack[0]["event_id"]);
    assert_eq!(e["sender"], "bob");
    assert_eq!(e["client_msg_id"], "m-1");
    assert_eq!(e["kind"], "message_posted");
    assert_eq!(e["text"], "hello, world");
    assert!(e["time"].as_str().expect("time").ends_with('Z'));
    assert_eq!(events[0]["kind"], "conversation_created");
    assert_eq!(events[0]["text"], "General");

    let latest = s.ok(&[
        "log",
        "read",
        "--tenant",
        "acme",
        "--conv",
        "general",
        "--reverse",
        "--limit",
        "1",
    ]);
    assert_eq!(latest.len(), 1);
    assert_eq!(latest[0]["seq"], 2);
}

#[test]
fn membership_and_read_cursors_through_the_cli() {
    let s = Sandbox::new();
    s.group("general");
    s.ok(&[
        "conv",
        "add-member",
        "--tenant",
        "acme",
        "--conv",
        "general",
        "--by",
        "alice",
        "--user",
        "dave",
    ]);
    let refused = s.run(&[
        "conv",
        "add-member",
        "--tenant",
        "acme",
        "--conv",
        "general",
        "--by",
        "bob",
        "--user",
        "erin",
    ]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("a member may not add members"),
        "{}",
        stderr(&refused)
    );
    let members = s.ok(&[
        "conv", "members", "--tenant", "acme", "--conv", "general", "--limit", "2",
    ]);
    let names: Vec<_> = members
        .iter()
        .map(|m| m["user"].as_str().expect("user").to_string())
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    assert_eq!(members[0]["role"], "owner");
    let rest = s.ok(&[
        "conv", "members", "--tenant", "acme", "--conv", "general", "--after", "bob",
    ]);
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["user"], "dave");
    s.ok(&[
        "conv",
        "remove-member",
        "--tenant",
        "acme",
        "--conv",
        "general",
        "--by",
        "dave",
        "--user",
        "dave",
    ]);
    let dave = s.ok(&["conv", "list", "--tenant", "acme", "--user", "dave"]);
    assert!(dave.is_empty());

    for i in 0..3 {
        let id = format!("m{i}");
        s.ok(&[
            "log",
            "append",
            "--tenant",
            "acme",
            "--conv",
            "general",
            "--sender",
            "alice",
            "--client-msg-id",
            &id,
            "--text",
            "hi",
        ]);
    }
    // Unread counts messages only: dave's join and leave (seqs 2, 3) are not unread.
    let list = s.ok(&["conv", "list", "--tenant", "acme", "--user", "bob"]);
    assert_eq!(
        (
            list[0]["head_seq"].as_u64(),
            list[0]["read_seq"].as_u64(),
            list[0]["unread"].as_u64()
        ),
        (Some(6), Some(1), Some(3))
    );
    let cursor = s.ok(&[
        "conv",
        "mark-read",
        "--tenant",
        "acme",
        "--conv",
        "general",
        "--user",
        "bob",
        "--seq",
        "5",
    ]);
    assert_eq!(cursor[0]["read_seq"], 5);
    let list = s.ok(&["conv", "list", "--tenant", "acme", "--user", "bob"]);
    assert_eq!(list[0]["unread"], 1);
}

#[test]
fn stdin_appends_ack_every_line_in_input_order() {
    let s = Sandbox::new();
    s.group("bulk");
    let out = s.run_with_input(
        &[
            "log", "append", "--tenant", "acme", "--conv", "bulk", "--sender", "bob", "--stdin",
        ],
        input_lines("b", 10_000).as_bytes(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let acks = json_lines(&out.stdout);
    assert_eq!(acks.len(), 10_000);
    for (i, ack) in acks.iter().enumerate() {
        assert_eq!(ack["client_msg_id"], format!("b{i}"));
        assert_eq!(ack["seq"], i as u64 + 2);
        assert_eq!(ack["duplicate"], false);
    }
    let events = s.read_all("bulk");
    assert_eq!(events.len(), 10_001);
    assert_eq!(events[10_000]["text"], "message b9999");
}

#[test]
fn stdin_bad_lines_get_error_lines_and_the_rest_still_lands() {
    let s = Sandbox::new();
    s.group("mixed");
    let input = [
        r#"{"client_msg_id":"ok-1","text":"fine"}"#.to_string(),
        "this is not json".to_string(),
        r#"{"client_msg_id":"no spaces allowed","text":"x"}"#.to_string(),
        r#"{"client_msg_id":"empty","text":""}"#.to_string(),
        format!(
            r#"{{"client_msg_id":"huge","text":"{}"}}"#,
            "x".repeat(70 * 1024)
        ),
        format!(
            r#"{{"client_msg_id":"giant-line","text":"{}"}}"#,
            "y".repeat(500 * 1024)
        ),
        r#"{"text":"missing id"}"#.to_string(),
        r#"{"client_msg_id":"ok-2","text":"also fine"}"#.to_string(),
    ]
    .join("\n");
    let out = s.run_with_input(
        &[
            "log", "append", "--tenant", "acme", "--conv", "mixed", "--sender", "bob", "--stdin",
        ],
        input.as_bytes(),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed line makes the exit status 1"
    );
    let lines = json_lines(&out.stdout);
    let codes: Vec<_> = lines
        .iter()
        .map(|l| l["error"]["code"].as_str().unwrap_or("ok").to_string())
        .collect();
    assert_eq!(
        codes,
        [
            "ok",
            "invalid_json",
            "invalid_id",
            "invalid_request",
            "too_large",
            "too_large",
            "invalid_json",
            "ok"
        ]
    );
    assert_eq!(lines[7]["seq"], 3, "refused lines take no seq");
    assert_eq!(s.read_all("mixed").len(), 3);
}

#[test]
fn bad_arguments_and_refusals_are_clear_errors() {
    let s = Sandbox::new();
    s.group("general");
    let cases: [(&[&str], i32, &str); 5] = [
        (
            &[
                "log",
                "append",
                "--tenant",
                "a/b",
                "--conv",
                "c",
                "--sender",
                "u",
                "--client-msg-id",
                "m",
                "--text",
                "t",
            ],
            2,
            "invalid tenant",
        ),
        (
            &[
                "log",
                "append",
                "--tenant",
                "acme",
                "--conv",
                "nowhere",
                "--sender",
                "alice",
                "--client-msg-id",
                "m",
                "--text",
                "t",
            ],
            1,
            "does not exist",
        ),
        (
            &[
                "log",
                "append",
                "--tenant",
                "acme",
                "--conv",
                "general",
                "--sender",
                "mallory",
                "--client-msg-id",
                "m",
                "--text",
                "t",
            ],
            1,
            "not a member",
        ),
        (
            &["log", "read", "--tenant", "globex", "--conv", "general"],
            1,
            "does not exist in tenant globex",
        ),
        (
            &[
                "conv",
                "create",
                "--tenant",
                "acme",
                "--conv",
                "dm",
                "--kind",
                "direct",
                "--by",
                "alice",
                "--members",
                "bob,carol",
            ],
            1,
            "exactly 2 members",
        ),
    ];
    for (args, code, message) in cases {
        let out = s.run(args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    let big = "z".repeat(65 * 1024);
    let out = s.run(&[
        "log",
        "append",
        "--tenant",
        "acme",
        "--conv",
        "general",
        "--sender",
        "alice",
        "--client-msg-id",
        "big",
        "--text",
        &big,
    ]);
    assert!(
        stderr(&out).contains("over the limit of 65536 bytes"),
        "{}",
        stderr(&out)
    );
    let out = s
        .command(&[
            "log",
            "append",
            "--tenant",
            "acme",
            "--conv",
            "general",
            "--sender",
            "alice",
            "--client-msg-id",
            "small",
            "--text",
            "0123456789",
        ])
        .env("TIDINGS_LOG_MAX_BODY_BYTES", "8")
        .output()
        .expect("run");
    assert!(
        stderr(&out).contains("over the limit of 8 bytes"),
        "{}",
        stderr(&out)
    );
    assert_eq!(s.read_all("general").len(), 1, "nothing was written");
}

#[test]
fn a_missing_or_wrong_master_key_is_refused_before_touching_data() {
    let s = Sandbox::bare();
    let out = s.run(&["log", "read", "--tenant", "acme", "--conv", "general"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("tidings keys init"),
        "{}",
        stderr(&out)
    );
    assert!(!s.data_dir().exists(), "no data directory without a key");

    s.ok(&["keys", "init"]);
    s.group("general");
    s.ok(&["keys", "init", "--force"]);
    let out = s.run(&["log", "read", "--tenant", "acme", "--conv", "general"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("wrong key"), "{}", stderr(&out));

    let out = s
        .command(&["log", "read", "--tenant", "acme", "--conv", "general"])
        .env("TIDINGS_MASTER_KEY", "00zz")
        .output()
        .expect("run");
    assert!(
        stderr(&out).contains("TIDINGS_MASTER_KEY is malformed"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_store_held_by_another_process_is_reported_clearly() {
    let s = Sandbox::new();
    s.group("general");
    let mut holder = s.spawn_piped(&[
        "log", "append", "--tenant", "acme", "--conv", "general", "--sender", "bob", "--stdin",
    ]);
    let mut stdin = holder.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(holder.stdout.take().expect("stdout"));
    writeln!(stdin, r#"{{"client_msg_id":"h1","text":"holding"}}"#).expect("write");
    let mut ack = String::new();
    stdout.read_line(&mut ack).expect("ack");
    assert!(ack.contains("\"seq\":2"), "{ack}");

    let out = s.run(&["log", "read", "--tenant", "acme", "--conv", "general"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("in use by another process"),
        "{}",
        stderr(&out)
    );

    drop(stdin);
    assert!(holder.wait().expect("wait").success());
    assert_eq!(s.read_all("general").len(), 2);
}

#[test]
fn marker_text_never_appears_in_the_data_directory() {
    let s = Sandbox::new();
    s.group("general");
    let marker = "PLAINTEXT-MARKER-93b1f0";
    s.ok(&[
        "log",
        "append",
        "--tenant",
        "acme",
        "--conv",
        "general",
        "--sender",
        "alice",
        "--client-msg-id",
        "secret",
        "--text",
        marker,
    ]);
    s.ok(&[
        "conv",
        "rename",
        "--tenant",
        "acme",
        "--conv",
        "general",
        "--by",
        "alice",
        "--title",
        "TITLE-MARKER-93b1f0",
    ]);
    assert_eq!(s.read_all("general")[1]["text"], marker);
    assert!(grep_dir(&s.data_dir(), marker.as_bytes()).is_empty());
    assert!(grep_dir(&s.data_dir(), b"TITLE-MARKER-93b1f0").is_empty());
    // The search itself works: ids are stored in the clear as key parts.
    assert!(!grep_dir(&s.data_dir(), b"general").is_empty());
}

#[test]
fn config_file_is_read_and_typos_in_it_are_refused() {
    let s = Sandbox::new();
    std::fs::write(
        s.path().join("custom.toml"),
        "data_dir = \"elsewhere\"\n[log]\nmax_body_bytes = 16\n",
    )
    .expect("write");
    s.ok(&[
        "--config",
        "custom.toml",
        "conv",
        "create",
        "--tenant",
        "acme",
        "--conv",
        "g",
        "--kind",
        "group",
        "--by",
        "alice",
    ]);
    assert!(s.path().join("elsewhere").is_dir());
    let out = s.run(&[
        "--config",
        "custom.toml",
        "log",
        "append",
        "--tenant",
        "acme",
        "--conv",
        "g",
        "--sender",
        "alice",
        "--client-msg-id",
        "m",
        "--text",
        "longer than sixteen bytes",
    ]);
    assert!(
        stderr(&out).contains("limit of 16 bytes"),
        "{}",
        stderr(&out)
    );
    std::fs::write(s.path().join("typo.toml"), "[log]\nmax_body_byte = 16\n").expect("write");
    let out = s.run(&[
        "--config",
        "typo.toml",
        "log",
        "read",
        "--tenant",
        "acme",
        "--conv",
        "g",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("max_body_byte"), "{}", stderr(&out));
}

fn post(s: &Sandbox, tenant: &str, id: &str, text: &str) -> std::process::Output {
    s.run(&[
        "log",
        "append",
        "--tenant",
        tenant,
        "--conv",
        "general",
        "--sender",
        "alice",
        "--client-msg-id",
        id,
        "--text",
        text,
    ])
}

#[test]
fn keys_shred_refuses_without_a_matching_confirm() {
    let s = Sandbox::new();
    s.group("general");
    for args in [
        &["keys", "shred", "--tenant", "acme", "--actor", "dpo"][..],
        &[
            "keys",
            "shred",
            "--tenant",
            "acme",
            "--confirm",
            "acm",
            "--actor",
            "dpo",
        ][..],
        &[
            "keys",
            "shred",
            "--tenant",
            "acme",
            "--confirm",
            "globex",
            "--actor",
            "dpo",
        ][..],
    ] {
        let out = s.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("pass --confirm acme"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    assert_eq!(s.read_all("general").len(), 1, "nothing was shredded");
}

#[test]
fn after_keys_shred_the_tenant_is_refused_with_tenant_shredded_and_others_still_read() {
    let s = Sandbox::new();
    for tenant in ["acme", "globex"] {
        s.group_in(tenant, "general");
        assert!(
            post(&s, tenant, "m1", &format!("hello from {tenant}"))
                .status
                .success()
        );
    }
    let out = s.ok(&[
        "keys",
        "shred",
        "--tenant",
        "acme",
        "--confirm",
        "acme",
        "--actor",
        "dpo",
    ]);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0]["tenant"], "acme");
    assert_eq!(out[0]["key_versions_destroyed"], 1);
    assert_eq!(out[0]["key_ids"], serde_json::json!([1]));
    assert_eq!(out[0]["already_shredded"], false);

    let read = s.run(&["log", "read", "--tenant", "acme", "--conv", "general"]);
    assert_eq!(read.status.code(), Some(1), "{}", stderr(&read));
    assert!(read.stdout.is_empty());
    let error = error_line(&read);
    assert_eq!(error["error"]["code"], "tenant_shredded", "{error}");
    assert_eq!(error["error"]["retryable"], false);
    assert!(!stderr(&read).contains("panicked"), "{}", stderr(&read));

    let append = post(&s, "acme", "m2", "too late");
    assert_eq!(append.status.code(), Some(1));
    assert_eq!(error_line(&append)["error"]["code"], "tenant_shredded");

    let globex = s.ok(&["log", "read", "--tenant", "globex", "--conv", "general"]);
    assert_eq!(globex[1]["text"], "hello from globex");

    // The archiver passes over the shredded tenant and still archives the other.
    let run = s.ok(&["archive", "run", "--older-than", "0s"]);
    let summary = run.last().expect("summary");
    assert_eq!(summary["events_archived"], 2, "{summary}");
    let globex = s.ok(&["log", "read", "--tenant", "globex", "--conv", "general"]);
    assert_eq!(globex[1]["text"], "hello from globex");
}

#[test]
fn a_tenant_key_from_key_command_seals_and_opens_end_to_end() {
    let s = Sandbox::new();
    let key = "3f".repeat(64);
    std::fs::write(s.path().join("acme.key"), format!("{key}\n")).expect("key");
    std::fs::write(
        s.path().join("keyed.toml"),
        "[keys.tenants.acme]\nkey_command = \"cat acme.key\"\n",
    )
    .expect("config");
    let keyed = |args: &[&str]| {
        let mut all = vec!["--config", "keyed.toml"];
        all.extend_from_slice(args);
        s.run(&all)
    };
    assert!(
        keyed(&[
            "conv", "create", "--tenant", "acme", "--conv", "general", "--kind", "group", "--by",
            "alice"
        ])
        .status
        .success()
    );
    let out = keyed(&[
        "log",
        "append",
        "--tenant",
        "acme",
        "--conv",
        "general",
        "--sender",
        "alice",
        "--client-msg-id",
        "m1",
        "--text",
        "under two keys",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let read = keyed(&["log", "read", "--tenant", "acme", "--conv", "general"]);
    assert!(read.status.success(), "{}", stderr(&read));
    assert_eq!(json_lines(&read.stdout)[1]["text"], "under two keys");
    assert!(
        grep_dir(&s.data_dir(), key.as_bytes()).is_empty(),
        "the tenant key never reaches the store"
    );

    // Without the tenant key configured, the history does not open.
    let out = s.run(&["log", "read", "--tenant", "acme", "--conv", "general"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(error_line(&out)["error"]["code"], "tenant_key_unavailable");
    // A command that prints something else is refused, without echoing it.
    std::fs::write(
        s.path().join("garbage.toml"),
        "[keys.tenants.acme]\nkey_command = \"echo not-a-key-8f2c\"\n",
    )
    .expect("config");
    let out = s.run(&[
        "--config",
        "garbage.toml",
        "log",
        "read",
        "--tenant",
        "acme",
        "--conv",
        "general",
    ]);
    assert_eq!(error_line(&out)["error"]["code"], "tenant_key_unavailable");
    assert!(
        stderr(&out).contains("did not print a key"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("not-a-key-8f2c"), "{}", stderr(&out));

    // keys wrap: refused without a tenant key, adds the layer to an existing key with one.
    s.group_in("globex", "general");
    let out = s.run(&["keys", "wrap", "--tenant", "globex"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(error_line(&out)["error"]["code"], "tenant_key_unavailable");
    assert!(
        stderr(&out).contains("[keys.tenants.globex]"),
        "{}",
        stderr(&out)
    );
    std::fs::write(s.path().join("globex.key"), "5a".repeat(64)).expect("key");
    std::fs::write(
        s.path().join("both.toml"),
        "[keys.tenants.acme]\nkey_command = \"cat acme.key\"\n\
         [keys.tenants.globex]\nkey_file = \"globex.key\"\n",
    )
    .expect("config");
    let out = s.ok(&[
        "--config",
        "both.toml",
        "keys",
        "wrap",
        "--tenant",
        "globex",
    ]);
    assert_eq!(out[0]["wrapped_key_ids"], serde_json::json!([1]));
    let out = s.ok(&["--config", "both.toml", "keys", "wrap", "--tenant", "acme"]);
    assert_eq!(out[0]["wrapped_key_ids"], serde_json::json!([]));
    assert_eq!(out[0]["already_wrapped_key_ids"], serde_json::json!([1]));
    s.ok(&[
        "--config",
        "both.toml",
        "log",
        "read",
        "--tenant",
        "globex",
        "--conv",
        "general",
    ]);
    std::fs::remove_file(s.path().join("globex.key")).expect("destroy the key");
    let out = s.run(&[
        "--config",
        "both.toml",
        "log",
        "read",
        "--tenant",
        "globex",
        "--conv",
        "general",
    ]);
    assert_eq!(error_line(&out)["error"]["code"], "tenant_key_unavailable");
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
}

#[test]
fn a_gateway_apart_from_the_log_must_pin_the_log_identity() {
    let s = Sandbox::new();
    let serve_gateway = |key: Option<&str>| {
        let mut cmd = s.command(&["serve", "--role", "gateway"]);
        cmd.env("TIDINGS_AUTH_HS256_ENABLED", "1")
            .env("TIDINGS_GATEWAY_LISTEN", "127.0.0.1:0")
            .env("TIDINGS_ADMIN_LISTEN", "")
            // Nothing listens here: the identity check comes first.
            .env("TIDINGS_NATS_URL", "nats://127.0.0.1:1")
            .env("TIDINGS_NATS_CONNECT_WAIT", "0s");
        if let Some(key) = key {
            cmd.env("TIDINGS_GATEWAY_LOG_PUBLIC_KEY", key);
        }
        cmd.stdin(std::process::Stdio::null())
            .output()
            .expect("run tidings")
    };
    let out = serve_gateway(None);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("gateway.log_public_key") && err.contains("tidings keys log-identity"),
        "{err}"
    );
    let out = serve_gateway(Some("abcd"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("gateway.log_public_key: a log public key is 64 hex digits"));

    // The identity is the master key's: the same every time, 32 bytes of hex.
    let first = s.ok(&["keys", "log-identity"]);
    let key = first[0]["log_public_key"].as_str().expect("log_public_key");
    assert_eq!(key.len(), 64);
    assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(s.ok(&["keys", "log-identity"])[0]["log_public_key"], key);
    let other = Sandbox::new();
    assert_ne!(
        other.ok(&["keys", "log-identity"])[0]["log_public_key"],
        key
    );
    // With it, the gateway gets past the check (and then fails on the absent NATS).
    let out = serve_gateway(Some(key));
    assert!(!out.status.success());
    assert!(
        !stderr(&out).contains("gateway.log_public_key"),
        "{}",
        stderr(&out)
    );
}
