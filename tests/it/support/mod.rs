//! Shared helpers for the flow tests: stores (file, memory, and the real S3 server that
//! `scripts/test.sh` starts), snapshot files written in the directory contract, and running
//! the real `snaprelay` binary.
#![allow(dead_code)]

pub mod cluster;
pub mod faults;
pub mod gate;
pub mod hook_proxy;
pub mod http_gate;
pub mod interleave;
pub mod proxy;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use snaprelay::config::Secret;
use snaprelay::store::{StoreSettings, StoreUrl};

/// The real S3 server, if the environment names one (scripts/test.sh does).
pub struct S3 {
    pub endpoint: String,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

/// The S3 test server, or `None` with a message saying how to enable the tests. Under
/// `SNAPRELAY_TEST_S3_REQUIRED=1` (CI) a missing server fails the test instead.
pub fn s3(test: &str) -> Option<S3> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match (
        var("SNAPRELAY_TEST_S3_ENDPOINT"),
        var("SNAPRELAY_TEST_S3_BUCKET"),
        var("AWS_ACCESS_KEY_ID"),
        var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(endpoint), Some(bucket), Some(key_id), Some(secret)) => Some(S3 {
            endpoint,
            bucket,
            key_id,
            secret,
        }),
        _ => {
            let msg = format!(
                "{test}: no S3 server configured; run scripts/test.sh (it starts SeaweedFS on \
                 loopback) or set SNAPRELAY_TEST_S3_ENDPOINT, SNAPRELAY_TEST_S3_BUCKET, \
                 AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            );
            if var("SNAPRELAY_TEST_S3_REQUIRED").as_deref() == Some("1") {
                panic!("{msg}");
            }
            eprintln!("SKIPPED {msg}");
            None
        }
    }
}

/// A key prefix no other test (or earlier run) uses.
pub fn unique(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{name}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl S3 {
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    pub fn settings(&self, prefix: &str) -> StoreSettings {
        let mut s = StoreSettings::for_url(StoreUrl::parse(&self.url(prefix)).unwrap());
        s.s3.endpoint = Some(self.endpoint.clone());
        s.s3.allow_http = true;
        s.s3.access_key_id = Some(self.key_id.clone());
        s.s3.secret_access_key = Some(Secret::new(self.secret.clone()));
        s
    }

    /// A config file for the CLI (credentials come from the AWS_* environment).
    pub fn config_file(&self, dir: &Path, prefix: &str, cluster: &str, extra: &str) -> PathBuf {
        let path = dir.join(format!("{}.toml", unique("cfg")));
        std::fs::write(
            &path,
            format!(
                "cluster_id = \"{cluster}\"\n[store]\nurl = \"{}\"\nendpoint = \"{}\"\nallow_http = true\n{extra}",
                self.url(prefix),
                self.endpoint
            ),
        )
        .unwrap();
        path
    }
}

/// The two repository layouts, for flows that hold on both (packs are the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Chunks,
    Packs,
}

impl Layout {
    /// The `[repository]` section that makes a new repository of this layout, with `keys`
    /// (more `key = value` lines of the section) after `layout`.
    pub fn section(self, keys: &str) -> String {
        let layout = match self {
            Layout::Chunks => "chunks",
            Layout::Packs => "packs",
        };
        format!("[repository]\nlayout = \"{layout}\"\n{keys}")
    }
}

/// The key of pack `id` in `store` (the layout `repo.rs` names packs by).
pub fn pack_key(
    store: &snaprelay::store::Store,
    id: &snaprelay::pack::PackId,
) -> object_store::path::Path {
    let hex = id.to_hex();
    store.key(&format!("packs/{}/{hex}", &hex[..2]))
}

