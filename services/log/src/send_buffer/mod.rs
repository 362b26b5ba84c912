//! The send buffer: where appends go while the KV cannot commit
//! ([docs/decisions/send-buffer.md](../../../../docs/decisions/send-buffer.md)).
//!
//! A record is one conversation's writes from one sequencer batch: the same sealed event
//! rows, dedupe records and head the batch's transaction would have written, and the head
//! seqs it builds on (`before`) and leaves (`after`). Replay lands a record only if the KV
//! head is still `before`, skips it if the head already reached `after`, so a replay that
//! stops halfway and runs again lands every record exactly once.
//!
//! The records are made durable by a [`Medium`], per partition and fenced by lease epoch:
//! once a writer has adopted a partition (and loaded what it holds), no writer of an earlier
//! epoch can append to it. Two media: [`local::LocalFiles`] (an fsynced file per partition on
//! this machine, fenced by `flock`) and, in the gateway crate, a JetStream stream that
//! outlives the machine (fenced by `Nats-Expected-Last-Subject-Sequence`). This module keeps
//! the in-memory index over either: what reads and the sequencer see until replay.

pub mod local;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::LogError;
use crate::keys;

/// Where buffered records are made durable, per partition, in order. Records are opaque
/// payloads here (the index decodes them). Implementations must fence: after
/// `adopt(p, e)` returned, an `append(p, e')` with `e' < e` is refused, whichever process or
/// machine makes it.
#[async_trait::async_trait]
pub trait Medium: Send + Sync + 'static {
    /// Where the records live, for logs and errors.
    fn describe(&self) -> String;
    /// Takes the partition for `epoch` (a lease epoch this writer acquired): from now on no
    /// earlier epoch can append. Returns the records it holds, oldest first.
    async fn adopt(&self, partition: u32, epoch: u64) -> std::io::Result<Vec<Vec<u8>>>;
    /// Appends records durably, in order; only after it returns may they be acknowledged.
    /// Refused with [`AppendRefused::Fenced`] when a later epoch adopted the partition.
    async fn append(
        &self,
        partition: u32,
        epoch: u64,
        records: Vec<Vec<u8>>,
    ) -> Result<(), AppendRefused>;
    /// Every record appended so far under `epoch` is in the KV: they may be dropped. A later
    /// epoch's records must survive it.
    async fn trim(&self, partition: u32, epoch: u64) -> std::io::Result<()>;
}

/// Where the buffer lives.
#[derive(Clone)]
pub enum BufferPlace {
    /// Files on this machine ([`local::LocalFiles`]).
    Dir(PathBuf),
    /// Any other medium, e.g. a replicated JetStream stream.
    Medium(Arc<dyn Medium>),
}

impl Default for BufferPlace {
    /// No place yet (an empty directory, refused by [`SendBufferConfig::validate`]).
    fn default() -> Self {
        BufferPlace::Dir(PathBuf::new())
    }
}

impl std::fmt::Debug for BufferPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BufferPlace::Dir(d) => write!(f, "Dir({})", d.display()),
            BufferPlace::Medium(m) => write!(f, "Medium({})", m.describe()),
        }
    }
}

/// Where the buffer lives and how much it may hold. Its bounds are read straight from the
/// server's `[log]` section (`send_buffer_max_bytes`, `send_buffer_max_age_ms`); its place
/// is not a setting of this type: the server resolves it from its own settings
/// (`send_buffer_medium`, `send_buffer_dir`) and sets it.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct SendBufferConfig {
    /// A directory of its own on a disk that outlives the process (never inside the KV), or
    /// a medium that outlives the machine. By default an empty directory, which `validate`
    /// refuses: whoever makes the buffer sets it.
    #[serde(skip)]
    pub place: BufferPlace,
    /// Most bytes of records held (all partitions); past it appends fail `unavailable`.
    #[serde(rename = "send_buffer_max_bytes")]
    pub max_bytes: u64,
    /// Oldest a record may get before it is replayed; past it appends fail `unavailable`.
    #[serde(rename = "send_buffer_max_age_ms", with = "crate::duration_as::millis")]
    pub max_age: Duration,
}

impl Default for SendBufferConfig {
    fn default() -> Self {
        SendBufferConfig {
            place: BufferPlace::default(),
            max_bytes: 256 << 20,
            // Five minutes: an outage longer than that is not ridden out by buffering.
            max_age: Duration::from_secs(300),
        }
    }
}

impl SendBufferConfig {
    pub fn validate(&self) -> Result<(), String> {
        if let BufferPlace::Dir(dir) = &self.place
            && dir.as_os_str().is_empty()
        {
            return Err("send_buffer_dir must not be empty".into());
        }
        if self.max_bytes < 1 << 20 {
            return Err("send_buffer_max_bytes must be at least 1 MiB (1048576)".into());
        }
        if self.max_age < Duration::from_secs(1) {
            return Err("send_buffer_max_age_ms must be at least 1000".into());
        }
        Ok(())
    }
}

