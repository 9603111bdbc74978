//! `snaprelay run`: the sidecar daemon, until SIGTERM or SIGINT.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon::Daemon;

pub async fn run(config: &Config) -> anyhow::Result<()> {
    let daemon = Daemon::new(config.clone())?;
    let cancel = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        stop.cancel();
    });
    daemon.run(cancel).await
}