/// The stored bytes of pack `id`.
pub async fn pack_bytes(store: &snaprelay::store::Store, id: &snaprelay::pack::PackId) -> Vec<u8> {
    use object_store::ObjectStoreExt;
    store
        .backend
        .get(&pack_key(store, id))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

/// Where a CLI test keeps its store: how to point the binary at it.
pub struct Target {
    pub args: Vec<String>,
    pub settings: StoreSettings,
    pub cluster: String,
}

impl Target {
    /// A fresh file:// store under `dir`, with optional extra config (e.g. `[chunking]`).
    pub fn file(dir: &Path, cluster: &str, extra: &str) -> Target {
        let store = dir.join(unique("store"));
        let url = format!("file://{}", store.display());
        let cfg = dir.join(format!("{}.toml", unique("cfg")));
        std::fs::write(
            &cfg,
            format!("cluster_id = \"{cluster}\"\n[store]\nurl = \"{url}\"\n{extra}"),
        )
        .unwrap();
        Target {
            args: vec!["--config".into(), cfg.display().to_string()],
            settings: StoreSettings::for_url(StoreUrl::parse(&url).unwrap()),
            cluster: cluster.into(),
        }
    }

    /// A fresh prefix on the S3 test server.
    pub fn s3(s3: &S3, dir: &Path, cluster: &str, extra: &str) -> Target {
        let prefix = unique("t");
        let cfg = s3.config_file(dir, &prefix, cluster, extra);
        Target {
            args: vec!["--config".into(), cfg.display().to_string()],
            settings: s3.settings(&prefix),
            cluster: cluster.into(),
        }
    }

    /// Runs `snaprelay <global args> <args>`.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_snaprelay"));
        cmd.args(&self.args).args(args);
        cmd.output().expect("running snaprelay")
    }

    /// Starts `snaprelay <global args> <args>` with stdout and stderr captured.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_snaprelay"))
            .args(&self.args)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting snaprelay")
    }

    /// Runs and expects success; returns stdout parsed as JSON.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "snaprelay {args:?} failed ({:?}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout of {args:?} is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub async fn repo(&self) -> snaprelay::repo::Repo {
        let store = snaprelay::store::Store::open(&self.settings).unwrap();
        snaprelay::repo::Repo::open(store, &self.cluster)
            .await
            .unwrap()
    }

    pub fn store(&self) -> snaprelay::store::Store {
        snaprelay::store::Store::open(&self.settings).unwrap()
    }
}

/// Writes a data file and its envelope in the snapshot directory contract; returns the
/// meta file's path.
pub fn write_snapshot(dir: &Path, index: u64, term: u64, data: &[u8]) -> PathBuf {
    write_snapshot_with(dir, index, term, |f| f.write_all(data))
}

/// Writes `size` pseudo-random bytes (seeded) as a snapshot, streaming in 1 MiB blocks.
pub fn write_random_snapshot(dir: &Path, index: u64, term: u64, size: u64, seed: u64) -> PathBuf {
    write_snapshot_with(dir, index, term, |f| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut block = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            rng.fill_bytes(&mut block[..n]);
            f.write_all(&block[..n])?;
            left -= n as u64;
        }
        Ok(())
    })
}

pub fn write_snapshot_with(
    dir: &Path,
    index: u64,
    term: u64,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let data_name = format!("node-{index}-{term}.snap");
    let data_path = dir.join(&data_name);
    let mut w = std::io::BufWriter::new(std::fs::File::create(&data_path).unwrap());
    fill(&mut w).unwrap();
    w.into_inner().unwrap().sync_all().unwrap();
    let size = std::fs::metadata(&data_path).unwrap().len();
    let meta = serde_json::json!({
        "format": 1,
        "last_log_index": index,
        "last_log_term": term,
        "data": data_name,
        "size": size,
        "raft_meta": raft_meta(index, term),
    });
    let meta_path = dir.join(format!("node-{index}-{term}.meta.json"));
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    meta_path
}

/// Writes `data` as the snapshot at `index`/`term` the way a node using the hook library
/// does: through `SnapshotDir::write`, which writes the chunk index (cut with `chunking`)
/// beside the data file. Returns the meta file's path.
pub fn write_node_snapshot(
    dir: &Path,
    index: u64,
    term: u64,
    data: &[u8],
    chunking: Option<snaprelay::chunk::ChunkParams>,
) -> PathBuf {
    let snapshots = snaprelay_hook::SnapshotDir::open(dir)
        .unwrap()
        .with_chunk_index(chunking)
        .unwrap();
    let log_id = snaprelay::ipc::LogIdRef { term, index };
    snapshots
        .write(log_id, &raft_meta(index, term), |w| w.write_all(data))
        .unwrap()
        .meta_path
}

/// An openraft `SnapshotMeta` as serde JSON, for snapshots the tests write.
fn raft_meta(index: u64, term: u64) -> serde_json::Value {
    serde_json::json!({"last_log_id": {"leader_id": {"term": term, "node_id": 1}, "index": index},
                       "last_membership": {"log_id": null, "membership": {"configs": [], "nodes": {}}}})
}

