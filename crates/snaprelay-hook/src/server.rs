//! [`HookServer`]: the node's end of the IPC hook (the README's "IPC hook protocol"), a Unix domain socket.
//!
//! It owns the socket file (mode 0600, or 0660 in group mode), checks every peer's
//! credentials (SO_PEERCRED, SO_PEERGROUPS) against an [`AllowList`], and serves the protocol of
//! [`snaprelay_contract::ipc`]: one JSON request per line, one response per line, in order.
//! Lines are framed with `tokio_util`'s `LinesCodec` ([`ipc::line_codec`]). A bad line (too
//! long, not UTF-8, not JSON, unknown op, wrong version) gets an error response and the
//! connection stays up. A connection is closed on an I/O error, at shutdown, when it has
//! been idle between requests for `idle_timeout` (60 s), when a request line is not complete
//! `request_timeout` (10 s) after its first byte, or when a new connection at the limit
//! (16) takes its slot: the newcomer replaces the connection idle or stuck mid-line the
//! longest, so that stuck clients cannot lock the sidecar out; only when every connection is
//! serving a request is the newcomer told `unavailable`. A refused peer
//! gets one `forbidden` line; the server then shuts its write side and reads (bounded) what
//! the peer already sent before closing, so that the peer's request write does not fail with
//! a broken pipe before it can read why. What a request
//! does is the [`Node`]'s business; the server checks what it can without the node, notably
//! that a `save_snapshot` path is a complete file directly inside the incoming directory.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use snaprelay_contract::ipc::{
    self, parse_request, write_frame, ErrorCode, FrameError, Request, ResponseFrame, Status,
    TriggerResult,
};
use snaprelay_contract::snapdir::Envelope;
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::codec::{Decoder, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;

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
    /// A connection with no request for this long (between requests) is closed.
    pub idle_timeout: Duration,
    /// A request line must be complete this long after its first byte, or the connection
    /// is closed.
    pub request_timeout: Duration,
    /// Connections served at once. A new connection beyond this many takes the place of
    /// the one idle (or stuck mid-line) the longest, which is closed; only when every
    /// connection is serving a request is the newcomer told `unavailable`.
    pub max_connections: usize,
}

impl HookConfig {
    /// Mode 0600, only the node's own uid, 60 s idle timeout, 10 s per request line,
    /// 16 connections.
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
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
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
    request_timeout: Duration,
}

