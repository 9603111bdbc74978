//! A real `kv-node` process refuses what it must not adopt, answers with a distinct error
//! code, and keeps running (and restarting) afterwards. The test plays the sidecar on the
//! node's hook socket.
//!
//! - `a_file_the_node_cannot_read_is_refused_before_staging` (root only: the node runs as
//!   a user of its own): a 0600 file of another user in the incoming directory is answered
//!   `unreadable`, never staged, and the node serves on.
//! - `refused_snapshots_never_become_current_and_the_node_restarts`: a wrong sha256, on a
//!   genuine file or on garbage that does not validate either (`checksum_mismatch`: the
//!   sha256 and the validation run at once, and the damaged handover is what is reported),
//!   `{"hello":"world"}` with its right sha256, a relabelled genuine
//!   snapshot and an envelope whose raft_meta disagrees (`invalid_snapshot`), another term at
//!   a committed index (`log_mismatch`) are refused and removed; a far-future label is
//!   `not_committed` (transient, file kept); nothing becomes current, the refusals are
//!   counted in `/metrics`, and the node restarts cleanly.

mod common;

use common::{error_code, is_root, KvNode, TestAccounts};
use snaprelay_hook::ipc::ErrorCode;
use snaprelay_hook::snapdir::{self, Envelope};

fn envelope(index: u64, term: u64, size: u64) -> Envelope {
    Envelope {
        format: 1,
        last_log_index: index,
        last_log_term: term,
        data: snapdir::file_names(index, term).0,
        size,
        raft_meta: serde_json::json!({
            "last_log_id": {"leader_id": {"term": term, "node_id": 1}, "index": index},
            "last_membership": {"log_id": null, "membership": {"configs": [], "nodes": {}}}
        }),
        chunk_index: None,
        sha256: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_node_cannot_read_is_refused_before_staging() {
    if !is_root() {
        eprintln!("SKIPPED a_file_the_node_cannot_read_is_refused_before_staging: needs root to run the node as another user");
        return;
    }
    let mut accounts = TestAccounts::new();
    let name = format!("srkv{}", std::process::id() % 100_000);
    let (uid, gid) = accounts.user(&name);
    let root = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = root.path().join("node");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
    let node = KvNode::start(
        &dir,
        1,
        &["--hook-allow-user", "root", "--hook-allow-user", &name],
        Some((uid, gid)),
    )
    .await;
    node.init_alone().await;

    // What a sidecar of another user leaves when the directory is not setgid to the
    // node's group: a file the node cannot open.
    let file = node.incoming_dir().join("unreadable.bin");
    std::fs::write(&file, b"0123456789").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut hook = node.hook().await;
    let response = hook
        .save(&envelope(5, 1, 10), &file, &"ab".repeat(32))
        .await;
    let (code, message) = error_code(&response);
    assert_eq!(code, ErrorCode::Unreadable, "{message}");
    assert!(
        message.contains("cannot read") && message.contains("unreadable.bin"),
        "{message}"
    );
    assert!(file.exists(), "the sidecar's file is left to the sidecar");
    let staged: Vec<String> = snapdir::scan(&node.snapshot_dir())
        .unwrap()
        .snapshots
        .iter()
        .map(|s| s.envelope.data.clone())
        .collect();
    assert!(staged.is_empty(), "nothing committed: {staged:?}");
    for entry in std::fs::read_dir(node.snapshot_dir()).unwrap() {
        let entry = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!entry.starts_with(".staged-"), "nothing staged: {entry}");
    }
    assert_eq!(hook.status().await.node_id, 1, "the node serves on");
    node.write("k", "v").await;
    assert_eq!(node.read("k").await.as_deref(), Some("v"));
    drop(node);
    drop(accounts);
}

/// The node's own newest committed snapshot, after writing `keys` more keys and asking for
/// a build.
async fn snapshot_after_writes(node: &KvNode, from: u32, keys: u32) -> snapdir::Snapshot {
    for i in from..from + keys {
        node.write(&format!("key-{i:04}"), &format!("value-{i}"))
            .await;
    }
    let applied = node.metrics().await.last_applied.unwrap();
    node.post("/snapshot", serde_json::json!({})).await;
    let m = node
        .wait_metrics("a snapshot of everything applied", |m| {
            m.snapshot.is_some_and(|s| s.index >= applied.index)
        })
        .await;
    let s = m.snapshot.unwrap();
    snapdir::Snapshot::open(
        &node
            .snapshot_dir()
            .join(snapdir::file_names(s.index, s.term).1),
    )
    .unwrap()
}

/// `envelope` relabelled to `index`, envelope and raft_meta alike (as a forger would).
fn relabel(envelope: &Envelope, index: u64) -> Envelope {
    let mut e = envelope.clone();
    e.last_log_index = index;
    e.raft_meta["last_log_id"]["index"] = index.into();
    e.chunk_index = None;
    e
}

/// What a forger hands over: (what, envelope, data, sha256, expected code, reason).
type Forgery<'a> = (&'a str, Envelope, &'a [u8], String, ErrorCode, &'a str);