/// sha256 of a file, streaming.
pub fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// Every entry of a directory (hidden ones included), sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A signing key made by `snaprelay keygen` for a test (never a committed one).
#[derive(Debug, Clone)]
pub struct Key {
    pub file: PathBuf,
    pub id: String,
    pub public: String,
    /// The line for a trusted keys file.
    pub line: String,
}

/// Runs `snaprelay keygen --out <dir>/<name>.pem --comment <name> --json`.
pub fn keygen(dir: &Path, name: &str) -> Key {
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join(format!("{name}.pem"));
    let out = Command::new(env!("CARGO_BIN_EXE_snaprelay"))
        .args(["keygen", "--comment", name, "--json", "--out"])
        .arg(&file)
        .output()
        .expect("running snaprelay keygen");
    assert!(out.status.success(), "keygen failed: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Key {
        file,
        id: v["key_id"].as_str().unwrap().to_owned(),
        public: v["public_key"].as_str().unwrap().to_owned(),
        line: v["trusted_key"].as_str().unwrap().to_owned(),
    }
}

/// A `[signing]` section signing with `key` and trusting the keys listed in `trusted_file`.
pub fn signing_section(key: Option<&Key>, trusted_file: &Path) -> String {
    let key_file = key
        .map(|k| format!("key_file = \"{}\"\n", k.file.display()))
        .unwrap_or_default();
    format!(
        "[signing]\n{key_file}trusted_keys_file = \"{}\"\n",
        trusted_file.display()
    )
}

/// Writes a trusted keys file listing `keys`.
pub fn write_trusted(path: &Path, keys: &[&Key]) {
    let mut text = String::from("# the cluster's publishers\n");
    for k in keys {
        text.push_str(&k.line);
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// Longer than any of these commands takes on a loaded 2-core machine, short enough that a
/// hang fails the test in reasonable time.
pub const LIMIT: Duration = Duration::from_secs(90);

/// Runs `cmd` to completion, or kills it and fails after [`LIMIT`].
pub fn run_bounded(mut cmd: Command, what: &str) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting snaprelay");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(out) => out.expect("waiting for snaprelay"),
        Err(_) => {
            // SAFETY: signals the child this test started (it has not been reaped: the
            // waiting thread still holds it).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{what}: snaprelay did not finish within {LIMIT:?} (it hangs)");
        }
    }
}

pub fn fail_text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr(out)
    )
}

/// Makes a FIFO at `path`.
pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a plain syscall on a NUL-terminated path that outlives it.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0, "mkfifo");
}

/// `len` pseudo-random bytes from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// A format-2 manifest of `data` at `index`/`term` for `repo` (a repository of packs),
/// its chunks written into new packs of its own (no base: nothing shared with other
/// manifests), not committed: for tests that plant manifests of their making.
pub async fn packed_manifest(
    repo: &snaprelay::repo::Repo,
    data: &[u8],
    index: u64,
    term: u64,
    raft_meta: serde_json::Value,
) -> snaprelay::manifest_v2::Manifest {
    use snaprelay::manifest_v2 as v2;
    let descriptor = repo.packs().expect("a repository of packs");
    let chunks = snaprelay::chunk::index_to_scratch(data, descriptor.chunking)
        .unwrap()
        .read_all()
        .unwrap()
        .chunks;
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(data).unwrap();
    let packed = snaprelay::packer::pack_snapshot(
        repo,
        descriptor,
        None,
        std::sync::Arc::new(file),
        "planted snapshot",
        &chunks,
        snaprelay::packer::ChunkList::Cut,
        snaprelay::pack::upload::PartBudget::new(2, 8 << 20),
        None,
    )
    .await
    .unwrap();
    let manifest = v2::Manifest {
        format: v2::MANIFEST_FORMAT,
        cluster_id: descriptor.cluster_id.clone(),
        incarnation: descriptor.incarnation.clone(),
        last_log_index: index,
        last_log_term: term,
        raft_meta,
        size: packed.size,
        sha256: snaprelay::chunk::Digest::of(data),
        chunks: packed.chunks,
        packs: packed.packs,
        blocks: packed.blocks,
        created_at: chrono::Utc::now(),
        publisher: v2::Publisher {
            node_id: None,
            version: "test".into(),
        },
    };
    manifest.validate(descriptor).unwrap();
    manifest
}
