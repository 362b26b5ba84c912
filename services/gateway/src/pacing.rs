//! Pacing of big groups' fan-outs (docs/decisions/paced-fan-out.md).
//!
//! A 10,000-member group's event is 10,000 session writes on this gateway and 10,000 socket
//! reads on the other side. Done as fast as the cores allow, each such burst saturates them
//! for tens of milliseconds, and a small conversation's message that lands inside one waits
//! for it at every hop (the session reader, the log, NATS, the hub, the session writer).
//! The [`Pacer`] gives big groups' fan-outs a budget of pushes a second on this gateway,
//! shared by all of them: a burst past it is spread out in time, so the cores keep room for
//! everything else, and a big group's members get the event a little later instead of every
//! small conversation getting theirs late.
//!
//! It is a generic cell rate algorithm (GCRA): one "theoretical arrival time" under a lock,
//! no task of its own. Hubs reserve pushes a slice at a time and sleep until theirs may go.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Pushes big groups' fan-outs may make at once after a quiet spell before pacing bites:
/// two milliseconds or so of writes, short enough not to be felt by the rest (1,024 was
/// measured worse: each flood message began with a burst the small conversations felt;
/// BENCHMARKS.md). Never more than [`BURST_TIME`] of the budget, so a small budget is not
/// spent in one go.
pub const BURST_PUSHES: u64 = 128;
pub const BURST_TIME: Duration = Duration::from_millis(100);

/// The gateway's budget for big groups' pushes; shared by every hub.
pub struct Pacer {
    /// Time one push takes of the budget; zero: not paced.
    per_push: Duration,
    /// How far ahead of now the reservations may run without waiting (the burst).
    tolerance: Duration,
    /// When the budget is next free (the GCRA's theoretical arrival time).
    next_free: Mutex<Option<Instant>>,
    /// Microseconds hubs were told to wait, for the metrics.
    waited_us: AtomicU64,
}

impl Pacer {
    /// A pacer of `pushes_per_sec` (0: off).
    pub fn new(pushes_per_sec: u64) -> Self {
        let per_push = 1_000_000_000u64
            .checked_div(pushes_per_sec)
            .map_or(Duration::ZERO, |ns| Duration::from_nanos(ns.max(1)));
        Pacer {
            per_push,
            tolerance: (per_push * BURST_PUSHES as u32).min(BURST_TIME),
            next_free: Mutex::new(None),
            waited_us: AtomicU64::new(0),
        }
    }

    /// Whether pushes are paced at all.
    pub fn enabled(&self) -> bool {
        !self.per_push.is_zero()
    }

    /// Reserves `n` pushes; returns how long the caller must wait before making them
    /// (`None`: at once). Reservations are served in the order they are made.
    pub fn reserve(&self, n: usize, now: Instant) -> Option<Duration> {
        if !self.enabled() {
            return None;
        }
        let cost = self.per_push * u32::try_from(n).unwrap_or(u32::MAX);
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let start = next.map_or(now, |t| t.max(now));
        let end = start + cost;
        *next = Some(end);
        // The reservation may run `tolerance` ahead of now; past that it waits its excess.
        let wait = end
            .checked_duration_since(now + self.tolerance)
            .filter(|w| !w.is_zero())?;
        self.waited_us
            .fetch_add(wait.as_micros() as u64, Ordering::Relaxed);
        Some(wait)
    }

    /// Seconds hubs have been told to wait since start.
    pub fn waited_seconds(&self) -> f64 {
        self.waited_us.load(Ordering::Relaxed) as f64 / 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_never_waits() {
        let p = Pacer::new(0);
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(p.reserve(1_000_000, now), None);
        }
        assert_eq!(p.waited_seconds(), 0.0);
    }

    #[test]
    fn a_burst_goes_at_once_and_the_rest_is_spread_at_the_rate() {
        // 10,000 pushes a second: a push is 100 µs of the budget.
        let p = Pacer::new(10_000);
        let now = Instant::now();
        // The burst allowance: BURST_PUSHES pushes at once without waiting.
        for _ in 0..BURST_PUSHES / 16 {
            assert_eq!(p.reserve(16, now), None);
        }
        // The next 16 wait exactly their own cost.
        assert_eq!(p.reserve(16, now), Some(Duration::from_micros(1600)));
        // And the 16 after them wait behind those.
        assert_eq!(p.reserve(16, now), Some(Duration::from_micros(3200)));
        assert!((p.waited_seconds() - 0.0048).abs() < 1e-9);
    }

    #[test]
    fn a_small_budget_bursts_a_tenth_of_a_second_of_it() {
        // 100 pushes a second: the burst is 10 pushes, not BURST_PUSHES.
        let p = Pacer::new(100);
        let now = Instant::now();
        assert_eq!(p.reserve(10, now), None);
        assert_eq!(p.reserve(1, now), Some(Duration::from_millis(10)));
    }

    #[test]
    fn the_budget_refills_with_time() {
        let p = Pacer::new(10_000);
        let t0 = Instant::now();
        assert_eq!(p.reserve(BURST_PUSHES as usize, t0), None);
        assert_eq!(p.reserve(10, t0), Some(Duration::from_millis(1)));
        // After the whole reservation's time has passed, the burst is there again.
        let later = t0 + Duration::from_micros(100 * (BURST_PUSHES + 10));
        assert_eq!(p.reserve(BURST_PUSHES as usize, later), None);
        assert_eq!(p.reserve(1, later), Some(Duration::from_micros(100)));
    }
}
