//! A store that runs two actors (a publish and a GC) through a chosen interleaving of their
//! store operations, deterministically, and the scheduler that chooses.
//!
//! Each actor gets its own [`ScheduledStore`] around the same inner store. Every operation
//! (put, get, head, list, delete) first asks the [`Scheduler`] and waits for its grant; the
//! test's driver grants one operation at a time, following a [`Schedule`] ("run the publish
//! for 2 operations, then the GC for 7, then the publish to the end, then the GC"), so each
//! switch point is a named store operation: "before the publish's manifest put", "between the
//! GC's chunk listing and its first delete", and so on. A granted operation runs to its end
//! in a task of its own, so an actor that gives up on it (a timeout) cannot leave it half
//! done while the other side moves on.
//!
//! Time: the tests run on a current-thread runtime with tokio's clock paused, so time moves
//! only when every task waits for a timer (or when a schedule says "advance"): lease TTLs,
//! renewals and waits happen in virtual time, the same way every run. The store's clock is
//! virtual too: the last-modified time of everything written through these wrappers is the
//! paused clock's time of the write, so a lease goes stale after a TTL of virtual time.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

/// Who an operation belongs to.
pub type Actor = usize;

/// One granted operation, for the record of a run.
#[derive(Debug, Clone)]
pub struct Step {
    pub actor: Actor,
    /// What it was, e.g. "put lease" or "delete chunk".
    pub label: String,
    /// The key (or listed prefix).
    pub key: String,
    /// For a listing: how many objects it returned.
    pub listed: Option<usize>,
    /// Whether the operation succeeded.
    pub ok: bool,
}

struct Pending {
    id: u64,
    actor: Actor,
    label: String,
    grant: oneshot::Sender<()>,
}

#[derive(Default)]
struct State {
    pending: VecDeque<Pending>,
    /// The granted operation still running, if any.
    running: Option<u64>,
    finished: HashMap<Actor, bool>,
    cancel: HashMap<Actor, CancellationToken>,
    /// Everything goes through at once (setup, and after the schedule's end).
    passthrough: bool,
    next_id: u64,
    steps: Vec<Step>,
    /// The virtual store clock's time of each key's last write.
    written: HashMap<Path, DateTime<Utc>>,
}

/// Grants store operations one at a time, in the order the driver chooses.
pub struct Scheduler {
    state: Mutex<State>,
    changed: Notify,
    epoch: DateTime<Utc>,
    start: tokio::time::Instant,
}

impl Scheduler {
    /// A scheduler in pass-through mode (for setting a store up).
    pub fn new() -> Arc<Scheduler> {
        Arc::new(Scheduler {
            state: Mutex::new(State {
                passthrough: true,
                ..State::default()
            }),
            changed: Notify::new(),
            epoch: DateTime::from_timestamp(1_700_000_000, 0).expect("a valid timestamp"),
            start: tokio::time::Instant::now(),
        })
    }

    /// The store's clock: virtual, following tokio's (paused) clock.
    pub fn now(&self) -> DateTime<Utc> {
        let elapsed = tokio::time::Instant::now() - self.start;
        self.epoch + chrono::Duration::from_std(elapsed).expect("a short test")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("scheduler lock")
    }

    /// From now on every operation waits for the driver.
    pub fn start(&self, actors: &[Actor]) {
        let mut s = self.lock();
        s.passthrough = false;
        s.steps.clear();
        for a in actors {
            s.finished.insert(*a, false);
            s.cancel.insert(*a, CancellationToken::new());
        }
    }

    /// Runs an actor's work, as `Some` of its result, or `None` if a schedule cancels it
    /// (drops the future, at whatever await it is). Either way the actor is then finished.
    pub async fn actor<T>(
        &self,
        actor: Actor,
        work: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let token = self.lock().cancel.get(&actor).cloned().unwrap_or_default();
        let out = tokio::select! {
            biased;
            _ = token.cancelled() => None,
            out = work => Some(out),
        };
        self.finished(actor);
        out
    }

