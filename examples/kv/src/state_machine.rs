//! [`KvStateMachine`]: a `BTreeMap<String, String>` whose snapshots are files in the snapshot
//! directory, and which adopts its leader's snapshots through the hook.
//!
//! The snapshot file is `serde_json` of [`KvState`] (last applied log id, last membership,
//! data; all maps sorted), so its bytes are a pure function of the applied log prefix: the same
//! on every node. That is what makes adoption correct: a follower that has applied up to `L`
//! holds exactly the state in the leader's snapshot at `L`, so it can make the leader's file
//! its own snapshot without reading it.
//!
//! Snapshot life cycle, all committed through `SnapshotDir` (data, then envelope):
//! - built locally by the builder (a leader; a follower only past the deferral limit);
//! - staged by [`AdoptSnapshot::force_save_snapshot`], adopted by the builder (a rename);
//! - received from the leader through replication and installed by `install_snapshot`;
//! - at startup, the newest committed one is loaded as the state.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use futures::TryStreamExt;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};
use snaprelay_hook::decision::is_newer;
use snaprelay_hook::ipc::LogIdRef;
use snaprelay_hook::{
    log_id_ref, AdoptSnapshot, BuildDecision, BuildInputs, BuildPolicy, Incoming, LeaderFlag,
    Refusal, SnapshotDir, StageOutcome,
};

use crate::{LogId, Request, Response, SnapshotMeta, StoredMembership, TypeConfig};

/// The state, and the content of a snapshot file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KvState {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub data: BTreeMap<String, String>,
}

impl KvState {
    fn encode(&self) -> Vec<u8> {
        // Only derived impls and string-keyed maps: serialization cannot fail.
        serde_json::to_vec(self).expect("KvState serializes")
    }

    fn decode(bytes: &[u8], what: &Path) -> io::Result<KvState> {
        serde_json::from_slice(bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot file {}: {e}", what.display()),
            )
        })
    }

    fn meta(&self) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
        }
    }
}

/// A snapshot's data: its file, opened (reads keep working if the file is pruned meanwhile),
/// and its path (install renames it).
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

    /// The whole file (blocking). The example keeps snapshots in memory when sending them;
    /// a large state would stream them instead.
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        let mut file = &self.file;
        file.rewind()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(bytes)
    }
}

/// How this node got its snapshots (reported by `/metrics`).
#[derive(Debug, Default)]
pub struct SnapshotCounters {
    pub built_locally: AtomicU64,
    pub adopted: AtomicU64,
    pub installed: AtomicU64,
}

/// The current and the staged snapshot; shared with builders, which run on their own task.
#[derive(Default)]
struct Snapshots {
    current: Option<Current>,
    staged: Option<Staged>,
}

struct Current {
    meta: SnapshotMeta,
    data_path: PathBuf,
}

/// A leader's snapshot handed over by the sidecar, waiting for `try_create_snapshot_builder`.
struct Staged {
    log_id: LogIdRef,
    meta: SnapshotMeta,
    raft_meta: serde_json::Value,
    sha256: String,
    path: PathBuf,
}

impl Snapshots {
    fn current_log_id(&self) -> Option<LogIdRef> {
        self.current
            .as_ref()
            .and_then(|c| c.meta.last_log_id.as_ref())
            .map(log_id_ref)
    }

    /// Makes `meta` current unless something newer already is (a build can finish after an
    /// install overtook it).
    fn offer(&mut self, meta: SnapshotMeta, data_path: PathBuf) {
        let Some(log_id) = meta.last_log_id.as_ref().map(log_id_ref) else {
            return;
        };
        if is_newer(log_id, self.current_log_id()) {
            self.current = Some(Current { meta, data_path });
        }
    }

    /// Drops the staged snapshot if the current one is as new; returns its file to remove.
    fn drop_obsolete_staged(&mut self) -> Option<PathBuf> {
        let current = self.current_log_id();
        match &self.staged {
            Some(staged) if !is_newer(staged.log_id, current) => self.staged.take().map(|s| s.path),
            _ => None,
        }
    }
}

/// What the HTTP API reads; clones share the state machine's data.
#[derive(Clone)]
pub struct StoreView {
    state: Arc<RwLock<KvState>>,
    snapshots: Arc<Mutex<Snapshots>>,
    counters: Arc<SnapshotCounters>,
}

impl StoreView {
    pub fn get(&self, key: &str) -> Option<String> {
        read(&self.state).data.get(key).cloned()
    }

