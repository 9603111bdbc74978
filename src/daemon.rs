//! `snaprelay run`: the sidecar loop. It learns the node's role from the hook's `status`
//! (polled), and
//!
//! - as leader, publishes the node's newest committed snapshot whenever the store has no
//!   (verified) manifest for exactly its log id, whatever else the store holds: a newer
//!   manifest, planted or left by another leader, says nothing about this snapshot (file
//!   events plus periodic rescans; optionally asks the node to build one every
//!   `trigger_interval`);
//! - as follower or learner, walks the manifests newer than the node's snapshot, newest
//!   first (listed only when something says a new one may have landed: the advisory `latest`
//!   object changed, seen by the store probe, or a hint arrived; or `daemon.list_interval`
//!   passed; or the last step failed: see [`ListSchedule`]), and hands the first usable one to the node (`save_snapshot`), fetched and
//!   verified into the node's incoming directory. A manifest beyond the node's committed
//!   index is passed over without a look (it may become valid later; it never delays an
//!   older one). One the node holds staged stops the walk; the node's status, not this
//!   process's memory, says what it holds, so a node that restarted and forgot a staged
//!   snapshot gets it again. A manifest whose failure is permanent for it is quarantined
//!   ([`crate::quarantine`]) and the walk moves on to the next candidate at once; any other
//!   failure is retried with backoff, and the fetch resumes from its staging file.
//!
//! The incoming directory holds only what this sidecar is doing: leftovers of earlier runs
//! are removed at start-up, the files of a handover once the node answered it, and at most
//! the staging file of the fetch being resumed is kept.
//!
//! Every step is safe to abandon at any await (the manifest is the store's commit point; a
//! fetch's staging file is hidden and resumed next time), so shutdown simply stops waiting.
//! Failures are retried with exponential backoff and jitter; the loop never exits on a
//! transient error. A store probe on its own task keeps `/readyz` honest about a store that
//! hangs and watches the `latest` object, and the watchdog is petted unless a step is stuck
//! ([`crate::liveness`]). After each publish, the leader rewrites `latest` and tells the
//! followers' sidecars in `daemon.peers` to look now ([`crate::hint`]).
//!
//! Streaming (`daemon.streaming`): a leader's publish announces itself while it runs (the
//! in-progress object, `latest`'s `publishing` field, and a hint at its start as well as
//! after the manifest); a follower that learns of it prefetches the listed chunks into the
//! staging file of that snapshot's fetch, on a task of its own ([`crate::prefetch`]), one
//! at a time. Adoption does not change: when the manifest lands, the usual fetch runs
//! against it, finds the prefetched chunks in place (checking each again) and downloads
//! the rest. A fetch of any manifest first stops the prefetch; one of another snapshot
//! removes the prefetch's staging file like any leftover.
//!
//! Every store request goes through a [`CountingStore`]: `snaprelay_store_requests_total`. It does
//! exit on a repository re-created under it (another incarnation, see
//! [`crate::incarnation`]): only the operator can decide to follow that one.

use std::collections::HashSet;

use crate::chunk::Digest;
use crate::latest::Latest;
use crate::prefetch::{Ended, Prefetch, PrefetchReport};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, NodeConfig};
use crate::counting::{CountingStore, Requests};
use crate::error::Error;
use crate::error::FailureReason;
use crate::fetch::{self, Fetcher};
use crate::gc::{self, Retention};
use crate::health::Health;
use crate::incarnation::{Incarnation, IncarnationError};
use crate::ipc::{LogIdRef, Role, SaveOutcome, Status};
use crate::liveness::{Liveness, ProgressStore};
use crate::metrics::Metrics;
use crate::node::{HookClient, HookError};
use crate::publish::Publisher;
use crate::quarantine::{self, Quarantine, Verdict};
use crate::repo::{AnyManifest, ManifestEntry, ManifestId, Repo};
use crate::signing::Keyring;
use crate::snapdir::{self, Snapshot};
use crate::store::Store;
use crate::store_probe::StoreProbe;
use crate::systemd::Supervisor;
use crate::watch::DirWatcher;

