//! Leases: how a GC and a publish that run at the same time keep out of each other's way,
//! with nothing but objects and the store's consistent listing.
//!
//! The hazard: a publish skips uploading a chunk because the store holds it. If that chunk
//! is old and no remaining manifest names it (a killed push left it, or only a deleted
//! manifest used it), a GC running elsewhere — an operator's `snaprelay gc`, a deposed
//! leader's sidecar — may delete it before the publish writes the manifest that names it,
//! and that manifest would name a chunk that does not exist.
//!
//! # The protocol
//!
//! Each side writes a lease object under `leases/` (a fresh name for every take) and then
//! lists that prefix: a *check*. Holders rewrite their lease every TTL/4 while they work and
//! delete it when done. A lease not rewritten for a TTL, by the store's clock, belongs to a
//! process that died or stalled: it is *stale*, ignored, and deleted by the next GC.
//!
//! - A publish takes its lease, and while a check shows a live GC lease it waits (looking
//!   again every 500 ms), for at most a TTL after the take. Only then does it look at what
//!   the store holds. Its manifest must be written while its lease is *fresh*: rewritten
//!   without a gap of TTL/2, measured by this process's clock, from the take to the end of
//!   the manifest's write. When it is not, the publish takes a new lease (new name), waits
//!   for GCs again, lists the chunks again and re-sends what vanished, then writes.
//! - A GC deletes a batch of chunks only after a check that shows no live publish lease, and
//!   only on the strength of a manifest listing taken after a check that showed none either,
//!   with no check in between showing one. A check that shows a publish stops the deleting
//!   for this run (the next GC does the rest): GCs never wait for publishes, which wait for
//!   GCs, so the two cannot wait for each other. A GC whose first check showed a publish
//!   lists the manifests again once a later check shows none. Each batch's deletes are
//!   sent before half a TTL has passed since the check's lease write was sent.
//!
//! # Why it holds
//!
//! Assumptions: (T1) the store's clock and each process's monotonic clock run at nearly the
//! same rate (the factor of two between TTL/2 and TTL is the margin); (T2) a store request
//! takes effect, if ever, before its sender stops waiting for it or soon after, well within
//! that margin (the store does not queue requests for later). A process frozen for more
//! than TTL/2 between deciding and sending a request is outside the protocol: no object
//! store offers fenced deletes that would close that, so the TTL is generous (60 s).
//!
//! Suppose a GC `G` deletes chunk `X` in a batch after check `c_k`, relying on a manifest
//! listing `M` taken after check `c_j`, all of `c_j..=c_k` clean; and a publish `P`, whose
//! current lease was taken at `p`, writes manifest `N` naming `X`, having looked at the
//! store after `p`'s wait ended.
//!
//! 1. If `N` was written before `M` began, `M` lists it and `X` is not a candidate.
//! 2. Otherwise `N` was written after `c_j`'s listing. `P`'s lease is fresh from `p` until
//!    `N` is written (the publish's rule), hence live by the store's clock (T1), and only
//!    `P` deletes a live lease. So if `p`'s write came before `c_j`'s listing, `c_j` shows
//!    it: not clean. Hence `p` came after `c_j`'s listing, and so after `c_k`'s too (`c_k`
//!    would show it as well).
//! 3. `G`'s lease, written by `c_k`, stays live until at least a TTL after `c_k`, and the
//!    batch's deletes are sent within TTL/2 of it. `P`'s check at `p` comes after `c_k`'s
//!    write: if it comes before `X`'s delete has landed, it shows `G`, and `P` waits until
//!    `G`'s lease is gone (`G` released it after its deletes, or left it to go stale, see
//!    below) or a TTL after `p` has passed — later than TTL/2 after `c_k`, when the batch
//!    has ended (T1, T2). Either way `P` looks at the store after `X`'s delete landed,
//!    finds `X` missing and uploads it. `G` deletes a chunk at most once per run, and every
//!    later check of `G` shows `P`, so `G` deletes nothing more: `N` names only chunks that
//!    exist. Other GCs are other `G`s.
//!
//! The other paths, each reduced to the argument above:
//! - *A publish that stops waiting for a GC* (a GC holding its lease for a TTL): waiting a
//!   TTL after its take outlasts every batch of a check that did not show the publish
//!   (step 3), and every later check shows it; so the publish looks at the store as usual.
//! - *A lapsed publish lease*: a GC may have taken it for stale and deleted it, and would
//!   not see the publish. The publish never relies on that name again: it takes a new one
//!   and starts over from step 2 (wait, list the chunks again, re-send what vanished).
//!   Nobody deletes a fresh lease: a GC deletes only stale ones (T1: stale means its holder
//!   already knows it is not fresh) and the holder its own.
//! - *A lapsed GC lease*: each batch is bounded by its own check (step 3), so a lapse needs
//!   no more than the GC stopping, which it does.
//! - *The manifest's write outlasting the lease*: the write is cut off when the lease stops
//!   being fresh; if it may have landed meanwhile, the publish takes a new lease and puts
//!   back any missing chunk before it reports success.
//! - *The GC's listing order*: manifests it deletes go first (before its lease: readers
//!   never see a manifest whose chunks are gone, and a publish does not depend on old
//!   manifests); the listing it keeps chunks for comes after its lease's first check.
//! - *Cancellation or failure in flight*: a request that did not succeed (cut off, timed
//!   out, failed) may still land (T2). A GC delete or a publish's manifest write that ends
//!   that way leaves its lease to go stale instead of deleting it, so the other side keeps
//!   out of the way for another TTL — longer than such a request can take to land.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
// tokio's clock, not std's: the same in production, and tests can pause it to drive every
// time-based path (lapses, waits) deterministically.
use tokio::time::Instant;

