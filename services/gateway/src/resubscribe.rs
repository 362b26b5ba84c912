//! A core NATS subscription that comes back by itself.
//!
//! async-nats makes every subscription again after a reconnection, but two failures slip
//! past it: the server may **remove** a subscription (a permission violation, e.g. after a
//! configuration reload; the client's stream then stays open and silent forever), and a
//! subscribe may fail outright. A [`Resubscribing`] notices both — the removal through
//! [`BusEvents::lost`](tidings_log_api::nats::BusEvents) — and subscribes again after a bounded,
//! jittered backoff, telling its owner ([`Delivery::Resubscribed`]) so it can read from the
//! log what passed meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tracing::warn;

/// First wait before subscribing again; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between two attempts: a permission fixed by an operator is picked up within
/// this, and a server that keeps refusing sees one SUB per subject per this period.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What [`Resubscribing::next`] yields.
pub enum Delivery {
    Message(async_nats::Message),
    /// The subscription was made again: what was published meanwhile was not received.
    Resubscribed,
}

/// One subject's subscription, made again whenever it is lost.
pub struct Resubscribing {
    nats: async_nats::Client,
    subject: String,
    sub: Option<async_nats::Subscriber>,
    lost: Option<broadcast::Receiver<String>>,
    /// When to subscribe again (set while the subscription is missing).
    retry_at: Option<Instant>,
    backoff: Duration,
    /// A subscription was made again and the owner has not been told yet.
    announce: bool,
    /// Subscriptions of the process now missing (shared; for `/readyz`).
    missing: Arc<AtomicUsize>,
}

impl Resubscribing {
    /// Subscribes to `subject`; a failure is retried by [`Resubscribing::next`].
    pub async fn new(
        nats: async_nats::Client,
        subject: String,
        lost: broadcast::Receiver<String>,
        missing: Arc<AtomicUsize>,
    ) -> Self {
        let mut this = Resubscribing {
            nats,
            subject,
            sub: None,
            lost: Some(lost),
            retry_at: None,
            backoff: FIRST_BACKOFF,
            announce: false,
            missing,
        };
        match this.nats.subscribe(this.subject.clone()).await {
            Ok(sub) => this.sub = Some(sub),
            Err(e) => this.lose(&format!("subscribe failed: {e}")),
        }
        this
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The next message, or word that the subscription was made again. Cancel-safe: a
    /// pending retry survives the future being dropped.
    pub async fn next(&mut self) -> Delivery {
        loop {
            if self.announce {
                self.announce = false;
                return Delivery::Resubscribed;
            }
            if let Some(at) = self.retry_at {
                tokio::time::sleep_until(at).await;
                match self.nats.subscribe(self.subject.clone()).await {
                    Ok(sub) => {
                        self.sub = Some(sub);
                        self.retry_at = None;
                        self.missing.fetch_sub(1, Ordering::Relaxed);
                        self.announce = true;
                        // One round trip: the server has taken the SUB, or refused it and
                        // said so (then `lost` names the subject again).
                        let _ = self.nats.flush().await;
                    }
                    Err(e) => {
                        self.retry_at = None;
                        self.missing.fetch_sub(1, Ordering::Relaxed);
                        self.lose(&format!("subscribe failed: {e}"));
                    }
                }
                continue;
            }
            let Some(sub) = self.sub.as_mut() else {
                self.lose("no subscription");
                continue;
            };
            let lost = async {
                match self.lost.as_mut() {
                    Some(lost) => lost.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = sub.next() => match msg {
                    Some(msg) => {
                        self.backoff = FIRST_BACKOFF;
                        return Delivery::Message(msg);
                    }
                    None => self.lose("the subscription ended"),
                },
                lost = lost => match lost {
                    Ok(subject) if subject == self.subject => {
                        self.lose("the server removed the subscription");
                    }
                    Ok(_) => {}
                    // Notices were missed, perhaps this one's: subscribing again is harmless.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.lose("removal notices were missed");
                    }
                    Err(broadcast::error::RecvError::Closed) => self.lost = None,
                },
            }
        }
    }

    /// Drops the subscription and schedules the next attempt.
    fn lose(&mut self, why: &str) {
        if self.retry_at.is_some() {
            return;
        }
        self.sub = None;
        let jitter = self.backoff.mul_f64(fastrand::f64() * 0.5);
        let wait = self.backoff + jitter;
        warn!(subject = %self.subject, reason = why, retry_in_ms = wait.as_millis() as u64, "subscription lost; subscribing again");
        self.retry_at = Some(Instant::now() + wait);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.missing.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Resubscribing {
    fn drop(&mut self) {
        if self.retry_at.is_some() {
            self.missing.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
