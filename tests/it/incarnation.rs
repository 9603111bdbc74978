//! A re-created repository (a cluster re-created from scratch reusing its cluster id and its
//! store) is refused by every sidecar that followed the old one, fatally and with an error
//! that says what happened and what to do; with real `kv-node` and `snaprelay run`
//! processes over a file:// store.

use crate::support;

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use snaprelay::chunk::ChunkParams;
use snaprelay::incarnation::{Record, FILE};
use snaprelay::repo::Repo;
use snaprelay::store::{Store, StoreSettings, StoreUrl};
use support::cluster::{Cluster, StoreSection};

fn node_args() -> Vec<&'static str> {
    vec!["--snapshot-policy-logs", "1000000"]
}

fn store(dir: &Path) -> Store {
    let url = StoreUrl::parse(&format!("file://{}", dir.display())).unwrap();
    Store::open(&StoreSettings::for_url(url)).unwrap()
}

/// Empties the store and makes a new repository there, for the same cluster id: what an
/// operator re-creating the cluster from scratch ends up with. Returns its incarnation.
async fn recreate(dir: &Path) -> String {
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let repo = Repo::open_or_create(store(dir), "e2e", ChunkParams::default())
        .await
        .unwrap();
    repo.incarnation().to_owned()
}

/// Waits until the store has a manifest at or after `index`; returns the repository.
async fn published(c: &Cluster, dir: &Path, after: u64) -> Repo {
    c.wait_for("a published snapshot", Duration::from_secs(30), || async {
        let repo = Repo::open(store(dir), "e2e").await.ok()?;
        let newest = repo.newest_manifest(None).await.ok()??;
        (newest.index > after).then_some(repo)
    })
    .await
}

/// The sidecar's status command, as JSON.
fn status(c: &Cluster, id: u64) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_snaprelay"))
        .arg("--config")
        .arg(&c.sidecar(id).config)
        .args(["status", "--json"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A sidecar with a state directory records the incarnation; restarted against a
/// re-created repository, it refuses it (exits with an error naming both incarnations and
/// the file to remove) and publishes nothing; `status` shows both; once the operator
/// removes the record, it follows the new repository.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_sidecar_refuses_a_recreated_repository() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let mut c = Cluster::start_nodes(1, StoreSection::file(&store_dir), &node_args()).await;
    c.start_sidecar(1);
    c.post(1, "/snapshot", json!({})).await;
    let first = published(&c, &store_dir, 0).await;
    let recorded = first.incarnation().to_owned();
    let file = c.sidecar_state_dir(1).join(FILE);
    let record = c
        .wait_for(
            "the incarnation record",
            Duration::from_secs(10),
            || async { Record::read(&c.sidecar_state_dir(1)).ok().flatten() },
        )
        .await;
    assert_eq!(record.incarnation, recorded);
    assert_eq!(record.cluster_id, "e2e");
    let (_, stopped) = c.stop_sidecar(1);
    assert!(stopped.success());

    let found = recreate(&store_dir).await;
    assert_ne!(found, recorded);
    c.start_sidecar(1);
    let Some(exit) = c.wait_sidecar_exit(1, Duration::from_secs(30)) else {
        c.fail("the sidecar kept running against a re-created repository");
    };
    assert!(!exit.success(), "{exit:?}");
    let log = c.sidecar_log(1);
    for part in [
        "was re-created",
        recorded.as_str(),
        found.as_str(),
        &file.display().to_string(),
        "giving up",
    ] {
        assert!(log.contains(part), "the log lacks {part:?}:\n{log}");
    }
    let repo = Repo::open(store(&store_dir), "e2e").await.unwrap();
    assert!(
        repo.list_manifests(None).await.unwrap().is_empty(),
        "the refusing sidecar published into the new repository"
    );
    let s = status(&c, 1);
    assert_eq!(s["incarnation"], found.as_str(), "{s}");
    assert_eq!(s["recorded_incarnation"], recorded.as_str(), "{s}");

    // The operator accepts the new repository.
    std::fs::remove_file(&file).unwrap();
    c.start_sidecar(1);
    c.post(1, "/snapshot", json!({})).await;
    published(&c, &store_dir, 0).await;
    let record = c
        .wait_for("the new record", Duration::from_secs(10), || async {
            Record::read(&c.sidecar_state_dir(1))
                .ok()
                .flatten()
                .filter(|r| r.incarnation == found)
        })
        .await;
    assert_eq!(record.incarnation, found);
}

/// Without a state directory the record lives in memory (the log says so once): a
/// repository re-created under a running sidecar is refused at its next snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn a_running_sidecar_without_state_dir_refuses_a_repository_recreated_under_it() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let mut c = Cluster::start_nodes(1, StoreSection::file(&store_dir), &node_args()).await;
    c.start_sidecar_with(1, &[], false);
    c.post(1, "/snapshot", json!({})).await;
    let first = published(&c, &store_dir, 0).await;
    let recorded = first.incarnation().to_owned();
    let newest = first.newest_manifest(None).await.unwrap().unwrap().index;

    let found = recreate(&store_dir).await;
    c.write_keys("k", 3, 10).await;
    c.post(1, "/snapshot", json!({})).await;
    let Some(exit) = c.wait_sidecar_exit(1, Duration::from_secs(30)) else {
        c.fail("the sidecar kept running against a re-created repository");
    };
    assert!(!exit.success(), "{exit:?}");
    let log = c.sidecar_log(1);
    assert_eq!(
        log.matches("remembered only while this process runs")
            .count(),
        1,
        "{log}"
    );
    for part in [
        "was re-created",
        recorded.as_str(),
        found.as_str(),
        "in memory only",
    ] {
        assert!(log.contains(part), "the log lacks {part:?}:\n{log}");
    }
    let repo = Repo::open(store(&store_dir), "e2e").await.unwrap();
    assert!(
        repo.newest_manifest(None).await.unwrap().is_none(),
        "snapshot {newest}+ reached the new repository"
    );
}