use crate::error::Result;
use crate::repo::{LeaseEntry, LeaseKind, Repo};

/// How long a lease stays live after its holder last wrote it: the longest a dead GC's
/// lease makes publishes wait, and a dead publish's lease makes GC keep chunks.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// How often a publish waiting for a GC looks again.
const POLL: Duration = Duration::from_millis(500);

/// What one check (write the lease, list the leases) saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Which check of this lease it was (1 is the take's), counting across re-takes.
    pub seq: u64,
    /// The store's clock (the time it gave the lease just written), or `None` if the
    /// listing did not show that lease: then nothing it lists can be judged.
    pub store_now: Option<DateTime<Utc>>,
    /// Live leases of the other kind.
    pub others: Vec<LeaseEntry>,
    /// Leases whose holders stopped renewing them a TTL ago or more.
    pub stale: Vec<LeaseEntry>,
    /// Until when others are certain to see the lease as this check wrote it (TTL/2 after
    /// the write was sent): the deadline of anything decided on the strength of this check.
    pub deadline: Instant,
}

impl Seen {
    /// Whether the check saw its own lease and no live lease of the other kind.
    pub fn clear(&self) -> bool {
        self.store_now.is_some() && self.others.is_empty()
    }
}

/// A lease this process holds.
pub struct Lease {
    repo: Repo,
    kind: LeaseKind,
    body: Bytes,
    ttl: Duration,
    /// The current lease object's name; a new one for every take.
    name: String,
    shared: Arc<Mutex<Shared>>,
    refresher: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
    seen: Seen,
    /// When the current take's first check returned.
    taken: Instant,
    /// A publish that stopped waiting for a GC that kept its lease live.
    gave_up: bool,
}

/// State shared with the renewal task and with [`Guard`]s.
struct Shared {
    /// When the last write of the current name that succeeded was sent: the store stamped
    /// it no earlier.
    sent: Instant,
    /// Once true, stays true until the next take: some gap between writes was long enough
    /// for others to take the lease for stale.
    lapsed: bool,
    /// Guarded requests in flight.
    in_flight: usize,
    /// A guarded request did not succeed and may still land: the lease must go stale
    /// rather than be deleted, so that the other side keeps out of the way meanwhile.
    doubtful: bool,
}

impl Shared {
    /// Records a write sent at `sent` that just succeeded.
    fn written(&mut self, sent: Instant, ttl: Duration) {
        if self.sent.elapsed() >= ttl / 2 {
            self.lapsed = true;
        }
        // A renewal and a check may overlap; the later send counts.
        self.sent = self.sent.max(sent);
    }
}

/// A request the lease vouches for (a GC's delete, a publish's manifest write) while it is
/// in flight. Call [`Guard::done`] when it succeeded; dropped otherwise (failed, cut off,
/// cancelled), it marks the lease as one to leave to go stale.
pub struct Guard {
    shared: Arc<Mutex<Shared>>,
    done: bool,
}

impl Guard {
    pub fn done(mut self) {
        self.done = true;
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut shared = self.shared.lock().expect("lease state lock");
        shared.in_flight -= 1;
        if !self.done {
            shared.doubtful = true;
        }
    }
}