/// What `run` last did, for `snaprelay status` (written to `daemon.state_dir/state.json`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DaemonState {
    pub pid: u32,
    pub role: Option<String>,
    pub last_event: Option<String>,
    pub last_event_at: Option<chrono::DateTime<chrono::Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<chrono::DateTime<chrono::Utc>>,
    pub updated_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl DaemonState {
    pub const FILE: &'static str = "state.json";

    /// Reads the state a daemon left in `dir`, if any.
    pub fn read(dir: &std::path::Path) -> Option<DaemonState> {
        let bytes = std::fs::read(dir.join(Self::FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Local snapshots offered as chunk sources to a follower's fetch.
const REUSE_LOCAL_SNAPSHOTS: usize = 2;
/// Manifests beyond the node's committed index, reported once each (bounded memory).
const AHEAD_REPORTED: usize = 1000;

pub struct Daemon {
    config: Config,
    node_config: NodeConfig,
    node: HookClient,
    /// The store, reporting each answer as progress of the running step.
    store: Store,
    /// The store as configured, for the probe (its answers are not the loop's progress).
    probe_store: Store,
    repo: Option<Repo>,
    role: Option<Role>,
    watcher: Option<DirWatcher>,
    /// Recorded as the publisher of this sidecar's manifests: the configured `node_id`, or
    /// the node's own id from its status.
    node_id: Option<u64>,
    /// Leader: newest log id (index, term) known to be in the store.
    published: Option<(u64, u64)>,
    /// Follower: the node's last `staged` or `stale` answer, which holds while its status
    /// stays as it was (a node that restarts forgets what it staged: see `follow`).
    answered: Option<Answered>,
    /// Follower: manifests beyond the node's committed index already reported.
    ahead: HashSet<ManifestId>,
    /// Follower: manifests refused for good (for a while).
    quarantine: Quarantine,
    /// Whether the incoming directory may hold leftovers (at start-up; after a handover
    /// the node never answered).
    incoming_dirty: bool,
    backoff: Backoff,
    liveness: Liveness,
    supervisor: Supervisor,
    metrics: Metrics,
    health: Health,
    /// What the operator sees in `systemctl status`.
    last_event: String,
    state: DaemonState,
    /// The repository incarnation this sidecar follows (see `incarnation`).
    incarnation: Incarnation,
    /// Follower: when to list the manifests, and what the last listing found.
    schedule: ListSchedule,
    listing: Option<Listing>,
    /// What `latest` says, sent by the store probe when it changed.
    changed: watch::Sender<Option<Latest>>,
    /// Follower: the manifest `latest` named when it was last read.
    latest_manifest: Option<String>,
    /// Follower: the publish in progress `latest` announced last (index, term).
    publishing: Option<(u64, u64)>,
    /// Follower: the prefetch running, if any (one at a time).
    prefetch: Option<RunningPrefetch>,
    /// Follower: the last publish whose prefetch was given up on (stale or refused), not
    /// prefetched again.
    abandoned: Option<(u64, u64)>,
    /// Follower: what the last prefetch that kept its staging file wrote there (offsets
    /// and digests), for the fetch of the same snapshot to take without hashing again.
    prefetched: Option<((u64, u64), Prefetched)>,
    /// Follower: the snapshot whose file, built from a marked local snapshot's bytes, the
    /// node found not to match its sha256: fetched again trusting no local byte.
    distrusted: Option<(u64, u64)>,
    /// Follower: the chunks of the snapshot the node adopted last, which a prefetch need
    /// not download (the fetch copies them from the node's snapshot).
    adopted_chunks: Option<Arc<HashSet<Digest>>>,
    /// Notified by an accepted hint (the store probe looks at once).
    hints: Arc<crate::hint::Hints>,
    /// Leader: sends hints to `daemon.peers`.
    http: Option<reqwest::Client>,
    /// Every request made to the store.
    requests: Requests,
}

/// The manifests a follower listed last: newer than `after` (the node's snapshot then).
#[derive(Debug)]
struct Listing {
    after: Option<u64>,
    entries: Vec<ManifestEntry>,
}

impl Listing {
    /// The listed manifests newer than `after`, if this listing covers them (it was taken
    /// with an `after` no greater).
    fn after(&self, after: Option<u64>) -> Option<Vec<ManifestEntry>> {
        (self.after <= after).then(|| {
            self.entries
                .iter()
                .filter(|e| after.is_none_or(|a| e.id.index > a))
                .cloned()
                .collect()
        })
    }
}

/// When a follower lists the manifests: a LIST costs as much as twelve GETs, so an idle
/// follower must not list on every poll. It lists when woken ([`ListSchedule::wake`]: the
/// `latest` object changed, at start-up, after a failed step, after a manifest it wanted
/// vanished) and otherwise every `interval`, the fallback that finds a manifest every
/// advisory signal missed. Between listings, each poll works on the last listing: the
/// node's position, its committed index and the quarantine are re-read every time, and
/// none of that needs the store.
#[derive(Debug)]
struct ListSchedule {
    interval: Duration,
    due: bool,
    last: Option<tokio::time::Instant>,
}

impl ListSchedule {
    fn new(interval: Duration) -> ListSchedule {
        ListSchedule {
            interval,
            due: true,
            last: None,
        }
    }

    fn wake(&mut self) {
        self.due = true;
    }

    /// Whether to list now; if so, it counts as done.
    fn take(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let due = self.due || self.last.is_none_or(|last| now >= last + self.interval);
        if due {
            self.due = false;
            self.last = Some(now);
        }
        due
    }
}

/// Where a prefetch wrote which chunk in its staging file: (offset, digest).
type Prefetched = Vec<(u64, Digest)>;

/// A prefetch on its own task.
struct RunningPrefetch {
    id: (u64, u64),
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<PrefetchReport>,
}

/// A node's answer to a handover that leaves the snapshot to the node.
#[derive(Debug)]
struct Answered {
    id: ManifestId,
    outcome: SaveOutcome,
    /// The node's (snapshot, staged) at the first poll after the answer.
    seen: Option<(Option<LogIdRef>, Option<LogIdRef>)>,
}

impl Answered {
    /// Whether the answer still holds: the node's (snapshot, staged) are what they were at
    /// the first poll after it (which it records).
    fn holds(&mut self, status: &Status) -> bool {
        let now = (status.snapshot, status.staged);
        *self.seen.get_or_insert(now) == now
    }
}

/// What woke the loop.
enum Work {
    Step,
    Publish,
    Trigger,
}

impl Daemon {
    pub fn new(config: Config) -> anyhow::Result<Daemon> {
        let node_config = config
            .node
            .clone()
            .context("[node] with hook_socket is required for `run`")?;
        let node = HookClient::new(&node_config.hook_socket, node_config.hook_timeout);
        let opened = Store::open(&config.store)?;
        let metrics = Metrics::new();
        let requests = {
            let metrics = metrics.clone();
            Requests::observed(move |kind, n| metrics.store_requests(kind, n))
        };
        let probe_store = Store {
            backend: Arc::new(CountingStore::new(opened.backend.clone(), requests.clone())),
            ..opened
        };
        let store = Store {
            backend: Arc::new(ProgressStore::new(probe_store.backend.clone())),
            ..probe_store.clone()
        };
        let incarnation = Incarnation::load(
            config.daemon.state_dir.as_deref(),
            &config.store.url.to_string(),
        )?;
        let backoff = Backoff::new(config.daemon.poll_interval, config.daemon.max_backoff);
        let liveness = Liveness::new(stuck_after(&config, &node_config));
        let health = Health::new(liveness.clone(), config.metrics.max_lag);
        let quarantine = Quarantine::open(
            config.daemon.state_dir.as_deref(),
            config.daemon.quarantine_retry,
        );
        metrics.quarantine_size(quarantine.len());
        let schedule = ListSchedule::new(config.daemon.list_interval);
        let http = match config.daemon.peers.is_empty() {
            true => None,
            false => Some(
                reqwest::Client::builder()
                    .build()
                    .context("building the HTTP client for hints")?,
            ),
        };
        Ok(Daemon {
            node_id: config.node_id,
            config,
            node_config,
            node,
            store,
            probe_store,
            repo: None,
            role: None,
            watcher: None,
            published: None,
            answered: None,
            ahead: HashSet::new(),
            quarantine,
            incoming_dirty: true,
            backoff,
            supervisor: Supervisor::from_env(liveness.clone()),
            liveness,
            metrics,
            health,
            last_event: String::new(),
            state: DaemonState {
                pid: std::process::id(),
                ..DaemonState::default()
            },
            incarnation,
            schedule,
            listing: None,
            changed: watch::channel(None).0,
            latest_manifest: None,
            publishing: None,
            prefetch: None,
            prefetched: None,
            distrusted: None,
            abandoned: None,
            adopted_chunks: None,
            hints: Arc::new(crate::hint::Hints::new()),
            http,
            requests,
        })
    }

    /// Every request this sidecar made to the store so far.
    pub fn requests(&self) -> Requests {
        self.requests.clone()
    }

    /// Runs until `cancel` fires. Returns an error only for problems no retry can fix
    /// (another cluster's store, an invalid repository).
    pub async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(
            store = %self.config.store.url,
            hook = %self.node_config.hook_socket.display(),
            cluster_id = %self.config.cluster_id,
            "snaprelay started"
        );
        log_signing(&self.config.signing);
        tracing::info!(
            stuck_after_ms = self.liveness.stuck_after().as_millis() as u64,
            "a step with no progress for this long counts as stuck"
        );
        let watchdog = self.supervisor.spawn_watchdog(cancel.clone());
        let server = match self.config.metrics.listen {
            Some(listen) => {
                let listener = crate::http::bind(listen).await?;
                tracing::info!(%listen, "serving /metrics, /healthz and /readyz");
                let inbox = crate::hint::Inbox::new(
                    &self.config.cluster_id,
                    self.hints.clone(),
                    self.metrics.clone(),
                );
                Some(tokio::spawn(crate::http::serve(
                    listener,
                    self.metrics.clone(),
                    self.health.clone(),
                    inbox,
                    cancel.clone().cancelled_owned(),
                )))
            }
            None => None,
        };
        let probe = tokio::spawn(
            StoreProbe {
                store: self.probe_store.clone(),
                health: self.health.clone(),
                metrics: self.metrics.clone(),
                interval: self.config.daemon.store_probe_interval,
                timeout: self.config.daemon.store_probe_timeout,
                changed: self.changed.clone(),
                hints: self.hints.clone(),
            }
            .run(cancel.clone()),
        );
        if !self.wait_ready(&cancel).await? {
            self.supervisor.stopping();
            let _ = probe.await;
            return Ok(());
        }
        let daemon = self.config.daemon.clone();
        let mut poll = tokio::time::interval(daemon.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut rescan = tokio::time::interval(daemon.rescan_interval);
        rescan.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut trigger = daemon.trigger_interval.map(|t| {
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + t, t);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        });
        let liveness = self.liveness.clone();
        let mut latest_changed = self.changed.subscribe();
        loop {
            // Waiting here is the loop's own choice: idle, never stuck.
            let work = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = poll.tick() => Work::Step,
                Ok(()) = latest_changed.changed() => {
                    let latest = latest_changed.borrow_and_update().clone();
                    self.latest_changed(latest);
                    Work::Step
                }
                report = prefetch_done(&mut self.prefetch) => {
                    self.prefetch_ended(report);
                    Work::Step
                }
                _ = changed(&mut self.watcher) => Work::Publish,
                _ = rescan.tick(), if self.role == Some(Role::Leader) => Work::Publish,
                _ = tick(&mut trigger), if self.role == Some(Role::Leader) => Work::Trigger,
            };
            let outcome = liveness
                .scope(async {
                    match work {
                        Work::Step => self.step(&cancel).await,
                        Work::Publish => self.publish_pending(&cancel).await,
                        Work::Trigger => self.trigger().await,
                    }
                })
                .await;
            match outcome {
                Ok(()) => {
                    if let Some((failures, since)) = self.backoff.reset() {
                        tracing::info!(failures, down_ms = since.as_millis() as u64, "recovered");
                    }
                }
                Err(e) if is_fatal(&e) => {
                    tracing::error!(error = %crate::error::chain(&e), "giving up");
                    return Err(e);
                }
                Err(e) => {
                    self.report_error(&e);
                    self.record_failure(&e);
                    // What the last listing said may be what failed (a manifest gone).
                    self.schedule.wake();
                    let wait = self.backoff.failed();
                    if self.backoff.failures == 1 {
                        tracing::warn!(error = %crate::error::chain(&e), retry_in_ms = wait.as_millis() as u64, "step failed; retrying");
                    } else {
                        tracing::debug!(error = %crate::error::chain(&e), failures = self.backoff.failures, retry_in_ms = wait.as_millis() as u64, "still failing");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        self.supervisor.stopping();
        self.stop_prefetch().await;
        if let Some(w) = watchdog {
            w.abort();
        }
        let _ = probe.await;
        if let Some(server) = server {
            let _ = server.await;
        }
        tracing::info!("snaprelay stopped");
        Ok(())
    }

    /// Waits until the store and the node's hook both answer, then tells systemd
    /// `READY=1`. Returns false if cancelled first; an error only for a fatal problem.
    async fn wait_ready(&mut self, cancel: &CancellationToken) -> anyhow::Result<bool> {
        loop {
            let probe = async {
                Repo::exists(&self.store)
                    .await
                    .with_context(|| format!("probing the store at {}", self.config.store.url))?;
                let status = self.node.status().await?;
                anyhow::Ok(status)
            };
            let liveness = self.liveness.clone();
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                r = liveness.scope(probe) => r,
            };
            match outcome {
                Ok(status) => {
                    self.backoff.reset();
                    self.supervisor.ready(&format!(
                        "ready: node {} is {}, store {}",
                        status.node_id, status.role, self.config.store.url
                    ));
                    tracing::info!(node_id = status.node_id, role = %status.role, "ready");
                    return Ok(true);
                }
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => {
                    let wait = self.backoff.failed();
                    if self.backoff.failures == 1 {
                        tracing::warn!(error = %crate::error::chain(&e), "not ready yet; retrying");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(false),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    fn report(&mut self, event: String) {
        let role = self
            .role
            .map(|r| r.to_string())
            .unwrap_or_else(|| "unknown".into());
        self.supervisor.status(&format!("{role}; {event}"));
        let now = chrono::Utc::now();
        self.state.role = Some(role);
        if !event.is_empty() {
            self.state.last_event = Some(event.clone());
            self.state.last_event_at = Some(now);
        }
        self.last_event = event;
        self.save_state();
    }

    /// Feeds a failed step into metrics and readiness.
    fn record_failure(&self, err: &anyhow::Error) {
        if let Some(kind) = crate::error::store_error_kind(err) {
            self.metrics.store_error(kind);
            self.health.store_reachable(false);
        }
        if err
            .chain()
            .any(|c| c.downcast_ref::<crate::node::HookError>().is_some())
        {
            self.health.hook_reachable(false);
        }
        // Of chunk objects or of packs alike (a missing pack, a damaged blob or tree block).
        let corrupt = err.chain().any(|c| {
            c.downcast_ref::<Error>()
                .is_some_and(Error::is_verification_failure)
        });
        if corrupt {
            self.metrics.verification_failure();
        }
        let reason = FailureReason::of(err);
        match self.role {
            Some(Role::Leader) => self.metrics.publish_failed(reason),
            Some(Role::Follower | Role::Learner) => self.metrics.fetch_failed(reason),
            _ => {}
        }
    }

    fn report_error(&mut self, err: &anyhow::Error) {
        self.state.last_error = Some(crate::error::chain(err));
        self.state.last_error_at = Some(chrono::Utc::now());
        self.save_state();
    }

    /// Best effort: `status` is a convenience, never a reason to stop working.
    fn save_state(&mut self) {
        let Some(dir) = &self.config.daemon.state_dir else {
            return;
        };
        self.state.updated_at = Some(chrono::Utc::now());
        let written = std::fs::create_dir_all(dir)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                let json = serde_json::to_vec_pretty(&self.state).map_err(|e| e.to_string())?;
                snapdir::write_atomic(&dir.join(DaemonState::FILE), &json)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            tracing::debug!(error = %e, "cannot record the daemon state");
        }
    }

    /// One poll: ask the node what it is, then do that role's work.
    async fn step(&mut self, cancel: &CancellationToken) -> anyhow::Result<()> {
        let status = self.node.status().await?;
        self.health.hook_reachable(true);
        self.learn_node_id(&status);
        if self.role != Some(status.role) {
            tracing::info!(role = %status.role, node_id = status.node_id, term = status.term, "node role");
            self.role = Some(status.role);
            self.metrics.role(&status.role.to_string());
            let event = std::mem::take(&mut self.last_event);
            self.report(event);
            self.published = None;
            self.answered = None;
            self.listing = None;
            self.schedule.wake();
            self.stop_prefetch().await;
        }
        if status.role != Role::Follower && status.role != Role::Learner && self.incoming_dirty {
            // Nothing is being fetched: whatever a fetch left is a leftover.
            self.clean_incoming(&status, &[]);
        }
        match status.role {
            Role::Leader => {
                if self.watcher.is_none() {
                    let dir = self.snapshot_dir(&status);
                    match DirWatcher::new(&dir) {
                        Ok(w) => self.watcher = Some(w),
                        // Rescans still find snapshots; events only make it prompt.
                        Err(e) => {
                            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the snapshot directory; relying on rescans")
                        }
                    }
                }
                self.publish_pending(cancel).await
            }
            Role::Follower | Role::Learner => {
                self.watcher = None;
                self.follow(&status, cancel).await
            }
            Role::Candidate | Role::Shutdown => {
                self.watcher = None;
                Ok(())
            }
        }
    }

    /// The publisher's node id: the configured one, else the node's own (said once).
    fn learn_node_id(&mut self, status: &Status) {
        match self.node_id {
            None => {
                tracing::info!(
                    node_id = status.node_id,
                    "node_id is not configured: recording the node's own id as the publisher of its snapshots"
                );
                self.node_id = Some(status.node_id);
            }
            Some(id) if id != status.node_id && self.config.node_id == Some(id) => {
                tracing::warn!(
                    configured = id,
                    node = status.node_id,
                    "node_id in the config is not the node's own id; manifests name the configured one"
                );
                // Said once: from now on the id is taken as the operator meant it.
                self.config.node_id = None;
            }
            Some(_) => {}
        }
    }

    /// Removes what earlier fetches left in the node's incoming directory, keeping what
    /// resumes the fetch of the first of `resume` (log ids, most wanted first) that has
    /// files there. A failure is only reported: the files are hidden or complete, never
    /// read by the node unless handed over.
    fn clean_incoming(&mut self, status: &Status, resume: &[(u64, u64)]) {
        let dir = self.incoming_dir(status);
        match fetch::clean_incoming(&dir, resume) {
            Ok(_) => self.incoming_dirty = false,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot clean the incoming directory")
            }
        }
    }

    fn snapshot_dir(&self, status: &Status) -> PathBuf {
        self.node_config
            .snapshot_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(&status.snapshot_dir))
    }

    fn incoming_dir(&self, status: &Status) -> PathBuf {
        self.node_config
            .incoming_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(&status.incoming_dir))
    }

    /// Leader: publish the node's newest committed snapshot if the store lacks it.
    async fn publish_pending(&mut self, cancel: &CancellationToken) -> anyhow::Result<()> {
        if self.role != Some(Role::Leader) {
            return Ok(());
        }
        let dir = match (&self.watcher, &self.node_config.snapshot_dir) {
            (Some(w), _) => w.dir().to_owned(),
            (None, Some(dir)) => dir.clone(),
            (None, None) => self.snapshot_dir(&self.node.status().await?),
        };
        let scan = snapdir::scan(&dir).with_context(|| format!("reading {}", dir.display()))?;
        for rejected in &scan.rejected {
            tracing::warn!(error = %rejected, "skipping a snapshot that does not follow the directory contract");
        }
        let Some(newest) = scan.snapshots.last() else {
            return Ok(());
        };
        let log_id = newest.envelope.log_id();
        if self.published.is_some_and(|p| p >= log_id) {
            return Ok(());
        }
        let repo = self.repo_for_publish().await?;
        // Only a manifest for exactly this log id (one that verifies, under signing) means
        // the snapshot is there. Anything newer, whoever wrote it (a planted far-future
        // manifest, a deposed leader), says nothing about this snapshot, and must not stop
        // the pipeline.
        if let Some(id) = repo.manifest_for(log_id.0, log_id.1).await? {
            tracing::debug!(manifest = %id, "the node's newest snapshot is in the store");
            self.health.store_reachable(true);
            self.published = Some(log_id);
            return Ok(());
        }
        let snapshot = newest.clone();
        let progress = self.supervisor.progress();
        let hint_start = self.hinter();
        let publisher = Publisher::new(
            &repo,
            self.config.upload.concurrency,
            self.node_id,
            &progress,
        )
        .streaming(self.config.daemon.streaming)
        .on_announced(move |_, _| {
            if let Some(send) = &hint_start {
                send(None);
            }
        });
        let report = tokio::select! {
            // Abandoning a publish leaves only unreferenced chunks: the manifest is last.
            _ = cancel.cancelled() => return Ok(()),
            r = publisher.publish(&snapshot) => r.with_context(|| format!("publishing snapshot {}", log_id.0))?,
        };
        if !report.already_published {
            tracing::info!(
                stage = "publish",
                index = report.index,
                bytes = report.size,
                uploaded = report.bytes_transferred,
                chunk_index = report.chunk_index,
                elapsed_ms = report.elapsed.as_millis() as u64,
                "snapshot published"
            );
            self.metrics.published(
                report.index,
                report.size,
                report.bytes_transferred,
                report.chunks_transferred,
                report.chunks_total - report.chunks_transferred,
                report.elapsed,
            );
            self.announce(&report.manifest).await;
        }
        self.health.store_reachable(true);
        self.published = Some(log_id);
        self.report(format!("published {} (term {})", log_id.0, log_id.1));
        if self.config.retention.gc_after_publish {
            self.collect_garbage(&repo, log_id, cancel).await?;
        }
        Ok(())
    }

    /// After a manifest landed: rewrites the advisory `latest` object, then tells the
    /// peers to look (in the background: a slow peer must not hold up the loop). Both are
    /// advisory, so a failure is only logged: followers find the manifest at their next
    /// full listing.
    async fn announce(&self, manifest: &str) {
        let written = crate::latest::write(&self.store, &self.config.cluster_id, manifest).await;
        if let Err(e) = written {
            tracing::warn!(manifest, error = %e, "cannot rewrite the store's latest object; followers without hints find the manifest at their next full listing");
        }
        if let Some(send) = self.hinter() {
            send(Some(manifest.to_owned()));
        }
    }

    /// Sends a hint to the peers in the background (a slow peer must not hold anything
    /// up): `None` when there are no peers.
    fn hinter(&self) -> Option<impl Fn(Option<String>) + Send + Sync + 'static> {
        let client = self.http.clone()?;
        let peers = self.config.daemon.peers.clone();
        let metrics = self.metrics.clone();
        let cluster_id = self.config.cluster_id.clone();
        Some(move |manifest: Option<String>| {
            let (client, peers, metrics) = (client.clone(), peers.clone(), metrics.clone());
            let hint = crate::hint::Hint {
                cluster_id: cluster_id.clone(),
                manifest,
            };
            tokio::spawn(async move {
                crate::hint::send(&client, &peers, &hint, &metrics).await;
            });
        })
    }

    /// Follower: `latest` changed. A new manifest (or an unreadable object) is a reason to
    /// list, unless the last listing holds it already; a publish announced in progress is
    /// a reason to prefetch (started by the next step), not to list.
    fn latest_changed(&mut self, latest: Option<Latest>) {
        if worth_listing(
            latest.as_ref(),
            self.latest_manifest.as_deref(),
            self.listing.as_ref(),
        ) {
            self.schedule.wake();
        }
        self.latest_manifest = latest.as_ref().map(|l| l.manifest.clone());
        self.publishing = latest.and_then(|l| l.publishing).map(|p| (p.index, p.term));
    }

    /// Follower: starts prefetching the publish `latest` announced, if streaming is on, it
    /// is newer than the node's snapshot and than every manifest listed, and nothing
    /// stands in the way (a prefetch running, one given up on).
    fn start_prefetch(&mut self, repo: &Repo, status: &Status) {
        let Some(id) = self.publishing else {
            return;
        };
        // One that ended is reaped by the loop first (its report says what to do next).
        let running = self.prefetch.is_some();
        let listed = self
            .listing
            .as_ref()
            .is_some_and(|l| l.entries.iter().any(|e| (e.id.index, e.id.term) >= id));
        if !self.config.daemon.streaming
            || running
            || listed
            || self.abandoned == Some(id)
            || status.snapshot.is_some_and(|s| s.index >= id.0)
        {
            return;
        }
        let node = match fetch::NodeAccess::of_socket(&self.node_config.hook_socket) {
            Ok(node) => node,
            Err(e) => {
                tracing::debug!(error = %e, "not prefetching: cannot tell who the node is");
                return;
            }
        };
        tracing::info!(
            stage = "prefetch",
            index = id.0,
            term = id.1,
            "a publish is in progress; fetching its chunks while it runs"
        );
        let cancel = CancellationToken::new();
        let cached = self.adopted_chunks.clone();
        let snapshot_dir = self.snapshot_dir(status);
        let prefetch = Prefetch {
            repo: repo.clone(),
            id,
            incoming: self.incoming_dir(status),
            local: HashSet::new(),
            node: Some(node),
            poll_interval: self.config.daemon.streaming_poll_interval,
            stale_after: crate::inprogress::STALE_AFTER,
            concurrency: self.config.download.concurrency,
            metrics: self.metrics.clone(),
        };
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                let local = match cached {
                    Some(chunks) => (*chunks).clone(),
                    // A pack publish lists only the chunks it uploads: new ones.
                    None if prefetch.repo.packs().is_some() => HashSet::new(),
                    // After a restart: the node's own snapshots tell (as for a fetch).
                    None => {
                        fetch::local_sources(&prefetch.repo, &snapshot_dir, REUSE_LOCAL_SNAPSHOTS)
                            .await
                            .map(|sources| {
                                sources
                                    .iter()
                                    .flat_map(|s| s.chunks.iter().map(|c| c.sha256))
                                    .collect()
                            })
                            .unwrap_or_default()
                    }
                };
                Prefetch { local, ..prefetch }.run(cancel).await
            }
        });
        self.prefetch = Some(RunningPrefetch { id, cancel, task });
    }

    /// Follower: a prefetch ended on its own.
    fn prefetch_ended(&mut self, report: Option<PrefetchReport>) {
        self.prefetch = None;
        let Some(report) = report else {
            return;
        };
        let (id, ended) = (report.id, report.ended.clone());
        self.finished_prefetch(report, "prefetch ended");
        match ended {
            // The publish ended: its manifest is probably there, and the staging file
            // waits for its fetch (or goes with the next cleaning if there is none).
            Ended::Gone => {
                self.schedule.wake();
                self.incoming_dirty = true;
            }
            Ended::Stale | Ended::Refused(_) | Ended::BadChunk(_) | Ended::Failed(_) => {
                self.abandoned = Some(id);
            }
            Ended::Cancelled => {}
        }
        if self.publishing == Some(id) {
            self.publishing = None;
        }
    }

    /// Says what a finished prefetch did and, if its staging file stays, keeps what it
    /// wrote there for the fetch of the same snapshot.
    fn finished_prefetch(&mut self, report: PrefetchReport, what: &str) {
        tracing::info!(
            stage = "prefetch",
            index = report.id.0,
            term = report.id.1,
            downloaded = report.bytes,
            chunks = report.chunks,
            polls = report.polls,
            ended = ?report.ended,
            "{what}"
        );
        if report.ended.keeps_staging() {
            self.prefetched = Some((report.id, report.written));
        }
    }

    /// Stops the running prefetch, if any, and waits for it: before a fetch, which uses
    /// the same staging file, and when the role changes.
    async fn stop_prefetch(&mut self) {
        if let Some(running) = self.prefetch.take() {
            running.cancel.cancel();
            if let Ok(report) = running.task.await {
                self.finished_prefetch(
                    report,
                    "prefetch stopped (a fetch, a role change or shutdown)",
                );
            }
        }
    }

    /// The repository, created on the leader's first publish. (A cheap clone: the store
    /// handle is shared.)
    async fn repo_for_publish(&mut self) -> anyhow::Result<Repo> {
        match self.repo.clone() {
            Some(repo) => self.check_incarnation(&repo).await?,
            None => {
                let repo = match self.incarnation.gone() {
                    // Creating a repository now would make another incarnation.
                    Some(gone) => {
                        let opened = Repo::open_with(
                            self.store.clone(),
                            &self.config.cluster_id,
                            self.config.signing.clone(),
                        )
                        .await;
                        match opened {
                            Err(Error::NoRepository { .. }) => return Err(gone.into()),
                            other => other?,
                        }
                    }
                    None => {
                        Repo::open_or_create_with(
                            self.store.clone(),
                            &self.config.cluster_id,
                            self.config.layout,
                            self.config.signing.clone(),
                        )
                        .await?
                    }
                };
                self.incarnation.check(repo.descriptor())?;
                self.repo = Some(repo);
            }
        }
        Ok(self.repo.clone().expect("set above"))
    }

    /// Reads `repository.json` again and checks its incarnation: one small read per new
    /// snapshot, so that a repository re-created under this running sidecar is noticed
    /// before anything from it reaches the node.
    async fn check_incarnation(&mut self, repo: &Repo) -> anyhow::Result<()> {
        match repo.current_descriptor().await? {
            Some(descriptor) => self.incarnation.check(&descriptor)?,
            None => self.incarnation.missing()?,
        }
        Ok(())
    }

    /// Follower: hand the node the newest usable snapshot newer than its own.
    ///
    /// Candidates are the manifests newer than the node's snapshot, newest first, minus the
    /// quarantined ones and those beyond the node's committed index (not looked at: they
    /// may become valid later, and must not delay an older one). The walk stops at the
    /// first candidate the node already holds (staged) or has answered for, or that is
    /// handed over; a candidate whose failure is permanent for it is quarantined and the
    /// walk goes on at once.
    async fn follow(&mut self, status: &Status, cancel: &CancellationToken) -> anyhow::Result<()> {
        let mut list_now = false;
        if self.repo.is_none() {
            // Opening reads repository.json: a request, so only when a listing is due.
            if !self.schedule.take() {
                return Ok(());
            }
            list_now = true;
            let opened = Repo::open_with(
                self.store.clone(),
                &self.config.cluster_id,
                self.config.signing.clone(),
            )
            .await;
            match opened {
                Ok(repo) => {
                    self.incarnation.check(repo.descriptor())?;
                    self.repo = Some(repo);
                }
                // Nothing published yet: the leader's sidecar creates the repository.
                Err(Error::NoRepository { .. }) => {
                    self.incarnation.missing()?;
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
        let repo = self.repo.clone().expect("set above");
        let after = status.snapshot.map(|s| s.index);
        self.quarantine.refresh();
        self.quarantine.forget_through(after);
        self.metrics.quarantine_size(self.quarantine.len());
        let cached = self.listing.as_ref().and_then(|l| l.after(after));
        let listed = match cached {
            Some(cached) if !list_now && !self.schedule.take() => cached,
            _ => {
                let listed = repo.list_manifests(after).await?;
                self.health.store_reachable(true);
                self.listing = Some(Listing {
                    after,
                    entries: listed.clone(),
                });
                listed
            }
        };

        let now = chrono::Utc::now();
        let mut candidates: Vec<&ManifestEntry> = Vec::new();
        // What a fetch may resume later, most wanted first: a candidate beyond the committed
        // index today is one tomorrow, so its staging file stays.
        let mut wanted: Vec<(u64, u64)> = Vec::new();
        for entry in listed.iter().rev() {
            match self.quarantine.verdict(entry, now) {
                Verdict::Held => continue,
                Verdict::Retry(old) => {
                    tracing::info!(manifest = %entry.id, reason = %old.reason, "a quarantined manifest's retry time came; trying it again");
                    self.quarantine.remove(&entry.id);
                }
                Verdict::Clear => {}
            }
            wanted.push((entry.id.index, entry.id.term));
            if beyond_committed(status, &entry.id) {
                self.report_ahead(&entry.id, status);
                continue;
            }
            candidates.push(entry);
        }
        let newest = candidates.first().map(|e| e.id.index).max(after);
        self.metrics.follower_position(after, newest);
        self.health
            .lag(newest.map(|n| n.saturating_sub(after.unwrap_or(0))));

        for entry in candidates {
            let id = &entry.id;
            if node_holds(status, id) || self.still_answered(status, id) {
                break;
            }
            // Signature first: nothing a manifest says is believed before it verifies.
            let manifest = match repo.read_any_manifest(id).await {
                Ok(m) => m,
                Err(e) if vanished(&e) => {
                    self.schedule.wake();
                    continue;
                }
                Err(e) => match quarantine::Reason::of_error(&e) {
                    Some((reason, signature)) => {
                        self.quarantine_manifest(entry, reason, signature, &e.into());
                        continue;
                    }
                    None => return Err(e.into()),
                },
            };
            match self
                .hand_over(&repo, entry, &manifest, status, cancel)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) => match quarantine::Reason::of(&e) {
                    Some((reason, signature)) => {
                        self.metrics.fetch_failed(FailureReason::of(&e));
                        self.quarantine_manifest(entry, reason, signature, &e);
                    }
                    None => return Err(e),
                },
            }
        }
        if self.incoming_dirty {
            // A prefetch's staging file is what the next fetch resumes.
            let mut keep: Vec<(u64, u64)> =
                self.prefetch.as_ref().map(|p| p.id).into_iter().collect();
            keep.extend(wanted);
            self.clean_incoming(status, &keep);
        }
        self.start_prefetch(&repo, status);
        Ok(())
    }

    /// Fetches `manifest` into the node's incoming directory and hands it over. Returns an
    /// error for anything that went wrong, the node's refusal included (the caller tells
    /// what is permanent for the manifest from what is not).
    async fn hand_over(
        &mut self,
        repo: &Repo,
        entry: &ManifestEntry,
        manifest: &AnyManifest,
        status: &Status,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let id = &entry.id;
        self.check_incarnation(repo).await?;
        let started = Instant::now();
        let incoming = self.incoming_dir(status);
        // The prefetch writes into the staging file this fetch uses: it stops first.
        self.stop_prefetch().await;
        // Only what resumes this fetch stays.
        self.clean_incoming(status, &[(id.index, id.term)]);
        let snapshot_dir = self.snapshot_dir(status);
        let progress = self.supervisor.progress();
        let node = fetch::NodeAccess::of_socket(&self.node_config.hook_socket)?;
        let prefetched = self
            .prefetched
            .take()
            .filter(|(prefetched, _)| *prefetched == (id.index, id.term))
            .map(|(_, written)| written);
        let mut fetcher = Fetcher::new(repo, self.config.download.concurrency, &progress)
            .hand_over_to(node)
            .resumable(true)
            .trust_marked(self.distrusted != Some((id.index, id.term)));
        let report = match manifest {
            AnyManifest::Chunks(manifest) => {
                let mut sources =
                    fetch::local_sources(repo, &snapshot_dir, REUSE_LOCAL_SNAPSHOTS).await?;
                sources.extend(fetch::local_sources(repo, &incoming, 1).await?);
                if let Some(written) = prefetched {
                    fetcher = fetcher.prefetched(written);
                }
                tokio::select! {
                    // An abandoned fetch leaves only the hidden staging file, resumed next time.
                    _ = cancel.cancelled() => return Ok(()),
                    r = fetcher.fetch(manifest, &incoming, &sources) => r,
                }
            }
            AnyManifest::Packs(manifest) => {
                let source = fetch::packed_source(repo, &[&snapshot_dir, &incoming]).await?;
                if let Some(written) = prefetched {
                    fetcher = fetcher.prefetched(written);
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    r = fetcher.fetch_packed(manifest, &incoming, source.as_ref()) => r,
                }
            }
        }
        .with_context(|| format!("fetching snapshot {}", id.index))?;
        tracing::info!(
            stage = "fetch",
            index = report.index,
            bytes = report.size,
            downloaded = report.bytes_transferred,
            reused = report.bytes_reused,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "snapshot fetched and verified"
        );
        self.metrics.fetched(
            report.index,
            report.size,
            report.bytes_transferred,
            report.chunks_transferred,
            report.chunks_reused,
            report.elapsed,
        );
        // Until the node answers, its files are the node's to take: if it never does (it
        // died, it timed out), the next fetch of this snapshot resumes from them.
        self.incoming_dirty = true;
        let envelope = Snapshot::open(&report.meta)?.envelope;
        let saved = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = self.node.save_snapshot(envelope, &report.data, &report.sha256) => r,
        };
        let saved = match saved {
            Ok(saved) => saved,
            Err(HookError::Refused {
                code: snaprelay_contract::ipc::ErrorCode::ChecksumMismatch,
                message,
                ..
            }) if report.pending.as_ref().is_some_and(|p| p.refuted()) => {
                // The file was built from a marked local snapshot's bytes, copied unread:
                // those are what to doubt before the manifest. The source has lost its mark
                // (`refuted`), and the snapshot is fetched again (not quarantined) checking
                // every byte.
                self.release(&report, false);
                let source = report.copied_unchecked_from.clone().unwrap_or_default();
                tracing::warn!(index = id.index, path = %source.display(), node = %message, "the node found a file built from a marked local snapshot not to match; fetching it again, checking every local byte");
                self.distrusted = Some((id.index, id.term));
                self.schedule.wake();
                return Ok(());
            }
            Err(e @ HookError::Refused { code, .. }) => {
                // Answered: the files go, but a refusal that is not the snapshot's leaves
                // the data as the staging file, so the next attempt downloads nothing.
                let resume = !code.refuses_snapshot();
                self.release(&report, resume);
                return Err(anyhow::Error::new(e)
                    .context(format!("handing snapshot {} to the node", id.index)));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("handing snapshot {} to the node", id.index)))
            }
        };
        // The node moved the data file away if it kept it; what is left is ours to remove.
        self.release(&report, false);
        tracing::info!(
            stage = "adopt",
            index = report.index,
            outcome = ?saved.outcome,
            bytes = report.size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot handed to the node"
        );
        let outcome = format!("{:?}", saved.outcome).to_lowercase();
        self.metrics.adopted(id.index, &outcome);
        if saved.outcome == SaveOutcome::Adopted {
            // The node checked the file against the manifest (its whole sha256, or each
            // chunk it did not share with its last checked snapshot): the next fetch may
            // copy its bytes unread.
            if let Some(pending) = &report.pending {
                pending.adopted();
            }
            self.adopted_chunks = match manifest {
                AnyManifest::Chunks(m) => Some(Arc::new(m.unique_chunks())),
                AnyManifest::Packs(_) => None,
            };
            // The publisher's clock against this host's: NTP keeps them within milliseconds.
            let since = chrono::Utc::now() - manifest.created_at();
            self.metrics
                .propagated(since.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6);
        }
        self.report(format!("{outcome} {} (term {})", id.index, id.term));
        self.answered = match saved.outcome {
            SaveOutcome::Adopted => None,
            outcome => Some(Answered {
                id: id.clone(),
                outcome,
                seen: None,
            }),
        };
        Ok(())
    }

    /// Removes a handover's files once the node answered (see [`fetch::release`]).
    fn release(&mut self, report: &fetch::FetchReport, resume: bool) {
        match fetch::release(report, resume) {
            Ok(()) => self.incoming_dirty = false,
            Err(e) => {
                tracing::warn!(data = %report.data.display(), error = %e, "cannot remove a handed-over file; removing it later")
            }
        }
    }

    /// Whether the node's last `staged` or `stale` answer for `id` still holds: its
    /// snapshot and staged snapshot are what they were at the first poll after it. A node
    /// that restarts forgets what it staged (its status changes), and gets it again.
    fn still_answered(&mut self, status: &Status, id: &ManifestId) -> bool {
        let Some(answered) = &mut self.answered else {
            return false;
        };
        if answered.id != *id {
            return false;
        }
        if answered.holds(status) {
            return true;
        }
        tracing::info!(manifest = %id, answer = ?answered.outcome, "the node no longer holds a snapshot it was handed; handing it over again");
        self.answered = None;
        false
    }

    /// Says once per manifest that it is beyond what the node has committed.
    fn report_ahead(&mut self, id: &ManifestId, status: &Status) {
        if self.ahead.len() >= AHEAD_REPORTED {
            self.ahead.clear();
        }
        if self.ahead.insert(id.clone()) {
            tracing::info!(
                manifest = %id,
                committed = status.committed.map(|c| c.index),
                "not fetching a manifest beyond what the node has committed; it is looked at again once the node commits that far"
            );
        }
    }

    /// Quarantines a manifest whose failure is permanent for it, saying so once.
    fn quarantine_manifest(
        &mut self,
        entry: &ManifestEntry,
        reason: quarantine::Reason,
        signature: Option<crate::signing::Reason>,
        err: &anyhow::Error,
    ) {
        let error = crate::error::chain(err);
        let quarantined =
            self.quarantine
                .insert(entry, reason, signature, error.clone(), chrono::Utc::now());
        tracing::warn!(
            manifest = %entry.id,
            reason = reason.as_str(),
            signature = signature.map(|s| s.as_str()),
            retry_after = %quarantined.retry_after,
            error,
            "manifest quarantined: not fetched again before its retry time; trying the next candidate"
        );
        self.metrics.quarantined(reason, self.quarantine.len());
        if let Some(s) = signature {
            self.metrics.signature_failure(s);
        }
        if matches!(
            reason,
            quarantine::Reason::ChunkMissing
                | quarantine::Reason::ChunkCorrupt
                | quarantine::Reason::FileMismatch
        ) {
            self.metrics.verification_failure();
        }
    }

    /// Retention after a publish, in the same task, so GC never races this sidecar's own
    /// uploads. The snapshot just published (the node's current one) is pinned.
    async fn collect_garbage(
        &mut self,
        repo: &Repo,
        current: (u64, u64),
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let retention = Retention {
            keep_last: self.config.retention.keep_last,
            pinned: vec![current],
            grace: self.config.retention.grace,
        };
        tokio::select! {
            // Stopping between deletions leaves a valid repository (manifests go first).
            _ = cancel.cancelled() => Ok(()),
            r = gc::collect(repo, &retention, true, self.config.upload.concurrency) => {
                let report = r.context("collecting garbage")?;
                self.metrics.gc_done(crate::metrics::GcCounts {
                    manifests_deleted: report.manifests_deleted.len() as u64,
                    chunks_deleted: report.chunks_deleted,
                    bytes_deleted: report.bytes_deleted,
                    chunks_deferred: report.chunks_deferred,
                });
                for refused in &report.manifests_refused {
                    if let Some(reason) = refused.reason {
                        self.metrics.signature_failure(reason);
                    }
                }
                Ok(())
            }
        }
    }

    async fn trigger(&mut self) -> anyhow::Result<()> {
        let result = self.node.trigger_snapshot().await?;
        tracing::info!(queued = result.queued, "asked the node for a snapshot");
        Ok(())
    }
}

