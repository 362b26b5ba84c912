//! The writer's exact cache of the keys only it writes (heads and memberships): its bound,
//! and what is dropped when the store may no longer match it.

use std::collections::HashMap;

use crate::keys;
use crate::lease::partition_of_part;

/// The committed values of the keys only this writer writes (heads and memberships),
/// `None` meaning "absent". Exact as long as this writer is the only one; dropped whole when
/// a commit fails (the store may then differ) or when it reaches its bound.
pub(crate) struct Cache {
    entries: HashMap<Vec<u8>, Option<Vec<u8>>>,
    max_entries: usize,
}

impl Cache {
    pub fn new(max_entries: usize) -> Self {
        Cache {
            entries: HashMap::new(),
            max_entries,
        }
    }

    fn cacheable(key: &[u8]) -> bool {
        key.starts_with(b"hd\0") || key.starts_with(b"mb\0")
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.entries.get(key)
    }

    pub(super) fn remember(&mut self, key: &[u8], value: Option<&Vec<u8>>) {
        if !Self::cacheable(key) {
            return;
        }
        if self.entries.len() >= self.max_entries && !self.entries.contains_key(key) {
            // Simple and exact: start over rather than track recency.
            self.entries.clear();
        }
        self.entries.insert(key.to_vec(), value.cloned());
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    /// Drops what is cached of one partition's conversations: another writer may have
    /// changed them while this one did not own it.
    pub(crate) fn forget_partition(&mut self, partition: u32, partitions: u32) {
        self.entries.retain(|key, _| {
            keys::conversation_part(key)
                .is_none_or(|part| partition_of_part(part, partitions) != partition)
        });
    }
}
