//! `snaprelay run`: the sidecar loop. It learns the node's role from the hook's `status`
//! (polled), and
//!
//! - as leader, publishes every committed snapshot in the node's directory that is newer
//!   than what the store holds (file events plus periodic rescans; optionally asks the node
//!   to build one every `trigger_interval`);
//! - as follower or learner, fetches the newest manifest that is newer than the node's
//!   snapshot into the node's incoming directory, verified, and hands it over with
//!   `save_snapshot`. A manifest that cannot be used (it fails the signature check, or is
//!   invalid, misnamed or of another cluster) is quarantined for the life of the process:
//!   never read or fetched again, and the next older candidate is tried at once, so a
//!   planted manifest never delays a good one.
//!
//! Every step is safe to abandon at any await (the manifest is the store's commit point; a
//! fetch's staging file is hidden and resumed next time), so shutdown simply stops waiting.
//! Failures are retried with exponential backoff and jitter; the loop never exits on a
//! transient error. It does exit on a repository re-created under it (another incarnation,
//! see [`crate::incarnation`]): only the operator can decide to follow that one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, NodeConfig};
use crate::error::Error;
use crate::error::FailureReason;
use crate::fetch::{self, Fetcher};
use crate::gc::{self, Retention};
use crate::health::Health;
use crate::incarnation::{Incarnation, IncarnationError};
use crate::ipc::{Role, Status};
use crate::manifest::Manifest;
use crate::metrics::Metrics;
use crate::node::HookClient;
use crate::publish::Publisher;
use crate::repo::{ManifestId, Repo};
use crate::signing::Keyring;
use crate::snapdir::{self, Snapshot};
use crate::store::Store;
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

pub struct Daemon {
    config: Config,
    node_config: NodeConfig,
    node: HookClient,
    store: Store,
    repo: Option<Repo>,
    role: Option<Role>,
    watcher: Option<DirWatcher>,
    /// Leader: newest log id (index, term) known to be in the store.
    published: Option<(u64, u64)>,
    /// Follower: the manifest last handed to the node, not to be fetched again.
    handed: Option<ManifestId>,
    /// Follower: manifests refused for good.
    quarantine: Quarantine,
    backoff: Backoff,
    supervisor: Supervisor,
    metrics: Metrics,
    health: Health,
    /// What the operator sees in `systemctl status`.
    last_event: String,
    state: DaemonState,
    /// The repository incarnation this sidecar follows (see `incarnation`).
    incarnation: Incarnation,
}