/// Whether `id` is beyond the node's committed index (a node that does not report it is
/// not second-guessed: it answers `not_committed` itself).
fn beyond_committed(status: &Status, id: &ManifestId) -> bool {
    status.committed.is_some_and(|c| id.index > c.index)
}

/// Whether the node holds, staged, `id` or a snapshot at least as new that it can adopt
/// (within its committed index): handing `id` over would change nothing.
fn node_holds(status: &Status, id: &ManifestId) -> bool {
    status.staged.is_some_and(|staged| {
        staged.index >= id.index && status.committed.is_none_or(|c| staged.index <= c.index)
    })
}

/// A manifest deleted since it was listed (a GC): not a failure, just not a candidate.
fn vanished(err: &Error) -> bool {
    matches!(
        err,
        Error::Store {
            source: object_store::Error::NotFound { .. },
            ..
        }
    )
}

/// The `daemon.stuck_after` in force: the configured one, or twice the longest a single
/// wait may take without progress (a hook request, or a store request with its retries).
fn stuck_after(config: &Config, node: &NodeConfig) -> Duration {
    config.daemon.stuck_after.unwrap_or_else(|| {
        let store = config.store.request_timeout + config.store.retry_timeout;
        node.hook_timeout.max(store) * 2
    })
}

/// Says at start-up whether what this sidecar adopts is authenticated.
fn log_signing(keyring: &Keyring) {
    let signer = keyring
        .signer()
        .map(|s| s.id().to_hex())
        .unwrap_or_else(|| "none".into());
    let trusted_keys = keyring.trusted().len();
    if !keyring.is_configured() {
        tracing::warn!("signing is not configured: manifests are NOT authenticated, and anyone who can write to the store can change what followers adopt");
    } else if keyring.requires() {
        tracing::info!(signer, trusted_keys, "manifest signatures are required");
    } else {
        tracing::warn!(signer, trusted_keys, "manifest signatures are checked but NOT required (signing.require = false): a manifest that fails the check is used after a warning");
    }
}

