//! [`SnapshotStore`]: the snapshot side of an openraft state machine, done once for every
//! application. It wraps the application's state ([`SnapshotApp`]: apply entries, copy the
//! state, encode it into a writer, decode it from a reader, restore a decoded copy) and is
//! itself the `RaftStateMachine` openraft runs, and the [`AdoptSnapshot`] the hook stages
//! into. It owns all the bookkeeping and every check, so an integrator cannot skip one:
//!
//! - **current**: the snapshot `get_current_snapshot` serves (envelope → openraft's
//!   `SnapshotMeta`), tracked across builds that openraft runs on a task of their own (a
//!   build that finishes after an install overtook it does not move it back);
//! - **staged**: the leader's snapshot handed over by the sidecar, validated
//!   ([`SnapshotApp::decode`], and its state must be at its label) before it is staged, and
//!   removed once obsolete; a newer valid one replaces it;
//! - **the build decision** ([`BuildPolicy`]): adopt the staged snapshot, build, or defer;
//! - **the adopt builder**: commits the staged file (`commit_file`), reopens it and returns it
//!   with the leader's meta;
//! - **replicated installs** (`install_snapshot`): decoded, checked against the meta,
//!   committed into the directory, restored;
//! - **startup**: the newest snapshot whose sha256, label and content check out is loaded,
//!   bad ones are moved aside ([`SnapshotDir::newest_valid`]).
//!
//! The hook's own checks (sha256, envelope against `raft_meta`, log matching) run in
//! [`crate::RaftNode`], before [`AdoptSnapshot::force_save_snapshot`] is called.

use std::fmt::Debug;
use std::fs::File;
use std::future::Future;
use std::io::{self, Read, Seek, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::Stream;
use openraft::alias::{
    CommittedLeaderIdOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf,
};
use openraft::storage::{
    EntryResponder, RaftLogReader, RaftSnapshotBuilder, RaftStateMachine, Snapshot,
};
use openraft::{OptionalSend, Raft, RaftTypeConfig};
use serde::de::DeserializeOwned;
use serde::Serialize;
use snaprelay_contract::ipc::LogIdRef;

use crate::adopt::{AdoptSnapshot, Incoming, StageOutcome};
use crate::decision::{is_newer, BuildDecision, BuildInputs, BuildPolicy};
use crate::raft::{log_id_ref, CommittedTerm, LeaderFlag, RaftNode};
use crate::server::{HookConfig, HookError, HookServer};
use crate::snapshot_dir::SnapshotDir;
use crate::verify::Refusal;

/// What an application supplies to a [`SnapshotStore`]: its state machine proper, and how
/// a copy of its state becomes bytes and back.
///
/// The snapshot bytes must be a pure function of the applied log prefix, the same on every
/// node (no node-local fields, deterministic map order): that is what lets a follower adopt
/// its leader's file instead of building its own.
pub trait SnapshotApp<C: RaftTypeConfig>: Send + Sync + 'static {
    /// A copy of the state as a snapshot holds it, including the last applied log id and
    /// membership.
    type State: Send + Sync + 'static;

    /// openraft's `applied_state`: the last applied log id and membership.
    fn applied_state(&self) -> (Option<LogIdOf<C>>, StoredMembershipOf<C>);

    /// openraft's `apply`: apply the entries in order and answer each responder.
    fn apply<S>(&mut self, entries: S) -> impl Future<Output = io::Result<()>> + Send
    where
        S: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend;

    /// A copy of the current state, for a build that runs while applying goes on.
    fn snapshot(&self) -> Self::State;

    /// Makes a decoded snapshot the state (replicated install, startup).
    fn restore(&mut self, state: Self::State);

    /// The last applied log id and membership a copy holds (the snapshot's meta).
    fn applied(state: &Self::State) -> (Option<LogIdOf<C>>, StoredMembershipOf<C>);

    /// Writes a copy as the snapshot's bytes.
    fn encode(state: &Self::State, out: &mut dyn Write) -> io::Result<()>;

    /// Reads a snapshot's bytes back. Anything the sidecar hands over is decoded before it
    /// can become current, so this is the application's validation: refuse what it cannot
    /// use.
    fn decode(input: &mut dyn Read) -> io::Result<Self::State>;

    /// Checks a snapshot's bytes without keeping the state, and answers the log id the
    /// snapshot holds the state at: the validation of a snapshot the sidecar hands over,
    /// before it can be staged. It runs on every adopted snapshot, beside the sha256 pass,
    /// so it is on the path from the leader's snapshot to the follower's.
    ///
    /// It must refuse whatever [`SnapshotApp::decode`] would refuse: a staged snapshot is
    /// decoded later (a restart loads it, a lagging follower is sent it). The default
    /// decodes and drops the state; an application whose state is costly to build can check
    /// the structure instead (the kv example checks its lines of JSON one at a time without
    /// building the map, in memory bounded by its longest entry).
    fn check(input: &mut dyn Read) -> io::Result<Option<LogIdOf<C>>> {
        let state = Self::decode(input)?;
        Ok(Self::applied(&state).0)
    }
}

