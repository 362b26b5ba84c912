//! Cells (issue 15; docs/decisions/cells.md): the `[cell]` settings and the link between
//! cells, over NATS.
//!
//! Each cell's nats-server has an account of its own for the link (`CELL` in
//! `ops/nats/cell-*.conf`), joined to the other cells' by a leaf-node connection, each server
//! with its own JetStream domain. Nothing of the application's account crosses: only what
//! this module publishes in the link account does.
//!
//! - **Replication** (`Link::relay`, `Link::applier`): the relay reads the outbox rows
//!   the sequencer wrote with each commit of a replicated tenant and publishes each to its DR
//!   cell's stream `TIDINGS_CELL_IN` (subject `tidings.cell.<dr>.in.<source>.<partition>`,
//!   `Nats-Msg-Id` the row's position), deleting the row once that stream acknowledged it;
//!   the DR cell's applier pulls the stream in order and applies each batch through its own
//!   sequencer (once: the `ri/` mark). The tenant's data keys travel sealed under the
//!   pair's link key.
//! - **The directory** (`Link::directory`): changes are published on
//!   `tidings.cell.dir.changed`; each cell answers `tidings.cell.<name>.dir` with its whole
//!   directory and asks every peer for theirs at start (and until it has), keeping the
//!   highest version of each placement. A tenant with a DR cell is served only once its home
//!   has compared directories with that cell since it started.
//! - **Moves** ([`Link::failover`]): planned (the home drains the tenant, the DR cell applies
//!   everything, then flips the placement) or not (the home is gone: the DR cell applies what
//!   reached it and flips; what the old home acknowledged and the new home's mark does not
//!   cover is kept there as lost when it comes back, for `tidings cell lost`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull};
use futures_util::StreamExt;
use prost::Message;
use serde_json::{Value, json};
use tidings_archive::compliance::{Actor, Compliance, Via};
use tidings_log::cells::{Cells, MARK_MAC, OUTBOX_PAGE, PLACEMENT_MAC, mark_signed_bytes};
use tidings_log::crypto::LinkKey;
use tidings_log::{Log, LogError, TenantId};

pub use crate::config::cells::{CellsConfig, Peer};
use tidings_schemas::storage::{CellPlacement, LinkedKey, ReplicaBatch, SealedEvent};
use tracing::{error, info, warn};

/// The stream a cell's replicas arrive in (in the link account, in its own JetStream domain).
pub const STREAM: &str = "TIDINGS_CELL_IN";
const CONSUMER: &str = "applier";
/// Where placement changes are announced to every cell.
const DIR_CHANGED: &str = "tidings.cell.dir.changed";
/// How long the relay waits for a DR cell's stream to acknowledge one batch.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an old home waits for the cell that took a tenant over to say its mark.
const MARK_WAIT: Duration = Duration::from_secs(2);
/// Bytes of the nonce an old home puts in each question for a mark.
const MARK_NONCE: usize = 16;
/// Between rounds of asking peers for their directory, until each has answered.
const DIRECTORY_RETRY: Duration = Duration::from_secs(2);
/// How long a planned move waits for the home to drain, and a move for the applier to
/// catch up.
const MOVE_WAIT: Duration = Duration::from_secs(60);
/// Directory entries in one answer to a peer (each about 200 bytes of JSON: a page stays far
/// below NATS's 1 MiB message limit).
const DIRECTORY_PAGE: usize = 1000;
/// Most heads and lost events a report lists.
const REPORT_LIMIT: usize = 10_000;
/// Replicas pulled from the stream at a time (applied one by one, in order).
const APPLY_PULL: usize = 64;

/// What a cell operation failed with: the caller's mistake, or the world's.
#[derive(Debug, thiserror::Error)]
pub enum CellError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// What one pass of the relay did.
#[derive(Default)]
struct Pass {
    /// Rows handed over, deleted at the end of the pass.
    done: Vec<Vec<u8>>,
    /// Commit time of the oldest row still waiting.
    oldest_waiting: Option<i64>,
    /// A partition may hold more rows now.
    more: bool,
    /// A partition's DR cell took none of its rows.
    stalled: bool,
}

/// The link's long-lived tasks, each supervised on its own.
#[derive(Clone, Copy, Debug)]
pub enum Task {
    Relay,
    Applier,
    Directory,
}

impl Task {
    pub const ALL: [Task; 3] = [Task::Relay, Task::Applier, Task::Directory];

    pub fn name(self) -> &'static str {
        match self {
            Task::Relay => "cell relay",
            Task::Applier => "cell applier",
            Task::Directory => "cell directory",
        }
    }
}

/// The link: this cell's end of replication, the directory and moves.
pub struct Link {
    log: Log,
    cells: Arc<Cells>,
    nats: async_nats::Client,
    js: jetstream::Context,
    key: LinkKey,
    cfg: CellsConfig,
    /// Audit log and holds, for a shred that comes from another cell.
    compliance: Compliance,
}

