//! Archived bodies: compressed, then sealed.
//!
//! Ciphertext does not compress, so each body is compressed before it is sealed: zstd with a
//! dictionary trained on the segment's own bodies (chat messages are short; without a
//! dictionary zstd has almost nothing to work with), or stored raw when that is smaller. The
//! dictionary is sealed under the same data key and kept in the segment's footer, so a
//! segment is self-contained.
//!
//! What is sealed is the event's body; everything else is a metadata column (the client
//! message id too: the hot log keeps it in plain keys as well). The AD binds the sealed
//! bytes to every metadata column of the row (`["tidings-ax-v1", tenant, conversation, seq,
//! key id, event id, sender, time, kind, body size, client message id]`): a body moved to another row fails to open, and so does a row whose sender or
//! time was edited in the file. Data tools read the metadata; only tidings can vouch for it.

use prost::Message;
use tidings_log::crypto::DataKey;
use tidings_log::{Event, TenantId};
use zstd::dict::{DecoderDictionary, EncoderDictionary};

use crate::format::Row;

/// Largest body a row may claim; a bound on what a tampered row can make us allocate before
/// its seal is checked.
const MAX_BODY: usize = 16 << 20;
/// Largest trained dictionary, and how much sample text trains it.
const DICT_MAX: usize = 32 << 10;
const DICT_SAMPLE_BYTES: usize = 4 << 20;
/// Fewer bodies than this and a dictionary costs more than it saves.
const DICT_MIN_ROWS: usize = 512;

const RAW: u8 = 0;
const ZSTD: u8 = 1;

/// The kind column: the name of the event's body.
pub fn kind(event: &Event) -> &'static str {
    tidings_log::event_kind(event.body.as_ref())
}

/// The part of an event that is sealed: its body, everything not in a metadata column.
pub fn payload(event: &Event) -> Vec<u8> {
    Event {
        body: event.body.clone(),
        ..Event::default()
    }
    .encode_to_vec()
}

/// A row for `event` with its body still plain (see [`Packer::seal`]).
pub fn plain_row(event: &Event, key_id: u32) -> Row {
    let body = payload(event);
    Row {
        conversation: event.conversation.clone(),
        seq: event.seq,
        event_id: event.event_id.clone(),
        sender: event.sender.clone(),
        time_ms: event.server_time_ms,
        kind: kind(event).to_string(),
        key_id,
        body_size: body.len() as u32,
        body,
        client_msg_id: event.client_msg_id.clone(),
    }
}

fn body_ad<'a>(tenant: &'a TenantId, row: &'a Row, numbers: &'a [[u8; 8]; 4]) -> [&'a [u8]; 11] {
    [
        b"tidings-ax-v1",
        tenant.as_str().as_bytes(),
        row.conversation.as_bytes(),
        &numbers[0],
        &numbers[1][..4],
        row.event_id.as_bytes(),
        row.sender.as_bytes(),
        &numbers[2],
        row.kind.as_bytes(),
        &numbers[3][..4],
        row.client_msg_id.as_bytes(),
    ]
}

fn ad_numbers(row: &Row) -> [[u8; 8]; 4] {
    let mut key_id = [0u8; 8];
    key_id[..4].copy_from_slice(&row.key_id.to_be_bytes());
    let mut size = [0u8; 8];
    size[..4].copy_from_slice(&row.body_size.to_be_bytes());
    [
        row.seq.to_be_bytes(),
        key_id,
        row.time_ms.to_be_bytes(),
        size,
    ]
}

fn dict_ad<'a>(tenant: &'a TenantId, segment: &'a str, key_id: &'a [u8; 4]) -> [&'a [u8]; 4] {
    [
        b"tidings-axdict-v1",
        tenant.as_str().as_bytes(),
        segment.as_bytes(),
        key_id,
    ]
}

/// A zstd dictionary for one segment's bodies.
pub struct Dictionary {
    raw: Vec<u8>,
    encoder: EncoderDictionary<'static>,
    decoder: DecoderDictionary<'static>,
}

impl Dictionary {
    fn from_raw(raw: Vec<u8>, level: i32) -> Self {
        Dictionary {
            encoder: EncoderDictionary::copy(&raw, level),
            decoder: DecoderDictionary::copy(&raw),
            raw,
        }
    }

    /// Trains a dictionary on `bodies`, or `None` when there are too few to be worth one.
    pub fn train(bodies: &[&[u8]], level: i32) -> Option<Self> {
        if bodies.len() < DICT_MIN_ROWS {
            return None;
        }
        let total: usize = bodies.iter().map(|b| b.len()).sum();
        // An even spread of samples up to DICT_SAMPLE_BYTES.
        let step = total.div_ceil(DICT_SAMPLE_BYTES).max(1);
        let samples: Vec<&[u8]> = bodies.iter().step_by(step).copied().collect();
        let size = (total / 16).clamp(1024, DICT_MAX);
        let raw = zstd::dict::from_samples(&samples, size).ok()?;
        Some(Self::from_raw(raw, level))
    }

    pub fn len(&self) -> usize {
        self.raw.len()
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    pub fn seal(&self, key: &DataKey, tenant: &TenantId, segment: &str) -> Vec<u8> {
        let key_id = key.id.to_be_bytes();
        key.seal(&dict_ad(tenant, segment, &key_id), &self.raw)
    }

    pub fn open(
        key: &DataKey,
        tenant: &TenantId,
        segment: &str,
        sealed: &[u8],
    ) -> Result<Self, String> {
        let key_id = key.id.to_be_bytes();
        let raw = key
            .open(&dict_ad(tenant, segment, &key_id), sealed)
            .map_err(|_| "the segment's dictionary failed authentication".to_string())?;
        Ok(Self::from_raw(raw, 0))
    }
}

/// Compresses and seals the bodies of one segment.
pub struct Packer<'d> {
    compressor: zstd::bulk::Compressor<'d>,
}

