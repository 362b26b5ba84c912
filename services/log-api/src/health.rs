//! What `/readyz` reports: every long task of a process registers a probe under a name, and
//! the process is ready when every probe says up.
//!
//! A probe is a function, not a flag a task sets: the NATS link and the publisher's stream
//! are judged from the connection's own state at the moment of asking, so a reconnection
//! cannot race a task that has not yet noticed it (docs/decisions/supervision.md).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// `None` when up, or why it is down (a short sentence, never a secret).
pub type Probe = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// The probes of one process, by name.
#[derive(Clone, Default)]
pub struct Health {
    probes: Arc<Mutex<BTreeMap<String, Probe>>>,
}

impl Health {
    /// Registers (or replaces) the probe named `name`.
    pub fn register(&self, name: impl Into<String>, probe: Probe) {
        self.lock().insert(name.into(), probe);
    }

    /// A probe backed by a flag its task sets: see [`Status`].
    pub fn status(&self, name: impl Into<String>) -> Status {
        let status = Status::default();
        let seen = status.clone();
        self.register(name, Arc::new(move || seen.down_reason()));
        status
    }

    /// Those down, with why, in name order; empty when ready.
    pub fn down(&self) -> Vec<(String, String)> {
        let probes: Vec<(String, Probe)> = self
            .lock()
            .iter()
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect();
        probes
            .into_iter()
            .filter_map(|(name, probe)| probe().map(|why| (name, why)))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Probe>> {
        self.probes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A task's own word on whether it is up. Starts down ("starting").
#[derive(Clone)]
pub struct Status(Arc<Mutex<Option<String>>>);

impl Default for Status {
    fn default() -> Self {
        Status(Arc::new(Mutex::new(Some("starting".into()))))
    }
}

impl Status {
    pub fn up(&self) {
        *self.lock() = None;
    }

    pub fn down(&self, why: impl Into<String>) {
        *self.lock() = Some(why.into());
    }

    pub fn down_reason(&self) -> Option<String> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The NATS link as the connection's event callback last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub connected: bool,
    /// Counts (re)connections: state NATS keeps in memory (the event stream) made for an
    /// earlier epoch may be gone.
    pub epoch: u64,
}

/// A probe for the NATS link itself.
pub fn link_probe(link: watch::Receiver<Link>) -> Probe {
    Arc::new(move || {
        (!link.borrow().connected).then(|| "disconnected from NATS; reconnecting".to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_probe_is_up() {
        let health = Health::default();
        let a = health.status("a");
        let b = health.status("b");
        assert_eq!(health.down().len(), 2, "tasks start down");
        a.up();
        b.up();
        assert!(health.down().is_empty());
        b.down("ended: boom");
        assert_eq!(health.down(), vec![("b".into(), "ended: boom".into())]);
    }
}
