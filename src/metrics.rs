//! What `snaprelay run` tells monitoring: Prometheus metrics ([`Metrics`]), the answers of
//! `/healthz` and `/readyz` ([`Health`]), and the small HTTP server that serves them
//! ([`bind`], [`serve`]).
//!
//! The metric names below are a contract with dashboards and alerts; all carry the
//! `snaprelay_` prefix and a HELP line. Label values come only from fixed vocabularies
//! (never a store URL, key, path or error message), so a label cannot leak a credential and
//! the number of series is bounded.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `snaprelay_publishes_total` | counter | |
//! | `snaprelay_publish_failures_total` | counter | `reason` ([`FailureReason`]) |
//! | `snaprelay_publish_bytes_total` (uploaded) | counter | |
//! | `snaprelay_publish_snapshot_bytes_total` (snapshot sizes) | counter | |
//! | `snaprelay_publish_duration_seconds` | histogram | |
//! | `snaprelay_fetches_total` | counter | |
//! | `snaprelay_fetch_failures_total` | counter | `reason` |
//! | `snaprelay_fetch_bytes_total` (downloaded) | counter | |
//! | `snaprelay_fetch_snapshot_bytes_total` (snapshot sizes) | counter | |
//! | `snaprelay_fetch_duration_seconds` | histogram | |
//! | `snaprelay_chunks_transferred_total` | counter | `direction` = `upload` \| `download` |
//! | `snaprelay_chunks_reused_total` | counter | `direction` |
//! | `snaprelay_adoptions_total` | counter | `outcome` = `adopted` \| `staged` \| `stale` |
//! | `snaprelay_last_published_index` | gauge | |
//! | `snaprelay_last_published_timestamp_seconds` | gauge (unix time) | |
//! | `snaprelay_last_fetched_index` | gauge | |
//! | `snaprelay_node_snapshot_index` | gauge | |
//! | `snaprelay_store_newest_index` | gauge | |
//! | `snaprelay_follower_lag` | gauge (log indexes) | |
//! | `snaprelay_verification_failures_total` | counter | |
//! | `snaprelay_store_errors_total` | counter | `kind` = `not_found` \| `unreachable` \| `permission` \| `other` |
//! | `snaprelay_gc_deleted_manifests_total`, `_chunks_total`, `_bytes_total` | counter | |
//! | `snaprelay_gc_deferred_chunks_total` | counter: chunks a GC left for later because publishes were in flight | |
//! | `snaprelay_role` | gauge, 1 for the current role | `role` = `leader` \| `follower` \| `learner` \| `candidate` \| `shutdown` \| `unknown` |
//! | `snaprelay_build_info` | gauge, always 1 | `version` |
//!
//! Labelled counters start at 0 for every value of their vocabulary, so `rate()` sees the
//! first failure. Gauges whose value is not known yet (an index before the first publish, the
//! lag on a leader) have no sample rather than a misleading 0.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::node::HookError;
use crate::snapdir::SnapdirError;

/// Upper bounds of the publish and fetch duration buckets: a small snapshot takes a fraction
/// of a second, a multi-gigabyte one over a slow link tens of minutes.
const DURATION_BUCKETS: [f64; 14] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
];

const ROLES: [&str; 6] = [
    "leader",
    "follower",
    "learner",
    "candidate",
    "shutdown",
    "unknown",
];
const ADOPTION_OUTCOMES: [&str; 3] = ["adopted", "staged", "stale"];
const STORE_ERROR_KINDS: [&str; 4] = ["not_found", "unreachable", "permission", "other"];
const UPLOAD: &str = "upload";
const DOWNLOAD: &str = "download";

/// How long [`serve`] waits for open connections after `shutdown` before returning anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// One label with a value from a fixed vocabulary: `'static` keeps URLs and messages out.
type Label = [(&'static str, &'static str); 1];
type Labelled<M> = Family<Label, M>;
/// A gauge with no sample until its value is known: a family whose only series has no
/// labels, present or removed.
type MaybeGauge<N, A> = Family<[(&'static str, &'static str); 0], Gauge<N, A>>;
type IndexGauge = MaybeGauge<u64, AtomicU64>;
const NO_LABELS: [(&str, &str); 0] = [];

/// Why a publish or fetch failed, as an operator would triage it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The object store refused or could not be reached.
    Store,
    /// The node's hook failed or its snapshot directory broke the contract.
    Node,
    /// Data that does not match its checksum, or a malformed or missing object.
    Corrupt,
    /// A local file system error.
    Io,
    Other,
}

