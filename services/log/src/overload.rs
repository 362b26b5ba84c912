//! Smart rate limiting of appends: when the writer is past its capacity, the hottest
//! conversations are held back first, VIP tenants' last, and everyone else goes on.
//!
//! A fixed per-conversation limit wastes capacity when the system is quiet and protects
//! nothing when it is not. This admission control limits nothing below capacity. Above it
//! (docs/decisions/overload-admission.md):
//!
//! - **Capacity** is two budgets. Appends: configured (`capacity_per_sec`), or learned
//!   (`learn`): the sequencer's mean
//!   queueing delay, by Little's law (mean queue depth / appends admitted per second), above
//!   20 ms means overload (WeChat's DAGOR). The learned capacity then steps down to 95% of
//!   what was admitted, and back up 5% a window while the queueing stays low, until it
//!   covers the demand again and limiting stops. Pushes (`fanout_per_sec`, configured): an
//!   append to a conversation of m members makes up to m pushes to online sessions, so a
//!   flood in a 10,000-member group overloads the gateways' fan-out long before the
//!   sequencer; a conversation's member count is learned from its commits.
//! - **Who is limited**: time is cut into one-second windows. Every append attempt is
//!   counted per conversation in a space-saving sketch of `tracked_conversations` slots
//!   (bounded memory, whatever the number of conversations; a count is over-estimated by at
//!   most its `error`, and only the guaranteed part, count − error, is ever held against a
//!   conversation). When the window's attempts pass the budget, allowances are computed by
//!   water-filling: every conversation keeps what it sends up to a threshold T, and T is
//!   the largest value whose total fits the budget, for each budget crossed (in pushes a
//!   conversation's demand is its sends × its members); a conversation's allowance is the
//!   smaller of the two. Tiers are strict: VIP conversations are
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

/// Settings of the admission control: read from `[log]` in the server's config, flattened
/// into [`LogConfig`](crate::LogConfig), each under the name the file gives it
/// (`overload_learn` for `learn`, ...; docs/decisions/config-types-read-directly.md).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct OverloadConfig {
    /// Appends a second this writer carries before it limits the hottest conversations;
    /// 0: none configured (see `learn`).
    pub capacity_per_sec: u32,
    /// Without a configured capacity, learn one from the sequencer's queueing delay (mean
    /// over 20 ms is overload). Off: nothing is limited (and nothing counted) unless a
    /// capacity is configured.
    #[serde(rename = "overload_learn")]
    pub learn: bool,
    /// Conversations whose send rates are tracked at once (slots of the sketch).
    #[serde(rename = "overload_tracked_conversations")]
    pub tracked_conversations: usize,
    /// Appends a second any conversation may make however overloaded the writer is.
    #[serde(rename = "overload_floor_per_sec")]
    pub floor_per_sec: u32,
    /// Tenants of the VIP tier: their conversations are limited last.
    pub vip_tenants: Vec<String>,
    /// Pushes a second (appends × their conversations' members) the gateways carry before
    /// the conversations causing the most are limited; 0: fan-out is not weighed.
    #[serde(rename = "overload_fanout_per_sec")]
    pub fanout_per_sec: u64,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        OverloadConfig {
            capacity_per_sec: 0,
            learn: false,
            tracked_conversations: 1024,
            floor_per_sec: 5,
            vip_tenants: Vec::new(),
            fanout_per_sec: 0,
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
        if self.fanout_per_sec != 0 && self.fanout_per_sec < u64::from(self.floor_per_sec) {
            return Err(
                "overload_fanout_per_sec must be 0 (none) or at least overload_floor_per_sec"
                    .into(),
            );
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
    /// Of the refused appends, those whose allowance was set by the fan-out budget
    /// (`fanout_per_sec`) rather than the appends budget.
    pub limited_by_fanout: AtomicU64,
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
    /// Members at its last commit (1 until one is seen): the pushes one append makes.
    members: u64,
}

impl Slot {
    fn demand(&self) -> u64 {
        (self.count - self.error).max(self.prev)
    }
}

/// Per tier, the most a conversation may use this window of one budget (`None`: not
/// limited), in that budget's unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Thresholds {
    standard: Option<u64>,
    vip: Option<u64>,
}

