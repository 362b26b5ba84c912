//! How many conversations a user may create: a token bucket per (tenant, user).
//!
//! Creating a conversation is the one write that makes new state without bound (a head,
//! memberships, an entry in every member's list, a hub on every gateway with a member
//! online). A rate, not a total: a long-lived account legitimately accumulates thousands
//! of conversations, but none needs to make more than `per_hour` in an hour. The buckets
//! live in the memory of the writer that owns the conversation's partition, so with W
//! writers a user can reach at most W × `per_hour` an hour; a restart refills them. A
//! durable total would need a counter written in the same transaction as every create
//! (and across partitions), for a bound that the rate already gives per unit of time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ids::{TenantId, UserId};

/// Users tracked at once. Past it, the buckets that have refilled (whose users are idle)
/// are forgotten first; forgetting one only gives its user a full bucket again.
const MAX_TRACKED: usize = 100_000;

pub(crate) struct CreationQuota {
    per_hour: f64,
    buckets: Mutex<HashMap<(TenantId, UserId), Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl CreationQuota {
    pub(crate) fn new(per_hour: u32) -> Self {
        CreationQuota {
            per_hour: f64::from(per_hour.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, b: Bucket, now: Instant) -> f64 {
        let rate = self.per_hour / 3600.0;
        (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(self.per_hour)
    }

    /// Takes one creation for the user; `Err(wait)` when the bucket is empty.
    pub(crate) fn take(&self, t: &TenantId, u: &UserId, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let key = (t.clone(), u.clone());
        if !buckets.contains_key(&key) && buckets.len() >= MAX_TRACKED {
            buckets.retain(|_, b| self.refilled(*b, now) < self.per_hour);
            if buckets.len() >= MAX_TRACKED
                && let Some(victim) = buckets.keys().next().cloned()
            {
                buckets.remove(&victim);
            }
        }
        let full = Bucket {
            tokens: self.per_hour,
            last: now,
        };
        let b = buckets.entry(key).or_insert(full);
        let tokens = self.refilled(*b, now);
        if tokens >= 1.0 {
            *b = Bucket {
                tokens: tokens - 1.0,
                last: now,
            };
            Ok(())
        } else {
            *b = Bucket { tokens, last: now };
            let rate = self.per_hour / 3600.0;
            Err(Duration::from_secs_f64((1.0 - tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_per_hour_creations_then_waits_and_others_are_not_affected() {
        let q = CreationQuota::new(3);
        let t = TenantId::new("acme".to_string()).expect("t");
        let (bob, alice) = (
            UserId::new("bob".to_string()).expect("u"),
            UserId::new("alice".to_string()).expect("u"),
        );
        let now = Instant::now();
        for _ in 0..3 {
            q.take(&t, &bob, now).expect("within the quota");
        }
        let wait = q.take(&t, &bob, now).expect_err("over the quota");
        assert!(wait > Duration::from_secs(1000) && wait <= Duration::from_secs(1200));
        q.take(&t, &alice, now).expect("another user");
        q.take(&t, &bob, now + Duration::from_secs(1200))
            .expect("refilled by one after 20 minutes");
    }
}