fn new_name(kind: LeaseKind) -> String {
    format!("{}-{:016x}.json", kind.as_str(), rand::random::<u64>())
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
        let body = serde_json::json!({
            "kind": kind.as_str(),
            "node_id": node_id,
            "host": hostname(),
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "taken_at": Utc::now(),
        });
        let now = Instant::now();
        let mut lease = Lease {
            repo: repo.clone(),
            kind,
            // A JSON value of strings and numbers always serializes.
            body: Bytes::from(serde_json::to_vec(&body).expect("lease body serializes")),
            ttl,
            name: new_name(kind),
            shared: Arc::new(Mutex::new(Shared {
                sent: now,
                lapsed: false,
                in_flight: 0,
                doubtful: false,
            })),
            refresher: None,
            seen: Seen {
                seq: 0,
                store_now: None,
                others: Vec::new(),
                stale: Vec::new(),
                deadline: now,
            },
            taken: now,
            gave_up: false,
        };
        lease.start().await?;
        Ok(lease)
    }

    /// The first check of the current name, then its renewals.
    async fn start(&mut self) -> Result<()> {
        if let Err(e) = self.check().await {
            // The write may have landed before the listing failed.
            let _ = self.repo.delete_lease(&self.name).await;
            return Err(e);
        }
        self.taken = Instant::now();
        self.refresher = Some(self.spawn_refresher());
        Ok(())
    }

    /// Takes a publish lease and, while a live GC lease exists, waits for it to go. A GC
    /// looks for publish leases before each batch of deletions and stops when it sees one,
    /// so the wait is short; one that outlasts a TTL while renewing its lease is stuck, and
    /// the publish goes ahead (see the module docs for why that is safe).
    pub async fn for_publish(repo: &Repo, ttl: Duration, node_id: Option<u64>) -> Result<Lease> {
        let mut lease = Lease::take(repo, LeaseKind::Publish, ttl, node_id).await?;
        lease.wait_for_gcs().await?;
        Ok(lease)
    }

    /// Publish: waits while checks show a live GC lease, for at most a TTL after the take.
    async fn wait_for_gcs(&mut self) -> Result<()> {
        let mut said = false;
        while !self.seen.clear() {
            if self.taken.elapsed() >= self.ttl {
                let gc = self.describe_others().await;
                tracing::warn!(
                    gc = %gc,
                    waited_s = self.taken.elapsed().as_secs(),
                    "a GC is still running; publishing anyway (it stops deleting once it sees this publish)"
                );
                self.gave_up = true;
                return Ok(());
            }
            if !said {
                let gc = self.describe_others().await;
                tracing::warn!(gc = %gc, "waiting for a GC in progress to finish");
                said = true;
            }
            tokio::time::sleep(POLL).await;
            self.check().await?;
        }
        if said {
            tracing::info!(
                waited_ms = self.taken.elapsed().as_millis() as u64,
                "the GC finished; publishing"
            );
        }
        Ok(())
    }

    /// Publish: after a lapse, starts over under a new name (a GC may have deleted the old
    /// one as stale, and would not see this publish): write and list, wait for GCs. The
    /// caller must look at the store again afterwards.
    pub async fn retake(&mut self) -> Result<()> {
        self.stop_refresher().await;
        let old = std::mem::replace(&mut self.name, new_name(self.kind));
        {
            let mut shared = self.shared.lock().expect("lease state lock");
            shared.sent = Instant::now();
            shared.lapsed = false;
        }
        self.gave_up = false;
        self.start().await?;
        // The new lease is written: the old one only holds GCs back now.
        if let Err(e) = self.repo.delete_lease(&old).await {
            tracing::debug!(lease = %old, error = %e, "could not delete a lapsed lease; it goes stale");
        }
        if self.kind == LeaseKind::Publish {
            self.wait_for_gcs().await?;
        }
        Ok(())
    }

    /// Rewrites the lease and lists the leases; returns (and keeps) what it saw.
    pub async fn check(&mut self) -> Result<&Seen> {
        let sent = Instant::now();
        self.repo.put_lease(&self.name, self.body.clone()).await?;
        self.shared
            .lock()
            .expect("lease state lock")
            .written(sent, self.ttl);
        let listed = self.repo.list_leases().await?;
        let seq = self.seen.seq + 1;
        let deadline = sent + self.ttl / 2;
        let Some(own) = listed.iter().find(|l| l.name == self.name) else {
            tracing::warn!(
                lease = %self.name,
                "the store's listing does not show a lease just written; not relying on it"
            );
            self.seen = Seen {
                seq,
                store_now: None,
                others: Vec::new(),
                stale: Vec::new(),
                deadline,
            };
            return Ok(&self.seen);
        };
        let now = own.last_modified;
        let ttl = chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::MAX);
        let (live, stale): (Vec<LeaseEntry>, Vec<LeaseEntry>) = listed
            .into_iter()
            .filter(|l| l.name != self.name)
            .partition(|l| now.signed_duration_since(l.last_modified) < ttl);
        self.seen = Seen {
            seq,
            store_now: Some(now),
            others: live.into_iter().filter(|l| l.kind != self.kind).collect(),
            stale,
            deadline,
        };
        Ok(&self.seen)
    }

    fn spawn_refresher(&self) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let (stop, mut stopped) = oneshot::channel();
        let repo = self.repo.clone();
        let name = self.name.clone();
        let body = self.body.clone();
        let shared = self.shared.clone();
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
                    Ok(()) => shared.lock().expect("lease state lock").written(sent, ttl),
                    Err(e) => tracing::warn!(lease = %name, error = %e, "could not renew a lease"),
                }
            }
        });
        (stop, task)
    }

    async fn stop_refresher(&mut self) {
        if let Some((stop, task)) = self.refresher.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
    }

    /// What the last check saw.
    pub fn seen(&self) -> &Seen {
        &self.seen
    }

    /// The store's clock at the last check, if that check saw the lease.
    pub fn store_now(&self) -> Option<DateTime<Utc>> {
        self.seen.store_now
    }

    /// Live leases of the other kind seen at the last check (for a GC: publishes in flight).
    pub fn others(&self) -> &[LeaseEntry] {
        &self.seen.others
    }

    /// Leases seen stale at the last check.
    pub fn stale(&self) -> &[LeaseEntry] {
        &self.seen.stale
    }

    /// The current lease object's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether this publish stopped waiting for a GC.
    pub fn gave_up(&self) -> bool {
        self.gave_up
    }

    /// How long others are still certain to see the lease live: half a TTL after the last
    /// write was sent, or nothing once it lapsed.
    pub fn remaining(&self) -> Duration {
        let shared = self.shared.lock().expect("lease state lock");
        match shared.lapsed {
            true => Duration::ZERO,
            false => (self.ttl / 2).saturating_sub(shared.sent.elapsed()),
        }
    }

    /// Whether others have seen the lease live without a gap since it was (last) taken.
    pub fn fresh(&self) -> bool {
        !self.remaining().is_zero()
    }

    /// Marks a request the lease vouches for as in flight (see [`Guard`]).
    pub fn guard(&self) -> Guard {
        self.shared.lock().expect("lease state lock").in_flight += 1;
        Guard {
            shared: self.shared.clone(),
            done: false,
        }
    }

    /// Publish: the requests in doubt are settled (what they could have broken was put
    /// right under a fresh lease), so the lease may be deleted after all.
    pub fn settled(&self) {
        self.shared.lock().expect("lease state lock").doubtful = false;
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
        for l in &self.seen.others {
            let holder = match self.repo.read_lease(&l.name).await {
                Ok(body) => String::from_utf8_lossy(&body).into_owned(),
                Err(e) => format!("unreadable: {e}"),
            };
            parts.push(format!("{} {holder}", l.name));
        }
        parts.join("; ")
    }

    /// Stops renewing the lease and deletes it — unless a request it vouched for may still
    /// land, then it is left to go stale in a TTL. A lease left behind only holds the other
    /// side back until then.
    pub async fn release(mut self) {
        self.stop_refresher().await;
        if self.shared.lock().expect("lease state lock").doubtful {
            tracing::info!(
                lease = %self.name,
                "leaving the lease to go stale: a request it vouched for failed and may still land"
            );
            return;
        }
        if let Err(e) = self.repo.delete_lease(&self.name).await {
            tracing::warn!(lease = %self.name, error = %e, "could not delete a lease; it goes stale in its TTL");
        }
    }
}

