//! Retention: the archiver deletes events older than a tenant's retention, on both tiers,
//! except what a legal hold covers.
//!
//! The archive pass first moves everything past retention out of the hot log (the hot
//! window is shortened to the retention for that), so deletion has one path: the archive.
//! Each segment holding expired rows is then deleted whole, or rewritten without them
//! (write, verify, one transaction that swaps the index, then the old object is deleted; a
//! crash leaves an unindexed object that the orphan sweep removes).
//!
//! A conversation's history stays one contiguous run: retention deletes only a prefix of
//! it, recorded by the retention marker (`ax/<tenant>/<conv>/0`), and reads begin above
//! the marker. So an expired event is deleted only if every earlier event of its
//! conversation is deleted too; an expired event after a held one waits until the hold is
//! released. Held data is never deleted; expired events kept for a hold are counted and
//! recorded in the audit log as refused deletions.

use std::collections::{BTreeSet, HashMap};

use prost::Message;
use serde_json::json;
use tidings_log::cold::{decode_run, is_purge_marker};
use tidings_log::store::{KeyRange, StoreError, Transaction};
use tidings_log::{ConvId, LogError, TenantId, keys};
use tidings_schemas::storage::{ArchiveRun, ArchiveSegment};

use super::audit::{self, Entry};
use super::{Actor, ComplianceError, HoldSet, Via, rfc3339_ms};
use crate::archiver::{Archiver, Pending, Replace, Summary, scan_all};
use crate::error::ArchiveError;
use crate::format;
use crate::reader::{Segment, fetch_footer};
use crate::storage;

fn into_archive(e: ComplianceError) -> ArchiveError {
    match e {
        ComplianceError::Archive(a) => a,
        ComplianceError::Log(l) => l.into(),
        other => ArchiveError::Config(other.to_string()),
    }
}

/// Where each conversation's deletable prefix continues: the seq retention may delete
/// next (one above its marker and what this pass already deleted).
struct Frontier<'a> {
    archiver: &'a Archiver,
    tenant: &'a TenantId,
    /// conversation -> (marker as read, next deletable seq; 0 once blocked)
    next: HashMap<String, (Option<Vec<u8>>, u64)>,
}

impl Frontier<'_> {
    async fn entry(&mut self, conv: &str) -> Result<&mut (Option<Vec<u8>>, u64), ArchiveError> {
        if !self.next.contains_key(conv) {
            let key = keys::purge_marker(self.tenant, &ConvId::new(conv)?);
            let old = self
                .archiver
                .store
                .get(&key)
                .await
                .map_err(LogError::from)?;
            let through = match &old {
                Some(v) => decode_run(&key, v)?.last_seq,
                None => 0,
            };
            self.next.insert(conv.to_string(), (old, through + 1));
        }
        Ok(self.next.get_mut(conv).expect("inserted above"))
    }
}

