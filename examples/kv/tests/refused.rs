//! A real `kv-node` process refuses what it must not adopt, answers with a distinct error
//! code, and keeps running (and restarting) afterwards. The test plays the sidecar on the
//! node's hook socket.
//!
//! - `a_file_the_node_cannot_read_is_refused_before_staging` (root only: the node runs as
//!   a user of its own): a 0600 file of another user in the incoming directory is answered
//!   `unreadable`, never staged, and the node serves on.

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
        raft_meta: serde_json::json!({}),
        chunk_index: None,
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
