//! A store that misbehaves on purpose: errors (before or after the operation took effect),
//! timeouts, latency, truncated bodies and mid-stream disconnects, on every kind of
//! operation (put, get and ranged get including the body stream, head, list including
//! mid-listing, delete). Seeded, so a failure replays, and bounded: at most `max_faults`
//! faults a run, each operation faulted with probability `rate`.
//!
//! Latency and timeouts are tokio sleeps: real time in the flow tests, virtual under a
//! paused clock (only for flows without blocking threads that wait on the async side, such
//! as a GC: a paused clock cannot advance while such a thread runs).

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What to inject.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    /// Chance that an operation is faulted.
    pub rate: f64,
    /// Faults at most, for the life of the store.
    pub max_faults: usize,
    /// How long a request hangs before the client gives up on it ("timeout").
    pub timeout: Duration,
    /// The longest latency added to a request.
    pub max_latency: Duration,
}

/// The kinds of operation, for `only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
    Head,
    List,
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Fails before anything happened.
    Error,
    /// Takes effect, then fails (the response was lost).
    ErrorAfter,
    /// Hangs for the plan's timeout, then fails; took effect or not.
    Timeout { applied: bool },
    /// Answers late.
    Latency(Duration),
    /// The body (or listing) ends early without an error.
    Truncate,
    /// The body (or listing) fails part way.
    Disconnect,
}

struct State {
    rng: StdRng,
    left: usize,
    /// Every fault injected, for failure messages.
    log: Vec<String>,
    only: Option<Vec<Op>>,
    /// Every operation of this kind takes this long (no other fault).
    slow: Option<(Op, Duration)>,
}

/// The faulty store around `inner`.
#[derive(Clone)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    plan: Plan,
    state: Arc<Mutex<State>>,
}

fn injected(what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: format!("injected fault: {what}").into(),
    }
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, plan: Plan) -> FaultyStore {
        FaultyStore {
            inner,
            state: Arc::new(Mutex::new(State {
                rng: StdRng::seed_from_u64(plan.seed),
                left: plan.max_faults,
                log: Vec::new(),
                only: None,
                slow: None,
            })),
            plan,
        }
    }

    /// Faults only these kinds of operation.
    pub fn only(self, ops: &[Op]) -> FaultyStore {
        self.state.lock().unwrap().only = Some(ops.to_vec());
        self
    }

    /// A store that only makes every `op` take `latency`, always.
    pub fn slow(inner: Arc<dyn ObjectStore>, op: Op, latency: Duration) -> FaultyStore {
        let store = FaultyStore::new(
            inner,
            Plan {
                seed: 0,
                rate: 0.0,
                max_faults: 0,
                timeout: Duration::ZERO,
                max_latency: Duration::ZERO,
            },
        );
        store.state.lock().unwrap().slow = Some((op, latency));
        store
    }

    /// Every fault injected so far.
    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    /// Decides whether (and how) to fault this operation; `streams` says whether it has a
    /// body or listing to cut.
    fn pick(&self, op: Op, key: &Path, streams: bool) -> Option<Fault> {
        let mut s = self.state.lock().unwrap();
        if let Some((slow, latency)) = s.slow {
            return (slow == op).then_some(Fault::Latency(latency));
        }
        if s.left == 0 || s.only.as_ref().is_some_and(|only| !only.contains(&op)) {
            return None;
        }
        if !s.rng.random_bool(self.plan.rate) {
            return None;
        }
        let writes = matches!(op, Op::Put | Op::Delete);
        let fault = loop {
            let f = match s.rng.random_range(0..6) {
                0 => Fault::Error,
                1 if writes => Fault::ErrorAfter,
                2 => Fault::Timeout {
                    applied: writes && s.rng.random_bool(0.5),
                },
                3 => {
                    let max = self.plan.max_latency.as_millis().max(1) as u64;
                    Fault::Latency(Duration::from_millis(s.rng.random_range(1..=max)))
                }
                4 if streams => Fault::Truncate,
                5 if streams => Fault::Disconnect,
                _ => continue,
            };
            break f;
        };
        s.left -= 1;
        s.log.push(format!("{op:?} {key}: {fault:?}"));
        Some(fault)
    }

    /// Applies the faults that happen around a whole request; returns whether to run it
    /// (and to report an error after it).
    async fn around<T>(
        &self,
        fault: Option<Fault>,
        run: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match fault {
            Some(Fault::Error) => Err(injected("connection refused")),
            Some(Fault::ErrorAfter) => {
                run.await?;
                Err(injected("connection reset after the request was sent"))
            }
            Some(Fault::Timeout { applied }) => {
                if applied {
                    run.await?;
                }
                tokio::time::sleep(self.plan.timeout).await;
                Err(injected("request timed out"))
            }
            Some(Fault::Latency(d)) => {
                tokio::time::sleep(d).await;
                run.await
            }
            _ => run.await,
        }
    }
}

