//! Cells on loopback for the cell tests: each with its own nats-server (accounts `APP` for
//! tidings, `CELL` for the link, its own JetStream domain), `tidings serve`, data directory
//! and archive. The first cell's nats-server is the leaf-node hub the others join, in the
//! `CELL` account only.

use std::path::{Path, PathBuf};

use tidings_server::bench_cells::{Leaf, loopback_nats_conf};

use super::{Nats, Sandbox, Server, free_port};

/// One cell: its sandbox (data, keys), nats-server and, while running, `tidings serve`.
pub struct Cell {
    pub name: String,
    pub sandbox: Sandbox,
    pub nats: Nats,
    pub server: Option<Server>,
    pub gateway_port: u16,
    env: Vec<(String, String)>,
    _conf: tempfile::TempDir,
}

impl Cell {
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/ws", self.gateway_port)
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("the cell's server is running")
    }

    /// Starts `tidings serve --role all` for the cell.
    pub fn start(&mut self) {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.server = Some(Server::start(&self.sandbox, &self.nats, "all", &env));
    }

    /// A `tidings serve --role gateway` of the cell beside its `--role all` process, on a
    /// port of its own (it reaches the log over NATS).
    pub fn start_gateway(&self) -> Server {
        let mut env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        env.push(("TIDINGS_GATEWAY_LISTEN", "127.0.0.1:0"));
        Server::start(&self.sandbox, &self.nats, "gateway", &env)
    }

    /// SIGKILLs the cell's tidings process and its nats-server: the cell is gone.
    pub fn kill(&mut self) {
        self.server = None;
        self.nats.kill();
    }

    /// An admin-role token of `tenant` (the cells share their token keys).
    pub fn admin_token(&self, tenant: &str) -> String {
        self.sandbox
            .token_with_roles(tenant, "ops", &["admin"], 3600)
    }

    /// `tidings cell ARGS --server <admin> --token <admin token of tenant>`: its JSON answer.
    pub fn cell_cli(&self, tenant: &str, args: &[&str]) -> std::process::Output {
        let admin = format!("http://127.0.0.1:{}", self.server().admin_port);
        let token = self.admin_token(tenant);
        let mut all = vec!["cell"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--tenant", tenant, "--server", &admin, "--token", &token]);
        self.sandbox.run(&all)
    }
}

/// Writes cell `name`'s nats-server config into `dir` (port and store come from the
/// command line [`Nats`] runs).
fn nats_conf(dir: &Path, name: &str, leaf: Leaf) -> PathBuf {
    let path = dir.join(format!("nats-{name}.conf"));
    std::fs::write(&path, loopback_nats_conf(name, leaf, None, None)).expect("write nats config");
    path
}

/// Cells named `names` (the first the leaf hub), configured as each other's peers, sharing
/// token keys and the link key; not started yet (see [`Cell::start`]). `extra` is added to
/// every cell's environment.
pub fn cells(names: &[&str], extra: &[(&str, &str)]) -> Vec<Cell> {
    let leaf_port = free_port();
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let first = Sandbox::new();
    let link_key = first.path().join("cell-link.key");
    let out = first.run(&[
        "keys",
        "init",
        "--key-file",
        link_key.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "keys init: {}", super::stderr(&out));
    let mut first = Some(first);
    let mut cells = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let sandbox = first.take().unwrap_or_else(Sandbox::new);
        if i > 0 {
            // One deployment's token keys: a client's token is good in every cell.
            let secret = cells
                .first()
                .map(|c: &Cell| c.sandbox.path().join("tidings-jwt.secret"))
                .expect("first cell");
            std::fs::copy(secret, sandbox.path().join("tidings-jwt.secret")).expect("copy secret");
        }
        let conf = tempfile::tempdir().expect("tempdir");
        let leaf = if i == 0 {
            Leaf::Hub(leaf_port)
        } else {
            Leaf::Spoke(leaf_port)
        };
        let nats = Nats::start_with(Some(&nats_conf(conf.path(), name, leaf)), "nats");
        let peers: Vec<String> = names
            .iter()
            .zip(&ports)
            .filter(|(n, _)| *n != name)
            .map(|(n, p)| format!("{n}=ws://127.0.0.1:{p}/v1/ws"))
            .collect();
        let env = vec![
            ("TIDINGS_CELL_NAME".to_string(), name.to_string()),
            (
                "TIDINGS_CELL_URL".into(),
                format!("ws://127.0.0.1:{}/v1/ws", ports[i]),
            ),
            (
                "TIDINGS_CELL_LINK_KEY_FILE".into(),
                link_key.display().to_string(),
            ),
            (
                "TIDINGS_CELL_NATS_URL".into(),
                format!("nats://127.0.0.1:{}", nats.port),
            ),
            ("TIDINGS_CELL_NATS_USER".into(), "cell".into()),
            ("TIDINGS_CELL_NATS_PASSWORD".into(), "cell".into()),
            ("TIDINGS_CELL_PEERS".into(), peers.join(",")),
            (
                "TIDINGS_GATEWAY_LISTEN".into(),
                format!("127.0.0.1:{}", ports[i]),
            ),
        ]
        .into_iter()
        .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
        cells.push(Cell {
            name: name.to_string(),
            sandbox,
            nats,
            server: None,
            gateway_port: ports[i],
            env,
            _conf: conf,
        });
    }
    cells
}
