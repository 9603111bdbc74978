//! The daemon's Prometheus metrics ([`Metrics`]): what `snaprelay run` tells monitoring about
//! publishes, fetches, adoptions, the store and GC. The README's metrics table documents each
//! one; the names are a contract with dashboards and alerts, and a test checks every family.
//!
//! Each metric is declared once, in the `metrics!` list below (field, constructor, name, help).
//! Label values come only from fixed vocabularies (never a store URL, key, path or error
//! message), so a label cannot leak a credential and the number of series is bounded.
//! Labelled counters start at 0 for every value of their vocabulary, so `rate()` sees the
//! first failure. Gauges whose value is not known yet (an index before the first publish, the
//! lag on a leader) have no sample rather than a misleading 0.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::error::FailureReason;

/// Upper bounds of the publish and fetch duration buckets: a small snapshot takes a fraction
/// of a second, a multi-gigabyte one over a slow link tens of minutes.
const DURATION_BUCKETS: [f64; 14] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
];

/// Upper bounds of the propagation buckets: a hinted incremental snapshot lands in well
/// under a second, one found by the slow fallback in minutes.
const PROPAGATION_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
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
const HINT_OUTCOMES: [&str; 2] = ["delivered", "failed"];
pub const HINT_IGNORED: [&str; 3] = ["rate_limited", "malformed", "wrong_cluster"];
pub const INPROGRESS_REFUSED: [&str; 3] = ["invalid", "chunk_mismatch", "stale"];
const UPLOAD: &str = "upload";
const DOWNLOAD: &str = "download";

/// One label with a value from a fixed vocabulary: `'static` keeps URLs and messages out.
type Label = [(&'static str, &'static str); 1];
type Labelled<M> = Family<Label, M>;
/// A gauge with no sample until its value is known: a family whose only series has no
/// labels, present or removed.
type MaybeGauge<N, A> = Family<[(&'static str, &'static str); 0], Gauge<N, A>>;
type IndexGauge = MaybeGauge<u64, AtomicU64>;
const NO_LABELS: [(&str, &str); 0] = [];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// Declares the metric set once: each entry is `field: Type = constructor, "name", "help"`.
/// It defines the `Series` struct and `Series::register`, which creates every metric and
/// registers it under `snaprelay_<name>` (counters get `_total` from the encoder).
macro_rules! metrics {
    ($($field:ident: $ty:ty = $init:expr, $name:literal, $help:literal;)*) => {
        struct Series {
            $($field: $ty,)*
        }

        impl Series {
            fn register(registry: &mut Registry) -> Series {
                let series = Series { $($field: $init,)* };
                $(registry.register($name, $help, series.$field.clone());)*
                series
            }
        }
    };
}

