//! A node whose current snapshot is bad at startup still starts: the snapshot is moved aside
//! with an ERROR log, the node falls back to the previous one (or to none) and catches up
//! from the leader, never a crash loop. Three real `kv-node` processes on loopback.
//!
//! - `corrupt_current_snapshot_is_moved_aside_and_the_node_catches_up`: node 2's only
//!   snapshot gets other bytes of the same size (its recorded sha256 no longer matches);
//!   restarted, it logs the error, has no snapshot, serves and catches up.
//! - then its newest snapshot is a relabelled copy of the previous one (sha256 and
//!   raft_meta consistent, content at another log id): restarted, it moves that one aside,
//!   loads the previous one, serves and catches up.

mod common;

use std::time::{Duration, Instant};

use common::KvNode;
use serde_json::json;
use snaprelay_hook::ipc::LogIdRef;
use snaprelay_hook::snapdir::{self, Snapshot};
use snaprelay_hook::REJECTED_DIR;

async fn wait_read(node: &KvNode, key: &str, value: &str) {
    let deadline = Instant::now() + common::WAIT;
    while node.read(key).await.as_deref() != Some(value) {
        assert!(
            Instant::now() < deadline,
            "node {} did not catch up to {key}={value}\n{}",
            node.id,
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks `node` for a snapshot of everything it applied and returns it once committed.
async fn own_snapshot(node: &KvNode) -> Snapshot {
    let applied = node.metrics().await.last_applied.unwrap();
    node.post("/snapshot", json!({})).await;
    let m = node
        .wait_metrics("its own snapshot", |m| {
            m.snapshot.is_some_and(|s| s.index >= applied.index)
        })
        .await;
    let s = m.snapshot.unwrap();
    Snapshot::open(
        &node
            .snapshot_dir()
            .join(snapdir::file_names(s.index, s.term).1),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_current_snapshot_is_moved_aside_and_the_node_catches_up() {
    let root = tempfile::tempdir().unwrap();
    let base = ["--snapshot-policy-logs", "1000000"];
    let n1 = KvNode::start(&root.path().join("n1"), 1, &base, None).await;
    // Node 2 builds its own snapshots when asked (no sidecar in this test).
    let mut n2 = KvNode::start(
        &root.path().join("n2"),
        2,
        &["--snapshot-policy-logs", "1000000", "--defer-limit", "0"],
        None,
    )
    .await;
    let n3 = KvNode::start(&root.path().join("n3"), 3, &base, None).await;
    n1.init_alone().await;
    for n in [&n2, &n3] {
        n1.post("/add-learner", json!({"id": n.id, "addr": n.http}))
            .await;
    }
    n1.post("/change-membership", json!({"members": [1, 2, 3]}))
        .await;
    for i in 0..30 {
        n1.write(&format!("a{i}"), "1").await;
    }
    wait_read(&n2, "a29", "1").await;
    let first = own_snapshot(&n2).await;

    // -- corrupt: same size, other bytes.
    n2.kill();
    let mut bytes = std::fs::read(&first.data_path).unwrap();
    bytes.iter_mut().for_each(|b| *b = b.wrapping_add(1));
    std::fs::write(&first.data_path, &bytes).unwrap();
    n1.write("b", "while node 2 was down").await;
    n2.restart().await;
    assert!(n2.is_running(), "the node started");
    let log = n2.log_text();
    assert!(
        log.contains("ERROR") && log.contains("moved it aside") && log.contains("sha256"),
        "{log}"
    );
    let rejected = n2.snapshot_dir().join(REJECTED_DIR);
    assert!(rejected.join(first.meta_path.file_name().unwrap()).exists());
    assert!(snapdir::scan(&n2.snapshot_dir())
        .unwrap()
        .snapshots
        .is_empty());
    wait_read(&n2, "b", "while node 2 was down").await;
    wait_read(&n2, "a0", "1").await;

    // -- mislabelled: a newest snapshot whose content is at another log id.
    n1.write("c", "1").await;
    wait_read(&n2, "c", "1").await;
    let previous = own_snapshot(&n2).await;
    n2.kill();
    let label = LogIdRef {
        term: previous.envelope.last_log_term,
        index: previous.envelope.last_log_index + 5,
    };
    let (data, meta) = snapdir::file_names(label.index, label.term);
    std::fs::copy(&previous.data_path, n2.snapshot_dir().join(&data)).unwrap();
    let mut envelope = previous.envelope.clone();
    envelope.last_log_index = label.index;
    envelope.data = data;
    envelope.chunk_index = None;
    envelope.raft_meta["last_log_id"]["index"] = label.index.into();
    snapdir::commit_envelope(&n2.snapshot_dir(), &meta, &envelope).unwrap();
    n1.write("d", "after the relabel").await;
    n2.restart().await;
    let log = n2.log_text();
    assert!(log.contains(&format!("not at {label}")), "{log}");
    assert!(rejected.join(&meta).exists());
    let m = n2.metrics().await;
    assert_eq!(
        m.snapshot.map(|s| s.index),
        Some(previous.envelope.last_log_index),
        "fell back to the previous snapshot: {m:?}"
    );
    wait_read(&n2, "d", "after the relabel").await;
    assert!(n2.is_running());
    drop(n3);
}
