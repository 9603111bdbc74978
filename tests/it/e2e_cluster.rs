//! End to end with real processes: `kv-node` (the example openraft application) and
//! `snaprelay run` sidecars, over loopback, against the file store and SeaweedFS.
//!
//! Each scenario says what an operator would check: the followers end up with the leader's
//! snapshot (same log id, same bytes), built nothing themselves, and purged their logs.

use crate::support;

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use support::cluster::{Cluster, StoreSection};

/// Logs kept behind a snapshot; small, so that purging is visible.
const KEEP: u64 = 10;
/// Node arguments: no automatic snapshots (the test asks the leader), few logs kept.
fn node_args() -> Vec<String> {
    vec![
        "--snapshot-policy-logs".into(),
        "1000000".into(),
        "--max-in-snapshot-log-to-keep".into(),
        KEEP.to_string(),
    ]
}

fn log_id(v: &Value) -> Option<(u64, u64)> {
    Some((v["term"].as_u64()?, v["index"].as_u64()?))
}

/// Asks `leader` for a snapshot and waits until it has one newer than `after`.
async fn leader_snapshot(c: &Cluster, leader: u64, after: Option<(u64, u64)>) -> (u64, u64) {
    c.post(leader, "/snapshot", json!({})).await;
    c.wait_for("the leader's snapshot", Duration::from_secs(30), || async {
        log_id(&c.metrics(leader).await["snapshot"]).filter(|s| Some(*s) > after)
    })
    .await
}