/// A snapshot's data: its file, opened (reads keep working if the file is pruned
/// meanwhile), and its path (an install renames it).
#[derive(Debug)]
pub struct SnapshotFile {
    pub path: PathBuf,
    pub file: File,
}

impl SnapshotFile {
    pub fn open(path: &Path) -> io::Result<SnapshotFile> {
        Ok(SnapshotFile {
            path: path.to_owned(),
            file: File::open(path)?,
        })
    }

    /// The whole file (blocking).
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        let mut file = &self.file;
        file.rewind()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(bytes)
    }
}

/// How this node got its snapshots (for the application's metrics).
#[derive(Debug, Default)]
pub struct SnapshotCounters {
    pub built_locally: AtomicU64,
    pub adopted: AtomicU64,
    pub installed: AtomicU64,
}

struct Current<C: RaftTypeConfig> {
    meta: SnapshotMetaOf<C>,
    data_path: PathBuf,
}

/// A leader's snapshot handed over by the sidecar, validated, waiting for a build.
struct Staged<C: RaftTypeConfig> {
    log_id: LogIdRef,
    meta: SnapshotMetaOf<C>,
    raft_meta: serde_json::Value,
    sha256: String,
    path: PathBuf,
}

/// Current and staged; shared with builders, which openraft runs on a task of their own.
struct Snapshots<C: RaftTypeConfig> {
    current: Option<Current<C>>,
    staged: Option<Staged<C>>,
}

/// What the application reads of the store: the snapshot directory, the current snapshot,
/// the counters. Cheap to clone.
pub struct StoreHandle<C: RaftTypeConfig> {
    dir: SnapshotDir,
    leader: LeaderFlag,
    shared: Arc<Mutex<Snapshots<C>>>,
    counters: Arc<SnapshotCounters>,
}

impl<C: RaftTypeConfig> Clone for StoreHandle<C> {
    fn clone(&self) -> Self {
        StoreHandle {
            dir: self.dir.clone(),
            leader: self.leader.clone(),
            shared: self.shared.clone(),
            counters: self.counters.clone(),
        }
    }
}

impl<C: RaftTypeConfig> StoreHandle<C> {
    pub fn dir(&self) -> &SnapshotDir {
        &self.dir
    }

    /// The flag the build decision reads; [`LeaderFlag::track`] the `Raft` with it (done by
    /// [`crate::serve_hook`]).
    pub fn leader_flag(&self) -> &LeaderFlag {
        &self.leader
    }

    pub fn counters(&self) -> &SnapshotCounters {
        &self.counters
    }

    /// The data file of the current snapshot.
    pub fn current_snapshot_path(&self) -> Option<PathBuf> {
        lock(&self.shared)
            .current
            .as_ref()
            .map(|c| c.data_path.clone())
    }
}

