//! Shedding at the edge: sends to a conversation the log is limiting are refused here until
//! its window ends, so a flood does not cost a log round trip (and, over NATS, a sealed
//! request) per refused message.
//!
//! The log's overload control refuses a conversation's sends with `rate_limited` and
//! `retry_after_ms` = the end of its window, when the conversation's allowance renews
//! (`tidings_log_api::overload`). Until then the log would refuse every send of it again, so
//! the gateway answers them itself with the same code and the time left. After the window
//! the next send goes to the log, which decides afresh. Nothing else is shed: other
//! conversations, and every other operation, go to the log as before.
//!
//! The table is bounded ([`MAX_SHED_CONVERSATIONS`]); when full of live entries a new
//! refusal is simply not remembered, and the log keeps refusing on its own.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tidings_log_api::{ConvId, LogError, TenantId};

/// Conversations remembered as limited at once, per gateway.
pub const MAX_SHED_CONVERSATIONS: usize = 10_000;

/// Longest a refusal is remembered, whatever the log said: a bound on a wrong answer.
pub const MAX_SHED_WINDOW: Duration = Duration::from_secs(10);

/// What a shed send is refused with (the log's refusal says the same).
pub const SHED_WHAT: &str = "messages in this conversation while the log is overloaded";

/// The conversations the log is limiting, until when (see the module docs).
#[derive(Default)]
pub struct EdgeShed {
    until: Mutex<HashMap<(TenantId, ConvId), Instant>>,
    shed: AtomicU64,
}

impl EdgeShed {
    /// `Err(rate_limited)` if the conversation's sends are being shed now.
    pub fn check(&self, t: &TenantId, c: &ConvId, now: Instant) -> Result<(), LogError> {
        let mut until = self.until.lock().unwrap_or_else(|p| p.into_inner());
        let key = (t.clone(), c.clone());
        let Some(end) = until.get(&key).copied() else {
            return Ok(());
        };
        if end <= now {
            until.remove(&key);
            return Ok(());
        }
        self.shed.fetch_add(1, Ordering::Relaxed);
        Err(LogError::RateLimited {
            what: SHED_WHAT,
            retry_after_ms: end.duration_since(now).as_millis() as u64 + 1,
        })
    }

    /// Remembers a refusal of the log: the conversation's sends are shed for
    /// `retry_after_ms` (capped by [`MAX_SHED_WINDOW`]). Other errors are ignored.
    pub fn refused(&self, t: &TenantId, c: &ConvId, e: &LogError, now: Instant) {
        if e.code() != "rate_limited" || e.retry_after_ms() == 0 {
            return;
        }
        let wait = Duration::from_millis(e.retry_after_ms()).min(MAX_SHED_WINDOW);
        let mut until = self.until.lock().unwrap_or_else(|p| p.into_inner());
        if until.len() >= MAX_SHED_CONVERSATIONS {
            until.retain(|_, end| *end > now);
            if until.len() >= MAX_SHED_CONVERSATIONS {
                return;
            }
        }
        until.insert((t.clone(), c.clone()), now + wait);
    }

    /// Sends refused here, without asking the log, since the gateway started.
    pub fn shed(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    /// Conversations remembered now (expired ones included until next looked at).
    pub fn len(&self) -> usize {
        self.until.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(c: &str) -> (TenantId, ConvId) {
        (
            TenantId::new("acme".to_string()).expect("tenant"),
            ConvId::new(c.to_string()).expect("conv"),
        )
    }

    fn limited(ms: u64) -> LogError {
        LogError::RateLimited {
            what: SHED_WHAT,
            retry_after_ms: ms,
        }
    }

    #[test]
    fn a_limited_conversation_is_shed_until_its_window_ends_and_no_other() {
        let shed = EdgeShed::default();
        let (t, hot) = ids("hot");
        let (_, other) = ids("other");
        let now = Instant::now();
        shed.refused(&t, &hot, &limited(300), now);
        let e = shed
            .check(&t, &hot, now + Duration::from_millis(100))
            .expect_err("shed");
        assert_eq!(e.code(), "rate_limited");
        assert_eq!(e.retry_after_ms(), 201);
        shed.check(&t, &other, now)
            .expect("another conversation goes on");
        shed.check(&t, &hot, now + Duration::from_millis(300))
            .expect("the window ended");
        assert_eq!(shed.shed(), 1);
        assert!(shed.is_empty(), "the expired entry is gone");
    }

    #[test]
    fn only_rate_limits_with_a_window_are_remembered_and_windows_are_capped() {
        let shed = EdgeShed::default();
        let (t, c) = ids("c");
        let now = Instant::now();
        shed.refused(&t, &c, &LogError::ShuttingDown, now);
        shed.refused(&t, &c, &limited(0), now);
        assert!(shed.is_empty());
        shed.refused(&t, &c, &limited(3_600_000), now);
        shed.check(&t, &c, now + MAX_SHED_WINDOW)
            .expect("capped at MAX_SHED_WINDOW");
    }

    #[test]
    fn the_table_is_bounded() {
        let shed = EdgeShed::default();
        let now = Instant::now();
        for i in 0..MAX_SHED_CONVERSATIONS + 10 {
            let (t, c) = ids(&format!("c{i}"));
            shed.refused(&t, &c, &limited(1000), now);
        }
        assert_eq!(shed.len(), MAX_SHED_CONVERSATIONS);
        // Once the entries expired, new refusals are remembered again.
        let (t, c) = ids("late");
        shed.refused(&t, &c, &limited(1000), now + Duration::from_secs(2));
        assert_eq!(shed.len(), 1);
    }
}
