//! Admission: how many connections and sessions a gateway takes, and from whom.
//!
//! Three caps, each held by an RAII permit so a count can never leak (a session that ends in
//! any way, panics included, drops its permits):
//! - **global** (`max_connections`): TCP connections being served, authenticated or not.
//!   Each costs a task, a socket and WebSocket buffers; past the cap the gateway would trade
//!   everyone's latency for one more connection.
//! - **per IP** (`max_connections_per_ip`): one address cannot take the whole global cap.
//!   Over either, the accept loop closes the TCP connection at once: no handshake is read,
//!   so a flood costs an accept and a close, nothing more.
//! - **per user** (`max_sessions_per_user`): authenticated sessions of one (tenant, user).
//!   Checked at Hello, when the user is known; over it, the Hello is refused and the
//!   connection closed with `TOO_MANY_SESSIONS`.
//!
//! Refusals are counted ([`Admission::refused`]) and logged at warn level at the 1st, 2nd,
//! 4th, 8th, ... refusal of each cause: an operator sees that a cap bites and how often, and
//! a flood does not turn into a flood of log lines.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tidings_log_api::{TenantId, UserId};
use tracing::warn;

/// The caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_sessions_per_user: usize,
}

/// Why a connection or session was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` connections are being served.
    Global,
    /// `max_connections_per_ip` connections from this address are being served.
    PerIp,
    /// The user has `max_sessions_per_user` sessions.
    PerUser,
}

/// Refusals since start, by cause.
#[derive(Default, Debug)]
pub struct Refused {
    pub global: AtomicU64,
    pub per_ip: AtomicU64,
    pub per_user: AtomicU64,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    per_user: HashMap<(TenantId, UserId), usize>,
}

/// The gateway's counts; cheap to clone (shared).
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

struct Inner {
    limits: Limits,
    // One std mutex: every operation is a few map updates, never held across an await.
    counts: Mutex<Counts>,
    refused: Refused,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Admission {
            inner: Arc::new(Inner {
                limits,
                counts: Mutex::new(Counts::default()),
                refused: Refused::default(),
            }),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.inner.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `ip`, or says which cap it is over.
    pub fn connect(&self, ip: IpAddr) -> Result<ConnectionPermit, Refusal> {
        let limits = self.inner.limits;
        let mut counts = self.counts();
        if counts.total >= limits.max_connections {
            return Err(count(&self.inner.refused.global, Refusal::Global));
        }
        let from_ip = counts.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= limits.max_connections_per_ip {
            return Err(count(&self.inner.refused.per_ip, Refusal::PerIp));
        }
        counts.total += 1;
        counts.per_ip.insert(ip, from_ip + 1);
        Ok(ConnectionPermit {
            admission: self.clone(),
            ip,
        })
    }

    /// Admits an authenticated session of `user`, or refuses it ([`Refusal::PerUser`]).
    pub fn session(&self, tenant: &TenantId, user: &UserId) -> Result<SessionPermit, Refusal> {
        let mut counts = self.counts();
        let key = (tenant.clone(), user.clone());
        let n = counts.per_user.get(&key).copied().unwrap_or(0);
        if n >= self.inner.limits.max_sessions_per_user {
            return Err(count(&self.inner.refused.per_user, Refusal::PerUser));
        }
        counts.per_user.insert(key.clone(), n + 1);
        Ok(SessionPermit {
            admission: self.clone(),
            key,
        })
    }

    /// Connections being served now.
    pub fn connections(&self) -> usize {
        self.counts().total
    }

    /// Sessions of `user` now.
    pub fn sessions_of(&self, tenant: &TenantId, user: &UserId) -> usize {
        self.counts()
            .per_user
            .get(&(tenant.clone(), user.clone()))
            .copied()
            .unwrap_or(0)
    }

    pub fn refused(&self) -> &Refused {
        &self.inner.refused
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits
    }
}

/// Counts a refusal; logs the 1st, 2nd, 4th, 8th, ... of each cause.
fn count(counter: &AtomicU64, why: Refusal) -> Refusal {
    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        warn!(cause = ?why, refused = n, "refused over a connection or session cap");
    }
    why
}

/// One admitted connection; dropping it frees its place.
pub struct ConnectionPermit {
    admission: Admission,
    ip: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut counts = self.admission.counts();
        counts.total = counts.total.saturating_sub(1);
        // Entries go with their last connection: the map holds live addresses only.
        if let Some(n) = counts.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.per_ip.remove(&self.ip);
            }
        }
    }
}

/// One admitted session of a user; dropping it frees its place.
pub struct SessionPermit {
    admission: Admission,
    key: (TenantId, UserId),
}

impl Drop for SessionPermit {
    fn drop(&mut self) {
        let mut counts = self.admission.counts();
        if let Some(n) = counts.per_user.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.per_user.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(global: usize, ip: usize, user: usize) -> Limits {
        Limits {
            max_connections: global,
            max_connections_per_ip: ip,
            max_sessions_per_user: user,
        }
    }

    #[test]
    fn caps_hold_and_permits_give_their_place_back() {
        let a = Admission::new(limits(3, 2, 1));
        let (one, two): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        let p1 = a.connect(one).expect("first");
        let _p2 = a.connect(one).expect("second");
        assert_eq!(a.connect(one).err(), Some(Refusal::PerIp));
        let _p3 = a.connect(two).expect("other address");
        assert_eq!(a.connect(two).err(), Some(Refusal::Global));
        drop(p1);
        assert_eq!(a.connections(), 2);
        let _p4 = a.connect(one).expect("a place was freed");
        assert_eq!(a.refused().per_ip.load(Ordering::Relaxed), 1);
        assert_eq!(a.refused().global.load(Ordering::Relaxed), 1);

        let (t, u) = (
            TenantId::new("acme".to_string()).expect("t"),
            UserId::new("bob".to_string()).expect("u"),
        );
        let s = a.session(&t, &u).expect("first session");
        assert_eq!(a.session(&t, &u).err(), Some(Refusal::PerUser));
        let alice = UserId::new("alice".to_string()).expect("u");
        let _other = a.session(&t, &alice).expect("another user");
        drop(s);
        assert_eq!(a.sessions_of(&t, &u), 0);
        let _again = a.session(&t, &u).expect("freed");
    }
}
