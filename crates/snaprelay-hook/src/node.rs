//! [`Node`]: everything the hook server needs from the node, and nothing more. The real one is
//! [`crate::RaftNode`]; the server's tests use a test double.

use std::future::Future;

use snaprelay_contract::ipc::{ErrorCode, LogIdRef, Role, SaveResult};

use crate::adopt::Incoming;

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
}

impl NodeError {
    /// The protocol error code a client sees.
    pub fn code(&self) -> ErrorCode {
        match self {
            NodeError::Unavailable(_) => ErrorCode::Unavailable,
            NodeError::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// The node as the hook server sees it.
pub trait Node: Send + Sync + 'static {
    /// The current raft state (cheap: read from the latest metrics).
    fn state(&self) -> NodeState;

    /// Queues a snapshot build and returns without waiting for it.
    fn trigger_snapshot(&self) -> impl Future<Output = Result<(), NodeError>> + Send;

    /// Hands the node a verified snapshot whose data file the server has checked
    /// ([`crate::adopt::resolve_incoming`]): stage it, and adopt it when possible.
    fn save_snapshot(
        &self,
        incoming: Incoming,
    ) -> impl Future<Output = Result<SaveResult, NodeError>> + Send;
}
