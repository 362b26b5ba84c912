//! The cold tier: events the archiver moved out of the hot log into the archive.
//!
//! The log only knows the archive index (`ax/`): which seqs of a conversation are archived.
//! Reading them is the [`ColdTier`]'s job (the `tidings-archive` crate implements it), so
//! this crate needs no object store or Parquet code. A user's search asks it too
//! ([`ColdTier::search_candidates`]): the archive answers from its segments' sealed search
//! indexes, which only it can read.

use std::ops::RangeInclusive;

use prost::Message;
use tidings_schemas::storage::ArchiveRun;
use tidings_schemas::v1::Event;

use crate::error::LogError;
use crate::ids::{ConvId, TenantId};
use crate::keys;
use crate::search::Needle;
use crate::store::{KeyRange, KvStore, Order};

/// Reads archived events.
#[async_trait::async_trait]
pub trait ColdTier: Send + Sync + 'static {
    /// Events `from..=to` of a conversation in ascending seq order, every one of them below
    /// the conversation's hot floor. Returns exactly `to - from + 1` events or an error.
    async fn read(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        from: u64,
        to: u64,
    ) -> Result<Vec<Event>, LogError>;

    /// The events of each of `wanted`: a conversation and ascending, disjoint ranges of its
    /// archived seqs; each answer ascending by seq, exactly those seqs. What a search opens of
    /// many conversations' candidates at once: the archive decodes each row group they fall in
    /// once for all of them. The caller bounds how many seqs it asks for; this default reads
    /// each range on its own.
    async fn read_ranges(
        &self,
        tenant: &TenantId,
        wanted: &[(ConvId, Vec<RangeInclusive<u64>>)],
    ) -> Result<Vec<Vec<Event>>, LogError> {
        let mut out = Vec::with_capacity(wanted.len());
        for (conv, ranges) in wanted {
            let mut events = Vec::new();
            for r in ranges {
                events.extend(self.read(tenant, conv, *r.start(), *r.end()).await?);
            }
            out.push(events);
        }
        Ok(out)
    }

    /// For each (conversation, archived seqs) of `wanted`, the seqs whose text may hold every
    /// term of `needle`, as ascending, disjoint ranges: a superset of the matches (the caller
    /// opens each and confirms it on its decrypted text). The archive names only the rows its
    /// segments' search indexes list, asking each segment's index once for all of `wanted`;
    /// this default, like a segment without an index, names every seq.
    async fn search_candidates(
        &self,
        tenant: &TenantId,
        wanted: &[(ConvId, RangeInclusive<u64>)],
        needle: &Needle,
    ) -> Result<Vec<Vec<RangeInclusive<u64>>>, LogError> {
        let _ = (tenant, needle);
        Ok(wanted.iter().map(|(_, r)| vec![r.clone()]).collect())
    }
}

/// The last archived seq of a conversation, 0 when nothing is archived: seqs up to it are in
/// the archive, seqs above it in the hot log.
pub async fn archived_through(
    store: &dyn KvStore,
    tenant: &TenantId,
    conv: &ConvId,
) -> Result<u64, LogError> {
    let mut through = archived_through_each(store, tenant, std::slice::from_ref(conv)).await?;
    Ok(through.pop().unwrap_or(0))
}

/// [`archived_through`] of each of `convs`, in one round trip.
pub async fn archived_through_each(
    store: &dyn KvStore,
    tenant: &TenantId,
    convs: &[ConvId],
) -> Result<Vec<u64>, LogError> {
    let ranges = convs
        .iter()
        .map(|c| KeyRange::prefix(keys::archive_run_dir(tenant, c)))
        .collect();
    let lasts = store.scan_each(ranges, 1, Order::Descending).await?;
    lasts
        .iter()
        .map(|last| match last.first() {
            None => Ok(0),
            Some((key, value)) => Ok(decode_run(key, value)?.last_seq),
        })
        .collect()
}

/// The last seq of a conversation that the retention policy deleted, 0 when none: history
/// begins above it. Its marker is the `ax/` key with first seq 0.
pub async fn purged_through(
    store: &dyn KvStore,
    tenant: &TenantId,
    conv: &ConvId,
) -> Result<u64, LogError> {
    let key = keys::purge_marker(tenant, conv);
    decode_purge_marker(&key, store.get(&key).await?)
}

/// [`purged_through`] from the stored value of its key.
pub fn decode_purge_marker(key: &[u8], value: Option<Vec<u8>>) -> Result<u64, LogError> {
    match value {
        None => Ok(0),
        Some(value) => Ok(decode_run(key, &value)?.last_seq),
    }
}

/// Whether an `ax/` run is the retention marker rather than a run of archived rows.
pub fn is_purge_marker(run: &ArchiveRun) -> bool {
    run.segment_id.is_empty()
}

pub fn decode_run(key: &[u8], value: &[u8]) -> Result<ArchiveRun, LogError> {
    ArchiveRun::decode(value).map_err(|e| LogError::corrupt(key, e))
}
