//! The library proven on a second application: `counter-node` (examples/counter, a
//! deliberately minimal openraft service) with real `snaprelay run` sidecars over loopback
//! and the file store. What an operator would check: the leader publishes, both followers
//! adopt its snapshot (same log id, byte-identical file, nothing built locally, logs
//! purged), and every node holds the same counts.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::cluster::{counter_node_bin, Cluster, StoreSection};

/// Logs kept behind a snapshot: small, so that purging is visible.
const KEEP: u64 = 10;

fn log_id(v: &Value) -> Option<(u64, u64)> {
    Some((v["term"].as_u64()?, v["index"].as_u64()?))
}

#[tokio::test(flavor = "multi_thread")]
async fn counter_followers_adopt_the_leaders_snapshot() {
    let work = tempfile::tempdir().unwrap();
    let keep = KEEP.to_string();
    let args = [
        "--snapshot-policy-logs",
        "1000000",
        "--max-in-snapshot-log-to-keep",
        keep.as_str(),
    ];
    let store = StoreSection::file(&work.path().join("store"));
    let c = Cluster::start_with(counter_node_bin(), 3, store, &args).await;
    c.write_keys("c", 120, 1).await;
    let leader = c.leader(1).await.expect("a leader");
    c.post(leader, "/snapshot", json!({})).await;
    let snapshot = c
        .wait_for("the leader's snapshot", Duration::from_secs(30), || async {
            log_id(&c.metrics(leader).await["snapshot"])
        })
        .await;
    let leader_metrics = c.metrics(leader).await;
    let leader_file = leader_metrics["snapshot_path"].as_str().unwrap().to_owned();
    for f in (1..=3).filter(|&i| i != leader) {
        c.wait_for(
            &format!("counter node {f} to adopt {snapshot:?}"),
            Duration::from_secs(60),
            || async { (log_id(&c.metrics(f).await["snapshot"]) == Some(snapshot)).then_some(()) },
        )
        .await;
        c.wait_for(
            &format!("counter node {f} to purge its logs"),
            Duration::from_secs(10),
            || async {
                log_id(&c.metrics(f).await["purged"])
                    .is_some_and(|(_, i)| i + KEEP >= snapshot.1)
                    .then_some(())
            },
        )
        .await;
        let m = c.metrics(f).await;
        assert_eq!(
            m["snapshots_built_locally"], 0,
            "node {f} built one itself: {m}"
        );
        assert_eq!(m["snapshots_adopted"], 1, "{m}");
        assert_eq!(
            std::fs::read(&leader_file).unwrap(),
            std::fs::read(m["snapshot_path"].as_str().unwrap()).unwrap(),
            "node {f}'s snapshot differs from the leader's"
        );
        assert_eq!(m["counts"], leader_metrics["counts"], "node {f}");
    }
    assert_eq!(leader_metrics["counts"].as_object().unwrap().len(), 120);
    assert!(c.sidecar_log(leader).contains("snapshot published"));
}
