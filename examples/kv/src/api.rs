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
//! `/add-learner` and `/change-membership` answer 421 the same way when another node leads;
//! 503 when asking again may succeed (no leader yet, this leader's lease not established, an
//! earlier membership change not committed yet); 400 or 409 when the request cannot succeed
//! as it is (e.g. a voter that is not a learner yet); 500 when raft has stopped.

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
use openraft::errors::{
    ChangeMembershipError, ClientWriteError, ForwardReason, ForwardToLeader, RaftError,
};
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
        .map_err(|e| membership_refused(app.id, e))?;
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
        .map_err(|e| membership_refused(app.id, e))?;
    Ok(Json(json!({ "log_index": written.log_id.index })))
}

/// The answer to a membership change openraft refused, by what the client can do about it (see
/// the module doc). Both changes are idempotent (the same learner, the same voter set), so
/// asking again, here or at the leader, is always safe.
fn membership_refused(
    this: NodeId,
    error: RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
) -> ApiError {
    let error = match error {
        RaftError::APIError(e) => e,
        RaftError::Fatal(fatal) => return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, fatal),
    };
    let status = match &error {
        ClientWriteError::ForwardToLeader(forward)
        | ClientWriteError::LogEntryDiscarded(forward) => {
            return not_leading(this, forward, &error);
        }
        ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(_) | ChangeMembershipError::UncommittedLeaderLog(_),
        ) => StatusCode::SERVICE_UNAVAILABLE,
        ClientWriteError::ChangeMembershipError(ChangeMembershipError::EmptyMembership(_)) => {
            StatusCode::BAD_REQUEST
        }
        ClientWriteError::ChangeMembershipError(_) | ClientWriteError::PreconditionFailed(_) => {
            StatusCode::CONFLICT
        }
    };
    ApiError::new(status, error)
}

/// 421 naming the leader when another node leads; otherwise 503, saying why (openraft's own
/// text for these says only "has to forward request to: None, None").
fn not_leading(
    this: NodeId,
    forward: &ForwardToLeader<TypeConfig>,
    error: &ClientWriteError<TypeConfig>,
) -> ApiError {
    if let Some(leader) = forward.leader_id.filter(|&leader| leader != this) {
        let addr = forward.leader_node.as_ref().map(|n| n.addr.clone());
        let message = match error {
            ClientWriteError::LogEntryDiscarded(_) => error.to_string(),
            _ => "not the leader".to_string(),
        };
        return ApiError(
            StatusCode::MISDIRECTED_REQUEST,
            json!({ "error": message, "leader_id": leader, "leader_addr": addr }),
        );
    }
    let why = match forward.reason {
        ForwardReason::LeaseExpired => "this leader has not heard from a quorum within its lease",
        ForwardReason::LeadershipTransfer => "leadership is being transferred",
        ForwardReason::NotLeader => {
            "no leader known yet (an election is in progress, or this node is in no cluster)"
        }
    };
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why)
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

#[cfg(test)]
mod tests {
    //! What the membership endpoints answer when openraft refuses, from real nodes (raft, HTTP
    //! server and hook socket, in-process) on loopback. A client tells by the status alone
    //! whether to ask the leader (421), ask again (503) or stop (any other).

    use std::net::SocketAddr;

    use serde_json::Value;
    use tokio::sync::oneshot;

    use super::*;
    use crate::node::{run, NodeConfig};

    struct TestNode {
        addr: String,
        stop: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
        _dir: tempfile::TempDir,
    }

