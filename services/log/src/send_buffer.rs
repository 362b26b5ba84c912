//! The send buffer: where appends go while the KV cannot commit
//! ([docs/decisions/send-buffer.md](../../../docs/decisions/send-buffer.md)).
//!
//! ```text
//! <dir>/p00012.wal     records of partition 12, appended and fsynced before any ack
//! <dir>/p00012.epoch   the highest lease epoch that adopted partition 12 (8 bytes, LE)
//! ```
//!
//! A record is one conversation's writes from one sequencer batch: the same sealed event
//! rows, dedupe records and head the batch's transaction would have written, and the head
//! seqs it builds on (`before`) and leaves (`after`). Replay lands a record only if the KV
//! head is still `before`, skips it if the head already reached `after`, so a replay that
//! stops halfway and runs again lands every record exactly once.
//!
//! Frame: `len: u32 LE | crc32(payload): u32 LE | payload`. A torn tail (a crash during an
//! append, never acknowledged) fails its length or checksum and is cut off when the file is
//! next loaded.
//!
//! Fencing: every access to a partition's files holds an exclusive lock on its `.wal`
//! (`flock`, so it orders writers in one process and across processes on one machine). A
//! writer adopting the partition records its epoch under the lock and loads the records
//! before it assigns a seq; an append checks under the lock that no later epoch adopted the
//! partition. So once a new owner has read the buffer, the old owner can add nothing to it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::error::LogError;
use crate::keys;

/// Where the buffer lives and how much it may hold.
#[derive(Clone, Debug)]
pub struct SendBufferConfig {
    /// A directory of its own, on a disk that outlives the process (never inside the KV).
    pub dir: PathBuf,
    /// Most bytes of records held (all partitions); past it appends fail `unavailable`.
    pub max_bytes: u64,
    /// Oldest a record may get before it is replayed; past it appends fail `unavailable`.
    pub max_age: Duration,
}

impl SendBufferConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.dir.as_os_str().is_empty() {
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

