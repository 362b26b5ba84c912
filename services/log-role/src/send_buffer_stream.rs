//! The send buffer on a JetStream stream: a [`Medium`] that outlives the log writer's
//! machine, for deployments whose writers run on several hosts (TiKV)
//! ([docs/decisions/send-buffer.md](../../../docs/decisions/send-buffer.md)).
//!
//! ```text
//! stream TIDINGS_SEND_BUFFER (file storage, R1 or R3), subjects tidings.sendbuf.>
//! tidings.sendbuf.p00012   partition 12: epoch markers and records, in append order
//! ```
//!
//! Every message carries `Tidings-Epoch` (the lease epoch of its writer); a record larger than
//! the server's `max_payload` is split into parts (`Tidings-Part: i/n`).
//!
//! Fencing uses JetStream's compare-and-set, `Nats-Expected-Last-Subject-Sequence`: a
//! writer appends only on top of the last message it knows of on its partition's subject.
//! Adopting a partition publishes an epoch marker on top of whatever is last there (unless a
//! later epoch's marker is), then loads every record below the marker. So once a new owner
//! has adopted, the old owner's next append finds a message it does not know and is refused.
//! Trimming publishes a marker the same way and purges only what is below it, so records a
//! later owner appended after it are never purged. An append that fails may have landed in
//! part (or whole, with only its ack lost); its seqs are handed out again, so before the
//! next append a marker voids whatever of it landed (`Tidings-Void-Above`).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, stream::LastRawMessageErrorKind};
use tidings_log::send_buffer::{AppendRefused, Medium};
use tracing::warn;

/// The stream's name and its subjects' prefix.
pub const STREAM: &str = "TIDINGS_SEND_BUFFER";
pub const SUBJECT_PREFIX: &str = "tidings.sendbuf";

const EPOCH: &str = "Tidings-Epoch";
const PART: &str = "Tidings-Part";
/// On a marker: every record above this stream seq, up to the marker, is void (an append
/// that failed after some of its messages landed).
const VOID: &str = "Tidings-Void-Above";
/// Room left in a message for its headers when a record is split to fit `max_payload`.
const HEADER_ROOM: usize = 1024;
/// Most compare-and-set rounds an adoption tries against appends racing it.
const ADOPT_ATTEMPTS: usize = 16;

/// How the stream is made.
#[derive(Clone, Debug)]
pub struct StreamBufferConfig {
    /// Copies JetStream keeps: 3 in a cluster (the buffer then survives losing a server), 1
    /// on a single server.
    pub replicas: usize,
    /// The stream's cap, for all writers together; full, appends fail (`unavailable`).
    pub max_bytes: i64,
    /// How long a publish may wait for the stream's ack.
    pub ack_timeout: Duration,
}

/// The JetStream medium (see the module doc).
pub struct StreamBuffer {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    /// Largest record part per message.
    part_bytes: usize,
    /// Per partition adopted: the stream seq of the last message this writer knows is on its
    /// subject (its own marker or append). Absent: not ours to append to.
    known: Mutex<HashMap<u32, u64>>,
    /// Partitions whose last append failed: what of it landed must be voided before the
    /// next one (its seqs will be handed out again).
    unsure: Mutex<HashSet<u32>>,
}

fn subject(partition: u32) -> String {
    format!("{SUBJECT_PREFIX}.p{partition:05}")
}

fn io(what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{what}: {e}"))
}

fn epoch_of(headers: &HeaderMap) -> u64 {
    headers
        .get(EPOCH)
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(0)
}

/// `(i, n)` of a record part; whole records have none.
fn part_of(headers: &HeaderMap) -> Option<(usize, usize)> {
    let (i, n) = headers.get(PART)?.as_str().split_once('/')?;
    Some((i.parse().ok()?, n.parse().ok()?))
}

impl StreamBuffer {
    /// Creates the stream if it is not there (an existing one is kept as it is).
    pub async fn open(
        client: async_nats::Client,
        cfg: StreamBufferConfig,
    ) -> Result<StreamBuffer, async_nats::Error> {
        let max_payload = client.server_info().max_payload;
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.ack_timeout)
            .build(client);
        let stream = js
            .get_or_create_stream(jetstream::stream::Config {
                name: STREAM.to_string(),
                subjects: vec![format!("{SUBJECT_PREFIX}.>")],
                storage: jetstream::stream::StorageType::File,
                num_replicas: cfg.replicas,
                max_bytes: cfg.max_bytes,
                discard: jetstream::stream::DiscardPolicy::New,
                ..Default::default()
            })
            .await?;
        Ok(StreamBuffer {
            js,
            stream,
            part_bytes: max_payload.saturating_sub(HEADER_ROOM).max(HEADER_ROOM),
            known: Mutex::new(HashMap::new()),
            unsure: Mutex::new(HashSet::new()),
        })
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<u32, u64>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_unsure(&self, partition: u32) -> bool {
        let unsure = self.unsure.lock().unwrap_or_else(|p| p.into_inner());
        unsure.contains(&partition)
    }

