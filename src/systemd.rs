//! systemd integration through `sd_notify`: `READY=1` once the daemon can do its job,
//! `STATUS=` lines an operator sees in `systemctl status`, `STOPPING=1` on shutdown, and a
//! watchdog that is petted unless the main loop is stuck ([`crate::liveness`]): a loop
//! waiting by its own choice (a backoff, the next poll) or making progress (store answers,
//! chunks moved) is petted however long it takes; a step with no progress for longer than
//! `daemon.stuck_after` stops the petting, and systemd restarts the unit a `WatchdogSec`
//! later. Without `NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::sync::Arc;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::liveness::Liveness;
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
    liveness: Liveness,
    watchdog: Option<std::time::Duration>,
}

impl Supervisor {
    /// Reads `NOTIFY_SOCKET` / `WATCHDOG_USEC` as systemd sets them.
    pub fn from_env(liveness: Liveness) -> Supervisor {
        Supervisor {
            inner: Arc::new(Inner {
                liveness,
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

    /// Marks progress: a transfer moved a chunk.
    pub fn alive(&self) {
        self.inner.liveness.progress();
    }

    /// A transfer progress sink that counts as progress for the watchdog, so a long upload
    /// is not mistaken for a stuck loop.
    pub fn progress(&self) -> SupervisedProgress {
        SupervisedProgress(self.clone())
    }

    /// Pets the watchdog every half interval unless the main loop is stuck. No task
    /// without a watchdog.
    pub fn spawn_watchdog(&self, cancel: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let interval = self.inner.watchdog?;
        let me = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            let mut withheld = false;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match me.inner.liveness.stuck() {
                    None => {
                        if withheld {
                            tracing::info!(
                                "the main loop makes progress again; petting the watchdog"
                            );
                            withheld = false;
                        }
                        me.send(&[NotifyState::Watchdog]);
                    }
                    Some(quiet) if !withheld => {
                        withheld = true;
                        tracing::error!(
                            quiet_ms = quiet.as_millis() as u64,
                            limit_ms = me.inner.liveness.stuck_after().as_millis() as u64,
                            "the main loop is stuck (no progress in its step); no longer petting the watchdog, so systemd restarts the service"
                        );
                    }
                    Some(_) => {}
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