/// One conversation's writes from one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    /// The conversation's head seq the writes build on.
    pub before: u64,
    /// The head seq they leave.
    pub after: u64,
    /// When the record was buffered (wall clock, ms).
    pub buffered_ms: i64,
    /// Puts in the order the batch made them; exactly one is the conversation's head.
    pub writes: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Record {
    pub fn head_key(&self) -> Option<&[u8]> {
        self.writes
            .iter()
            .map(|(k, _)| k.as_slice())
            .find(|k| k.starts_with(b"hd\0"))
    }

    /// Events it carries (`after - before`).
    pub fn events(&self) -> u64 {
        self.after.saturating_sub(self.before)
    }

    fn bytes(&self) -> u64 {
        self.writes
            .iter()
            .map(|(k, v)| (k.len() + v.len() + 8) as u64)
            .sum::<u64>()
            + 32
    }

    /// The record as the medium stores it.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(self.bytes() as usize);
        p.extend_from_slice(&self.before.to_le_bytes());
        p.extend_from_slice(&self.after.to_le_bytes());
        p.extend_from_slice(&self.buffered_ms.to_le_bytes());
        p.extend_from_slice(&(self.writes.len() as u32).to_le_bytes());
        for (k, v) in &self.writes {
            p.extend_from_slice(&(k.len() as u32).to_le_bytes());
            p.extend_from_slice(k);
            p.extend_from_slice(&(v.len() as u32).to_le_bytes());
            p.extend_from_slice(v);
        }
        p
    }

    pub(crate) fn decode(mut p: &[u8]) -> Option<Record> {
        fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if p.len() < n {
                return None;
            }
            let (head, rest) = p.split_at(n);
            *p = rest;
            Some(head)
        }
        fn u32_(p: &mut &[u8]) -> Option<u32> {
            Some(u32::from_le_bytes(take(p, 4)?.try_into().ok()?))
        }
        fn u64_(p: &mut &[u8]) -> Option<u64> {
            Some(u64::from_le_bytes(take(p, 8)?.try_into().ok()?))
        }
        let before = u64_(&mut p)?;
        let after = u64_(&mut p)?;
        let buffered_ms = u64_(&mut p)? as i64;
        let n = u32_(&mut p)? as usize;
        let mut writes = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let k = u32_(&mut p)? as usize;
            let key = take(&mut p, k)?.to_vec();
            let v = u32_(&mut p)? as usize;
            let value = take(&mut p, v)?.to_vec();
            writes.push((key, value));
        }
        if !p.is_empty() || after < before {
            return None;
        }
        Some(Record {
            before,
            after,
            buffered_ms,
            writes,
        })
    }
}

/// Why an append to the buffer was refused.
#[derive(Debug)]
pub enum AppendRefused {
    /// A later epoch adopted the partition: this writer lost it.
    Fenced {
        epoch: u64,
    },
    Io(std::io::Error),
}

/// What is buffered right now (for stats and logs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferStats {
    /// Events held, not yet in the KV.
    pub events: u64,
    pub bytes: u64,
    /// When the oldest record held was buffered (0: none).
    pub oldest_ms: i64,
    /// Events replayed into the KV since the log opened.
    pub replayed: u64,
}

/// The records of one partition, as held in memory (the file holds the same).
#[derive(Default)]
struct PartitionRecords {
    records: Vec<Record>,
    bytes: u64,
}

#[derive(Default)]
struct Index {
    parts: HashMap<u32, PartitionRecords>,
    /// Every buffered put, latest value per key: what reads and the sequencer see over the
    /// KV while records wait for replay.
    overlay: HashMap<Vec<u8>, Vec<u8>>,
    /// Per conversation (`tenant\0conv`): the lowest seq buffered.
    low: HashMap<Vec<u8>, u64>,
    replayed: u64,
}

/// The buffer of one writer: files shared with the other writers of the store (same dir),
/// an in-memory index of the partitions this writer holds.
pub struct SendBuffer {
    cfg: SendBufferConfig,
    medium: Arc<dyn Medium>,
    index: Mutex<Index>,
    /// Keys in the overlay, kept beside the lock so that reads, which nearly always find the
    /// buffer empty, do not take it.
    overlay_keys: AtomicUsize,
}