    /// The data file of the current snapshot.
    pub fn current_snapshot_path(&self) -> Option<PathBuf> {
        lock(&self.snapshots)
            .current
            .as_ref()
            .map(|c| c.data_path.clone())
    }

    pub fn counters(&self) -> &SnapshotCounters {
        &self.counters
    }
}

// The locks guard plain data that every writer leaves consistent before it could panic, so
// a poisoned lock is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// Runs a long in-memory step (copying the state) on the current task, telling a
/// multi-threaded runtime to move its other tasks to another worker meanwhile.
fn off_reactor<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Runs blocking file work off the async reactor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

pub struct KvStateMachine {
    view: StoreView,
    dir: SnapshotDir,
    leader: LeaderFlag,
    policy: BuildPolicy,
    /// Committed snapshots kept in the directory (the newest is current).
    keep: usize,
}

impl KvStateMachine {
    /// Opens the state machine on `dir`, loading the newest committed snapshot as its state.
    pub fn open(
        dir: SnapshotDir,
        leader: LeaderFlag,
        policy: BuildPolicy,
        keep: usize,
    ) -> io::Result<KvStateMachine> {
        let leftovers = dir.remove_leftovers()?;
        if leftovers > 0 {
            tracing::info!(leftovers, "removed temp and staged files of a previous run");
        }
        let mut state = KvState::default();
        let mut snapshots = Snapshots::default();
        // A bad newest snapshot (wrong sha256, label not its content, undecodable) is moved
        // aside and the previous one loaded, or none: the node then catches up from the
        // leader. Nothing in the directory can keep the node from starting.
        let loaded = dir.newest_valid(|snapshot, data| {
            let named = LogIdRef {
                term: snapshot.envelope.last_log_term,
                index: snapshot.envelope.last_log_index,
            };
            let meta: SnapshotMeta = serde_json::from_value(snapshot.envelope.raft_meta.clone())
                .map_err(|e| format!("raft_meta is not a SnapshotMeta: {e}"))?;
            if meta.last_log_id.as_ref().map(log_id_ref) != Some(named) {
                return Err(format!(
                    "its envelope says {named}, its raft_meta {:?}",
                    meta.last_log_id
                ));
            }
            let state: KvState = serde_json::from_reader(data).map_err(|e| e.to_string())?;
            if state.last_applied.as_ref().map(log_id_ref) != Some(named) {
                return Err(format!(
                    "it holds the state at {:?}, not at {named}",
                    state.last_applied
                ));
            }
            Ok(state)
        })?;
        if let Some((newest, loaded)) = loaded {
            tracing::info!(snapshot = %newest.meta_path.display(), "loaded the newest snapshot");
            snapshots.current = Some(Current {
                meta: loaded.meta(),
                data_path: newest.data_path,
            });
            state = loaded;
        }
        Ok(KvStateMachine {
            view: StoreView {
                state: Arc::new(RwLock::new(state)),
                snapshots: Arc::new(Mutex::new(snapshots)),
                counters: Arc::default(),
            },
            dir,
            leader,
            policy,
            keep,
        })
    }

    pub fn view(&self) -> StoreView {
        self.view.clone()
    }

    fn builder(&self, job: Job) -> KvSnapshotBuilder {
        KvSnapshotBuilder {
            job: Some(job),
            dir: self.dir.clone(),
            view: self.view.clone(),
            keep: self.keep,
        }
    }
}

/// What a builder does.
enum Job {
    /// Write a snapshot of this state (a clone: applying goes on meanwhile).
    Build(KvState),
    /// Make the staged file current.
    Adopt(Staged),
}

pub struct KvSnapshotBuilder {
    job: Option<Job>,
    dir: SnapshotDir,
    view: StoreView,
    keep: usize,
}

