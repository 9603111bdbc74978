//! The node's HTTP server: raft RPCs from other nodes (`/raft/*`, see [`crate::network`]) and
//! the client API.
//!
//! Client API (JSON):
//!
//! | request | body / query | answer |
//! | --- | --- | --- |
//! | `POST /init` | none, or `{"members": {"1": "127.0.0.1:21001", …}}` | `{}` |
//! | `POST /write` | `{"key": "k", "value": "v"}` | `{"log_index": 12, "previous": null}` |
//! | `GET /read?key=k` | | `{"key": "k", "value": "v"}` (local state, not linearizable) |
//! | `POST /add-learner` | `{"id": 2, "addr": "127.0.0.1:21002"}` | `{"log_index": …}` |
//! | `POST /change-membership` | `{"members": [1, 2, 3]}` | `{"log_index": …}` |
//! | `POST /snapshot` | | `{"queued": true}` |
//! | `GET /metrics` | | see [`MetricsView`] (`snapshots_refused`: refusals by error code) |
//!
//! Errors are `{"error": "...", ...}` with a 4xx/5xx status. A write to a node that is not the
//! leader answers 421 with `leader_id` and `leader_addr`; a write that meets a leader whose
//! lease has not been established yet (or no leader at all) is retried for a few seconds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::{Json, Router};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Snapshot};
use serde::{Deserialize, Serialize};
use serde_json::json;
use snaprelay_hook::ipc::{LogIdRef, Role};
use snaprelay_hook::{Node, SnapshotFile, StoreHandle, StoreNode};

use crate::log_store::LogStore;
use crate::network::SnapshotHeader;
use crate::state_machine::KvApp;
use crate::{NodeId, Raft, Request, TypeConfig};

/// How long a write waits for a leader (election, lease) before giving up.
const WRITE_RETRY_FOR: Duration = Duration::from_secs(10);
/// Largest append-entries batch or client write accepted (values may be large; openraft
/// batches at most `max_payload_entries` entries per request).
const MAX_RPC_BYTES: usize = 256 << 20;
/// Largest snapshot a node accepts through replication.
const MAX_SNAPSHOT_BYTES: usize = 1 << 30;

/// The hook's node: raft plus a reader of this node's log.
pub type HookNode = StoreNode<TypeConfig, KvApp, LogStore<TypeConfig>>;

#[derive(Clone)]
pub struct App {
    pub id: NodeId,
    /// This node's HTTP address, as other nodes reach it.
    pub addr: String,
    pub raft: Raft,
    /// The key-value state.
    pub kv: KvApp,
    /// The snapshot store: directory, current snapshot, counters.
    pub store: StoreHandle<TypeConfig>,
    /// The hook's view of this node (status, refusal counts).
    pub hook: Arc<HookNode>,
    /// Fault injection for tests: while set, this node refuses raft RPCs, as if cut off
    /// from the network, so a test can make a follower fall behind on purpose.
    pub isolated: Arc<AtomicBool>,
}

pub fn router(app: App) -> Router {
    Router::new()
        .route(
            "/raft/append",
            post(raft_append).layer(DefaultBodyLimit::max(MAX_RPC_BYTES)),
        )
        .route("/raft/vote", post(raft_vote))
        .route(
            "/raft/snapshot",
            post(raft_snapshot).layer(DefaultBodyLimit::max(MAX_SNAPSHOT_BYTES)),
        )
        .route("/init", post(init))
        .route(
            "/write",
            post(write).layer(DefaultBodyLimit::max(MAX_RPC_BYTES)),
        )
        .route("/read", get(read))
        .route("/add-learner", post(add_learner))
        .route("/change-membership", post(change_membership))
        .route("/snapshot", post(trigger_snapshot))
        .route("/metrics", get(metrics))
        .route("/admin/isolate", post(isolate))
        .with_state(app.clone())
        .layer(axum::middleware::from_fn_with_state(
            app,
            refuse_raft_while_isolated,
        ))
}

/// An error answer: status and a JSON body with at least `error`.
pub struct ApiError(StatusCode, serde_json::Value);