impl SendBuffer {
    pub fn open(cfg: SendBufferConfig) -> Result<SendBuffer, LogError> {
        cfg.validate().map_err(LogError::InvalidRequest)?;
        let medium: Arc<dyn Medium> = match &cfg.place {
            BufferPlace::Dir(dir) => Arc::new(
                local::LocalFiles::open(dir.clone())
                    .map_err(|e| io_error("create the send buffer", e))?,
            ),
            BufferPlace::Medium(m) => m.clone(),
        };
        Ok(SendBuffer {
            cfg,
            medium,
            index: Mutex::new(Index::default()),
            overlay_keys: AtomicUsize::new(0),
        })
    }

    pub fn config(&self) -> &SendBufferConfig {
        &self.cfg
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> BufferStats {
        let ix = self.index();
        let mut s = BufferStats {
            replayed: ix.replayed,
            ..BufferStats::default()
        };
        for part in ix.parts.values() {
            s.bytes += part.bytes;
            for r in &part.records {
                s.events += r.events();
                if s.oldest_ms == 0 || r.buffered_ms < s.oldest_ms {
                    s.oldest_ms = r.buffered_ms;
                }
            }
        }
        s
    }

    pub fn is_empty(&self) -> bool {
        self.index().parts.values().all(|p| p.records.is_empty())
    }

    /// Partitions with records waiting for replay.
    pub(crate) fn partitions(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .index()
            .parts
            .iter()
            .filter(|(_, p)| !p.records.is_empty())
            .map(|(p, _)| *p)
            .collect();
        v.sort_unstable();
        v
    }

    pub(crate) fn records(&self, partition: u32) -> Vec<Record> {
        self.index()
            .parts
            .get(&partition)
            .map(|p| p.records.clone())
            .unwrap_or_default()
    }

    /// The buffered value of a key, if a record holds one.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        if self.overlay_keys.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.index().overlay.get(key).cloned()
    }

    /// The lowest seq of the conversation (`tenant\0conv`) held here, if any.
    pub fn lowest_seq(&self, part: &[u8]) -> Option<u64> {
        if self.overlay_keys.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.index().low.get(part).copied()
    }

    /// Publishes the overlay's size after a change (called with the index locked).
    fn changed(&self, ix: &Index) {
        self.overlay_keys.store(ix.overlay.len(), Ordering::Release);
    }

    /// Whether `more` bytes fit, and the oldest record is young enough: the limits.
    pub(crate) fn check_limits(&self, more: u64, now_ms: i64) -> Result<(), String> {
        let s = self.stats();
        if s.bytes + more > self.cfg.max_bytes {
            return Err(format!(
                "the send buffer holds {} bytes, its limit is {}",
                s.bytes, self.cfg.max_bytes
            ));
        }
        let max_age = self.cfg.max_age.as_millis() as i64;
        if s.oldest_ms != 0 && now_ms - s.oldest_ms > max_age {
            return Err(format!(
                "the oldest buffered event waits for the store since {} ms, the limit is {max_age} ms",
                now_ms - s.oldest_ms
            ));
        }
        Ok(())
    }

    /// Where the records live (for logs).
    pub fn describe(&self) -> String {
        self.medium.describe()
    }

    /// Taking a partition (`epoch` as acquired): the medium fences out earlier epochs and
    /// hands over what they left, which is loaded before this writer assigns any seq.
    pub(crate) async fn adopt(&self, partition: u32, epoch: u64) -> Result<usize, LogError> {
        let payloads = self
            .medium
            .adopt(partition, epoch)
            .await
            .map_err(|e| io_error("load the send buffer", e))?;
        let mut records = Vec::with_capacity(payloads.len());
        for p in payloads {
            let r = Record::decode(&p).ok_or_else(|| {
                LogError::corrupt(
                    format!("send buffer partition {partition}").as_bytes(),
                    "a buffered record does not decode",
                )
            })?;
            records.push(r);
        }
        let n = records.len();
        let mut ix = self.index();
        forget(&mut ix, partition);
        for r in records {
            insert(&mut ix, partition, r);
        }
        self.changed(&ix);
        Ok(n)
    }

    /// Appends records of one partition durably; refused if a later epoch adopted the
    /// partition. Only after this returns may the events be acknowledged.
    pub(crate) async fn append(
        &self,
        partition: u32,
        epoch: u64,
        records: Vec<Record>,
    ) -> Result<(), AppendRefused> {
        let payloads = records.iter().map(Record::encode).collect();
        self.medium.append(partition, epoch, payloads).await?;
        let mut ix = self.index();
        for r in records {
            insert(&mut ix, partition, r);
        }
        self.changed(&ix);
        Ok(())
    }

    /// Every record of the partition is in the KV: drops them and forgets them.
    pub(crate) async fn trim(&self, partition: u32, epoch: u64) -> Result<(), LogError> {
        self.medium
            .trim(partition, epoch)
            .await
            .map_err(|e| io_error("trim the send buffer", e))?;
        let mut ix = self.index();
        let events: u64 = ix
            .parts
            .get(&partition)
            .map_or(0, |p| p.records.iter().map(Record::events).sum());
        ix.replayed += events;
        forget(&mut ix, partition);
        self.changed(&ix);
        Ok(())
    }

