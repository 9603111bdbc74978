//! What `/healthz` and `/readyz` answer ([`Health`]): whether the daemon's main loop is making
//! progress, and whether the store and the node's hook answered at the last check. The daemon
//! updates it; the HTTP listener in [`crate::http`] and the systemd watchdog read it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What `/healthz` and `/readyz` answer from; the daemon updates it. A cheap clone.
#[derive(Clone)]
pub struct Health {
    inner: Arc<HealthInner>,
}

struct HealthInner {
    started: Instant,
    /// Milliseconds since `started` at the last sign of progress.
    last_progress_ms: AtomicU64,
    stuck_after: Duration,
    max_lag: Option<u64>,
    checks: Mutex<Checks>,
}

/// The last known answers; `None` until first checked.
#[derive(Default)]
struct Checks {
    store: Option<bool>,
    hook: Option<bool>,
    lag: Option<u64>,
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("stuck_after", &self.inner.stuck_after)
            .field("max_lag", &self.inner.max_lag)
            .finish_non_exhaustive()
    }
}

impl Health {
    /// `stuck_after`: how long the main loop may go without progress before `/healthz`
    /// fails. `max_lag`: the follower lag, in log indexes, above which `/readyz` fails.
    pub fn new(stuck_after: Duration, max_lag: Option<u64>) -> Health {
        Health {
            inner: Arc::new(HealthInner {
                started: Instant::now(),
                last_progress_ms: AtomicU64::new(0),
                stuck_after,
                max_lag,
                checks: Mutex::new(Checks::default()),
            }),
        }
    }

    /// The main loop finished a step, or a transfer moved data (call often: a long
    /// transfer that does not call this looks stuck).
    pub fn loop_progress(&self) {
        let ms = self.inner.started.elapsed().as_millis() as u64;
        self.inner.last_progress_ms.store(ms, Ordering::Relaxed);
    }

    pub fn store_reachable(&self, ok: bool) {
        self.checks().store = Some(ok);
    }

    pub fn hook_reachable(&self, ok: bool) {
        self.checks().hook = Some(ok);
    }

    /// Follower lag in log indexes; `None` on a leader (no bound applies).
    pub fn lag(&self, lag: Option<u64>) {
        self.checks().lag = lag;
    }

    /// (healthy, reason) for `/healthz`: the process is alive and the main loop made
    /// progress within `stuck_after`.
    pub fn live(&self) -> (bool, String) {
        let quiet = self.since_progress();
        if quiet <= self.inner.stuck_after {
            return (true, "ok".into());
        }
        (
            false,
            format!(
                "main loop made no progress for {} (limit {})",
                whole_seconds(quiet),
                whole_seconds(self.inner.stuck_after)
            ),
        )
    }

    /// (ready, reason) for `/readyz`: the store and the node's hook were reachable at the
    /// last check, the follower lag is within `max_lag` when one is set, and the main loop
    /// is not stuck (else the checks are stale). The reason names every failed condition.
    pub fn ready(&self) -> (bool, String) {
        let mut problems = Vec::new();
        {
            let checks = self.checks();
            match checks.store {
                Some(true) => {}
                Some(false) => problems.push("store unreachable".to_owned()),
                None => problems.push("store not checked yet".to_owned()),
            }
            match checks.hook {
                Some(true) => {}
                Some(false) => problems.push("node hook unreachable".to_owned()),
                None => problems.push("node hook not checked yet".to_owned()),
            }
            if let (Some(lag), Some(max)) = (checks.lag, self.inner.max_lag) {
                if lag > max {
                    problems.push(format!("follower lag {lag} exceeds max_lag {max}"));
                }
            }
        }
        if let (false, reason) = self.live() {
            problems.push(reason);
        }
        if problems.is_empty() {
            (true, "ok".into())
        } else {
            (false, problems.join("; "))
        }
    }

    fn since_progress(&self) -> Duration {
        let last = Duration::from_millis(self.inner.last_progress_ms.load(Ordering::Relaxed));
        self.inner.started.elapsed().saturating_sub(last)
    }

    fn checks(&self) -> MutexGuard<'_, Checks> {
        self.inner
            .checks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn whole_seconds(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(d.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_fails_once_the_loop_stops_making_progress() {
        let health = Health::new(Duration::from_millis(100), None);
        assert_eq!(health.live(), (true, "ok".to_owned()));
        std::thread::sleep(Duration::from_millis(250));
        let (live, reason) = health.live();
        assert!(!live);
        assert!(reason.contains("no progress"), "{reason}");
        health.loop_progress();
        assert!(health.live().0);
    }

    #[test]
    fn ready_names_what_is_wrong() {
        let health = Health::new(Duration::from_secs(600), Some(10));
        let (ready, reason) = health.ready();
        assert!(!ready, "not ready before the first checks");
        assert!(reason.contains("not checked yet"), "{reason}");

        health.store_reachable(true);
        health.hook_reachable(true);
        health.lag(Some(10));
        assert_eq!(health.ready(), (true, "ok".to_owned()));

        health.store_reachable(false);
        assert_eq!(health.ready(), (false, "store unreachable".to_owned()));
        health.store_reachable(true);

        health.hook_reachable(false);
        assert_eq!(health.ready(), (false, "node hook unreachable".to_owned()));
        health.hook_reachable(true);

        health.lag(Some(11));
        assert_eq!(
            health.ready(),
            (false, "follower lag 11 exceeds max_lag 10".to_owned())
        );
        // A leader has no lag.
        health.lag(None);
        assert!(health.ready().0);

        // Without a bound any lag is fine.
        let unbounded = Health::new(Duration::from_secs(600), None);
        unbounded.store_reachable(true);
        unbounded.hook_reachable(true);
        unbounded.lag(Some(1_000_000));
        assert!(unbounded.ready().0);
    }

    #[test]
    fn ready_fails_when_the_loop_is_stuck() {
        let health = Health::new(Duration::from_millis(50), None);
        health.store_reachable(true);
        health.hook_reachable(true);
        std::thread::sleep(Duration::from_millis(150));
        let (ready, reason) = health.ready();
        assert!(!ready);
        assert!(reason.contains("no progress"), "{reason}");
    }
}