impl KvSnapshotBuilder {
    async fn prune(&self) {
        let dir = self.dir.clone();
        let keep = self.keep;
        if let Err(e) = blocking(move || Ok(dir.prune(keep)?)).await {
            tracing::warn!(error = %e, "removing old snapshots failed");
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for KvSnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<KvSnapshot, io::Error> {
        let job = self
            .job
            .take()
            .ok_or_else(|| io::Error::other("snapshot builder used twice"))?;
        let dir = self.dir.clone();
        let (meta, data_path) = match job {
            Job::Build(state) => {
                let meta = state.meta();
                let log_id = meta
                    .last_log_id
                    .as_ref()
                    .map(log_id_ref)
                    .ok_or_else(|| io::Error::other("nothing applied: no snapshot to build"))?;
                let written_meta = meta.clone();
                let snapshot = blocking(move || {
                    let bytes = state.encode();
                    Ok(dir.write(log_id, &written_meta, |w| w.write_all(&bytes))?)
                })
                .await?;
                self.view
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
                self.view.counters.adopted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(snapshot = %log_id, "adopted the leader's snapshot");
                (meta, snapshot.data_path)
            }
        };
        lock(&self.view.snapshots).offer(meta.clone(), data_path.clone());
        self.prune().await;
        Ok(Snapshot {
            meta,
            snapshot: SnapshotFile::open(&data_path)?,
        })
    }
}

/// A snapshot as openraft hands it around.
pub type KvSnapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>;

impl RaftStateMachine<TypeConfig> for KvStateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = KvSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let state = read(&self.view.state);
        Ok((state.last_applied, state.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let response = {
                let mut state = write(&self.view.state);
                state.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => Response::default(),
                    EntryPayload::Normal(Request { key, value }) => Response {
                        previous: state.data.insert(key, value),
                    },
                    EntryPayload::Membership(membership) => {
                        state.last_membership =
                            StoredMembership::new(Some(entry.log_id), membership);
                        Response::default()
                    }
                }
            };
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, force: bool) -> Option<KvSnapshotBuilder> {
        let last_applied = read(&self.view.state).last_applied;
        let (decision, obsolete) = {
            let mut snapshots = lock(&self.view.snapshots);
            let obsolete = snapshots.drop_obsolete_staged();
            let inputs = BuildInputs {
                staged: snapshots.staged.as_ref().map(|s| s.log_id),
                current: snapshots.current_log_id(),
                last_applied: last_applied.as_ref().map(log_id_ref),
                force,
                is_leader: self.leader.is_leader(),
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
            let _ = self.dir.discard(&path);
        }
        // The state is copied outside the `snapshots` lock, which the metrics and hook
        // handlers take: copying a GiB of state takes a second, and a runtime whose workers
        // all wait on that lock stops sending heartbeats (the node then loses leadership).
        let job = match decision? {
            Some(staged) => Job::Adopt(staged),
            None => Job::Build(off_reactor(|| read(&self.view.state).clone())),
        };
        Some(self.builder(job))
    }

    async fn get_snapshot_builder(&mut self) -> KvSnapshotBuilder {
        let state = off_reactor(|| read(&self.view.state).clone());
        self.builder(Job::Build(state))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let log_id = meta
            .last_log_id
            .as_ref()
            .map(log_id_ref)
            .ok_or_else(|| io::Error::other("snapshot to install covers no log"))?;
        let raft_meta = serde_json::to_value(meta).map_err(io::Error::other)?;
        let expected = meta.last_log_id;
        let dir = self.dir.clone();
        let (state, committed) = blocking(move || {
            let bytes = snapshot.read_all()?;
            let state = KvState::decode(&bytes, &snapshot.path)?;
            if state.last_applied != expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "snapshot for {log_id} holds state at {:?}",
                        state.last_applied
                    ),
                ));
            }
            let committed = dir.commit_file(&snapshot.path, log_id, raft_meta, None)?;
            Ok((state, committed))
        })
        .await?;
        *write(&self.view.state) = state;
        let obsolete = {
            let mut snapshots = lock(&self.view.snapshots);
            snapshots.current = Some(Current {
                meta: meta.clone(),
                data_path: committed.data_path,
            });
            snapshots.drop_obsolete_staged()
        };
        if let Some(path) = obsolete {
            let _ = self.dir.discard(&path);
        }
        self.view.counters.installed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(snapshot = %log_id, "installed a snapshot from the leader");
        let (dir, keep) = (self.dir.clone(), self.keep);
        blocking(move || Ok(dir.prune(keep)?)).await?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<KvSnapshot>, io::Error> {
        let current = lock(&self.view.snapshots)
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

impl AdoptSnapshot for KvStateMachine {
    /// Decodes the file: a snapshot this node could not load at startup is refused here,
    /// and so is one whose state is not at its label (a relabelled snapshot).
    fn validate(data: &mut dyn Read, log_id: LogIdRef) -> Result<(), String> {
        let state: KvState =
            serde_json::from_reader(io::BufReader::new(data)).map_err(|e| e.to_string())?;
        let at = state.last_applied.as_ref().map(log_id_ref);
        if at != Some(log_id) {
            return Err(format!("it holds the state at {at:?}, not at {log_id}"));
        }
        Ok(())
    }

    async fn force_save_snapshot(&mut self, incoming: Incoming) -> Result<StageOutcome, Refusal> {
        let log_id = incoming.log_id();
        // The hook checked that raft_meta is our SnapshotMeta at the envelope's log id.
        let meta: SnapshotMeta = incoming.raft_meta().map_err(io::Error::other)?;
        let replaced = {
            let mut snapshots = lock(&self.view.snapshots);
            let staged_newer = snapshots
                .staged
                .as_ref()
                .is_some_and(|s| s.log_id.index >= log_id.index);
            if staged_newer || !is_newer(log_id, snapshots.current_log_id()) {
                return Ok(StageOutcome::Stale);
            }
            // A rename within one directory: quick enough to do under the lock, which keeps
            // the check and the staging one step.
            let path = self.dir.stage(&incoming)?;
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
            let _ = self.dir.discard(&old);
        }
        tracing::info!(snapshot = %log_id, "staged the leader's snapshot");
        Ok(StageOutcome::Staged)
    }
}

#[cfg(test)]
mod tests {
    //! The state machine's side of adoption, driven directly (no raft): what openraft and the
    //! hook would call, in the order they would call it.

    use openraft::impls::leader_id_adv::LeaderId;
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    use snaprelay_hook::snapdir::Envelope;

    use super::*;

    fn log_id(index: u64) -> LogId {
        LogId::new(
            LeaderId {
                term: 1,
                node_id: 1,
            },
            index,
        )
    }

    fn set(
        index: u64,
    ) -> openraft::Entry<LeaderId<u64, u64>, EntryPayload<Request, u64, openraft::BasicNode>> {
        openraft::Entry {
            log_id: log_id(index),
            payload: EntryPayload::Normal(Request {
                key: format!("k{index}"),
                value: format!("v{index}"),
            }),
        }
    }

    /// A state machine on a fresh directory under `root`, that has applied `1..=applied`.
    async fn machine(root: &Path, name: &str, applied: u64, leader: bool) -> KvStateMachine {
        let dir = SnapshotDir::open(root.join(name)).unwrap();
        let flag = LeaderFlag::new();
        flag.set(leader);
        let mut sm = KvStateMachine::open(dir, flag, BuildPolicy::new(1000), 10).unwrap();
        apply(&mut sm, 1..=applied).await;
        sm
    }

    async fn apply(sm: &mut KvStateMachine, indexes: std::ops::RangeInclusive<u64>) {
        let entries: Vec<io::Result<EntryResponder<TypeConfig>>> =
            indexes.map(|i| Ok((set(i), None))).collect();
        sm.apply(futures::stream::iter(entries)).await.unwrap();
    }

    /// The leader's snapshot at `applied`, delivered into `follower`'s incoming directory.
    async fn leader_snapshot(
        root: &Path,
        applied: u64,
        follower: &KvStateMachine,
    ) -> (Incoming, Vec<u8>) {
        let mut leader = machine(root, &format!("leader-{applied}"), applied, true).await;
        let built = leader
            .try_create_snapshot_builder(false)
            .await
            .expect("a leader builds")
            .build_snapshot()
            .await
            .unwrap();
        let bytes = built.snapshot.read_all().unwrap();
        let path = follower
            .dir
            .incoming_dir()
            .join(format!("from-leader-{applied}.bin"));
        std::fs::write(&path, &bytes).unwrap();
        let envelope = Envelope {
            format: 1,
            last_log_index: applied,
            last_log_term: 1,
            data: "x.bin".into(),
            size: bytes.len() as u64,
            raft_meta: serde_json::to_value(&built.meta).unwrap(),
            chunk_index: None,
            sha256: None,
        };
        let incoming = Incoming::open(
            envelope,
            path.to_str().unwrap(),
            follower.dir.incoming_dir(),
            "00".repeat(32),
        )
        .unwrap();
        (incoming, bytes)
    }

    #[test]
    fn snapshot_bytes_do_not_depend_on_insertion_order() {
        let mut a = KvState::default();
        let mut b = KvState::default();
        for i in 0..100 {
            a.data.insert(format!("k{i}"), i.to_string());
            b.data.insert(format!("k{}", 99 - i), (99 - i).to_string());
        }
        assert_eq!(a.encode(), b.encode());
        assert_eq!(KvState::decode(&a.encode(), Path::new("x")).unwrap(), a);
    }

    #[tokio::test]
    async fn follower_defers_and_leader_builds() {
        let root = tempfile::tempdir().unwrap();
        let mut follower = machine(root.path(), "follower", 5, false).await;
        assert!(follower.try_create_snapshot_builder(false).await.is_none());
        let mut forced = follower
            .try_create_snapshot_builder(true)
            .await
            .expect("force builds");
        forced.build_snapshot().await.unwrap();
        assert_eq!(
            follower.view.counters.built_locally.load(Ordering::Relaxed),
            1
        );

        let mut leader = machine(root.path(), "leader", 5, true).await;
        let built = leader
            .try_create_snapshot_builder(false)
            .await
            .expect("a leader builds")
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(built.meta.last_log_id, Some(log_id(5)));
        let current = leader.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, built.meta);
    }

    #[tokio::test]
    async fn staged_snapshot_is_adopted_once_applied_and_older_ones_are_stale() {
        let root = tempfile::tempdir().unwrap();
        let mut follower = machine(root.path(), "follower", 3, false).await;
        let (incoming, leader_bytes) = leader_snapshot(root.path(), 5, &follower).await;

        // Ahead of what the follower applied: staged, not adoptable yet.
        assert_eq!(
            follower
                .force_save_snapshot(incoming.clone())
                .await
                .unwrap(),
            StageOutcome::Staged
        );
        assert!(
            !incoming.path.exists(),
            "the file was moved to the staging name"
        );
        assert!(follower.try_create_snapshot_builder(false).await.is_none());

        // Once applied catches up, the next build adopts it, unchanged.
        apply(&mut follower, 4..=5).await;
        let adopted = follower
            .try_create_snapshot_builder(false)
            .await
            .expect("the staged snapshot is adoptable")
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(adopted.meta.last_log_id, Some(log_id(5)));
        assert_eq!(adopted.snapshot.read_all().unwrap(), leader_bytes);
        assert_eq!(follower.view.counters.adopted.load(Ordering::Relaxed), 1);
        assert_eq!(
            follower.view.counters.built_locally.load(Ordering::Relaxed),
            0
        );
        let current = follower.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.snapshot.read_all().unwrap(), leader_bytes);

        // An older or equal snapshot is stale and its file is left alone.
        for applied in [4, 5] {
            let (older, _) = leader_snapshot(root.path(), applied, &follower).await;
            assert_eq!(
                follower.force_save_snapshot(older.clone()).await.unwrap(),
                StageOutcome::Stale
            );
            assert!(older.path.exists());
        }
    }

    #[tokio::test]
    async fn validation_decodes_and_checks_the_label() {
        let root = tempfile::tempdir().unwrap();
        let follower = machine(root.path(), "follower", 3, false).await;
        let (incoming, bytes) = leader_snapshot(root.path(), 5, &follower).await;
        let at = |index| LogIdRef { term: 1, index };
        KvStateMachine::validate(&mut &bytes[..], at(5)).unwrap();
        let err = KvStateMachine::validate(&mut &bytes[..], at(6)).unwrap_err();
        assert!(err.contains("not at 1-6"), "{err}");
        let err = KvStateMachine::validate(&mut &b"{\"hello\":\"world\"}"[..], at(5)).unwrap_err();
        assert!(err.contains("missing field"), "{err}");
        assert!(incoming.path.exists());
    }

    #[tokio::test]
    async fn installed_snapshot_replaces_the_state_and_survives_a_restart() {
        let root = tempfile::tempdir().unwrap();
        let mut follower = machine(root.path(), "follower", 0, false).await;
        let (incoming, bytes) = leader_snapshot(root.path(), 5, &follower).await;
        // Replication hands over a received file in the snapshot directory.
        let received = follower.dir.write_temp(|w| w.write_all(&bytes)).unwrap();
        let meta: SnapshotMeta = incoming.raft_meta().unwrap();
        follower
            .install_snapshot(&meta, SnapshotFile::open(&received).unwrap())
            .await
            .unwrap();
        assert_eq!(follower.view.get("k5").as_deref(), Some("v5"));
        assert_eq!(follower.applied_state().await.unwrap().0, Some(log_id(5)));

        // A restart loads the newest committed snapshot as the state.
        let dir = follower.dir.clone();
        drop(follower);
        let mut restarted =
            KvStateMachine::open(dir, LeaderFlag::new(), BuildPolicy::new(1000), 10).unwrap();
        assert_eq!(restarted.applied_state().await.unwrap().0, Some(log_id(5)));
        assert_eq!(restarted.view.get("k1").as_deref(), Some("v1"));
        let current = restarted.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, meta);
        // openraft restores a transient state machine by installing its current snapshot:
        // that must not lose the file.
        restarted
            .install_snapshot(&meta, current.snapshot)
            .await
            .unwrap();
        assert!(restarted.get_current_snapshot().await.unwrap().is_some());
        assert_eq!(restarted.view.get("k5").as_deref(), Some("v5"));
    }
}
