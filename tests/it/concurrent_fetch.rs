//! Two fetchers running as the same user into one directory: a `snaprelay pull` into the
//! directory a sidecar fetches into, or two sidecars configured for one node. Both would
//! use the staging file named after the snapshot, so each must keep the directory to itself
//! while it writes there, and the one that cannot (a fetch, a prefetch, a daemon cleaning
//! its incoming directory) must leave the other's files alone.
//!
//! Deterministic: the first fetch is held at a gate on its first pack read (its staging
//! file is open by then), the second runs to its end, then the gate opens.

use crate::support;

use std::path::Path;

use snaprelay::fetch::{self, FetchReport, Fetcher};
use snaprelay::manifest_v2::{Manifest, NewRepository};
use snaprelay::progress::Silent;
use snaprelay::repo::Repo;
use support::gate::GateStore;

async fn manifest(repo: &Repo, index: u64) -> Manifest {
    let id = repo.manifest_for(index, 1).await.unwrap().unwrap();
    repo.read_packed_manifest(&id).await.unwrap()
}

async fn fetch_into(repo: &Repo, dir: &Path) -> snaprelay::error::Result<FetchReport> {
    let m = manifest(repo, 1).await;
    Fetcher::new(repo, 4, &Silent)
        .fetch_packed(&m, dir, None)
        .await
}

/// The envelope's sha256 of the snapshot committed in `dir` at (1, 1), and the data file's.
fn committed(dir: &Path) -> (String, String) {
    let (data, meta) = snaprelay::snapdir::file_names(1, 1);
    let envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(meta)).unwrap()).unwrap();
    let claimed = envelope["sha256"].as_str().unwrap().to_string();
    (claimed, support::sha256_file(&dir.join(data)))
}

/// Snapshot (1, 1) of two clusters (two stores), the same size, different bytes: the
/// same staging name in a directory both are fetched into. The second fetch, started
/// while the first holds its staging file, is refused without touching it (the bug: it
/// took that file as its own resumable one and committed it, and the first fetch's
/// writes then landed in a committed snapshot whose envelope no longer described it);
/// the first then completes, and the committed file is what its envelope says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_fetch_into_the_same_directory_is_refused_and_leaves_the_first_alone() {
    let work = tempfile::tempdir().unwrap();
    let test = "a_second_fetch_into_the_same_directory_is_refused_and_leaves_the_first_alone";
    let store = crate::streaming::store(test, work.path());
    let mut repos = Vec::new();
    for (cluster, seed) in [("first", 1u64), ("second", 2)] {
        let store = match seed {
            1 => store.clone(),
            _ => crate::streaming::store(test, &work.path().join(cluster)),
        };
        let repo = Repo::open_or_create(store, cluster, NewRepository::default())
            .await
            .unwrap();
        let data = support::random_bytes(3 << 20, seed);
        let meta = support::write_snapshot(&work.path().join(cluster), 1, 1, &data);
        crate::streaming::publish(repo.clone(), &meta, false)
            .await
            .unwrap();
        repos.push(repo);
    }
    let dir = work.path().join("follower");
    std::fs::create_dir_all(&dir).unwrap();

    let gate = GateStore::holding_gets(store.backend.clone(), "packs");
    let gated = Repo::open(crate::streaming::gated(&store, &gate), "first")
        .await
        .unwrap();
    let first = tokio::spawn({
        let dir = dir.clone();
        async move { fetch_into(&gated, &dir).await }
    });
    gate.arrived().await;
    let staging = dir.join(format!(
        ".{}.partial",
        snaprelay::snapdir::file_names(1, 1).0
    ));
    assert!(
        staging.exists(),
        "the first fetch is held with its staging file open"
    );

    let second = fetch_into(&repos[1], &dir).await;
    // A prefetch (the daemon's) is kept out the same way, and a daemon's cleaning of its
    // incoming directory, which would remove the staging file as a leftover, does nothing.
    let prefetch = fetch::open_staging_for(&dir, (1, 1), 3 << 20, None);
    assert_eq!(fetch::clean_incoming(&dir, &[]).unwrap(), 0);
    assert!(
        staging.exists(),
        "the refused fetches left the first one's staging file in place"
    );
    gate.open();
    let first = first.await.unwrap();

    let (claimed, actual) = committed(&dir);
    assert_eq!(
        actual, claimed,
        "the committed snapshot is what its envelope says"
    );
    let first = first.expect("the first fetch completes");
    assert_eq!(first.sha256, claimed);
    assert!(!staging.exists());

    for (what, refused) in [
        ("the second fetch", second.err().map(|e| e.to_string())),
        ("the prefetch", prefetch.err().map(|e| e.to_string())),
    ] {
        let message = refused.unwrap_or_else(|| panic!("{what} was not refused"));
        assert!(
            message.contains(&dir.display().to_string())
                && message.contains("another fetch into this directory is running"),
            "{what}: {message}"
        );
    }

    // Once the first is done, the directory is free again.
    let again = fetch_into(&repos[1], &dir).await.unwrap();
    assert_eq!(committed(&dir).1, again.sha256);
}