impl<'d> Packer<'d> {
    pub fn new(dict: Option<&'d Dictionary>, level: i32) -> std::io::Result<Self> {
        let mut compressor = match dict {
            Some(d) => zstd::bulk::Compressor::with_prepared_dictionary(&d.encoder)?,
            None => zstd::bulk::Compressor::new(level)?,
        };
        // A chat message compresses to a few bytes, so the frame's own overhead matters:
        // no magic number, dictionary id, content size (body_size has it) or checksum (the
        // seal authenticates). That is up to 13 bytes a row.
        use zstd::zstd_safe::{CParameter, FrameFormat};
        for p in [
            CParameter::Format(FrameFormat::Magicless),
            CParameter::DictIdFlag(false),
            CParameter::ContentSizeFlag(false),
            CParameter::ChecksumFlag(false),
        ] {
            compressor.set_parameter(p)?;
        }
        Ok(Packer { compressor })
    }

    /// Replaces the row's plain body with its sealed form.
    pub fn seal(&mut self, key: &DataKey, tenant: &TenantId, row: &mut Row) -> std::io::Result<()> {
        let plain = std::mem::take(&mut row.body);
        let mut framed = Vec::with_capacity(plain.len() + 1);
        match self.compressor.compress(&plain) {
            Ok(z) if z.len() < plain.len() => {
                framed.push(ZSTD);
                framed.extend_from_slice(&z);
            }
            Ok(_) => {
                framed.push(RAW);
                framed.extend_from_slice(&plain);
            }
            Err(e) => return Err(e),
        }
        row.key_id = key.id;
        row.body_size = plain.len() as u32;
        let numbers = ad_numbers(row);
        row.body = key.seal(&body_ad(tenant, row, &numbers), &framed);
        Ok(())
    }
}

/// Opens many rows of one segment, reusing one zstd decompression context (creating one
/// costs more than decompressing a chat message).
pub struct Opener<'d> {
    dict: Option<&'d Dictionary>,
    decompressor: Option<zstd::bulk::Decompressor<'d>>,
}

impl<'d> Opener<'d> {
    pub fn new(dict: Option<&'d Dictionary>) -> Self {
        Opener {
            dict,
            decompressor: None,
        }
    }

    fn decompressor(&mut self) -> Result<&mut zstd::bulk::Decompressor<'d>, String> {
        if self.decompressor.is_none() {
            let d = match self.dict {
                Some(d) => zstd::bulk::Decompressor::with_prepared_dictionary(&d.decoder),
                None => zstd::bulk::Decompressor::new(),
            }
            .and_then(|mut d| {
                d.set_parameter(zstd::zstd_safe::DParameter::Format(
                    zstd::zstd_safe::FrameFormat::Magicless,
                ))?;
                Ok(d)
            })
            .map_err(|e| e.to_string())?;
            self.decompressor = Some(d);
        }
        Ok(self.decompressor.as_mut().expect("set above"))
    }

    pub fn open(&mut self, key: &DataKey, tenant: &TenantId, row: &Row) -> Result<Event, String> {
        if row.key_id != key.id {
            return Err(format!(
                "row sealed with key {} opened with {}",
                row.key_id, key.id
            ));
        }
        let numbers = ad_numbers(row);
        let framed = key
            .open(&body_ad(tenant, row, &numbers), &row.body)
            .map_err(|_| format!("body of seq {} failed authentication", row.seq))?;
        let size = row.body_size as usize;
        let plain = match framed.split_first() {
            Some((&RAW, rest)) => rest.to_vec(),
            Some((&ZSTD, rest)) if size <= MAX_BODY => self
                .decompressor()?
                .decompress(rest, size)
                .map_err(|e| format!("body of seq {}: {e}", row.seq))?,
            _ => return Err(format!("body of seq {} has an unknown encoding", row.seq)),
        };
        if plain.len() != size {
            return Err(format!("body of seq {} is not {size} bytes", row.seq));
        }
        let payload = Event::decode(plain.as_slice()).map_err(|e| e.to_string())?;
        Ok(Event {
            tenant: tenant.as_str().to_string(),
            conversation: row.conversation.clone(),
            seq: row.seq,
            event_id: row.event_id.clone(),
            sender: row.sender.clone(),
            server_time_ms: row.time_ms,
            client_msg_id: row.client_msg_id.clone(),
            body: payload.body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_shrinks_short_messages() {
        let mut rng = 7u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let words = [
            "the", "deploy", "meeting", "tomorrow", "thanks", "ok", "review", "PR",
        ];
        let bodies: Vec<Vec<u8>> = (0..5000)
            .map(|_| {
                let n = 2 + next() % 12;
                let text: Vec<&str> = (0..n).map(|_| words[(next() % 8) as usize]).collect();
                text.join(" ").into_bytes()
            })
            .collect();
        let refs: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
        let dict = Dictionary::train(&refs, 6).expect("a dictionary");
        let mut packer = Packer::new(Some(&dict), 6).expect("packer");
        let plain: usize = bodies.iter().map(Vec::len).sum();
        let packed: usize = bodies
            .iter()
            .map(|b| packer.compressor.compress(b).expect("compress").len())
            .sum();
        eprintln!("dict {} bytes: {plain} -> {packed}", dict.len());
        assert!(packed * 2 < plain, "{plain} -> {packed}");
    }
}
