//! `scripts/demo.py`, the cluster demo of the README, run as a user runs it (on this build's
//! binaries, with less data), so that it cannot drift from the product: three nodes and their
//! sidecars form a cluster, both followers adopt the leader's first snapshot, and the second
//! snapshot, after a small change, travels as a small part of the first. The demo checks each
//! of these itself (byte-identical files, adopted not built, the second snapshot's bytes under
//! half the first's by each sidecar's /metrics) and exits non-zero with the failing node's
//! answer and every log's last lines when one does not hold.

use std::path::Path;
use std::process::Command;

use crate::support::cluster::kv_node_bin;

#[test]
fn demo_shows_followers_adopting_and_an_incremental_second_snapshot() {
    let bin = kv_node_bin();
    let bin_dir = bin.parent().unwrap();
    let snaprelay = Path::new(env!("CARGO_BIN_EXE_snaprelay"));
    assert_eq!(
        snaprelay.parent().unwrap(),
        bin_dir,
        "kv-node next to snaprelay"
    );
    let output = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo.py"))
        .env("DEMO_BIN", bin_dir)
        // 1000 values of 8000 bytes: an 8 MB snapshot of about 8 chunks, few enough for a
        // debug build, enough for the second snapshot to leave most of them as they were.
        .env("DEMO_KEYS", "1000")
        .env_remove("DEMO_KEEP")
        .output()
        .expect("running python3 scripts/demo.py (CI needs Python 3 anyway, for the S3 server)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the demo failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    for expected in [
        "every node holds snapshot",
        "What each sidecar moved",
        "verified",
        "== cleaned up",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
}
