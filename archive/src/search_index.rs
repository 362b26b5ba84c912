//! The sealed search index of one segment, stored at the segment's path with `.search` in
//! [`Objects::search_indexes`](crate::Objects::search_indexes), a sibling of the archive.
//!
//! It maps each term of the segment's texts (posted messages, edits' new texts,
//! conversation titles) to the rows that hold it. Terms are 8-byte HMAC tags under the
//! tenant's search key of the segment's key id (`tidings_log::search`); postings are the
//! rows' positions in the segment, which name (conversation, seq) through the segment's own
//! columns. The whole index is then sealed (AES-256-SIV under the same data key, AD
//! `["tidings-six-v1", tenant, segment, key_id]`), so it opens only for its own segment, shows
//! neither words nor how often a tag occurs, and a changed byte is an error rather than a
//! silently missed result. Shredding the tenant's data keys makes it unreadable like the
//! segment.
//!
//! Version 2 (magic `TSI2`, AD label `tidings-six-v2`) also posts every edit and recall under
//! its kind's term ([`kind_term`]), so compliance lists a segment's edits and recalls
//! without reading its metadata columns; a version 1 index (`TSIX`) lacks them and such a
//! listing scans that segment instead. The version is in the AD: a changed magic does not
//! open.
//!
//! ```text
//! object:  "TSI2" | key_id: u32 BE | sealed( plain )
//! plain:   rows: u32 LE | terms: u32 LE | terms x (tag: 8 | first: u32 LE | count: u32 LE)
//!          | postings: per term, `count` row numbers as LEB128 deltas, ascending
//! ```
//!
//! Not inside the archive itself: Polars refuses a directory holding anything but Parquet.
//!
//! Read by compliance's scan (which rows of a segment to open) and by the cold reader for a
//! user's search (which seqs of a conversation to open), both through [`load`].

use std::collections::BTreeMap;

use parquet::file::metadata::ParquetMetaData;
use tidings_log::Body;
use tidings_log::crypto::{DataKey, Keyring};
use tidings_log::search::{Needle, SearchKey, TAG_LEN, Tag, Term, kind_term, terms};
use tidings_log::{Event, TenantId};

use crate::compliance::hit::event_text;
use crate::error::ArchiveError;
use crate::storage::{self, Objects};

/// Magic and AD label of each version, the oldest first.
const MAGIC_V1: &[u8; 4] = b"TSIX";
const AD_LABEL_V1: &[u8] = b"tidings-six-v1";
const MAGIC: &[u8; 4] = b"TSI2";
const AD_LABEL: &[u8] = b"tidings-six-v2";
/// The kinds whose events version 2 posts under [`kind_term`].
pub const INDEXED_KINDS: [&str; 2] = ["message_edited", "message_recalled"];
const ENTRY_LEN: usize = TAG_LEN + 8;

/// The sealed index of `events` (the segment's rows, in order) as stored.
pub fn build(key: &DataKey, tenant: &TenantId, segment_id: &str, events: &[&Event]) -> Vec<u8> {
    let search = key.search_key(tenant);
    let mut postings: BTreeMap<Tag, Vec<u32>> = BTreeMap::new();
    let kind_tags = INDEXED_KINDS.map(|k| search.tag(&kind_term(k)));
    for (row, event) in events.iter().enumerate() {
        let kind = match &event.body {
            Some(Body::MessageEdited(_)) => Some(&kind_tags[0]),
            Some(Body::MessageRecalled(_)) => Some(&kind_tags[1]),
            _ => None,
        };
        if let Some(tag) = kind {
            postings.entry(*tag).or_default().push(row as u32);
        }
        let Some(text) = event_text(event) else {
            continue;
        };
        for term in terms(text) {
            postings
                .entry(search.tag(&term))
                .or_default()
                .push(row as u32);
        }
    }
    let mut plain = Vec::with_capacity(8 + postings.len() * (ENTRY_LEN + 2));
    plain.extend_from_slice(&(events.len() as u32).to_le_bytes());
    plain.extend_from_slice(&(postings.len() as u32).to_le_bytes());
    let mut blob = Vec::new();
    for (tag, rows) in &postings {
        plain.extend_from_slice(tag);
        plain.extend_from_slice(&(blob.len() as u32).to_le_bytes());
        plain.extend_from_slice(&(rows.len() as u32).to_le_bytes());
        let mut last = 0;
        for &row in rows {
            put_varint(&mut blob, row - last);
            last = row;
        }
    }
    plain.extend_from_slice(&blob);
    let id = key.id.to_be_bytes();
    let sealed = key.seal(&ad(AD_LABEL, tenant, segment_id, &id), &plain);
    let mut out = Vec::with_capacity(8 + sealed.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&id);
    out.extend_from_slice(&sealed);
    out
}

