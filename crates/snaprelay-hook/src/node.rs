//! [`Node`]: everything the hook server needs from the node, and nothing more. The real one is
//! [`crate::RaftNode`]; the server's tests use a test double.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use snaprelay_contract::ipc::{ErrorCode, LogIdRef, Role, SaveResult};

use crate::adopt::Incoming;
use crate::verify::Refusal;

/// The node's raft state, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub node_id: u64,
    pub role: Role,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_applied: Option<LogIdRef>,
    /// Last log id covered by the current snapshot, as openraft records it.
    pub snapshot: Option<LogIdRef>,
    pub purged: Option<LogIdRef>,
    /// The node's local committed log id.
    pub committed: Option<LogIdRef>,
    /// The snapshot staged but not yet adopted, if any.
    pub staged: Option<LogIdRef>,
}

/// Why the node could not serve a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// The node is shutting down or has stopped (openraft `Fatal`).
    #[error("node unavailable: {0}")]
    Unavailable(String),
    /// The node tried and failed (e.g. the state machine could not stage the file).
    #[error("{0}")]
    Internal(String),
    /// The node refused the snapshot (checksum, validation, log), with the code to report.
    #[error("{0}")]
    Refused(Refusal),
}

impl NodeError {
    /// The protocol error code a client sees.
    pub fn code(&self) -> ErrorCode {
        match self {
            NodeError::Unavailable(_) => ErrorCode::Unavailable,
            NodeError::Internal(_) => ErrorCode::Internal,
            NodeError::Refused(refusal) => refusal.code,
        }
    }
}

/// The node as the hook server sees it.
pub trait Node: Send + Sync + 'static {
    /// The current raft state (cheap: read from the latest metrics).
    fn state(&self) -> NodeState;

    /// Queues a snapshot build and returns without waiting for it.
    fn trigger_snapshot(&self) -> impl Future<Output = Result<(), NodeError>> + Send;

    /// Hands the node a verified snapshot whose data file the server has opened
    /// ([`Incoming::open`]): check it, stage it, and adopt it when possible.
    fn save_snapshot(
        &self,
        incoming: Incoming,
    ) -> impl Future<Output = Result<SaveResult, NodeError>> + Send;

    /// Told of every `save_snapshot` the server or the node refused, to count it.
    fn refused(&self, refusal: &Refusal) {
        let _ = refusal;
    }
}

/// A shared node is a node (the application keeps a handle for its own metrics).
impl<N: Node> Node for Arc<N> {
    fn state(&self) -> NodeState {
        (**self).state()
    }

    fn trigger_snapshot(&self) -> impl Future<Output = Result<(), NodeError>> + Send {
        (**self).trigger_snapshot()
    }

    fn save_snapshot(
        &self,
        incoming: Incoming,
    ) -> impl Future<Output = Result<SaveResult, NodeError>> + Send {
        (**self).save_snapshot(incoming)
    }

    fn refused(&self, refusal: &Refusal) {
        (**self).refused(refusal)
    }
}

/// `save_snapshot` refusals by error code (`checksum_mismatch`, `invalid_snapshot`, …), for
/// the application's metrics. Clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct RefusalCounts(Arc<Mutex<BTreeMap<String, u64>>>);

impl RefusalCounts {
    pub fn count(&self, code: ErrorCode) {
        // Error codes serialize as plain strings.
        let name = serde_json::to_value(code)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("{code:?}"));
        *self.lock().entry(name).or_default() += 1;
    }

    /// The counts so far, by code name.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        // Plain counters: a panic elsewhere cannot leave them inconsistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
