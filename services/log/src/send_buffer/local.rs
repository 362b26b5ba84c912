//! The send buffer on this machine's disk: one file per partition, fenced by `flock`.
//!
//! ```text
//! <dir>/p00012.wal     records of partition 12, appended and fsynced before any ack
//! <dir>/p00012.epoch   the highest lease epoch that adopted partition 12 (8 bytes, LE)
//! ```
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
//! Only writers that share the directory are fenced: one machine, or a filesystem whose
//! locks are honest.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{AppendRefused, Medium};

/// Files under one directory (see the module doc).
pub struct LocalFiles {
    dir: PathBuf,
}

impl LocalFiles {
    pub fn open(dir: PathBuf) -> std::io::Result<LocalFiles> {
        std::fs::create_dir_all(&dir)?;
        Ok(LocalFiles { dir })
    }

    fn wal(&self, partition: u32) -> PathBuf {
        self.dir.join(format!("p{partition:05}.wal"))
    }

    fn epoch_file(&self, partition: u32) -> PathBuf {
        self.dir.join(format!("p{partition:05}.epoch"))
    }
}

/// Runs file I/O on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

#[async_trait::async_trait]
impl Medium for LocalFiles {
    fn describe(&self) -> String {
        format!("files in {}", self.dir.display())
    }

    async fn adopt(&self, partition: u32, epoch: u64) -> std::io::Result<Vec<Vec<u8>>> {
        let (wal, epoch_path) = (self.wal(partition), self.epoch_file(partition));
        blocking(move || {
            let mut file = open_locked(&wal)?;
            if read_epoch(&epoch_path)? < epoch {
                write_epoch(&epoch_path, epoch)?;
            }
            load(&mut file)
        })
        .await
    }

    async fn append(
        &self,
        partition: u32,
        epoch: u64,
        records: Vec<Vec<u8>>,
    ) -> Result<(), AppendRefused> {
        let (wal, epoch_path) = (self.wal(partition), self.epoch_file(partition));
        let done = tokio::task::spawn_blocking(move || {
            let mut file = open_locked(&wal).map_err(AppendRefused::Io)?;
            let adopted = read_epoch(&epoch_path).map_err(AppendRefused::Io)?;
            if adopted > epoch {
                return Err(AppendRefused::Fenced { epoch: adopted });
            }
            let mut bytes = Vec::new();
            for r in &records {
                bytes.extend_from_slice(&(r.len() as u32).to_le_bytes());
                bytes.extend_from_slice(&crc32(r).to_le_bytes());
                bytes.extend_from_slice(r);
            }
            let start = file.seek(SeekFrom::End(0)).map_err(AppendRefused::Io)?;
            let written = file.write_all(&bytes).and_then(|()| file.sync_data());
            if let Err(e) = written {
                // The caller hands these seqs out again: nothing of this append may stay.
                if let Err(cut) = file.set_len(start).and_then(|()| file.sync_data()) {
                    tracing::error!(error = %cut, "could not cut a failed append off the send buffer");
                }
                return Err(AppendRefused::Io(e));
            }
            Ok(())
        })
        .await;
        done.map_err(|e| AppendRefused::Io(std::io::Error::other(e)))?
    }

    async fn trim(&self, partition: u32, _epoch: u64) -> std::io::Result<()> {
        // Under the lock, so no append is between the replay and the cut. A later owner's
        // records cannot be here: the replaying writer still held the partition.
        let wal = self.wal(partition);
        blocking(move || {
            let file = open_locked(&wal)?;
            file.set_len(0)?;
            file.sync_data()
        })
        .await
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

/// Reads every whole record's payload; cuts off a torn or damaged tail (never
/// acknowledged: the ack follows the fsync of the whole frame).
fn load(file: &mut File) -> std::io::Result<Vec<Vec<u8>>> {
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
        records.push(payload.to_vec());
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

/// CRC-32 (IEEE), table-driven; enough to tell a torn or damaged frame.
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
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
