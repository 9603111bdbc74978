//! A real cluster for end-to-end tests: node processes (an example openraft application,
//! `kv-node` by default or `counter-node`, talking HTTP over loopback) and `snaprelay run`
//! sidecars, each a separate process with its own directory, socket and log file.
//! Everything is killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The `kv-node` binary, built on demand when the workspace build did not build it.
pub fn kv_node_bin() -> PathBuf {
    example_bin("snaprelay-example-kv", "kv-node")
}

/// The `counter-node` binary (the minimal example), built on demand likewise.
pub fn counter_node_bin() -> PathBuf {
    example_bin("snaprelay-example-counter", "counter-node")
}

fn example_bin(package: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_snaprelay"))
        .parent()
        .unwrap()
        .to_owned();
    let bin = dir.join(name);
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", package, "--bin", name])
            .status()
            .unwrap_or_else(|e| panic!("running cargo build for {name}: {e}"));
        assert!(status.success(), "building {name} failed");
    }
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Node {
    pub id: u64,
    pub addr: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }
}

pub struct Sidecar {
    pub config: PathBuf,
    /// Where its /metrics, /healthz and /readyz are served.
    pub metrics: String,
    pub log: PathBuf,
    child: Option<Child>,
}

/// How the sidecars reach the store: the `[store]` section of their config.
#[derive(Clone)]
pub struct StoreSection(pub String);

impl StoreSection {
    pub fn file(dir: &Path) -> StoreSection {
        StoreSection(format!("[store]\nurl = \"file://{}\"\n", dir.display()))
    }

    pub fn s3(s3: &super::S3, prefix: &str) -> StoreSection {
        StoreSection(format!(
            "[store]\nurl = \"{}\"\nendpoint = \"{}\"\nallow_http = true\n",
            s3.url(prefix),
            s3.endpoint
        ))
    }
}

pub struct Cluster {
    pub work: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub sidecars: Vec<Option<Sidecar>>,
    pub store: StoreSection,
    /// The `[repository]` section of every sidecar's config (what the leader's creates the
    /// repository as): empty, the default (packs), unless a test sets it.
    pub repository: String,
    /// Extra node arguments (snapshot policy and the like).
    pub node_args: Vec<String>,
    /// Extra TOML appended to a node's sidecar config (e.g. `[signing]`), by node id.
    pub sidecar_config: std::collections::HashMap<u64, String>,
    /// The node binary: `kv-node` unless started with [`Cluster::start_with`].
    pub node_bin: PathBuf,
    /// Extra `key = value` lines in every sidecar's `[daemon]` section.
    pub sidecar_daemon: String,
    /// Extra `[daemon]` lines for one node's sidecar, by node id.
    pub sidecar_daemon_for: std::collections::HashMap<u64, String>,
    /// A node's sidecar's HTTP listen address, fixed before it starts (see
    /// [`Cluster::sidecar_listen`]); otherwise a free port at each start.
    pub sidecar_listen: std::collections::HashMap<u64, String>,
    /// A node's sidecar reaches the store another way (e.g. through its own proxy).
    pub sidecar_store: std::collections::HashMap<u64, StoreSection>,
    /// A node's sidecar talks to this socket instead of the node's own (a hook proxy).
    pub sidecar_hook: std::collections::HashMap<u64, PathBuf>,
    /// Leave `node_id` out of the sidecars' configs (they learn it from the node).
    pub omit_node_id: bool,
    /// The sidecars' `node.hook_timeout`.
    pub hook_timeout: String,
    pub http: reqwest::Client,
}

impl Cluster {
    /// Starts `n` nodes, forms a cluster of all of them, and starts a sidecar per node.
    pub async fn start(n: u64, store: StoreSection, node_args: &[&str]) -> Cluster {
        Cluster::start_with(kv_node_bin(), n, store, node_args).await
    }

    /// [`Cluster::start`] with another node binary (same command line and HTTP API subset:
    /// `--id --http --dir --hook-socket`, `/init`, `/add-learner`, `/change-membership`,
    /// `/write`, `/snapshot`, `/metrics`).
    pub async fn start_with(
        bin: PathBuf,
        n: u64,
        store: StoreSection,
        node_args: &[&str],
    ) -> Cluster {
        let mut cluster = Cluster::start_nodes_with(bin, n, store, node_args).await;
        for id in 1..=n {
            cluster.start_sidecar(id);
        }
        cluster
    }

