//! The node side of snaprelay: what an openraft application links to let its sidecar hand it
//! the leader's snapshots. It depends on openraft and tokio, never on object
//! storage, file watching or the daemon.
//!
//! # Using it
//!
//! An application supplies its state as a [`SnapshotApp`] (apply entries, copy the state,
//! encode a copy into a writer, decode it from a reader, restore a decoded copy).
//! [`SnapshotStore`] wraps it as the `RaftStateMachine` openraft runs and owns everything
//! else about snapshots, every check included; [`serve_hook`] serves the sidecar's socket
//! with a [`RaftNode`] that checks handed-over snapshots against the node's own log.
//! `examples/minimal.rs` is the complete snaprelay-specific code of an integration (the
//! README shows it):
//!
//! ```text
//! let log_reader = log.get_log_reader().await;
//! let store = SnapshotStore::open(SnapshotDir::open(data_dir.join("snapshots"))?, app, options)?;
//! let handle = store.handle();
//! let raft = Raft::new(id, config, network, log, store).await?;
//! let hook = serve_hook(&raft, &handle, log_reader, HookConfig::new(socket, handle.dir().path(), handle.dir().incoming_dir()))?;
//! tokio::spawn(hook.run(shutdown));
//! ```
//!
//! Refusals reach the sidecar as distinct protocol error codes (see [`ipc`]): `unreadable`,
//! `checksum_mismatch`, `invalid_snapshot`, `not_committed` (transient), `log_mismatch`.
//!
//! # Layout
//!
//! - [`store`]: [`SnapshotStore`], the snapshot side of a state machine around the
//!   application's [`SnapshotApp`]: current, staged, the build decision, the adopt builder,
//!   replicated installs, startup; and [`serve_hook`].
//! - [`adopt`]: what the hook stages into ([`AdoptSnapshot`], implemented by the store) and
//!   what it hands over ([`Incoming`]): a file in the incoming directory, opened by the node.
//! - [`verify`]: what the node checks of a file before staging it: it can open it, a regular
//!   file of the envelope's size, its sha256, which inode it is.
//! - [`decision`]: the pure rule `try_create_snapshot_builder` follows: adopt the staged
//!   snapshot, build locally, or defer.
//! - [`snapshot_dir`]: [`SnapshotDir`], the snapshot directory contract: write a snapshot
//!   (data, chunk index, then the envelope with its sha256 as commit marker), load the newest
//!   valid one (moving bad ones aside), prune, stage and commit adopted files; the incoming
//!   directory's mode.
//! - [`access`]: who may talk to the socket ([`AllowList`]: users and groups, by name or
//!   number, checked against the peer's SO_PEERCRED and SO_PEERGROUPS).
//! - [`node`]: the [`Node`] trait, the server's whole view of the node.
//! - [`raft`]: [`RaftNode`], the [`Node`] for an openraft `Raft` and its log reader: status
//!   from its metrics, the checks (label, log matching, sha256, validation) and the adoption
//!   protocol (stage through `with_state_machine`, then trigger a build); and [`LeaderFlag`].
//! - [`server`]: [`HookServer`], the Unix socket server: peer check, framing, time bounds,
//!   connection slots, dispatch.

pub mod access;
pub mod adopt;
pub mod chunks;
pub mod decision;
pub mod node;
pub mod raft;
pub mod server;
pub mod snapshot_dir;
pub mod store;
pub mod verify;

pub use access::{AllowList, AllowListError, PeerCredentials, Principal};
pub use adopt::{AdoptSnapshot, Incoming, StageOutcome};
pub use chunks::{Extent, ExtentSource, Fiemap, IncomingIndex};
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