impl Archiver {
    /// Deletes the tenant's events older than `retention_ms` from the archive, keeping held
    /// ones, and records what it did in the tenant's audit log.
    pub(crate) async fn enforce_retention(
        &self,
        tenant: &TenantId,
        retention_ms: u64,
        summary: &mut Summary,
    ) -> Result<(), ArchiveError> {
        let cutoff = tidings_log::now_ms().saturating_sub(retention_ms.min(i64::MAX as u64) as i64);
        let holds = HoldSet::resolve(&*self.store, &self.keyring, Some(&self.objects), tenant)
            .await
            .map_err(into_archive)?;
        let mut runs_by_segment: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        let run_dir = keys::archive_tenant_dir(tenant);
        for (key, value) in scan_all(&*self.store, KeyRange::prefix(run_dir)).await? {
            let run = decode_run(&key, &value)?;
            if !is_purge_marker(&run) {
                runs_by_segment.entry(run.segment_id).or_default().push(key);
            }
        }
        let seg_dir = keys::segment_dir(tenant);
        let mut segments = Vec::new();
        for (key, value) in scan_all(&*self.store, KeyRange::prefix(seg_dir.clone())).await? {
            let record =
                ArchiveSegment::decode(value.as_slice()).map_err(|e| LogError::corrupt(&key, e))?;
            if record.min_time_ms < cutoff {
                segments.push((key, value, record));
            }
        }
        // Oldest first, so each conversation's rows come in seq order.
        segments.sort_by(|a, b| {
            (&a.2.date, a.2.created_ms, &a.0).cmp(&(&b.2.date, b.2.created_ms, &b.0))
        });

        let mut frontier = Frontier {
            archiver: self,
            tenant,
            next: HashMap::new(),
        };
        let (mut purged, mut held) = (0u64, 0u64);
        let mut held_by = BTreeSet::new();
        for (seg_key, seg_value, record) in segments {
            let id = keys::last_part(&seg_dir, &seg_key)
                .ok_or_else(|| LogError::corrupt(&seg_key, "bad segment key"))?;
            let path = record.path.as_str();
            let footer = fetch_footer(&self.objects, path).await?;
            let segment = Segment::open(path, footer, tenant, &self.keyring).await?;
            // Decide row by row from the plain columns; nothing is opened to delete.
            let mut kept: Vec<Vec<usize>> = Vec::new();
            let mut through: HashMap<String, u64> = HashMap::new();
            let mut deleting = 0u64;
            for rg in 0..segment.footer.meta.num_row_groups() {
                let data = segment
                    .fetch(&self.objects, path, segment.footer.meta_range(rg))
                    .await?;
                let meta = format::read_meta(&segment.footer, &data, rg)
                    .map_err(|e| ArchiveError::corrupt(path, e))?;
                let mut keep = Vec::new();
                for i in 0..meta.seq.len() {
                    let conv = std::str::from_utf8(meta.conversation[i].data())
                        .map_err(|e| ArchiveError::corrupt(path, e))?;
                    let (seq, time) = (meta.seq[i] as u64, meta.time[i]);
                    let hold = holds.holding(conv, time);
                    let next = &mut frontier.entry(conv).await?.1;
                    if time < cutoff && hold.is_none() && *next == seq {
                        *next = seq + 1;
                        through.insert(conv.to_string(), seq);
                        deleting += 1;
                    } else {
                        if time < cutoff {
                            held += 1;
                            if let Some(h) = hold {
                                held_by.insert(h.to_string());
                            }
                        }
                        // Nothing after a kept event of this conversation may go.
                        *next = 0;
                        keep.push(i);
                    }
                }
                kept.push(keep);
            }
            if deleting == 0 {
                continue;
            }
            let mut markers = Vec::new();
            for (conv, last_seq) in through {
                let key = keys::purge_marker(tenant, &ConvId::new(conv.as_str())?);
                let old = frontier.entry(&conv).await?.0.clone();
                let value = ArchiveRun {
                    last_seq,
                    ..ArchiveRun::default()
                }
                .encode_to_vec();
                frontier.next.get_mut(&conv).expect("read above").0 = Some(value.clone());
                markers.push((key, old, value));
            }
            let replace = Replace {
                segment_key: seg_key.clone(),
                segment_value: seg_value,
                run_keys: runs_by_segment.remove(&id).unwrap_or_default(),
                markers,
            };
            if kept.iter().all(Vec::is_empty) {
                let mut txn = Transaction::new();
                txn.expect(
                    replace.segment_key.clone(),
                    Some(replace.segment_value.clone()),
                )
                .delete(replace.segment_key.clone());
                for key in &replace.run_keys {
                    txn.delete(key.clone());
                }
                for (key, expected, value) in &replace.markers {
                    txn.expect(key.clone(), expected.clone())
                        .put(key.clone(), value.clone());
                }
                self.store.commit(txn).await.map_err(|e| match e {
                    StoreError::Conflict { .. } => ArchiveError::Conflict {
                        tenant: tenant.to_string(),
                    },
                    other => LogError::from(other).into(),
                })?;
                summary.segments_purged += 1;
            } else {
                let key = self.keyring.key(tenant, segment.key_id).await?;
                let mut pending = Vec::new();
                let mut opener = segment.opener();
                for (rg, keep) in kept.iter().enumerate() {
                    if keep.is_empty() {
                        continue;
                    }
                    let data = segment
                        .fetch(&self.objects, path, segment.footer.row_group_range(rg))
                        .await?;
                    let rows = format::read_rows_at(&segment.footer, &data, rg, keep)
                        .map_err(|e| ArchiveError::corrupt(path, e))?;
                    for row in &rows {
                        let event = opener
                            .open(&key, tenant, row)
                            .map_err(|e| ArchiveError::corrupt(path, e))?;
                        pending.push(Pending::new(event));
                    }
                }
                self.write_segment(tenant, &record.date, pending, Some(&replace))
                    .await?;
                summary.segments_rewritten += 1;
            }
            // The index no longer names the old object; if this delete fails, the orphan
            // sweep of a later pass removes it.
            if let Err(e) = self.objects.delete(path).await {
                tracing::warn!(%path, error = %e, "could not delete a segment retention replaced");
            }
            if let Some(index) = storage::search_index_path(path)
                && let Err(e) = self.objects.search_indexes().delete(&index).await
            {
                tracing::warn!(path = %index, error = %e, "could not delete the search index of a segment retention replaced");
            }
            purged += deleting;
        }
        // What retention purged leaves nothing findable: hot postings and fates go too.
        for conv in frontier.next.keys() {
            tidings_log::hot_index::forget_purged(
                &*self.store,
                tenant,
                &ConvId::new(conv.as_str())?,
            )
            .await?;
        }
        summary.events_purged += purged;
        summary.events_held += held;
        if purged > 0 || held > 0 {
            let actor = Actor::new("archiver", Via::Archiver).expect("a valid actor name");
            let mut entry = Entry::new(&actor, "retention", "completed");
            entry.access_id = uuid::Uuid::now_v7().to_string();
            entry.rows = purged;
            entry.filters =
                json!({"older_than": rfc3339_ms(cutoff), "retention_ms": retention_ms}).to_string();
            entry.detail = format!("deleted {purged} events older than {}", rfc3339_ms(cutoff));
            audit::append(&*self.store, &self.keyring, tenant, &entry).await?;
            if held > 0 {
                entry.outcome = "refused".into();
                entry.rows = held;
                entry.detail = format!(
                    "kept {held} expired events: legal hold(s) {} cover them or an earlier event \
                     of their conversation",
                    held_by.into_iter().collect::<Vec<_>>().join(", ")
                );
                audit::append(&*self.store, &self.keyring, tenant, &entry).await?;
            }
        }
        Ok(())
    }
}