impl FailureReason {
    const ALL: [FailureReason; 5] = [
        FailureReason::Store,
        FailureReason::Node,
        FailureReason::Corrupt,
        FailureReason::Io,
        FailureReason::Other,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Store => "store",
            FailureReason::Node => "node",
            FailureReason::Corrupt => "corrupt",
            FailureReason::Io => "io",
            FailureReason::Other => "other",
        }
    }

    /// Classifies a failed step by the first error in its chain that snaprelay knows.
    pub fn of(err: &anyhow::Error) -> FailureReason {
        for cause in err.chain() {
            if let Some(e) = cause.downcast_ref::<Error>() {
                return match e {
                    Error::Store { .. } | Error::LeaseLapsed { .. } => FailureReason::Store,
                    Error::Io { .. } => FailureReason::Io,
                    Error::Snapdir(e) => snapdir_reason(e),
                    Error::InvalidManifest { .. }
                    | Error::InvalidRepository { .. }
                    | Error::ObjectTooLarge { .. }
                    | Error::ChunkMissing { .. }
                    | Error::ChunkCorrupt { .. }
                    | Error::FileCorrupt { .. }
                    | Error::IndexMismatch { .. } => FailureReason::Corrupt,
                    // The incoming directory's permissions: a deployment problem.
                    Error::Handover { .. } => FailureReason::Other,
                    Error::Config(_)
                    | Error::ClusterMismatch { .. }
                    | Error::NoRepository { .. }
                    | Error::SnapshotNotFound { .. }
                    | Error::NoSnapshots => FailureReason::Other,
                };
            }
            if cause.is::<HookError>() {
                return FailureReason::Node;
            }
            if let Some(e) = cause.downcast_ref::<SnapdirError>() {
                return snapdir_reason(e);
            }
            if cause.is::<object_store::Error>() {
                return FailureReason::Store;
            }
            if cause.is::<std::io::Error>() {
                return FailureReason::Io;
            }
        }
        FailureReason::Other
    }
}

fn snapdir_reason(err: &SnapdirError) -> FailureReason {
    match err {
        SnapdirError::Read { .. } | SnapdirError::Write { .. } => FailureReason::Io,
        // The node wrote something that breaks the directory contract.
        _ => FailureReason::Node,
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `kind` label for [`Metrics::store_error`] of the first store error in `err`'s chain;
/// `None` if the failure did not come from the store.
pub fn store_error_kind(err: &anyhow::Error) -> Option<&'static str> {
    use object_store::Error as E;
    let store_error = err
        .chain()
        .find_map(|cause| match cause.downcast_ref::<Error>() {
            Some(Error::Store { source, .. }) => Some(source),
            _ => cause.downcast_ref::<E>(),
        })?;
    if crate::error::is_denied(store_error) {
        return Some("permission");
    }
    Some(match store_error {
        E::NotFound { .. } => "not_found",
        // How the HTTP backends report connection failures, timeouts and server errors.
        E::Generic { .. } => "unreachable",
        _ => "other",
    })
}

/// The daemon's metrics. A cheap clone: all clones update and encode the same registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    /// Updates that touch several series (the role, the follower's position) and
    /// [`Metrics::encode`] hold this, so a scrape never sees two roles at 1 or a lag that
    /// disagrees with the indexes it is computed from.
    position: Mutex<Position>,
    publishes: Counter,
    publish_failures: Labelled<Counter>,
    publish_bytes: Counter,
    publish_snapshot_bytes: Counter,
    publish_duration: Histogram,
    fetches: Counter,
    fetch_failures: Labelled<Counter>,
    fetch_bytes: Counter,
    fetch_snapshot_bytes: Counter,
    fetch_duration: Histogram,
    chunks_transferred: Labelled<Counter>,
    chunks_reused: Labelled<Counter>,
    adoptions: Labelled<Counter>,
    last_published_index: IndexGauge,
    last_published_timestamp: MaybeGauge<f64, AtomicU64>,
    last_fetched_index: IndexGauge,
    node_snapshot_index: IndexGauge,
    store_newest_index: IndexGauge,
    follower_lag: IndexGauge,
    verification_failures: Counter,
    store_errors: Labelled<Counter>,
    gc_deleted_manifests: Counter,
    gc_deleted_chunks: Counter,
    gc_deleted_bytes: Counter,
    gc_deferred_chunks: Counter,
    role: Labelled<Gauge>,
}

