//! `TIDINGS_*` environment overrides, derived from the config tree
//! (docs/decisions/derived-env-overrides.md).
//!
//! The rule: the setting at `section.field` (`store.tikv.key_prefix`, or a top-level
//! `data_dir`) is overridden by `TIDINGS_SECTION_FIELD`: its path upper-cased, dots as
//! underscores. The text is read by the setting's type, as the defaults show it:
//!
//! - on/off settings: 1/0, true/false, yes/no, on/off (empty is off);
//! - numbers: a whole number, which must fit the field (a negative size, or a `u32` past
//!   its range, is refused naming the variable);
//! - lists of strings: a comma-separated list, blanks dropped (`a, b,` is `["a", "b"]`);
//! - optional settings (the paths that are unset by default): the text, empty for unset;
//! - everything else: the text as it is.
//!
//! So a field added to a section has its variable with no code here. What the rule does
//! not cover is listed below with its reason: tables keyed by user data, two names kept
//! from before the rule, and the few variables read outside the tree.
//!
//! The same tree says which keys a config file may hold ([`refuse_unknown_keys`]): the
//! sections that flatten a library's config type into their table (`[log]`, `[nats]`)
//! cannot refuse unknown keys through serde (docs/decisions/config-types-read-directly.md).

use serde::Deserialize;
use serde_json::Value;

use super::{Config, ConfigError};

const PREFIX: &str = "TIDINGS_";

/// Subtrees keyed or listed by user data (a tenant, a conversation kind, a hook, a peer
/// cell): a variable per entry would be named after data, not after a setting, so they
/// come from the file only (`cell.peers` also has `TIDINGS_CELL_PEERS`, below). Their keys
/// are data too: the types of their entries refuse unknown fields themselves.
const FILE_ONLY: &[&str] = &[
    "keys.tenants",
    "archive.tenants",
    "log.kinds",
    "log.interceptors",
    "cell.peers",
];

/// Names older than the rule, kept for the settings they named then (deployments and
/// `tests/tikv*` set them). Set beside the derived name, the alias wins.
const ALIASES: &[(&str, &str)] = &[
    ("TIDINGS_TIKV_PD", "store.tikv.pd_endpoints"),
    ("TIDINGS_TIKV_KEY_PREFIX", "store.tikv.key_prefix"),
];

/// Cell peers as `name=url,name=url`: a list of tables, which the rule does not read.
const CELL_PEERS: &str = "TIDINGS_CELL_PEERS";

/// Secrets: never a field of the file (which holds `*_file` paths instead), never in the
/// tree, so never in a `Debug` of it; each lands in a `#[serde(skip)]` field.
const NATS_PASSWORD: &str = "TIDINGS_NATS_PASSWORD";
const NATS_TOKEN: &str = "TIDINGS_NATS_TOKEN";
const CELL_NATS_PASSWORD: &str = "TIDINGS_CELL_NATS_PASSWORD";

/// Read before or after the configuration, not as part of it.
const ELSEWHERE: &[&str] = &[
    // Which file to read: needed before there is a tree.
    "TIDINGS_CONFIG",
    // The master key itself (128 hex digits), read where it is used (`Config::master_key`)
    // so it is never held in the configuration.
    "TIDINGS_MASTER_KEY",
];

/// How a variable's text becomes a value of the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Flag,
    Number,
    List,
    Optional,
    Text,
}

impl Kind {
    fn read(self, text: &str) -> Result<Value, String> {
        Ok(match self {
            Kind::Flag => Value::Bool(flag(text)?),
            Kind::Number => {
                let t = text.trim();
                t.parse::<u64>()
                    .map(Value::from)
                    .or_else(|_| t.parse::<i64>().map(Value::from))
                    .map_err(|_| "expected a whole number".to_string())?
            }
            Kind::List => text
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(Value::from)
                .collect(),
            Kind::Optional if text.is_empty() => Value::Null,
            Kind::Optional | Kind::Text => Value::from(text),
        })
    }
}

/// A boolean from the environment: 1/0, true/false, yes/no, on/off.
fn flag(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err("expected 1/0, true/false, yes/no or on/off".into()),
    }
}

/// The variable the rule derives for the setting at `path`.
pub fn name_of(path: &str) -> String {
    format!("{PREFIX}{}", path.replace('.', "_").to_ascii_uppercase())
}

