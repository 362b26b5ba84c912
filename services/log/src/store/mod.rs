//! The `KvStore` interface and its backends.
//!
//! The log needs little from a store: point reads, ordered scans both ways, and atomic
//! transactions whose writes all land or none do, guarded by checks (a key still holds the
//! value we read, a key is still absent). TiKV's optimistic transactions and the embedded
//! fjall backend both give exactly that. [`conformance`] holds the tests every backend must
//! pass.

pub mod conformance;
mod embedded;
pub mod faults;
pub mod metered;
#[cfg(feature = "tikv")]
mod tikv;
pub mod tikv_config;

pub use embedded::FjallStore;
pub use faults::{Fault, FaultSwitch, FaultyStore};
pub use metered::MeteredStore;
#[cfg(feature = "tikv")]
pub use tikv::TikvStore;
pub use tikv_config::{TikvConfig, TlsPaths};

use async_trait::async_trait;

/// A half-open key range `[start, end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
}

impl KeyRange {
    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: Vec<u8>) -> Self {
        let end = prefix_end(&prefix);
        KeyRange { start: prefix, end }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && (self.end.is_empty() || key < self.end.as_slice())
    }
}

/// The smallest key greater than every key with this prefix; empty means "no upper bound".
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    end
}

/// One operation of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// Fails the whole transaction with [`StoreError::Conflict`] if the key exists.
    PutIfAbsent {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    /// Fails the whole transaction unless the key holds exactly `value` (`None`: absent).
    Expect {
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    },
}

/// An atomic set of checks and writes: all of them apply, or none does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transaction {
    pub ops: Vec<Op>,
}

impl Transaction {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> &mut Self {
        self.ops.push(Op::Put { key, value });
        self
    }
    pub fn put_if_absent(&mut self, key: Vec<u8>, value: Vec<u8>) -> &mut Self {
        self.ops.push(Op::PutIfAbsent { key, value });
        self
    }
    pub fn delete(&mut self, key: Vec<u8>) -> &mut Self {
        self.ops.push(Op::Delete { key });
        self
    }
    pub fn expect(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Expect { key, value });
        self
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

pub use tidings_log_api::{Order, StoreError};

/// Key-value pairs as a scan returns them.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// An ordered, transactional key-value store.
#[async_trait]
pub trait KvStore: Send + Sync + 'static {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// One result per key, in the order of `keys`.
    async fn batch_get(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError>;

    /// Up to `limit` pairs of `range`, in key order or reverse key order.
    async fn scan(
        &self,
        range: KeyRange,
        limit: usize,
        order: Order,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError>;

    /// Up to `limit` pairs of each of `ranges`, in the order of `ranges`: one round trip where
    /// a reader needs a few rows of many key ranges (each of a user's conversations' archive
    /// floor). The default scans each range in turn; `limit` times the number of ranges is
    /// bounded like one scan's limit.
    async fn scan_each(
        &self,
        ranges: Vec<KeyRange>,
        limit: usize,
        order: Order,
    ) -> Result<Vec<Pairs>, StoreError> {
        let mut out = Vec::with_capacity(ranges.len());
        for range in ranges {
            out.push(self.scan(range, limit, order).await?);
        }
        Ok(out)
    }

    /// Applies the transaction atomically. Returns only once it is durable: a crash of the
    /// process (or, for the embedded store, of the machine) right after keeps it.
    async fn commit(&self, txn: Transaction) -> Result<(), StoreError>;

    /// Makes deleted values unrecoverable from the store's files: flush and compact, so that
    /// no file of the store still holds a value that was deleted or overwritten before the
    /// call. Live values are untouched. Slow (it may rewrite everything the store holds):
    /// for rare operations such as shredding a tenant's keys, not for every delete.
    async fn purge_deleted(&self) -> Result<(), StoreError>;

    /// Whether at most one process can have this store open at a time (the embedded store
    /// locks its directory). Then a lease held by a writer that is not alive in this process
    /// belongs to a process that is gone (a crash), and is taken at once rather than after
    /// it expires. Shared stores (TiKV) keep the default, `false`.
    fn single_process(&self) -> bool {
        false
    }
}

/// Rows read per page by [`Pages`]: what one step of a streaming read holds in memory.
pub const PAGE_ROWS: usize = 1000;

/// A key range read page by page: a reader holds one page at a time, however many rows the
/// range has (a tenant's heads, its audit log, a conversation's search postings).
pub struct Pages {
    next: Option<KeyRange>,
}

impl Pages {
    pub fn new(range: KeyRange) -> Self {
        Pages { next: Some(range) }
    }

    /// The next page (at most [`PAGE_ROWS`] pairs, in key order); `None` once done.
    pub async fn next(
        &mut self,
        store: &dyn KvStore,
    ) -> Result<Option<Vec<(Vec<u8>, Vec<u8>)>>, crate::LogError> {
        let Some(range) = self.next.take() else {
            return Ok(None);
        };
        let page = store
            .scan(range.clone(), PAGE_ROWS, Order::Ascending)
            .await?;
        if page.len() == PAGE_ROWS
            && let Some((last, _)) = page.last()
        {
            let mut start = last.clone();
            start.push(0);
            self.next = Some(KeyRange {
                start,
                end: range.end,
            });
        }
        Ok((!page.is_empty()).then_some(page))
    }
}