    /// Lets everything through, pending operations included.
    pub fn stop(&self) {
        let mut s = self.lock();
        s.passthrough = true;
        for p in s.pending.drain(..) {
            let _ = p.grant.send(());
        }
        drop(s);
        self.changed.notify_waiters();
    }

    pub fn finished(&self, actor: Actor) {
        self.lock().finished.insert(actor, true);
        self.changed.notify_waiters();
    }

    pub fn steps(&self) -> Vec<Step> {
        self.lock().steps.clone()
    }

    /// Waits for the grant of an operation. Dropping the returned future before the grant
    /// withdraws the request.
    async fn enter(self: &Arc<Self>, actor: Actor, label: String) -> Permit {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut s = self.lock();
            s.next_id += 1;
            let id = s.next_id;
            if s.passthrough {
                return Permit {
                    sched: self.clone(),
                    id: None,
                };
            }
            s.pending.push_back(Pending {
                id,
                actor,
                label,
                grant: tx,
            });
            id
        };
        self.changed.notify_waiters();
        let mut withdraw = Withdraw {
            sched: self.clone(),
            id,
            armed: true,
        };
        // The driver never drops a request; a closed channel means `stop` let it through.
        let _ = rx.await;
        withdraw.armed = false;
        Permit {
            sched: self.clone(),
            id: Some(id),
        }
    }

    fn record(&self, step: Step) {
        self.lock().steps.push(step);
    }

    /// Records a write of `key` now, by the virtual store clock (for objects a test puts
    /// in the inner store itself).
    pub fn wrote(&self, key: &Path) {
        let now = self.now();
        self.lock().written.insert(key.clone(), now);
    }

    fn removed(&self, key: &Path) {
        self.lock().written.remove(key);
    }

    /// `meta` with the virtual clock's time of its last write.
    fn restamp(&self, mut meta: ObjectMeta) -> ObjectMeta {
        if let Some(t) = self.lock().written.get(&meta.location) {
            meta.last_modified = *t;
        }
        meta
    }

    /// Waits until `actor` has an operation waiting (returns it) or has finished (`None`).
    async fn next_of(&self, actor: Actor) -> Option<u64> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let s = self.lock();
                if s.running.is_none() {
                    if let Some(p) = s.pending.iter().find(|p| p.actor == actor) {
                        return Some(p.id);
                    }
                    if s.finished.get(&actor).copied().unwrap_or(true) {
                        return None;
                    }
                }
            }
            changed.await;
        }
    }

    async fn wait_finished(&self, actor: Actor) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.lock().finished.get(&actor).copied().unwrap_or(true) {
                return;
            }
            changed.await;
        }
    }

    fn grant(&self, id: u64) {
        let mut s = self.lock();
        let at = s
            .pending
            .iter()
            .position(|p| p.id == id)
            .expect("granting a pending operation");
        let p = s.pending.remove(at).expect("just found");
        s.running = Some(id);
        // The requester may have given up since `next_of`; then nothing runs.
        if p.grant.send(()).is_err() {
            s.running = None;
        }
    }

    /// Describes what is waiting, for failure messages.
    pub fn describe_pending(&self) -> String {
        let s = self.lock();
        let waiting: Vec<String> = s
            .pending
            .iter()
            .map(|p| format!("{}: {}", p.actor, p.label))
            .collect();
        format!("running {:?}, waiting [{}]", s.running, waiting.join(", "))
    }

    /// Runs `schedule`: grants the chosen actor's operations one at a time, each after the
    /// previous one ended. Returns how many operations each segment got.
    pub async fn drive(&self, schedule: &Schedule) -> Vec<usize> {
        let mut got = Vec::new();
        for seg in &schedule.0 {
            match *seg {
                Seg::Advance(d) => {
                    self.settle().await;
                    tokio::time::advance(d).await;
                    got.push(0);
                }
                Seg::Cancel(actor) => {
                    self.settle().await;
                    let token = self.lock().cancel.get(&actor).cloned();
                    if let Some(token) = token {
                        token.cancel();
                    }
                    // Its task drops the work (withdrawing a request it waits on) once it
                    // sees the cancellation.
                    self.wait_finished(actor).await;
                    got.push(0);
                }
                Seg::Run(actor, quota) => {
                    let mut n = 0;
                    while quota.is_none_or(|q| n < q) {
                        // Virtual time: this fires only if nothing at all can move, i.e.
                        // the actors are deadlocked.
                        let next = tokio::time::timeout(DEADLOCK, self.next_of(actor)).await;
                        let Ok(next) = next else {
                            panic!(
                                "deadlock: actor {actor} makes no progress ({})",
                                self.describe_pending()
                            );
                        };
                        let Some(id) = next else { break };
                        self.grant(id);
                        n += 1;
                    }
                    got.push(n);
                }
            }
        }
        self.settle().await;
        got
    }

    /// Waits until no granted operation is running.
    async fn settle(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.lock().running.is_none() {
                return;
            }
            changed.await;
        }
    }
}

