//! systemd integration through `sd_notify`: `READY=1` once the daemon can do its job,
//! `STATUS=` lines an operator sees in `systemctl status`, `STOPPING=1` on shutdown, and a
//! watchdog that is petted only while the main loop makes progress — a loop stuck on a
//! hung request stops the petting and systemd restarts the unit. Without `NOTIFY_SOCKET`
//! (not under systemd) every call is a no-op.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::progress::Progress;

/// What snaprelay@.service passes (`SetCredential=`) for a credential whose file is not
/// installed, so that the unit still starts for a store that needs none; a config that names
/// such a credential fails with an error saying which file to install.
pub const CREDENTIAL_PLACEHOLDER: &str = "snaprelay-credential-not-installed";

#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    health: Health,
    started: Instant,
    /// Milliseconds since `started` at the last sign of progress.
    last_progress_ms: AtomicU64,
    watchdog: Option<Duration>,
}

impl Supervisor {
    /// Reads `NOTIFY_SOCKET` / `WATCHDOG_USEC` as systemd sets them.
    pub fn from_env(health: Health) -> Supervisor {
        Supervisor {
            inner: Arc::new(Inner {
                health,
                started: Instant::now(),
                last_progress_ms: AtomicU64::new(0),
                watchdog: sd_notify::watchdog_enabled(),
            }),
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    pub fn ready(&self, status: &str) {
        self.alive();
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// Marks progress: the main loop finished a step, or a transfer moved a chunk.
    pub fn alive(&self) {
        self.inner.health.loop_progress();
        let ms = self.inner.started.elapsed().as_millis() as u64;
        self.inner.last_progress_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last sign of progress (health checks use it too).
    pub fn since_progress(&self) -> Duration {
        let last = Duration::from_millis(self.inner.last_progress_ms.load(Ordering::Relaxed));
        self.inner.started.elapsed().saturating_sub(last)
    }

    /// A transfer progress sink that counts as progress for the watchdog, so a long upload
    /// is not mistaken for a stuck loop.
    pub fn progress(&self) -> SupervisedProgress {
        SupervisedProgress(self.clone())
    }

    /// Pets the watchdog every half interval while progress is recent. No task without a
    /// watchdog.
    pub fn spawn_watchdog(&self, cancel: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let interval = self.inner.watchdog?;
        let me = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let quiet = me.since_progress();
                if quiet < interval {
                    me.send(&[NotifyState::Watchdog]);
                } else {
                    tracing::warn!(
                        quiet_ms = quiet.as_millis() as u64,
                        "main loop made no progress; not petting the watchdog"
                    );
                }
            }
        }))
    }
}

pub struct SupervisedProgress(Supervisor);

impl Progress for SupervisedProgress {
    fn advance(&self, _bytes: u64) {
        self.0.alive();
    }
}