impl Daemon {
    pub fn new(config: Config) -> anyhow::Result<Daemon> {
        let node_config = config
            .node
            .clone()
            .context("[node] with hook_socket is required for `run`")?;
        let node = HookClient::new(&node_config.hook_socket, node_config.hook_timeout);
        let store = Store::open(&config.store)?;
        let incarnation = Incarnation::load(
            config.daemon.state_dir.as_deref(),
            &config.store.url.to_string(),
        )?;
        let backoff = Backoff::new(config.daemon.poll_interval, config.daemon.max_backoff);
        // A step may legitimately wait out a hook timeout and a full backoff; longer than
        // that without progress (transfers report progress per chunk) means stuck.
        let stuck_after = (node_config.hook_timeout + config.daemon.max_backoff) * 2;
        let health = Health::new(stuck_after, config.metrics.max_lag);
        Ok(Daemon {
            config,
            node_config,
            node,
            store,
            repo: None,
            role: None,
            watcher: None,
            published: None,
            handed: None,
            quarantine: Quarantine::default(),
            backoff,
            supervisor: Supervisor::from_env(health.clone()),
            metrics: Metrics::new(),
            health,
            last_event: String::new(),
            state: DaemonState {
                pid: std::process::id(),
                ..DaemonState::default()
            },
            incarnation,
        })
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
        let watchdog = self.supervisor.spawn_watchdog(cancel.clone());
        let server = match self.config.metrics.listen {
            Some(listen) => {
                let listener = crate::http::bind(listen).await?;
                tracing::info!(%listen, "serving /metrics, /healthz and /readyz");
                Some(tokio::spawn(crate::http::serve(
                    listener,
                    self.metrics.clone(),
                    self.health.clone(),
                    cancel.clone().cancelled_owned(),
                )))
            }
            None => None,
        };
        if !self.wait_ready(&cancel).await? {
            self.supervisor.stopping();
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
        loop {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = poll.tick() => self.step(&cancel).await,
                _ = changed(&mut self.watcher) => self.publish_pending(&cancel).await,
                _ = rescan.tick(), if self.role == Some(Role::Leader) => self.publish_pending(&cancel).await,
                _ = tick(&mut trigger), if self.role == Some(Role::Leader) => self.trigger().await,
            };
            // Finishing a step, even a failed one, shows the loop is not stuck.
            self.supervisor.alive();
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
        if let Some(w) = watchdog {
            w.abort();
        }
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
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                r = probe => r,
            };
            self.supervisor.alive();
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
        let corrupt = err.chain().any(|c| {
            matches!(
                c.downcast_ref::<Error>(),
                Some(
                    Error::ChunkCorrupt { .. }
                        | Error::FileCorrupt { .. }
                        | Error::ChunkMissing { .. }
                )
            )
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
        if self.role != Some(status.role) {
            tracing::info!(role = %status.role, node_id = status.node_id, term = status.term, "node role");
            self.role = Some(status.role);
            self.metrics.role(&status.role.to_string());
            let event = std::mem::take(&mut self.last_event);
            self.report(event);
            self.published = None;
            self.handed = None;
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
        // A newer manifest (from a previous leader) supersedes this one: nothing to do. Only
        // one that verifies: a forgery must not stop the leader from publishing.
        if let (Some(id), _) = repo
            .newest_verified(Some(log_id.0.saturating_sub(1)))
            .await?
        {
            if (id.index, id.term) >= log_id {
                self.published = Some((id.index, id.term));
                return Ok(());
            }
        }
        let snapshot = newest.clone();
        let progress = self.supervisor.progress();
        let publisher = Publisher::new(
            &repo,
            self.config.upload.concurrency,
            self.config.node_id,
            &progress,
        );
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
        }
        self.health.store_reachable(true);
        self.published = Some(log_id);
        self.report(format!("published {} (term {})", log_id.0, log_id.1));
        if self.config.retention.gc_after_publish {
            self.collect_garbage(&repo, log_id, cancel).await?;
        }
        Ok(())
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
                            self.config.chunking,
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

    /// Follower: fetch and hand over the newest snapshot newer than the node's.
    async fn follow(&mut self, status: &Status, cancel: &CancellationToken) -> anyhow::Result<()> {
        if self.repo.is_none() {
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
        let listed = repo.list_manifests(after).await?;
        self.health.store_reachable(true);
        self.quarantine.forget_through(after);
        // The newest usable candidate, newest first. Each is read (signature first) before
        // any of it is believed or any chunk fetched.
        let mut chosen: Option<(ManifestId, Manifest)> = None;
        let mut newest_index = after;
        for entry in listed.iter().rev() {
            let id = &entry.id;
            if self.quarantine.contains(id) {
                continue;
            }
            if self.handed.as_ref() == Some(id) {
                newest_index = newest_index.max(Some(id.index));
                break;
            }
            match repo.read_manifest(id).await {
                Ok(m) => {
                    newest_index = newest_index.max(Some(id.index));
                    chosen = Some((id.clone(), m));
                    break;
                }
                Err(e) if Quarantine::applies(&e) => self.refuse(id, &e),
                Err(e) => return Err(e.into()),
            }
        }
        self.metrics.follower_position(after, newest_index);
        self.health
            .lag(newest_index.map(|n| n.saturating_sub(after.unwrap_or(0))));
        let Some((id, manifest)) = chosen else {
            return Ok(());
        };
        let repo = &repo;
        self.check_incarnation(repo).await?;
        let started = Instant::now();
        let incoming = self.incoming_dir(status);
        let snapshot_dir = self.snapshot_dir(status);
        let mut sources = fetch::local_sources(repo, &snapshot_dir, REUSE_LOCAL_SNAPSHOTS).await?;
        sources.extend(fetch::local_sources(repo, &incoming, 1).await?);
        let progress = self.supervisor.progress();
        let node = fetch::NodeAccess::of_socket(&self.node_config.hook_socket)?;
        let fetcher =
            Fetcher::new(repo, self.config.download.concurrency, &progress).hand_over_to(node);
        let report = tokio::select! {
            // An abandoned fetch leaves only the hidden staging file, resumed next time.
            _ = cancel.cancelled() => return Ok(()),
            r = fetcher.fetch(&manifest, &incoming, &sources) => r.with_context(|| format!("fetching snapshot {}", id.index))?,
        };
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
        let envelope = Snapshot::open(&report.meta)?.envelope;
        let saved = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = self.node.save_snapshot(envelope, &report.data, &report.sha256) => r?,
        };
        // The node moved the data file away if it kept it; what is left is ours to remove.
        let _ = std::fs::remove_file(&report.meta);
        let _ = std::fs::remove_file(&report.data);
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
        self.report(format!("{outcome} {} (term {})", id.index, id.term));
        self.handed = Some(id);
        Ok(())
    }

    /// Follower: quarantines a manifest that cannot be used, saying so once.
    fn refuse(&mut self, id: &ManifestId, err: &Error) {
        let signature = match err {
            Error::Unauthenticated { refusal, .. } => Some(refusal.reason),
            _ => None,
        };
        let reason = signature.map_or("invalid", |r| r.as_str());
        if self.quarantine.insert(id.clone(), reason) {
            tracing::warn!(manifest = %id, reason, error = %err, "manifest quarantined: it will not be fetched; trying the next candidate");
            if let Some(r) = signature {
                self.metrics.signature_failure(r);
            }
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

/// Follower: the manifests this process never reads or fetches again, and why. Minimal and
/// in memory; entries at or below the node's snapshot are forgotten, as they are no longer
/// candidates.
#[derive(Debug, Default)]
struct Quarantine {
    refused: HashMap<ManifestId, &'static str>,
}

impl Quarantine {
    /// Whether `err` from reading a manifest is a property of that manifest, permanent for
    /// it: quarantine it and move on (anything else, e.g. the store not answering, is
    /// retried).
    fn applies(err: &Error) -> bool {
        matches!(
            err,
            Error::Unauthenticated { .. }
                | Error::InvalidManifest { .. }
                | Error::MisnamedManifest { .. }
                | Error::ClusterMismatch { .. }
                | Error::ObjectTooLarge { .. }
        )
    }

    fn contains(&self, id: &ManifestId) -> bool {
        self.refused.contains_key(id)
    }

    /// Returns whether `id` is new here.
    fn insert(&mut self, id: ManifestId, reason: &'static str) -> bool {
        self.refused.insert(id, reason).is_none()
    }

    fn forget_through(&mut self, index: Option<u64>) {
        if let Some(index) = index {
            self.refused.retain(|id, _| id.index > index);
        }
    }
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