/// Errors that retrying cannot fix: the operator must change the config or the store.
fn is_fatal(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.is::<IncarnationError>()
            || matches!(
                c.downcast_ref::<Error>(),
                Some(
                    Error::ClusterMismatch { .. }
                        | Error::InvalidRepository { .. }
                        | Error::Config(_)
                )
            )
    })
}

/// Whether a change of `latest` (now `latest`, naming `before` last time) is a reason to
/// list: it names a manifest it did not name before and that the last listing lacks, or it
/// cannot be read. A change that only announces a publish in progress is not.
fn worth_listing(latest: Option<&Latest>, before: Option<&str>, listing: Option<&Listing>) -> bool {
    let Some(latest) = latest else {
        return true;
    };
    if before == Some(latest.manifest.as_str()) {
        return false;
    }
    let listed = ManifestId::parse(&latest.manifest)
        .is_some_and(|id| listing.is_some_and(|l| l.entries.iter().any(|e| e.id == id)));
    !listed
}

/// The report of the running prefetch once it ends (`None` if its task panicked).
async fn prefetch_done(prefetch: &mut Option<RunningPrefetch>) -> Option<PrefetchReport> {
    match prefetch {
        Some(p) => (&mut p.task).await.ok(),
        None => std::future::pending().await,
    }
}