struct Position {
    role: &'static str,
    node: Option<u64>,
    newest: Option<u64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let duration = || Histogram::new(DURATION_BUCKETS);
        let mut inner = Inner {
            registry: Registry::with_prefix("snaprelay"),
            position: Mutex::new(Position {
                role: "unknown",
                node: None,
                newest: None,
            }),
            publishes: Counter::default(),
            publish_failures: Family::default(),
            publish_bytes: Counter::default(),
            publish_snapshot_bytes: Counter::default(),
            publish_duration: duration(),
            fetches: Counter::default(),
            fetch_failures: Family::default(),
            fetch_bytes: Counter::default(),
            fetch_snapshot_bytes: Counter::default(),
            fetch_duration: duration(),
            chunks_transferred: Family::default(),
            chunks_reused: Family::default(),
            adoptions: Family::default(),
            last_published_index: Family::default(),
            last_published_timestamp: Family::default(),
            last_fetched_index: Family::default(),
            node_snapshot_index: Family::default(),
            store_newest_index: Family::default(),
            follower_lag: Family::default(),
            verification_failures: Counter::default(),
            store_errors: Family::default(),
            gc_deleted_manifests: Counter::default(),
            gc_deleted_chunks: Counter::default(),
            gc_deleted_bytes: Counter::default(),
            gc_deferred_chunks: Counter::default(),
            role: Family::default(),
        };
        // Every labelled series exists from the start, at 0.
        let reasons = FailureReason::ALL.map(FailureReason::as_str);
        start_at_zero(&inner.publish_failures, "reason", &reasons);
        start_at_zero(&inner.fetch_failures, "reason", &reasons);
        start_at_zero(&inner.chunks_transferred, "direction", &[UPLOAD, DOWNLOAD]);
        start_at_zero(&inner.chunks_reused, "direction", &[UPLOAD, DOWNLOAD]);
        start_at_zero(&inner.adoptions, "outcome", &ADOPTION_OUTCOMES);
        start_at_zero(&inner.store_errors, "kind", &STORE_ERROR_KINDS);
        inner.register();
        let metrics = Metrics {
            inner: Arc::new(inner),
        };
        metrics.role("unknown");
        metrics
    }

    /// A snapshot published: total size, bytes/chunks actually uploaded, chunks already in
    /// the store.
    pub fn published(
        &self,
        index: u64,
        size: u64,
        bytes_uploaded: u64,
        chunks_uploaded: u64,
        chunks_reused: u64,
        elapsed: Duration,
    ) {
        let m = &self.inner;
        m.publishes.inc();
        m.publish_bytes.inc_by(bytes_uploaded);
        m.publish_snapshot_bytes.inc_by(size);
        m.publish_duration.observe(elapsed.as_secs_f64());
        m.chunks_transferred
            .get_or_create(&[("direction", UPLOAD)])
            .inc_by(chunks_uploaded);
        m.chunks_reused
            .get_or_create(&[("direction", UPLOAD)])
            .inc_by(chunks_reused);
        m.last_published_index.get_or_create(&NO_LABELS).set(index);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        m.last_published_timestamp
            .get_or_create(&NO_LABELS)
            .set(now);
    }

    pub fn publish_failed(&self, reason: FailureReason) {
        self.inner
            .publish_failures
            .get_or_create(&reason_label(reason))
            .inc();
    }

    /// A snapshot fetched and verified.
    pub fn fetched(
        &self,
        index: u64,
        size: u64,
        bytes_downloaded: u64,
        chunks_downloaded: u64,
        chunks_reused: u64,
        elapsed: Duration,
    ) {
        let m = &self.inner;
        m.fetches.inc();
        m.fetch_bytes.inc_by(bytes_downloaded);
        m.fetch_snapshot_bytes.inc_by(size);
        m.fetch_duration.observe(elapsed.as_secs_f64());
        m.chunks_transferred
            .get_or_create(&[("direction", DOWNLOAD)])
            .inc_by(chunks_downloaded);
        m.chunks_reused
            .get_or_create(&[("direction", DOWNLOAD)])
            .inc_by(chunks_reused);
        m.last_fetched_index.get_or_create(&NO_LABELS).set(index);
    }

    pub fn fetch_failed(&self, reason: FailureReason) {
        self.inner
            .fetch_failures
            .get_or_create(&reason_label(reason))
            .inc();
    }

    /// The node's answer to `save_snapshot`: `"adopted"`, `"staged"` or `"stale"` (the
    /// snake_case `SaveOutcome`; anything else counts as `"other"`). An adopted snapshot
    /// is the node's snapshot from now on, so the follower's position moves with it.
    pub fn adopted(&self, index: u64, outcome: &str) {
        let label = vocabulary(&ADOPTION_OUTCOMES, outcome).unwrap_or("other");
        self.inner
            .adoptions
            .get_or_create(&[("outcome", label)])
            .inc();
        if label == "adopted" {
            let mut position = self.position();
            position.node = Some(index);
            self.show_position(&position);
        }
    }

    pub fn verification_failure(&self) {
        self.inner.verification_failures.inc();
    }

    /// `kind` is one of `not_found`, `unreachable`, `permission`, `other` (anything else
    /// counts as `other`); [`store_error_kind`] finds it for an error.
    pub fn store_error(&self, kind: &str) {
        let kind = vocabulary(&STORE_ERROR_KINDS, kind).unwrap_or("other");
        self.inner
            .store_errors
            .get_or_create(&[("kind", kind)])
            .inc();
    }

    pub fn gc_done(&self, report: &crate::gc::GcReport) {
        let m = &self.inner;
        m.gc_deleted_manifests
            .inc_by(report.manifests_deleted.len() as u64);
        m.gc_deleted_chunks.inc_by(report.chunks_deleted);
        m.gc_deleted_bytes.inc_by(report.bytes_deleted);
        m.gc_deferred_chunks.inc_by(report.chunks_deferred);
    }

    /// The node's role as the hook reports it (`Role`'s Display): `leader`, `follower`,
    /// `learner`, `candidate`, `shutdown`; anything else is `unknown`. The follower lag has
    /// a sample only while following.
    pub fn role(&self, role: &str) {
        let role = vocabulary(&ROLES, role).unwrap_or("unknown");
        let mut position = self.position();
        position.role = role;
        for r in ROLES {
            self.inner
                .role
                .get_or_create(&[("role", r)])
                .set(i64::from(r == role));
        }
        self.show_position(&position);
    }

    /// Follower: the node's snapshot index and the newest index in the store (lag = newest -
    /// node, >= 0). A node without a snapshot lags by the whole newest index; an empty store
    /// means no lag.
    pub fn follower_position(
        &self,
        node_snapshot_index: Option<u64>,
        newest_in_store: Option<u64>,
    ) {
        let mut position = self.position();
        position.node = node_snapshot_index;
        position.newest = newest_in_store;
        self.show_position(&position);
    }

    /// The Prometheus text exposition format (version 0.0.4), as served on `/metrics`.
    pub fn encode(&self) -> String {
        let _consistent = self.position();
        let mut out = String::new();
        // Writing to a String cannot fail, and no metric here has a fallible encoding.
        prometheus_text::encode(&mut out, &self.inner.registry)
            .expect("encoding metrics into a String");
        out
    }

    /// Metrics must never take the daemon down: a panic while holding the lock leaves
    /// numbers that are still worth reporting.
    fn position(&self) -> MutexGuard<'_, Position> {
        self.inner
            .position
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn show_position(&self, position: &Position) {
        let m = &self.inner;
        set_or_clear(&m.node_snapshot_index, position.node);
        set_or_clear(&m.store_newest_index, position.newest);
        let following = matches!(position.role, "follower" | "learner");
        let lag = following.then(|| {
            position.newest.map_or(0, |newest| {
                newest.saturating_sub(position.node.unwrap_or(0))
            })
        });
        set_or_clear(&m.follower_lag, lag);
    }
}

