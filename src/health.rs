//! What `/healthz` and `/readyz` answer ([`Health`]): whether the daemon's main loop is stuck
//! (see [`crate::liveness`]), and whether the store and the node's hook answered at the last
//! check (the store's by the store probe too, so a store that hangs is noticed within the
//! probe's deadline, not the request timeout). The daemon updates it; the HTTP listener in
//! [`crate::http`] reads it.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::liveness::Liveness;

/// What `/healthz` and `/readyz` answer from; the daemon updates it. A cheap clone.
#[derive(Clone)]
pub struct Health {
    inner: Arc<HealthInner>,
}

struct HealthInner {
    liveness: Liveness,
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
            .field("liveness", &self.inner.liveness)
            .field("max_lag", &self.inner.max_lag)
            .finish_non_exhaustive()
    }
}

impl Health {
    /// `liveness`: whether the main loop is stuck. `max_lag`: the follower lag, in log
    /// indexes, above which `/readyz` fails.
    pub fn new(liveness: Liveness, max_lag: Option<u64>) -> Health {
        Health {
            inner: Arc::new(HealthInner {
                liveness,
                max_lag,
                checks: Mutex::new(Checks::default()),
            }),
        }
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

    /// (healthy, reason) for `/healthz`: the process is alive and the main loop is not
    /// stuck (idle, or its step made progress within the limit).
    pub fn live(&self) -> (bool, String) {
        match self.inner.liveness.stuck() {
            None => (true, "ok".into()),
            Some(quiet) => (
                false,
                format!(
                    "main loop made no progress for {} (limit {})",
                    whole_seconds(quiet),
                    whole_seconds(self.inner.liveness.stuck_after())
                ),
            ),
        }
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

    fn make(stuck_after: Duration, max_lag: Option<u64>) -> Health {
        Health::new(Liveness::new(stuck_after), max_lag)
    }

    #[tokio::test]
    async fn live_fails_once_a_step_stops_making_progress() {
        let live = Liveness::new(Duration::from_millis(100));
        let health = Health::new(live.clone(), None);
        assert_eq!(health.live(), (true, "ok".to_owned()));
        let (during, after_progress) = live
            .scope(async {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let during = health.live();
                live.progress();
                (during, health.live())
            })
            .await;
        assert!(!during.0);
        assert!(during.1.contains("no progress"), "{}", during.1);
        assert!(after_progress.0);
    }

    #[test]
    fn ready_names_what_is_wrong() {
        let health = make(Duration::from_secs(600), Some(10));
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
        let unbounded = make(Duration::from_secs(600), None);
        unbounded.store_reachable(true);
        unbounded.hook_reachable(true);
        unbounded.lag(Some(1_000_000));
        assert!(unbounded.ready().0);
    }

    #[tokio::test]
    async fn ready_fails_when_the_loop_is_stuck() {
        let live = Liveness::new(Duration::from_millis(50));
        let health = Health::new(live.clone(), None);
        health.store_reachable(true);
        health.hook_reachable(true);
        let (ready, reason) = live
            .scope(async {
                tokio::time::sleep(Duration::from_millis(150)).await;
                health.ready()
            })
            .await;
        assert!(!ready);
        assert!(reason.contains("no progress"), "{reason}");
    }
}