/// Virtual time after which a run that cannot move is reported as a deadlock.
const DEADLOCK: Duration = Duration::from_secs(24 * 3600);

/// Removes a request whose requester stopped waiting for it.
struct Withdraw {
    sched: Arc<Scheduler>,
    id: u64,
    armed: bool,
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut s = self.sched.lock();
        s.pending.retain(|p| p.id != self.id);
        drop(s);
        self.sched.changed.notify_waiters();
    }
}

/// A granted operation; dropping it (when the operation ended) lets the driver go on.
struct Permit {
    sched: Arc<Scheduler>,
    id: Option<u64>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut s = self.sched.lock();
            if s.running == Some(id) {
                s.running = None;
            }
            drop(s);
            self.sched.changed.notify_waiters();
        }
    }
}

/// One part of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seg {
    /// Grant this many of the actor's operations (all until it finishes, if `None`).
    Run(Actor, Option<usize>),
    /// Move the clock on (as if the store had been slow for that long).
    Advance(Duration),
    /// Drop the actor's work at the await it is at (SIGTERM, a timeout around it).
    Cancel(Actor),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule(pub Vec<Seg>);

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|s| match s {
                Seg::Run(a, Some(n)) => format!("{a}:{n}"),
                Seg::Run(a, None) => format!("{a}:*"),
                Seg::Advance(d) => format!("+{}s", d.as_secs()),
                Seg::Cancel(a) => format!("cancel {a}"),
            })
            .collect();
        f.write_str(&parts.join(" "))
    }
}

/// What an operation touches, from its key: "lease", "manifest", "chunk", "pack", ...
fn area(key: &Path) -> &'static str {
    match key.parts().next().as_ref().map(|p| p.as_ref()) {
        Some("leases") => "lease",
        Some("manifests") => "manifest",
        Some("chunks") => "chunk",
        Some("packs") => "pack",
        Some("repository.json") => "repository",
        _ => "other",
    }
}

/// An actor's view of the shared store: every operation waits for the scheduler.
#[derive(Clone)]
pub struct ScheduledStore {
    inner: Arc<dyn ObjectStore>,
    actor: Actor,
    sched: Arc<Scheduler>,
}

impl ScheduledStore {
    pub fn new(inner: Arc<dyn ObjectStore>, actor: Actor, sched: Arc<Scheduler>) -> Self {
        ScheduledStore {
            inner,
            actor,
            sched,
        }
    }