metrics! {
    publishes: Counter = Counter::default(), "publishes",
        "Snapshots published to the store by this sidecar";
    publish_failures: Labelled<Counter> = Family::default(), "publish_failures",
        "Publish attempts that failed, by reason";
    publish_bytes: Counter = Counter::default(), "publish_bytes",
        "Bytes uploaded to the store by publishes (chunks the store already held are not counted)";
    publish_snapshot_bytes: Counter = Counter::default(), "publish_snapshot_bytes",
        "Total size of the snapshots published, before deduplication";
    publish_duration: Histogram = duration_histogram(), "publish_duration_seconds",
        "Time to publish one snapshot, from reading it to committing its manifest";
    fetches: Counter = Counter::default(), "fetches",
        "Snapshots fetched from the store and verified";
    fetch_failures: Labelled<Counter> = Family::default(), "fetch_failures",
        "Fetch attempts that failed, by reason";
    fetch_bytes: Counter = Counter::default(), "fetch_bytes",
        "Bytes downloaded from the store by fetches (chunks found locally are not counted)";
    fetch_snapshot_bytes: Counter = Counter::default(), "fetch_snapshot_bytes",
        "Total size of the snapshots fetched, before deduplication";
    fetch_duration: Histogram = duration_histogram(), "fetch_duration_seconds",
        "Time to fetch and verify one snapshot";
    chunks_transferred: Labelled<Counter> = Family::default(), "chunks_transferred",
        "Chunks uploaded or downloaded, by direction";
    chunks_reused: Labelled<Counter> = Family::default(), "chunks_reused",
        "Chunks not transferred because the other side already held them, by direction";
    adoptions: Labelled<Counter> = Family::default(), "adoptions",
        "Fetched snapshots handed to the node, by the node's answer";
    last_published_index: IndexGauge = Family::default(), "last_published_index",
        "Log index of the last snapshot this sidecar published";
    last_published_timestamp: MaybeGauge<f64, AtomicU64> = Family::default(),
        "last_published_timestamp_seconds", "Unix time of the last publish by this sidecar";
    last_fetched_index: IndexGauge = Family::default(), "last_fetched_index",
        "Log index of the last snapshot this sidecar fetched and verified";
    node_snapshot_index: IndexGauge = Family::default(), "node_snapshot_index",
        "Log index of the node's current snapshot";
    store_newest_index: IndexGauge = Family::default(), "store_newest_index",
        "Log index of the newest snapshot in the store";
    follower_lag: IndexGauge = Family::default(), "follower_lag",
        "Follower: log indexes between the store's newest snapshot and the node's";
    verification_failures: Counter = Counter::default(), "verification_failures",
        "Chunks or snapshots whose bytes did not match their checksum";
    store_errors: Labelled<Counter> = Family::default(), "store_errors",
        "Failed requests to the object store, by kind";
    gc_deleted_manifests: Counter = Counter::default(), "gc_deleted_manifests",
        "Manifests deleted by garbage collection";
    gc_deleted_chunks: Counter = Counter::default(), "gc_deleted_chunks",
        "Chunks deleted by garbage collection";
    gc_deleted_bytes: Counter = Counter::default(), "gc_deleted_bytes",
        "Bytes of chunks deleted by garbage collection";
    gc_deferred_chunks: Counter = Counter::default(), "gc_deferred_chunks",
        "Chunks garbage collection left for a later run because publishes were in flight";
    signature_failures: Labelled<Counter> = Family::default(), "signature_failures",
        "Manifests refused because they are unsigned, signed by an unknown key, or their signature does not verify, by reason";
    manifests_quarantined: Labelled<Counter> = Family::default(), "manifests_quarantined",
        "Manifests a follower quarantined (not fetched again until their retry time or an operator's clear), by reason";
    quarantined_manifests: Gauge = Gauge::default(), "quarantined_manifests",
        "Manifests in this follower's quarantine now";
    store_up: MaybeGauge<i64, std::sync::atomic::AtomicI64> = Family::default(), "store_up",
        "1 if the store answered the last probe within its deadline, 0 if not";
    role: Labelled<Gauge> = Family::default(), "role",
        "The node's role as its hook reports it: 1 for the current role, 0 for the others";
    store_requests: Labelled<Counter> = Family::default(), "store_requests",
        "Requests this sidecar made to the object store, by kind (a LIST page, a GET, a HEAD, a PUT, ...), whatever their answer";
    hints_sent: Labelled<Counter> = Family::default(), "hints_sent",
        "Leader: wake-up hints sent to the configured peers after a publish, by outcome (delivered or failed)";
    hints_received: Counter = Counter::default(), "hints_received",
        "Wake-up hints accepted on POST /hint (each only makes the follower look at the store now)";
    hints_ignored: Labelled<Counter> = Family::default(), "hints_ignored",
        "Wake-up hints refused on POST /hint, by reason (rate_limited, malformed, wrong_cluster)";
    prefetched_bytes: Counter = Counter::default(), "prefetched_bytes",
        "Follower: bytes of a publish in progress downloaded, checked and written into its staging file before its manifest landed";
    prefetched_chunks: Counter = Counter::default(), "prefetched_chunks",
        "Follower: chunks of a publish in progress downloaded before its manifest landed (a GET each)";
    inprogress_refused: Labelled<Counter> = Family::default(), "inprogress_refused",
        "Follower: in-progress objects given up on, by reason (invalid: refused as malformed or inconsistent; chunk_mismatch: a listed chunk is missing or does not match its sha256; stale: it stopped changing)";
    propagation: Histogram = Histogram::new(PROPAGATION_BUCKETS), "propagation_seconds",
        "Follower: from a manifest's created_at (the publisher's clock) to its adoption by this follower's node (this host's clock)";
}