    fn encode(&self) -> Vec<u8> {
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
        let mut frame = Vec::with_capacity(p.len() + 8);
        frame.extend_from_slice(&(p.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32(&p).to_le_bytes());
        frame.extend_from_slice(&p);
        frame
    }

    fn decode(mut p: &[u8]) -> Option<Record> {
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

/// CRC-32 (IEEE), table-driven; enough to tell a torn or damaged frame.
fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in bytes {
        c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Why an append to the buffer was refused.
#[derive(Debug)]
pub(crate) enum AppendRefused {
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
    index: Mutex<Index>,
    /// Keys in the overlay, kept beside the lock so that reads, which nearly always find the
    /// buffer empty, do not take it.
    overlay_keys: AtomicUsize,
}

impl SendBuffer {
    pub fn open(cfg: SendBufferConfig) -> Result<SendBuffer, LogError> {
        cfg.validate().map_err(LogError::InvalidRequest)?;
        std::fs::create_dir_all(&cfg.dir).map_err(|e| io_error("create the send buffer", e))?;
        Ok(SendBuffer {
            cfg,
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

    fn wal(&self, partition: u32) -> PathBuf {
        self.cfg.dir.join(format!("p{partition:05}.wal"))
    }

    fn epoch_file(&self, partition: u32) -> PathBuf {
        self.cfg.dir.join(format!("p{partition:05}.epoch"))
    }

    /// Taking a partition (`epoch` as acquired): records the epoch under the lock, so the
    /// previous owner can append nothing more, and loads what it left, so no seq it handed
    /// out is handed out again. Blocking (file I/O).
    pub(crate) fn adopt(&self, partition: u32, epoch: u64) -> Result<usize, LogError> {
        let wal = self.wal(partition);
        let epoch_path = self.epoch_file(partition);
        let records = (|| {
            let mut file = open_locked(&wal)?;
            if read_epoch(&epoch_path)? < epoch {
                write_epoch(&epoch_path, epoch)?;
            }
            load(&mut file)
        })()
        .map_err(|e| io_error("load the send buffer", e))?;
        let n = records.len();
        let mut ix = self.index();
        forget(&mut ix, partition);
        for r in records {
            insert(&mut ix, partition, r);
        }
        self.changed(&ix);
        Ok(n)
    }

    /// Appends records of one partition and fsyncs them; refused if a later epoch adopted
    /// the partition. Only after this returns may the events be acknowledged. Blocking.
    pub(crate) fn append(
        &self,
        partition: u32,
        epoch: u64,
        records: Vec<Record>,
    ) -> Result<(), AppendRefused> {
        let wal = self.wal(partition);
        let epoch_path = self.epoch_file(partition);
        let mut file = open_locked(&wal).map_err(AppendRefused::Io)?;
        let adopted = read_epoch(&epoch_path).map_err(AppendRefused::Io)?;
        if adopted > epoch {
            return Err(AppendRefused::Fenced { epoch: adopted });
        }
        let mut bytes = Vec::new();
        for r in &records {
            bytes.extend_from_slice(&r.encode());
        }
        file.seek(SeekFrom::End(0)).map_err(AppendRefused::Io)?;
        file.write_all(&bytes).map_err(AppendRefused::Io)?;
        file.sync_data().map_err(AppendRefused::Io)?;
        drop(file);
        let mut ix = self.index();
        for r in records {
            insert(&mut ix, partition, r);
        }
        self.changed(&ix);
        Ok(())
    }

    /// Every record of the partition is in the KV: empties its file and forgets it.
    /// Blocking.
    pub(crate) fn trim(&self, partition: u32) -> Result<(), LogError> {
        let wal = self.wal(partition);
        (|| {
            let file = open_locked(&wal)?;
            file.set_len(0)?;
            file.sync_data()
        })()
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

/// Opens (creating) a partition's file and takes its exclusive lock; the lock goes with the
/// handle.
fn open_locked(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    file.lock()?;
    Ok(file)
}

fn read_epoch(path: &Path) -> std::io::Result<u64> {
    match std::fs::read(path) {
        Ok(b) => Ok(b
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_le_bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

fn write_epoch(path: &Path, epoch: u64) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    // Eight bytes in one sector: written whole or not at all.
    f.write_all(&epoch.to_le_bytes())?;
    f.sync_data()
}

/// Reads every whole record; cuts off a torn or damaged tail (never acknowledged: the ack
/// follows the fsync of the whole frame).
fn load(file: &mut File) -> std::io::Result<Vec<Record>> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut bytes)?;
    let mut records = Vec::new();
    let mut at = 0usize;
    while let Some(frame) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        let Some(payload) = bytes.get(at + 8..at + 8 + len) else {
            break;
        };
        if crc32(payload) != crc {
            break;
        }
        let Some(r) = Record::decode(payload) else {
            break;
        };
        records.push(r);
        at += 8 + len;
    }
    if at < bytes.len() {
        tracing::warn!(
            kept = at,
            cut = bytes.len() - at,
            "cut a torn tail off the send buffer (an append that was never acknowledged)"
        );
        file.set_len(at as u64)?;
        file.sync_data()?;
    }
    Ok(records)
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
            dir: dir.to_path_buf(),
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
        })
        .expect("open")
    }

    #[test]
    fn crc32_is_the_ieee_checksum() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn records_survive_a_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().expect("dir");
        let b = buffer(dir.path());
        assert_eq!(b.adopt(3, 1).expect("adopt"), 0);
        b.append(3, 1, vec![record(0, 1), record(1, 3)])
            .expect("append");
        // A crash in the middle of the next append.
        let mut f = OpenOptions::new()
            .append(true)
            .open(b.wal(3))
            .expect("open");
        f.write_all(&record(3, 4).encode()[..10]).expect("torn");
        drop(f);

        let again = buffer(dir.path());
        assert_eq!(again.adopt(3, 2).expect("adopt"), 2);
        assert_eq!(again.records(3), vec![record(0, 1), record(1, 3)]);
        assert_eq!(again.stats().events, 3);
        assert_eq!(again.get(b"hd\0t\0c"), Some(vec![1, 2, 3]));
        assert_eq!(again.lowest_seq(b"t\0c"), Some(1));
        again.trim(3).expect("trim");
        assert!(again.is_empty());
        assert_eq!(again.stats().replayed, 3);
        assert_eq!(buffer(dir.path()).adopt(3, 3).expect("adopt"), 0);
    }

    #[test]
    fn an_owner_fenced_by_a_later_adoption_cannot_append() {
        let dir = tempfile::tempdir().expect("dir");
        let old = buffer(dir.path());
        let new = buffer(dir.path());
        old.adopt(0, 4).expect("adopt");
        old.append(0, 4, vec![record(0, 1)]).expect("append");
        assert_eq!(new.adopt(0, 5).expect("adopt"), 1);
        match old.append(0, 4, vec![record(1, 2)]) {
            Err(AppendRefused::Fenced { epoch: 5 }) => {}
            other => panic!("expected a fence, got {other:?}"),
        }
        assert_eq!(new.records(0).len(), 1);
    }

    #[test]
    fn the_limits_refuse_more_bytes_and_old_records() {
        let dir = tempfile::tempdir().expect("dir");
        let b = buffer(dir.path());
        b.adopt(1, 1).expect("adopt");
        assert!(b.check_limits(2 << 20, 10).is_err());
        b.append(1, 1, vec![record(0, 1)]).expect("append");
        assert!(b.check_limits(0, 8).is_ok());
        assert!(b.check_limits(0, 7 + 61_000).is_err());
    }
}