impl Thresholds {
    fn of(&self, tier: Tier) -> Option<u64> {
        match tier {
            Tier::Standard => self.standard,
            Tier::Vip => self.vip,
        }
    }
}

/// The allowances in force: per budget, per tier, what a conversation may use this window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Plan {
    /// In appends.
    appends: Thresholds,
    /// In pushes (appends × members).
    pushes: Thresholds,
}

/// Which budget set an allowance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bound {
    Appends,
    Fanout,
}

impl Plan {
    /// Appends the conversation may make this window, never below `floor`, and which
    /// budget set it; `None`: not limited. In pushes, appends are let through while those
    /// made stay below the threshold, so the last may pass it by one append's pushes: a
    /// group whose share is 1.99 appends' worth makes 2, not 1.
    fn allowance(&self, tier: Tier, members: u64, floor: u64) -> Option<(u64, Bound)> {
        let appends = self.appends.of(tier).map(|t| (t, Bound::Appends));
        let fanout = self
            .pushes
            .of(tier)
            .map(|t| (t.div_ceil(members.max(1)), Bound::Fanout));
        let tightest = match (appends, fanout) {
            (Some(a), Some(f)) => Some(if f.0 < a.0 { f } else { a }),
            (a, f) => a.or(f),
        };
        tightest.map(|(t, bound)| (t.max(floor), bound))
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
    /// Pushes the attempts this window would make (an untracked conversation's as 1), and
    /// the previous window's.
    pushes: u64,
    prev_pushes: u64,
    /// Pushes when allowances were last computed this window.
    planned_at_pushes: u64,
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
                pushes: 0,
                prev_pushes: 0,
                planned_at_pushes: 0,
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
        if !self.enabled() {
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
        let members = self.count(&mut s, tenant, conv, tier);
        s.pushes += members;
        if self.replan_due(&s) {
            let plan = self.plan(&s);
            if plan.is_some() && s.plan.is_none() {
                self.stats.limiting_windows.fetch_add(1, Ordering::Relaxed);
            }
            s.plan = plan;
            s.planned_at = s.attempts;
            s.planned_at_pushes = s.pushes;
        }
        let plan = s.plan;
        let floor = self.floor();
        let window_end = s.window_start + WINDOW;
        let key = (tenant.clone(), conv.clone());
        let Some(slot) = s.slots.get_mut(&key) else {
            return Err(LogError::corrupt(
                b"",
                "internal: an attempt was not counted",
            ));
        };
        match plan.and_then(|p| p.allowance(tier, slot.members, floor)) {
            Some((allowance, bound)) if slot.admitted >= allowance => {
                let counter = match tier {
                    Tier::Standard => &self.stats.limited_standard,
                    Tier::Vip => &self.stats.limited_vip,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                if bound == Bound::Fanout {
                    self.stats.limited_by_fanout.fetch_add(1, Ordering::Relaxed);
                }
                if !slot.logged {
                    slot.logged = true;
                    info!(
                        tenant = %tenant,
                        conversation = %conv,
                        ?tier,
                        members = slot.members,
                        ?bound,
                        allowance_per_window = allowance,
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

    /// Tells the control how many members the conversation had at an append's commit:
    /// the pushes each of its appends makes, for the fan-out budget. Only tracked
    /// conversations are remembered (the sketch's bound); without a fan-out budget, nothing.
    pub fn note_members(&self, tenant: &TenantId, conv: &ConvId, members: u64) {
        if self.cfg.fanout_per_sec == 0 || members == 0 {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = s.slots.get_mut(&(tenant.clone(), conv.clone())) {
            slot.members = members;
        }
    }

    fn enabled(&self) -> bool {
        self.cfg.capacity_per_sec != 0 || self.cfg.learn || self.cfg.fanout_per_sec != 0
    }

    fn floor(&self) -> u64 {
        u64::from(self.cfg.floor_per_sec)
    }

    /// Appends allowed per window, if that bound is in force now.
    fn budget(&self, s: &State) -> Option<u64> {
        match self.cfg.capacity_per_sec {
            0 => s.learned,
            c => Some(u64::from(c)),
        }
    }

    /// Pushes allowed per window, if that bound is configured.
    fn fanout_budget(&self) -> Option<u64> {
        (self.cfg.fanout_per_sec != 0).then_some(self.cfg.fanout_per_sec)
    }

    /// Whether allowances must be (re)computed now: a budget is crossed this window, and
    /// either none is in force or an eighth of that budget was attempted since the last.
    fn replan_due(&self, s: &State) -> bool {
        let crossed = |used: u64, since: u64, budget: Option<u64>| {
            budget.is_some_and(|b| {
                used > b && (s.plan.is_none() || used - since >= (b / REPLANS_PER_WINDOW).max(1))
            })
        };
        crossed(s.attempts, s.planned_at, self.budget(s))
            || crossed(s.pushes, s.planned_at_pushes, self.fanout_budget())
    }

    /// Allowances for the demand seen (the larger of this window's and the last one's, per
    /// conversation) under each budget; `None` when everything fits.
    fn plan(&self, s: &State) -> Option<Plan> {
        let floor = self.floor();
        let appends = self.budget(s).map(|budget| {
            let basis = s.attempts.max(s.prev_attempts);
            thresholds(s.slots.values().map(|slot| (slot, 1)), basis, budget, floor)
        });
        let pushes = self.fanout_budget().map(|budget| {
            let basis = s.pushes.max(s.prev_pushes);
            let slots = s.slots.values().map(|slot| (slot, slot.members));
            thresholds(slots, basis, budget, floor)
        });
        let plan = Plan {
            appends: appends.unwrap_or_default(),
            pushes: pushes.unwrap_or_default(),
        };
        (plan != Plan::default()).then_some(plan)
    }

    /// Counts the attempt in the sketch: a tracked conversation's count grows; a new one
    /// takes a free slot, or the slot of the least counted (space-saving: it inherits that
    /// count as its error). Returns the pushes the attempt would make.
    fn count(&self, s: &mut State, tenant: &TenantId, conv: &ConvId, tier: Tier) -> u64 {
        if let Some(slot) = s.slots.get_mut(&(tenant.clone(), conv.clone())) {
            slot.count += 1;
            return slot.members;
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
                members: 1,
            },
        );
        1
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
        s.prev_pushes = if idle { 0 } else { s.pushes };
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
        s.pushes = 0;
        s.planned_at_pushes = 0;
        s.depth_sum = 0;
        s.depth_samples = 0;
        let over = |used: u64, budget: Option<u64>| budget.is_some_and(|b| used > b);
        let crossed =
            over(s.prev_attempts, self.budget(s)) || over(s.prev_pushes, self.fanout_budget());
        s.plan = if crossed {
            let plan = self.plan(s);
            if plan.is_some() {
                self.stats.limiting_windows.fetch_add(1, Ordering::Relaxed);
            }
            plan
        } else {
            None
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

/// Per tier, the threshold of one budget: `slots` with the units one append of each uses
/// (1 for appends, its members for pushes), `basis` the units attempted, `floor` in
/// appends. Water-filled in units, VIP tier first (standard conversations keep their floor).
fn thresholds<'a>(
    slots: impl Iterator<Item = (&'a Slot, u64)>,
    basis: u64,
    budget: u64,
    floor: u64,
) -> Thresholds {
    let mut standard = Vec::new();
    let mut vip = Vec::new();
    let mut standard_floor = 0u64;
    // (demand, floor) in units, per VIP conversation.
    let mut vip_floors = Vec::new();
    for (slot, units) in slots {
        let demand = slot.demand().saturating_mul(units);
        let slot_floor = floor.saturating_mul(units);
        match slot.tier {
            Tier::Standard => {
                standard.push(demand);
                standard_floor = standard_floor.saturating_add(demand.min(slot_floor));
            }
            Tier::Vip => {
                vip.push(demand);
                vip_floors.push((demand, slot_floor));
            }
        }
    }
    let tracked: u64 = standard.iter().chain(&vip).sum();
    // What the sketch does not hold is small conversations: never limited, so reserved.
    let available = budget.saturating_sub(basis.saturating_sub(tracked));
    let vip_threshold = water_fill(&mut vip, available.saturating_sub(standard_floor));
    let vip_used: u64 = vip_floors
        .iter()
        .map(|(d, f)| vip_threshold.map_or(*d, |t| (*d).min(t.max(*f))))
        .sum();
    Thresholds {
        standard: water_fill(&mut standard, available.saturating_sub(vip_used)),
        vip: vip_threshold,
    }
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
            fanout_per_sec: 0,
        }
    }

    /// Only a fan-out budget: `pushes` a second, floor 1.
    fn fanout(pushes: u64) -> OverloadConfig {
        OverloadConfig {
            capacity_per_sec: 0,
            learn: false,
            floor_per_sec: 1,
            fanout_per_sec: pushes,
            ..cfg(0)
        }
    }

    #[test]
    fn a_big_group_is_limited_by_the_pushes_it_causes_and_small_ones_never() {
        let o = Overload::new(fanout(10_000), Instant::now());
        let start = Instant::now();
        let (t, big) = ids("acme", "big");
        let small: Vec<_> = (0..30).map(|i| ids("acme", &format!("s{i}")).1).collect();
        // Its first commit says it has 1,000 members: 100 sends a second are 100,000 pushes.
        o.admit(&t, &big, 0, start).expect("first");
        o.note_members(&t, &big, 1_000);
        let mut admitted = Vec::new();
        for w in 0..4u32 {
            let now = start + WINDOW * w;
            let mut big_admitted = 0;
            for i in 0..100 {
                if o.admit(&t, &big, 0, now).is_ok() {
                    big_admitted += 1;
                }
                if i % 40 == 0 {
                    for s in &small {
                        o.admit(&t, s, 0, now)
                            .expect("a small conversation is never limited");
                        o.note_members(&t, s, 2);
                    }
                }
            }
            admitted.push(big_admitted);
        }
        // The window the flood starts in plans once an eighth of the budget has passed it;
        // from the next one on, what fits beside the small conversations' 180 pushes:
        // 9,820 pushes, 9.82 sends, so 10 (the last one may pass the share).
        assert!(admitted[0] < 100, "{admitted:?}");
        assert_eq!(&admitted[1..], &[10, 10, 10], "{admitted:?}");
        let stats = o.stats();
        assert_eq!(
            stats.limited_by_fanout.load(Ordering::Relaxed),
            stats.limited_standard.load(Ordering::Relaxed)
        );
        // The same group at 5 sends a second (5,000 pushes) is not limited.
        let later = start + WINDOW * 10;
        for _ in 0..5 {
            o.admit(&t, &big, 0, later)
                .expect("within the fan-out budget");
        }
    }

    #[test]
    fn without_a_fan_out_budget_members_change_nothing() {
        let o = Overload::new(cfg(100), Instant::now());
        let now = Instant::now();
        let (t, big) = ids("acme", "big");
        o.admit(&t, &big, 0, now).expect("first");
        o.note_members(&t, &big, 10_000);
        for i in 1..99 {
            o.admit(&t, &big, 0, now)
                .unwrap_or_else(|e| panic!("{i}: {e}"));
        }
        assert_eq!(o.stats().limited_by_fanout.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_tighter_budget_sets_the_allowance() {
        let plan = Plan {
            appends: Thresholds {
                standard: Some(50),
                vip: None,
            },
            pushes: Thresholds {
                standard: Some(20_000),
                vip: Some(90_000),
            },
        };
        assert_eq!(
            plan.allowance(Tier::Standard, 10_000, 1),
            Some((2, Bound::Fanout))
        );
        assert_eq!(
            plan.allowance(Tier::Standard, 2, 1),
            Some((50, Bound::Appends))
        );
        assert_eq!(
            plan.allowance(Tier::Vip, 10_000, 1),
            Some((9, Bound::Fanout))
        );
        assert_eq!(
            plan.allowance(Tier::Vip, 9_999, 1),
            Some((10, Bound::Fanout))
        );
        assert_eq!(
            plan.allowance(Tier::Vip, 100_000, 3),
            Some((3, Bound::Fanout))
        );
        assert_eq!(Plan::default().allowance(Tier::Vip, 5, 3), None);
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