impl Drop for Lease {
    /// Dropped without `release` (the holder was cancelled): stop renewing, and delete the
    /// lease in the background if the runtime still runs and nothing it vouches for may
    /// still land, so that a cancelled GC does not hold publishes back for a TTL.
    fn drop(&mut self) {
        let Some((_, task)) = self.refresher.take() else {
            return; // released
        };
        task.abort();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let repo = self.repo.clone();
            let name = std::mem::take(&mut self.name);
            let shared = self.shared.clone();
            runtime.spawn(async move {
                // Once the renewal task is gone, and the holder's future (with any guard
                // in it) has been dropped whole. (A renewal cut off mid-request may still
                // land after the delete; that lease then goes stale in a TTL.)
                let _ = task.await;
                let in_doubt = {
                    let shared = shared.lock().expect("lease state lock");
                    shared.doubtful || shared.in_flight > 0
                };
                if in_doubt {
                    tracing::info!(lease = %name, "leaving the lease of a cancelled operation to go stale: a request it vouched for may still land");
                    return;
                }
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
        assert!(publish.seen().clear() && publish.fresh());
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
            !second.seen().clear(),
            "a publish that saw a live GC must wait for it"
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
        assert!(lease.fresh());
        // The store goes away: renewals fail from now on.
        take_away(&root, &dir.path().join("gone"));
        tokio::time::sleep(ttl).await;
        assert!(!lease.fresh());
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
        assert!(publish.seen().clear() && !publish.gave_up());
        publish.release().await;
    }

    #[tokio::test]
    async fn a_publish_stops_waiting_for_a_gc_after_a_ttl() {
        let repo = repo().await;
        let ttl = Duration::from_millis(300);
        // A GC that keeps renewing its lease, i.e. one that runs longer than the wait.
        let gc = Lease::take(&repo, LeaseKind::Gc, ttl, None).await.unwrap();
        let publish = Lease::for_publish(&repo, ttl, None).await.unwrap();
        assert!(publish.gave_up());
        publish.release().await;
        gc.release().await;
    }

    /// A lapsed lease is taken again under a new name: a GC may have deleted the old one
    /// as stale, and nobody can delete the new one while it is fresh.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_retake_uses_a_new_name_and_drops_the_old_one() {
        let repo = repo().await;
        let mut lease = Lease::take(&repo, LeaseKind::Publish, LONG, None)
            .await
            .unwrap();
        let old = lease.name().to_owned();
        assert!(lease.fresh());
        // Renewals every TTL/4 keep it fresh in (virtual) time...
        tokio::time::sleep(LONG).await;
        assert!(lease.fresh());
        lease.retake().await.unwrap();
        assert_ne!(lease.name(), old);
        assert!(lease.fresh() && lease.seen().clear());
        let names = names_in(&repo).await;
        assert_eq!(names, vec![lease.name().to_owned()]);
        lease.release().await;
        assert!(repo.list_leases().await.unwrap().is_empty());
    }

    /// A request the lease vouched for that did not succeed may still land: the lease is
    /// left to go stale rather than deleted, so that the other side keeps out of the way.
    #[tokio::test]
    async fn a_failed_guarded_request_leaves_the_lease_to_go_stale() {
        let repo = repo().await;
        let lease = Lease::take(&repo, LeaseKind::Gc, LONG, None).await.unwrap();
        lease.guard().done();
        drop(lease.guard()); // failed or cut off
        lease.release().await;
        assert_eq!(repo.list_leases().await.unwrap().len(), 1);

        let publish = Lease::take(&repo, LeaseKind::Publish, LONG, None)
            .await
            .unwrap();
        drop(publish.guard());
        publish.settled(); // what it could have broken was put right
        publish.release().await;
        assert_eq!(repo.list_leases().await.unwrap().len(), 1);
    }

    async fn names_in(repo: &Repo) -> Vec<String> {
        let leases = repo.list_leases().await.unwrap();
        leases.into_iter().map(|l| l.name).collect()
    }

    /// The deadline of a check is half a TTL after its write was sent, whatever renewals
    /// come later: a batch decided on it ends before others can see the lease go stale.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_checks_deadline_does_not_move_with_renewals() {
        let repo = repo().await;
        let started = Instant::now();
        let mut lease = Lease::take(&repo, LeaseKind::Gc, LONG, None).await.unwrap();
        let deadline = lease.seen().deadline;
        assert_eq!(deadline - started, LONG / 2);
        tokio::time::sleep(LONG).await;
        assert_eq!(lease.seen().deadline, deadline);
        assert!(lease.fresh(), "renewed meanwhile");
        let seq = lease.seen().seq;
        lease.check().await.unwrap();
        assert_eq!(lease.seen().seq, seq + 1);
        assert!(lease.seen().deadline > deadline);
        lease.release().await;
    }

    /// Cancelled while a request it vouches for is in flight (the delete may still land):
    /// the lease stays, to go stale, instead of being deleted behind the request's back.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_cancelled_holder_with_a_request_in_flight_leaves_its_lease() {
        let repo = repo().await;
        let in_flight = Lease::take(&repo, LeaseKind::Gc, LONG, None).await.unwrap();
        let guard = in_flight.guard();
        drop(in_flight);
        drop(guard);
        let idle = Lease::take(&repo, LeaseKind::Gc, LONG, None).await.unwrap();
        let idle_name = idle.name().to_owned();
        drop(idle);
        // Under the paused clock this returns once every other task is idle: both
        // cancelled leases' clean-up tasks have run to their end.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let left = names_in(&repo).await;
        assert_eq!(left.len(), 1, "{left:?}");
        assert_ne!(
            left[0], idle_name,
            "the idle one is deleted, the other one stays"
        );
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