/// Cuts `body` (the whole of it): ends early, or fails part way.
fn cut(body: Bytes, fault: Option<Fault>) -> BoxStream<'static, Result<Bytes>> {
    let half = body.len() / 2;
    match fault {
        Some(Fault::Truncate) => stream::iter([Ok(body.slice(..half))]).boxed(),
        Some(Fault::Disconnect) => stream::iter([
            Ok(body.slice(..half)),
            Err(injected("connection closed mid-body")),
        ])
        .boxed(),
        _ => stream::iter([Ok(body)]).boxed(),
    }
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore(seed {})", self.plan.seed)
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let fault = self.pick(Op::Put, location, false);
        self.around(fault, self.inner.put_opts(location, payload, opts))
            .await
    }

    async fn put_multipart_opts(
        &self,
        _location: &Path,
        _opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        Err(object_store::Error::NotImplemented {
            operation: "put_multipart".into(),
            implementer: "FaultyStore".into(),
        })
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let head = options.head;
        let op = if head { Op::Head } else { Op::Get };
        let fault = self.pick(op, location, !head);
        let got = self
            .around(fault, async {
                let got = self.inner.get_opts(location, options).await?;
                let body = match head {
                    true => Bytes::new(),
                    false => {
                        let range = got.range.clone();
                        let meta = got.meta.clone();
                        let attributes = got.attributes.clone();
                        let body = got.bytes().await?;
                        return Ok(GetResult {
                            payload: GetResultPayload::Stream(cut(body, fault)),
                            meta,
                            range,
                            attributes,
                            extensions: Default::default(),
                        });
                    }
                };
                Ok(GetResult {
                    payload: GetResultPayload::Stream(cut(body, None)),
                    ..got
                })
            })
            .await?;
        Ok(got)
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
                    let fault = this.pick(Op::Delete, &location, false);
                    this.around(fault, this.inner.delete(&location)).await?;
                    Ok(location)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let key = prefix.cloned().unwrap_or_default();
        let fault = self.pick(Op::List, &key, true);
        let listing = self.inner.list(prefix);
        let this = self.clone();
        match fault {
            // After the first entry (part way, in any listing of two or more).
            Some(Fault::Disconnect) => listing
                .take(1)
                .chain(stream::once(async { Err(injected("listing cut off")) }))
                .boxed(),
            // A listing that silently drops entries would be a broken store, not a
            // network fault; it fails at once instead.
            Some(Fault::Truncate) | Some(Fault::Error) => {
                stream::once(async { Err(injected("connection refused")) }).boxed()
            }
            Some(Fault::Timeout { .. }) => stream::once(async move {
                tokio::time::sleep(this.plan.timeout).await;
                Err(injected("request timed out"))
            })
            .boxed(),
            Some(Fault::Latency(d)) => stream::once(async move {
                tokio::time::sleep(d).await;
                listing
            })
            .flatten()
            .boxed(),
            Some(Fault::ErrorAfter) | None => listing,
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let key = prefix.cloned().unwrap_or_default();
        let fault = self.pick(Op::List, &key, false);
        self.around(fault, self.inner.list_with_delimiter(prefix))
            .await
    }

    async fn copy_opts(&self, _from: &Path, _to: &Path, _options: CopyOptions) -> Result<()> {
        Err(object_store::Error::NotImplemented {
            operation: "copy".into(),
            implementer: "FaultyStore".into(),
        })
    }
}
