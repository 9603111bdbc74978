//! Whether the daemon's main loop is stuck ([`Liveness`]): what `/healthz` answers and what
//! decides whether the systemd watchdog is petted.
//!
//! The loop is *busy* while it runs a step and *idle* while it waits by its own choice (for
//! the next poll, or out a backoff after failures): an idle loop is never stuck, however
//! long the wait. A busy loop is stuck when nothing moved for longer than `stuck_after`:
//! progress is every answer the store gives the step (each request, each listing item, each
//! piece of a download: see [`ProgressStore`]) and every chunk a transfer moves. So a long
//! GC, a long listing, a publish waiting for a GC's lease (it looks again every half second)
//! or a long transfer all keep the daemon alive, and a request that hangs past the limit
//! (or a hung local disk, or a node that never answers within its timeout) does not.
//!
//! Only the loop's own requests count: [`Liveness::scope`] marks the task that runs a step,
//! and the store reports progress only to the task that made the request. The store probe
//! and a publish lease's renewal run on tasks of their own, so their answers cannot make a
//! stuck step look alive.

use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// `busy_since_ms` while the loop is idle.
const IDLE: u64 = u64::MAX;

/// The loop's busy/idle state and last progress. A cheap clone.
#[derive(Clone)]
pub struct Liveness {
    inner: Arc<Inner>,
}

struct Inner {
    started: Instant,
    /// Milliseconds since `started` at the last sign of progress.
    last_progress_ms: AtomicU64,
    /// Milliseconds since `started` when the running step began, or [`IDLE`].
    busy_since_ms: AtomicU64,
    stuck_after: Duration,
}

impl fmt::Debug for Liveness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Liveness")
            .field("stuck_after", &self.inner.stuck_after)
            .finish_non_exhaustive()
    }
}

tokio::task_local! {
    /// The liveness the running step reports to (see [`Liveness::scope`]).
    static STEP: Liveness;
}

/// Reports progress to the step running on this task, if any.
pub fn report() {
    let _ = STEP.try_with(Liveness::progress);
}

impl Liveness {
    /// A busy loop with no progress for longer than `stuck_after` is stuck.
    pub fn new(stuck_after: Duration) -> Liveness {
        Liveness {
            inner: Arc::new(Inner {
                started: Instant::now(),
                last_progress_ms: AtomicU64::new(0),
                busy_since_ms: AtomicU64::new(IDLE),
                stuck_after,
            }),
        }
    }

    pub fn stuck_after(&self) -> Duration {
        self.inner.stuck_after
    }

    fn now_ms(&self) -> u64 {
        self.inner.started.elapsed().as_millis() as u64
    }

    /// Something moved: a store answer, a chunk transferred, a step finished.
    pub fn progress(&self) {
        self.inner
            .last_progress_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    /// Runs one step of the loop: busy until it returns, with store answers on this task
    /// counted as progress.
    pub async fn scope<F: Future>(&self, step: F) -> F::Output {
        self.inner
            .busy_since_ms
            .store(self.now_ms(), Ordering::Relaxed);
        // Idle again even if the step is dropped half way (shutdown).
        let _idle = Idle(self);
        STEP.scope(self.clone(), step).await
    }

    /// How long the running step has gone without progress, if it is longer than the
    /// limit; `None` when not stuck (idle, or progress within the limit).
    pub fn stuck(&self) -> Option<Duration> {
        let busy = self.inner.busy_since_ms.load(Ordering::Relaxed);
        if busy == IDLE {
            return None;
        }
        let last = self
            .inner
            .last_progress_ms
            .load(Ordering::Relaxed)
            .max(busy);
        let quiet = Duration::from_millis(self.now_ms().saturating_sub(last));
        (quiet > self.inner.stuck_after).then_some(quiet)
    }
}

struct Idle<'a>(&'a Liveness);

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        self.0.progress();
        self.0.inner.busy_since_ms.store(IDLE, Ordering::Relaxed);
    }
}

/// An object store that reports each answer as progress of the step that asked (see
/// [`report`]): a request's completion, every listed object, every piece of a body as it
/// arrives. Everything else passes through unchanged.
#[derive(Debug)]
pub struct ProgressStore {
    inner: Arc<dyn ObjectStore>,
}

impl ProgressStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> ProgressStore {
        ProgressStore { inner }
    }
}

impl fmt::Display for ProgressStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.inner)
    }
}

fn reported<T>(r: T) -> T {
    report();
    r
}

#[async_trait]
impl ObjectStore for ProgressStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        reported(self.inner.put_opts(location, payload, opts).await)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        reported(self.inner.put_multipart_opts(location, opts).await)
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let mut result = reported(self.inner.get_opts(location, options).await)?;
        result.payload = match result.payload {
            GetResultPayload::Stream(body) => {
                GetResultPayload::Stream(body.inspect(|_| report()).boxed())
            }
            other => other,
        };
        Ok(result)
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        reported(self.inner.get_ranges(location, ranges).await)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner
            .delete_stream(locations)
            .inspect(|_| report())
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix).inspect(|_| report()).boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner
            .list_with_offset(prefix, offset)
            .inspect(|_| report())
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        reported(self.inner.list_with_delimiter(prefix).await)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        reported(self.inner.copy_opts(from, to, options).await)
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        reported(self.inner.rename_opts(from, to, options).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;

    #[tokio::test]
    async fn an_idle_loop_is_never_stuck_and_a_busy_one_is_without_progress() {
        let live = Liveness::new(Duration::from_millis(100));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(live.stuck(), None, "idle: waiting by its own choice");
        let stuck = live
            .scope(async {
                tokio::time::sleep(Duration::from_millis(250)).await;
                live.stuck()
            })
            .await;
        assert!(stuck.is_some_and(|q| q > Duration::from_millis(100)));
        assert_eq!(live.stuck(), None, "idle again once the step ends");
    }

    #[tokio::test]
    async fn the_stores_answers_are_progress_of_the_step_that_asked_only() {
        let store = ProgressStore::new(Arc::new(object_store::memory::InMemory::new()));
        let live = Liveness::new(Duration::from_millis(150));
        let path = Path::from("x");
        // Answers in the step keep it alive past the limit.
        let stuck = live
            .scope(async {
                for _ in 0..6 {
                    store
                        .put(&path, Bytes::from_static(b"1").into())
                        .await
                        .unwrap();
                    let _ = store.list(None).collect::<Vec<_>>().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                live.stuck()
            })
            .await;
        assert_eq!(stuck, None);
        // Answers to another task (a probe, a lease renewal) do not.
        let stuck = live
            .scope(async {
                let other = tokio::spawn({
                    let store = ProgressStore::new(Arc::new(object_store::memory::InMemory::new()));
                    async move {
                        for _ in 0..8 {
                            store
                                .put(&Path::from("y"), Bytes::new().into())
                                .await
                                .unwrap();
                            tokio::time::sleep(Duration::from_millis(40)).await;
                        }
                    }
                });
                other.await.unwrap();
                live.stuck()
            })
            .await;
        assert!(stuck.is_some());
    }
}