impl ApiError {
    fn new(status: StatusCode, message: impl std::fmt::Display) -> ApiError {
        ApiError(status, json!({ "error": message.to_string() }))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> HttpResponse {
        (self.0, Json(self.1)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

// ---- raft RPCs ----

/// Answers raft RPCs with 503 while the node is isolated (see [`App::isolated`]).
async fn refuse_raft_while_isolated(
    State(app): State<App>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> HttpResponse {
    if app.isolated.load(Ordering::Relaxed) && request.uri().path().starts_with("/raft/") {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "isolated").into_response();
    }
    next.run(request).await
}

#[derive(Debug, Deserialize)]
struct IsolateRequest {
    isolated: bool,
}

/// `POST /admin/isolate {"isolated": true|false}`: fault injection for tests.
async fn isolate(
    State(app): State<App>,
    Json(req): Json<IsolateRequest>,
) -> Json<serde_json::Value> {
    app.isolated.store(req.isolated, Ordering::Relaxed);
    tracing::warn!(isolated = req.isolated, "raft RPCs isolation changed");
    Json(json!({ "isolated": req.isolated }))
}

async fn raft_append(
    State(app): State<App>,
    Json(request): Json<AppendEntriesRequest<TypeConfig>>,
) -> Json<Result<AppendEntriesResponse<TypeConfig>, String>> {
    Json(
        app.raft
            .append_entries(request)
            .await
            .map_err(|e| e.to_string()),
    )
}

async fn raft_vote(
    State(app): State<App>,
    Json(request): Json<VoteRequest<TypeConfig>>,
) -> Json<Result<VoteResponse<TypeConfig>, String>> {
    Json(app.raft.vote(request).await.map_err(|e| e.to_string()))
}

/// Receives a full snapshot: writes it to a temp file in the snapshot directory and hands it
/// to openraft, which installs it (the state machine commits the file) or drops it.
async fn raft_snapshot(
    State(app): State<App>,
    body: Bytes,
) -> Result<Json<Result<SnapshotResponse<TypeConfig>, String>>, ApiError> {
    let split = body.iter().position(|&b| b == b'\n').ok_or_else(|| {
        ApiError::new(StatusCode::BAD_REQUEST, "snapshot body has no header line")
    })?;
    let header: SnapshotHeader = serde_json::from_slice(&body[..split])
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("snapshot header: {e}")))?;
    let data = body.slice(split + 1..);
    let dir = app.store.dir().clone();
    let temp = tokio::task::spawn_blocking(move || {
        let path = dir.write_temp(|w| w.write_all(&data))?;
        let file = SnapshotFile::open(&path)?;
        Ok::<_, std::io::Error>(file)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("storing snapshot: {e}"),
        )
    })?;
    let temp_path = temp.path.clone();
    let snapshot = Snapshot {
        meta: header.meta,
        snapshot: temp,
    };
    let result = app.raft.install_full_snapshot(header.vote, snapshot).await;
    // Installed (and renamed into place) or not needed: either way the temp file is done with.
    let _ = app.store.dir().discard(&temp_path);
    Ok(Json(result.map_err(|e| e.to_string())))
}

// ---- client API ----

/// `POST /init` body; no body, `{}` or no members mean "this node alone".
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct InitRequest {
    #[serde(default)]
    members: BTreeMap<NodeId, String>,
}

async fn init(State(app): State<App>, body: Bytes) -> ApiResult<serde_json::Value> {
    let request = if body.iter().all(u8::is_ascii_whitespace) {
        InitRequest::default()
    } else {
        serde_json::from_slice::<InitRequest>(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?
    };
    let members = if request.members.is_empty() {
        BTreeMap::from([(app.id, app.addr.clone())])
    } else {
        request.members
    };
    let members: BTreeMap<NodeId, BasicNode> = members
        .into_iter()
        .map(|(id, addr)| (id, BasicNode::new(addr)))
        .collect();
    app.raft
        .initialize(members)
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e))?;
    Ok(Json(json!({})))
}

#[derive(Serialize)]
struct WriteAnswer {
    log_index: u64,
    previous: Option<String>,
}

