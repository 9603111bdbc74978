//! Leases: how a GC and a publish that run at the same time keep out of each other's way,
//! with nothing but objects and the store's consistent listing.
//!
//! The hazard: a publish skips uploading a chunk because the store holds it. If that chunk
//! is old and no remaining manifest names it (a killed push left it, or only a deleted
//! manifest used it), a GC running elsewhere — an operator's `snaprelay gc`, a deposed
//! leader's sidecar — may delete it before the publish writes the manifest that names it,
//! and that manifest would name a chunk that does not exist.
//!
//! The protocol: each side writes a lease object under `leases/` and then lists that prefix
//! (write, then read). Of a publish and a GC that overlap, at least one therefore sees the
//! other's lease:
//! - a GC that sees a live publish lease deletes no chunk this time (the next GC will);
//! - a publish that sees a live GC lease waits until that GC is done before it looks at
//!   what the store holds.
//!
//! Holders rewrite their lease every TTL/4 while they work and delete it when done (also
//! when cancelled, as far as the runtime lets them). A lease not rewritten for a TTL, by the
//! store's clock, belongs to a process that died; it is ignored, and the next GC deletes it.
//! A holder that could not rewrite its lease for TTL/2 no longer relies on it: a GC stops
//! deleting chunks, and a publish (like one that stopped waiting for a GC) lists the chunks
//! once more just before its manifest, as publishes without leases had to every time.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::oneshot;

use crate::error::Result;
use crate::repo::{LeaseEntry, LeaseKind, Repo};

/// How long a lease stays live after its holder last wrote it: the longest a dead GC's
/// lease makes publishes wait, and a dead publish's lease makes GC keep chunks.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// How often a publish waiting for a GC looks again.
const POLL: Duration = Duration::from_millis(500);

/// A lease this process holds.
pub struct Lease {
    repo: Repo,
    name: String,
    kind: LeaseKind,
    body: Bytes,
    ttl: Duration,
    renewal: Arc<Mutex<Renewal>>,
    refresher: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
    /// The store's clock at the last check (the time it gave the lease just written), if
    /// that check saw the lease.
    now: Option<DateTime<Utc>>,
    /// Live leases of the other kind seen at the last check.
    others: Vec<LeaseEntry>,
    /// Stale leases seen at the last check.
    stale: Vec<LeaseEntry>,
    /// A publish that stopped waiting for a GC that kept its lease live.
    gave_up: bool,
}

/// The lease's writes, by this process's monotonic clock.
struct Renewal {
    /// When the last write that succeeded was sent: the store stamped it no earlier.
    sent: Instant,
    /// Once true, stays true: some gap between writes was long enough for others to take
    /// the lease for stale, so whatever it protected may have happened meanwhile.
    lapsed: bool,
}

impl Renewal {
    /// Records a write sent at `sent` that just succeeded.
    fn written(&mut self, sent: Instant, ttl: Duration) {
        if self.sent.elapsed() >= ttl / 2 {
            self.lapsed = true;
        }
        // A renewal and a check may overlap; the later send counts.
        self.sent = self.sent.max(sent);
    }
}

impl Lease {
    /// Writes a lease of `kind`, lists the leases and keeps the lease written until
    /// [`Lease::release`]. Does not wait for anyone.
    pub async fn take(
        repo: &Repo,
        kind: LeaseKind,
        ttl: Duration,
        node_id: Option<u64>,
    ) -> Result<Lease> {
        let name = format!("{}-{:016x}.json", kind.as_str(), rand::random::<u64>());
        let body = serde_json::json!({
            "kind": kind.as_str(),
            "node_id": node_id,
            "host": hostname(),
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "taken_at": Utc::now(),
        });
        let mut lease = Lease {
            repo: repo.clone(),
            name,
            kind,
            body: Bytes::from(serde_json::to_vec(&body).expect("lease body serializes")),
            ttl,
            renewal: Arc::new(Mutex::new(Renewal {
                sent: Instant::now(),
                lapsed: false,
            })),
            refresher: None,
            now: None,
            others: Vec::new(),
            stale: Vec::new(),
            gave_up: false,
        };
        if let Err(e) = lease.check().await {
            // The write may have landed before the listing failed.
            let _ = lease.repo.delete_lease(&lease.name).await;
            return Err(e);
        }
        lease.refresher = Some(lease.spawn_refresher());
        Ok(lease)
    }

