//! `[cell]`: this cell's name and URL, its peers, and the link's NATS connection. Read
//! here with the rest of the config; the link itself is `crate::cells`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A peer cell: its name and where its clients connect.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub name: String,
    pub url: String,
}

impl Peer {
    /// Peers as the environment gives them (`TIDINGS_CELL_PEERS`): `name=url,name=url`.
    pub fn list_from_env(text: &str) -> Result<Vec<Peer>, String> {
        text.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                let (name, url) = p
                    .split_once('=')
                    .ok_or_else(|| format!("{p:?} is not name=url"))?;
                Ok(Peer {
                    name: name.trim().into(),
                    url: url.trim().into(),
                })
            })
            .collect()
    }
}

/// `[cell]`: this cell and its peers. Off while `name` is empty.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CellsConfig {
    /// This cell's name (`a-z`, `0-9`, `-`).
    pub name: String,
    /// Where this cell's clients connect (`wss://host/v1/ws`): the redirect other cells give.
    pub url: String,
    /// The key this cell shares with its peers to hand over tenants' data keys (a key file
    /// as `tidings keys init --file` writes).
    pub link_key_file: std::path::PathBuf,
    /// How long a synchronous tenant's send waits for its DR cell.
    pub sync_timeout_ms: u64,
    /// The link account's NATS connection (its URL and credential), leaf-joined to the peers.
    pub nats: super::NatsSection,
    /// Largest the incoming replica stream may grow, in bytes (unapplied batches).
    pub stream_max_bytes: i64,
    pub peers: Vec<Peer>,
}

impl Default for CellsConfig {
    fn default() -> Self {
        CellsConfig {
            name: String::new(),
            url: String::new(),
            link_key_file: "cell-link.key".into(),
            sync_timeout_ms: 5000,
            nats: super::NatsSection::default(),
            stream_max_bytes: 1 << 30,
            peers: Vec::new(),
        }
    }
}

impl CellsConfig {
    pub fn enabled(&self) -> bool {
        !self.name.is_empty()
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        tidings_log::cells::valid_cell_name(&self.name).map_err(|e| format!("cell.name: {e}"))?;
        for p in &self.peers {
            tidings_log::cells::valid_cell_name(&p.name).map_err(|e| format!("cell.peers: {e}"))?;
            if p.name == self.name {
                return Err(format!("cell.peers names this cell ({}) itself", p.name));
            }
        }
        if self.sync_timeout_ms == 0 {
            return Err("cell.sync_timeout_ms must be above 0".into());
        }
        Ok(())
    }

    /// The log's part of it.
    pub fn log_config(&self) -> Option<tidings_log::cells::CellConfig> {
        self.enabled().then(|| tidings_log::cells::CellConfig {
            name: self.name.clone(),
            sync_timeout: Duration::from_millis(self.sync_timeout_ms),
        })
    }

    /// Each cell's client URL, this one's included: where `wrong_cell` sends a client.
    pub fn urls(&self) -> std::collections::HashMap<String, String> {
        let mut urls: std::collections::HashMap<String, String> = self
            .peers
            .iter()
            .map(|p| (p.name.clone(), p.url.clone()))
            .collect();
        if self.enabled() {
            urls.insert(self.name.clone(), self.url.clone());
        }
        urls
    }

    /// Whether `cell` is this cell or one of its peers.
    pub fn knows(&self, cell: &str) -> bool {
        cell == self.name || self.peers.iter().any(|p| p.name == cell)
    }
}