async fn changed(watcher: &mut Option<DirWatcher>) {
    match watcher {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Exponential backoff with jitter, from `base` up to `max`.
struct Backoff {
    base: Duration,
    max: Duration,
    next: Duration,
    failures: u32,
    since: Option<Instant>,
}

impl Backoff {
    fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            next: base,
            failures: 0,
            since: None,
        }
    }

    /// Records a failure; returns how long to wait (±50% jitter, so that sidecars that
    /// failed together do not retry together).
    fn failed(&mut self) -> Duration {
        self.failures += 1;
        self.since.get_or_insert_with(Instant::now);
        let wait = self
            .next
            .mul_f64(rand::rng().random_range(0.5..1.5))
            .min(self.max);
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// Records a success; returns the failures it ends, if any.
    fn reset(&mut self) -> Option<(u32, Duration)> {
        self.next = self.base;
        let failures = std::mem::take(&mut self.failures);
        self.since.take().map(|since| (failures, since.elapsed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(snapshot: Option<u64>, staged: Option<u64>, committed: Option<u64>) -> Status {
        let id = |index| LogIdRef { term: 2, index };
        Status {
            node_id: 2,
            role: Role::Follower,
            leader: Some(1),
            term: 2,
            last_applied: committed.map(id),
            snapshot: snapshot.map(id),
            purged: None,
            snapshot_dir: "/s".into(),
            incoming_dir: "/s/.incoming".into(),
            committed: committed.map(id),
            staged: staged.map(id),
        }
    }

    fn manifest(index: u64) -> ManifestId {
        ManifestId {
            index,
            term: 2,
            sha_prefix: "0123456789abcdef".into(),
        }
    }

    #[test]
    fn far_future_manifests_are_passed_over_and_staged_ones_stop_the_walk_only_if_adoptable() {
        let s = status(Some(100), None, Some(150));
        assert!(!beyond_committed(&s, &manifest(150)));
        assert!(beyond_committed(&s, &manifest(1_000_000_000_000)));
        // A node that does not report its committed index answers for itself.
        assert!(!beyond_committed(
            &status(Some(100), None, None),
            &manifest(1 << 40)
        ));

        assert!(!node_holds(&s, &manifest(120)));
        let staged = status(Some(100), Some(120), Some(150));
        assert!(node_holds(&staged, &manifest(120)));
        assert!(
            node_holds(&staged, &manifest(110)),
            "an older one is no use"
        );
        assert!(
            !node_holds(&staged, &manifest(130)),
            "a newer one is handed over"
        );
        // A staged snapshot beyond what the node committed (an old node staged a forgery)
        // blocks nothing.
        let stuck = status(Some(100), Some(1 << 40), Some(150));
        assert!(!node_holds(&stuck, &manifest(140)));
    }

    /// Finding 5: the node answered `staged`, then restarted and forgot it. Its status no
    /// longer shows it: the answer no longer holds, so the sidecar hands it over again.
    #[test]
    fn an_answer_holds_until_the_nodes_status_changes() {
        let mut staged = Answered {
            id: manifest(120),
            outcome: SaveOutcome::Staged,
            seen: None,
        };
        assert!(staged.holds(&status(Some(100), Some(120), Some(150))));
        assert!(staged.holds(&status(Some(100), Some(120), Some(160))));
        // Restarted: nothing staged any more.
        assert!(!staged.holds(&status(Some(100), None, Some(100))));

        // A node that reports nothing staged (it predates the field) is not asked again
        // while its snapshot stays where it was.
        let mut old_node = Answered {
            id: manifest(120),
            outcome: SaveOutcome::Staged,
            seen: None,
        };
        assert!(old_node.holds(&status(Some(100), None, None)));
        assert!(old_node.holds(&status(Some(100), None, None)));
        assert!(!old_node.holds(&status(Some(90), None, None)));
    }

    /// The store's bill of an idle follower, over an hour of tokio's paused clock: the real
    /// store probe (conditional GETs of `latest`, which never changes) and the follower's
    /// listing schedule, polled every `poll_interval` and woken by the probe, exactly as in
    /// `run`, with the default intervals. Deterministic: the clock only moves when every
    /// task waits.
    #[tokio::test(start_paused = true)]
    async fn an_idle_follower_costs_at_most_600_request_units_an_hour() {
        use crate::config::DaemonConfig;
        use crate::counting::Kind;
        use crate::store::{StoreSettings, StoreUrl};

        let defaults = DaemonConfig::default();
        let requests = Requests::new();
        let opened = Store::open(&StoreSettings::for_url(StoreUrl::Memory)).unwrap();
        let store = Store {
            backend: Arc::new(CountingStore::new(opened.backend.clone(), requests.clone())),
            ..opened
        };
        let params = crate::chunk::ChunkParams::new(4096, 16384, 65536).unwrap();
        let repo = Repo::open_or_create(store.clone(), "c", params)
            .await
            .unwrap();
        crate::latest::write(&store, "c", "00000000000000000007-1-0123456789abcdef")
            .await
            .unwrap();
        let setup = Kind::ALL.map(|k| requests.count(k));

        let cancel = CancellationToken::new();
        let changed = watch::channel(None).0;
        let mut latest = changed.subscribe();
        let probe = tokio::spawn(
            StoreProbe {
                store: store.clone(),
                health: Health::new(Liveness::new(Duration::from_secs(600)), None),
                metrics: Metrics::new(),
                interval: defaults.store_probe_interval,
                timeout: defaults.store_probe_timeout,
                changed,
                hints: Arc::new(crate::hint::Hints::new()),
            }
            .run(cancel.clone()),
        );
        let mut schedule = ListSchedule::new(defaults.list_interval);
        let mut poll = tokio::time::interval(defaults.poll_interval);
        // Off the probe's and the schedule's ticks, so that no tick races the end.
        let end = tokio::time::Instant::now() + Duration::from_secs(3600 + 5);
        while tokio::time::Instant::now() < end {
            tokio::select! {
                _ = poll.tick() => {}
                Ok(()) = latest.changed() => {
                    latest.borrow_and_update();
                    schedule.wake()
                }
            }
            if schedule.take() {
                repo.list_manifests(None).await.unwrap();
            }
        }
        cancel.cancel();
        probe.await.unwrap();

        let count = |k: Kind| requests.count(k) - setup[k as usize];
        let units: u64 = Kind::ALL.iter().map(|k| count(*k) * k.units()).sum();
        // 361 probes (at 0 s, 10 s, ... 3600 s) and 14 listings (two at start: the first
        // poll, and the first look's change; then every 5 minutes, the last at 3600 s).
        assert_eq!(count(Kind::Get), 361);
        assert_eq!(count(Kind::List), 14);
        assert_eq!(units, 361 + 14 * 12);
        assert!(units <= 600, "{units} request units in an idle hour");
    }

    #[test]
    fn only_a_new_manifest_in_latest_is_worth_a_listing() {
        let latest = |index: u64, publishing: Option<u64>| Latest {
            cluster_id: "c".into(),
            manifest: manifest(index).file_name(),
            written_at: chrono::Utc::now(),
            publishing: publishing.map(|index| crate::latest::Publishing { index, term: 2 }),
        };
        let listing = Listing {
            after: Some(10),
            entries: vec![ManifestEntry {
                id: manifest(12),
                stored_size: 1,
                last_modified: None,
            }],
        };
        let seen = manifest(11).file_name();
        // Unreadable, or the first look: list.
        assert!(worth_listing(None, Some(&seen), Some(&listing)));
        assert!(worth_listing(Some(&latest(11, None)), None, None));
        // A publish starts: same manifest, nothing to list; the prefetch starts instead.
        assert!(!worth_listing(
            Some(&latest(11, Some(13))),
            Some(&seen),
            Some(&listing)
        ));
        // A new manifest, unless the listing (woken by the prefetch's end) has it already.
        assert!(worth_listing(
            Some(&latest(13, None)),
            Some(&seen),
            Some(&listing)
        ));
        assert!(!worth_listing(
            Some(&latest(12, None)),
            Some(&seen),
            Some(&listing)
        ));
    }

    #[test]
    fn a_listing_serves_later_polls_only_for_a_node_that_moved_forward() {
        let entry = |index| ManifestEntry {
            id: manifest(index),
            stored_size: 1,
            last_modified: None,
        };
        let listing = Listing {
            after: Some(10),
            entries: vec![entry(11), entry(12), entry(13)],
        };
        let ids = |l: Option<Vec<ManifestEntry>>| {
            l.map(|l| l.into_iter().map(|e| e.id.index).collect::<Vec<_>>())
        };
        assert_eq!(ids(listing.after(Some(10))), Some(vec![11, 12, 13]));
        assert_eq!(ids(listing.after(Some(12))), Some(vec![13]));
        assert_eq!(
            ids(listing.after(Some(9))),
            None,
            "older than what was listed"
        );
        assert_eq!(ids(listing.after(None)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn listings_happen_when_woken_or_when_the_interval_passed() {
        let mut schedule = ListSchedule::new(Duration::from_secs(300));
        assert!(schedule.take(), "the first poll lists");
        assert!(!schedule.take());
        tokio::time::advance(Duration::from_secs(299)).await;
        assert!(!schedule.take());
        schedule.wake();
        assert!(schedule.take());
        assert!(!schedule.take(), "a wake-up is used once");
        tokio::time::advance(Duration::from_secs(300)).await;
        assert!(schedule.take());
    }

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let waits: Vec<Duration> = (0..6).map(|_| b.failed()).collect();
        assert!(waits[0] >= Duration::from_millis(500) && waits[0] <= Duration::from_millis(1500));
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(8)));
        assert!(waits[5] >= Duration::from_secs(4), "{waits:?}");
        let (failures, _) = b.reset().unwrap();
        assert_eq!(failures, 6);
        assert!(b.reset().is_none());
        assert!(b.failed() <= Duration::from_millis(1500));
    }
}
