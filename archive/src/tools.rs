//! `tidings archive inspect` and `tidings archive verify`.

use std::collections::BTreeMap;

use prost::Message;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tidings_log::cold::decode_run;
use tidings_log::crypto::Keyring;
use tidings_log::store::{KeyRange, KvStore};
use tidings_log::{LogError, TenantId, keys};
use tidings_schemas::storage::{ArchiveRun, ArchiveSegment};

use crate::archiver::{indexed_segments, scan_all};
use crate::error::ArchiveError;
use crate::format::{Fetched, Footer};
use crate::reader::Segment;
use crate::search_index;
use crate::storage::{self, Objects};

/// One indexed segment, as `inspect` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct SegmentInfo {
    pub tenant: String,
    pub segment: String,
    pub path: String,
    pub date: String,
    pub rows: u64,
    pub bytes: u64,
    pub row_groups: u32,
    pub conversations: u64,
    pub key_id: u32,
    pub min_time_ms: i64,
    pub max_time_ms: i64,
    pub sha256: String,
}

/// Every indexed segment of the tenant, in segment id (= creation) order.
pub async fn inspect(
    store: &dyn KvStore,
    tenant: &TenantId,
) -> Result<Vec<SegmentInfo>, ArchiveError> {
    let dir = keys::segment_dir(tenant);
    let mut out = Vec::new();
    for (key, value) in scan_all(store, KeyRange::prefix(dir.clone())).await? {
        let s = ArchiveSegment::decode(value.as_slice()).map_err(|e| LogError::corrupt(&key, e))?;
        out.push(SegmentInfo {
            tenant: tenant.to_string(),
            segment: keys::last_part(&dir, &key).unwrap_or_default(),
            path: s.path,
            date: s.date,
            rows: s.rows,
            bytes: s.bytes,
            row_groups: s.row_groups,
            conversations: s.conversations,
            key_id: s.key_id,
            min_time_ms: s.min_time_ms,
            max_time_ms: s.max_time_ms,
            sha256: tidings_log::crypto::hex_encode(&s.sha256),
        });
    }
    Ok(out)
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub segments: u64,
    pub rows: u64,
    pub bodies_opened: u64,
    /// Segments whose sealed search index opened and covers their rows (segments archived
    /// before there were indexes have none, which is not a problem).
    pub search_indexes: u64,
    /// Objects under the tenant's prefix that no index record names.
    pub orphans: Vec<String>,
    pub problems: Vec<Problem>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    pub path: String,
    pub problem: String,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks every indexed segment of the tenant: it exists, its bytes match the recorded
/// size and SHA-256, every index run points at exactly the rows it claims, every body
/// opens, and each conversation's runs cover 1..=floor without gaps or overlaps.
pub async fn verify(
    store: &dyn KvStore,
    keyring: &Keyring,
    objects: &Objects,
    tenant: &TenantId,
) -> Result<VerifyReport, ArchiveError> {
    let mut report = VerifyReport::default();
    // Runs per segment, and per conversation in seq order.
    let run_dir = keys::archive_tenant_dir(tenant);
    let mut by_segment: BTreeMap<String, Vec<(String, u64, ArchiveRun)>> = BTreeMap::new();
    let mut by_conv: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for (key, value) in scan_all(store, KeyRange::prefix(run_dir.clone())).await? {
        let run = decode_run(&key, &value)?;
        let (conv, first) = keys::archive_run_parts(&run_dir, &key)
            .ok_or_else(|| LogError::corrupt(&key, "bad archive run key"))?;
        if tidings_log::cold::is_purge_marker(&run) {
            // Retention deleted 1..=last_seq; the runs after it start above.
            by_conv.entry(conv).or_default().push((1, run.last_seq));
            continue;
        }
        by_conv
            .entry(conv.clone())
            .or_default()
            .push((first, run.last_seq));
        by_segment
            .entry(run.segment_id.clone())
            .or_default()
            .push((conv, first, run));
    }
    for (conv, runs) in &by_conv {
        let mut next = 1;
        for &(first, last) in runs {
            if first != next || last < first {
                report.problems.push(Problem {
                    path: format!("index of conversation {conv}"),
                    problem: format!("run {first}..={last} where seq {next} was expected"),
                });
            }
            next = last + 1;
        }
    }

    let segments = scan_all(store, KeyRange::prefix(keys::segment_dir(tenant))).await?;
    for (key, value) in segments {
        let record =
            ArchiveSegment::decode(value.as_slice()).map_err(|e| LogError::corrupt(&key, e))?;
        let id = keys::last_part(&keys::segment_dir(tenant), &key).unwrap_or_default();
        report.segments += 1;
        let runs = by_segment.remove(&id).unwrap_or_default();
        if let Err(problem) =
            verify_segment(keyring, objects, tenant, &record, &runs, &mut report).await
        {
            report.problems.push(Problem {
                path: record.path.clone(),
                problem,
            });
        }
    }
    for (id, _) in by_segment {
        report.problems.push(Problem {
            path: format!("segment {id}"),
            problem: "index runs point at a segment with no record".into(),
        });
    }
    let indexed = indexed_segments(store, tenant).await?;
    for object in objects
        .list(&storage::tenant_prefix(tenant.as_str()))
        .await?
    {
        if !storage::segment_id_of(&object.path).is_some_and(|id| indexed.contains(id)) {
            report.orphans.push(object.path);
        }
    }
    Ok(report)
}

async fn verify_segment(
    keyring: &Keyring,
    objects: &Objects,
    tenant: &TenantId,
    record: &ArchiveSegment,
    runs: &[(String, u64, ArchiveRun)],
    report: &mut VerifyReport,
) -> Result<(), String> {
    let path = record.path.as_str();
    let bytes = objects.get(path).await.map_err(|e| e.to_string())?;
    if bytes.len() as u64 != record.bytes {
        return Err(format!(
            "{} bytes, the index says {}",
            bytes.len(),
            record.bytes
        ));
    }
    if Sha256::digest(&bytes).as_slice() != record.sha256.as_slice() {
        return Err("SHA-256 differs from the one recorded at archive time".into());
    }
    let data = Fetched::whole(bytes);
    let footer = Footer::parse(&data).map_err(|e| e.to_string())?;
    if footer.rows() != record.rows {
        return Err(format!(
            "{} rows, the index says {}",
            footer.rows(),
            record.rows
        ));
    }
    let segment = Segment::open(path, footer, tenant, keyring)
        .await
        .map_err(|e| e.to_string())?;
    let mut indexed_rows = 0;
    for (conv, first, run) in runs {
        let n = (run.last_seq - first + 1) as usize;
        let rg = run.row_group as usize;
        let rows = segment
            .read_indexed(path, &data, rg, run.row_offset as usize, n, conv, *first)
            .map_err(|e| format!("run {conv}/{first}: {e}"))?;
        let events = segment
            .open_rows(path, keyring, &rows)
            .await
            .map_err(|e| e.to_string())?;
        report.bodies_opened += events.len() as u64;
        indexed_rows += n as u64;
    }
    report.rows += record.rows;
    if indexed_rows != record.rows {
        return Err(format!(
            "index runs cover {indexed_rows} rows of {}",
            record.rows
        ));
    }
    let index = search_index::load(objects, keyring, tenant, path)
        .await
        .map_err(|e| format!("search index: {e}"))?;
    if let Some(index) = index {
        if u64::from(index.rows()) != record.rows {
            return Err(format!(
                "the search index covers {} rows of {}",
                index.rows(),
                record.rows
            ));
        }
        report.search_indexes += 1;
    }
    Ok(())
}
