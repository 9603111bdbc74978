//! The openraft glue: [`RaftNode`] serves the hook's requests from a `Raft<C, SM>`, and
//! [`LeaderFlag`] tells the application's snapshot builder whether this node leads.
//!
//! `save_snapshot` follows the adoption protocol of docs/adoption.md. Replacing the state
//! machine's snapshot behind openraft's back is not noticed (no meta update, no purge), so
//! adoption goes through openraft's own snapshot build:
//!
//! 1. `L` not newer than `metrics.snapshot` → `stale`.
//! 2. Checks, each a distinct refusal (see [`snaprelay_contract::ipc`]'s error codes): the
//!    envelope's log id is `raft_meta.last_log_id`, with `raft_meta` read as the
//!    application's `SnapshotMeta` (`invalid_snapshot`); log matching against the node's own
//!    log: `L.index` at most the node's committed index (`not_committed`, transient, the
//!    file is kept) and the node's entry at `L.index` exactly `L` (`log_mismatch`); the
//!    file's sha256, hashed by the node, or with a chunk index each chunk's, those it shares
//!    with the last snapshot it checked proven instead ([`crate::chunks`])
//!    (`checksum_mismatch`, unless turned off with
//!    [`RaftNode::without_sha256_verification`]); the application's
//!    [`AdoptSnapshot::validate`] (`invalid_snapshot`). The file checks run on a blocking
//!    thread, outside the state machine worker.
//! 3. `with_state_machine` → [`AdoptSnapshot::force_save_snapshot`] stages the file, in order
//!    with `apply`. `Stale` from the state machine → `stale`.
//! 4. `L.index <= last_applied` → `trigger().snapshot()`; the state machine's
//!    `try_create_snapshot_builder` finds the staged snapshot adoptable and returns it as the
//!    build; openraft records its meta and purges logs. Wait (bounded) until
//!    `metrics.snapshot >= L` → `adopted`.
//! 5. `L.index > last_applied` → `staged` at once; a task waits until the node has applied
//!    `L`, then does step 3. Adopting before that could purge logs not yet applied.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::alias::{CommittedLeaderIdOf, LogIdOf, SnapshotMetaOf};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::entry::RaftEntry;
use openraft::metrics::WaitError;
use openraft::storage::{RaftLogReader, RaftStateMachine};
use openraft::vote::{leader_id_adv, leader_id_std, RaftCommittedLeaderId, RaftTerm};
use openraft::{LogId, LogIdOptionExt, Raft, RaftTypeConfig, ServerState};
use serde::de::DeserializeOwned;
use snaprelay_contract::ipc::{ErrorCode, LogIdRef, Role, SaveOutcome, SaveResult};
use tokio::time::Instant;

use crate::adopt::{AdoptSnapshot, Incoming, StageOutcome};
use crate::chunks::{Checked, ChunkCheck, ExtentSource, Fiemap};
use crate::node::{Node, NodeError, NodeState, RefusalCounts};
use crate::verify::Refusal;

/// How long `save_snapshot` waits for openraft to record an adoptable snapshot.
const DEFAULT_ADOPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a staged snapshot waits for the node to apply up to its index.
const DEFAULT_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);
/// A trigger is dropped while a build is running; trigger again this often while waiting.
const RETRIGGER_INTERVAL: Duration = Duration::from_secs(2);

/// The term of a committed leader id, as the protocol's `u64`. Implemented for openraft's
/// two leader-id modes (`leader_id_adv`, the default, and `leader_id_std`) with terms that
/// convert into `u64`; an application with its own leader id implements it too.
pub trait CommittedTerm {
    fn term_u64(&self) -> u64;
}

impl<T, N> CommittedTerm for leader_id_adv::LeaderId<T, N>
where
    T: RaftTerm + Into<u64>,
    N: openraft::NodeId,
{
    fn term_u64(&self) -> u64 {
        self.term.into()
    }
}

impl<T> CommittedTerm for leader_id_std::CommittedLeaderId<T>
where
    T: RaftTerm + Into<u64>,
{
    fn term_u64(&self) -> u64 {
        self.term.into()
    }
}