    /// This writer no longer holds the partition: forget its records (the file keeps them
    /// for the next owner, which loads them when it adopts).
    pub(crate) fn drop_partition(&self, partition: u32) {
        let mut ix = self.index();
        forget(&mut ix, partition);
        self.changed(&ix);
    }
}

fn insert(ix: &mut Index, partition: u32, r: Record) {
    if let Some(head) = r.head_key()
        && let Some(part) = keys::conversation_part(head)
    {
        let low = ix.low.entry(part.to_vec()).or_insert(r.before + 1);
        *low = (*low).min(r.before + 1);
    }
    for (k, v) in &r.writes {
        ix.overlay.insert(k.clone(), v.clone());
    }
    let p = ix.parts.entry(partition).or_default();
    p.bytes += r.bytes();
    p.records.push(r);
}

fn forget(ix: &mut Index, partition: u32) {
    let Some(p) = ix.parts.remove(&partition) else {
        return;
    };
    for r in &p.records {
        if let Some(head) = r.head_key()
            && let Some(part) = keys::conversation_part(head)
        {
            ix.low.remove(part);
        }
        for (k, _) in &r.writes {
            ix.overlay.remove(k);
        }
    }
}

fn io_error(action: &'static str, e: std::io::Error) -> LogError {
    LogError::Store(crate::store::StoreError::Io {
        action,
        source: std::sync::Arc::new(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::Path;

    fn record(before: u64, after: u64) -> Record {
        Record {
            before,
            after,
            buffered_ms: 7,
            writes: vec![
                (b"ev\0t\0c\0x".to_vec(), b"sealed".to_vec()),
                (b"hd\0t\0c".to_vec(), vec![1, 2, 3]),
            ],
        }
    }

    fn buffer(dir: &Path) -> SendBuffer {
        SendBuffer::open(SendBufferConfig {
            place: BufferPlace::Dir(dir.to_path_buf()),
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
        })
        .expect("open")
    }

    #[test]
    fn crc32_is_the_ieee_checksum() {
        assert_eq!(local::crc32(b"123456789"), 0xcbf4_3926);
    }

    #[tokio::test]
    async fn records_survive_a_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().expect("dir");
        let b = buffer(dir.path());
        assert_eq!(b.adopt(3, 1).await.expect("adopt"), 0);
        b.append(3, 1, vec![record(0, 1), record(1, 3)])
            .await
            .expect("append");
        // A crash in the middle of the next append.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("p00003.wal"))
            .expect("open");
        f.write_all(&record(3, 4).encode()[..10]).expect("torn");
        drop(f);

        let again = buffer(dir.path());
        assert_eq!(again.adopt(3, 2).await.expect("adopt"), 2);
        assert_eq!(again.records(3), vec![record(0, 1), record(1, 3)]);
        assert_eq!(again.stats().events, 3);
        assert_eq!(again.get(b"hd\0t\0c"), Some(vec![1, 2, 3]));
        assert_eq!(again.lowest_seq(b"t\0c"), Some(1));
        again.trim(3, 2).await.expect("trim");
        assert!(again.is_empty());
        assert_eq!(again.stats().replayed, 3);
        assert_eq!(buffer(dir.path()).adopt(3, 3).await.expect("adopt"), 0);
    }

    #[tokio::test]
    async fn an_owner_fenced_by_a_later_adoption_cannot_append() {
        let dir = tempfile::tempdir().expect("dir");
        let old = buffer(dir.path());
        let new = buffer(dir.path());
        old.adopt(0, 4).await.expect("adopt");
        old.append(0, 4, vec![record(0, 1)]).await.expect("append");
        assert_eq!(new.adopt(0, 5).await.expect("adopt"), 1);
        match old.append(0, 4, vec![record(1, 2)]).await {
            Err(AppendRefused::Fenced { epoch: 5 }) => {}
            other => panic!("expected a fence, got {other:?}"),
        }
        assert_eq!(new.records(0).len(), 1);
    }

    #[tokio::test]
    async fn the_limits_refuse_more_bytes_and_old_records() {
        let dir = tempfile::tempdir().expect("dir");
        let b = buffer(dir.path());
        b.adopt(1, 1).await.expect("adopt");
        assert!(b.check_limits(2 << 20, 10).is_err());
        b.append(1, 1, vec![record(0, 1)]).await.expect("append");
        assert!(b.check_limits(0, 8).is_ok());
        assert!(b.check_limits(0, 7 + 61_000).is_err());
    }
}