/// The numbers of one GC run that the metrics count.
#[derive(Debug, Clone, Copy, Default)]
pub struct GcCounts {
    pub manifests_deleted: u64,
    pub chunks_deleted: u64,
    pub bytes_deleted: u64,
    pub chunks_deferred: u64,
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
    series: Series,
}

impl std::ops::Deref for Inner {
    type Target = Series;

    fn deref(&self) -> &Series {
        &self.series
    }
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
        let mut registry = Registry::with_prefix("snaprelay");
        let series = Series::register(&mut registry);
        registry.register(
            "build",
            "The running snaprelay's version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        // Every labelled series exists from the start, at 0.
        let reasons = FailureReason::ALL.map(FailureReason::as_str);
        start_at_zero(&series.publish_failures, "reason", &reasons);
        start_at_zero(&series.fetch_failures, "reason", &reasons);
        start_at_zero(&series.chunks_transferred, "direction", &[UPLOAD, DOWNLOAD]);
        start_at_zero(&series.chunks_reused, "direction", &[UPLOAD, DOWNLOAD]);
        start_at_zero(&series.adoptions, "outcome", &ADOPTION_OUTCOMES);
        start_at_zero(&series.store_errors, "kind", &STORE_ERROR_KINDS);
        let signature_reasons = crate::signing::Reason::ALL.map(crate::signing::Reason::as_str);
        start_at_zero(&series.signature_failures, "reason", &signature_reasons);
        let quarantine_reasons =
            crate::quarantine::Reason::ALL.map(crate::quarantine::Reason::as_str);
        start_at_zero(&series.manifests_quarantined, "reason", &quarantine_reasons);
        let kinds = crate::counting::Kind::ALL.map(crate::counting::Kind::as_str);
        start_at_zero(&series.store_requests, "kind", &kinds);
        start_at_zero(&series.hints_sent, "outcome", &HINT_OUTCOMES);
        start_at_zero(&series.hints_ignored, "reason", &HINT_IGNORED);
        start_at_zero(&series.inprogress_refused, "reason", &INPROGRESS_REFUSED);
        let metrics = Metrics {
            inner: Arc::new(Inner {
                registry,
                position: Mutex::new(Position {
                    role: "unknown",
                    node: None,
                    newest: None,
                }),
                series,
            }),
        };
        metrics.role("unknown");
        metrics
    }

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
    /// counts as `other`); [`crate::error::store_error_kind`] finds it for an error.
    pub fn store_error(&self, kind: &str) {
        let kind = vocabulary(&STORE_ERROR_KINDS, kind).unwrap_or("other");
        self.inner
            .store_errors
            .get_or_create(&[("kind", kind)])
            .inc();
    }

