//! `counter-node`: a deliberately minimal openraft service (named counters, in-memory log, HTTP between nodes)
//! wired to `snaprelay-hook`. snaprelay-specific: the snapshot half of `impl SnapshotApp` and the lines after
//! `// snaprelay:` in `main`. Arguments `--id --http --dir --hook-socket [--snapshot-policy-logs]
//! [--max-in-snapshot-log-to-keep]`; HTTP `POST /init /add-learner /change-membership /write {key} /snapshot`,
//! `GET /metrics`. Locks are unwrapped: a panic while holding one is a bug that stops the node anyway.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::io::{self, Read, Write};
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex, RwLock};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, TryStreamExt};
use openraft::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf};
use openraft::entry::RaftEntry;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::storage::{EntryResponder, IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{BasicNode, EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use snaprelay_hook::{serve_hook, HookConfig, Node, SnapshotApp, SnapshotDir, SnapshotFile, StoreHandle, StoreOptions};

// A write names the counter to add 1 to; its answer is the new count.
openraft::declare_raft_types!(pub TypeConfig: D = String, R = u64);
type C = TypeConfig;
type Store = snaprelay_hook::SnapshotStore<C, Counters>;
type Raft = openraft::Raft<C, Store>;

/// The state and the snapshot's content (serde_json, sorted map: the same bytes everywhere).
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct CountersState {
    last_applied: Option<LogIdOf<C>>,
    membership: StoredMembershipOf<C>,
    counts: BTreeMap<String, u64>,
}

#[derive(Clone, Default)]
pub struct Counters(Arc<RwLock<CountersState>>);

impl SnapshotApp<C> for Counters {
    type State = CountersState;
    fn applied_state(&self) -> (Option<LogIdOf<C>>, StoredMembershipOf<C>) {
        Self::applied(&self.0.read().unwrap())
    }
    async fn apply<S>(&mut self, mut entries: S) -> io::Result<()>
    where
        S: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let mut s = self.0.write().unwrap();
            s.last_applied = Some(entry.log_id);
            let mut answer = 0;
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(key) => answer = *s.counts.entry(key).and_modify(|c| *c += 1).or_insert(1),
                EntryPayload::Membership(m) => s.membership = StoredMembershipOf::<C>::new(Some(entry.log_id), m),
            }
            if let Some(responder) = responder {
                responder.send(answer);
            }
        }
        Ok(())
    }
    // The snapshot half, what snaprelay asks for: copy, restore, meta, encode, decode.
    fn snapshot(&self) -> CountersState {
        self.0.read().unwrap().clone()
    }
    fn restore(&mut self, state: CountersState) {
        *self.0.write().unwrap() = state;
    }
    fn applied(s: &CountersState) -> (Option<LogIdOf<C>>, StoredMembershipOf<C>) {
        (s.last_applied, s.membership.clone())
    }
    fn encode(state: &CountersState, out: &mut dyn Write) -> io::Result<()> {
        serde_json::to_writer(out, state).map_err(io::Error::other)
    }
    fn decode(input: &mut dyn Read) -> io::Result<CountersState> {
        serde_json::from_reader(input).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// The raft log and vote, in memory (lost on restart; the node then catches up).
#[derive(Clone, Default)]
pub struct LogStore(Arc<Mutex<Log>>);
type Log = (Option<LogIdOf<C>>, BTreeMap<u64, Entry>, Option<VoteOf<C>>); // last purged, entries, vote
type Entry = openraft::alias::EntryOf<C>;

impl RaftLogReader<C> for LogStore {
    async fn try_get_log_entries<R: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        r: R,
    ) -> io::Result<Vec<Entry>> {
        Ok(self.0.lock().unwrap().1.range(r).map(|(_, e)| e.clone()).collect())
    }
    async fn read_vote(&mut self) -> io::Result<Option<VoteOf<C>>> {
        Ok(self.0.lock().unwrap().2)
    }
}
impl RaftLogStorage<C> for LogStore {
    type LogReader = Self;
    async fn get_log_state(&mut self) -> io::Result<LogState<C>> {
        let s = self.0.lock().unwrap();
        let last = s.1.values().next_back().map(|e| e.log_id()).or(s.0);
        Ok(LogState { last_purged_log_id: s.0, last_log_id: last })
    }
    async fn get_log_reader(&mut self) -> Self {
        self.clone()
    }
    async fn save_vote(&mut self, vote: &VoteOf<C>) -> io::Result<()> {
        self.0.lock().unwrap().2 = Some(*vote);
        Ok(())
    }
    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
    {
        self.0.lock().unwrap().1.extend(entries.into_iter().map(|e| (e.index(), e)));
        callback.io_completed(Ok(()));
        Ok(())
    }
    async fn truncate_after(&mut self, last: Option<LogIdOf<C>>) -> io::Result<()> {
        self.0.lock().unwrap().1.split_off(&last.map_or(0, |l| l.index + 1));
        Ok(())
    }
    async fn purge(&mut self, log_id: LogIdOf<C>) -> io::Result<()> {
        let mut s = self.0.lock().unwrap();
        s.1 = s.1.split_off(&(log_id.index + 1));
        s.0 = Some(log_id);
        Ok(())
    }
}

