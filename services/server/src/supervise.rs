//! Every long task of `tidings serve`, owned: spawned on one [`TaskTracker`], stopped by one
//! [`CancellationToken`], and watched.
//!
//! - [`Supervisor::restarting`]: a task that may fail and be made again (the log service on
//!   NATS). When it fails, ends, or panics it is down in `/readyz` with the reason, and is
//!   restarted after a jittered, doubling backoff; more than [`MAX_RESTARTS`] failures in a
//!   row (none of them after a run of [`STABLE_AFTER`]) make the failure fatal.
//! - [`Supervisor::essential`]: a task whose end is fatal (the sequencer's watch, the
//!   publisher, the archiver): restarting it could not help or would lose its state.
//! - [`Supervisor::fatal`] resolves with the first fatal reason; `serve` then shuts down in
//!   order and exits non-zero saying it, instead of running on while serving nothing.
//!
//! Why: docs/decisions/supervision.md.

use std::future::Future;
use std::time::Duration;

use tidings_log::panic_text;
use tidings_log_api::health::Health;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

/// Failures in a row before a restartable task's failure becomes fatal: enough to ride out
/// a NATS permission reload or a brief outage, few enough that a task that can never work
/// stops the process within seconds (with the backoff below, about 6 s) rather than look
/// healthy forever.
pub const MAX_RESTARTS: u32 = 8;
/// A run this long counts as a recovery: the failure count and the backoff start over.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);
/// First wait before a restart; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long [`Supervisor::shutdown`] waits for the tasks to stop after cancelling them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The tasks of one process.
#[derive(Clone)]
pub struct Supervisor {
    tracker: TaskTracker,
    cancel: CancellationToken,
    health: Health,
    fatal: watch::Sender<Option<String>>,
}

impl Supervisor {
    pub fn new(health: Health) -> Self {
        Supervisor {
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
            health,
            fatal: watch::channel(None).0,
        }
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Runs `make()` as `name`, made again after each failure (see the module doc).
    pub fn restarting<F, Fut>(&self, name: &'static str, mut make: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let status = self.health.status(name);
        let this = self.clone();
        self.tracker.spawn(async move {
            let mut failures = 0u32;
            let mut backoff = FIRST_BACKOFF;
            loop {
                let started = Instant::now();
                status.up();
                let Some(why) = this.run_once(make()).await else {
                    return; // cancelled
                };
                status.down(why.clone());
                if started.elapsed() >= STABLE_AFTER {
                    failures = 0;
                    backoff = FIRST_BACKOFF;
                }
                failures += 1;
                if failures > MAX_RESTARTS {
                    this.fail(format!(
                        "{name} {why}; gave up after {MAX_RESTARTS} restarts in a row"
                    ));
                    return;
                }
                let wait = backoff + backoff.mul_f64(fastrand::f64() * 0.5);
                warn!(task = name, reason = %why, failures, retry_in_ms = wait.as_millis() as u64, "task stopped; restarting");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = this.cancel.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
    }

    /// Runs `task` as `name`; its end, whatever the outcome, is fatal unless the supervisor
    /// was shutting down.
    pub fn essential<Fut>(&self, name: &'static str, task: Fut)
    where
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let this = self.clone();
        self.tracker.spawn(async move {
            if let Some(why) = this.run_once(task).await {
                this.fail(format!("{name} {why}"));
            }
        });
    }

    /// Runs one attempt in a task of its own (so a panic is caught and named); `None` if
    /// cancelled first, else why it stopped.
    async fn run_once<Fut>(&self, task: Fut) -> Option<String>
    where
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let mut handle = self.tracker.spawn(task);
        let outcome = tokio::select! {
            outcome = &mut handle => outcome,
            _ = self.cancel.cancelled() => {
                handle.abort();
                return None;
            }
        };
        Some(match outcome {
            Ok(Ok(())) => "ended".to_string(),
            Ok(Err(e)) => match e.downcast_ref::<Stopped>() {
                Some(Stopped(how)) => how.clone(),
                None => format!("failed: {e:#}"),
            },
            Err(e) if e.is_panic() => format!("panicked: {}", panic_text(e.into_panic())),
            Err(_) => "was cancelled".to_string(),
        })
    }

    /// Records a fatal failure (the first one wins).
    fn fail(&self, reason: String) {
        error!(%reason, "fatal task failure; shutting down");
        self.fatal.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// The first fatal failure's reason, once there is one.
    pub async fn fatal(&self) -> String {
        let mut rx = self.fatal.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }

    /// The fatal reason, if there is one now.
    pub fn fatal_now(&self) -> Option<String> {
        self.fatal.borrow().clone()
    }

    /// Cancels every task and waits (bounded) for them to stop.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                left = self.tracker.len(),
                "tasks still running after the shutdown grace"
            );
        }
    }
}

/// How a task says in its own words why it stopped (`"panicked: …"`), reported as is
/// after its name; any other error is reported as `failed: …`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Stopped(pub String);

/// Aborts a task spawned elsewhere when dropped: lets [`Supervisor::essential`] own a
/// `JoinHandle` that a helper of another module returned.
pub struct AbortOnDrop(pub AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits for a task spawned elsewhere, aborting it if this future is dropped: its end is an
/// error (a task meant to run until shutdown).
pub async fn owned(handle: tokio::task::JoinHandle<()>) -> anyhow::Result<()> {
    let _abort = AbortOnDrop(handle.abort_handle());
    let how = match handle.await {
        Ok(()) => "stopped".to_string(),
        Err(e) if e.is_panic() => format!("panicked: {}", panic_text(e.into_panic())),
        Err(e) => e.to_string(),
    };
    Err(Stopped(how).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_failing_task_is_restarted_then_given_up_on() {
        let sup = Supervisor::new(Health::default());
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        sup.restarting("flaky", move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move { anyhow::bail!("attempt {n} failed") }
        });
        let reason = sup.fatal().await;
        assert_eq!(runs.load(Ordering::SeqCst), MAX_RESTARTS + 1);
        assert!(reason.starts_with("flaky failed: attempt"), "{reason}");
        assert!(reason.contains("gave up"), "{reason}");
        sup.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_in_an_essential_task_is_fatal_and_named() {
        let sup = Supervisor::new(Health::default());
        sup.essential("sequencer", async { panic!("invariant broken") });
        assert_eq!(sup.fatal().await, "sequencer panicked: invariant broken");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_task_is_down_in_readiness_until_it_runs_again() {
        let health = Health::default();
        let sup = Supervisor::new(health.clone());
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        sup.restarting("service", move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    anyhow::bail!("lost its subscription")
                }
                std::future::pending().await
            }
        });
        while runs.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(health.down().is_empty(), "{:?}", health.down());
        assert!(sup.fatal_now().is_none());
        sup.shutdown().await;
    }
}