    fn set_unsure(&self, partition: u32, unsure: bool) {
        let mut set = self.unsure.lock().unwrap_or_else(|p| p.into_inner());
        if unsure {
            set.insert(partition);
        } else {
            set.remove(&partition);
        }
    }

    /// After a failed append: if any of its messages landed (the ack may be what was lost),
    /// a marker on top voids them; `Ok(false)` if a later epoch is on top (fenced).
    async fn settle(&self, partition: u32, epoch: u64) -> std::io::Result<bool> {
        let Some(known) = self.known().get(&partition).copied() else {
            return Ok(false);
        };
        let (last_seq, last_epoch) = self.last(partition).await?.unwrap_or((0, 0));
        if last_seq != known {
            if last_epoch > epoch {
                return Ok(false);
            }
            let mut headers = HeaderMap::new();
            headers.insert(EPOCH, epoch.to_string().as_str());
            headers.insert(VOID, known.to_string().as_str());
            match self
                .publish_on(partition, last_seq, headers, Vec::new())
                .await?
            {
                Some(marker) => {
                    self.known().insert(partition, marker);
                }
                None => return Ok(false),
            }
        }
        self.set_unsure(partition, false);
        Ok(true)
    }

    /// The last message on a partition's subject: (stream seq, its epoch).
    async fn last(&self, partition: u32) -> std::io::Result<Option<(u64, u64)>> {
        match self
            .stream
            .get_last_raw_message_by_subject(&subject(partition))
            .await
        {
            Ok(m) => Ok(Some((m.sequence, epoch_of(&m.headers)))),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(io("read the send buffer stream", e)),
        }
    }

    /// Publishes on top of `after` (0: the subject is empty); the new message's stream seq,
    /// or `None` if another message is on top now.
    async fn publish_on(
        &self,
        partition: u32,
        after: u64,
        headers: HeaderMap,
        payload: Vec<u8>,
    ) -> std::io::Result<Option<u64>> {
        let message = jetstream::message::PublishMessage::build()
            .headers(headers)
            .payload(payload.into())
            .expected_last_subject_sequence(after);
        let sent = match self.js.send_publish(subject(partition), message).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(e) => Err(io("write the send buffer stream", e)),
        }
    }

    async fn marker(&self, partition: u32, epoch: u64, after: u64) -> std::io::Result<Option<u64>> {
        let mut headers = HeaderMap::new();
        headers.insert(EPOCH, epoch.to_string().as_str());
        self.publish_on(partition, after, headers, Vec::new()).await
    }

    /// Purges the partition's messages below stream seq `marker` (never a later one's).
    async fn purge_below(&self, partition: u32, marker: u64) -> std::io::Result<()> {
        self.stream
            .purge()
            .filter(subject(partition))
            .sequence(marker)
            .await
            .map_err(|e| io("trim the send buffer stream", e))?;
        Ok(())
    }

    /// This writer lost the partition: it appends no more, and says to which epoch.
    async fn fenced(&self, partition: u32) -> AppendRefused {
        self.known().remove(&partition);
        let epoch = match self.last(partition).await {
            Ok(Some((_, e))) => e,
            _ => 0,
        };
        AppendRefused::Fenced { epoch }
    }

    /// Every record on the partition's subject below stream seq `below`, parts joined. A
    /// record whose parts stop short (its append failed halfway, never acknowledged) is
    /// left out.
    async fn load(&self, partition: u32, below: u64) -> std::io::Result<Vec<Vec<u8>>> {
        let subject = subject(partition);
        // (stream seq of its first part, payload)
        let mut records: Vec<(u64, Vec<u8>)> = Vec::new();
        // (stream seq of its first part, parts taken, payload so far)
        let mut partial: Option<(u64, usize, Vec<u8>)> = None;
        let mut seq = 1;
        while seq < below {
            let m = match self
                .stream
                .raw_message_builder()
                .sequence(seq)
                .next_by_subject(subject.clone())
                .send()
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(io("read the send buffer stream", e)),
            };
            if m.sequence >= below {
                break;
            }
            seq = m.sequence + 1;
            if m.payload.is_empty() {
                // A marker; one that voids a failed append drops what of it landed.
                if let Some(above) = m.headers.get(VOID).and_then(|v| v.as_str().parse().ok()) {
                    records.retain(|(at, _)| *at <= above);
                    partial = None;
                }
                continue;
            }
            let (i, n) = part_of(&m.headers).unwrap_or((1, 1));
            if i == 1 {
                if partial.is_some() {
                    warn!(
                        partition,
                        "a send buffer record stops short of its parts; left out"
                    );
                }
                partial = Some((m.sequence, 0, Vec::new()));
            }
            match partial.as_mut() {
                Some((_, got, r)) if *got + 1 == i => {
                    *got = i;
                    r.extend_from_slice(&m.payload);
                }
                _ => {
                    partial = None;
                    warn!(
                        partition,
                        part = i,
                        "a send buffer record part without its start; left out"
                    );
                    continue;
                }
            }
            if i == n {
                records.extend(partial.take().map(|(at, _, r)| (at, r)));
            }
        }
        if partial.is_some() {
            warn!(
                partition,
                "a send buffer record stops short of its parts; left out"
            );
        }
        Ok(records.into_iter().map(|(_, r)| r).collect())
    }
}

