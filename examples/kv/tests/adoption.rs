//! End to end with real processes: three `kv-node`s on loopback form a cluster, the leader
//! builds snapshots, and this test plays the snaprelay sidecar (no daemon involved): it copies
//! the leader's snapshot into each follower's incoming directory and hands it over with
//! `save_snapshot` on the follower's hook socket, as the daemon will after a download.
//!
//! Scenarios, in one cluster (starting three nodes is the slow part):
//! - `follower_adopts_leader_snapshot`: `adopted`; the follower's openraft snapshot is the
//!   leader's log id, its logs are purged, it built nothing, and its current snapshot file is
//!   byte-identical to the leader's.
//! - `older_snapshot_is_stale`: handing over an older snapshot afterwards answers `stale`
//!   and changes nothing.
//! - `status_reports_roles`: `status` on each socket names the node, its role and the leader.
//! - `malformed_line_keeps_connection`: a bad line gets `bad_request`, and the connection
//!   still answers `status`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use snaprelay_example_kv::api::MetricsView;
use snaprelay_hook::ipc::{
    exchange, parse_response, ErrorCode, LineReader, LogIdRef, Request, ResponseFrame, Role,
    SaveOutcome, SaveResult, Status,
};
use snaprelay_hook::snapdir::{self, Snapshot};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Logs kept behind a snapshot: small, so that adoption visibly purges.
const KEEP_LOGS: u64 = 50;
const WAIT: Duration = Duration::from_secs(30);

/// A `kv-node` process, killed when dropped.
struct NodeProcess {
    id: u64,
    http: String,
    dir: PathBuf,
    socket: PathBuf,
    child: Child,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    // Bind port 0 and release it: the node binds it a moment later.
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Cluster {
    nodes: Vec<NodeProcess>,
    http: reqwest::Client,
    root: Option<tempfile::TempDir>,
}

impl Cluster {
    fn start(count: u64) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let nodes = (1..=count)
            .map(|id| {
                let dir = root.path().join(format!("node{id}"));
                std::fs::create_dir_all(&dir).unwrap();
                let http = format!("127.0.0.1:{}", free_port());
                let socket = dir.join("hook.sock");
                let log = std::fs::File::create(root.path().join(format!("node{id}.log"))).unwrap();
                let child = Command::new(env!("CARGO_BIN_EXE_kv-node"))
                    .args(["--id", &id.to_string(), "--http", &http])
                    .arg("--dir")
                    .arg(&dir)
                    .arg("--hook-socket")
                    .arg(&socket)
                    // Policy builds happen too (the leader builds, followers defer), but
                    // followers never reach the deferral limit in this test.
                    .args(["--snapshot-policy-logs", "300"])
                    .args(["--defer-limit", "1000000"])
                    .args(["--max-in-snapshot-log-to-keep", &KEEP_LOGS.to_string()])
                    .args(["--keep-snapshots", "100"])
                    .env("RUST_LOG", "info,openraft=warn")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("starting kv-node");
                NodeProcess {
                    id,
                    http,
                    dir,
                    socket,
                    child,
                }
            })
            .collect();
        Cluster {
            nodes,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            root: Some(root),
        }
    }

    fn node(&self, id: u64) -> &NodeProcess {
        &self.nodes[(id - 1) as usize]
    }

    async fn post(&self, id: u64, path: &str, body: Value) -> Value {
        let url = format!("http://{}{path}", self.node(id).http);
        let response = self.http.post(&url).json(&body).send().await.unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert!(status.is_success(), "POST {url}: {status} {body}");
        body
    }

