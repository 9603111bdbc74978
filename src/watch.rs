//! Watches a node's snapshot directory: file events (notify) become a debounced "something
//! may be ready" signal. Events can be missed (overflow, a directory recreated), so the
//! daemon also rescans at start and periodically; this only makes publishing prompt.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::snapdir;

/// How long to let a burst of events settle. Only committed envelopes count, and an envelope
/// appears by a rename once its data file is complete and fsynced, so there is nothing to
/// wait for but the other events of the same rename (create/moved-to/close): a few
/// milliseconds, where every millisecond is one of propagation.
const DEBOUNCE: Duration = Duration::from_millis(5);

pub struct DirWatcher {
    dir: PathBuf,
    // Dropping the watcher stops it; it is kept alive here.
    _watcher: RecommendedWatcher,
    rx: mpsc::Receiver<()>,
}

impl DirWatcher {
    /// Starts watching `dir` (not recursively: the incoming directory inside it is not the
    /// node's business to publish).
    pub fn new(dir: &Path) -> notify::Result<DirWatcher> {
        // Capacity 1: any number of events before the daemon looks collapse into one.
        let (tx, rx) = mpsc::channel(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let relevant = match &event {
                    Ok(event) => event.paths.iter().any(|p| {
                        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                            n.ends_with(snapdir::META_SUFFIX) && !snapdir::is_ignored(n)
                        })
                    }),
                    // An error (e.g. queue overflow) may hide events: have the daemon look.
                    Err(_) => true,
                };
                if relevant {
                    let _ = tx.try_send(());
                }
            })?;
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        Ok(DirWatcher {
            dir: dir.to_owned(),
            _watcher: watcher,
            rx,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits for the next change, then lets the burst settle. Cancel safe.
    pub async fn changed(&mut self) {
        if self.rx.recv().await.is_none() {
            // The watcher is gone; never report again.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(DEBOUNCE).await;
        while self.rx.try_recv().is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_committed_envelopes_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DirWatcher::new(dir.path()).unwrap();
        std::fs::write(dir.path().join("data.bin"), b"x").unwrap();
        std::fs::write(dir.path().join(".x.meta.json.tmp"), b"{}").unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(300), w.changed()).await;
        assert!(quiet.is_err(), "data and temp files must not trigger");
        std::fs::rename(
            dir.path().join(".x.meta.json.tmp"),
            dir.path().join("x.meta.json"),
        )
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("committing an envelope is reported");
    }
}