/// An openraft log id as the protocol carries it.
pub fn log_id_ref<CLID>(log_id: &LogId<CLID>) -> LogIdRef
where
    CLID: RaftCommittedLeaderId + CommittedTerm,
{
    LogIdRef {
        term: log_id.committed_leader_id().term_u64(),
        index: log_id.index(),
    }
}

fn role(state: ServerState) -> Role {
    match state {
        ServerState::Learner => Role::Learner,
        ServerState::Follower => Role::Follower,
        ServerState::Candidate => Role::Candidate,
        ServerState::Leader => Role::Leader,
        ServerState::Shutdown => Role::Shutdown,
    }
}

/// The hook's [`Node`] for an openraft node, with a reader of the node's own log: the
/// log matching check (the node's entry at the snapshot's index must have the snapshot's
/// log id) is part of adoption, not an option.
pub struct RaftNode<C, SM, LR>
where
    C: RaftTypeConfig,
    SM: RaftStateMachine<C>,
{
    raft: Raft<C, SM>,
    log: tokio::sync::Mutex<LR>,
    /// The snapshot this node staged last (it is reported while newer than the current one).
    staged: std::sync::Mutex<Option<LogIdRef>>,
    adopt_timeout: Duration,
    catch_up_timeout: Duration,
    verify_sha256: bool,
    refusals: RefusalCounts,
    /// The last snapshot checked chunk by chunk and staged: what the next handover's chunks
    /// are proven against ([`crate::chunks`]).
    checked: std::sync::Mutex<Option<Checked>>,
    extents: Arc<dyn ExtentSource>,
    chunk_proofs: bool,
}

impl<C, SM, LR> RaftNode<C, SM, LR>
where
    C: RaftTypeConfig,
    SM: RaftStateMachine<C>,
    LR: RaftLogReader<C>,
{
    /// `log` reads the node's own log (`RaftLogStorage::get_log_reader` of the store given
    /// to `Raft::new`). openraft keeps every entry after the current snapshot, which is
    /// what the log matching check reads.
    pub fn new(raft: Raft<C, SM>, log: LR) -> RaftNode<C, SM, LR> {
        RaftNode {
            raft,
            log: tokio::sync::Mutex::new(log),
            staged: std::sync::Mutex::new(None),
            adopt_timeout: DEFAULT_ADOPT_TIMEOUT,
            catch_up_timeout: DEFAULT_CATCH_UP_TIMEOUT,
            verify_sha256: true,
            refusals: RefusalCounts::default(),
            checked: std::sync::Mutex::new(None),
            extents: Arc::new(Fiemap),
            chunk_proofs: true,
        }
    }

    /// Does not hash incoming files (the sidecar has verified every chunk and the whole file
    /// already). Saves one read and hash of the file per handover: measured with
    /// `examples/hash_incoming.rs` on a 1 GiB file, 0.87 s of CPU per GiB (SHA-NI), 2.2-3.2 s
    /// wall on the shared 2-core test machine under load (warm and cold page cache). The node
    /// then trusts the sidecar's user not to hand it a file other than the one it verified;
    /// the other checks (label, validation, staged inode) stay.
    pub fn without_sha256_verification(mut self) -> RaftNode<C, SM, LR> {
        self.verify_sha256 = false;
        self
    }

    /// Hashes every chunk of a handed-over file that comes with a chunk index, instead of
    /// proving those it shares with the last snapshot checked ([`crate::chunks`]): damage
    /// to a shared block is then caught at adoption rather than at the next start, for the
    /// price of hashing the whole file each time (0.9 CPU-s per GiB).
    pub fn without_chunk_proofs(mut self) -> RaftNode<C, SM, LR> {
        self.chunk_proofs = false;
        self
    }

    /// Where the chunk check learns which bytes two files share (default: the kernel's
    /// `FIEMAP`). For tests only: a source that claims sharing the file system does not
    /// have makes damaged chunks pass unhashed.
    pub fn with_extent_source(mut self, source: Arc<dyn ExtentSource>) -> RaftNode<C, SM, LR> {
        self.extents = source;
        self
    }

    /// The refusal counts this node keeps (shared: read them for metrics).
    pub fn refusals(&self) -> RefusalCounts {
        self.refusals.clone()
    }

    /// Counts refusals into `counts` instead (e.g. shared with the application's metrics).
    pub fn with_refusal_counts(mut self, counts: RefusalCounts) -> RaftNode<C, SM, LR> {
        self.refusals = counts;
        self
    }

    /// How long `save_snapshot` waits for an adoptable snapshot to become current before it
    /// answers `staged` (default 30 s).
    pub fn with_adopt_timeout(mut self, timeout: Duration) -> RaftNode<C, SM, LR> {
        self.adopt_timeout = timeout;
        self
    }

    /// How long a snapshot staged ahead of `last_applied` waits for the node to catch up
    /// before the hook stops waiting (default 10 min). It stays staged either way: the next
    /// build adopts it.
    pub fn with_catch_up_timeout(mut self, timeout: Duration) -> RaftNode<C, SM, LR> {
        self.catch_up_timeout = timeout;
        self
    }
}