    /// Takes a publish lease and, while a live GC lease exists, waits for it to go. A GC
    /// looks for publish leases before each batch of deletions and stops when it sees one,
    /// so the wait is short; one that outlasts a TTL while renewing its lease is stuck, and
    /// the publish proceeds with the final re-check instead.
    pub async fn for_publish(repo: &Repo, ttl: Duration, node_id: Option<u64>) -> Result<Lease> {
        let mut lease = Lease::take(repo, LeaseKind::Publish, ttl, node_id).await?;
        let started = Instant::now();
        let mut said = false;
        while !lease.others.is_empty() {
            if started.elapsed() >= ttl {
                let gc = lease.describe_others().await;
                tracing::warn!(
                    gc = %gc,
                    waited_s = started.elapsed().as_secs(),
                    "a GC is still running; publishing anyway, checking every chunk again before the manifest"
                );
                lease.gave_up = true;
                break;
            }
            if !said {
                let gc = lease.describe_others().await;
                tracing::warn!(gc = %gc, "waiting for a GC in progress to finish");
                said = true;
            }
            tokio::time::sleep(POLL).await;
            lease.check().await?;
        }
        if said && lease.others.is_empty() {
            tracing::info!(
                waited_ms = started.elapsed().as_millis() as u64,
                "the GC finished; publishing"
            );
        }
        Ok(lease)
    }

    /// Rewrites the lease and lists the leases: afterwards `store_now`, `others` and
    /// `stale` describe the store as it is.
    pub async fn check(&mut self) -> Result<()> {
        let sent = Instant::now();
        self.repo.put_lease(&self.name, self.body.clone()).await?;
        self.renewal
            .lock()
            .expect("lease renewal lock")
            .written(sent, self.ttl);
        let listed = self.repo.list_leases().await?;
        let Some(own) = listed.iter().find(|l| l.name == self.name) else {
            // The store's listing does not show what was just written: no other process
            // can be relied on to see it either, and nothing it lists can be judged.
            tracing::warn!(
                lease = %self.name,
                "the store's listing does not show a lease just written; not relying on it"
            );
            self.now = None;
            self.others.clear();
            self.stale.clear();
            return Ok(());
        };
        let now = own.last_modified;
        let ttl = chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::MAX);
        let (live, stale): (Vec<LeaseEntry>, Vec<LeaseEntry>) = listed
            .into_iter()
            .filter(|l| l.name != self.name)
            .partition(|l| now.signed_duration_since(l.last_modified) < ttl);
        self.now = Some(now);
        self.others = live.into_iter().filter(|l| l.kind != self.kind).collect();
        self.stale = stale;
        Ok(())
    }

    fn spawn_refresher(&self) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let (stop, mut stopped) = oneshot::channel();
        let repo = self.repo.clone();
        let name = self.name.clone();
        let body = self.body.clone();
        let renewal = self.renewal.clone();
        let ttl = self.ttl;
        let every = self.ttl / 4;
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(every) => {}
                }
                // Not raced against `stopped`: a write cut off mid-request could land
                // after the release deleted the lease.
                let sent = Instant::now();
                match repo.put_lease(&name, body.clone()).await {
                    Ok(()) => renewal
                        .lock()
                        .expect("lease renewal lock")
                        .written(sent, ttl),
                    Err(e) => tracing::warn!(lease = %name, error = %e, "could not renew a lease"),
                }
            }
        });
        (stop, task)
    }

    /// The store's clock at the last check, if that check saw the lease.
    pub fn store_now(&self) -> Option<DateTime<Utc>> {
        self.now
    }

    /// Live leases of the other kind seen at the last check (for a GC: publishes in flight).
    pub fn others(&self) -> &[LeaseEntry] {
        &self.others
    }

    /// Leases whose holders stopped renewing them a TTL ago or more.
    pub fn stale(&self) -> &[LeaseEntry] {
        &self.stale
    }

    /// How long others are still certain to see the lease live: half a TTL after the last
    /// write was sent, or nothing once it lapsed.
    pub fn remaining(&self) -> Duration {
        let renewal = self.renewal.lock().expect("lease renewal lock");
        match renewal.lapsed {
            true => Duration::ZERO,
            false => (self.ttl / 2).saturating_sub(renewal.sent.elapsed()),
        }
    }

    /// Whether others have seen the lease live without a gap since it was taken.
    pub fn fresh(&self) -> bool {
        !self.remaining().is_zero()
    }

    /// Whether the other side is certain to have kept out of the way since the lease was
    /// taken: the last check saw the lease and nobody of the other kind, the lease never
    /// lapsed, and (for a publish) it did not stop waiting for a GC.
    pub fn holds(&self) -> bool {
        self.now.is_some() && self.others.is_empty() && !self.gave_up && self.fresh()
    }

    /// The error of a holder that must stop because its lease is no longer fresh.
    pub fn lapsed(&self) -> crate::error::Error {
        crate::error::Error::LeaseLapsed {
            lease: self.name.clone(),
            secs: (self.ttl / 2).as_secs(),
        }
    }

    /// The other side's leases, with what their holders say about themselves.
    async fn describe_others(&self) -> String {
        let mut parts = Vec::new();
        for l in &self.others {
            let holder = match self.repo.read_lease(&l.name).await {
                Ok(body) => String::from_utf8_lossy(&body).into_owned(),
                Err(e) => format!("unreadable: {e}"),
            };
            parts.push(format!("{} {holder}", l.name));
        }
        parts.join("; ")
    }

    /// Stops renewing the lease and deletes it. A lease left behind (the delete failed)
    /// only holds the other side back until it goes stale.
    pub async fn release(mut self) {
        if let Some((stop, task)) = self.refresher.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
        if let Err(e) = self.repo.delete_lease(&self.name).await {
            tracing::warn!(lease = %self.name, error = %e, "could not delete a lease; it goes stale in its TTL");
        }
    }
}