/// Waits until `follower` reports `snapshot`, then checks what an operator would.
async fn assert_adopted(c: &Cluster, leader: u64, follower: u64, snapshot: (u64, u64)) {
    c.wait_for(
        &format!("node {follower} to adopt snapshot {snapshot:?}"),
        Duration::from_secs(30),
        || async {
            (log_id(&c.metrics(follower).await["snapshot"]) == Some(snapshot)).then_some(())
        },
    )
    .await;
    let m = c.metrics(follower).await;
    assert_eq!(
        m["snapshots_built_locally"], 0,
        "node {follower} built a snapshot itself: {m}"
    );
    assert!(m["snapshots_adopted"].as_u64().unwrap() >= 1, "{m}");
    // Logs are purged by the normal policy once openraft records the snapshot.
    c.wait_for(
        &format!("node {follower} to purge its logs"),
        Duration::from_secs(10),
        || async {
            let m = c.metrics(follower).await;
            log_id(&m["purged"])
                .is_some_and(|(_, i)| i + KEEP >= snapshot.1)
                .then_some(())
        },
    )
    .await;
    let lm = c.metrics(leader).await;
    let leader_file = lm["snapshot_path"].as_str().expect("leader snapshot path");
    let follower_file = m["snapshot_path"].as_str().expect("follower snapshot path");
    assert_eq!(
        std::fs::read(leader_file).unwrap(),
        std::fs::read(follower_file).unwrap(),
        "node {follower}'s snapshot differs from the leader's"
    );
    // Nothing unfinished is visible in the node's snapshot directory.
    let dir = Path::new(m["snapshot_dir"].as_str().unwrap());
    for name in support::entries(dir) {
        assert!(!name.ends_with(".partial"), "{name} in {}", dir.display());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn followers_adopt_leader_snapshot_learner_joins_and_leader_fails_over() {
    let work = tempfile::tempdir().unwrap();
    let args = node_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = Cluster::start(3, StoreSection::file(&work.path().join("store")), &args).await;

    // 1. The leader's snapshot reaches both followers.
    c.write_keys("a", 300, 100).await;
    let leader = c.leader(1).await.unwrap();
    let first = leader_snapshot(&c, leader, None).await;
    for f in (1..=3).filter(|&i| i != leader) {
        assert_adopted(&c, leader, f, first).await;
    }
    let published = c.sidecar_log(leader);
    assert!(published.contains("snapshot published"), "{published}");
    // The node's SnapshotDir indexed the file; the sidecar published from that index
    // instead of reading and hashing the whole file.
    assert!(published.contains("chunk_index=true"), "{published}");

    // What an operator scrapes and asks: metrics, health, readiness, `snaprelay status`.
    assert!(c.sidecar_metric(leader, "snaprelay_publishes_total").await >= Some(1.0));
    assert_eq!(
        c.sidecar_metric(leader, "snaprelay_role{role=\"leader\"}")
            .await,
        Some(1.0)
    );
    for f in (1..=3).filter(|&i| i != leader) {
        // The sidecar counts the adoption when the node's answer arrives, a moment after
        // the node itself reports the snapshot.
        c.wait_for(
            "the follower's sidecar metrics",
            Duration::from_secs(10),
            || async {
                let fetched = c.sidecar_metric(f, "snaprelay_fetches_total").await >= Some(1.0);
                let adopted = c
                    .sidecar_metric(f, "snaprelay_adoptions_total{outcome=\"adopted\"}")
                    .await
                    >= Some(1.0);
                let lag = c.sidecar_metric(f, "snaprelay_follower_lag").await == Some(0.0);
                (fetched && adopted && lag).then_some(())
            },
        )
        .await;
        assert_eq!(c.sidecar_http(f, "/healthz").await.0, 200);
        assert_eq!(
            c.sidecar_http(f, "/readyz").await,
            (200, "ok\n".to_string())
        );
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_snaprelay"))
            .arg("--config")
            .arg(&c.sidecar(f).config)
            .args(["status", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", support::stderr(&out));
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["node"]["role"], "follower", "{status}");
        assert_eq!(status["lag"], 0, "{status}");
        assert_eq!(status["newest_index"], first.1, "{status}");
        assert!(
            status["daemon"]["last_event"]
                .as_str()
                .unwrap()
                .starts_with("adopted"),
            "{status}"
        );
    }

    // 2. A new learner catches up through openraft's own replication of the adopted
    //    snapshot, then adopts later snapshots through its sidecar.
    c.spawn_node(4);
    let addr = c.node(4).addr.clone();
    c.start_sidecar(4);
    c.post(leader, "/add-learner", json!({"id": 4, "addr": addr}))
        .await;
    c.wait_for(
        "the learner to catch up",
        Duration::from_secs(30),
        || async { (log_id(&c.metrics(4).await["last_applied"]) >= Some(first)).then_some(()) },
    )
    .await;
    c.write_keys("b", 100, 100).await;
    let second = leader_snapshot(&c, leader, Some(first)).await;
    for f in (1..=4).filter(|&i| i != leader) {
        assert_adopted(&c, leader, f, second).await;
    }

    // 3. Failover: stop the leader; the new leader's sidecar publishes the next snapshot and
    //    the remaining followers adopt it.
    c.kill_sidecar(leader);
    c.kill_node(leader);
    let survivors: Vec<u64> = (1..=3).filter(|&i| i != leader).collect();
    let new_leader = c
        .wait_for("a new leader", Duration::from_secs(30), || async {
            c.leader(survivors[0]).await.filter(|l| *l != leader)
        })
        .await;
    c.write_keys("c", 100, 100).await;
    let third = leader_snapshot(&c, new_leader, Some(second)).await;
    for f in survivors
        .iter()
        .copied()
        .chain([4])
        .filter(|&i| i != new_leader)
    {
        assert_adopted(&c, new_leader, f, third).await;
    }
    assert!(c.sidecar_log(new_leader).contains("snapshot published"));

    // 4. SIGTERM stops every sidecar cleanly within a few seconds.
    for id in survivors.iter().copied().chain([4]) {
        let (took, status) = c.stop_sidecar(id);
        assert!(
            status.success(),
            "sidecar {id} exited with {status}: {}",
            c.sidecar_log(id)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            took < Duration::from_secs(5),
            "sidecar {id} took {took:?} to stop"
        );
    }
}

/// Through S3, in a repository of packs (the default) and in one of chunk objects.
async fn followers_adopt_leader_snapshot_through_s3_of(s3: &support::S3, layout: support::Layout) {
    let args = node_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = Cluster::start_nodes(3, StoreSection::s3(s3, &support::unique("e2e")), &args).await;
    c.repository = layout.section("");
    for id in 1..=3 {
        c.start_sidecar(id);
    }
    c.write_keys("k", 300, 1000).await;
    let leader = c.leader(1).await.unwrap();
    let snap = leader_snapshot(&c, leader, None).await;
    for f in (1..=3).filter(|&i| i != leader) {
        assert_adopted(&c, leader, f, snap).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn followers_adopt_leader_snapshot_through_s3() {
    let Some(s3) = support::s3("followers_adopt_leader_snapshot_through_s3") else {
        return;
    };
    followers_adopt_leader_snapshot_through_s3_of(&s3, support::Layout::Packs).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn followers_adopt_leader_snapshot_of_chunk_objects_through_s3() {
    let Some(s3) = support::s3("followers_adopt_leader_snapshot_of_chunk_objects_through_s3")
    else {
        return;
    };
    followers_adopt_leader_snapshot_through_s3_of(&s3, support::Layout::Chunks).await;
}

/// A follower that is behind the snapshot (it has not even committed the snapshot's index)
/// is not handed it: its sidecar sees the node's committed index and passes the manifest
/// over (the node would refuse it as `not_committed`); the follower adopts the snapshot
/// once it has caught up, without building one, and never before.
#[tokio::test(flavor = "multi_thread")]
async fn lagging_follower_refuses_until_committed_then_adopts() {
    let work = tempfile::tempdir().unwrap();
    // Keep every log, so that the lagging follower catches up by replication of logs (not
    // of the leader's snapshot) and the staged snapshot is what it adopts.
    let args = [
        "--snapshot-policy-logs",
        "1000000",
        "--max-in-snapshot-log-to-keep",
        "100000",
    ];
    let c = Cluster::start(3, StoreSection::file(&work.path().join("store")), &args).await;
    c.write_keys("a", 20, 10).await;
    let leader = c.leader(1).await.unwrap();
    let lagging = (1..=3).find(|&i| i != leader).unwrap();
    c.post(lagging, "/admin/isolate", json!({"isolated": true}))
        .await;
    c.write_keys("b", 100, 10).await;
    let snap = leader_snapshot(&c, leader, None).await;

    c.wait_for(
        "the lagging follower's sidecar to pass over the snapshot its node has not committed",
        Duration::from_secs(30),
        || async {
            c.sidecar_log(lagging)
                .contains("not fetching a manifest beyond what the node has committed")
                .then_some(())
        },
    )
    .await;
    let m = c.metrics(lagging).await;
    assert!(log_id(&m["last_applied"]) < Some(snap), "{m}");
    assert_ne!(
        log_id(&m["snapshot"]),
        Some(snap),
        "adopted before catching up: {m}"
    );

    c.post(lagging, "/admin/isolate", json!({"isolated": false}))
        .await;
    c.wait_for(
        "the lagging follower to adopt after catching up",
        Duration::from_secs(60),
        || async { (log_id(&c.metrics(lagging).await["snapshot"]) == Some(snap)).then_some(()) },
    )
    .await;
    let m = c.metrics(lagging).await;
    assert_eq!(m["snapshots_built_locally"], 0, "{m}");
    assert_eq!(m["snapshots_adopted"], 1, "{m}");
    let leader_file = c.metrics(leader).await["snapshot_path"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        std::fs::read(leader_file).unwrap(),
        std::fs::read(m["snapshot_path"].as_str().unwrap()).unwrap()
    );
}

/// Killing a follower's sidecar in the middle of a fetch is harmless: the node never sees a
/// partial file, and the restarted sidecar converges.
#[tokio::test(flavor = "multi_thread")]
async fn follower_sidecar_killed_mid_fetch_converges() {
    let work = tempfile::tempdir().unwrap();
    let args = node_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = Cluster::start(3, StoreSection::file(&work.path().join("store")), &args).await;
    // About 60 MiB of state, so that a fetch takes long enough to be interrupted.
    c.write_keys("big", 300, 200 * 1024).await;
    let leader = c.leader(1).await.unwrap();
    let victim = (1..=3).find(|&i| i != leader).unwrap();
    let incoming =
        std::path::PathBuf::from(c.metrics(victim).await["incoming_dir"].as_str().unwrap());
    c.post(leader, "/snapshot", json!({})).await;

    // Kill the sidecar as soon as its staging file appears.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if support::entries(&incoming)
            .iter()
            .any(|n| n.ends_with(".partial"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no fetch started; {}",
            c.sidecar_log(victim)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    c.kill_sidecar(victim);
    let m = c.metrics(victim).await;
    assert_eq!(
        m["snapshots_adopted"], 0,
        "the node adopted before the fetch finished: {m}"
    );
    let snap_dir = Path::new(m["snapshot_dir"].as_str().unwrap()).to_owned();
    assert!(support::entries(&snap_dir)
        .iter()
        .all(|n| !n.ends_with(".partial")));

    c.start_sidecar(victim);
    let snap = log_id(&c.metrics(leader).await["snapshot"]).unwrap();
    assert_adopted(&c, leader, victim, snap).await;
    assert_eq!(c.metrics(victim).await["snapshots_adopted"], 1);
    let left: Vec<String> = support::entries(&incoming)
        .into_iter()
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(left.is_empty(), "staging files left behind: {left:?}");
}