fn fatal<E: std::fmt::Display>(e: E) -> NodeError {
    NodeError::Unavailable(e.to_string())
}

/// The envelope's log id must be `raft_meta.last_log_id`, and `raft_meta` the application's
/// `SnapshotMeta`: what the node will record as the snapshot's meta must say what its label
/// says.
fn check_label<C>(incoming: &Incoming) -> Result<SnapshotMetaOf<C>, Refusal>
where
    C: RaftTypeConfig,
    SnapshotMetaOf<C>: DeserializeOwned,
    CommittedLeaderIdOf<C>: CommittedTerm,
{
    let log_id = incoming.log_id();
    let meta: SnapshotMetaOf<C> = incoming.raft_meta().map_err(|e| {
        Refusal::new(
            ErrorCode::InvalidSnapshot,
            format!("raft_meta of snapshot {log_id} is not this application's SnapshotMeta: {e}"),
        )
    })?;
    let meta_id = meta.last_log_id.as_ref().map(log_id_ref);
    if meta_id != Some(log_id) {
        let said = meta_id.map_or("no log id".to_owned(), |id| id.to_string());
        return Err(Refusal::new(
            ErrorCode::InvalidSnapshot,
            format!("the envelope says snapshot {log_id}, its raft_meta says {said}"),
        ));
    }
    Ok(meta)
}

/// The file checks: sha256 and the application's validation, in one pass over the file
/// ([`crate::verify::IncomingFile::verify_sha256_while`]): the file is read once, and the
/// hashing runs on another core beside the validation. With a chunk index, the sha256 is
/// checked chunk by chunk instead, and chunks shared with `against` (the snapshot checked
/// last) are proven rather than hashed ([`crate::chunks`]); the answer is then what the next
/// check proves against. Blocking.
///
/// A checksum mismatch wins over a validation failure: garbage that does not validate
/// because it is not the file the sidecar verified is a damaged handover, not a bad
/// snapshot of the leader's.
fn check_file<SM: AdoptSnapshot>(
    incoming: &Incoming,
    verify_sha256: bool,
    against: Option<&Checked>,
    extents: &dyn ExtentSource,
) -> Result<Option<(Checked, ChunkCheck)>, Refusal> {
    let validate = |data: &mut dyn std::io::Read| {
        SM::validate(data, incoming.log_id()).map_err(|reason| {
            Refusal::new(
                ErrorCode::InvalidSnapshot,
                format!(
                    "snapshot {} ({}) does not validate: {reason}",
                    incoming.log_id(),
                    incoming.path.display()
                ),
            )
        })
    };
    if !verify_sha256 {
        return validate(&mut incoming.file.reader()).map(|()| None);
    }
    // The validation ran on bytes not yet verified: a mismatch is the answer whatever it
    // made of them, a panic included. A panic on verified bytes is the application's bug,
    // and stays a panic.
    if let Some(index) = &incoming.index {
        let (checked, validated) = crate::chunks::verify_chunks_while(
            &incoming.file,
            index,
            against,
            extents,
            &incoming.path,
            validate,
        );
        let checked = checked?;
        validated.unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        return Ok(checked);
    }
    let (hashed, validated) =
        incoming
            .file
            .verify_sha256_while(&incoming.sha256, &incoming.path, validate);
    hashed?;
    validated
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        .map(|()| None)
}

