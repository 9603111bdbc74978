//! Wiring of one node: snapshot directory, state machine, raft, hook socket, HTTP server; and
//! an orderly shutdown (HTTP, then the hook socket, then raft).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use openraft::storage::RaftLogStorage;
use openraft::SnapshotPolicy;
use snaprelay_hook::{serve_hook, HookConfig, Principal, SnapshotDir, StoreOptions};
use tokio::sync::watch;

use crate::api::{router, App};
use crate::log_store::LogStore;
use crate::network::HttpNetwork;
use crate::state_machine::{KvApp, KvStateMachine};
use crate::{NodeId, Raft, TypeConfig};

/// A node's settings, validated by the binary's argument parser.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Where the HTTP server listens; also the address other nodes use for raft RPCs.
    pub http: SocketAddr,
    /// Data directory; snapshots live in `<dir>/snapshots`, the sidecar's files arrive in
    /// `<dir>/snapshots/.incoming`.
    pub dir: PathBuf,
    pub hook_socket: PathBuf,
    pub hook_group_access: bool,
    pub hook_allow_users: Vec<Principal>,
    pub hook_allow_groups: Vec<Principal>,
    /// openraft `SnapshotPolicy::LogsSinceLast(n)`.
    pub snapshot_policy_logs: u64,
    pub max_in_snapshot_log_to_keep: u64,
    /// A follower builds its own snapshot once this many logs are not covered by one.
    pub defer_limit: u64,
    /// Committed snapshots kept in the snapshot directory.
    pub keep_snapshots: usize,
}

/// Runs the node until `shutdown` completes.
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let snapshot_dir = config.dir.join("snapshots");
    let snapshots = SnapshotDir::open(&snapshot_dir)
        .with_context(|| format!("opening snapshot directory {}", snapshot_dir.display()))?;
    let kv = KvApp::default();
    let options = StoreOptions {
        defer_limit: config.defer_limit,
        keep_snapshots: config.keep_snapshots,
    };
    let state_machine = KvStateMachine::open(snapshots.clone(), kv.clone(), options)
        .with_context(|| format!("loading state from {}", snapshots.path().display()))?;
    let store = state_machine.handle();

    let raft_config = openraft::Config {
        cluster_name: "snaprelay-example-kv".into(),
        heartbeat_interval: 250,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        // One request carries a whole snapshot.
        install_snapshot_timeout: 30_000,
        // Entries per append request: bounded so that a batch of large values stays well
        // under the HTTP body limit.
        max_payload_entries: 64,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_policy_logs),
        // Keep enough log behind a snapshot that a follower being sent a snapshot, or one a
        // little behind, can still catch up from the log.
        max_in_snapshot_log_to_keep: config.max_in_snapshot_log_to_keep,
        // The example's log store is in memory, so a restarted node comes back with its log
        // reverted to its newest snapshot. Without this, the leader treats that as a bug and
        // stops. A real application persists its log and vote and leaves this off.
        allow_log_reversion: Some(true),
        ..Default::default()
    }
    .validate()
    .context("raft configuration")?;
    let network = HttpNetwork::new().context("creating the HTTP client")?;
    let mut log_store = LogStore::<TypeConfig>::new();
    // The hook checks handed-over snapshots against this node's own log.
    let log_reader = log_store.get_log_reader().await;
    let raft: Raft = openraft::Raft::new(
        config.id,
        Arc::new(raft_config),
        network,
        log_store,
        state_machine,
    )
    .await
    .context("starting raft")?;

    let mut hook_config = HookConfig::new(
        &config.hook_socket,
        snapshots.path(),
        snapshots.incoming_dir(),
    );
    hook_config.group_access = config.hook_group_access;
    hook_config.allow_users = config.hook_allow_users.clone();
    hook_config.allow_groups = config.hook_allow_groups.clone();
    let hook = serve_hook(&raft, &store, log_reader, hook_config)?;

    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("listening on {}", config.http))?;
    let app = App {
        id: config.id,
        addr: config.http.to_string(),
        raft: raft.clone(),
        kv,
        store,
        hook: hook.node(),
        isolated: Default::default(),
    };
    tracing::info!(id = config.id, http = %config.http, hook = %config.hook_socket.display(), "node running");

    // Dropping `stop` tells the hook server to stop.
    let (stop, stopped) = watch::channel(());
    let hook_task = tokio::spawn(hook.run(async move {
        let mut stopped = stopped;
        let _ = stopped.changed().await;
    }));
    let served = axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP");
    drop(stop);
    let _ = hook_task.await;
    raft.shutdown().await.context("stopping raft")?;
    tracing::info!(id = config.id, "node stopped");
    served
}
