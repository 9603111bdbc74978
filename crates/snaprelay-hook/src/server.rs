//! [`HookServer`]: the node's end of the IPC hook (DESIGN §3), a Unix domain socket.
//!
//! It owns the socket file (mode 0600, or 0660 in group mode), checks every peer's
//! credentials (SO_PEERCRED, SO_PEERGROUPS) against an [`AllowList`], and serves the protocol of
//! [`snaprelay_contract::ipc`]: one JSON request per line, one response per line, in order.
//! A bad line (too long, not JSON, unknown op, wrong version) gets an error response and the
//! connection stays up; an I/O error, an idle timeout or shutdown closes it. A refused peer
//! gets one `forbidden` line; the server then shuts its write side and reads (bounded) what
//! the peer already sent before closing, so that the peer's request write does not fail with
//! a broken pipe before it can read why. What a request
//! does is the [`Node`]'s business; the server checks what it can without the node, notably
//! that a `save_snapshot` path is a complete file directly inside the incoming directory.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use snaprelay_contract::ipc::{
    parse_request, read_line, write_frame, ErrorCode, FrameError, Request, ResponseFrame, Status,
    TriggerResult,
};
use snaprelay_contract::snapdir::Envelope;
use tokio::io::BufReader;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::access::{peer_credentials, AllowList, AllowListError, Principal};
use crate::adopt::{is_sha256_hex, Incoming};
use crate::node::{Node, NodeError};
use crate::snapshot_dir::prepare_incoming_dir;
use crate::verify::Refusal;

/// How the hook socket is set up.
#[derive(Debug, Clone)]
pub struct HookConfig {
    pub socket_path: PathBuf,
    /// Mode 0660 (the sidecar runs as another user of the node's group) instead of 0600.
    pub group_access: bool,
    /// Users (names or uids) allowed to connect. With `allow_groups`, empty means the
    /// default: the node's own uid and, in group mode, the socket's group.
    pub allow_users: Vec<Principal>,
    /// Groups (names or gids) whose members may connect: the peer's primary gid or any of
    /// its supplementary groups.
    pub allow_groups: Vec<Principal>,
    /// Reported by `status`, so that the sidecar knows where to look.
    pub snapshot_dir: PathBuf,
    /// Where the sidecar puts verified files; `save_snapshot` paths must be directly inside.
    /// `bind` creates it, or corrects the mode of one this process owns: 2770 in group mode
    /// (setgid, so files the sidecar writes belong to the node's group), else 0700.
    pub incoming_dir: PathBuf,
    /// A connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Connections beyond this many are told `unavailable` and closed.
    pub max_connections: usize,
}