    /// Waits for the grant, then runs `op` to its end in a task of its own.
    async fn run<T, F>(&self, label: String, key: &Path, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = (Result<T>, Option<usize>)> + Send + 'static,
    {
        let permit = self.sched.enter(self.actor, label.clone()).await;
        let sched = self.sched.clone();
        let actor = self.actor;
        let key = key.to_string();
        let task = tokio::spawn(async move {
            let (out, listed) = op.await;
            sched.record(Step {
                actor,
                label,
                key,
                listed,
                ok: out.is_ok(),
            });
            drop(permit);
            out
        });
        task.await.expect("store operation task")
    }
}

impl fmt::Debug for ScheduledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScheduledStore({})", self.actor)
    }
}

impl fmt::Display for ScheduledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScheduledStore({}, {})", self.actor, self.inner)
    }
}

#[async_trait]
impl ObjectStore for ScheduledStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let inner = self.inner.clone();
        let sched = self.sched.clone();
        let key = location.clone();
        self.run(format!("put {}", area(location)), location, async move {
            let out = inner.put_opts(&key, payload, opts).await;
            if out.is_ok() {
                sched.wrote(&key);
            }
            (out, None)
        })
        .await
    }

    async fn put_multipart_opts(
        &self,
        _location: &Path,
        _opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        Err(object_store::Error::NotImplemented {
            operation: "put_multipart".into(),
            implementer: "ScheduledStore".into(),
        })
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let inner = self.inner.clone();
        let sched = self.sched.clone();
        let key = location.clone();
        let label = match options.head {
            true => format!("head {}", area(location)),
            false => format!("get {}", area(location)),
        };
        self.run(label, location, async move {
            let out = async {
                let got = inner.get_opts(&key, options).await?;
                let meta = sched.restamp(got.meta.clone());
                let range = got.range.clone();
                let attributes = got.attributes.clone();
                // The whole body is read while the operation holds its grant.
                let body = got.bytes().await?;
                Ok(GetResult {
                    payload: GetResultPayload::Stream(stream::once(async { Ok(body) }).boxed()),
                    meta,
                    range,
                    attributes,
                    extensions: Default::default(),
                })
            }
            .await;
            (out, None)
        })
        .await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            out.push(self.get_range(location, r.clone()).await?);
        }
        Ok(out)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let this = self.clone();
        locations
            .then(move |location| {
                let this = this.clone();
                async move {
                    let location = location?;
                    let inner = this.inner.clone();
                    let sched = this.sched.clone();
                    let key = location.clone();
                    this.run(
                        format!("delete {}", area(&location)),
                        &location,
                        async move {
                            let out = inner.delete(&key).await;
                            if out.is_ok() {
                                sched.removed(&key);
                            }
                            (out.map(|()| key), None)
                        },
                    )
                    .await
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let this = self.clone();
        let prefix = prefix.cloned();
        stream::once(async move {
            let inner = this.inner.clone();
            let sched = this.sched.clone();
            let key = prefix.clone().unwrap_or_default();
            let label = format!(
                "list {}s",
                prefix.as_ref().map(area).unwrap_or("everything")
            );
            // The whole listing is taken while the operation holds its grant.
            let listed = this
                .run(label, &key, async move {
                    let out: Result<Vec<ObjectMeta>> = inner
                        .list(prefix.as_ref())
                        .map_ok(|m| sched.restamp(m))
                        .try_collect()
                        .await;
                    let n = out.as_ref().ok().map(Vec::len);
                    (out, n)
                })
                .await;
            match listed {
                Ok(v) => stream::iter(v.into_iter().map(Ok)).boxed(),
                Err(e) => stream::once(async { Err(e) }).boxed(),
            }
        })
        .flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let inner = self.inner.clone();
        let prefix = prefix.cloned();
        let key = prefix.clone().unwrap_or_default();
        self.run("list with delimiter".into(), &key, async move {
            (inner.list_with_delimiter(prefix.as_ref()).await, None)
        })
        .await
    }

    async fn copy_opts(&self, _from: &Path, _to: &Path, _options: CopyOptions) -> Result<()> {
        Err(object_store::Error::NotImplemented {
            operation: "copy".into(),
            implementer: "ScheduledStore".into(),
        })
    }
}