/// Removes a refused file from the incoming directory, if it is still the one checked.
fn remove_refused(incoming: &Incoming) {
    if incoming.file.is_at(&incoming.path) {
        if let Err(e) = std::fs::remove_file(&incoming.path) {
            tracing::warn!(path = %incoming.path.display(), error = %e, "removing a refused snapshot file failed");
        }
    }
}

impl<C, SM, LR> RaftNode<C, SM, LR>
where
    C: RaftTypeConfig,
    C::NodeId: Into<u64>,
    C::Term: Into<u64>,
    CommittedLeaderIdOf<C>: CommittedTerm,
    SM: RaftStateMachine<C> + AdoptSnapshot,
    LR: RaftLogReader<C>,
{
    /// The snapshot checked last, if it still holds what was checked; one that was written
    /// or removed since is forgotten, and its open files (with its anchor's, see
    /// [`crate::chunks`]) no longer keep it on disk. This runs at each status request and
    /// handover: a snapshot the node removes stays allocated until the sidecar next asks,
    /// every second by default while it runs; an anchor, while the record holds it.
    fn last_checked(&self) -> Option<Checked> {
        let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        if checked.as_ref().is_some_and(|c| !c.holds()) {
            *checked = None;
        }
        checked.clone()
    }

    fn current_snapshot(&self) -> Option<LogIdRef> {
        self.raft
            .metrics()
            .borrow_watched()
            .snapshot
            .as_ref()
            .map(log_id_ref)
    }

    fn result(&self, outcome: SaveOutcome) -> SaveResult {
        SaveResult {
            outcome,
            snapshot: self.current_snapshot(),
        }
    }

    /// Raft's log matching property, against this node's own log: `meta`'s log id `L` must
    /// be committed here (else `not_committed`, transient: the node has not caught up, or
    /// `L` is from a future that may never come), and the entry this node holds at
    /// `L.index` must be exactly `L` (else `log_mismatch`: a relabelled or foreign
    /// snapshot). Committed entries never change, so the answer holds until adoption.
    async fn check_log(&self, meta: &SnapshotMetaOf<C>) -> Result<(), Refusal> {
        let Some(wanted) = meta.last_log_id.clone() else {
            return Err(Refusal::new(
                ErrorCode::InvalidSnapshot,
                "the snapshot covers no log",
            ));
        };
        let target = log_id_ref(&wanted);
        let committed = self.raft.metrics().borrow_watched().local_committed.clone();
        if committed.index() < Some(target.index) {
            let at = committed
                .as_ref()
                .map_or("nothing".to_owned(), |c| log_id_ref(c).to_string());
            return Err(Refusal::new(
                ErrorCode::NotCommitted,
                format!("snapshot {target} is beyond what this node has committed ({at}); hand it over again later"),
            ));
        }
        let entries = self
            .log
            .lock()
            .await
            .try_get_log_entries(target.index..=target.index)
            .await
            .map_err(|e| {
                Refusal::new(
                    ErrorCode::Internal,
                    format!("reading log entry {}: {e}", target.index),
                )
            })?;
        match entries.first().map(|e| e.log_id()) {
            Some(held) if held == wanted => Ok(()),
            Some(held) => Err(Refusal::new(
                ErrorCode::LogMismatch,
                format!(
                    "snapshot {target} does not match this node's log: its entry at index {} is {}",
                    target.index,
                    log_id_ref(&held)
                ),
            )),
            None => Err(Refusal::new(
                ErrorCode::NotCommitted,
                format!("this node's log does not hold entry {} (yet); hand snapshot {target} over again later", target.index),
            )),
        }
    }
}

