//! Smart rate limiting of appends: when the writer is past its capacity, the hottest
//! conversations are held back first, VIP tenants' last, and everyone else goes on.
//!
//! A fixed per-conversation limit wastes capacity when the system is quiet and protects
//! nothing when it is not. This admission control limits nothing below capacity. Above it
//! (docs/decisions/overload-admission.md):
//!
//! - **Capacity** is configured (`capacity_per_sec`), or learned (`learn`): the sequencer's mean
//!   queueing delay, by Little's law (mean queue depth / appends admitted per second), above
//!   20 ms means overload (WeChat's DAGOR). The learned capacity then steps down to 95% of
//!   what was admitted, and back up 5% a window while the queueing stays low, until it
//!   covers the demand again and limiting stops.
//! - **Who is limited**: time is cut into one-second windows. Every append attempt is
//!   counted per conversation in a space-saving sketch of `tracked_conversations` slots
//!   (bounded memory, whatever the number of conversations; a count is over-estimated by at
//!   most its `error`, and only the guaranteed part, count − error, is ever held against a
//!   conversation). When the window's attempts pass the budget, allowances are computed by
//!   water-filling: every conversation keeps what it sends up to a threshold T, and T is
//!   the largest value whose total fits the budget. Tiers are strict: VIP conversations are
//!   given their demand first (standard ones keep their floor), standard conversations
//!   share what remains, so a VIP tenant's hot group is limited only after every standard
//!   hot group is down to its floor. No conversation is ever held below
//!   `floor_per_sec`: a small conversation is never limited.
//! - **What a limited send gets**: `RATE_LIMITED` with `retry_after_ms`, the time to the
//!   end of the window (when its allowance renews). Gateways shed that conversation's sends
//!   until then without asking the log.
//!
//! Everything here is memory of the writer that owns the conversation's partition: with W
//! writers, each limits its own partitions against its own capacity.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::error::LogError;
use crate::ids::{ConvId, TenantId};

/// The unit of rates and allowances.
pub const WINDOW: Duration = Duration::from_secs(1);

/// Mean queueing delay in the sequencer past which the writer counts as overloaded when no
/// capacity is configured (DAGOR's signal).
pub const OVERLOADED_QUEUEING: Duration = Duration::from_millis(20);

/// How often, in attempts, allowances are recomputed within a window once limiting: an
/// eighth of the budget, so a flood that starts mid-window is met within that window.
const REPLANS_PER_WINDOW: u64 = 8;

/// Settings of the admission control (`[log]` in the server's config).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverloadConfig {
    /// Appends a second this writer carries before it limits the hottest conversations;
    /// 0: none configured (see `learn`).
    pub capacity_per_sec: u32,
    /// Without a configured capacity, learn one from the sequencer's queueing delay. Off:
    /// nothing is limited (and nothing counted) unless a capacity is configured.
    pub learn: bool,
    /// Conversations whose send rates are tracked at once (slots of the sketch).
    pub tracked_conversations: usize,
    /// Appends a second any conversation may make however overloaded the writer is.
    pub floor_per_sec: u32,
    /// Tenants of the VIP tier: their conversations are limited last.
    pub vip_tenants: Vec<String>,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        OverloadConfig {
            capacity_per_sec: 0,
            learn: false,
            tracked_conversations: 1024,
            floor_per_sec: 5,
            vip_tenants: Vec::new(),
        }
    }
}

impl OverloadConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.tracked_conversations == 0 || self.tracked_conversations > 1 << 20 {
            return Err("overload_tracked_conversations must be between 1 and 1048576".into());
        }
        if self.floor_per_sec == 0 {
            return Err("overload_floor_per_sec must be greater than 0".into());
        }
        if self.capacity_per_sec != 0 && self.capacity_per_sec < self.floor_per_sec {
            return Err(
                "capacity_per_sec must be 0 (none) or at least overload_floor_per_sec".into(),
            );
        }
        for t in &self.vip_tenants {
            TenantId::new(t.clone()).map_err(|e| format!("vip_tenants: {e}"))?;
        }
        Ok(())
    }
}

/// A tenant's tier. Lower tiers are limited first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Standard = 0,
    Vip = 1,
}

