//! `tidings nats init --dir DIR`: one NATS identity per role, and the server side of it.
//!
//! Writes, in DIR:
//! - `log.nk`, `gateway.nk`, `all.nk`: an NKey user seed per role (mode 0600). A seed signs
//!   the server's nonce; it never crosses the network. Existing seeds are kept, so running
//!   it again only rewrites the server include (e.g. after an upgrade changed the lists).
//! - `accounts.conf`: a nats-server include with account `TIDINGS`, its JetStream, and one
//!   user per role by **public** key, each with the subject permissions below. The server
//!   therefore holds nothing that lets anyone connect as a role.
//!
//! The permission lists are the code's real subjects (`tidings_log_api::subjects`), checked
//! against a real nats-server by `tests/bus_security.rs`. Why each entry is there, and what
//! a stolen seed allows: docs/decisions/nats-identity-and-permissions.md.
//!
//! The archiver has no NATS identity: it never connects (`serve --role archiver` works on
//! the store and the archive only).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde_json::json;
use tidings_log_api::subjects;
use tidings_log_role::send_buffer_stream;

/// Subject permissions of one role.
pub struct RolePermissions {
    pub role: &'static str,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May publish to the reply subject of a request it received (and only that one).
    pub allow_responses: bool,
}

/// The inbox prefix of a role: request replies (RPC answers, JetStream acks) arrive under
/// it. One prefix per role, so a gateway's credential cannot read the log's inbox.
/// Connects to NATS as `role` (`all`, `log`, `gateway`, `archiver`), with the configured
/// credential and TLS and the role's inbox prefix.
pub async fn connect(
    config: &crate::config::Config,
    role: &str,
) -> anyhow::Result<(async_nats::Client, tidings_log_api::nats::BusEvents)> {
    let mut opts = config.nats.connect()?;
    opts.inbox_prefix = Some(inbox_prefix(role));
    Ok(tidings_log_api::nats::connect_nats(&opts, &format!("tidings-{role}")).await?)
}

pub fn inbox_prefix(role: &str) -> String {
    format!("_INBOX.{role}")
}

/// The log: answers RPC (queue group and its own writer subject), publishes committed
/// events and notices, creates the event stream.
pub fn log_permissions() -> RolePermissions {
    RolePermissions {
        role: "log",
        publish: vec![
            "tidings.ev.>".into(),
            "tidings.user.>".into(),
            "tidings.revoked.>".into(),
            // Requests to the tenants' interceptors (crate::intercept).
            format!("{}.>", crate::intercept::SUBJECT_PREFIX),
            format!("$JS.API.STREAM.INFO.{}", subjects::STREAM),
            format!("$JS.API.STREAM.CREATE.{}", subjects::STREAM),
            // The send buffer on JetStream: appends, reads by subject, trims.
            format!("{}.>", send_buffer_stream::SUBJECT_PREFIX),
            format!("$JS.API.STREAM.INFO.{}", send_buffer_stream::STREAM),
            format!("$JS.API.STREAM.CREATE.{}", send_buffer_stream::STREAM),
            format!("$JS.API.STREAM.MSG.GET.{}", send_buffer_stream::STREAM),
            format!("$JS.API.STREAM.PURGE.{}", send_buffer_stream::STREAM),
            // Webhook delivery: a durable pull consumer per subscription on the event
            // stream (made, pulled from, acked, deleted with its subscription).
            format!("$JS.API.CONSUMER.CREATE.{}.>", subjects::STREAM),
            format!("$JS.API.CONSUMER.DURABLE.CREATE.{}.>", subjects::STREAM),
            format!("$JS.API.CONSUMER.INFO.{}.>", subjects::STREAM),
            format!("$JS.API.CONSUMER.MSG.NEXT.{}.>", subjects::STREAM),
            format!("$JS.API.CONSUMER.DELETE.{}.>", subjects::STREAM),
            format!("$JS.ACK.{}.>", subjects::STREAM),
        ],
        subscribe: vec![
            subjects::LOG_RPC.into(),
            format!("{}.w.>", subjects::LOG_RPC),
            format!("{}.>", inbox_prefix("log")),
        ],
        allow_responses: true,
    }
}

/// A gateway: calls the log, publishes typing notices; receives events, notices, typing and
/// revocations. No JetStream API: it reads gaps from the log, not from the stream.
pub fn gateway_permissions() -> RolePermissions {
    RolePermissions {
        role: "gateway",
        publish: vec![
            subjects::LOG_RPC.into(),
            format!("{}.w.>", subjects::LOG_RPC),
            "tidings.ty.>".into(),
        ],
        subscribe: vec![
            "tidings.ev.>".into(),
            "tidings.user.>".into(),
            "tidings.ty.>".into(),
            "tidings.revoked.>".into(),
            format!("{}.>", inbox_prefix("gateway")),
        ],
        allow_responses: false,
    }
}