// The lock guards plain data that every writer leaves consistent before it could panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs blocking file work off the async reactor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

/// Runs a long in-memory step (copying the state) on the current task, telling a
/// multi-threaded runtime to move its other tasks elsewhere meanwhile (heartbeats go on).
fn off_reactor<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// The snapshot side of a state machine, around the application's [`SnapshotApp`]. Give it
/// to `Raft::new` as the state machine.
pub struct SnapshotStore<C: RaftTypeConfig, A> {
    app: A,
    handle: StoreHandle<C>,
    policy: BuildPolicy,
    /// Committed snapshots kept in the directory (the newest is current).
    keep: usize,
}

/// Options of a [`SnapshotStore`].
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// A follower builds its own snapshot once this many applied logs are not covered by
    /// one (the sidecar is presumably down). Set it a few times above openraft's
    /// `SnapshotPolicy::LogsSinceLast`.
    pub defer_limit: u64,
    /// Committed snapshots kept in the directory (at least 1).
    pub keep_snapshots: usize,
}

impl<C, A> SnapshotStore<C, A>
where
    C: RaftTypeConfig,
    A: SnapshotApp<C>,
    SnapshotMetaOf<C>: Serialize + DeserializeOwned,
    CommittedLeaderIdOf<C>: CommittedTerm,
{
    /// Opens the store on `dir` around `app`: removes what an interrupted run left (staged
    /// and temp files), loads the newest valid snapshot into `app`, moving bad ones aside.
    /// Blocking (decodes the snapshot).
    pub fn open(
        dir: SnapshotDir,
        mut app: A,
        options: StoreOptions,
    ) -> io::Result<SnapshotStore<C, A>> {
        let leftovers = dir.remove_leftovers()?;
        if leftovers > 0 {
            tracing::info!(leftovers, "removed temp and staged files of a previous run");
        }
        let loaded = dir.newest_valid(|snapshot, data| {
            let named = LogIdRef {
                term: snapshot.envelope.last_log_term,
                index: snapshot.envelope.last_log_index,
            };
            let meta: SnapshotMetaOf<C> =
                serde_json::from_value(snapshot.envelope.raft_meta.clone()).map_err(|e| {
                    format!("raft_meta is not this application's SnapshotMeta: {e}")
                })?;
            let meta_id = meta.last_log_id.as_ref().map(log_id_ref);
            if meta_id != Some(named) {
                return Err(format!(
                    "its envelope says {named}, its raft_meta {meta_id:?}"
                ));
            }
            let state = decode_at::<C, A>(data, named).map_err(|e| e.to_string())?;
            Ok((meta, state))
        })?;
        let mut current = None;
        if let Some((snapshot, (meta, state))) = loaded {
            tracing::info!(snapshot = %snapshot.meta_path.display(), "loaded the newest snapshot");
            app.restore(state);
            current = Some(Current {
                meta,
                data_path: snapshot.data_path,
            });
        }
        Ok(SnapshotStore {
            app,
            handle: StoreHandle {
                dir,
                leader: LeaderFlag::new(),
                shared: Arc::new(Mutex::new(Snapshots {
                    current,
                    staged: None,
                })),
                counters: Arc::default(),
            },
            policy: BuildPolicy::new(options.defer_limit),
            keep: options.keep_snapshots.max(1),
        })
    }

    pub fn handle(&self) -> StoreHandle<C> {
        self.handle.clone()
    }

    pub fn app(&self) -> &A {
        &self.app
    }

    fn builder(&self, job: Job<C, A>) -> StoreBuilder<C, A> {
        StoreBuilder {
            job: Some(job),
            handle: self.handle.clone(),
            keep: self.keep,
            _app: PhantomData,
        }
    }
}