async fn write(State(app): State<App>, Json(request): Json<Request>) -> ApiResult<WriteAnswer> {
    let deadline = tokio::time::Instant::now() + WRITE_RETRY_FOR;
    loop {
        let error = match app.raft.client_write(request.clone()).await {
            Ok(written) => {
                return Ok(Json(WriteAnswer {
                    log_index: written.log_id.index,
                    previous: written.data.previous,
                }))
            }
            Err(e) => e,
        };
        let Some(forward) = error.forward_to_leader() else {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, error));
        };
        if let Some(leader) = forward.leader_id.filter(|&leader| leader != app.id) {
            let addr = forward.leader_node.as_ref().map(|n| n.addr.clone());
            return Err(ApiError(
                StatusCode::MISDIRECTED_REQUEST,
                json!({ "error": "not the leader", "leader_id": leader, "leader_addr": addr }),
            ));
        }
        // No leader known yet, or this leader's lease is not established: wait for it. A set
        // is idempotent, so retrying one whose entry was discarded is harmless.
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, error));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Deserialize)]
struct ReadQuery {
    key: String,
}

async fn read(State(app): State<App>, Query(query): Query<ReadQuery>) -> Json<serde_json::Value> {
    let value = app.kv.get(&query.key);
    Json(json!({ "key": query.key, "value": value }))
}

#[derive(Deserialize)]
struct AddLearner {
    id: NodeId,
    addr: String,
}

async fn add_learner(
    State(app): State<App>,
    Json(request): Json<AddLearner>,
) -> ApiResult<serde_json::Value> {
    let written = app
        .raft
        .add_learner(request.id, BasicNode::new(request.addr), true)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    Ok(Json(json!({ "log_index": written.log_id.index })))
}

#[derive(Deserialize)]
struct ChangeMembership {
    members: BTreeSet<NodeId>,
}

async fn change_membership(
    State(app): State<App>,
    Json(request): Json<ChangeMembership>,
) -> ApiResult<serde_json::Value> {
    let written = app
        .raft
        .change_membership(request.members, false)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    Ok(Json(json!({ "log_index": written.log_id.index })))
}

async fn trigger_snapshot(State(app): State<App>) -> ApiResult<serde_json::Value> {
    app.raft
        .trigger()
        .snapshot()
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    Ok(Json(json!({ "queued": true })))
}

/// `GET /metrics`.
#[derive(Debug, Serialize, Deserialize)]
pub struct MetricsView {
    pub id: NodeId,
    pub role: Role,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_applied: Option<LogIdRef>,
    /// Last log id of the snapshot openraft considers current.
    pub snapshot: Option<LogIdRef>,
    pub purged: Option<LogIdRef>,
    /// The local committed log id.
    #[serde(default)]
    pub committed: Option<LogIdRef>,
    /// A snapshot staged by the hook and not adopted yet.
    #[serde(default)]
    pub staged: Option<LogIdRef>,
    pub snapshots_built_locally: u64,
    pub snapshots_adopted: u64,
    /// Snapshots received from the leader through replication.
    pub snapshots_installed: u64,
    /// Snapshots the hook refused, by error code (`checksum_mismatch`, `invalid_snapshot`,
    /// …); none of them became current.
    #[serde(default)]
    pub snapshots_refused: BTreeMap<String, u64>,
    /// The state machine's current snapshot data file.
    pub snapshot_path: Option<String>,
    pub snapshot_dir: String,
    pub incoming_dir: String,
}

async fn metrics(State(app): State<App>) -> Json<MetricsView> {
    use std::sync::atomic::Ordering::Relaxed;
    let state = app.hook.state();
    let counters = app.store.counters();
    Json(MetricsView {
        id: state.node_id,
        role: state.role,
        leader: state.leader,
        term: state.term,
        last_applied: state.last_applied,
        snapshot: state.snapshot,
        purged: state.purged,
        committed: state.committed,
        staged: state.staged,
        snapshots_built_locally: counters.built_locally.load(Relaxed),
        snapshots_adopted: counters.adopted.load(Relaxed),
        snapshots_installed: counters.installed.load(Relaxed),
        snapshots_refused: app.hook.refusals().snapshot(),
        snapshot_path: app
            .store
            .current_snapshot_path()
            .map(|p| p.display().to_string()),
        snapshot_dir: app.store.dir().path().display().to_string(),
        incoming_dir: app.store.dir().incoming_dir().display().to_string(),
    })
}