fn ad<'a>(
    label: &'a [u8],
    tenant: &'a TenantId,
    segment_id: &'a str,
    id: &'a [u8; 4],
) -> [&'a [u8]; 4] {
    [label, tenant.as_str().as_bytes(), segment_id.as_bytes(), id]
}

fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u32> {
    let mut v: u64 = 0;
    for shift in (0..35).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return u32::try_from(v).ok();
        }
    }
    None
}

/// The search index of the segment at `segment_path`, read and opened; `None` if the
/// segment has none (it was written before there were indexes, and is scanned instead).
pub async fn load(
    objects: &Objects,
    keyring: &Keyring,
    tenant: &TenantId,
    segment_path: &str,
) -> Result<Option<SegmentIndex>, ArchiveError> {
    let (Some(index_path), Some(segment_id)) = (
        storage::search_index_path(segment_path),
        storage::segment_id_of(segment_path),
    ) else {
        return Ok(None);
    };
    let bytes = match objects.search_indexes().get(&index_path).await {
        Ok(bytes) => bytes,
        Err(ArchiveError::Missing { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    SegmentIndex::open(keyring, tenant, segment_id, &index_path, &bytes)
        .await
        .map(Some)
}

/// One segment's index, opened.
pub struct SegmentIndex {
    pub key_id: u32,
    /// Where the index is stored, for errors.
    path: String,
    rows: u32,
    plain: Vec<u8>,
    terms: usize,
    /// Whether edits and recalls are posted under their kinds' terms (version 2).
    pub kinds: bool,
}

impl SegmentIndex {
    /// Opens a stored index of segment `segment_id`; `path` names it in errors.
    pub async fn open(
        keyring: &Keyring,
        tenant: &TenantId,
        segment_id: &str,
        path: &str,
        bytes: &[u8],
    ) -> Result<SegmentIndex, ArchiveError> {
        let corrupt = |why: &str| ArchiveError::corrupt(path, why);
        let (label, kinds) = match bytes.get(..4) {
            Some(m) if m == MAGIC => (AD_LABEL, true),
            Some(m) if m == MAGIC_V1 => (AD_LABEL_V1, false),
            _ => return Err(corrupt("not a search index")),
        };
        if bytes.len() < 8 {
            return Err(corrupt("not a search index"));
        }
        let id_bytes: [u8; 4] = bytes[4..8].try_into().expect("4 bytes");
        let key_id = u32::from_be_bytes(id_bytes);
        let key = keyring.key(tenant, key_id).await?;
        let sealed = bytes[8..].to_vec();
        let (tenant_owned, segment) = (tenant.clone(), segment_id.to_string());
        // Opening a few MB is CPU work: off the runtime.
        let plain = tokio::task::spawn_blocking(move || {
            key.open(&ad(label, &tenant_owned, &segment, &id_bytes), &sealed)
        })
        .await
        .map_err(|e| ArchiveError::corrupt(path, format!("opening the index failed: {e}")))?
        .map_err(|_| corrupt("the search index fails authentication"))?;
        if plain.len() < 8 {
            return Err(corrupt("search index too short"));
        }
        let rows = u32::from_le_bytes(plain[0..4].try_into().expect("4 bytes"));
        let terms = u32::from_le_bytes(plain[4..8].try_into().expect("4 bytes")) as usize;
        if plain.len() < 8 + terms.saturating_mul(ENTRY_LEN) {
            return Err(corrupt("search index table cut short"));
        }
        Ok(SegmentIndex {
            key_id,
            path: path.to_string(),
            rows,
            plain,
            terms,
            kinds,
        })
    }

    /// How many rows the indexed segment has.
    pub fn rows(&self) -> u32 {
        self.rows
    }

    /// The bytes it holds in memory (for caches).
    pub fn memory_size(&self) -> usize {
        self.plain.len() + self.path.len() + 64
    }

    /// The row number of the first row of each of the segment's row groups (`meta`, its
    /// footer), checked to add up to the rows the index covers.
    pub fn row_group_starts(&self, meta: &ParquetMetaData) -> Result<Vec<u32>, ArchiveError> {
        let mut starts = Vec::with_capacity(meta.num_row_groups());
        let mut at = 0i64;
        for rg in 0..meta.num_row_groups() {
            starts.push(u32::try_from(at).unwrap_or(u32::MAX));
            at += meta.row_group(rg).num_rows().max(0);
        }
        if i64::from(self.rows) != at {
            return Err(ArchiveError::corrupt(
                &self.path,
                format!("indexes {} rows, the segment has {at}", self.rows),
            ));
        }
        Ok(starts)
    }

    fn entry(&self, i: usize) -> (&[u8], usize, usize) {
        let at = 8 + i * ENTRY_LEN;
        let e = &self.plain[at..at + ENTRY_LEN];
        let first = u32::from_le_bytes(e[TAG_LEN..TAG_LEN + 4].try_into().expect("4 bytes"));
        let count = u32::from_le_bytes(e[TAG_LEN + 4..].try_into().expect("4 bytes"));
        (&e[..TAG_LEN], first as usize, count as usize)
    }

    /// The rows holding `tag`, ascending; `None` if the postings are damaged (the seal
    /// makes that a bug, not an attack).
    fn postings(&self, tag: &Tag) -> Option<Vec<u32>> {
        let (mut lo, mut hi) = (0, self.terms);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.entry(mid).0.cmp(tag.as_slice()) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    let (_, first, count) = self.entry(mid);
                    let blob = &self.plain[8 + self.terms * ENTRY_LEN..];
                    let mut at = first;
                    let mut row = 0u32;
                    let mut out = Vec::with_capacity(count);
                    for _ in 0..count {
                        row = row.checked_add(get_varint(blob, &mut at)?)?;
                        out.push(row);
                    }
                    return Some(out);
                }
            }
        }
        Some(Vec::new())
    }

    /// The rows that hold every term of `needle` (all rows if it has none), ascending.
    pub fn candidates(&self, key: &SearchKey, needle: &Needle) -> Result<Vec<u32>, ArchiveError> {
        let terms: Vec<&Term> = needle.terms().iter().collect();
        self.holding_all(key, &terms)
    }

    /// The rows that hold every term of any one of `any_of`, ascending.
    pub fn holding_any(
        &self,
        key: &SearchKey,
        any_of: &[Vec<Term>],
    ) -> Result<Vec<u32>, ArchiveError> {
        let mut rows = Vec::new();
        for terms in any_of {
            let terms: Vec<&Term> = terms.iter().collect();
            rows.extend(self.holding_all(key, &terms)?);
        }
        rows.sort_unstable();
        rows.dedup();
        Ok(rows)
    }

    /// The rows that hold every one of `terms` (all rows if none), ascending.
    fn holding_all(&self, key: &SearchKey, terms: &[&Term]) -> Result<Vec<u32>, ArchiveError> {
        debug_assert_eq!(key.id, self.key_id);
        if terms.is_empty() {
            return Ok((0..self.rows).collect());
        }
        let mut lists = Vec::with_capacity(terms.len());
        for term in terms {
            let list = self.postings(&key.tag(term)).ok_or_else(|| {
                ArchiveError::corrupt(&self.path, "search index postings damaged")
            })?;
            if list.is_empty() {
                return Ok(Vec::new());
            }
            lists.push(list);
        }
        lists.sort_by_key(Vec::len);
        let mut rows = lists.remove(0);
        for other in &lists {
            rows.retain(|r| other.binary_search(r).is_ok());
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        let mut out = Vec::new();
        for v in [0, 1, 127, 128, 300, u32::MAX] {
            put_varint(&mut out, v);
        }
        let mut at = 0;
        for v in [0, 1, 127, 128, 300, u32::MAX] {
            assert_eq!(get_varint(&out, &mut at), Some(v));
        }
        assert_eq!(get_varint(&[0x80, 0x80], &mut 0), None);
    }
}