/// Decodes a snapshot and checks that its state is at `label`.
fn decode_at<C, A>(data: &mut dyn Read, label: LogIdRef) -> io::Result<A::State>
where
    C: RaftTypeConfig,
    A: SnapshotApp<C>,
    CommittedLeaderIdOf<C>: CommittedTerm,
{
    let state = A::decode(data)?;
    check_label(A::applied(&state).0.as_ref().map(log_id_ref), label)?;
    Ok(state)
}

/// That a snapshot named `label` holds the state at `label`.
fn check_label(at: Option<LogIdRef>, label: LogIdRef) -> io::Result<()> {
    if at != Some(label) {
        let at = at.map_or("no log id".to_owned(), |a| a.to_string());
        return Err(invalid(format!(
            "it holds the state at {at}, not at {label}"
        )));
    }
    Ok(())
}

fn current_log_id<C>(snapshots: &Snapshots<C>) -> Option<LogIdRef>
where
    C: RaftTypeConfig,
    CommittedLeaderIdOf<C>: CommittedTerm,
{
    snapshots
        .current
        .as_ref()
        .and_then(|c| c.meta.last_log_id.as_ref())
        .map(log_id_ref)
}

/// Drops the staged snapshot if the current one is as new; returns its file to remove.
fn take_obsolete_staged<C>(snapshots: &mut Snapshots<C>) -> Option<PathBuf>
where
    C: RaftTypeConfig,
    CommittedLeaderIdOf<C>: CommittedTerm,
{
    let current = current_log_id(snapshots);
    match &snapshots.staged {
        Some(staged) if !is_newer(staged.log_id, current) => {
            snapshots.staged.take().map(|s| s.path)
        }
        _ => None,
    }
}

/// What a builder does.
enum Job<C: RaftTypeConfig, A: SnapshotApp<C>> {
    /// Write a snapshot of this copy of the state.
    Build(A::State),
    /// Make the staged file current.
    Adopt(Staged<C>),
}

/// The builder a [`SnapshotStore`] gives openraft.
pub struct StoreBuilder<C: RaftTypeConfig, A: SnapshotApp<C>> {
    job: Option<Job<C, A>>,
    handle: StoreHandle<C>,
    keep: usize,
    _app: PhantomData<fn() -> A>,
}

impl<C, A> RaftSnapshotBuilder<C> for StoreBuilder<C, A>
where
    C: RaftTypeConfig,
    A: SnapshotApp<C>,
    SnapshotMetaOf<C>: Serialize + DeserializeOwned,
    CommittedLeaderIdOf<C>: CommittedTerm,
{
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<C, SnapshotFile>, io::Error> {
        let job = self
            .job
            .take()
            .ok_or_else(|| io::Error::other("snapshot builder used twice"))?;
        let dir = self.handle.dir.clone();
        let (meta, data_path) = match job {
            Job::Build(state) => {
                let (last_log_id, last_membership) = A::applied(&state);
                let meta = SnapshotMetaOf::<C> {
                    last_log_id,
                    last_membership,
                };
                let log_id = meta
                    .last_log_id
                    .as_ref()
                    .map(log_id_ref)
                    .ok_or_else(|| io::Error::other("nothing applied: no snapshot to build"))?;
                let written_meta = meta.clone();
                let snapshot = blocking(move || {
                    Ok(dir.write(log_id, &written_meta, |w| A::encode(&state, w))?)
                })
                .await?;
                self.handle
                    .counters
                    .built_locally
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(snapshot = %log_id, "built a snapshot locally");
                (meta, snapshot.data_path)
            }
            Job::Adopt(staged) => {
                let Staged {
                    log_id,
                    meta,
                    raft_meta,
                    sha256,
                    path,
                } = staged;
                let snapshot = blocking(move || {
                    Ok(dir.commit_file(&path, log_id, raft_meta, Some(&sha256))?)
                })
                .await?;
                self.handle.counters.adopted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(snapshot = %log_id, "adopted the leader's snapshot");
                (meta, snapshot.data_path)
            }
        };
        {
            // A build can finish after an install overtook it: never move current back.
            let mut snapshots = lock(&self.handle.shared);
            let log_id = meta.last_log_id.as_ref().map(log_id_ref);
            if log_id.is_some_and(|id| is_newer(id, current_log_id(&snapshots))) {
                snapshots.current = Some(Current {
                    meta: meta.clone(),
                    data_path: data_path.clone(),
                });
            }
        }
        let (dir, keep) = (self.handle.dir.clone(), self.keep);
        if let Err(e) = blocking(move || Ok(dir.prune(keep)?)).await {
            tracing::warn!(error = %e, "removing old snapshots failed");
        }
        Ok(Snapshot {
            meta,
            snapshot: SnapshotFile::open(&data_path)?,
        })
    }
}