    /// A manifest refused by the signature check (counted once per manifest).
    pub fn signature_failure(&self, reason: crate::signing::Reason) {
        self.inner
            .signature_failures
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    /// A manifest quarantined (counted once per quarantine), and the quarantine's size now.
    pub fn quarantined(&self, reason: crate::quarantine::Reason, size: usize) {
        self.inner
            .manifests_quarantined
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
        self.quarantine_size(size);
    }

    /// How many manifests the quarantine holds.
    pub fn quarantine_size(&self, size: usize) {
        self.inner
            .quarantined_manifests
            .set(i64::try_from(size).unwrap_or(i64::MAX));
    }

    /// What the last store probe found.
    pub fn store_up(&self, up: bool) {
        self.inner
            .store_up
            .get_or_create(&NO_LABELS)
            .set(i64::from(up));
    }

    /// A request made to the store (see [`crate::counting`]).
    pub fn store_requests(&self, kind: crate::counting::Kind, n: u64) {
        self.inner
            .store_requests
            .get_or_create(&[("kind", kind.as_str())])
            .inc_by(n);
    }

    /// A hint sent to a peer: delivered (it answered 2xx) or not.
    pub fn hint_sent(&self, delivered: bool) {
        let outcome = HINT_OUTCOMES[usize::from(!delivered)];
        self.inner
            .hints_sent
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    /// A chunk of `bytes` a prefetch wrote into a staging file.
    pub fn prefetched(&self, bytes: u64) {
        self.inner.prefetched_bytes.inc_by(bytes);
        self.inner.prefetched_chunks.inc();
    }

    /// An in-progress object given up on; `reason` is one of [`INPROGRESS_REFUSED`]
    /// (anything else: `invalid`).
    pub fn inprogress_refused(&self, reason: &str) {
        let reason = vocabulary(&INPROGRESS_REFUSED, reason).unwrap_or("invalid");
        self.inner
            .inprogress_refused
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn hint_received(&self) {
        self.inner.hints_received.inc();
    }

    /// A hint refused; `reason` is one of [`HINT_IGNORED`] (anything else: `malformed`).
    pub fn hint_ignored(&self, reason: &str) {
        let reason = vocabulary(&HINT_IGNORED, reason).unwrap_or("malformed");
        self.inner
            .hints_ignored
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Follower: a snapshot adopted `seconds` after its manifest was created (negative
    /// values, from clocks that disagree, count as 0).
    pub fn propagated(&self, seconds: f64) {
        self.inner.propagation.observe(seconds.max(0.0));
    }

    /// What a GC run deleted, and the chunks it left for a later run.
    pub fn gc_done(&self, gc: GcCounts) {
        let m = &self.inner;
        m.gc_deleted_manifests.inc_by(gc.manifests_deleted);
        m.gc_deleted_chunks.inc_by(gc.chunks_deleted);
        m.gc_deleted_bytes.inc_by(gc.bytes_deleted);
        m.gc_deferred_chunks.inc_by(gc.chunks_deferred);
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The value of the sample written exactly as `series` (name and labels).
    pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            Some(value.parse().expect("a sample value is a number"))
        })
    }

    const FAMILIES: [(&str, &str); 39] = [
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
        ("snaprelay_signature_failures_total", "counter"),
        ("snaprelay_manifests_quarantined_total", "counter"),
        ("snaprelay_quarantined_manifests", "gauge"),
        ("snaprelay_store_up", "gauge"),
        ("snaprelay_role", "gauge"),
        ("snaprelay_store_requests_total", "counter"),
        ("snaprelay_hints_sent_total", "counter"),
        ("snaprelay_hints_received_total", "counter"),
        ("snaprelay_hints_ignored_total", "counter"),
        ("snaprelay_prefetched_bytes_total", "counter"),
        ("snaprelay_prefetched_chunks_total", "counter"),
        ("snaprelay_inprogress_refused_total", "counter"),
        ("snaprelay_propagation_seconds", "histogram"),
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
        m.signature_failure(crate::signing::Reason::UnknownKey);
        m.quarantined(crate::quarantine::Reason::ChunkMissing, 3);
        m.store_up(false);
        m.gc_done(GcCounts {
            manifests_deleted: 1,
            chunks_deleted: 5,
            bytes_deleted: 4096,
            chunks_deferred: 2,
        });
        m.follower_position(Some(30), Some(42));
        m.store_requests(crate::counting::Kind::List, 2);
        m.hint_sent(true);
        m.hint_received();
        m.hint_ignored("rate_limited");
        m.propagated(0.3);
        m.prefetched(4096);
        m.inprogress_refused("stale");
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
            (
                "snaprelay_manifests_quarantined_total{reason=\"chunk_missing\"}",
                1.0,
            ),
            (
                "snaprelay_manifests_quarantined_total{reason=\"log_mismatch\"}",
                0.0,
            ),
            ("snaprelay_quarantined_manifests", 3.0),
            ("snaprelay_store_up", 0.0),
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
}