impl HookConfig {
    /// Mode 0600, only the node's own uid, 5 min idle timeout, 16 connections.
    pub fn new(
        socket_path: impl Into<PathBuf>,
        snapshot_dir: impl Into<PathBuf>,
        incoming_dir: impl Into<PathBuf>,
    ) -> HookConfig {
        HookConfig {
            socket_path: socket_path.into(),
            group_access: false,
            allow_users: Vec::new(),
            allow_groups: Vec::new(),
            snapshot_dir: snapshot_dir.into(),
            incoming_dir: incoming_dir.into(),
            idle_timeout: Duration::from_secs(300),
            max_connections: 16,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("hook socket path {0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("hook socket {0} is in use by a running process")]
    InUse(PathBuf),
    #[error("{action} hook socket {path}: {source}")]
    Socket {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    AllowList(#[from] AllowListError),
    #[error("{what} {path}: {source}")]
    Dir {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What every connection needs to know.
struct Context {
    allow: AllowList,
    snapshot_dir: PathBuf,
    /// Canonical, so that canonical request paths can be compared with it.
    incoming_dir: PathBuf,
    idle_timeout: Duration,
}

/// A bound hook socket, ready to [`run`](HookServer::run).
pub struct HookServer<N> {
    listener: UnixListener,
    socket_path: PathBuf,
    node: Arc<N>,
    context: Arc<Context>,
    connections: Arc<Semaphore>,
}

impl<N: Node> HookServer<N> {
    /// Creates the socket and sets its mode. A stale socket file at the path (left by a
    /// crash) is replaced; anything else there, or a socket some process still serves, is an
    /// error naming the path. Must be called inside a tokio runtime.
    pub fn bind(config: HookConfig, node: N) -> Result<HookServer<N>, HookError> {
        let canonical = |what, path: &Path| {
            path.canonicalize().map_err(|source| HookError::Dir {
                what,
                path: path.to_owned(),
                source,
            })
        };
        prepare_incoming_dir(&config.incoming_dir, config.group_access).map_err(|source| {
            HookError::Dir {
                what: "preparing the incoming directory",
                path: config.incoming_dir.clone(),
                source,
            }
        })?;
        let incoming_dir = canonical("incoming directory", &config.incoming_dir)?;
        let snapshot_dir = canonical("snapshot directory", &config.snapshot_dir)?;
        let path = config.socket_path;
        let socket_err = |action, path: &Path| {
            let path = path.to_owned();
            move |source| HookError::Socket {
                action,
                path,
                source,
            }
        };

        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(HookError::InUse(path));
                }
                std::fs::remove_file(&path).map_err(socket_err("removing stale", &path))?;
            }
            Ok(_) => return Err(HookError::NotASocket(path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(socket_err("inspecting", &path)(e)),
        }

        let listener = UnixListener::bind(&path).map_err(socket_err("binding", &path))?;
        let mode = if config.group_access { 0o660 } else { 0o600 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(socket_err("setting the mode of", &path))?;
        // The socket file is owned by the uid (and group) this process creates files as: the
        // node's uid, and its gid or the directory's group when that is setgid.
        let meta = std::fs::metadata(&path).map_err(socket_err("inspecting", &path))?;
        let socket_gid = config.group_access.then(|| meta.gid());
        let allow = AllowList::resolve(
            &config.allow_users,
            &config.allow_groups,
            meta.uid(),
            socket_gid,
        )?;
        tracing::info!(socket = %path.display(), mode = format!("{mode:o}"), allowed = %allow, "hook socket ready");

        Ok(HookServer {
            listener,
            socket_path: path,
            node: Arc::new(node),
            context: Arc::new(Context {
                allow,
                snapshot_dir,
                incoming_dir,
                idle_timeout: config.idle_timeout,
            }),
            connections: Arc::new(Semaphore::new(config.max_connections)),
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Serves connections until `shutdown` completes, then closes them all (an interrupted
    /// request is safe to abandon: staging is a rename inside the state machine, and the
    /// sidecar retries) and removes the socket file.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(());
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => accepted,
                // Reap finished connections so the set does not grow.
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            };
            match accepted {
                Ok((stream, _)) => {
                    let permit = self.connections.clone().try_acquire_owned().ok();
                    let connection = Connection {
                        node: self.node.clone(),
                        context: self.context.clone(),
                        stop: stop_rx.clone(),
                    };
                    tasks.spawn(connection.serve(stream, permit));
                }
                Err(e) => {
                    // Typically EMFILE: wait instead of spinning; connections in flight go on.
                    tracing::warn!(error = %e, "accepting a hook connection failed");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
        drop(stop_tx);
        while tasks.join_next().await.is_some() {}
        if std::fs::symlink_metadata(&self.socket_path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&self.socket_path);
        }
        tracing::info!(socket = %self.socket_path.display(), "hook socket closed");
    }
}

struct Connection<N> {
    node: Arc<N>,
    context: Arc<Context>,
    /// Closed (sender dropped) when the server shuts down.
    stop: watch::Receiver<()>,
}

impl<N: Node> Connection<N> {
    async fn serve(mut self, stream: UnixStream, permit: Option<OwnedSemaphorePermit>) {
        let peer = peer_credentials(&stream);
        let (read, mut write) = stream.into_split();
        if permit.is_none() {
            let refusal = ResponseFrame::error(ErrorCode::Unavailable, "too many hook connections");
            tracing::warn!("refused a hook connection: too many connections");
            refuse(read, write, &refusal).await;
            return;
        }
        let uid = match self.context.allow.check(peer) {
            Ok(peer) => peer.uid,
            Err(refusal) => {
                // A refused peer does not hold one of the connection slots while drained.
                drop(permit);
                tracing::warn!(reason = %refusal, "refused a hook connection");
                let response = ResponseFrame::error(ErrorCode::Forbidden, refusal.to_string());
                refuse(read, write, &response).await;
                return;
            }
        };
        tracing::debug!(uid, "hook connection");

        let mut reader = BufReader::new(read);
        loop {
            let line = tokio::select! {
                _ = self.stop.changed() => return,
                line = tokio::time::timeout(self.context.idle_timeout, read_line(&mut reader)) => line,
            };
            let request = match line {
                Err(_elapsed) => {
                    tracing::debug!(uid, "closing idle hook connection");
                    return;
                }
                Ok(Ok(line)) => parse_request(&line),
                Ok(Err(e)) => Err(e),
            };
            let response = match request {
                Ok(request) => tokio::select! {
                    _ = self.stop.changed() => return,
                    response = handle(&*self.node, &self.context, request) => response,
                },
                Err(e) => match e.response() {
                    Some(response) => {
                        tracing::debug!(uid, error = %e, "bad hook request");
                        response
                    }
                    None => {
                        if !matches!(e, FrameError::Closed) {
                            tracing::debug!(uid, error = %e, "hook connection failed");
                        }
                        return;
                    }
                },
            };
            if let Err(e) = write_frame(&mut write, &response).await {
                tracing::debug!(uid, error = %e, "writing a hook response failed");
                return;
            }
        }
    }
}

/// How long, and how much, a refused connection is drained before it is closed.
const REFUSAL_DRAIN_TIME: Duration = Duration::from_secs(2);
const REFUSAL_DRAIN_BYTES: u64 = 1 << 20;

/// Sends a refusal, then shuts the write side and reads what the peer sends until it closes
/// (bounded in time and bytes). Closing at once would make a peer that is still writing its
/// request see EPIPE instead of the refusal.
async fn refuse(
    read: tokio::net::unix::OwnedReadHalf,
    mut write: tokio::net::unix::OwnedWriteHalf,
    response: &ResponseFrame,
) {
    use tokio::io::AsyncReadExt;
    if write_frame(&mut write, response).await.is_err() {
        return;
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut write).await;
    let (mut sink, mut read) = (tokio::io::sink(), read.take(REFUSAL_DRAIN_BYTES));
    let drain = tokio::io::copy(&mut read, &mut sink);
    let _ = tokio::time::timeout(REFUSAL_DRAIN_TIME, drain).await;
}

async fn handle<N: Node>(node: &N, context: &Context, request: Request) -> ResponseFrame {
    match request {
        Request::Status {} => {
            let state = node.state();
            ResponseFrame::ok(&Status {
                node_id: state.node_id,
                role: state.role,
                leader: state.leader,
                term: state.term,
                last_applied: state.last_applied,
                snapshot: state.snapshot,
                purged: state.purged,
                snapshot_dir: context.snapshot_dir.display().to_string(),
                incoming_dir: context.incoming_dir.display().to_string(),
            })
        }
        Request::TriggerSnapshot {} => match node.trigger_snapshot().await {
            Ok(()) => ResponseFrame::ok(&TriggerResult { queued: true }),
            Err(e) => ResponseFrame::error(e.code(), e.to_string()),
        },
        Request::SaveSnapshot {
            envelope,
            path,
            sha256,
        } => {
            let incoming = match check_save(context, envelope, &path, sha256) {
                Ok(incoming) => incoming,
                Err(refusal) => {
                    tracing::warn!(reason = %refusal, code = ?refusal.code, "refused save_snapshot");
                    node.refused(&refusal);
                    return ResponseFrame::error(refusal.code, refusal.message);
                }
            };
            let snapshot = incoming.log_id();
            match node.save_snapshot(incoming).await {
                Ok(result) => {
                    tracing::info!(%snapshot, outcome = ?result.outcome, "save_snapshot");
                    ResponseFrame::ok(&result)
                }
                Err(e) => {
                    tracing::warn!(%snapshot, error = %e, code = ?e.code(), "save_snapshot failed");
                    if let NodeError::Refused(refusal) = &e {
                        node.refused(refusal);
                    }
                    ResponseFrame::error(e.code(), e.to_string())
                }
            }
        }
    }
}

/// What the server checks of a `save_snapshot` before the node sees it: the envelope, the
/// path, and that the node can open the file (a regular file of the envelope's size).
fn check_save(
    context: &Context,
    envelope: Envelope,
    path: &str,
    sha256: String,
) -> Result<Incoming, Refusal> {
    let bad = |message| Refusal::new(ErrorCode::BadRequest, message);
    envelope
        .validate()
        .map_err(|reason| bad(format!("envelope: {reason}")))?;
    if !is_sha256_hex(&sha256) {
        return Err(bad(format!(
            "sha256 {sha256:?} is not 64 lowercase hex digits"
        )));
    }
    Incoming::open(envelope, path, &context.incoming_dir, sha256)
}
