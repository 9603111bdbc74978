//! `kv-node`: one node of the example key-value cluster. Parses arguments, sets up logging,
//! runs the node until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use snaprelay_example_kv::node::{run, NodeConfig};
use snaprelay_hook::Principal;

/// An openraft key-value node whose followers adopt the leader's snapshots through a
/// snaprelay hook socket.
#[derive(Debug, Parser)]
#[command(name = "kv-node", version)]
struct Args {
    /// This node's raft id.
    #[arg(long)]
    id: u64,
    /// HTTP listen address (client API and raft RPCs), e.g. 127.0.0.1:21001.
    #[arg(long)]
    http: SocketAddr,
    /// Data directory; snapshots go to DIR/snapshots.
    #[arg(long)]
    dir: PathBuf,
    /// Path of the hook's Unix socket, for the snaprelay sidecar.
    #[arg(long)]
    hook_socket: PathBuf,
    /// Make the hook socket group-accessible (0660) instead of 0600.
    #[arg(long)]
    hook_group_access: bool,
    /// A user (name or uid) allowed on the hook socket (repeatable). Default, when no user
    /// or group is given: this process's uid and, with --hook-group-access, the socket's
    /// group.
    #[arg(long = "hook-allow-user", value_name = "NAME|UID")]
    hook_allow_users: Vec<Principal>,
    /// A group (name or gid) whose members may use the hook socket (repeatable): the
    /// peer's primary or any supplementary group.
    #[arg(long = "hook-allow-group", value_name = "NAME|GID")]
    hook_allow_groups: Vec<Principal>,
    /// Build (or adopt) a snapshot every N applied logs.
    #[arg(long, default_value_t = 500)]
    snapshot_policy_logs: u64,
    /// Logs kept behind a snapshot when purging.
    #[arg(long, default_value_t = 5000)]
    max_in_snapshot_log_to_keep: u64,
    /// A follower waits for the leader's snapshot until this many logs are not covered by a
    /// snapshot, then builds its own [default: 4 x --snapshot-policy-logs].
    #[arg(long)]
    defer_limit: Option<u64>,
    /// Committed snapshots kept in the snapshot directory.
    #[arg(long, default_value_t = 2)]
    keep_snapshots: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let config = NodeConfig {
        id: args.id,
        http: args.http,
        dir: args.dir,
        hook_socket: args.hook_socket,
        hook_group_access: args.hook_group_access,
        hook_allow_users: args.hook_allow_users,
        hook_allow_groups: args.hook_allow_groups,
        snapshot_policy_logs: args.snapshot_policy_logs,
        max_in_snapshot_log_to_keep: args.max_in_snapshot_log_to_keep,
        defer_limit: args
            .defer_limit
            .unwrap_or(args.snapshot_policy_logs.saturating_mul(4)),
        keep_snapshots: args.keep_snapshots,
    };
    match run(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kv-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            eprintln!("kv-node: cannot watch SIGTERM ({e}); stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