/// What was admitted and limited, and why, since the log opened.
#[derive(Default, Debug)]
pub struct OverloadStats {
    /// Appends let through.
    pub admitted: AtomicU64,
    /// Appends refused, of standard tenants' conversations (they were the hottest).
    pub limited_standard: AtomicU64,
    /// Appends refused, of VIP tenants' conversations (standard ones were already at the
    /// floor).
    pub limited_vip: AtomicU64,
    /// Windows in which something was limited.
    pub limiting_windows: AtomicU64,
    /// Windows the learned capacity was stepped down because the sequencer's queueing
    /// delay was past [`OVERLOADED_QUEUEING`].
    pub queueing_overloads: AtomicU64,
}

/// One tracked conversation, in the current window.
#[derive(Clone, Debug)]
struct Slot {
    tier: Tier,
    /// Attempts this window (space-saving: over-estimated by at most `error`).
    count: u64,
    error: u64,
    /// Appends let through this window.
    admitted: u64,
    /// Guaranteed attempts of the previous window (0 if it was not tracked then).
    prev: u64,
    /// Whether its limiting this window was logged.
    logged: bool,
}

impl Slot {
    fn demand(&self) -> u64 {
        (self.count - self.error).max(self.prev)
    }
}

/// The allowances in force: admitted appends per window per conversation, by tier
/// (`None`: that tier is not limited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Plan {
    standard: Option<u64>,
    vip: Option<u64>,
}

impl Plan {
    fn threshold(&self, tier: Tier) -> Option<u64> {
        match tier {
            Tier::Standard => self.standard,
            Tier::Vip => self.vip,
        }
    }
}

struct State {
    window_start: Instant,
    attempts: u64,
    admitted: u64,
    /// Attempts when allowances were last computed this window.
    planned_at: u64,
    slots: HashMap<(TenantId, ConvId), Slot>,
    plan: Option<Plan>,
    prev_attempts: u64,
    /// The learned budget per window (`None`: not limiting); only without a configured
    /// capacity.
    learned: Option<u64>,
    /// Sum and count of the sequencer's queue depth, sampled at each attempt this window.
    depth_sum: u64,
    depth_samples: u64,
}

/// The admission control of one log writer (see the module docs).
pub struct Overload {
    cfg: OverloadConfig,
    vip: HashSet<String>,
    state: Mutex<State>,
    stats: OverloadStats,
}

impl Overload {
    pub fn new(cfg: OverloadConfig, now: Instant) -> Self {
        let vip = cfg.vip_tenants.iter().cloned().collect();
        Overload {
            vip,
            state: Mutex::new(State {
                window_start: now,
                attempts: 0,
                admitted: 0,
                planned_at: 0,
                slots: HashMap::with_capacity(cfg.tracked_conversations.min(4096)),
                plan: None,
                prev_attempts: 0,
                learned: None,
                depth_sum: 0,
                depth_samples: 0,
            }),
            cfg,
            stats: OverloadStats::default(),
        }
    }

    pub fn stats(&self) -> &OverloadStats {
        &self.stats
    }

    pub fn tier(&self, tenant: &TenantId) -> Tier {
        if self.vip.contains(tenant.as_str()) {
            Tier::Vip
        } else {
            Tier::Standard
        }
    }

