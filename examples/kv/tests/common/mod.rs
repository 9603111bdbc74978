//! Shared by the kv example's process tests: a single `kv-node` process (optionally as
//! another user), and a hook client that plays the sidecar.
#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use snaprelay_example_kv::api::MetricsView;
use snaprelay_hook::ipc::{
    exchange, ErrorCode, LineReader, Request, ResponseFrame, SaveResult, Status,
};
use snaprelay_hook::snapdir::Envelope;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

pub const WAIT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `kv-node` process, killed when dropped.
pub struct KvNode {
    pub id: u64,
    pub http: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub args: Vec<String>,
    /// (uid, gid) to run as, if not this process's.
    pub user: Option<(u32, u32)>,
    child: Option<Child>,
    client: reqwest::Client,
}

impl KvNode {
    /// Starts node `id` in `dir` (created) with extra arguments; waits until it serves HTTP
    /// and its hook socket exists.
    pub async fn start(dir: &Path, id: u64, args: &[&str], user: Option<(u32, u32)>) -> KvNode {
        std::fs::create_dir_all(dir).unwrap();
        let mut node = KvNode {
            id,
            http: format!("127.0.0.1:{}", free_port()),
            dir: dir.to_owned(),
            socket: dir.join("hook.sock"),
            log: dir.join("node.log"),
            args: args.iter().map(|s| s.to_string()).collect(),
            user,
            child: None,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        };
        node.spawn().await;
        node
    }

    async fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_kv-node"));
        command
            .args(["--id", &self.id.to_string(), "--http", &self.http])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--hook-socket")
            .arg(&self.socket)
            .args(&self.args)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some((uid, gid)) = self.user {
            // std drops the supplementary groups (setgroups(0)) before setuid.
            command.uid(uid).gid(gid);
        }
        self.child = Some(command.spawn().expect("starting kv-node"));
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "node {} exited at startup: {status}\n{}",
                    self.id,
                    self.log_text()
                );
            }
            let url = format!("http://{}/metrics", self.http);
            if self.client.get(&url).send().await.is_ok() && self.socket.exists() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not start\n{}",
                self.id,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs the node and starts it again with the same directory and arguments.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    pub fn incoming_dir(&self) -> PathBuf {
        self.dir.join("snapshots/.incoming")
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        let url = format!("http://{}{path}", self.http);
        let deadline = Instant::now() + WAIT;
        loop {
            let response = self.client.post(&url).json(&body).send().await.unwrap();
            let status = response.status();
            let answer: Value = response.json().await.unwrap_or(Value::Null);
            if status.is_success() {
                return answer;
            }
            assert!(Instant::now() < deadline, "POST {url}: {status} {answer}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn metrics(&self) -> MetricsView {
        let url = format!("http://{}/metrics", self.http);
        self.client
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn metrics_json(&self) -> Value {
        let url = format!("http://{}/metrics", self.http);
        self.client
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls the metrics until `done` holds.
    pub async fn wait_metrics(
        &self,
        what: &str,
        done: impl Fn(&MetricsView) -> bool,
    ) -> MetricsView {
        let deadline = Instant::now() + WAIT;
        loop {
            let metrics = self.metrics().await;
            if done(&metrics) {
                return metrics;
            }
            assert!(
                Instant::now() < deadline,
                "node {}: timed out waiting for {what}; last metrics {metrics:?}\n{}",
                self.id,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Makes this node a cluster of one and waits until it leads.
    pub async fn init_alone(&self) {
        self.post("/init", json!({})).await;
        self.wait_metrics("leadership", |m| {
            m.role == snaprelay_hook::ipc::Role::Leader
        })
        .await;
    }

    pub async fn write(&self, key: &str, value: &str) {
        self.post("/write", json!({"key": key, "value": value}))
            .await;
    }

    pub async fn read(&self, key: &str) -> Option<String> {
        let url = format!("http://{}/read?key={key}", self.http);
        let v: Value = self
            .client
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["value"].as_str().map(str::to_owned)
    }

    pub async fn hook(&self) -> HookClient {
        HookClient::connect(&self.socket).await
    }
}

impl Drop for KvNode {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- node {} log ----\n{}", self.id, self.log_text());
        }
    }
}

/// A connection to a hook socket, as the sidecar holds one.
pub struct HookClient {
    pub reader: LineReader<OwnedReadHalf>,
    pub writer: OwnedWriteHalf,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl HookClient {
    pub async fn connect(socket: &Path) -> HookClient {
        let (read, writer) = UnixStream::connect(socket).await.unwrap().into_split();
        HookClient {
            reader: LineReader::new(read),
            writer,
        }
    }

    pub async fn call(&mut self, request: Request) -> ResponseFrame {
        let exchange = exchange(&mut self.reader, &mut self.writer, request);
        tokio::time::timeout(Duration::from_secs(45), exchange)
            .await
            .expect("a hook response in time")
            .unwrap()
    }

    pub async fn line(&mut self) -> Vec<u8> {
        tokio::time::timeout(Duration::from_secs(45), self.reader.next_line())
            .await
            .expect("a hook response in time")
            .unwrap()
            .into_bytes()
    }

    pub async fn status(&mut self) -> Status {
        let response = self.call(Request::Status {}).await;
        assert!(response.ok, "{response:?}");
        serde_json::from_value(response.result.unwrap()).unwrap()
    }

    /// Hands over `path` (already in the incoming directory) with `envelope` and `sha256`.
    pub async fn save(&mut self, envelope: &Envelope, path: &Path, sha256: &str) -> ResponseFrame {
        self.call(Request::SaveSnapshot {
            envelope: envelope.clone(),
            path: path.to_str().unwrap().to_string(),
            sha256: sha256.to_owned(),
        })
        .await
    }
}

pub fn save_result(response: ResponseFrame) -> SaveResult {
    assert!(response.ok, "{response:?}");
    serde_json::from_value(response.result.unwrap()).unwrap()
}

/// The error code of a refused request.
pub fn error_code(response: &ResponseFrame) -> (ErrorCode, String) {
    assert!(!response.ok, "expected a refusal, got {response:?}");
    let error = response.error.clone().unwrap();
    (error.code, error.message)
}

/// Real users and groups (root only), removed on drop.
pub struct TestAccounts {
    names: Vec<String>,
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

impl TestAccounts {
    pub fn new() -> TestAccounts {
        TestAccounts { names: Vec::new() }
    }

    /// A user with a group of the same name; returns (uid, gid).
    pub fn user(&mut self, name: &str) -> (u32, u32) {
        let status = Command::new("useradd")
            .args(["-M", "-U", "-s", "/usr/sbin/nologin", name])
            .status()
            .expect("running useradd");
        assert!(status.success(), "useradd {name}: {status}");
        self.names.push(name.to_owned());
        let id = |flag: &str| {
            let out = Command::new("id").args([flag, name]).output().unwrap();
            String::from_utf8(out.stdout)
                .unwrap()
                .trim()
                .parse::<u32>()
                .unwrap()
        };
        (id("-u"), id("-g"))
    }
}

impl Drop for TestAccounts {
    fn drop(&mut self) {
        for name in &self.names {
            // userdel removes the user's own group too (USERGROUPS_ENAB).
            let _ = Command::new("userdel").arg(name).status();
            let _ = Command::new("groupdel")
                .arg(name)
                .stderr(Stdio::null())
                .status();
        }
    }
}