/// A bound hook socket, ready to [`run`](HookServer::run).
pub struct HookServer<N> {
    listener: UnixListener,
    socket_path: PathBuf,
    node: Arc<N>,
    context: Arc<Context>,
    slots: Arc<Slots>,
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
                request_timeout: config.request_timeout,
            }),
            slots: Arc::new(Slots::new(config.max_connections)),
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The node this server serves (shared: e.g. for the application's own metrics).
    pub fn node(&self) -> Arc<N> {
        self.node.clone()
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
                    // Checked before the peer gets a slot: a refused peer never takes one
                    // or pushes anyone out.
                    let peer = match self.context.allow.check(peer_credentials(&stream)) {
                        Ok(peer) => peer,
                        Err(refusal) => {
                            tracing::warn!(reason = %refusal, "refused a hook connection");
                            let response =
                                ResponseFrame::error(ErrorCode::Forbidden, refusal.to_string());
                            tasks.spawn(refuse(stream, response));
                            continue;
                        }
                    };
                    let Some(slot) = self.slots.admit() else {
                        tracing::warn!(
                            uid = peer.uid,
                            "refused a hook connection: every connection is serving a request"
                        );
                        let response = ResponseFrame::error(
                            ErrorCode::Unavailable,
                            "too many hook connections, all serving requests",
                        );
                        tasks.spawn(refuse(stream, response));
                        continue;
                    };
                    let connection = Connection {
                        node: self.node.clone(),
                        context: self.context.clone(),
                        stop: stop_rx.clone(),
                        slot,
                        uid: peer.uid,
                    };
                    tasks.spawn(connection.serve(stream));
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

/// The connection slots: which connections exist, what each is doing and since when, so
/// that a newcomer at the limit can take the place of the one idle (or stuck mid-line) the
/// longest instead of being refused.
struct Slots {
    max: usize,
    inner: Mutex<SlotTable>,
}

#[derive(Default)]
struct SlotTable {
    next_id: u64,
    slots: HashMap<u64, SlotInfo>,
}

struct SlotInfo {
    busy: bool,
    since: Instant,
    evict: CancellationToken,
}

/// A connection's hold on a slot; dropping it frees the slot.
struct Slot {
    id: u64,
    slots: Arc<Slots>,
    /// Cancelled when a newcomer takes this connection's slot.
    evicted: CancellationToken,
}

impl Slots {
    fn new(max: usize) -> Slots {
        Slots {
            max: max.max(1),
            inner: Mutex::new(SlotTable::default()),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, SlotTable> {
        // Plain bookkeeping, left consistent by every single-step change.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a new connection: a free one, or the one of the connection that has been
    /// idle or mid-line the longest (which is told to close). `None` if every connection is
    /// serving a request.
    fn admit(self: &Arc<Slots>) -> Option<Slot> {
        let mut table = self.table();
        if table.slots.len() >= self.max {
            let (&victim, _) = table
                .slots
                .iter()
                .filter(|(_, info)| !info.busy)
                .min_by_key(|(_, info)| info.since)?;
            let info = table.slots.remove(&victim).expect("found above");
            info.evict.cancel();
            tracing::info!(
                connection = victim,
                idle_ms = info.since.elapsed().as_millis() as u64,
                "closing the longest-idle hook connection to admit a new one"
            );
        }
        let id = table.next_id;
        table.next_id += 1;
        let evicted = CancellationToken::new();
        table.slots.insert(
            id,
            SlotInfo {
                busy: false,
                since: Instant::now(),
                evict: evicted.clone(),
            },
        );
        Some(Slot {
            id,
            slots: self.clone(),
            evicted,
        })
    }
}

impl Slot {
    /// Marks the connection busy (serving a request: not evictable) or waiting.
    fn set_busy(&self, busy: bool) {
        if let Some(info) = self.slots.table().slots.get_mut(&self.id) {
            info.busy = busy;
            info.since = Instant::now();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.table().slots.remove(&self.id);
    }
}

struct Connection<N> {
    node: Arc<N>,
    context: Arc<Context>,
    /// Closed (sender dropped) when the server shuts down.
    stop: watch::Receiver<()>,
    slot: Slot,
    uid: u32,
}

/// Why a connection stopped reading requests.
enum Next {
    Line(String),
    /// A frame error the peer is told about; the connection goes on.
    Bad(ResponseFrame),
    Close(&'static str),
}

impl<N: Node> Connection<N> {
    async fn serve(mut self, stream: UnixStream) {
        let uid = self.uid;
        tracing::debug!(uid, "hook connection");
        let (mut read, mut write) = stream.into_split();
        let mut codec = ipc::line_codec();
        let mut buf = BytesMut::new();
        // After an oversized line the codec skips to its newline; the connection is mid-line
        // until then.
        let mut discarding = false;
        loop {
            let next = self
                .next_line(&mut read, &mut codec, &mut buf, &mut discarding)
                .await;
            let response = match next {
                Next::Line(line) => {
                    self.slot.set_busy(true);
                    let response = match parse_request(line.as_bytes()) {
                        Ok(request) => tokio::select! {
                            _ = self.stop.changed() => return,
                            response = handle(&*self.node, &self.context, request) => response,
                        },
                        Err(e) => {
                            tracing::debug!(uid, error = %e, "bad hook request");
                            e.response().unwrap_or_else(|| {
                                ResponseFrame::error(ErrorCode::BadRequest, e.to_string())
                            })
                        }
                    };
                    response
                }
                Next::Bad(response) => response,
                Next::Close(why) => {
                    tracing::debug!(uid, why, "closing hook connection");
                    return;
                }
            };
            if let Err(e) = write_frame(&mut write, &response).await {
                tracing::debug!(uid, error = %e, "writing a hook response failed");
                return;
            }
            self.slot.set_busy(false);
        }
    }

    /// Reads until a whole line is framed, or a frame error to answer, or a reason to close:
    /// EOF, a read error, shutdown, eviction, the idle timeout (nothing sent since the last
    /// response) or the request timeout (a line begun and not finished in time).
    async fn next_line(
        &mut self,
        read: &mut tokio::net::unix::OwnedReadHalf,
        codec: &mut LinesCodec,
        buf: &mut BytesMut,
        discarding: &mut bool,
    ) -> Next {
        let mut line_started: Option<Instant> = (!buf.is_empty() || *discarding).then(Instant::now);
        loop {
            // A newline in the buffer ends any discarding within this decode.
            let ends_discarding = *discarding && buf.contains(&b'\n');
            match codec.decode(buf) {
                Ok(Some(line)) => {
                    *discarding = false;
                    return Next::Line(line);
                }
                Ok(None) => {
                    if ends_discarding {
                        *discarding = false;
                    }
                }
                Err(LinesCodecError::MaxLineLengthExceeded) => {
                    *discarding = true;
                    return Next::Bad(FrameError::TooLarge.response().expect("answerable"));
                }
                // The codec consumed the line; the stream stays in sync.
                Err(LinesCodecError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Next::Bad(ResponseFrame::error(
                        ErrorCode::BadRequest,
                        "invalid frame: the line is not UTF-8",
                    ));
                }
                Err(LinesCodecError::Io(_)) => return Next::Close("read error"),
            }
            let mid_line = !buf.is_empty() || *discarding;
            let deadline = match (mid_line, line_started) {
                (true, Some(started)) => started + self.context.request_timeout,
                (true, None) => {
                    let now = Instant::now();
                    line_started = Some(now);
                    now + self.context.request_timeout
                }
                (false, _) => {
                    line_started = None;
                    Instant::now() + self.context.idle_timeout
                }
            };
            let read = tokio::select! {
                _ = self.stop.changed() => return Next::Close("shutting down"),
                _ = self.slot.evicted.cancelled() => return Next::Close("evicted for a new connection"),
                _ = tokio::time::sleep_until(deadline) => {
                    return Next::Close(if mid_line { "request line not finished in time" } else { "idle" });
                }
                read = read.read_buf(buf) => read,
            };
            match read {
                Ok(0) => {
                    // EOF: a last line without newline is still a request (as before).
                    if *discarding {
                        return Next::Close("closed by the peer");
                    }
                    return match codec.decode_eof(buf) {
                        Ok(Some(line)) => Next::Line(line),
                        // A last line that is not UTF-8 is answered like any other.
                        Err(LinesCodecError::Io(e))
                            if e.kind() == std::io::ErrorKind::InvalidData =>
                        {
                            Next::Bad(ResponseFrame::error(
                                ErrorCode::BadRequest,
                                "invalid frame: the line is not UTF-8",
                            ))
                        }
                        _ => Next::Close("closed by the peer"),
                    };
                }
                Ok(_) => {}
                Err(_) => return Next::Close("read error"),
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
async fn refuse(stream: UnixStream, response: ResponseFrame) {
    let (read, mut write) = stream.into_split();
    if write_frame(&mut write, &response).await.is_err() {
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
                committed: state.committed,
                staged: state.staged,
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
    // Everything but raft_meta: a label that disagrees with the snapshot's own meta is a
    // refused snapshot (`invalid_snapshot`, counted, the file removed), which the node
    // decides with its typed check (see `RaftNode`), not a malformed request.
    envelope
        .validate_fields()
        .map_err(|reason| bad(format!("envelope: {reason}")))?;
    if !is_sha256_hex(&sha256) {
        return Err(bad(format!(
            "sha256 {sha256:?} is not 64 lowercase hex digits"
        )));
    }
    Incoming::open(envelope, path, &context.incoming_dir, sha256)
}