    /// Starts `n` nodes and forms a cluster of all of them, without sidecars.
    pub async fn start_nodes(n: u64, store: StoreSection, node_args: &[&str]) -> Cluster {
        Cluster::start_nodes_with(kv_node_bin(), n, store, node_args).await
    }

    /// [`Cluster::start_nodes`], with the nodes' directories in `root` (a file system of the
    /// test's choosing) instead of the target's temp dir.
    pub async fn start_nodes_in(
        root: &Path,
        n: u64,
        store: StoreSection,
        node_args: &[&str],
    ) -> Cluster {
        Cluster::start_nodes_with_in(root, kv_node_bin(), n, store, node_args).await
    }

    async fn start_nodes_with(
        node_bin: PathBuf,
        n: u64,
        store: StoreSection,
        node_args: &[&str],
    ) -> Cluster {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        Cluster::start_nodes_with_in(root, node_bin, n, store, node_args).await
    }

    async fn start_nodes_with_in(
        root: &Path,
        node_bin: PathBuf,
        n: u64,
        store: StoreSection,
        node_args: &[&str],
    ) -> Cluster {
        let work = tempfile::Builder::new()
            .prefix("snaprelay-e2e-")
            .tempdir_in(root)
            .unwrap();
        let mut cluster = Cluster {
            work,
            nodes: Vec::new(),
            sidecars: Vec::new(),
            store,
            repository: String::new(),
            node_args: node_args.iter().map(|s| s.to_string()).collect(),
            sidecar_config: Default::default(),
            node_bin,
            sidecar_daemon: String::new(),
            sidecar_daemon_for: Default::default(),
            sidecar_listen: Default::default(),
            sidecar_store: Default::default(),
            sidecar_hook: Default::default(),
            omit_node_id: false,
            hook_timeout: "60s".into(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        for id in 1..=n {
            cluster.spawn_node(id);
        }
        for node in &cluster.nodes {
            cluster.wait_http(node).await;
        }
        cluster.post(1, "/init", json!({})).await;
        for id in 2..=n {
            let addr = cluster.nodes[id as usize - 1].addr.clone();
            cluster
                .post(1, "/add-learner", json!({"id": id, "addr": addr}))
                .await;
        }
        let members: Vec<u64> = (1..=n).collect();
        cluster
            .post(1, "/change-membership", json!({"members": members}))
            .await;
        cluster
    }

    /// Spawns a node process (not yet a member).
    pub fn spawn_node(&mut self, id: u64) -> &Node {
        let dir = self.work.path().join(format!("node{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let socket = dir.join("hook.sock");
        let log = dir.join("node.log");
        let mut node = Node {
            id,
            addr,
            dir,
            socket,
            log,
            child: None,
        };
        node.child = Some(self.node_process(&node));
        self.nodes.push(node);
        self.nodes.last().unwrap()
    }

    /// Starts node `id` again (after [`Cluster::kill_node`]) with the same address, data
    /// directory and socket; its log goes on in the same file.
    pub async fn restart_node(&mut self, id: u64) {
        let slot = self.nodes.iter().position(|n| n.id == id).unwrap();
        assert!(self.nodes[slot].child.is_none(), "node {id} is running");
        let child = self.node_process(&self.nodes[slot]);
        self.nodes[slot].child = Some(child);
        let node = &self.nodes[slot];
        self.wait_http(node).await;
    }

    fn node_process(&self, node: &Node) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        Command::new(&self.node_bin)
            .args(["--id", &node.id.to_string(), "--http", &node.addr])
            .arg("--dir")
            .arg(&node.dir)
            .arg("--hook-socket")
            .arg(&node.socket)
            .args(&self.node_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning kv-node")
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`) to node `id`'s process.
    pub fn signal_node(&self, id: u64, signal: i32) {
        let child = self.node(id).child.as_ref().expect("node not running");
        // SAFETY: kill(2) on a child this harness spawned and has not reaped.
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
    }

    pub fn node(&self, id: u64) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .expect("no such node")
    }

    /// Writes the sidecar's config and starts `snaprelay run` for node `id`.
    pub fn start_sidecar(&mut self, id: u64) {
        self.start_sidecar_with_env(id, &[]);
    }

    /// Like [`Cluster::start_sidecar`], with extra environment variables.
    pub fn start_sidecar_with_env(&mut self, id: u64, env: &[(&str, &str)]) {
        self.start_sidecar_with(id, env, true);
    }

    /// Node `id`'s sidecar's `daemon.state_dir` (when it has one).
    pub fn sidecar_state_dir(&self, id: u64) -> PathBuf {
        self.node(id).dir.join("sidecar").join("state")
    }

    /// Like [`Cluster::start_sidecar_with_env`]; without `state_dir`, the config sets no
    /// `daemon.state_dir`.
    pub fn start_sidecar_with(&mut self, id: u64, env: &[(&str, &str)], state_dir: bool) {
        let node = self.node(id);
        let dir = node.dir.join("sidecar");
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("snaprelay.toml");
        let metrics = self
            .sidecar_listen
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let state_dir = match state_dir {
            true => format!("state_dir = \"{}\"\n", self.sidecar_state_dir(id).display()),
            false => String::new(),
        };
        let node_id = match self.omit_node_id {
            true => String::new(),
            false => format!("node_id = {id}\n"),
        };
        let store = self.sidecar_store.get(&id).unwrap_or(&self.store);
        // Unless a test sets it, a follower lists on every poll, as before listings were
        // scheduled: the flows that are not about propagation do not wait for a fallback.
        let mut daemon = self.sidecar_daemon.clone();
        let own = self
            .sidecar_daemon_for
            .get(&id)
            .map(String::as_str)
            .unwrap_or("");
        if !daemon.contains("list_interval") && !own.contains("list_interval") {
            daemon.push_str("list_interval = \"250ms\"\n");
        }
        let hook = self.sidecar_hook.get(&id).unwrap_or(&node.socket);
        std::fs::write(
            &config,
            format!(
                "cluster_id = \"e2e\"\n{node_id}{}\n{}\n[node]\nhook_socket = \"{}\"\nhook_timeout = \"{}\"\n\
                 [daemon]\npoll_interval = \"250ms\"\nrescan_interval = \"2s\"\nmax_backoff = \"2s\"\n{state_dir}{}{}\n\
                 [metrics]\nlisten = \"{metrics}\"\n{}",
                store.0,
                self.repository,
                hook.display(),
                self.hook_timeout,
                daemon,
                self.sidecar_daemon_for.get(&id).map(String::as_str).unwrap_or(""),
                self.sidecar_config.get(&id).map(String::as_str).unwrap_or(""),
            ),
        )
        .unwrap();
        let log = dir.join(format!("sidecar-{}.log", super::unique("run")));
        let child = Command::new(env!("CARGO_BIN_EXE_snaprelay"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("SNAPRELAY_LOG", "info,snaprelay=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning snaprelay run");
        let slot = id as usize - 1;
        if self.sidecars.len() <= slot {
            self.sidecars.resize_with(slot + 1, || None);
        }
        // Never leave a replaced sidecar running behind the harness's back.
        if let Some(old) = self.sidecars[slot].as_mut().and_then(|s| s.child.take()) {
            let mut old = old;
            let _ = old.kill();
            let _ = old.wait();
        }
        self.sidecars[slot] = Some(Sidecar {
            config,
            metrics,
            log,
            child: Some(child),
        });
    }

    /// Fixes node `id`'s sidecar's HTTP listen address (before it starts: a leader's
    /// `daemon.peers` names it), and returns it.
    pub fn sidecar_listen(&mut self, id: u64) -> String {
        self.sidecar_listen
            .entry(id)
            .or_insert_with(|| format!("127.0.0.1:{}", free_port()))
            .clone()
    }

    /// SIGKILLs node `id`'s sidecar.
    pub fn kill_sidecar(&mut self, id: u64) {
        if let Some(Some(s)) = self.sidecars.get_mut(id as usize - 1) {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// SIGTERMs node `id`'s sidecar and returns how long it took to exit, and its status.
    pub fn stop_sidecar(&mut self, id: u64) -> (Duration, std::process::ExitStatus) {
        let s = self.sidecars[id as usize - 1].as_mut().expect("no sidecar");
        let mut child = s.child.take().expect("sidecar not running");
        let started = Instant::now();
        sigterm(child.id());
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (started.elapsed(), status);
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("sidecar {id} did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for node `id`'s sidecar to exit by itself; its status, or
    /// `None` if it is still running.
    pub fn wait_sidecar_exit(
        &mut self,
        id: u64,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let s = self.sidecars[id as usize - 1].as_mut().expect("no sidecar");
        let child = s.child.as_mut().expect("sidecar not running");
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Some(status) = child.try_wait().unwrap() {
                s.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILLs node `id`.
    pub fn kill_node(&mut self, id: u64) {
        let node = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn wait_http(&self, node: &Node) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self
                .http
                .get(format!("http://{}/metrics", node.addr))
                .send()
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.fail(&format!("node {} did not start serving HTTP", node.id));
    }

    /// POSTs JSON to node `id`, retrying while the cluster settles; returns the response.
    pub async fn post(&self, id: u64, path: &str, body: Value) -> Value {
        let url = format!("http://{}{path}", self.node(id).addr);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.http.post(&url).json(&body).send().await {
                Ok(r) if r.status().is_success() => return r.json().await.unwrap_or(Value::Null),
                Ok(r) => last = format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.fail(&format!("POST {url} {body} kept failing: {last}"))
    }

    pub async fn metrics(&self, id: u64) -> Value {
        let url = format!("http://{}/metrics", self.node(id).addr);
        match self.http.get(&url).send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    /// The id of the current leader, as node `via` sees it.
    pub async fn leader(&self, via: u64) -> Option<u64> {
        self.metrics(via).await["leader"].as_u64()
    }

    /// Writes `count` keys through whichever node leads.
    pub async fn write_keys(&self, prefix: &str, count: usize, value_len: usize) {
        let value = "v".repeat(value_len);
        self.write_keys_with(prefix, count, |_| value.clone()).await
    }

    /// Writes `count` keys through whichever node leads, each with `value_len` random
    /// letters and digits (seeded): state that compresses little, unlike
    /// [`Cluster::write_keys`]'s repeated letter, so that a pack repository stores about as
    /// many bytes as the snapshot has.
    pub async fn write_random_keys(&self, prefix: &str, count: usize, value_len: usize, seed: u64) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        self.write_keys_with(prefix, count, |_| {
            (0..value_len)
                .map(|_| rng.sample(rand::distr::Alphanumeric) as char)
                .collect()
        })
        .await
    }

    /// Writes `count` keys through whichever node leads, key `i` with `value(i)`.
    async fn write_keys_with(
        &self,
        prefix: &str,
        count: usize,
        mut value: impl FnMut(usize) -> String,
    ) {
        let live: Vec<u64> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect();
        let mut via = live[0];
        for i in 0..count {
            if let Some(l) = self.leader(via).await {
                if live.contains(&l) {
                    via = l;
                }
            }
            self.post(
                via,
                "/write",
                json!({"key": format!("{prefix}{i:06}"), "value": value(i)}),
            )
            .await;
        }
    }

    /// Writes `count` keys through node `via` (which must lead, or accept writes).
    pub async fn write_keys_via(&self, via: u64, prefix: &str, count: usize, value_len: usize) {
        let value = "v".repeat(value_len);
        for i in 0..count {
            self.post(
                via,
                "/write",
                json!({"key": format!("{prefix}{i:06}"), "value": value}),
            )
            .await;
        }
    }

    /// Waits until `check` returns a value, failing with every process's log tail after
    /// `timeout`.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.fail(&format!("timed out after {timeout:?} waiting for {what}"));
    }

    /// Panics with the tails of all logs, so a failure explains itself.
    pub fn fail(&self, why: &str) -> ! {
        let mut out = format!("{why}\n");
        let mut logs: Vec<&Path> = self.nodes.iter().map(|n| n.log.as_path()).collect();
        logs.extend(self.sidecars.iter().flatten().map(|s| s.log.as_path()));
        for log in logs {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(25).collect();
            out.push_str(&format!("---- {} ----\n", log.display()));
            for line in tail.iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        panic!("{out}");
    }

    pub fn sidecar(&self, id: u64) -> &Sidecar {
        self.sidecars[id as usize - 1].as_ref().expect("no sidecar")
    }

    /// GETs a path from node `id`'s sidecar HTTP listener: (status, body).
    pub async fn sidecar_http(&self, id: u64, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.sidecar(id).metrics);
        match self.http.get(&url).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// The value of a metric sample (exact name with labels) in node `id`'s sidecar.
    pub async fn sidecar_metric(&self, id: u64, sample: &str) -> Option<f64> {
        let (_, text) = self.sidecar_http(id, "/metrics").await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .and_then(|v| v.trim().parse().ok())
    }

    /// Every line of node `id`'s sidecar logs (all runs).
    pub fn sidecar_log(&self, id: u64) -> String {
        let dir = self.node(id).dir.join("sidecar");
        let mut text = String::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "log") {
                text.push_str(&std::fs::read_to_string(p).unwrap_or_default());
            }
        }
        text
    }
}

fn sigterm(pid: u32) {
    // SAFETY: kill(2) on a child we spawned and have not reaped; no memory is involved.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in self.sidecars.iter_mut().flatten() {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