/// Raft RPCs as HTTP POSTs of JSON to `http://<addr>/raft/<rpc>`; a snapshot is a JSON header line, then its bytes.
#[derive(Clone, Default)]
pub struct Network(reqwest::Client);
pub struct Peer(reqwest::Client, String);
type Net = NetworkError<C>;
type RpcResult<T> = Result<T, RPCError<C>>;

impl RaftNetworkFactory<C> for Network {
    type Network = Peer;
    async fn new_client(&mut self, _id: u64, node: &BasicNode) -> Peer {
        Peer(self.0.clone(), node.addr.clone())
    }
}
impl Peer {
    async fn post<T: for<'a> Deserialize<'a>>(&self, rpc: &str, body: Vec<u8>, o: RPCOption) -> Result<T, Net> {
        let net = |e: &dyn std::fmt::Display| Net::from_string(e.to_string());
        let request = self.0.post(format!("http://{}/raft/{rpc}", self.1)).header("content-type", "application/json");
        let response = request.body(body).timeout(o.soft_ttl()).send().await.map_err(|e| net(&e))?;
        let answer: Result<T, String> = response.json().await.map_err(|e| net(&e))?;
        answer.map_err(|e| net(&e))
    }
}
impl RaftNetworkV2<C> for Peer {
    type SnapshotData = SnapshotFile;
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        opt: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<C>> {
        Ok(self.post("append", serde_json::to_vec(&rpc).unwrap(), opt).await?)
    }
    async fn vote(&mut self, rpc: VoteRequest<C>, opt: RPCOption) -> RpcResult<VoteResponse<C>> {
        Ok(self.post("vote", serde_json::to_vec(&rpc).unwrap(), opt).await?)
    }
    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, SnapshotFile>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + OptionalSend + 'static,
        opt: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let mut body = serde_json::to_vec(&(vote, snapshot.meta)).unwrap();
        body.push(b'\n');
        body.extend(snapshot.snapshot.read_all().map_err(|e| Net::from_string(e.to_string()))?);
        Ok(self.post("snapshot", body, opt).await?)
    }
}