    impl TestNode {
        async fn start(id: NodeId) -> TestNode {
            let dir = tempfile::tempdir().unwrap();
            let http: SocketAddr = {
                let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                probe.local_addr().unwrap()
            };
            let config = NodeConfig {
                id,
                http,
                dir: dir.path().to_owned(),
                hook_socket: dir.path().join("hook.sock"),
                hook_group_access: false,
                hook_allow_users: Vec::new(),
                hook_allow_groups: Vec::new(),
                snapshot_policy_logs: 1000,
                max_in_snapshot_log_to_keep: 1000,
                defer_limit: 4000,
                keep_snapshots: 2,
            };
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(run(config, async {
                let _ = stopped.await;
            }));
            let node = TestNode {
                addr: http.to_string(),
                stop: Some(stop),
                task,
                _dir: dir,
            };
            // Up once it answers; the server is bound before raft can be asked anything.
            while get(&node.addr, "/metrics").await.is_none() {
                assert!(!node.task.is_finished(), "node {id} stopped while starting");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            node
        }

        async fn stop(mut self) {
            drop(self.stop.take());
            self.task.await.unwrap().unwrap();
        }
    }

    async fn get(addr: &str, path: &str) -> Option<Value> {
        let response = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
        response.json().await.ok()
    }

    async fn post(addr: &str, path: &str, body: Value) -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(format!("http://{addr}{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Node 1 initialized alone and leading, with a committed write of its own term (so its
    /// first membership is committed and no change is in progress).
    async fn leading_alone() -> TestNode {
        let node = TestNode::start(1).await;
        assert_eq!(post(&node.addr, "/init", json!({})).await.0, 200);
        // `/write` waits for a leader whose lease is established.
        let (status, body) = post(&node.addr, "/write", json!({"key": "k", "value": "v"})).await;
        assert_eq!(status, 200, "{body}");
        node
    }

    /// The refusals a leader gives mid-change (the joint configuration not acknowledged by a
    /// quorum within the lease yet, or not committed yet) pass by themselves: ask again.
    #[test]
    fn a_leader_mid_change_answers_ask_again() {
        let lease = ForwardToLeader::empty().with_reason(ForwardReason::LeaseExpired);
        let in_progress = openraft::errors::InProgress {
            committed: None,
            membership_log_id: None,
        };
        for error in [
            ClientWriteError::ForwardToLeader(lease),
            ClientWriteError::ChangeMembershipError(in_progress.into()),
        ] {
            let ApiError(status, body) = membership_refused(1, RaftError::APIError(error));
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn membership_change_naming_a_node_that_is_not_a_learner_is_refused_for_good() {
        let leader = leading_alone().await;
        let (status, body) = post(
            &leader.addr,
            "/change-membership",
            json!({"members": [1, 2]}),
        )
        .await;
        // Asking again cannot help: node 2 has to be added as a learner first.
        assert_eq!(status, 409, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("learner"),
            "{body}"
        );
        let (status, body) = post(&leader.addr, "/change-membership", json!({"members": []})).await;
        assert_eq!(status, 400, "{body}");
        leader.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn membership_change_on_a_node_that_does_not_lead_names_the_leader() {
        let leader = leading_alone().await;
        let learner = TestNode::start(2).await;
        // Not in any cluster yet, it knows no leader: the same request may succeed later.
        let (status, body) = post(
            &learner.addr,
            "/add-learner",
            json!({"id": 3, "addr": "127.0.0.1:1"}),
        )
        .await;
        assert_eq!(status, 503, "{body}");
        let (status, body) = post(
            &leader.addr,
            "/add-learner",
            json!({"id": 2, "addr": learner.addr}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        // Caught up (add-learner waits for that), the learner follows node 1: it says so,
        // once its raft core has published what the leader's entries told it (the leader
        // can see the learner caught up before the learner's metrics say who leads).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while get(&learner.addr, "/metrics")
            .await
            .map(|m| m["leader"].clone())
            != Some(json!(1))
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the learner never named node 1 its leader"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (path, request) in [
            ("/change-membership", json!({"members": [1, 2]})),
            ("/add-learner", json!({"id": 3, "addr": "127.0.0.1:1"})),
        ] {
            let (status, body) = post(&learner.addr, path, request).await;
            assert_eq!(status, 421, "{path}: {body}");
            assert_eq!(body["leader_id"], 1, "{path}: {body}");
            assert_eq!(body["leader_addr"], leader.addr.as_str(), "{path}: {body}");
        }
        learner.stop().await;
        leader.stop().await;
    }
}