impl Drop for Lease {
    /// Dropped without `release` (the holder was cancelled): stop renewing, and delete the
    /// lease in the background if the runtime still runs, so that a cancelled GC does not
    /// hold publishes back until its lease goes stale.
    fn drop(&mut self) {
        let Some((_, task)) = self.refresher.take() else {
            return; // released
        };
        task.abort();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let repo = self.repo.clone();
            let name = std::mem::take(&mut self.name);
            runtime.spawn(async move {
                // Once the renewal task is gone. (A renewal cut off mid-request may still
                // land after the delete; that lease then goes stale in a TTL.)
                let _ = task.await;
                if let Err(e) = repo.delete_lease(&name).await {
                    tracing::warn!(lease = %name, error = %e, "could not delete the lease of a cancelled operation");
                }
            });
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkParams;
    use crate::store::{Store, StoreSettings, StoreUrl};

    async fn repo() -> Repo {
        let store = Store::open(&StoreSettings::for_url(StoreUrl::Memory)).unwrap();
        Repo::open_or_create(store, "c", ChunkParams::default())
            .await
            .unwrap()
    }

    const LONG: Duration = Duration::from_secs(300);

    /// A repository on a file:// store at `root`, which a test can take away.
    async fn file_repo(root: &std::path::Path) -> Repo {
        let url = StoreUrl::parse(&format!("file://{}", root.display())).unwrap();
        let store = Store::open(&StoreSettings::for_url(url)).unwrap();
        Repo::open_or_create(store, "c", ChunkParams::default())
            .await
            .unwrap()
    }

    /// Moves the store at `root` to `away` and leaves a file in its place: every write
    /// fails until it is moved back.
    fn take_away(root: &std::path::Path, away: &std::path::Path) {
        std::fs::rename(root, away).unwrap();
        std::fs::write(root, b"not a directory").unwrap();
    }

    #[tokio::test]
    async fn each_side_sees_the_other_and_release_removes_the_lease() {
        let repo = repo().await;
        let publish = Lease::take(&repo, LeaseKind::Publish, LONG, Some(1))
            .await
            .unwrap();
        assert!(publish.others().is_empty());
        assert!(publish.holds());
        let gc = Lease::take(&repo, LeaseKind::Gc, LONG, None).await.unwrap();
        assert_eq!(gc.others().len(), 1);
        assert_eq!(gc.others()[0].name, publish.name);
        assert_eq!(gc.others()[0].kind, LeaseKind::Publish);
        // A second publish sees the GC, not the first publish.
        let second = Lease::take(&repo, LeaseKind::Publish, LONG, Some(2))
            .await
            .unwrap();
        assert_eq!(second.others().len(), 1);
        assert_eq!(second.others()[0].kind, LeaseKind::Gc);
        assert!(
            !second.holds(),
            "a publish that saw a live GC cannot rely on its lease"
        );
        let holder = repo.read_lease(&publish.name).await.unwrap();
        let holder: serde_json::Value = serde_json::from_slice(&holder).unwrap();
        assert_eq!(holder["kind"], "publish");
        assert_eq!(holder["node_id"], 1);

        for lease in [publish, gc, second] {
            lease.release().await;
        }
        assert!(repo.list_leases().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_lease_nobody_renews_goes_stale() {
        let repo = repo().await;
        let ttl = Duration::from_millis(200);
        // What a process that died leaves: a lease written once, never renewed or deleted.
        let name = "publish-00000000000000ff.json";
        repo.put_lease(name, Bytes::from_static(b"{}"))
            .await
            .unwrap();
        tokio::time::sleep(ttl * 2).await;
        let gc = Lease::take(&repo, LeaseKind::Gc, ttl, None).await.unwrap();
        assert!(gc.others().is_empty());
        assert_eq!(gc.stale().len(), 1);
        assert_eq!(gc.stale()[0].name, name);
        gc.release().await;
    }

    #[tokio::test]
    async fn a_cancelled_holder_deletes_its_lease() {
        let repo = repo().await;
        let lease = Lease::take(&repo, LeaseKind::Gc, LONG, None).await.unwrap();
        assert_eq!(repo.list_leases().await.unwrap().len(), 1);
        drop(lease);
        for _ in 0..100 {
            if repo.list_leases().await.unwrap().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the lease of a cancelled GC was left behind");
    }

    #[tokio::test]
    async fn a_lease_that_cannot_be_renewed_stops_vouching() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let repo = file_repo(&root).await;
        let ttl = Duration::from_millis(200);
        let lease = Lease::take(&repo, LeaseKind::Publish, ttl, None)
            .await
            .unwrap();
        assert!(lease.fresh() && lease.holds());
        // The store goes away: renewals fail from now on.
        take_away(&root, &dir.path().join("gone"));
        tokio::time::sleep(ttl).await;
        assert!(!lease.fresh());
        assert!(!lease.holds());
        assert!(lease.lapsed().is_transient());
        lease.release().await; // the delete fails too; only a warning
    }

    #[tokio::test]
    async fn a_lapse_is_not_forgotten_when_renewals_resume() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let repo = file_repo(&root).await;
        let ttl = Duration::from_millis(200);
        let lease = Lease::take(&repo, LeaseKind::Publish, ttl, None)
            .await
            .unwrap();
        let away = dir.path().join("away");
        take_away(&root, &away);
        tokio::time::sleep(ttl).await;
        // The store comes back and renewals succeed again; others may have taken the lease
        // for stale meanwhile.
        std::fs::remove_file(&root).unwrap();
        std::fs::rename(&away, &root).unwrap();
        tokio::time::sleep(ttl).await;
        let listed = repo.list_leases().await.unwrap();
        assert_eq!(listed.len(), 1, "renewals resumed: {listed:?}");
        assert!(!lease.fresh());
        assert!(!lease.holds());
        lease.release().await;
    }

    #[tokio::test]
    async fn a_held_lease_is_renewed_and_stays_live() {
        let repo = repo().await;
        let ttl = Duration::from_millis(200);
        let publish = Lease::take(&repo, LeaseKind::Publish, ttl, None)
            .await
            .unwrap();
        tokio::time::sleep(ttl * 3).await;
        let gc = Lease::take(&repo, LeaseKind::Gc, ttl, None).await.unwrap();
        assert_eq!(gc.others().len(), 1, "renewals keep the publish lease live");
        assert!(gc.stale().is_empty());
        gc.release().await;
        publish.release().await;
    }

    #[tokio::test]
    async fn a_publish_waits_for_a_running_gc() {
        let repo = repo().await;
        let gc = Lease::take(&repo, LeaseKind::Gc, LONG, None).await.unwrap();
        let waiting = tokio::spawn({
            let repo = repo.clone();
            async move { Lease::for_publish(&repo, LONG, None).await }
        });
        tokio::time::sleep(POLL * 3).await;
        assert!(
            !waiting.is_finished(),
            "the publish went ahead while a GC ran"
        );
        gc.release().await;
        let publish = tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .expect("the publish went on once the GC was done")
            .unwrap()
            .unwrap();
        assert!(publish.holds());
        publish.release().await;
    }

    #[tokio::test]
    async fn a_publish_stops_waiting_after_a_ttl_and_does_not_rely_on_its_lease() {
        let repo = repo().await;
        let ttl = Duration::from_millis(300);
        // A GC that keeps renewing its lease, i.e. one that runs longer than the wait.
        let gc = Lease::take(&repo, LeaseKind::Gc, ttl, None).await.unwrap();
        let publish = Lease::for_publish(&repo, ttl, None).await.unwrap();
        assert!(!publish.holds());
        publish.release().await;
        gc.release().await;
    }

    #[test]
    fn lease_names() {
        assert_eq!(
            LeaseKind::of_name("publish-0123456789abcdef.json"),
            Some(LeaseKind::Publish)
        );
        assert_eq!(
            LeaseKind::of_name("gc-0123456789abcdef.json"),
            Some(LeaseKind::Gc)
        );
        for bad in [
            "gc-0123456789abcdef",
            "gc-0123456789ABCDEF.json",
            "gc-0123456789abcde.json",
            "lock-0123456789abcdef.json",
            "gc-../456789abcdef.json",
            "publish.json",
        ] {
            assert_eq!(LeaseKind::of_name(bad), None, "{bad}");
        }
    }
}
