//! A `KvStore` that counts the reads passing through it, by keyspace (`ev`, `mb`, …: the
//! two letters every key starts with, see `keys.rs`; the rarely read `ks` and `ah` are
//! `other`, as a label has at most 16 values), as `tidings_store_reads_total{space}`.
//! It adds behaviour by wrapping, as [`FaultyStore`](super::FaultyStore) does: the server
//! wraps whatever backend it opened, so "this answer read nothing from the store" can be
//! checked from outside, per keyspace, whichever backend runs.

use std::sync::Arc;

use async_trait::async_trait;

use super::{KeyRange, KvStore, Order, Pairs, StoreError, Transaction};
use tidings_log_api::metrics::LabeledCounter;

/// Reads by keyspace: a `get` or a `scan` counts one, a `batch_get` one per key, a
/// `scan_each` one per range.
pub static READS: LabeledCounter = LabeledCounter::new(
    "tidings_store_reads_total",
    "Store reads by keyspace (the key's two-letter prefix): a get or a range scan counts one, \
     a batch get one per key.",
    "space",
    &[
        "ev", "hd", "dd", "mb", "mc", "uc", "kr", "ax", "sg", "au", "lh", "rv", "ls", "sy", "other",
    ],
);

/// The keyspace label of `key`: its two-letter prefix, or `other`.
pub fn space(key: &[u8]) -> &str {
    match key.get(..2).map(std::str::from_utf8) {
        Some(Ok(prefix)) if READS.knows(prefix) => prefix,
        _ => "other",
    }
}

/// Wraps a store and counts its reads in [`READS`].
pub struct MeteredStore {
    inner: Arc<dyn KvStore>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn KvStore>) -> MeteredStore {
        MeteredStore { inner }
    }
}

#[async_trait]
impl KvStore for MeteredStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        READS.inc(space(key));
        self.inner.get(key).await
    }

    async fn batch_get(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        for key in &keys {
            READS.inc(space(key));
        }
        self.inner.batch_get(keys).await
    }

    async fn scan(
        &self,
        range: KeyRange,
        limit: usize,
        order: Order,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        READS.inc(space(&range.start));
        self.inner.scan(range, limit, order).await
    }

    async fn scan_each(
        &self,
        ranges: Vec<KeyRange>,
        limit: usize,
        order: Order,
    ) -> Result<Vec<Pairs>, StoreError> {
        for range in &ranges {
            READS.inc(space(&range.start));
        }
        self.inner.scan_each(ranges, limit, order).await
    }

    async fn commit(&self, txn: Transaction) -> Result<(), StoreError> {
        self.inner.commit(txn).await
    }

    async fn purge_deleted(&self) -> Result<(), StoreError> {
        self.inner.purge_deleted().await
    }

    fn single_process(&self) -> bool {
        self.inner.single_process()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FjallStore;

    #[test]
    fn keys_are_counted_under_their_keyspace() {
        assert_eq!(space(b"mb\0acme\0team\0bob"), "mb");
        assert_eq!(space(b"ev\0acme"), "ev");
        assert_eq!(space(b"zz\0x"), "other");
        assert_eq!(space(b"m"), "other");
        assert_eq!(space(&[0xff, 0xfe, 0]), "other");
    }

    #[tokio::test]
    async fn reads_pass_through_and_are_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner: Arc<dyn KvStore> = Arc::new(FjallStore::open(dir.path()).expect("store"));
        let store = MeteredStore::new(inner);
        let before = READS.get("lh");
        assert_eq!(store.get(b"lh\0a").await.expect("get"), None);
        store
            .batch_get(vec![b"lh\0b".to_vec(), b"lh\0c".to_vec()])
            .await
            .expect("batch_get");
        store
            .scan(KeyRange::prefix(b"lh\0".to_vec()), 10, Order::Ascending)
            .await
            .expect("scan");
        assert_eq!(READS.get("lh") - before, 4);
    }
}