/// `serve --role all`: the log and a gateway in one process, one connection.
pub fn all_permissions() -> RolePermissions {
    let (log, gateway) = (log_permissions(), gateway_permissions());
    let union = |a: Vec<String>, b: Vec<String>| {
        let mut all = a;
        for s in b {
            if !all.contains(&s) && !s.starts_with("_INBOX.") {
                all.push(s);
            }
        }
        all.retain(|s| !s.starts_with("_INBOX."));
        all
    };
    let mut subscribe = union(log.subscribe, gateway.subscribe);
    subscribe.push(format!("{}.>", inbox_prefix("all")));
    RolePermissions {
        role: "all",
        publish: union(log.publish, gateway.publish),
        subscribe,
        allow_responses: true,
    }
}

/// A tenant's interceptor service (DLP, moderation): receives the log's requests and
/// answers them, and nothing else.
pub fn interceptor_permissions() -> RolePermissions {
    RolePermissions {
        role: "interceptor",
        publish: vec![],
        subscribe: vec![format!("{}.>", crate::intercept::SUBJECT_PREFIX)],
        allow_responses: true,
    }
}

pub fn roles() -> Vec<RolePermissions> {
    vec![
        log_permissions(),
        gateway_permissions(),
        all_permissions(),
        interceptor_permissions(),
    ]
}

fn quoted(list: &[String]) -> String {
    list.iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The nats-server include for these roles and public keys.
pub fn accounts_conf(users: &[(RolePermissions, String)]) -> String {
    let mut out = String::from(
        "# Generated by `tidings nats init`: the TIDINGS account and one user per role,\n\
         # by NKey public key (the seeds stay with the roles). Include it from the server\n\
         # config (ops/nats/). Every user in TIDINGS must carry a permissions block: a user\n\
         # without one may publish and subscribe to everything in the account.\n\
         accounts {\n  TIDINGS {\n    jetstream: enabled\n    users: [\n",
    );
    for (p, public) in users {
        out.push_str(&format!(
            "      # {role}\n      {{\n        nkey: {public}\n        permissions: {{\n          \
             publish: {{ allow: [{publish}] }}\n          \
             subscribe: {{ allow: [{subscribe}] }}\n{responses}        }}\n      }}\n",
            role = p.role,
            publish = quoted(&p.publish),
            subscribe = quoted(&p.subscribe),
            responses = if p.allow_responses {
                "          allow_responses: { max: 1 }\n"
            } else {
                ""
            },
        ));
    }
    out.push_str("    ]\n  }\n}\n");
    out
}

/// Reads a role's seed, or makes one (mode 0600, never overwritten).
fn seed(path: &Path) -> anyhow::Result<nkeys::KeyPair> {
    match std::fs::read_to_string(path) {
        Ok(text) => nkeys::KeyPair::from_seed(text.trim())
            .map_err(|e| anyhow::anyhow!("{} is not an NKey seed: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pair = nkeys::KeyPair::new_user();
            let text = pair
                .seed()
                .map_err(|e| anyhow::anyhow!("encode an NKey seed: {e}"))?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options
                .open(path)
                .with_context(|| format!("create {}", path.display()))?;
            writeln!(file, "{text}")
                .and_then(|()| file.sync_all())
                .with_context(|| format!("write {}", path.display()))?;
            Ok(pair)
        }
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Writes the seeds (kept if present) and `accounts.conf`; returns what it wrote.
pub fn init(dir: &Path) -> anyhow::Result<serde_json::Value> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut users = Vec::new();
    let mut seeds = serde_json::Map::new();
    for p in roles() {
        let path = dir.join(format!("{}.nk", p.role));
        let pair = seed(&path)?;
        seeds.insert(p.role.into(), json!(path.display().to_string()));
        users.push((p, pair.public_key()));
    }
    let conf = dir.join("accounts.conf");
    std::fs::write(&conf, accounts_conf(&users))
        .with_context(|| format!("write {}", conf.display()))?;
    let public_keys: serde_json::Map<String, serde_json::Value> = users
        .iter()
        .map(|(p, k)| (p.role.to_string(), json!(k)))
        .collect();
    Ok(json!({
        "accounts_conf": conf.display().to_string(),
        "seeds": seeds,
        "public_keys": public_keys,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_the_union_of_log_and_gateway_with_its_own_inbox() {
        let all = all_permissions();
        for s in log_permissions()
            .publish
            .iter()
            .chain(&gateway_permissions().publish)
        {
            assert!(all.publish.contains(s), "{s}");
        }
        assert!(all.subscribe.contains(&"_INBOX.all.>".to_string()));
        assert!(!all.subscribe.iter().any(|s| s == "_INBOX.log.>"));
        assert!(
            !gateway_permissions()
                .publish
                .iter()
                .any(|s| s.starts_with("tidings.ev"))
        );
        assert!(
            !gateway_permissions()
                .subscribe
                .iter()
                .any(|s| s.starts_with("tidings.rpc"))
        );
    }

    #[test]
    fn init_keeps_existing_seeds_and_writes_public_keys_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = init(dir.path()).expect("init");
        let seed = std::fs::read_to_string(dir.path().join("log.nk")).expect("seed");
        let second = init(dir.path()).expect("init again");
        assert_eq!(first["public_keys"], second["public_keys"]);
        let conf = std::fs::read_to_string(dir.path().join("accounts.conf")).expect("conf");
        assert!(!conf.contains(seed.trim()));
        assert!(conf.contains(first["public_keys"]["log"].as_str().expect("key")));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("gateway.nk"))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