/// Triggers builds until openraft's snapshot covers `target` or `timeout` passes; returns
/// whether it does.
async fn adopt<C, SM>(
    raft: &Raft<C, SM>,
    target: LogIdRef,
    timeout: Duration,
) -> Result<bool, NodeError>
where
    C: RaftTypeConfig,
    SM: RaftStateMachine<C>,
{
    let deadline = Instant::now() + timeout;
    loop {
        raft.trigger().snapshot().await.map_err(fatal)?;
        let wait = RETRIGGER_INTERVAL.min(deadline.saturating_duration_since(Instant::now()));
        let covered = raft
            .wait(Some(wait))
            .metrics(
                |m| m.snapshot.index() >= Some(target.index),
                format!("snapshot covers {target}"),
            )
            .await;
        match covered {
            Ok(_) => return Ok(true),
            Err(WaitError::Timeout(..)) if Instant::now() < deadline => continue,
            Err(WaitError::Timeout(..)) => return Ok(false),
            Err(e @ WaitError::ShuttingDown) => return Err(fatal(e)),
        }
    }
}

impl<C, SM, LR> Node for RaftNode<C, SM, LR>
where
    C: RaftTypeConfig,
    C::NodeId: Into<u64>,
    C::Term: Into<u64>,
    CommittedLeaderIdOf<C>: CommittedTerm,
    SnapshotMetaOf<C>: DeserializeOwned,
    SM: RaftStateMachine<C> + AdoptSnapshot,
    LR: RaftLogReader<C>,
{
    fn state(&self) -> NodeState {
        // Polled by the sidecar: a removed snapshot's files are let go here.
        let _ = self.last_checked();
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let as_ref = |id: &Option<LogIdOf<C>>| id.as_ref().map(log_id_ref);
        NodeState {
            node_id: m.id.clone().into(),
            role: role(m.state),
            leader: m.current_leader.clone().map(Into::into),
            term: m.current_term.into(),
            last_applied: as_ref(&m.last_applied),
            snapshot: as_ref(&m.snapshot),
            purged: as_ref(&m.purged),
            committed: as_ref(&m.local_committed),
            // Reported while it is newer than the current snapshot: a restarted node has
            // none (it removes staged files at startup), so the sidecar hands it over again.
            staged: self
                .staged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .filter(|staged| Some(staged.index) > m.snapshot.index()),
        }
    }

    async fn trigger_snapshot(&self) -> Result<(), NodeError> {
        self.raft.trigger().snapshot().await.map_err(fatal)
    }

    fn refused(&self, refusal: &Refusal) {
        self.refusals.count(refusal.code);
    }

    async fn save_snapshot(&self, incoming: Incoming) -> Result<SaveResult, NodeError> {
        let target = incoming.log_id();
        if self
            .current_snapshot()
            .is_some_and(|s| s.index >= target.index)
        {
            return Ok(self.result(SaveOutcome::Stale));
        }

        let refuse = |incoming: &Incoming, refusal: Refusal| {
            if refusal.code.refuses_snapshot() {
                remove_refused(incoming);
            }
            NodeError::Refused(refusal)
        };
        let meta = check_label::<C>(&incoming).map_err(|r| refuse(&incoming, r))?;
        self.check_log(&meta)
            .await
            .map_err(|r| refuse(&incoming, r))?;
        let (verify, checked) = (self.verify_sha256, incoming.clone());
        let against = self.last_checked().filter(|_| self.chunk_proofs);
        let extents = self.extents.clone();
        let started = Instant::now();
        let checks = tokio::task::spawn_blocking(move || {
            check_file::<SM>(&checked, verify, against.as_ref(), extents.as_ref())
        })
        .await
        .map_err(|e| NodeError::Internal(format!("checking snapshot {target}: {e}")))?;
        let checked = checks.map_err(|r| refuse(&incoming, r))?;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let bytes = incoming.file.size();
        match &checked {
            Some((_, c)) => {
                tracing::info!(snapshot = %target, bytes, elapsed_ms, chunks = c.chunks, proven_chunks = c.proven_chunks, proven_bytes = c.proven_bytes, read_through_earlier = c.read_elsewhere, "checked the leader's snapshot chunk by chunk")
            }
            None => {
                tracing::debug!(snapshot = %target, bytes, elapsed_ms, "checked the leader's snapshot")
            }
        }
        let checked = checked.map(|(checked, _)| checked);
        let started = Instant::now();

        let staged_incoming = incoming.clone();
        let staged = self
            .raft
            .with_state_machine(move |sm: &mut SM| {
                Box::pin(async move { sm.force_save_snapshot(staged_incoming).await })
            })
            .await
            .map_err(fatal)?
            .map_err(|mut r| {
                r.message = format!("staging snapshot {target}: {}", r.message);
                refuse(&incoming, r)
            })?;
        if staged == StageOutcome::Stale {
            return Ok(self.result(SaveOutcome::Stale));
        }
        if let Some(checked) = checked {
            *self.checked.lock().unwrap_or_else(|p| p.into_inner()) = Some(checked);
        }
        {
            let mut last = self.staged.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_none_or(|s| s.index < target.index) {
                *last = Some(target);
            }
        }

        tracing::debug!(snapshot = %target, elapsed_ms = started.elapsed().as_millis() as u64, "staged the leader's snapshot");
        let started = Instant::now();
        let applied = self.raft.metrics().borrow_watched().last_applied.index();
        if applied >= Some(target.index) {
            if adopt(&self.raft, target, self.adopt_timeout).await? {
                tracing::info!(snapshot = %target, elapsed_ms = started.elapsed().as_millis() as u64, "adopted the leader's snapshot");
                return Ok(self.result(SaveOutcome::Adopted));
            }
            tracing::warn!(
                snapshot = %target,
                timeout_s = self.adopt_timeout.as_secs(),
                "staged snapshot not adopted in time; the next snapshot build adopts it"
            );
            return Ok(self.result(SaveOutcome::Staged));
        }

        // Not applied that far yet: adopting now could purge logs the node has not applied.
        let raft = self.raft.clone();
        let (catch_up, adopt_timeout) = (self.catch_up_timeout, self.adopt_timeout);
        tokio::spawn(async move {
            let caught_up = raft
                .wait(Some(catch_up))
                .applied_index_at_least(Some(target.index), format!("applied {target}"))
                .await;
            if let Err(e) = caught_up {
                tracing::warn!(snapshot = %target, error = %e, "staged snapshot: node did not catch up");
                return;
            }
            match adopt(&raft, target, adopt_timeout).await {
                Ok(true) => {
                    tracing::info!(snapshot = %target, "adopted the leader's staged snapshot")
                }
                Ok(false) => {
                    tracing::warn!(snapshot = %target, "staged snapshot not adopted in time")
                }
                Err(e) => {
                    tracing::warn!(snapshot = %target, error = %e, "staged snapshot not adopted")
                }
            }
        });
        tracing::info!(snapshot = %target, applied = ?applied, "staged the leader's snapshot until applied catches up");
        Ok(self.result(SaveOutcome::Staged))
    }
}