    /// Counts one append attempt to the conversation and lets it through, or refuses it
    /// with `RATE_LIMITED` and the time until its allowance renews. `queued`: the
    /// sequencer's queue depth now (the learned capacity's signal).
    pub fn admit(
        &self,
        tenant: &TenantId,
        conv: &ConvId,
        queued: usize,
        now: Instant,
    ) -> Result<(), LogError> {
        if self.cfg.capacity_per_sec == 0 && !self.cfg.learn {
            return Ok(());
        }
        let tier = self.tier(tenant);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(s.window_start) >= WINDOW {
            self.roll(&mut s, now);
        }
        s.attempts += 1;
        s.depth_sum += queued as u64;
        s.depth_samples += 1;
        self.count(&mut s, tenant, conv, tier);
        if let Some(budget) = self.budget(&s) {
            let due = s.attempts > budget
                && (s.plan.is_none()
                    || s.attempts - s.planned_at >= (budget / REPLANS_PER_WINDOW).max(1));
            if due {
                let plan = plan(&s, budget, self.floor());
                if plan.is_some() && s.plan.is_none() {
                    self.stats.limiting_windows.fetch_add(1, Ordering::Relaxed);
                }
                s.plan = plan;
                s.planned_at = s.attempts;
            }
        }
        let plan = s.plan;
        let window_end = s.window_start + WINDOW;
        let key = (tenant.clone(), conv.clone());
        let Some(slot) = s.slots.get_mut(&key) else {
            return Err(LogError::corrupt(
                b"",
                "internal: an attempt was not counted",
            ));
        };
        match plan.and_then(|p| p.threshold(tier)) {
            Some(threshold) if slot.admitted >= threshold => {
                let counter = match tier {
                    Tier::Standard => &self.stats.limited_standard,
                    Tier::Vip => &self.stats.limited_vip,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                if !slot.logged {
                    slot.logged = true;
                    info!(
                        tenant = %tenant,
                        conversation = %conv,
                        ?tier,
                        allowance_per_window = threshold,
                        "overloaded: limiting the conversation until the window ends"
                    );
                }
                let wait = window_end.saturating_duration_since(now);
                Err(LogError::RateLimited {
                    what: "messages in this conversation while the log is overloaded",
                    retry_after_ms: wait.as_millis() as u64 + 1,
                })
            }
            _ => {
                slot.admitted += 1;
                s.admitted += 1;
                self.stats.admitted.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    fn floor(&self) -> u64 {
        u64::from(self.cfg.floor_per_sec)
    }

    /// Appends allowed per window, if any bound is in force now.
    fn budget(&self, s: &State) -> Option<u64> {
        match self.cfg.capacity_per_sec {
            0 => s.learned,
            c => Some(u64::from(c)),
        }
    }

    /// Counts the attempt in the sketch: a tracked conversation's count grows; a new one
    /// takes a free slot, or the slot of the least counted (space-saving: it inherits that
    /// count as its error).
    fn count(&self, s: &mut State, tenant: &TenantId, conv: &ConvId, tier: Tier) {
        if let Some(slot) = s.slots.get_mut(&(tenant.clone(), conv.clone())) {
            slot.count += 1;
            return;
        }
        let mut error = 0;
        if s.slots.len() >= self.cfg.tracked_conversations {
            let victim = s
                .slots
                .iter()
                .min_by_key(|(_, slot)| slot.count)
                .map(|(k, slot)| (k.clone(), slot.count));
            if let Some((k, min)) = victim {
                s.slots.remove(&k);
                error = min;
            }
        }
        s.slots.insert(
            (tenant.clone(), conv.clone()),
            Slot {
                tier,
                count: error + 1,
                error,
                admitted: 0,
                prev: 0,
                logged: false,
            },
        );
    }

    /// Starts a new window: this one's counts become the previous ones, the learned
    /// capacity moves with the queueing delay, and allowances are planned from the demand
    /// just seen.
    fn roll(&self, s: &mut State, now: Instant) {
        let idle = now.duration_since(s.window_start) >= 2 * WINDOW;
        let limited = self.stats.limited_standard.load(Ordering::Relaxed)
            + self.stats.limited_vip.load(Ordering::Relaxed);
        if s.plan.is_some() {
            info!(
                attempts = s.attempts,
                admitted = s.admitted,
                limited_total = limited,
                "overload window ended"
            );
        }
        if self.cfg.capacity_per_sec == 0 && self.cfg.learn {
            self.learn(s);
        }
        s.prev_attempts = if idle { 0 } else { s.attempts };
        for slot in s.slots.values_mut() {
            slot.prev = if idle { 0 } else { slot.count - slot.error };
            slot.count = 0;
            slot.error = 0;
            slot.admitted = 0;
            slot.logged = false;
        }
        // Conversations silent for a whole window make room.
        s.slots.retain(|_, slot| slot.prev > 0);
        s.window_start = if idle { now } else { s.window_start + WINDOW };
        s.attempts = 0;
        s.admitted = 0;
        s.planned_at = 0;
        s.depth_sum = 0;
        s.depth_samples = 0;
        s.plan = match self.budget(s) {
            Some(budget) if s.prev_attempts > budget => {
                let plan = plan(s, budget, self.floor());
                if plan.is_some() {
                    self.stats.limiting_windows.fetch_add(1, Ordering::Relaxed);
                }
                plan
            }
            _ => None,
        };
    }

    /// DAGOR's rule on the window that ends: queueing past [`OVERLOADED_QUEUEING`] steps
    /// the budget down to 95% of what was admitted; low queueing steps it up 5%, and once it
    /// covers the demand, limiting stops.
    fn learn(&self, s: &mut State) {
        if s.depth_samples == 0 {
            s.learned = None;
            return;
        }
        let mean_depth = s.depth_sum as f64 / s.depth_samples as f64;
        let throughput = (s.admitted.max(1)) as f64 / WINDOW.as_secs_f64();
        let queueing = Duration::from_secs_f64(mean_depth / throughput);
        if queueing > OVERLOADED_QUEUEING {
            self.stats
                .queueing_overloads
                .fetch_add(1, Ordering::Relaxed);
            let base = s.learned.unwrap_or(s.admitted).min(s.admitted);
            let next = (base as f64 * 0.95) as u64;
            warn!(
                queueing_ms = queueing.as_millis() as u64,
                budget_per_window = next,
                "the sequencer is overloaded: limiting the hottest conversations"
            );
            s.learned = Some(next.max(self.floor()));
        } else if let Some(budget) = s.learned {
            let next = (budget as f64 * 1.05).ceil() as u64;
            s.learned = (next < s.attempts).then_some(next);
        }
    }
}

/// Allowances for the demand seen (the larger of this window's and the last one's, per
/// conversation) under `budget`; `None` when everything fits.
fn plan(s: &State, budget: u64, floor: u64) -> Option<Plan> {
    let basis = s.attempts.max(s.prev_attempts);
    let mut standard = Vec::new();
    let mut vip = Vec::new();
    for slot in s.slots.values() {
        match slot.tier {
            Tier::Standard => standard.push(slot.demand()),
            Tier::Vip => vip.push(slot.demand()),
        }
    }
    let tracked: u64 = standard.iter().chain(&vip).sum();
    // What the sketch does not hold is small conversations: never limited, so reserved.
    let available = budget.saturating_sub(basis.saturating_sub(tracked));
    let standard_floor: u64 = standard.iter().map(|d| (*d).min(floor)).sum();
    let vip_threshold = water_fill(&mut vip, available.saturating_sub(standard_floor));
    let vip_used: u64 = vip
        .iter()
        .map(|d| vip_threshold.map_or(*d, |t| (*d).min(t.max(floor))))
        .sum();
    let standard_threshold = water_fill(&mut standard, available.saturating_sub(vip_used));
    let plan = Plan {
        standard: standard_threshold.map(|t| t.max(floor)),
        vip: vip_threshold.map(|t| t.max(floor)),
    };
    (plan != Plan::default()).then_some(plan)
}

/// The largest per-conversation threshold T with Σ min(demand, T) ≤ `cap`; `None` when
/// the demands fit whole.
fn water_fill(demands: &mut [u64], cap: u64) -> Option<u64> {
    if demands.iter().sum::<u64>() <= cap {
        return None;
    }
    demands.sort_unstable();
    let mut remaining = cap;
    for (i, d) in demands.iter().enumerate() {
        let left = (demands.len() - i) as u64;
        if d.saturating_mul(left) <= remaining {
            remaining -= d;
        } else {
            return Some(remaining / left);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(t: &str, c: &str) -> (TenantId, ConvId) {
        (
            TenantId::new(t.to_string()).expect("tenant"),
            ConvId::new(c.to_string()).expect("conv"),
        )
    }

    fn cfg(capacity: u32) -> OverloadConfig {
        OverloadConfig {
            capacity_per_sec: capacity,
            learn: capacity == 0,
            tracked_conversations: 64,
            floor_per_sec: 3,
            vip_tenants: vec!["gold".into()],
        }
    }

    #[test]
    fn water_fill_keeps_small_demands_and_cuts_the_largest() {
        assert_eq!(water_fill(&mut [1, 2, 3], 6), None);
        assert_eq!(water_fill(&mut [1, 2, 100], 23), Some(20));
        assert_eq!(water_fill(&mut [50, 50], 20), Some(10));
        assert_eq!(water_fill(&mut [], 0), None);
    }

    #[test]
    fn below_capacity_nothing_is_limited() {
        let o = Overload::new(cfg(100), Instant::now());
        let start = Instant::now();
        let (t, hot) = ids("acme", "hot");
        for i in 0..99 {
            o.admit(&t, &hot, 0, start)
                .unwrap_or_else(|e| panic!("{i}: {e}"));
        }
        // A second later, a new window: again 99.
        for _ in 0..99 {
            o.admit(&t, &hot, 0, start + WINDOW).expect("admitted");
        }
        assert_eq!(o.stats().limited_standard.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_hot_conversation_is_limited_and_small_ones_never() {
        let o = Overload::new(cfg(100), Instant::now());
        let start = Instant::now();
        let (t, hot) = ids("acme", "hot");
        let small: Vec<_> = (0..30).map(|i| ids("acme", &format!("s{i}")).1).collect();
        let mut hot_admitted = 0;
        for round in 0..3u32 {
            let now = start + WINDOW * round;
            for i in 0..1000 {
                if o.admit(&t, &hot, 0, now).is_ok() {
                    hot_admitted += 1;
                }
                if i % 400 == 0 {
                    for s in &small {
                        o.admit(&t, s, 0, now)
                            .expect("a small conversation is never limited");
                    }
                }
            }
        }
        // 3 sends of 30 small conversations a window: at the floor, and within the budget.
        assert!(hot_admitted < 3 * 1000, "{hot_admitted}");
        assert!(o.stats().limited_standard.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn a_vip_hot_group_is_limited_after_a_standard_one() {
        let o = Overload::new(cfg(100), Instant::now());
        let now = Instant::now();
        let (std_t, a) = ids("acme", "hot");
        let (vip_t, b) = ids("gold", "hot");
        let (mut std_first, mut vip_first) = (None, None);
        for i in 0..1000 {
            if o.admit(&std_t, &a, 0, now).is_err() && std_first.is_none() {
                std_first = Some(i);
            }
            if o.admit(&vip_t, &b, 0, now).is_err() && vip_first.is_none() {
                vip_first = Some(i);
            }
        }
        let (s, v) = (
            std_first.expect("standard limited"),
            vip_first.expect("vip limited"),
        );
        assert!(s < v, "standard first limited at {s}, vip at {v}");
        assert!(o.stats().limited_vip.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn a_refusal_says_when_the_window_ends() {
        let o = Overload::new(cfg(10), Instant::now());
        let start = Instant::now();
        let (t, hot) = ids("acme", "hot");
        let mut refused = None;
        for _ in 0..100 {
            if let Err(e) = o.admit(&t, &hot, 0, start + Duration::from_millis(400)) {
                refused = Some(e);
                break;
            }
        }
        let e = refused.expect("limited");
        assert_eq!(e.code(), "rate_limited");
        assert!(
            (500..=601).contains(&e.retry_after_ms()),
            "{}",
            e.retry_after_ms()
        );
    }

    #[test]
    fn the_sketch_holds_at_most_its_slots() {
        let o = Overload::new(cfg(100), Instant::now());
        let now = Instant::now();
        for i in 0..10_000 {
            let (t, c) = ids("acme", &format!("c{i}"));
            o.admit(&t, &c, 0, now)
                .expect("each sends once: never limited");
        }
        let s = o.state.lock().expect("state");
        assert_eq!(s.slots.len(), 64);
    }

    #[test]
    fn queueing_past_20_ms_teaches_a_capacity_and_low_queueing_lifts_it() {
        let o = Overload::new(cfg(0), Instant::now());
        let start = Instant::now();
        let (t, hot) = ids("acme", "hot");
        let (_, small) = ids("acme", "small");
        // 1000 admitted a second with 100 queued: 100 ms of queueing.
        for _ in 0..1000 {
            o.admit(&t, &hot, 100, start).expect("nothing learned yet");
        }
        let mut limited = 0;
        for _ in 0..1000 {
            if o.admit(&t, &hot, 100, start + WINDOW).is_err() {
                limited += 1;
            }
        }
        o.admit(&t, &small, 100, start + WINDOW).expect("small");
        assert_eq!(o.stats().queueing_overloads.load(Ordering::Relaxed), 1);
        assert!(limited >= 50, "{limited}");
        // Quiet queue from then on: the budget rises until it covers the demand.
        for w in 2..80u32 {
            for _ in 0..100 {
                let _ = o.admit(&t, &hot, 0, start + WINDOW * w);
            }
        }
        let before = o.stats().limited_standard.load(Ordering::Relaxed);
        for _ in 0..100 {
            o.admit(&t, &hot, 0, start + WINDOW * 80)
                .expect("no longer limited");
        }
        assert_eq!(o.stats().limited_standard.load(Ordering::Relaxed), before);
    }
}