#[async_trait::async_trait]
impl Medium for StreamBuffer {
    fn describe(&self) -> String {
        format!("JetStream stream {STREAM}")
    }

    async fn adopt(&self, partition: u32, epoch: u64) -> std::io::Result<Vec<Vec<u8>>> {
        for _ in 0..ADOPT_ATTEMPTS {
            let (last_seq, last_epoch) = self.last(partition).await?.unwrap_or((0, 0));
            if last_epoch > epoch {
                // A later owner adopted already: load what is there, but never append.
                self.known().remove(&partition);
                return self.load(partition, last_seq + 1).await;
            }
            if let Some(marker) = self.marker(partition, epoch, last_seq).await? {
                let records = self.load(partition, marker).await?;
                self.known().insert(partition, marker);
                if records.is_empty() && last_seq > 0 {
                    // Only earlier markers below: drop them, so a subject holds one marker
                    // however often its partition changes hands.
                    self.purge_below(partition, marker).await?;
                }
                return Ok(records);
            }
        }
        Err(io(
            "adopt a send buffer partition",
            format!("other writers kept appending over {ADOPT_ATTEMPTS} attempts"),
        ))
    }

    async fn append(
        &self,
        partition: u32,
        epoch: u64,
        records: Vec<Vec<u8>>,
    ) -> Result<(), AppendRefused> {
        if self.is_unsure(partition)
            && !self
                .settle(partition, epoch)
                .await
                .map_err(AppendRefused::Io)?
        {
            return Err(self.fenced(partition).await);
        }
        let Some(start) = self.known().get(&partition).copied() else {
            return Err(self.fenced(partition).await);
        };
        let mut after = start;
        for record in records {
            let parts: Vec<&[u8]> = record.chunks(self.part_bytes).collect();
            let n = parts.len();
            for (i, part) in parts.into_iter().enumerate() {
                let mut headers = HeaderMap::new();
                headers.insert(EPOCH, epoch.to_string().as_str());
                if n > 1 {
                    headers.insert(PART, format!("{}/{n}", i + 1).as_str());
                }
                match self
                    .publish_on(partition, after, headers, part.to_vec())
                    .await
                {
                    Ok(Some(seq)) => after = seq,
                    Ok(None) => return Err(self.fenced(partition).await),
                    Err(e) => {
                        // Nothing of this append may count (its seqs are handed out
                        // again): what landed is voided before the next one.
                        self.set_unsure(partition, true);
                        return Err(AppendRefused::Io(e));
                    }
                }
            }
        }
        self.known().insert(partition, after);
        Ok(())
    }

    async fn trim(&self, partition: u32, epoch: u64) -> std::io::Result<()> {
        if self.is_unsure(partition) && !self.settle(partition, epoch).await? {
            self.known().remove(&partition);
            return Ok(());
        }
        let Some(after) = self.known().get(&partition).copied() else {
            return Ok(()); // not ours: the owner replays and trims it
        };
        let Some(marker) = self.marker(partition, epoch, after).await? else {
            // Adopted by a later epoch meanwhile: its owner finds these landed and trims.
            self.known().remove(&partition);
            return Ok(());
        };
        self.known().insert(partition, marker);
        self.purge_below(partition, marker).await
    }
}