/// Every setting the rule covers, with its kind, read from the defaults' tree: there every
/// optional setting is unset (null), so a setting's kind does not depend on the file.
fn settings() -> Vec<(String, Kind)> {
    fn walk(node: &Value, prefix: &str, out: &mut Vec<(String, Kind)>) {
        let Value::Object(fields) = node else {
            return;
        };
        for (key, value) in fields {
            let path = child_path(prefix, key);
            if FILE_ONLY.contains(&path.as_str()) {
                continue;
            }
            let kind = match value {
                Value::Object(_) => {
                    walk(value, &path, out);
                    continue;
                }
                Value::Bool(_) => Kind::Flag,
                Value::Number(_) => Kind::Number,
                Value::Array(_) => Kind::List,
                Value::Null => Kind::Optional,
                Value::String(_) => Kind::Text,
            };
            out.push((path, kind));
        }
    }
    let defaults = defaults_tree();
    let mut out = Vec::new();
    walk(&defaults, "", &mut out);
    out
}

/// The path of `key` in the table at `prefix` (`log` and `max_batch`: `log.max_batch`).
fn child_path(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The defaults as a tree: every setting at its path. The variables, the file's keys and
/// its values are all checked against it.
fn defaults_tree() -> Value {
    serde_json::to_value(Config::default()).expect("the defaults serialise")
}

/// `config` with the overrides `env` gives.
pub fn apply(config: &Config, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let mut tree = serde_json::to_value(config)
        .map_err(|e| ConfigError::Invalid(format!("the configuration does not serialise: {e}")))?;
    for (path, kind) in settings() {
        let aliases = ALIASES.iter().filter(|(_, p)| *p == path);
        let names = std::iter::once(name_of(&path)).chain(aliases.map(|(n, _)| n.to_string()));
        for name in names {
            if let Some(text) = env(&name) {
                let value = kind.read(&text).map_err(|e| invalid(&name, &text, e))?;
                set(&mut tree, &path, value).map_err(|e| invalid(&name, &text, e))?;
            }
        }
    }
    if let Some(text) = env(CELL_PEERS) {
        let peers = super::cells::Peer::list_from_env(&text)
            .and_then(|peers| serde_json::to_value(peers).map_err(|e| e.to_string()))
            .map_err(|e| invalid(CELL_PEERS, &text, e))?;
        set(&mut tree, "cell.peers", peers).map_err(|e| invalid(CELL_PEERS, &text, e))?;
    }
    // Every value was read back as it was set (`set`): this cannot fail.
    let mut config = Config::deserialize(&tree)
        .map_err(|e| ConfigError::Invalid(format!("the configuration does not read back: {e}")))?;
    let secret = |name: &str| env(name).filter(|v| !v.is_empty());
    config.nats.password_env = secret(NATS_PASSWORD);
    config.nats.token_env = secret(NATS_TOKEN);
    if let Some(password) = secret(CELL_NATS_PASSWORD) {
        config.cell.nats.password_env = Some(password);
    }
    Ok(config)
}

/// Writes `value` at `path`, then reads the configuration back, so a value the field's type
/// refuses (a negative size, a number past a `u32`) is refused here, where the caller knows
/// which variable it came from.
fn set(tree: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let slot = path.split('.').fold(&mut *tree, |node, key| &mut node[key]);
    *slot = value;
    Config::deserialize(&*tree)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn invalid(name: &str, text: &str, reason: String) -> ConfigError {
    ConfigError::Env {
        name: name.to_string(),
        value: text.to_string(),
        reason,
    }
}

/// Refuses a file (its TOML table) with a key that names no setting: every key must be in
/// the defaults' tree at its place, but under the [`FILE_ONLY`] subtrees, whose keys are
/// data. The message names the key and the table it is in, and what that table takes, as
/// serde's own `deny_unknown_fields` does.
pub fn refuse_unknown_keys(file: &toml::Table) -> Result<(), String> {
    fn walk(file: &toml::Table, known: &Value, prefix: &str) -> Result<(), String> {
        let Value::Object(known) = known else {
            return Ok(());
        };
        for (key, value) in file {
            let path = child_path(prefix, key);
            let Some(default) = known.get(key) else {
                let table = if prefix.is_empty() {
                    "at the top level".to_string()
                } else {
                    format!("in [{prefix}]")
                };
                let expected: Vec<String> = known.keys().map(|k| format!("`{k}`")).collect();
                return Err(format!(
                    "unknown field `{key}` {table}, expected one of {}",
                    expected.join(", ")
                ));
            };
            if let toml::Value::Table(table) = value
                && !FILE_ONLY.contains(&path.as_str())
            {
                walk(table, default, &path)?;
            }
        }
        Ok(())
    }
    let defaults = defaults_tree();
    walk(file, &defaults, "")
}

/// The setting of the file whose value its type refuses, and why: set alone over the
/// defaults, each value of the file is read back until one fails. For the error of a
/// flattened library type, which serde reports at its table (`[log]`), not at the key.
pub fn refused_value(file: &toml::Table) -> Option<(String, String)> {
    fn walk(
        file: &toml::Table,
        known: &Value,
        prefix: &str,
        defaults: &Value,
    ) -> Option<(String, String)> {
        for (key, value) in file {
            let path = child_path(prefix, key);
            // An unknown key is `refuse_unknown_keys`' to name.
            let Some(default) = known.get(key) else {
                continue;
            };
            if let toml::Value::Table(table) = value
                && default.is_object()
                && !FILE_ONLY.contains(&path.as_str())
            {
                if let Some(found) = walk(table, default, &path, defaults) {
                    return Some(found);
                }
                continue;
            }
            let mut tree = defaults.clone();
            let slot = path.split('.').fold(&mut tree, |node, key| &mut node[key]);
            *slot = serde_json::to_value(value).ok()?;
            if let Err(e) = Config::deserialize(&tree) {
                return Some((path, e.to_string()));
            }
        }
        None
    }
    let defaults = defaults_tree();
    walk(file, &defaults, "", &defaults)
}

/// Every variable the configuration reads: the derived ones, then the exceptions.
pub fn names() -> Vec<String> {
    let derived = settings().into_iter().map(|(path, _)| name_of(&path));
    let exceptions = ALIASES.iter().map(|(name, _)| *name).chain([
        CELL_PEERS,
        NATS_PASSWORD,
        NATS_TOKEN,
        CELL_NATS_PASSWORD,
    ]);
    derived
        .chain(
            exceptions
                .chain(ELSEWHERE.iter().copied())
                .map(String::from),
        )
        .collect()
}

/// Those of `present` that look like a setting (`TIDINGS_<SECTION>_...`, for a section of
/// the file) but name none: a typo that would otherwise be ignored without a word. Other
/// `TIDINGS_*` variables (`TIDINGS_LOG` for log filtering, the tests' `TIDINGS_REQUIRE_*`)
/// are not the configuration's.
pub fn unknown<'a>(present: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let defaults = defaults_tree();
    let sections: Vec<String> = defaults
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| v.is_object())
        .map(|(k, _)| format!("{PREFIX}{}_", k.to_ascii_uppercase()))
        .collect();
    let known = names();
    present
        .into_iter()
        .filter(|name| sections.iter().any(|s| name.starts_with(s.as_str())))
        .filter(|name| !known.iter().any(|k| k == name))
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_setting_has_one_name_and_no_exception_shadows_a_derived_one() {
        let derived: Vec<String> = settings().iter().map(|(p, _)| name_of(p)).collect();
        let mut all = names();
        let count = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), count, "two settings derive the same variable");
        for exception in ALIASES.iter().map(|(n, _)| *n).chain([CELL_PEERS]) {
            assert!(!derived.iter().any(|d| d == exception), "{exception}");
        }
        for (_, path) in ALIASES {
            assert!(settings().iter().any(|(p, _)| p == path), "{path}");
        }
    }

    #[test]
    fn kinds_follow_the_field_types() {
        let kind = |path: &str| {
            settings()
                .into_iter()
                .find(|(p, _)| p == path)
                .map(|(_, k)| k)
        };
        assert_eq!(kind("archive.enabled"), Some(Kind::Flag));
        assert_eq!(kind("log.partitions"), Some(Kind::Number));
        assert_eq!(kind("log.vip_tenants"), Some(Kind::List));
        assert_eq!(kind("gateway.tls_cert_file"), Some(Kind::Optional));
        assert_eq!(kind("data_dir"), Some(Kind::Text));
        assert_eq!(kind("cell.nats.url"), Some(Kind::Text));
        for file_only in FILE_ONLY {
            assert!(
                settings().iter().all(|(p, _)| !p.starts_with(file_only)),
                "{file_only}"
            );
        }
        assert_eq!(
            Kind::List.read(" a, b,,"),
            Ok(serde_json::json!(["a", "b"]))
        );
        assert_eq!(Kind::Optional.read(""), Ok(Value::Null));
        assert_eq!(Kind::Number.read("-3"), Ok(serde_json::json!(-3)));
        assert!(Kind::Number.read("1.5").is_err());
        assert!(Kind::Flag.read("maybe").is_err());
    }

    #[test]
    fn typos_under_a_section_are_reported_and_other_tidings_variables_are_not() {
        let present = [
            "TIDINGS_LOG_TYPO",
            "TIDINGS_LOG_MAX_BATCH",
            "TIDINGS_LOG",
            "TIDINGS_REQUIRE_GARAGE",
            "TIDINGS_TIKV_PD",
            "TIDINGS_NATS_PASSWORD",
            "TIDINGS_GATEWAY_LISTN",
            "TIDINGS_CELL_NATS_TLS_CA_FILE",
        ];
        assert_eq!(
            unknown(present),
            vec![
                "TIDINGS_LOG_TYPO".to_string(),
                "TIDINGS_GATEWAY_LISTN".into()
            ]
        );
    }
}
