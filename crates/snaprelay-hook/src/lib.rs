//! The node side of snaprelay: what an openraft application links to let its sidecar hand it
//! the leader's snapshots (DESIGN §1, §3). It depends on openraft and tokio, never on object
//! storage, file watching or the daemon.
//!
//! # Layout
//!
//! - [`adopt`]: what the state machine implements ([`AdoptSnapshot`]) and what it is given
//!   ([`Incoming`]): a verified data file in the incoming directory, to stage.
//! - [`decision`]: the pure rule `try_create_snapshot_builder` follows: adopt the staged
//!   snapshot, build locally, or defer.
//! - [`snapshot_dir`]: [`SnapshotDir`], the snapshot directory contract for the node's own
//!   builder: write a snapshot (data, then the envelope as commit marker), find the newest,
//!   prune old ones, stage and commit adopted files.
//! - [`access`]: who may talk to the socket ([`AllowList`]: users and groups, by name or
//!   number, checked against the peer's SO_PEERCRED and SO_PEERGROUPS).
//! - [`node`]: the [`Node`] trait, the server's whole view of the node.
//! - [`raft`]: [`RaftNode`], the [`Node`] for an openraft `Raft`: status from its metrics and
//!   the adoption protocol (stage through `with_state_machine`, then trigger a build); and
//!   [`LeaderFlag`], a cheap "am I leader" for the snapshot builder.
//! - [`verify`]: what the node checks of a file before staging it: it can open it, a regular
//!   file of the envelope's size, and which inode it is.
//! - [`server`]: [`HookServer`], the Unix socket server: peer check, framing, dispatch.
//!
//! # Wiring it up
//!
//! ```text
//! let snapshots = SnapshotDir::open(data_dir.join("snapshots"))?;
//! let leader = LeaderFlag::new();
//! let sm = MyStateMachine::new(snapshots.clone(), leader.clone(), BuildPolicy::new(defer_limit));
//! let raft = Raft::new(id, config, network, log_store, sm).await?;
//! leader.track(&raft);
//! let config = HookConfig::new(socket_path, snapshots.path(), snapshots.incoming_dir());
//! let server = HookServer::bind(config, RaftNode::new(raft.clone()))?;
//! tokio::spawn(server.run(shutdown));
//! ```

pub mod access;
pub mod adopt;
pub mod decision;
pub mod node;
pub mod raft;
pub mod server;
pub mod snapshot_dir;
pub mod store;
pub mod verify;

pub use access::{AllowList, AllowListError, PeerCredentials, Principal};
pub use adopt::{AdoptSnapshot, Incoming, StageOutcome};
pub use decision::is_newer;
pub use decision::{BuildDecision, BuildInputs, BuildPolicy};
pub use node::{Node, NodeError, NodeState, RefusalCounts};
pub use raft::{log_id_ref, CommittedTerm, LeaderFlag, RaftNode};
pub use server::{HookConfig, HookError, HookServer};
pub use snaprelay_contract::ipc::LogIdRef;
pub use snapshot_dir::{SnapshotDir, SnapshotDirError, REJECTED_DIR};
pub use store::{
    serve_hook, SnapshotApp, SnapshotCounters, SnapshotFile, SnapshotStore, StoreBuilder,
    StoreHandle, StoreNode, StoreOptions,
};
pub use verify::{IncomingFile, Refusal};

/// The contract types the hook speaks, re-exported so that an application needs one dependency.
pub use snaprelay_contract::{ipc, snapdir};