impl<C, A> RaftStateMachine<C> for SnapshotStore<C, A>
where
    C: RaftTypeConfig,
    A: SnapshotApp<C>,
    SnapshotMetaOf<C>: Serialize + DeserializeOwned,
    CommittedLeaderIdOf<C>: CommittedTerm,
{
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = StoreBuilder<C, A>;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<C>>, StoredMembershipOf<C>), io::Error> {
        Ok(self.app.applied_state())
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        self.app.apply(entries).await
    }

    async fn try_create_snapshot_builder(&mut self, force: bool) -> Option<StoreBuilder<C, A>> {
        let last_applied = self.app.applied_state().0;
        let (job, obsolete) = {
            let mut snapshots = lock(&self.handle.shared);
            let obsolete = take_obsolete_staged(&mut snapshots);
            let inputs = BuildInputs {
                staged: snapshots.staged.as_ref().map(|s| s.log_id),
                current: current_log_id(&snapshots),
                last_applied: last_applied.as_ref().map(log_id_ref),
                force,
                is_leader: self.handle.leader.is_leader(),
            };
            let decision = self.policy.decide(&inputs);
            tracing::info!(?decision, ?inputs, "snapshot requested");
            let job = match decision {
                // `decide` adopts only a staged snapshot, so `staged` is there.
                BuildDecision::AdoptStaged => snapshots.staged.take().map(Some),
                BuildDecision::BuildLocally if last_applied.is_some() => Some(None),
                BuildDecision::BuildLocally | BuildDecision::Defer => None,
            };
            (job, obsolete)
        };
        if let Some(path) = obsolete {
            let _ = self.handle.dir.discard(&path);
        }
        // The state is copied outside the lock, which the hook and metrics take.
        let job = match job? {
            Some(staged) => Job::Adopt(staged),
            None => Job::Build(off_reactor(|| self.app.snapshot())),
        };
        Some(self.builder(job))
    }

    async fn get_snapshot_builder(&mut self) -> StoreBuilder<C, A> {
        let state = off_reactor(|| self.app.snapshot());
        self.builder(Job::Build(state))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<C>,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let log_id = meta
            .last_log_id
            .as_ref()
            .map(log_id_ref)
            .ok_or_else(|| io::Error::other("snapshot to install covers no log"))?;
        let raft_meta = serde_json::to_value(meta).map_err(io::Error::other)?;
        let dir = self.handle.dir.clone();
        let (state, committed) = blocking(move || {
            let mut data = io::BufReader::new(&snapshot.file);
            (&snapshot.file).rewind()?;
            let state = decode_at::<C, A>(&mut data, log_id)
                .map_err(|e| invalid(format!("snapshot {log_id} from the leader: {e}")))?;
            let committed = dir.commit_file(&snapshot.path, log_id, raft_meta, None)?;
            Ok((state, committed))
        })
        .await?;
        self.app.restore(state);
        let obsolete = {
            let mut snapshots = lock(&self.handle.shared);
            snapshots.current = Some(Current {
                meta: meta.clone(),
                data_path: committed.data_path,
            });
            take_obsolete_staged(&mut snapshots)
        };
        if let Some(path) = obsolete {
            let _ = self.handle.dir.discard(&path);
        }
        self.handle
            .counters
            .installed
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(snapshot = %log_id, "installed a snapshot from the leader");
        let (dir, keep) = (self.handle.dir.clone(), self.keep);
        blocking(move || Ok(dir.prune(keep)?)).await.map(|_| ())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<C, SnapshotFile>>, io::Error> {
        let current = lock(&self.handle.shared)
            .current
            .as_ref()
            .map(|c| (c.meta.clone(), c.data_path.clone()));
        match current {
            None => Ok(None),
            Some((meta, path)) => Ok(Some(Snapshot {
                meta,
                snapshot: SnapshotFile::open(&path)?,
            })),
        }
    }
}