impl Inner {
    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "publishes",
            "Snapshots published to the store by this sidecar",
            self.publishes.clone(),
        );
        r.register(
            "publish_failures",
            "Publish attempts that failed, by reason",
            self.publish_failures.clone(),
        );
        r.register(
            "publish_bytes",
            "Bytes uploaded to the store by publishes (chunks the store already held are not counted)",
            self.publish_bytes.clone(),
        );
        r.register(
            "publish_snapshot_bytes",
            "Total size of the snapshots published, before deduplication",
            self.publish_snapshot_bytes.clone(),
        );
        r.register(
            "publish_duration_seconds",
            "Time to publish one snapshot, from reading it to committing its manifest",
            self.publish_duration.clone(),
        );
        r.register(
            "fetches",
            "Snapshots fetched from the store and verified",
            self.fetches.clone(),
        );
        r.register(
            "fetch_failures",
            "Fetch attempts that failed, by reason",
            self.fetch_failures.clone(),
        );
        r.register(
            "fetch_bytes",
            "Bytes downloaded from the store by fetches (chunks found locally are not counted)",
            self.fetch_bytes.clone(),
        );
        r.register(
            "fetch_snapshot_bytes",
            "Total size of the snapshots fetched, before deduplication",
            self.fetch_snapshot_bytes.clone(),
        );
        r.register(
            "fetch_duration_seconds",
            "Time to fetch and verify one snapshot",
            self.fetch_duration.clone(),
        );
        r.register(
            "chunks_transferred",
            "Chunks uploaded or downloaded, by direction",
            self.chunks_transferred.clone(),
        );
        r.register(
            "chunks_reused",
            "Chunks not transferred because the other side already held them, by direction",
            self.chunks_reused.clone(),
        );
        r.register(
            "adoptions",
            "Fetched snapshots handed to the node, by the node's answer",
            self.adoptions.clone(),
        );
        r.register(
            "last_published_index",
            "Log index of the last snapshot this sidecar published",
            self.last_published_index.clone(),
        );
        r.register(
            "last_published_timestamp_seconds",
            "Unix time of the last publish by this sidecar",
            self.last_published_timestamp.clone(),
        );
        r.register(
            "last_fetched_index",
            "Log index of the last snapshot this sidecar fetched and verified",
            self.last_fetched_index.clone(),
        );
        r.register(
            "node_snapshot_index",
            "Log index of the node's current snapshot",
            self.node_snapshot_index.clone(),
        );
        r.register(
            "store_newest_index",
            "Log index of the newest snapshot in the store",
            self.store_newest_index.clone(),
        );
        r.register(
            "follower_lag",
            "Follower: log indexes between the store's newest snapshot and the node's",
            self.follower_lag.clone(),
        );
        r.register(
            "verification_failures",
            "Chunks or snapshots whose bytes did not match their checksum",
            self.verification_failures.clone(),
        );
        r.register(
            "store_errors",
            "Failed requests to the object store, by kind",
            self.store_errors.clone(),
        );
        r.register(
            "gc_deleted_manifests",
            "Manifests deleted by garbage collection",
            self.gc_deleted_manifests.clone(),
        );
        r.register(
            "gc_deleted_chunks",
            "Chunks deleted by garbage collection",
            self.gc_deleted_chunks.clone(),
        );
        r.register(
            "gc_deleted_bytes",
            "Bytes of chunks deleted by garbage collection",
            self.gc_deleted_bytes.clone(),
        );
        r.register(
            "gc_deferred_chunks",
            "Chunks garbage collection left for a later run because publishes were in flight",
            self.gc_deferred_chunks.clone(),
        );
        r.register(
            "role",
            "The node's role as its hook reports it: 1 for the current role, 0 for the others",
            self.role.clone(),
        );
        r.register(
            "build",
            "The running snaprelay's version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
    }
}

