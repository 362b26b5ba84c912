//! Configuration: one TOML file plus `TIDINGS_*` environment overrides.
//!
//! Precedence, lowest first: built-in defaults (everything on one machine, under the working
//! directory), the TOML file (`--config`, `TIDINGS_CONFIG`, or `./tidings.toml` if present),
//! environment variables, command-line flags. `ops/tidings.example.toml` documents every
//! field.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tidings_log::LogConfig;
use tidings_log::crypto::MasterKey;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the embedded store keeps its files.
    pub data_dir: PathBuf,
    /// The master key file (`tidings keys init` writes it). `TIDINGS_MASTER_KEY` (128 hex
    /// digits) takes precedence when set.
    pub master_key_file: PathBuf,
    pub log: LogSection,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub max_body_bytes: usize,
    pub max_title_bytes: usize,
    pub max_batch: usize,
    pub queue_depth: usize,
    pub max_read_limit: usize,
    pub max_group_members: usize,
    pub writer_cache_entries: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("tidings-data"),
            master_key_file: PathBuf::from("tidings-master.key"),
            log: LogSection::default(),
        }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        let d = LogConfig::default();
        LogSection {
            max_body_bytes: d.max_body_bytes,
            max_title_bytes: d.max_title_bytes,
            max_batch: d.max_batch,
            queue_depth: d.queue_depth,
            max_read_limit: d.max_read_limit,
            max_group_members: d.max_group_members,
            writer_cache_entries: d.writer_cache_entries,
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
        name: &'static str,
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
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?
            }
            None => Config::default(),
        };
        config.apply_env(env)?;
        config.validate()?;
        Ok(config)
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = env("TIDINGS_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env("TIDINGS_MASTER_KEY_FILE") {
            self.master_key_file = PathBuf::from(v);
        }
        let numbers: [(&'static str, &mut usize); 7] = [
            ("TIDINGS_LOG_MAX_BODY_BYTES", &mut self.log.max_body_bytes),
            ("TIDINGS_LOG_MAX_TITLE_BYTES", &mut self.log.max_title_bytes),
            ("TIDINGS_LOG_MAX_BATCH", &mut self.log.max_batch),
            ("TIDINGS_LOG_QUEUE_DEPTH", &mut self.log.queue_depth),
            ("TIDINGS_LOG_MAX_READ_LIMIT", &mut self.log.max_read_limit),
            (
                "TIDINGS_LOG_MAX_GROUP_MEMBERS",
                &mut self.log.max_group_members,
            ),
            (
                "TIDINGS_LOG_WRITER_CACHE_ENTRIES",
                &mut self.log.writer_cache_entries,
            ),
        ];
        for (name, slot) in numbers {
            if let Some(value) = env(name) {
                *slot = value.trim().parse().map_err(|e| ConfigError::Env {
                    name,
                    value: value.clone(),
                    reason: format!("{e}"),
                })?;
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.log_config().validate().map_err(ConfigError::Invalid)
    }

    pub fn log_config(&self) -> LogConfig {
        let s = &self.log;
        LogConfig {
            max_body_bytes: s.max_body_bytes,
            max_title_bytes: s.max_title_bytes,
            max_batch: s.max_batch,
            queue_depth: s.queue_depth,
            max_read_limit: s.max_read_limit,
            max_group_members: s.max_group_members,
            writer_cache_entries: s.writer_cache_entries,
        }
    }

    /// The master key: `TIDINGS_MASTER_KEY` if set, else the key file.
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
        assert_eq!(format!("{:?}", cfg.log), format!("{:?}", d.log));
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
        assert_eq!(cfg.log.max_body_bytes, 1000);
        assert_eq!(cfg.log.max_batch, 9);
        assert_eq!(cfg.log.queue_depth, LogConfig::default().queue_depth);
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
            matches!(
                err,
                ConfigError::Env {
                    name: "TIDINGS_LOG_MAX_BATCH",
                    ..
                }
            ),
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