impl<C, A> AdoptSnapshot for SnapshotStore<C, A>
where
    C: RaftTypeConfig,
    A: SnapshotApp<C>,
    SnapshotMetaOf<C>: Serialize + DeserializeOwned,
    CommittedLeaderIdOf<C>: CommittedTerm,
{
    fn validate(data: &mut dyn Read, log_id: LogIdRef) -> Result<(), String> {
        let at = A::check(&mut io::BufReader::with_capacity(1 << 20, data))
            .map_err(|e| e.to_string())?;
        check_label(at.as_ref().map(log_id_ref), log_id).map_err(|e| e.to_string())
    }

    async fn force_save_snapshot(&mut self, incoming: Incoming) -> Result<StageOutcome, Refusal> {
        let log_id = incoming.log_id();
        // The hook checked that raft_meta is our SnapshotMeta at the envelope's log id.
        let meta: SnapshotMetaOf<C> = incoming.raft_meta().map_err(io::Error::other)?;
        let replaced = {
            let mut snapshots = lock(&self.handle.shared);
            let staged_newer = snapshots
                .staged
                .as_ref()
                .is_some_and(|s| s.log_id.index >= log_id.index);
            if staged_newer || !is_newer(log_id, current_log_id(&snapshots)) {
                return Ok(StageOutcome::Stale);
            }
            // A rename within one file system, quick enough under the lock: the check and
            // the staging are one step.
            let path = self.handle.dir.stage(&incoming)?;
            snapshots
                .staged
                .replace(Staged {
                    log_id,
                    meta,
                    raft_meta: incoming.envelope.raft_meta.clone(),
                    sha256: incoming.sha256.clone(),
                    path,
                })
                .map(|old| old.path)
        };
        if let Some(old) = replaced {
            let _ = self.handle.dir.discard(&old);
        }
        tracing::info!(snapshot = %log_id, "staged the leader's snapshot");
        Ok(StageOutcome::Staged)
    }
}

impl<C: RaftTypeConfig> Debug for StoreHandle<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHandle")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The hook's node for a `Raft` whose state machine is a [`SnapshotStore`].
pub type StoreNode<C, A, LR> = RaftNode<C, SnapshotStore<C, A>, LR>;

/// Serves the hook for `raft`, whose state machine is the [`SnapshotStore`] `handle` came
/// from: keeps the build decision's leader flag current, and binds the socket with a
/// [`RaftNode`] that checks snapshots against `log_reader` (the log store's reader).
/// Spawn the returned server's `run`; [`HookServer::node`] is the node, for status and
/// refusal counts.
pub fn serve_hook<C, A, LR>(
    raft: &Raft<C, SnapshotStore<C, A>>,
    handle: &StoreHandle<C>,
    log_reader: LR,
    config: HookConfig,
) -> Result<HookServer<StoreNode<C, A, LR>>, HookError>
where
    C: RaftTypeConfig,
    C::NodeId: Into<u64>,
    C::Term: Into<u64>,
    A: SnapshotApp<C>,
    LR: RaftLogReader<C>,
    SnapshotMetaOf<C>: Serialize + DeserializeOwned,
    CommittedLeaderIdOf<C>: CommittedTerm,
{
    handle.leader.track(raft);
    HookServer::bind(config, RaftNode::new(raft.clone(), log_reader))
}