fn start_at_zero(family: &Labelled<Counter>, key: &'static str, values: &[&'static str]) {
    for value in values {
        let _created = family.get_or_create(&[(key, *value)]);
    }
}

fn reason_label(reason: FailureReason) -> Label {
    [("reason", reason.as_str())]
}

/// `value` as the `'static` entry of `words` it equals, so labels stay in the vocabulary.
fn vocabulary(words: &[&'static str], value: &str) -> Option<&'static str> {
    words.iter().copied().find(|w| *w == value)
}

fn set_or_clear(gauge: &IndexGauge, value: Option<u64>) {
    match value {
        Some(v) => {
            gauge.get_or_create(&NO_LABELS).set(v);
        }
        None => {
            gauge.remove(&NO_LABELS);
        }
    }
}

/// What `/healthz` and `/readyz` answer from; the daemon updates it. A cheap clone.
#[derive(Clone)]
pub struct Health {
    inner: Arc<HealthInner>,
}

struct HealthInner {
    started: Instant,
    /// Milliseconds since `started` at the last sign of progress.
    last_progress_ms: AtomicU64,
    stuck_after: Duration,
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
            .field("stuck_after", &self.inner.stuck_after)
            .field("max_lag", &self.inner.max_lag)
            .finish_non_exhaustive()
    }
}

impl Health {
    /// `stuck_after`: how long the main loop may go without progress before `/healthz`
    /// fails. `max_lag`: the follower lag, in log indexes, above which `/readyz` fails.
    pub fn new(stuck_after: Duration, max_lag: Option<u64>) -> Health {
        Health {
            inner: Arc::new(HealthInner {
                started: Instant::now(),
                last_progress_ms: AtomicU64::new(0),
                stuck_after,
                max_lag,
                checks: Mutex::new(Checks::default()),
            }),
        }
    }

    /// The main loop finished a step, or a transfer moved data (call often: a long
    /// transfer that does not call this looks stuck).
    pub fn loop_progress(&self) {
        let ms = self.inner.started.elapsed().as_millis() as u64;
        self.inner.last_progress_ms.store(ms, Ordering::Relaxed);
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

    /// (healthy, reason) for `/healthz`: the process is alive and the main loop made
    /// progress within `stuck_after`.
    pub fn live(&self) -> (bool, String) {
        let quiet = self.since_progress();
        if quiet <= self.inner.stuck_after {
            return (true, "ok".into());
        }
        (
            false,
            format!(
                "main loop made no progress for {} (limit {})",
                whole_seconds(quiet),
                whole_seconds(self.inner.stuck_after)
            ),
        )
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

    fn since_progress(&self) -> Duration {
        let last = Duration::from_millis(self.inner.last_progress_ms.load(Ordering::Relaxed));
        self.inner.started.elapsed().saturating_sub(last)
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

/// Binds the metrics listener, so that a bad or busy address fails `run` at start.
///
/// # Errors
/// The address cannot be bound (in use, not local, not permitted); the error names it.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the metrics listener to {listen}"))
}

/// Serves `GET /metrics` (Prometheus text format 0.0.4), `/healthz` and `/readyz` (200 `ok`,
/// or 503 with the reason as the body) on `listener` until `shutdown` completes.
///
/// After `shutdown`, requests in flight get up to five seconds to finish; connections still
/// open then are dropped. A failed connection only ends that connection.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("metrics listener address")?;
    let app = Router::new()
        .route("/metrics", get(get_metrics))
        .route("/healthz", get(get_healthz))
        .route("/readyz", get(get_readyz))
        .with_state(Endpoints { metrics, health });
    let stop = CancellationToken::new();
    let server = axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
    let mut server = std::pin::pin!(server.into_future());
    tracing::info!(%addr, "serving metrics and health checks");
    tokio::select! {
        r = &mut server => return r.with_context(|| format!("serving metrics on {addr}")),
        _ = shutdown => stop.cancel(),
    }
    // A scrape that holds its connection open must not hold up the daemon's exit.
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(r) => r.with_context(|| format!("serving metrics on {addr}")),
        Err(_) => {
            tracing::debug!(%addr, "metrics connections still open at shutdown; dropping them");
            Ok(())
        }
    }
}

#[derive(Clone)]
struct Endpoints {
    metrics: Metrics,
    health: Health,
}

async fn get_metrics(State(e): State<Endpoints>) -> Response {
    (
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        e.metrics.encode(),
    )
        .into_response()
}

async fn get_healthz(State(e): State<Endpoints>) -> Response {
    check_response(e.health.live())
}

async fn get_readyz(State(e): State<Endpoints>) -> Response {
    check_response(e.health.ready())
}

fn check_response((ok, reason): (bool, String)) -> Response {
    if ok {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample written exactly as `series` (name and labels).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            Some(value.parse().expect("a sample value is a number"))
        })
    }

    const FAMILIES: [(&str, &str); 27] = [
        ("snaprelay_publishes_total", "counter"),
        ("snaprelay_publish_failures_total", "counter"),
        ("snaprelay_publish_bytes_total", "counter"),
        ("snaprelay_publish_snapshot_bytes_total", "counter"),
        ("snaprelay_publish_duration_seconds", "histogram"),
        ("snaprelay_fetches_total", "counter"),
        ("snaprelay_fetch_failures_total", "counter"),
        ("snaprelay_fetch_bytes_total", "counter"),
        ("snaprelay_fetch_snapshot_bytes_total", "counter"),
        ("snaprelay_fetch_duration_seconds", "histogram"),
        ("snaprelay_chunks_transferred_total", "counter"),
        ("snaprelay_chunks_reused_total", "counter"),
        ("snaprelay_adoptions_total", "counter"),
        ("snaprelay_last_published_index", "gauge"),
        ("snaprelay_last_published_timestamp_seconds", "gauge"),
        ("snaprelay_last_fetched_index", "gauge"),
        ("snaprelay_node_snapshot_index", "gauge"),
        ("snaprelay_store_newest_index", "gauge"),
        ("snaprelay_follower_lag", "gauge"),
        ("snaprelay_verification_failures_total", "counter"),
        ("snaprelay_store_errors_total", "counter"),
        ("snaprelay_gc_deleted_manifests_total", "counter"),
        ("snaprelay_gc_deleted_chunks_total", "counter"),
        ("snaprelay_gc_deleted_bytes_total", "counter"),
        ("snaprelay_gc_deferred_chunks_total", "counter"),
        ("snaprelay_role", "gauge"),
        ("snaprelay_build_info", "gauge"),
    ];

    fn exercise(m: &Metrics) {
        m.role("follower");
        m.published(40, 1000, 600, 3, 2, Duration::from_millis(1500));
        m.publish_failed(FailureReason::Store);
        m.fetched(42, 1000, 400, 2, 3, Duration::from_secs(90));
        m.fetch_failed(FailureReason::Corrupt);
        m.adopted(42, "staged");
        m.verification_failure();
        m.store_error("unreachable");
        m.gc_done(&crate::gc::GcReport {
            manifests_deleted: vec!["m".into()],
            chunks_deleted: 5,
            bytes_deleted: 4096,
            chunks_deferred: 2,
            ..Default::default()
        });
        m.follower_position(Some(30), Some(42));
    }

    #[test]
    fn every_family_has_help_and_type_once_used() {
        let m = Metrics::new();
        exercise(&m);
        let text = m.encode();
        for (name, kind) in FAMILIES {
            assert!(
                text.contains(&format!("\n# HELP {name} "))
                    || text.starts_with(&format!("# HELP {name} ")),
                "no HELP for {name}:\n{text}"
            );
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "no TYPE {kind} for {name}:\n{text}"
            );
        }
        assert_eq!(
            sample(
                &text,
                &format!(
                    "snaprelay_build_info{{version=\"{}\"}}",
                    env!("CARGO_PKG_VERSION")
                )
            ),
            Some(1.0)
        );
    }

    #[test]
    fn counters_move_with_each_event() {
        let m = Metrics::new();
        let before = m.encode();
        assert_eq!(sample(&before, "snaprelay_publishes_total"), Some(0.0));
        assert_eq!(
            sample(
                &before,
                "snaprelay_publish_failures_total{reason=\"store\"}"
            ),
            Some(0.0),
            "failure series exist before the first failure"
        );
        exercise(&m);
        m.published(41, 1000, 100, 1, 4, Duration::from_millis(200));
        let text = m.encode();
        let expect = [
            ("snaprelay_publishes_total", 2.0),
            ("snaprelay_publish_bytes_total", 700.0),
            ("snaprelay_publish_snapshot_bytes_total", 2000.0),
            ("snaprelay_publish_failures_total{reason=\"store\"}", 1.0),
            ("snaprelay_publish_failures_total{reason=\"corrupt\"}", 0.0),
            ("snaprelay_fetches_total", 1.0),
            ("snaprelay_fetch_bytes_total", 400.0),
            ("snaprelay_fetch_failures_total{reason=\"corrupt\"}", 1.0),
            (
                "snaprelay_chunks_transferred_total{direction=\"upload\"}",
                4.0,
            ),
            ("snaprelay_chunks_reused_total{direction=\"upload\"}", 6.0),
            (
                "snaprelay_chunks_transferred_total{direction=\"download\"}",
                2.0,
            ),
            ("snaprelay_chunks_reused_total{direction=\"download\"}", 3.0),
            ("snaprelay_adoptions_total{outcome=\"staged\"}", 1.0),
            ("snaprelay_adoptions_total{outcome=\"adopted\"}", 0.0),
            ("snaprelay_verification_failures_total", 1.0),
            ("snaprelay_store_errors_total{kind=\"unreachable\"}", 1.0),
            ("snaprelay_gc_deleted_manifests_total", 1.0),
            ("snaprelay_gc_deleted_chunks_total", 5.0),
            ("snaprelay_gc_deleted_bytes_total", 4096.0),
            ("snaprelay_last_published_index", 41.0),
            ("snaprelay_last_fetched_index", 42.0),
            ("snaprelay_publish_duration_seconds_count", 2.0),
            (
                "snaprelay_publish_duration_seconds_bucket{le=\"0.25\"}",
                1.0,
            ),
            ("snaprelay_publish_duration_seconds_bucket{le=\"2.5\"}", 2.0),
            ("snaprelay_fetch_duration_seconds_bucket{le=\"60\"}", 0.0),
            ("snaprelay_fetch_duration_seconds_bucket{le=\"120\"}", 1.0),
            ("snaprelay_fetch_duration_seconds_bucket{le=\"+Inf\"}", 1.0),
        ];
        for (series, value) in expect {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        let published_at = sample(&text, "snaprelay_last_published_timestamp_seconds").unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((now - published_at).abs() < 60.0, "{published_at} vs {now}");
    }

    #[test]
    fn unknown_label_values_stay_in_the_vocabulary() {
        let m = Metrics::new();
        m.store_error("s3://AKIA:secret@bucket");
        m.adopted(1, "https://user:pw@example/x");
        m.role("emperor");
        let text = m.encode();
        assert!(!text.contains("secret") && !text.contains("pw@"), "{text}");
        assert_eq!(
            sample(&text, "snaprelay_store_errors_total{kind=\"other\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "snaprelay_adoptions_total{outcome=\"other\"}"),
            Some(1.0)
        );
        assert_eq!(sample(&text, "snaprelay_role{role=\"unknown\"}"), Some(1.0));
    }

    #[test]
    fn role_gauge_marks_only_the_current_role() {
        let m = Metrics::new();
        let ones = |text: &str| {
            ROLES
                .iter()
                .filter(|r| sample(text, &format!("snaprelay_role{{role=\"{r}\"}}")) == Some(1.0))
                .copied()
                .collect::<Vec<_>>()
        };
        assert_eq!(ones(&m.encode()), ["unknown"]);
        m.role("leader");
        let text = m.encode();
        assert_eq!(ones(&text), ["leader"]);
        assert_eq!(
            sample(&text, "snaprelay_role{role=\"follower\"}"),
            Some(0.0)
        );
        m.role("follower");
        assert_eq!(ones(&m.encode()), ["follower"]);
    }

    #[test]
    fn follower_lag_follows_the_position_and_only_while_following() {
        let m = Metrics::new();
        let text = m.encode();
        assert_eq!(
            sample(&text, "snaprelay_follower_lag"),
            None,
            "unknown before any report"
        );
        assert!(!text.contains("snaprelay_node_snapshot_index"), "{text}");

        m.role("follower");
        m.follower_position(Some(100), Some(130));
        let text = m.encode();
        assert_eq!(sample(&text, "snaprelay_node_snapshot_index"), Some(100.0));
        assert_eq!(sample(&text, "snaprelay_store_newest_index"), Some(130.0));
        assert_eq!(sample(&text, "snaprelay_follower_lag"), Some(30.0));

        // Adopting moves the node's index with it.
        m.adopted(130, "adopted");
        let text = m.encode();
        assert_eq!(sample(&text, "snaprelay_node_snapshot_index"), Some(130.0));
        assert_eq!(sample(&text, "snaprelay_follower_lag"), Some(0.0));

        // A node ahead of the store (it took a snapshot itself) does not lag.
        m.follower_position(Some(150), Some(130));
        assert_eq!(sample(&m.encode(), "snaprelay_follower_lag"), Some(0.0));
        // A node without a snapshot lags by everything in the store.
        m.follower_position(None, Some(130));
        let text = m.encode();
        assert_eq!(sample(&text, "snaprelay_follower_lag"), Some(130.0));
        assert_eq!(sample(&text, "snaprelay_node_snapshot_index"), None);
        // An empty store: nothing to catch up on.
        m.follower_position(Some(5), None);
        assert_eq!(sample(&m.encode(), "snaprelay_follower_lag"), Some(0.0));

        m.role("leader");
        let text = m.encode();
        assert_eq!(sample(&text, "snaprelay_follower_lag"), None, "{text}");
        assert_eq!(sample(&text, "snaprelay_node_snapshot_index"), Some(5.0));
    }

    #[test]
    fn clones_share_one_registry() {
        let m = Metrics::new();
        m.clone().verification_failure();
        assert_eq!(
            sample(&m.encode(), "snaprelay_verification_failures_total"),
            Some(1.0)
        );
    }

    #[test]
    fn failure_reasons_are_classified_from_the_error_chain() {
        let corrupt = anyhow::Error::new(Error::ChunkCorrupt {
            sha256: "ab".into(),
            reason: "sha256 mismatch".into(),
        })
        .context("fetching snapshot 7");
        assert_eq!(FailureReason::of(&corrupt), FailureReason::Corrupt);

        let store = anyhow::Error::new(Error::Store {
            op: "get",
            key: "manifests/x".into(),
            source: object_store::Error::NotFound {
                path: "manifests/x".into(),
                source: "gone".into(),
            },
        })
        .context("publishing snapshot 3");
        assert_eq!(FailureReason::of(&store), FailureReason::Store);
        assert_eq!(store_error_kind(&store), Some("not_found"));

        let hook = anyhow::Error::new(HookError::Timeout {
            socket: "/run/node.sock".into(),
            timeout: Duration::from_secs(1),
        });
        assert_eq!(FailureReason::of(&hook), FailureReason::Node);
        assert_eq!(store_error_kind(&hook), None);

        let io = anyhow::Error::new(std::io::Error::other("disk full")).context("staging");
        assert_eq!(FailureReason::of(&io), FailureReason::Io);
        assert_eq!(
            FailureReason::of(&anyhow::anyhow!("???")),
            FailureReason::Other
        );

        let denied = anyhow::Error::new(object_store::Error::PermissionDenied {
            path: "x".into(),
            source: "403".into(),
        });
        assert_eq!(store_error_kind(&denied), Some("permission"));
        let down = anyhow::Error::new(object_store::Error::Generic {
            store: "S3",
            source: "connection refused".into(),
        });
        assert_eq!(store_error_kind(&down), Some("unreachable"));
    }

    #[test]
    fn live_fails_once_the_loop_stops_making_progress() {
        let health = Health::new(Duration::from_millis(100), None);
        assert_eq!(health.live(), (true, "ok".to_owned()));
        std::thread::sleep(Duration::from_millis(250));
        let (live, reason) = health.live();
        assert!(!live);
        assert!(reason.contains("no progress"), "{reason}");
        health.loop_progress();
        assert!(health.live().0);
    }

    #[test]
    fn ready_names_what_is_wrong() {
        let health = Health::new(Duration::from_secs(600), Some(10));
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
        let unbounded = Health::new(Duration::from_secs(600), None);
        unbounded.store_reachable(true);
        unbounded.hook_reachable(true);
        unbounded.lag(Some(1_000_000));
        assert!(unbounded.ready().0);
    }

    #[test]
    fn ready_fails_when_the_loop_is_stuck() {
        let health = Health::new(Duration::from_millis(50), None);
        health.store_reachable(true);
        health.hook_reachable(true);
        std::thread::sleep(Duration::from_millis(150));
        let (ready, reason) = health.ready();
        assert!(!ready);
        assert!(reason.contains("no progress"), "{reason}");
    }

    #[tokio::test]
    async fn bind_names_the_address_it_could_not_take() {
        let taken = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(addr).await.unwrap_err();
        assert!(format!("{err:#}").contains(&addr.to_string()), "{err:#}");
    }

    #[tokio::test]
    async fn serves_metrics_and_health_over_http_until_shutdown() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let metrics = Metrics::new();
        let health = Health::new(Duration::from_secs(600), Some(5));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, metrics.clone(), health.clone(), async {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::new();
        let get = |path: &str| client.get(format!("{base}{path}")).send();

        metrics.published(12, 100, 100, 1, 0, Duration::from_secs(1));
        let r = get("/metrics").await.unwrap();
        assert_eq!(r.status(), 200);
        let content_type = r.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        let body = r.text().await.unwrap();
        assert_eq!(
            sample(&body, "snaprelay_publishes_total"),
            Some(1.0),
            "{body}"
        );
        assert_eq!(sample(&body, "snaprelay_last_published_index"), Some(12.0));

        let r = get("/healthz").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok\n");

        health.store_reachable(false);
        health.hook_reachable(true);
        let r = get("/readyz").await.unwrap();
        assert_eq!(r.status(), 503);
        assert!(r.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        assert_eq!(r.text().await.unwrap(), "store unreachable\n");

        health.store_reachable(true);
        let r = get("/readyz").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok\n");

        health.lag(Some(6));
        let r = get("/readyz").await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(
            r.text().await.unwrap(),
            "follower lag 6 exceeds max_lag 5\n"
        );

        assert_eq!(get("/nope").await.unwrap().status(), 404);
        let post = client.post(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(post.status(), 405);

        // The client keeps its connection open; shutdown must not wait out the grace period.
        stop.send(()).unwrap();
        let ended = tokio::time::timeout(SHUTDOWN_GRACE / 2, server)
            .await
            .expect("the server stops soon after shutdown");
        ended.unwrap().unwrap();
        assert!(
            get("/healthz").await.is_err(),
            "nothing listens after shutdown"
        );
    }
}
