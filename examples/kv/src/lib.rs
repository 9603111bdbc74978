//! An example openraft key-value node that adopts its leader's snapshots through
//! `snaprelay-hook` instead of building its own: a template to copy, and the node the
//! end-to-end tests run as real processes.
//!
//! # Layout
//!
//! - [`log_store`]: an in-memory, generic `RaftLogStorage` (logs and vote are lost on restart:
//!   fine for an example, not for production).
//! - [`state_machine`]: the key-value map as a `snaprelay_hook::SnapshotApp` (apply, and
//!   snapshot bytes that are a pure function of the applied log prefix); the hook's
//!   `SnapshotStore` around it is the state machine openraft runs, and does all the snapshot
//!   bookkeeping and checks.
//! - [`network`]: raft RPCs to the other nodes over HTTP (reqwest).
//! - [`api`]: the HTTP server: raft RPC endpoints and the client API (axum).
//! - [`node`]: wiring: directories, raft, hook socket, HTTP server, shutdown.

pub mod api;
pub mod log_store;
pub mod network;
pub mod node;
pub mod state_machine;

use serde::{Deserialize, Serialize};

/// A write: set `key` to `value`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub key: String,
    pub value: String,
}

/// The answer to a write: the value it replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub previous: Option<String>,
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "set {:?}", self.key)
    }
}

impl std::fmt::Display for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.previous {
            Some(_) => f.write_str("replaced"),
            None => f.write_str("inserted"),
        }
    }
}

openraft::declare_raft_types!(
    /// The example's openraft types: u64 node ids, `BasicNode { addr }` (the node's HTTP
    /// address), tokio.
    pub TypeConfig:
        D = Request,
        R = Response,
);

pub type NodeId = u64;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig, state_machine::KvStateMachine>;