#[derive(Clone)]
struct App {
    addr: String,
    raft: Raft,
    counters: Counters,
    store: StoreHandle<C>,
    hook: Arc<snaprelay_hook::StoreNode<C, Counters, LogStore>>,
}
type Rpc<T> = Json<Result<T, String>>;
async fn append(State(a): State<App>, Json(r): Json<AppendEntriesRequest<C>>) -> Rpc<AppendEntriesResponse<C>> {
    Json(a.raft.append_entries(r).await.map_err(|e| e.to_string()))
}
async fn vote(State(a): State<App>, Json(r): Json<VoteRequest<C>>) -> Rpc<VoteResponse<C>> {
    Json(a.raft.vote(r).await.map_err(|e| e.to_string()))
}
async fn snapshot(State(a): State<App>, body: Bytes) -> Rpc<SnapshotResponse<C>> {
    let split = body.iter().position(|&b| b == b'\n').unwrap_or(body.len());
    let received = (|| {
        let (vote, meta) = serde_json::from_slice::<(VoteOf<C>, SnapshotMetaOf<C>)>(&body[..split])?;
        let path = a.store.dir().write_temp(|w| w.write_all(&body[(split + 1).min(body.len())..]))?;
        anyhow::Ok((vote, meta, SnapshotFile::open(&path)?))
    })();
    let (vote, meta, snapshot) = match received {
        Ok(received) => received,
        Err(e) => return Json(Err(format!("receiving a snapshot: {e:#}"))),
    };
    let path = snapshot.path.clone();
    let result = a.raft.install_full_snapshot(vote, openraft::storage::Snapshot { meta, snapshot }).await;
    let _ = a.store.dir().discard(&path); // installed (renamed into place) or not needed
    Json(result.map_err(|e| e.to_string()))
}
type Answer = Result<Json<Value>, (axum::http::StatusCode, String)>;
fn failed(e: impl std::fmt::Display) -> (axum::http::StatusCode, String) {
    (axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}
async fn init(State(a): State<App>) -> Answer {
    let me = a.hook.state().node_id;
    a.raft.initialize(BTreeMap::from([(me, BasicNode::new(&a.addr))])).await.map_err(failed)?;
    Ok(Json(json!({})))
}
async fn add_learner(State(a): State<App>, Json(v): Json<Value>) -> Answer {
    let (id, addr) = (v["id"].as_u64().unwrap_or_default(), v["addr"].as_str().unwrap_or_default());
    let r = a.raft.add_learner(id, BasicNode::new(addr), true).await.map_err(failed)?;
    Ok(Json(json!({"log_index": r.log_id.index})))
}
async fn change_membership(State(a): State<App>, Json(v): Json<Value>) -> Answer {
    let members: BTreeSet<u64> = serde_json::from_value(v["members"].clone()).map_err(failed)?;
    let r = a.raft.change_membership(members, false).await.map_err(failed)?;
    Ok(Json(json!({"log_index": r.log_id.index})))
}
async fn write(State(a): State<App>, Json(v): Json<Value>) -> Answer {
    let r = a.raft.client_write(v["key"].as_str().unwrap_or_default().to_owned()).await.map_err(failed)?;
    Ok(Json(json!({"log_index": r.log_id.index, "count": r.data})))
}
async fn trigger(State(a): State<App>) -> Answer {
    a.raft.trigger().snapshot().await.map_err(failed)?;
    Ok(Json(json!({"queued": true})))
}
async fn metrics(State(a): State<App>) -> Json<Value> {
    let (s, c) = (a.hook.state(), a.store.counters());
    let n = |x: &std::sync::atomic::AtomicU64| x.load(std::sync::atomic::Ordering::Relaxed);
    Json(json!({
        "id": s.node_id, "role": s.role, "leader": s.leader, "last_applied": s.last_applied, "snapshot": s.snapshot,
        "purged": s.purged, "snapshots_built_locally": n(&c.built_locally), "snapshots_adopted": n(&c.adopted),
        "snapshots_refused": a.hook.refusals().snapshot(), "snapshot_path": a.store.current_snapshot_path(),
        "snapshot_dir": a.store.dir().path(), "counts": a.counters.0.read().unwrap().counts,
    }))
}
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(io::stderr).with_ansi(false).init();
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let need = |name: &str| arg(name).ok_or_else(|| anyhow::anyhow!("missing {name}"));
    let num = |name: &str, v: String| v.parse::<u64>().map_err(|e| anyhow::anyhow!("{name} {v:?}: {e}"));
    let (id, http, dir, socket) =
        (num("--id", need("--id")?)?, need("--http")?, need("--dir")?, need("--hook-socket")?);
    let number = |name, default| arg(name).map_or(Ok(default), |v| num(name, v));
    let policy = number("--snapshot-policy-logs", 500)?;
    let config = openraft::Config {
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(policy),
        max_in_snapshot_log_to_keep: number("--max-in-snapshot-log-to-keep", 5000)?,
        allow_log_reversion: Some(true), // the log is in memory
        ..Default::default()
    };
    let mut log = LogStore::default();
    let reader = log.get_log_reader().await;
    let counters = Counters::default();
    // snaprelay: the snapshot store is the state machine; the hook serves the sidecar.
    let dir = SnapshotDir::open(std::path::Path::new(&dir).join("snapshots"))?;
    let store = Store::open(dir, counters.clone(), StoreOptions { defer_limit: 4 * policy, keep_snapshots: 2 })?;
    let handle = store.handle();
    let network = Network(reqwest::Client::builder().no_proxy().build()?);
    let raft = Raft::new(id, Arc::new(config.validate()?), network, log, store).await?;
    let hook =
        serve_hook(&raft, &handle, reader, HookConfig::new(socket, handle.dir().path(), handle.dir().incoming_dir()))?;
    let app = App { addr: http.clone(), raft, counters, store: handle, hook: hook.node() };
    tokio::spawn(hook.run(std::future::pending::<()>()));
    let router = Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/init", post(init))
        .route("/add-learner", post(add_learner))
        .route("/change-membership", post(change_membership))
        .route("/write", post(write))
        .route("/snapshot", post(trigger))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(256 << 20))
        .with_state(app);
    axum::serve(tokio::net::TcpListener::bind(&http).await?, router).await?;
    Ok(())
}