/// The refusals that must never make a file current, each with its distinct code, against
/// a real node; then the node restarts cleanly and still holds its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_snapshots_never_become_current_and_the_node_restarts() {
    let root = tempfile::tempdir().unwrap();
    let mut node = KvNode::start(
        &root.path().join("node"),
        1,
        &["--snapshot-policy-logs", "100000"],
        None,
    )
    .await;
    node.init_alone().await;
    let genuine = snapshot_after_writes(&node, 0, 50).await;
    let bytes = std::fs::read(&genuine.data_path).unwrap();
    // More writes: the forgeries claim a later, not yet snapshotted, log id.
    for i in 50..60 {
        node.write(&format!("key-{i:04}"), "later").await;
    }
    let applied = node.metrics().await.last_applied.unwrap();
    let later = relabel(&genuine.envelope, applied.index);
    let hello = br#"{"hello":"world"}"#;
    let mut hello_envelope = later.clone();
    hello_envelope.size = hello.len() as u64;
    let mut mislabelled = later.clone();
    mislabelled.raft_meta = genuine.envelope.raft_meta.clone();
    // Raft's log matching: the node's entry at that index has another term.
    let mut other_term = later.clone();
    other_term.last_log_term += 7;
    other_term.raft_meta["last_log_id"]["leader_id"]["term"] = other_term.last_log_term.into();

    let cases: Vec<Forgery> = vec![
        (
            "wrong sha256",
            later.clone(),
            &bytes,
            "ab".repeat(32),
            ErrorCode::ChecksumMismatch,
            "sha256",
        ),
        (
            // Checked at once, both fail: the damaged handover is what is reported.
            "garbage under a wrong sha256",
            hello_envelope.clone(),
            hello,
            "cd".repeat(32),
            ErrorCode::ChecksumMismatch,
            "sha256",
        ),
        (
            "hello world",
            hello_envelope,
            hello,
            common::sha256_hex(hello),
            ErrorCode::InvalidSnapshot,
            "does not end in a newline",
        ),
        (
            "relabelled genuine snapshot",
            later.clone(),
            &bytes,
            common::sha256_hex(&bytes),
            ErrorCode::InvalidSnapshot,
            "holds the state at",
        ),
        (
            "envelope and raft_meta disagree",
            mislabelled,
            &bytes,
            common::sha256_hex(&bytes),
            ErrorCode::InvalidSnapshot,
            "raft_meta says",
        ),
        (
            "another term at a committed index",
            other_term,
            &bytes,
            common::sha256_hex(&bytes),
            ErrorCode::LogMismatch,
            "does not match this node's log",
        ),
    ];
    let before = node.metrics().await;
    let mut hook = node.hook().await;
    for (i, (what, envelope, data, sha256, code, reason)) in cases.iter().enumerate() {
        let path = node.incoming_dir().join(format!("forged-{i}.bin"));
        std::fs::write(&path, data).unwrap();
        let response = hook.save(envelope, &path, sha256).await;
        let (got, message) = error_code(&response);
        assert_eq!(got, *code, "{what}: {message}");
        assert!(message.contains(reason), "{what}: {message}");
        assert!(!path.exists(), "{what}: the refused file was removed");
    }
    let after = node.metrics().await;
    assert_eq!(after.snapshot, before.snapshot, "nothing became current");
    assert_eq!(after.snapshot_path, before.snapshot_path);
    assert_eq!(after.snapshots_adopted, 0);
    assert_eq!(after.snapshots_refused.get("checksum_mismatch"), Some(&2));
    assert_eq!(after.snapshots_refused.get("invalid_snapshot"), Some(&3));
    assert_eq!(
        after.snapshots_refused.get("log_mismatch"),
        Some(&1),
        "{:?}",
        after.snapshots_refused
    );

    // Far beyond what the node has committed: transient, and the file is kept for later.
    let future = relabel(&genuine.envelope, applied.index + 1_000_000);
    let path = node.incoming_dir().join("future.bin");
    std::fs::write(&path, &bytes).unwrap();
    let response = hook.save(&future, &path, &common::sha256_hex(&bytes)).await;
    let (code, message) = error_code(&response);
    assert_eq!(code, ErrorCode::NotCommitted, "{message}");
    assert!(
        code.is_transient() && message.contains("beyond what this node has committed"),
        "{message}"
    );
    assert!(path.exists(), "a transient refusal keeps the file");
    let status = hook.status().await;
    assert!(
        status.committed.is_some_and(|c| c.index >= applied.index),
        "{status:?}"
    );
    assert_eq!(status.staged, None, "nothing staged");
    assert_eq!(node.metrics().await.snapshot, before.snapshot);
    let committed = snapdir::scan(&node.snapshot_dir()).unwrap();
    assert_eq!(
        committed.snapshots.len(),
        1,
        "only the node's own snapshot is committed"
    );
    for entry in std::fs::read_dir(node.snapshot_dir()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with(".staged-"), "nothing left staged: {name}");
    }
    assert_eq!(hook.status().await.node_id, 1, "the hook still serves");
    drop(hook);

    // A restart loads the node's own snapshot: nothing refused can stop it.
    node.restart().await;
    node.wait_metrics("leadership after the restart", |m| {
        m.role == snaprelay_hook::ipc::Role::Leader
    })
    .await;
    assert_eq!(node.read("key-0049").await.as_deref(), Some("value-49"));
    assert_eq!(node.metrics().await.snapshot, before.snapshot);
    assert!(node.is_running());
}