    async fn metrics(&self, id: u64) -> MetricsView {
        let url = format!("http://{}/metrics", self.node(id).http);
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls node `id`'s metrics until `done` holds.
    async fn wait_metrics(
        &self,
        id: u64,
        what: &str,
        done: impl Fn(&MetricsView) -> bool,
    ) -> MetricsView {
        let deadline = Instant::now() + WAIT;
        loop {
            let metrics = self.metrics(id).await;
            if done(&metrics) {
                return metrics;
            }
            assert!(
                Instant::now() < deadline,
                "node {id}: timed out waiting for {what}; last metrics {metrics:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + WAIT;
        for node in &mut self.nodes {
            loop {
                if let Some(status) = node.child.try_wait().unwrap() {
                    panic!("node {} exited at startup: {status}", node.id);
                }
                let url = format!("http://{}/metrics", node.http);
                if self.http.get(&url).send().await.is_ok() && node.socket.exists() {
                    break;
                }
                assert!(Instant::now() < deadline, "node {} did not start", node.id);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    async fn write_keys(&self, leader: u64, keys: std::ops::Range<u32>) {
        futures::stream::iter(keys)
            .map(|i| {
                self.post(
                    leader,
                    "/write",
                    json!({"key": format!("key-{i:04}"), "value": format!("value-{i}")}),
                )
            })
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await;
    }

    /// Triggers a build on the leader; returns the snapshot once committed in its directory.
    async fn leader_snapshot(&self, leader: u64) -> Snapshot {
        let applied = self.metrics(leader).await.last_applied.unwrap();
        self.post(leader, "/snapshot", json!({})).await;
        let metrics = self
            .wait_metrics(leader, "its snapshot to cover all applied logs", |m| {
                m.snapshot.is_some_and(|s| s.index >= applied.index)
            })
            .await;
        let snapshot = metrics.snapshot.unwrap();
        let (_, meta_name) = snapdir::file_names(snapshot.index, snapshot.term);
        let committed = Snapshot::open(&self.node(leader).dir.join("snapshots").join(meta_name))
            .expect("the leader's snapshot is committed in the directory contract");
        assert_eq!(
            committed.data_path.display().to_string(),
            metrics.snapshot_path.unwrap(),
            "the leader serves the committed file"
        );
        committed
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        if std::thread::panicking() {
            // Keep the node logs and directories for a look.
            if let Some(root) = self.root.take() {
                eprintln!("kv-node logs and data kept in {}", root.keep().display());
            }
        }
    }
}

/// A connection to a hook socket, as the sidecar holds one.
struct HookClient {
    reader: LineReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl HookClient {
    async fn connect(socket: &Path) -> HookClient {
        let (read, writer) = UnixStream::connect(socket).await.unwrap().into_split();
        HookClient {
            reader: LineReader::new(read),
            writer,
        }
    }

    async fn response(&mut self) -> ResponseFrame {
        // `save_snapshot` may wait for a build: allow more than the hook's 30 s bound.
        let line = tokio::time::timeout(Duration::from_secs(45), self.reader.next_line())
            .await
            .expect("a hook response in time")
            .unwrap();
        parse_response(line.as_bytes()).unwrap()
    }

    async fn call(&mut self, request: Request) -> ResponseFrame {
        let exchange = exchange(&mut self.reader, &mut self.writer, request);
        tokio::time::timeout(Duration::from_secs(45), exchange)
            .await
            .expect("a hook response in time")
            .unwrap()
    }

    async fn status(&mut self) -> Status {
        let response = self.call(Request::Status {}).await;
        assert!(response.ok, "{response:?}");
        serde_json::from_value(response.result.unwrap()).unwrap()
    }

    /// Does what the sidecar does after a verified download: the file is in the incoming
    /// directory, complete; hand it over.
    async fn save(&mut self, snapshot: &Snapshot, incoming: &Path) -> ResponseFrame {
        let bytes = std::fs::read(incoming).unwrap();
        let sha256: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.call(Request::SaveSnapshot {
            envelope: snapshot.envelope.clone(),
            path: incoming.to_str().unwrap().to_string(),
            sha256,
        })
        .await
    }
}

fn save_result(response: ResponseFrame) -> SaveResult {
    assert!(response.ok, "{response:?}");
    serde_json::from_value(response.result.unwrap()).unwrap()
}

/// Copies a leader's data file into a follower's incoming directory (as the sidecar's
/// assembled, verified file) and returns its path.
fn deliver(snapshot: &Snapshot, follower: &NodeProcess, name: &str) -> PathBuf {
    let incoming = follower.dir.join("snapshots/.incoming").join(name);
    std::fs::copy(&snapshot.data_path, &incoming).unwrap();
    incoming
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_adopt_the_leaders_snapshot_through_the_hook() {
    let mut cluster = Cluster::start(3);
    cluster.wait_ready().await;

    // Form the cluster: 1 alone, then 2 and 3 as learners, then all three as voters.
    cluster.post(1, "/init", json!({})).await;
    cluster
        .wait_metrics(1, "leadership", |m| m.role == Role::Leader)
        .await;
    for id in [2, 3] {
        let addr = cluster.node(id).http.clone();
        cluster
            .post(1, "/add-learner", json!({"id": id, "addr": addr}))
            .await;
    }
    cluster
        .post(1, "/change-membership", json!({"members": [1, 2, 3]}))
        .await;

    // Two leader snapshots: an older one (for the stale case) and the one to adopt.
    cluster.write_keys(1, 0..500).await;
    let older = cluster.leader_snapshot(1).await;
    cluster.write_keys(1, 500..1000).await;
    let newest = cluster.leader_snapshot(1).await;
    let target = LogIdRef {
        term: newest.envelope.last_log_term,
        index: newest.envelope.last_log_index,
    };
    assert!(older.envelope.last_log_index < target.index);
    let leader_bytes = std::fs::read(&newest.data_path).unwrap();

    // -- follower_adopts_leader_snapshot
    for id in [2, 3] {
        let before = cluster
            .wait_metrics(id, "applying the snapshot's logs", |m| {
                m.last_applied.is_some_and(|a| a.index >= target.index)
            })
            .await;
        assert_eq!(
            before.snapshots_built_locally, 0,
            "followers defer to the leader"
        );
        assert_eq!(before.snapshots_adopted, 0);

        let follower = cluster.node(id);
        let incoming = deliver(&newest, follower, "from-leader.bin");
        let mut hook = HookClient::connect(&follower.socket).await;
        let result = save_result(hook.save(&newest, &incoming).await);
        assert_eq!(result.outcome, SaveOutcome::Adopted, "node {id}");
        assert_eq!(result.snapshot, Some(target), "node {id}");
        assert!(
            !incoming.exists(),
            "node {id}: the incoming file was moved, not copied"
        );

        // openraft purges right after recording the snapshot, on its log I/O task.
        let after = cluster
            .wait_metrics(id, "purging after adoption", |m| m.purged > before.purged)
            .await;
        assert_eq!(
            after.snapshot,
            Some(target),
            "node {id}: openraft records the leader's snapshot"
        );
        assert_eq!(after.snapshots_built_locally, 0, "node {id}");
        assert_eq!(after.snapshots_adopted, 1, "node {id}");
        assert_eq!(after.snapshots_installed, 0, "node {id}");
        assert!(
            after.purged.unwrap().index >= target.index - KEEP_LOGS - 1,
            "node {id}: {after:?}"
        );
        let path = after.snapshot_path.expect("a current snapshot file");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            leader_bytes,
            "node {id}: the current snapshot is byte-identical to the leader's"
        );
        // The follower now holds the snapshot in the directory contract, with the
        // leader's envelope: a follower that becomes leader publishes the same thing. (The
        // leader's chunk index stays with the leader; an adopted snapshot has none.)
        let committed = snapdir::scan(&follower.dir.join("snapshots")).unwrap();
        let own = committed.snapshots.last().expect("a committed snapshot");
        assert_eq!(own.envelope.chunk_index, None, "node {id}");
        assert!(newest.envelope.chunk_index.is_some(), "the leader indexes");
        let leaders = snapdir::Envelope {
            chunk_index: None,
            ..newest.envelope.clone()
        };
        assert_eq!(own.envelope, leaders, "node {id}");
    }

    // -- older_snapshot_is_stale
    for id in [2, 3] {
        let follower = cluster.node(id);
        let incoming = deliver(&older, follower, "older.bin");
        let mut hook = HookClient::connect(&follower.socket).await;
        let result = save_result(hook.save(&older, &incoming).await);
        assert_eq!(result.outcome, SaveOutcome::Stale, "node {id}");
        assert_eq!(result.snapshot, Some(target), "node {id}");
        assert!(
            incoming.exists(),
            "node {id}: a stale file is left to the sidecar"
        );
        let metrics = cluster.metrics(id).await;
        assert_eq!(metrics.snapshot, Some(target));
        assert_eq!(metrics.snapshots_adopted, 1);
    }
    // The leader's own newest snapshot is not newer than what it has either.
    let leader = cluster.node(1);
    let incoming = deliver(&newest, leader, "own.bin");
    let mut hook = HookClient::connect(&leader.socket).await;
    assert_eq!(
        save_result(hook.save(&newest, &incoming).await).outcome,
        SaveOutcome::Stale
    );

    // -- status_reports_roles
    for id in [1, 2, 3] {
        let node = cluster.node(id);
        let status = HookClient::connect(&node.socket).await.status().await;
        assert_eq!(status.node_id, id);
        assert_eq!(
            status.role,
            if id == 1 {
                Role::Leader
            } else {
                Role::Follower
            },
            "node {id}"
        );
        assert_eq!(status.leader, Some(1), "node {id}");
        assert_eq!(status.snapshot, Some(target), "node {id}");
        assert!(status.last_applied.is_some_and(|a| a.index >= target.index));
        let snapshots = node.dir.join("snapshots").canonicalize().unwrap();
        assert_eq!(PathBuf::from(&status.snapshot_dir), snapshots);
        assert_eq!(
            PathBuf::from(&status.incoming_dir),
            snapshots.join(".incoming")
        );
    }

    // -- malformed_line_keeps_connection
    let mut hook = HookClient::connect(&cluster.node(2).socket).await;
    hook.writer.write_all(b"{\"v\":1,\"op\":\n").await.unwrap();
    let response = hook.response().await;
    assert!(!response.ok);
    assert_eq!(response.error.unwrap().code, ErrorCode::BadRequest);
    assert_eq!(
        hook.status().await.role,
        Role::Follower,
        "the connection still answers"
    );

    // Both followers still serve the data, and nothing went wrong in any node.
    let read = cluster
        .http
        .get(format!("http://{}/read?key=key-0999", cluster.node(3).http))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(read["value"], "value-999");
    for node in &mut cluster.nodes {
        assert!(
            node.child.try_wait().unwrap().is_none(),
            "node {} is still running",
            node.id
        );
    }
}