impl Link {
    /// Connects to the link account and reads the link key.
    pub async fn connect(cfg: &CellsConfig, log: Log) -> anyhow::Result<Arc<Link>> {
        let cells = log
            .cells()
            .cloned()
            .context("cells are on in the config but not in the log")?;
        let key = LinkKey::from_file(&cfg.link_key_file).map_err(anyhow::Error::msg)?;
        let opts = cfg.nats.connect()?;
        let (nats, _bus) =
            tidings_log_api::nats::connect_nats(&opts, &format!("tidings-cell-{}", cfg.name))
                .await
                .context("connect to the cell link's NATS account ([cell.nats])")?;
        let js = jetstream::new(nats.clone());
        js.get_or_create_stream(jetstream::stream::Config {
            name: STREAM.into(),
            subjects: vec![format!("tidings.cell.{}.in.>", cfg.name)],
            storage: jetstream::stream::StorageType::File,
            max_bytes: cfg.stream_max_bytes,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!(e).context("make the incoming replica stream"))?;
        let compliance = Compliance::new(
            log.store().clone(),
            log.keyring().clone(),
            None,
            Arc::new(tokio::sync::RwLock::new(())),
        );
        Ok(Arc::new(Link {
            compliance,
            log,
            cells,
            nats,
            js,
            key,
            cfg: cfg.clone(),
        }))
    }

    fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Runs one of the link's tasks until it fails (its supervisor restarts it).
    pub async fn run(self: Arc<Self>, task: Task) -> anyhow::Result<()> {
        match task {
            Task::Relay => self.relay().await,
            Task::Applier => self.applier().await,
            Task::Directory => self.directory().await,
        }
    }

    /// Hands outbox rows to their DR cells, oldest first per partition, until stopped. The
    /// rows a pass handed over are deleted together at its end (one commit, off the path of
    /// the next synchronous send); a row handed over twice after a crash is dropped by the
    /// stream's duplicate window or the DR cell's mark.
    async fn relay(self: Arc<Self>) -> anyhow::Result<()> {
        loop {
            let mut pass = Pass::default();
            let mut from = Vec::new();
            // Page after page to the end of the outbox, skipping past the rest of a
            // partition whose DR cell does not take its rows (a long backlog of one stalled
            // partition is then one read a pass, not a wall in front of the others).
            while let Some(next) = self.relay_page(from, &mut pass).await? {
                from = next;
                // A long backlog is deleted page by page: memory stays one page's keys.
                if pass.done.len() >= OUTBOX_PAGE {
                    self.log
                        .outbox_remove(std::mem::take(&mut pass.done))
                        .await?;
                }
            }
            self.log
                .outbox_remove(std::mem::take(&mut pass.done))
                .await?;
            let age_ms = pass
                .oldest_waiting
                .map_or(0, |t| (tidings_log::now_ms() - t).max(0));
            crate::metrics::CELL_OUTBOX_AGE_MS
                .store(age_ms as u64, std::sync::atomic::Ordering::Relaxed);
            if pass.more {
                continue;
            }
            // A DR cell that does not take its rows is tried again a little later.
            let idle = if pass.stalled {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                () = self.cells.outbox_written.notified() => {}
                () = tokio::time::sleep(idle) => {}
            }
        }
    }

    /// One page of the outbox (one read, every partition), each owned partition's rows
    /// handed over in order as far as its DR cells take them: a row that is not taken holds
    /// back the rest of its partition, not the others.
    /// Returns where the next page starts, `None` at the end of the outbox.
    async fn relay_page(&self, from: Vec<u8>, pass: &mut Pass) -> anyhow::Result<Option<Vec<u8>>> {
        let rows = self.log.outbox_page_from(from, OUTBOX_PAGE).await?;
        let full = rows.len() == OUTBOX_PAGE;
        let next = rows
            .last()
            .map(|(row, batch)| (row.clone(), batch.partition));
        let owned: std::collections::HashSet<u32> =
            self.log.owned_partitions().into_iter().collect();
        let mut held_back: std::collections::HashSet<u32> = std::collections::HashSet::new();
        // The marks of cells that took tenants over, asked once a page.
        let mut marks: std::collections::HashMap<
            (String, u32),
            Option<tidings_log::cells::Position>,
        > = std::collections::HashMap::new();
        let mut waiting_since = None;
        let mut handed = 0;
        for (row, mut batch) in rows {
            let p = batch.partition;
            if !owned.contains(&p) || held_back.contains(&p) {
                continue;
            }
            let tenant = TenantId::new(&batch.tenant)?;
            let placement = self.cells.placement(&tenant);
            if let Some(home) = placement
                .as_ref()
                .map(|pl| &pl.home)
                .filter(|home| *home != self.name())
            {
                // The tenant moved home while this waited: its DR cell went on without it.
                // Unless the row reached that cell before this one went down (a row is
                // deleted only after its pass): the new home's mark says which.
                let mark = match marks.get(&(home.clone(), p)) {
                    Some(mark) => *mark,
                    None => match self.applied_at(home, p).await {
                        Ok(mark) => *marks.entry((home.clone(), p)).or_insert(mark),
                        Err(e) => {
                            info!(%tenant, error = %e, "cannot tell yet whether the cell that took the tenant over has these events; asking again");
                            waiting_since = waiting_since.or(Some(batch.time_ms));
                            held_back.insert(p);
                            continue;
                        }
                    },
                };
                if mark.is_some_and(|m| (batch.epoch, batch.n) <= m) {
                    let events = batch
                        .writes
                        .iter()
                        .filter(|w| tidings_log::keys::event_ids(&w.key).is_some())
                        .count();
                    crate::metrics::CELL_ARRIVED.add(events as u64);
                    pass.done.push(row);
                    handed += 1;
                    continue;
                }
                let kept = self.log.outbox_keep_lost(row, &batch).await?;
                warn!(%tenant, kept, "events acknowledged here never reached the cell that took over; kept as lost (`tidings cell lost`)");
                crate::metrics::CELL_LOST.add(kept as u64);
                handed += 1;
                continue;
            }
            // Not before the DR cell has compared directories with us since we started: it
            // may have taken the tenant over meanwhile.
            if !self.cells.is_confirmed(&batch.dr) {
                waiting_since = waiting_since.or(Some(batch.time_ms));
                held_back.insert(p);
                continue;
            }
            batch.keys = self.linked_keys(&tenant, &batch).await?;
            batch.mac = Vec::new();
            batch.mac = self
                .key
                .mac(tidings_log::cells::BATCH_MAC, &batch.encode_to_vec());
            let position = (batch.epoch, batch.n);
            let mut headers = async_nats::HeaderMap::new();
            let id = format!("{}/{}/{}/{}", batch.source, p, batch.epoch, batch.n);
            headers.insert("Nats-Msg-Id", id.as_str());
            let subject = format!("tidings.cell.{}.in.{}.{}", batch.dr, batch.source, p);
            let published = async {
                self.js
                    .publish_with_headers(subject, headers, batch.encode_to_vec().into())
                    .await?
                    .await
            };
            match tokio::time::timeout(PUBLISH_TIMEOUT, published).await {
                Ok(Ok(_)) => {
                    self.cells.acknowledge(p, position);
                    pass.done.push(row);
                    handed += 1;
                    crate::metrics::CELL_REPLICATED.inc();
                }
                Ok(Err(e)) => {
                    waiting_since = waiting_since.or(Some(batch.time_ms));
                    held_back.insert(p);
                    crate::metrics::CELL_PUBLISH_FAILURES.inc();
                    info!(dr = %batch.dr, error = %e, "the DR cell did not take a replica; trying again");
                }
                Err(_) => {
                    waiting_since = waiting_since.or(Some(batch.time_ms));
                    held_back.insert(p);
                    crate::metrics::CELL_PUBLISH_FAILURES.inc();
                    info!(dr = %batch.dr, "the DR cell did not acknowledge a replica in time; trying again");
                }
            }
        }
        if let Some(t) = waiting_since {
            pass.oldest_waiting = Some(pass.oldest_waiting.map_or(t, |o: i64| o.min(t)));
            pass.stalled |= handed == 0;
        }
        pass.more |= full && handed > 0;
        Ok(match next {
            Some(_) if !full => None,
            // Past the rest of a partition held back, else just past the last row.
            Some((_, p)) if held_back.contains(&p) => {
                p.checked_add(1).map(tidings_log::keys::outbox_dir)
            }
            Some((mut row, _)) => {
                row.push(0);
                Some(row)
            }
            None => None,
        })
    }

    /// The data keys the batch's events are sealed with, sealed for the DR cell.
    async fn linked_keys(
        &self,
        tenant: &TenantId,
        batch: &ReplicaBatch,
    ) -> Result<Vec<LinkedKey>, LogError> {
        let mut ids: Vec<u32> = batch
            .writes
            .iter()
            .filter(|w| w.key.starts_with(b"ev\0"))
            .filter_map(|w| SealedEvent::decode(w.value.as_deref()?).ok())
            .map(|s| s.key_id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut keys = Vec::with_capacity(ids.len());
        for key_id in ids {
            let sealed = self
                .log
                .keyring()
                .export_linked(tenant, key_id, &self.key)
                .await?;
            keys.push(LinkedKey { key_id, sealed });
        }
        Ok(keys)
    }

    /// Applies the replicas that arrive, in order, each once, until stopped. Only a log that
    /// owns every partition applies (it applies through its own sequencer, and two appliers
    /// sharing the consumer could apply one partition's batches out of order): a cell runs
    /// one log writer; several per cell are not built.
    async fn applier(self: Arc<Self>) -> anyhow::Result<()> {
        let mut warned = false;
        while self.log.owned_partitions().len() as u32 != self.log.config().partitions {
            if !warned {
                warn!(
                    "this log does not own every partition: it applies no replicas (one log writer per cell)"
                );
                warned = true;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let stream = self
            .js
            .get_stream(STREAM)
            .await
            .map_err(|e| anyhow::anyhow!(e).context("find the incoming replica stream"))?;
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.into()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(60),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!(e).context("make the replica applier's consumer"))?;
        loop {
            let mut batch = consumer
                .batch()
                .max_messages(APPLY_PULL)
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .map_err(|e| anyhow::anyhow!(e).context("pull replicas"))?;
            while let Some(msg) = batch.next().await {
                let msg = msg.map_err(|e| anyhow::anyhow!(e).context("pull a replica"))?;
                self.apply_one(&msg.payload).await;
                msg.ack()
                    .await
                    .map_err(|e| anyhow::anyhow!(e).context("ack a replica"))?;
            }
        }
    }

    /// Applies one replica, retrying what may succeed later (in place, so order holds);
    /// one that never can (not this cell's to apply, undecodable) is counted and skipped.
    async fn apply_one(&self, payload: &[u8]) {
        let batch = match ReplicaBatch::decode(payload) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "an undecodable replica; skipped");
                crate::metrics::CELL_REFUSED.inc();
                return;
            }
        };
        let lag = tidings_log::now_ms() - batch.time_ms;
        let mut wait = Duration::from_millis(50);
        let started = Instant::now();
        loop {
            match self.log.apply_replica(batch.clone(), &self.key).await {
                Ok(applied) => {
                    if applied {
                        crate::metrics::CELL_APPLIED.inc();
                        crate::metrics::CELL_LAG_SECONDS.observe(lag.max(0) as f64 / 1000.0);
                    }
                    return;
                }
                Err(e) if e.is_retryable() => {
                    info!(error = %e, "a replica could not be applied yet; trying again");
                    let behind = TenantId::new(&batch.tenant)
                        .is_ok_and(|t| self.cells.behind(&t, batch.placement_version));
                    if behind {
                        // A placement no peer ever announces (a forged version) must not
                        // hold every later replica back.
                        if started.elapsed() > MOVE_WAIT {
                            warn!(source = %batch.source, tenant = %batch.tenant, "a replica names a placement version this cell never learned; skipped");
                            crate::metrics::CELL_REFUSED.inc();
                            return;
                        }
                        self.ask_directory(&batch.source).await;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    warn!(source = %batch.source, tenant = %batch.tenant, code = e.code(), error = %e, "a replica refused; skipped");
                    crate::metrics::CELL_REFUSED.inc();
                    return;
                }
            }
        }
    }

    /// Unapplied replicas in the stream (pending plus handed out, not yet acknowledged).
    async fn unapplied(&self) -> anyhow::Result<u64> {
        let stream = self
            .js
            .get_stream(STREAM)
            .await
            .map_err(|e| anyhow::anyhow!(e).context("find the incoming replica stream"))?;
        let mut consumer: jetstream::consumer::PullConsumer =
            stream
                .get_consumer(CONSUMER)
                .await
                .map_err(|e| anyhow::anyhow!(e).context("find the applier's consumer"))?;
        let info = consumer
            .info()
            .await
            .map_err(|e| anyhow::anyhow!(e).context("ask the applier's consumer"))?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }

    /// Answers peers' directory and drain requests, merges announced changes, and asks each
    /// peer for its directory until it has answered once.
    async fn directory(self: Arc<Self>) -> anyhow::Result<()> {
        let mut asked = self
            .nats
            .subscribe(format!("tidings.cell.{}.dir", self.name()))
            .await?;
        let mut drains = self
            .nats
            .subscribe(format!("tidings.cell.{}.drain", self.name()))
            .await?;
        let mut marks = self
            .nats
            .subscribe(format!("tidings.cell.{}.mark", self.name()))
            .await?;
        let mut changes = self.nats.subscribe(DIR_CHANGED).await?;
        let mut retry = tokio::time::interval(DIRECTORY_RETRY);
        loop {
            tokio::select! {
                Some(msg) = marks.next() => {
                    let answer = self.mark(&msg.payload).await;
                    self.answer(msg.reply, answer).await?;
                }
                Some(msg) = asked.next() => {
                    let page = self.directory_page(&msg.payload);
                    self.answer(msg.reply, Ok(page)).await?;
                }
                Some(msg) = drains.next() => {
                    let answer = self.drain(&msg.payload).await;
                    self.answer(msg.reply, answer).await?;
                }
                Some(msg) = changes.next() => {
                    // What a peer sends never takes this task down: a bad message is
                    // skipped; a change the store could not take comes again when the
                    // directories are next compared.
                    if let Err(e) = self.merge(&msg.payload).await {
                        warn!(error = %e, "a directory change was not merged");
                    }
                }
                _ = retry.tick() => {
                    for peer in &self.cfg.peers {
                        if !self.cells.is_confirmed(&peer.name) {
                            self.ask_directory(&peer.name).await;
                        }
                    }
                }
            }
        }
    }

    /// Answers a peer's request on `reply` (if it gave one): the value, or `{"error": ...}`.
    async fn answer(
        &self,
        reply: Option<async_nats::Subject>,
        answer: Result<Value, CellError>,
    ) -> anyhow::Result<()> {
        let Some(reply) = reply else {
            return Ok(());
        };
        let body = answer.unwrap_or_else(|e| json!({"error": e.to_string()}));
        self.nats.publish(reply, body.to_string().into()).await?;
        Ok(())
    }

    /// One page of this cell's directory for a peer that asked (`{"after": tenant}`): at
    /// most [`DIRECTORY_PAGE`] entries, so a page fits in one NATS message.
    fn directory_page(&self, asked: &[u8]) -> Value {
        let after: Value = serde_json::from_slice(asked).unwrap_or_default();
        let after = after["after"].as_str().unwrap_or("");
        let entries: Vec<(TenantId, CellPlacement)> = self
            .cells
            .directory()
            .into_iter()
            .filter(|(t, _)| t.as_str() > after)
            .take(DIRECTORY_PAGE + 1)
            .collect();
        let more = entries.len() > DIRECTORY_PAGE;
        let page = &entries[..entries.len().min(DIRECTORY_PAGE)];
        json!({"entries": self.signed(page), "more": more})
    }

    /// Merges a peer's whole directory, page by page; confirms the peer once it has.
    async fn ask_directory(&self, peer: &str) {
        let mut after = String::new();
        loop {
            let asked = self.nats.request(
                format!("tidings.cell.{peer}.dir"),
                json!({"after": after}).to_string().into(),
            );
            let page: Value = match tokio::time::timeout(Duration::from_secs(2), asked).await {
                Ok(Ok(reply)) => serde_json::from_slice(&reply.payload).unwrap_or_default(),
                _ => {
                    info!(peer, "the peer cell does not answer for its directory yet");
                    return;
                }
            };
            let entries = page["entries"].to_string();
            if let Err(e) = self.merge(entries.as_bytes()).await {
                warn!(peer, error = %e, "a peer's directory could not be merged");
                return;
            }
            let last = page["entries"]
                .as_array()
                .and_then(|e| e.last())
                .and_then(|e| e["tenant"].as_str())
                .map(str::to_string);
            match (page["more"].as_bool(), last) {
                (Some(true), Some(last)) if last > after => after = last,
                _ => break,
            }
        }
        self.cells.confirm(peer);
        info!(peer, "directory compared with the peer cell");
    }

    /// Placements as the link carries them: each encoded, with its MAC under the link key
    /// (bound to the tenant), so only a cell holding the key can change a directory.
    fn signed(&self, entries: &[(TenantId, CellPlacement)]) -> Value {
        Value::Array(
            entries
                .iter()
                .map(|(t, p)| {
                    let bytes = p.encode_to_vec();
                    let mac = self
                        .key
                        .mac(PLACEMENT_MAC, &placement_signed_bytes(t, &bytes));
                    json!({
                        "tenant": t.as_str(),
                        "placement": tidings_log::crypto::hex_encode(&bytes),
                        "mac": tidings_log::crypto::hex_encode(&mac),
                    })
                })
                .collect(),
        )
    }

    /// One signed entry read back; `None` if it does not parse or its MAC is wrong.
    fn verified(&self, v: &Value) -> Option<(TenantId, CellPlacement)> {
        let tenant = TenantId::new(v["tenant"].as_str()?).ok()?;
        let bytes = tidings_log::crypto::hex_decode(v["placement"].as_str()?).ok()?;
        let mac = tidings_log::crypto::hex_decode(v["mac"].as_str()?).ok()?;
        if !self.key.verify(
            PLACEMENT_MAC,
            &placement_signed_bytes(&tenant, &bytes),
            &mac,
        ) {
            return None;
        }
        Some((tenant, CellPlacement::decode(bytes.as_slice()).ok()?))
    }

    /// Merges placements (a JSON list of signed entries): each kept where its version is
    /// newer; an entry that does not verify is skipped and counted.
    async fn merge(&self, payload: &[u8]) -> anyhow::Result<()> {
        let entries: Vec<Value> =
            serde_json::from_slice(payload).context("a directory message is not a JSON list")?;
        for entry in entries {
            let Some((tenant, placement)) = self.verified(&entry) else {
                warn!("a directory entry that does not verify under the link key; skipped");
                crate::metrics::CELL_REFUSED.inc();
                continue;
            };
            if self
                .cells
                .store_placement(&**self.log.store(), &tenant, placement.clone())
                .await?
            {
                info!(%tenant, home = %placement.home, dr = %placement.dr, version = placement.version, "placement changed");
                if placement.shredded {
                    self.shred_copy(&tenant, &placement).await;
                }
            }
        }
        Ok(())
    }

    /// The tenant was shredded in one of its cells: shred the copy here too, as the audit
    /// log records (refused under a legal hold here, like any shred).
    async fn shred_copy(&self, tenant: &TenantId, placement: &CellPlacement) {
        let holds_a_copy = placement.home == self.name() || placement.dr == self.name();
        if !holds_a_copy
            || self
                .log
                .keyring()
                .is_shredded(tenant)
                .await
                .unwrap_or(false)
        {
            return;
        }
        let by = format!("cell {}", placement.changed_by);
        let actor = match Actor::new(&by, Via::Cell) {
            Ok(actor) => actor,
            Err(e) => {
                warn!(%tenant, error = %e, "a shred from another cell names no valid actor");
                return;
            }
        };
        match self.compliance.shred(tenant, &actor).await {
            Ok(report) => {
                warn!(%tenant, keys = ?report.key_ids, "the tenant was shredded in another cell: its copy here is shredded too");
            }
            Err(e) => {
                error!(%tenant, error = %e, "the tenant was shredded in another cell, and its copy here could not be");
            }
        }
    }

    /// `keys shred` of a tenant placed in other cells too: marks the placement (a new
    /// version) so every cell holding a copy shreds it when it learns it. `Ok(false)`: the
    /// tenant has no placement, or none naming another cell.
    pub async fn shredded(&self, tenant: &TenantId, actor: &str) -> Result<bool, CellError> {
        let Some(current) = self.cells.placement(tenant) else {
            return Ok(false);
        };
        let elsewhere = current.home != self.name() || !current.dr.is_empty();
        if !elsewhere || current.shredded {
            return Ok(elsewhere);
        }
        let placement = CellPlacement {
            shredded: true,
            version: current.version + 1,
            changed_ms: tidings_log::now_ms(),
            changed_by: format!("{} in {}", actor, self.name()),
            ..current
        };
        self.publish_placement(tenant, placement).await?;
        Ok(true)
    }

    /// Stores and announces a new placement.
    async fn publish_placement(
        &self,
        tenant: &TenantId,
        placement: CellPlacement,
    ) -> Result<(), CellError> {
        if !self
            .cells
            .store_placement(&**self.log.store(), tenant, placement.clone())
            .await?
        {
            return Err(CellError::Unavailable(
                "the placement changed meanwhile; try again".into(),
            ));
        }
        let body = self.signed(&[(tenant.clone(), placement)]);
        if let Err(e) = self
            .nats
            .publish(DIR_CHANGED, body.to_string().into())
            .await
        {
            // Peers compare directories again when they start; a change is not lost.
            warn!(error = %e, "could not announce a placement change");
        }
        Ok(())
    }

    /// `tidings cell place`: sets where a tenant lives (a new version).
    pub async fn place(
        &self,
        tenant: &TenantId,
        home: &str,
        dr: &str,
        tier: &str,
        sync: bool,
        actor: &str,
    ) -> Result<CellPlacement, CellError> {
        for cell in [home].into_iter().chain((!dr.is_empty()).then_some(dr)) {
            if !self.cfg.knows(cell) {
                return Err(CellError::Invalid(format!(
                    "no cell named {cell:?} is configured"
                )));
            }
        }
        if dr == home {
            return Err(CellError::Invalid(
                "the DR cell must differ from the home cell".into(),
            ));
        }
        if sync && dr.is_empty() {
            return Err(CellError::Invalid(
                "synchronous replication needs a DR cell".into(),
            ));
        }
        if !matches!(tier, "vip" | "standard") {
            return Err(CellError::Invalid("tier must be vip or standard".into()));
        }
        if home != self.name() {
            return Err(CellError::Invalid(format!(
                "place a tenant on its home cell ({home}): it checks what it holds of the tenant"
            )));
        }
        let current = self.cells.placement(tenant);
        if let Some(c) = &current
            && c.home != home
        {
            return Err(CellError::Invalid(format!(
                "the tenant's home is {}; move it with `tidings cell failover`, not place",
                c.home
            )));
        }
        let new_dr = !dr.is_empty() && current.as_ref().is_none_or(|c| c.dr != dr);
        if new_dr && !self.log.tenant_heads(tenant, 1).await?.is_empty() {
            // Only commits from now on would reach the new DR cell, which would then hold
            // conversations with holes: refused until history can be copied first.
            return Err(CellError::Invalid(
                "the tenant already has conversations here, and copying its history to a new \
                 DR cell is not built yet; a DR cell is set before the tenant's first message"
                    .into(),
            ));
        }
        let placement = CellPlacement {
            home: home.into(),
            dr: dr.into(),
            tier: tier.into(),
            sync,
            version: current.as_ref().map_or(1, |c| c.version + 1),
            changed_ms: tidings_log::now_ms(),
            changed_by: actor.into(),
            draining: false,
            // A shred is for good: placing the tenant again does not undo it anywhere.
            shredded: current.is_some_and(|c| c.shredded),
        };
        self.publish_placement(tenant, placement.clone()).await?;
        Ok(placement)
    }

    /// Answers a peer asking through which position this cell applied its replicas of one
    /// partition (`{"source": cell, "partition": p, "nonce": hex}`):
    /// `{"applied_through": [epoch, n] or null, "mac": hex}`, the MAC under the link key
    /// ([`tidings_log::cells::mark_signed_bytes`]).
    async fn mark(&self, payload: &[u8]) -> Result<Value, CellError> {
        let asked: Value = serde_json::from_slice(payload)
            .map_err(|_| CellError::Invalid("a mark request is not JSON".into()))?;
        let source = asked["source"].as_str().unwrap_or_default();
        tidings_log::cells::valid_cell_name(source).map_err(CellError::Invalid)?;
        let partition = asked["partition"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| CellError::Invalid("a mark request names no partition".into()))?;
        let nonce = tidings_log::crypto::hex_decode(asked["nonce"].as_str().unwrap_or_default())
            .ok()
            .filter(|n| n.len() == MARK_NONCE)
            .ok_or_else(|| CellError::Invalid("a mark request has no nonce".into()))?;
        let at = self.log.replica_applied_through(source, partition).await?;
        let signed = mark_signed_bytes(self.name(), source, partition, at, &nonce);
        Ok(json!({
            "applied_through": at.map(|(epoch, n)| [epoch, n]),
            "mac": tidings_log::crypto::hex_encode(&self.key.mac(MARK_MAC, &signed)),
        }))
    }

    /// Asks `cell` through which position it applied this cell's replicas of `partition`
    /// (see [`Link::mark`]). An answer without a valid MAC for this question is an error:
    /// someone on the link account without the key can delay the old home's verdict, never
    /// make it drop what is lost.
    async fn applied_at(
        &self,
        cell: &str,
        partition: u32,
    ) -> anyhow::Result<Option<tidings_log::cells::Position>> {
        let mut nonce = [0u8; MARK_NONCE];
        getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
        let asked = self.nats.request(
            format!("tidings.cell.{cell}.mark"),
            json!({
                "source": self.name(),
                "partition": partition,
                "nonce": tidings_log::crypto::hex_encode(&nonce),
            })
            .to_string()
            .into(),
        );
        let reply = tokio::time::timeout(MARK_WAIT, asked)
            .await
            .with_context(|| format!("cell {cell} did not answer for its mark in time"))?
            .with_context(|| format!("ask cell {cell} for its mark"))?;
        let answer: Value = serde_json::from_slice(&reply.payload)
            .with_context(|| format!("cell {cell} answered its mark with something not JSON"))?;
        if let Some(e) = answer["error"].as_str() {
            anyhow::bail!("cell {cell} could not say its mark: {e}");
        }
        let at = match &answer["applied_through"] {
            Value::Null => None,
            at => {
                let n = |i: usize| at[i].as_u64().context("a mark is two numbers");
                Some((n(0)?, n(1)?))
            }
        };
        let mac = tidings_log::crypto::hex_decode(answer["mac"].as_str().unwrap_or_default())
            .map_err(|e| anyhow::anyhow!("cell {cell}'s mark has no MAC: {e}"))?;
        let signed = mark_signed_bytes(cell, self.name(), partition, at, &nonce);
        anyhow::ensure!(
            self.key.verify(MARK_MAC, &signed, &mac),
            "an answer for cell {cell}'s mark does not carry the link key's MAC; not believed"
        );
        Ok(at)
    }

    /// Asked by the tenant's DR cell before a planned move: stop taking the tenant's writes
    /// (draining), let every commit already made reach the DR cell, answer when none waits.
    async fn drain(&self, payload: &[u8]) -> Result<Value, CellError> {
        let asked: Value = serde_json::from_slice(payload)
            .map_err(|_| CellError::Invalid("a drain request is not JSON".into()))?;
        let tenant = TenantId::new(asked["tenant"].as_str().unwrap_or_default())?;
        let Some(mut placement) = self.cells.placement(&tenant) else {
            return Err(CellError::Invalid(
                "the tenant is not in the directory".into(),
            ));
        };
        if placement.home != self.name() {
            return Err(CellError::Invalid(format!(
                "this cell is not the tenant's home ({} is)",
                placement.home
            )));
        }
        if !placement.draining {
            placement.draining = true;
            placement.version += 1;
            placement.changed_ms = tidings_log::now_ms();
            self.publish_placement(&tenant, placement).await?;
        }
        // Every write admitted before the flag is committed (or refused) after this.
        self.log.barrier().await?;
        let started = Instant::now();
        while self.outbox_holds(&tenant).await? {
            if started.elapsed() > MOVE_WAIT {
                return Err(CellError::Unavailable(
                    "the tenant's outbox did not empty in time".into(),
                ));
            }
            self.cells.outbox_written.notify_one();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(json!({"drained": true}))
    }

    async fn outbox_holds(&self, tenant: &TenantId) -> Result<bool, LogError> {
        for p in self.log.owned_partitions() {
            let rows = self.log.outbox_page(p, OUTBOX_PAGE).await?;
            if rows.iter().any(|(_, b)| b.tenant == tenant.as_str()) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// `tidings cell failover`, run on the tenant's DR cell: makes it the tenant's home. A
    /// planned move drains the home first (nothing lost); an unplanned one does not ask it.
    pub async fn failover(
        &self,
        tenant: &TenantId,
        planned: bool,
        actor: &str,
    ) -> Result<Value, CellError> {
        let started = Instant::now();
        let Some(current) = self.cells.placement(tenant) else {
            return Err(CellError::Invalid(
                "the tenant is not in the directory".into(),
            ));
        };
        if current.dr != self.name() {
            return Err(CellError::Invalid(format!(
                "this cell ({}) is not the tenant's DR cell ({:?})",
                self.name(),
                current.dr
            )));
        }
        let old_home = current.home.clone();
        let drained_at = Instant::now();
        if planned {
            let asked = self.nats.request(
                format!("tidings.cell.{old_home}.drain"),
                json!({"tenant": tenant.as_str()}).to_string().into(),
            );
            let reply = tokio::time::timeout(MOVE_WAIT, asked)
                .await
                .map_err(|_| {
                    CellError::Unavailable(format!("cell {old_home} did not drain in time"))
                })?
                .map_err(|e| {
                    CellError::Unavailable(format!("cell {old_home} cannot be asked to drain: {e}"))
                })?;
            let answer: Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
            if answer["drained"] != json!(true) {
                return Err(CellError::Unavailable(format!(
                    "cell {old_home} did not drain: {}",
                    answer["error"].as_str().unwrap_or("no reason given")
                )));
            }
        }
        // Everything that reached this cell is applied before it takes the tenant.
        let waited = Instant::now();
        loop {
            match self.unapplied().await {
                Ok(0) => break,
                Ok(_) if waited.elapsed() < MOVE_WAIT => {}
                Ok(n) => {
                    return Err(CellError::Unavailable(format!(
                        "{n} replicas are still unapplied; try again"
                    )));
                }
                Err(e) => return Err(CellError::Unavailable(e.to_string())),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The old home serves the tenant again once its drain lease is over: too late now.
        let lease = Duration::from_millis(tidings_log::cells::DRAIN_LEASE_MS as u64 / 2);
        if planned && drained_at.elapsed() > lease {
            return Err(CellError::Unavailable(
                "the move took longer than the drain holds the tenant; try again".into(),
            ));
        }
        let latest = self.cells.placement(tenant).unwrap_or(current);
        let placement = CellPlacement {
            home: self.name().into(),
            dr: old_home.clone(),
            // The old home is gone: a synchronous tenant would wait for it on every send.
            // Replication to it goes on asynchronously once it is back; `tidings cell place
            // --sync` makes it synchronous again.
            sync: latest.sync && planned,
            draining: false,
            version: latest.version + 1,
            changed_ms: tidings_log::now_ms(),
            changed_by: actor.into(),
            ..latest
        };
        // The operator's word stands for the old home, which may be gone.
        self.cells.confirm(&old_home);
        self.publish_placement(tenant, placement.clone()).await?;
        let heads = self.log.tenant_heads(tenant, REPORT_LIMIT).await?;
        let heads: Vec<Value> = heads
            .into_iter()
            .map(|(c, seq)| json!({"conversation": c, "last_seq": seq}))
            .collect();
        Ok(json!({
            "tenant": tenant.as_str(),
            "home": self.name(),
            "dr": old_home,
            "planned": planned,
            "version": placement.version,
            "sync": placement.sync,
            "took_ms": started.elapsed().as_millis() as u64,
            // Unplanned: what the old home acknowledged after these seqs never arrived; it
            // keeps those events as lost when it is back (`tidings cell lost` there).
            "conversations": heads,
        }))
    }

    /// `tidings cell failover --tier`: every tenant of `tier` whose DR cell this is, moved
    /// here one after another (their moves are independent: one that fails does not stop
    /// the others).
    pub async fn failover_tier(
        &self,
        tier: &str,
        planned: bool,
        actor: &str,
    ) -> Vec<(TenantId, Result<Value, CellError>)> {
        let tenants: Vec<TenantId> = self
            .cells
            .directory()
            .into_iter()
            .filter(|(_, p)| p.tier == tier && p.dr == self.name())
            .map(|(t, _)| t)
            .collect();
        let mut outcomes = Vec::with_capacity(tenants.len());
        for tenant in tenants {
            let outcome = self.failover(&tenant, planned, actor).await;
            outcomes.push((tenant, outcome));
        }
        outcomes
    }

    /// `tidings cell lost`: events this cell acknowledged as the tenant's home that never
    /// reached the cell that took over.
    ///
    /// `undecided` counts the tenant's commits still in this cell's outbox while this cell
    /// knows another one is its home (`tidings cell show`): the relay has not yet learned
    /// whether the new home has them (it does not answer for its mark), so the list may
    /// still grow. It is final once that is 0.
    /// The outbox is read a page at a time, at most `REPORT_LIMIT` rows; `undecided_more`
    /// says the count stopped there.
    pub async fn lost(&self, tenant: &TenantId) -> Result<Value, CellError> {
        let lost = self.log.lost_events(tenant, REPORT_LIMIT).await?;
        let moved = self
            .cells
            .placement(tenant)
            .is_some_and(|p| p.home != self.name());
        let (undecided, more) = if moved {
            self.undecided(tenant).await?
        } else {
            (0, false)
        };
        Ok(json!({
            "tenant": tenant.as_str(),
            "lost": lost.iter().map(|l| json!({"conversation": l.conversation, "seq": l.seq})).collect::<Vec<_>>(),
            "undecided": undecided,
            "undecided_more": more,
        }))
    }

    /// The tenant's rows in this cell's outbox, counted a page at a time up to
    /// [`REPORT_LIMIT`] rows read; whether the count stopped there.
    async fn undecided(&self, tenant: &TenantId) -> Result<(usize, bool), CellError> {
        let (mut undecided, mut read) = (0, 0);
        let mut from = Vec::new();
        loop {
            let rows = self.log.outbox_page_from(from, OUTBOX_PAGE).await?;
            read += rows.len();
            undecided += rows
                .iter()
                .filter(|(_, b)| b.tenant == tenant.as_str())
                .count();
            let Some((last, _)) = rows.last() else {
                return Ok((undecided, false));
            };
            if rows.len() < OUTBOX_PAGE {
                return Ok((undecided, false));
            }
            if read >= REPORT_LIMIT {
                return Ok((undecided, true));
            }
            from = last.clone();
            from.push(0);
        }
    }

    /// `tidings cell show`: the tenant's placement here.
    pub fn show(&self, tenant: &TenantId) -> Value {
        match self.cells.placement(tenant) {
            Some(p) => {
                let mut shown = placement_json(tenant, &p);
                // Whether this cell has compared directories with the tenant's DR cell since
                // it started (the home serves a replicated tenant only then).
                shown["dr_confirmed"] = json!(!p.dr.is_empty() && self.cells.is_confirmed(&p.dr));
                shown
            }
            None => json!({"tenant": tenant.as_str(), "placement": null}),
        }
    }
}

fn placement_json(tenant: &TenantId, p: &CellPlacement) -> Value {
    json!({
        "tenant": tenant.as_str(),
        "home": p.home,
        "dr": p.dr,
        "tier": p.tier,
        "sync": p.sync,
        "version": p.version,
        "changed_ms": p.changed_ms,
        "changed_by": p.changed_by,
        "draining": p.draining,
        "shredded": p.shredded,
    })
}

/// What a directory entry's MAC covers: the tenant (length-prefixed) and the encoding.
fn placement_signed_bytes(tenant: &TenantId, placement: &[u8]) -> Vec<u8> {
    let t = tenant.as_str().as_bytes();
    let mut out = Vec::with_capacity(4 + t.len() + placement.len());
    out.extend_from_slice(&(t.len() as u32).to_be_bytes());
    out.extend_from_slice(t);
    out.extend_from_slice(placement);
    out
}