/// "Is this node the leader?", kept current from openraft's metrics: cheap enough to read in
/// `try_create_snapshot_builder`. Create it before the state machine (which keeps a clone),
/// then [`LeaderFlag::track`] the `Raft` built from it.
#[derive(Debug, Clone, Default)]
pub struct LeaderFlag(Arc<AtomicBool>);

impl LeaderFlag {
    pub fn new() -> LeaderFlag {
        LeaderFlag::default()
    }

    pub fn is_leader(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub fn set(&self, leader: bool) {
        self.0.store(leader, Ordering::Release);
    }

    /// Follows `raft`'s server state until it shuts down (the flag then reads `false`).
    /// It lags the state change by a moment; the builder's decision tolerates that (a new
    /// leader may defer one build; a deposed one may build one more).
    pub fn track<C, SM>(&self, raft: &Raft<C, SM>) -> tokio::task::JoinHandle<()>
    where
        C: RaftTypeConfig,
        SM: RaftStateMachine<C>,
    {
        let mut metrics = raft.metrics();
        let flag = self.clone();
        tokio::spawn(async move {
            loop {
                let leading = metrics.borrow_watched().state == ServerState::Leader;
                flag.set(leading);
                if metrics.changed().await.is_err() {
                    flag.set(false);
                    return;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ids_convert_in_both_leader_id_modes() {
        let adv = LogId::new(
            leader_id_adv::LeaderId::<u64, u64> {
                term: 4,
                node_id: 2,
            },
            17,
        );
        assert_eq!(log_id_ref(&adv), LogIdRef { term: 4, index: 17 });
        let std = LogId::new(leader_id_std::CommittedLeaderId::<u32>::new(5), 9);
        assert_eq!(log_id_ref(&std), LogIdRef { term: 5, index: 9 });
    }

    #[test]
    fn server_states_map_to_roles() {
        assert_eq!(role(ServerState::Leader), Role::Leader);
        assert_eq!(role(ServerState::Follower), Role::Follower);
        assert_eq!(role(ServerState::Learner), Role::Learner);
        assert_eq!(role(ServerState::Candidate), Role::Candidate);
        assert_eq!(role(ServerState::Shutdown), Role::Shutdown);
    }

    /// An application's validation written for the bytes its own encoder produces: it
    /// panics on anything else (an `unwrap` on a length prefix, say).
    struct DecoderThatPanicsOnGarbage;

    impl AdoptSnapshot for DecoderThatPanicsOnGarbage {
        fn validate(data: &mut dyn std::io::Read, _: LogIdRef) -> Result<(), String> {
            let mut head = [0u8; 4];
            data.read_exact(&mut head).map_err(|e| e.to_string())?;
            assert_eq!(&head, b"GOOD", "not a snapshot of ours");
            Ok(())
        }

        async fn force_save_snapshot(&mut self, _: Incoming) -> Result<StageOutcome, Refusal> {
            Err(Refusal::new(ErrorCode::Internal, "not staged in this test"))
        }
    }

    /// `AdoptSnapshot::validate` is documented to run after the file's sha256 was checked,
    /// and a damaged handover is reported as `checksum_mismatch`, whatever the validation
    /// makes of the damaged bytes. With the sha256 taken beside the validation, the
    /// validation sees unverified bytes: one that panics on them must still end in
    /// `checksum_mismatch` (permanent for this file), not in a panic that the node answers
    /// `internal` (transient: the sidecar hands the same file over again).
    /// With and without a chunk index beside the file.
    #[test]
    fn a_validation_that_panics_on_damaged_bytes_is_a_checksum_mismatch() {
        use snaprelay_contract::chunking::{ChunkParams, IndexWriter, Indexer};
        for with_index in [false, true] {
            let root = tempfile::tempdir().unwrap();
            let incoming_dir = root.path().canonicalize().unwrap();
            let path = incoming_dir.join("x.bin");
            std::fs::write(&path, b"BAD!").unwrap();
            // The sha256 the sidecar verified: that of the genuine file.
            let genuine = crate::verify::sha256_of(&mut &b"GOOD"[..]).unwrap().0;
            if with_index {
                let params = ChunkParams::default();
                let file = std::fs::File::create(incoming_dir.join("x.chunks")).unwrap();
                let mut indexer = Indexer::with_sink(params, IndexWriter::new(file).unwrap());
                indexer.feed(b"GOOD").unwrap();
                let (writer, size, sha256) = indexer.end().unwrap();
                writer.finish(params, size, sha256).unwrap();
            }
            let envelope = snaprelay_contract::snapdir::Envelope {
                format: 1,
                last_log_index: 9,
                last_log_term: 2,
                data: "x.bin".into(),
                size: 4,
                raft_meta: serde_json::json!({"last_log_id": null}),
                chunk_index: with_index.then(|| "x.chunks".to_owned()),
                sha256: None,
            };
            let incoming =
                Incoming::open(envelope, path.to_str().unwrap(), &incoming_dir, genuine).unwrap();
            assert_eq!(incoming.index.is_some(), with_index);
            let checked = std::panic::catch_unwind(|| {
                check_file::<DecoderThatPanicsOnGarbage>(&incoming, true, None, &Fiemap)
            });
            let refusal = checked
                .expect("the validation's panic escaped the check of a file that fails its sha256")
                .unwrap_err();
            assert_eq!(refusal.code, ErrorCode::ChecksumMismatch, "{refusal}");
            if with_index {
                assert!(
                    refusal.message.contains("chunk 0 (4 bytes at offset 0)"),
                    "{refusal}"
                );
            }
        }
    }

    #[test]
    fn leader_flag_is_shared_between_clones() {
        let flag = LeaderFlag::new();
        let seen_by_state_machine = flag.clone();
        assert!(!seen_by_state_machine.is_leader());
        flag.set(true);
        assert!(seen_by_state_machine.is_leader());
    }
}
